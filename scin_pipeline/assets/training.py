"""Training assets: image_tensors (decoded uint8 cache) -> frozen embeddings per backbone (image_embeddings:
ResNet50, efficientnet_embeddings: EfficientNetV2-B0) -> the candidate classifiers.

Each candidate is one asset and one MLflow run (tagged with the Dagster run id, asset key, code version
and the splits' data version); its output is a one-row table pointing at the packaged model (one file that
takes raw uint8 images and/or case metadata) and its registered version. The rules (models, training
loop, cache, packaging) live in scin_pipeline.core; these assets feed them and record what happened.
Every candidate is declared through one skeleton, ``candidate_asset`` (reuse, the MLflow run, packaging,
registration, the output table); all that differs between candidates is their training function. The
skeleton also calibrates every image candidate (keras_image, keras_multimodal): one temperature fitted on the
validation split through the packaged model itself (core.calibration), stored in the package, applied by its
predict_proba wherever it predicts.

Idempotent by construction: a candidate's MLflow run is keyed by (asset, code version, config, splits data
version, inputs' versions). A rerun with the same key finds the FINISHED run and its packaged model and
returns them without training or opening a new run; a run killed mid-training is resumed (same MLflow run,
Keras BackupAndRestore from the last finished epoch).
"""

import hashlib
import json
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetsDefinition,
    Config,
    Failure,
    MetadataValue,
    Output,
    asset,
)
from pydantic import Field

from scin_pipeline.assets._metadata import table_md, versioned_output
from scin_pipeline.core import image_cache
from scin_pipeline.core.atomic import atomic_target
from scin_pipeline.core.image_cache import split_arrays, split_rows
from scin_pipeline.core.progress import Progress
from scin_pipeline.core.questionnaire import (
    DEFAULT_QUESTIONNAIRE_DROPOUT,
    QUESTIONNAIRE_EXTRA,
    blank_questionnaires,
    questionnaire_scores,
)
from scin_pipeline.core.rendering import png_data_uri_bytes
from scin_pipeline.core.splits import SPLITS_VERSION_COLUMNS, splits_data_version
from scin_pipeline.core.training import TrainConfig, TrainResult, TransferResult, monitored_key
from scin_pipeline.resources import MlflowTracking, ScinSourceResource, StoragePaths
from scin_pipeline.resources.mlflow_tracking import (
    CANDIDATE_TAG,
    KERAS_BACKEND_TAG,
    MODEL_URI_TAG,
    REGISTERED_VERSION_TAG,
    TRAINING_MODE_TAG,
    WEIGHTS_TAG,
    config_hash,
    dagster_tags,
    run_key_for,
)

if TYPE_CHECKING:
    from scin_pipeline.core.calibration import TemperatureScaling

GROUP = "training"
# The artifact of a candidate's run that its Dagster metadata shows (again, when the run is reused).
TRAINING_CURVES_ARTIFACT = "training_curves.png"
# One training per GPU (the deployment sets the pool's limit); Kubernetes gets a GPU request per step.
GPU_TAGS = {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}}
CANDIDATE_COLUMNS = [
    "model",
    "kind",
    "classes",
    "image_size",
    "package_dir",
    "mlflow_run_id",
    "model_uri",
    "registered_version",
    "run_key",
    "splits_data_version",
    "best_epoch",
    "best_val_score",
    "monitor",
    "reused",
    "resumed",
    "keras_backend",
    "weights",
    "questionnaire_dropout",
]


def frame_version(frame: pd.DataFrame, columns: list[str]) -> str:
    """A short content hash of a table's key columns (the asset's data version)."""
    key = frame[columns].astype(str)
    return hashlib.sha256(pd.util.hash_pandas_object(key, index=False).to_numpy().tobytes()).hexdigest()[:16]


def class_names(labeled_splits: pd.DataFrame) -> list[str]:
    return sorted(labeled_splits["label"].astype(str).unique())


# --------------------------------------------------------------------------------------------------------
# image_tensors


class ImageTensorsConfig(Config):
    image_size: int | None = Field(
        default=None,
        description="which of the sizes image_quality cached (its tensor_sizes) training reads; default: "
        "the first of them",
    )


@asset(
    group_name=GROUP,
    kinds={"numpy", "parquet"},
    code_version="2",
    description="The index of the uint8 training tensors of every image the quality rule keeps "
    "(image_quality.keep), labelled or not, derm-ungradable included: every image of quality_filtered_index "
    "and of unlabelled_pool (no split column: join on image_id). The pixels were written by image_quality from its "
    "one decode per image (shorter side resized and centre-cropped to a square, uint8 .npy shards under "
    "<data-root>/cache/image_tensors/<size>px/); nothing is decoded here. Training and evaluation read pixels "
    "from the shards, never from PNGs.",
)
def image_tensors(
    context: AssetExecutionContext,
    config: ImageTensorsConfig,
    image_quality: pd.DataFrame,
    storage: StoragePaths,
):
    cache_dir = storage.image_tensors_dir
    sizes = image_cache.cached_sizes(image_quality)
    size = config.image_size or (sizes[0] if sizes else None)
    if size is None or size not in sizes:
        raise Failure(
            f"image_tensors: image_quality cached no {size or ''} px training tensors (cached: "
            f"{', '.join(f'{s} px' for s in sizes) or 'none'}); set image_quality's tensor_sizes "
            f"(e.g. --set image_quality.tensor_sizes=[{size or image_cache.DEFAULT_IMAGE_SIZE}]) and materialise "
            "it again",
            allow_retries=False,
        )
    # Every image the quality rule keeps: the gradability filter (quality_filtered_index) and the splits are
    # applied by the consumers, so changing either re-indexes nothing.
    kept = image_quality.loc[image_quality["keep"].fillna(False).astype(bool), "image_id"].sort_values()
    index = image_cache.tensor_index(kept, image_quality, cache_dir, size)
    # After the new index exists: shards the current quality table no longer names (an older run's, a size
    # dropped from tensor_sizes, the former split-keyed layout) go.
    removed = image_cache.remove_unreferenced_shards(cache_dir, image_cache.referenced_shards(image_quality))
    failed = index[index["status"] != "ok"]
    ok = index[index["status"] == "ok"]
    shard_bytes = sum((cache_dir / s).stat().st_size for s in ok["shard"].unique() if (cache_dir / s).exists())
    preview = image_cache.load_images(ok.head(12), cache_dir) if len(ok) else None
    version = frame_version(index, ["image_id", "shard", "offset", "status"])
    metadata = {
        "data_version": version,
        "image_size": size,
        "images": len(ok),
        "failed": len(failed),
        "failures": table_md(failed, ["image_id", "reason"], rows=20),
        "cache_dir": MetadataValue.path(storage.stored(cache_dir)),
        "cache_megabytes": round(shard_bytes / 1e6, 1),
        "stale_files_removed": len(removed),
    }
    if preview is not None and len(preview):
        metadata["preview"] = MetadataValue.md(f"![cached images]({png_data_uri_bytes(_grid(preview))})")
    return versioned_output(index, version, metadata=metadata)


