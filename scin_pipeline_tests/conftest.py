"""Shared fixtures. The real SCIN metadata comes in through SCIN_METADATA_DIR (set by .ci/run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["scin_pipeline_tests.gcs_emulator"]

REAL_METADATA_ENV = "SCIN_METADATA_DIR"


@pytest.fixture(scope="session")
def scin_metadata_dir() -> Path:
    value = os.environ.get(REAL_METADATA_ENV)
    if not value:
        pytest.skip(f"{REAL_METADATA_ENV} not set: real SCIN metadata needed (see README, Tests)")
    path = Path(value).expanduser().resolve()
    if not (path / "scin_cases.csv").exists() or not (path / "scin_labels.csv").exists():
        pytest.fail(f"{REAL_METADATA_ENV}={value} does not hold scin_cases.csv and scin_labels.csv")
    return path


@pytest.fixture(scope="session")
def real_parsed_metadata(scin_metadata_dir):
    from scin_pipeline.core.metadata import parse_metadata

    return parse_metadata((scin_metadata_dir / "scin_cases.csv").read_bytes(),
                          (scin_metadata_dir / "scin_labels.csv").read_bytes())
