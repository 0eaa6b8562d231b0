"""Backend-agnostic Keras 3 models: the baseline CNN, the pretrained backbones (ResNet50, EfficientNetV2-B0)
and the heads trained on them.

Conventions (docs: CONTRACTS.md, "Keras model conventions"):

- Images enter as ``uint8`` (S, S, 3) through an input named ``"image"``; the cast to float and each
  backbone's own preprocessing happen INSIDE the model, so a saved ``.keras`` file takes raw cache or
  upload pixels and training and serving cannot disagree on preprocessing. The preprocessing differs per
  backbone (:data:`BACKBONES`): ResNet50 wants Caffe-style input (``resnet50.preprocess_input``: RGB->BGR
  minus the ImageNet channel means, applied here), EfficientNetV2 carries its own rescaling layers and
  takes 0-255 floats as they come.
- The preprocessing runs in float32 even under ``mixed_bfloat16`` (bfloat16 keeps 8 bits of mantissa:
  ``x - 123.68`` would be rounded to ~0.5); the network body follows the global dtype policy.
- Heads on frozen embeddings take ``"embedding"`` (float32, D); the multimodal head also ``"metadata"``
  (float32, F, already carrying the ``__missing`` mask columns of ``metadata_model.metadata_features``).
- Every classifier ends in a float32 softmax, also under bfloat16, so probabilities sum to 1 in float32.
- ``compose_end_to_end`` joins a backbone and a head trained on its embeddings into one model on raw
  images (+ metadata), the single file that is saved and served.

Only built-in layers and ``keras.ops`` are used, so a saved model loads in any process with keras (no
custom-object registration, ``safe_mode`` stays on).

ImageNet weights: ``keras.applications`` download them themselves and fail with a bare URL error
offline; we fetch the same file with ``keras.utils.get_file`` first (same URL, hash and cache,
``~/.keras/models`` or ``$KERAS_HOME/models``), so an offline run gets ``WeightsUnavailableError`` saying
what failed and how to pre-seed the file or choose ``weights: none``. ``resolve_weights`` turns that
into a logged fallback to random initialisation where a config allows it. Same rule for every backbone.

keras is imported inside functions (the backend is chosen at keras import time, see core.backend).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    """One pretrained backbone: which keras.applications network, which of its stages are pooled into the
    embedding, how its input is preprocessed, and where keras keeps its no-top ImageNet weights."""

    name: str  # the key in BACKBONES, in asset names, cache folders and MLflow params
    label: str  # as people write it
    application: str  # the keras.applications constructor
    weights_module: str  # keras.src.applications module holding BASE_WEIGHTS_PATH and WEIGHTS_HASHES
    weights_hash_key: str  # its WEIGHTS_HASHES key (no-top hash: the second entry)
    notop_file: str  # the no-top weights file keras caches under ~/.keras/models
    caffe_preprocessing: bool  # True: apply resnet50.preprocess_input here; False: the network rescales itself
    stage_channels: dict[str, int]  # every stage that may be pooled, with its channel count
    pooled_stages: tuple[str, ...]  # the default embedding: these stages, global-average-pooled, concatenated

    @property
    def embedding_dim(self) -> int:
        return sum(self.stage_channels[stage] for stage in self.pooled_stages)


# Pooled stages. Skin lesions are largely texture and colour: mid-level features transfer across domains
# better than the last, most ImageNet-specific block, and with random weights (offline) they are the only
# ones that carry signal. ResNet50, measured on the 600-case synthetic mirror at 64 px, logistic probe on
# random-init features, val balanced accuracy: conv3 0.67, conv4 0.48, conv5 0.38. EfficientNetV2-B0 takes
# the same strides (8, 16, 32): block3b, block5e (the last of stride 16) and the top activation.
RESNET50 = BackboneSpec(
    name="resnet50",
    label="ResNet50",
    application="ResNet50",
    weights_module="resnet",
    weights_hash_key="resnet50",
    notop_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    caffe_preprocessing=True,
    stage_channels={
        "conv2_block3_out": 256,
        "conv3_block4_out": 512,
        "conv4_block6_out": 1024,
        "conv5_block3_out": 2048,
    },
    pooled_stages=("conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
)
EFFICIENTNETV2_B0 = BackboneSpec(
    name="efficientnetv2_b0",
    label="EfficientNetV2-B0",
    application="EfficientNetV2B0",
    weights_module="efficientnet_v2",
    weights_hash_key="b0",
    notop_file="efficientnetv2-b0_notop.h5",
    caffe_preprocessing=False,
    stage_channels={
        "block2b_add": 32,
        "block3b_add": 48,
        "block4c_add": 96,
        "block5e_add": 112,
        "top_activation": 1280,
    },
    pooled_stages=("block3b_add", "block5e_add", "top_activation"),
)
BACKBONES = {spec.name: spec for spec in (RESNET50, EFFICIENTNETV2_B0)}

POOLED_STAGES = RESNET50.pooled_stages
STAGE_CHANNELS = RESNET50.stage_channels
RESNET50_EMBEDDING_DIM = RESNET50.embedding_dim  # 512 + 1024 + 2048
RESNET50_NOTOP_FILE = RESNET50.notop_file


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}: one of {', '.join(BACKBONES)}") from None


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were requested but cannot be obtained (offline, no pre-seeded cache)."""


