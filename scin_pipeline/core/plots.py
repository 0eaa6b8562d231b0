"""Small plots the training and evaluation assets show in their metadata and log to MLflow (PNG bytes)."""

from __future__ import annotations

import io

import pandas as pd


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def training_curves_png(history: pd.DataFrame, *, title: str) -> bytes:
    """Loss (train and validation) and the validation macro metrics per epoch, phases marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    epochs = history["epoch"] if "epoch" in history else pd.Series(range(1, len(history) + 1))
    for column, style in (("loss", "-"), ("val_loss", "--")):
        if column in history:
            left.plot(epochs, history[column], style, label=column)
    left.set_xlabel("epoch")
    left.set_title("loss")
    left.legend()
    for column in ("val_macro_f1", "val_balanced_accuracy", "accuracy"):
        if column in history:
            right.plot(epochs, history[column], label=column)
    if "phase" in history and history["phase"].nunique() > 1:
        first_of_phase = history.groupby("phase", sort=False)["epoch" if "epoch" in history else "phase"].head(1)
        for boundary in list(epochs.loc[first_of_phase.index])[1:]:
            for axis in (left, right):
                axis.axvline(boundary, color="grey", linestyle=":", linewidth=1)
    right.set_ylim(0, 1)
    right.set_xlabel("epoch")
    right.set_title("validation")
    right.legend()
    fig.suptitle(title)
    return _png(fig)


def metric_comparison_figure(estimates: pd.DataFrame, *, metrics: list[str], title: str):
    """Grouped bars with intervals: one group per metric, one bar per model, its interval as an error bar
    (``estimates``: model, metric, value, ci_low, ci_high; a NaN bound draws no bar). A
    :class:`matplotlib.figure.Figure` (no pyplot state), sized from the number of metrics and models, the
    model legend under the axes so that it never covers a bar or leaves the canvas."""
    import numpy as np
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(estimates["model"]))
    width_in = max(7.0, len(metrics) * (0.35 * max(len(models), 1) + 0.6) + 1.5)
    figure = Figure(figsize=(width_in, 4.6), layout="constrained")
    axis = figure.add_subplot()
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(metrics))
    for i, model in enumerate(models):
        part = estimates[estimates["model"] == model].set_index("metric")
        values = np.array([float(part["value"].get(m, np.nan)) for m in metrics])
        low = np.array([float(part["ci_low"].get(m, np.nan)) for m in metrics])
        high = np.array([float(part["ci_high"].get(m, np.nan)) for m in metrics])
        has_interval = np.isfinite(low) & np.isfinite(high) & np.isfinite(values)
        yerr = np.where(has_interval, [np.maximum(values - low, 0.0), np.maximum(high - values, 0.0)], np.nan)
        axis.bar(x + i * width, values, width, label=model, yerr=yerr, capsize=3, error_kw={"elinewidth": 1})
    axis.set_xticks(x + width * (len(models) - 1) / 2, metrics)
    axis.set_ylim(0, 1.05)  # room for an interval that reaches 1
    axis.set_title(title, fontsize=10, wrap=True)
    figure.legend(loc="outside lower center", ncols=min(len(models), 4) or 1, fontsize=8, frameon=False)
    return figure


def metric_comparison_png(estimates: pd.DataFrame, *, metrics: list[str], title: str) -> bytes:
    """:func:`metric_comparison_figure` as PNG bytes."""
    from scin_pipeline.core.evaluation import figure_png

    return figure_png(metric_comparison_figure(estimates, metrics=metrics, title=title))
