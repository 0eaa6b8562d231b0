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
    atomic_directory,
    atomic_target,
    describe_os_error,
    remove_orphaned_temp_files,
    temp_path,
    unfixable_os_error,
    write_bytes_atomic,
    write_text_atomic,
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


def test_atomic_target_takes_a_suffix_and_can_skip_the_sweep(tmp_path):
    dead = tmp_path / f"{TMP_PREFIX}{DEAD_PID}@{writer_namespace()}-abc.bin"
    dead.write_bytes(b"x")
    with atomic_target(tmp_path / "w.weights.h5", suffix=".weights.h5", sweep=False) as tmp:
        assert tmp.name.endswith(".weights.h5") and tmp.parent == tmp_path
        tmp.write_bytes(b"weights")
    assert (tmp_path / "w.weights.h5").read_bytes() == b"weights"
    assert dead.exists()  # not swept
    write_text_atomic("swept", tmp_path / "other.txt")
    assert not dead.exists()


# ------------------------------------------------------------------------------------------- folders


def make_folder(path: Path, files: dict[str, bytes]) -> None:
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)


def folder_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_a_folder_write_replaces_the_old_folder_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "models" / "package"
    make_folder(target, {"model.keras": b"old", "stale.txt": b"only in the old one"})
    with atomic_directory(target) as tmp:
        assert tmp.is_dir() and tmp.parent == target.parent and tmp.name.startswith(TMP_PREFIX)
        (tmp / "model.keras").write_bytes(b"new")
        (tmp / "spec.json").write_bytes(b"{}")
        # until the block ends, readers see the old folder, untouched
        assert folder_files(target) == {"model.keras": b"old", "stale.txt": b"only in the old one"}
    assert folder_files(target) == {"model.keras": b"new", "spec.json": b"{}"}
    assert temp_files(target.parent) == []


def test_a_folder_write_creates_a_missing_target(tmp_path):
    target = tmp_path / "a" / "b"
    with atomic_directory(target, label="pkg") as tmp:
        (tmp / "x").write_bytes(b"1")
    assert folder_files(target) == {"x": b"1"}
    assert temp_files(target.parent) == []


def test_a_failed_folder_write_keeps_the_old_folder_and_leaves_no_temp(tmp_path):
    target = tmp_path / "package"
    make_folder(target, {"model.keras": b"old"})
    with pytest.raises(RuntimeError, match="synthetic failure"), atomic_directory(target) as tmp:
        (tmp / "model.keras").write_bytes(b"half")
        raise RuntimeError("synthetic failure")
    assert folder_files(target) == {"model.keras": b"old"}
    assert temp_files(tmp_path) == []


def test_a_failed_rename_into_place_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "package"
    make_folder(target, {"model.keras": b"old"})
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == target and Path(src).name.startswith(TMP_PREFIX) and "-old-" not in Path(src).name:
            raise OSError(errno.EXDEV, "synthetic rename failure", str(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="synthetic rename failure"), atomic_directory(target) as tmp:
        (tmp / "model.keras").write_bytes(b"new")
    assert folder_files(target) == {"model.keras": b"old"}
    assert temp_files(tmp_path) == []


KILLED_FOLDER_WRITER = """
import sys, time
from pathlib import Path
from scin_pipeline.core.atomic import atomic_directory
with atomic_directory(Path(sys.argv[1])) as tmp:
    (tmp / "model.keras").write_bytes(b"half")
    print(tmp, flush=True)
    time.sleep(60)
"""


def test_a_folder_write_killed_mid_way_leaves_the_old_folder_and_its_orphan_is_swept(tmp_path):
    target = tmp_path / "package"
    make_folder(target, {"model.keras": b"old"})
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_FOLDER_WRITER, str(target)], stdout=subprocess.PIPE, text=True
    )
    try:
        orphan = Path(writer.stdout.readline().strip())
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert orphan.is_dir() and (orphan / "model.keras").read_bytes() == b"half"
    assert folder_files(target) == {"model.keras": b"old"}  # the old folder was never touched

    with atomic_directory(target) as tmp:
        (tmp / "model.keras").write_bytes(b"whole")

    assert not orphan.exists()  # a dead writer's folder is swept like a file
    assert folder_files(target) == {"model.keras": b"whole"}
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
