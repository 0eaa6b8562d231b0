"""The curation graph on synthetic mirrors: quality, near-duplicates, leak-free splits, blocking checks."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from dagster import AssetCheckKey, AssetKey, AssetSelection, DagsterInstance

from scin_pipeline.core.planted import planted_near_duplicate_scores
from scin_pipeline.core.synthetic.mirror import write_synthetic_mirror
from scin_pipeline.runner import run_pipeline

SMALL = (240, 180)  # half the demo size keeps the suite fast (the rules are tuned on 480 px)
CURATION = "group:ingest or group:curation"  # these tests stop at labeled_splits; training has its own
LENIENT = {
    "ops": {"quality_filtered_index": {"config": {"max_quarantined_fraction": 0.2}}}
}  # small synthetic images keep the suite fast; the rules are size-relative


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("curation")
    mirror = write_synthetic_mirror(root / "mirror", n_cases=160, seed=3, image_size=SMALL, defect_rate=0.12)
    # 12 % planted defects, half of them undecodable or missing: near the default 10 % quarantine gate.
    summary = run_pipeline(
        data_root=root / "data", source=str(mirror.root), log_level="WARNING", run_config=LENIENT, select=CURATION
    )
    return root / "data", mirror, summary


def table(data_root: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(data_root / "tables" / f"{name}.parquet")


def test_full_graph_succeeds_and_writes_every_table(synthetic_run):
    data_root, _mirror, summary = synthetic_run
    assert summary.success, summary.render()
    for name in ("quality_filtered_index", "dedup_clusters", "labeled_splits"):
        assert (data_root / "tables" / f"{name}.parquet").exists()
    shards = sorted((data_root / "tables" / "image_quality").glob("*.parquet"))
    assert len(shards) == 16
    quality = pd.read_parquet(data_root / "tables" / "image_quality")
    files = table(data_root, "image_files")
    assert set(quality["image_id"]) == set(files["image_id"].dropna())


def test_every_exclusion_has_a_reason_and_planted_defects_are_found(synthetic_run):
    data_root, mirror, _summary = synthetic_run
    quality = pd.read_parquet(data_root / "tables" / "image_quality")
    assert quality.loc[~quality["keep"], "reason"].notna().all()
    assert quality.loc[quality["keep"], "reason"].isna().all()
    scores = pd.read_parquet(data_root / "tables" / "quality_filtered_index" / "planted_defect_scores.parquet")
    defects = scores[scores["planted"] != "clean"]
    assert (defects["n_planted"] > 0).all()
    assert (defects["precision"] >= 0.9).all() and (defects["recall"] >= 0.9).all(), defects
    # Clean images of deep skin are excluded no more often than clean images of light skin.
    kept = scores[scores["planted"] == "clean"].set_index("reason")["recall"]
    assert kept["clean_kept:monk_7-10"] >= kept["clean_kept:monk_1-3"] or pd.isna(kept["clean_kept:monk_7-10"])
    plants = mirror.plants.set_index("image_id")
    by_id = quality.set_index("image_id")
    bomb = plants.index[plants["planted"] == "decompression_bomb"]
    assert (by_id.loc[bomb, "reason"] == "decompression_bomb").all()
    assert (data_root / "tables" / "quality_filtered_index" / "contact_sheet.png").exists()


def test_kept_index_has_only_kept_gradable_images(synthetic_run):
    data_root, _mirror, _summary = synthetic_run
    kept = table(data_root, "quality_filtered_index")
    quality = pd.read_parquet(data_root / "tables" / "image_quality").set_index("image_id")
    assert quality.loc[kept["image_id"], "keep"].all()
    cases = table(data_root, "cases").set_index("case_id")
    assert cases.loc[kept["case_id"], "derm_gradable"].all()
    # The per-Monk exclusion table counts the references dropped as dermatologist-ungradable, per tone.
    files = data_root / "tables" / "quality_filtered_index"
    references = pd.read_parquet(files / "all_references.parquet")
    by_tone = pd.read_parquet(files / "exclusion_rates_by_monk_tone.parquet")
    dropped = references["excluded_by"] == "derm_ungradable"
    assert dropped.any() and by_tone["n_refs_derm_ungradable"].sum() == dropped.sum()
    tone = references["monk_skin_tone_label_us"].astype("Float64").fillna(references["monk_skin_tone_label_india"])
    deep = dropped & tone.isin([7, 8, 9, 10])
    deep_rows = by_tone[by_tone["monk_tone"].isin(["7", "8", "9", "10"])]
    assert deep_rows["n_refs_derm_ungradable"].sum() == deep.sum()
    assert kept["local_path"].map(lambda p: not Path(p).is_absolute() and (data_root / p).exists()).all()


def test_near_duplicates_are_clustered_and_typed(synthetic_run):
    data_root, mirror, _summary = synthetic_run
    clusters = table(data_root, "dedup_clusters")
    assert {"image_id", "case_id", "cluster_id", "cluster_kind"} <= set(clusters.columns)
    plants = mirror.plants
    near = plants[plants["planted"] == "near_duplicate"]
    assert len(near)
    pairs = pd.read_parquet(data_root / "tables" / "dedup_clusters" / "pairs.parquet")
    quality = pd.read_parquet(data_root / "tables" / "image_quality")
    scores = planted_near_duplicate_scores(pairs, plants, image_ids=quality.loc[quality["keep"], "image_id"])
    assert scores["n_planted"] > 0
    assert scores["precision"] >= 0.9 and scores["recall"] >= 0.9, scores
    by_id = clusters.drop_duplicates("image_id").set_index("image_id")
    for row in near.itertuples():
        if row.image_id in by_id.index:
            assert by_id.loc[row.image_id, "cluster_kind"] == "cross_case_near_duplicate"


def test_no_case_or_cluster_straddles_two_splits(synthetic_run):
    data_root, _mirror, summary = synthetic_run
    splits = table(data_root, "labeled_splits")
    assert set(splits["split"]) == {"train", "val", "test"}
    assert splits.groupby("case_id")["split"].nunique().max() == 1
    assert splits.groupby("cluster_id")["split"].nunique().max() == 1
    assert splits.groupby("group_id")["split"].nunique().max() == 1
    checks = {check.name.split(":")[1]: check.passed for check in summary.checks}
    assert checks["no_case_leakage"] and checks["no_cluster_leakage"]


def test_a_planted_leak_turns_the_blocking_checks_red(synthetic_run, tmp_path):
    from dagster import materialize

    from scin_pipeline.assets import ALL_ASSET_CHECKS, ALL_ASSETS
    from scin_pipeline.definitions import build_resources

    data_root, mirror, _summary = synthetic_run
    leaky_root = tmp_path / "leaky"
    (leaky_root / "tables").mkdir(parents=True)
    splits = table(data_root, "labeled_splits")
    splits["split"] = splits["split"].astype(str)
    multi = splits.groupby("case_id")["image_id"].transform("size") > 1
    victim = splits[multi].index[0]
    splits.loc[victim, "split"] = "test" if splits.loc[victim, "split"] != "test" else "train"
    # A near-duplicate of a training image planted in val: same cluster, two splits.
    train_cluster = splits.loc[splits["split"] == "train", "cluster_id"].iloc[0]
    splits.loc[splits.index[splits["split"] == "val"][0], "cluster_id"] = train_cluster
    splits.to_parquet(leaky_root / "tables" / "labeled_splits.parquet")
    result = materialize(
        [*ALL_ASSETS, *ALL_ASSET_CHECKS],
        instance=DagsterInstance.ephemeral(),
        resources=build_resources(data_root=str(leaky_root), source=str(mirror.root)),
        selection=AssetSelection.checks(
            AssetCheckKey(AssetKey("labeled_splits"), "no_case_leakage"),
            AssetCheckKey(AssetKey("labeled_splits"), "no_cluster_leakage"),
        ),
        raise_on_error=False,
    )
    evaluations = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert evaluations == {"no_case_leakage": False, "no_cluster_leakage": False}


def test_too_many_broken_files_block_the_splits(synthetic_run):
    data_root, mirror, _summary = synthetic_run
    strict = {"ops": {"quality_filtered_index": {"config": {"max_quarantined_fraction": 0.01}}}}
    summary = run_pipeline(
        data_root=data_root,
        source=str(mirror.root),
        log_level="CRITICAL",
        select="key:quality_filtered_index or key:labeled_splits",
        run_config=strict,
    )
    assert not summary.success
    assert "quality_filtered_index:quarantined_fraction_below_threshold" in summary.failed_blocking_checks
    assert "labeled_splits" not in summary.materialized


def test_rerun_gives_the_same_splits(synthetic_run, tmp_path):
    data_root, mirror, _summary = synthetic_run
    before = table(data_root, "labeled_splits")
    summary = run_pipeline(
        data_root=data_root, source=str(mirror.root), log_level="WARNING", select="key:labeled_splits"
    )
    assert summary.success
    after = table(data_root, "labeled_splits")
    pd.testing.assert_frame_equal(before, after)


@pytest.mark.real_metadata
@pytest.mark.slow
def test_whole_real_release_with_synthetic_images_has_no_leakage(scin_metadata_dir, tmp_path):
    """All 5,033 real cases (real exact reuse: 15 files in 42 references), small synthetic images."""
    mirror = write_synthetic_mirror(
        tmp_path / "mirror", metadata_dir=scin_metadata_dir, image_size=(160, 120), workers=2
    )
    summary = run_pipeline(data_root=tmp_path / "data", source=str(mirror.root), log_level="WARNING", select=CURATION)
    assert summary.success, summary.render()
    data_root = tmp_path / "data"
    assert len(table(data_root, "cases")) == 5033
    clusters = table(data_root, "dedup_clusters")
    reuse = clusters[clusters["cluster_kind"] == "exact_reuse"]
    assert reuse["cluster_id"].nunique() == 15
    splits = table(data_root, "labeled_splits")
    assert splits.groupby("case_id")["split"].nunique().max() == 1
    assert splits.groupby("cluster_id")["split"].nunique().max() == 1
    # Every case sharing a reused file lands in one split.
    shared = splits[splits["image_id"].isin(reuse["image_id"])]
    assert shared.groupby("image_id")["split"].nunique().max() == 1
    checks = {check.name.split(":")[1]: check.passed for check in summary.checks}
    assert checks["no_case_leakage"] and checks["no_cluster_leakage"]