def _grid(images: np.ndarray, columns: int = 6) -> bytes:
    """A PNG contact grid of cached uint8 images (what the models see)."""
    import cv2

    n, size = len(images), images.shape[1]
    rows = -(-n // columns)
    canvas = np.full((rows * size, columns * size, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * size : (r + 1) * size, c * size : (c + 1) * size] = image
    ok, data = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    return data.tobytes()


# --------------------------------------------------------------------------------------------------------
# shared training configuration


# One set of training defaults: core.training.TrainConfig's. The Dagster configs below read theirs off it,
# and _train_config hands every field back, by name (scin_pipeline_tests/core/test_training.py checks both).
_TRAIN_DEFAULTS = TrainConfig()


class TrainingConfig(Config):
    """Common knobs of every Keras candidate (Launchpad-editable; fixed seeds). Defaults: core.training's."""

    backend: Literal["auto", "tensorflow", "jax", "torch"] = Field(
        default="auto", description="Keras backend (auto: KERAS_BACKEND, else jax on a GPU host, else tensorflow)"
    )
    mixed_precision: Literal["auto", "bfloat16", "off"] = Field(
        default=_TRAIN_DEFAULTS.mixed_precision, description="auto: bfloat16 on an accelerator, float32 on CPU"
    )
    epochs: int = Field(default=_TRAIN_DEFAULTS.epochs, ge=1)
    batch_size: int = Field(default=_TRAIN_DEFAULTS.batch_size, ge=1)
    learning_rate: float = Field(default=_TRAIN_DEFAULTS.learning_rate, gt=0)
    early_stopping_patience: int = Field(default=_TRAIN_DEFAULTS.early_stopping_patience, ge=1)
    monitor: Literal["val_macro_f1", "val_balanced_accuracy"] = _TRAIN_DEFAULTS.monitor
    class_weighting: Literal["balanced", "none"] = _TRAIN_DEFAULTS.class_weighting
    augment: bool = Field(
        default=_TRAIN_DEFAULTS.augment, description="flips, 90° turns, small crops; never colour (skin tone)"
    )
    seed: int = _TRAIN_DEFAULTS.seed
    loader_workers: int = Field(
        default=_TRAIN_DEFAULTS.loader_workers, ge=1, description="threads preparing training batches of images"
    )


class TransferConfig(TrainingConfig):
    mode: Literal["auto", "head_on_embeddings", "fine_tune"] = Field(
        default="auto", description="auto: fine_tune on an accelerator; on CPU a head on frozen embeddings"
    )
    fine_tune_epochs: int = Field(default=_TRAIN_DEFAULTS.fine_tune_epochs, ge=0)
    fine_tune_learning_rate: float = Field(default=_TRAIN_DEFAULTS.fine_tune_learning_rate, gt=0)
    unfreeze_layers: int = Field(
        default=_TRAIN_DEFAULTS.unfreeze_layers, ge=0, description="top backbone layers unfrozen in phase 2"
    )
    dropout: float = Field(default=0.3, ge=0, lt=1)


class FixMatchTrainingConfig(TransferConfig):
    """resnet50_transfer's knobs plus FixMatch's (core.semi_supervised.FixMatchConfig; defaults are its own)."""

    threshold: float = Field(
        default=0.95, gt=0, le=1, description="pseudo-label kept when its top probability reaches this"
    )
    unlabelled_weight: float = Field(default=1.0, ge=0, description="weight of the consistency loss (lambda_u)")
    unlabelled_ratio: int = Field(default=7, ge=1, description="pool images per labelled image in a step (mu)")
    weak_views: int = Field(default=1, ge=1, description="head mode: embedded weak views per image (1 = plain)")
    strong_views: int = Field(default=2, ge=1, description="head mode: embedded strong views per pool image")
    max_pool_images: int = Field(
        default=0, ge=0, description="use at most this many pool images (a fixed, hash-ordered sample; 0 = all)"
    )


class EmbeddingsConfig(Config):
    backend: Literal["auto", "tensorflow", "jax", "torch"] = "auto"
    weights: Literal["imagenet", "none"] = Field(
        default="imagenet", description="backbone weights; 'none' = random init (tests, offline)"
    )
    allow_offline_fallback: bool = Field(
        default=True, description="when the ImageNet weights cannot be downloaded, warn and use weights=None"
    )
    batch_size: int = Field(default=32, ge=1)
    seed: int = Field(
        default=0,
        description="seeds the backbone's random initialisation (weights none, or the offline fallback), so "
        "its embeddings do not depend on what ran before in the process",
    )


# Modality dropout of the candidates that read the questionnaire (core.questionnaire says why).
_QUESTIONNAIRE_DROPOUT = Field(
    default=DEFAULT_QUESTIONNAIRE_DROPOUT,
    ge=0,
    lt=1,
    description="share of training examples whose whole questionnaire is blanked, as a blank form is encoded "
    "when serving, so that the model also answers from the image alone (0: off)",
)


class MultimodalConfig(TransferConfig):
    questionnaire_dropout: float = _QUESTIONNAIRE_DROPOUT


class MetadataModelConfig(Config):
    seed: int = 0
    questionnaire_dropout: float = _QUESTIONNAIRE_DROPOUT


class SelfTrainedMetadataModelConfig(MetadataModelConfig):
    """Self-training of the metadata model on the unlabelled pool (core.metadata_model.SelfTrainingConfig)."""

    threshold: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="a pool case is pseudo-labelled when the model's top class probability is at least this",
    )
    max_rounds: int = Field(default=3, ge=0, description="pseudo-labelling rounds (0: the supervised model)")
    pseudo_label_weight: float = Field(
        default=0.5, gt=0, le=1, description="a pseudo-label weighs this much of a dermatologist's label"
    )

    def rule(self):
        from scin_pipeline.core.metadata_model import SelfTrainingConfig

        return SelfTrainingConfig(
            threshold=self.threshold, max_rounds=self.max_rounds, pseudo_label_weight=self.pseudo_label_weight
        )


def _train_config(config: TrainingConfig) -> TrainConfig:
    """core.training's TrainConfig from a candidate's Dagster config, every field by name. Only
    TransferConfig has the fine-tuning fields: the baseline CNN never fine-tunes and keeps core's values."""
    tuning = config if isinstance(config, TransferConfig) else _TRAIN_DEFAULTS
    return TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        fine_tune_epochs=tuning.fine_tune_epochs,
        fine_tune_learning_rate=tuning.fine_tune_learning_rate,
        unfreeze_layers=tuning.unfreeze_layers,
        early_stopping_patience=config.early_stopping_patience,
        monitor=config.monitor,
        seed=config.seed,
        class_weighting=config.class_weighting,
        mixed_precision=config.mixed_precision,
        augment=config.augment,
        loader_workers=config.loader_workers,
    )


def _prepare_keras(config) -> dict:
    """Select the Keras backend and precision policy before Keras is imported in this process."""
    from scin_pipeline.core import backend

    backend.select_backend(config.backend)
    policy = backend.apply_mixed_precision(getattr(config, "mixed_precision", "off"))
    described = backend.describe_backend()
    described["policy"] = policy
    described["accelerator"] = bool(backend.accelerator_devices())
    return described


# --------------------------------------------------------------------------------------------------------
# image_embeddings


# Each frozen-embeddings asset and its backbone (filled by embeddings_asset): how a candidate's inputs say
# which embeddings it trained on (inputs_version) and which backbone they came from.
EMBEDDINGS_ASSETS: dict[str, str] = {}


def embeddings_asset(name: str, backbone: str, description: str) -> AssetsDefinition:
    """The frozen-embeddings asset of one backbone (core.models.BACKBONES): every cached image through the
    backbone once, the float32 embeddings and the backbone saved side by side under
    cache/image_embeddings/<backbone>/, keyed by the pixels, the config, the backbone and the Keras backend.
    One code path for every backbone; the assets differ by name, backbone and description only."""
    from scin_pipeline.core.models import backbone_spec

    spec = backbone_spec(backbone)
    EMBEDDINGS_ASSETS[name] = spec.name

    @asset(
        name=name,
        group_name=GROUP,
        kinds={"keras", "numpy"},
        code_version="2",
        pool="gpu",
        op_tags=GPU_TAGS,
        description=description,
    )
    def embeddings_of_backbone(
        context: AssetExecutionContext, config: EmbeddingsConfig, image_tensors: pd.DataFrame, storage: StoragePaths
    ):
        return _backbone_embeddings(context, config, image_tensors, storage, name, spec.name)

    return embeddings_of_backbone


