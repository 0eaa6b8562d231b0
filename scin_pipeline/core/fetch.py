"""Verified, resumable, parallel image downloads from a :class:`~scin_pipeline.core.sources.ScinSource`.

A local copy is trusted only after its size and checksum match the source listing. Downloads go to a
``.tmp-`` file in the destination folder (named, and swept when its writer died, by
:mod:`scin_pipeline.core.atomic`) and are renamed into place only once verified, so the
destination never holds a partial or unverified ``<image_id>.png``. Bytes that keep failing
verification are moved to a quarantine folder with the reason beside them.

Expected sizes and checksums come from one listing of ``dataset/images/`` (about 10 requests for the
whole release) rather than one metadata request per image.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import stat as stat_module
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

from scin_pipeline.core.atomic import TMP_PREFIX, atomic_target, remove_orphaned_temp_files, write_text_atomic
from scin_pipeline.core.paths import IMAGE_PREFIX, UnsafeObjectPath, image_id_from_path
from scin_pipeline.core.sources import (
    ObjectInfo,
    ObjectMissing,
    ScinSource,
    SourceAccessDenied,
    TransientSourceError,
    describe_mismatch,
    file_checksums,
)

logger = logging.getLogger(__name__)

# Per-file records of verified fetches; lets a source without checksums (a plain mirror) resume.
VERIFIED_MANIFEST = ".verified.json"
_MAX_BACKOFF_S = 30.0
_TRANSIENT_ERRORS = (TransientSourceError, ConnectionError, TimeoutError)


@dataclass(frozen=True)
class FetchRequest:
    image_id: str
    object_path: str


@dataclass
class FetchResult:
    image_id: str
    object_path: str
    local_path: str | None  # the verified copy; None unless status == "ok"
    bytes: int | None  # size of the verified copy
    crc32c: str | None  # CRC32C (GCS base64 form) of the verified copy
    status: str  # "ok" | "missing" | "corrupt" | "rejected"
    reason: str | None  # human readable, names the object
    fetched: bool  # False when an already verified local copy was reused (resume)
    attempts: int  # download attempts made (0 when nothing was downloaded)


def fetch_images(
    source,
    requests: Iterable[FetchRequest],
    dest_dir: Path,
    *,
    quarantine_dir: Path,
    workers: int = 16,
    retries: int = 4,
    backoff_s: float = 0.5,
    listing: dict[str, ObjectInfo] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[FetchResult]:
    """Fetch every requested image into ``dest_dir/<image_id>.png``, verified; one result per request.

    ``retries`` is the number of extra attempts after the first (so at most ``1 + retries`` downloads
    per object) for transient errors and for bytes that fail verification. Requests naming the same
    object path are fetched once and share the outcome. ``progress(done, total)`` is called from the
    calling thread as each distinct object finishes. The run goes on whatever one object does; only a
    failure to list the source (no expectations at all) raises.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    dest_dir = Path(dest_dir)
    quarantine_dir = Path(quarantine_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temp_files(dest_dir)

    request_list = list(requests)
    # Validate first: a path that fails the rule is never joined onto anything or sent anywhere.
    outcomes: dict[str, FetchResult] = {}  # object_path -> result, filled as jobs finish
    jobs: dict[str, str] = {}  # object_path -> validated image id, in first-seen order
    early: list[FetchResult | None] = []
    for request in request_list:
        verdict = _validate(request)
        if isinstance(verdict, FetchResult):
            early.append(verdict)
        else:
            early.append(None)
            jobs.setdefault(request.object_path, verdict)

    if jobs and listing is None:
        listing = source.list(IMAGE_PREFIX)
    listing = listing or {}

    state = _RunState(
        source=source,
        dest_dir=dest_dir,
        quarantine_dir=quarantine_dir,
        retries=retries,
        backoff_s=backoff_s,
        verified=_load_verified(dest_dir),
    )
    total = len(jobs)
    done = 0
    try:
        to_download: list[tuple[str, str, ObjectInfo]] = []
        for object_path, image_id in jobs.items():
            expected = listing.get(object_path)
            if expected is None:
                outcomes[object_path] = _result(
                    image_id, object_path, "missing", f"{object_path}: not in source listing", attempts=0
                )
                done += 1
                if progress:
                    progress(done, total)
            else:
                to_download.append((object_path, image_id, expected))

        if to_download:
            # The pool bounds work in flight: at most `workers` objects are being read or written at
            # once, each streamed to disk, so memory does not grow with the number of images.
            pool = ThreadPoolExecutor(max_workers=min(workers, len(to_download)), thread_name_prefix="fetch")
            try:
                futures = {
                    pool.submit(state.fetch_one, image_id, object_path, expected): object_path
                    for object_path, image_id, expected in to_download
                }
                for future in as_completed(futures):
                    object_path = futures[future]
                    outcomes[object_path] = future.result()  # fetch_one never raises
                    done += 1
                    if progress:
                        progress(done, total)
            except BaseException:
                # Interrupted (Ctrl-C, a failing progress callback): drop the queue, let running
                # downloads finish their cleanup, and keep the records of what was verified.
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
    finally:
        state.save_verified()

    results: list[FetchResult] = []
    for request, verdict in zip(request_list, early, strict=True):
        results.append(verdict if verdict is not None else replace(outcomes[request.object_path]))
    return results


# --------------------------------------------------------------------------------------------------


class _Unfetched(Exception):
    """Raised out of one download attempt: ``result`` is the outcome to report, None to try again."""

    def __init__(self, result: FetchResult | None):
        super().__init__(result.reason if result is not None else "retry")
        self.result = result


def _result(image_id: str, object_path: str, status: str, reason: str | None, *, attempts: int) -> FetchResult:
    return FetchResult(image_id, object_path, None, None, None, status, reason, fetched=False, attempts=attempts)


def _validate(request: FetchRequest) -> str | FetchResult:
    """The validated image id, or a "rejected" result saying why."""
    try:
        image_id = image_id_from_path(request.object_path)
    except UnsafeObjectPath as exc:
        return _result(str(request.image_id), str(request.object_path), "rejected", str(exc), attempts=0)
    if str(request.image_id) != image_id:
        return _result(
            str(request.image_id),
            request.object_path,
            "rejected",
            f"image id {request.image_id!r} does not match object path {request.object_path!r}",
            attempts=0,
        )
    return image_id


def _load_verified(dest_dir: Path) -> dict[str, dict]:
    path = dest_dir / VERIFIED_MANIFEST
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return {}
    return raw if isinstance(raw, dict) else {}


@dataclass
class _RunState:
    source: ScinSource
    dest_dir: Path
    quarantine_dir: Path
    retries: int
    backoff_s: float
    verified: dict[str, dict]

    def __post_init__(self):
        self._lock = threading.Lock()
        self._dirty = False

    # ---- verified-copy records ---------------------------------------------------------------------

    def record(self, image_id: str, expected: ObjectInfo, size: int, crc32c: str) -> None:
        with self._lock:
            self.verified[image_id] = {
                "object_path": expected.path,
                "size": size,
                "crc32c": crc32c,
                "generation": expected.generation,
            }
            self._dirty = True

    def forget(self, image_id: str) -> None:
        with self._lock:
            if self.verified.pop(image_id, None) is not None:
                self._dirty = True

    def save_verified(self) -> None:
        if not self._dirty:
            return
        write_text_atomic(json.dumps(self.verified, indent=0, sort_keys=True), self.dest_dir / VERIFIED_MANIFEST)

    # ---- one object --------------------------------------------------------------------------------

    def _verified_local(self, image_id: str, final: Path, expected: ObjectInfo) -> tuple[int, str] | None:
        """(size, crc32c) of an existing local copy that still matches the source, else None."""
        try:
            st = os.lstat(final)
        except FileNotFoundError:
            return None
        if not stat_module.S_ISREG(st.st_mode) or st.st_size != expected.size:
            return None  # a symlink, folder or wrong-sized file is never reused
        size, crc, md5 = file_checksums(final, md5=expected.crc32c is None and expected.md5 is not None)
        if expected.crc32c is not None or expected.md5 is not None:
            return (size, crc) if describe_mismatch(expected, size, crc, md5) is None else None
        # No checksum in the source: trust the copy only if we verified it from this very object
        # (same size and generation) and it still hashes to what we wrote then.
        record = self.verified.get(image_id) or {}
        if (
            record.get("object_path") == expected.path
            and record.get("size") == size
            and record.get("generation") == expected.generation
            and record.get("crc32c") == crc
        ):
            return size, crc
        return None

    def fetch_one(self, image_id: str, object_path: str, expected: ObjectInfo) -> FetchResult:
        try:
            return self._fetch_one(image_id, object_path, expected)
        except Exception as exc:  # the run goes on whatever one object does
            logger.exception("unexpected error fetching %s", object_path)
            return _result(
                image_id,
                object_path,
                "missing",
                f"{object_path}: unexpected error: {type(exc).__name__}: {exc}",
                attempts=0,
            )

    def _fetch_one(self, image_id: str, object_path: str, expected: ObjectInfo) -> FetchResult:
        final = self.dest_dir / f"{image_id}.png"
        local = self._verified_local(image_id, final, expected)
        if local is not None:
            return FetchResult(
                image_id, object_path, str(final), local[0], local[1], "ok", None, fetched=False, attempts=0
            )
        if os.path.lexists(final):
            # An unverifiable copy must not sit where downstream code expects verified images.
            final.unlink()
            self.forget(image_id)

        max_attempts = 1 + self.retries
        for attempt in range(1, max_attempts + 1):
            try:
                # The download becomes <image_id>.png only when this block ends normally (verified); an
                # attempt that fails raises _Unfetched out of it and the temp file goes. fetch_images swept
                # dest_dir once: sweeping a folder of thousands of images per download would cost O(n^2).
                with atomic_target(final, label=image_id, sweep=False) as tmp:
                    size, crc = self._download_verified(tmp, image_id, object_path, expected, attempt, max_attempts)
            except _Unfetched as unfetched:
                if unfetched.result is not None:
                    return unfetched.result
                self._sleep_before_retry(attempt)
                continue
            self.record(image_id, expected, size, crc)
            return FetchResult(image_id, object_path, str(final), size, crc, "ok", None, fetched=True, attempts=attempt)
        raise AssertionError("unreachable: the loop returns on its last attempt")

    def _download_verified(
        self, tmp: Path, image_id: str, object_path: str, expected: ObjectInfo, attempt: int, max_attempts: int
    ) -> tuple[int, str]:
        """Download into ``tmp`` and verify it: (size, crc32c), or raise _Unfetched (the result to give,
        or None to try again)."""
        try:
            served = self.source.download_to(object_path, tmp)
        except ObjectMissing as exc:
            # Listed a moment ago, gone now: nothing to retry.
            raise _Unfetched(
                _result(image_id, object_path, "missing", f"{object_path}: {exc}", attempts=attempt)
            ) from exc
        except UnsafeObjectPath as exc:
            raise _Unfetched(_result(image_id, object_path, "rejected", str(exc), attempts=attempt)) from exc
        except SourceAccessDenied as exc:
            # A ConnectionError by kind, but a retry presents the same identity: not transient.
            raise _Unfetched(_result(image_id, object_path, "missing", str(exc), attempts=attempt)) from exc
        except _TRANSIENT_ERRORS as exc:
            if attempt == max_attempts:
                raise _Unfetched(
                    _result(
                        image_id,
                        object_path,
                        "missing",
                        f"{object_path}: transient error after {attempt} attempts: {type(exc).__name__}: {exc}",
                        attempts=attempt,
                    )
                ) from exc
            raise _Unfetched(None) from exc
        except Exception as exc:
            # Not known to be transient (e.g. HTTP 400, a local disk error): retrying will not help.
            raise _Unfetched(
                _result(
                    image_id,
                    object_path,
                    "missing",
                    f"{object_path}: download failed: {type(exc).__name__}: {exc}",
                    attempts=attempt,
                )
            ) from exc

        need_md5 = expected.crc32c is None and expected.md5 is not None
        size, crc, md5 = file_checksums(tmp, md5=need_md5)
        mismatch = describe_mismatch(expected, size, crc, md5)
        if mismatch is None:
            return size, crc
        served_generation = getattr(served, "generation", None)
        if served_generation and expected.generation and served_generation != expected.generation:
            mismatch += (
                f"; served generation {served_generation}, listed {expected.generation} (object changed since listing?)"
            )
        if attempt == max_attempts:
            where = self._quarantine(tmp, image_id, object_path, mismatch, attempt)
            raise _Unfetched(
                _result(
                    image_id,
                    object_path,
                    "corrupt",
                    f"{object_path}: {mismatch}; quarantined as {where}",
                    attempts=attempt,
                )
            )
        logger.warning("%s: %s (attempt %d of %d, retrying)", object_path, mismatch, attempt, max_attempts)
        raise _Unfetched(None)

    def _sleep_before_retry(self, attempt: int) -> None:
        # Exponential backoff with full jitter, so parallel workers hitting the same throttle spread out.
        ceiling = min(_MAX_BACKOFF_S, self.backoff_s * (2 ** (attempt - 1)))
        if ceiling > 0:
            time.sleep(random.uniform(0, ceiling))

    def _quarantine(self, tmp: Path, image_id: str, object_path: str, reason: str, attempts: int) -> Path:
        target = self.quarantine_dir / f"{image_id}.png.corrupt"
        with atomic_target(target) as quarantined:
            shutil.move(str(tmp), str(quarantined))  # move, not rename: quarantine may be on another filesystem
        write_text_atomic(
            f"object: {object_path}\nsource: {getattr(self.source, 'uri', self.source)}\n"
            f"attempts: {attempts}\nreason: {reason}\n",
            self.quarantine_dir / f"{image_id}.png.corrupt.reason.txt",
        )
        return target


__all__ = ["FetchRequest", "FetchResult", "TMP_PREFIX", "VERIFIED_MANIFEST", "fetch_images"]
