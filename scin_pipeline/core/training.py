"""The training loop shared by every Keras model of the pipeline: macro metrics, early stopping, resume.

Decisions:

- Model selection on the validation split uses ``val_macro_f1`` (default) or ``val_balanced_accuracy``,
  not accuracy: SCIN's condition labels are very skewed, and a model predicting the majority class has
  high accuracy and useless macro scores. ``MacroMetricsCallback`` computes them with scikit-learn at
  each epoch end and writes them into the Keras ``logs`` dict, so EarlyStopping, ModelCheckpoint, the
  History, the CSV log and the caller's MLflow hook all see the same numbers. It also writes
  ``val_loss`` / ``val_accuracy`` from the same predictions (we do not pass ``validation_data`` to
  ``fit``: that would predict the validation split a second time each epoch).
- Early stopping always restores the best epoch's weights (Keras 3 restores them at train end even
  when patience did not run out).
- Resume: with ``checkpoint_dir``, ``keras.callbacks.BackupAndRestore`` saves weights + epoch after
  every epoch, a ``CSVLogger`` appends one history row per epoch and ``ModelCheckpoint`` keeps the best
  weights on disk. Calling ``fit_classifier`` again with the same directory after a kill continues at
  the first unfinished epoch, with the early-stopping state (best, wait) rebuilt from the CSV and the best
  weights taken from disk, so a best epoch from before the kill is not lost. A finished fit writes
  ``final.weights.h5`` then ``completed.json`` (each through ``core.atomic``: whole or absent); calling
  again then loads them instead of training (this is what lets ``fine_tune_transfer`` resume inside its
  second phase).
- Epoch numbers are 1-based and global: phase 2 of ``fine_tune_transfer`` continues the numbering of
  phase 1 (``initial_epoch_offset``), so per-epoch MLflow steps stay monotonic.
- Class imbalance: ``class_weighting="balanced"`` (scikit-learn's n / (k * count)); classes absent from
  the training split get weight 0 (they contribute no samples; Keras needs a weight for every index).
- ``extract_embeddings`` / ``predict_in_batches`` call ``predict_on_batch`` on fixed-size slices (the
  last one padded, so one compiled shape) instead of ``model.predict``: a memory-mapped cache is read
  slice by slice, and the small validation predictions made every epoch skip predict's data adapter,
  callbacks and progress bar. Speed: bench/train_cpu.py (ResNet50 embeddings, CPU, 96 and 128 px, TF and
  JAX) measures 1.01-1.04x ``model.predict``'s img/s: no real speed-up (the convolutions dominate), so
  this is kept for memory and simplicity, not speed. (A jitted JAX ``stateless_call`` variant measured
  the same and was dropped.)

Mixed precision is a global Keras policy that must be set before models are built
(``core.backend.apply_mixed_precision(config.mixed_precision)``); this module does not build backbones.
keras is imported inside functions (the backend is fixed at keras import time, see core.backend).
"""

from __future__ import annotations

import functools
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pandas as pd

from scin_pipeline.core.atomic import atomic_target, write_text_atomic
from scin_pipeline.core.champion import ChampionRule

logger = logging.getLogger(__name__)

MONITORS = ("val_macro_f1", "val_balanced_accuracy")
# Scored again on validation with every questionnaire blank (models that read one), as val_blank_<name>.
BLANK_SCORES = ("macro_f1", "balanced_accuracy")
# A model that reads the questionnaire is ranked by the champion rule on both forms (core.champion:
# (1 - w) x answered + w x blank). It stops early, and keeps its best epoch, by the same score, logged as
# val_both_forms_<name> with the rule's default weight: stopping on the answered score alone kept epochs
# that answered blank forms worse than the rule would have chosen.
BOTH_FORMS_WEIGHT = ChampionRule().blank_questionnaire_weight
HISTORY_COLUMNS = (
    "epoch",
    "phase",
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "val_macro_f1",
    "val_balanced_accuracy",
    "learning_rate",
)
_HISTORY_CSV = "history.csv"
_BEST_WEIGHTS = "best.weights.h5"
_FINAL_WEIGHTS = "final.weights.h5"
_COMPLETED = "completed.json"
_BACKUP_DIR = "backup"


