"""Tests for core.rendering: the generic Markdown, HTML and PNG helpers the reports share."""

from __future__ import annotations

import base64

import numpy as np
import pandas as pd

from scin_pipeline.core.rendering import (
    format_cell,
    html_img,
    html_table,
    markdown_table,
    markdown_text_table,
    png_data_uri,
    png_data_uri_bytes,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8


def test_markdown_table_shows_shares_as_percentages_and_counts_with_separators():
    frame = pd.DataFrame({"group": ["a|b", "c"], "n": [1234, 5], "share": [0.5, 0.004], "flag": [True, False]})
    lines = markdown_table(frame).splitlines()
    assert lines[0] == "| group | n | share | flag |"
    assert lines[1] == "| --- | ---: | ---: | ---: |"  # bools count as numeric in pandas
    assert lines[2] == "| a\\|b | 1,234 | 50.0% | yes |"
    assert lines[3] == "| c | 5 | 0.40% | no |"
    assert format_cell(np.nan) == "" and format_cell(12.5) == "12.50"


def test_markdown_text_table_takes_cells_as_text():
    frame = pd.DataFrame({"metric": ["auc"], "value": ["0.700 [0.6, 0.8]"]})
    assert markdown_text_table(frame).splitlines() == [
        "| metric | value |",
        "| --- | --- |",
        "| auc | 0.700 [0.6, 0.8] |",
    ]
    assert markdown_text_table(pd.DataFrame({"x": [0.5]}), lambda v: f"<{v}>").splitlines()[-1] == "| <0.5> |"


def test_html_table_escapes_and_classes_rows():
    frame = pd.DataFrame({"group": ["<b>", "x"], "note": ["worst", ""]})
    page = html_table(frame, lambda record: "worst" if record["note"] == "worst" else "")
    assert "<td>&lt;b&gt;</td>" in page and "<b>" not in page.replace("<tbody>", "")
    assert page.count('<tr class="worst">') == 1 and "<tr><td>x</td>" in page


def test_pngs_become_data_uris(tmp_path):
    uri = png_data_uri_bytes(PNG)
    assert uri.startswith("data:image/png;base64,") and base64.b64decode(uri.split(",", 1)[1]) == PNG
    (tmp_path / "p.png").write_bytes(PNG)
    assert png_data_uri(tmp_path / "p.png") == uri
    assert html_img('a"b', PNG) == f'<img alt="a&quot;b" src="{uri}">'
