"""The SCIN source as a Dagster resource: the public bucket (anonymous) or a local mirror of its layout."""

from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import Field

from scin_pipeline.core.data_root import DEFAULT_SOURCE
from scin_pipeline.core.sources import ScinSource, open_source


class ScinSourceResource(ConfigurableResource):
    """Where the SCIN release is read from.

    ``location`` is ``gcs`` (the public bucket gs://dx-scin-public-data, anonymous access; honours
    STORAGE_EMULATOR_HOST), ``gs://<bucket>``, or the path of a local folder with the bucket's layout.
    """

    location: str = Field(default=DEFAULT_SOURCE, description="'gcs', 'gs://<bucket>' or a local mirror folder")
    download_workers: int = Field(default=16, ge=1, le=128, description="parallel downloads")
    download_retries: int = Field(default=4, ge=0, le=20, description="retries per object on transient errors")
    timeout_s: float = Field(default=60.0, gt=0, description="per-request timeout, seconds")

    def open(self) -> ScinSource:
        return open_source(self.location, timeout_s=self.timeout_s)

    def is_synthetic(self) -> bool:
        """Whether the source is a synthetic mirror (its marker file); an unreachable source is not
        synthetic (the assets that ask already hold its tables)."""
        try:
            return self.open().is_synthetic()
        except Exception:
            return False
