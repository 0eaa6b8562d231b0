"""Random 64-bit hashes and near copies of them, for the Hamming search and dedup tests."""

from __future__ import annotations

import numpy as np


def random_hashes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, np.iinfo(np.uint64).max, n, dtype=np.uint64, endpoint=True)


def flip_bits(rng: np.random.Generator, value: np.uint64, n_bits: int) -> np.uint64:
    mask = 0
    for bit in rng.choice(64, size=n_bits, replace=False):
        mask |= 1 << int(bit)
    return np.uint64(int(value) ^ mask)
