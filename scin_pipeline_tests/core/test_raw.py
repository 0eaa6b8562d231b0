"""Verbatim, content-addressed copies of the metadata files."""

from __future__ import annotations

import hashlib

import pytest

from scin_pipeline.core.atomic import TMP_PREFIX, writer_namespace
from scin_pipeline.core.raw import releases_in_csv, store_verbatim

DATA = b"case_id,release\n1,SCIN-2024\n2,SCIN-2024\n"
DEAD_PID = 4194399  # above Linux's largest pid_max: no such process


def test_a_copy_is_stored_under_its_digest_once(tmp_path):
    path, digest = store_verbatim(DATA, "scin_cases.csv", tmp_path)
    assert digest == hashlib.sha256(DATA).hexdigest()
    assert path == tmp_path / digest / "scin_cases.csv" and path.read_bytes() == DATA
    mtime = path.stat().st_mtime_ns
    assert store_verbatim(DATA, "scin_cases.csv", tmp_path) == (path, digest)
    assert path.stat().st_mtime_ns == mtime  # an intact copy is not rewritten


def test_a_damaged_copy_is_rewritten(tmp_path):
    path, _ = store_verbatim(DATA, "scin_cases.csv", tmp_path)
    path.write_bytes(b"truncat")
    store_verbatim(DATA, "scin_cases.csv", tmp_path)
    assert path.read_bytes() == DATA


@pytest.mark.parametrize("intact_copy", [False, True])
def test_a_killed_writers_temp_file_is_swept_by_the_next_store(tmp_path, intact_copy):
    folder = tmp_path / hashlib.sha256(DATA).hexdigest()
    if intact_copy:
        store_verbatim(DATA, "scin_cases.csv", tmp_path)
    folder.mkdir(exist_ok=True)
    orphan = folder / f"{TMP_PREFIX}{DEAD_PID}@{writer_namespace()}-abc.csv"
    orphan.write_bytes(DATA[:5])
    path, _ = store_verbatim(DATA, "scin_cases.csv", tmp_path)
    assert path.read_bytes() == DATA
    assert sorted(p.name for p in folder.iterdir()) == ["scin_cases.csv"]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b.csv"])
def test_a_file_name_with_a_folder_in_it_is_refused(tmp_path, name):
    with pytest.raises(ValueError, match="not a plain file name"):
        store_verbatim(DATA, name, tmp_path)


def test_releases_are_read_tolerantly():
    assert releases_in_csv(DATA) == ("SCIN-2024",)
    assert releases_in_csv(b"case_id\n1\n") == ()