def monitored_key(monitor: str, reads_questionnaire: bool) -> str:
    """The epoch-log key early stopping and checkpoints follow: ``monitor`` (one of ``MONITORS``) or, for a
    model scored with blank questionnaires too, its both-forms score ``val_both_forms_<metric>``."""
    if monitor not in MONITORS:
        raise ValueError(f"monitor={monitor!r}: choose one of {', '.join(MONITORS)}")
    return "val_both_forms_" + monitor.removeprefix("val_") if reads_questionnaire else monitor


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (the Dagster asset config mirrors these fields)."""

    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    fine_tune_epochs: int = 5
    fine_tune_learning_rate: float = 1e-5
    unfreeze_layers: int = 30
    early_stopping_patience: int = 5
    monitor: Literal["val_macro_f1", "val_balanced_accuracy"] = "val_macro_f1"  # MONITORS
    seed: int = 0
    class_weighting: Literal["balanced", "none"] = "balanced"
    mixed_precision: Literal["auto", "bfloat16", "off"] = "auto"
    augment: bool = True
    loader_workers: int = 4  # threads of the default training PyDataset (cv2 augmentation releases the GIL)

    def __post_init__(self):
        if self.monitor not in MONITORS:
            raise ValueError(f"monitor={self.monitor!r}: choose one of {', '.join(MONITORS)}")
        if self.class_weighting not in ("balanced", "none"):
            raise ValueError(f"class_weighting={self.class_weighting!r}: choose 'balanced' or 'none'")
        if self.mixed_precision not in ("auto", "bfloat16", "off"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r}: choose 'auto', 'bfloat16' or 'off'")
        for name in ("epochs", "batch_size", "early_stopping_patience", "loader_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("fine_tune_epochs", "unfreeze_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """One ``fit_classifier`` call. Epochs are 1-based and global (see module docstring)."""

    model: Any
    history: pd.DataFrame  # one row per epoch, HISTORY_COLUMNS first
    best_epoch: int
    best_score: float
    monitor: str
    stopped_early: bool
    resumed_from_epoch: int | None  # last finished epoch restored from checkpoint_dir; None = fresh start


@dataclass
class TransferResult:
    """``fine_tune_transfer``: the end-to-end model (weights of the best phase) and both phases."""

    model: Any
    history: pd.DataFrame  # both phases, column "phase" = "frozen" | "fine_tune"
    best_epoch: int
    best_score: float
    monitor: str
    fine_tune_kept: bool  # False when fine-tuning never beat the frozen phase and its weights were restored
    phases: dict[str, TrainResult] = field(default_factory=dict)


def balanced_class_weights(y, num_classes: int) -> dict[int, float]:
    """{class index: weight} with scikit-learn's "balanced" rule; classes absent from ``y`` get 0.0."""
    from sklearn.utils.class_weight import compute_class_weight

    y = np.asarray(y).astype(int)
    if y.size == 0:
        raise ValueError("cannot compute class weights of an empty label array")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
    present = np.unique(y)
    weights = compute_class_weight("balanced", classes=present, y=y)
    result = {k: 0.0 for k in range(num_classes)}
    result.update({int(k): float(w) for k, w in zip(present, weights)})
    return result


def _class_weights_for(config: TrainConfig, y, num_classes: int) -> dict[int, float] | None:
    return balanced_class_weights(y, num_classes) if config.class_weighting == "balanced" else None


def _num_rows(inputs) -> int:
    if isinstance(inputs, dict):
        lengths = {name: len(v) for name, v in inputs.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"inputs have different lengths: {lengths}")
        return next(iter(lengths.values()))
    return len(inputs)


def _slice(inputs, start: int, stop: int, pad_to: int):
    def one(a):
        chunk = np.asarray(a[start:stop])
        if len(chunk) < pad_to:  # pad with copies of the last row: keeps one compiled batch shape
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad_to - len(chunk), axis=0)])
        return chunk

    return {k: one(v) for k, v in inputs.items()} if isinstance(inputs, dict) else one(inputs)


