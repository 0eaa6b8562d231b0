"""The storage layout resource and the Parquet IO manager: atomic writes, swept leftovers, local
filesystem errors that fail a step at once instead of being retried, and one owner of the data root (set
once on `storage`, it moves the tables, the caches and the MLflow store together)."""

from __future__ import annotations

import os

import mlflow
import pandas as pd
import pytest
from dagster import DagsterInstance, RetryPolicy, asset, materialize

from scin_pipeline.core.atomic import TMP_PREFIX, write_parquet_atomic, writer_namespace
from scin_pipeline.core.data_root import DataRootLayout
from scin_pipeline.resources.mlflow_tracking import MlflowTracking
from scin_pipeline.resources.storage import ParquetTableIOManager, StoragePaths

DEAD_PID = 4194399  # above Linux's largest pid_max: no such process
FRAME = pd.DataFrame({"image_id": ["1", "2"], "score": [0.5, 0.25]})


def test_a_table_write_sweeps_dead_writers_temp_files_and_keeps_live_ones(tmp_path):
    shard_dir = tmp_path / "tables" / "image_quality"
    shard_dir.mkdir(parents=True)
    orphan = shard_dir / f"{TMP_PREFIX}{DEAD_PID}@{writer_namespace()}-abc.parquet"
    live = shard_dir / f"{TMP_PREFIX}{os.getpid()}@{writer_namespace()}-abc.parquet"
    orphan.write_bytes(b"PAR1 half a table")
    live.write_bytes(b"PAR1 being written")

    write_parquet_atomic(FRAME, shard_dir / "00.parquet")

    assert not orphan.exists() and live.exists()
    pd.testing.assert_frame_equal(pd.read_parquet(shard_dir / "00.parquet"), FRAME)


def test_a_failed_table_write_leaves_neither_a_table_nor_a_temp_file(tmp_path):
    unwritable = pd.DataFrame({"mixed": [object(), 1]})  # Arrow cannot store an arbitrary object
    with pytest.raises(Exception):  # noqa: B017 - whichever error Arrow raises; the point is what is left
        write_parquet_atomic(unwritable, tmp_path / "t.parquet")
    assert list(tmp_path.iterdir()) == []


def test_a_file_where_a_storage_folder_must_be_is_named(tmp_path):
    (tmp_path / "raw").write_text("not a folder")
    with pytest.raises(RuntimeError) as caught:
        _ = StoragePaths(data_root=str(tmp_path)).raw_dir
    assert str(caught.value) == (
        f"cannot create {tmp_path / 'raw'} under the data root {tmp_path}: {tmp_path / 'raw'} is a file, not a folder"
    )


@asset(retry_policy=RetryPolicy(max_retries=2, delay=0.2))  # short: a regression fails fast
def retried_table() -> pd.DataFrame:
    return FRAME


def test_a_tables_folder_that_is_a_file_fails_the_step_once_without_retries(tmp_path):
    (tmp_path / "tables").write_text("not a folder")
    result = materialize(
        [retried_table],
        instance=DagsterInstance.ephemeral(),
        raise_on_error=False,
        resources={"io_manager": ParquetTableIOManager(storage=StoragePaths(data_root=str(tmp_path)))},
    )
    assert not result.success
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert retries == []
    [failure] = result.get_step_failure_events()
    assert failure.step_failure_data.user_failure_data.description == (
        f"storing retried_table: {tmp_path / 'tables'} is a file, not a folder (a local filesystem error: not retried)"
    )


# ------------------------------------------------------------------- one owner of the data root


def test_each_named_folder_is_the_layouts_and_is_created(tmp_path):
    storage = StoragePaths(data_root=str(tmp_path / "data"))
    layout = DataRootLayout.of(tmp_path / "data")
    created = {
        storage.tables_dir: layout.tables,
        storage.table_files_dir("data_report"): layout.table_files("data_report"),
        storage.raw_dir: layout.raw,
        storage.images_dir: layout.images,
        storage.quarantine_dir("image_files"): layout.quarantine("image_files"),
        storage.image_tensors_dir: layout.image_tensors,
        storage.image_embeddings_dir: layout.image_embeddings,
        storage.checkpoint_dir("baseline_cnn", "k1"): layout.checkpoints("baseline_cnn", "k1"),
        storage.mlflow_dir: layout.mlflow,
        storage.dagster_home: layout.dagster_home,
    }
    for got, expected in created.items():
        assert got == expected and got.is_dir(), expected
    # The package folder itself is renamed into place by its writer: only its candidate folder is made.
    package = storage.model_package_dir("baseline_cnn", "k1")
    assert package == layout.model_package("baseline_cnn", "k1")
    assert package.parent.is_dir() and not package.exists()
    assert storage.mlflow_uri == layout.mlflow_uri
    assert storage.mlflow_artifacts_dir == layout.mlflow_artifacts
    assert storage.alerts_file == layout.alerts_file


