"""The decoded image cache: preprocessing, guarded decode of uploads, shards + index, reuse, readers.

All images are SYNTHETIC (drawn skin from scin_pipeline.core.synthetic or plain arrays), 64-96 px, cached
at 32 px.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pandas as pd
import pytest

from scin_pipeline.core import image_cache
from scin_pipeline.core.atomic import TMP_PREFIX, writer_namespace
from scin_pipeline.core.image_cache import (
    INDEX_COLUMNS,
    TENSOR_ERROR_KEY,
    TENSORS_KEY,
    ImagePreprocessError,
    TensorSpool,
    augment_batch,
    load_images,
    preprocess_image,
    preprocess_image_bytes,
    preprocess_image_file,
    referenced_shards,
    remove_unreferenced_shards,
    split_arrays,
    split_rows,
    tensor_index,
)
from scin_pipeline.core.quality import QualityConfig, assess_images, assessments_frame
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
    """n PNGs, landscape and portrait; rows with image_id, local_path, split and a quality partition."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        size = (96, 72) if i % 2 else (64, 80)  # landscape and portrait
        path = folder / f"{1000 + i}.png"
        path.write_bytes(png_bytes(synthetic_skin(i, size)))
        rows.append(
            {"image_id": str(1000 + i), "local_path": str(path), "split": split_of(i), "partition": f"0{i % 2}"}
        )
    return pd.DataFrame(rows)


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


def quality_run(cache, rows: pd.DataFrame, *, sizes=(S,), keep=None, shard_size: int = 512):
    """What the quality stage does: assess every row (in this process) with tensors, spool them, write the
    kept ones into shards; its table with ``TENSOR_COLUMNS``. ``keep``: image ids kept (default all that
    decoded)."""
    config = QualityConfig(tensor_sizes=tuple(sizes))
    items = list(zip(rows["image_id"], rows["local_path"]))
    with TensorSpool(cache, config.tensor_sizes) as spool:
        frame = assessments_frame(spool.take(assess_images(items, config=config, workers=0)))
        decided = frame.assign(
            local_path=rows["local_path"].to_numpy(),
            partition=rows["partition"].to_numpy(),
            keep=frame["decode_status"].eq("ok") if keep is None else frame["image_id"].isin(keep),
        )
        placed = spool.write_shards(decided[["image_id", "local_path", "partition", "keep"]], shard_size=shard_size)
    return pd.concat([decided, placed.drop(columns=["image_id"])], axis=1)


def shard_names(cache, size=S) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (cache / f"{size}px").iterdir()}


def test_kept_images_go_into_partition_shards_bit_identical_to_a_separate_decode(tmp_path):
    rows = write_images(tmp_path / "img", 10)
    cache = tmp_path / "cache"
    quality = quality_run(cache, rows, sizes=(S, 16), shard_size=2)
    assert (quality["tensor_status"] == "ok").all() and (quality["tensor_sizes"] == f"{S},16").all()
    for (shard, partition), group in quality.groupby(["tensor_shard", "partition"]):
        assert shard.startswith(f"q{partition}-") and len(group) <= 2  # one partition per shard, shard_size
        assert sorted(group["tensor_offset"]) == list(range(len(group)))
        assert list(group.sort_values("tensor_offset")["image_id"]) == sorted(group["image_id"])  # id order
    assert quality.groupby("tensor_shard")["partition"].nunique().max() == 1
    for size in (S, 16):
        index = tensor_index(rows["image_id"], quality, cache, size)
        assert list(index.columns) == list(INDEX_COLUMNS) and list(index["image_id"]) == list(rows["image_id"])
        assert (index["status"] == "ok").all() and index["reason"].isna().all() and (index["image_size"] == size).all()
        images = load_images(index, cache)
        assert images.shape == (10, size, size, 3) and images.dtype == np.uint8
        for k, path in enumerate(rows["local_path"]):
            assert np.array_equal(images[k], preprocess_image_file(path, size))  # the old path's pixels
        subset = index.iloc[[7, 2, 5]]  # any subset, in any order, comes back in that order
        assert np.array_equal(load_images(subset, cache), images[[7, 2, 5]])
    # the spool is gone: only shards remain
    assert all(name.endswith(".npy") and name.startswith("q") for name in shard_names(cache))


