"""The layout of the data root: every file and folder a run writes, named once.

The one place that knows where things live under the data root. ``resources.storage.StoragePaths`` (the
Dagster resource the assets, the IO manager and the MLflow resource share) delegates to it, and the runner,
the CLI and the alerts use it directly, without Dagster. Paths only: nothing here creates a folder.

    tables/<asset>.parquet                      every table asset (stable, documented)
    tables/<asset>/<partition>.parquet          a partitioned table asset, one file per partition
    tables/<asset>/                             files that belong to a table asset (plots, reports)
    tables/labelling_queue/labelling_queue.csv  the cases to hand to dermatologists next (labelling_queue)
    raw/<sha256>/<file>                         verbatim metadata files, content-addressed
    images/<image_id>.png                       verified local copies of the images
    quarantine/<stage>/                         rejected or corrupt inputs, each with its reason
    cache/image_tensors/<S>px/                  decoded, resized uint8 image shards + manifest
    cache/image_embeddings/<backbone>/          frozen-backbone embeddings and the backbone beside them
    models/<candidate>/<run key>/               each trained candidate's packaged model
    checkpoints/<candidate>/<run key>/          training checkpoints, to resume a killed training
    mlflow/mlflow.db                            the embedded MLflow store (tracking + registry)
    mlflow/artifacts/<experiment>/              its run artifacts
    dagster_home/                               the embedded Dagster instance (CLI runs)
    alerts/alerts.jsonl                         one JSON line per failed run
    synthetic_mirror/, synthetic_mirror.json    `scin-pipeline demo` only: the synthetic source it wrote
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# The deployment's environment variables and their defaults, named once: the code location
# (definitions.build_resources, through dagster.EnvVar), the CLI's argument defaults and the docs use these.
DATA_ROOT_ENV = "SCIN_DATA_ROOT"
DEFAULT_DATA_ROOT = "data"
SOURCE_ENV = "SCIN_SOURCE"  # 'gcs', 'gs://<bucket>' or a local mirror folder (ScinSourceResource.location)
DEFAULT_SOURCE = "gcs"
# GCS credentials of a deployment (ScinSourceResource.auth, .service_account_key_file, .user_project); unset,
# the bucket is read anonymously. Keyed by the resource field each one sets.
GCS_ACCESS_ENV = {
    "auth": "SCIN_GCS_AUTH",  # anonymous | application_default | service_account_key
    "service_account_key_file": "SCIN_GCS_SERVICE_ACCOUNT_KEY",  # path of a service-account JSON key
    "user_project": "SCIN_GCS_USER_PROJECT",  # project billed for a requester-pays bucket
}
METADATA_DIR_ENV = "SCIN_METADATA_DIR"  # a folder with the real SCIN CSVs; the demo's default is the bundled copy


def default_data_root() -> str:
    """``$SCIN_DATA_ROOT``, else ``data`` (relative to the working directory)."""
    return os.environ.get(DATA_ROOT_ENV, DEFAULT_DATA_ROOT)


def _name(value: str, what: str) -> str:
    # One path segment: these names come from asset keys, candidates, stages and run keys.
    text = str(value)
    if not text or text in (".", "..") or "/" in text or "\\" in text or "\x00" in text:
        raise ValueError(f"{what} must be one non-empty path segment, got {value!r}")
    return text


@dataclass(frozen=True)
class DataRootLayout:
    """Where each thing lives under ``root`` (absolute; :meth:`of` resolves a user's path)."""

    root: Path

    @classmethod
    def of(cls, data_root: str | os.PathLike) -> DataRootLayout:
        return cls(Path(data_root).expanduser().resolve())

    # ------------------------------------------------------------------ paths as tables store them

    def relative(self, path: str | os.PathLike) -> str:
        """``path`` (a file or folder under this root) as tables and metadata store it: relative to the root,
        POSIX. Stored this way, a copied or moved data root reads its own files (:meth:`resolve`), never the
        original's. A path outside the root is an error naming it."""
        absolute = Path(os.path.abspath(os.fspath(path)))
        for candidate in (absolute, absolute.resolve()):
            if candidate == self.root or self.root in candidate.parents:
                return candidate.relative_to(self.root).as_posix()
        raise ValueError(f"{path} is not under the data root {self.root}: only paths inside it are stored")

    def resolve(self, stored: str | os.PathLike) -> Path:
        """A stored path read back, under THIS root: relative (as :meth:`relative` writes) -> ``root / stored``.
        An absolute one (a table written before paths were stored relative) is returned as it is."""
        path = Path(os.fspath(stored))
        if path.is_absolute():
            return path
        if ".." in path.parts:
            raise ValueError(f"stored path {stored!r} leaves the data root {self.root}")
        return self.root / path

    # ------------------------------------------------------------------ tables (the IO manager's)

    @property
    def tables(self) -> Path:
        return self.root / "tables"

    def table_file(self, asset_name: str) -> Path:
        return self.tables / f"{_name(asset_name, 'asset name')}.parquet"

    def table_partition_file(self, asset_name: str, partition: str) -> Path:
        return self.table_files(asset_name) / f"{_name(partition, 'partition key')}.parquet"

    def table_files(self, asset_name: str) -> Path:
        """The folder of a table asset's own files (and of its partitions)."""
        return self.tables / _name(asset_name, "asset name")

    @property
    def labelling_queue_csv(self) -> Path:
        """The labelling queue as a CSV a curator hands to graders (what labelling_queue writes)."""
        return self.table_files("labelling_queue") / "labelling_queue.csv"

    # ------------------------------------------------------------------ inputs

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def images(self) -> Path:
        return self.root / "images"

    def quarantine(self, stage: str) -> Path:
        return self.root / "quarantine" / _name(stage, "quarantine stage")

    # ------------------------------------------------------------------ caches, models, checkpoints

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def image_tensors(self) -> Path:
        return self.cache / "image_tensors"

    @property
    def image_embeddings(self) -> Path:
        return self.cache / "image_embeddings"

    def backbone_embeddings(self, backbone: str) -> Path:
        """One backbone's embeddings and saved backbone (core.models.BACKBONES names the backbones)."""
        return self.image_embeddings / _name(backbone, "backbone")

    def model_package(self, candidate: str, run_key: str) -> Path:
        return self.root / "models" / _name(candidate, "candidate") / _name(run_key, "run key")

    def checkpoints(self, candidate: str, run_key: str) -> Path:
        return self.root / "checkpoints" / _name(candidate, "candidate") / _name(run_key, "run key")

    # ------------------------------------------------------------------ embedded services

    @property
    def mlflow(self) -> Path:
        return self.root / "mlflow"

    @property
    def mlflow_db(self) -> Path:
        return self.mlflow / "mlflow.db"

    @property
    def mlflow_uri(self) -> str:
        """The embedded MLflow store's tracking (and registry) URI."""
        return f"sqlite:///{self.mlflow_db}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow / "artifacts"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster_home"

    @property
    def alerts(self) -> Path:
        return self.root / "alerts"

    @property
    def alerts_file(self) -> Path:
        return self.alerts / "alerts.jsonl"

    # ------------------------------------------------------------------ the demo's synthetic source

    @property
    def synthetic_mirror(self) -> Path:
        return self.root / "synthetic_mirror"

    @property
    def synthetic_mirror_params(self) -> Path:
        return self.root / "synthetic_mirror.json"


def embedded_mlflow_uri(data_root: str | os.PathLike) -> str:
    """``sqlite:///<data_root>/mlflow/mlflow.db``: the MLflow store of a data root."""
    return DataRootLayout.of(data_root).mlflow_uri
