"""The bytes of the synthetic files: the decompression-bomb PNG is structurally valid and declares 30000^2."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from scin_pipeline.core.synthetic.encoding import decompression_bomb_png


def test_decompression_bomb_png_has_valid_chunks_and_declares_30000_squared():
    data = decompression_bomb_png()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) < 10_000
    offset, tags = 8, []
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        tag, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, tag
        tags.append(tag)
        if tag == b"IHDR":
            assert struct.unpack(">II", body[:8]) == (30000, 30000)
        offset += 12 + length
    assert tags == [b"IHDR", b"IDAT", b"IEND"]
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