def _keras_models_dir() -> str:
    # keras.utils.get_file caches under $KERAS_HOME (default ~/.keras), subdirectory "models".
    return os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser(os.path.join("~", ".keras"))), "models")


def _normalise_weights(weights: str | None) -> str | None:
    if weights is None or str(weights).strip().lower() in ("", "none", "random"):
        return None
    if str(weights).strip().lower() == "imagenet":
        return "imagenet"
    if os.path.isfile(str(weights)):
        return str(weights)
    raise ValueError(f"weights={weights!r}: use 'imagenet', None ('none') or the path of a weights file")


def imagenet_weights_file(backbone: str = RESNET50.name) -> str:
    """Local path of a backbone's no-top ImageNet weights, downloading them once if needed.

    Raises ``WeightsUnavailableError`` when they are neither cached nor downloadable.
    """
    import importlib

    import keras

    spec = backbone_spec(backbone)
    # The URL and hash keras itself uses, so the file lands where keras.applications would look for it.
    source = importlib.import_module(f"keras.src.applications.{spec.weights_module}")
    origin = source.BASE_WEIGHTS_PATH + spec.notop_file
    try:
        return keras.utils.get_file(
            spec.notop_file, origin, cache_subdir="models", file_hash=source.WEIGHTS_HASHES[spec.weights_hash_key][1]
        )
    except Exception as exc:  # get_file raises bare Exception subclasses for network and hash failures
        raise WeightsUnavailableError(
            f"{spec.label} ImageNet weights are not cached and could not be downloaded from {origin} "
            f"({type(exc).__name__}: {exc}). Offline? Copy {spec.notop_file} from a machine with "
            f"internet into {_keras_models_dir()} (the Keras cache; $KERAS_HOME moves it), or set the "
            "training config to weights: none (random initialisation; far weaker features)."
        ) from exc


def resolve_weights(requested: str | None, allow_fallback: bool, backbone: str = RESNET50.name) -> str | None:
    """``"imagenet"`` (weights now cached), a weights-file path, or None (random init).

    When ImageNet weights cannot be obtained: returns None with a logged warning if ``allow_fallback``,
    else raises ``WeightsUnavailableError``.
    """
    weights = _normalise_weights(requested)
    if weights != "imagenet":
        return weights
    try:
        imagenet_weights_file(backbone)
    except WeightsUnavailableError as exc:
        if not allow_fallback:
            raise
        logger.warning("falling back to randomly initialised %s weights: %s", backbone_spec(backbone).label, exc)
        return None
    return "imagenet"


def _image_input(image_size: int):
    import keras

    return keras.Input(shape=(image_size, image_size, 3), dtype="uint8", name="image")


def _float_softmax(num_classes: int, name: str = "probabilities"):
    import keras

    return keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name=name)


def build_baseline_cnn(num_classes: int, image_size: int):
    """The student notebooks' small CNN, kept as the baseline to beat (uint8 "image" -> softmax)."""
    import keras
    from keras import layers

    image = _image_input(image_size)
    x = layers.Rescaling(1.0 / 255, name="rescale")(image)
    x = layers.Conv2D(32, 3, activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(name="pool1")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, activation="relu", name="dense")(x)
    x = layers.Dropout(0.5, name="dropout")(x)
    return keras.Model(image, _float_softmax(num_classes)(x), name="baseline_cnn")


