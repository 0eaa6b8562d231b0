"""Where the pipeline keeps its files, and the IO manager that stores table assets as Parquet.

Layout under the data root (documented in the README; users and scripts may rely on it):
    tables/<asset_name>.parquet   every table asset
    tables/<asset_name>/          files that belong to a table asset (plots, reports)
    raw/<sha256>/<file>           verbatim metadata files, content-addressed
    images/<image_id>.png         verified local copies of the images
    quarantine/                   rejected or corrupt inputs, each with its reason
    dagster_home/, mlflow/        the embedded Dagster instance and MLflow store
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd
from dagster import ConfigurableIOManager, ConfigurableResource, InputContext, OutputContext
from pydantic import Field


def default_data_root() -> str:
    return os.environ.get("SCIN_DATA_ROOT", "data")


class StoragePaths(ConfigurableResource):
    data_root: str = Field(default_factory=default_data_root, description="root folder of all pipeline files")

    @property
    def root(self) -> Path:
        return Path(self.data_root).expanduser().resolve()

    def folder(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RuntimeError(f"cannot create {path} under the data root {self.root}: {exc}") from exc
        return path

    @property
    def tables_dir(self) -> Path:
        return self.folder("tables")

    def table_files_dir(self, asset_name: str) -> Path:
        return self.folder("tables", asset_name)

    @property
    def images_dir(self) -> Path:
        return self.folder("images")

    @property
    def raw_dir(self) -> Path:
        return self.folder("raw")

    def quarantine_dir(self, stage: str) -> Path:
        return self.folder("quarantine", stage)


def write_parquet_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".parquet", dir=path.parent)
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class ParquetTableIOManager(ConfigurableIOManager):
    """Stores each DataFrame asset at ``<data_root>/tables/<asset_name>.parquet``."""

    data_root: str = Field(default_factory=default_data_root)

    def _path(self, context: InputContext | OutputContext) -> Path:
        key = context.asset_key.path
        return Path(self.data_root).expanduser().resolve() / "tables" / f"{'__'.join(key)}.parquet"

    def handle_output(self, context: OutputContext, obj: pd.DataFrame) -> None:
        if obj is None:
            return
        if not isinstance(obj, pd.DataFrame):
            raise TypeError(f"{context.asset_key.to_user_string()}: expected a DataFrame, got {type(obj)}")
        path = self._path(context)
        write_parquet_atomic(obj, path)
        context.add_output_metadata({"table_path": str(path), "rows": len(obj)})

    def load_input(self, context: InputContext) -> pd.DataFrame:
        path = self._path(context)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: materialise {context.asset_key.to_user_string()} first")
        return pd.read_parquet(path)
