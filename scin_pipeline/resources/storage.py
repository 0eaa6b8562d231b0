"""Where the pipeline keeps its files, and the IO manager that stores table assets as Parquet.

:class:`StoragePaths` owns the data root: it is the only resource with a ``data_root`` setting, and
:class:`ParquetTableIOManager` and ``MlflowTracking`` take it as a nested resource. In ``build_resources`` one
``StoragePaths.configure_at_launch(data_root=...)`` is given to all three, so the data root set once (in the
Launchpad, or as run config of ``storage`` as the CLI does) moves the tables, the caches, the models and the
MLflow store together. The layout itself is :class:`scin_pipeline.core.data_root.DataRootLayout`.

Layout under the data root (documented in the README; users and scripts may rely on it):
    tables/<asset_name>.parquet         every table asset (partitioned: tables/<asset_name>/<partition>.parquet)
    tables/<asset_name>/                files that belong to a table asset (plots, reports)
    raw/<sha256>/<file>                 verbatim metadata files, content-addressed
    images/<image_id>.png               verified local copies of the images
    quarantine/<stage>/                 rejected or corrupt inputs, each with its reason
    cache/image_tensors/<S>px/          decoded, resized uint8 image shards (image_tensors)
    cache/image_embeddings/<backbone>/  frozen-backbone embeddings and the backbone (image_embeddings, ...)
    models/<candidate>/<run key>/       each trained candidate's packaged model
    checkpoints/<candidate>/<run key>/  training checkpoints (a killed training resumes from them)
    mlflow/mlflow.db, mlflow/artifacts/ the embedded MLflow store and its artifacts
    dagster_home/                       the embedded Dagster instance (CLI runs)
    alerts/alerts.jsonl                 one line per failed run
    synthetic_mirror/                   `scin-pipeline demo` only: the synthetic source it wrote

Every file is written atomically (:mod:`scin_pipeline.core.atomic`): temp files are dot-files named
after their writer's pid, swept by the next write into the same folder once that writer is dead.
A local filesystem error no retry can fix (a file where a folder must be, a permission, a read-only
mount) raises ``dagster.Failure(allow_retries=False)``, so a step's retry policy does not spend a
minute repeating it.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
from dagster import (
    ConfigurableIOManager,
    ConfigurableResource,
    Failure,
    InputContext,
    MetadataValue,
    OutputContext,
    TableColumn,
    TableSchema,
)
from pydantic import Field

from scin_pipeline.core.atomic import describe_os_error, unfixable_os_error, write_parquet_atomic
from scin_pipeline.core.data_root import DataRootLayout, default_data_root


class StoragePaths(ConfigurableResource):
    """The data root and every folder under it (the one owner: see the module docstring). A folder asked
    for by name is created; a file or a permission in the way is a clear error naming the path."""

    data_root: str = Field(default_factory=default_data_root, description="root folder of all pipeline files")

    @property
    def layout(self) -> DataRootLayout:
        """The paths under this data root, none created (for readers and for URIs)."""
        return DataRootLayout.of(self.data_root)

    @property
    def root(self) -> Path:
        return self.layout.root

    def stored(self, path: str | Path) -> str:
        """``path`` under the data root as tables and metadata store it: relative to the root (see
        :meth:`DataRootLayout.relative`), so a copied or moved root works."""
        return self.layout.relative(path)

    def stored_or_none(self, path) -> str | None:
        """:meth:`stored`, passing a missing path (None, NaN, "") through as None."""
        return None if path is None or pd.isna(path) or not str(path) else self.stored(str(path))

    def resolve(self, stored: str | Path) -> Path:
        """A path a table stored, under this data root (see :meth:`DataRootLayout.resolve`)."""
        return self.layout.resolve(stored)

    def resolve_or_none(self, stored) -> str | None:
        """:meth:`resolve` as text, passing a missing path (None, NaN, "") through as None."""
        return None if stored is None or pd.isna(stored) or not str(stored) else str(self.resolve(str(stored)))

    def _folder(self, path: Path) -> Path:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RuntimeError(
                f"cannot create {path} under the data root {self.root}: {describe_os_error(exc)}"
            ) from exc
        return path

    @property
    def tables_dir(self) -> Path:
        return self._folder(self.layout.tables)

    def table_files_dir(self, asset_name: str) -> Path:
        return self._folder(self.layout.table_files(asset_name))

    @property
    def labelling_queue_csv(self) -> Path:
        """The graders' CSV of labelling_queue; its folder is created, the file is written atomically."""
        path = self.layout.labelling_queue_csv
        self._folder(path.parent)
        return path

    @property
    def images_dir(self) -> Path:
        return self._folder(self.layout.images)

    @property
    def raw_dir(self) -> Path:
        return self._folder(self.layout.raw)

    def quarantine_dir(self, stage: str) -> Path:
        return self._folder(self.layout.quarantine(stage))

    @property
    def image_tensors_dir(self) -> Path:
        return self._folder(self.layout.image_tensors)

    @property
    def image_embeddings_dir(self) -> Path:
        return self._folder(self.layout.image_embeddings)

    def backbone_embeddings_dir(self, backbone: str) -> Path:
        return self._folder(self.layout.backbone_embeddings(backbone))

    def model_package_dir(self, candidate: str, run_key: str) -> Path:
        """Where a candidate's package goes; the candidate's folder is created, not the package's own (it is
        written to a temporary sibling and renamed into place)."""
        path = self.layout.model_package(candidate, run_key)
        self._folder(path.parent)
        return path

    def checkpoint_dir(self, candidate: str, run_key: str) -> Path:
        return self._folder(self.layout.checkpoints(candidate, run_key))

    @property
    def mlflow_dir(self) -> Path:
        return self._folder(self.layout.mlflow)

    @property
    def mlflow_uri(self) -> str:
        """The embedded MLflow store of this data root (``MlflowTracking`` decides whether it is used)."""
        return self.layout.mlflow_uri

    @property
    def mlflow_artifacts_dir(self) -> Path:
        """Not created here: MLflow creates an experiment's artifact folder on first use."""
        return self.layout.mlflow_artifacts

    @property
    def dagster_home(self) -> Path:
        return self._folder(self.layout.dagster_home)

    @property
    def alerts_file(self) -> Path:
        """Not created here: the alert sink creates it on the first alert."""
        return self.layout.alerts_file


