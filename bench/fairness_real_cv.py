"""Fairness of ``metadata_model`` on the REAL SCIN labels from cross-validated (out-of-fold) predictions.

    python bench/fairness_real_cv.py            # bundled real metadata (scin_pipeline/data/scin)
    SCIN_METADATA_DIR=... python bench/fairness_real_cv.py

Why: on the test split (15 % of cases) US Monk 7-10 has 24 cases, below min_group_n 30, so the deep tones are
never judged (docs/results/fairness_metadata_model_real.md). Here every train+val case is scored once by a
model that did not see it (``core.crossval``: 5 folds, grouped by case and by cases sharing an image file,
stratified by label and US Monk bin), and the fairness table and gate read those pooled predictions (one
row per case, so the bootstrap resamples cases). The test split is scored as before, by a model fitted on
train, and reported beside: it stays the untouched final report.

The task is the pipeline's ``metadata_model``: labels = ``assign_labels(labelled cases, LabelPolicy())``;
split = ``make_splits(labels, case groups, SplitConfig())`` where the case groups link cases that reference
the same image file (the release's 15 duplicated files; no image is available offline for near-duplicate
search); ``fit_single_label_metadata_model`` (CHOSEN_CONFIG, seed 0). Metadata-only: no image is used.

Writes docs/results/fairness_metadata_model_cv.md (``synthetic=False``: real labels, real metadata).
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from scin_pipeline.core import bundled_metadata, crossval, fairness, fairness_report, schema
from scin_pipeline.core.dedup import case_groups
from scin_pipeline.core.metadata import parse_metadata
from scin_pipeline.core.metadata_model import CHOSEN_CONFIG, fit_single_label_metadata_model, metadata_features
from scin_pipeline.core.splits import LabelPolicy, SplitConfig, assign_labels, make_splits

MODEL = "metadata_model"
N_FOLDS = 5
N_BOOTSTRAP = 1000
MIN_GROUP_N = 30
MAX_GAP = 0.10
# Same list as scin_pipeline.assets.fairness.DEFAULT_GATE_ATTRIBUTES (not imported: that pulls in Dagster).
GATE_ATTRIBUTES = ["monk_us_bin", "monk_india_bin", "fst_dermatologist", "fst_self_reported"]
SUMMARY_ATTRIBUTES = ["monk_us_bin", "monk_india_bin", "fst_dermatologist_bin", "fst_self_reported_bin"]
TODAY_TEST_N = {("monk_us_bin", "7-10"): 24, ("monk_india_bin", "7-10"): 5}  # fairness_metadata_model_real.md
REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results" / "fairness_metadata_model_cv.md"


def _cell(table: pd.DataFrame, attribute: str, group: str, metric: str) -> str:
    rows = table[(table["attribute"] == attribute) & (table["group"] == group) & (table["metric"] == metric)]
    if rows.empty:
        return "-"
    r = rows.iloc[0]
    if not np.isfinite(r["value"]):
        return "undefined"
    interval = f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if np.isfinite(r["ci_low"]) else ""
    return f"{r['value']:.3f}{interval}"


def _n(table: pd.DataFrame, attribute: str, group: str) -> int:
    rows = table[(table["attribute"] == attribute) & (table["group"] == group)]
    return int(rows["n"].iloc[0]) if len(rows) else 0


def _judged(n: int) -> str:
    return "yes" if n >= MIN_GROUP_N else f"no (n < {MIN_GROUP_N})"


def summary_table(cv: pd.DataFrame, test: pd.DataFrame, attribute: str) -> tuple[str, list[str]]:
    """Markdown rows per group: CV n, balanced accuracy and mean AUC with intervals, judged (CV / test)."""
    header = [
        "group",
        "n scored (CV)",
        "bal. acc. (CV)",
        "mean OvR AUC (CV)",
        "judged (CV)",
        "n (test)",
        "bal. acc. (test)",
        "judged (test)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    newly = []
    groups = fairness.group_order(attribute, cv.loc[cv["attribute"] == attribute, "group"].unique())
    for group in groups:
        n_cv, n_test = _n(cv, attribute, group), _n(test, attribute, group)
        if group != schema.MISSING_GROUP and n_cv >= MIN_GROUP_N > n_test:
            newly.append(f"{attribute}={group} (test n={n_test}, CV n={n_cv})")
        lines.append(
            "| "
            + " | ".join(
                [
                    group,
                    f"{n_cv:,}",
                    _cell(cv, attribute, group, "balanced_accuracy"),
                    _cell(cv, attribute, group, "mean_ovr_auc"),
                    _judged(n_cv),
                    f"{n_test:,}",
                    _cell(test, attribute, group, "balanced_accuracy"),
                    _judged(n_test),
                ]
            )
            + " |"
        )
    return "\n".join(lines), newly


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    started = time.perf_counter()
    source = Path(os.environ.get("SCIN_METADATA_DIR") or bundled_metadata.metadata_dir())
    parsed = parse_metadata((source / "scin_cases.csv").read_bytes(), (source / "scin_labels.csv").read_bytes())
    cases = parsed.cases.assign(case_id=parsed.cases["case_id"].astype(str))

    labels = assign_labels(cases, LabelPolicy())
    labels["case_id"] = labels["case_id"].astype(str)
    links = parsed.images[["case_id", "image_id"]].astype(str).rename(columns={"image_id": "cluster_id"})
    links = links[links["case_id"].isin(set(labels["case_id"]))]
    groups = case_groups(links)
    split = make_splits(labels, groups, SplitConfig())
    classes = sorted(labels["label"].astype(str).unique())
    index = {c: i for i, c in enumerate(classes)}
    frame = (
        split[["case_id", "group_id", "split", "label"]]
        .astype({"case_id": str, "group_id": str, "split": str, "label": str})
        .merge(cases, on="case_id", how="left", validate="one_to_one")
    )
    features = metadata_features(frame)
    y = frame["label"].map(index).to_numpy(np.int32)
    sensitive_all = fairness.sensitive_features(frame)
    linked = int((frame["group_id"] != frame["case_id"]).sum())

    # Out-of-fold over train+val.
    tv = frame["split"].isin(["train", "val"]).to_numpy()
    tv_frame = frame[tv].reset_index(drop=True).assign(monk_bin=sensitive_all["monk_us_bin"][tv].to_numpy())
    folds = crossval.assign_folds(tv_frame, N_FOLDS, seed=0).to_numpy()
    x_tv, y_tv = features[tv].reset_index(drop=True), y[tv]

    def fit_predict(train_rows: np.ndarray, held_out: np.ndarray) -> np.ndarray:
        model = fit_single_label_metadata_model(
            x_tv.iloc[train_rows], y_tv[train_rows], len(classes), CHOSEN_CONFIG, seed=0
        )
        return model.predict_proba(x_tv.iloc[held_out])

    oof = crossval.out_of_fold_proba(folds, tv_frame["group_id"].to_numpy(), fit_predict, len(classes))
    sensitive_tv = sensitive_all[tv].reset_index(drop=True)
    cv_table = fairness.fairness_table(
        MODEL, y_tv, oof, classes, sensitive_tv, n_bootstrap=N_BOOTSTRAP, min_group_n=MIN_GROUP_N
    )
    cv_gate = fairness.fairness_gate(
        cv_table,
        max_gap=MAX_GAP,
        attributes=GATE_ATTRIBUTES,
        min_group_n=MIN_GROUP_N,
        source=crossval.oof_source(N_FOLDS),
    )

    # The test split, as the pipeline reports it: fitted on train, scored once on test.
    train, test = (frame["split"] == "train").to_numpy(), (frame["split"] == "test").to_numpy()
    model = fit_single_label_metadata_model(features[train], y[train], len(classes), CHOSEN_CONFIG, seed=0)
    test_table = fairness.fairness_table(
        MODEL,
        y[test],
        model.predict_proba(features[test]),
        classes,
        sensitive_all[test].reset_index(drop=True),
        n_bootstrap=N_BOOTSTRAP,
        min_group_n=MIN_GROUP_N,
    )
    test_gate = fairness.fairness_gate(
        test_table, max_gap=MAX_GAP, attributes=GATE_ATTRIBUTES, min_group_n=MIN_GROUP_N, source="test split"
    )

    fold_sizes = np.bincount(folds, minlength=N_FOLDS)
    deep = tv_frame["monk_bin"] == "7-10"
    deep_per_fold = np.bincount(folds[deep.to_numpy()], minlength=N_FOLDS)
    sizes = ", ".join(f"{s} {int((frame['split'] == s).sum()):,}" for s in ("train", "val", "test"))
    provenance = (
        f"Real SCIN 1.0.0 metadata and dermatologist labels ({len(labels):,} labelled cases, {len(classes)} "
        f"classes incl. 'other'; cases: {sizes}; {linked} cases linked to another by a shared image file, "
        f"kept in one split and one fold). Cross-validation: {N_FOLDS} folds over the {int(tv.sum()):,} "
        f"train+val cases (fold sizes {', '.join(map(str, fold_sizes))}; US Monk 7-10 per fold "
        f"{', '.join(map(str, deep_per_fold))}), grouped by case and shared-image group, stratified by label "
        f"and US Monk bin; each fold's model (CHOSEN_CONFIG, seed 0) fitted on the other folds; one row per "
        f"case; {N_BOOTSTRAP} bootstrap resamples of cases within each group; min_group_n {MIN_GROUP_N}; "
        f"max_gap {MAX_GAP:.2f}. Test columns: a model fitted on train, scored once on test (the untouched "
        f"report). Metadata-only model: no image was used. Produced by bench/fairness_real_cv.py in "
        f"{time.perf_counter() - started:.0f} s."
    )
    lines = [
        f"# Fairness of {MODEL} from cross-validated predictions (real SCIN metadata)",
        "",
        provenance,
        "",
        f"**Gate on out-of-fold estimates: {cv_gate.label}.** {cv_gate.reason}",
        "",
        f"**Gate on the test split alone: {test_gate.label}.** {test_gate.reason}",
        "",
        "Cells: estimate [95% percentile bootstrap interval of cases; Wilson where every resample gave the "
        "same value]. 'judged': the group has at least min_group_n cases. Overall (CV): balanced accuracy "
        f"{_cell(cv_table, schema.OVERALL, schema.OVERALL, 'balanced_accuracy')}, mean OvR AUC "
        f"{_cell(cv_table, schema.OVERALL, schema.OVERALL, 'mean_ovr_auc')} "
        f"(n={_n(cv_table, 'overall', 'overall'):,}); "
        f"test: {_cell(test_table, schema.OVERALL, schema.OVERALL, 'balanced_accuracy')}, "
        f"{_cell(test_table, schema.OVERALL, schema.OVERALL, 'mean_ovr_auc')} "
        f"(n={_n(test_table, 'overall', 'overall'):,}).",
        "",
    ]
    newly: list[str] = []
    for attribute in SUMMARY_ATTRIBUTES:
        text, new = summary_table(cv_table, test_table, attribute)
        newly += new
        lines += [f"## {schema.ATTRIBUTE_TITLES[attribute]} (`{attribute}`)", "", text, ""]
    us_deep = _n(cv_table, "monk_us_bin", "7-10")
    all_us_deep = int((fairness.sensitive_features(cases)["monk_us_bin"] == "7-10").sum())
    unjudged = cv_gate.unjudged_summary() or "none"
    lines += [
        "## Judged now, not judged on the test split",
        "",
        f"US Monk 7-10: {us_deep} cases scored out of fold (the test split alone has "
        f"{_n(test_table, 'monk_us_bin', '7-10')} in this run; {TODAY_TEST_N[('monk_us_bin', '7-10')]} in "
        "fairness_metadata_model_real.md, whose split did not keep the cases sharing an image file together). "
        f"The release has {all_us_deep} cases with US Monk 7-10, but only "
        f"{us_deep + _n(test_table, 'monk_us_bin', '7-10')} of them carry a dermatologist condition label, "
        "so no model can be scored on more.",
        "",
        "Gate groups judged out of fold that the test split could not judge:",
        "",
        *[f"- {item}" for item in newly],
        "",
        f"Still too small even out of fold (the gate says NOT JUDGED for them): {unjudged}.",
        "",
        "## Full out-of-fold fairness report",
        "",
    ]
    full = fairness_report.fairness_markdown(cv_table, cv_gate, model=MODEL, synthetic=False)
    lines += [full.replace("# Fairness report", "### Fairness report", 1).replace("\n## ", "\n### ")]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:60]))
    print(f"\nwrote {OUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
