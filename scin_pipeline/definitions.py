"""The one Definitions object of the code location: assets, checks, resources, jobs, schedules, sensors.

Deployment settings come from the environment only (SCIN_DATA_ROOT, SCIN_SOURCE, DAGSTER_HOME,
MLFLOW_TRACKING_URI); everything else is Dagster config with defaults, overridable in the Launchpad.
"""

from __future__ import annotations

import os
import warnings

from dagster import BetaWarning, Definitions

from scin_pipeline.assets import ALL_ASSET_CHECKS, ALL_ASSETS
from scin_pipeline.core.data_root import default_data_root

# Jobs, the weekly schedule, the release sensor and failure alerts live in scin_pipeline.orchestration.
from scin_pipeline.orchestration import ALL_JOBS, ALL_SCHEDULES, ALL_SENSORS, full_pipeline_job  # noqa: F401
from scin_pipeline.resources import MlflowTracking, ParquetTableIOManager, ScinSourceResource, StoragePaths

# Output(data_version=...) is marked beta; we rely on it for content-based data versions on purpose.
warnings.filterwarnings("ignore", category=BetaWarning)


def build_resources(data_root: str | None = None, source: str | None = None) -> dict:
    """The resources of the code location. One ``storage`` owns the data root: the IO manager and MLflow take
    that same resource as a nested dependency, and it is configurable at launch (``data_root`` defaulting to
    ``data_root``, else $SCIN_DATA_ROOT, else ``data``), so run config or the Launchpad setting
    ``resources.storage.config.data_root`` once moves the tables, the caches and the MLflow store together."""
    storage = StoragePaths.configure_at_launch(data_root=data_root or default_data_root())
    return {
        "scin_source": ScinSourceResource(location=source or os.environ.get("SCIN_SOURCE", "gcs")),
        "storage": storage,
        "io_manager": ParquetTableIOManager(storage=storage),
        # tracking_uri None: MLFLOW_TRACKING_URI, else SQLite under <data_root>/mlflow (read at run time).
        "mlflow": MlflowTracking(storage=storage),
    }


defs = Definitions(
    assets=ALL_ASSETS,
    asset_checks=ALL_ASSET_CHECKS,
    resources=build_resources(),
    jobs=ALL_JOBS,
    schedules=ALL_SCHEDULES,
    sensors=ALL_SENSORS,
)


def named_job(name: str):
    """One of this code location's jobs, resolved with its resources: what the CLI runner launches
    (through ``dagster.build_reconstructable_job``), so a CLI run is a run of that job."""
    return defs.resolve_job_def(name)
