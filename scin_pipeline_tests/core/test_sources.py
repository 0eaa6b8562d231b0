"""ScinSource implementations: the GCS bucket (against a local emulator) and a local mirror folder."""

from __future__ import annotations

import base64
import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scin_pipeline.core.paths import CASES_OBJECT, LABELS_OBJECT, UnsafeObjectPath
from scin_pipeline.core.sources import (
    MIRROR_MANIFEST,
    SYNTHETIC_MARKER,
    CorruptObject,
    GcsBucketSource,
    LocalMirrorSource,
    ObjectMissing,
    SourceUnreachable,
    TransientSourceError,
    crc32c_b64,
    open_source,
    write_mirror_manifest,
)
from scin_pipeline_tests.gcs_emulator import closed_loopback_port  # gcs_emulator: a fixture (conftest plugin)

CASES_CSV = b"case_id,source,release\n-1000,USER_CONTRIBUTED,SCIN\n"
LABELS_CSV = b"case_id,dermatologist_skin_condition_on_label_name\n-1000,\"['Eczema']\"\n"
UNSAFE_PATHS = [
    "dataset/images/../../etc/passwd",
    "/etc/passwd",
    "dataset/images/12.jpg",
    "dataset/other.csv",
    "dataset/images/./12.png",
    "",
]


