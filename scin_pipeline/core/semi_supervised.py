"""FixMatch-style semi-supervised training of the image classifier: the labelled train images plus the
unlabelled pool's, with consistency between a weak and a strong GEOMETRY-ONLY view of each unlabelled image.

FixMatch (Sohn et al., 2020), per training step: the labelled batch gets the usual cross-entropy on weakly
augmented images; for ``ratio`` x as many unlabelled images, the model's prediction on a weak view is the
pseudo-label (no gradient flows through it), kept only where its top probability reaches ``threshold``, and
the model is trained to predict that label on a strong view of the same image, weighted by
``unlabelled_weight``. Pseudo-labels come from the current weights at every step (in the graph: the
``FixMatchConsistency`` layer adds that loss), not from an earlier epoch's model.

**Augmentation is geometry-only, weak and strong.** Colour, brightness, contrast, hue, saturation and
RandAugment's colour operations (FixMatch's strong augmentation) are deliberately left out: skin tone is the
attribute the fairness report and gate are measured on, and colour jitter would move an image between Monk
tones and teach the model that tone is noise. Cutout (grey patches) is left out too: it paints pixels that
are not skin. Weak: ``core.image_cache.augment_batch`` (flips, quarter turns, 85-100 % crops, as supervised
training). Strong (:func:`strong_augment_batch`): flip, rotation by any angle, zoom to 50-85 % of the side,
shear up to 15 degrees and an off-centre shift, in one affine warp with reflected borders; pixels are only
resampled (bilinear), never recoloured.

Two modes, as ``resnet50_transfer``:

- **head on frozen embeddings** (CPU default): the weak and strong views of every train and pool image are
  embedded once with the saved frozen backbone (:func:`embed_views`; view 0 of the weak views is the plain
  image, i.e. its ``image_embeddings`` row), and the head is trained on views drawn from them
  (:func:`train_fixmatch_head_on_embeddings`). Cost: one backbone pass per extra view and image.
- **fine-tuning** (a GPU host): the views are drawn on the fly from the uint8 cache and the whole model is
  trained end to end, first with the backbone frozen, then with its top layers unfrozen at a lower learning
  rate (BatchNormalization frozen), keeping the fine-tuned weights only if they beat the frozen phase
  (:func:`fine_tune_fixmatch`, the same phases as ``core.training.fine_tune_transfer``).

Both go through ``core.training.fit_classifier`` (macro metrics on validation, early stopping, resumable
checkpoints); the epoch logs add ``pseudo_label_rate``, the share of (a sample of) the pool whose weak view
clears the threshold. keras is imported inside functions (the backend is chosen at keras import time).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from scin_pipeline.core.image_cache import augment_batch
from scin_pipeline.core.training import (
    TrainConfig,
    TrainResult,
    TransferResult,
    _class_weights_for,
    fit_classifier,
    frozen_then_fine_tuned,
    predict_in_batches,
)

STRONG_MIN_CROP_FRACTION = 0.5
STRONG_MAX_CROP_FRACTION = 0.85
STRONG_MAX_SHEAR_DEGREES = 15.0
RATE_SAMPLE = 1024  # pool images on which the per-epoch pseudo-label rate is measured


@dataclass(frozen=True)
class FixMatchConfig:
    """The semi-supervised knobs (the supervised ones are core.training.TrainConfig's).

    threshold          a weak view's top probability must reach this for its pseudo-label to count (FixMatch: 0.95)
    unlabelled_weight  weight of the consistency loss against the supervised one (FixMatch's lambda_u: 1)
    ratio              unlabelled images per labelled image in a step (FixMatch's mu: 7)
    weak_views         embedded weak views per image (head mode): 1 = the plain image only
    strong_views       embedded strong views per pool image (head mode)
    """

    threshold: float = 0.95
    unlabelled_weight: float = 1.0
    ratio: int = 7
    weak_views: int = 1
    strong_views: int = 2

    def __post_init__(self):
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.unlabelled_weight < 0:
            raise ValueError(f"unlabelled_weight must be >= 0, got {self.unlabelled_weight}")
        for name in ("ratio", "weak_views", "strong_views"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# ------------------------------------------------------------------------------------------ augmentation


def weak_augment_batch(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The weak view: supervised training's geometry-only augmentation (flips, quarter turns, 85-100 % crops)."""
    return augment_batch(batch, rng)


def strong_augment_batch(
    batch: np.ndarray,
    rng: np.random.Generator,
    *,
    min_crop_fraction: float = STRONG_MIN_CROP_FRACTION,
    max_crop_fraction: float = STRONG_MAX_CROP_FRACTION,
    max_shear_degrees: float = STRONG_MAX_SHEAR_DEGREES,
) -> np.ndarray:
    """The strong view of a uint8 (B, S, S, 3) batch: geometry only (see the module docstring).

    Per image, one affine warp: a horizontal flip (p = 0.5), a rotation by an angle drawn from [0, 360), a
    zoom showing a ``min_crop_fraction``-``max_crop_fraction`` share of the side, a shear of up to
    ``max_shear_degrees`` and a shift of the centre within what the zoom leaves; borders reflected (no
    black corners, which would read as dark skin). NEVER a colour, brightness or contrast change: skin tone
    is the fairness attribute. Every random number is drawn for every image, so the stream stays aligned."""
    if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[3] != 3:
        desc = f"{batch.shape} {batch.dtype}" if isinstance(batch, np.ndarray) else type(batch).__name__
        raise ValueError(f"strong_augment_batch expects a uint8 (B, S, S, 3) array, got {desc}")
    if batch.shape[1] != batch.shape[2]:
        raise ValueError(f"strong_augment_batch expects square images, got {batch.shape[1]}x{batch.shape[2]}")
    if not 0 < min_crop_fraction <= max_crop_fraction <= 1:
        raise ValueError(
            f"need 0 < min_crop_fraction <= max_crop_fraction <= 1, got {min_crop_fraction}, {max_crop_fraction}"
        )
    size = batch.shape[1]
    centre = (size - 1) / 2.0
    out = np.empty_like(batch)
    for i in range(len(batch)):
        flip = rng.random() < 0.5
        angle = rng.uniform(0.0, 360.0)
        fraction = rng.uniform(min_crop_fraction, max_crop_fraction)
        shear = np.tan(np.radians(rng.uniform(-max_shear_degrees, max_shear_degrees)))
        shift = rng.uniform(-1.0, 1.0, 2) * (1.0 - fraction) * size / 2.0
        # Output pixel -> source pixel: about the centre, undo the zoom (scale by the fraction shown), shear,
        # rotate, then move to the shifted centre of the source; flip last (a mirror of the source).
        cos, sin = np.cos(np.radians(angle)), np.sin(np.radians(angle))
        rotate = np.array([[cos, -sin], [sin, cos]])
        linear = rotate @ np.array([[1.0, shear], [0.0, 1.0]]) * fraction
        offset = np.array([centre, centre]) + shift - linear @ np.array([centre, centre])
        matrix = np.hstack([linear, offset[:, None]])
        if flip:
            matrix = np.array([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0]]) @ np.vstack([matrix, [0.0, 0.0, 1.0]])
        cv2.warpAffine(
            np.ascontiguousarray(batch[i]),
            matrix,
            (size, size),
            dst=out[i],
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REFLECT_101,
        )
    return out


def embed_views(
    backbone,
    images: np.ndarray,
    n_views: int,
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray],
    *,
    seed: int,
    plain: np.ndarray | None = None,
    plain_first: bool = False,
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(n_views, N, D) float32 embeddings of ``n_views`` views of uint8 ``images`` by the frozen ``backbone``.

    With ``plain_first``, view 0 is the image itself: ``plain`` (its embeddings, e.g. ``image_embeddings``
    rows, so nothing is recomputed) when given, else the backbone's pass over the plain image. The other views
    are ``augment(chunk, rng)`` with rng seeded by (seed, view, chunk): reproducible, chunk by chunk so no
    augmented copy of every image is held at once."""
    n = len(images)
    if n == 0:
        raise ValueError("no images to embed")
    views: list[np.ndarray] = []
    for v in range(n_views):
        if v == 0 and plain_first and plain is not None:
            if len(plain) != n:
                raise ValueError(f"plain embeddings have {len(plain)} rows for {n} images")
            views.append(np.asarray(plain, dtype=np.float32))
            continue
        parts = []
        for start in range(0, n, batch_size * 4):
            chunk = np.asarray(images[start : start + batch_size * 4])
            if not (v == 0 and plain_first):
                chunk = augment(chunk, np.random.default_rng([seed, v, start]))
            parts.append(predict_in_batches(backbone, chunk, batch_size))
            if on_batch is not None:
                on_batch(len(chunk))
        views.append(np.concatenate(parts))
    return np.stack(views)


# ------------------------------------------------------------------------------------------ batches


class ViewSource(Protocol):
    def __len__(self) -> int: ...

    def take(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray: ...


@dataclass
class PrecomputedViews:
    """Embedded views (V, N, D): each row's view drawn at random per batch."""

    views: np.ndarray

    def __post_init__(self):
        if self.views.ndim != 3:
            raise ValueError(f"views must be (V, N, D), got shape {self.views.shape}")

    def __len__(self) -> int:
        return int(self.views.shape[1])

    def take(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        chosen = rng.integers(0, self.views.shape[0], len(rows))
        return np.asarray(self.views[chosen, rows], dtype=np.float32)


@dataclass
class AugmentedImages:
    """uint8 images (N, S, S, 3), augmented per batch (``augment`` None: as they are)."""

    images: np.ndarray
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None

    def __len__(self) -> int:
        return len(self.images)

    def take(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        batch = np.asarray(self.images[np.sort(rows)])[np.argsort(np.argsort(rows))]  # sorted reads, row order
        return self.augment(batch, rng) if self.augment is not None else batch


@functools.cache
def _fixmatch_sequence_class() -> type:
    import keras

    class FixMatchSequence(keras.utils.PyDataset):
        """Steps of FixMatch: ({"labelled": B views, "weak": ratio*B weak views, "strong": the strong views
        of the same ratio*B pool images}, the B labels).

        An epoch is one pass over the labelled images (shuffled); the pool is cycled through in its own
        shuffled order, ``ratio`` images per labelled one. Every draw is a pure function of (seed, epoch,
        step): batches are reproducible in any order Keras asks for them, and ``set_epoch`` continues the
        stream on resume. Runs in the training thread (workers=1): the views are cheap to draw."""

        def __init__(
            self,
            labelled: ViewSource,
            y: np.ndarray,
            weak: ViewSource,
            strong: ViewSource,
            *,
            batch_size: int,
            ratio: int,
            seed: int,
        ):
            super().__init__(workers=1, use_multiprocessing=False)
            y = np.asarray(y)
            if y.ndim != 1 or len(y) != len(labelled):
                raise ValueError(f"FixMatchSequence: {len(labelled)} labelled rows, y has shape {y.shape}")
            if len(weak) != len(strong):
                raise ValueError(f"FixMatchSequence: {len(weak)} weak and {len(strong)} strong pool rows")
            if len(weak) == 0 or len(labelled) == 0:
                raise ValueError("FixMatchSequence needs labelled and unlabelled rows")
            self.labelled, self.y, self.weak, self.strong = labelled, y.astype(np.int32), weak, strong
            self.batch_size, self.ratio, self.seed = int(batch_size), int(ratio), int(seed)
            self.set_epoch(0)

        def __len__(self) -> int:
            return math.ceil(len(self.labelled) / self.batch_size)

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = rng.permutation(len(self.labelled))
            needed = len(self) * self.batch_size * self.ratio
            n_pool = len(self.weak)
            self._pool_order = np.concatenate([rng.permutation(n_pool) for _ in range(-(-needed // n_pool))])

        def __getitem__(self, index: int):
            if not 0 <= index < len(self):
                raise IndexError(f"batch {index} out of range (0..{len(self) - 1})")
            rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
            width = self.batch_size * self.ratio
            pool_rows = self._pool_order[index * width : (index + 1) * width]
            rng = np.random.default_rng([self.seed, self.epoch, index])
            inputs = {
                "labelled": self.labelled.take(rows, rng),
                "weak": self.weak.take(pool_rows, rng),
                "strong": self.strong.take(pool_rows, rng),
            }
            return inputs, self.y[rows]

        def on_epoch_end(self) -> None:
            self.set_epoch(self.epoch + 1)

    FixMatchSequence.__module__ = __name__
    return FixMatchSequence


def fixmatch_sequence(labelled, y, weak, strong, *, batch_size: int, ratio: int, seed: int):
    """A ``FixMatchSequence`` (a keras PyDataset, so the class is built on first use)."""
    return _fixmatch_sequence_class()(labelled, y, weak, strong, batch_size=batch_size, ratio=ratio, seed=seed)


# ------------------------------------------------------------------------------------------ the model


def consistency_loss(p_weak, p_strong, threshold: float, weight: float, class_weights):
    """FixMatch's unlabelled loss (keras ops, any backend): mean over the pool rows of
    weight * class_weight[pseudo] * 1[max p_weak >= threshold] * cross-entropy(pseudo, p_strong), where
    pseudo = argmax p_weak; no gradient through p_weak. ``class_weights`` (K,): the labelled loss's class
    weights, so pseudo-labels of a frequent class count no more than its labels do."""
    from keras import ops

    # keras.ops calls throughout, no Python operators: the ops' stubs admit None results.
    target = ops.stop_gradient(p_weak)
    pseudo = ops.argmax(target, axis=-1)
    confident = ops.cast(ops.greater_equal(ops.max(target, axis=-1), threshold), "float32")
    per_class = ops.take(ops.convert_to_tensor(np.asarray(class_weights, dtype=np.float32)), pseudo)
    picked = ops.squeeze(
        ops.take_along_axis(ops.cast(p_strong, "float32"), ops.expand_dims(pseudo, -1), axis=-1), axis=-1
    )
    cross_entropy = ops.negative(ops.log(ops.clip(picked, 1e-7, 1.0)))
    weighted = ops.multiply(ops.multiply(confident, per_class), cross_entropy)
    return ops.multiply(weight, ops.mean(weighted))


@functools.cache
def _consistency_layer_class() -> type:
    import keras

    class FixMatchConsistency(keras.layers.Layer):
        """Adds FixMatch's unlabelled loss (``consistency_loss``) and passes the labelled predictions on."""

        def __init__(self, threshold: float, weight: float, class_weights, **kwargs):
            super().__init__(dtype="float32", **kwargs)
            self.threshold, self.weight = float(threshold), float(weight)
            self.class_weights = [float(w) for w in class_weights]

        def call(self, inputs):
            p_labelled, p_weak, p_strong = inputs
            self.add_loss(consistency_loss(p_weak, p_strong, self.threshold, self.weight, self.class_weights))
            return p_labelled

        def get_config(self):
            return {
                **super().get_config(),
                "threshold": self.threshold,
                "weight": self.weight,
                "class_weights": self.class_weights,
            }

    FixMatchConsistency.__module__ = __name__
    return FixMatchConsistency


def build_fixmatch_model(classifier, *, threshold: float, weight: float, class_weights):
    """The training wrapper around ``classifier`` (one input: an embedding or a uint8 image): inputs
    "labelled", "weak", "strong" (each the classifier's input), output the labelled predictions, the
    consistency loss added in the graph. The classifier's weights are shared, so training the wrapper trains
    it; only the classifier is saved."""
    import keras

    if len(classifier.inputs) != 1:
        raise ValueError(f"FixMatch wraps a one-input classifier, {classifier.name!r} has {len(classifier.inputs)}")
    spec = classifier.inputs[0]
    inputs = {
        name: keras.Input(shape=tuple(spec.shape[1:]), dtype=spec.dtype, name=name)
        for name in ("labelled", "weak", "strong")
    }
    outputs = _consistency_layer_class()(threshold, weight, class_weights, name="fixmatch_consistency")(
        [classifier(inputs["labelled"]), classifier(inputs["weak"]), classifier(inputs["strong"])]
    )
    return keras.Model(inputs, outputs, name=f"fixmatch__{classifier.name}")


@functools.cache
def _pseudo_label_rate_class() -> type:
    import keras

    class PseudoLabelRate(keras.callbacks.Callback):
        """Writes ``pseudo_label_rate`` into the epoch logs: the share of a fixed sample of pool inputs
        whose top probability (by ``classifier``) reaches ``threshold``."""

        def __init__(self, classifier, sample, threshold: float, batch_size: int = 64):
            super().__init__()
            self.classifier, self.sample, self.threshold, self.batch_size = classifier, sample, threshold, batch_size

        def on_epoch_end(self, epoch, logs=None):
            if logs is None:
                return
            probabilities = predict_in_batches(self.classifier, self.sample, self.batch_size)
            logs["pseudo_label_rate"] = float((probabilities.max(axis=1) >= self.threshold).mean())

    PseudoLabelRate.__module__ = __name__
    return PseudoLabelRate


def _rate_sample(source: np.ndarray, seed: int) -> np.ndarray:
    n = len(source)
    rows = np.sort(np.random.default_rng(seed).permutation(n)[: min(n, RATE_SAMPLE)])
    return np.asarray(source[rows])


# ------------------------------------------------------------------------------------------ training


def train_fixmatch_head_on_embeddings(
    train_views: np.ndarray,
    train_y,
    pool_weak: np.ndarray,
    pool_strong: np.ndarray,
    val_emb,
    val_y,
    *,
    head_builder: Callable[[], Any],
    config: TrainConfig,
    fixmatch: FixMatchConfig = FixMatchConfig(),
    checkpoint_dir: str | Path | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    verbose: int = 0,
) -> TrainResult:
    """The CPU mode: a head trained FixMatch-style on embedded views (float32). ``train_views`` (V_w, n, D)
    weak views of the labelled train images; ``pool_weak`` (V_w, m, D) and ``pool_strong`` (V_s, m, D) the
    pool's views, row j of both the same image. ``head_builder()`` returns a fresh head (called after the
    seed is set). Returns the fit of the wrapper with ``model`` = the trained head (compose it with the
    backbone to save it)."""
    import keras

    keras.utils.set_random_seed(config.seed)
    head = head_builder()
    num_classes = int(head.output_shape[-1])
    class_weight = _class_weights_for(config, train_y, num_classes)
    weights = [class_weight[k] for k in range(num_classes)] if class_weight else [1.0] * num_classes
    wrapper = build_fixmatch_model(
        head, threshold=fixmatch.threshold, weight=fixmatch.unlabelled_weight, class_weights=weights
    )
    batches = fixmatch_sequence(
        PrecomputedViews(np.asarray(train_views, dtype=np.float32)),
        np.asarray(train_y),
        PrecomputedViews(np.asarray(pool_weak, dtype=np.float32)),
        PrecomputedViews(np.asarray(pool_strong, dtype=np.float32)),
        batch_size=config.batch_size,
        ratio=fixmatch.ratio,
        seed=config.seed,
    )
    rate = _pseudo_label_rate_class()(head, _rate_sample(pool_weak[0], config.seed), fixmatch.threshold)
    result = fit_classifier(
        wrapper,
        batches,
        np.asarray(val_emb, dtype=np.float32),
        val_y,
        config=config,
        class_weight=class_weight,
        checkpoint_dir=checkpoint_dir,
        on_epoch_end=on_epoch_end,
        phase="fixmatch_head",
        metric_callbacks=[rate],
        val_model=head,
        verbose=verbose,
    )
    return replace(result, model=head)


def fine_tune_fixmatch(
    backbone,
    head,
    train_images: np.ndarray,
    train_y,
    pool_images: np.ndarray,
    val_images: np.ndarray,
    val_y,
    *,
    config: TrainConfig,
    fixmatch: FixMatchConfig = FixMatchConfig(),
    checkpoint_dir: str | Path | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    verbose: int = 0,
) -> TransferResult:
    """The GPU mode: FixMatch end to end on uint8 images, views drawn on the fly (weak for the labelled
    batch and the pseudo-labels, strong for the consistency target). Phase "frozen": the backbone frozen,
    ``learning_rate``, ``epochs``; phase "fine_tune": the top ``unfreeze_layers`` unfrozen (BatchNorm stays
    frozen), ``fine_tune_learning_rate``, ``fine_tune_epochs``; the frozen phase's weights are restored when
    fine-tuning does not beat it. Returns the end-to-end classifier on raw uint8 images (the file to save)."""
    from scin_pipeline.core.models import compose_end_to_end

    backbone.trainable = False
    classifier = compose_end_to_end(backbone, head, with_metadata=False)
    num_classes = int(classifier.output_shape[-1])
    class_weight = _class_weights_for(config, train_y, num_classes)
    weights = [class_weight[k] for k in range(num_classes)] if class_weight else [1.0] * num_classes
    wrapper = build_fixmatch_model(
        classifier, threshold=fixmatch.threshold, weight=fixmatch.unlabelled_weight, class_weights=weights
    )
    augment = weak_augment_batch if config.augment else None
    rate = _pseudo_label_rate_class()(classifier, _rate_sample(pool_images, config.seed), fixmatch.threshold)

    def batches(phase_seed: int):
        return fixmatch_sequence(
            AugmentedImages(train_images, augment),
            np.asarray(train_y),
            AugmentedImages(pool_images, augment),
            AugmentedImages(pool_images, strong_augment_batch),
            batch_size=config.batch_size,
            ratio=fixmatch.ratio,
            seed=phase_seed,
        )

    return frozen_then_fine_tuned(
        classifier,
        backbone,
        batches,
        val_images,
        val_y,
        config=config,
        class_weight=class_weight,
        checkpoint_dir=checkpoint_dir,
        on_epoch_end=on_epoch_end,
        verbose=verbose,
        trained_model=wrapper,
        metric_callbacks=[rate],
        val_model=classifier,
    )