def predict_in_batches(
    model, inputs, batch_size: int = 64, on_batch: Callable[[int], None] | None = None
) -> np.ndarray:
    """``model`` outputs for array (or {name: array}) inputs, as float32 numpy, in fixed-size batches;
    ``on_batch(n)`` after each batch of n rows (progress)."""
    import keras

    n = _num_rows(inputs)
    if n == 0:
        raise ValueError("no rows to predict")
    batch_size = min(batch_size, n)
    out: np.ndarray | None = None
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        # convert_to_numpy gives a numpy array (its inferred type is the union of every backend's).
        batch = cast(
            np.ndarray, keras.ops.convert_to_numpy(model.predict_on_batch(_slice(inputs, start, stop, batch_size)))
        )
        if out is None:
            out = np.empty((n, *batch.shape[1:]), dtype=np.float32)
        out[start:stop] = batch[: stop - start]
        if on_batch is not None:
            on_batch(stop - start)
    assert out is not None  # n > 0: the loop ran
    return out


def extract_embeddings(
    backbone, images_uint8, batch_size: int = 64, on_batch: Callable[[int], None] | None = None
) -> np.ndarray:
    """Embeddings (N, D) float32 of uint8 images (N, S, S, 3); works on a memory-mapped cache."""
    images = images_uint8
    if getattr(images, "dtype", None) != np.uint8 or getattr(images, "ndim", 0) != 4:
        raise ValueError(
            f"images must be a uint8 array (N, S, S, 3), got {getattr(images, 'dtype', type(images))} "
            f"with shape {getattr(images, 'shape', '?')}"
        )
    return predict_in_batches(backbone, images, batch_size, on_batch=on_batch)


def _macro_scores(y_true, probabilities) -> dict[str, float]:
    from sklearn.metrics import balanced_accuracy_score, f1_score

    y_true = np.asarray(y_true).astype(int)
    y_pred = probabilities.argmax(axis=1)
    p_true = np.clip(probabilities[np.arange(len(y_true)), y_true], 1e-7, 1.0)  # Keras' epsilon
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" is expected early on
        warnings.simplefilter("ignore", UserWarning)
        balanced = balanced_accuracy_score(y_true, y_pred)
    return {
        "val_loss": float(-np.log(p_true).mean()),
        "val_accuracy": float((y_pred == y_true).mean()),
        "val_balanced_accuracy": float(balanced),
        "val_macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),  # pyright: ignore[reportArgumentType]  # sklearn: untyped; a number is documented
    }