def table_metadata(frame, rows: int) -> dict:
    """Dagster's standard table metadata: ``dagster/row_count`` and ``dagster/column_schema`` (the UI shows
    both; the CLI's summary reads the row count)."""
    metadata: dict = {"dagster/row_count": int(rows)}
    if isinstance(frame, pd.DataFrame):
        metadata["dagster/column_schema"] = TableSchema(
            columns=[TableColumn(name=str(name), type=str(dtype)) for name, dtype in frame.dtypes.items()]
        )
    return metadata


def local_fs_failure(what: str, exc: BaseException) -> Failure | None:
    """A ``Failure`` that stops step retries when ``exc`` (or a cause) is a local filesystem error no
    retry can fix; None for any other error."""
    error = unfixable_os_error(exc)
    if error is None:
        return None
    return Failure(
        description=f"{what}: {describe_os_error(error)} (a local filesystem error: not retried)", allow_retries=False
    )


@contextmanager
def no_retry_on_local_fs_errors(what: str) -> Iterator[None]:
    try:
        yield
    except Failure:
        raise
    except Exception as exc:
        failure = local_fs_failure(what, exc)
        if failure is None:
            raise
        # from None: the description says what, where and why, and the run summary shows the innermost
        # cause, which would otherwise be the bare "[Errno 17] File exists: ...".
        raise failure from None


