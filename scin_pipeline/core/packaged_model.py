"""The packaged classifier: one folder that holds a trained model and everything needed to predict with it,
and the MLflow pyfunc wrapper that the registry serves (``models:/scin-condition-classifier@champion``).

A package folder holds ``spec.json`` (kind, class names in output order, image size, metadata feature
columns, the calibration, free-form ``extra``) and the model file: ``model.keras`` (one end-to-end Keras
model that takes raw uint8 images, and metadata when it uses it) or ``model.joblib`` (a fitted
scikit-learn-style object with ``predict_proba``). Three kinds:

- ``keras_image``: input ``images`` uint8 (N, S, S, 3);
- ``keras_multimodal``: ``{"image": images, "metadata": metadata_features(cases)[metadata_columns]}``;
- ``sklearn_metadata``: ``metadata_features(cases)[metadata_columns]``.

Decisions:

- Every kind predicts a probability distribution over ``classes`` (single-label, the contract of the image
  models). An output that is not one (negative, not finite, or rows not summing to 1 within 1e-3, e.g. a
  multi-label sigmoid model packaged by mistake) is refused with a ValueError rather than renormalised
  silently; rows within tolerance are renormalised exactly so that consumers can rely on sum == 1.
- Metadata features are rebuilt from raw case columns at prediction time by the same
  ``metadata_features`` that training used; the package stores the column list it was trained on, and a
  package whose columns the current code no longer produces fails loudly, naming the columns.
- Calibration: ``calibration`` is a fitted :class:`~scin_pipeline.core.calibration.TemperatureScaling`
  (the training skeleton fits one on the validation split for every image candidate) or None.
  ``predict_proba`` applies it, so evaluation, the web service and the pyfunc all see the calibrated
  probabilities; ``predict_proba(..., calibrated=False)`` gives the model's own (evaluation reports both).
  Format version 2 added the field; version 1 packages (no calibration) still load, as uncalibrated, while
  older code refuses a version 2 package instead of silently serving it uncalibrated.
- ``model.joblib`` is a pickle: load packages only from our own store (the MLflow artifact store is one).
- A logged model is self-contained (``core.model_environment``): its ``code/`` folder holds the
  ``scin_pipeline`` modules the pyfunc imports (MLflow ``code_paths``; the package is not on PyPI) and its
  pip requirements pin every library those modules import, so ``mlflow models serve`` or a fresh
  environment loads it without this repository. A process that has already imported ``scin_pipeline``
  (the pipeline, ``scin-pipeline serve``) keeps its installed code; elsewhere the model's copy runs, i.e.
  the preprocessing it was logged with. Pinning the requirements ourselves also skips MLflow's requirement
  inference, which loads the model in a subprocess (seconds per logged model).
- The input signature is the same for every kind, so a client needs no change when the champion changes
  kind: ``image`` (binary: the image file's bytes; base64 in a JSON request), required by the Keras kinds
  and optional for the metadata model, and the questionnaire columns that ``metadata_features`` reads
  (``core.metadata_model.QUESTIONNAIRE_*``), all optional: check boxes as booleans (``true``/``false``;
  MLflow refuses 0/1 integers in a boolean column), single choices as strings. Absent columns read as
  unanswered; columns the signature does not name are dropped by MLflow before ``predict``. Outputs: one
  double per class. Every model carries an ``input_example`` (a SYNTHETIC 64 px picture and a few answers),
  which MLflow checks by predicting on it when the model is logged.

``mlflow.pyfunc`` is imported at module level because ``ScinClassifierPyfunc`` must subclass its
``PythonModel`` (and be pickled by reference to this module); Keras, TensorFlow and joblib are imported only
when a model is loaded or saved.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.pyfunc.model import PythonModel

from scin_pipeline.core.atomic import atomic_directory
from scin_pipeline.core.calibration import TemperatureScaling

KINDS = ("keras_image", "keras_multimodal", "sklearn_metadata")
KERAS_KINDS = ("keras_image", "keras_multimodal")
METADATA_KINDS = ("keras_multimodal", "sklearn_metadata")
SPEC_FILE = "spec.json"
KERAS_FILE = "model.keras"
SKLEARN_FILE = "model.joblib"
PACKAGE_FORMAT = "scin-packaged-classifier"
PACKAGE_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)  # 1: before calibration (read as uncalibrated)
IMAGE_COLUMN = "image"
SUM_TOLERANCE = 1e-3


@dataclass
class PackagedClassifier:
    """A trained classifier with its class names and input description (see the module docstring)."""

    kind: str
    classes: list[str]
    model: Any
    image_size: int | None = None
    metadata_columns: list[str] | None = None
    extra: dict = field(default_factory=dict)
    # Modules to import before loading the Keras file (they register custom layers); scin_pipeline.* only.
    keras_modules: list[str] = field(default_factory=list)
    calibration: TemperatureScaling | None = None  # applied by predict_proba (module docstring)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        self.classes = [str(c) for c in self.classes]
        if not self.classes:
            raise ValueError("classes is empty")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes has duplicates: {self.classes}")
        if self.kind in KERAS_KINDS:
            if not isinstance(self.image_size, (int, np.integer)) or self.image_size <= 0:
                raise ValueError(f"{self.kind} needs a positive int image_size, got {self.image_size!r}")
            self.image_size = int(self.image_size)
        if self.kind in METADATA_KINDS and not self.metadata_columns:
            raise ValueError(f"{self.kind} needs metadata_columns (the features it was trained on)")
        if self.metadata_columns is not None:
            self.metadata_columns = [str(c) for c in self.metadata_columns]
        for module in self.keras_modules:
            if not str(module).startswith("scin_pipeline."):
                raise ValueError(f"keras_modules may only name scin_pipeline.* modules, got {module!r}")

    @property
    def model_file(self) -> str:
        return KERAS_FILE if self.kind in KERAS_KINDS else SKLEARN_FILE

    def spec(self) -> dict:
        return {
            "format": PACKAGE_FORMAT,
            "format_version": PACKAGE_FORMAT_VERSION,
            "kind": self.kind,
            "classes": self.classes,
            "image_size": self.image_size,
            "metadata_columns": self.metadata_columns,
            "model_file": self.model_file,
            "keras_modules": list(self.keras_modules),
            "calibration": self.calibration.to_dict() if self.calibration is not None else None,
            "extra": self.extra,
        }

    # ---------------------------------------------------------------- save / load

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``spec.json`` and the model file into ``directory``, replacing it whole.

        The package is written into a temporary sibling folder and swapped into place
        (``core.atomic.atomic_directory``), so a reader never sees a half-written package and a crash
        leaves the previous one intact.
        """
        directory = Path(directory).expanduser().resolve()
        try:
            spec_text = json.dumps(self.spec(), indent=2, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"package spec for {directory} is not plain JSON (check `extra`): {exc}") from exc
        if self.kind not in KERAS_KINDS and not callable(getattr(self.model, "predict_proba", None)):
            raise TypeError(f"{self.kind} model must have predict_proba(X), got {type(self.model)}")
        with atomic_directory(directory) as tmp:
            if self.kind in KERAS_KINDS:
                self.model.save(tmp / KERAS_FILE)
            else:
                import joblib

                joblib.dump(self.model, tmp / SKLEARN_FILE)
            (tmp / SPEC_FILE).write_text(spec_text + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> PackagedClassifier:
        directory = Path(directory)
        spec = read_spec(directory)
        model_path = directory / spec["model_file"]
        if not model_path.is_file():
            raise FileNotFoundError(f"{model_path}: model file named in {directory / SPEC_FILE} is missing")
        if spec["kind"] in KERAS_KINDS:
            for module in spec.get("keras_modules") or []:
                if not str(module).startswith("scin_pipeline."):
                    raise ValueError(
                        f"{directory / SPEC_FILE}: keras_modules may only name scin_pipeline.* modules, got {module!r}"
                    )
                importlib.import_module(module)
            import keras

            try:
                model = keras.saving.load_model(model_path, compile=False)
            except Exception as exc:
                raise ValueError(f"cannot load the Keras model {model_path}: {exc}") from exc
        else:
            import joblib

            model = joblib.load(model_path)
        return cls(
            kind=spec["kind"],
            classes=spec["classes"],
            model=model,
            image_size=spec.get("image_size"),
            metadata_columns=spec.get("metadata_columns"),
            extra=spec.get("extra") or {},
            keras_modules=spec.get("keras_modules") or [],
            calibration=_calibration_from_spec(spec, directory),
        )

    # ---------------------------------------------------------------- prediction

    def metadata_matrix(self, cases: pd.DataFrame | None) -> np.ndarray:
        """The float32 (N, F) feature matrix of ``cases`` in this package's column order."""
        from scin_pipeline.core.metadata_model import metadata_features

        if cases is None:
            raise ValueError(f"{self.kind} model needs `cases` (case metadata rows), got None")
        if not isinstance(cases, pd.DataFrame):
            raise ValueError(f"cases must be a pandas DataFrame, got {type(cases).__name__}")
        assert self.metadata_columns is not None  # __post_init__ requires them for the metadata kinds
        features = metadata_features(cases)
        missing = [c for c in self.metadata_columns if c not in features.columns]
        if missing:
            raise ValueError(
                f"this package was trained on metadata feature columns that the current "
                f"metadata_features does not produce: {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''} ({len(missing)} missing)"
            )
        return features[self.metadata_columns].to_numpy(dtype=np.float32)

    def _check_images(self, images) -> np.ndarray:
        if images is None:
            raise ValueError(
                f"{self.kind} model needs `images` (uint8 (N, {self.image_size}, {self.image_size}, 3)), got None"
            )
        images = np.asarray(images)
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"images must have shape (N, {', '.join(map(str, expected))}), got {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (raw pixels; scaling happens inside the model), got {images.dtype}")
        return images

    def calibrate(self, probabilities: np.ndarray) -> np.ndarray:
        """The package's calibration applied to uncalibrated ``probabilities`` (unchanged without one)."""
        return self.calibration.apply(probabilities) if self.calibration is not None else probabilities

    def predict_proba(
        self, images: np.ndarray | None = None, cases: pd.DataFrame | None = None, *, calibrated: bool = True
    ) -> np.ndarray:
        """(N, K) float64 class probabilities, columns in ``classes`` order, rows summing to 1; calibrated
        by the package's temperature unless ``calibrated=False`` (the model's own output)."""
        probabilities = self._predict_uncalibrated(images, cases)
        return self.calibrate(probabilities) if calibrated else probabilities

    def predict_rows(
        self, rows: pd.DataFrame, images: np.ndarray | None, cases: pd.DataFrame | None, *, calibrated: bool = True
    ) -> np.ndarray:
        """:meth:`predict_proba` for per-image ``rows`` of a split (a ``case_id`` column) and their cached
        ``images`` in row order, each row's metadata looked up in ``cases`` by case_id; only the inputs
        this kind uses are passed."""
        case_rows = None
        if self.kind in METADATA_KINDS:
            if cases is None:
                raise ValueError(f"{self.kind} model needs `cases` (case metadata by case_id), got None")
            case_rows = rows[["case_id"]].merge(cases, on="case_id", how="left")
        return self.predict_proba(
            images=images if self.kind in KERAS_KINDS else None, cases=case_rows, calibrated=calibrated
        )

    def _predict_uncalibrated(self, images: np.ndarray | None, cases: pd.DataFrame | None) -> np.ndarray:
        if self.kind == "keras_image":
            x = self._check_images(images)
            n = len(x)
            raw = self.model.predict(x, verbose=0) if n else np.zeros((0, len(self.classes)))
        elif self.kind == "keras_multimodal":
            x = self._check_images(images)
            m = self.metadata_matrix(cases)
            if len(m) != len(x):
                raise ValueError(f"images and cases disagree on the number of rows: {len(x)} vs {len(m)}")
            n = len(x)
            raw = self.model.predict({"image": x, "metadata": m}, verbose=0) if n else np.zeros((0, len(self.classes)))
        else:
            m = self.metadata_matrix(cases)
            n = len(m)
            if n == 0:
                raw = np.zeros((0, len(self.classes)))
            else:
                # Match how the estimator was fitted: with feature names (a DataFrame) or without.
                if hasattr(self.model, "feature_names_in_"):
                    m = pd.DataFrame(m, columns=self.metadata_columns)
                raw = self.model.predict_proba(m)
        return _as_distribution(raw, n, self.classes)