@functools.cache
def _macro_metrics_class():
    import keras

    class MacroMetricsCallback(keras.callbacks.Callback):
        """Writes val_loss, val_accuracy, val_balanced_accuracy, val_macro_f1 and learning_rate into the
        epoch-end logs, from one prediction of the validation inputs; with ``blank_val_inputs`` (the same
        rows with every questionnaire blank) also val_blank_macro_f1 and val_blank_balanced_accuracy, and
        the both-forms scores val_both_forms_* (``BOTH_FORMS_WEIGHT``) that such a model is stopped on. Put
        it before the callbacks that read these keys (EarlyStopping, ModelCheckpoint, CSVLogger; Keras'
        History always runs last). ``predict_model``: the model that scores the validation inputs when it is
        not the one being fitted (a training wrapper around a classifier, e.g. core.semi_supervised's
        FixMatch model)."""

        def __init__(self, val_inputs, val_y, batch_size: int = 64, blank_val_inputs=None, predict_model=None):
            super().__init__()
            self.val_inputs, self.val_y, self.batch_size = val_inputs, np.asarray(val_y), batch_size
            self.blank_val_inputs = blank_val_inputs
            self.predict_model = predict_model

        def on_epoch_end(self, epoch, logs=None):
            if logs is None:
                return
            assert self.model is not None  # fit sets it before the first epoch
            scorer = self.predict_model if self.predict_model is not None else self.model
            probabilities = predict_in_batches(scorer, self.val_inputs, self.batch_size)
            logs.update(_macro_scores(self.val_y, probabilities))
            if self.blank_val_inputs is not None:
                blank_probabilities = predict_in_batches(scorer, self.blank_val_inputs, self.batch_size)
                blank = _macro_scores(self.val_y, blank_probabilities)
                w = BOTH_FORMS_WEIGHT
                for name in BLANK_SCORES:
                    logs[f"val_blank_{name}"] = blank[f"val_{name}"]
                    logs[f"val_both_forms_{name}"] = (1 - w) * logs[f"val_{name}"] + w * blank[f"val_{name}"]
            learning_rate = cast(np.ndarray, keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            logs["learning_rate"] = float(learning_rate)

    MacroMetricsCallback.__module__ = __name__
    MacroMetricsCallback.__qualname__ = "MacroMetricsCallback"
    return MacroMetricsCallback


def __getattr__(name: str):
    # MacroMetricsCallback subclasses keras.callbacks.Callback, so it is created on first access: importing
    # this module must not import keras (the backend is chosen at keras import time).
    if name == "MacroMetricsCallback":
        return _macro_metrics_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _resumable_early_stopping(monitor: str, patience: int, prior: dict | None):
    """EarlyStopping whose best/wait continue from a resumed run (Keras resets them at train begin)."""
    import keras

    class _ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            if prior:
                self.best, self.best_epoch, self.wait = prior["best"], prior["best_epoch"], prior["wait"]

    return _ResumableEarlyStopping(monitor=monitor, mode="max", patience=patience, restore_best_weights=True)


def _history_frame(records: pd.DataFrame, phase: str) -> pd.DataFrame:
    frame = records.copy()
    frame["epoch"] = frame["epoch"].astype(int) + 1  # Keras epochs are 0-based
    frame["phase"] = phase
    first = [c for c in HISTORY_COLUMNS if c in frame.columns]
    return frame[first + sorted(c for c in frame.columns if c not in first)].reset_index(drop=True)


def _best(history: pd.DataFrame, monitor: str) -> tuple[int, float]:
    scores = history[monitor].to_numpy(dtype=float)
    if len(scores) == 0 or np.all(np.isnan(scores)):
        return 0, float("nan")
    i = int(np.nanargmax(scores))  # first maximum, like EarlyStopping's strict improvement
    return int(history["epoch"].iloc[i]), float(scores[i])


def restored_epoch_metrics(history: pd.DataFrame | None, best_epoch: int) -> dict[str, float]:
    """The validation metrics of the epoch whose weights were restored, named ``best_val_*``.

    Per-epoch ``val_*`` series end at the LAST epoch, while the packaged model holds the BEST epoch's
    weights (early stopping restores them): these are the numbers the evaluation of the package reproduces,
    under names that cannot be mistaken for the last epoch's. Empty when there is no such epoch in
    ``history`` (no history, or a best epoch of 0: no epoch improved)."""
    if history is None or not len(history) or "epoch" not in history:
        return {}
    row = history[history["epoch"] == best_epoch]
    if row.empty:
        return {}
    values = {str(c): float(row[c].iloc[0]) for c in history.columns if str(c).startswith("val_")}
    return {f"best_{name}": value for name, value in values.items() if np.isfinite(value)}


def _compile(model, learning_rate: float):
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
    )


