"""Fairness of the single-label ``metadata_model`` on the REAL SCIN labels, per Monk-tone bin, with intervals.

    SCIN_METADATA_DIR=../shared/data/scin python bench/fairness_real.py

Reads scin_cases.csv and scin_labels.csv from SCIN_METADATA_DIR (default ../shared/data/scin, relative to the
repository root). No image is involved: this is the metadata-only model (the contributor's answers), the one
model whose fairness can be measured on real labels offline.

The task is the pipeline's, as the ``metadata_model`` asset trains it: labels = ``assign_labels(labelled cases,
LabelPolicy())`` (top-1 condition, classes under 20 cases -> "other"); split = ``make_splits(labels, <empty
case_groups>, SplitConfig())`` (no images offline to link duplicate cases, so each case is its own group);
classes = the sorted label names; ``fit_single_label_metadata_model`` (CHOSEN_CONFIG, seed 0) fitted on train,
scored once on test, one row per case; each overall figure is printed next to a peer measured in the same
run, the train label prior given to every test case. Then ``fairness_table`` (1000 bootstrap resamples within each
group, min_group_n 30) and ``fairness_gate`` with the asset's defaults (balanced accuracy, max_gap 0.10, Monk bins of
both grader pools and both Fitzpatrick types). Each group figure is printed next to the overall one (``diff``).

Writes docs/results/fairness_metadata_model_real.md and .html (``synthetic=False``: real labels, real metadata).
"""

from __future__ import annotations

import html
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from scin_pipeline.core import evaluation, fairness, fairness_report, schema
from scin_pipeline.core.metadata import parse_metadata
from scin_pipeline.core.metadata_model import CHOSEN_CONFIG, fit_single_label_metadata_model, metadata_features
from scin_pipeline.core.splits import LabelPolicy, SplitConfig, assign_labels, make_splits

MODEL = "metadata_model"
N_BOOTSTRAP = 1000
MIN_GROUP_N = 30
# Same list as scin_pipeline.assets.fairness.DEFAULT_GATE_ATTRIBUTES (not imported: that pulls in Dagster).
GATE_ATTRIBUTES = ["monk_us_bin", "monk_india_bin", "fst_dermatologist", "fst_self_reported"]
PRINTED_ATTRIBUTES = ["monk_us_bin", "monk_india_bin", "fst_dermatologist"]
PRINTED_METRICS = {
    "balanced_accuracy": "bal. acc.",
    "macro_f1": "macro-F1",
    "mean_ovr_auc": "mean OvR AUC",
    "top3_accuracy": "top-3",
}
REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "docs" / "results"


def _cell(row) -> str:
    if not np.isfinite(row["value"]):
        return "undefined"
    interval = (
        f" [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
        if np.isfinite(row["ci_low"]) and np.isfinite(row["ci_high"])
        else ""
    )
    return f"{row['value']:.3f}{interval}"


