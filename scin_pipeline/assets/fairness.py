"""Fairness assets: fairness_report + fairness_gates (every candidate, per skin-tone and demographic group,
with bootstrap intervals; the gate's decision per candidate as its own table) and model_card (the champion's
card, Markdown + JSON manifest, quoting the stored gate).

Fairness is reported per CASE on the test split: a case's images are averaged into one prediction (what a
reader of the case would see), so rows are independent for the bootstrap and a case with three photos does
not weigh three times. The gate judges the groups with enough data; a tiny group is shown, marked
"insufficient data", never hidden. The gate reads out-of-fold estimates over train+val for the
cross-validated candidates (cross_validated_predictions: the metadata model), the test split for the others;
a small group is judged through its bin (Monk 7-10, FST5-6) when that is big enough,
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
from scin_pipeline.assets.evaluation import CANDIDATE_INS, candidates_table, every_candidate
from scin_pipeline.core.atomic import write_parquet_atomic, write_text_atomic
from scin_pipeline.core.champion import FAIRNESS_REASON_TAG, FAIRNESS_STATUS_TAG
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


class CrossValidationConfig(Config):
    n_folds: int = Field(default=5, ge=2, description="folds over the train+val cases")
    seed: int = Field(default=0, description="fold order (hash seed) and each fold model's seed")


# Candidates refitted per fold: the metadata models are CPU fits. The Keras candidates are not
# cross-validated (yet); their gate reads the test split, and the report says so.
CROSS_VALIDATED = ("metadata_model", "metadata_model_self_trained")
OOF_COLUMNS = ["model", "case_id", "group_id", "fold", "y_true"]


@asset(
    group_name=GROUP,
    kinds={"scikitlearn", "pandas"},
    code_version="3",  # 2: the candidate's questionnaire dropout per fold; 3: the self-trained twin too
    pool="cpu",
    description="Out-of-fold predictions for the fairness gate: k-fold cross-validation over the train+val "
    "cases (whole groups of cases linked by shared or near-duplicate images per fold, stratified by label and "
    "US Monk bin), each case scored once by a model refitted on the other folds, so a small skin-tone group "
    "is judged on ~85 % of its cases instead of the test split's ~15 %. The metadata models only "
    "(metadata_model, and metadata_model_self_trained, whose fold models self-train on the unlabelled pool "
    "less any case linked to the held-out fold); the Keras candidates are judged on the test split. One row "
    "per (model, case): fold, y_true, p_0..p_K-1.",
)
def cross_validated_predictions(
    context: AssetExecutionContext,
    config: CrossValidationConfig,
    labeled_splits: pd.DataFrame,
    cases: pd.DataFrame,
    metadata_model: pd.DataFrame,
    metadata_model_self_trained: pd.DataFrame,
    unlabelled_pool: pd.DataFrame,
    storage: StoragePaths,
) -> Output:
    import numpy as np

    from scin_pipeline.core import crossval, fairness
    from scin_pipeline.core import metadata_model as core_model
    from scin_pipeline.core.packaged_model import read_spec

    candidates = candidates_table(metadata_model, metadata_model_self_trained)
    if candidates.empty:
        return Output(pd.DataFrame(columns=OOF_COLUMNS), metadata={"models": "none"})
    classes = json.loads(candidates["classes"].iloc[0])
    index = {c: i for i, c in enumerate(classes)}
    per_case = labeled_splits.drop_duplicates("case_id")
    per_case = per_case[per_case["split"].astype(str).isin(["train", "val"])][["case_id", "group_id", "label"]]
    frame = per_case.astype(str).merge(cases.assign(case_id=cases["case_id"].astype(str)), on="case_id", how="left")
    frame = frame.reset_index(drop=True)
    frame["monk_bin"] = fairness.sensitive_features(frame)["monk_us_bin"].to_numpy()
    folds = crossval.assign_folds(frame, config.n_folds, seed=config.seed).to_numpy()
    features = core_model.metadata_features(frame)
    y = frame["label"].map(index).to_numpy(np.int32)
    pool = unlabelled_pool.drop_duplicates("case_id")[["case_id", "group_id"]].astype(str).reset_index(drop=True)
    pool_features = core_model.metadata_features(
        pool.merge(cases.assign(case_id=cases["case_id"].astype(str)), on="case_id", how="left")
    )

    def supervised(dropout: float):
        def fit_predict(train_rows, held_out):
            model = core_model.fit_single_label_metadata_model(
                features.iloc[train_rows], y[train_rows], len(classes), seed=config.seed, questionnaire_dropout=dropout
            )
            return model.predict_proba(features.iloc[held_out])

        return fit_predict

    def self_trained(rule, dropout: float):
        def fit_predict(train_rows, held_out):
            # A pool case linked to a held-out case (shared or near-duplicate images) would bring it into the
            # fold's training through its pseudo-label: left out of this fold's pool.
            usable = ~pool["group_id"].isin(set(frame["group_id"].iloc[held_out])).to_numpy()
            result = core_model.fit_self_trained_metadata_model(
                features.iloc[train_rows],
                y[train_rows],
                pool_features[usable],
                len(classes),
                rule,
                seed=config.seed,
                questionnaire_dropout=dropout,
            )
            return result.model.predict_proba(features.iloc[held_out])

        return fit_predict

    parts, scored = [], []
    for candidate in candidates.to_dict("records"):
        # Each fold's model is trained as the candidate was (its modality dropout); a table stored before the
        # column existed was trained without any.
        dropout = float(candidate.get("questionnaire_dropout", 0.0) or 0.0)
        if candidate["model"] == "metadata_model":
            fit_predict = supervised(dropout)
        else:
            # The fold models self-train with the candidate's own settings, as its package records them.
            settings = read_spec(storage.resolve(str(candidate["package_dir"])))["extra"]["self_training"]
            fit_predict = self_trained(core_model.SelfTrainingConfig(**settings), dropout)
        proba = crossval.out_of_fold_proba(folds, frame["group_id"].to_numpy(), fit_predict, len(classes))
        parts.append(
            frame[["case_id", "group_id"]].assign(
                model=candidate["model"], fold=folds, y_true=y, **{f"p_{i}": proba[:, i] for i in range(len(classes))}
            )[OOF_COLUMNS + [f"p_{i}" for i in range(len(classes))]]
        )
        scored.append(str(candidate["model"]))
    result = pd.concat(parts, ignore_index=True)
    deep = frame["monk_bin"] == "7-10"
    return Output(
        result,
        metadata={
            "models": ", ".join(scored),
            "not_cross_validated": (
                "baseline_cnn, resnet50_transfer, resnet50_fixmatch, efficientnet_transfer, multimodal "
                "(judged on the test split)"
            ),
            "n_folds": config.n_folds,
            "cases_scored": len(frame),
            "monk_us_7_10_scored": int(deep.sum()),
            "fold_sizes": MetadataValue.json({str(k): int(v) for k, v in zip(*np.unique(folds, return_counts=True))}),
        },
    )


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
            description="The fairness gate's decision per candidate, as fairness_report made it: status "
            "(passed, failed, not_judged), reason, metric, max_gap, min_group_n, gate attributes, the worst "
            "group's gap, the estimates' source, and the whole decision as JSON (gate). model_comparison "
            "excludes failing candidates (and unjudged ones under unjudged_policy block); the card quotes it.",
        ),
        "fairness_gate_estimates": AssetOut(
            kinds={"fairlearn", "pandas"},
            code_version="1",
            description="The per-group table each candidate's gate read (fairness_report's columns plus "
            "source): out-of-fold over train+val for the cross-validated candidates (cross_validated_predictions), "
            "the test split for the others. fairness_report stays the test split's final report.",
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
    ins=CANDIDATE_INS,
)
def fairness_report(
    context: AssetExecutionContext,
    config: FairnessConfig,
    model_predictions: pd.DataFrame,
    cross_validated_predictions: pd.DataFrame,
    labeled_splits: pd.DataFrame,
    cases: pd.DataFrame,
    storage: StoragePaths,
    mlflow: MlflowTracking,
    scin_source: ScinSourceResource,
    **candidate_frames: pd.DataFrame,
):
    from scin_pipeline.core import crossval, fairness
    from scin_pipeline.core.evaluation import case_level_predictions
    from scin_pipeline.core.fairness_report import fairness_html, fairness_markdown, fairness_plots, plot_key

    candidates = every_candidate(candidate_frames)
    classes = json.loads(candidates["classes"].iloc[0])
    per_case = case_level_predictions(model_predictions)
    synthetic = scin_source.is_synthetic()
    out_dir = storage.table_files_dir("fairness_report")
    tables, gates, metadata, estimates = [], {}, {}, []
    oof = cross_validated_predictions
    for candidate in candidates.itertuples():
        model = str(candidate.model)
        part = per_case[per_case["model"] == model].reset_index(drop=True)
        case_rows = part[["case_id"]].merge(cases, on="case_id", how="left")
        sensitive = fairness.sensitive_features(case_rows).reset_index(drop=True)
        proba = part[[f"p_{i}" for i in range(len(classes))]].to_numpy()
        table = fairness.fairness_table(
            model,
            part["y_true"].to_numpy(),
            proba,
            classes,
            sensitive,
            n_bootstrap=config.n_bootstrap,
            min_group_n=config.min_group_n,
            seed=config.seed,
        )
        gate_table, source = table, "test split (one row per case; not cross-validated)"
        cv_rows = oof[oof["model"] == model].reset_index(drop=True) if len(oof) else oof
        if len(cv_rows):
            # The gate judges out-of-fold estimates over train+val; the test table stays the report.
            cv_cases = (
                cv_rows[["case_id"]]
                .astype(str)
                .merge(cases.assign(case_id=cases["case_id"].astype(str)), on="case_id", how="left")
            )
            gate_table = fairness.fairness_table(
                model,
                cv_rows["y_true"].to_numpy(),
                cv_rows[[f"p_{i}" for i in range(len(classes))]].to_numpy(),
                classes,
                fairness.sensitive_features(cv_cases).reset_index(drop=True),
                n_bootstrap=config.n_bootstrap,
                min_group_n=config.min_group_n,
                seed=config.seed,
            )
            source = crossval.oof_source(int(cv_rows["fold"].nunique()))
        estimates.append(gate_table.assign(source=source))
        gate = fairness.fairness_gate(
            gate_table,
            metric=config.gate_metric,
            max_gap=config.max_gap,
            attributes=config.gate_attributes,
            min_group_n=config.min_group_n,
            fallback=config.bin_fallback,
            source=source,
        )
        plots = fairness_plots(table, metrics=(config.gate_metric,))
        html = fairness_html(table, gate, plots, model=model, synthetic=synthetic)
        markdown = fairness_markdown(table, gate, model=model, synthetic=synthetic)
        write_text_atomic(html, out_dir / f"{model}.html")
        write_text_atomic(markdown, out_dir / f"{model}.md")
        with mlflow.log_to_run(str(candidate.mlflow_run_id)) as run:
            run.log_text(html, "fairness/fairness_report.html")
            run.log_text(markdown, "fairness/fairness_report.md")
            run.log_table(table, "fairness/fairness_table.csv")
            run.log_metrics(
                {
                    "fairness_gate_passed": float(gate.passed),
                    "fairness_gate_not_judged": float(gate.status == "not_judged"),
                    "fairness_worst_gap": float(gate.gap) if gate.gap is not None else float("nan"),
                    # Every group's figures under stable names, for MLflow's run comparison.
                    **fairness.run_metrics(table),
                }
            )
            run.set_tags({FAIRNESS_STATUS_TAG: gate.status, FAIRNESS_REASON_TAG: gate.reason})
        tables.append(table)
        gates[model] = gate
        monk = plot_key("monk_us_bin", config.gate_metric)
        if monk in plots:
            metadata[f"{model}_monk_us_bin"] = MetadataValue.md(f"![{model}]({png_data_uri_bytes(plots[monk])})")
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
                "source": g.source,
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
            "reports": MetadataValue.path(storage.stored(out_dir)),
        }
    )
    if synthetic:
        metadata["note"] = "SYNTHETIC images: these figures say nothing about fairness on real skin"
    yield Output(result, output_name="fairness_report", metadata=metadata)
    gate_estimates = pd.concat(estimates, ignore_index=True)
    yield Output(
        gate_estimates,
        output_name="fairness_gate_estimates",
        metadata={
            "sources": MetadataValue.json({m: g.source for m, g in gates.items()}),
            "gate_groups": metric_md(
                gate_estimates[
                    gate_estimates["attribute"].isin(config.gate_attributes)
                    & (gate_estimates["metric"] == config.gate_metric)
                ][["model", "attribute", "group", "n", "value", "ci_low", "ci_high", "insufficient_data", "source"]],
                rows=80,
            ),
        },
    )
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
    gate = GateResult.from_dict(json.loads(str(fairness_gates.set_index("model").loc[name, "gate"])))
    overall = model_evaluation[
        (model_evaluation["model"] == name)
        & (model_evaluation["split"] == "test")
        & ((model_evaluation["class"] == "") | model_evaluation["class"].isna())
    ]
    metrics = {str(m): float(v) for m, v in overall.set_index("metric")["value"].items()}
    exclusions = quality_filtered_index if "reason" in quality_filtered_index else pd.DataFrame()
    counts = labeled_splits.groupby("split", observed=True)["case_id"].nunique().to_dict()
    data_summary = {
        "cases_per_split": {str(k): int(v) for k, v in counts.items()},
        # image_tensors covers every kept image, labelled or not: the card counts the labelled ones
        "images_with_pixels": int(
            labeled_splits["image_id"]
            .drop_duplicates()
            .isin(image_tensors.loc[image_tensors["status"] == "ok", "image_id"])
            .sum()
        ),
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
                "model_card_md": storage.stored(out_dir / "model_card.md"),  # relative to the data root
                "model_card_json": storage.stored(out_dir / "model_card.json"),
            }
        ]
    )
    return Output(row, metadata={"champion": name, "model_card": MetadataValue.md(markdown)})