def _backbone_embeddings(
    context: AssetExecutionContext,
    config: EmbeddingsConfig,
    image_tensors: pd.DataFrame,
    storage: StoragePaths,
    asset_name: str,
    backbone: str,
):
    from scin_pipeline.core import models, training

    spec = models.backbone_spec(backbone)
    described = _prepare_keras(config)
    ok = image_tensors[image_tensors["status"] == "ok"].reset_index(drop=True)
    image_size = int(ok["image_size"].iloc[0]) if len(ok) else 224
    key_text = f"{frame_version(ok, ['image_id', 'shard', 'offset'])}:{config_hash(config.model_dump())}:{spec.name}"
    key = hashlib.sha256(f"{key_text}:{described['backend']}".encode()).hexdigest()[:16]
    out_dir = storage.backbone_embeddings_dir(spec.name)
    emb_path, backbone_path = out_dir / f"embeddings-{key}.npy", out_dir / f"backbone-{key}.keras"
    weights = models.resolve_weights(
        None if config.weights == "none" else "imagenet",
        allow_fallback=config.allow_offline_fallback,
        backbone=spec.name,
    )
    if weights is None and config.weights == "imagenet":
        context.log.warning(
            f"ImageNet weights unreachable: {spec.label} backbone with random weights "
            "(embeddings carry far less signal; do not compare with ImageNet runs)"
        )
    if not (emb_path.exists() and backbone_path.exists()):
        import keras

        keras.utils.set_random_seed(config.seed)
        backbone_model = models.build_backbone(spec.name, image_size, weights)
        images = image_cache.load_images(ok, storage.image_tensors_dir)
        progress = Progress(asset_name, len(images), context.log.info, unit="images")
        embeddings = training.extract_embeddings(
            backbone_model, images, batch_size=config.batch_size, on_batch=progress.advance
        )
        with atomic_target(emb_path) as tmp:
            np.save(tmp, embeddings)
        with atomic_target(backbone_path) as tmp:
            backbone_model.save(tmp)
        reused = False
    else:
        embeddings = np.load(emb_path, mmap_mode="r")
        reused = True
    for stale in out_dir.glob("*"):
        if key not in stale.name and not stale.name.startswith("."):
            stale.unlink(missing_ok=True)
    table = ok[["image_id"]].assign(
        row=np.arange(len(ok)),
        embeddings_file=storage.stored(emb_path),  # relative to the data root
        backbone_file=storage.stored(backbone_path),
        backbone=spec.name,
        weights=weights or "none",
        image_size=image_size,
    )
    return versioned_output(
        table,
        key,
        metadata={
            "data_version": key,
            "backbone": spec.label,
            "images": len(table),
            "embedding_dim": int(embeddings.shape[1]) if len(ok) else 0,
            "weights": weights or "none (random init)",
            "reused_cached_embeddings": reused,
            "keras_backend": described["backend"],
            "embeddings_file": MetadataValue.path(storage.stored(emb_path)),
        },
    )


image_embeddings = embeddings_asset(
    "image_embeddings",
    "resnet50",
    "ResNet50 (ImageNet weights where reachable; random init offline, flagged) embeddings of every cached "
    "image, the pooled conv3, conv4 and conv5 stages (3,584-d), computed once: the CPU default trains "
    "resnet50_transfer's head on them, and the multimodal model fuses them with the metadata. The backbone "
    "is saved beside them.",
)

efficientnet_embeddings = embeddings_asset(
    "efficientnet_embeddings",
    "efficientnetv2_b0",
    "EfficientNetV2-B0 (ImageNet weights where reachable; random init offline, flagged) embeddings of every "
    "cached image, the pooled block3b, block5e and top stages (1,440-d; the same strides as ResNet50's "
    "conv3, conv4 and conv5), computed once: the CPU default trains efficientnet_transfer's head on them. The "
    "backbone (with its own input rescaling) is saved beside them.",
)


def pixels_version(image_tensors: pd.DataFrame, *embeddings: pd.DataFrame) -> str:
    """What a candidate trained on: the cached pixels, and each embeddings file (keyed by its content)."""
    version = frame_version(image_tensors, ["image_id", "shard", "offset"])
    for frame in embeddings:
        version += ":" + (str(frame["embeddings_file"].iloc[0]) if len(frame) else "")
    return version


def backbone_weights(image_embeddings: pd.DataFrame) -> str:
    return str(image_embeddings["weights"].iloc[0]) if len(image_embeddings) else "none"


def embeddings_files(image_embeddings: pd.DataFrame, storage: StoragePaths) -> tuple[Path, Path]:
    """The embeddings (.npy) and the backbone (.keras) files, under this run's data root."""
    first = image_embeddings.iloc[0]
    return storage.resolve(str(first["embeddings_file"])), storage.resolve(str(first["backbone_file"]))


def load_embeddings(image_embeddings: pd.DataFrame, rows: pd.DataFrame, storage: StoragePaths) -> np.ndarray:
    """Embeddings for ``rows`` (one per image and case) in row order."""
    if image_embeddings.empty:
        return np.zeros((len(rows), 0), np.float32)
    matrix = np.load(embeddings_files(image_embeddings, storage)[0], mmap_mode="r")
    position = image_embeddings.set_index("image_id")["row"]
    return np.asarray(matrix[position.reindex(rows["image_id"]).to_numpy()], dtype=np.float32)


# --------------------------------------------------------------------------------------------------------
# candidates: one skeleton (candidate_asset), four declarations, each with its own training


@dataclass
class Trained:
    """A finished training run, as a candidate's training hands it to the skeleton."""

    row: dict  # the output table's run columns (CandidateRun.finish)
    resumed: bool  # the MLflow run or the fit continued an interrupted one
    metadata: dict  # the candidate's own asset metadata


def best_val_metadata(metrics: Mapping[str, float]) -> dict:
    """The kept weights' validation metrics (``best_val_*``, as the MLflow run has them) as asset metadata,
    one float entry each (Dagster plots a float entry over materialisations; a JSON blob it cannot): the
    same names and numbers in Dagster and MLflow. ``best_val_score`` is the output's own entry."""
    best = {k: float(v) for k, v in metrics.items() if k.startswith("best_val_") and k != "best_val_score"}
    return {name: MetadataValue.float(value) for name, value in sorted(best.items())}


def inputs_version(inputs: dict[str, pd.DataFrame]) -> str:
    """What a candidate trained on besides the splits: the cached pixels and embeddings, then the cases, then
    the unlabelled pool (semi-supervised candidates)."""
    parts = []
    if "image_tensors" in inputs:
        embeddings = [inputs[name] for name in sorted(inputs) if name in EMBEDDINGS_ASSETS]
        parts.append(pixels_version(inputs["image_tensors"], *embeddings))
    if "cases" in inputs:
        parts.append(frame_version(inputs["cases"], ["case_id"]))
    if "unlabelled_pool" in inputs:
        parts.append(frame_version(inputs["unlabelled_pool"], ["case_id", "image_id"]))
    return ":".join(parts)