def build_backbone(
    backbone: str,
    image_size: int,
    weights: str | None = "imagenet",
    *,
    pooled_stages: tuple[str, ...] | None = None,
):
    """A pretrained network without top: uint8 "image" (S,S,3) -> the global-average-pooled outputs of
    ``pooled_stages`` (default: the spec's) concatenated, float32.

    ``backbone``: a key of :data:`BACKBONES`. ``weights``: "imagenet", None / "none" (random init) or a
    weights-file path. The layers form one flat model (preprocessing included), so ``unfreeze_top`` counts
    from the real top of the network.
    """
    import keras
    from keras import layers

    spec = backbone_spec(backbone)
    pooled_stages = tuple(pooled_stages or spec.pooled_stages)
    unknown = set(pooled_stages) - set(spec.stage_channels)
    if not pooled_stages or unknown:
        raise ValueError(
            f"pooled_stages must be a non-empty subset of {sorted(spec.stage_channels)}, got {pooled_stages}"
        )
    weights = _normalise_weights(weights)
    weights_path = imagenet_weights_file(spec.name) if weights == "imagenet" else weights
    image = _image_input(image_size)
    # Rescaling(1.0) is the built-in cast uint8 -> float; float32 so preprocessing is exact (see module doc).
    x = layers.Rescaling(1.0, dtype="float32", name="to_float")(image)
    if spec.caffe_preprocessing:
        x = keras.applications.resnet50.preprocess_input(x)  # RGB -> BGR, minus the ImageNet channel means
    # weights=None here and the file loaded below: keras would download it itself, with a bare URL error.
    network = getattr(keras.applications, spec.application)(include_top=False, weights=None, input_tensor=x)
    pooled = [
        layers.GlobalAveragePooling2D(name=f"pool_{stage}")(network.get_layer(stage).output) for stage in pooled_stages
    ]
    joined = pooled[0] if len(pooled) == 1 else layers.Concatenate(name="pooled_stages")(pooled)
    # float32 embeddings under any policy: they are cached, compared and fed to float32 heads.
    embedding = layers.Activation("linear", dtype="float32", name="embedding")(joined)
    model = keras.Model(image, embedding, name=f"{spec.name}_backbone")
    if weights_path is not None:
        # The keras .h5 files are matched layer by layer among layers that hold weights; our extra
        # preprocessing and pooling layers hold none.
        model.load_weights(weights_path)
    return model


def build_resnet50_backbone(
    image_size: int, weights: str | None = "imagenet", *, pooled_stages: tuple[str, ...] = POOLED_STAGES
):
    """:func:`build_backbone` for ResNet50 (3,584-d by default; ``("conv5_block3_out",)`` gives the classic
    2048-d)."""
    return build_backbone(RESNET50.name, image_size, weights, pooled_stages=pooled_stages)


def _standardiser(data, name: str):
    """A Normalization layer fitted on ``data`` (its mean/variance are saved in the model), or None."""
    import keras

    if data is None:
        return None
    data = np.asarray(data, dtype=np.float32)
    layer = keras.layers.Normalization(axis=-1, name=name)
    layer.adapt(data)
    return layer


