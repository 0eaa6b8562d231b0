"""Stable hashes and seeded random generators: every draw of the synthetic mirror comes from here, keyed by
what it is for (a case subset, an image, a defect), so the mirror does not depend on the order of work."""

from __future__ import annotations

import hashlib

import numpy as np


def stable_u64(*parts: object) -> int:
    """A 64-bit number from the parts, stable across processes and Python versions (unlike hash())."""
    text = "|".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def seeded_rng(*parts: object) -> np.random.Generator:
    return np.random.default_rng(stable_u64("scin-synthetic", *parts))
