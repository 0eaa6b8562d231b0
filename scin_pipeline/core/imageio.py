"""Safe image decoding: every file gives a :class:`DecodedImage`, never an exception.

A photo that cannot be used is a normal outcome of a crawl of phone photos, not an error, so
:func:`decode_image` returns a status and a reason naming the file instead of raising. The checks run
cheapest first and nothing big is allocated before the file has shown that it is what it claims to be:

1. ``empty_file``: zero bytes.
2. magic bytes: ``wrong_format`` when the bytes are a known format other than the one the extension names
   (e.g. "JPEG bytes named .png"); ``corrupt`` when they are no known image format at all.
3. ``decompression_bomb``: the PNG IHDR (or, for other formats, the header PIL reads without decoding)
   declares more than ``max_pixels`` pixels. A 30000 x 30000 declaration is refused from its 33 header
   bytes, before any pixel buffer exists.
4. ``truncated``: a walk over the PNG chunk list (length + type, no payload read) that runs off the end of
   the file before IEND; for JPEG, no end-of-image marker. Such files are not handed to the decoder at all
   (libpng would only fail noisily on them).
5. decode from memory with ``cv2.imdecode(IMREAD_COLOR)`` (or at half size, see ``min_long_side``):
   16-bit samples come back as 8-bit, alpha is dropped, grey becomes 3 channels; then BGR -> RGB. A decoder
   failure on a structurally complete file (bad CRC, bad deflate stream, size mismatch) is ``corrupt``.

``missing`` (no such file) and ``unreadable`` (an OS error, e.g. permission or a directory) come from
reading the bytes; the file is read exactly once (``np.fromfile``) and decoded from that buffer.

Counting decodes: with the environment variable ``SCIN_PIPELINE_DECODE_LOG`` set to a file path, every
pixel decode (here and in ``core.image_cache.decode_bytes_rgb``) appends one line, ``<pid>\t<file>``, to
that file; worker processes inherit it. ``bench/image_cache.py`` and the tests count the pipeline's
decodes per image with it (the pipeline's promise: one). Unset, it costs one environment lookup.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import PIL.Image

DEFAULT_MAX_PIXELS = 50_000_000  # a 48 MP phone photo passes; 30000 x 30000 (900 MP) does not
DECODE_LOG_ENV = "SCIN_PIPELINE_DECODE_LOG"

# Every way a file can fail to decode; core.quality's keep/exclude rule uses these as its exclusion reasons.
DECODE_FAILURE_STATUSES = (
    "empty_file",
    "truncated",
    "corrupt",
    "wrong_format",
    "decompression_bomb",
    "unreadable",
    "missing",
)
DECODE_STATUSES = ("ok", *DECODE_FAILURE_STATUSES)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPE_MODE = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}  # named as PIL names the modes
_MAX_PNG_DIMENSION = 2**31 - 1  # the PNG spec's limit for width and height

# Extension -> the format its bytes must have. Anything else is accepted in whatever known format it is.
_FORMAT_OF_EXTENSION = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".gif": "GIF",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}


@dataclass(frozen=True)
class DecodedImage:
    """The outcome of decoding one file. ``rgb`` is set only when ``status == "ok"``."""

    status: str
    reason: str | None  # human text naming the file; None when ok
    rgb: np.ndarray | None  # H x W x 3 uint8, RGB order
    width: int | None  # as decoded, else as declared by the header, else None
    height: int | None
    format: str | None  # what the bytes are ("PNG", "JPEG", ...), None when unrecognised
    bytes: int | None  # file size; None when the file could not be read
    source_mode: str | None = None  # colour type of the file in PIL's names ("L", "RGB", "RGBA", "I;16"...)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def sniff_format(data: bytes | np.ndarray) -> str | None:
    """The image format the leading bytes announce, or None.

    Written here instead of using PIL's plugin registry: PIL's ``Image.open`` would also parse the header
    (and may allocate, e.g. a palette), while we need a pure look at a dozen bytes.
    """
    head = bytes(data[:16])
    if head.startswith(PNG_SIGNATURE):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"BM"):
        return "BMP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIF"
        if brand in (b"avif", b"avis"):
            return "AVIF"
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n"):
        return "JPEG2000"
    return None


@dataclass(frozen=True)
class PngLayout:
    """What the chunk walk learnt about a PNG without decoding it."""

    width: int
    height: int
    bit_depth: int
    color_type: int
    complete: bool  # IEND reached inside the file
    problem: str | None  # why it is not complete / not valid, None when fine

    @property
    def mode(self) -> str:
        base = _PNG_COLOR_TYPE_MODE.get(self.color_type, "?")
        return f"{base};16" if self.bit_depth == 16 else base


def read_png_layout(buf: np.ndarray | bytes) -> PngLayout | None:
    """Parse the IHDR and walk the chunk headers of a PNG held in memory; None when there is no IHDR.

    Written by hand (struct, a few lines) rather than asking a decoder: a decoder would allocate the
    declared pixel buffer before telling us the size, and a walk over chunk headers is the cheapest exact
    truncation test (each chunk's length says where the next must start; a file cut short runs out).
    """
    data = buf.data.cast("B") if isinstance(buf, np.ndarray) else memoryview(buf)
    n = len(data)
    if n < 33 or bytes(data[8:16]) != b"\x00\x00\x00\x0dIHDR":
        return None
    width, height, bit_depth, color_type = struct.unpack(">IIBB", data[16:26])

    def layout(complete: bool, problem: str | None) -> PngLayout:
        return PngLayout(width, height, bit_depth, color_type, complete, problem)

    pos = 8
    saw_idat = False
    while True:
        if pos + 8 > n:
            return layout(False, f"file ends after {n} bytes, inside a chunk header at offset {pos} (no IEND)")
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length  # length + type + data + CRC
        if end > n:
            name = ctype.decode("latin-1")
            return layout(
                False,
                f"chunk {name!r} at offset {pos} declares {length} bytes but the file ends after {n} bytes (no IEND)",
            )
        if ctype == b"IDAT":
            saw_idat = True
        if ctype == b"IEND":
            return layout(True, None if saw_idat else "no IDAT chunk before IEND")
        pos = end


def pixel_limit_guard(max_pixels: int = DEFAULT_MAX_PIXELS) -> int | None:
    """Make PIL and OpenCV refuse images at the same size :func:`decode_image` does; return PIL's old limit
    (None: PIL had no limit).

    PIL only *warns* above ``MAX_IMAGE_PIXELS`` and raises ``DecompressionBombError`` above twice that, so
    half our limit puts its hard refusal exactly where ours is. OpenCV reads ``OPENCV_IO_MAX_IMAGE_PIXELS``
    once, at its first decode in the process, so this must run before that (the quality workers call it
    in their initializer); our own header check stays the first line of defence either way.
    """
    previous = PIL.Image.MAX_IMAGE_PIXELS
    PIL.Image.MAX_IMAGE_PIXELS = max(1, int(max_pixels) // 2)
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(int(max_pixels))
    return previous


def log_decode(name: str) -> None:
    """One line per pixel decode in the file named by ``SCIN_PIPELINE_DECODE_LOG``, when it is set."""
    log = os.environ.get(DECODE_LOG_ENV)
    if log:
        with open(log, "a", encoding="utf-8") as fh:  # O_APPEND: lines of concurrent workers stay whole
            fh.write(f"{os.getpid()}\t{name}\n")


def reduced_decode_applies(fmt: str | None, width: int, height: int, min_long_side: int | None) -> bool:
    """Whether :func:`decode_image` decodes at half size for a caller that needs ``min_long_side`` px: a
    PNG whose long side is at least twice that (see ``decode_image``)."""
    return fmt == "PNG" and min_long_side is not None and max(width, height) >= 2 * min_long_side


def halve_as_reduced_decode(rgb: np.ndarray) -> np.ndarray:
    """What ``cv2.IMREAD_REDUCED_COLOR_2`` returns for a PNG, from its full-size decode, bit for bit.

    OpenCV's PNG decoder cannot decode at a reduced scale: imdecode decodes at full size, then resizes to
    (width // 2, height // 2) with ``INTER_LINEAR_EXACT`` (imgcodecs/loadsave.cpp). A caller that needs
    the full-size pixels as well (the quality stage writing the training tensors) decodes once at full
    size and halves with this, and gets the pixels a reduced decode would have given.
    """
    height, width = rgb.shape[:2]
    return cv2.resize(rgb, (width // 2, height // 2), interpolation=cv2.INTER_LINEAR_EXACT)


def _header_size_via_pil(data: np.ndarray) -> tuple[int, int, str]:
    # PIL's open() reads only the header (lazy decode); it raises DecompressionBombError itself above
    # 2 x MAX_IMAGE_PIXELS, which the caller treats like our own refusal.
    with PIL.Image.open(io.BytesIO(data.tobytes())) as im:
        return int(im.width), int(im.height), str(im.mode)


def decode_image(
    path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_long_side: int | None = None
) -> DecodedImage:
    """Decode one image file into RGB uint8 safely (see the module docstring for the order of checks).

    Never raises for anything about the file; the status says what went wrong and the reason names it.

    ``min_long_side``: for a caller that only needs a copy of at least this long side (the quality
    stage's working copy), a PNG whose long side is at least twice that is decoded at half size
    (OpenCV's reduced decode: each output pixel the mean of a 2 x 2 block, exactly so for even sizes), which
    saves a full-size pass and its memory. Only halving: OpenCV's 1/4 and 1/8 PNG reductions sample 2 of every 4 pixels
    per axis instead of averaging them. ``width`` and ``height`` always report the file's own size.
    """
    name = str(path)
    # What the checks have learnt so far; a refusal carries exactly that (the fields stay None until known).
    n_bytes: int | None = None
    fmt: str | None = None
    width: int | None = None
    height: int | None = None
    mode: str | None = None

    def refuse(status: str, detail: str) -> DecodedImage:
        # Reads the variables above when called, so each refusal reports what was known at that check.
        return DecodedImage(status, f"{name}: {detail}", None, width, height, fmt, n_bytes, mode)

    try:
        data = np.fromfile(name, dtype=np.uint8)  # one read; everything below works on this buffer
    except FileNotFoundError:
        return refuse("missing", "no such file")
    except (OSError, ValueError) as err:  # a directory, no permission, an I/O error
        return refuse("unreadable", f"cannot read: {err}")
    n_bytes = int(data.size)
    if n_bytes == 0:
        return refuse("empty_file", "empty file (0 bytes)")

    fmt = sniff_format(data)
    expected = _FORMAT_OF_EXTENSION.get(Path(name).suffix.lower())
    if fmt is None:
        return refuse("corrupt", f"not an image (no known signature; first bytes {bytes(data[:8]).hex(' ')})")
    if expected is not None and fmt != expected:
        return refuse("wrong_format", f"{fmt} bytes named {Path(name).suffix.lower()}")

    layout: PngLayout | None = None  # PNG only: its chunk walk, for the truncation checks below
    if fmt == "PNG":
        if n_bytes < 33:  # signature (8) + IHDR chunk (25)
            return refuse("truncated", f"truncated PNG: file ends after {n_bytes} bytes, inside the header")
        layout = read_png_layout(data)
        if layout is None:
            return refuse("corrupt", "PNG signature but no IHDR chunk")
        width, height, mode = layout.width, layout.height, layout.mode
        if not (0 < width <= _MAX_PNG_DIMENSION and 0 < height <= _MAX_PNG_DIMENSION):
            return refuse("corrupt", f"IHDR declares an invalid size {width} x {height}")
    else:
        try:
            width, height, mode = _header_size_via_pil(data)
        except PIL.Image.DecompressionBombError as err:
            return refuse("decompression_bomb", f"{err}; not decoded")
        except Exception as err:  # noqa: BLE001 - any header parse failure means the bytes are bad
            return refuse("corrupt", f"unreadable {fmt} header: {err}")
    if width * height > max_pixels:
        declared_by, on_disk = ("IHDR", f" ({n_bytes:,} bytes on disk)") if layout is not None else ("header", "")
        return refuse(
            "decompression_bomb",
            f"{declared_by} declares {width} x {height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,}{on_disk}; not decoded",
        )
    if layout is not None:
        if not layout.complete:
            return refuse("truncated", f"truncated PNG: {layout.problem}")
        if layout.problem:
            return refuse("corrupt", layout.problem)
    # libjpeg fills a cut-off JPEG with grey and only warns, so test for the end-of-image marker.
    if fmt == "JPEG" and bytes(data[-2:]) != b"\xff\xd9" and b"\xff\xd9" not in bytes(data[-64:]):
        return refuse("truncated", "truncated JPEG: no end-of-image marker in the last bytes")

    halve = reduced_decode_applies(fmt, width, height, min_long_side)
    log_decode(name)
    try:
        bgr = cv2.imdecode(data, cv2.IMREAD_REDUCED_COLOR_2 if halve else cv2.IMREAD_COLOR)
    except cv2.error as err:
        return refuse("corrupt", f"decoder error: {str(err).strip()}")
    if bgr is None:
        return refuse("corrupt", f"{fmt} decoder failed (bad CRC or compressed data)")
    if bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
        return refuse("corrupt", f"decoder returned shape {bgr.shape} {bgr.dtype}")
    expected_shape = (width // 2, height // 2) if halve else (width, height)
    if fmt == "PNG" and (bgr.shape[1], bgr.shape[0]) != expected_shape:
        return refuse("corrupt", f"decoded {bgr.shape[1]} x {bgr.shape[0]}, header says {width} x {height}")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if fmt != "PNG":  # the decoder applies EXIF orientation: report the size as decoded
        width, height = int(rgb.shape[1]), int(rgb.shape[0])
    return DecodedImage("ok", None, rgb, width, height, fmt, n_bytes, mode)
