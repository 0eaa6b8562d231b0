"""core.semi_supervised: geometry-only strong views, FixMatch batches, the consistency loss, and that the
semi-supervised head learns from unlabelled data where the supervised one cannot; the GPU fine-tuning path
on a tiny model on CPU."""

from __future__ import annotations

import numpy as np
import pytest

from scin_pipeline.core import semi_supervised as ss
from scin_pipeline.core.training import TrainConfig, train_head_on_embeddings


def _textured(n: int, size: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.array([180, 120, 90], dtype=np.float64)
    yy, xx = np.mgrid[:size, :size]
    images = []
    for _ in range(n):
        pattern = 30 * np.sin(xx / rng.uniform(2, 6)) * np.cos(yy / rng.uniform(2, 6))
        images.append(np.clip(base + pattern[..., None], 0, 255))
    return np.stack(images).astype(np.uint8)


def test_strong_views_change_geometry_never_colour():
    rng = np.random.default_rng(0)
    plain_tones = np.stack(
        [np.full((40, 40, 3), tone, np.uint8) for tone in ([241, 219, 200], [60, 41, 33], [150, 100, 80])]
    )
    # A flat skin colour stays exactly that colour: only pixels are moved, none is recoloured.
    np.testing.assert_array_equal(ss.strong_augment_batch(plain_tones, rng), plain_tones)
    images = _textured(6)
    strong = ss.strong_augment_batch(images, np.random.default_rng(1))
    assert strong.shape == images.shape and strong.dtype == np.uint8
    # Geometry moved (the pattern is elsewhere) ...
    assert np.abs(strong.astype(int) - images.astype(int)).mean() > 5
    # ... while every image's mean colour (its skin tone) stays within a few levels.
    assert np.abs(strong.reshape(6, -1, 3).mean(1) - images.reshape(6, -1, 3).mean(1)).max() < 4
    again = ss.strong_augment_batch(images, np.random.default_rng(1))
    np.testing.assert_array_equal(strong, again)
    with pytest.raises(ValueError, match="uint8"):
        ss.strong_augment_batch(images.astype(np.float32), rng)


def test_batches_pair_weak_and_strong_views_of_the_same_pool_images():
    # View v of row j holds the number 1000 * v + j, so a batch says which rows and views it drew.
    n_l, n_u = 10, 25
    labelled = ss.PrecomputedViews(np.arange(n_l, dtype=np.float32)[None, :, None])
    weak = ss.PrecomputedViews(np.stack([np.arange(n_u) + 1000.0 * v for v in range(2)])[..., None].astype(np.float32))
    strong = ss.PrecomputedViews(np.stack([np.arange(n_u) + 5000.0 + 1000.0 * v for v in range(3)])[..., None])
    y = np.arange(n_l) % 3
    sequence = ss.fixmatch_sequence(labelled, y, weak, strong, batch_size=4, ratio=3, seed=7)
    assert len(sequence) == 3
    seen = []
    for i in range(len(sequence)):
        inputs, labels = sequence[i]
        rows = inputs["labelled"][:, 0].astype(int)
        np.testing.assert_array_equal(labels, y[rows])
        assert len(inputs["weak"]) == len(inputs["strong"]) == 12
        np.testing.assert_array_equal(inputs["weak"][:, 0] % 1000, (inputs["strong"][:, 0] - 5000) % 1000)
        seen += rows.tolist()
    assert sorted(seen) == list(range(n_l))  # one epoch = every labelled image once
    first = sequence[0][0]["labelled"].copy()
    np.testing.assert_array_equal(sequence[0][0]["labelled"], first)  # reproducible
    sequence.on_epoch_end()
    assert not np.array_equal(sequence[0][0]["labelled"], first)  # a new order next epoch
    with pytest.raises(ValueError, match="labelled and unlabelled"):
        ss.fixmatch_sequence(
            labelled,
            y,
            ss.PrecomputedViews(np.zeros((1, 0, 1))),
            ss.PrecomputedViews(np.zeros((1, 0, 1))),
            batch_size=4,
            ratio=1,
            seed=0,
        )


def test_consistency_loss_counts_confident_pseudo_labels_only():
    from keras import ops

    p_weak = np.array([[0.97, 0.02, 0.01], [0.5, 0.3, 0.2], [0.01, 0.01, 0.98]], np.float32)
    p_strong = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], np.float32)
    loss = float(ops.convert_to_numpy(ss.consistency_loss(p_weak, p_strong, 0.95, 2.0, [1.0, 1.0, 3.0])))
    # rows 0 and 2 are confident (pseudo 0 and 2); row 1 is not; class 2 weighs 3.
    expected = 2.0 * (-np.log(0.5) - 3.0 * np.log(0.6)) / 3
    assert loss == pytest.approx(expected, rel=1e-5)
    assert float(ops.convert_to_numpy(ss.consistency_loss(p_weak, p_strong, 0.99, 1.0, [1, 1, 1]))) == 0.0


