"""Bytes of the synthetic image files: PNG (fast settings for noisy skin), JPEG, and a decompression-bomb
PNG whose header declares far more pixels than it holds."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

BOMB_DECLARED_SIZE = (30000, 30000)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode_png(rgb: np.ndarray) -> bytes:
    # Sub filter + Huffman-only deflate: about 3x faster than the default on noisy skin texture, and the
    # files are barely bigger (texture noise does not compress anyway).
    params = [
        cv2.IMWRITE_PNG_COMPRESSION,
        1,
        cv2.IMWRITE_PNG_FILTER,
        cv2.IMWRITE_PNG_FILTER_SUB,
        cv2.IMWRITE_PNG_STRATEGY,
        cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
    ]
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def decompression_bomb_png(
    width: int = BOMB_DECLARED_SIZE[0], height: int = BOMB_DECLARED_SIZE[1], rows: int = 4
) -> bytes:
    """A small PNG whose IHDR declares width x height RGB pixels; its IDAT holds only `rows` zero rows.

    Every chunk has a correct CRC, so header-level checks accept it; the declared size is what a careful
    reader must refuse before allocating (30000 x 30000 x 3 bytes = 2.7 GB).
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no interlace
    scanlines = b"\x00" * ((1 + 3 * width) * rows)  # filter byte 0 + zero pixels per row
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(scanlines, 9))
        + _png_chunk(b"IEND", b"")
    )
