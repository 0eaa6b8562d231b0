"""The decoded image cache: preprocessing, guarded decode of uploads, shards + index, reuse, readers.

All images are SYNTHETIC (drawn skin from scin_pipeline.core.synthetic or plain arrays), 64-96 px, cached
at 32 px.
"""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pandas as pd
import pytest

from scin_pipeline.core import image_cache
from scin_pipeline.core.atomic import TMP_PREFIX, writer_namespace
from scin_pipeline.core.image_cache import (
    INDEX_COLUMNS,
    ImagePreprocessError,
    augment_batch,
    build_image_cache,
    load_images,
    preprocess_image,
    preprocess_image_bytes,
    preprocess_image_file,
    split_arrays,
    split_rows,
)
from scin_pipeline.core.synthetic.encoding import decompression_bomb_png
from scin_pipeline.core.synthetic.lesions import render_skin_image

S = 32
PATTERNS = ("eczema_blotches", "urticaria_wheals", "tinea_rings", "psoriasis_plaques", "none")


def synthetic_skin(i: int, size=(96, 72)) -> np.ndarray:
    """A synthetic skin image (RGB uint8, (h, w, 3)); size is (w, h)."""
    return render_skin_image(f"img{i}", 1 + i % 10, PATTERNS[i % len(PATTERNS)], size, seed=5)


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def jpeg_bytes(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def write_images(folder, n: int, split_of=lambda i: ("train", "val", "test")[i % 3]) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        size = (96, 72) if i % 2 else (64, 80)  # landscape and portrait
        path = folder / f"{1000 + i}.png"
        path.write_bytes(png_bytes(synthetic_skin(i, size)))
        rows.append({"image_id": str(1000 + i), "local_path": str(path), "split": split_of(i)})
    return pd.DataFrame(rows)


class DecodeCounter:
    """Wraps image_cache.decode_image to count calls (threads append to one list; the GIL keeps it whole)."""

    def __init__(self, monkeypatch):
        self.paths: list[str] = []
        real = image_cache.decode_image

        def counting(path, *args, **kwargs):
            self.paths.append(str(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(image_cache, "decode_image", counting)


# ---------------------------------------------------------------------------------------- preprocessing


def test_preprocess_image_is_a_centred_square_of_the_requested_size():
    # A landscape image with a red left quarter, a blue right quarter and a green centre: the centred
    # square is all green, so the edges (and only they) are cut off rather than squashed in.
    rgb = np.zeros((60, 120, 3), np.uint8)
    rgb[:, :30] = (255, 0, 0)
    rgb[:, 30:90] = (0, 255, 0)
    rgb[:, 90:] = (0, 0, 255)
    out = preprocess_image(rgb, S)
    assert out.shape == (S, S, 3) and out.dtype == np.uint8
    assert np.array_equal(out, np.broadcast_to(np.array([0, 255, 0], np.uint8), (S, S, 3)))


def test_preprocess_image_keeps_a_circle_round_in_portrait_and_landscape():
    for h, w in ((90, 60), (60, 90)):
        rgb = np.zeros((h, w, 3), np.uint8)
        cv2.circle(rgb, (w // 2, h // 2), 20, (255, 255, 255), -1)
        mask = preprocess_image(rgb, S)[..., 0] > 127
        ys, xs = np.nonzero(mask)
        extent_y, extent_x = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert abs(int(extent_y) - int(extent_x)) <= 1  # a squashing resize would make it an ellipse
        assert abs(extent_x - 2 * 20 * S / 60) <= 2  # shorter side 60 -> 32: radius scales by 32/60


def test_preprocess_image_enlarges_small_images_and_passes_exact_size_through():
    small = synthetic_skin(1, (20, 16))
    assert preprocess_image(small, S).shape == (S, S, 3)
    exact = synthetic_skin(2, (S, S))
    assert np.array_equal(preprocess_image(exact, S), exact)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((10, 10), np.uint8),
        np.zeros((10, 10, 4), np.uint8),
        np.zeros((10, 10, 3), np.float32),
        np.zeros((0, 10, 3), np.uint8),
    ],
)
def test_preprocess_image_rejects_non_rgb_uint8(bad):
    with pytest.raises(ValueError):
        preprocess_image(bad, S)


def test_bytes_and_file_give_identical_pixels(tmp_path):
    """The web service (bytes) and the cache (files) must not see different pixels for the same image."""
    rgb = synthetic_skin(3, (90, 70))
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(rgb))
    from_file = preprocess_image_file(path, S)
    from_bytes = preprocess_image_bytes(path.read_bytes(), S, name="a.png")
    assert np.array_equal(from_file, from_bytes)
    assert np.array_equal(from_file, preprocess_image(rgb, S))  # PNG is lossless; RGB order kept


def test_jpeg_upload_is_accepted_and_close_to_the_original():
    rgb = synthetic_skin(4, (96, 64))
    out = preprocess_image_bytes(jpeg_bytes(rgb), S, name="phone.jpg")
    assert out.shape == (S, S, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - preprocess_image(rgb, S).astype(int)).mean() < 4


@pytest.mark.parametrize(
    "data, kind, words",
    [
        (b"", "empty_file", "0 bytes"),
        (b"%PDF-1.4 not an image at all", "corrupt", "not an image"),
        (b"GIF89a" + b"\x00" * 40, "unsupported_format", "GIF"),
        (decompression_bomb_png(30000, 30000), "decompression_bomb", "30000 x 30000"),
    ],
)
def test_bad_uploads_raise_naming_the_upload(data, kind, words):
    with pytest.raises(ImagePreprocessError) as err:
        preprocess_image_bytes(data, S, name="case-17/upload.png")
    assert isinstance(err.value, ValueError)
    assert err.value.kind == kind
    assert str(err.value).startswith("case-17/upload.png: ") and words in str(err.value)


def test_truncated_uploads_raise_naming_the_upload():
    rgb = synthetic_skin(5)
    for data, fmt in ((png_bytes(rgb), "PNG"), (jpeg_bytes(rgb), "JPEG")):
        with pytest.raises(ImagePreprocessError) as err:
            preprocess_image_bytes(data[: len(data) // 2], S, name="cut")
        assert err.value.kind == "truncated"
        assert str(err.value).startswith("cut: truncated " + fmt)


def test_bomb_upload_is_refused_before_any_decode(monkeypatch):
    def no_decode(*args, **kwargs):
        raise AssertionError("cv2.imdecode called on a decompression bomb")

    monkeypatch.setattr(image_cache.cv2, "imdecode", no_decode)
    with pytest.raises(ImagePreprocessError) as err:
        preprocess_image_bytes(decompression_bomb_png(30000, 30000), S)
    assert err.value.kind == "decompression_bomb"


def test_upload_of_wrong_type_is_an_error():
    with pytest.raises(ImagePreprocessError, match="^upload: expected image bytes"):
        preprocess_image_bytes("not bytes", S)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- the cache


def test_build_image_cache_index_shards_and_load_order(tmp_path):
    rows = write_images(tmp_path / "img", 10)
    index = build_image_cache(rows, tmp_path / "cache", image_size=S, shard_size=2, workers=2)
    assert list(index.columns) == list(INDEX_COLUMNS)
    assert list(index["image_id"]) == list(rows["image_id"])  # input order
    assert (index["status"] == "ok").all() and index["reason"].isna().all()
    assert (index["image_size"] == S).all()
    # grouped by split: a shard holds one split only, at most shard_size images
    for shard, group in index.groupby("shard"):
        assert group["split"].nunique() == 1 and len(group) <= 2
        assert os.path.basename(shard).startswith(group["split"].iloc[0] + "-")
        assert sorted(group["offset"]) == list(range(len(group)))
    images = load_images(index, tmp_path / "cache")
    assert images.shape == (10, S, S, 3) and images.dtype == np.uint8
    for k, path in enumerate(rows["local_path"]):
        assert np.array_equal(images[k], preprocess_image_file(path, S))
    # any subset, in any order, comes back in that order
    subset = index.iloc[[7, 2, 5]]
    assert np.array_equal(load_images(subset, tmp_path / "cache"), images[[7, 2, 5]])
    manifest = json.loads((tmp_path / "cache" / f"{S}px" / "manifest.json").read_text())
    assert manifest["image_size"] == S and manifest["n_ok"] == 10
    assert sorted(f"{S}px/{s['file']}" for s in manifest["shards"]) == sorted(index["shard"].unique())


def test_shard_files_are_uint8_arrays_of_the_images(tmp_path):
    rows = write_images(tmp_path / "img", 4, split_of=lambda i: "train")
    index = build_image_cache(rows, tmp_path / "cache", image_size=S, shard_size=8, workers=1)
    (shard,) = index["shard"].unique()
    arr = np.load(tmp_path / "cache" / shard)
    assert arr.dtype == np.uint8 and arr.shape == (4, S, S, 3)


def test_failed_files_get_reasons_and_the_rest_is_intact(tmp_path):
    rows = write_images(tmp_path / "img", 6, split_of=lambda i: "train")
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    good_png = png_bytes(synthetic_skin(9))
    bad = {
        "zero": (b"", "empty_file"),
        "cut": (good_png[: len(good_png) // 2], "truncated"),
        "jpeg": (jpeg_bytes(synthetic_skin(8)), "wrong_format"),
        "bomb": (decompression_bomb_png(30000, 30000), "decompression_bomb"),
    }
    extra = []
    # ids sort between the good ones ("1000" < "1000-zero" < "1001"), so shards mix failures and
    # good images, failures first in some: the good images behind them must move up without loss
    for k, (name, (data, _)) in enumerate(bad.items()):
        (bad_dir / f"{name}.png").write_bytes(data)
        extra.append({"image_id": f"{1000 + k}-{name}", "local_path": str(bad_dir / f"{name}.png"), "split": "train"})
    extra.append({"image_id": "1004-gone", "local_path": str(bad_dir / "gone.png"), "split": "train"})
    extra.append({"image_id": "1005-nopath", "local_path": None, "split": "train"})
    all_rows = pd.concat([rows.iloc[:3], pd.DataFrame(extra), rows.iloc[3:]], ignore_index=True)
    index = build_image_cache(all_rows, tmp_path / "cache", image_size=S, shard_size=4, workers=2)

    by_id = index.set_index("image_id")
    for k, (name, (_, kind)) in enumerate(bad.items()):
        row = by_id.loc[f"{1000 + k}-{name}"]
        assert row["status"] == "failed" and row["shard"] is None and row["offset"] == -1
        assert row["reason"].startswith(kind + ": ") and f"{name}.png" in row["reason"]
    assert by_id.loc["1004-gone", "reason"].startswith("missing: ")
    assert (
        by_id.loc["1005-nopath", "reason"].startswith("missing: ")
        and "1005-nopath" in by_id.loc["1005-nopath", "reason"]
    )
    # first shard: 1000, 1000-zero (failed), 1001, 1001-cut (failed): 1001 moved up into slot 1
    assert by_id.loc["1001", "offset"] == 1 and by_id.loc["1001", "shard"] == by_id.loc["1000", "shard"]
    assert np.load(tmp_path / "cache" / by_id.loc["1001", "shard"]).shape == (2, S, S, 3)
    ok = index[index["status"] == "ok"]
    assert list(ok["image_id"]) == list(rows["image_id"])
    images = load_images(index, tmp_path / "cache")
    assert images.shape == (6, S, S, 3)
    for k, path in enumerate(rows["local_path"]):
        assert np.array_equal(images[k], preprocess_image_file(path, S))


def test_rerun_with_same_inputs_decodes_nothing_and_rewrites_nothing(tmp_path, monkeypatch):
    rows = write_images(tmp_path / "img", 7)
    rows.loc[len(rows)] = {"image_id": "zero", "local_path": str(tmp_path / "zero.png"), "split": "train"}
    (tmp_path / "zero.png").write_bytes(b"")
    cache = tmp_path / "cache"
    first = build_image_cache(rows, cache, image_size=S, shard_size=2, workers=2)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (cache / f"{S}px").glob("*.npy")}

    counter = DecodeCounter(monkeypatch)
    shuffled = rows.sample(frac=1.0, random_state=3)  # row order does not matter either
    second = build_image_cache(shuffled, cache, image_size=S, shard_size=2, workers=2)
    assert counter.paths == []
    assert {p.name: p.stat().st_mtime_ns for p in (cache / f"{S}px").glob("*.npy")} == mtimes
    reordered = second.set_index("image_id").loc[first["image_id"]].reset_index()
    pd.testing.assert_frame_equal(reordered, first)
    first_pixels = dict(zip(first.loc[first["status"] == "ok", "image_id"], load_images(first, cache)))
    for image_id, pixels in zip(second.loc[second["status"] == "ok", "image_id"], load_images(second, cache)):
        assert np.array_equal(pixels, first_pixels[image_id])


def test_changed_input_decodes_only_what_changed_and_never_serves_stale_pixels(tmp_path, monkeypatch):
    rows = write_images(tmp_path / "img", 8, split_of=lambda i: "train")
    cache = tmp_path / "cache"
    build_image_cache(rows, cache, image_size=S, shard_size=3, workers=2)
    old_shards = {p.name for p in (cache / f"{S}px").glob("*.npy")}

    changed = rows.loc[4, "local_path"]
    new_rgb = synthetic_skin(99, (80, 80))
    with open(changed, "wb") as fh:
        fh.write(png_bytes(new_rgb))
    os.utime(changed, ns=(1, 1))  # a different mtime even on coarse-clock filesystems
    new_file = tmp_path / "img" / "new.png"
    new_file.write_bytes(png_bytes(synthetic_skin(50)))
    rows.loc[len(rows)] = {"image_id": "2000", "local_path": str(new_file), "split": "train"}

    counter = DecodeCounter(monkeypatch)
    index = build_image_cache(rows, cache, image_size=S, shard_size=3, workers=2)
    assert sorted(counter.paths) == sorted([changed, str(new_file)])
    images = load_images(index, cache)
    assert np.array_equal(images[4], preprocess_image(new_rgb, S))
    for k, path in enumerate(rows["local_path"]):
        assert np.array_equal(images[k], preprocess_image_file(path, S))
    # stale shards (those whose inputs changed) are gone; unchanged ones kept; only referenced files remain
    now = {p.name for p in (cache / f"{S}px").glob("*.npy")}
    assert now == {os.path.basename(s) for s in index["shard"].unique()}
    assert old_shards - now and old_shards & now


def test_stale_shards_of_this_size_are_removed_and_other_sizes_kept(tmp_path):
    rows = write_images(tmp_path / "img", 6, split_of=lambda i: "train")
    cache = tmp_path / "cache"
    other = build_image_cache(rows, cache, image_size=16, shard_size=4, workers=1)
    first = build_image_cache(rows, cache, image_size=S, shard_size=4, workers=1)
    (cache / f"{S}px" / "train-leftover.npy").write_bytes(b"junk")
    (cache / f"{S}px" / "train-x.npy.tmp-1-2").write_bytes(b"junk")  # a temp file of the former naming
    (cache / f"{S}px" / f"{TMP_PREFIX}4194399@{writer_namespace()}-abc.npy").write_bytes(b"junk")  # dead writer's
    second = build_image_cache(rows.iloc[:3], cache, image_size=S, shard_size=4, workers=1)
    files = sorted(p.name for p in (cache / f"{S}px").iterdir())
    assert files == sorted([os.path.basename(s) for s in second["shard"].unique()] + ["manifest.json"])
    assert not set(first["shard"]) & set(second["shard"])  # the 6-image shards were not reused for 3
    assert load_images(other, cache).shape == (6, 16, 16, 3)  # the 16 px folder untouched


def test_a_torn_shard_is_rebuilt_not_reused(tmp_path, monkeypatch):
    rows = write_images(tmp_path / "img", 3, split_of=lambda i: "train")
    cache = tmp_path / "cache"
    index = build_image_cache(rows, cache, image_size=S, shard_size=8, workers=1)
    (shard,) = index["shard"].unique()
    (cache / shard).write_bytes(b"")
    counter = DecodeCounter(monkeypatch)
    again = build_image_cache(rows, cache, image_size=S, shard_size=8, workers=1)
    assert len(counter.paths) == 3
    assert load_images(again, cache).shape == (3, S, S, 3)


def test_bad_rows_tables_are_refused(tmp_path):
    with pytest.raises(ValueError, match="local_path"):
        build_image_cache(pd.DataFrame({"image_id": ["1"], "split": ["train"]}), tmp_path, image_size=S)
    dup = pd.DataFrame({"image_id": ["1", "1"], "local_path": ["a", "b"], "split": ["train", "val"]})
    with pytest.raises(ValueError, match="duplicate image_id.*'1'"):
        build_image_cache(dup, tmp_path, image_size=S)
    unsafe = pd.DataFrame({"image_id": ["1"], "local_path": ["a"], "split": ["../x"]})
    with pytest.raises(ValueError, match="not a plain name"):
        build_image_cache(unsafe, tmp_path, image_size=S)


def test_load_images_names_a_missing_shard(tmp_path):
    rows = write_images(tmp_path / "img", 2, split_of=lambda i: "train")
    index = build_image_cache(rows, tmp_path / "cache", image_size=S, workers=1)
    (tmp_path / "cache" / index["shard"].iloc[0]).unlink()
    with pytest.raises(FileNotFoundError, match=index["shard"].iloc[0]):
        load_images(index, tmp_path / "cache")


def _labeled_cache(tmp_path):
    """A cache of six images and a labeled_splits table over them: image 1001 is shared by two cases,
    1002's decode failed, 9999 was never cached."""
    rows = write_images(tmp_path / "img", 6, split_of=lambda i: "train" if i < 4 else "val")
    index = build_image_cache(rows, tmp_path / "cache", image_size=S, shard_size=2, workers=1)
    index.loc[index["image_id"] == "1002", "status"] = "failed"
    labeled = pd.DataFrame(
        {
            "image_id": ["1003", "1001", "1001", "1000", "1002", "9999", "1004", "1005"],
            "case_id": ["c3", "c2", "c1", "c1", "c4", "c5", "c6", "c7"],
            "label": ["b", "a", "a", "a", "b", "b", "b", "a"],
            "split": ["train"] * 6 + ["val"] * 2,
        }
    )
    return labeled, index


def test_split_rows_are_the_cached_rows_of_one_split_per_image_and_case_in_case_order(tmp_path):
    labeled, index = _labeled_cache(tmp_path)
    rows, y = split_rows(labeled, index, "train", ["a", "b"])
    # 1002 (failed) and 9999 (not cached) are left out; the shared 1001 is a row per case.
    assert list(zip(rows["case_id"], rows["image_id"])) == [
        ("c1", "1000"),
        ("c1", "1001"),
        ("c2", "1001"),
        ("c3", "1003"),
    ]
    assert y.tolist() == [0, 0, 0, 1] and y.dtype == np.int32
    assert {"shard", "offset", "status", "image_size"} <= set(rows.columns)
    assert (rows["status"] == "ok").all()
    val_rows, val_y = split_rows(labeled, index, "val", ["a", "b"])
    assert val_rows["image_id"].tolist() == ["1004", "1005"] and val_y.tolist() == [1, 0]


def test_split_arrays_adds_the_rows_pixels_from_the_cache(tmp_path):
    labeled, index = _labeled_cache(tmp_path)
    rows, images, y = split_arrays(labeled, index, tmp_path / "cache", "train", ["a", "b"])
    assert images.shape == (4, S, S, 3) and images.dtype == np.uint8
    for k, image_id in enumerate(rows["image_id"]):
        assert np.array_equal(images[k], preprocess_image_file(tmp_path / "img" / f"{image_id}.png", S))
    assert y.tolist() == split_rows(labeled, index, "train", ["a", "b"])[1].tolist()
    # A split without cached rows gives an empty batch, not an error.
    empty_rows, empty, empty_y = split_arrays(labeled, index, tmp_path / "cache", "test", ["a", "b"])
    assert len(empty_rows) == 0 and empty.shape == (0, 1, 1, 3) and len(empty_y) == 0


# ---------------------------------------------------------------------------------------- augmentation


def _skin_batch(n: int = 20) -> np.ndarray:
    return np.stack([preprocess_image(synthetic_skin(i), S) for i in range(n)])


def test_augment_batch_is_deterministic_per_seed_and_changes_geometry():
    batch = _skin_batch()
    a = augment_batch(batch, np.random.default_rng(7))
    b = augment_batch(batch, np.random.default_rng(7))
    c = augment_batch(batch, np.random.default_rng(8))
    assert a.shape == batch.shape and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a, batch)


def test_augment_batch_keeps_each_image_mean_colour():
    batch = _skin_batch()
    before = batch.reshape(len(batch), -1, 3).mean(axis=1)
    rng = np.random.default_rng(0)
    for _ in range(10):
        after = augment_batch(batch, rng).reshape(len(batch), -1, 3).mean(axis=1)
        # only the crop can move the mean (it leaves out up to 28 % of the frame); colour jitter of even
        # 5 % brightness would move a mid skin tone by ~8 levels
        assert np.abs(after - before).max() < 6.0


def test_augment_batch_never_changes_colours():
    # a uniform skin-coloured image stays exactly that colour whatever geometry is applied
    tones = np.array([[246, 237, 228], [160, 126, 86], [41, 36, 32]], np.uint8)
    uniform = np.broadcast_to(tones[:, None, None, :], (3, S, S, 3)).copy()
    assert np.array_equal(augment_batch(uniform, np.random.default_rng(1)), uniform)
    # without the crop, the output is a pure rearrangement of each image's pixels
    batch = _skin_batch(6)
    out = augment_batch(batch, np.random.default_rng(2), min_crop_fraction=1.0)
    for src, dst in zip(batch, out):
        assert np.array_equal(np.sort(src.reshape(-1, 3), axis=0), np.sort(dst.reshape(-1, 3), axis=0))


def test_augment_batch_rejects_non_square_or_float_batches():
    with pytest.raises(ValueError):
        augment_batch(np.zeros((2, S, S + 1, 3), np.uint8), np.random.default_rng(0))
    with pytest.raises(ValueError):
        augment_batch(np.zeros((2, S, S, 3), np.float32), np.random.default_rng(0))


# ---------------------------------------------------------------------------------------- keras sequence


@pytest.fixture(scope="module")
def sequence_class():
    import keras

    cls = image_cache.CachedImageSequence
    assert issubclass(cls, keras.utils.PyDataset)
    assert cls is image_cache.CachedImageSequence  # built once
    return cls


def _numbered_images(n: int) -> np.ndarray:
    # image k is filled with the value k, so a batch tells which rows it holds
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 8, 8, 3)).copy()


def test_sequence_batches_shapes_and_dtypes(sequence_class):
    images = _numbered_images(10)
    seq = sequence_class(images, np.arange(10) % 3, 4)
    assert len(seq) == 3
    x, y = seq[0]
    assert x.dtype == np.uint8 and x.shape == (4, 8, 8, 3) and y.dtype == np.int32
    assert list(x[:, 0, 0, 0]) == [0, 1, 2, 3] and list(y) == [0, 1, 2, 0]
    x_last, y_last = seq[2]
    assert x_last.shape == (2, 8, 8, 3) and list(y_last) == [2, 0]
    with pytest.raises(IndexError):
        seq[3]


def test_sequence_shuffle_is_a_deterministic_function_of_seed_and_epoch(sequence_class):
    images, y = _numbered_images(12), np.arange(12)

    def epoch_order(seq):
        return np.concatenate([seq[i][1] for i in range(len(seq))])

    a = sequence_class(images, y, 5, shuffle=True, seed=3)
    b = sequence_class(images, y, 5, shuffle=True, seed=3)
    e0 = epoch_order(a)
    assert sorted(e0) == list(range(12)) and not np.array_equal(e0, np.arange(12))
    assert np.array_equal(e0, epoch_order(b))
    a.on_epoch_end()
    e1 = epoch_order(a)
    assert not np.array_equal(e0, e1) and sorted(e1) == list(range(12))
    b.set_epoch(1)
    assert np.array_equal(e1, epoch_order(b))
    for i in range(len(a)):  # labels stay with their images
        x, yy = a[i]
        assert np.array_equal(x[:, 0, 0, 0], yy)
    unshuffled = sequence_class(images, y, 5, seed=3)
    unshuffled.on_epoch_end()
    assert np.array_equal(epoch_order(unshuffled), np.arange(12))


def test_sequence_augments_only_when_asked_and_reproducibly(sequence_class):
    images = _skin_batch(8)
    plain = sequence_class(images, np.zeros(8, int), 4)
    assert np.array_equal(plain[1][0], images[4:])
    aug1 = sequence_class(images, np.zeros(8, int), 4, augment=True, seed=1)
    aug2 = sequence_class(images, np.zeros(8, int), 4, augment=True, seed=1)
    assert not np.array_equal(aug1[1][0], images[4:])
    assert np.array_equal(aug1[1][0], aug2[1][0])  # same (seed, epoch, batch): same batch
    first = aug1[0][0]
    aug1.on_epoch_end()
    assert not np.array_equal(aug1[0][0], first)  # a new epoch draws new augmentations


def test_sequence_with_metadata_yields_named_inputs(sequence_class):
    images = _numbered_images(6)
    metadata = np.arange(12, dtype=np.float64).reshape(6, 2)
    seq = sequence_class(images, np.arange(6), 4, shuffle=True, seed=2, metadata=metadata)
    inputs, y = seq[0]
    assert set(inputs) == {"image", "metadata"}
    assert inputs["metadata"].dtype == np.float32 and inputs["metadata"].shape == (4, 2)
    assert np.array_equal(inputs["image"][:, 0, 0, 0], y)
    assert np.array_equal(inputs["metadata"][:, 0], 2 * y)  # metadata rows follow their images


def test_sequence_without_labels_yields_inputs_only(sequence_class):
    seq = sequence_class(_numbered_images(5), None, 2)
    assert isinstance(seq[0], np.ndarray) and seq[0].shape == (2, 8, 8, 3)


def test_sequence_rejects_mismatched_inputs(sequence_class):
    images = _numbered_images(4)
    with pytest.raises(ValueError, match="y has shape"):
        sequence_class(images, np.arange(3), 2)
    with pytest.raises(ValueError, match="metadata has shape"):
        sequence_class(images, np.arange(4), 2, metadata=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="uint8 images"):
        sequence_class(images.astype(np.float32), np.arange(4), 2)
    with pytest.raises(ValueError, match="integer class indices"):
        sequence_class(images, np.linspace(0, 1, 4), 2)


def test_sequence_feeds_keras_fit_one_whole_shuffled_epoch_at_a_time(sequence_class):
    import keras

    seen: list[tuple[int, int, np.ndarray]] = []

    class Logged(sequence_class):
        def __getitem__(self, index):
            batch = super().__getitem__(index)
            seen.append((self.epoch, index, batch[0]["image"][:, 0, 0, 0].copy()))
            return batch

    n = 8
    images = _numbered_images(n)
    inputs = keras.Input((8, 8, 3), name="image", dtype="uint8")
    metadata_in = keras.Input((2,), name="metadata")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    x = keras.layers.Concatenate()([x, metadata_in])
    model = keras.Model({"image": inputs, "metadata": metadata_in}, keras.layers.Dense(2, activation="softmax")(x))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    seq = Logged(images, np.arange(n) % 2, 3, shuffle=True, seed=4, metadata=np.zeros((n, 2)))
    history = model.fit(seq, epochs=2, verbose=0, shuffle=False)
    assert len(history.history["loss"]) == 2
    epochs = sorted({e for e, _, _ in seen})
    assert len(epochs) >= 2
    reference = sequence_class(images, np.arange(n), 3, shuffle=True, seed=4)
    for epoch in epochs[-2:]:  # the two trained epochs: every image once, in that epoch's order
        fed = [ids for e, _, ids in sorted(((e, i, ids) for e, i, ids in seen if e == epoch), key=lambda t: t[1])]
        order = np.concatenate(fed)
        assert sorted(order) == list(range(n))
        reference.set_epoch(epoch)
        assert np.array_equal(order, np.concatenate([reference[i][1] for i in range(len(reference))]))


def test_importing_the_module_does_not_import_keras():
    import subprocess
    import sys

    code = (
        "import sys; import scin_pipeline.core.image_cache as m; "
        "assert 'keras' not in sys.modules, 'keras imported at module import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