@asset
def layout_probe(storage: StoragePaths, mlflow: MlflowTracking) -> pd.DataFrame:
    """Writes where the real assets write: a cache, a checkpoint, a model package folder, an MLflow run."""
    (storage.image_tensors_dir / "probe.npy").write_bytes(b"tensor")
    (storage.image_embeddings_dir / "probe.npy").write_bytes(b"embedding")
    (storage.checkpoint_dir("probe", "k1") / "last.keras").write_bytes(b"checkpoint")
    storage.model_package_dir("probe", "k1").mkdir()
    with mlflow.training_run(run_key="layout-probe", run_name="probe", tags={}, params={"seed": 0}) as run:
        run.log_bytes(b"hello", "probe.txt")
    return pd.DataFrame({"run_id": [run.run_id]})


@asset
def layout_probe_copy(layout_probe: pd.DataFrame) -> pd.DataFrame:
    return layout_probe  # read back through the IO manager


def test_the_data_root_set_once_on_storage_moves_tables_caches_and_the_mlflow_store(tmp_path, monkeypatch):
    from scin_pipeline.definitions import build_resources
    from scin_pipeline.runner import resource_run_config

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # a stray relative write (./data, ./mlruns) would land here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    built, moved = tmp_path / "built", tmp_path / "moved"
    # What the CLI runner passes: the data root on `storage` only, nothing for the IO manager or MLflow.
    run_config = resource_run_config(moved, "gcs")
    assert set(run_config["resources"]) == {"scin_source", "storage"}

    result = materialize(
        [layout_probe, layout_probe_copy],
        instance=DagsterInstance.ephemeral(),
        resources=build_resources(data_root=str(built), source="gcs"),
        run_config=run_config,
    )

    assert result.success
    layout = DataRootLayout.of(moved)
    assert not built.exists() and list(work.iterdir()) == []
    [run_id] = pd.read_parquet(layout.table_file("layout_probe_copy"))["run_id"]
    assert pd.read_parquet(layout.table_file("layout_probe"))["run_id"].tolist() == [run_id]
    assert (layout.image_tensors / "probe.npy").read_bytes() == b"tensor"
    assert (layout.image_embeddings / "probe.npy").read_bytes() == b"embedding"
    assert (layout.checkpoints("probe", "k1") / "last.keras").exists()
    assert layout.model_package("probe", "k1").is_dir()
    assert layout.mlflow_db.is_file()
    run = mlflow.MlflowClient(layout.mlflow_uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    # Recorded relative to the store's folder (scin_mlflow_store), resolved under the root that reads it.
    from scin_mlflow_store import SCHEME, resolve

    assert run.info.artifact_uri.startswith(f"{SCHEME}:")
    assert layout.mlflow_artifacts in resolve(run.info.artifact_uri, layout.mlflow_uri).parents
    assert list(layout.mlflow_artifacts.rglob("probe.txt"))


def test_without_run_config_everything_goes_to_the_built_data_root(tmp_path, monkeypatch):
    from scin_pipeline.definitions import build_resources

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = materialize(
        [layout_probe],
        instance=DagsterInstance.ephemeral(),
        resources=build_resources(data_root=str(tmp_path / "built"), source="gcs"),
    )
    assert result.success
    layout = DataRootLayout.of(tmp_path / "built")
    assert layout.table_file("layout_probe").is_file() and layout.mlflow_db.is_file()
    assert (layout.image_tensors / "probe.npy").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built"]


def test_only_storage_has_a_data_root_setting():
    """The Launchpad shows one data_root: the IO manager and MLflow take the storage resource itself."""
    from scin_pipeline.definitions import defs

    resources = defs.resolve_job_def("full_pipeline").resource_defs

    def fields(key: str) -> set[str]:
        return set(resources[key].config_schema.config_type.fields)

    assert "data_root" in fields("storage")
    assert "data_root" not in fields("io_manager") and "data_root" not in fields("mlflow")
    assert "tracking_uri" in fields("mlflow")
