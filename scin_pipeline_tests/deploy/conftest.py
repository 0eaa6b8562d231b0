"""Fixtures of the deployment tests: a throw-away PostgreSQL cluster, the whole topology on loopback, and
the system packages they need (Debian's ``postgresql`` and ``chromium``; scripts/ensure_system_packages.sh
installs them, .ci/run calls it).

A missing package skips the test with the reason on a developer's machine and FAILS it under CI=true, so a
green CI run proves these tests ran.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from scin_pipeline_tests.deploy import services
from scin_pipeline_tests.deploy.probe_location import PROBE_LOCATION, PROBE_SCHEDULE
from scin_pipeline_tests.deploy.topology import Topology, start_topology
from scin_pipeline_tests.tiny_mirror import write_tiny_mirror

INSTALL_HINT = "run scripts/ensure_system_packages.sh (as root) to install it"


def require_installed(found, what: str, hint: str = INSTALL_HINT):
    """``found`` when truthy; else skip (a developer's machine) or fail (CI=true) with ``hint``."""
    if found:
        return found
    message = f"{what} not found: {hint}"
    if services.ci_is_set():
        pytest.fail(f"{message} (CI is set: this test must run, not skip)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_bin_dir() -> Path:
    return require_installed(
        services.postgres_bin_dir(), "PostgreSQL server binaries (initdb, pg_ctl; Debian package 'postgresql')"
    )


@pytest.fixture(scope="session")
def postgres_python_drivers() -> None:
    # Not in pyproject.toml: dagster-postgres's newest release declares dagster==1.13.27 (see
    # docs/deployment.md, "Versions"), so it is installed from requirements.lock with --no-deps.
    missing = [name for name in ("dagster_postgres", "psycopg2") if importlib.util.find_spec(name) is None]
    require_installed(
        not missing,
        f"Python modules {', '.join(missing)}",
        "pip install --no-deps -c requirements.lock dagster-postgres psycopg2-binary",
    )


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    return require_installed(services.chromium_path(), "Chromium at /usr/bin/chromium (Debian package 'chromium')")


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> Path:
    """The hand-made 4-case mirror (synthetic images) in the bucket's layout."""
    return write_tiny_mirror(tmp_path_factory.mktemp("tiny-source") / "mirror")


@pytest.fixture(scope="module")
def postgres_cluster(postgres_bin_dir, postgres_python_drivers):
    """A started cluster with the databases ``dagster`` and ``mlflow``; stopped (pg_ctl -m fast) after."""
    cluster = services.start_postgres(postgres_bin_dir, ["dagster", "mlflow"])
    try:
        yield cluster
    finally:
        services.stop_postgres(cluster)


@pytest.fixture(scope="module")
def topology(postgres_cluster, tiny_source, tmp_path_factory) -> Topology:
    """Code servers, webserver, daemon and MLflow on loopback, with the probe's every-minute schedule
    already started through GraphQL (so its first tick is under way while the other tests run).
    Teardown fails the last test if any process outlived the stop."""
    work_dir = tmp_path_factory.mktemp("topology")
    stack = start_topology(postgres_cluster, work_dir=work_dir, source=tiny_source)
    print(
        f"\ndeployment topology: webserver {stack.webserver_url}, MLflow {stack.mlflow_url}, "
        f"Postgres 127.0.0.1:{postgres_cluster.port}, logs {stack.log_dir}"
    )
    survivors: list[str] = []
    try:
        stack.start_schedule(PROBE_LOCATION, PROBE_SCHEDULE)
        yield stack
    finally:
        survivors = stack.stop()
    assert not survivors, f"processes outlived the topology's stop: {survivors}"
