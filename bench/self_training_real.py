"""Self-training of the metadata model on the REAL SCIN questionnaire: does the unlabelled pool help?

    python -m bench.self_training_real [--threshold 0.1] [--rounds 3] [--weight 0.5] [--bootstrap 1000]

Reads the real SCIN 1.0.0 metadata (SCIN_METADATA_DIR, else the copy bundled in the package). The task and
split are bench/fairness_real.py's (the pipeline's single-label task: top-1 label, classes under 20 cases ->
"other", 35 classes; make_splits with each case its own group), so the figures sit beside
docs/results/fairness_metadata_model_real.md.

- Supervised twin: ``fit_single_label_metadata_model`` (CHOSEN_CONFIG, seed 0) on the train cases.
- Self-trained: ``fit_self_trained_metadata_model`` with the same model and seed, the same train cases and the
  unlabelled pool: every case without a usable label (``core.unlabelled.build_unlabelled_pool``), less any
  case sharing an image file with a validation or test case. Offline there are no pixels, so the quality
  rule and near-duplicate search cannot run: the pool is every such case, linked through exact file reuse only.
- The threshold is chosen before test is looked at, from the validation split: the supervised model's
  pseudo-label precision at each confidence (printed first).
- Test: mean one-vs-rest AUC (the mean over classes with both positives and negatives) and balanced accuracy,
  overall and per US Monk bin, each model with a percentile bootstrap interval over test cases, and the
  difference self-trained - supervised with a PAIRED bootstrap interval (the same resampled cases for both).

Writes docs/results/self_training_metadata.md. One fit of the chosen model for the twin and one per round plus
a final one for the self-trained model (HistGradientBoosting with 35 classes dominates): 768 s + 3,013 s on the
loaded 2-core development machine, then the bootstrap.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from bench.fairness_real import PipelineTask, pipeline_task
from scin_pipeline.core import bundled_metadata, evaluation, fairness
from scin_pipeline.core.metadata_model import (
    CHOSEN_CONFIG,
    SelfTrainingConfig,
    fit_self_trained_metadata_model,
    fit_single_label_metadata_model,
    metadata_features,
)
from scin_pipeline.core.unlabelled import build_unlabelled_pool

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results" / "self_training_metadata.md"
MONK_BINS = ["1-2", "3-4", "5-6", "7-10"]
VAL_THRESHOLDS = (0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3, 0.5)


def unlabelled_pool(task: PipelineTask) -> pd.DataFrame:
    """The pool's cases (one row each) by the pipeline's rule, with exact file reuse as the only link."""
    refs = task.images[task.images["path_status"] == "ok"][["image_id", "case_id"]].astype(str).drop_duplicates()
    per_case = task.frame[["case_id", "split"]]
    splits = refs.merge(per_case, on="case_id")  # every labelled case's image references, with its split
    clusters = refs.assign(cluster_id=refs["image_id"])  # one file = one cluster: exact reuse links cases
    result = build_unlabelled_pool(refs, task.cases, splits, clusters)
    excluded = result.excluded.drop_duplicates("case_id")
    reasons = result.pool.drop_duplicates("case_id")["reason"].value_counts().to_dict()
    print(
        f"pool: {result.pool['case_id'].nunique():,} cases ({reasons}); "
        f"left out {len(excluded)} linked to val/test by a shared file"
    )
    return result.pool.drop_duplicates("case_id")[["case_id", "reason"]].reset_index(drop=True)


def paired_bootstrap(y, p_self, p_sup, metric, groups, n_boot: int, seed: int = 0) -> pd.DataFrame:
    """Per group (and overall): n, each model's value and percentile interval, the paired difference."""
    rng = np.random.default_rng(seed)
    rows = []
    for group in ["overall", *MONK_BINS]:
        idx = np.arange(len(y)) if group == "overall" else np.flatnonzero(groups == group)
        if len(idx) < 2:
            rows.append((group, len(idx), *([np.nan] * 9)))
            continue
        value_self, value_sup = metric(y[idx], p_self[idx]), metric(y[idx], p_sup[idx])
        draws = np.empty((n_boot, 2))
        for b in range(n_boot):
            pick = idx[rng.integers(0, len(idx), len(idx))]
            draws[b] = metric(y[pick], p_self[pick]), metric(y[pick], p_sup[pick])
        diff = draws[:, 0] - draws[:, 1]
        lo, hi = np.nanpercentile(draws, [2.5, 97.5], axis=0)
        d_lo, d_hi = np.nanpercentile(diff, [2.5, 97.5])
        rows.append(
            (group, len(idx), value_sup, lo[1], hi[1], value_self, lo[0], hi[0], value_self - value_sup, d_lo, d_hi)
        )
    return pd.DataFrame(
        rows,
        columns=[
            "group",
            "n",
            "supervised",
            "sup_low",
            "sup_high",
            "self_trained",
            "self_low",
            "self_high",
            "difference",
            "diff_low",
            "diff_high",
        ],
    )


