"""Generic rendering helpers of the reports (data report, fairness report, model card, asset metadata):
Markdown tables, HTML tables and images, PNGs as ``data:`` URIs. Nothing here knows what a report says.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# ---------------------------------------------------------------------------------------------- PNG


def png_data_uri(path: str | Path) -> str:
    """A PNG file as a ``data:`` URI, for Markdown viewers that cannot reach local files (Dagster's
    ``MetadataValue.md``)."""
    return png_data_uri_bytes(Path(path).read_bytes())


def png_data_uri_bytes(data: bytes) -> str:
    """PNG bytes as a ``data:`` URI (see ``png_data_uri``)."""
    return f"data:image/png;base64,{base64.b64encode(data).decode('ascii')}"


# ------------------------------------------------------------------------------------------ Markdown


def format_cell(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            return ""
        if 0 < value < 0.01:  # small shares matter here (deep tones): keep them distinguishable from 0
            return f"{value:.2%}"
        return f"{value:.1%}" if 0 <= value <= 1 else f"{value:,.2f}"
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table. Floats in [0, 1] are shown as percentages (every float column
    of these tables is a share); integers with thousands separators."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "| " + " | ".join("---:" if pd.api.types.is_numeric_dtype(frame[c]) else "---" for c in frame.columns) + " |"
    body = ["| " + " | ".join(format_cell(v) for v in row) + " |" for row in frame.itertuples(index=False, name=None)]
    return "\n".join([header, rule, *body])


def markdown_text_table(frame: pd.DataFrame, fmt: Callable[[Any], str] = str) -> str:
    """A Markdown table whose cells are ``fmt(value)`` taken as text (pipes escaped); the caller's own
    formatting, unlike :func:`markdown_table`'s share-as-percentage rule."""

    def text(v) -> str:
        return fmt(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(text, frame.columns)) + " |", "| " + " | ".join("---" for _ in frame.columns) + " |"]
    lines += ["| " + " | ".join(text(v) for v in row) + " |" for row in frame.itertuples(index=False, name=None)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- HTML


def html_table(frame: pd.DataFrame, row_class: Callable[[dict], str] | None = None) -> str:
    """An HTML table of ``frame``, every header and cell escaped; ``row_class(record)`` (a row as a dict)
    names a CSS class for the row, "" for none."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for record in frame.to_dict("records"):
        css = row_class(record) if row_class else ""
        cells = "".join(f"<td>{html.escape(str(v))}</td>" for v in record.values())
        body.append(f'<tr class="{css}">{cells}</tr>' if css else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def html_img(name: str, png: bytes) -> str:
    """An ``<img>`` holding the PNG itself (a ``data:`` URI): the page needs no other file."""
    return f'<img alt="{html.escape(name)}" src="{png_data_uri_bytes(png)}">'