class CandidateRun:
    """One candidate's materialisation: its inputs and MLflow run key, reuse of a finished run, the
    training run, packaging, registration and the output table."""

    def __init__(
        self,
        context: AssetExecutionContext,
        name: str,
        kind: str,
        config: Config,
        inputs: dict[str, pd.DataFrame],
        storage: StoragePaths,
        mlflow: MlflowTracking,
        synthetic: bool,
    ):
        self.context, self.name, self.kind, self.config, self.mlflow = context, name, kind, config, mlflow
        self.inputs, self.storage, self.synthetic = inputs, storage, synthetic
        labeled_splits = inputs["labeled_splits"]
        self.classes = class_names(labeled_splits)
        if len(self.classes) < 2:
            raise Failure(
                f"{name}: labeled_splits holds {len(self.classes)} class(es) {self.classes}: nothing to "
                "tell apart; use more cases or lower labeled_splits' min_cases_per_class",
                allow_retries=False,
            )
        tensors = inputs.get("image_tensors")
        self.image_size = int(tensors["image_size"].iloc[0]) if tensors is not None else None
        # A Keras model that reads the questionnaire is stopped on its both-forms score (core.training).
        self.monitor = (
            monitored_key(config.monitor, reads_questionnaire=kind == "keras_multimodal")
            if isinstance(config, TrainingConfig)
            else "val_macro_f1"
        )
        self.splits_version = splits_data_version(labeled_splits)
        self.code_version = context.assets_def.code_versions_by_key.get(context.asset_key) or "none"
        self.run_key = run_key_for(
            asset_key=name,
            code_version=self.code_version,
            config=config.model_dump(),
            splits_data_version=self.splits_version,
            inputs_version=inputs_version(inputs),
        )
        self.package_dir = storage.model_package_dir(name, self.run_key)
        self.checkpoint_dir = storage.checkpoint_dir(name, self.run_key)

    def reusable(self) -> dict | None:
        """The finished run and package of an identical earlier training, if both are still there."""
        run = self.mlflow.find_finished_run(self.run_key)
        if run is None or not (self.package_dir / "spec.json").exists():
            return None
        tags = run.data.tags
        return {
            "mlflow_run_id": run.info.run_id,
            "model_uri": tags.get(MODEL_URI_TAG, ""),
            "registered_version": tags.get(REGISTERED_VERSION_TAG, ""),
            "best_epoch": int(float(run.data.metrics.get("best_epoch", -1))),
            "best_val_score": float(run.data.metrics.get("best_val_score", float("nan"))),
            "keras_backend": tags.get(KERAS_BACKEND_TAG, ""),
            "weights": tags.get(WEIGHTS_TAG, ""),
            "run_metrics": dict(run.data.metrics),
        }

    def tags(self, extra: dict | None = None) -> dict:
        tags = dagster_tags(
            self.context,
            code_version=self.code_version,
            splits_data_version=self.splits_version,
            synthetic_data=self.synthetic,
        )
        tags[CANDIDATE_TAG] = self.name
        tags.update({k: str(v) for k, v in (extra or {}).items()})
        return tags

    @contextmanager
    def training_run(self, tags: dict, params: dict):
        """The candidate's MLflow run (resumed when an earlier one with this key did not finish): the
        standard tags plus ``tags``, the whole config plus ``params``."""
        with self.mlflow.training_run(
            run_key=self.run_key,
            run_name=self.name,
            tags=self.tags(tags),
            params={**self.config.model_dump(), **params},
        ) as run:
            run.log_dataset(
                self.inputs["labeled_splits"][SPLITS_VERSION_COLUMNS],
                name="labeled_splits",
                digest=self.splits_version,
                source=self.storage.stored(self.storage.layout.table_file("labeled_splits")),  # relative to the root
                context="training",
            )
            yield run

    def epoch_logger(self, run):
        """Each finished epoch to MLflow, and one progress line with its validation metrics to the run log."""
        from scin_pipeline.core.progress import report

        def on_epoch_end(epoch: int, logs: dict) -> None:
            run.log_epoch(epoch, logs)
            shown = ", ".join(
                f"{k} {logs[k]:.3f}" for k in ("val_macro_f1", "val_balanced_accuracy", "val_loss") if k in logs
            )
            report(self.context.log.info, f"{self.context.op_def.name} epoch {epoch}: {shown}")

        return on_epoch_end

    def finish(
        self,
        run,
        model,
        result,
        *,
        tags: dict,
        keras_backend: str,
        weights: str,
        metadata: dict,
        package_extra: dict | None = None,
        single_fit_val: Mapping[str, float] | None = None,
    ) -> Trained:
        """Package ``model`` (one file for raw inputs), save it, log it with ``result``'s curves and
        summary (history, best_epoch, best_score, the kept weights' ``best_val_*``) to the run, register it,
        and tag the run with the model's URI, its version and ``tags``. ``single_fit_val``: the validation
        metrics (names without ``val_``) of a model fitted once, with no epoch history to take them from.
        The asset metadata gets the curves as an image and each ``best_val_*`` as a float entry
        (``plots_metadata``)."""
        from scin_pipeline.core import plots
        from scin_pipeline.core.metadata_model import METADATA_FEATURE_COLUMNS
        from scin_pipeline.core.packaged_model import KERAS_KINDS, METADATA_KINDS, PackagedClassifier
        from scin_pipeline.core.training import restored_epoch_metrics

        package = PackagedClassifier(
            kind=self.kind,
            classes=self.classes,
            image_size=self.image_size,
            metadata_columns=list(METADATA_FEATURE_COLUMNS) if self.kind in METADATA_KINDS else None,
            model=model,
            extra={"candidate": self.name, **(package_extra or {})},
        )
        if self.kind in KERAS_KINDS:
            package.calibration = self.fit_calibration(package)
            run.log_metrics(calibration_metrics(package.calibration))
        package.save(self.package_dir)  # swapped in whole: a kill here leaves the old package or none
        history = result.history
        curves = None
        if history is not None and len(history):
            run.log_table(history, "history.csv")
            curves = plots.training_curves_png(history, title=self.name)
            run.log_figure_png(curves, TRAINING_CURVES_ARTIFACT)
        for keras_file in self.package_dir.glob("*.keras"):
            run.log_artifact(str(keras_file), "keras")
        # The kept weights' validation metrics under their own names (val_* per step end at the last epoch).
        if history is not None:
            best_val = restored_epoch_metrics(history, result.best_epoch)
        else:
            best_val = {f"best_val_{k}": float(v) for k, v in (single_fit_val or {}).items() if np.isfinite(v)}
        run.log_metrics({"best_epoch": result.best_epoch, "best_val_score": result.best_score, **best_val})
        model_uri, version = run.log_model(str(self.package_dir), register=True)
        self.mlflow.set_run_tags(
            run.run_id, {MODEL_URI_TAG: model_uri, REGISTERED_VERSION_TAG: str(version or ""), **tags}
        )
        row = {
            "mlflow_run_id": run.run_id,
            "model_uri": model_uri,
            "registered_version": str(version or ""),
            "best_epoch": int(result.best_epoch),
            "best_val_score": float(result.best_score),
            "keras_backend": keras_backend,
            "weights": weights,
        }
        resumed = bool(run.resumed or getattr(result, "resumed_from_epoch", None))
        metadata = {**metadata, **self.plots_metadata(curves, best_val)}
        return Trained(row=row, resumed=resumed, metadata=metadata)

    def plots_metadata(self, curves: bytes | None, metrics: Mapping[str, float]) -> dict:
        """The training curves as an image, and the kept weights' validation metrics (``best_val_*``, as the
        MLflow run has them) each as its own float entry: Dagster plots a float entry over materialisations."""
        meta = best_val_metadata(metrics)
        if curves:
            meta["training_curves"] = MetadataValue.md(f"![{self.name} training curves]({png_data_uri_bytes(curves)})")
        return meta

    def recorded_metadata(self, run_id: str, run_metrics: Mapping[str, float]) -> dict:
        """``plots_metadata`` from what a finished run recorded (a reused run trains nothing, but its
        materialisation shows the same curves and figures); no image for a run that predates it."""
        return self.plots_metadata(self.mlflow.read_artifact(run_id, TRAINING_CURVES_ARTIFACT), run_metrics)

    def fit_calibration(self, package) -> "TemperatureScaling":
        """Temperature scaling of ``package`` on the validation split, fitted on the package's own
        uncalibrated predict_proba: the temperature is fitted to exactly the function that is served. A
        package that reads the questionnaire is served with answers and with blank forms: its one
        temperature is fitted on both (core.calibration.fit_temperature_answered_and_blank)."""
        from scin_pipeline.core.calibration import (
            TemperatureScaling,
            fit_temperature,
            fit_temperature_answered_and_blank,
        )
        from scin_pipeline.core.packaged_model import METADATA_KINDS

        splits, tensors = self.inputs["labeled_splits"], self.inputs["image_tensors"]
        rows, images, y = split_arrays(splits, tensors, self.storage.image_tensors_dir, "val", self.classes)
        if not len(rows):
            return TemperatureScaling(note="no validation rows with cached pixels")
        cases = self.inputs.get("cases")
        probabilities = package.predict_rows(rows, images, cases, calibrated=False)
        if package.kind in METADATA_KINDS:
            assert cases is not None  # predict_rows above refuses a questionnaire model without cases
            # Only the case ids reach the encoding: every questionnaire blank (as model_evaluation's val_blank).
            blank = package.predict_rows(rows, images, cases[["case_id"]], calibrated=False)
            fitted = fit_temperature_answered_and_blank(probabilities, blank, y)
        else:
            fitted = fit_temperature(probabilities, y)
        self.context.log.info(f"{self.name}: {fitted.describe()} ({fitted.fitted_rows} rows)")
        return fitted

    def output(self, row: dict, *, reused: bool, resumed: bool, metadata: dict) -> Output:
        record = {
            "model": self.name,
            "kind": self.kind,
            "classes": json.dumps(self.classes),
            "image_size": self.image_size or 0,
            "package_dir": self.storage.stored(self.package_dir),  # relative to the data root
            "run_key": self.run_key,
            "splits_data_version": self.splits_version,
            "monitor": self.monitor,
            "reused": reused,
            "resumed": resumed,
            "questionnaire_dropout": float(getattr(self.config, "questionnaire_dropout", 0.0)),
            **row,
        }
        table = pd.DataFrame([record])[CANDIDATE_COLUMNS]
        meta = {
            "mlflow_run_id": row["mlflow_run_id"],
            "model_uri": row["model_uri"],
            "registered_version": str(row["registered_version"]),
            "splits_data_version": self.splits_version,
            "reused_finished_run": reused,
            "resumed_run": resumed,
            "classes": len(self.classes),
            "best_val_score": row["best_val_score"],
            "best_epoch": row["best_epoch"],
            **calibration_metadata(self.package_dir),
            **metadata,
        }
        url = self.mlflow.run_url(row["mlflow_run_id"])
        if url:  # known whenever the MLflow UI's address is (MlflowTracking.run_url says how)
            meta["mlflow_run_url"] = MetadataValue.url(url)
        if self.synthetic:
            meta["note"] = "SYNTHETIC images: these figures say nothing about skin conditions"
        return versioned_output(table, self.run_key, metadata=meta)