def auc(y, proba) -> float:
    return evaluation.mean_ovr_auc(y, proba)


def balanced_accuracy(y, proba) -> float:
    return evaluation.balanced_accuracy(y, proba.argmax(axis=1))


def markdown(table: pd.DataFrame) -> str:
    lines = [
        "| group | n | supervised [95% CI] | self-trained [95% CI] | difference [95% paired CI] |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in table.itertuples():
        if not np.isfinite(r.supervised):
            lines.append(f"| {r.group} | {r.n} | undefined | undefined | undefined |")
            continue
        lines.append(
            f"| {r.group} | {r.n} | {r.supervised:.3f} [{r.sup_low:.3f}, {r.sup_high:.3f}] | "
            f"{r.self_trained:.3f} [{r.self_low:.3f}, {r.self_high:.3f}] | "
            f"{r.difference:+.3f} [{r.diff_low:+.3f}, {r.diff_high:+.3f}] |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--weight", type=float, default=0.5)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    source = Path(os.environ.get("SCIN_METADATA_DIR") or bundled_metadata.metadata_dir())
    task = pipeline_task(source)
    frame, features, y, classes = task.frame, task.features, task.y, task.classes
    split = frame["split"].to_numpy()
    train, val, test = split == "train", split == "val", split == "test"
    pool = unlabelled_pool(task)
    pool_features = metadata_features(pool.merge(task.cases, on="case_id", how="left"))

    started = time.perf_counter()
    supervised = fit_single_label_metadata_model(features[train], y[train], len(classes), CHOSEN_CONFIG, seed=0)
    supervised_s = time.perf_counter() - started
    print(f"supervised fit: {supervised_s:.0f} s")

    # The threshold's evidence, from validation only: how often the supervised model's top class is right
    # at each confidence, and how much of the pool reaches it.
    p_val = supervised.predict_proba(features[val])
    confidence, right = p_val.max(axis=1), p_val.argmax(axis=1) == y[val]
    pool_confidence = supervised.predict_proba(pool_features).max(axis=1)
    precision_rows = []
    for t in VAL_THRESHOLDS:
        chosen = confidence >= t
        precision_rows.append(
            (
                t,
                int(chosen.sum()),
                float(right[chosen].mean()) if chosen.any() else float("nan"),
                int((pool_confidence >= t).sum()),
            )
        )
    precision = pd.DataFrame(precision_rows, columns=["threshold", "val_cases", "val_precision", "pool_cases"])
    print(precision.to_string(index=False))

    rule = SelfTrainingConfig(threshold=args.threshold, max_rounds=args.rounds, pseudo_label_weight=args.weight)
    started = time.perf_counter()
    result = fit_self_trained_metadata_model(
        features[train], y[train], pool_features, len(classes), rule, CHOSEN_CONFIG, seed=0
    )
    self_s = time.perf_counter() - started
    print(f"self-training: {self_s:.0f} s\n{result.history.to_string(index=False)}")
    accepted = result.pseudo_labels >= 0
    pseudo_classes = pd.Series([classes[k] for k in result.pseudo_labels[accepted]]).value_counts()
    train_prior = pd.Series([classes[k] for k in y[train]]).value_counts(normalize=True)

    val_rows = []
    for name, model in (("supervised", supervised), ("self-trained", result.model)):
        metrics = evaluation.classification_metrics(y[val], model.predict_proba(features[val]), classes)
        val_rows.append((name, metrics["mean_ovr_auc"], metrics["balanced_accuracy"], metrics["macro_f1"]))
    val_table = pd.DataFrame(val_rows, columns=["model", "val_mean_auc", "val_balanced_accuracy", "val_macro_f1"])
    print(val_table.to_string(index=False))

    p_sup, p_self = supervised.predict_proba(features[test]), result.model.predict_proba(features[test])
    monk = fairness.sensitive_features(frame[test].reset_index(drop=True))["monk_us_bin"].astype(str).to_numpy()
    y_test = y[test]
    started = time.perf_counter()
    auc_table = paired_bootstrap(y_test, p_self, p_sup, auc, monk, args.bootstrap)
    bacc_table = paired_bootstrap(y_test, p_self, p_sup, balanced_accuracy, monk, args.bootstrap, seed=1)
    print(f"bootstrap: {time.perf_counter() - started:.0f} s")
    print("mean AUC\n" + markdown(auc_table) + "\nbalanced accuracy\n" + markdown(bacc_table))

    overall = auc_table.iloc[0]
    helps = overall["diff_low"] > 0
    hurts = overall["diff_high"] < 0
    verdict = "helps" if helps else "hurts" if hurts else "makes no difference we can tell from this test split"
    sizes = ", ".join(f"{s} {int((split == s).sum()):,}" for s in ("train", "val", "test"))
    at_threshold = precision[precision["threshold"] == args.threshold]
    val_precision = float(at_threshold["val_precision"].iloc[0]) if len(at_threshold) else float("nan")
    command = (
        f"python -m bench.self_training_real --threshold {args.threshold} --rounds {args.rounds} "
        f"--weight {args.weight} --bootstrap {args.bootstrap}"
    )
    top_pseudo = ", ".join(
        f"{k} {v / max(accepted.sum(), 1):.0%} ({train_prior.get(k, 0):.0%})" for k, v in pseudo_classes.head(8).items()
    )
    reasons = ", ".join(f"{n:,} {r}" for r, n in pool["reason"].value_counts().items())
    text = f"""# Self-training the metadata model on SCIN's unlabelled cases (real metadata)

Produced by `{command}` on the real SCIN 1.0.0 metadata and dermatologist labels. Metadata only: no image was used.

**Verdict: self-training {verdict}.** Test mean one-vs-rest AUC {overall["supervised"]:.3f} supervised,
{overall["self_trained"]:.3f} self-trained: difference {overall["difference"]:+.3f}, 95 % paired bootstrap
interval [{overall["diff_low"]:+.3f}, {overall["diff_high"]:+.3f}] ({int(overall["n"])} test cases, {args.bootstrap}
resamples).

## Setup

- Task and split: `bench/fairness_real.py`'s, the pipeline's single-label task ({len(task.labels):,} labelled
  cases, {len(classes)} classes incl. "other"; cases {sizes}).
- Supervised twin: `fit_single_label_metadata_model` (CHOSEN_CONFIG: logistic regression C=0.03 averaged with
  150 boosted stumps, class-balanced, seed 0, no modality dropout, as in `bench/fairness_real.py`) on the
  train cases ({supervised_s:.0f} s on the loaded 2-core development machine).
- Unlabelled pool: {len(pool):,} cases without a usable label (`core.unlabelled.build_unlabelled_pool`;
  {reasons}), less cases sharing an image file with a validation or test case.
  Offline there are no pixels: no quality rule, no near-duplicate search (the pipeline's pool applies both).
- Self-training (`fit_self_trained_metadata_model`): threshold {args.threshold}, at most {args.rounds} rounds,
  a pseudo-label weighs {args.weight} of a dermatologist's label, the same model and seed ({self_s:.0f} s).

## Why this threshold (validation split only)

The supervised model's top class, on the validation cases whose top probability reaches each threshold
(precision = how often it is the dermatologists' label), and how many pool cases reach it:

{precision.to_markdown(index=False, floatfmt=(".2f", ".0f", ".3f", ".0f"))}

No threshold gives pseudo-labels that are mostly right: with {len(classes)} classes the questionnaire alone
rarely makes one class likely (the pipeline's default, 0.5, is reached by
{int((pool_confidence >= 0.5).sum())} pool cases, so at the default the self-trained model IS the supervised
one). {args.threshold} pseudo-labels a good part of the pool at a validation precision of {val_precision:.3f}
(chance: {1 / len(classes):.3f}); it was fixed before test was scored.

## Pseudo-labels

{result.history.to_markdown(index=False, floatfmt=(".0f", ".0f", ".0f", ".0f", ".3f"))}

{int(accepted.sum()):,} of {len(pool):,} pool cases pseudo-labelled. Most frequent pseudo-labels (share of
pseudo-labels; the class's share of train labels):
{top_pseudo}.

## Validation (for reference; nothing was chosen on it but the threshold)

{val_table.to_markdown(index=False, floatfmt=".3f")}

## Test: mean one-vs-rest AUC, overall and per US Monk bin

{markdown(auc_table)}

## Test: balanced accuracy, overall and per US Monk bin

{markdown(bacc_table)}

Intervals: percentile bootstrap over the test cases of the group; the difference's interval resamples the
same cases for both models (paired). Groups under 30 cases (US Monk 7-10) are too small to read.
"""
    if not args.no_write:
        OUT.write_text(text)
        print(f"wrote {OUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
