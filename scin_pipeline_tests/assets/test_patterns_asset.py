"""The case_patterns asset on planted cases: one row per case, side tables, report and maps in its metadata."""

from __future__ import annotations

import numpy as np
import pandas as pd
from dagster import build_asset_context

from scin_pipeline.assets.patterns import CasePatternsConfig, case_patterns
from scin_pipeline.core.sources import SYNTHETIC_MARKER
from scin_pipeline.resources import ScinSourceResource, StoragePaths
from scin_pipeline_tests.core.test_case_patterns import planted_cases


def test_case_patterns_asset_clusters_every_case_and_reports(tmp_path):
    cases = planted_cases(n_per_pattern=40, n_no_answers=10)
    answered = cases[cases["planted"] >= 0].reset_index(drop=True)
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (3, 8))
    embeddings = np.vstack([centres[p] + rng.normal(0, 0.3, 8) for p in answered["planted"]]).astype(np.float32)
    embeddings_file = tmp_path / "embeddings.npy"
    np.save(embeddings_file, embeddings)
    image_ids = [f"img-{i}" for i in range(len(answered))]
    images = pd.DataFrame({"image_id": image_ids + ["img-unembedded"], "case_id": [*answered["case_id"], "none-0"]})
    image_embeddings = pd.DataFrame(
        {"image_id": image_ids, "row": np.arange(len(image_ids)), "embeddings_file": str(embeddings_file)}
    )
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / SYNTHETIC_MARKER).write_text("synthetic")
    data_root = tmp_path / "data"

    output = case_patterns(
        build_asset_context(),
        CasePatternsConfig(k_max=5, n_bootstrap=5),
        cases=cases,
        images=images,
        image_embeddings=image_embeddings,
        storage=StoragePaths(data_root=str(data_root)),
        scin_source=ScinSourceResource(location=str(mirror)),
    )

    table = output.value
    assert len(table) == len(cases) and set(table["case_id"]) == set(cases["case_id"])
    assert (table.loc[~table["answered"], "questionnaire_cluster"] == "no_answers").all()
    assert table["has_images"].sum() == len(answered)
    assert table.loc[table["has_images"], "image_cluster"].nunique() == 3
    out_dir = data_root / "tables" / "case_patterns"
    for name in ("case_patterns.md", "profiles.parquet", "summary.parquet", "k_selection.parquet"):
        assert (out_dir / name).exists(), name
    for view in ("questionnaire", "image"):
        for colour in ("cluster", "label"):
            assert (out_dir / f"{view}_by_{colour}.png").read_bytes().startswith(b"\x89PNG")
    report = (out_dir / "case_patterns.md").read_text()
    assert "SYNTHETIC IMAGES" in report and "![image_by_label](image_by_label.png)" in report
    metadata = output.metadata
    assert "data:image/png;base64," in metadata["report"].value
    assert metadata["no_answers"].value == 10
    assert metadata["cross_view_ari"].value > 0.9
    assert "SYNTHETIC" in metadata["note"].value
    selection = pd.read_parquet(out_dir / "k_selection.parquet")
    assert set(selection["view"]) == {"questionnaire", "image"} and selection["k"].max() == 5
    # Same inputs, same table and data version.
    again = case_patterns(
        build_asset_context(),
        CasePatternsConfig(k_max=5, n_bootstrap=5),
        cases=cases,
        images=images,
        image_embeddings=image_embeddings,
        storage=StoragePaths(data_root=str(data_root)),
        scin_source=ScinSourceResource(location=str(mirror)),
    )
    assert again.data_version == output.data_version