def png_bytes(seed: int, side: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


IMAGES = {f"dataset/images/{image_id}.png": png_bytes(i) for i, image_id in enumerate(["-12", "34", "5678"])}


def upload_release(emulator) -> None:
    emulator.upload(CASES_OBJECT, CASES_CSV, "text/csv")
    emulator.upload(LABELS_OBJECT, LABELS_CSV, "text/csv")
    for path, data in IMAGES.items():
        emulator.upload(path, data, "image/png")


def make_mirror(root: Path) -> Path:
    (root / "dataset" / "images").mkdir(parents=True)
    (root / CASES_OBJECT).write_bytes(CASES_CSV)
    (root / LABELS_OBJECT).write_bytes(LABELS_CSV)
    for path, data in IMAGES.items():
        (root / path).write_bytes(data)
    return root


# ---- GCS ------------------------------------------------------------------------------------------


def test_gcs_list_reports_every_object_with_gcs_checksums(gcs_emulator):
    upload_release(gcs_emulator)
    source = GcsBucketSource()

    images = source.list("dataset/images/")
    assert set(images) == set(IMAGES)
    for path, data in IMAGES.items():
        info = images[path]
        assert info.path == path
        assert info.size == len(data)
        assert info.crc32c == crc32c_b64(data) == gcs_emulator.metadata(path)["crc32c"]
        assert info.md5 == md5_b64(data)
        assert info.generation == gcs_emulator.metadata(path)["generation"]
        assert info.updated is not None

    assert set(source.list("dataset/")) == set(IMAGES) | {CASES_OBJECT, LABELS_OBJECT}


def test_gcs_stat_matches_listing_and_missing_object_raises(gcs_emulator):
    upload_release(gcs_emulator)
    source = GcsBucketSource()
    path = next(iter(IMAGES))
    assert source.stat(path) == source.list("dataset/images/")[path]

    with pytest.raises(ObjectMissing) as missing:
        source.stat("dataset/images/999.png")
    assert "dataset/images/999.png" in str(missing.value)
    assert "gs://dx-scin-public-data" in str(missing.value)


def test_gcs_read_bytes_returns_verified_content(gcs_emulator):
    upload_release(gcs_emulator)
    data, info = GcsBucketSource().read_bytes(CASES_OBJECT)
    assert data == CASES_CSV
    assert info.size == len(CASES_CSV) and info.crc32c == crc32c_b64(CASES_CSV)


def test_gcs_read_bytes_detects_bytes_that_do_not_match_the_checksum(gcs_emulator):
    upload_release(gcs_emulator)
    gcs_emulator.corrupt(LABELS_OBJECT)
    with pytest.raises(CorruptObject, match="crc32c mismatch"):
        GcsBucketSource().read_bytes(LABELS_OBJECT)


def assert_refuses_unsafe_path(source, path: str, dest) -> None:
    """Every way of reaching an object refuses the path before any request or file access."""
    for call in (lambda: source.stat(path), lambda: source.read_bytes(path), lambda: source.download_to(path, dest)):
        with pytest.raises(UnsafeObjectPath):
            call()


@pytest.mark.parametrize("path", UNSAFE_PATHS)
def test_gcs_refuses_unsafe_paths_without_a_request(gcs_emulator, path, tmp_path):
    source = GcsBucketSource()
    assert_refuses_unsafe_path(source, path, tmp_path / "x")
    assert gcs_emulator.downloads() == 0
    assert not (tmp_path / "x").exists()


def test_gcs_download_to_streams_the_object(gcs_emulator, tmp_path):
    upload_release(gcs_emulator)
    path, data = next(iter(IMAGES.items()))
    info = GcsBucketSource().download_to(path, tmp_path / "copy.png")
    assert (tmp_path / "copy.png").read_bytes() == data
    assert info.size == len(data)
    assert info.crc32c == crc32c_b64(data)  # the X-Goog-Hash the server sent with the bytes


def test_gcs_download_of_absent_object_raises_object_missing(gcs_emulator, tmp_path):
    with pytest.raises(ObjectMissing, match="dataset/images/77.png"):
        GcsBucketSource().download_to("dataset/images/77.png", tmp_path / "x")


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_gcs_download_maps_retryable_statuses_to_transient(gcs_emulator, tmp_path, status):
    upload_release(gcs_emulator)
    path = next(iter(IMAGES))
    gcs_emulator.fail_next(path, status=status)
    with pytest.raises(TransientSourceError, match=str(status)):
        GcsBucketSource().download_to(path, tmp_path / "x")


def test_gcs_download_maps_a_cut_connection_to_transient(gcs_emulator, tmp_path):
    upload_release(gcs_emulator)
    path = next(iter(IMAGES))
    gcs_emulator.reset_next(path)
    with pytest.raises(TransientSourceError, match=path):
        GcsBucketSource().download_to(path, tmp_path / "x")


def test_gcs_check_reachable_passes_against_a_live_endpoint(gcs_emulator):
    GcsBucketSource().check_reachable(timeout_s=5)


def test_gcs_check_reachable_explains_a_closed_port(monkeypatch):
    port = closed_loopback_port()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    with pytest.raises(SourceUnreachable) as unreachable:
        GcsBucketSource().check_reachable(timeout_s=5)
    message = str(unreachable.value)
    assert message.startswith("cannot reach gs://dx-scin-public-data")
    assert f"127.0.0.1:{port}" in message
    assert "connection refused" in message


def test_gcs_is_synthetic_follows_the_marker_file(gcs_emulator):
    upload_release(gcs_emulator)
    source = GcsBucketSource()
    assert source.is_synthetic() is False
    gcs_emulator.upload(SYNTHETIC_MARKER, b"# synthetic\n")
    assert source.is_synthetic() is True


def test_open_source_picks_the_implementation(tmp_path):
    assert isinstance(open_source("gcs"), GcsBucketSource)
    other = open_source("gs://some-bucket/")
    assert isinstance(other, GcsBucketSource) and other.uri == "gs://some-bucket"
    mirror = open_source(str(tmp_path))
    assert isinstance(mirror, LocalMirrorSource) and mirror.uri == str(tmp_path.resolve())
    with pytest.raises(ValueError):
        open_source("gs://bucket/dataset/images")


# ---- local mirror ---------------------------------------------------------------------------------


def test_mirror_list_and_stat_without_manifest(tmp_path):
    source = LocalMirrorSource(make_mirror(tmp_path / "mirror"))
    images = source.list("dataset/images/")
    assert set(images) == set(IMAGES)
    path = next(iter(IMAGES))
    info = images[path]
    assert info.size == len(IMAGES[path])
    assert info.crc32c is None and info.md5 is None
    assert info.generation == str(os.stat(tmp_path / "mirror" / path).st_mtime_ns)
    assert source.stat(path) == info
    assert set(source.list("")) == set(IMAGES) | {CASES_OBJECT, LABELS_OBJECT}


def test_mirror_manifest_supplies_checksums_and_catches_changed_files(tmp_path):
    root = make_mirror(tmp_path / "mirror")
    write_mirror_manifest(root)
    assert (root / MIRROR_MANIFEST).is_file()
    source = LocalMirrorSource(root)
    path, data = next(iter(IMAGES.items()))
    assert source.stat(path).crc32c == crc32c_b64(data)
    assert source.stat(path).md5 == md5_b64(data)
    assert MIRROR_MANIFEST not in source.list("")

    assert source.read_bytes(CASES_OBJECT)[0] == CASES_CSV
    (root / CASES_OBJECT).write_bytes(CASES_CSV.replace(b"SCIN", b"SCAN"))
    with pytest.raises(CorruptObject, match="crc32c mismatch"):
        LocalMirrorSource(root).read_bytes(CASES_OBJECT)


def test_mirror_missing_object_names_object_and_folder(tmp_path):
    source = LocalMirrorSource(make_mirror(tmp_path / "mirror"))
    with pytest.raises(ObjectMissing) as missing:
        source.stat("dataset/images/404.png")
    assert "dataset/images/404.png" in str(missing.value) and str(tmp_path / "mirror") in str(missing.value)
    with pytest.raises(ObjectMissing):
        source.download_to("dataset/images/404.png", tmp_path / "x")


@pytest.mark.parametrize("path", UNSAFE_PATHS)
def test_mirror_refuses_unsafe_paths(tmp_path, path):
    # A real file where the traversal would land, so a missing check would succeed instead of raising.
    root = make_mirror(tmp_path / "a" / "b" / "mirror")
    (tmp_path / "a" / "etc").mkdir()
    (tmp_path / "a" / "etc" / "passwd").write_text("secret")
    source = LocalMirrorSource(root)
    assert_refuses_unsafe_path(source, path, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_mirror_refuses_a_symlink_leading_outside_the_root(tmp_path):
    root = make_mirror(tmp_path / "mirror")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"outside the mirror")
    (root / "dataset/images/666.png").symlink_to(secret)
    source = LocalMirrorSource(root)

    assert "dataset/images/666.png" not in source.list("dataset/images/")
    for call in (
        lambda: source.stat("dataset/images/666.png"),
        lambda: source.read_bytes("dataset/images/666.png"),
        lambda: source.download_to("dataset/images/666.png", tmp_path / "x"),
    ):
        with pytest.raises(UnsafeObjectPath, match="outside the mirror root"):
            call()
    assert not (tmp_path / "x").exists()


def test_mirror_refuses_a_symlinked_folder_leading_outside_the_root(tmp_path):
    root = make_mirror(tmp_path / "mirror")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "1.png").write_bytes(b"x")
    os.rename(root / "dataset" / "images", tmp_path / "real_images")
    (root / "dataset" / "images").symlink_to(outside, target_is_directory=True)
    source = LocalMirrorSource(root)
    with pytest.raises(UnsafeObjectPath):
        source.list("dataset/images/")
    with pytest.raises(UnsafeObjectPath):
        source.stat("dataset/images/1.png")


