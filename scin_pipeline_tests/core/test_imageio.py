"""Safe decoding: every kind of bad file gets its status and a reason naming it, and nothing raises."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import PIL.Image
import pytest

from scin_pipeline.core import imageio
from scin_pipeline.core.imageio import (
    DECODE_STATUSES,
    PNG_SIGNATURE,
    decode_image,
    pixel_limit_guard,
    read_png_layout,
    sniff_format,
)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid-looking PNG (correct CRCs) whose IHDR declares width x height RGB; two rows of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = b"\x00" * ((1 + 3 * width) * 2)
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows, 9)) + _chunk(b"IEND", b"")


@pytest.fixture
def rgb() -> np.ndarray:
    rng = np.random.default_rng(3)
    base = cv2.GaussianBlur(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), (0, 0), 2)
    return base


def _png_bytes(array: np.ndarray) -> bytes:
    img = array[..., ::-1] if array.ndim == 3 and array.shape[2] == 3 else array
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def test_valid_png_decodes_to_rgb(tmp_path, rgb):
    path = tmp_path / "1.png"
    path.write_bytes(_png_bytes(rgb))
    out = decode_image(path)
    assert out.status == "ok" and out.ok and out.reason is None
    assert out.rgb.dtype == np.uint8 and out.rgb.shape == (120, 160, 3)
    assert np.array_equal(out.rgb, rgb)  # RGB order, not BGR
    assert (out.width, out.height, out.format, out.source_mode) == (160, 120, "PNG", "RGB")
    assert out.bytes == path.stat().st_size


def test_zero_byte_file_is_empty_file(tmp_path):
    path = tmp_path / "0.png"
    path.write_bytes(b"")
    out = decode_image(path)
    assert out.status == "empty_file" and out.rgb is None and out.bytes == 0
    assert str(path) in out.reason


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.1])
def test_truncated_png_is_truncated(tmp_path, rgb, keep):
    data = _png_bytes(rgb)
    path = tmp_path / "2.png"
    path.write_bytes(data[: int(len(data) * keep)])
    out = decode_image(path)
    assert out.status == "truncated" and out.rgb is None
    assert str(path) in out.reason and "IEND" in out.reason


def test_png_cut_inside_its_header_is_truncated(tmp_path, rgb):
    path = tmp_path / "3.png"
    path.write_bytes(_png_bytes(rgb)[:20])
    assert decode_image(path).status == "truncated"


def test_jpeg_bytes_named_png_are_wrong_format(tmp_path, rgb):
    ok, buf = cv2.imencode(".jpg", rgb)
    path = tmp_path / "4.png"
    path.write_bytes(buf.tobytes())
    out = decode_image(path)
    assert out.status == "wrong_format" and out.format == "JPEG" and out.rgb is None
    assert "JPEG bytes named .png" in out.reason and str(path) in out.reason


def test_declared_30000_square_is_a_decompression_bomb_and_never_decoded(tmp_path, monkeypatch):
    path = tmp_path / "5.png"
    data = bomb_png()
    path.write_bytes(data)
    layout = read_png_layout(data)
    assert layout is not None and layout.complete and (layout.width, layout.height) == (30000, 30000)

    def refuse(*args, **kwargs):  # the decoder would allocate 2.7 GB: it must not even be called
        raise AssertionError("cv2.imdecode called on a decompression bomb")

    monkeypatch.setattr(imageio.cv2, "imdecode", refuse)
    out = decode_image(path)
    assert out.status == "decompression_bomb" and out.rgb is None
    assert (out.width, out.height) == (30000, 30000)
    assert "30000 x 30000" in out.reason and str(path) in out.reason


def test_max_pixels_is_the_limit(tmp_path, rgb):
    path = tmp_path / "6.png"
    path.write_bytes(_png_bytes(rgb))  # 160 x 120 = 19,200 pixels
    assert decode_image(path, max_pixels=19_200).status == "ok"
    assert decode_image(path, max_pixels=19_199).status == "decompression_bomb"


def test_random_bytes_are_corrupt_and_known_other_formats_wrong_format(tmp_path):
    rng = np.random.default_rng(0)
    noise = tmp_path / "7.png"
    noise.write_bytes(b"\x13\x37" + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    out = decode_image(noise)
    assert out.status == "corrupt" and "no known signature" in out.reason
    bmp = tmp_path / "8.png"
    bmp.write_bytes(b"BM" + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    out = decode_image(bmp)
    assert out.status == "wrong_format" and out.format == "BMP"


def test_bad_crc_in_image_data_is_corrupt(tmp_path, rgb):
    data = bytearray(_png_bytes(rgb))
    idat = data.find(b"IDAT")
    data[idat + 40] ^= 0xFF  # inside the compressed data: the chunk CRC no longer matches
    path = tmp_path / "9.png"
    path.write_bytes(bytes(data))
    out = decode_image(path)
    assert out.status == "corrupt" and out.rgb is None


def test_png_without_idat_is_corrupt(tmp_path):
    ihdr = struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0)
    path = tmp_path / "10.png"
    path.write_bytes(PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b""))
    assert decode_image(path).status == "corrupt"


def test_16_bit_alpha_grey_and_palette_pngs_become_8_bit_rgb(tmp_path, rgb):
    sixteen = rgb.astype(np.uint16) * 257
    p16 = tmp_path / "16.png"
    p16.write_bytes(_png_bytes(sixteen))
    out = decode_image(p16)
    assert out.status == "ok" and out.rgb.dtype == np.uint8 and out.source_mode == "RGB;16"
    assert np.abs(out.rgb.astype(int) - rgb).max() <= 1

    rgba = np.dstack([rgb[..., ::-1], np.full(rgb.shape[:2], 128, np.uint8)])  # BGRA for cv2
    ok, buf = cv2.imencode(".png", rgba)
    pa = tmp_path / "rgba.png"
    pa.write_bytes(buf.tobytes())
    out = decode_image(pa)
    assert out.status == "ok" and out.rgb.shape == (120, 160, 3) and out.source_mode == "RGBA"

    grey = rgb[..., 0]
    pg = tmp_path / "grey.png"
    pg.write_bytes(_png_bytes(grey))
    out = decode_image(pg)
    assert out.status == "ok" and out.rgb.shape == (120, 160, 3) and out.source_mode == "L"
    assert np.array_equal(out.rgb[..., 0], grey) and np.array_equal(out.rgb[..., 1], grey)

    pp = tmp_path / "palette.png"
    PIL.Image.fromarray(rgb).quantize(16).save(pp)
    out = decode_image(pp)
    assert out.status == "ok" and out.source_mode == "P" and out.rgb.shape == (120, 160, 3)


def test_jpeg_with_jpeg_name_decodes_and_a_cut_jpeg_is_truncated(tmp_path, rgb):
    ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    path = tmp_path / "11.jpg"
    path.write_bytes(buf.tobytes())
    out = decode_image(path)
    assert out.status == "ok" and out.format == "JPEG"
    assert np.abs(out.rgb.astype(int) - rgb).mean() < 3
    cut = tmp_path / "12.jpg"
    cut.write_bytes(buf.tobytes()[: len(buf) // 2])
    assert decode_image(cut).status == "truncated"


def test_missing_file_and_directory(tmp_path):
    out = decode_image(tmp_path / "nope.png")
    assert out.status == "missing" and "nope.png" in out.reason
    folder = tmp_path / "13.png"
    folder.mkdir()
    out = decode_image(folder)
    assert out.status == "unreadable" and str(folder) in out.reason


def test_sniff_format():
    assert sniff_format(PNG_SIGNATURE + b"rest") == "PNG"
    assert sniff_format(b"\xff\xd8\xff\xe0....") == "JPEG"
    assert sniff_format(b"GIF89a....") == "GIF"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WEBP"
    assert sniff_format(b"\x00\x00\x00\x18ftypheic") == "HEIF"
    assert sniff_format(b"hello world") is None


def test_no_mutation_of_a_valid_png_makes_decode_raise(tmp_path, rgb):
    # Cut at many offsets and flip bytes at many places: always a status, never an exception.
    data = _png_bytes(rgb)
    rng = np.random.default_rng(1)
    variants = [data[:k] for k in rng.integers(1, len(data), 25)]
    for _ in range(25):
        flipped = bytearray(data)
        for pos in rng.integers(0, len(data), 3):
            flipped[pos] ^= int(rng.integers(1, 256))
        variants.append(bytes(flipped))
    seen = set()
    for i, variant in enumerate(variants):
        path = tmp_path / f"m{i}.png"
        path.write_bytes(variant)
        out = decode_image(path)
        assert out.status in DECODE_STATUSES
        assert (out.rgb is not None) == (out.status == "ok")
        if out.status != "ok":
            assert str(path) in out.reason
        seen.add(out.status)
    assert "truncated" in seen and "corrupt" in seen


def test_pixel_limit_guard_makes_pil_refuse_at_the_same_limit(tmp_path, rgb, monkeypatch):
    path = tmp_path / "14.png"
    path.write_bytes(_png_bytes(rgb))  # 19,200 pixels
    monkeypatch.setenv("OPENCV_IO_MAX_IMAGE_PIXELS", "0")  # restored after the test; the guard sets it
    previous = pixel_limit_guard(19_199)
    try:
        assert imageio.os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] == "19199"
        with pytest.raises(PIL.Image.DecompressionBombError):
            PIL.Image.open(path)
        pixel_limit_guard(19_200)
        # PIL only warns between half the limit and the limit; what matters is that it still opens
        with pytest.warns(PIL.Image.DecompressionBombWarning), PIL.Image.open(path) as im:
            assert im.size == (160, 120)
    finally:
        PIL.Image.MAX_IMAGE_PIXELS = previous


def test_min_long_side_halves_big_pngs_by_2x2_means_and_keeps_the_file_size(tmp_path):
    rng = np.random.default_rng(6)
    big = rng.integers(0, 256, (400, 600, 3), dtype=np.uint8)
    path = tmp_path / "15.png"
    path.write_bytes(_png_bytes(big))
    out = decode_image(path, min_long_side=300)
    assert out.status == "ok" and out.rgb.shape == (200, 300, 3)
    assert (out.width, out.height) == (600, 400)
    block_means = big.reshape(200, 2, 300, 2, 3).mean(axis=(1, 3))
    assert np.abs(out.rgb.astype(float) - block_means).max() <= 0.5 + 1e-9
    assert decode_image(path, min_long_side=301).rgb.shape == (400, 600, 3)  # would fall below: full size
    odd = tmp_path / "16.png"
    odd.write_bytes(_png_bytes(big[:399, :599]))
    out = decode_image(odd, min_long_side=256)
    assert out.status == "ok" and out.rgb.shape == (199, 299, 3) and (out.width, out.height) == (599, 399)


@pytest.mark.parametrize("shape", [(400, 600), (399, 601), (513, 1025)])
@pytest.mark.parametrize("kind", ["rgb", "rgb16", "grey", "rgba"])
def test_halving_a_full_decode_is_the_reduced_decode_bit_for_bit(tmp_path, shape, kind):
    """The quality stage decodes at full size (for the training tensors) and halves for its metrics: the
    pixels must be exactly what the reduced decode gave, or the metrics would move."""
    rng = np.random.default_rng(7)
    rgb = cv2.GaussianBlur(rng.integers(0, 256, (*shape, 3), dtype=np.uint8), (0, 0), 2)
    pixels = {
        "rgb": rgb,
        "rgb16": rgb.astype(np.uint16) * 257 + rng.integers(0, 257, rgb.shape).astype(np.uint16),
        "grey": rgb[..., 0],
        "rgba": np.dstack([rgb, rgb[..., 1]]),
    }[kind]
    path = tmp_path / "17.png"
    path.write_bytes(_png_bytes(pixels))
    min_long_side = max(shape) // 2
    assert imageio.reduced_decode_applies("PNG", shape[1], shape[0], min_long_side)
    reduced = decode_image(path, min_long_side=min_long_side)
    full = decode_image(path)
    assert reduced.ok and full.ok and reduced.rgb.shape == (shape[0] // 2, shape[1] // 2, 3)
    assert np.array_equal(imageio.halve_as_reduced_decode(full.rgb), reduced.rgb)


def test_the_decode_log_counts_pixel_decodes_only(tmp_path, rgb, monkeypatch):
    log = tmp_path / "decodes.log"
    monkeypatch.setenv(imageio.DECODE_LOG_ENV, str(log))
    good = tmp_path / "18.png"
    good.write_bytes(_png_bytes(rgb))
    empty = tmp_path / "19.png"
    empty.write_bytes(b"")
    decode_image(good)
    decode_image(empty)  # refused before any pixel is decoded: not a decode
    decode_image(good, min_long_side=40)
    assert [line.split("\t")[1] for line in log.read_text().splitlines()] == [str(good), str(good)]
