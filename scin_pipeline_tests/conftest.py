"""Shared fixtures. The real SCIN 1.0.0 metadata is the copy bundled in the package
(scin_pipeline/data/scin, checked against its published SHA-256); SCIN_METADATA_DIR, when set, overrides it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["scin_pipeline_tests.gcs_emulator"]

REAL_METADATA_ENV = "SCIN_METADATA_DIR"


def pytest_configure(config):
    pin_absl_handler_to_the_process_stderr()


def pin_absl_handler_to_the_process_stderr() -> None:
    """Keep pytest's capture file open for the whole session.

    Root cause of "ValueError: I/O operation on closed file" in every test after a certain point: absl
    (imported with TensorFlow/Keras) creates its logging handler once, bound to the ``sys.stderr`` of that
    moment; under pytest that is pytest's capture file. Every Dagster run on an instance with settings (ours
    disables telemetry) calls ``logging.config.dictConfig``, which closes every handler in the process, and
    absl's ``close()`` closes its stream unless it is the current ``sys.stderr``/``sys.stdout`` - inside a
    test using ``capsys`` it is not, so pytest's own capture file was closed under it. Binding absl's handler
    to the process's real stderr (which absl never closes) removes the trap whatever the test order.
    """
    import sys

    from absl import logging as absl_logging

    absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__


@pytest.fixture(scope="session")
def scin_metadata_dir() -> Path:
    """The real SCIN metadata folder: SCIN_METADATA_DIR when set (it must hold the CSVs), else the bundled
    copy (verified). Never skips."""
    from scin_pipeline.core import bundled_metadata

    value = os.environ.get(REAL_METADATA_ENV)
    if not value:
        try:
            return bundled_metadata.verify()
        except bundled_metadata.BundledMetadataError as exc:
            pytest.fail(str(exc))
    path = Path(value).expanduser().resolve()
    lacking = [
        name for name in (bundled_metadata.CASES_FILE, bundled_metadata.LABELS_FILE) if not (path / name).is_file()
    ]
    if lacking:
        pytest.fail(
            f"{REAL_METADATA_ENV}={value} does not hold {' and '.join(lacking)} "
            f"(unset it to use the bundled SCIN {bundled_metadata.RELEASE} metadata)"
        )
    return path


@pytest.fixture(scope="session")
def real_parsed_metadata(scin_metadata_dir):
    from scin_pipeline.core.metadata import parse_metadata

    return parse_metadata(
        (scin_metadata_dir / "scin_cases.csv").read_bytes(), (scin_metadata_dir / "scin_labels.csv").read_bytes()
    )
