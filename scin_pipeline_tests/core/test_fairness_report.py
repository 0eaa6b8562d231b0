"""Tests for core.fairness_report: the Markdown report, the self-contained HTML page and the plots."""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from scin_pipeline.core.fairness import ATTRIBUTES, fairness_gate, fairness_table, sensitive_features
from scin_pipeline.core.fairness_report import (
    SYNTHETIC_BANNER,
    fairness_html,
    fairness_markdown,
    fairness_plot_figure,
    fairness_plot_png,
    fairness_plots,
)
from scin_pipeline_tests.core.fairness_inputs import case_frame, model_output
from scin_pipeline_tests.core.figure_checks import artists_outside_canvas

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report_inputs():
    rng = np.random.default_rng(12)
    y, proba = model_output(600, 4, signal=2.0, rng=rng)
    cases = pd.concat([case_frame()] * 120, ignore_index=True)
    table = fairness_table(
        "synthetic-cnn", y, proba, list("abcd"), sensitive_features(cases), n_bootstrap=30, min_group_n=130
    )
    return table, fairness_gate(table)


def test_markdown_report(report_inputs):
    table, gate = report_inputs
    text = fairness_markdown(table, gate, model="synthetic-cnn", synthetic=True)
    assert text.splitlines()[0] == SYNTHETIC_BANNER
    assert f"**Fairness gate: {gate.label}**" in text
    assert all(
        f"**Fairness gate: {other}**" not in text for other in ("PASSED", "FAILED", "NOT JUDGED") if other != gate.label
    )
    for attribute in ATTRIBUTES:
        assert f"`{attribute}`" in text
    assert "insufficient data" in text
    real = fairness_markdown(table, gate, model="synthetic-cnn", synthetic=False)
    assert SYNTHETIC_BANNER not in real


def test_html_report_is_self_contained(report_inputs):
    table, gate = report_inputs
    plots = fairness_plots(table)
    page = fairness_html(table, gate, plots, model="synthetic-cnn", synthetic=True)
    assert not re.search(r"https?:|(src|href)\s*=\s*[\"']?//|url\(|@import", page, re.I)
    assert page.count("data:image/png;base64,") == len(plots) == len(ATTRIBUTES)
    for attribute in ATTRIBUTES:
        assert f"<code>{attribute}</code>" in page
    assert page.index(SYNTHETIC_BANNER) < page.index("<h1>")
    assert "<style>" in page and "<link" not in page and "<script" not in page


def test_fairness_plot_png(report_inputs):
    table, _ = report_inputs
    data = fairness_plot_png(table, "monk_skin_tone_us", "balanced_accuracy")
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(data)) as image:
        assert image.size[0] >= 500
    with pytest.raises(ValueError, match="no rows"):
        fairness_plot_png(table, "shoe_size", "accuracy")


@pytest.mark.parametrize("model", ["multimodal", "resnet50_transfer_with_a_long_candidate_name"])
def test_a_five_group_fairness_plot_keeps_title_legend_and_labels_on_its_canvas(report_inputs, model):
    table, _ = report_inputs
    table = table.assign(model=model)
    assert table[table["attribute"] == "monk_skin_tone_us"]["group"].nunique() == 5
    figure = fairness_plot_figure(table, "monk_skin_tone_us", "balanced_accuracy")
    assert figure.legends, "the plot explains its colours in a legend"
    assert artists_outside_canvas(figure) == []
    assert model in figure.axes[0].get_title()


def test_a_many_group_fairness_plot_grows_with_its_groups(report_inputs):
    rng = np.random.default_rng(3)
    y, proba = model_output(660, 4, signal=2.0, rng=rng)
    tones = pd.DataFrame({"monk_skin_tone_us": [str(1 + i % 10) if i % 11 else "missing" for i in range(660)]})
    table = fairness_table("multimodal", y, proba, list("abcd"), tones, n_bootstrap=10, min_group_n=30)
    five, eleven = (
        fairness_plot_figure(t, "monk_skin_tone_us", "balanced_accuracy") for t in (report_inputs[0], table)
    )
    assert eleven.get_figwidth() > five.get_figwidth()
    assert artists_outside_canvas(eleven) == []
