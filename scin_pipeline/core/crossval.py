"""Out-of-fold predictions over the train+validation cases: enough cases to judge small skin-tone groups.

Why: the test split is 15 % of cases, so on the real release US Monk 7-10 has 24 test cases (India graders: 5),
below the fairness gate's ``min_group_n``; the deep tones were never judged. k-fold cross-validation over the
train+val cases scores every labelled case once, by a model that did not see it, so a group's estimate rests
on ~85 % of its cases instead of ~15 %. The test split stays the final, untouched report.

Decisions:

- Unit: the *group* of :mod:`scin_pipeline.core.splits` (cases linked by shared or near-duplicate images,
  ``group_id`` of ``labeled_splits``; a case absent from any link is its own group). A whole group lands in
  one fold, so no case and no duplicate cluster is ever scored by a model that saw it or its near duplicate
  (:func:`out_of_fold_proba` checks it on every fold, not only by construction).
- Stratified by label and Monk bin (:func:`assign_folds`): a group's stratum is its most common label and its
  most common US Monk bin. Groups are taken stratum by stratum, each in the order of a hash of (seed, group id)
  (as the splits: the same inputs give the same folds on any machine), and each goes to the fold with the
  fewest cases of its stratum, then of its Monk bin, then of its label, then in all, then the lowest index.
  So the rare deep-tone cases spread over the folds rather than landing in one.
- Deterministic, no random state: refitting with the same seed gives the same out-of-fold probabilities.
- What is pooled: one probability row per case, each from the model of the fold that held the case out. The
  fairness table is then computed on these rows as on the test split (one row per case, so the bootstrap
  resamples cases). Pooled predictions come from k slightly different models; that is the usual reading of a
  cross-validated estimate (of the procedure, trained on (k-1)/k of train+val), stated in every report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from scin_pipeline.core.splits import stable_hash

MONK_BIN_COLUMN = "monk_bin"
OOF_SOURCE = "out-of-fold predictions, {k}-fold cross-validation over the train+val cases (one row per case)"


@dataclass(frozen=True)
class CrossValConfig:
    n_folds: int = 5
    seed: int = 0

    def __post_init__(self):
        if self.n_folds < 2:
            raise ValueError(f"cross-validation needs at least 2 folds, got {self.n_folds}")


def oof_source(n_folds: int) -> str:
    """The gate's ``source`` line for out-of-fold estimates."""
    return OOF_SOURCE.format(k=n_folds)


def _most_common(values: pd.Series) -> str:
    counts = values.astype(str).value_counts()
    return str(counts[counts == counts.max()].sort_index().index[0])  # ties by name


def assign_folds(cases: pd.DataFrame, n_folds: int, *, seed: int = 0) -> pd.Series:
    """Fold (0..n_folds-1) of each case, index and order of ``cases``.

    ``cases``: one row per case with ``case_id``, ``group_id`` (the splits' grouping: cases linked by shared
    or near-duplicate images; every case of a group gets the same fold), ``label`` and ``monk_bin`` (the
    stratum with the label; e.g. the US Monk bin from ``fairness.sensitive_features``). Module docstring:
    the order and the balancing rule.
    """
    missing = [c for c in ("case_id", "group_id", "label", MONK_BIN_COLUMN) if c not in cases.columns]
    if missing:
        raise ValueError(f"cases lacks column(s) for the folds: {', '.join(missing)}")
    if n_folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {n_folds}")
    if cases["case_id"].astype(str).duplicated().any():
        raise ValueError("assign_folds needs one row per case (duplicate case_id)")
    frame = cases[["group_id", "label", MONK_BIN_COLUMN]].astype(str)
    groups = frame.groupby("group_id", sort=True).agg(
        label=("label", _most_common), monk_bin=(MONK_BIN_COLUMN, _most_common), size=("label", "size")
    )
    groups["stratum"] = groups["label"] + "\x00" + groups[MONK_BIN_COLUMN]
    groups["order"] = [stable_hash(seed, str(g)) for g in groups.index]
    groups = groups.sort_values(["stratum", "order"])
    total = np.zeros(n_folds)
    per_stratum: dict[str, np.ndarray] = {}
    per_bin: dict[str, np.ndarray] = {}
    per_label: dict[str, np.ndarray] = {}
    fold_of: dict[str, int] = {}
    for group_id, row in groups.iterrows():
        s = per_stratum.setdefault(row["stratum"], np.zeros(n_folds))
        b = per_bin.setdefault(row[MONK_BIN_COLUMN], np.zeros(n_folds))
        lab = per_label.setdefault(row["label"], np.zeros(n_folds))
        fold = min(range(n_folds), key=lambda k: (s[k], b[k], lab[k], total[k], k))
        for counts in (s, b, lab, total):
            counts[fold] += row["size"]
        fold_of[str(group_id)] = fold
    return frame["group_id"].map(fold_of).astype("int64").rename("fold")


def out_of_fold_proba(
    folds: np.ndarray,
    groups: np.ndarray,
    fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray],
    n_classes: int,
) -> np.ndarray:
    """Out-of-fold class probabilities, one row per row of ``folds``.

    For each fold k, ``fit_predict(train_rows, held_out_rows)`` fits a fresh model on the rows of the other
    folds and returns its probabilities for the held-out rows ((len(held_out), n_classes)). Refuses a fold
    whose training rows share a group (case or duplicate cluster) with its held-out rows: a case must never be
    scored by a model that saw it or its near duplicate.
    """
    folds, groups = np.asarray(folds), np.asarray(groups).astype(str)
    if folds.shape != groups.shape or folds.ndim != 1:
        raise ValueError(f"folds and groups must be 1-d of one length, got {folds.shape} and {groups.shape}")
    proba = np.full((len(folds), n_classes), np.nan)
    for fold in np.unique(folds):
        held_out, train = np.flatnonzero(folds == fold), np.flatnonzero(folds != fold)
        shared = set(groups[held_out]) & set(groups[train])
        if shared:
            raise ValueError(
                f"fold {fold}: group(s) {sorted(shared)[:5]} are both trained on and held out; a case and its "
                "duplicates must stay in one fold"
            )
        if len(train) == 0:
            raise ValueError(f"fold {fold} holds every row: nothing to train on")
        part = np.asarray(fit_predict(train, held_out), dtype="float64")
        if part.shape != (len(held_out), n_classes):
            raise ValueError(f"fold {fold}: fit_predict returned {part.shape}, expected {(len(held_out), n_classes)}")
        proba[held_out] = part
    return proba
