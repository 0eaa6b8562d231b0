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
- :func:`preprocess_image_bytes` (uploads) and :func:`preprocess_image_file` (one file) run the same
  guarded decode (the rules of :mod:`scin_pipeline.core.imageio`: zero bytes, wrong magic,
  header-declared decompression bomb, truncation, all refused before any pixel buffer exists) and raise
  :class:`ImagePreprocessError` naming the upload or file. Both decode at full size, never OpenCV's
  reduced decode, so a file and its bytes give bit-identical pixels (no train/serve skew).

The cache, one folder per image size::

    <cache_dir>/<S>px/q<partition>-<content key>.npy   uint8 (n, S, S, 3): kept images of one quality partition

- Written by the quality stage from its one decode per image (``core.quality.assess_image`` with
  ``tensor_sizes``: the tensor is ``preprocess_image`` of the full-size pixels, exactly what
  :func:`preprocess_image_file` gives): the pipeline decodes each image once. Its workers hand each
  image's tensors back with its row; :class:`TensorSpool` appends them to a spool and, once the quality
  rule has decided, copies the kept images into shards (excluded images are not cached). The quality
  table records, per image, where its tensors are (``TENSOR_COLUMNS``: status, reason, shard, offset,
  sizes); ``image_tensors`` is an index over them (:func:`tensor_index`), one row per kept image,
  labelled or not, with no split: an image re-split is the same pixels in the same shard.
- A shard's file name carries its *content key*: a hash of ``CACHE_FORMAT_VERSION``, the quality
  partition and, per image (:func:`tensor_item_key`), the image id, its resolved path, file size and
  mtime (stat only: hashing the bytes would cost a fair share of a decode; a file rewritten with the
  same size inside the same mtime tick would go unnoticed, which atomic writers such as the ingest stage
  never do); S is the folder. Bump ``CACHE_FORMAT_VERSION`` whenever :func:`preprocess_image` changes
  what it produces.
- Rows are chunked per partition in image-id order (not input order). A shard already on disk under
  its name is kept as it is, not rewritten; ``image_tensors`` never decodes (a rerun of it reads the
  quality table and checks each shard's header). A quality partition re-run decodes its images for its
  metrics anyway, so nothing is saved by reusing single images from old shards.
- Shards are written to a temp file (``core.atomic``), fsynced and renamed into place. Shards no quality
  row names any more are removed by ``image_tensors`` (:func:`remove_unreferenced_shards`) after it has
  read the new quality table, so an index stays readable until the next index replaces it. One writer
  per folder at a time (the Dagster materialisations); concurrent writers are not coordinated.
- A file that does not decode is excluded by the quality rule (its decode status is the reason) and
  never reaches the cache; a kept image whose tensor could not be made or whose shard is unreadable is
  an index row with status "failed" and a reason; it is absent from the shards and nothing else is
  affected.

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
import math
import os
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np
import pandas as pd
import PIL.Image

from scin_pipeline.core.atomic import TMP_PREFIX, atomic_target, remove_orphaned_temp_files, temp_path
from scin_pipeline.core.imageio import (
    DEFAULT_MAX_PIXELS,
    decode_image,
    log_decode,
    pixel_limit_guard,
    read_png_layout,
    sniff_format,
)

# Bump when preprocess_image's output changes: every shard is then rebuilt. 2: shards per quality
# partition, written by the quality stage (1: per split, decoded a second time by image_tensors).
CACHE_FORMAT_VERSION = 2
DEFAULT_IMAGE_SIZE = 224
DEFAULT_SHARD_SIZE = 512
# image_tensors' table: one row per image kept by quality_filtered_index, labelled or not (no split:
# consumers join on image_id)
INDEX_COLUMNS = ("image_id", "shard", "offset", "status", "reason", "image_size")
# image_quality's columns saying where the quality stage put each image's tensors (TensorSpool.write_shards)
TENSOR_COLUMNS = ("tensor_status", "tensor_reason", "tensor_shard", "tensor_offset", "tensor_sizes")
TENSORS_KEY = "tensors"  # in a quality row (core.quality.assess_image): {size: (S, S, 3) uint8}
TENSOR_ERROR_KEY = "tensor_error"  # ... or why they could not be made
SERVABLE_FORMATS = ("PNG", "JPEG")  # what an upload may be; the cache reads whatever decode_image accepts
AUGMENT_MIN_CROP_FRACTION = 0.85
# counter-clockwise quarter turns, as np.rot90 counts them
_QUARTER_TURNS = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}

