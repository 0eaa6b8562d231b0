"""Tests for core.imagededup_backend, the optional cross-check by imagededup (skipped without the extra)."""

from __future__ import annotations

import pandas as pd
import pytest

from scin_pipeline.core.imagededup_backend import find_near_duplicates_imagededup, imagededup_available
from scin_pipeline.core.planted import planted_near_duplicate_scores

# --------------------------------------------------------------------------------------------------------
# Optional imagededup backend
# --------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(imagededup_available(), reason="imagededup is installed: the missing-extra error cannot show")
def test_imagededup_backend_says_how_to_install_it():
    with pytest.raises(ImportError, match=r"install scin-pipeline\[imagededup\]"):
        find_near_duplicates_imagededup(["a.png"], 4)


@pytest.mark.skipif(
    not imagededup_available(),
    reason="imagededup not installed (optional extra scin-pipeline[imagededup]; it pulls PyTorch)",
)
def test_imagededup_backend_finds_the_planted_near_duplicates(tmp_path):
    from scin_pipeline.core.synthetic.mirror import write_synthetic_mirror

    mirror = write_synthetic_mirror(tmp_path / "m", n_cases=80, seed=5, image_size=(320, 240), defect_rate=0.5)
    plants = mirror.plants
    kept = plants[plants["planted"].isin(["clean", "near_duplicate"])]
    paths = [str(tmp_path / "m" / p) for p in kept["image_path"]]
    found = find_near_duplicates_imagededup(paths, 10)
    stem = lambda p: p.rsplit("/", 1)[-1].removesuffix(".png")  # noqa: E731
    pairs = pd.DataFrame({"image_id_a": found["path_a"].map(stem), "image_id_b": found["path_b"].map(stem)})
    assert planted_near_duplicate_scores(pairs, plants, image_ids=kept["image_id"])["recall"] >= 0.9