def test_mirror_follows_symlinks_that_stay_inside_the_root(tmp_path):
    root = make_mirror(tmp_path / "mirror")
    (root / "dataset/images/9.png").symlink_to(root / "dataset/images/34.png")
    source = LocalMirrorSource(root)
    assert source.list("dataset/images/")["dataset/images/9.png"].size == len(IMAGES["dataset/images/34.png"])
    source.download_to("dataset/images/9.png", tmp_path / "copy.png")
    assert (tmp_path / "copy.png").read_bytes() == IMAGES["dataset/images/34.png"]


def test_mirror_list_refuses_a_traversing_prefix(tmp_path):
    source = LocalMirrorSource(make_mirror(tmp_path / "mirror"))
    for prefix in ("../", "dataset/../../", "/etc/"):
        with pytest.raises(UnsafeObjectPath):
            source.list(prefix)


def test_mirror_check_reachable_explains_what_is_wrong(tmp_path):
    with pytest.raises(SourceUnreachable, match="does not exist"):
        LocalMirrorSource(tmp_path / "nope").check_reachable()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceUnreachable, match="no dataset/ folder"):
        LocalMirrorSource(tmp_path / "empty").check_reachable()
    LocalMirrorSource(make_mirror(tmp_path / "mirror")).check_reachable()


def test_mirror_is_synthetic_follows_the_marker_file(tmp_path):
    root = make_mirror(tmp_path / "mirror")
    assert LocalMirrorSource(root).is_synthetic() is False
    (root / SYNTHETIC_MARKER).write_text("# synthetic\n")
    assert LocalMirrorSource(root).is_synthetic() is True
