"""The one Definitions object of the code location: assets, checks, resources, jobs, schedules, sensors.

Deployment settings come from the environment only (SCIN_DATA_ROOT, SCIN_SOURCE, the SCIN_GCS_* credentials,
DAGSTER_HOME, MLFLOW_TRACKING_URI); everything else is Dagster config with defaults, overridable in the
Launchpad. SCIN_DATA_ROOT, SCIN_SOURCE and SCIN_GCS_* reach the resources as ``dagster.EnvVar`` (see
:func:`env_or_default`); their names and defaults are owned by ``scin_pipeline.core.data_root``.
"""

from __future__ import annotations

import os

from dagster import Definitions, EnvVar

from scin_pipeline.assets import ALL_ASSET_CHECKS, ALL_ASSETS
from scin_pipeline.core.data_root import DATA_ROOT_ENV, DEFAULT_DATA_ROOT, DEFAULT_SOURCE, GCS_ACCESS_ENV, SOURCE_ENV

# Jobs, the weekly schedule, the release sensor and failure alerts live in scin_pipeline.orchestration.
from scin_pipeline.orchestration import ALL_JOBS, ALL_SCHEDULES, ALL_SENSORS, full_pipeline_job  # noqa: F401
from scin_pipeline.resources import MlflowTracking, ParquetTableIOManager, ScinSourceResource, StoragePaths


def env_or_default(name: str, default: str) -> str | EnvVar:
    """``EnvVar(name)`` when the variable is set as the definitions load, else ``default``.

    With an EnvVar, Dagster reads the variable when a run launches (and the UI shows the setting as coming
    from it) instead of this module freezing its value at import. Dagster's EnvVar has no default, though:
    one whose variable is unset fails every launch. Choosing at load keeps the documented default for a
    deployment that does not set the variable; the code server, its run workers and its sensors share one
    environment, so a variable set at load is set at launch too. Run config (as the CLI passes) overrides
    either."""
    return EnvVar(name) if name in os.environ else default


def build_resources(data_root: str | None = None, source: str | None = None) -> dict:
    """The resources of the code location. One ``storage`` owns the data root: the IO manager and MLflow take
    that same resource as a nested dependency, and it is configurable at launch (``data_root`` defaulting to
    ``data_root``, else $SCIN_DATA_ROOT, else ``data``), so run config or the Launchpad setting
    ``resources.storage.config.data_root`` once moves the tables, the caches and the MLflow store together.
    ``source`` likewise defaults to $SCIN_SOURCE, else ``gcs``; the GCS credentials to $SCIN_GCS_AUTH,
    $SCIN_GCS_SERVICE_ACCOUNT_KEY and $SCIN_GCS_USER_PROJECT, else anonymous."""
    storage = StoragePaths.configure_at_launch(data_root=data_root or env_or_default(DATA_ROOT_ENV, DEFAULT_DATA_ROOT))
    # Unset variables leave the resource's own defaults (anonymous, no key, no billing project).
    gcs = {field: EnvVar(name) for field, name in GCS_ACCESS_ENV.items() if name in os.environ}
    return {
        "scin_source": ScinSourceResource(
            location=source or env_or_default(SOURCE_ENV, DEFAULT_SOURCE),
            auth=gcs.get("auth", "anonymous"),
            service_account_key_file=gcs.get("service_account_key_file"),
            user_project=gcs.get("user_project"),
        ),
        "storage": storage,
        "io_manager": ParquetTableIOManager(storage=storage),
        # tracking_uri None: MLFLOW_TRACKING_URI, else SQLite under <data_root>/mlflow. The resource reads the
        # variable itself when a run starts (not at import), by its own rule in resources/mlflow_tracking.py.
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