def _as_distribution(raw, n: int, classes: list[str]) -> np.ndarray:
    probabilities = np.asarray(raw, dtype=np.float64)
    if probabilities.shape != (n, len(classes)):
        raise ValueError(
            f"model output has shape {probabilities.shape}, expected ({n}, {len(classes)}) for classes {classes}"
        )
    if n == 0:
        return probabilities
    if not np.isfinite(probabilities).all() or (probabilities < 0).any():
        raise ValueError("model output has negative or non-finite values: not class probabilities")
    sums = probabilities.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > SUM_TOLERANCE:
        raise ValueError(
            f"model output row {worst} sums to {sums[worst]:.4f}, not 1: the packaged model must "
            f"output one probability distribution over the classes (softmax), not per-class "
            f"scores"
        )
    return probabilities / sums[:, None]


def _calibration_from_spec(spec: dict, directory: Path) -> TemperatureScaling | None:
    stored = spec.get("calibration")
    if stored is None:
        return None
    try:
        return TemperatureScaling.from_dict(stored)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{directory / SPEC_FILE}: calibration is not readable: {exc}") from exc


def read_spec(directory: str | os.PathLike) -> dict:
    """The validated ``spec.json`` of a package folder (clear errors naming the file)."""
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {directory} is not a packaged classifier")
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(spec, dict) or spec.get("format") != PACKAGE_FORMAT:
        raise ValueError(f"{path}: not a {PACKAGE_FORMAT} spec")
    if spec.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise ValueError(
            f"{path}: format_version {spec.get('format_version')!r} is not supported "
            f"(this code reads {', '.join(map(str, READABLE_FORMAT_VERSIONS))})"
        )
    if spec.get("kind") not in KINDS:
        raise ValueError(f"{path}: kind must be one of {KINDS}, got {spec.get('kind')!r}")
    expected_file = KERAS_FILE if spec["kind"] in KERAS_KINDS else SKLEARN_FILE
    if spec.get("model_file") != expected_file:
        raise ValueError(
            f"{path}: model_file must be {expected_file!r} for kind {spec['kind']!r}, got {spec.get('model_file')!r}"
        )
    if not isinstance(spec.get("classes"), list) or not spec["classes"]:
        raise ValueError(f"{path}: classes must be a non-empty list")
    return spec


