"""PackagedClassifier save/load/predict and the pyfunc wrapper, on tiny synthetic inputs (no real images)."""

from __future__ import annotations

import io
import threading
from types import SimpleNamespace

import numpy as np
import pandas as pd
import PIL.Image
import pytest
from sklearn.linear_model import LogisticRegression

from scin_pipeline.core import schema
from scin_pipeline.core.image_cache import ImagePreprocessError, preprocess_image_bytes
from scin_pipeline.core.metadata_model import METADATA_FEATURE_COLUMNS, metadata_features
from scin_pipeline.core.packaged_model import (
    SPEC_FILE,
    PackagedClassifier,
    ScinClassifierPyfunc,
    read_spec,
)

CLASSES = ["Eczema", "Psoriasis", "Urticaria"]
ITCH = schema.SYMPTOM_COLUMNS[0]


def synthetic_cases(n: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Synthetic case metadata whose class follows the age group and one symptom flag."""
    rng = np.random.default_rng(seed)
    ages = np.array(schema.ENUM_VALUES["age_group"][:3])
    age_index = rng.integers(0, 3, n)
    return pd.DataFrame(
        {
            "case_id": [f"synthetic-{i}" for i in range(n)],
            "age_group": ages[age_index],
            ITCH: age_index == 1,
            "sex_at_birth": rng.choice(["FEMALE", "MALE", None], n),
        }
    ), age_index


def fitted_metadata_package(n: int = 60) -> tuple[PackagedClassifier, pd.DataFrame]:
    cases, y = synthetic_cases(n)
    model = LogisticRegression(max_iter=500).fit(metadata_features(cases).to_numpy(), y)
    package = PackagedClassifier(
        kind="sklearn_metadata",
        classes=CLASSES,
        model=model,
        metadata_columns=list(METADATA_FEATURE_COLUMNS),
        extra={"note": "synthetic"},
    )
    return package, cases


def tiny_keras_image_model(image_size: int = 16, n_classes: int = 3, seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    image = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1 / 255.0)(image)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(n_classes, activation="softmax", dtype="float32")(x)
    return keras.Model(image, out)


def tiny_keras_multimodal_model(image_size: int = 16, n_features: int = len(METADATA_FEATURE_COLUMNS)):
    import keras

    keras.utils.set_random_seed(1)
    image = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    metadata = keras.Input((n_features,), name="metadata")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255.0)(image))
    x = keras.layers.Concatenate()([x, keras.layers.Dense(4)(metadata)])
    out = keras.layers.Dense(len(CLASSES), activation="softmax", dtype="float32")(x)
    return keras.Model({"image": image, "metadata": metadata}, out)


def synthetic_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def test_sklearn_metadata_package_round_trips_and_predicts_distributions(tmp_path):
    package, cases = fitted_metadata_package()
    before = package.predict_proba(cases=cases)
    folder = package.save(tmp_path / "pkg")
    assert sorted(p.name for p in folder.iterdir()) == ["model.joblib", SPEC_FILE]
    loaded = PackagedClassifier.load(folder)
    assert (loaded.kind, loaded.classes, loaded.extra) == ("sklearn_metadata", CLASSES, {"note": "synthetic"})
    after = loaded.predict_proba(cases=cases)
    assert after.shape == (len(cases), len(CLASSES))
    np.testing.assert_allclose(after, before)
    np.testing.assert_allclose(after.sum(axis=1), 1.0)
    # The synthetic signal is learnt: the argmax matches the class it was generated from on most rows.
    _, y = synthetic_cases(len(cases))
    assert (after.argmax(axis=1) == y).mean() > 0.9


def test_metadata_columns_absent_from_cases_read_as_unanswered():
    package, cases = fitted_metadata_package()
    only_age = package.predict_proba(cases=cases[["age_group"]])
    no_columns = package.predict_proba(cases=pd.DataFrame(index=range(2)))
    assert only_age.shape == (len(cases), 3) and no_columns.shape == (2, 3)
    np.testing.assert_allclose(no_columns[0], no_columns[1])


def test_save_replaces_an_existing_package_whole_and_leaves_no_temporary_folders(tmp_path):
    package, _ = fitted_metadata_package()
    target = tmp_path / "pkg"
    target.mkdir()
    (target / "stale.txt").write_text("from an older package")
    package.save(target)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_save_failure_keeps_the_previous_package(tmp_path):
    package, cases = fitted_metadata_package()
    package.save(tmp_path / "pkg")
    broken = PackagedClassifier(
        kind="sklearn_metadata",
        classes=CLASSES,
        model=package.model,
        metadata_columns=package.metadata_columns,
        extra={"not json": object()},
    )
    with pytest.raises(ValueError, match="not plain JSON"):
        broken.save(tmp_path / "pkg")
    np.testing.assert_allclose(
        PackagedClassifier.load(tmp_path / "pkg").predict_proba(cases=cases), package.predict_proba(cases=cases)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_missing_inputs_and_bad_shapes_are_clear_errors():
    package, cases = fitted_metadata_package()
    with pytest.raises(ValueError, match="needs `cases`"):
        package.predict_proba(images=synthetic_images(2))
    image_package = PackagedClassifier(kind="keras_image", classes=CLASSES, model=None, image_size=16)
    with pytest.raises(ValueError, match="needs `images`"):
        image_package.predict_proba(cases=cases)
    with pytest.raises(ValueError, match=r"shape \(N, 16, 16, 3\)"):
        image_package.predict_proba(images=synthetic_images(2, size=8))
    with pytest.raises(ValueError, match="uint8"):
        image_package.predict_proba(images=synthetic_images(2).astype(np.float32))
    multimodal = PackagedClassifier(
        kind="keras_multimodal",
        classes=CLASSES,
        model=None,
        image_size=16,
        metadata_columns=list(METADATA_FEATURE_COLUMNS),
    )
    with pytest.raises(ValueError, match="disagree on the number of rows: 2 vs 5"):
        multimodal.predict_proba(images=synthetic_images(2), cases=cases.head(5))


def test_invalid_package_definitions_are_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        PackagedClassifier(kind="torch", classes=CLASSES, model=None)
    with pytest.raises(ValueError, match="duplicates"):
        PackagedClassifier(kind="sklearn_metadata", classes=["a", "a"], model=None, metadata_columns=["x"])
    with pytest.raises(ValueError, match="image_size"):
        PackagedClassifier(kind="keras_image", classes=CLASSES, model=None)
    with pytest.raises(ValueError, match="metadata_columns"):
        PackagedClassifier(kind="sklearn_metadata", classes=CLASSES, model=None)


def test_output_that_is_not_a_distribution_is_refused():
    class PerClassScores:  # e.g. a multi-label model: each column its own sigmoid
        def predict_proba(self, X):
            return np.full((len(X), 3), 0.6)

    package = PackagedClassifier(
        kind="sklearn_metadata",
        classes=CLASSES,
        model=PerClassScores(),
        metadata_columns=list(METADATA_FEATURE_COLUMNS),
    )
    with pytest.raises(ValueError, match="row 0 sums to 1.8000"):
        package.predict_proba(cases=synthetic_cases(4)[0])

    class WrongWidth:
        def predict_proba(self, X):
            return np.full((len(X), 2), 0.5)

    package.model = WrongWidth()
    with pytest.raises(ValueError, match=r"shape \(4, 2\), expected \(4, 3\)"):
        package.predict_proba(cases=synthetic_cases(4)[0])


def test_package_trained_on_columns_the_code_no_longer_makes_fails_naming_them():
    package, cases = fitted_metadata_package()
    package.metadata_columns = package.metadata_columns[:-1] + ["retired_feature"]
    with pytest.raises(ValueError, match="retired_feature"):
        package.predict_proba(cases=cases)


class UnpicklableModel:
    """Has predict_proba, but a lock in it: joblib fails part-way through writing model.joblib."""

    def __init__(self, model):
        self.model, self.lock = model, threading.Lock()

    def predict_proba(self, features):
        return self.model.predict_proba(features)


def test_a_model_file_that_fails_mid_write_keeps_the_previous_package(tmp_path):
    package, cases = fitted_metadata_package()
    package.save(tmp_path / "pkg")
    broken = PackagedClassifier(
        kind="sklearn_metadata",
        classes=CLASSES,
        model=UnpicklableModel(package.model),
        metadata_columns=package.metadata_columns,
    )
    with pytest.raises(TypeError, match="pickle"):
        broken.save(tmp_path / "pkg")
    np.testing.assert_allclose(
        PackagedClassifier.load(tmp_path / "pkg").predict_proba(cases=cases), package.predict_proba(cases=cases)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_unreadable_specs_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a packaged classifier"):
        read_spec(tmp_path)
    (tmp_path / SPEC_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=f"{SPEC_FILE} is not readable JSON"):
        read_spec(tmp_path)
    package, _ = fitted_metadata_package()
    package.save(tmp_path / "pkg")
    (tmp_path / "pkg" / "model.joblib").unlink()
    with pytest.raises(FileNotFoundError, match="model.joblib"):
        PackagedClassifier.load(tmp_path / "pkg")


def test_keras_image_package_round_trips_and_the_pyfunc_decodes_png_bytes(tmp_path):
    package = PackagedClassifier(kind="keras_image", classes=CLASSES, model=tiny_keras_image_model(), image_size=16)
    # Synthetic 24 x 20 photos: the pyfunc crops and resizes them exactly as training's preprocessing does.
    photos = [np.random.default_rng(i).integers(0, 256, (24, 20, 3), dtype=np.uint8) for i in range(3)]
    uploads = [png_bytes(photo) for photo in photos]
    images = np.stack([preprocess_image_bytes(data, 16) for data in uploads])
    expected = package.predict_proba(images=images)
    folder = package.save(tmp_path / "pkg")
    assert (folder / "model.keras").is_file()

    pyfunc = ScinClassifierPyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={"package": str(folder)}))
    frame = pd.DataFrame({"image": uploads}, index=[10, 11, 12])
    predicted = pyfunc.predict(None, frame)
    assert list(predicted.columns) == CLASSES and list(predicted.index) == [10, 11, 12]
    np.testing.assert_allclose(predicted.to_numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(predicted.sum(axis=1), 1.0)

    with pytest.raises(ImagePreprocessError, match="row 1"):
        pyfunc.predict(None, pd.DataFrame({"image": [uploads[0], uploads[1][:40]]}))
    with pytest.raises(ValueError, match="row 0: `image` is missing"):
        pyfunc.predict(None, pd.DataFrame({"image": [None]}))
    with pytest.raises(ValueError, match="needs an `image` column"):
        pyfunc.predict(None, pd.DataFrame({"age_group": ["AGE_18_TO_29"]}))


def test_keras_multimodal_package_uses_images_and_case_metadata(tmp_path):
    package = PackagedClassifier(
        kind="keras_multimodal",
        classes=CLASSES,
        model=tiny_keras_multimodal_model(),
        image_size=16,
        metadata_columns=list(METADATA_FEATURE_COLUMNS),
    )
    cases, _ = synthetic_cases(4)
    images = synthetic_images(4)
    expected = package.predict_proba(images=images, cases=cases)
    loaded = PackagedClassifier.load(package.save(tmp_path / "pkg"))
    np.testing.assert_allclose(loaded.predict_proba(images=images, cases=cases), expected, rtol=1e-5, atol=1e-6)
    # The metadata branch is used: other answers give other probabilities for the same images.
    other = cases.assign(age_group="AGE_80_OR_ABOVE", **{ITCH: True})
    assert not np.allclose(loaded.predict_proba(images=images, cases=other), expected)

    pyfunc = ScinClassifierPyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={"package": str(tmp_path / "pkg")}))
    uploads = [png_bytes(image) for image in images]
    predicted = pyfunc.predict(None, cases.assign(image=uploads))
    np.testing.assert_allclose(predicted.to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_pyfunc_on_a_metadata_model_accepts_frames_without_an_image_column(tmp_path):
    package, cases = fitted_metadata_package()
    package.save(tmp_path / "pkg")
    pyfunc = ScinClassifierPyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={"package": str(tmp_path / "pkg")}))
    predicted = pyfunc.predict(None, cases.head(5))
    np.testing.assert_allclose(predicted.to_numpy(), package.predict_proba(cases=cases.head(5)))
    # An image column is ignored by a metadata-only model.
    with_images = pyfunc.predict(None, cases.head(5).assign(image=b"not looked at"))
    np.testing.assert_allclose(with_images.to_numpy(), predicted.to_numpy())


def test_the_package_stores_its_temperature_and_predict_proba_applies_it(tmp_path):
    from scin_pipeline.core.calibration import TemperatureScaling, scale_probabilities

    model = tiny_keras_image_model()
    images = synthetic_images(6)
    calibration = TemperatureScaling(temperature=2.5, fitted_rows=40, nll_before=1.2, nll_after=0.9)
    package = PackagedClassifier(
        kind="keras_image", classes=CLASSES, model=model, image_size=16, calibration=calibration
    )
    raw = package.predict_proba(images=images, calibrated=False)
    np.testing.assert_allclose(raw, PackagedClassifier("keras_image", CLASSES, model, 16).predict_proba(images=images))
    calibrated = package.predict_proba(images=images)
    np.testing.assert_allclose(calibrated, scale_probabilities(raw, 2.5))
    assert not np.allclose(calibrated, raw)
    assert (calibrated.argmax(axis=1) == raw.argmax(axis=1)).all()

    folder = package.save(tmp_path / "pkg")
    assert read_spec(folder)["calibration"]["temperature"] == 2.5
    loaded = PackagedClassifier.load(folder)
    assert loaded.calibration == calibration
    np.testing.assert_allclose(loaded.predict_proba(images=images), calibrated, rtol=1e-5, atol=1e-7)
    # The pyfunc (what `mlflow models serve` and the registry's users call) answers calibrated too.
    pyfunc = ScinClassifierPyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={"package": str(folder)}))
    predicted = pyfunc.predict(None, pd.DataFrame({"image": [png_bytes(image) for image in images]}))
    np.testing.assert_allclose(predicted.to_numpy(), calibrated, rtol=1e-5, atol=1e-6)


def test_a_format_1_package_without_calibration_loads_as_uncalibrated(tmp_path):
    import json

    package, cases = fitted_metadata_package()
    folder = package.save(tmp_path / "pkg")
    spec = json.loads((folder / SPEC_FILE).read_text())
    del spec["calibration"]
    (folder / SPEC_FILE).write_text(json.dumps({**spec, "format_version": 1}))
    loaded = PackagedClassifier.load(folder)
    assert loaded.calibration is None
    np.testing.assert_allclose(loaded.predict_proba(cases=cases), loaded.predict_proba(cases=cases, calibrated=False))
    (folder / SPEC_FILE).write_text(json.dumps({**spec, "format_version": 3}))
    with pytest.raises(ValueError, match="format_version 3 is not supported"):
        read_spec(folder)
    (folder / SPEC_FILE).write_text(json.dumps({**spec, "calibration": {"temperature": -1.0}}))
    with pytest.raises(ValueError, match="calibration is not readable"):
        PackagedClassifier.load(folder)
