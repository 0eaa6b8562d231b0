"""Evaluation assets: model_evaluation + model_predictions (every candidate on val and test: metrics, and
the per-image predictions the fairness report reads) -> model_comparison (champion).

Every candidate is scored on the same rows (one per image and case with cached pixels), through the same
packaged model that the registry serves, so the comparison is like for like. The champion is chosen on the
validation split by a stated rule; test figures are reported, never used to choose.
"""

import json
from collections.abc import Mapping
from typing import Literal

import numpy as np
import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AssetOut,
    Config,
    MetadataValue,
    Output,
    asset,
    multi_asset,
)
from pydantic import Field

from scin_pipeline.assets._metadata import metric_md
from scin_pipeline.core.atomic import write_bytes_atomic
from scin_pipeline.core.champion import (
    FAIRNESS_STATUS_TAG,
    FAIRNESS_UNJUDGED_TAG,
    ChampionRule,
    blank_split,
    champion_rule_text,
    choose_champion,
    no_champion_reason,
    twin_comparison,
)
from scin_pipeline.core.image_cache import split_arrays
from scin_pipeline.core.rendering import png_data_uri_bytes
from scin_pipeline.resources import MlflowTracking, StoragePaths
from scin_pipeline.resources.mlflow_tracking import CHAMPION_CLEARED_REASON_TAG

GROUP = "evaluation"
CANDIDATES = (
    "baseline_cnn",
    "resnet50_transfer",
    "resnet50_fixmatch",
    "efficientnet_transfer",
    "metadata_model",
    "metadata_model_self_trained",
    "multimodal",
)
# A semi-supervised candidate -> its supervised twin: the same model on the same labelled rows and split,
# without the unlabelled cases. model_comparison stores the pair (column twin) and shows it side by side
# (metadata twins).
TWINS = {"metadata_model_self_trained": "metadata_model", "resnet50_fixmatch": "resnet50_transfer"}
OVERALL_METRICS = [
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "top3_accuracy",
    "mean_ovr_auc",
    "ece",
    "ece_uncalibrated",
]
EVALUATED_SPLITS = ("val", "test")
SCORED_SPLITS = ("val", blank_split("val"), "test")  # the splits of model_evaluation's table
PASSED_OVER_TAG = "scin.passed_over"  # on a candidate's run when no champion is named: why it was not eligible


# Every candidate's training table as an input, for the assets that read them all (model_evaluation,
# model_comparison, fairness_report): they take them as **candidate_frames, so a candidate added to
# CANDIDATES reaches all three.
CANDIDATE_INS = {name: AssetIn(dagster_type=pd.DataFrame) for name in CANDIDATES}


