"""model_comparison against a real (temporary SQLite) MLflow registry: the asset is invoked directly with
hand-made evaluation tables, so the registry side of the champion rule is checked without training.

Two tiny SYNTHETIC sklearn packages are registered; the earlier run made version 1 champion. When no
candidate is eligible now, the alias must be removed (not left on the old version), the reason recorded on
the registered model and each candidate's run, and the blocking check must fail.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from dagster import AssetCheckResult, Output, build_asset_context

from scin_pipeline.assets.evaluation import (
    CANDIDATES,
    PASSED_OVER_TAG,
    ComparisonConfig,
    calibration_table,
    every_candidate,
    model_comparison,
)
from scin_pipeline.resources import MlflowTracking, StoragePaths
from scin_pipeline.resources.mlflow_tracking import (
    CHAMPION_CLEARED_AT_TAG,
    CHAMPION_CLEARED_REASON_TAG,
    CHAMPION_REASON_TAG,
)
from scin_pipeline_tests.resources.test_mlflow_tracking import CLASSES, metadata_package, tags_for

MODELS = ("baseline_cnn", "metadata_model")
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "top3_accuracy", "mean_ovr_auc", "ece")


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """Two registered candidates (versions "1", "2"); version 1 is champion from an earlier run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    storage = StoragePaths(data_root=str(tmp_path / "data"))
    tracking = MlflowTracking(storage=storage)
    frames = {}
    for index, model in enumerate(MODELS):
        with tracking.training_run(
            run_key=f"key-{model}", run_name=model, tags=tags_for(model), params={"C": 1.0}
        ) as run:
            model_uri, version = run.log_model(metadata_package(tmp_path / model, C=1.0 + index))
        frames[model] = pd.DataFrame(
            [
                {
                    "model": model,
                    "kind": "sklearn_metadata",
                    "registered_version": version,
                    "model_uri": model_uri,
                    "mlflow_run_id": run.run_id,
                    "classes": json.dumps(CLASSES),
                }
            ]
        )
    tracking.set_champion(frames["baseline_cnn"]["registered_version"].iloc[0], reason="an earlier run's winner")
    return tracking, storage, frames


def evaluation_table(val_balanced_accuracy: dict[str, float]) -> pd.DataFrame:
    """model_evaluation's long table; each candidate scores the same with blank questionnaires (val_blank)."""
    rows = []
    for model, bacc in val_balanced_accuracy.items():
        for split in ("val", "val_blank", "test"):
            for metric in METRICS:
                value = bacc if metric == "balanced_accuracy" else 0.4 if metric != "ece" else 0.1
                rows.append({"model": model, "split": split, "metric": metric, "class": None, "value": value})
    return pd.DataFrame(rows)


def overall_fairness(models=MODELS) -> pd.DataFrame:
    """fairness_report's overall block (test split, per case) with bootstrap intervals."""
    rows = []
    for model in models:
        for metric in ("accuracy", "balanced_accuracy", "macro_f1", "mean_ovr_auc", "top3_accuracy"):
            rows.append(
                {
                    "model": model,
                    "attribute": "overall",
                    "group": "overall",
                    "n": 40,
                    "metric": metric,
                    "value": 0.5,
                    "ci_low": 0.38,
                    "ci_high": 0.61,
                    "ci_level": 0.95,
                }
            )
    return pd.DataFrame(rows)


def run_comparison(
    registry,
    val_balanced_accuracy: dict[str, float],
    *,
    config: ComparisonConfig | None = None,
    gates: pd.DataFrame | None = None,
) -> tuple[Output, AssetCheckResult]:
    tracking, _, frames = registry
    empty = pd.DataFrame()
    if gates is None:
        gates = pd.DataFrame({"model": list(MODELS), "passed": [True, True], "reason": ["ok", "ok"]})
    results = list(
        model_comparison(
            build_asset_context(),
            config=config or ComparisonConfig(),
            model_evaluation=evaluation_table(val_balanced_accuracy),
            fairness_gates=gates,
            fairness_report=overall_fairness(),
            baseline_cnn=frames["baseline_cnn"],
            resnet50_transfer=empty,
            resnet50_fixmatch=empty,
            efficientnet_transfer=empty,
            metadata_model=frames["metadata_model"],
            metadata_model_self_trained=empty,
            multimodal=empty,
            mlflow=tracking,
        )
    )
    output = next(r for r in results if isinstance(r, Output))
    check = next(r for r in results if isinstance(r, AssetCheckResult))
    return output, check


