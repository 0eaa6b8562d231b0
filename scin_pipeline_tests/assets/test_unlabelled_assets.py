"""The unlabelled cases in the graph, on a small SYNTHETIC mirror: unlabelled_pool and its blocking leak check,
metadata_model_self_trained beside its twin, their out-of-fold predictions, and labelling_queue.

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
LEARNING = (
    "key:metadata_model or key:metadata_model_self_trained or key:cross_validated_predictions or key:labelling_queue"
)
RUN_CONFIG = {"ops": {"labeled_splits": {"config": {"min_cases_per_class": 4}}}}
# The synthetic questionnaire carries no condition signal, so its model is never confident: a bar every top
# class reaches (K <= 20 classes) pseudo-labels the whole pool in round 1 and exercises the plumbing.
LEARNING_CONFIG = {
    "ops": {
        **RUN_CONFIG["ops"],
        "metadata_model_self_trained": {"config": {"threshold": 0.05, "max_rounds": 2}},
        "cross_validated_predictions": {"config": {"n_folds": 3}},
    }
}


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


@pytest.fixture(scope="module")
def learnt(pooled):
    data_root, mirror, _summary = pooled
    summary = run_pipeline(
        data_root=data_root, source=str(mirror.root), log_level="WARNING", select=LEARNING, run_config=LEARNING_CONFIG
    )
    return data_root, summary


def test_the_self_trained_model_learns_from_the_pool_beside_its_twin(learnt):
    import mlflow

    from scin_pipeline.core.data_root import DataRootLayout
    from scin_pipeline.core.packaged_model import read_spec

    data_root, summary = learnt
    assert summary.success, summary.render()
    row = table(data_root, "metadata_model_self_trained").iloc[0]
    twin = table(data_root, "metadata_model").iloc[0]
    assert row["kind"] == twin["kind"] == "sklearn_metadata" and row["classes"] == twin["classes"]
    assert row["splits_data_version"] == twin["splits_data_version"]  # the same split
    assert read_spec(data_root / row["package_dir"])["extra"]["self_training"] == {  # relative to the root
        "threshold": 0.05,
        "max_rounds": 2,
        "pseudo_label_weight": 0.5,
    }
    client = mlflow.MlflowClient(DataRootLayout.of(data_root).mlflow_uri)
    run = client.get_run(row["mlflow_run_id"])
    assert run.data.tags["scin.twin"] == "metadata_model"
    assert int(run.data.params["n_pool_cases"]) == table(data_root, "unlabelled_pool")["case_id"].nunique()
    assert run.data.metrics["pseudo_labelled_cases"] == int(run.data.params["n_pool_cases"])
    assert run.data.metrics["self_training_rounds"] == 1  # nobody was left for round 2
    artifacts = {a.path for a in client.list_artifacts(row["mlflow_run_id"], "self_training")}
    assert {"self_training/history.csv", "self_training/pseudo_labels.csv"} <= artifacts
    # Both metadata models are scored out of fold on every train+val case, once each.
    oof = table(data_root, "cross_validated_predictions")
    splits = table(data_root, "labeled_splits")
    fitted = set(splits.loc[splits["split"].astype(str).isin(["train", "val"]), "case_id"])
    for model in ("metadata_model", "metadata_model_self_trained"):
        part = oof[oof["model"] == model]
        assert set(part["case_id"]) == fitted and part["case_id"].is_unique


def test_the_labelling_queue_ranks_the_pool_and_writes_the_graders_csv(learnt):
    from scin_pipeline.core.data_root import DataRootLayout
    from scin_pipeline.core.labelling_queue import CSV_COLUMNS

    data_root, summary = learnt
    assert "labelling_queue" in summary.materialized, summary.render()
    queue, pool = table(data_root, "labelling_queue"), table(data_root, "unlabelled_pool")
    assert len(queue) > 0 and set(queue["case_id"]) <= set(pool["case_id"])
    assert queue["priority"].is_monotonic_decreasing and queue["rank"].tolist() == list(range(1, len(queue) + 1))
    assert queue["uncertainty"].between(0, 1).all() and queue["reason"].str.contains("model uncertainty").all()
    # The synthetic pool is the ungradable cases: each at the default ungradable weight.
    assert (queue["status_weight"][queue["status"] == "ungradable"] == 0.5).all()
    csv = pd.read_csv(DataRootLayout.of(data_root).labelling_queue_csv, dtype={"case_id": str})
    assert list(csv.columns) == CSV_COLUMNS and csv["case_id"].tolist() == queue["case_id"].tolist()