def build_classifier_head(embedding_dim: int, num_classes: int, dropout: float = 0.3, *, normalize_with=None):
    """Linear softmax probe on a frozen embedding: "embedding" (D,) -> [standardise] -> dropout -> softmax.

    ``normalize_with``: the training embeddings (N, D); when given, a Normalization layer adapted on them
    standardises each dimension first. Pooled ResNet features differ in scale by orders of magnitude
    between dimensions (random-init ones even more), and a linear probe trained with Adam for a few
    epochs learns far faster on standardised inputs (measured on the planted-pattern test set: balanced
    accuracy 0.75 -> 0.91 at 64 px with a random-init backbone).
    """
    import keras
    from keras import layers

    embedding = keras.Input(shape=(embedding_dim,), dtype="float32", name="embedding")
    x = embedding
    standardise = _standardiser(normalize_with, "embedding_standardise")
    if standardise is not None:
        x = standardise(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    return keras.Model(embedding, _float_softmax(num_classes)(x), name="classifier_head")


def questionnaire_dropout(metadata, rate: float, blank, name: str = "questionnaire_dropout"):
    """Modality dropout on a metadata tensor (N, F): while training, each row is replaced whole by ``blank``
    (the blank form's feature vector, ``metadata_model.blank_questionnaire_features``) with probability
    ``rate``; at inference it is the identity.

    Built from a Dropout layer on a column of ones (training: 0 or 1 / (1 - rate); inference: 1), clipped
    to a 0/1 keep flag, and ``keras.ops``: built-in pieces only, so the saved model needs no custom object.
    Kept rows pass unscaled (unlike Dropout's own outputs): the answers a model sees in training are those
    it sees when serving.
    """
    from keras import layers, ops

    blank = np.asarray(blank, dtype=np.float32)
    if blank.shape != (metadata.shape[-1],):
        raise ValueError(f"blank must be one metadata row of {metadata.shape[-1]} features, got shape {blank.shape}")
    ones = ops.ones_like(metadata[:, :1])
    keep = ops.minimum(layers.Dropout(rate, dtype="float32", name=name)(ones), 1.0)
    return ops.add(ops.multiply(keep, ops.subtract(metadata, blank)), blank)


def build_multimodal_head(
    embedding_dim: int,
    n_metadata: int,
    num_classes: int,
    *,
    metadata_units: int = 32,
    dropout: float = 0.3,
    normalize_with=None,
    normalize_metadata_with=None,
    questionnaire_dropout_rate: float = 0.0,
    blank_metadata=None,
):
    """Image embedding + case metadata -> softmax.

    The metadata (F,) already carries missing-value mask columns, so a missing answer is a feature, not a
    zero that looks like a real value. A small Dense branch lifts it before it is concatenated with the
    (much wider) embedding. ``normalize_with`` / ``normalize_metadata_with``: training arrays to
    standardise each input with (see ``build_classifier_head``).

    ``questionnaire_dropout_rate`` > 0 (with ``blank_metadata``, the blank form's vector): modality dropout
    (``questionnaire_dropout``) before the standardisation, which is then adapted on the training metadata
    plus that share of blank rows, so that a blank form is an ordinary input, not one many standard
    deviations out.
    """
    import keras
    from keras import layers

    embedding = keras.Input(shape=(embedding_dim,), dtype="float32", name="embedding")
    metadata = keras.Input(shape=(n_metadata,), dtype="float32", name="metadata")
    e, m = embedding, metadata
    standardise = _standardiser(normalize_with, "embedding_standardise")
    if standardise is not None:
        e = standardise(e)
    if questionnaire_dropout_rate > 0:
        if blank_metadata is None:
            raise ValueError("questionnaire_dropout_rate > 0 needs blank_metadata (the blank form's features)")
        m = questionnaire_dropout(m, questionnaire_dropout_rate, blank_metadata)
        if normalize_metadata_with is not None:
            answered = np.asarray(normalize_metadata_with, dtype=np.float32)
            n_blank = int(round(len(answered) * questionnaire_dropout_rate / (1 - questionnaire_dropout_rate)))
            blanks = np.repeat(np.asarray(blank_metadata, dtype=np.float32)[None], n_blank, axis=0)
            normalize_metadata_with = np.concatenate([answered, blanks])
    standardise = _standardiser(normalize_metadata_with, "metadata_standardise")
    if standardise is not None:
        m = standardise(m)
    m = layers.Dense(metadata_units, activation="relu", name="metadata_dense")(m)
    x = layers.Concatenate(name="fuse")([e, m])
    x = layers.Dropout(dropout, name="head_dropout")(x)
    return keras.Model(
        {"embedding": embedding, "metadata": metadata}, _float_softmax(num_classes)(x), name="multimodal_head"
    )


def _input_named(model, name: str):
    for tensor in model.inputs:
        if tensor.name == name:
            return tensor
    raise ValueError(f"model {model.name!r} has no input named {name!r} (inputs: {[t.name for t in model.inputs]})")


def compose_end_to_end(backbone, head, *, with_metadata: bool):
    """One model on raw uint8 "image" (+ "metadata"): backbone -> head. This is the file to save."""
    import keras

    image_shape = tuple(_input_named(backbone, "image").shape[1:])
    image = keras.Input(shape=image_shape, dtype="uint8", name="image")
    embedding = backbone(image)
    if with_metadata:
        n_metadata = _input_named(head, "metadata").shape[-1]
        metadata = keras.Input(shape=(n_metadata,), dtype="float32", name="metadata")
        probabilities = head({"embedding": embedding, "metadata": metadata})
        inputs = {"image": image, "metadata": metadata}
    else:
        _input_named(head, "embedding")
        probabilities = head(embedding)
        inputs = image
    return keras.Model(inputs, probabilities, name=f"{backbone.name}__{head.name}")


def unfreeze_top(backbone, n_layers: int) -> int:
    """Make the top ``n_layers`` of ``backbone.layers`` trainable, all others frozen; returns how many
    layers became trainable.

    BatchNormalization layers stay frozen everywhere: a frozen Keras 3 BN layer runs in inference mode,
    so fine-tuning on small (and, for SCIN, skewed) batches neither overwrites the ImageNet moving
    statistics nor normalises with noisy batch statistics, which is what wrecks the pretrained features
    (Keras transfer-learning guide). Recompile the model after calling this.
    """
    from keras import layers

    if n_layers < 0:
        raise ValueError(f"n_layers must be >= 0, got {n_layers}")
    backbone.trainable = True  # the setter recurses, so set the model first, then each layer
    all_layers = backbone.layers
    top = set(id(layer) for layer in all_layers[len(all_layers) - n_layers :]) if n_layers else set()
    unfrozen = 0
    for layer in all_layers:
        trainable = id(layer) in top and not isinstance(layer, layers.BatchNormalization)
        layer.trainable = trainable
        unfrozen += int(trainable)
    return unfrozen