def fit_classifier(
    model,
    train_data,
    val_inputs,
    val_y,
    *,
    config: TrainConfig,
    class_weight: dict[int, float] | None,
    checkpoint_dir: str | Path | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    initial_epoch_offset: int = 0,
    learning_rate: float | None = None,
    epochs: int | None = None,
    phase: str = "train",
    callbacks: list | tuple = (),
    metric_callbacks: list | tuple = (),
    val_model=None,
    verbose: int = 0,
    blank_val_inputs=None,
) -> TrainResult:
    """Compile ``model`` (Adam, sparse categorical cross-entropy) and fit it with macro metrics, early
    stopping on ``config.monitor`` (best weights restored) and, with ``checkpoint_dir``, resume.

    ``train_data``: a ``keras.utils.PyDataset`` (or other iterable Keras accepts) of (x, y) batches, or a
    tuple ``(x, y)`` of arrays (shuffled, ``config.batch_size``). ``val_inputs``: array or {name: array}.
    ``on_epoch_end(epoch, logs)`` gets the 1-based global epoch and the float logs (for MLflow).
    ``learning_rate`` / ``epochs`` default to ``config.learning_rate`` / ``config.epochs``.
    ``callbacks`` run after ours (they see the finished epoch's logs and backup). ``blank_val_inputs``: the
    validation inputs with every questionnaire blank, scored each epoch as val_blank_*; with them, stopping
    and the kept epoch follow the both-forms score (``monitored_key``; ``TrainResult.monitor`` names it).
    ``metric_callbacks`` run right after the validation metrics, before logging and stopping: what they
    write into the logs is in the history and reaches ``on_epoch_end``. ``val_model`` scores ``val_inputs``
    when ``model`` is a training wrapper that does not take them (its weights are ``model``'s, so stopping
    and checkpoints still act on ``model``).
    ``checkpoint_dir`` must belong to this one training (e.g. the run id, or a hash of inputs + config):
    a finished fit found there is loaded, not redone, whatever the arguments.
    """
    import keras

    learning_rate = config.learning_rate if learning_rate is None else learning_rate
    epochs = config.epochs if epochs is None else epochs
    monitor = monitored_key(config.monitor, reads_questionnaire=blank_val_inputs is not None)
    keras.utils.set_random_seed(config.seed)
    _compile(model, learning_rate)

    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    prior = None
    resumed_from = None
    if ckpt is not None:
        if (ckpt / _COMPLETED).exists() and (ckpt / _FINAL_WEIGHTS).exists():
            return _load_completed(model, ckpt, monitor, phase)
        ckpt.mkdir(parents=True, exist_ok=True)
        state_file = ckpt / _BACKUP_DIR / "training_metadata.json"
        if state_file.exists():
            finished = int(json.loads(state_file.read_text())["epoch"])  # Keras epochs done (absolute)
            resumed_from = finished
            prior = _truncate_history(ckpt / _HISTORY_CSV, finished, monitor)
            if hasattr(train_data, "set_epoch"):  # CachedImageSequence: continue its shuffle/augment stream
                train_data.set_epoch(finished - initial_epoch_offset)
        else:
            for stale in (_HISTORY_CSV, _BEST_WEIGHTS):
                (ckpt / stale).unlink(missing_ok=True)

    early_stopping = _resumable_early_stopping(monitor, config.early_stopping_patience, prior)
    all_callbacks: list[keras.callbacks.Callback] = [
        _macro_metrics_class()(
            val_inputs, val_y, config.batch_size, blank_val_inputs=blank_val_inputs, predict_model=val_model
        ),
        *metric_callbacks,
    ]
    if ckpt is not None:
        all_callbacks += [
            keras.callbacks.CSVLogger(str(ckpt / _HISTORY_CSV), append=True),
            keras.callbacks.ModelCheckpoint(
                str(ckpt / _BEST_WEIGHTS),
                monitor=monitor,
                mode="max",
                save_best_only=True,
                save_weights_only=True,
                initial_value_threshold=prior["best"] if prior else None,
            ),
        ]
    all_callbacks.append(early_stopping)
    if ckpt is not None:
        all_callbacks.append(keras.callbacks.BackupAndRestore(str(ckpt / _BACKUP_DIR)))
    if on_epoch_end is not None:
        all_callbacks.append(
            keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: on_epoch_end(epoch + 1, {k: float(v) for k, v in logs.items()})
            )
        )
    all_callbacks += list(callbacks)

    # Keras never clears the epoch BackupAndRestore stored on the model; a later fit of the same model
    # (phase 2 of fine-tuning) would otherwise start from it.
    model._initial_epoch = None
    fit_kwargs = dict(
        epochs=initial_epoch_offset + epochs,
        initial_epoch=initial_epoch_offset,
        class_weight=class_weight,
        callbacks=all_callbacks,
        verbose=verbose,
    )
    if isinstance(train_data, tuple):
        x, y = train_data
        fit_history = model.fit(x, np.asarray(y), batch_size=config.batch_size, shuffle=True, **fit_kwargs)
    else:
        # A PyDataset shuffles its own samples (CachedImageSequence: reproducibly, per seed and epoch);
        # Keras' batch-order shuffle would draw from Python's global random.
        fit_history = model.fit(train_data, shuffle=False, **fit_kwargs)

    if ckpt is not None:
        records = pd.read_csv(ckpt / _HISTORY_CSV) if (ckpt / _HISTORY_CSV).exists() else pd.DataFrame()
        if (ckpt / _BEST_WEIGHTS).exists():  # the best epoch may lie before a resume
            model.load_weights(str(ckpt / _BEST_WEIGHTS))
    else:
        records = pd.DataFrame(fit_history.history).assign(epoch=fit_history.epoch)
    if records.empty:
        raise RuntimeError(f"fit of {model.name!r} ran no epoch (epochs={epochs}, checkpoint_dir={ckpt})")
    history = _history_frame(records, phase)
    best_epoch, best_score = _best(history, monitor)
    result = TrainResult(
        model=model,
        history=history,
        best_epoch=best_epoch,
        best_score=best_score,
        monitor=monitor,
        stopped_early=early_stopping.stopped_epoch > 0,
        resumed_from_epoch=resumed_from,
    )
    if ckpt is not None:
        # Weights first, then the marker that vouches for them; each whole or absent.
        with atomic_target(ckpt / _FINAL_WEIGHTS, suffix=_FINAL_WEIGHTS) as tmp:
            model.save_weights(str(tmp))
        write_text_atomic(
            json.dumps(
                {
                    "best_epoch": best_epoch,
                    "best_score": best_score,
                    "stopped_early": result.stopped_early,
                    "resumed_from_epoch": resumed_from,
                }
            ),
            ckpt / _COMPLETED,
        )
        (ckpt / _BEST_WEIGHTS).unlink(missing_ok=True)
    return result


