"""Fairness assets: fairness_report + fairness_gates (every candidate, per skin-tone and demographic group,
with bootstrap intervals; the gate's decision per candidate as its own table) and model_card (the champion's
card, Markdown + JSON manifest, quoting the stored gate).

Fairness is measured per CASE on the test split: a case's images are averaged into one prediction (what a
reader of the case would see), so rows are independent for the bootstrap and a case with three photos does
not weigh three times. The gate judges the groups with enough data; a tiny group is shown, marked
"insufficient data", never hidden, and judged through its bin (Monk 7-10, FST5-6) when that is big enough,
else the candidate is "not judged" (model_comparison's unjudged_policy decides what that means).
"""

import json

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetOut,
    Config,
    MetadataValue,
    Output,
    asset,
    multi_asset,
)
from pydantic import Field

from scin_pipeline.assets._metadata import metric_md, table_md
from scin_pipeline.assets.evaluation import candidates_table
from scin_pipeline.core.atomic import write_parquet_atomic, write_text_atomic
from scin_pipeline.core.evaluation import case_level_predictions
from scin_pipeline.core.rendering import png_data_uri_bytes
from scin_pipeline.resources import MlflowTracking, ScinSourceResource, StoragePaths

GROUP = "evaluation"
# The gate reads skin tone and skin type: the groups SCIN exists to make visible. Fine-grained attributes
# (single Monk tones, race, age) are reported but would fail a gate on noise alone with ~50 groups.
DEFAULT_GATE_ATTRIBUTES = ["monk_us_bin", "monk_india_bin", "fst_dermatologist", "fst_self_reported"]


class FairnessConfig(Config):
    n_bootstrap: int = Field(default=200, ge=0, description="bootstrap resamples per group (0: no intervals)")
    min_group_n: int = Field(default=30, ge=1, description="groups smaller than this are 'insufficient data'")
    gate_metric: str = Field(default="balanced_accuracy")
    max_gap: float = Field(
        default=0.10, ge=0, le=1, description="gate: worst group below overall by more than this, CIs apart -> fail"
    )
    gate_attributes: list[str] = Field(default=DEFAULT_GATE_ATTRIBUTES)
    bin_fallback: bool = Field(
        default=True,
        description="a gate group below min_group_n is judged through its bin (Monk 7-10, FST5-6) when that is "
        "big enough; a group too small even then leaves the candidate 'not judged'",
    )
    seed: int = 0


