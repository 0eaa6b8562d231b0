"""Tests for core.plots: the comparison plot draws each model's interval and fits its canvas."""

from __future__ import annotations

import numpy as np
import pandas as pd

from scin_pipeline.core.plots import metric_comparison_figure, metric_comparison_png
from scin_pipeline_tests.core.figure_checks import artists_outside_canvas

MODELS = ["baseline_cnn", "resnet50_transfer", "metadata_model", "multimodal"]
METRICS = ["balanced_accuracy", "macro_f1", "mean_ovr_auc"]


def estimates() -> pd.DataFrame:
    rows = []
    for i, model in enumerate(MODELS):
        for j, metric in enumerate(METRICS):
            value = 0.4 + 0.1 * i + 0.02 * j
            rows.append(
                {"model": model, "metric": metric, "value": value, "ci_low": value - 0.1, "ci_high": value + 0.05}
            )
    return pd.DataFrame(rows)


def test_each_bar_carries_its_bootstrap_interval_and_the_plot_fits_its_canvas():
    table = estimates()
    figure = metric_comparison_figure(table, metrics=METRICS, title="test split, per case: estimate and 95% interval")
    axis = figure.axes[0]
    # One error bar per (model, metric): its vertical segment spans exactly [ci_low, ci_high].
    spans = sorted(
        (round(float(seg[0][1]), 6), round(float(seg[1][1]), 6))
        for container in axis.containers
        if getattr(container, "errorbar", None) is not None
        for seg in container.errorbar.lines[2][0].get_segments()
    )
    expected = sorted((round(lo, 6), round(hi, 6)) for lo, hi in zip(table["ci_low"], table["ci_high"]))
    assert spans == expected
    assert [t.get_text() for t in figure.legends[0].get_texts()] == MODELS
    assert artists_outside_canvas(figure) == []
    assert metric_comparison_png(table, metrics=METRICS, title="t").startswith(b"\x89PNG")


def test_a_model_without_an_interval_gets_its_bar_and_no_error_bar():
    table = estimates().assign(ci_low=np.nan, ci_high=np.nan)
    figure = metric_comparison_figure(table, metrics=METRICS, title="no resamples")
    axis = figure.axes[0]
    assert sum(len(c.patches) for c in axis.containers if hasattr(c, "patches")) == len(MODELS) * len(METRICS)
    drawn = [
        seg
        for container in axis.containers
        if getattr(container, "errorbar", None) is not None
        for seg in container.errorbar.lines[2][0].get_segments()
        if np.size(seg) and np.isfinite(seg).all()
    ]
    assert drawn == []