def _truncate_history(csv_path: Path, finished: int, monitor: str) -> dict | None:
    """Keep the CSV rows of the epochs the backup holds; return the early-stopping state they imply."""
    if not csv_path.exists():
        return None
    records = pd.read_csv(csv_path)
    records = records[records["epoch"] < finished]  # a row written just before the kill is redone
    with atomic_target(csv_path) as tmp:
        records.to_csv(tmp, index=False)
    if records.empty or monitor not in records:
        return None
    i = int(np.nanargmax(records[monitor].to_numpy(dtype=float)))
    best_epoch = int(records["epoch"].iloc[i])
    return {
        "best": float(records[monitor].iloc[i]),
        "best_epoch": best_epoch,
        "wait": int(records["epoch"].iloc[-1]) - best_epoch,
    }


def _load_completed(model, ckpt: Path, monitor: str, phase: str) -> TrainResult:
    logger.info("fit in %s already completed: loading its weights and history instead of training", ckpt)
    with warnings.catch_warnings():  # the saved optimizer state is irrelevant: this model is done training
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(str(ckpt / _FINAL_WEIGHTS))
    state = json.loads((ckpt / _COMPLETED).read_text())
    history = _history_frame(pd.read_csv(ckpt / _HISTORY_CSV), phase)
    return TrainResult(
        model=model,
        history=history,
        best_epoch=int(state["best_epoch"]),
        best_score=float(state["best_score"]),
        monitor=monitor,
        stopped_early=bool(state["stopped_early"]),
        resumed_from_epoch=int(history["epoch"].max()),
    )


def _model_inputs(images_or_embeddings, metadata, key: str):
    return images_or_embeddings if metadata is None else {key: images_or_embeddings, "metadata": metadata}


def _snapshot(model) -> dict[str, np.ndarray]:
    import keras

    return {v.path: cast(np.ndarray, keras.ops.convert_to_numpy(v)) for v in model.weights}


def _restore(model, snapshot: dict[str, np.ndarray]) -> None:
    for v in model.weights:
        v.assign(snapshot[v.path])


def default_dataset_factory(images, y, *, batch_size, shuffle, augment, seed, metadata=None, workers=1):
    """The production batches: ``core.image_cache.CachedImageSequence`` (uint8 images, geometric
    augmentation), ``workers`` threads preparing batches ahead of the model."""
    from scin_pipeline.core.image_cache import CachedImageSequence

    return CachedImageSequence(
        images,
        y,
        batch_size,
        shuffle=shuffle,
        augment=augment,
        seed=seed,
        metadata=metadata,
        workers=workers,
        use_multiprocessing=False,
    )


