"""core.models: input/output conventions, weights loading offline, composition, partial unfreezing."""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest

from scin_pipeline.core import models
from scin_pipeline.core.models import (
    EFFICIENTNETV2_B0,
    WeightsUnavailableError,
    build_backbone,
    build_baseline_cnn,
    build_classifier_head,
    build_multimodal_head,
    build_resnet50_backbone,
    compose_end_to_end,
    resolve_weights,
    unfreeze_top,
)

# keras' TensorFlow backend converts variables with np.array(x) (numpy 2 copy-keyword notice): not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZE = 32


def _images(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture
def bfloat16_policy():
    keras.config.set_dtype_policy("mixed_bfloat16")
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture(scope="module")
def backbone():
    keras.utils.set_random_seed(0)
    return build_resnet50_backbone(SIZE, weights=None)


@pytest.fixture(scope="module")
def efficientnet():
    keras.utils.set_random_seed(0)
    return build_backbone("efficientnetv2_b0", SIZE, weights=None)


def test_baseline_cnn_takes_uint8_images_and_outputs_float32_probabilities():
    model = build_baseline_cnn(num_classes=4, image_size=SIZE)
    assert model.input.dtype == "uint8" and model.input.name == "image"
    probabilities = model.predict(_images(5), verbose=0)
    assert probabilities.shape == (5, 4) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert [type(layer).__name__ for layer in model.layers[1:]] == [
        "Rescaling",
        "Conv2D",
        "MaxPooling2D",
        "Conv2D",
        "MaxPooling2D",
        "Flatten",
        "Dense",
        "Dropout",
        "Dense",
    ]


def test_baseline_cnn_rescales_inside_the_model():
    model = build_baseline_cnn(num_classes=2, image_size=SIZE)
    rescaled = keras.Model(model.input, model.get_layer("rescale").output)
    images = _images(2)
    np.testing.assert_allclose(rescaled.predict(images, verbose=0), images / 255.0, atol=1e-6)


def test_outputs_stay_float32_under_mixed_bfloat16(bfloat16_policy):
    cnn = build_baseline_cnn(num_classes=3, image_size=SIZE)
    assert cnn.predict(_images(2), verbose=0).dtype == np.float32
    assert cnn.get_layer("conv1").compute_dtype == "bfloat16"  # the policy did apply to the body
    backbone = build_resnet50_backbone(SIZE, weights=None)
    embeddings = backbone.predict(_images(2), verbose=0)
    assert embeddings.shape == (2, models.RESNET50_EMBEDDING_DIM) and embeddings.dtype == np.float32


def test_backbone_maps_uint8_images_to_pooled_float32_embeddings(backbone):
    assert backbone.input.dtype == "uint8" and backbone.input.name == "image"
    embeddings = backbone.predict(_images(3), verbose=0)
    assert embeddings.shape == (3, models.RESNET50_EMBEDDING_DIM) and embeddings.dtype == np.float32
    assert np.isfinite(embeddings).all()


def test_efficientnet_backbone_maps_uint8_images_to_pooled_float32_embeddings(efficientnet):
    assert efficientnet.input.dtype == "uint8" and efficientnet.input.name == "image"
    embeddings = efficientnet.predict(_images(3), verbose=0)
    assert embeddings.shape == (3, EFFICIENTNETV2_B0.embedding_dim) == (3, 48 + 112 + 1280)
    assert embeddings.dtype == np.float32 and np.isfinite(embeddings).all()
    # No Caffe preprocessing in front: the network's own rescaling is the first thing after the cast.
    names = [layer.name for layer in efficientnet.layers[:4]]
    assert names[1] == "to_float" and not any("subtract" in n or "preprocess" in n for n in names), names


def test_unknown_backbone_or_stage_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="one of resnet50, efficientnetv2_b0"):
        build_backbone("vgg16", SIZE, weights=None)
    with pytest.raises(ValueError, match="block3b_add"):
        build_backbone("efficientnetv2_b0", SIZE, weights=None, pooled_stages=("conv3_block4_out",))


def _plain_keras_resnet50_h5(tmp_path):
    """A keras ResNet50 (no top) with random weights saved in the legacy .h5 layout the ImageNet file uses."""
    keras.utils.set_random_seed(7)
    plain = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3), pooling="avg")
    path = tmp_path / models.RESNET50_NOTOP_FILE
    plain.save(str(path))  # legacy whole-model .h5: load_weights reads its model_weights group
    return plain, path


