"""fetch_images: verified, resumable, parallel downloads, against the GCS emulator, a mirror and fakes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from scin_pipeline.core.fetch import TMP_PREFIX, VERIFIED_MANIFEST, FetchRequest, fetch_images
from scin_pipeline.core.sources import (
    GcsBucketSource,
    LocalMirrorSource,
    ObjectInfo,
    TransientSourceError,
    crc32c_b64,
)
from scin_pipeline_tests.core.test_sources import IMAGES, md5_b64, png_bytes, upload_release


def request_for(path: str) -> FetchRequest:
    return FetchRequest(image_id=path.rsplit("/", 1)[1][: -len(".png")], object_path=path)


def all_requests() -> list[FetchRequest]:
    return [request_for(path) for path in IMAGES]


def tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(TMP_PREFIX)]


def run(source, requests, tmp_path: Path, **kwargs):
    kwargs.setdefault("backoff_s", 0)
    return fetch_images(source, requests, tmp_path / "images", quarantine_dir=tmp_path / "quarantine", **kwargs)


class RecordingSource:
    """Wraps a source and records every path handed to download_to."""

    def __init__(self, inner):
        self.inner = inner
        self.uri = inner.uri
        self.downloaded: list[str] = []

    def list(self, prefix):
        return self.inner.list(prefix)

    def download_to(self, path, dest):
        self.downloaded.append(path)
        return self.inner.download_to(path, dest)


class ScriptedSource:
    """A source whose downloads follow a script: an exception to raise, or bytes to write."""

    uri = "fake://scripted"

    def __init__(self, objects: dict[str, bytes], script: list, *, partial_write: bytes = b""):
        self.objects = objects
        self.script = list(script)
        self.partial_write = partial_write
        self.calls = 0

    def list(self, prefix):
        return {
            path: ObjectInfo(path, len(data), crc32c_b64(data), md5_b64(data), "1")
            for path, data in self.objects.items()
            if path.startswith(prefix)
        }

    def download_to(self, path, dest):
        self.calls += 1
        step = self.script.pop(0) if self.script else "serve"
        if isinstance(step, BaseException):
            Path(dest).write_bytes(self.partial_write)  # a failure after some bytes hit the disk
            raise step
        data = step if isinstance(step, bytes) else self.objects[path]
        Path(dest).write_bytes(data)
        return ObjectInfo(path, len(data), None, None, "1")


# ---- GCS emulator ---------------------------------------------------------------------------------


def test_fetch_writes_verified_copies(gcs_emulator, tmp_path):
    upload_release(gcs_emulator)
    results = run(GcsBucketSource(), all_requests(), tmp_path, workers=4)

    assert [r.object_path for r in results] == list(IMAGES)
    for result in results:
        data = IMAGES[result.object_path]
        assert (result.status, result.fetched, result.attempts, result.reason) == ("ok", True, 1, None)
        assert result.local_path == str(tmp_path / "images" / f"{result.image_id}.png")
        assert Path(result.local_path).read_bytes() == data
        assert (result.bytes, result.crc32c) == (len(data), crc32c_b64(data))
    assert tmp_files(tmp_path) == []
    assert not (tmp_path / "quarantine").exists()


def test_second_run_reuses_verified_copies_without_downloading(gcs_emulator, tmp_path):
    upload_release(gcs_emulator)
    run(GcsBucketSource(), all_requests(), tmp_path)
    downloads_after_first_run = gcs_emulator.downloads()

    again = run(GcsBucketSource(), all_requests(), tmp_path)
    assert [(r.status, r.fetched, r.attempts) for r in again] == [("ok", False, 0)] * len(IMAGES)
    assert gcs_emulator.downloads() == downloads_after_first_run


def test_a_damaged_local_copy_is_not_reused(gcs_emulator, tmp_path):
    upload_release(gcs_emulator)
    run(GcsBucketSource(), all_requests(), tmp_path)
    path = next(iter(IMAGES))
    local = tmp_path / "images" / f"{request_for(path).image_id}.png"
    damaged = bytearray(local.read_bytes())
    damaged[-1] ^= 0xFF  # same size, different bytes: only the checksum can tell
    local.write_bytes(bytes(damaged))

    again = {r.object_path: r for r in run(GcsBucketSource(), all_requests(), tmp_path)}
    assert (again[path].status, again[path].fetched) == ("ok", True)
    assert local.read_bytes() == IMAGES[path]
    assert sum(r.fetched for r in again.values()) == 1


def test_object_absent_from_listing_is_missing_and_not_requested(gcs_emulator, tmp_path):
    upload_release(gcs_emulator)
    results = run(GcsBucketSource(), [request_for("dataset/images/404.png")], tmp_path)
    assert (results[0].status, results[0].attempts) == ("missing", 0)
    assert "dataset/images/404.png" in results[0].reason and "not in source listing" in results[0].reason
    assert results[0].local_path is None
    assert gcs_emulator.downloads() == 0


def test_bytes_that_never_match_the_checksum_are_quarantined(gcs_emulator, tmp_path):
    upload_release(gcs_emulator)
    path = "dataset/images/34.png"
    served = gcs_emulator.corrupt(path)
    expected_crc = gcs_emulator.metadata(path)["crc32c"]

    results = {r.object_path: r for r in run(GcsBucketSource(), all_requests(), tmp_path, retries=2)}
    bad = results[path]
    assert (bad.status, bad.attempts, bad.local_path) == ("corrupt", 3, None)
    assert f"crc32c mismatch: expected {expected_crc} got {crc32c_b64(served)}" in bad.reason
    assert path in bad.reason
    assert gcs_emulator.downloads(path) == 3
    assert (tmp_path / "quarantine" / "34.png.corrupt").read_bytes() == served
    assert "crc32c mismatch" in (tmp_path / "quarantine" / "34.png.corrupt.reason.txt").read_text()
    assert not (tmp_path / "images" / "34.png").exists()
    assert tmp_files(tmp_path) == []
    # The other objects are unaffected.
    assert [r.status for p, r in results.items() if p != path] == ["ok"] * (len(IMAGES) - 1)


def test_a_damaged_transfer_is_retried(gcs_emulator, tmp_path):
    upload_release(gcs_emulator)
    path = "dataset/images/34.png"
    gcs_emulator.reset_next(path)  # first download: half the body, then the connection closes
    gcs_emulator.fail_next(path, status=503)  # second: 503
    [result] = run(GcsBucketSource(), [request_for(path)], tmp_path)
    assert (result.status, result.attempts) == ("ok", 3)
    assert Path(result.local_path).read_bytes() == IMAGES[path]


def test_transient_errors_past_the_last_retry_are_reported_missing(gcs_emulator, tmp_path):
    upload_release(gcs_emulator)
    path = "dataset/images/34.png"
    gcs_emulator.fail_next(path, status=503, times=3)
    [result] = run(GcsBucketSource(), [request_for(path)], tmp_path, retries=2)
    assert (result.status, result.attempts) == ("missing", 3)
    assert result.reason.startswith(f"{path}: transient error after 3 attempts")
    assert "503" in result.reason
    assert tmp_files(tmp_path) == []


@pytest.mark.parametrize("bad_path", ["dataset/images/../../etc/passwd", "/etc/passwd", "dataset/images/1.jpg"])
def test_unsafe_paths_are_rejected_and_never_opened(gcs_emulator, tmp_path, bad_path):
    upload_release(gcs_emulator)
    source = RecordingSource(GcsBucketSource())
    good = request_for("dataset/images/34.png")
    results = run(source, [FetchRequest("1", bad_path), good], tmp_path)

    assert results[0].status == "rejected" and repr(bad_path) in results[0].reason
    assert results[0].attempts == 0 and results[0].local_path is None
    assert results[1].status == "ok"
    assert source.downloaded == ["dataset/images/34.png"]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(["34.png", VERIFIED_MANIFEST])


def test_image_id_that_disagrees_with_its_path_is_rejected(tmp_path):
    source = ScriptedSource({"dataset/images/5.png": b"five"}, [])
    [result] = run(source, [FetchRequest("6", "dataset/images/5.png")], tmp_path)
    assert result.status == "rejected" and "does not match" in result.reason
    assert source.calls == 0


def test_duplicate_requests_download_once_and_keep_input_order(gcs_emulator, tmp_path):
    upload_release(gcs_emulator)
    a, b = request_for("dataset/images/34.png"), request_for("dataset/images/5678.png")
    missing = request_for("dataset/images/1.png")
    results = run(GcsBucketSource(), [a, missing, b, a, a, b], tmp_path)
    assert [r.object_path for r in results] == [x.object_path for x in [a, missing, b, a, a, b]]
    assert [r.status for r in results] == ["ok", "missing", "ok", "ok", "ok", "ok"]
    assert gcs_emulator.downloads(a.object_path) == 1 and gcs_emulator.downloads(b.object_path) == 1


def test_progress_counts_distinct_objects(gcs_emulator, tmp_path):
    upload_release(gcs_emulator)
    calls = []
    requests = all_requests() + all_requests()[:1] + [request_for("dataset/images/1.png")]
    run(GcsBucketSource(), requests, tmp_path, progress=lambda done, total: calls.append((done, total)))
    total = len(IMAGES) + 1
    assert sorted(calls) == [(i, total) for i in range(1, total + 1)]


def test_a_supplied_listing_replaces_the_list_call(gcs_emulator, tmp_path):
    upload_release(gcs_emulator)

    class NoListing(RecordingSource):
        def list(self, prefix):
            raise AssertionError("list() must not be called when a listing is given")

    source = GcsBucketSource()
    listing = source.list("dataset/images/")
    results = run(NoListing(source), all_requests(), tmp_path, listing=listing)
    assert {r.status for r in results} == {"ok"}


# ---- fakes: retries and cleanup -------------------------------------------------------------------


def test_transient_errors_are_retried_until_success(tmp_path):
    source = ScriptedSource(
        {"dataset/images/7.png": png_bytes(7)},
        [TransientSourceError("HTTP 503"), TransientSourceError("HTTP 429"), "serve"],
        partial_write=b"half",
    )
    [result] = run(source, [request_for("dataset/images/7.png")], tmp_path)
    assert (result.status, result.attempts, result.fetched) == ("ok", 3, True)
    assert Path(result.local_path).read_bytes() == png_bytes(7)
    assert tmp_files(tmp_path) == []


@pytest.mark.parametrize("error", [TransientSourceError("reset"), ConnectionResetError("reset"), RuntimeError("boom")])
def test_no_tmp_file_survives_a_failing_download(tmp_path, error):
    source = ScriptedSource({"dataset/images/7.png": png_bytes(7)}, [error] * 10, partial_write=b"partial bytes")
    [result] = run(source, [request_for("dataset/images/7.png")], tmp_path, retries=1)
    assert result.status == "missing"
    assert "dataset/images/7.png" in result.reason
    assert tmp_files(tmp_path) == []
    assert not (tmp_path / "images" / "7.png").exists()
    # Only transient errors are retried.
    assert source.calls == (1 if isinstance(error, RuntimeError) else 2)


def test_corrupt_then_good_transfer_ends_ok(tmp_path):
    data = png_bytes(3)
    source = ScriptedSource({"dataset/images/3.png": data}, [data[:-1] + b"\x00", "serve"])
    [result] = run(source, [request_for("dataset/images/3.png")], tmp_path)
    assert (result.status, result.attempts) == ("ok", 2)
    assert not (tmp_path / "quarantine").exists()


def test_md5_is_used_when_the_listing_has_no_crc32c(tmp_path):
    data = png_bytes(4)
    path = "dataset/images/4.png"
    good = {path: ObjectInfo(path, len(data), None, md5_b64(data), "1")}
    wrong = {path: ObjectInfo(path, len(data), None, md5_b64(b"other"), "1")}
    source = ScriptedSource({path: data}, [])

    [ok] = run(source, [request_for(path)], tmp_path / "a", listing=good)
    [bad] = run(source, [request_for(path)], tmp_path / "b", listing=wrong, retries=0)
    assert ok.status == "ok"
    assert bad.status == "corrupt" and bad.reason.startswith(f"{path}: md5 mismatch: expected {md5_b64(b'other')}")


def test_orphaned_tmp_files_of_dead_processes_are_removed(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    orphan = images / f"{TMP_PREFIX}4194399-7-abc.png"  # above Linux's pid_max: no such process
    live = images / f"{TMP_PREFIX}{os.getpid()}-7-abc.png"
    orphan.write_bytes(b"x")
    live.write_bytes(b"x")
    run(ScriptedSource({}, []), [], tmp_path)
    assert not orphan.exists() and live.exists()


# ---- local mirror ---------------------------------------------------------------------------------


def make_plain_mirror(root: Path) -> Path:
    (root / "dataset" / "images").mkdir(parents=True)
    for path, data in IMAGES.items():
        (root / path).write_bytes(data)
    return root


def test_mirror_without_checksums_resumes_from_the_verified_records(tmp_path):
    root = make_plain_mirror(tmp_path / "mirror")
    first = run(LocalMirrorSource(root), all_requests(), tmp_path)
    assert {(r.status, r.fetched) for r in first} == {("ok", True)}
    records = json.loads((tmp_path / "images" / VERIFIED_MANIFEST).read_text())
    assert set(records) == {r.image_id for r in first}

    again = run(LocalMirrorSource(root), all_requests(), tmp_path)
    assert {(r.status, r.fetched) for r in again} == {("ok", False)}

    # A rewritten mirror file is a new generation: its copy is fetched again, the others are not.
    changed = root / "dataset/images/34.png"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    third = {r.object_path: r for r in run(LocalMirrorSource(root), all_requests(), tmp_path)}
    assert [p for p, r in third.items() if r.fetched] == ["dataset/images/34.png"]


def test_mirror_symlink_out_of_root_is_never_copied(tmp_path):
    root = make_plain_mirror(tmp_path / "mirror")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"outside the mirror")
    (root / "dataset/images/666.png").symlink_to(secret)
    source = LocalMirrorSource(root)

    [listed] = run(source, [request_for("dataset/images/666.png")], tmp_path)
    assert listed.status == "missing" and "not in source listing" in listed.reason

    # Even with a listing that names it (e.g. one taken from elsewhere), the mirror refuses to read it.
    listing = {
        "dataset/images/666.png": ObjectInfo("dataset/images/666.png", len(b"outside the mirror"), None, None, "1")
    }
    [forced] = run(source, [request_for("dataset/images/666.png")], tmp_path, listing=listing)
    assert forced.status == "rejected" and "outside the mirror root" in forced.reason
    assert not (tmp_path / "images" / "666.png").exists()
    assert tmp_files(tmp_path) == []


def test_an_interrupted_run_stops_and_leaves_no_tmp_files(tmp_path):
    objects = {f"dataset/images/{i}.png": png_bytes(i) for i in range(40)}
    source = ScriptedSource(objects, [])

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(source, [request_for(p) for p in objects], tmp_path, workers=2, progress=interrupt)
    assert source.calls < len(objects)  # the queue was dropped, not drained
    assert tmp_files(tmp_path) == []
    # What was verified before the interruption is remembered, so a re-run does not fetch it again.
    records = json.loads((tmp_path / "images" / VERIFIED_MANIFEST).read_text())
    assert records and all((tmp_path / "images" / f"{image_id}.png").is_file() for image_id in records)