def fine_tune_transfer(
    backbone,
    head,
    train_images,
    train_y,
    val_images,
    val_y,
    *,
    config: TrainConfig,
    train_metadata=None,
    val_metadata=None,
    checkpoint_dir: str | Path | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    dataset_factory: Callable[..., Any] | None = None,
    callbacks: list | tuple = (),
    verbose: int = 0,
) -> TransferResult:
    """Transfer learning end to end on uint8 images: phase "frozen" trains the head on the frozen
    backbone at ``learning_rate`` for ``epochs``; phase "fine_tune" unfreezes the top
    ``unfreeze_layers`` (BatchNormalization stays frozen) at ``fine_tune_learning_rate`` for
    ``fine_tune_epochs``. If fine-tuning never beats the frozen phase's best score, the frozen phase's
    weights are restored. Returns the end-to-end model (the one file to save) and both histories.

    ``dataset_factory(images, y, *, batch_size, shuffle, augment, seed, metadata)`` builds the training
    batches (default ``default_dataset_factory``: CachedImageSequence with ``config.loader_workers``
    threads). Metadata arrays switch on the multimodal inputs (``head`` must then take "embedding" and
    "metadata"). ``callbacks`` are passed to both phases' ``fit_classifier``.
    """
    from scin_pipeline.core.models import compose_end_to_end

    with_metadata = train_metadata is not None
    if with_metadata != (val_metadata is not None):
        raise ValueError("pass metadata for both train and validation, or for neither")
    dataset_factory = dataset_factory or functools.partial(default_dataset_factory, workers=config.loader_workers)

    backbone.trainable = False
    model = compose_end_to_end(backbone, head, with_metadata=with_metadata)
    num_classes = int(model.output_shape[-1])
    class_weight = _class_weights_for(config, train_y, num_classes)
    val_inputs = _model_inputs(val_images, val_metadata, "image")

    def batches(phase_seed: int):
        return dataset_factory(
            train_images,
            np.asarray(train_y),
            batch_size=config.batch_size,
            shuffle=True,
            augment=config.augment,
            seed=phase_seed,
            metadata=train_metadata,
        )

    return frozen_then_fine_tuned(
        model,
        backbone,
        batches,
        val_inputs,
        val_y,
        config=config,
        class_weight=class_weight,
        checkpoint_dir=checkpoint_dir,
        on_epoch_end=on_epoch_end,
        verbose=verbose,
        callbacks=callbacks,
    )


