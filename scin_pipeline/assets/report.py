"""data_report: the exploration the notebooks did by hand, as a reproducible report with plots."""

import pandas as pd
from dagster import AssetExecutionContext, MetadataValue, asset

from scin_pipeline.core.atomic import write_parquet_atomic
from scin_pipeline.core.report import build_data_report, markdown_with_inline_images
from scin_pipeline.resources import StoragePaths

# dagster-webserver 1.13 renders a Markdown metadata value of fewer characters than this inline.
DAGSTER_INLINE_MARKDOWN_CHARS = 1000


@asset(
    group_name="ingest",
    kinds={"pandas", "matplotlib"},
    code_version="2",
    description="Representation by Monk skin tone (US, India), Fitzpatrick type (self-reported and "
    "dermatologist), race/ethnicity, sex, age; condition frequencies; label coverage; missingness. "
    "Plots in this metadata and as files in tables/data_report/.",
)
def data_report(
    context: AssetExecutionContext,
    cases: pd.DataFrame,
    images: pd.DataFrame,
    image_files: pd.DataFrame,
    raw_metadata: pd.DataFrame,
    storage: StoragePaths,
) -> pd.DataFrame:
    out_dir = storage.table_files_dir("data_report")
    synthetic = bool(raw_metadata["synthetic"].any())
    report = build_data_report(
        cases,
        images,
        image_files,
        out_dir=out_dir,
        synthetic=synthetic,
        source_uri=str(raw_metadata["source_uri"].iloc[0]),
        release=", ".join(sorted(set(raw_metadata["release"]) - {""})),
    )
    for name in ("conditions", "label_coverage", "missingness", "images_summary"):
        write_parquet_atomic(getattr(report, name), out_dir / f"{name}.parquet")
    context.add_output_metadata(
        {
            # First, and short: the Dagster UI shows a Markdown value under DAGSTER_INLINE_MARKDOWN_CHARS in
            # place; a longer one opens in a dialog whose autofocused Close button scrolls it to its end.
            "headline": MetadataValue.md(report.headline),
            **report.summary_metadata,
            "synthetic_images": synthetic,
            "report": MetadataValue.md(markdown_with_inline_images(report)),
            "report_path": MetadataValue.path(storage.stored(out_dir / "data_report.md")),
        }
    )
    return report.representation