# -------------------------------------------------------------------- the MLflow pyfunc


def _image_bytes(value, row: int) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        # JSON requests (MLflow's scoring server) carry binary columns as base64 text.
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"row {row}: `{IMAGE_COLUMN}` is text but not base64: {exc}") from exc
    raise ValueError(f"row {row}: `{IMAGE_COLUMN}` must be the image file's bytes, got {type(value).__name__}")


def _is_missing(value) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


class ScinClassifierPyfunc(PythonModel):
    """MLflow pyfunc over a :class:`PackagedClassifier` stored as the model artifact ``package``.

    ``predict(df)``: column ``image`` holds each row's raw image file bytes (or base64 text); it may be
    absent for a metadata-only model. The other columns are case metadata (any subset of the raw case
    columns; absent ones read as unanswered). Returns one float column per class, rows summing to 1.
    """

    def load_context(self, context):
        self.package = PackagedClassifier.load(context.artifacts["package"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        package: PackagedClassifier = self.package
        if not isinstance(model_input, pd.DataFrame):
            raise ValueError(f"input must be a pandas DataFrame, got {type(model_input).__name__}")
        images = None
        if package.kind in KERAS_KINDS:
            assert package.image_size is not None  # __post_init__ requires it for the Keras kinds
            images = self._decode_images(model_input, package.image_size)
        cases = None
        if package.kind in METADATA_KINDS:
            cases = model_input.drop(columns=[IMAGE_COLUMN], errors="ignore")
        probabilities = package.predict_proba(images=images, cases=cases)
        return pd.DataFrame(probabilities, columns=package.classes, index=model_input.index)

    @staticmethod
    def _decode_images(frame: pd.DataFrame, image_size: int) -> np.ndarray:
        from scin_pipeline.core.image_cache import preprocess_image_bytes

        if IMAGE_COLUMN not in frame.columns:
            raise ValueError(f"this model needs an `{IMAGE_COLUMN}` column with each row's image file bytes")
        decoded = []
        for i, value in enumerate(frame[IMAGE_COLUMN].tolist()):
            if _is_missing(value):
                raise ValueError(f"row {i}: `{IMAGE_COLUMN}` is missing; this model needs an image per row")
            decoded.append(preprocess_image_bytes(_image_bytes(value, i), image_size, name=f"row {i}"))
        if not decoded:
            return np.zeros((0, image_size, image_size, 3), dtype=np.uint8)
        return np.stack(decoded)


def model_signature(kind: str, classes: list[str]):
    """Inputs: ``image`` (binary; required by the Keras kinds) and the optional questionnaire columns;
    outputs: one double per class (the module docstring says why every kind has the same inputs)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from scin_pipeline.core.metadata_model import QUESTIONNAIRE_CHOICE_COLUMNS, QUESTIONNAIRE_FLAG_COLUMNS

    inputs = Schema(
        [
            ColSpec("binary", IMAGE_COLUMN, required=kind in KERAS_KINDS),
            *[ColSpec("boolean", column, required=False) for column in QUESTIONNAIRE_FLAG_COLUMNS],
            *[ColSpec("string", column, required=False) for column in QUESTIONNAIRE_CHOICE_COLUMNS],
        ]
    )
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("double", c) for c in classes]))


def example_png(size: int = 64) -> bytes:
    """A SYNTHETIC picture for the input example: a skin-coloured square with a darker round patch."""
    import io

    import PIL.Image

    yy, xx = np.mgrid[0:size, 0:size]
    patch = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 4) ** 2
    pixels = np.empty((size, size, 3), np.uint8)
    pixels[:] = (224, 172, 140)
    pixels[patch] = (170, 90, 80)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def input_example() -> pd.DataFrame:
    """One request row: a SYNTHETIC picture and a few questionnaire answers (the rest unanswered)."""
    from scin_pipeline.core import schema
    from scin_pipeline.core.metadata_model import QUESTIONNAIRE_FLAG_COLUMNS

    itch = next(c for c in QUESTIONNAIRE_FLAG_COLUMNS if c.endswith("itching"))
    return pd.DataFrame(
        {
            IMAGE_COLUMN: [example_png()],
            itch: [True],
            "age_group": [schema.ENUM_VALUES["age_group"][1]],
            "sex_at_birth": [schema.ENUM_VALUES["sex_at_birth"][0]],
        }
    )


def log_packaged_model(
    package_dir: str | os.PathLike,
    *,
    name: str = "model",
    registered_model_name: str | None = None,
    tags: dict | None = None,
):
    """Log the package as a self-contained MLflow pyfunc model in the active run (code, pinned
    requirements, signature and input example: module docstring); returns MLflow's ``ModelInfo``.

    Uses the fluent API: call it inside an active run on the intended tracking URI (``MlflowTracking``'s
    ``TrackedRun.log_model`` does). ``registered_model_name`` registers it through MLflow's fluent registry.
    """
    import tempfile

    from scin_pipeline.core import model_environment

    package_dir = Path(package_dir).expanduser().resolve()
    spec = read_spec(package_dir)
    model_inputs = {}
    if spec["kind"] in KERAS_KINDS:
        model_inputs["image"] = "raw image file bytes (or base64 text), one per row"
    if spec["kind"] in METADATA_KINDS:
        model_inputs["case metadata"] = "optional questionnaire columns (see the signature); absent = unanswered"
    keras_backend = None
    if spec["kind"] in KERAS_KINDS:
        import keras

        keras_backend = keras.backend.backend()
    roots = [model_environment.PYFUNC_MODULE, *(spec.get("keras_modules") or [])]
    modules, third_party = model_environment.module_closure(roots)
    if spec["kind"] not in KERAS_KINDS:
        # The pyfunc imports Keras only on its Keras branch, which a scikit-learn model never takes: serving a
        # metadata-only model must not install Keras and a backend (TensorFlow alone is ~600 MB).
        third_party -= set(model_environment.KERAS_ONLY_MODULES)
    path_before = list(sys.path)
    with tempfile.TemporaryDirectory(prefix="scin-model-code-") as staging:
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=ScinClassifierPyfunc(),
            artifacts={"package": str(package_dir)},
            code_paths=[str(model_environment.stage_code(modules, Path(staging)))],
            signature=model_signature(spec["kind"], spec["classes"]),
            input_example=input_example(),
            pip_requirements=model_environment.pinned_requirements(third_party, keras_backend=keras_backend),
            registered_model_name=registered_model_name,
            metadata={
                "scin_model_kind": spec["kind"],
                "scin_classes": spec["classes"],
                "scin_image_size": spec.get("image_size"),
                "scin_inputs": model_inputs,
                "scin_code_modules": modules,
                "scin_calibration": spec.get("calibration"),
            },
            tags=tags,
        )
    # MLflow checks the input example by loading the model, which puts the model's code/ folder (a
    # temporary one, gone now) first on sys.path: logging a model must leave the process as it found it.
    sys.path[:] = [entry for entry in sys.path if entry in path_before]
    return info