def test_no_eligible_candidate_removes_the_old_champion_and_records_why(registry):
    tracking, _, frames = registry
    assert tracking.champion_version() is not None
    # Chance for 3 classes is 0.333: with the 0.05 margin neither candidate is eligible.
    output, check = run_comparison(registry, {"baseline_cnn": 0.35, "metadata_model": 0.30})

    assert tracking.champion_version() is None  # the alias is gone, not left on version 1
    client = tracking.client()
    model = client.get_registered_model(tracking.registered_model_name)
    reason = model.tags[CHAMPION_CLEARED_REASON_TAG]
    assert reason.startswith("no eligible candidate") and "baseline_cnn" in reason and "metadata_model" in reason
    assert "chance" in reason
    assert model.tags[CHAMPION_CLEARED_AT_TAG]
    assert CHAMPION_REASON_TAG not in model.tags  # no stale "version 1: ..." champion reason
    assert tracking.champion_cleared_reason() == (reason, model.tags[CHAMPION_CLEARED_AT_TAG])
    old = client.get_model_version(tracking.registered_model_name, frames["baseline_cnn"]["registered_version"][0])
    assert reason in old.tags[CHAMPION_CLEARED_REASON_TAG]
    for model_name, frame in frames.items():
        run_tags = client.get_run(frame["mlflow_run_id"].iloc[0]).data.tags
        assert run_tags[CHAMPION_CLEARED_REASON_TAG] == reason
        assert "chance" in run_tags[PASSED_OVER_TAG], model_name

    assert output.metadata["champion"].value == "none"
    assert output.metadata["champion_model_uri"].value == "none"
    assert output.metadata["champion_cleared_reason"].value == reason
    assert output.metadata["previous_champion_version"].value == frames["baseline_cnn"]["registered_version"][0]
    assert check.check_name == "champion_chosen" and check.passed is False
    assert check.metadata["champion_cleared_reason"].value == reason


def test_a_new_champion_after_a_cleared_one_drops_the_cleared_reason(registry):
    tracking, _, frames = registry
    run_comparison(registry, {"baseline_cnn": 0.30, "metadata_model": 0.30})
    assert tracking.champion_version() is None

    output, check = run_comparison(registry, {"baseline_cnn": 0.30, "metadata_model": 0.60})
    champion = tracking.champion_version()
    assert str(champion.version) == frames["metadata_model"]["registered_version"][0]
    assert check.passed is True and output.metadata["champion"].value == "metadata_model"
    assert "champion_cleared_reason" not in output.metadata
    tags = tracking.client().get_registered_model(tracking.registered_model_name).tags
    assert CHAMPION_CLEARED_REASON_TAG not in tags and CHAMPION_CLEARED_AT_TAG not in tags
    assert tracking.champion_cleared_reason() is None


def test_the_launchpad_config_is_the_core_rule():
    from scin_pipeline.core.champion import ChampionRule

    assert ComparisonConfig().rule() == ChampionRule()
    config = ComparisonConfig(selection_metric="top3_accuracy", tie_breakers=["ece"], chance_margin=0.2)
    assert config.rule() == ChampionRule(selection_metric="top3_accuracy", tie_breakers=("ece",), chance_margin=0.2)


def unjudged_gates() -> pd.DataFrame:
    """metadata_model's gate could not judge US Monk 7-10 (24 cases); baseline_cnn's failed."""
    from scin_pipeline.core.fairness import GateResult, GroupEstimate

    tiny = GroupEstimate("monk_us_bin", "7-10", 24, 0.08, 0.0, 0.14)
    gate = GateResult(
        False,
        "balanced_accuracy",
        0.1,
        "metadata_model",
        None,
        None,
        float("nan"),
        None,
        "NOT JUDGED",
        status="not_judged",
        unjudged_groups=[tiny],
        min_group_n=30,
    )
    return pd.DataFrame(
        {
            "model": list(MODELS),
            "passed": [False, False],
            "status": ["failed", "not_judged"],
            "reason": ["FAILED on balanced_accuracy", "NOT JUDGED on balanced_accuracy: monk_us_bin=7-10 (n=24)"],
            "gate": ["", json.dumps(gate.to_dict())],
        }
    )


def test_an_unjudged_candidate_blocks_under_the_default_policy(registry):
    tracking, _, _ = registry
    assert ComparisonConfig().unjudged_policy == "block"
    output, check = run_comparison(registry, {"baseline_cnn": 0.6, "metadata_model": 0.6}, gates=unjudged_gates())
    assert tracking.champion_version() is None and check.passed is False
    reason = output.metadata["champion_cleared_reason"].value
    assert "fairness not judged (unjudged_policy block)" in reason and "monk_us_bin=7-10 (n=24)" in reason


