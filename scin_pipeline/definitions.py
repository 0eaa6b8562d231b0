"""The one Definitions object of the code location: assets, checks, resources and jobs.

Deployment settings come from the environment only (SCIN_DATA_ROOT, SCIN_SOURCE, DAGSTER_HOME,
MLFLOW_TRACKING_URI); everything else is Dagster config with defaults, overridable in the Launchpad.
"""

from __future__ import annotations

import os
import warnings

from dagster import AssetSelection, BetaWarning, Definitions, define_asset_job

from scin_pipeline.assets import ALL_ASSET_CHECKS, ALL_ASSETS
from scin_pipeline.resources import ParquetTableIOManager, ScinSourceResource, StoragePaths

# Output(data_version=...) is marked beta; we rely on it for content-based data versions on purpose.
warnings.filterwarnings("ignore", category=BetaWarning)


def build_resources(data_root: str | None = None, source: str | None = None) -> dict:
    data_root = data_root or os.environ.get("SCIN_DATA_ROOT", "data")
    return {
        "scin_source": ScinSourceResource(location=source or os.environ.get("SCIN_SOURCE", "gcs")),
        "storage": StoragePaths(data_root=data_root),
        "io_manager": ParquetTableIOManager(data_root=data_root),
    }


full_pipeline_job = define_asset_job(
    "full_pipeline", selection=AssetSelection.all(),
    description="Every asset and check, from the source to the reports.")

defs = Definitions(
    assets=ALL_ASSETS,
    asset_checks=ALL_ASSET_CHECKS,
    resources=build_resources(),
    jobs=[full_pipeline_job],
)