def test_imagenet_weights_are_loaded_and_preprocess_input_runs_inside(tmp_path, monkeypatch):
    plain, path = _plain_keras_resnet50_h5(tmp_path)
    requests = []

    def fake_get_file(fname, origin, **kwargs):
        requests.append((fname, origin))
        return str(path)

    monkeypatch.setattr(keras.utils, "get_file", fake_get_file)
    backbone = build_resnet50_backbone(SIZE, weights="imagenet")
    assert requests and requests[0][0] == models.RESNET50_NOTOP_FILE and requests[0][1].startswith("https://")
    images = _images(3, seed=1)
    expected = plain.predict(keras.applications.resnet50.preprocess_input(images.astype("float32")), verbose=0)
    # The last pooled stage (conv5, the classic 2048-d embedding) is the tail of ours.
    np.testing.assert_allclose(backbone.predict(images, verbose=0)[:, -2048:], expected, rtol=1e-4, atol=1e-4)


def test_efficientnet_imagenet_weights_load_and_its_own_rescaling_runs_inside(tmp_path, monkeypatch):
    """The no-top file keras would download, loaded into our backbone: the same features as keras' own network
    fed raw 0-255 floats (so nothing else rescales them), from raw uint8 images."""
    keras.utils.set_random_seed(7)
    plain = keras.applications.EfficientNetV2B0(
        include_top=False, weights=None, input_shape=(SIZE, SIZE, 3), pooling="avg"
    )
    path = tmp_path / EFFICIENTNETV2_B0.notop_file
    plain.save(str(path))  # legacy whole-model .h5, the layout of the ImageNet file
    requests = []

    def fake_get_file(fname, origin, **kwargs):
        requests.append((fname, origin, kwargs.get("file_hash")))
        return str(path)

    monkeypatch.setattr(keras.utils, "get_file", fake_get_file)
    backbone = build_backbone("efficientnetv2_b0", SIZE, weights="imagenet")
    fname, origin, file_hash = requests[0]
    assert fname == "efficientnetv2-b0_notop.h5" and origin.endswith("/efficientnet_v2/efficientnetv2-b0_notop.h5")
    assert file_hash  # keras' own hash, so a damaged download is refused
    images = _images(3, seed=1)
    expected = plain.predict(images.astype("float32"), verbose=0)
    # The top activation, pooled (the classic 1280-d embedding), is the tail of ours.
    np.testing.assert_allclose(backbone.predict(images, verbose=0)[:, -1280:], expected, rtol=1e-4, atol=1e-4)


def _offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.utils, "get_file", no_network)


def test_offline_imagenet_request_raises_a_clear_error(monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(WeightsUnavailableError) as error:
        build_resnet50_backbone(SIZE, weights="imagenet")
    message = str(error.value)
    assert models.RESNET50_NOTOP_FILE in message and "models" in message  # what to pre-seed, and where
    assert "weights: none" in message and "name resolution" in message  # the alternative, and the cause


def test_resolve_weights_falls_back_to_random_init_only_when_allowed(monkeypatch, caplog):
    _offline(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="scin_pipeline.core.models"):
        assert resolve_weights("imagenet", allow_fallback=True) is None
    assert "randomly initialised" in caplog.text
    with pytest.raises(WeightsUnavailableError):
        resolve_weights("imagenet", allow_fallback=False)
    assert resolve_weights("none", allow_fallback=False) is None
    assert resolve_weights(None, allow_fallback=False) is None
    with pytest.raises(ValueError, match="weights="):
        resolve_weights("imagenet21k", allow_fallback=True)


def test_offline_efficientnet_falls_back_or_fails_like_resnet(monkeypatch, caplog):
    _offline(monkeypatch)
    with pytest.raises(WeightsUnavailableError) as error:
        build_backbone("efficientnetv2_b0", SIZE, weights="imagenet")
    message = str(error.value)
    assert "EfficientNetV2-B0" in message and EFFICIENTNETV2_B0.notop_file in message and "weights: none" in message
    with caplog.at_level(logging.WARNING, logger="scin_pipeline.core.models"):
        assert resolve_weights("imagenet", allow_fallback=True, backbone="efficientnetv2_b0") is None
    assert "randomly initialised EfficientNetV2-B0" in caplog.text
    with pytest.raises(WeightsUnavailableError, match="EfficientNetV2-B0"):
        resolve_weights("imagenet", allow_fallback=False, backbone="efficientnetv2_b0")


def test_resolve_weights_keeps_imagenet_when_the_file_is_cached(monkeypatch, tmp_path):
    monkeypatch.setattr(keras.utils, "get_file", lambda *a, **k: str(tmp_path / "cached.h5"))
    assert resolve_weights("ImageNet", allow_fallback=False) == "imagenet"


def test_classifier_head_standardises_with_the_training_embeddings():
    rng = np.random.default_rng(0)
    train = rng.normal(loc=50.0, scale=[1.0, 100.0, 0.01, 5.0], size=(200, 4)).astype("float32")
    head = build_classifier_head(4, 3, dropout=0.2, normalize_with=train)
    assert head.input.name == "embedding"
    standardised = keras.Model(head.input, head.get_layer("embedding_standardise").output).predict(train, verbose=0)
    np.testing.assert_allclose(standardised.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(standardised.std(axis=0), 1.0, atol=1e-2)
    probabilities = head.predict(train[:5], verbose=0)
    assert probabilities.shape == (5, 3) and probabilities.dtype == np.float32
    assert build_classifier_head(4, 3).predict(train[:2], verbose=0).shape == (2, 3)


def test_multimodal_head_has_named_embedding_and_metadata_inputs():
    head = build_multimodal_head(16, 5, 4, metadata_units=8)
    assert sorted(t.name for t in head.inputs) == ["embedding", "metadata"]
    rng = np.random.default_rng(0)
    probabilities = head.predict(
        {
            "embedding": rng.normal(size=(3, 16)).astype("float32"),
            "metadata": rng.integers(0, 2, (3, 5)).astype("float32"),
        },
        verbose=0,
    )
    assert probabilities.shape == (3, 4) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_end_to_end_model_equals_head_of_backbone_and_survives_save_load(backbone, tmp_path):
    head = build_classifier_head(
        models.RESNET50_EMBEDDING_DIM,
        3,
        normalize_with=np.random.default_rng(1).normal(size=(50, models.RESNET50_EMBEDDING_DIM)),
    )
    model = compose_end_to_end(backbone, head, with_metadata=False)
    images = _images(4, seed=2)
    expected = head.predict(backbone.predict(images, verbose=0), verbose=0)
    probabilities = model.predict(images, verbose=0)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    model.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")  # safe_mode on: built-in layers only
    assert reloaded.input.dtype == "uint8"
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), probabilities, atol=1e-5)


