"""Classification metrics of one model on the test split: overall numbers, a per-class table, a long
table for the asset metadata, and two plots (confusion matrix, reliability diagram).

Inputs everywhere: ``y_true`` integer class indices into ``classes`` (the sorted label names), ``proba``
an (N, K) array of probabilities (rows sum to 1, within 1e-2 so bfloat16 softmax outputs pass). The
predicted class is ``argmax(proba)`` (the first on ties, as numpy does).

Decisions, so that every number has one meaning across models, groups and bootstrap resamples:

- ``balanced_accuracy``: sklearn's ``balanced_accuracy_score``, the mean recall over the classes
  present in ``y_true`` (a class that is only predicted has no recall; sklearn drops it, so do we,
  without its warning).
- ``macro_f1``: the mean F1 over the classes present in ``y_true`` OR predicted, passed to sklearn as
  ``labels=`` explicitly. Predicting a class absent from the test rows is an error and must cost F1,
  while a class neither present nor predicted says nothing about the model and is left out. F1 of a
  class is ``2 TP / (2 TP + FP + FN)`` (0 when TP = 0).
- ``top3_accuracy``: the true class among the three highest probabilities, with sklearn's tie order
  (``top_k_accuracy_score``). With K <= 3 classes it is 1.0 by definition (every class is in the top
  three); we return that value rather than NaN because it is true, and the caller can see K.
- ``mean_ovr_auc``: per class, the binary ROC AUC of "this class vs the rest" on that class's
  probability (sklearn ``roc_auc_score``). A class absent from ``y_true`` (or the only class present)
  has no AUC: it is NaN in the per-class table, with the reason, and left out of the mean. When every
  class is present this equals sklearn's ``roc_auc_score(multi_class="ovr", average="macro")``.
- ``ece``: expected calibration error of the top prediction, Guo et al. (2017): confidence = max
  probability; 15 equal-width bins over [0, 1], right-closed ``(lo, hi]`` with 0 in the first bin;
  ``sum_b n_b / N * |accuracy_b - mean confidence_b|``. Empty bins contribute nothing.

sklearn is used wherever it has the metric; own code only for top-k hits per row and the ECE (core.calibration)
(needed per row by the vectorised bootstrap in :mod:`scin_pipeline.core.fairness`, which must agree
with these definitions exactly).

Plots are drawn on :class:`matplotlib.figure.Figure` objects (Agg canvas, no pyplot global state).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import cast

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

# The ECE lives beside the temperature fit, which checks it (numpy only: it ships inside every model).
from scin_pipeline.core.calibration import ECE_BINS, ece_bin_index, expected_calibration_error

TOP_K = 3
PROBA_SUM_TOLERANCE = 1e-2
METRIC_NAMES = ["accuracy", "balanced_accuracy", "macro_f1", "top3_accuracy", "mean_ovr_auc", "ece"]
PER_CLASS_METRICS = ["auc", "f1", "recall", "precision", "n"]
AUC_ABSENT = "class absent from y_true: one-vs-rest AUC undefined"
AUC_ONLY_CLASS = "every row is this class: one-vs-rest AUC undefined"
PLOT_DPI = 100


# ------------------------------------------------------------------------------------------ inputs


def validate_predictions(y_true, proba, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``y_true`` as int64 (N,) and ``proba`` as float64 (N, K), or a ValueError naming the bad row."""
    y = np.asarray(y_true)
    p = np.asarray(proba, dtype="float64")
    k = len(classes)
    if k < 2:
        raise ValueError(f"need at least 2 classes, got {list(classes)!r}")
    if p.ndim != 2 or p.shape[1] != k:
        raise ValueError(f"proba must have shape (N, {k}) for {k} classes, got {p.shape}")
    if y.ndim != 1 or len(y) != len(p):
        raise ValueError(f"y_true must have shape ({len(p)},) like proba's rows, got {y.shape}")
    if len(y) == 0:
        raise ValueError("no rows to evaluate")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.isfinite(y.astype("float64"))) or np.any(y.astype("float64") % 1):
            raise ValueError("y_true must hold integer class indices")
    y = y.astype("int64")
    bad = np.flatnonzero((y < 0) | (y >= k))
    if len(bad):
        raise ValueError(f"y_true row {bad[0]} holds {y[bad[0]]}, not a class index in [0, {k})")
    bad = np.flatnonzero(~np.isfinite(p).all(axis=1) | (p < 0).any(axis=1))
    if len(bad):
        raise ValueError(f"proba row {bad[0]} holds a negative or non-finite value: {p[bad[0]]}")
    sums = p.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > PROBA_SUM_TOLERANCE)
    if len(bad):
        raise ValueError(
            f"proba row {bad[0]} sums to {sums[bad[0]]:.4f}, not 1: pass probabilities (softmax outputs), not logits"
        )
    return y, p


def predicted_class(proba: np.ndarray) -> np.ndarray:
    return np.asarray(proba).argmax(axis=1)


# -------------------------------------------------------------------------------- metric primitives