def calibration_metrics(calibration: "TemperatureScaling") -> dict[str, float]:
    """The fit as MLflow run metrics (the temperature, and the validation NLL at T = 1 and at T)."""
    metrics = {"calibration_temperature": calibration.temperature}
    if calibration.nll_before is not None and calibration.nll_after is not None:
        metrics.update(val_nll_uncalibrated=calibration.nll_before, val_nll_calibrated=calibration.nll_after)
    return metrics


def calibration_metadata(package_dir) -> dict:
    """The package's calibration as asset metadata (read from its spec: the package owns the fact)."""
    from scin_pipeline.core.calibration import TemperatureScaling
    from scin_pipeline.core.packaged_model import read_spec

    stored = read_spec(package_dir).get("calibration")
    if stored is None:
        return {"calibration": "none (the model's own probabilities)"}
    calibration = TemperatureScaling.from_dict(stored)
    return {"calibration": calibration.describe(), "calibration_temperature": float(calibration.temperature)}


def candidate_asset(
    *,
    name: str,
    kind: str,
    config: type[Config],
    ins: tuple[str, ...],
    train: Callable[[CandidateRun], Trained],
    description: str,
    code_version: str = "1",
) -> AssetsDefinition:
    """One candidate classifier as an asset: reuse of an identical finished training, else ``train`` (which
    opens the MLflow run and finishes the package), then the one-row output table. Keras candidates (a
    TrainingConfig) go to the "gpu" pool with a GPU request, the metadata model to "cpu"."""
    keras_candidate = issubclass(config, TrainingConfig)

    @asset(
        name=name,
        ins={input_name: AssetIn(dagster_type=pd.DataFrame) for input_name in ins},
        group_name=GROUP,
        kinds={"keras" if keras_candidate else "scikitlearn", "mlflow"},
        code_version=code_version,
        pool="gpu" if keras_candidate else "cpu",
        op_tags=GPU_TAGS if keras_candidate else None,
        description=description,
    )
    def candidate(
        context: AssetExecutionContext,
        config: config,  # pyright: ignore[reportInvalidTypeForm]  # the candidate's Config class: Dagster reads it here
        storage: StoragePaths,
        mlflow: MlflowTracking,
        scin_source: ScinSourceResource,
        **inputs: pd.DataFrame,
    ):
        run = CandidateRun(context, name, kind, config, inputs, storage, mlflow, scin_source.is_synthetic())
        previous = run.reusable()
        if previous:
            context.log.info(f"unchanged inputs, code and config: reusing MLflow run {previous['mlflow_run_id']}")
            metrics = previous.pop("run_metrics")
            metadata = run.recorded_metadata(previous["mlflow_run_id"], metrics)
            return run.output(previous, reused=True, resumed=False, metadata=metadata)
        trained = train(run)
        return run.output(trained.row, reused=False, resumed=trained.resumed, metadata=trained.metadata)

    return candidate


def _class_weight(config: TrainingConfig, y: np.ndarray, n_classes: int) -> dict | None:
    from scin_pipeline.core.training import balanced_class_weights

    return balanced_class_weights(y, n_classes) if config.class_weighting == "balanced" else None


def _train_baseline_cnn(candidate: CandidateRun) -> Trained:
    config, inputs = candidate.config, candidate.inputs
    assert isinstance(config, TrainingConfig)  # its candidate_asset's config class
    assert candidate.image_size is not None  # set from image_tensors, an input of every Keras candidate
    described = _prepare_keras(config)
    from scin_pipeline.core import models, training

    cache_dir, classes = candidate.storage.image_tensors_dir, candidate.classes
    _, x_train, y_train = split_arrays(inputs["labeled_splits"], inputs["image_tensors"], cache_dir, "train", classes)
    _, x_val, y_val = split_arrays(inputs["labeled_splits"], inputs["image_tensors"], cache_dir, "val", classes)
    train_config = _train_config(config)
    tags = {KERAS_BACKEND_TAG: described["backend"]}
    params = {"image_size": candidate.image_size, "n_train": len(y_train), "n_val": len(y_val), "classes": len(classes)}
    with candidate.training_run(tags, params) as run:
        model = models.build_baseline_cnn(len(classes), candidate.image_size)
        sequence = training.default_dataset_factory(
            x_train,
            y_train,
            batch_size=train_config.batch_size,
            shuffle=True,
            augment=train_config.augment,
            seed=train_config.seed,
            workers=train_config.loader_workers,
        )
        result = training.fit_classifier(
            model,
            sequence,
            x_val,
            y_val,
            config=train_config,
            class_weight=_class_weight(config, y_train, len(classes)),
            checkpoint_dir=candidate.checkpoint_dir,
            on_epoch_end=candidate.epoch_logger(run),
        )
        return candidate.finish(
            run,
            model,
            result,
            tags=tags,
            keras_backend=described["backend"],
            weights="none",
            metadata={"history": table_md(result.history, rows=40), "stopped_early": bool(result.stopped_early)},
        )


def _resolved_mode(config: TransferConfig, described: dict) -> str:
    """auto: fine-tuning on an accelerator, a head on the frozen embeddings on CPU."""
    if config.mode != "auto":
        return config.mode
    return "fine_tune" if described.get("accelerator") else "head_on_embeddings"


def transfer_training(embeddings_input: str) -> Callable[[CandidateRun], Trained]:
    """The training of a transfer candidate whose backbone is the one behind ``embeddings_input`` (an
    embeddings asset): one function for every backbone, as for their embeddings."""

    def train(candidate: CandidateRun) -> Trained:
        return _train_transfer(candidate, embeddings_input)

    return train


