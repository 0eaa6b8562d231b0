"""An optional cross-check of the near-duplicate search: imagededup's own PHash and search over image files.

Not used by the pipeline; tests (and anyone comparing) call it. imagededup is an optional extra
(``pip install scin-pipeline[imagededup]``: it pulls PyTorch, several GB).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

IMAGEDEDUP_MISSING = (
    "imagededup is not installed: install scin-pipeline[imagededup] (it pulls PyTorch, "
    "several GB) to use find_near_duplicates_imagededup"
)


def imagededup_available() -> bool:
    try:
        import imagededup.methods  # noqa: F401
    except ImportError:
        return False
    return True


def find_near_duplicates_imagededup(paths: Sequence[str | Path], max_distance: int) -> pd.DataFrame:
    """Near-duplicate pairs by imagededup's own PHash and search (a cross-check of ours, not used by the
    pipeline): ``path_a < path_b``, ``distance``, sorted. Files imagededup cannot encode are left out.

    imagededup is an optional extra (``pip install scin-pipeline[imagededup]``); without it this raises
    ImportError saying so.
    """
    try:
        from imagededup.methods import PHash
    except ImportError as err:
        raise ImportError(IMAGEDEDUP_MISSING) from err
    hasher = PHash(verbose=False)
    encodings = {}
    for path in sorted({str(p) for p in paths}):
        encoding = hasher.encode_image(image_file=path)
        if encoding:
            encodings[path] = encoding
    duplicates = hasher.find_duplicates(encoding_map=encodings, max_distance_threshold=int(max_distance), scores=True)
    rows = sorted({(a, b, int(distance)) for a, found in duplicates.items() for b, distance in found if a < b})
    frame = pd.DataFrame(rows, columns=["path_a", "path_b", "distance"])
    return frame.astype({"path_a": str, "path_b": str, "distance": np.int64})