def test_allow_with_flag_names_an_unjudged_champion_and_flags_its_version(registry):
    from scin_pipeline.core.champion import FAIRNESS_STATUS_TAG, FAIRNESS_UNJUDGED_TAG

    tracking, _, frames = registry
    output, check = run_comparison(
        registry,
        {"baseline_cnn": 0.6, "metadata_model": 0.6},
        config=ComparisonConfig(unjudged_policy="allow_with_flag"),
        gates=unjudged_gates(),
    )
    champion = tracking.champion_version()
    assert check.passed is True and str(champion.version) == frames["metadata_model"]["registered_version"][0]
    assert champion.tags[FAIRNESS_STATUS_TAG] == "not_judged"
    assert champion.tags[FAIRNESS_UNJUDGED_TAG] == "monk_us_bin=7-10 (n=24)"
    assert "FAIRNESS NOT JUDGED" in champion.tags[CHAMPION_REASON_TAG]
    assert "fairness_flag" in output.metadata
    failed = tracking.client().get_model_version(
        tracking.registered_model_name, frames["baseline_cnn"]["registered_version"][0]
    )
    assert failed.tags[FAIRNESS_STATUS_TAG] == "failed" and FAIRNESS_UNJUDGED_TAG not in failed.tags


def test_the_comparison_is_narrow_tables_without_top3_on_three_classes_and_an_interval_plot(registry):
    output, _ = run_comparison(registry, {"baseline_cnn": 0.6, "metadata_model": 0.7})
    headline = output.metadata["comparison"].value
    eligibility = output.metadata["eligibility"].value
    header = headline.splitlines()[0]
    assert "test_balanced_accuracy" in header and "val_macro_f1" in header
    # 3 classes: every row is a top-3 hit, so no top-3 column anywhere.
    assert len(CLASSES) == 3 and "top3" not in headline and "top3" not in eligibility
    # The fairness and registry columns live in their own table.
    assert "passed_over" not in header and "fairness_status" not in header
    assert eligibility.splitlines()[0] == "| model | fairness_status | registered_version | passed_over |"
    assert len(header.split("|")) - 2 <= 10
    # Calibration (ECE before and after the temperature) is a table of its own, keyed by model.
    calibration = output.metadata["calibration"].value.splitlines()
    assert "ece" not in header and calibration[0].startswith("| model |") and "test_ece" in calibration[0]
    assert len(calibration) == 2 + 2  # header, rule, one row per candidate
    plot = output.metadata["test_metrics_plot"].value
    assert plot.startswith("![comparison](data:image/png;base64,")


def test_every_candidate_reads_the_trained_ones_in_candidates_order_and_refuses_a_missing_one():
    """The candidate tables reach model_evaluation, model_comparison and fairness_report as keyword inputs:
    their order must not depend on the keywords' (the candidates' order is the tables' row order)."""

    def row(model: str) -> pd.DataFrame:
        return pd.DataFrame([{"model": model, "classes": json.dumps(CLASSES)}])

    frames = {name: row(name) if name != "resnet50_fixmatch" else pd.DataFrame() for name in reversed(CANDIDATES)}

    table = every_candidate(frames)

    assert list(table["model"]) == [name for name in CANDIDATES if name != "resnet50_fixmatch"]
    with pytest.raises(TypeError, match="one training table per candidate"):
        every_candidate({name: row(name) for name in CANDIDATES if name != "multimodal"})


def test_the_calibration_table_says_whether_each_temperature_is_applied():
    from types import SimpleNamespace

    from scin_pipeline.core.calibration import TemperatureScaling

    packages = {
        "fitted": SimpleNamespace(calibration=TemperatureScaling(temperature=2.0, fitted_rows=40)),
        "refused": SimpleNamespace(
            calibration=TemperatureScaling(fitted_rows=69, note="the NLL-optimal T = 5.42 would raise ...")
        ),
        "sklearn": SimpleNamespace(calibration=None),
    }
    overall = pd.DataFrame(
        [
            {"model": m, "split": "test", "metric": metric, "value": v}
            for m in packages
            for metric, v in (("ece", 0.1), ("ece_uncalibrated", 0.2))
        ]
    )
    table = calibration_table(pd.DataFrame({"model": list(packages)}), packages, overall).set_index("model")
    assert table["applied"].to_dict() == {"fitted": True, "refused": False, "sklearn": False}
    assert table.loc["refused", "temperature"] == 1.0 and "would raise" in table.loc["refused", "note"]
    assert table.loc["fitted", "fitted_on_val_rows"] == 40 and table.loc["sklearn", "calibration"] == "none"