@dataclass(frozen=True, eq=False)
class TransferSetup:
    """What every transfer candidate (resnet50_transfer, efficientnet_transfer, resnet50_fixmatch) prepares
    the same way before it trains: Keras, its backbone's embeddings and weights, the resolved mode, the train
    and val rows (pixels are read only for fine-tuning: on the full release the train split's are ~1.5 GB at
    224 px), and the MLflow tags and params they share. Each training keeps only what differs."""

    candidate: CandidateRun
    config: TransferConfig
    described: dict
    train_config: TrainConfig
    image_embeddings: pd.DataFrame
    backbone_name: str
    weights: str
    mode: str
    image_size: int
    train_rows: pd.DataFrame
    y_train: np.ndarray
    val_rows: pd.DataFrame
    y_val: np.ndarray

    @property
    def n_classes(self) -> int:
        return len(self.candidate.classes)

    @property
    def tags(self) -> dict:
        """The tags the finished run is given (the mode is a tag of the run from its start)."""
        return {KERAS_BACKEND_TAG: self.described["backend"], WEIGHTS_TAG: self.weights}

    def training_run(self, **params):
        """The candidate's MLflow run with the params every transfer candidate logs, plus ``params``."""
        common = {
            "resolved_mode": self.mode,
            "weights": self.weights,
            "image_size": self.image_size,
            "n_train": len(self.y_train),
            "n_val": len(self.y_val),
            "classes": self.n_classes,
        }
        return self.candidate.training_run({**self.tags, TRAINING_MODE_TAG: self.mode}, {**common, **params})

    def frozen_embeddings(self) -> tuple:
        """head_on_embeddings: the embeddings' saved backbone, and the train and val rows' embeddings."""
        import keras

        storage = self.candidate.storage
        backbone = keras.saving.load_model(embeddings_files(self.image_embeddings, storage)[1])
        e_train = load_embeddings(self.image_embeddings, self.train_rows, storage)
        e_val = load_embeddings(self.image_embeddings, self.val_rows, storage)
        return backbone, e_train, e_val

    def head_builder(self, e_train: np.ndarray) -> Callable:
        """head_on_embeddings: a fresh classifier head standardised on the train embeddings."""
        from scin_pipeline.core import models

        return lambda: models.build_classifier_head(
            e_train.shape[1], self.n_classes, self.config.dropout, normalize_with=e_train
        )

    def supervised_head(self, run, e_train: np.ndarray, e_val: np.ndarray) -> TrainResult:
        """head_on_embeddings, supervised: the head trained on the train embeddings."""
        from scin_pipeline.core import training

        return training.train_head_on_embeddings(
            e_train,
            self.y_train,
            e_val,
            self.y_val,
            head_builder=self.head_builder(e_train),
            config=self.train_config,
            checkpoint_dir=self.candidate.checkpoint_dir,
            on_epoch_end=self.candidate.epoch_logger(run),
        )

    def fine_tune_start(self) -> tuple:
        """fine_tune: a fresh backbone (the embeddings' weights), a classifier head for it, and the train and
        val pixels."""
        from scin_pipeline.core import models

        cache_dir = self.candidate.storage.image_tensors_dir
        x_train = image_cache.load_images(self.train_rows, cache_dir)
        x_val = image_cache.load_images(self.val_rows, cache_dir)
        backbone = models.build_backbone(
            self.backbone_name, self.image_size, None if self.weights == "none" else self.weights
        )
        head = models.build_classifier_head(backbone.output_shape[-1], self.n_classes, self.config.dropout)
        return backbone, head, x_train, x_val

    def supervised_fine_tune(self, run, backbone, head, x_train: np.ndarray, x_val: np.ndarray) -> TransferResult:
        """fine_tune, supervised: frozen, then the top layers unfrozen (core.training.fine_tune_transfer)."""
        from scin_pipeline.core import training

        return training.fine_tune_transfer(
            backbone,
            head,
            x_train,
            self.y_train,
            x_val,
            self.y_val,
            config=self.train_config,
            checkpoint_dir=self.candidate.checkpoint_dir,
            on_epoch_end=self.candidate.epoch_logger(run),
        )

    def finish(self, run, model, result, *, metadata: dict, package_extra: dict) -> Trained:
        """CandidateRun.finish with the shared tags, backend and weights; the history ends the metadata."""
        return self.candidate.finish(
            run,
            model,
            result,
            tags=self.tags,
            keras_backend=self.described["backend"],
            weights=self.weights,
            metadata={**metadata, "history": table_md(result.history, rows=40)},
            package_extra=package_extra,
        )


def _transfer_setup(candidate: CandidateRun, embeddings_input: str) -> TransferSetup:
    config, inputs = candidate.config, candidate.inputs
    assert isinstance(config, TransferConfig)  # its candidate_asset's config class (or a subclass)
    assert candidate.image_size is not None  # set from image_tensors, an input of every Keras candidate
    described = _prepare_keras(config)
    labeled_splits, image_tensors, image_embeddings = (
        inputs["labeled_splits"],
        inputs["image_tensors"],
        inputs[embeddings_input],
    )
    train_rows, y_train = split_rows(labeled_splits, image_tensors, "train", candidate.classes)
    val_rows, y_val = split_rows(labeled_splits, image_tensors, "val", candidate.classes)
    return TransferSetup(
        candidate=candidate,
        config=config,
        described=described,
        train_config=_train_config(config),
        image_embeddings=image_embeddings,
        backbone_name=EMBEDDINGS_ASSETS[embeddings_input],
        weights=backbone_weights(image_embeddings),
        mode=_resolved_mode(config, described),
        image_size=candidate.image_size,
        train_rows=train_rows,
        y_train=y_train,
        val_rows=val_rows,
        y_val=y_val,
    )


def _train_transfer(candidate: CandidateRun, embeddings_input: str) -> Trained:
    setup = _transfer_setup(candidate, embeddings_input)
    from scin_pipeline.core import models

    with setup.training_run(backbone=setup.backbone_name) as run:
        result: TrainResult | TransferResult
        if setup.mode == "head_on_embeddings":
            backbone, e_train, e_val = setup.frozen_embeddings()
            result = setup.supervised_head(run, e_train, e_val)
            model = models.compose_end_to_end(backbone, result.model, with_metadata=False)
        else:
            result = setup.supervised_fine_tune(run, *setup.fine_tune_start())
            model = result.model
        mode, backbone_name, weights = setup.mode, setup.backbone_name, setup.weights
        return setup.finish(
            run,
            model,
            result,
            metadata={"mode": mode, "backbone": backbone_name},
            package_extra={"mode": mode, "backbone": backbone_name, "weights": weights},
        )


def pool_image_rows(
    unlabelled_pool: pd.DataFrame, labeled_splits: pd.DataFrame, image_tensors: pd.DataFrame, max_images: int = 0
) -> pd.DataFrame:
    """The pool's images with cached pixels, one row per image (shard, offset), none that is a labelled
    image (a file shared with a labelled case stays labelled only), at most ``max_images`` (0: all) taken in
    the order of a hash of their id (a fixed sample that does not depend on the table's order)."""
    ok = image_tensors[image_tensors["status"] == "ok"][["image_id", "shard", "offset", "status", "image_size"]]
    pool = unlabelled_pool[["image_id"]].drop_duplicates()
    pool = pool[~pool["image_id"].isin(labeled_splits["image_id"])].merge(ok, on="image_id")
    order = pd.util.hash_pandas_object(pool["image_id"].astype(str), index=False).to_numpy()
    pool = pool.iloc[np.argsort(order, kind="stable")]
    if max_images:
        pool = pool.head(max_images)
    return pool.sort_values("image_id").reset_index(drop=True)