def _planted(seed: int):
    """Two classes split along one of 64 dimensions, 4 labels per class, 400 unlabelled points; a strong view
    is the point with its 63 noise dimensions redrawn (what a view of the same image keeps is its class)."""
    rng = np.random.default_rng(seed)
    dim = 64

    def points(y):
        x = rng.normal(0, 1.0, (len(y), dim))
        x[:, 0] = np.where(y == 1, 1.5, -1.5) + rng.normal(0, 0.5, len(y))
        return x.astype(np.float32)

    def strong(x):
        views = np.repeat(x[None], 2, axis=0)
        views[:, :, 1:] = rng.normal(0, 1.0, views[:, :, 1:].shape)
        return views.astype(np.float32)

    y_l = np.array([0, 1] * 4)
    y_u = rng.integers(0, 2, 400)
    y_val = rng.integers(0, 2, 400)
    x_l, x_u, x_val = points(y_l), points(y_u), points(y_val)
    return x_l, y_l, x_u, strong(x_u), x_val, y_val


def test_fixmatch_head_learns_from_unlabelled_views_where_the_supervised_twin_cannot():
    from scin_pipeline.core.models import build_classifier_head

    # Batches of 2 labelled (and 14 pool) rows: with 8 labels an epoch is 4 steps. Measured (seeds 0-2, 40
    # epochs): supervised val macro-F1 0.59-0.62, FixMatch 0.92-0.98.
    config = TrainConfig(epochs=40, batch_size=2, learning_rate=0.01, early_stopping_patience=40, seed=0)
    x_l, y_l, x_u, strong, x_val, y_val = _planted(1)
    supervised = train_head_on_embeddings(
        x_l, y_l, x_val, y_val, head_builder=lambda: build_classifier_head(64, 2, 0.0), config=config
    )
    semi = ss.train_fixmatch_head_on_embeddings(
        x_l[None],
        y_l,
        x_u[None],
        strong,
        x_val,
        y_val,
        head_builder=lambda: build_classifier_head(64, 2, 0.0),
        config=config,
        fixmatch=ss.FixMatchConfig(threshold=0.8, ratio=7),
    )
    assert semi.model.name == "classifier_head"  # the head itself, not the training wrapper
    assert semi.history["pseudo_label_rate"].max() > 0.3
    assert semi.best_score > 0.85 and semi.best_score > supervised.best_score + 0.15, (
        semi.best_score,
        supervised.best_score,
    )


def test_no_confident_pseudo_label_means_no_unlabelled_loss():
    from scin_pipeline.core.models import build_classifier_head

    x_l, y_l, x_u, strong, x_val, y_val = _planted(3)
    config = TrainConfig(epochs=3, batch_size=8, learning_rate=0.01, seed=0)
    result = ss.train_fixmatch_head_on_embeddings(
        x_l[None],
        y_l,
        x_u[None],
        strong,
        x_val,
        y_val,
        head_builder=lambda: build_classifier_head(64, 2, 0.0),
        config=config,
        fixmatch=ss.FixMatchConfig(threshold=1.0),  # a softmax over 2 classes never reaches 1.0 here
    )
    assert (result.history["pseudo_label_rate"] == 0).all()


def test_fine_tune_path_trains_end_to_end_on_a_tiny_model(tmp_path):
    import keras

    from scin_pipeline.core.models import build_classifier_head

    def tiny_backbone():
        image = keras.Input((16, 16, 3), dtype="uint8", name="image")
        x = keras.layers.Rescaling(1 / 255.0)(image)
        x = keras.layers.Conv2D(4, 3, activation="relu", name="conv_a")(x)
        x = keras.layers.Conv2D(4, 3, activation="relu", name="conv_b")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(image, keras.layers.Activation("linear", name="embedding")(x), name="tiny_backbone")

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (48, 16, 16, 3), dtype=np.uint8)
    y = np.arange(48) % 2
    images[y == 1, :, :, 0] = 255  # a planted colour cue per class
    config = TrainConfig(epochs=2, fine_tune_epochs=1, unfreeze_layers=2, batch_size=8, seed=0)
    result = ss.fine_tune_fixmatch(
        tiny_backbone(),
        build_classifier_head(4, 2, 0.0),
        images[:16],
        y[:16],
        images[16:40],
        images[40:],
        y[40:],
        config=config,
        fixmatch=ss.FixMatchConfig(threshold=0.5, ratio=2),
        checkpoint_dir=tmp_path,
    )
    assert set(result.phases) == {"frozen", "fine_tune"}
    assert list(result.history["phase"].unique()) == ["frozen", "fine_tune"]
    assert result.history["epoch"].tolist() == [1, 2, 3]
    assert "pseudo_label_rate" in result.history
    probabilities = result.model.predict(images[40:], verbose=0)  # one model on raw uint8 images
    assert probabilities.shape == (8, 2)
    assert (tmp_path / "frozen" / "completed.json").exists() and (tmp_path / "fine_tune" / "completed.json").exists()


def test_embed_views_reuses_the_plain_embeddings_and_augments_the_rest():
    import keras

    image = keras.Input((12, 12, 3), dtype="uint8", name="image")
    flat = keras.layers.Flatten()(keras.layers.Rescaling(1.0)(image))
    backbone = keras.Model(image, flat)
    images = _textured(5, size=12)
    plain = np.full((5, 432), -1.0, np.float32)  # a stand-in: proves view 0 is taken, not recomputed
    views = ss.embed_views(backbone, images, 3, ss.strong_augment_batch, seed=0, plain=plain, plain_first=True)
    assert views.shape == (3, 5, 432)
    np.testing.assert_array_equal(views[0], plain)
    assert not np.allclose(views[1], images.reshape(5, -1)) and not np.allclose(views[1], views[2])
    again = ss.embed_views(backbone, images, 3, ss.strong_augment_batch, seed=0, plain=plain, plain_first=True)
    np.testing.assert_array_equal(views, again)
