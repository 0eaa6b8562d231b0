"""Decode once, train many times: a compact uint8 cache of square images, and the readers over it.

The same preprocessing serves training, evaluation and the web service (issue 7), so that a model never
sees pixels prepared differently from the ones it was trained on:

- :func:`preprocess_image`: the largest centred square of the photo, resized to ``S x S`` (224 px by
  default). Equivalent to "resize the shorter side to S, then centre-crop", done crop-first because that
  resizes fewer pixels and bounds memory for freak aspect ratios (the two differ by under half a source
  pixel in where the crop starts). Aspect ratio is kept, so round lesions stay round instead of being
  squashed into ellipses; the cost is the two ends of the long side, which in phone photos of skin are
  mostly background (the photographer centres the lesion). ``cv2.INTER_AREA`` when shrinking (it
  averages every source pixel, no aliasing of skin texture), ``cv2.INTER_LINEAR`` when enlarging (AREA
  degenerates to nearest-neighbour-like steps there).
- :func:`preprocess_image_bytes` (uploads) and :func:`preprocess_image_file` (the cache builder) run the
  same guarded decode (the rules of :mod:`scin_pipeline.core.imageio`: zero bytes, wrong magic,
  header-declared decompression bomb, truncation, all refused before any pixel buffer exists) and raise
  :class:`ImagePreprocessError` naming the upload or file. Both decode at full size, never OpenCV's
  reduced decode, so a file and its bytes give bit-identical pixels (no train/serve skew).

The cache (:func:`build_image_cache`), one folder per image size::

    <cache_dir>/<S>px/<split>-<content key>.npy   uint8 (n, S, S, 3), one per shard, grouped by split
    <cache_dir>/<S>px/manifest.json               shards, and per image: its key, offset or failure

- A shard's file name carries its *content key*: a hash of ``CACHE_FORMAT_VERSION``, S, the split and,
  per image, the image id, its resolved path, file size and mtime (stat only: hashing the bytes would cost
  a fair share of the decode it is meant to save; a file rewritten with the same size inside the same
  mtime tick would go unnoticed, which atomic writers such as the ingest stage never do). Bump
  ``CACHE_FORMAT_VERSION`` whenever :func:`preprocess_image` changes what it produces.
- Rows are chunked per split in image-id order (not input order, so a reordered table reuses
  everything). A rerun with the same inputs finds every shard by name and decodes nothing. After a
  change, an unchanged shard is reused as is; a changed shard is rewritten, but only its new or changed
  images are decoded, the others are copied from the old shards (memory-mapped), so decode work is
  proportional to what changed. Failures are remembered by the same per-image key and not retried.
- Shards are written to a temp file (``core.atomic``), fsynced and renamed into place, then the manifest
  the same way, and only then are shard files of this size folder that the manifest does not name
  removed. A crash leaves either the old manifest with its shards or the new one with its shards. One
  builder per folder at a time (the Dagster asset materialisation); concurrent builders are not
  coordinated.
- At most one shard of pixels is held in memory (plus one full-size photo per decode thread).
- A file that does not decode becomes an index row with status "failed" and a reason ("<kind>: <reason
  naming the file>"); it is absent from the shards and nothing else is affected.
- Decoding runs in a thread pool: OpenCV releases the GIL inside imdecode/resize, so threads scale
  without the pickling and start-up cost of processes.

Readers: :func:`load_images` (index order, memory-mapped shard reads), :func:`augment_batch` (geometry
only: flips, quarter turns, a small crop-zoom; never brightness, contrast, hue or saturation, so skin
tone cannot shift), and ``CachedImageSequence`` (a ``keras.utils.PyDataset``). The class is built on
first attribute access (module ``__getattr__``) rather than at import: importing keras fixes the backend
from ``KERAS_BACKEND``, and a caller must still be able to choose it after importing this module.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import PIL.Image

from scin_pipeline.core.atomic import TMP_PREFIX, atomic_target, remove_orphaned_temp_files
from scin_pipeline.core.imageio import (
    DEFAULT_MAX_PIXELS,
    decode_image,
    pixel_limit_guard,
    read_png_layout,
    sniff_format,
)

CACHE_FORMAT_VERSION = 1  # bump when preprocess_image's output changes: every shard is then rebuilt
DEFAULT_IMAGE_SIZE = 224
DEFAULT_SHARD_SIZE = 512
MANIFEST_NAME = "manifest.json"
INDEX_COLUMNS = ("image_id", "split", "shard", "offset", "status", "reason", "image_size")
SERVABLE_FORMATS = ("PNG", "JPEG")  # what an upload may be; the cache reads whatever decode_image accepts
AUGMENT_MIN_CROP_FRACTION = 0.85
# counter-clockwise quarter turns, as np.rot90 counts them
_QUARTER_TURNS = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}

_MAX_PNG_DIMENSION = 2**31 - 1
_TMP_MARK = ".tmp-"  # in temp names of the former form <file>.tmp-<pid>-<thread>; swept
_UNREADABLE_NPY = (OSError, ValueError, EOFError)  # what np.load raises for a missing, torn or foreign file


class ImagePreprocessError(ValueError):
    """An image that cannot be preprocessed. ``kind`` is a decode status of core.imageio (e.g.
    "empty_file", "truncated", "decompression_bomb", "corrupt") or "unsupported_format"."""

    def __init__(self, message: str, kind: str = "corrupt"):
        super().__init__(message)
        self.kind = kind


# --------------------------------------------------------------------------------------------------
# preprocessing


def _check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return int(image_size)


def preprocess_image(rgb: np.ndarray, image_size: int) -> np.ndarray:
    """The largest centred square of an H x W x 3 uint8 RGB image, resized to (S, S, 3) uint8.

    See the module docstring for why (aspect kept, lesions not squashed) and the interpolation choice.
    """
    size = _check_image_size(image_size)
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        desc = f"{rgb.shape} {rgb.dtype}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"preprocess_image expects an H x W x 3 uint8 RGB array, got {desc}")
    height, width = rgb.shape[:2]
    side = min(height, width)
    if side == 0:
        raise ValueError(f"preprocess_image got an empty image of shape {rgb.shape}")
    top, left = (height - side) // 2, (width - side) // 2
    square = rgb[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(square)
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(square), (size, size), interpolation=interpolation)


_GUARD_LOCK = threading.Lock()
_GUARD_SET = False


def _ensure_pixel_limit_guard() -> None:
    # OpenCV reads its pixel limit once, at its first decode in the process: set it before ours.
    global _GUARD_SET
    with _GUARD_LOCK:
        if not _GUARD_SET:
            pixel_limit_guard(DEFAULT_MAX_PIXELS)
            _GUARD_SET = True


def decode_bytes_rgb(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """core.imageio.decode_image's checks, in its order, for bytes held in memory (uploads); RGB uint8.

    decode_image reads a path; a web upload is bytes, and writing it to a temp file just to read it back
    would be pointless I/O. The building blocks (sniff_format, read_png_layout, the pixel limit) are
    imageio's own; only PNG and JPEG are served.
    """
    buf = np.frombuffer(memoryview(data), dtype=np.uint8)
    n_bytes = int(buf.size)
    if n_bytes == 0:
        raise ImagePreprocessError(f"{name}: empty file (0 bytes)", "empty_file")
    fmt = sniff_format(buf)
    if fmt is None:
        head = bytes(buf[:8]).hex(" ")
        raise ImagePreprocessError(f"{name}: not an image (no known signature; first bytes {head})", "corrupt")
    if fmt not in SERVABLE_FORMATS:
        raise ImagePreprocessError(f"{name}: {fmt} images are not accepted (PNG or JPEG only)", "unsupported_format")
    if fmt == "PNG":
        if n_bytes < 33:  # signature (8) + IHDR chunk (25)
            raise ImagePreprocessError(
                f"{name}: truncated PNG: file ends after {n_bytes} bytes, inside the header", "truncated"
            )
        layout = read_png_layout(buf)
        if layout is None:
            raise ImagePreprocessError(f"{name}: PNG signature but no IHDR chunk", "corrupt")
        width, height = layout.width, layout.height
        if not (0 < width <= _MAX_PNG_DIMENSION and 0 < height <= _MAX_PNG_DIMENSION):
            raise ImagePreprocessError(f"{name}: IHDR declares an invalid size {width} x {height}", "corrupt")
        if width * height > max_pixels:
            raise ImagePreprocessError(
                f"{name}: IHDR declares {width} x {height} = {width * height:,} pixels, over the limit of "
                f"{max_pixels:,} ({n_bytes:,} bytes); not decoded",
                "decompression_bomb",
            )
        if not layout.complete:
            raise ImagePreprocessError(f"{name}: truncated PNG: {layout.problem}", "truncated")
        if layout.problem:
            raise ImagePreprocessError(f"{name}: {layout.problem}", "corrupt")
    else:  # JPEG: PIL reads only the header here (lazy decode)
        try:
            with PIL.Image.open(io.BytesIO(data)) as im:
                width, height = int(im.width), int(im.height)
        except PIL.Image.DecompressionBombError as err:
            raise ImagePreprocessError(f"{name}: {err}; not decoded", "decompression_bomb") from None
        except Exception as err:  # noqa: BLE001 - any header parse failure means the bytes are bad
            raise ImagePreprocessError(f"{name}: unreadable JPEG header: {err}", "corrupt") from None
        if width * height > max_pixels:
            raise ImagePreprocessError(
                f"{name}: header declares {width} x {height} = {width * height:,} pixels, over the limit of "
                f"{max_pixels:,}; not decoded",
                "decompression_bomb",
            )
        # libjpeg fills a cut-off JPEG with grey and only warns, so look for the end-of-image marker.
        if bytes(buf[-2:]) != b"\xff\xd9" and b"\xff\xd9" not in bytes(buf[-64:]):
            raise ImagePreprocessError(f"{name}: truncated JPEG: no end-of-image marker in the last bytes", "truncated")
    _ensure_pixel_limit_guard()
    try:
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as err:
        raise ImagePreprocessError(f"{name}: decoder error: {str(err).strip()}", "corrupt") from None
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
        raise ImagePreprocessError(f"{name}: {fmt} decoder failed (bad CRC or compressed data)", "corrupt")
    if fmt == "PNG" and (bgr.shape[1], bgr.shape[0]) != (width, height):
        raise ImagePreprocessError(
            f"{name}: decoded {bgr.shape[1]} x {bgr.shape[0]}, header says {width} x {height}", "corrupt"
        )
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def preprocess_image_bytes(data: bytes, image_size: int, *, name: str = "upload") -> np.ndarray:
    """Guarded decode of PNG or JPEG bytes, then :func:`preprocess_image`: (S, S, 3) uint8 RGB.

    Raises :class:`ImagePreprocessError` (a ValueError) whose message starts with ``name``.
    """
    size = _check_image_size(image_size)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImagePreprocessError(f"{name}: expected image bytes, got {type(data).__name__}", "corrupt")
    return preprocess_image(decode_bytes_rgb(bytes(data), name), size)


def preprocess_image_file(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """:func:`core.imageio.decode_image` (full size) then :func:`preprocess_image`: (S, S, 3) uint8 RGB.

    Raises :class:`ImagePreprocessError` with decode_image's status as ``kind`` and its reason (which
    names the file) as the message.
    """
    size = _check_image_size(image_size)
    _ensure_pixel_limit_guard()
    decoded = decode_image(path)
    if not decoded.ok:
        raise ImagePreprocessError(decoded.reason or f"{path}: {decoded.status}", decoded.status)
    assert decoded.rgb is not None  # DecodedImage sets rgb whenever ok
    return preprocess_image(decoded.rgb, size)


# --------------------------------------------------------------------------------------------------
# the cache


def _size_folder(cache_dir: Path, image_size: int) -> Path:
    return Path(cache_dir) / f"{image_size}px"


def _sha(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(str(part).encode("utf-8"))
        h.update(b"\x1f")
    return h.hexdigest()


def _item_key(image_id: str, local_path: Any, image_size: int) -> str:
    """What identifies one image's cached pixels: id, path, size + mtime of the file, S, format version."""
    if not isinstance(local_path, (str, os.PathLike)) or not str(local_path):
        return _sha(CACHE_FORMAT_VERSION, image_size, image_id, "no-path")
    path = os.path.abspath(os.fspath(local_path))
    try:
        st = os.stat(path)
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError as err:
        stamp = f"stat-error:{type(err).__name__}"
    return _sha(CACHE_FORMAT_VERSION, image_size, image_id, path, stamp)[:32]


