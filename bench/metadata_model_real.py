"""The metadata-only top-10 model on the REAL SCIN metadata: each task definition x model, one table.

    SCIN_METADATA_DIR=../shared/data/scin python bench/metadata_model_real.py [--cv]

Reads scin_cases.csv and scin_labels.csv from SCIN_METADATA_DIR (default ../shared/data/scin, relative to the
repository root). For each task definition (classes ranked by top label or by any mention; see
scin_pipeline.core.metadata_model) and each model (the plain logistic baseline, the previously chosen and the
chosen configuration), the model is trained on the train split and scored on val and test (train-only fit for
both, so test is never used to fit or choose). Each figure is set against the logistic baseline of the same
definition, measured in the same run (``delta`` column). ``--cv`` adds the 5-fold CV mean AUC on train+val
(the figure the configuration was chosen by; a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold

from scin_pipeline.core.metadata import parse_metadata
from scin_pipeline.core.metadata_model import (
    BASELINE_CONFIG,
    CHOSEN_CONFIG,
    PREVIOUS_CHOSEN_CONFIG,
    evaluate_predictions,
    fit_predict_split,
    metadata_dataset,
    multilabel_metrics,
    predict_proba,
    train_metadata_model,
)

MODELS = {
    "logistic C=1 (baseline)": BASELINE_CONFIG,
    "logistic C=.01 + stumps x100 (previous)": PREVIOUS_CHOSEN_CONFIG,
    "logistic C=.03 + stumps x150 (chosen)": CHOSEN_CONFIG,
}
DEFINITIONS = {"top-10 by top label (chosen)": "top_label", "top-10 by mention (previous)": "mention"}


def cv_mean_auc(dataset, config, folds: int = 5, seed: int = 0) -> float:
    """Pooled out-of-fold mean AUC on train+val; folds stratified by each case's first class (or none)."""
    rows = np.isin(dataset.split, ["train", "val"])
    X, Y = dataset.X.to_numpy()[rows], dataset.Y[rows]
    stratum = np.where(Y.any(axis=1), Y.argmax(axis=1), -1)
    P = np.zeros(Y.shape)
    for fit_rows, score_rows in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, stratum):
        P[score_rows] = predict_proba(train_metadata_model(X[fit_rows], Y[fit_rows], config), X[score_rows])
    return multilabel_metrics(Y, P)["mean_auc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cv", action="store_true", help="add the 5-fold CV mean AUC on train+val")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    source = Path(os.environ.get("SCIN_METADATA_DIR", Path(__file__).resolve().parents[1] / "../shared/data/scin"))
    parsed = parse_metadata((source / "scin_cases.csv").read_bytes(), (source / "scin_labels.csv").read_bytes())
    header = (
        ["definition", "model"]
        + (["cv mean AUC"] if args.cv else [])
        + ["val mean AUC", "test mean AUC", "test micro AUC", "test macro AP", "delta test mean AUC vs baseline"]
    )
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    per_class = {}
    for definition, rank_by in DEFINITIONS.items():
        dataset = metadata_dataset(parsed.cases, rank_by=rank_by)
        baseline_test = None
        for name, config in MODELS.items():
            result = evaluate_predictions(dataset, fit_predict_split(dataset, config))
            test = result["test"]
            baseline_test = test["mean_auc"] if baseline_test is None else baseline_test
            cells = (
                [definition, name]
                + ([f"{cv_mean_auc(dataset, config):.4f}"] if args.cv else [])
                + [
                    f"{result['val']['mean_auc']:.4f}",
                    f"{test['mean_auc']:.4f}",
                    f"{test['micro_auc']:.4f}",
                    f"{test['macro_average_precision']:.4f}",
                    f"{test['mean_auc'] - baseline_test:+.4f}",
                ]
            )
            print("| " + " | ".join(cells) + " |", flush=True)
            per_class[(definition, name)] = test["per_class_auc"]
    print(
        f"\ncases: {len(dataset.case_ids)}; split sizes: "
        + ", ".join(f"{s} {int((dataset.split == s).sum())}" for s in ("train", "val", "test"))
    )
    for key in [(d, n) for d in DEFINITIONS for n in (list(MODELS)[0], list(MODELS)[-1])]:
        print(
            f"test AUC per class, {key[0]}, {key[1]}: " + ", ".join(f"{c} {v:.3f}" for c, v in per_class[key].items())
        )


if __name__ == "__main__":
    main()
