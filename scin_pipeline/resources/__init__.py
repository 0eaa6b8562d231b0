"""Dagster resources: the SCIN source, storage paths and the Parquet table IO manager."""

from scin_pipeline.resources.scin_source import ScinSourceResource
from scin_pipeline.resources.storage import ParquetTableIOManager, StoragePaths

__all__ = ["ParquetTableIOManager", "ScinSourceResource", "StoragePaths"]
