"""The unlabelled cases in the graph, on a small SYNTHETIC mirror: unlabelled_pool and its blocking leak check.

The synthetic mirror leaves ~40 % of its cases unlabelled (judged ungradable), as the real release does;
their images pass the quality rule, so they are the pool. No figure here says anything about skin conditions.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from dagster import AssetCheckKey, AssetKey, AssetSelection, DagsterInstance

from scin_pipeline.core.synthetic.mirror import write_synthetic_mirror
from scin_pipeline.runner import run_pipeline

SELECTION = "group:ingest or group:curation"
RUN_CONFIG = {"ops": {"labeled_splits": {"config": {"min_cases_per_class": 4}}}}


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    root = tmp_path_factory.mktemp("unlabelled")
    mirror = write_synthetic_mirror(root / "mirror", n_cases=90, seed=11, image_size=(200, 150), defect_rate=0.06)
    summary = run_pipeline(
        data_root=root / "data", source=str(mirror.root), log_level="WARNING", select=SELECTION, run_config=RUN_CONFIG
    )
    return root / "data", mirror, summary


def table(data_root: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(data_root / "tables" / f"{name}.parquet")


def test_the_pool_holds_the_unlabelled_kept_images_and_its_check_passes(pooled):
    data_root, _mirror, summary = pooled
    assert summary.success, summary.render()
    pool, splits, cases = (
        table(data_root, "unlabelled_pool"),
        table(data_root, "labeled_splits"),
        table(data_root, "cases"),
    )
    assert len(pool) > 0
    assert not set(pool["case_id"]) & set(splits["case_id"])
    status = cases.set_index("case_id")["label_status"].astype(str)
    assert (status.reindex(pool["case_id"]) != "labelled").sum() > 0
    assert set(pool["reason"]) <= {
        "ungradable",
        "no_pathology",
        "gradable_unlabelled",
        "no_labels_row",
        "label_outside_policy",
    }
    quality = pd.read_parquet(data_root / "tables" / "image_quality").set_index("image_id")
    assert quality.loc[pool["image_id"], "keep"].all()
    # No pooled image shares a duplicate cluster with a validation or test image.
    clusters = table(data_root, "dedup_clusters").drop_duplicates("image_id").set_index("image_id")["cluster_id"]
    evaluation = splits[splits["split"].astype(str).isin(["val", "test"])]
    assert not set(clusters.reindex(pool["image_id"])) & set(clusters.reindex(evaluation["image_id"]).dropna())
    checks = {check.name.split(":")[1]: check.passed for check in summary.checks}
    assert checks["unlabelled_pool_no_evaluation_leak"]
    composition = pd.read_parquet(data_root / "tables" / "unlabelled_pool" / "composition.parquet")
    assert {"monk_us_bin", "fst_self_reported", "sex_at_birth"} <= set(composition["attribute"])
    monk = composition[composition["attribute"] == "monk_us_bin"]
    assert monk["pool_n"].sum() == pool["case_id"].nunique()


def test_a_test_image_planted_in_the_pool_turns_the_blocking_check_red(pooled, tmp_path):
    from dagster import materialize

    from scin_pipeline.assets import ALL_ASSET_CHECKS, ALL_ASSETS
    from scin_pipeline.definitions import build_resources

    data_root, mirror, _summary = pooled
    leaky_root = tmp_path / "leaky"
    (leaky_root / "tables").mkdir(parents=True)
    for name in ("labeled_splits", "dedup_clusters"):
        table(data_root, name).to_parquet(leaky_root / "tables" / f"{name}.parquet")
    pool, splits = table(data_root, "unlabelled_pool"), table(data_root, "labeled_splits")
    test_row = splits[splits["split"].astype(str) == "test"].iloc[0]
    # An unlabelled case re-uploading a test photo, the pool's own columns claiming it is unrelated.
    planted = pool.iloc[[0]].assign(image_id=test_row["image_id"], cluster_id="unrelated", group_id="unrelated")
    pd.concat([pool, planted], ignore_index=True).to_parquet(leaky_root / "tables" / "unlabelled_pool.parquet")
    result = materialize(
        [*ALL_ASSETS, *ALL_ASSET_CHECKS],
        instance=DagsterInstance.ephemeral(),
        resources=build_resources(data_root=str(leaky_root), source=str(mirror.root)),
        selection=AssetSelection.checks(
            AssetCheckKey(AssetKey("unlabelled_pool"), "unlabelled_pool_no_evaluation_leak")
        ),
        raise_on_error=False,
    )
    evaluations = result.get_asset_check_evaluations()
    assert [(e.check_name, e.passed) for e in evaluations] == [("unlabelled_pool_no_evaluation_leak", False)]
    assert evaluations[0].metadata["leaking_rows"].value == 1
