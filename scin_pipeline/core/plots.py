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


def metric_comparison_png(table: pd.DataFrame, *, metrics: list[str], title: str) -> bytes:
    """Grouped bars: one group per metric, one bar per model (``table``: model, metric, value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(dict.fromkeys(table["model"]))
    fig, axis = plt.subplots(figsize=(max(6, 1.6 * len(metrics)), 3.6))
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(metrics))
    for i, model in enumerate(models):
        part = table[table["model"] == model].set_index("metric")["value"]
        axis.bar(x + i * width, [float(part.get(m, np.nan)) for m in metrics], width, label=model)
    axis.set_xticks(x + width * (len(models) - 1) / 2, metrics, rotation=15)
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8)
    axis.set_title(title)
    return _png(fig)