def _tiny_backbone():
    """A small stand-in with the backbone's contract (uint8 "image" -> float32 embedding): keeps the
    composition tests fast; the ResNet50 one is saved and reloaded above."""
    image = keras.Input(shape=(SIZE, SIZE, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1 / 255)(image)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    return keras.Model(image, keras.layers.GlobalAveragePooling2D()(x), name="tiny_backbone")


def test_end_to_end_multimodal_model_takes_image_and_metadata(tmp_path):
    backbone = _tiny_backbone()
    model = compose_end_to_end(backbone, build_multimodal_head(8, 6, 3), with_metadata=True)
    inputs = {"image": _images(2), "metadata": np.zeros((2, 6), "float32")}
    probabilities = model.predict(inputs, verbose=0)
    assert probabilities.shape == (2, 3)
    model.save(tmp_path / "multimodal.keras")
    np.testing.assert_allclose(
        keras.models.load_model(tmp_path / "multimodal.keras").predict(inputs, verbose=0), probabilities, atol=1e-5
    )
    with pytest.raises(ValueError, match="no input named 'metadata'"):
        compose_end_to_end(backbone, build_classifier_head(8, 3), with_metadata=True)


def test_unfreeze_top_unfreezes_the_top_layers_but_never_batch_normalization():
    keras.utils.set_random_seed(0)
    backbone = build_resnet50_backbone(SIZE, weights=None)
    n = 40
    unfrozen = unfreeze_top(backbone, n)
    top, rest = backbone.layers[-n:], backbone.layers[:-n]
    top_bn = [layer for layer in top if isinstance(layer, keras.layers.BatchNormalization)]
    assert top_bn, "the top 40 layers of ResNet50 hold BatchNormalization layers"
    assert not any(layer.trainable for layer in top_bn)
    assert not any(layer.trainable for layer in rest)
    assert all(layer.trainable for layer in top if not isinstance(layer, keras.layers.BatchNormalization))
    assert unfrozen == len(top) - len(top_bn)
    trainable_paths = {v.path for v in backbone.trainable_weights}
    assert trainable_paths and all("_bn/" not in p for p in trainable_paths)
    assert any(p.startswith("conv5_block3_3_conv/") for p in trainable_paths)
    assert unfreeze_top(backbone, 0) == 0 and not backbone.trainable_weights


def test_unfreeze_top_of_efficientnet_never_unfreezes_batch_normalization(efficientnet):
    n = 30
    unfrozen = unfreeze_top(efficientnet, n)
    top = efficientnet.layers[-n:]
    top_bn = [layer for layer in top if isinstance(layer, keras.layers.BatchNormalization)]
    assert top_bn and not any(layer.trainable for layer in top_bn)
    assert unfrozen == len(top) - len(top_bn)
    trainable_paths = {v.path for v in efficientnet.trainable_weights}
    assert any(p.startswith("top_conv/") for p in trainable_paths)
    assert all("_bn/" not in p and not p.startswith("top_bn/") for p in trainable_paths)
    unfreeze_top(efficientnet, 0)