@multi_asset(
    group_name=GROUP,
    outs={
        "fairness_report": AssetOut(
            kinds={"fairlearn", "mlflow"},
            code_version="1",
            description="Per candidate, per group of Monk skin tone (US and India graders, single tones and "
            "bins 1-2/3-4/5-6/7-10), dermatologist and self-reported Fitzpatrick type, race/ethnicity, sex at "
            "birth and age group: n, accuracy, balanced accuracy, macro-F1, mean one-vs-rest AUC, top-3 "
            "accuracy, with bootstrap intervals, difference and ratio to overall, the worst group; per case on "
            "the test split. HTML and Markdown reports in tables/fairness_report/ and in each model's MLflow run.",
        ),
        "fairness_gates": AssetOut(
            kinds={"fairlearn", "pandas"},
            code_version="1",
            description="The fairness gate's decision per candidate, as fairness_report made it: passed, "
            "reason, metric, max_gap, gate attributes, the worst group's gap, and the whole decision as JSON "
            "(gate). model_comparison excludes failing candidates from the champion; the model card quotes it.",
        ),
    },
    check_specs=[
        AssetCheckSpec(
            "fairness_gate",
            asset="fairness_report",
            description="Every candidate's worst group (gate attributes) is within max_gap of overall, or its "
            "interval overlaps overall's. A failing candidate cannot become champion (model_comparison).",
        )
    ],
)
def fairness_report(
    context: AssetExecutionContext,
    config: FairnessConfig,
    model_predictions: pd.DataFrame,
    baseline_cnn: pd.DataFrame,
    resnet50_transfer: pd.DataFrame,
    metadata_model: pd.DataFrame,
    multimodal: pd.DataFrame,
    labeled_splits: pd.DataFrame,
    cases: pd.DataFrame,
    storage: StoragePaths,
    mlflow: MlflowTracking,
    scin_source: ScinSourceResource,
):
    from scin_pipeline.core import fairness
    from scin_pipeline.core.fairness_report import fairness_html, fairness_markdown, fairness_plots, plot_key

    candidates = candidates_table(baseline_cnn, resnet50_transfer, metadata_model, multimodal)
    classes = json.loads(candidates["classes"].iloc[0])
    per_case = case_level_predictions(model_predictions)
    synthetic = scin_source.is_synthetic()
    out_dir = storage.table_files_dir("fairness_report")
    tables, gates, metadata = [], {}, {}
    for candidate in candidates.itertuples():
        part = per_case[per_case["model"] == candidate.model].reset_index(drop=True)
        case_rows = part[["case_id"]].merge(cases, on="case_id", how="left")
        sensitive = fairness.sensitive_features(case_rows).reset_index(drop=True)
        proba = part[[f"p_{i}" for i in range(len(classes))]].to_numpy()
        table = fairness.fairness_table(
            candidate.model,
            part["y_true"].to_numpy(),
            proba,
            classes,
            sensitive,
            n_bootstrap=config.n_bootstrap,
            min_group_n=config.min_group_n,
            seed=config.seed,
        )
        gate = fairness.fairness_gate(
            table,
            metric=config.gate_metric,
            max_gap=config.max_gap,
            attributes=config.gate_attributes,
            min_group_n=config.min_group_n,
            fallback=config.bin_fallback,
            source="test split (one row per case)",
        )
        plots = fairness_plots(table, metrics=(config.gate_metric,))
        html = fairness_html(table, gate, plots, model=candidate.model, synthetic=synthetic)
        markdown = fairness_markdown(table, gate, model=candidate.model, synthetic=synthetic)
        write_text_atomic(html, out_dir / f"{candidate.model}.html")
        write_text_atomic(markdown, out_dir / f"{candidate.model}.md")
        with mlflow.log_to_run(candidate.mlflow_run_id) as run:
            run.log_text(html, "fairness/fairness_report.html")
            run.log_text(markdown, "fairness/fairness_report.md")
            run.log_table(table, "fairness/fairness_table.csv")
            run.log_metrics(
                {
                    "fairness_gate_passed": float(gate.passed),
                    "fairness_gate_not_judged": float(gate.status == "not_judged"),
                    "fairness_worst_gap": float(gate.gap) if gate.gap is not None else float("nan"),
                }
            )
        tables.append(table)
        gates[candidate.model] = gate
        monk = plot_key("monk_us_bin", config.gate_metric)
        if monk in plots:
            metadata[f"{candidate.model}_monk_us_bin"] = MetadataValue.md(
                f"![{candidate.model}]({png_data_uri_bytes(plots[monk])})"
            )
    result = pd.concat(tables, ignore_index=True)
    gate_rows = pd.DataFrame(
        [
            {
                "model": m,
                "passed": g.passed,
                "status": g.status,
                "reason": g.reason,
                "metric": config.gate_metric,
                "max_gap": config.max_gap,
                "attributes": json.dumps(config.gate_attributes),
                "gap": float(g.gap),
                "min_group_n": config.min_group_n,
                "unjudged": g.unjudged_summary(),
                "gate": json.dumps(g.to_dict()),
            }
            for m, g in gates.items()
        ]
    )
    representation = fairness.representation_by_split(labeled_splits, cases)
    write_parquet_atomic(representation, out_dir / "representation_by_split.parquet")
    worst = result[result["worst"] & (result["metric"] == config.gate_metric)]
    metadata.update(
        {
            "unit": "case (test split; a case's images averaged)",
            "gate": metric_md(gate_rows[["model", "status", "reason"]]),
            "worst_groups": metric_md(
                worst[["model", "attribute", "group", "n", "value", "ci_low", "ci_high", "diff_to_overall"]], rows=60
            ),
            "insufficient_groups": int(
                result.loc[result["insufficient_data"], ["attribute", "group"]].drop_duplicates().shape[0]
            ),
            "representation_monk_us_bin": table_md(
                representation[representation["attribute"] == "monk_us_bin"], rows=30
            ),
            "reports": MetadataValue.path(str(out_dir)),
        }
    )
    if synthetic:
        metadata["note"] = "SYNTHETIC images: these figures say nothing about fairness on real skin"
    yield Output(result, output_name="fairness_report", metadata=metadata)
    yield Output(
        gate_rows,
        output_name="fairness_gates",
        metadata={
            "passed": ", ".join(m for m, g in gates.items() if g.status == "passed") or "none",
            "failed": ", ".join(m for m, g in gates.items() if g.status == "failed") or "none",
            "not_judged": ", ".join(m for m, g in gates.items() if g.status == "not_judged") or "none",
            "gate": metric_md(gate_rows[["model", "status", "metric", "max_gap", "min_group_n", "gap", "reason"]]),
        },
    )
    failing = [m for m, g in gates.items() if g.status == "failed"]
    yield AssetCheckResult(
        check_name="fairness_gate",
        passed=not failing,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "failing_models": ", ".join(failing) or "none",
            "not_judged_models": ", ".join(m for m, g in gates.items() if g.status == "not_judged") or "none",
            "reasons": MetadataValue.json({m: g.reason for m, g in gates.items()}),
        },
        description="; ".join(f"{m}: {gates[m].reason}" for m in failing) or None,
    )


