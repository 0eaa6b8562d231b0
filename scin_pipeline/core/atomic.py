"""Atomic writes into local folders, the sweep of what killed writers left behind, and which local
filesystem errors no retry can fix.

A writer writes to a temporary file beside its target and renames it into place (a rename within one
folder is atomic on POSIX), so a reader sees the old file or the new one, never half of one. The temp
name starts with a dot (pandas/pyarrow skip dot-files when they read a folder of Parquet files) and says
who wrote it: ``.tmp-<pid>@<writer>-[<label>-]<random><suffix>``.

A folder is written the same way (:func:`atomic_directory`): filled under a temp name beside its target,
then swapped in; the folder it replaces is moved aside, not deleted, until the new one is in place.

A SIGKILLed writer cannot clean up, so every write first sweeps its folder of temp files whose writer
is dead. The pid alone is not enough to tell: the data root may be shared by several machines or
containers (one pod per step on a ReadWriteMany volume in Kubernetes), where a pid of another pid
namespace means nothing here. ``<writer>`` is a short hash of the host name and the pid namespace; a
temp file of this writer-namespace is removed when its pid is not alive, one of another namespace only
when untouched for :data:`STALE_FOREIGN_TEMP_S` (no write stalls that long). Names of the older form
``.tmp-<pid>-...`` (no ``@``) are judged by the pid alone, as before; names without a pid are not ours
and are left alone.

Written here rather than taken from a library: the candidates (``atomicwrites``, unmaintained;
``tempfile.mkstemp``) name temp files at random, which is exactly what makes a killed writer's file
impossible to tell from a live one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

TMP_PREFIX = ".tmp-"
# A temp file of another host/pid namespace is removed only after this long without a write.
STALE_FOREIGN_TEMP_S = 24 * 3600.0

# Local filesystem errors that retrying the same operation cannot fix: a permission, a file where a
# folder must be (or the reverse), a read-only mount, a bad name.
UNFIXABLE_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP}
)


@lru_cache(maxsize=1)
def writer_namespace() -> str:
    """8 hex digits naming this host and pid namespace (the space in which our pids mean something)."""
    try:
        pid_namespace = os.readlink("/proc/self/ns/pid")
    except OSError:  # no /proc (macOS) or not allowed: the host name alone
        pid_namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}|{pid_namespace}".encode()).hexdigest()[:8]


def temp_path(folder: Path, *, suffix: str = "", label: str = "") -> Path:
    """A fresh temp file path in ``folder`` carrying this process's pid and writer namespace."""
    middle = f"{label}-" if label else ""
    return Path(folder) / f"{TMP_PREFIX}{os.getpid()}@{writer_namespace()}-{middle}{uuid.uuid4().hex[:12]}{suffix}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OverflowError:  # not a pid at all
        return False
    return True


def _is_orphan(path: Path, now: float) -> bool:
    head = path.name[len(TMP_PREFIX) :].split("-", 1)[0]
    pid_text, _, namespace = head.partition("@")
    if not pid_text.isdigit():
        return False  # not written by this module: not ours to judge
    if not namespace or namespace == writer_namespace():
        return int(pid_text) != os.getpid() and not pid_alive(int(pid_text))
    try:
        return now - path.lstat().st_mtime > STALE_FOREIGN_TEMP_S
    except FileNotFoundError:
        return False


