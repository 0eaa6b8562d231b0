"""Snapshot of the asset graph, its checks and jobs: a structural change must be made on purpose; and the
environment-driven resource settings.

After a deliberate change, regenerate with:  UPDATE_SNAPSHOTS=1 make test ARGS=scin_pipeline_tests/test_definitions.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster
import pytest
from dagster import EnvVar

from scin_pipeline.core.data_root import DATA_ROOT_ENV, DEFAULT_DATA_ROOT, DEFAULT_SOURCE, GCS_ACCESS_ENV, SOURCE_ENV
from scin_pipeline.core.sources import GcsAccess
from scin_pipeline.definitions import build_resources, defs

SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_graph.json"


def graph_snapshot() -> dict:
    graph = defs.resolve_asset_graph()
    assets = {
        spec.key.to_user_string(): {
            "deps": sorted(d.asset_key.to_user_string() for d in spec.deps),
            "group": spec.group_name,
            "code_version": spec.code_version,
        }
        for spec in defs.resolve_all_asset_specs()
    }
    blocking = {(s.asset_key, s.name) for a in defs.assets for s in getattr(a, "check_specs", []) if s.blocking}
    blocking |= {(s.asset_key, s.name) for c in defs.asset_checks for s in c.check_specs if s.blocking}
    checks = sorted(
        f"{k.asset_key.to_user_string()}:{k.name}{' (blocking)' if (k.asset_key, k.name) in blocking else ''}"
        for k in graph.asset_check_keys
    )
    jobs = sorted(j.name for j in defs.resolve_all_job_defs() if not j.name.startswith("__"))
    return {"assets": dict(sorted(assets.items())), "checks": checks, "jobs": jobs}


def test_asset_graph_matches_snapshot():
    current = graph_snapshot()
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(json.dumps(current, indent=2) + "\n")
    assert SNAPSHOT.exists(), f"{SNAPSHOT} missing: create it with UPDATE_SNAPSHOTS=1"
    assert current == json.loads(SNAPSHOT.read_text()), (
        "the asset graph changed; if on purpose, rerun with UPDATE_SNAPSHOTS=1 and commit the snapshot"
    )


def test_every_asset_has_a_description_and_a_code_version():
    for spec in defs.resolve_all_asset_specs():
        assert spec.description, spec.key
        assert spec.code_version, spec.key


def test_every_asset_says_what_it_is_made_with():
    """`kinds` label each asset in the UI's graph (at most three, Dagster's limit)."""
    for spec in defs.resolve_all_asset_specs():
        assert spec.kinds and len(spec.kinds) <= 3, (spec.key, spec.kinds)
    by_key = {spec.key.to_user_string(): spec.kinds for spec in defs.resolve_all_asset_specs()}
    assert "mlflow" in by_key["model_comparison"] and "keras" in by_key["baseline_cnn"]


@pytest.mark.parametrize("value", [None, "/srv/scin-mirror"])
def test_the_source_and_data_root_come_from_the_environment_through_envvar(monkeypatch, tmp_path, value):
    """SCIN_SOURCE and SCIN_DATA_ROOT reach the resources as dagster.EnvVar when set (Dagster reads them at
    launch; the UI shows them as environment-driven), and the documented defaults when unset."""
    for name in (SOURCE_ENV, DATA_ROOT_ENV):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    resources = build_resources()
    if value is None:
        assert resources["scin_source"].location == DEFAULT_SOURCE == "gcs"
    else:
        assert isinstance(resources["scin_source"].location, EnvVar)
        assert resources["scin_source"].location.env_var_name == SOURCE_ENV
    with dagster.build_resources(resources) as resolved:
        assert resolved.scin_source.location == (value or "gcs")
        assert resolved.storage.data_root == (value or DEFAULT_DATA_ROOT)
        assert resolved.io_manager.storage.data_root == resolved.storage.data_root
    # Explicit arguments (what the CLI's runner passes) win over the environment.
    with dagster.build_resources(build_resources(data_root=str(tmp_path), source="gs://elsewhere")) as resolved:
        assert (resolved.scin_source.location, resolved.storage.data_root) == ("gs://elsewhere", str(tmp_path))


def test_gcs_credentials_of_a_deployment_come_from_the_environment(monkeypatch, tmp_path):
    """SCIN_GCS_AUTH / _SERVICE_ACCOUNT_KEY / _USER_PROJECT reach scin_source as EnvVar; unset, anonymous."""
    for name in GCS_ACCESS_ENV.values():
        monkeypatch.delenv(name, raising=False)
    with dagster.build_resources(build_resources(source="gcs")) as resolved:
        assert resolved.scin_source.gcs_access() == GcsAccess()
    monkeypatch.setenv(GCS_ACCESS_ENV["auth"], "service_account_key")
    monkeypatch.setenv(GCS_ACCESS_ENV["service_account_key_file"], str(tmp_path / "key.json"))
    monkeypatch.setenv(GCS_ACCESS_ENV["user_project"], "billing-9")
    resources = build_resources(source="gcs")
    assert resources["scin_source"].auth.env_var_name == GCS_ACCESS_ENV["auth"]
    with dagster.build_resources(resources) as resolved:
        assert resolved.scin_source.gcs_access() == GcsAccess(
            "service_account_key", str(tmp_path / "key.json"), "billing-9"
        )
