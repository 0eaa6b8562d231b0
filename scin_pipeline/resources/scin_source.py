"""The SCIN source as a Dagster resource: a GCS bucket (anonymous by default, or with credentials) or a local
mirror of its layout."""

from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import Field

from scin_pipeline.core.data_root import DEFAULT_SOURCE
from scin_pipeline.core.sources import GcsAccess, ScinSource, open_source


class ScinSourceResource(ConfigurableResource):
    """Where the SCIN release is read from, and as whom.

    ``location`` is ``gcs`` (the public bucket gs://dx-scin-public-data; honours STORAGE_EMULATOR_HOST),
    ``gs://<bucket>``, or the path of a local folder with the bucket's layout. A bucket is read anonymously
    unless ``auth`` says otherwise (``application_default`` or ``service_account_key`` with
    ``service_account_key_file``); ``user_project`` is the project billed for a requester-pays bucket.
    """

    location: str = Field(default=DEFAULT_SOURCE, description="'gcs', 'gs://<bucket>' or a local mirror folder")
    download_workers: int = Field(default=16, ge=1, le=128, description="parallel downloads")
    download_retries: int = Field(default=4, ge=0, le=20, description="retries per object on transient errors")
    timeout_s: float = Field(default=60.0, gt=0, description="per-request timeout, seconds")
    # A str, not the GcsAuth Literal: a Literal field refuses a dagster.EnvVar ($SCIN_GCS_AUTH), so the
    # value is checked when the source opens (GcsAccess names the allowed ones).
    auth: str = Field(
        default="anonymous",
        description="GCS credentials: 'anonymous' (a public bucket), 'application_default' (Google's "
        "Application Default Credentials: GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default "
        "login`, a workload's service account) or 'service_account_key' (service_account_key_file)",
    )
    service_account_key_file: str | None = Field(
        default=None, description="path of a service-account JSON key; only with auth='service_account_key'"
    )
    user_project: str | None = Field(
        default=None,
        description="project billed for a requester-pays bucket (sent as userProject); needs auth other "
        "than 'anonymous'",
    )

    def gcs_access(self) -> GcsAccess:
        """The credentials part of this config (ValueError, naming the field, when it does not hold together)."""
        return GcsAccess(
            auth=self.auth, service_account_key_file=self.service_account_key_file, user_project=self.user_project
        )

    def open(self, timeout_s: float | None = None) -> ScinSource:
        return open_source(self.location, timeout_s=timeout_s or self.timeout_s, access=self.gcs_access())

    def is_synthetic(self) -> bool:
        """Whether the source is a synthetic mirror (its marker file); an unreachable source is not
        synthetic (the assets that ask already hold its tables)."""
        try:
            return self.open().is_synthetic()
        except Exception:
            return False