def group_table(table: pd.DataFrame, attribute: str) -> str:
    """Markdown: one row per group, each metric as 'value [CI] (diff to overall)', insufficient flag."""
    rows = table[table["attribute"] == attribute]
    header = ["group", "n"] + list(PRINTED_METRICS.values()) + ["insufficient"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for group, part in rows.groupby("group", sort=False):
        by_metric = part.set_index("metric")
        cells = [str(group), f"{int(part['n'].iloc[0]):,}"]
        for metric in PRINTED_METRICS:
            r = by_metric.loc[metric]
            diff = (
                f" ({r['diff_to_overall']:+.3f})"
                if attribute != schema.OVERALL and np.isfinite(r["diff_to_overall"])
                else ""
            )
            cells.append(_cell(r) + diff)
        cells.append("yes" if bool(part["insufficient_data"].iloc[0]) else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class PipelineTask:
    """The pipeline's single-label task on the real metadata, as the ``metadata_model`` asset trains it:
    every parsed case and image reference, the labels and the split, and one row per labelled case
    (``frame``) with its features and class index. bench/self_training_real.py uses the very same split."""

    cases: pd.DataFrame
    images: pd.DataFrame
    labels: pd.DataFrame
    classes: list[str]
    frame: pd.DataFrame
    features: pd.DataFrame
    y: np.ndarray


def metadata_source() -> Path:
    return Path(os.environ.get("SCIN_METADATA_DIR", REPO / "../shared/data/scin"))


def pipeline_task(source: Path) -> PipelineTask:
    parsed = parse_metadata((source / "scin_cases.csv").read_bytes(), (source / "scin_labels.csv").read_bytes())
    cases = parsed.cases.assign(case_id=parsed.cases["case_id"].astype(str))
    labels = assign_labels(cases, LabelPolicy())
    split = make_splits(labels, pd.Series(dtype=object), SplitConfig())
    classes = sorted(labels["label"].astype(str).unique())
    index = {c: i for i, c in enumerate(classes)}
    frame = (
        split[["case_id", "split", "label"]]
        .astype({"case_id": str, "split": str, "label": str})
        .merge(cases, on="case_id", how="left", validate="one_to_one")
    )
    y = frame["label"].map(index).to_numpy(np.int32)
    return PipelineTask(cases, parsed.images, labels, classes, frame, metadata_features(frame), y)


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    task = pipeline_task(metadata_source())
    labels, classes, frame, features, y = task.labels, task.classes, task.frame, task.features, task.y
    train, test = (frame["split"] == "train").to_numpy(), (frame["split"] == "test").to_numpy()

    model = fit_single_label_metadata_model(features[train], y[train], len(classes), CHOSEN_CONFIG, seed=0)
    proba = model.predict_proba(features[test])
    y_test = y[test]
    overall = evaluation.classification_metrics(y_test, proba, classes)
    # Peer in the same run: every test case gets the train class frequencies (no metadata used), so each
    # figure can be read against what the label prior alone achieves.
    prior = np.bincount(y[train], minlength=len(classes)) / train.sum()
    peer = evaluation.classification_metrics(y_test, np.tile(prior, (len(y_test), 1)), classes)

    sensitive = fairness.sensitive_features(frame[test].reset_index(drop=True))
    table = fairness.fairness_table(
        MODEL, y_test, proba, classes, sensitive, n_bootstrap=N_BOOTSTRAP, min_group_n=MIN_GROUP_N
    )
    gate = fairness.fairness_gate(table, attributes=GATE_ATTRIBUTES)

    sizes = ", ".join(f"{s} {int((frame['split'] == s).sum()):,}" for s in ("train", "val", "test"))
    provenance = (
        f"Real SCIN metadata and dermatologist labels ({len(labels):,} labelled cases, {len(classes)} "
        f"classes incl. 'other'; cases: {sizes}); model fitted on train only, scored once on test, "
        f"one row per case; {N_BOOTSTRAP} bootstrap resamples; min_group_n {MIN_GROUP_N}. "
        "Metadata-only model: no image was used. Produced by bench/fairness_real.py."
    )
    overall_line = ", ".join(f"{k} {v:.4f} (train-prior peer {peer[k]:.4f})" for k, v in overall.items())
    print(provenance)
    print(f"\nOverall test metrics (evaluation.classification_metrics): {overall_line}\n")
    print("Overall with 95% bootstrap intervals:\n" + group_table(table, schema.OVERALL) + "\n")
    for attribute in PRINTED_ATTRIBUTES:
        print(f"{schema.ATTRIBUTE_TITLES[attribute]} (`{attribute}`); cell: value [95% CI] (diff to overall)")
        print(group_table(table, attribute) + "\n")
    print(f"Fairness gate: {'PASSED' if gate.passed else 'FAILED'}. {gate.reason}")

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    markdown = fairness_report.fairness_markdown(table, gate, model=MODEL, synthetic=False)
    markdown += (
        f"\n## Provenance\n\n{provenance}\n\nOverall test metrics "
        f"(`evaluation.classification_metrics`): {overall_line}.\n"
    )
    (OUT_DIR / "fairness_metadata_model_real.md").write_text(markdown)
    page = fairness_report.fairness_html(
        table, gate, fairness_report.fairness_plots(table), model=MODEL, synthetic=False
    )
    page = page.replace(
        "</body></html>",
        f"<h2>Provenance</h2><p>{html.escape(provenance)}</p>"
        f"<p>Overall test metrics: {html.escape(overall_line)}.</p></body></html>",
    )
    (OUT_DIR / "fairness_metadata_model_real.html").write_text(page)
    print(f"\nwrote {OUT_DIR.relative_to(REPO)}/fairness_metadata_model_real.md and .html")


if __name__ == "__main__":
    main()