_MAX_PNG_DIMENSION = 2**31 - 1
_TMP_MARK = ".tmp-"  # in temp names of the former form <file>.tmp-<pid>-<thread>; swept
_FORMER_MANIFEST = "manifest.json"  # format 1's per-size manifest; swept
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+")
_COPY_BLOCK = 64  # spool rows copied into a shard at a time (bounds memory at any image size)
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
    log_decode(name)
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
# the cache: written by the quality stage from its one decode, indexed by image_tensors


def _size_folder(cache_dir: Path, image_size: int) -> Path:
    return Path(cache_dir) / f"{image_size}px"


def _sha(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(str(part).encode("utf-8"))
        h.update(b"\x1f")
    return h.hexdigest()


def tensor_item_key(image_id: str, local_path: Any) -> str:
    """What identifies one image's cached pixels: format version, id, resolved path, size + mtime of the
    file (the side S is the folder's name)."""
    if not isinstance(local_path, (str, os.PathLike)) or not str(local_path):
        return _sha(CACHE_FORMAT_VERSION, image_id, "no-path")[:32]
    path = os.path.abspath(os.fspath(local_path))
    try:
        st = os.stat(path)
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError as err:
        stamp = f"stat-error:{type(err).__name__}"
    return _sha(CACHE_FORMAT_VERSION, image_id, path, stamp)[:32]


def _shard_matches(path: Path, n_ok: int, image_size: int) -> bool:
    """The file is there and its header says what its name promises (guards against a torn file)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except _UNREADABLE_NPY:
        return False
    return arr.dtype == np.uint8 and arr.shape == (n_ok, image_size, image_size, 3)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_shard(target: Path, spool: np.ndarray, slots: list[int], image_size: int) -> None:
    """Rows ``slots`` of the spool as one .npy shard: a temp file (core.atomic) filled through a memory map
    a block at a time, flushed to disk, renamed into place."""
    with atomic_target(target, sweep=False) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(slots), image_size, image_size, 3))
        for start in range(0, len(slots), _COPY_BLOCK):
            out[start : start + _COPY_BLOCK] = spool[slots[start : start + _COPY_BLOCK]]
        out.flush()
        del out
        _fsync(tmp)


def _plain_name(value: str, what: str) -> str:
    if not _PLAIN_NAME.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not a plain name ([A-Za-z0-9_]): it becomes part of a file name")
    return value


class TensorSpool:
    """The training tensors of a quality run, from its one decode per image, into the shards of the cache.

    The quality rule decides which images it keeps only once every image is measured (an image of unknown
    Monk tone is judged against the run's median lightness), while the tensors come out of its workers
    image by image, and excluded images are not cached. So the tensors are first appended to a spool,
    one temp file per size in its size folder (core.atomic's naming: a killed run's spool is swept by the
    next writer), and :meth:`write_shards` then copies the kept ones into the shards; the spool is removed
    when the ``with`` block ends. Memory: one image at a time in, a block of rows at a time out (both files
    memory-mapped); disk: the spool holds every decoded image until the shards are written.

    Use: ``with TensorSpool(cache_dir, sizes) as spool:``, ``rows = spool.take(assess_images(...))`` (pops
    each row's tensors, ``TENSORS_KEY``, and remembers ``TENSOR_ERROR_KEY``), then
    ``spool.write_shards(decided)``.
    """

    def __init__(self, cache_dir: Path, sizes: Iterable[int]):
        self.cache_dir = Path(cache_dir)
        self.sizes = tuple(dict.fromkeys(_check_image_size(s) for s in sizes))  # config order, no repeats
        self._slots: dict[str, int] = {}
        self._errors: dict[str, str] = {}
        self._files: dict[int, tuple[Path, BinaryIO]] = {}

    def __enter__(self) -> TensorSpool:
        try:
            for size in self.sizes:
                folder = _size_folder(self.cache_dir, size)
                folder.mkdir(parents=True, exist_ok=True)
                remove_orphaned_temp_files(folder)  # a killed run's spool; live writers' files stay
                path = temp_path(folder, suffix=".spool", label="spool")
                self._files[size] = (path, open(path, "xb"))  # noqa: SIM115 - closed in __exit__
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for path, fh in self._files.values():
            fh.close()
            path.unlink(missing_ok=True)
        self._files.clear()

    def add(self, image_id: str, tensors: dict[int, np.ndarray]) -> None:
        """Append one image's tensors, one per size."""
        if image_id in self._slots:
            raise ValueError(f"TensorSpool: image {image_id!r} was already added")
        for size in self.sizes:
            arr = tensors.get(size)
            if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.shape != (size, size, 3):
                desc = f"{arr.shape} {arr.dtype}" if isinstance(arr, np.ndarray) else repr(arr)
                raise ValueError(f"TensorSpool: image {image_id!r} has no ({size}, {size}, 3) uint8 tensor: {desc}")
            self._files[size][1].write(np.ascontiguousarray(arr).data)
        self._slots[image_id] = len(self._slots)

    def take(self, rows: Iterable[dict]) -> Iterator[dict]:
        """The rows of ``quality.assess_images``, their tensors moved into the spool (never held in a list)."""
        for row in rows:
            tensors = row.pop(TENSORS_KEY, None)
            error = row.pop(TENSOR_ERROR_KEY, None)
            if tensors is not None and self.sizes:
                self.add(str(row["image_id"]), tensors)
            elif error:
                self._errors[str(row["image_id"])] = str(error)
            yield row

    def _spool_arrays(self) -> dict[int, np.ndarray]:
        n = len(self._slots)
        arrays = {}
        for size, (path, fh) in self._files.items():
            fh.flush()
            if n:
                arrays[size] = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, size, size, 3))
        return arrays

    def write_shards(self, decided: pd.DataFrame, *, shard_size: int = DEFAULT_SHARD_SIZE) -> pd.DataFrame:
        """Write the kept images' tensors into shards; return, per row of ``decided``, ``TENSOR_COLUMNS``.

        ``decided``: image_id, local_path, partition (the quality stage's shard of the image: shards never
        mix partitions, so a partition re-run alone rewrites only its own), keep. Per partition, the kept
        images in image-id order, ``shard_size`` per shard, the same shard file name in every size folder:
        ``q<partition>-<content key>.npy``, the key a hash of the format version, the partition and every
        image's :func:`tensor_item_key`. A shard already there under its name (same inputs: same pixels) is
        kept as it is, not rewritten. Excluded images and images without tensors get no row in any shard.
        """
        missing = {"image_id", "local_path", "partition", "keep"} - set(decided.columns)
        if missing:
            raise ValueError(f"write_shards: decided lacks column(s) {sorted(missing)}")
        if int(shard_size) < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        ids = decided["image_id"].astype(str)
        if ids.duplicated().any():
            raise ValueError(f"write_shards: duplicate image_id(s) {sorted(set(ids[ids.duplicated()]))[:5]}")
        keep = decided["keep"].fillna(False).astype(bool).to_numpy()
        sizes_text = ",".join(str(s) for s in self.sizes)
        not_cached = (
            "not_cached: no tensor was made from this image (it did not decode)"
            if self.sizes
            else "not_cached: image_quality.tensor_sizes is empty"
        )
        status: list[str] = ["not_cached" if k else "excluded" for k in keep]
        reason: list[str | None] = [
            not_cached if k else "excluded by the quality rule: excluded images are not cached" for k in keep
        ]
        shard: list[str | None] = [None] * len(decided)
        offset: list[int] = [-1] * len(decided)
        position = {image_id: k for k, image_id in enumerate(ids)}
        for image_id, error in self._errors.items():
            k = position.get(image_id)
            if k is not None and keep[k]:
                status[k], reason[k] = "failed", error
        if self.sizes:
            spools = self._spool_arrays()
            cached = decided.assign(image_id=ids)[keep & ids.isin(self._slots).to_numpy()]
            for partition in sorted(cached["partition"].astype(str).unique()):
                _plain_name(partition, "partition")
                part = cached[cached["partition"].astype(str) == partition].sort_values("image_id", kind="stable")
                for start in range(0, len(part), int(shard_size)):
                    chunk = part.iloc[start : start + int(shard_size)]
                    keys = [tensor_item_key(i, p) for i, p in zip(chunk["image_id"], chunk["local_path"])]
                    file = f"q{partition}-{_sha(CACHE_FORMAT_VERSION, partition, *keys)[:20]}.npy"
                    slots = [self._slots[i] for i in chunk["image_id"]]
                    for size in self.sizes:
                        target = _size_folder(self.cache_dir, size) / file
                        if not _shard_matches(target, len(slots), size):
                            _write_shard(target, spools[size], slots, size)
                    for k, image_id in enumerate(chunk["image_id"]):
                        row = position[image_id]
                        status[row], reason[row], shard[row], offset[row] = "ok", None, file, k
            spools.clear()
        frame = pd.DataFrame(
            {
                "image_id": ids.to_numpy(),
                "tensor_status": status,
                "tensor_reason": reason,
                "tensor_shard": shard,
                "tensor_offset": offset,
                "tensor_sizes": [sizes_text if st == "ok" else None for st in status],
            }
        )
        frame["tensor_offset"] = frame["tensor_offset"].astype("int64")
        return frame


def cached_sizes(image_quality: pd.DataFrame) -> list[int]:
    """The tensor sizes image_quality wrote, in its configured order (the most common list first)."""
    if "tensor_sizes" not in image_quality:
        return []
    lists = image_quality.loc[image_quality["tensor_status"] == "ok", "tensor_sizes"].dropna().astype(str)
    sizes: dict[int, None] = {}
    for text in lists.value_counts().index:
        sizes.update({int(s): None for s in text.split(",") if s})
    return list(sizes)


def _sizes_of(text: Any) -> set[int]:
    return {int(s) for s in text.split(",") if s.isdigit()} if isinstance(text, str) else set()


def tensor_index(
    kept_ids: Iterable[str], image_quality: pd.DataFrame, cache_dir: Path, image_size: int
) -> pd.DataFrame:
    """The index (``INDEX_COLUMNS``) of the ``image_size`` px tensors of every image in ``kept_ids`` (first
    occurrence order, repeats dropped), from where the quality stage put them (its ``TENSOR_COLUMNS``).

    Status "ok" with shard (path relative to ``cache_dir``) and offset; "failed" (shard None, offset -1)
    with the reason: the quality stage could not make the tensor, did not cache this size, never assessed
    the image, or its shard is missing or torn (every shard named is checked, header only).
    """
    size = _check_image_size(image_size)
    missing = {"image_id", *TENSOR_COLUMNS} - set(image_quality.columns)
    if missing:
        raise ValueError(
            f"tensor_index: image_quality lacks column(s) {sorted(missing)}: it was materialised before it wrote "
            "the training tensors; materialise image_quality again"
        )
    ids = pd.Series(list(kept_ids), dtype=object).astype(str).drop_duplicates().reset_index(drop=True)
    placed = image_quality.drop_duplicates("image_id").assign(image_id=lambda f: f["image_id"].astype(str))
    placed = placed.set_index("image_id").reindex(ids)
    folder = _size_folder(Path(cache_dir), size)
    shard_ok: dict[str, str | None] = {}  # shard file -> None when readable, else why not
    ok_rows = placed.loc[placed["tensor_status"] == "ok"]
    rows_needed = {str(f): int(n) + 1 for f, n in ok_rows.groupby("tensor_shard")["tensor_offset"].max().items()}
    records = []
    for image_id, status, reason_given, file, offset, sizes_text in zip(
        ids.tolist(),
        placed["tensor_status"].tolist(),
        placed["tensor_reason"].tolist(),
        placed["tensor_shard"].tolist(),
        placed["tensor_offset"].tolist(),
        placed["tensor_sizes"].tolist(),
    ):
        sizes = _sizes_of(sizes_text)
        reason = None
        if not isinstance(status, str):
            reason = f"not_assessed: image {image_id} has no image_quality row"
        elif status != "ok":
            reason = str(reason_given or status)
        elif size not in sizes:
            reason = (
                f"not_cached: image_quality cached image {image_id} at {sorted(sizes)} px, not {size} px "
                "(add it to image_quality's tensor_sizes)"
            )
        else:
            if file not in shard_ok:
                shard_ok[file] = None
                path = folder / str(file)
                try:
                    arr = np.load(path, mmap_mode="r")
                    if arr.dtype != np.uint8 or arr.shape[1:] != (size, size, 3) or len(arr) < rows_needed[file]:
                        shard_ok[file] = f"shard_unreadable: {path} holds {arr.shape} {arr.dtype}"
                    del arr
                except _UNREADABLE_NPY as err:
                    shard_ok[file] = f"shard_unreadable: {path}: {err}"
            reason = shard_ok[file]
        ok = reason is None
        records.append(
            (
                image_id,
                f"{folder.name}/{file}" if ok else None,
                int(offset) if ok else -1,
                "ok" if ok else "failed",
                reason,
                size,
            )
        )
    index = pd.DataFrame.from_records(records, columns=list(INDEX_COLUMNS))
    index["offset"] = index["offset"].astype("int64")
    index["image_size"] = index["image_size"].astype("int64")
    return index


def referenced_shards(image_quality: pd.DataFrame) -> set[str]:
    """Every shard file image_quality's rows name, as ``<S>px/<file>`` for each size they were cached at."""
    if "tensor_shard" not in image_quality:
        return set()
    ok = image_quality[image_quality["tensor_status"] == "ok"]
    pairs = ok[["tensor_sizes", "tensor_shard"]].drop_duplicates()
    return {f"{size}px/{file}" for text, file in pairs.itertuples(index=False) for size in str(text).split(",") if size}


def remove_unreferenced_shards(cache_dir: Path, referenced: set[str]) -> list[Path]:
    """Delete the .npy files of every ``<S>px`` folder of ``cache_dir`` not in ``referenced`` (as
    ``<S>px/<file>``), a manifest of the former split-keyed layout, and dead writers' temp files; return
    what was removed. Live writers' temp files (a quality run's spool) stay. One writer per cache folder at
    a time: a shard written by a quality run that this index has not read yet would be removed."""
    removed = []
    for folder in sorted(p for p in Path(cache_dir).glob("*px") if p.is_dir() and p.name[:-2].isdigit()):
        removed += remove_orphaned_temp_files(folder)
        for path in folder.iterdir():
            if path.name.startswith(TMP_PREFIX) or not path.is_file():
                continue
            stale_shard = path.suffix == ".npy" and f"{folder.name}/{path.name}" not in referenced
            if stale_shard or path.name == _FORMER_MANIFEST or _TMP_MARK in path.name:
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


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
    their class indices, in a fixed order. The split comes from ``labeled_splits``; ``image_tensors`` (every
    kept image, labelled or not) is joined on image_id."""
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