def candidates_table(*frames: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([f for f in frames if f is not None and len(f)], ignore_index=True)


def every_candidate(candidate_frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The training tables of CANDIDATE_INS (one row per trained candidate) in CANDIDATES order."""
    if set(candidate_frames) != set(CANDIDATES):
        raise TypeError(f"expected one training table per candidate {list(CANDIDATES)}, got {sorted(candidate_frames)}")
    return candidates_table(*(candidate_frames[name] for name in CANDIDATES))


def calibration_table(candidates: pd.DataFrame, packages: dict, overall: pd.DataFrame) -> pd.DataFrame:
    """Per candidate: its calibration (method, temperature, validation rows it was fitted on) and the test
    ECE before (ece_uncalibrated) and after (ece) it."""
    test = overall[overall["split"] == "test"].pivot_table(index="model", columns="metric", values="value")
    rows = []
    for model in candidates["model"]:
        calibration = packages[model].calibration
        rows.append(
            {
                "model": model,
                "calibration": "none" if calibration is None else calibration.method,
                # False where no T was fitted or the fitted one was refused (the note says which and why).
                "applied": calibration is not None and calibration.fitted,
                "temperature": calibration.temperature if calibration is not None else float("nan"),
                "fitted_on_val_rows": calibration.fitted_rows if calibration is not None else 0,
                "note": calibration.note if calibration is not None else "not calibrated (not an image model)",
                "ece_uncalibrated": test["ece_uncalibrated"].get(model, float("nan")),
                "ece": test["ece"].get(model, float("nan")),
            }
        )
    return pd.DataFrame(rows)


@multi_asset(
    group_name=GROUP,
    outs={
        "model_evaluation": AssetOut(
            kinds={"scikitlearn", "mlflow"},
            code_version="2",  # 2: the val_blank rows
            description="Every candidate on the validation and test splits: accuracy, balanced accuracy, "
            "macro-F1, top-3 accuracy, per-class one-vs-rest AUC and their mean, expected calibration error; "
            "and on the validation split with every questionnaire blank, as a blank form is encoded when "
            "serving (split 'val_blank'; a candidate that reads no questionnaire scores as on 'val'). "
            "Probabilities are the calibrated ones the packaged model serves (temperature scaling, fitted on "
            "validation; T = 1 where a fitted T would raise the validation ECE); ece_uncalibrated is the "
            "expected calibration error of the model's own output, before. "
            "Long table (model, split, metric, class, value); confusion matrices in the metadata and in each "
            "model's MLflow run.",
        ),
        "model_predictions": AssetOut(
            kinds={"pandas", "parquet"},
            code_version="1",
            description="Every candidate's prediction per image on the validation and test splits: image_id, "
            "case_id, label, model, split, y_true, y_pred and the class probabilities p_0..p_K-1 (classes in "
            "the candidates' order). What the fairness report is computed from.",
        ),
    },
    ins=CANDIDATE_INS,
)
def model_evaluation(
    context: AssetExecutionContext,
    labeled_splits: pd.DataFrame,
    image_tensors: pd.DataFrame,
    cases: pd.DataFrame,
    storage: StoragePaths,
    mlflow: MlflowTracking,
    **candidate_frames: pd.DataFrame,
):
    from scin_pipeline.core import evaluation
    from scin_pipeline.core.packaged_model import METADATA_KINDS, PackagedClassifier

    candidates = every_candidate(candidate_frames)
    classes = json.loads(candidates["classes"].iloc[0])
    cache_dir = storage.image_tensors_dir
    out_dir = storage.table_files_dir("model_evaluation")
    data = {split: split_arrays(labeled_splits, image_tensors, cache_dir, split, classes) for split in EVALUATED_SPLITS}
    tables, predictions, metadata, packages = [], [], {}, {}
    for name, package_dir, run_id in zip(
        candidates["model"].astype(str), candidates["package_dir"].astype(str), candidates["mlflow_run_id"].astype(str)
    ):
        package = PackagedClassifier.load(storage.resolve(package_dir))  # stored relative to the root
        packages[name] = package
        if list(package.classes) != classes:
            raise ValueError(f"{name}: trained on classes {package.classes}, splits have {classes}")
        for split, (rows, images, y) in data.items():
            # One model call: the calibrated probabilities are the package's calibration of the raw ones.
            raw = package.predict_rows(rows, images, cases, calibrated=False)
            proba = package.calibrate(raw)
            table = evaluation.evaluation_table(name, y, proba, classes, uncalibrated_proba=raw)
            table = table.assign(split=split)
            tables.append(table)
            if split == "val":
                # Every questionnaire blank: only the case ids reach the encoding, which reads them as a blank
                # form. A candidate that reads no questionnaire predicts the same with or without one.
                blank = table
                if package.kind in METADATA_KINDS:
                    blank_raw = package.predict_rows(rows, images, cases[["case_id"]], calibrated=False)
                    blank = evaluation.evaluation_table(
                        name, y, package.calibrate(blank_raw), classes, uncalibrated_proba=blank_raw
                    )
                tables.append(blank.assign(split=blank_split(split)))
            predictions.append(
                rows[["image_id", "case_id", "label"]].assign(
                    model=name,
                    split=split,
                    y_true=y,
                    y_pred=proba.argmax(axis=1),
                    **{f"p_{i}": proba[:, i] for i in range(len(classes))},
                )
            )
            if split != "test":
                continue
            confusion = evaluation.confusion_matrix_png(y, proba.argmax(axis=1), classes, title=f"{name} (test)")
            write_bytes_atomic(confusion, out_dir / f"confusion_{name}.png")
            overall = table[table["class"].isna() | (table["class"] == "")]
            overall_values = overall.set_index("metric")["value"].astype(float)
            with mlflow.log_to_run(run_id) as run:
                run.log_metrics({f"test_{m}": float(v) for m, v in overall_values.items() if np.isfinite(v)})
                run.log_figure_png(confusion, "evaluation/confusion_test.png")
                run.log_table(table, "evaluation/test_metrics.csv")
            metadata[f"confusion_{name}"] = MetadataValue.md(f"![{name}]({png_data_uri_bytes(confusion)})")
    result = pd.concat(tables, ignore_index=True)
    result = result[["model", "split", "metric", "class", "value"]]
    prediction_rows = pd.concat(predictions, ignore_index=True)
    overall = result[result["class"].isna() | (result["class"] == "")]
    shown = [m for m in OVERALL_METRICS if m != "top3_accuracy" or evaluation.top_k_is_informative(len(classes))]
    wide = (
        overall.pivot_table(index="model", columns=["split", "metric"], values="value")
        .reindex(columns=pd.MultiIndex.from_product([SCORED_SPLITS, shown]))
        .round(3)
    )
    wide.columns = [f"{s}_{m}" for s, m in wide.columns]
    calibrations = calibration_table(candidates, packages, overall)
    per_class = result[(result["split"] == "test") & result["class"].notna() & (result["class"] != "")]
    metadata.update(
        {
            "classes": len(classes),
            "rows_per_split": MetadataValue.json({s: int(len(d[0])) for s, d in data.items()}),
            "overall": metric_md(wide.reset_index()),
            "calibration": metric_md(calibrations),
            # Flat floats, so that Dagster plots them over materialisations.
            **{
                f"{r.model}_test_{column}": float(getattr(r, column))
                for r in calibrations.itertuples()
                for column in ("ece_uncalibrated", "ece")
                if np.isfinite(getattr(r, column))
            },
            "per_class_test": metric_md(
                per_class.pivot_table(index=["class"], columns=["model", "metric"], values="value")
                .round(3)
                .pipe(lambda f: f.set_axis([f"{m}:{k}" for m, k in f.columns], axis=1))
                .reset_index(),
                rows=40,
            ),
        }
    )
    yield Output(result, output_name="model_evaluation", metadata=metadata)
    yield Output(
        prediction_rows,
        output_name="model_predictions",
        metadata={
            "models": ", ".join(candidates["model"]),
            "rows_per_model_and_split": MetadataValue.json(
                {f"{m}/{s}": int(n) for (m, s), n in prediction_rows.groupby(["model", "split"]).size().items()}
            ),
        },
    )


_DEFAULT_RULE = ChampionRule()


def tag_fairness_status(mlflow: MlflowTracking, ranked: pd.DataFrame, gates: pd.DataFrame) -> None:
    """The gate's outcome on every registered candidate version (tag scin.fairness_status) and, when it
    could not judge, the groups too small to judge (scin.fairness_unjudged; removed otherwise)."""
    from scin_pipeline.core.fairness import GateResult

    stored = {
        str(m): GateResult.from_dict(json.loads(g))
        for m, g in zip(gates["model"], gates["gate"] if "gate" in gates else [None] * len(gates))
        if isinstance(g, str) and g
    }
    client = mlflow.client()
    name = mlflow.registered_model_name
    for model, version, status in zip(ranked["model"], ranked["registered_version"], ranked["fairness_status"]):
        if not status or not isinstance(version, str | int) or not str(version):
            continue
        client.set_model_version_tag(name, str(version), FAIRNESS_STATUS_TAG, str(status))
        gate = stored.get(str(model))
        unjudged = (gate.unjudged_summary() if gate is not None else "") or "see the fairness report"
        if status == "not_judged":
            client.set_model_version_tag(name, str(version), FAIRNESS_UNJUDGED_TAG, unjudged[:4000])
        elif FAIRNESS_UNJUDGED_TAG in (client.get_model_version(name, str(version)).tags or {}):
            client.delete_model_version_tag(name, str(version), FAIRNESS_UNJUDGED_TAG)


# The Launchpad face of core.champion.ChampionRule (defaults from there).
class ComparisonConfig(Config):
    selection_split: str = Field(
        default=_DEFAULT_RULE.selection_split, description="the split the rule reads (never test)"
    )
    selection_metric: str = Field(
        default=_DEFAULT_RULE.selection_metric, description="ranked by this, higher is better"
    )
    tie_breakers: list[str] = Field(default=list(_DEFAULT_RULE.tie_breakers))
    chance_margin: float = Field(
        default=_DEFAULT_RULE.chance_margin,
        ge=0,
        description="eligible only when balanced accuracy beats chance (1/K) by this",
    )
    unjudged_policy: Literal["block", "allow_with_flag"] = Field(
        default=_DEFAULT_RULE.unjudged_policy,
        description="a candidate the fairness gate could not judge (a gate group too small even at bin level): "
        "block (not eligible; the default, and `scin-pipeline run`'s) or allow_with_flag (eligible, flagged on "
        "the model version, card and page; the demo's, on synthetic images)",
    )
    blank_questionnaire_weight: float = Field(
        default=_DEFAULT_RULE.blank_questionnaire_weight,
        ge=0,
        le=1,
        description="weight of the selection metric scored with every questionnaire blank in the ranked score "
        "(the rest: with the answers); 0.5: a blank form counts as much as an answered one",
    )

    def rule(self) -> ChampionRule:
        return ChampionRule(
            selection_split=self.selection_split,
            selection_metric=self.selection_metric,
            tie_breakers=tuple(self.tie_breakers),
            chance_margin=self.chance_margin,
            unjudged_policy=self.unjudged_policy,
            blank_questionnaire_weight=self.blank_questionnaire_weight,
        )


@asset(
    group_name=GROUP,
    kinds={"mlflow"},
    code_version="3",  # 3: the rule reads blank-questionnaire scores
    description="Every candidate side by side (validation and test); the champion chosen by the stated rule "
    "(on validation, never test) and set as the MLflow registry alias 'champion': "
    "models:/<registered name>@champion serves it. When no candidate is eligible the alias is removed "
    "(the reason is on the registered model, tag scin.champion_cleared_reason, and on every candidate's run).",
    check_specs=[
        AssetCheckSpec(
            "champion_chosen",
            asset="model_comparison",
            blocking=True,
            description="A champion passing the fairness gate was chosen and the registry "
            "alias points at it; blocks the model card otherwise.",
        )
    ],
    ins=CANDIDATE_INS,
)
def model_comparison(
    context: AssetExecutionContext,
    config: ComparisonConfig,
    model_evaluation: pd.DataFrame,
    fairness_gates: pd.DataFrame,
    fairness_report: pd.DataFrame,
    mlflow: MlflowTracking,
    **candidate_frames: pd.DataFrame,
):
    from scin_pipeline.core.evaluation import top_k_is_informative
    from scin_pipeline.core.plots import metric_comparison_png

    if config.selection_split == "test":
        raise ValueError("selection_split must not be 'test': the test split only reports")
    candidates = every_candidate(candidate_frames)
    n_classes = len(json.loads(candidates["classes"].iloc[0]))
    overall = model_evaluation[model_evaluation["class"].isna() | (model_evaluation["class"] == "")]
    wide = overall.pivot_table(index="model", columns=["split", "metric"], values="value")
    wide.columns = [f"{s}_{m}" for s, m in wide.columns]
    wide = wide.reset_index()
    champion_rule = config.rule()
    ranked = choose_champion(wide, n_classes, champion_rule, fairness_gates).merge(
        candidates[["model", "kind", "registered_version", "model_uri", "mlflow_run_id"]], on="model"
    )
    ranked["champion"] = ranked["champion"].fillna(False).astype(bool)
    ranked["twin"] = ranked["model"].map(TWINS).fillna("")
    twins = twin_comparison(ranked, TWINS)
    champion = ranked[ranked["champion"]]
    rule = champion_rule_text(champion_rule)
    alias_uri = None
    tag_fairness_status(mlflow, ranked, fairness_gates)
    flag_metadata = {}
    if len(champion):
        best = champion.iloc[0]
        split, blank = config.selection_split, blank_split(config.selection_split)
        reason = (
            f"{best['model']}: {rule}; {champion_rule.score_column}={best[champion_rule.score_column]:.3f} "
            f"({split}_{config.selection_metric}={best[f'{split}_{config.selection_metric}']:.3f}, "
            f"{blank}_{config.selection_metric}={best[f'{blank}_{config.selection_metric}']:.3f})"
        )
        if best["fairness_status"] == "not_judged":
            # Named under unjudged_policy=allow_with_flag: say so wherever the champion is shown.
            reason += "; FAIRNESS NOT JUDGED (a gate group too small to judge, allowed by unjudged_policy)"
            flag_metadata["fairness_flag"] = "champion chosen with unjudged fairness groups (allow_with_flag)"
            context.log.warning(f"champion {best['model']} has fairness groups the gate could not judge")
        mlflow.set_champion(best["registered_version"], reason=reason)
        alias_uri = mlflow.model_uri_for_alias("champion")
        context.log.info(f"champion: {reason}")
        cleared_metadata = {}
    else:
        # No candidate may be champion: the previous one must not stay served by default. The alias is
        # removed and the reason recorded on the registered model and on every candidate's run.
        cleared_reason = no_champion_reason(ranked, rule)
        previous = mlflow.clear_champion(reason=cleared_reason)
        for run_id, passed_over in zip(ranked["mlflow_run_id"], ranked["passed_over"]):
            if isinstance(run_id, str) and run_id:
                mlflow.set_run_tags(
                    run_id, {CHAMPION_CLEARED_REASON_TAG: cleared_reason[:4000], PASSED_OVER_TAG: passed_over[:4000]}
                )
        previous_version = str(previous.version) if previous is not None else "none"
        context.log.warning(f"no champion; alias removed (it was on version {previous_version}): {cleared_reason}")
        cleared_metadata = {"champion_cleared_reason": cleared_reason, "previous_champion_version": previous_version}
    # With K <= 3 classes every row is a top-3 hit: the column would read 1.0 and say nothing.
    top3 = ["top3_accuracy"] if top_k_is_informative(n_classes) else []
    plotted = ["balanced_accuracy", "macro_f1", *top3, "mean_ovr_auc"]
    in_plot = (fairness_report["attribute"] == "overall") & fairness_report["metric"].isin(plotted)
    test_overall = fairness_report[in_plot]
    n_cases = int(test_overall["n"].max()) if len(test_overall) else 0
    level = float(test_overall["ci_level"].iloc[0]) if len(test_overall) else 0.95
    bars = metric_comparison_png(
        test_overall,
        metrics=plotted,
        title=f"test split, per case ({n_cases} cases, a case's images averaged): "
        f"estimate and {level:.0%} bootstrap interval",
    )
    selection = f"{config.selection_split}_{config.selection_metric}"
    # Tables each narrow enough for its metadata cell: the numbers, eligibility and why, calibration.
    headline = list(
        dict.fromkeys(
            [
                "rank",
                "model",
                "champion",
                champion_rule.score_column,
                selection,
                "val_balanced_accuracy",
                "test_balanced_accuracy",
                "test_macro_f1",
                *[f"test_{m}" for m in top3],
                "test_mean_ovr_auc",
            ]
        )
    )
    eligibility = ["model", "fairness_status", "registered_version", "passed_over"]
    # Calibration before and after the val-fitted temperature, on the test split (expected calibration error).
    calibration = ["model", "test_ece_uncalibrated", "test_ece"]
    # The rule's numbers with each case's answers and with blank questionnaires, and the score it ranks by.
    blank = blank_split(config.selection_split)
    questionnaire = [
        "model",
        champion_rule.score_column,
        selection,
        f"{blank}_{config.selection_metric}",
        f"{config.selection_split}_balanced_accuracy",
        f"{blank}_balanced_accuracy",
    ]
    yield Output(
        ranked,
        metadata={
            "rule": rule,
            "champion": str(champion["model"].iloc[0]) if len(champion) else "none",
            "champion_model_uri": alias_uri or "none",
            "unjudged_policy": config.unjudged_policy,
            **flag_metadata,
            **cleared_metadata,
            "comparison": metric_md(ranked[[c for c in headline if c in ranked]]),
            "eligibility": metric_md(ranked[[c for c in eligibility if c in ranked]]),
            "calibration": metric_md(ranked[[c for c in calibration if c in ranked]]),
            "with_and_without_answers": metric_md(ranked[[c for c in questionnaire if c in ranked]]),
            "twins": metric_md(twins) if len(twins) else "no semi-supervised candidate with its twin evaluated",
            "test_metrics_plot": MetadataValue.md(f"![comparison]({png_data_uri_bytes(bars)})"),
        },
    )
    current = mlflow.champion_version()
    yield AssetCheckResult(
        check_name="champion_chosen",
        passed=bool(len(champion))
        and current is not None
        and str(current.version) == str(champion["registered_version"].iloc[0]),
        metadata={
            "champion": str(champion["model"].iloc[0]) if len(champion) else "none",
            **{k: v for k, v in cleared_metadata.items() if k == "champion_cleared_reason"},
            "passed_over": metric_md(ranked[ranked["passed_over"] != ""][["model", "passed_over"]]),
        },
    )
