"""The storage layout resource and the Parquet IO manager: atomic writes, swept leftovers, and local
filesystem errors that fail a step at once instead of being retried."""

from __future__ import annotations

import os

import pandas as pd
import pytest
from dagster import DagsterInstance, RetryPolicy, asset, materialize

from scin_pipeline.core.atomic import TMP_PREFIX, writer_namespace
from scin_pipeline.resources.storage import ParquetTableIOManager, StoragePaths, write_parquet_atomic

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
        resources={"io_manager": ParquetTableIOManager(data_root=str(tmp_path))},
    )
    assert not result.success
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert retries == []
    [failure] = result.get_step_failure_events()
    assert failure.step_failure_data.user_failure_data.description == (
        f"storing retried_table: {tmp_path / 'tables'} is a file, not a folder (a local filesystem error: not retried)"
    )
