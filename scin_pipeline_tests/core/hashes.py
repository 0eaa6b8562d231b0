"""Random 64-bit hashes and near copies of them, for the Hamming search and dedup tests; and the way back
from the quality stage's uint64 hashes to imagehash's forms."""

from __future__ import annotations

import imagehash
import numpy as np


def random_hashes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, np.iinfo(np.uint64).max, n, dtype=np.uint64, endpoint=True)


def flip_bits(rng: np.random.Generator, value: np.uint64, n_bits: int) -> np.uint64:
    mask = 0
    for bit in rng.choice(64, size=n_bits, replace=False):
        mask |= 1 << int(bit)
    return np.uint64(int(value) ^ mask)


def uint64_to_hex(value: int | np.uint64) -> str:
    """16 hex digits, as imagehash prints an 8x8 hash (``imagehash.hex_to_hash`` reads it back)."""
    return f"{int(value):016x}"


def uint64_to_hash(value: int | np.uint64) -> imagehash.ImageHash:
    bits = np.unpackbits(np.frombuffer(int(value).to_bytes(8, "big"), np.uint8)).astype(bool)
    return imagehash.ImageHash(bits.reshape(8, 8))