def test_excluded_and_undecodable_images_are_not_cached(tmp_path):
    rows = write_images(tmp_path / "img", 6)
    bad = tmp_path / "img" / "9000.png"
    bad.write_bytes(png_bytes(synthetic_skin(9))[:100])
    rows.loc[len(rows)] = {"image_id": "9000", "local_path": str(bad), "split": "train", "partition": "01"}
    cache = tmp_path / "cache"
    quality = quality_run(cache, rows, keep={"1000", "1002", "1003", "1005", "9000"}).set_index("image_id")
    assert quality.loc["9000", "decode_status"] == "truncated"
    # 9000 is "kept" by the caller's table, but it never decoded: nothing to cache
    assert list(quality["tensor_status"]) == ["ok", "excluded", "ok", "ok", "excluded", "ok", "not_cached"]
    assert quality.loc[["1001", "1004"], "tensor_shard"].isna().all()
    assert sum(np.load(cache / f"{S}px" / f).shape[0] for f in shard_names(cache)) == 4
    index = tensor_index(["1000", "1001", "9000"], quality.reset_index(), cache, S).set_index("image_id")
    assert list(index["status"]) == ["ok", "failed", "failed"]
    assert index.loc["1001", "reason"].startswith("excluded by the quality rule")
    assert index.loc["9000", "reason"] == "not_cached: no tensor was made from this image (it did not decode)"


def test_same_inputs_find_their_shards_and_write_nothing(tmp_path):
    rows = write_images(tmp_path / "img", 7)
    cache = tmp_path / "cache"
    first = quality_run(cache, rows, shard_size=2)
    before = shard_names(cache)
    second = quality_run(cache, rows.sample(frac=1.0, random_state=3).reset_index(drop=True), shard_size=2)
    assert shard_names(cache) == before  # every shard found under its name, none rewritten
    columns = ["image_id", "tensor_status", "tensor_shard", "tensor_offset"]
    pd.testing.assert_frame_equal(
        second[columns].sort_values("image_id").reset_index(drop=True),
        first[columns].sort_values("image_id").reset_index(drop=True),
    )


def test_a_changed_file_gets_a_new_shard_and_the_index_sweeps_the_stale_one(tmp_path):
    rows = write_images(tmp_path / "img", 8)
    cache = tmp_path / "cache"
    quality_run(cache, rows, sizes=(S, 16), shard_size=3)
    before = set(shard_names(cache))
    (cache / f"{S}px" / "manifest.json").write_text("{}")  # format 1's layout
    (cache / f"{S}px" / "train-0123.npy").write_bytes(b"junk")
    (cache / f"{S}px" / "train-x.npy.tmp-1-2").write_bytes(b"junk")  # a temp file of the former naming
    dead = cache / f"{S}px" / f"{TMP_PREFIX}4194399@{writer_namespace()}-spool-abc.spool"  # a killed run's spool
    dead.write_bytes(b"junk")

    changed = rows.loc[4, "local_path"]
    new_rgb = synthetic_skin(99, (80, 80))
    with open(changed, "wb") as fh:
        fh.write(png_bytes(new_rgb))
    os.utime(changed, ns=(1, 1))  # a different mtime even on coarse-clock filesystems
    quality = quality_run(cache, rows, sizes=(S,), shard_size=3)  # 16 px dropped from the sizes
    index = tensor_index(rows["image_id"], quality, cache, S)
    assert np.array_equal(load_images(index, cache)[4], preprocess_image(new_rgb, S))
    now = set(shard_names(cache))
    assert before & now and now - before  # unchanged shards kept, the changed one written anew

    removed = remove_unreferenced_shards(cache, referenced_shards(quality))
    kept = {f"{S}px/{f}" for f in quality["tensor_shard"].unique()}
    left = {f"{p.parent.name}/{p.name}" for p in cache.glob("*px/*")}
    assert left == kept and not dead.exists()
    assert {p.name for p in removed} >= {"manifest.json", "train-0123.npy", "train-x.npy.tmp-1-2"}
    assert not list((cache / "16px").iterdir())  # a size no quality row names any more
    assert np.array_equal(load_images(index, cache)[4], preprocess_image(new_rgb, S))


def test_a_torn_shard_is_rewritten_not_reused(tmp_path):
    rows = write_images(tmp_path / "img", 3)
    cache = tmp_path / "cache"
    quality = quality_run(cache, rows)
    for shard in quality["tensor_shard"].unique():
        (cache / f"{S}px" / shard).write_bytes(b"")
    again = quality_run(cache, rows)
    assert load_images(tensor_index(rows["image_id"], again, cache, S), cache).shape == (3, S, S, 3)