def _cached_views(path: Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Embedded views kept beside the candidate's checkpoints: a resumed training does not embed them again."""
    if path.exists():
        return np.load(path)
    views = compute()
    with atomic_target(path) as tmp:
        np.save(tmp, views)
    return views


def _train_resnet50_fixmatch(candidate: CandidateRun) -> Trained:
    setup = _transfer_setup(candidate, "image_embeddings")
    config, inputs = candidate.config, candidate.inputs
    assert isinstance(config, FixMatchTrainingConfig)  # its candidate_asset's config class
    from scin_pipeline.core import models, semi_supervised

    image_embeddings, mode, weights = setup.image_embeddings, setup.mode, setup.weights
    train_rows, y_train, y_val = setup.train_rows, setup.y_train, setup.y_val
    train_config = setup.train_config
    pool_rows = pool_image_rows(
        inputs["unlabelled_pool"], inputs["labeled_splits"], inputs["image_tensors"], config.max_pool_images
    )
    fixmatch = semi_supervised.FixMatchConfig(
        threshold=config.threshold,
        unlabelled_weight=config.unlabelled_weight,
        ratio=config.unlabelled_ratio,
        weak_views=config.weak_views,
        strong_views=config.strong_views,
    )
    cache_dir = candidate.storage.image_tensors_dir
    if pool_rows.empty:
        candidate.context.log.warning(
            "resnet50_fixmatch: no unlabelled pool image has cached pixels; trained without the consistency "
            "term (as its supervised twin)"
        )
    metadata: dict = {"mode": mode, "pool_images": len(pool_rows)}
    with setup.training_run(n_pool_images=len(pool_rows)) as run:
        if mode == "head_on_embeddings":
            backbone, e_train, e_val = setup.frozen_embeddings()
            if pool_rows.empty:
                result = setup.supervised_head(run, e_train, e_val)
            else:
                views_dir = candidate.checkpoint_dir
                views_dir.mkdir(parents=True, exist_ok=True)
                # The plain view of a pool image is its image_embeddings row when it has one (every
                # quality-kept image is embedded); otherwise it is embedded here with the others.
                in_embeddings = bool(pool_rows["image_id"].isin(image_embeddings["image_id"]).all())
                pool_plain = load_embeddings(image_embeddings, pool_rows, candidate.storage) if in_embeddings else None
                n_embedded = (fixmatch.weak_views - 1) * len(train_rows) + len(pool_rows) * (
                    fixmatch.weak_views - int(in_embeddings) + fixmatch.strong_views
                )
                progress = Progress("resnet50_fixmatch views", n_embedded, candidate.context.log.info, unit="images")

                def views(images_of: Callable[[], np.ndarray], n: int, augment, seed: int, plain) -> np.ndarray:
                    if n == 1 and plain is not None:
                        return plain[None]
                    return semi_supervised.embed_views(
                        backbone,
                        images_of(),
                        n,
                        augment,
                        seed=seed,
                        plain=plain,
                        plain_first=augment is semi_supervised.weak_augment_batch,
                        on_batch=progress.advance,
                    )

                def train_images() -> np.ndarray:
                    return image_cache.load_images(train_rows, cache_dir)

                def pool_images() -> np.ndarray:
                    return image_cache.load_images(pool_rows, cache_dir)

                weak = semi_supervised.weak_augment_batch
                train_views = _cached_views(
                    views_dir / "train_weak_views.npy",
                    lambda: views(train_images, fixmatch.weak_views, weak, config.seed, e_train),
                )
                pool_weak = _cached_views(
                    views_dir / "pool_weak_views.npy",
                    lambda: views(pool_images, fixmatch.weak_views, weak, config.seed + 1, pool_plain),
                )
                pool_strong = _cached_views(
                    views_dir / "pool_strong_views.npy",
                    lambda: views(
                        pool_images, fixmatch.strong_views, semi_supervised.strong_augment_batch, config.seed + 2, None
                    ),
                )
                result = semi_supervised.train_fixmatch_head_on_embeddings(
                    train_views,
                    y_train,
                    pool_weak,
                    pool_strong,
                    e_val,
                    y_val,
                    head_builder=setup.head_builder(e_train),
                    config=train_config,
                    fixmatch=fixmatch,
                    checkpoint_dir=candidate.checkpoint_dir / "fit",
                    on_epoch_end=candidate.epoch_logger(run),
                )
            model = models.compose_end_to_end(backbone, result.model, with_metadata=False)
        else:
            backbone, head, x_train, x_val = setup.fine_tune_start()
            if pool_rows.empty:
                result = setup.supervised_fine_tune(run, backbone, head, x_train, x_val)
            else:
                result = semi_supervised.fine_tune_fixmatch(
                    backbone,
                    head,
                    x_train,
                    y_train,
                    image_cache.load_images(pool_rows, cache_dir),
                    x_val,
                    y_val,
                    config=train_config,
                    fixmatch=fixmatch,
                    checkpoint_dir=candidate.checkpoint_dir,
                    on_epoch_end=candidate.epoch_logger(run),
                )
            model = result.model
        history = result.history
        if "pseudo_label_rate" in history and len(history):
            metadata["final_pseudo_label_rate"] = float(history["pseudo_label_rate"].iloc[-1])
        if candidate.synthetic:
            metadata["note_fixmatch"] = "SYNTHETIC images: the pseudo-labels and their rate say nothing about skin"
        return setup.finish(
            run,
            model,
            result,
            metadata=metadata,
            package_extra={"mode": mode, "weights": weights, "semi_supervised": "fixmatch"},
        )


def _train_metadata_model(candidate: CandidateRun) -> Trained:
    """metadata_model and, with a SelfTrainedMetadataModelConfig, its self-trained twin: one function, so the
    twins share their labelled rows, model, seed, modality dropout and validation scoring; the self-trained one
    adds the unlabelled pool's pseudo-labels."""
    from scin_pipeline.core import evaluation
    from scin_pipeline.core import metadata_model as core_model
    from scin_pipeline.core.metadata_model import METADATA_FEATURE_COLUMNS, metadata_features

    config, inputs, classes = candidate.config, candidate.inputs, candidate.classes
    index = {c: i for i, c in enumerate(classes)}
    per_case = inputs["labeled_splits"].drop_duplicates("case_id")[["case_id", "split", "label"]]
    frame = per_case.merge(inputs["cases"], on="case_id", how="left")
    features = metadata_features(frame)
    y = frame["label"].astype(str).map(index).to_numpy(np.int32)
    train, val = (frame["split"].astype(str) == "train").to_numpy(), (frame["split"].astype(str) == "val").to_numpy()
    params: dict[str, int | str] = {
        "n_train_cases": int(train.sum()),
        "n_val_cases": int(val.sum()),
        "features": len(METADATA_FEATURE_COLUMNS),
        "classes": len(classes),
    }
    assert isinstance(config, MetadataModelConfig)  # its candidate_asset's config class
    self_training = config.rule() if isinstance(config, SelfTrainedMetadataModelConfig) else None
    run_tags: dict = {}
    if self_training is not None:
        pool_cases = inputs["unlabelled_pool"].drop_duplicates("case_id")[["case_id", "reason"]].astype(str)
        pool_features = metadata_features(
            pool_cases.merge(inputs["cases"].assign(case_id=inputs["cases"]["case_id"].astype(str)), on="case_id")
        )
        params.update(n_pool_cases=len(pool_cases), twin="metadata_model")
        run_tags = {"scin.twin": "metadata_model"}
    blank = blank_questionnaires(int(val.sum()))
    extra_metadata, extra_package = {}, {}
    with candidate.training_run(run_tags, params) as run:
        if self_training is None:
            model = core_model.fit_single_label_metadata_model(
                features[train],
                y[train],
                len(classes),
                seed=config.seed,
                questionnaire_dropout=config.questionnaire_dropout,
            )
        else:
            result = core_model.fit_self_trained_metadata_model(
                features[train],
                y[train],
                pool_features,
                len(classes),
                self_training,
                seed=config.seed,
                questionnaire_dropout=config.questionnaire_dropout,
            )
            model = result.model
            accepted = result.pseudo_labels >= 0
            run.log_metrics({"pseudo_labelled_cases": int(accepted.sum()), "self_training_rounds": len(result.history)})
            run.log_table(result.history, "self_training/history.csv")
            pseudo = pool_cases.assign(
                pseudo_label=[classes[k] if k >= 0 else "" for k in result.pseudo_labels],
                accepted_round=result.accepted_round,
            )
            run.log_table(pseudo, "self_training/pseudo_labels.csv")
            by_class = pseudo.loc[accepted, "pseudo_label"].value_counts()
            extra_metadata = {
                "twin": "metadata_model (the same model, labelled rows and seed, no pseudo-labels)",
                "pool_cases": len(pool_cases),
                "pseudo_labelled_cases": int(accepted.sum()),
                "rounds": table_md(result.history, rows=20),
                "pseudo_labels_by_class": MetadataValue.json({str(k): int(v) for k, v in by_class.items()}),
            }
            # The cross-validation refits it per fold with these settings (read from the package's spec).
            extra_package = {"self_training": asdict(self_training)}
        val_metrics, blank_metrics = {}, {}
        if val.any():
            val_metrics = evaluation.classification_metrics(y[val], model.predict_proba(features[val]), classes)
            blank_proba = model.predict_proba(core_model.metadata_features(blank))
            blank_metrics = evaluation.classification_metrics(y[val], blank_proba, classes)
        run.log_metrics({f"val_{k}": v for k, v in val_metrics.items() if np.isfinite(v)})
        run.log_metrics({f"val_blank_{k}": v for k, v in blank_metrics.items() if np.isfinite(v)})
        macro_f1 = float(val_metrics.get("macro_f1", float("nan")))
        fitted = SimpleNamespace(history=None, best_epoch=0, best_score=macro_f1)  # one fit, no epochs
        scores = questionnaire_scores(config.questionnaire_dropout, val_metrics, blank_metrics)
        return candidate.finish(
            run,
            model,
            fitted,
            tags={},
            keras_backend="",
            weights="",
            # best_val_* and best_val_blank_*, as the multimodal run's restored epoch has them; finish shows
            # them as float entries.
            single_fit_val={**val_metrics, **{f"blank_{k}": v for k, v in blank_metrics.items()}},
            metadata={**extra_metadata, "questionnaire_dropout": config.questionnaire_dropout},
            package_extra={QUESTIONNAIRE_EXTRA: scores, **extra_package},
        )


def _train_multimodal(candidate: CandidateRun) -> Trained:
    config, inputs = candidate.config, candidate.inputs
    assert isinstance(config, MultimodalConfig)  # its candidate_asset's config class
    described = _prepare_keras(config)
    import keras

    from scin_pipeline.core import models, training
    from scin_pipeline.core.metadata_model import blank_questionnaire_features, metadata_features

    image_embeddings = inputs["image_embeddings"]
    weights = backbone_weights(image_embeddings)
    classes, n_classes = candidate.classes, len(candidate.classes)
    parts = {}
    for split in ("train", "val"):
        rows, y = split_rows(inputs["labeled_splits"], inputs["image_tensors"], split, classes)
        emb = load_embeddings(image_embeddings, rows, candidate.storage)
        meta = metadata_features(rows[["case_id"]].merge(inputs["cases"], on="case_id", how="left"))
        parts[split] = (emb, meta.to_numpy(np.float32), y)
    (e_train, m_train, y_train), (e_val, m_val, y_val) = parts["train"], parts["val"]
    train_config = _train_config(config)
    tags = {KERAS_BACKEND_TAG: described["backend"], WEIGHTS_TAG: weights}
    params = {
        "weights": weights,
        "image_size": candidate.image_size,
        "n_train": len(y_train),
        "n_val": len(y_val),
        "classes": n_classes,
        "metadata_features": m_train.shape[1],
    }
    blank = blank_questionnaire_features()
    with candidate.training_run(tags, params) as run:
        result = training.train_head_on_embeddings(
            e_train,
            y_train,
            e_val,
            y_val,
            train_metadata=m_train,
            val_metadata=m_val,
            blank_metadata=blank,
            head_builder=lambda: models.build_multimodal_head(
                e_train.shape[1],
                m_train.shape[1],
                n_classes,
                dropout=config.dropout,
                normalize_with=e_train,
                normalize_metadata_with=m_train,
                questionnaire_dropout_rate=config.questionnaire_dropout,
                blank_metadata=blank,
            ),
            config=train_config,
            checkpoint_dir=candidate.checkpoint_dir,
            on_epoch_end=candidate.epoch_logger(run),
        )
        backbone = keras.saving.load_model(embeddings_files(image_embeddings, candidate.storage)[1])
        model = models.compose_end_to_end(backbone, result.model, with_metadata=True)
        # The restored (best) epoch's validation scores, with every case's answers and with none.
        best = result.history[result.history["epoch"] == result.best_epoch]
        at_best = best.iloc[0].to_dict() if len(best) else {}
        full = {name: at_best.get(f"val_{name}") for name in training.BLANK_SCORES}
        blank_scores = {name: at_best.get(f"val_blank_{name}") for name in training.BLANK_SCORES}
        scores = questionnaire_scores(config.questionnaire_dropout, full, blank_scores)
        return candidate.finish(
            run,
            model,
            result,
            tags=tags,
            keras_backend=described["backend"],
            weights=weights,
            # best_val_* (finish: one float entry each) hold the restored epoch's scores with and without answers.
            metadata={
                "history": table_md(result.history, rows=40),
                "questionnaire_dropout": config.questionnaire_dropout,
            },
            package_extra={"weights": weights, QUESTIONNAIRE_EXTRA: scores},
        )


baseline_cnn = candidate_asset(
    name="baseline_cnn",
    kind="keras_image",
    config=TrainingConfig,
    ins=("labeled_splits", "image_tensors"),
    train=_train_baseline_cnn,
    code_version="3",  # 2: calibrated (a temperature in the package); 3: no T that raises the val ECE
    description="The student notebooks' two-layer CNN (32 and 64 filters), trained from the uint8 cache "
    "with class weights and early stopping on validation macro-F1: the baseline every model must beat.",
)

resnet50_transfer = candidate_asset(
    name="resnet50_transfer",
    kind="keras_image",
    config=TransferConfig,
    ins=("labeled_splits", "image_tensors", "image_embeddings"),
    train=transfer_training("image_embeddings"),
    code_version="3",  # 2: calibrated (a temperature in the package); 3: no T that raises the val ECE
    description="ResNet50 transfer: on an accelerator (or mode=fine_tune) the head is trained on a frozen "
    "backbone, then the top layers are unfrozen at a lower learning rate (BatchNorm stays frozen), from the "
    "uint8 cache with bfloat16 on GPU. On CPU (mode=auto) the head is trained on image_embeddings so a full "
    "run stays practical. Saved as one end-to-end model on raw uint8 images.",
)

resnet50_fixmatch = candidate_asset(
    name="resnet50_fixmatch",
    kind="keras_image",
    config=FixMatchTrainingConfig,
    ins=("labeled_splits", "image_tensors", "image_embeddings", "unlabelled_pool"),
    train=_train_resnet50_fixmatch,
    code_version="3",  # 2: calibrated (a temperature in the package); 3: no T that raises the val ECE
    description="ResNet50 transfer that also learns from the unlabelled pool, FixMatch-style: each step, "
    "the pseudo-label of a weak view of a pool image (kept above a confidence threshold) is the target of a "
    "strong view of the same image. Augmentation is GEOMETRY-ONLY (flips, rotations, zoom, shear), never "
    "colour: skin tone is the fairness attribute. CPU (mode=auto): a head on frozen embeddings of the views; "
    "accelerator: end-to-end fine-tuning. Its supervised twin is resnet50_transfer on the same split.",
)

efficientnet_transfer = candidate_asset(
    name="efficientnet_transfer",
    kind="keras_image",
    config=TransferConfig,
    ins=("labeled_splits", "image_tensors", "efficientnet_embeddings"),
    train=transfer_training("efficientnet_embeddings"),
    description="EfficientNetV2-B0 transfer, the same two modes as resnet50_transfer (GPU or mode=fine_tune: "
    "frozen, then the top layers unfrozen with BatchNorm frozen; CPU: a head on efficientnet_embeddings). "
    "EfficientNetV2-B0 rather than B0: its input normalisation is part of the network whatever the weights "
    "(B0's ImageNet normalisation is only corrected when keras downloads the weights itself), its random-init "
    "features learnt the planted patterns better (test balanced accuracy 0.71-0.82 vs 0.62-0.76 over three "
    "seeds), "
    "and it is the more accurate (ImageNet top-1 78.7 vs 77.1 %) and faster-training family. The network "
    "rescales its own 0-255 input; the saved model takes raw uint8 images like the others.",
    code_version="2",  # 2: no temperature that raises the val ECE
)

metadata_model = candidate_asset(
    name="metadata_model",
    kind="sklearn_metadata",
    config=MetadataModelConfig,
    ins=("labeled_splits", "cases"),
    train=_train_metadata_model,
    description="Metadata-only classifier (the contributor's answers: symptoms, body parts, textures, "
    "duration, age group, sex, self-reported Fitzpatrick type): scikit-learn logistic regression plus "
    "boosted stumps, class-balanced, one row per case, with blank-questionnaire copies of the training rows "
    "(questionnaire_dropout); scored on validation with the answers and with blank forms. A floor for the "
    "image models.",
    code_version="2",  # 2: modality dropout, blank-questionnaire validation scores
)

metadata_model_self_trained = candidate_asset(
    name="metadata_model_self_trained",
    kind="sklearn_metadata",
    config=SelfTrainedMetadataModelConfig,
    ins=("labeled_splits", "cases", "unlabelled_pool"),
    train=_train_metadata_model,
    description="The metadata model self-trained on the unlabelled pool: fitted on the labelled training "
    "cases, it pseudo-labels the pool cases it is confident about (threshold), refits with them (each weighing "
    "pseudo_label_weight of a dermatologist's label), for max_rounds rounds. Its supervised twin is "
    "metadata_model (same labelled rows, same split); model_comparison shows them side by side.",
)

multimodal = candidate_asset(
    name="multimodal",
    kind="keras_multimodal",
    config=MultimodalConfig,
    ins=("labeled_splits", "image_tensors", "image_embeddings", "cases"),
    train=_train_multimodal,
    description="Multimodal: the frozen ResNet50 image embedding and a metadata branch (the answers with "
    "their missing-value masks) fused by concatenation, class-balanced, early stopping on validation "
    "macro-F1. Modality dropout: each training example's questionnaire is blanked with probability "
    "questionnaire_dropout, so a blank form gets an answer from the image; every epoch is also scored with "
    "blank validation questionnaires (val_blank_*). Saved as one model on raw uint8 images plus the metadata "
    "vector.",
    code_version="6",  # 2: questionnaire dropout; 3: calibrated; 4: T and 5: stopping on both forms; 6: ECE guard
)
