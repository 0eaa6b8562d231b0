"""raw_metadata and image_files retry what may heal (the bucket's transient errors) and fail at once,
with a Failure that is not retried, on what cannot (local filesystem errors, bad content)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from dagster import AssetSelection, DagsterInstance, Failure, materialize

from scin_pipeline.assets import ALL_ASSET_CHECKS, ALL_ASSETS
from scin_pipeline.assets.ingest import retry_only_what_can_heal
from scin_pipeline.core.paths import UnsafeObjectPath
from scin_pipeline.core.sources import CorruptObject, ObjectMissing, SourceUnreachable, TransientSourceError
from scin_pipeline.definitions import build_resources
from scin_pipeline_tests.tiny_mirror import write_tiny_mirror


@pytest.mark.parametrize(
    "error",
    [
        TransientSourceError("dataset/scin_cases.csv: HTTP 503"),
        SourceUnreachable("cannot reach gs://dx-scin-public-data: timed out"),
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        TimeoutError("read timed out"),
        CorruptObject("dataset/images/1.png: crc32c mismatch"),
        RuntimeError("something not known to be permanent"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_errors_that_may_heal_reach_the_retry_policy_unchanged(error):
    with pytest.raises(type(error)) as caught, retry_only_what_can_heal("raw_metadata"):
        raise error
    assert caught.value is error


@pytest.mark.parametrize(
    "error, says",
    [
        (ValueError("scin_cases.csv line 7: bad literal"), "ValueError: scin_cases.csv line 7: bad literal"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "UnicodeDecodeError"),
        (UnsafeObjectPath("../x.png", "path traversal"), "UnsafeObjectPath"),
        (ObjectMissing("dataset/scin_cases.csv", "gs://bucket"), "dataset/scin_cases.csv not found in gs://bucket"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else "",
)
def test_bad_content_and_absent_objects_fail_without_retries(error, says):
    with pytest.raises(Failure) as caught, retry_only_what_can_heal("raw_metadata"):
        raise error
    assert caught.value.allow_retries is False
    assert caught.value.description.startswith("raw_metadata: ") and says in caught.value.description
    assert caught.value.__cause__ is error  # the traceback still shows where the content went wrong


def test_a_local_filesystem_error_fails_without_retries_and_says_what_is_wrong(tmp_path):
    blocker = tmp_path / "images"
    blocker.write_text("not a folder")
    with pytest.raises(Failure) as caught, retry_only_what_can_heal("image_files"):
        (blocker / "1.png").write_bytes(b"x")
    assert caught.value.allow_retries is False
    assert caught.value.description == (
        f"image_files: {blocker} is a file, not a folder (a local filesystem error: not retried)"
    )


def run_ingest(tmp_path: Path, blocked_folder: str):
    mirror = write_tiny_mirror(tmp_path / "mirror")
    data_root = tmp_path / "data"
    data_root.mkdir()
    (data_root / blocked_folder).write_text("not a folder")
    return materialize(
        [*ALL_ASSETS, *ALL_ASSET_CHECKS],
        instance=DagsterInstance.ephemeral(),
        resources=build_resources(data_root=str(data_root), source=str(mirror)),
        selection=AssetSelection.groups("ingest"),
        raise_on_error=False,
    ), data_root


@pytest.mark.parametrize(
    "blocked_folder, failing_step",
    [
        ("raw", "raw_metadata"),  # the asset's own write (store_verbatim)
        ("tables", "raw_metadata"),  # the IO manager's write of its table
        ("images", "image_files"),  # after raw_metadata and parsed_metadata succeeded
    ],
)
def test_a_data_root_folder_that_is_a_file_fails_its_step_once(tmp_path, blocked_folder, failing_step):
    result, data_root = run_ingest(tmp_path, blocked_folder)
    assert not result.success
    assert [e.step_key for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"] == []
    [failure] = result.get_step_failure_events()
    assert failure.step_key == failing_step
    description = failure.step_failure_data.user_failure_data.description
    assert f"{data_root / blocked_folder} is a file, not a folder" in description
    assert description.endswith("(a local filesystem error: not retried)")