def _stable_text_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Text columns as pandas' string dtype, so that a column that happens to be all-missing in one
    partition is still written as text (not Arrow's null type) and the partitions read back as one
    dataset."""
    frame = frame.copy()
    for column in frame.select_dtypes(include="object").columns:
        values = frame[column].dropna()
        if values.map(lambda v: isinstance(v, str)).all():
            frame[column] = frame[column].astype("string")
    return frame


class ParquetTableIOManager(ConfigurableIOManager):
    """Stores each DataFrame asset at ``<data_root>/tables/<asset_name>.parquet``, the data root being its
    ``storage`` resource's (one ``StoragePaths`` shared with the assets and MLflow: see the module docstring).

    A partitioned asset is stored one file per partition, ``tables/<asset_name>/<partition>.parquet``
    (readable whole with ``pandas.read_parquet("tables/<asset_name>")``). A run over several partitions
    at once (a single-run backfill) returns ``{partition_key: DataFrame}``. A downstream asset that is
    not partitioned receives all partitions concatenated: the cheap merge of a sharded stage.
    """

    # The data root: the `storage` resource (set its data_root there). A real class in the annotation (no
    # `from __future__ import annotations` in this module): Dagster reads it to accept the partial resource
    # `StoragePaths.configure_at_launch(...)` that build_resources shares.
    storage: StoragePaths

    def _table_path(self, context: InputContext | OutputContext, partition: str | None = None) -> Path:
        name = "__".join(context.asset_key.path)
        layout = self.storage.layout
        return layout.table_file(name) if partition is None else layout.table_partition_file(name, partition)

    def handle_output(self, context: OutputContext, obj) -> None:
        if obj is None:
            return
        with no_retry_on_local_fs_errors(f"storing {context.asset_key.to_user_string()}"):
            self._handle_output(context, obj)

    def _handle_output(self, context: OutputContext, obj) -> None:
        if not context.has_asset_partitions:
            self._write(context, obj, self._table_path(context))
            context.add_output_metadata(
                {
                    "table_path": MetadataValue.path(self.storage.stored(self._table_path(context))),
                    **table_metadata(obj, len(obj)),
                }
            )
            return
        keys = list(context.asset_partition_keys)
        frames = obj if isinstance(obj, dict) else {keys[0]: obj}
        if len(keys) > 1 and set(frames) != set(keys):
            raise ValueError(
                f"{context.asset_key.to_user_string()}: expected one DataFrame per partition "
                f"{keys}, got {sorted(frames)}"
            )
        for key, frame in frames.items():
            self._write(context, _stable_text_columns(frame), self._table_path(context, key))
        context.add_output_metadata(
            {
                "table_path": MetadataValue.path(self.storage.stored(self._table_path(context, keys[0]).parent)),
                **table_metadata(next(iter(frames.values())), int(sum(len(f) for f in frames.values()))),
            }
        )

    @staticmethod
    def _write(context: OutputContext, obj, path: Path) -> None:
        if not isinstance(obj, pd.DataFrame):
            raise TypeError(f"{context.asset_key.to_user_string()}: expected a DataFrame, got {type(obj)}")
        write_parquet_atomic(obj, path)

    def load_input(self, context: InputContext) -> pd.DataFrame:
        with no_retry_on_local_fs_errors(f"loading {context.asset_key.to_user_string()}"):
            return self._load_input(context)

    def _load_input(self, context: InputContext) -> pd.DataFrame:
        if not context.has_asset_partitions:
            return self._read(context, self._table_path(context))
        frames = [self._read(context, self._table_path(context, key)) for key in sorted(context.asset_partition_keys)]
        merged = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        # Back to plain Python text with None for missing, as the unpartitioned tables hold it.
        for column in merged.columns[merged.dtypes == "string"]:
            merged[column] = merged[column].astype(object).where(merged[column].notna(), None)  # pyright: ignore[reportArgumentType]  # stubs omit None
        return merged

    @staticmethod
    def _read(context: InputContext, path: Path) -> pd.DataFrame:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: materialise {context.asset_key.to_user_string()} first")
        return pd.read_parquet(path)
