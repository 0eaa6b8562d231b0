"""Fairness of one model on the test split: metrics per group of each sensitive attribute with bootstrap
confidence intervals, gaps to the overall value, the worst group, a gate for the champion decision, and
each split's composition against the whole data set. The statistics only: the reports (plots, Markdown,
self-contained HTML) are :mod:`scin_pipeline.core.fairness_report`.

Decisions:

- Sensitive attributes (:func:`sensitive_features`): Monk skin tone from the US and from the India lay
  graders, each also binned (default 1-2, 3-4, 5-6, 7-10, because tones 9-10 hold a dozen cases in all),
  dermatologist-estimated and self-reported Fitzpatrick type, race/ethnicity, sex at birth, age group.
  A missing answer is the group ``"missing"`` (``schema.MISSING_GROUP``, as in the data report); an answer
  that means "don't know" (``AGE_UNKNOWN``, ``NONE_IDENTIFIED``, ``OTHER_OR_UNSPECIFIED``) keeps its own
  group.
- Race/ethnicity is multi-select in SCIN. For a per-group metric each row must be in exactly one group,
  so: one box ticked -> that box's group (``WHITE``, ``ASIAN``, ..., ``PREFER_NOT_TO_ANSWER``); two or
  more boxes ticked, or the release's own ``race_ethnicity_two_or_more_after_mitigation`` flag (set
  where the release merged rare combinations to protect privacy) -> ``"multiple"``; none -> ``"missing"``.
  The data report counts the same answers multi-select; the two views differ on purpose.
- Metrics (:data:`FAIRNESS_METRICS`): accuracy, balanced accuracy, macro-F1, mean one-vs-rest AUC,
  top-3 accuracy, with exactly the definitions of :mod:`scin_pipeline.core.evaluation`; ``n`` is a
  column. Point estimates come from ``fairlearn.metrics.MetricFrame``, one frame per attribute (one
  frame over all attributes would give their intersections). AUC and top-3 need probabilities, which
  MetricFrame cannot carry as a 2-D sample parameter (it stores each as one DataFrame column), so they
  get the row numbers as a sample parameter ``row`` and look the probabilities up: ``proba[row]``.
- Bootstrap: percentile intervals; rows are resampled with replacement *within each group* (and over
  all rows for the overall block), ``n_bootstrap`` times. A resample is a vector of row counts, so
  every metric of all resamples of a group is a few matrix products (counts @ one-hot classes) and,
  for AUC, one sort per class with weighted cumulative sums (Mann-Whitney with ties counted 1/2,
  which equals sklearn's ROC AUC). One resample is exactly the point estimate when every count is 1
  (tested). Each (attribute, group) draws from its own generator seeded by (seed, attribute, group),
  so a group's interval does not change when another group is added. A resample where a metric is
  undefined (AUC with a single class left) is skipped for that metric; ``n_boot_valid`` counts the
  rest. Rows of one case share a person, so row resampling makes intervals somewhat narrow when cases
  have several images; the lead may pass one row per case if that matters more.
- Degenerate bootstrap (:func:`metric_interval`): a group with no correct prediction (0 of 37) or only
  correct ones resamples to the same value every time, and the percentile interval collapses to a
  point ([0, 0]) that can never overlap anything, although 0/37 is compatible with an accuracy up to
  ~0.09. Rule, per (group, metric), when every valid resample gives the same value:
  accuracy and top-3 accuracy (proportions) take the Wilson score interval of (hits, n) instead,
  ``ci_method`` "wilson"; balanced accuracy and macro-F1 (not proportions, no closed form) keep the
  point but are widened to at least the Wilson interval of plain accuracy's (hits, n), a conservative
  stand-in, ``ci_method`` "bootstrap+wilson"; AUC stays bootstrap. Any metric with spread in its
  resamples keeps the plain percentile interval (``ci_method`` "bootstrap"), so ordinary groups are
  unchanged; we chose "Wilson only when degenerate" over "always the wider of the two" for exactly
  that. Wilson rather than Clopper-Pearson: its coverage is close to nominal at small n and p near 0
  or 1 (0/37 -> upper 0.094; exact gives 0.095). It is five lines of our own (:func:`wilson_interval`)
  because statsmodels is not a dependency (tested against scipy's ``binomtest``). With
  ``n_bootstrap=0`` there are no intervals at all, Wilson included (the gate then uses the gap alone).
- Groups with ``n < min_group_n`` are kept, with their numbers and intervals, and flagged
  ``insufficient_data``; they are never the ``worst`` group and are never judged on their own.
- Bins: Monk tones (1-2, 3-4, 5-6, 7-10, per grader pool) and Fitzpatrick types (FST1-2, FST3-4, FST5-6,
  dermatologist and self-reported) are also attributes of their own, so the gate has a coarser level to
  fall back to (:data:`GATE_FALLBACK`, :func:`bin_of`).
- Gate (:func:`fairness_gate`): the reference is the overall value, not the best group. The best group
  is itself a noisy pick among many (its value is biased upward), and "how much worse than everyone"
  is what a user of the model experiences. It fails when some group's gap to overall exceeds
  ``max_gap`` AND its interval does not overlap the overall interval; a gap inside overlapping
  intervals is not distinguishable from sampling noise and is reported, not blocked. Without
  intervals (``n_bootstrap=0``) the gap alone decides (fail-safe).
- Three outcomes, no pass by default: "failed" (some judged group fails as above), "not_judged" (none
  fails, but some gate group has fewer than ``min_group_n`` rows and so has its bin, e.g. US Monk 7-10
  with 24 test cases; or no group could be judged at all), "passed" (every gate group judged, directly or
  through its bin, and none fails). The result says which level judged each small group and where the
  estimates come from (``source``: the test split, or out-of-fold predictions over train+val, see
  :mod:`scin_pipeline.core.crossval`). What "not_judged" means for the champion is the comparison's
  policy (``core.champion``: block, or allow with a flag on the model version, card and page).
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame
from sklearn.metrics import accuracy_score

from scin_pipeline.core import schema
from scin_pipeline.core.evaluation import (
    balanced_accuracy,
    macro_f1,
    mean_ovr_auc,
    predicted_class,
    top_k_hits,
    validate_predictions,
)
from scin_pipeline.core.schema import MISSING_GROUP, MULTIPLE_GROUP, OVERALL

DEFAULT_MONK_BINS: tuple[tuple[int, int], ...] = ((1, 2), (3, 4), (5, 6), (7, 10))
# Fitzpatrick types binned as I-II, III-IV, V-VI ("FST5-6"): the level the gate falls back to when a single
# type (FST6: 69 cases in the whole release) is too small to judge.
FST_BINS: tuple[tuple[int, int], ...] = ((1, 2), (3, 4), (5, 6))
ATTRIBUTES = [
    "monk_skin_tone_us",
    "monk_us_bin",
    "monk_skin_tone_india",
    "monk_india_bin",
    "fst_dermatologist",
    "fst_dermatologist_bin",
    "fst_self_reported",
    "fst_self_reported_bin",
    "race_ethnicity",
    "sex_at_birth",
    "age_group",
]
# The gate's coarser level: a group of the key attribute too small to judge is judged through the bin it
# belongs to, in the value attribute (Monk 8 -> Monk 7-10, FST6 -> FST5-6). Bins have no coarser level.
GATE_FALLBACK: dict[str, str] = {
    "monk_skin_tone_us": "monk_us_bin",
    "monk_skin_tone_india": "monk_india_bin",
    "fst_dermatologist": "fst_dermatologist_bin",
    "fst_self_reported": "fst_self_reported_bin",
}
# The gate's three outcomes (module docstring, "Gate").
GATE_PASSED, GATE_FAILED, GATE_NOT_JUDGED = "passed", "failed", "not_judged"
GATE_STATUSES = (GATE_PASSED, GATE_FAILED, GATE_NOT_JUDGED)
GATE_LABELS = {GATE_PASSED: "PASSED", GATE_FAILED: "FAILED", GATE_NOT_JUDGED: "NOT JUDGED"}
FAIRNESS_METRICS = ["accuracy", "balanced_accuracy", "macro_f1", "mean_ovr_auc", "top3_accuracy"]
TABLE_COLUMNS = [
    "model",
    "attribute",
    "group",
    "n",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "diff_to_overall",
    "ratio_to_overall",
    "insufficient_data",
    "worst",
    "n_boot_valid",
    "n_boot",
    "ci_level",
    "ci_method",
]
# ci_method values (module docstring, "Degenerate bootstrap").
CI_BOOTSTRAP = "bootstrap"
CI_WILSON = "wilson"
CI_BOOTSTRAP_WILSON = "bootstrap+wilson"
PROPORTION_METRICS = ("accuracy", "top3_accuracy")  # degenerate -> Wilson of their own hits
WIDENED_METRICS = ("balanced_accuracy", "macro_f1")  # degenerate -> at least Wilson of accuracy's hits
REPRESENTATION_COLUMNS = [
    "split",
    "attribute",
    "group",
    "n",
    "n_images",
    "share",
    "n_in_dataset",
    "share_in_dataset",
    "share_ratio",
]
ALL_SPLITS = "all_splits"

# attribute -> columns of ``cases`` that may hold it, first found wins (parsed SCIN name first).
SOURCE_COLUMNS: dict[str, tuple[str, ...]] = {
    "monk_skin_tone_us": ("monk_skin_tone_label_us", "monk_skin_tone_us"),
    "monk_skin_tone_india": ("monk_skin_tone_label_india", "monk_skin_tone_india"),
    "fst_dermatologist": ("fst_dermatologist", "dermatologist_fitzpatrick_skin_type_label_1"),
    "fst_self_reported": ("fitzpatrick_skin_type", "fst_self_reported"),
    "sex_at_birth": ("sex_at_birth",),
    "age_group": ("age_group",),
}
RACE_MITIGATION_COLUMN = "race_ethnicity_two_or_more_after_mitigation"
RACE_BOX_COLUMNS = [c for c in schema.RACE_COLUMNS if c != RACE_MITIGATION_COLUMN]
RACE_PREFIX = "race_ethnicity_"
KNOWN_GROUP_ORDER: dict[str, list[str]] = {
    "monk_skin_tone_us": [str(t) for t in schema.MONK_TONES],
    "monk_skin_tone_india": [str(t) for t in schema.MONK_TONES],
    "fst_dermatologist": list(schema.FST_VALUES),
    "fst_dermatologist_bin": [f"FST{low}-{high}" for low, high in FST_BINS],
    "fst_self_reported": schema.ENUM_VALUES["fitzpatrick_skin_type"],
    "fst_self_reported_bin": [f"FST{low}-{high}" for low, high in FST_BINS] + ["NONE_IDENTIFIED"],
    "race_ethnicity": [c.removeprefix(RACE_PREFIX).upper() for c in RACE_BOX_COLUMNS] + [MULTIPLE_GROUP],
    "sex_at_birth": schema.ENUM_VALUES["sex_at_birth"],
    "age_group": schema.ENUM_VALUES["age_group"],
}
# Cap on resamples x rows held at once by the bootstrap (memory), ~16 MB per float64 matrix.
_BOOTSTRAP_CELLS = 2_000_000


# ------------------------------------------------------------------------------ sensitive features


def _source_column(cases: pd.DataFrame, attribute: str) -> str:
    for column in SOURCE_COLUMNS[attribute]:
        if column in cases.columns:
            return column
    raise ValueError(
        f"cases lacks a column for the sensitive attribute {attribute!r}: expected one of "
        f"{', '.join(SOURCE_COLUMNS[attribute])}"
    )


def _bin_label(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}-{high}"


def _check_monk_bins(monk_bins: Sequence[tuple[int, int]]) -> None:
    covered = [t for low, high in monk_bins for t in range(int(low), int(high) + 1)]
    if sorted(covered) != list(schema.MONK_TONES) or any(low > high for low, high in monk_bins):
        raise ValueError(
            f"monk_bins {list(monk_bins)!r} must split the tones 1-10 into ascending "
            "(low, high) ranges, each tone in exactly one bin"
        )


def _monk(cases: pd.DataFrame, attribute: str, monk_bins) -> tuple[pd.Series, pd.Series]:
    column = _source_column(cases, attribute)
    tones = pd.to_numeric(cases[column].astype(object), errors="coerce")
    bad = tones.notna() & ~tones.isin(schema.MONK_TONES)
    if bad.any():
        row = bad[bad].index[0]
        raise ValueError(
            f"cases column {column!r}, row {row}: Monk skin tone {cases[column].loc[row]} is not an integer 1-10"
        )
    tone_groups = schema.group_labels(tones)
    lookup = {str(t): _bin_label(low, high) for low, high in monk_bins for t in range(low, high + 1)}
    return tone_groups, tone_groups.map(lambda g: lookup.get(g, MISSING_GROUP)).astype(object)


def fst_bin(group: str) -> str:
    """The Fitzpatrick bin of a type group ("FST6" -> "FST5-6"); other answers ("NONE_IDENTIFIED",
    "missing") are their own group at the bin level."""
    for low, high in FST_BINS:
        if group in {f"FST{t}" for t in range(low, high + 1)}:
            return f"FST{low}-{high}"
    return group


def bin_of(
    attribute: str, group: str, *, monk_bins: Sequence[tuple[int, int]] = DEFAULT_MONK_BINS
) -> tuple[str, str] | None:
    """(bin attribute, bin group) the gate falls back to for a group too small to judge on its own, or
    None when there is no coarser level (a bin already, "missing", an answer outside the scale)."""
    coarse = GATE_FALLBACK.get(attribute)
    if coarse is None or group == MISSING_GROUP:
        return None
    if attribute.startswith("monk_"):
        lookup = {str(t): _bin_label(low, high) for low, high in monk_bins for t in range(low, high + 1)}
        return (coarse, lookup[group]) if group in lookup else None
    binned = fst_bin(group)
    return (coarse, binned) if binned != group else None


def _ticked(values: pd.Series) -> np.ndarray:
    """A check box as bool: True / "YES" is ticked; False, empty or missing is not."""
    if pd.api.types.is_bool_dtype(values.dtype):
        return values.fillna(False).to_numpy(dtype=bool)
    return values.map(
        lambda v: v is True or isinstance(v, np.bool_) and bool(v) or isinstance(v, str) and v.strip().upper() == "YES"
    ).to_numpy(dtype=bool)


def _race(cases: pd.DataFrame) -> pd.Series:
    missing = [c for c in RACE_BOX_COLUMNS if c not in cases.columns]
    if missing:
        raise ValueError(f"cases lacks race/ethnicity column(s): {', '.join(missing)}")
    ticks = np.column_stack([_ticked(cases[c]) for c in RACE_BOX_COLUMNS])
    names = np.array([c.removeprefix(RACE_PREFIX).upper() for c in RACE_BOX_COLUMNS], dtype=object)
    n_ticked = ticks.sum(axis=1)
    merged = (
        _ticked(cases[RACE_MITIGATION_COLUMN])
        if RACE_MITIGATION_COLUMN in cases.columns
        else np.zeros(len(cases), dtype=bool)
    )
    single = names[ticks.argmax(axis=1)]
    groups = np.where(merged | (n_ticked >= 2), MULTIPLE_GROUP, np.where(n_ticked == 1, single, MISSING_GROUP))
    return pd.Series(groups, index=cases.index, dtype=object)


def sensitive_features(
    cases: pd.DataFrame, *, monk_bins: Sequence[tuple[int, int]] = DEFAULT_MONK_BINS
) -> pd.DataFrame:
    """One string column per attribute of :data:`ATTRIBUTES`, indexed like ``cases`` (pass the case
    metadata joined onto the rows being evaluated, e.g. one row per test image). Missing -> "missing";
    race/ethnicity multi-select folded as described in the module docstring; Monk bins from
    ``monk_bins`` (ascending (low, high) ranges that cover 1-10)."""
    _check_monk_bins(monk_bins)
    us, us_bin = _monk(cases, "monk_skin_tone_us", monk_bins)
    india, india_bin = _monk(cases, "monk_skin_tone_india", monk_bins)
    fst_derm = schema.group_labels(cases[_source_column(cases, "fst_dermatologist")])
    fst_self = schema.group_labels(cases[_source_column(cases, "fst_self_reported")])
    columns = {
        "monk_skin_tone_us": us,
        "monk_us_bin": us_bin,
        "monk_skin_tone_india": india,
        "monk_india_bin": india_bin,
        "fst_dermatologist": fst_derm,
        "fst_dermatologist_bin": fst_derm.map(fst_bin).astype(object),
        "fst_self_reported": fst_self,
        "fst_self_reported_bin": fst_self.map(fst_bin).astype(object),
        "race_ethnicity": _race(cases),
        "sex_at_birth": schema.group_labels(cases[_source_column(cases, "sex_at_birth")]),
        "age_group": schema.group_labels(cases[_source_column(cases, "age_group")]),
    }
    return pd.DataFrame(columns, index=cases.index)[ATTRIBUTES]


def group_order(attribute: str, groups: Iterable[str]) -> list[str]:
    """Natural order of the given groups: the attribute's known vocabulary (Monk 1..10, bins by their
    first tone, FST1..FST6, ages ascending, ...), then other values by name, "missing" last."""
    groups = list(dict.fromkeys(str(g) for g in groups))
    known = KNOWN_GROUP_ORDER.get(attribute, [])
    rank = {g: i for i, g in enumerate(known)}

    def key(group: str):
        if group == MISSING_GROUP:
            return (3, 0, group)
        if group in rank:
            return (0, rank[group], group)
        first = group.split("-")[0]
        if first.isdigit():  # bins "1-2", "7-10" or a single tone
            return (1, int(first), group)
        return (2, 0, group)

    return sorted(groups, key=key)


# ----------------------------------------------------------------------------- metrics per group


def _metric_functions(proba: np.ndarray) -> dict:
    """MetricFrame callables ``fn(y_true, y_pred, **sample_params)``; probabilities via the row trick."""

    def top3_accuracy(y_true, y_pred, row):
        return float(top_k_hits(y_true, proba[row]).mean())

    def auc(y_true, y_pred, row):
        return mean_ovr_auc(y_true, proba[row])

    return {
        "accuracy": lambda y_true, y_pred: float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": balanced_accuracy,
        "macro_f1": macro_f1,
        "mean_ovr_auc": auc,
        "top3_accuracy": top3_accuracy,
    }


def _metric_frame(y, pred, proba, groups: np.ndarray, name: str) -> MetricFrame:
    rows = np.arange(len(y))
    return MetricFrame(
        metrics=_metric_functions(proba),
        y_true=y,
        y_pred=pred,
        sensitive_features=pd.Series(groups, name=name),
        sample_params={"mean_ovr_auc": {"row": rows}, "top3_accuracy": {"row": rows}},
    )


def _weighted_mean_auc(y: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean one-vs-rest AUC of each weighted resample (weights: resamples x rows); NaN if none defined.

    Per class: sort once by the class's score; for each positive row, the weight of negatives scored
    below it plus half the weight of negatives tied with it (Mann-Whitney), from cumulative sums.
    """
    n_resamples = weights.shape[0]
    total = np.zeros(n_resamples)
    n_defined = np.zeros(n_resamples)
    for k in np.unique(y):
        positive = y == k
        if positive.all():
            continue
        order = np.argsort(proba[:, k], kind="mergesort")
        scores = proba[order, k]
        w = weights[:, order]
        is_pos = positive[order]
        cum_neg = np.zeros((n_resamples, len(y) + 1))
        np.cumsum(w * ~is_pos, axis=1, out=cum_neg[:, 1:])
        pos_at = np.flatnonzero(is_pos)
        tie_start = np.searchsorted(scores, scores[pos_at], side="left")
        tie_end = np.searchsorted(scores, scores[pos_at], side="right")
        below = cum_neg[:, tie_start]
        tied = cum_neg[:, tie_end] - below
        w_pos = w[:, pos_at]
        mass_pos, mass_neg = w_pos.sum(axis=1), cum_neg[:, -1]
        defined = (mass_pos > 0) & (mass_neg > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = (w_pos * (below + 0.5 * tied)).sum(axis=1) / (mass_pos * mass_neg)
        total += np.where(defined, auc, 0.0)
        n_defined += defined
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_defined > 0, total / n_defined, np.nan)