def frozen_then_fine_tuned(
    model,
    backbone,
    batches: Callable[[int], Any],
    val_inputs,
    val_y,
    *,
    config: TrainConfig,
    class_weight: dict | None,
    checkpoint_dir: str | Path | None,
    on_epoch_end: Callable[[int, dict], None] | None,
    verbose: int,
    trained_model=None,
    **fit_options,
) -> TransferResult:
    """The two phases of every end-to-end transfer fine-tune (``fine_tune_transfer``, and FixMatch's in
    ``core.semi_supervised.fine_tune_fixmatch``), on ``model``, an end-to-end model around ``backbone``
    (frozen by the caller). Each phase is one ``fit_classifier`` of ``trained_model`` (default ``model``;
    FixMatch trains a wrapper around it) on ``batches(phase_seed)``, checkpointed under the phase's name,
    with ``fit_options`` (callbacks, metric_callbacks, val_model). Phase "frozen": ``config.seed``,
    ``learning_rate``, ``epochs``; phase "fine_tune": ``config.seed + 1`` after the top ``unfreeze_layers``
    are unfrozen (BatchNormalization stays frozen), ``fine_tune_learning_rate``, ``fine_tune_epochs``, its
    epochs numbered after the frozen phase's. When fine-tuning does not beat the frozen phase's best score,
    the frozen phase's weights are restored. The backbone is left frozen (the returned model is for
    inference / saving)."""
    from scin_pipeline.core.models import unfreeze_top

    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None

    def fit(phase: str, phase_seed: int, **phase_overrides) -> TrainResult:
        return fit_classifier(
            model if trained_model is None else trained_model,
            batches(phase_seed),
            val_inputs,
            val_y,
            config=config,
            class_weight=class_weight,
            checkpoint_dir=ckpt / phase if ckpt else None,
            on_epoch_end=on_epoch_end,
            phase=phase,
            verbose=verbose,
            **fit_options,
            **phase_overrides,
        )

    frozen = fit("frozen", config.seed)
    phases = {"frozen": frozen}
    if config.fine_tune_epochs == 0 or config.unfreeze_layers == 0:
        return TransferResult(
            model=model,
            history=frozen.history,
            best_epoch=frozen.best_epoch,
            best_score=frozen.best_score,
            monitor=config.monitor,
            fine_tune_kept=False,
            phases=phases,
        )

    frozen_weights = _snapshot(model)
    unfreeze_top(backbone, config.unfreeze_layers)
    tuned = fit(
        "fine_tune",
        config.seed + 1,
        initial_epoch_offset=int(frozen.history["epoch"].max()),
        learning_rate=config.fine_tune_learning_rate,
        epochs=config.fine_tune_epochs,
    )
    phases["fine_tune"] = tuned
    kept = bool(tuned.best_score > frozen.best_score)
    if not kept:
        logger.info(
            "fine-tuning best %s=%.4f did not beat the frozen phase's %.4f: keeping frozen weights",
            config.monitor,
            tuned.best_score,
            frozen.best_score,
        )
        _restore(model, frozen_weights)
    backbone.trainable = False  # the returned model is for inference / saving
    best = tuned if kept else frozen
    return TransferResult(
        model=model,
        history=pd.concat([frozen.history, tuned.history], ignore_index=True),
        best_epoch=best.best_epoch,
        best_score=best.best_score,
        monitor=config.monitor,
        fine_tune_kept=kept,
        phases=phases,
    )


def train_head_on_embeddings(
    train_emb,
    train_y,
    val_emb,
    val_y,
    *,
    head_builder: Callable[[], Any],
    config: TrainConfig,
    train_metadata=None,
    val_metadata=None,
    checkpoint_dir: str | Path | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    verbose: int = 0,
    blank_metadata=None,
) -> TrainResult:
    """The CPU default: a head trained on precomputed frozen-backbone embeddings (float32 (N, D)).

    ``head_builder()`` returns a fresh head (e.g. ``functools.partial(build_classifier_head, 2048, k)``);
    it is called after the seed is set, so initialisation is reproducible. With metadata arrays the head
    gets {"embedding", "metadata"}; with ``blank_metadata`` too (the blank form's feature vector) each epoch
    is also scored with every validation questionnaire blank (val_blank_*). ``config.augment`` does not
    apply (embeddings are fixed). Compose the result with the backbone (``models.compose_end_to_end``)
    before saving.
    """
    import keras

    if (train_metadata is None) != (val_metadata is None):
        raise ValueError("pass metadata for both train and validation, or for neither")
    if blank_metadata is not None and val_metadata is None:
        raise ValueError("blank_metadata scores blank questionnaires: it needs the metadata arrays")
    keras.utils.set_random_seed(config.seed)
    head = head_builder()
    num_classes = int(head.output_shape[-1])
    train_inputs = _model_inputs(np.asarray(train_emb, dtype=np.float32), train_metadata, "embedding")
    val_inputs = _model_inputs(np.asarray(val_emb, dtype=np.float32), val_metadata, "embedding")
    blank_val_inputs = None
    if blank_metadata is not None:
        blank_rows = np.repeat(np.asarray(blank_metadata, dtype=np.float32)[None], len(val_y), axis=0)
        blank_val_inputs = _model_inputs(np.asarray(val_emb, dtype=np.float32), blank_rows, "embedding")
    return fit_classifier(
        head,
        (train_inputs, np.asarray(train_y)),
        val_inputs,
        val_y,
        config=config,
        class_weight=_class_weights_for(config, train_y, num_classes),
        checkpoint_dir=checkpoint_dir,
        on_epoch_end=on_epoch_end,
        phase="head",
        verbose=verbose,
        blank_val_inputs=blank_val_inputs,
    )
