"""ScinSourceResource.is_synthetic: the assets' one question about the source (synthetic images or not)."""

from __future__ import annotations

from scin_pipeline.core.sources import SYNTHETIC_MARKER
from scin_pipeline.resources import ScinSourceResource


def test_is_synthetic_follows_the_mirrors_marker_file(tmp_path):
    (tmp_path / "dataset").mkdir()
    resource = ScinSourceResource(location=str(tmp_path))
    assert resource.is_synthetic() is False
    (tmp_path / SYNTHETIC_MARKER).write_text("# synthetic\n")
    assert resource.is_synthetic() is True


def test_a_source_that_cannot_be_opened_is_not_synthetic(tmp_path):
    # open() refuses a bucket URL with an object path; a missing folder has no marker to read.
    assert ScinSourceResource(location="gs://bucket/with/a/path").is_synthetic() is False
    assert ScinSourceResource(location=str(tmp_path / "nope")).is_synthetic() is False