@asset(
    group_name=GROUP,
    kinds={"mlflow", "markdown"},
    code_version="1",
    description="The champion's model card (Markdown + JSON manifest): intended use (education and research, "
    "not diagnosis), data and licence, exclusions, preprocessing, metrics overall and per group with "
    "intervals, limitations, ethical considerations. Written to tables/model_card/ and the champion's run.",
)
def model_card(
    context: AssetExecutionContext,
    model_comparison: pd.DataFrame,
    model_evaluation: pd.DataFrame,
    fairness_report: pd.DataFrame,
    fairness_gates: pd.DataFrame,
    quality_filtered_index: pd.DataFrame,
    labeled_splits: pd.DataFrame,
    image_tensors: pd.DataFrame,
    storage: StoragePaths,
    mlflow: MlflowTracking,
    scin_source: ScinSourceResource,
):
    from scin_pipeline.core.fairness import GateResult
    from scin_pipeline.core.model_card import build_model_card

    champion = model_comparison[model_comparison["champion"]].iloc[0]
    name = str(champion["model"])
    table = fairness_report[fairness_report["model"] == name]
    # The gate as fairness_report decided it (read, never recomputed).
    gate = GateResult.from_dict(json.loads(fairness_gates.set_index("model").loc[name, "gate"]))
    overall = model_evaluation[
        (model_evaluation["model"] == name)
        & (model_evaluation["split"] == "test")
        & ((model_evaluation["class"] == "") | model_evaluation["class"].isna())
    ]
    metrics = {r.metric: float(r.value) for r in overall.itertuples()}
    exclusions = quality_filtered_index if "reason" in quality_filtered_index else pd.DataFrame()
    counts = labeled_splits.groupby("split", observed=True)["case_id"].nunique().to_dict()
    data_summary = {
        "cases_per_split": {str(k): int(v) for k, v in counts.items()},
        "images_with_pixels": int((image_tensors["status"] == "ok").sum()),
        "fairness_gate": gate.reason,
    }
    if len(exclusions):
        data_summary["exclusions"] = {str(k): int(v) for k, v in exclusions["reason"].value_counts().items()}
    image_size = int(image_tensors["image_size"].iloc[0]) if len(image_tensors) else None
    preprocessing = {
        "image": f"guarded decode; shorter side resized to {image_size} px, centre crop; uint8; "
        "rescaling inside the model",
        "augmentation": "flips, 90° turns, 85-100 % crops; no colour change (skin tone preserved)",
        "metadata": "questionnaire answers one-hot with missing/unrecognised masks",
    }
    markdown, manifest = build_model_card(
        model_name=name,
        model_version=str(champion["registered_version"]),
        model_uri=mlflow.model_uri_for_alias("champion"),
        kind=str(champion["kind"]),
        classes=sorted(labeled_splits["label"].astype(str).unique()),
        metrics=metrics,
        fairness_table=table,
        gate=gate,
        data_summary=data_summary,
        preprocessing=preprocessing,
        synthetic=scin_source.is_synthetic(),
    )
    out_dir = storage.table_files_dir("model_card")
    write_text_atomic(markdown, out_dir / "model_card.md")
    write_text_atomic(json.dumps(manifest, indent=2, default=str), out_dir / "model_card.json")
    with mlflow.log_to_run(str(champion["mlflow_run_id"])) as run:
        run.log_text(markdown, "model_card/model_card.md")
        run.log_text(json.dumps(manifest, indent=2, default=str), "model_card/model_card.json")
    row = pd.DataFrame(
        [
            {
                "model": name,
                "registered_version": str(champion["registered_version"]),
                "model_card_md": str(out_dir / "model_card.md"),
                "model_card_json": str(out_dir / "model_card.json"),
            }
        ]
    )
    return Output(row, metadata={"champion": name, "model_card": MetadataValue.md(markdown)})