def test_index_rows_for_what_could_not_be_served_say_why(tmp_path):
    rows = write_images(tmp_path / "img", 6, split_of=lambda i: "train")
    rows["partition"] = "00"
    cache = tmp_path / "cache"
    quality = quality_run(cache, rows.iloc[:4], shard_size=2)
    quality.loc[quality["image_id"] == "1003", ["tensor_status", "tensor_reason"]] = [
        "failed",
        "tensor_failed: preprocessing failed: ValueError: boom",
    ]
    kept = ["1000", "1001", "1002", "1003", "1005", "1000"]  # a repeat (a file shared by two cases) is one row
    index = tensor_index(kept, quality, cache, S).set_index("image_id")
    assert list(index.index) == ["1000", "1001", "1002", "1003", "1005"]
    assert index.loc["1003", "reason"] == "tensor_failed: preprocessing failed: ValueError: boom"
    assert index.loc["1005", "reason"] == "not_assessed: image 1005 has no image_quality row"
    failed = index[index["status"] == "failed"]
    assert failed["shard"].isna().all() and (failed["offset"] == -1).all()
    # a size the quality stage did not cache, and a shard that went missing
    assert tensor_index(["1000"], quality, cache, 16)["reason"].iloc[0].startswith("not_cached: ")
    # shards of two: (1000, 1001) and (1002, 1003); the second goes missing under an index made before
    lost = quality.set_index("image_id").loc["1002", "tensor_shard"]
    stale = tensor_index(["1000", "1002"], quality, cache, S)
    (cache / f"{S}px" / lost).unlink()
    with pytest.raises(FileNotFoundError, match=lost):
        load_images(stale, cache)
    index = tensor_index(kept, quality, cache, S).set_index("image_id")
    assert index.loc["1002", "reason"].startswith("shard_unreadable: ") and lost in index.loc["1002", "reason"]
    assert index.loc["1000", "status"] == "ok"


def test_a_tensor_error_from_the_worker_is_a_failure_record_and_the_rest_is_cached(tmp_path):
    rows = write_images(tmp_path / "img", 3)
    cache = tmp_path / "cache"
    with TensorSpool(cache, (S,)) as spool:
        assessed = [
            {"image_id": "1000", TENSORS_KEY: {S: preprocess_image_file(rows.loc[0, "local_path"], S)}},
            {"image_id": "1001", TENSORS_KEY: None, TENSOR_ERROR_KEY: "tensor_failed: preprocessing failed: boom"},
            {"image_id": "1002", TENSORS_KEY: {S: preprocess_image_file(rows.loc[2, "local_path"], S)}},
        ]
        taken = list(spool.take(assessed))
        assert all(set(row) == {"image_id"} for row in taken)  # the pixels stay in the spool
        placed = spool.write_shards(rows.assign(keep=True)[["image_id", "local_path", "partition", "keep"]])
    by_id = placed.set_index("image_id")
    assert list(by_id["tensor_status"]) == ["ok", "failed", "ok"]
    assert by_id.loc["1001", "tensor_reason"] == "tensor_failed: preprocessing failed: boom"


def test_bad_inputs_are_refused_naming_what_is_wrong(tmp_path):
    rows = write_images(tmp_path / "img", 2)
    with TensorSpool(tmp_path / "cache", (S,)) as spool:
        with pytest.raises(ValueError, match=r"image '1000' has no \(32, 32, 3\) uint8 tensor"):
            spool.add("1000", {S: np.zeros((16, 16, 3), np.uint8)})
        spool.add("1000", {S: np.zeros((S, S, 3), np.uint8)})
        with pytest.raises(ValueError, match="already added"):
            spool.add("1000", {S: np.zeros((S, S, 3), np.uint8)})
        with pytest.raises(ValueError, match="partition"):
            spool.write_shards(rows[["image_id", "local_path"]])
        with pytest.raises(ValueError, match="not a plain name"):
            spool.write_shards(
                rows.assign(keep=True, partition="../x")[["image_id", "local_path", "partition", "keep"]]
            )
    with pytest.raises(ValueError, match="materialise image_quality again"):
        tensor_index(["1"], pd.DataFrame({"image_id": ["1"]}), tmp_path, S)


def _labeled_cache(tmp_path):
    """A cache of six images and a labeled_splits table over them: image 1001 is shared by two cases,
    1002's tensor failed, 9999 was never cached."""
    rows = write_images(tmp_path / "img", 6)
    quality = quality_run(tmp_path / "cache", rows, shard_size=2)
    index = tensor_index(rows["image_id"], quality, tmp_path / "cache", S)
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