def top_k_hits(y_true: np.ndarray, proba: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Per row: is the true class among the ``k`` highest probabilities? Same tie order as sklearn's
    ``top_k_accuracy_score`` (stable sort, reversed). ``k >= K`` makes every row a hit."""
    proba = np.asarray(proba)
    if k >= proba.shape[1]:
        return np.ones(len(proba), dtype=bool)
    top = np.argsort(proba, axis=1, kind="mergesort")[:, ::-1][:, :k]
    return (top == np.asarray(y_true)[:, None]).any(axis=1)


def top_k_is_informative(n_classes: int, k: int = TOP_K) -> bool:
    """Whether top-``k`` accuracy can say anything: with ``n_classes <= k`` every row is a hit (1.0 by
    definition), so displays leave it out."""
    return k < n_classes


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (sklearn; its warning about predicted-only
    classes is expected here and silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y_true, y_pred))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean F1 over the classes present in ``y_true`` or predicted (``labels=`` given explicitly)."""
    labels = np.union1d(np.unique(y_true), np.unique(y_pred))
    return float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))  # pyright: ignore[reportArgumentType]  # sklearn: untyped; a number is documented


def ovr_auc_per_class(y_true: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """One-vs-rest ROC AUC per class (NaN where undefined) and the reason for each NaN ("" if defined)."""
    y = np.asarray(y_true)
    k = proba.shape[1]
    onehot = np.eye(k, dtype="int8")[y]
    n_positive = onehot.sum(axis=0)
    defined = (n_positive > 0) & (n_positive < len(y))
    aucs = np.full(k, np.nan)
    if defined.any():
        # One call in multilabel form: per column the binary AUC, validated once, not K times.
        aucs[defined] = roc_auc_score(onehot[:, defined], proba[:, defined], average=None)  # pyright: ignore[reportArgumentType]  # sklearn: untyped; None is documented
    notes = [AUC_ABSENT if n == 0 else AUC_ONLY_CLASS if n == len(y) else "" for n in n_positive]
    return aucs, notes


def mean_ovr_auc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Mean of the defined one-vs-rest AUCs; NaN when no class has one (a single class present)."""
    aucs, _ = ovr_auc_per_class(y_true, proba)
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")


def reliability_bins(y_true: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """Per confidence bin: lo, hi, n, mean confidence, accuracy (NaN for empty bins)."""
    confidence = np.asarray(proba).max(axis=1)
    correct = (predicted_class(proba) == np.asarray(y_true)).astype("float64")
    bins = ece_bin_index(confidence, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(bins, weights=confidence, minlength=n_bins) / count
        acc = np.bincount(bins, weights=correct, minlength=n_bins) / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return pd.DataFrame({"lo": edges[:-1], "hi": edges[1:], "n": count, "confidence": conf, "accuracy": acc})


# ----------------------------------------------------------------------------------------- tables


def classification_metrics(y_true, proba, classes: Sequence[str]) -> dict[str, float]:
    """accuracy, balanced_accuracy, macro_f1, top3_accuracy, mean_ovr_auc, ece (definitions in the
    module docstring)."""
    y, p = validate_predictions(y_true, proba, classes)
    pred = predicted_class(p)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": balanced_accuracy(y, pred),
        "macro_f1": macro_f1(y, pred),
        "top3_accuracy": float(top_k_hits(y, p).mean()),
        "mean_ovr_auc": mean_ovr_auc(y, p),
        "ece": expected_calibration_error(y, p),
    }


def per_class_table(y_true, proba, classes: Sequence[str]) -> pd.DataFrame:
    """One row per class: class, n (rows of that class), n_predicted, precision, recall, f1, auc,
    auc_note (why auc is NaN, else ""). Precision is NaN for a class never predicted, recall NaN for a
    class absent from ``y_true``, f1 NaN for a class neither present nor predicted (undefined, not 0)."""
    y, p = validate_predictions(y_true, proba, classes)
    pred = predicted_class(p)
    labels = np.arange(len(classes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # average=None: four per-class arrays (sklearn returns floats and None only when averaging).
        precision, recall, f1, support = cast(
            tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
            precision_recall_fscore_support(y, pred, labels=labels, zero_division=np.nan),  # pyright: ignore[reportArgumentType]  # sklearn: untyped; nan is documented
        )
    n_predicted = np.bincount(pred, minlength=len(classes))
    # A class seen and predicted nowhere has no F1 (sklearn would give its zero_division value).
    f1 = np.where((support + n_predicted) > 0, np.nan_to_num(f1, nan=0.0), np.nan)
    aucs, notes = ovr_auc_per_class(y, p)
    return pd.DataFrame(
        {
            "class": pd.Series(list(classes), dtype=object),
            "n": support.astype("int64"),
            "n_predicted": n_predicted.astype("int64"),
            "precision": precision.astype("float64"),
            "recall": recall.astype("float64"),
            "f1": f1.astype("float64"),
            "auc": aucs,
            "auc_note": pd.Series(notes, dtype=object),
        }
    )


def evaluation_table(
    model_name: str, y_true, proba, classes: Sequence[str], *, uncalibrated_proba=None
) -> pd.DataFrame:
    """Long form for the asset metadata: model, metric, value, class. Overall rows (the metrics of
    :func:`classification_metrics` and ``n``) have class ""; then per class auc, f1, recall, precision
    and n. An undefined value is NaN, never dropped. ``proba`` is what the model serves (calibrated);
    with ``uncalibrated_proba`` (the model's own output before calibration) an overall row
    ``ece_uncalibrated`` says what the calibration changed."""
    metrics = classification_metrics(y_true, proba, classes)
    if uncalibrated_proba is not None:
        y, raw = validate_predictions(y_true, uncalibrated_proba, classes)
        metrics["ece_uncalibrated"] = expected_calibration_error(y, raw)
    rows = [(model_name, name, float(value), "") for name, value in metrics.items()]
    rows.append((model_name, "n", float(len(np.asarray(y_true))), ""))
    table = per_class_table(y_true, proba, classes)
    for record in table.to_dict("records"):
        for metric in PER_CLASS_METRICS:
            rows.append((model_name, metric, float(record[metric]), record["class"]))
    frame = pd.DataFrame(rows, columns=["model", "metric", "value", "class"])
    frame["value"] = frame["value"].astype("float64")
    return frame


def case_level_predictions(predictions: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """One row per (model, case): the mean of the case's image probabilities, argmax as prediction.

    ``predictions``: per-image rows (model, split, case_id, y_true, p_0..p_K-1), as model_evaluation
    writes them. The fairness report measures per case, so that a case with three photos does not weigh
    three times and rows are independent for the bootstrap."""
    part = predictions[predictions["split"] == split]
    p_cols = [c for c in part.columns if c.startswith("p_")]
    grouped = part.groupby(["model", "case_id"], sort=True)
    frame = grouped[p_cols].mean().join(grouped["y_true"].first()).reset_index()
    frame["y_pred"] = frame[p_cols].to_numpy().argmax(axis=1)
    return frame


# ------------------------------------------------------------------------------------------ plots


def figure_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure)
    # The figures are sized to their contents; "tight" is the safety net that keeps any artist that still
    # reaches past the canvas (a long model name in a title) inside the PNG instead of cut off.
    figure.savefig(buffer, format="png", dpi=PLOT_DPI, bbox_inches="tight", pad_inches=0.1)
    return buffer.getvalue()


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def confusion_matrix_png(y_true, y_pred, classes: Sequence[str], title: str) -> bytes:
    """Confusion matrix coloured by row-normalised share (recall on the diagonal), each non-empty cell
    annotated with its count. A class absent from ``y_true`` has an empty (grey) row. Figure and font
    sizes scale with the number of classes so 10-20 classes stay readable."""
    y = np.asarray(y_true, dtype="int64")
    pred = np.asarray(y_pred, dtype="int64")
    k = len(classes)
    counts = confusion_matrix(y, pred, labels=np.arange(k))
    row_sums = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(row_sums > 0, counts / row_sums, np.nan)
    side = min(max(5.0, 0.5 * k + 3.0), 16.0)
    font = 9 if k <= 10 else (7 if k <= 20 else 5)
    figure = Figure(figsize=(side + 1.0, side))
    ax = figure.add_subplot()
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(shares), cmap=cmap, vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's rows")
    for i in range(k):
        for j in range(k):
            if counts[i, j]:
                dark = shares[i, j] > 0.6
                ax.text(
                    j,
                    i,
                    f"{counts[i, j]:,}",
                    ha="center",
                    va="center",
                    fontsize=font,
                    color="white" if dark else "black",
                )
    names = [_short(str(c)) for c in classes]
    ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=font)
    ax.set_yticks(range(k), [f"{n} (n={s:,})" for n, s in zip(names, row_sums[:, 0])], fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}\n(colour: share of each true class; numbers: counts; n = {len(y):,})", fontsize=10)
    figure.tight_layout()
    return figure_png(figure)


def reliability_png(y_true, proba, *, title: str = "Reliability of the top prediction") -> bytes:
    """Reliability diagram over the ECE bins: accuracy vs mean confidence per bin (bar width = bin),
    the diagonal of perfect calibration, and the number of rows per bin below."""
    y = np.asarray(y_true, dtype="int64")
    p = np.asarray(proba, dtype="float64")
    table = reliability_bins(y, p)
    ece = expected_calibration_error(y, p)
    figure = Figure(figsize=(6.0, 6.5))
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = 1.0 / ECE_BINS
    filled = table["n"] > 0
    top.bar(
        table["lo"][filled],
        table["accuracy"][filled],
        width=width,
        align="edge",
        color="#4c72b0",
        edgecolor="white",
        label="accuracy in bin",
    )
    top.plot(
        table["confidence"][filled],
        table["confidence"][filled],
        "o",
        color="#dd8452",
        ms=4,
        label="mean confidence in bin",
    )
    top.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"{title}\nECE = {ece:.3f} ({ECE_BINS} equal-width bins, n = {len(y):,})", fontsize=10)
    bottom.bar(table["lo"], table["n"], width=width, align="edge", color="#999999", edgecolor="white")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (max probability)")
    bottom.set_ylabel("rows")
    figure.tight_layout()
    return figure_png(figure)