def _remove(path: Path) -> None:
    """Delete a temp file, or a temp folder with what it holds; gone already is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_orphaned_temp_files(folder: Path) -> list[Path]:
    """Delete the temp files (and temp folders) in ``folder`` whose writer is dead; return what was removed.

    Live writers' files (this process's included) are kept; so are names this module did not make.
    """
    removed = []
    now = time.time()
    for path in Path(folder).glob(f"{TMP_PREFIX}*"):
        if _is_orphan(path, now):
            _remove(path)  # another sweeper may have been first
            removed.append(path)
    return removed


@contextmanager
def atomic_target(target: Path, *, label: str = "", suffix: str | None = None, sweep: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``target`` to write to; rename it onto ``target`` when the block ends
    normally. No temp file is left behind either way, and dead writers' ones are swept first.

    ``suffix`` (default: ``target``'s) ends the temp name, for writers that insist on one (Keras wants
    ``.weights.h5``). ``sweep=False`` skips the sweep, for a caller writing many files into a big folder
    that it swept once itself. To leave ``target`` as it was, raise out of the block.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if sweep:
        remove_orphaned_temp_files(target.parent)
    tmp = temp_path(target.parent, suffix=target.suffix if suffix is None else suffix, label=label)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(target: Path, *, label: str = "") -> Iterator[Path]:
    """Yield a new empty folder beside ``target`` to fill; it takes ``target``'s place when the block ends
    normally. Raise out of the block (or be killed in it) and ``target`` stays as it was.

    The swap is two renames: the old ``target`` (folder or file) is moved aside under a temp name, the new
    folder is renamed in, and only then is the old one deleted; if the second rename fails the old one is
    put back. A reader never sees a half-filled folder; in the instant between the two renames it sees
    none (POSIX offers no portable atomic exchange of two folders). A writer killed in that instant leaves
    ``target`` missing: callers treat a missing folder as not written yet.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temp_files(target.parent)
    tmp = temp_path(target.parent, label=label)
    tmp.mkdir()
    aside = None
    try:
        yield tmp
        if os.path.lexists(target):
            aside = temp_path(target.parent, label=f"{label}-old" if label else "old")
            os.replace(target, aside)
        try:
            os.replace(tmp, target)
        except BaseException:
            if aside is not None and not os.path.lexists(target):
                os.replace(aside, target)
                aside = None
            raise
    finally:
        _remove(tmp)
        if aside is not None:
            _remove(aside)


def write_bytes_atomic(data: bytes, target: Path) -> None:
    with atomic_target(target) as tmp, open(tmp, "xb") as handle:
        handle.write(data)


def write_text_atomic(text: str, target: Path, *, encoding: str = "utf-8") -> None:
    write_bytes_atomic(text.encode(encoding), target)


def write_parquet_atomic(frame, target: Path) -> None:
    """A pandas DataFrame as Parquet (no index): readers never see half a table."""
    with atomic_target(Path(target)) as tmp:
        frame.to_parquet(tmp, index=False)


# ---- what a local filesystem error means -------------------------------------------------------------


def unfixable_os_error(exc: BaseException | None) -> OSError | None:
    """The local filesystem error in ``exc`` or its explicit causes that no retry fixes, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in UNFIXABLE_ERRNOS:
            return exc
        exc = exc.__cause__
    return None


def _file_in_the_way(path: Path) -> Path | None:
    """The deepest existing ancestor of ``path`` (itself included) when it is not a folder."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return None if candidate.is_dir() else candidate
    return None


def describe_os_error(exc: OSError) -> str:
    """One clear phrase for a local filesystem error, naming the path."""
    path = Path(os.fsdecode(exc.filename)) if exc.filename is not None else None
    if path is not None and exc.errno in (errno.EEXIST, errno.ENOTDIR):
        blocker = _file_in_the_way(path)
        if blocker is not None:
            return f"{blocker} is a file, not a folder"
    if path is not None and exc.errno == errno.EISDIR:
        return f"{path} is a folder, not a file"
    if path is not None and exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied on {path}"
    if path is not None and exc.errno == errno.EROFS:
        return f"{path} is on a read-only file system"
    why = exc.strerror or str(exc)
    return f"{why}: {path}" if path is not None else why


__all__ = [
    "STALE_FOREIGN_TEMP_S",
    "TMP_PREFIX",
    "UNFIXABLE_ERRNOS",
    "atomic_directory",
    "atomic_target",
    "describe_os_error",
    "pid_alive",
    "remove_orphaned_temp_files",
    "temp_path",
    "unfixable_os_error",
    "write_bytes_atomic",
    "write_parquet_atomic",
    "write_text_atomic",
    "writer_namespace",
]
