"""Atomic writes, the sweep of killed writers' temp files, and the meaning of local filesystem errors."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scin_pipeline.core.atomic import (
    STALE_FOREIGN_TEMP_S,
    TMP_PREFIX,
    atomic_target,
    describe_os_error,
    remove_orphaned_temp_files,
    temp_path,
    unfixable_os_error,
    write_bytes_atomic,
    writer_namespace,
)

DEAD_PID = 4194399  # above Linux's largest pid_max: no such process


def temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{TMP_PREFIX}*"))


def test_temp_names_carry_the_pid_and_the_writer_namespace(tmp_path):
    path = temp_path(tmp_path, suffix=".png", label="-123")
    assert path.parent == tmp_path
    assert path.name.startswith(f"{TMP_PREFIX}{os.getpid()}@{writer_namespace()}--123-")
    assert path.name.endswith(".png")
    assert temp_path(tmp_path) != temp_path(tmp_path)


def test_a_write_replaces_the_target_whole_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    write_bytes_atomic(b"first", target)
    write_bytes_atomic(b"second", target)
    assert target.read_bytes() == b"second"
    assert temp_files(target.parent) == []


def test_a_failed_write_keeps_the_old_target_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="synthetic failure"), atomic_target(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("synthetic failure")
    assert target.read_bytes() == b"old"
    assert temp_files(tmp_path) == []


def test_the_sweep_removes_dead_writers_files_only(tmp_path):
    mine = writer_namespace()
    dead = tmp_path / f"{TMP_PREFIX}{DEAD_PID}@{mine}-abc.parquet"
    dead_old_style = tmp_path / f"{TMP_PREFIX}{DEAD_PID}-7-abc.png"  # fetch's former names: pid only
    live = tmp_path / f"{TMP_PREFIX}{os.getpid()}@{mine}-abc.parquet"
    foreign_fresh = tmp_path / f"{TMP_PREFIX}{DEAD_PID}@00000000-abc.parquet"  # another host: pid unknowable
    foreign_stale = tmp_path / f"{TMP_PREFIX}{DEAD_PID}@00000000-def.parquet"
    not_ours = tmp_path / f"{TMP_PREFIX}k3j4l5.parquet"  # no pid: someone else's naming
    for path in (dead, dead_old_style, live, foreign_fresh, foreign_stale, not_ours):
        path.write_bytes(b"x")
    long_ago = time.time() - STALE_FOREIGN_TEMP_S - 60
    os.utime(foreign_stale, (long_ago, long_ago))

    removed = remove_orphaned_temp_files(tmp_path)

    assert sorted(removed) == sorted([dead, dead_old_style, foreign_stale])
    assert temp_files(tmp_path) == sorted([live, foreign_fresh, not_ours])


KILLED_WRITER = """
import sys, time
from pathlib import Path
from scin_pipeline.core.atomic import atomic_target
with atomic_target(Path(sys.argv[1])) as tmp:
    tmp.write_bytes(b"half")
    print(tmp, flush=True)
    time.sleep(60)
"""


def test_a_sigkilled_writers_temp_file_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "table.parquet"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        orphan = Path(writer.stdout.readline().strip())
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert orphan.exists() and not target.exists()  # the killed writer could not clean up

    write_bytes_atomic(b"whole", target)

    assert not orphan.exists()
    assert target.read_bytes() == b"whole"
    assert temp_files(tmp_path) == []


def test_a_file_where_a_folder_must_be_is_named(tmp_path):
    blocker = tmp_path / "tables"
    blocker.write_text("not a folder")
    with pytest.raises(OSError) as directly:
        write_bytes_atomic(b"x", blocker / "a.parquet")
    with pytest.raises(OSError) as below:
        write_bytes_atomic(b"x", blocker / "deeper" / "a.parquet")
    for caught in (directly, below):
        assert unfixable_os_error(caught.value) is caught.value
        assert describe_os_error(caught.value) == f"{blocker} is a file, not a folder"


def test_unfixable_errors_are_found_through_explicit_causes_only():
    cause = PermissionError(errno.EACCES, "Permission denied", "/data/raw")
    try:
        try:
            raise cause
        except OSError as exc:
            raise RuntimeError("cannot create /data/raw") from exc
    except RuntimeError as wrapped:
        assert unfixable_os_error(wrapped) is cause
        assert describe_os_error(cause) == "permission denied on /data/raw"
    assert unfixable_os_error(ConnectionResetError(errno.ECONNRESET, "reset")) is None
    assert unfixable_os_error(OSError(errno.ENOSPC, "No space left on device")) is None
    assert unfixable_os_error(ValueError("bad")) is None
