"""How assets show tables and images in their Dagster metadata (one renderer for every stage)."""

import warnings

import pandas as pd
from dagster import BetaWarning, DataVersion, MetadataValue, Output

from scin_pipeline.core.rendering import markdown_table, png_data_uri

PREVIEW_ROWS = 10


def table_md(frame: pd.DataFrame, columns: list[str] | None = None, rows: int = PREVIEW_ROWS) -> MetadataValue:
    """The first ``rows`` rows (of ``columns``) as a Markdown table; "_none_" for an empty table."""
    shown = frame[columns] if columns else frame
    return MetadataValue.md(markdown_table(shown.head(rows)) if len(shown) else "_none_")


def metric_md(frame: pd.DataFrame, rows: int = 60) -> MetadataValue:
    """Metrics rounded to 3 decimals as text (``table_md`` shows floats in [0, 1] as shares)."""
    shown = frame.copy()
    for column in shown.select_dtypes(include="float64").columns:
        shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
    return table_md(shown, rows=rows)


def image_md(path) -> MetadataValue:
    """A PNG inline: Dagster's Markdown cannot reach files on the data root."""
    return MetadataValue.md("_no image_" if path is None else f"![{path.stem}]({png_data_uri(path)})")


def versioned_output(value, version: str, **kwargs) -> Output:
    """``Output(value, data_version=DataVersion(version), ...)``: a content-based data version, so a rerun on
    unchanged inputs is recognised. ``data_version`` is a beta parameter of ``Output`` in Dagster 1.13 and
    warns on every call; silenced here, at the one call, in whatever process runs the step."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"Parameter `data_version` of initializer `Output.__init__`", category=BetaWarning
        )
        return Output(value, data_version=DataVersion(version), **kwargs)
