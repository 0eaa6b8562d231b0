"""Dagster resources: the SCIN source, storage paths, the Parquet table IO manager and MLflow tracking."""

from scin_pipeline.resources.mlflow_tracking import MlflowTracking
from scin_pipeline.resources.scin_source import ScinSourceResource
from scin_pipeline.resources.storage import ParquetTableIOManager, StoragePaths

__all__ = ["MlflowTracking", "ParquetTableIOManager", "ScinSourceResource", "StoragePaths"]