def _validate_rows(rows: pd.DataFrame) -> pd.DataFrame:
    missing = {"image_id", "local_path", "split"} - set(rows.columns)
    if missing:
        raise ValueError(f"build_image_cache: rows lack column(s) {sorted(missing)}")
    ids = rows["image_id"].astype(str)
    dup = ids[ids.duplicated()]
    if len(dup):
        raise ValueError(f"build_image_cache: duplicate image_id(s) {sorted(set(dup))[:5]}")
    bad_split = rows["split"].isna() | (rows["split"].astype(str).str.len() == 0)
    if bad_split.any():
        raise ValueError(f"build_image_cache: image_id {ids[bad_split].iloc[0]!r} has no split")
    splits = rows["split"].astype(str)
    unsafe = splits[~splits.str.fullmatch(r"[A-Za-z0-9_]+")]
    if len(unsafe):  # the split becomes part of a file name
        raise ValueError(f"build_image_cache: split {unsafe.iloc[0]!r} is not a plain name ([A-Za-z0-9_])")
    return pd.DataFrame(
        {"image_id": ids.to_numpy(), "split": splits.to_numpy(), "local_path": rows["local_path"].to_numpy()}
    )


def _decode_one(local_path: Any, image_id: str, image_size: int) -> tuple[np.ndarray | None, str | None]:
    if not isinstance(local_path, (str, os.PathLike)) or not str(local_path):
        return None, f"missing: image {image_id!r} has no local_path"
    try:
        return preprocess_image_file(local_path, image_size), None
    except ImagePreprocessError as err:
        return None, f"{err.kind}: {err}"