def weighted_metrics(
    y: np.ndarray, pred: np.ndarray, proba: np.ndarray, top3_hits: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Every metric of :data:`FAIRNESS_METRICS` for each row of ``weights`` (resamples x rows, the
    number of times each row was drawn). All-ones weights give the plain (MetricFrame) values."""
    k = proba.shape[1]
    weights = np.asarray(weights, dtype="float64")
    total = weights.sum(axis=1)
    correct = (pred == y).astype("float64")
    true_onehot = np.eye(k)[y]
    n_true = weights @ true_onehot
    n_pred = weights @ np.eye(k)[pred]
    n_hit = weights @ (true_onehot * correct[:, None])
    present = n_true > 0
    seen = (n_true + n_pred) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, n_hit / n_true, 0.0)
        f1 = np.where(seen, 2.0 * n_hit / (n_true + n_pred), 0.0)
        return {
            "accuracy": weights @ correct / total,
            "balanced_accuracy": recall.sum(axis=1) / present.sum(axis=1),
            "macro_f1": f1.sum(axis=1) / seen.sum(axis=1),
            "mean_ovr_auc": _weighted_mean_auc(y, proba, weights),
            "top3_accuracy": weights @ top3_hits.astype("float64") / total,
        }


def _group_rng(seed: int, attribute: str, group: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(f"{attribute}\x00{group}".encode())])


def bootstrap_metrics(y, pred, proba, top3_hits, n_bootstrap: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``n_bootstrap`` resamples (rows with replacement) of the given rows -> metric -> (n_bootstrap,)
    values, NaN where undefined. Resamples are processed in chunks to bound memory."""
    n = len(y)
    chunk = max(1, _BOOTSTRAP_CELLS // max(n, 1))
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n_bootstrap, chunk):
        size = min(chunk, n_bootstrap - start)
        draws = rng.integers(0, n, size=(size, n))
        flat = (np.arange(size)[:, None] * n + draws).ravel()
        weights = np.bincount(flat, minlength=size * n).reshape(size, n).astype("float64")
        parts.append(weighted_metrics(y, pred, proba, top3_hits, weights))
    if not parts:
        return {m: np.empty(0) for m in FAIRNESS_METRICS}
    return {m: np.concatenate([p[m] for p in parts]) for m in FAIRNESS_METRICS}


def wilson_interval(hits: int, n: int, ci: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``hits / n`` at level ``ci`` (no continuity correction).
    Own code because statsmodels is not a dependency; NaN interval when ``n == 0``."""
    if n <= 0:
        return float("nan"), float("nan")
    z = NormalDist().inv_cdf(1 - (1 - ci) / 2)
    p, z2 = hits / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _interval(values: np.ndarray, quantiles: tuple[float, float]) -> tuple[float, float, int]:
    valid = values[np.isfinite(values)]
    if len(valid) == 0:
        return float("nan"), float("nan"), 0
    low, high = np.quantile(valid, quantiles)
    return float(low), float(high), int(len(valid))


def _degenerate(values: np.ndarray) -> bool:
    """Every valid resample gave the same value (tolerance for float sums); False with none valid."""
    valid = values[np.isfinite(values)]
    return len(valid) > 0 and float(np.ptp(valid)) <= 1e-12


def metric_interval(
    metric: str, resampled: np.ndarray, hits: Mapping[str, int], n: int, ci: float = 0.95
) -> tuple[float, float, int, str]:
    """(ci_low, ci_high, n_boot_valid, ci_method) of one metric of one group from its bootstrap values
    ``resampled``; ``hits``: {"accuracy": top-1 hits, "top3_accuracy": top-3 hits} of the group's ``n``
    rows. Percentile interval, except a degenerate bootstrap (module docstring): proportions -> Wilson
    of their own hits, balanced accuracy / macro-F1 -> widened to cover Wilson of accuracy's hits."""
    quantiles = ((1 - ci) / 2, 1 - (1 - ci) / 2)
    low, high, n_valid = _interval(resampled, quantiles)
    if not _degenerate(resampled):
        return low, high, n_valid, CI_BOOTSTRAP
    if metric in PROPORTION_METRICS:
        w_low, w_high = wilson_interval(hits[metric], n, ci)
        return w_low, w_high, n_valid, CI_WILSON
    if metric in WIDENED_METRICS:
        w_low, w_high = wilson_interval(hits["accuracy"], n, ci)
        return min(low, w_low), max(high, w_high), n_valid, CI_BOOTSTRAP_WILSON
    return low, high, n_valid, CI_BOOTSTRAP


def _group_row(by_group: pd.Series | pd.DataFrame, group: str) -> pd.Series:
    """One group's metrics from MetricFrame.by_group: a frame (several metrics) with one row per group."""
    row = by_group.loc[group] if isinstance(by_group, pd.DataFrame) else None
    if not isinstance(row, pd.Series):
        raise ValueError(f"the per-group metrics do not hold exactly one row of metrics for group {group!r}")
    return row


def fairness_table(
    model: str,
    y_true,
    proba,
    classes: Sequence[str],
    sensitive: pd.DataFrame,
    *,
    n_bootstrap: int = 200,
    min_group_n: int = 30,
    seed: int = 0,
    ci: float = 0.95,
) -> pd.DataFrame:
    """Per attribute and group, every metric of :data:`FAIRNESS_METRICS` with a bootstrap interval.

    ``sensitive``: one column per attribute (e.g. :func:`sensitive_features`), rows in the order of
    ``y_true`` / ``proba``. Returns :data:`TABLE_COLUMNS`, long form: the overall block first
    (attribute and group ``"overall"``), then each attribute's groups in natural order. ``diff`` is
    value - overall, ``ratio`` value / overall; ``worst`` marks the lowest value per (attribute,
    metric) among groups with ``n >= min_group_n`` and a defined value, when there are at least two
    such groups (every metric here is higher-is-better); ``n_boot_valid`` counts resamples where the
    metric was defined (of ``n_boot``); ``ci_method`` says how the interval was made ("bootstrap",
    "wilson" or "bootstrap+wilson", see :func:`metric_interval`).
    """
    y, p = validate_predictions(y_true, proba, classes)
    if len(sensitive) != len(y):
        raise ValueError(f"sensitive features have {len(sensitive)} rows, predictions {len(y)}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    pred = predicted_class(p)
    hits = top_k_hits(y, p)
    correct = pred == y
    records: list[dict] = []

    def add_group(attribute: str, group: str, rows: np.ndarray, point: pd.Series) -> None:
        boot = bootstrap_metrics(
            y[rows], pred[rows], p[rows], hits[rows], n_bootstrap, _group_rng(seed, attribute, group)
        )
        group_hits = {"accuracy": int(correct[rows].sum()), "top3_accuracy": int(hits[rows].sum())}
        for metric in FAIRNESS_METRICS:
            low, high, n_valid, method = metric_interval(metric, boot[metric], group_hits, len(rows), ci)
            records.append(
                {
                    "model": model,
                    "attribute": attribute,
                    "group": group,
                    "n": len(rows),
                    "metric": metric,
                    "value": float(point[metric]),
                    "ci_low": low,
                    "ci_high": high,
                    "n_boot_valid": n_valid,
                    "ci_method": method,
                }
            )

    everyone = np.full(len(y), OVERALL, dtype=object)
    add_group(
        OVERALL, OVERALL, np.arange(len(y)), _group_row(_metric_frame(y, pred, p, everyone, OVERALL).by_group, OVERALL)
    )
    for attribute in sensitive.columns:
        groups = schema.group_labels(sensitive[attribute].reset_index(drop=True)).to_numpy()
        by_group = _metric_frame(y, pred, p, groups, str(attribute)).by_group
        for group in group_order(str(attribute), by_group.index):
            add_group(str(attribute), group, np.flatnonzero(groups == group), _group_row(by_group, group))

    table = pd.DataFrame.from_records(records)
    overall = table[table["attribute"] == OVERALL].set_index("metric")["value"]
    reference = table["metric"].map(overall)
    table["diff_to_overall"] = table["value"] - reference
    with np.errstate(invalid="ignore", divide="ignore"):
        table["ratio_to_overall"] = table["value"] / reference.replace(0.0, np.nan)
    table["insufficient_data"] = (table["n"] < min_group_n) & (table["attribute"] != OVERALL)
    eligible = ~table["insufficient_data"] & table["value"].notna() & (table["attribute"] != OVERALL)
    table["worst"] = False
    by = table[eligible].groupby(["attribute", "metric"], sort=False)["value"]
    # "Worst" needs a comparison: an attribute with a single judgeable group has none.
    lowest = by.idxmin()[by.size() >= 2]
    table.loc[lowest.to_numpy(), "worst"] = True
    table["n_boot"] = int(n_bootstrap)
    table["ci_level"] = float(ci)
    table["n"] = table["n"].astype("int64")
    return table[TABLE_COLUMNS]


# ------------------------------------------------------------------------------------------- gate


@dataclass(frozen=True)
class GroupEstimate:
    attribute: str
    group: str
    n: int
    value: float
    ci_low: float
    ci_high: float

    @property
    def ci(self) -> tuple[float, float]:
        return (self.ci_low, self.ci_high)

    def describe(self) -> str:
        interval = (
            f" [{self.ci_low:.3f}, {self.ci_high:.3f}]"
            if np.isfinite(self.ci_low) and np.isfinite(self.ci_high)
            else " [no interval]"
        )
        where = "overall" if self.attribute == OVERALL else f"{self.attribute}={self.group}"
        return f"{where}: {self.value:.3f}{interval} (n={self.n:,})"


@dataclass
class GateResult:
    """Outcome of :func:`fairness_gate`. ``status``: "passed", "failed" or "not_judged"; ``passed`` is
    ``status == "passed"`` (kept for callers that read a bool). ``worst`` is the group that decided it (the
    failing group with the largest gap, else the judged group with the largest gap); ``reference`` the
    overall estimate; ``unjudged_groups`` the gate groups too small even at bin level (they make the status
    "not_judged" unless something failed); ``fallbacks`` the groups judged through their bin (the level
    judged); ``source`` where the estimates come from (the test split, or out-of-fold predictions)."""

    passed: bool
    metric: str
    max_gap: float
    model: str
    worst: GroupEstimate | None
    reference: GroupEstimate | None
    gap: float
    cis_overlap: bool | None
    reason: str
    failing_groups: list[GroupEstimate] = field(default_factory=list)
    insufficient_groups: list[GroupEstimate] = field(default_factory=list)
    status: str = ""
    min_group_n: int | None = None
    source: str = "test split"
    unjudged_groups: list[GroupEstimate] = field(default_factory=list)
    fallbacks: list[dict] = field(default_factory=list)
    n_judged: int = 0

    def __post_init__(self):
        if not self.status:  # a result made the old way (a bool only)
            self.status = GATE_PASSED if self.passed else GATE_FAILED
        if self.status not in GATE_STATUSES:
            raise ValueError(f"gate status must be one of {GATE_STATUSES}, got {self.status!r}")
        self.passed = self.status == GATE_PASSED

    @property
    def label(self) -> str:
        """PASSED, FAILED or NOT JUDGED (reports, card, page)."""
        return GATE_LABELS[self.status]

    def unjudged_summary(self, limit: int = 8) -> str:
        """The gate groups nobody could judge, e.g. "monk_us_bin=7-10 (n=24)"; "" when none."""
        listed = ", ".join(f"{g.attribute}={g.group} (n={g.n})" for g in self.unjudged_groups[:limit])
        more = f" and {len(self.unjudged_groups) - limit} more" if len(self.unjudged_groups) > limit else ""
        return listed + more

    def to_dict(self) -> dict:
        """JSON-serialisable (NaN becomes None)."""

        def clean(value):
            if isinstance(value, float) and not np.isfinite(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [clean(v) for v in value]
            if isinstance(value, (np.floating, np.integer, np.bool_)):
                return clean(value.item())
            return value

        cleaned = clean(asdict(self))
        assert isinstance(cleaned, dict)  # asdict gives a dict, and clean keeps a dict a dict
        return cleaned

    @classmethod
    def from_dict(cls, record: dict) -> GateResult:
        """The inverse of :meth:`to_dict` (None back to NaN): how a stored gate is read, never recomputed.
        A gate stored before the three outcomes (no ``status``) reads as passed or failed."""

        def number(value) -> float:
            return float("nan") if value is None else float(value)

        def estimate(item: dict | None) -> GroupEstimate | None:
            if item is None:
                return None
            return GroupEstimate(
                str(item["attribute"]),
                str(item["group"]),
                int(item["n"]),
                number(item["value"]),
                number(item["ci_low"]),
                number(item["ci_high"]),
            )

        def estimates(key: str) -> list[GroupEstimate]:
            return [e for e in map(estimate, record.get(key) or []) if e is not None]

        min_group_n = record.get("min_group_n")
        return cls(
            passed=bool(record["passed"]),
            metric=str(record["metric"]),
            max_gap=number(record["max_gap"]),
            model=str(record["model"]),
            worst=estimate(record.get("worst")),
            reference=estimate(record.get("reference")),
            gap=number(record.get("gap")),
            cis_overlap=record.get("cis_overlap"),
            reason=str(record["reason"]),
            failing_groups=estimates("failing_groups"),
            insufficient_groups=estimates("insufficient_groups"),
            status=str(record.get("status") or ""),
            min_group_n=None if min_group_n is None else int(min_group_n),
            source=str(record.get("source") or "test split"),
            unjudged_groups=estimates("unjudged_groups"),
            fallbacks=[dict(f) for f in record.get("fallbacks") or []],
            n_judged=int(record.get("n_judged") or 0),
        )


def _estimate(row) -> GroupEstimate:
    return GroupEstimate(
        str(row["attribute"]),
        str(row["group"]),
        int(row["n"]),
        float(row["value"]),
        float(row["ci_low"]),
        float(row["ci_high"]),
    )


def _overlaps(a: GroupEstimate, b: GroupEstimate) -> bool | None:
    if not all(np.isfinite([a.ci_low, a.ci_high, b.ci_low, b.ci_high])):
        return None
    return not (a.ci_high < b.ci_low or a.ci_low > b.ci_high)


def fairness_gate(
    table: pd.DataFrame,
    *,
    metric: str = "balanced_accuracy",
    max_gap: float = 0.10,
    attributes: Sequence[str] | None = None,
    min_group_n: int | None = None,
    fallback: bool = True,
    monk_bins: Sequence[tuple[int, int]] = DEFAULT_MONK_BINS,
    source: str = "test split",
) -> GateResult:
    """Judge one model's table on ``metric``; three outcomes (module docstring, "Gate").

    A judged group fails when it is more than ``max_gap`` below the overall value and its interval does
    not overlap the overall interval. A gate group with fewer than ``min_group_n`` rows (default: the
    table's ``insufficient_data`` flag) is judged through its bin when ``fallback`` and the bin is big
    enough (Monk 8 -> Monk 7-10, FST6 -> FST5-6; :data:`GATE_FALLBACK`), else it is unjudged. Status:
    "failed" when some judged group fails; else "not_judged" when some gate group is unjudged (or none
    could be judged at all: there is no pass by default); else "passed". "missing" (no answer) is judged
    when big enough and never makes a gate unjudged. ``source`` says where the estimates come from.
    """
    models = table["model"].unique()
    if len(models) != 1:
        raise ValueError(f"fairness_gate needs the table of one model, got {list(models)!r}")
    rows = table[table["metric"] == metric]
    if rows.empty:
        raise ValueError(f"the fairness table has no metric {metric!r}; it has {sorted(table['metric'].unique())}")
    overall_rows = rows[rows["attribute"] == OVERALL]
    if overall_rows.empty:
        raise ValueError("the fairness table has no overall block (attribute 'overall')")
    reference = _estimate(overall_rows.iloc[0])
    everything = rows[rows["attribute"] != OVERALL]
    groups = everything
    if attributes is not None:
        unknown = sorted(set(attributes) - set(groups["attribute"]))
        if unknown:
            raise ValueError(f"fairness gate attributes not in the table: {unknown}")
        groups = groups[groups["attribute"].isin(list(attributes))]

    def small(row) -> bool:
        return bool(row["n"] < min_group_n) if min_group_n is not None else bool(row["insufficient_data"])

    by_key = {(str(r["attribute"]), str(r["group"])): r for _, r in everything.iterrows()}
    judged: dict[tuple[str, str], GroupEstimate] = {}
    insufficient: list[GroupEstimate] = []
    unjudged: list[GroupEstimate] = []
    fallbacks: list[dict] = []
    for _, row in groups.iterrows():
        estimate = _estimate(row)
        key = (estimate.attribute, estimate.group)
        if small(row):
            insufficient.append(estimate)
        elif np.isfinite(estimate.value):
            judged[key] = estimate
            continue
        if estimate.group == MISSING_GROUP:
            continue  # an unanswered question is reported, never required to be judged
        coarse = bin_of(estimate.attribute, estimate.group, monk_bins=monk_bins) if fallback else None
        bin_row = by_key.get(coarse) if coarse is not None else None
        if coarse is not None and bin_row is not None and not small(bin_row) and np.isfinite(float(bin_row["value"])):
            judged[coarse] = _estimate(bin_row)
            fallbacks.append(
                {
                    "attribute": estimate.attribute,
                    "group": estimate.group,
                    "n": estimate.n,
                    "judged_as_attribute": coarse[0],
                    "judged_as_group": coarse[1],
                    "judged_n": int(bin_row["n"]),
                }
            )
        else:
            unjudged.append(estimate)
    judged_list = list(judged.values())
    limit_text = f"min_group_n {min_group_n}" if min_group_n is not None else "the table's min_group_n"
    notes = f" Estimates: {source}; {limit_text}."
    if fallbacks:
        listed = "; ".join(
            f"{f['attribute']}={f['group']} (n={f['n']}) as {f['judged_as_attribute']}={f['judged_as_group']} "
            f"(n={f['judged_n']})"
            for f in fallbacks[:8]
        )
        notes += f" Judged at bin level: {listed}."
    if insufficient:
        listed = ", ".join(f"{g.attribute}={g.group} (n={g.n})" for g in insufficient[:12])
        more = f" and {len(insufficient) - 12} more" if len(insufficient) > 12 else ""
        notes += f" Insufficient data on their own: {listed}{more}."

    def result(status, worst, gap, overlap, reason, failing) -> GateResult:
        return GateResult(
            status == GATE_PASSED,
            metric,
            max_gap,
            str(models[0]),
            worst,
            reference,
            float(gap),
            overlap,
            reason,
            failing,
            insufficient,
            status=status,
            min_group_n=min_group_n,
            source=source,
            unjudged_groups=unjudged,
            fallbacks=fallbacks,
            n_judged=len(judged_list),
        )

    unjudged_text = ""
    if unjudged:
        probe = result(GATE_NOT_JUDGED, None, float("nan"), None, "", [])
        unjudged_text = (
            f"{len(unjudged)} gate group(s) too small to judge even at bin level: {probe.unjudged_summary()}."
        )
    if not judged_list:
        return result(
            GATE_NOT_JUDGED,
            None,
            float("nan"),
            None,
            f"NOT JUDGED on {metric}: no group has enough data to judge {metric}; there is no pass by "
            f"default.{' ' + unjudged_text if unjudged_text else ''}{notes}",
            [],
        )

    def fails(group: GroupEstimate) -> bool:
        gap = reference.value - group.value
        overlap = _overlaps(group, reference)
        return gap > max_gap and overlap is not True  # no interval -> the gap alone decides

    failing = sorted((g for g in judged_list if fails(g)), key=lambda g: g.value)
    worst = failing[0] if failing else min(judged_list, key=lambda g: g.value)
    gap = reference.value - worst.value
    overlap = _overlaps(worst, reference)
    comparison = f"worst group {worst.describe()} vs {reference.describe()}: gap {gap:.3f} (max_gap {max_gap:.3f})"
    if failing:
        others = ""
        if len(failing) > 1:
            others = " Also failing: " + "; ".join(g.describe() for g in failing[1:6]) + "."
        why = (
            "the intervals do not overlap"
            if overlap is False
            else "no intervals were computed, so the gap alone decides"
        )
        status = GATE_FAILED
        also = f" Not judged: {unjudged_text}" if unjudged_text else ""
        reason = f"FAILED on {metric}: {comparison} exceeds max_gap and {why}.{others}{also}{notes}"
    else:
        status = GATE_NOT_JUDGED if unjudged else GATE_PASSED
        head = f"PASSED on {metric}: "
        if unjudged:
            head = f"NOT JUDGED on {metric}: {unjudged_text} Of the {len(judged_list)} judged group(s) none fails: "
        if gap > max_gap:
            verdict = (
                f"{comparison} exceeds max_gap, but the intervals overlap, so the gap is not distinguishable "
                "from sampling noise at this n."
            )
        else:
            verdict = f"{comparison} is within max_gap."
        reason = f"{head}{verdict}{notes}"
    return result(status, worst, gap, overlap, reason, failing)


# ------------------------------------------------------------------------------- representation


def representation_by_split(
    split_table: pd.DataFrame,
    cases: pd.DataFrame,
    attributes: Sequence[str] | None = None,
    *,
    monk_bins: Sequence[tuple[int, int]] = DEFAULT_MONK_BINS,
) -> pd.DataFrame:
    """Each split's composition by group against the whole data set (all of ``cases``), counted in
    cases (a case is one person's contribution; its images are ``n_images``). ``split_table`` has
    case_id and split (one row per image, e.g. labeled_splits); the split ``"all_splits"`` is their
    union. Every group of the data set appears in every split, at 0 when absent. ``share_ratio`` =
    share / share_in_dataset (1 = represented as in the data set)."""
    for what, frame, needed in (("split_table", split_table, ["case_id", "split"]), ("cases", cases, ["case_id"])):
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise ValueError(f"{what} lacks column(s): {', '.join(missing)}")
    attributes = list(attributes) if attributes is not None else list(ATTRIBUTES)
    features = sensitive_features(cases, monk_bins=monk_bins)
    unknown = sorted(set(attributes) - set(features.columns))
    if unknown:
        raise ValueError(f"unknown attribute(s) {unknown}; known: {ATTRIBUTES}")
    features.index = cases["case_id"].astype(str).to_numpy()
    if features.index.has_duplicates:
        raise ValueError(f"cases has duplicate case_id {features.index[features.index.duplicated()][0]!r}")
    images = split_table[["case_id", "split"]].astype({"case_id": str, "split": str})
    absent = ~images["case_id"].isin(features.index)
    if absent.any():
        raise ValueError(
            f"split_table row {images.index[absent][0]}: case_id {images['case_id'][absent].iloc[0]!r} is not in cases"
        )
    order = [s for s in ("train", "val", "test") if s in set(images["split"])]
    order += sorted(set(images["split"]) - set(order))
    parts = []
    for split in [*order, ALL_SPLITS]:
        rows = images if split == ALL_SPLITS else images[images["split"] == split]
        split_cases = rows["case_id"].drop_duplicates()
        for attribute in attributes:
            in_dataset = features[attribute].value_counts()
            groups = group_order(attribute, in_dataset.index)
            n = features.loc[split_cases, attribute].value_counts().reindex(groups, fill_value=0)
            n_images = features.loc[rows["case_id"], attribute].value_counts().reindex(groups, fill_value=0)
            dataset_n = in_dataset.reindex(groups, fill_value=0)
            share = n / len(split_cases) if len(split_cases) else n * np.nan
            share_in_dataset = dataset_n / len(features)
            parts.append(
                pd.DataFrame(
                    {
                        "split": split,
                        "attribute": attribute,
                        "group": pd.Series(groups, dtype=object),
                        "n": n.to_numpy("int64"),
                        "n_images": n_images.to_numpy("int64"),
                        "share": share.to_numpy("float64"),
                        "n_in_dataset": dataset_n.to_numpy("int64"),
                        "share_in_dataset": share_in_dataset.to_numpy("float64"),
                    }
                )
            )
    table = pd.concat(parts, ignore_index=True)
    table["share_ratio"] = table["share"] / table["share_in_dataset"]
    return table[REPRESENTATION_COLUMNS]


# ------------------------------------------------------------------------------- MLflow run metrics

RUN_METRIC_PREFIX = "fair"
RUN_METRIC_INTERVAL = ("ci_low", "ci_high")
# MLflow metric names take letters, digits, "_", "-", ".", " ", ":" and "/"; a dot separates the parts here,
# so anything but letters, digits, "_" and "-" inside a part becomes "_".
_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9_-]+")


def _name_part(text: object) -> str:
    part = _UNSAFE_IN_NAME.sub("_", str(text)).strip("_")
    if not part:
        raise ValueError(f"{text!r} leaves nothing usable in an MLflow metric name")
    return part


def run_metric_name(attribute: str, group: str, metric: str, bound: str | None = None) -> str:
    """The one name of a group's figure among a run's MLflow metrics, the same in every run, so MLflow's run
    comparison charts it across candidates: ``fair.<attribute>.<group>.<metric>`` (e.g.
    ``fair.monk_us_bin.7-10.balanced_accuracy``), ``...<metric>.ci_low`` / ``.ci_high`` for its interval,
    metric ``n`` for the group's size; the overall block is ``fair.overall.<metric>``."""
    if bound is not None and bound not in RUN_METRIC_INTERVAL:
        raise ValueError(f"bound must be one of {RUN_METRIC_INTERVAL} or None, got {bound!r}")
    parts = [RUN_METRIC_PREFIX, _name_part(attribute)]
    if not (attribute == OVERALL and group == OVERALL):
        parts.append(_name_part(group))
    parts.append(_name_part(metric))
    if bound is not None:
        parts.append(bound)
    return ".".join(parts)


def run_metrics(table: pd.DataFrame) -> dict[str, float]:
    """A :func:`fairness_table` as MLflow run metrics (:func:`run_metric_name`): each group's value and
    interval bounds per metric, and its ``n``. Undefined figures (NaN: a metric a group cannot have) are left
    out rather than logged as NaN, which MLflow's charts draw as gaps anyway."""
    missing = [c for c in ("attribute", "group", "n", "metric", "value", "ci_low", "ci_high") if c not in table]
    if missing:
        raise ValueError(f"not a fairness table: columns {missing} are missing")
    metrics: dict[str, float] = {}
    columns = zip(
        table["attribute"].astype(str),
        table["group"].astype(str),
        table["metric"].astype(str),
        table["n"].to_numpy(dtype=float),
        table[["value", "ci_low", "ci_high"]].to_numpy(dtype=float),
    )
    for attribute, group, metric, n, (value, low, high) in columns:
        metrics[run_metric_name(attribute, group, "n")] = float(n)
        for bound, number in ((None, value), ("ci_low", low), ("ci_high", high)):
            if math.isfinite(number):
                metrics[run_metric_name(attribute, group, metric, bound)] = float(number)
    return metrics
