"""Verbatim copies of the release's metadata files, identified by content.

Written atomically (see :mod:`scin_pipeline.core.atomic`): a copy is whole or absent, and a killed
writer's temp file is swept by the next store into the same folder.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from scin_pipeline.core.atomic import remove_orphaned_temp_files, write_bytes_atomic


@dataclass(frozen=True)
class RawFile:
    object_path: str
    file_name: str
    local_path: str
    bytes: int
    sha256: str
    crc32c: str | None
    md5: str | None
    generation: str | None
    updated: str | None
    releases: tuple[str, ...]


def releases_in_csv(data: bytes) -> tuple[str, ...]:
    """Distinct values of the ``release`` column (empty when the file has none); tolerant of bad rows,
    since the strict parse (with its named errors) happens in ``cases``."""
    text = data.decode("utf-8-sig", errors="replace")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or "release" not in reader.fieldnames:
        return ()
    try:
        return tuple(sorted({(row.get("release") or "").strip() for row in reader} - {""}))
    except csv.Error:
        return ()


def store_verbatim(data: bytes, file_name: str, raw_dir: Path) -> tuple[Path, str]:
    """Store bytes at raw_dir/<sha256>/<file_name> (atomic, idempotent); return the path and digest."""
    digest = hashlib.sha256(data).hexdigest()
    if Path(file_name).name != file_name or file_name in ("", ".", ".."):
        raise ValueError(f"not a plain file name: {file_name!r}")
    target = raw_dir / digest / file_name
    if not target.exists() or hashlib.sha256(target.read_bytes()).hexdigest() != digest:
        write_bytes_atomic(data, target)  # sweeps dead writers' temp files first
    else:
        remove_orphaned_temp_files(target.parent)  # the copy is whole, but a killed rewrite may have left one
    return target, digest