def _read_manifest(folder: Path, image_size: int) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("cache_format_version") != CACHE_FORMAT_VERSION or manifest.get("image_size") != image_size:
        return None
    return manifest


def _shard_matches(path: Path, n_ok: int, image_size: int) -> bool:
    """The file is there and its header says what the manifest expects (guards against a torn file)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except _UNREADABLE_NPY:
        return False
    return arr.dtype == np.uint8 and arr.shape == (n_ok, image_size, image_size, 3)


def _atomic_write(target: Path, write) -> None:
    """``write(handle)`` into a temp file beside ``target`` (core.atomic), flushed to disk, renamed into place."""
    with atomic_target(target) as tmp, open(tmp, "xb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def build_image_cache(
    rows: pd.DataFrame,
    cache_dir: Path,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int = 2,
    on_shard: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """Decode and preprocess every row's ``local_path`` once into uint8 shards; return the index.

    ``rows``: image_id, local_path, split (other columns ignored). The index has one row per input row,
    in input order, with columns ``INDEX_COLUMNS``: shard (path relative to ``cache_dir``) and offset
    (row in that shard) for status "ok"; shard None, offset -1 and a reason for status "failed".
    ``on_shard(n)`` is called after each shard with its number of rows (progress).
    """
    size = _check_image_size(image_size)
    if int(shard_size) < 1 or int(workers) < 1:
        raise ValueError(f"shard_size and workers must be >= 1, got {shard_size} and {workers}")
    table = _validate_rows(rows)
    folder = _size_folder(Path(cache_dir), size)
    folder.mkdir(parents=True, exist_ok=True)

    old = _read_manifest(folder, size)
    old_shards = {s["key"]: s for s in (old or {}).get("shards", [])}
    old_items: dict[str, tuple[str, int | None, str | None]] = {}  # item key -> (file, offset, reason)
    for shard in (old or {}).get("shards", []):
        for item in shard["items"]:
            old_items[item["item_key"]] = (shard["file"], item["offset"], item["reason"])

    table["item_key"] = [_item_key(i, p, size) for i, p in zip(table["image_id"], table["local_path"])]
    new_shards: list[dict] = []
    placement: dict[str, tuple[str | None, int, str | None]] = {}  # image_id -> (file, offset, reason)
    pool = ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix="image-cache") if workers > 1 else None
    try:
        for split in sorted(table["split"].unique()):
            part = table[table["split"] == split].sort_values("image_id", kind="stable")
            for start in range(0, len(part), int(shard_size)):
                chunk = part.iloc[start : start + int(shard_size)]
                key = _sha(CACHE_FORMAT_VERSION, size, split, *chunk["item_key"])[:20]
                file = f"{split}-{key}.npy"
                previous = old_shards.get(key)
                if (
                    previous is not None
                    and previous["file"] == file
                    and _shard_matches(folder / file, previous["n_ok"], size)
                ):
                    entry = previous  # identical inputs: nothing to decode or write
                else:
                    entry = _write_shard(folder, file, key, split, chunk, size, old_items, pool)
                new_shards.append(entry)
                if on_shard is not None:
                    on_shard(len(chunk))
                for item in entry["items"]:
                    placement[item["image_id"]] = (
                        file if item["offset"] is not None else None,
                        item["offset"],
                        item["reason"],
                    )
    finally:
        if pool is not None:
            pool.shutdown(wait=True)

    manifest = {
        "cache_format_version": CACHE_FORMAT_VERSION,
        "image_size": size,
        "shard_size": int(shard_size),
        "n_images": int(len(table)),
        "n_ok": int(sum(s["n_ok"] for s in new_shards)),
        "shards": new_shards,
    }
    _atomic_write(
        folder / MANIFEST_NAME, lambda fh: fh.write(json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8"))
    )
    referenced = {s["file"] for s in new_shards}
    remove_orphaned_temp_files(folder)  # core.atomic's temp files go when their writer is dead, not before
    for stale in folder.iterdir():
        if stale.name.startswith(TMP_PREFIX):
            continue
        # unreferenced shards, and temp files of the former naming (<file>.tmp-<pid>-<thread>)
        if stale.is_file() and ((stale.suffix == ".npy" and stale.name not in referenced) or _TMP_MARK in stale.name):
            stale.unlink(missing_ok=True)

    shard_rel = {f: f"{folder.name}/{f}" for f in referenced}
    records = []
    for image_id, split in zip(table["image_id"], table["split"]):
        file, offset, reason = placement[image_id]
        ok = offset is not None
        records.append(
            (
                image_id,
                split,
                shard_rel[file] if ok else None,
                int(offset) if ok else -1,
                "ok" if ok else "failed",
                None if ok else reason,
                size,
            )
        )
    index = pd.DataFrame.from_records(records, columns=list(INDEX_COLUMNS))
    index["offset"] = index["offset"].astype("int64")
    index["image_size"] = index["image_size"].astype("int64")
    return index


def _write_shard(
    folder: Path,
    file: str,
    key: str,
    split: str,
    chunk: pd.DataFrame,
    size: int,
    old_items: dict,
    pool: ThreadPoolExecutor | None,
) -> dict:
    """Fill one shard: reuse old pixels/failures by item key, decode the rest; write it atomically."""
    n = len(chunk)
    # Every image goes straight into its slot of the one shard-sized buffer; failures are squeezed out
    # at the end (in place), so no second shard-sized list of images ever exists.
    pixels = np.empty((n, size, size, 3), dtype=np.uint8)
    reasons: list[str | None] = [None] * n
    to_decode: list[int] = []
    old_arrays: dict[str, np.ndarray | None] = {}
    for i, item_key in enumerate(chunk["item_key"]):
        known = old_items.get(item_key)
        if known is None:
            to_decode.append(i)
            continue
        old_file, old_offset, old_reason = known
        if old_offset is None:
            reasons[i] = old_reason  # failed before with identical inputs: same verdict, not retried
            continue
        if old_file not in old_arrays:
            try:
                old_arrays[old_file] = np.load(folder / old_file, mmap_mode="r")
            except _UNREADABLE_NPY:
                old_arrays[old_file] = None
        arr = old_arrays[old_file]
        if arr is None or old_offset >= len(arr) or arr.shape[1:] != (size, size, 3):
            to_decode.append(i)
        else:
            pixels[i] = arr[old_offset]
    old_arrays.clear()

    paths = chunk["local_path"].to_numpy()
    ids = chunk["image_id"].to_numpy()
    args = [(paths[i], ids[i], size) for i in to_decode]
    decoded = pool.map(lambda a: _decode_one(*a), args) if pool is not None else (_decode_one(*a) for a in args)
    for i, (rgb, reason) in zip(to_decode, decoded):
        if rgb is None:
            reasons[i] = reason
        else:
            pixels[i] = rgb

    items = []
    n_ok = 0
    for i, (image_id, item_key) in enumerate(zip(ids, chunk["item_key"])):
        if reasons[i] is None:
            if n_ok != i:
                pixels[n_ok] = pixels[i]  # n_ok < i: the slot is already consumed
            items.append({"image_id": image_id, "item_key": item_key, "offset": n_ok, "status": "ok", "reason": None})
            n_ok += 1
        else:
            items.append(
                {"image_id": image_id, "item_key": item_key, "offset": None, "status": "failed", "reason": reasons[i]}
            )
    _atomic_write(folder / file, lambda fh: np.save(fh, pixels[:n_ok], allow_pickle=False))
    return {"file": file, "key": key, "split": split, "n_ok": n_ok, "items": items}


def load_images(index: pd.DataFrame, cache_dir: Path) -> np.ndarray:
    """The cached images of the index's status-"ok" rows, in index order: uint8 (N, S, S, 3).

    Each shard is memory-mapped and only the rows asked for are read (in offset order, the cheap way
    for a memmap), so a subset of the index reads only its own pixels.
    """
    missing = {"shard", "offset", "status", "image_size"} - set(index.columns)
    if missing:
        raise ValueError(f"load_images: index lacks column(s) {sorted(missing)}")
    ok = index[index["status"] == "ok"]
    sizes = sorted({int(s) for s in ok["image_size"]})
    if len(sizes) > 1:
        raise ValueError(f"load_images: index mixes image sizes {sizes}")
    size = sizes[0] if sizes else int(index["image_size"].iloc[0]) if len(index) else DEFAULT_IMAGE_SIZE
    out = np.empty((len(ok), size, size, 3), dtype=np.uint8)
    positions = np.arange(len(ok))
    shards = ok["shard"].to_numpy()
    offsets = ok["offset"].to_numpy(dtype=np.int64)
    for shard in pd.unique(shards):
        path = Path(cache_dir) / str(shard)
        try:
            arr = np.load(path, mmap_mode="r")
        except _UNREADABLE_NPY as err:
            raise FileNotFoundError(f"load_images: cannot read shard {path}: {err}") from None
        mine = shards == shard
        pos, off = positions[mine], offsets[mine]
        if arr.shape[1:] != (size, size, 3) or (len(off) and (off.min() < 0 or off.max() >= len(arr))):
            raise ValueError(
                f"load_images: shard {path} has shape {arr.shape}; the index asks for offsets "
                f"{off.min()}..{off.max()} of {size} px images (stale index?)"
            )
        order = np.argsort(off, kind="stable")
        out[pos[order]] = arr[off[order]]
        del arr
    return out


def split_rows(
    labeled_splits: pd.DataFrame, image_tensors: pd.DataFrame, split: str, classes: list[str]
) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows of one split that have cached pixels (one row per image and case, with shard and offset) and
    their class indices, in a fixed order."""
    ok = image_tensors[image_tensors["status"] == "ok"][["image_id", "shard", "offset", "status", "image_size"]]
    rows = labeled_splits[labeled_splits["split"].astype(str) == split][["image_id", "case_id", "label"]]
    rows = rows.merge(ok, on="image_id").sort_values(["case_id", "image_id"]).reset_index(drop=True)
    y = rows["label"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy(np.int32)
    return rows, y


def split_arrays(
    labeled_splits: pd.DataFrame, image_tensors: pd.DataFrame, cache_dir: Path, split: str, classes: list[str]
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """``split_rows`` plus the rows' uint8 images from the cache."""
    rows, y = split_rows(labeled_splits, image_tensors, split, classes)
    images = load_images(rows, cache_dir) if len(rows) else np.zeros((0, 1, 1, 3), np.uint8)
    return rows, images, y


# --------------------------------------------------------------------------------------------------
# augmentation and the Keras sequence


def augment_batch(
    batch: np.ndarray, rng: np.random.Generator, *, min_crop_fraction: float = AUGMENT_MIN_CROP_FRACTION
) -> np.ndarray:
    """Geometry-only augmentation of a uint8 (B, S, S, 3) batch; a new array, same shape and dtype.

    Per image: a horizontal flip (p = 0.5) and 0-3 quarter turns (together all 8 flips and rotations of
    the square, uniformly: a vertical flip is a horizontal flip plus a half turn), then a random square
    crop of ``min_crop_fraction``-100 % of the side, resized back to S (bilinear). Skin photos have no
    canonical orientation, so these are label-preserving; the crop-zoom is kept small so that a lesion
    near the edge stays in frame. No brightness, contrast, hue or saturation change: skin tone is a
    fairness attribute here, and colour jitter would move images between tones.
    """
    if (
        not isinstance(batch, np.ndarray)
        or batch.dtype != np.uint8
        or batch.ndim != 4
        or batch.shape[3] != 3
        or batch.shape[1] != batch.shape[2]
    ):
        desc = f"{batch.shape} {batch.dtype}" if isinstance(batch, np.ndarray) else type(batch).__name__
        raise ValueError(f"augment_batch expects a uint8 (B, S, S, 3) array, got {desc}")
    if not 0.0 < min_crop_fraction <= 1.0:
        raise ValueError(f"min_crop_fraction must be in (0, 1], got {min_crop_fraction}")
    size = batch.shape[1]
    out = np.empty_like(batch)
    for i in range(len(batch)):
        # Draw every number for every image, whatever is applied, so the stream stays aligned.
        flip = rng.random() < 0.5
        turns = int(rng.integers(0, 4))
        fraction = rng.uniform(min_crop_fraction, 1.0)
        corner = rng.random(2)
        # cv2.flip / cv2.rotate rather than numpy views: copying a negatively strided view is ~3x slower
        img = np.ascontiguousarray(batch[i])
        if flip:
            img = cv2.flip(img, 1)
        if turns:
            img = cv2.rotate(img, _QUARTER_TURNS[turns])
        side = max(1, min(size, int(round(fraction * size))))
        if side < size:
            top, left = (int(c * (size - side + 1)) for c in corner)
            cv2.resize(
                img[top : top + side, left : left + side], (size, size), dst=out[i], interpolation=cv2.INTER_LINEAR
            )
        else:
            out[i] = img
    return out


def _as_uint8_images(images: Any) -> np.ndarray:
    arr = images if isinstance(images, np.ndarray) else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] != 3:
        raise ValueError(f"CachedImageSequence expects uint8 images (N, S, S, 3), got {arr.shape} {arr.dtype}")
    return arr


@functools.cache
def _cached_image_sequence_class() -> type:
    import keras  # here, not at module top: see the module docstring (KERAS_BACKEND stays choosable)

    class CachedImageSequence(keras.utils.PyDataset):
        """Batches of cached uint8 images (the model rescales inside) with int32 labels.

        ``shuffle``: a new order every epoch, a pure function of (seed, epoch). ``augment``: geometry-only
        :func:`augment_batch`, its randomness a pure function of (seed, epoch, batch index), so batches are
        reproducible whatever order Keras or its workers ask for them. ``metadata`` (N, F): inputs become
        ``{"image": x, "metadata": float32 m}``. ``y=None``: batches hold inputs only (prediction).

        ``epoch`` advances in ``on_epoch_end``, where Keras has already stopped its prefetching workers
        (advancing in ``on_epoch_begin`` would race with them). ``fit`` also calls ``on_epoch_end`` once
        before its first epoch, so a fit's epochs use orders 1, 2, ...; what matters is that each order
        is a pure function of (seed, epoch). ``set_epoch`` sets it (e.g. on resume). Pass
        ``shuffle=False`` to ``fit``: this sequence shuffles samples itself, and Keras' own batch-order
        shuffle draws from Python's global ``random``. Extra keyword arguments (workers,
        use_multiprocessing, max_queue_size) go to PyDataset.
        """

        def __init__(
            self,
            images: np.ndarray,
            y: np.ndarray | None,
            batch_size: int,
            *,
            shuffle: bool = False,
            augment: bool = False,
            seed: int = 0,
            metadata: np.ndarray | None = None,
            **kwargs,
        ):
            super().__init__(**kwargs)
            self.images = _as_uint8_images(images)
            n = len(self.images)
            if y is not None:
                y = np.asarray(y)
                if y.ndim != 1 or len(y) != n:
                    raise ValueError(f"CachedImageSequence: y has shape {y.shape}, expected ({n},)")
                if not np.issubdtype(y.dtype, np.integer):
                    raise ValueError(f"CachedImageSequence: y must be integer class indices, got {y.dtype}")
                y = y.astype(np.int32)
            if metadata is not None:
                metadata = np.asarray(metadata, dtype=np.float32)
                if metadata.ndim != 2 or len(metadata) != n:
                    raise ValueError(f"CachedImageSequence: metadata has shape {metadata.shape}, expected ({n}, F)")
            if isinstance(batch_size, bool) or int(batch_size) < 1:
                raise ValueError(f"CachedImageSequence: batch_size must be >= 1, got {batch_size!r}")
            if isinstance(seed, bool) or int(seed) < 0:
                raise ValueError(f"CachedImageSequence: seed must be a non-negative int, got {seed!r}")
            self.y = y
            self.metadata = metadata
            self.batch_size = int(batch_size)
            self.shuffle = bool(shuffle)
            self.augment = bool(augment)
            self.seed = int(seed)
            self.set_epoch(0)

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)
            n = len(self.images)
            self._order = (
                np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
            )

        def __len__(self) -> int:
            return math.ceil(len(self.images) / self.batch_size)

        def __getitem__(self, index: int):
            if not 0 <= index < len(self):
                raise IndexError(f"batch {index} out of range (0..{len(self) - 1})")
            rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
            x = self.images[rows]
            if self.augment:
                x = augment_batch(x, np.random.default_rng([self.seed, self.epoch, index]))
            inputs = x if self.metadata is None else {"image": x, "metadata": self.metadata[rows]}
            return inputs if self.y is None else (inputs, self.y[rows])

        def on_epoch_end(self) -> None:
            self.set_epoch(self.epoch + 1)

    CachedImageSequence.__module__ = __name__
    return CachedImageSequence


def __getattr__(name: str):  # PEP 562: build the keras class on first use, not at import
    if name == "CachedImageSequence":
        return _cached_image_sequence_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
