"""The deployment files in docker/, checked without Docker (neither docker nor `docker compose config`
is available where the tests run): they parse, reference each other consistently, and dagster.yaml
passes Dagster's own schema and dagster-postgres's storage schema."""

from __future__ import annotations

import importlib
import re
import shutil
import tomllib
from pathlib import Path

import pytest
import yaml

from scin_pipeline.core.alerts import DAGSTER_URL_ENV, WEBHOOK_URL_ENV
from scin_pipeline.core.mlflow_registry import MLFLOW_UI_URL_ENV
from scin_pipeline.orchestration import AUTOMATION_ENV, RELEASE_SENSOR_INTERVAL_ENV
from scin_pipeline_tests.test_orchestration import gpu_pool

DOCKER = Path(__file__).resolve().parent.parent / "docker"
REPO = DOCKER.parent
SERVICES = {"postgres", "mlflow", "user-code", "dagster-webserver", "dagster-daemon"}
DAGSTER_SERVICES = {"user-code", "dagster-webserver", "dagster-daemon"}
PG_ENV = {
    "DAGSTER_PG_HOST": "postgres",
    "DAGSTER_PG_PORT": "5432",
    "DAGSTER_PG_USER": "scin",
    "DAGSTER_PG_PASSWORD": "secret",
    "DAGSTER_PG_DB": "dagster",
}


def load(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load("compose.yaml")


def command_text(service: dict) -> str:
    command = service["command"]
    return " ".join(command) if isinstance(command, list) else command


def test_compose_has_every_service_with_a_healthcheck_and_restart(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert service.get("restart") == "unless-stopped", name
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert condition == {"condition": "service_healthy"}
            assert "healthcheck" in services[dependency]


def test_uis_are_published_on_loopback_only(compose):
    published = {name: s.get("ports", []) for name, s in compose["services"].items()}
    assert published["dagster-webserver"] == ["127.0.0.1:3000:3000"]
    assert published["mlflow"] == ["127.0.0.1:5000:5000"]
    assert not published["postgres"] and not published["user-code"] and not published["dagster-daemon"]


def test_the_code_server_the_workspace_and_the_image_agree(compose):
    user_code = compose["services"]["user-code"]
    command = command_text(user_code)
    assert "dagster code-server start" in command and "-m scin_pipeline.definitions" in command
    port = re.search(r"-p (\d+)", command).group(1)
    [entry] = load("workspace.yaml")["load_from"]
    assert entry["grpc_server"] == {"host": "user-code", "port": int(port), "location_name": "scin_pipeline"}
    for name in ("dagster-webserver", "dagster-daemon"):
        assert "-w /opt/dagster/app/workspace.yaml" in command_text(compose["services"][name])
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "COPY docker/workspace.yaml /opt/dagster/app/workspace.yaml" in dockerfile
    assert "COPY docker/dagster.yaml /opt/dagster/home/dagster.yaml" in dockerfile
    assert 'pip install -c requirements.lock ".[postgres]"' in dockerfile
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.M):
        for path in source.split():
            assert (REPO / path).exists(), f"Dockerfile copies {path}, which does not exist"
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    for path in (
        "pyproject.toml",
        "requirements.lock",
        "scin_pipeline/",
        "docker/dagster.yaml",
        "docker/workspace.yaml",
    ):
        assert f"!{path}" in ignore, f"{path} is excluded from the build context"


def test_dagster_services_share_the_instance_and_postgres_credentials(compose):
    for name in DAGSTER_SERVICES:
        env = compose["services"][name]["environment"]
        assert set(PG_ENV) <= set(env), name
        assert env["DAGSTER_HOME"] == "/opt/dagster/home"
    user_code = compose["services"]["user-code"]
    env = user_code["environment"]
    assert env["SCIN_DATA_ROOT"] == "/data" and "scin-data:/data" in user_code["volumes"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # The names the code reads are the names compose sets.
    for name in (AUTOMATION_ENV, RELEASE_SENSOR_INTERVAL_ENV, WEBHOOK_URL_ENV, DAGSTER_URL_ENV, MLFLOW_UI_URL_ENV):
        assert name in env, name
    # Run links point at the MLflow UI as a browser reaches it (the published port), not the network name.
    published = compose["services"]["mlflow"]["ports"][0]
    assert published.endswith(":5000") and env[MLFLOW_UI_URL_ENV].endswith("localhost:5000}")
    assert env[AUTOMATION_ENV] == "on"
    daemon = command_text(compose["services"]["dagster-daemon"])
    # The pool the GPU steps declare is the pool whose limit the daemon sets (the number of GPUs).
    assert f"dagster instance concurrency set {gpu_pool()}" in daemon and "dagster-daemon run" in daemon


def test_mlflow_server_uses_postgres_and_serves_artifacts_from_a_volume(compose):
    mlflow = compose["services"]["mlflow"]
    command = command_text(mlflow)
    assert "mlflow server" in command and "--port 5000" in command
    assert '--backend-store-uri "postgresql+psycopg2://' in command and "@postgres:5432/mlflow" in command
    assert "--serve-artifacts" in command and "--artifacts-destination /mlflow-artifacts" in command
    assert "mlflow-artifacts:/mlflow-artifacts" in mlflow["volumes"]
    assert "mlflow" in mlflow["environment"]["MLFLOW_ALLOWED_HOSTS"]
    init = (DOCKER / "postgres-init" / "01-create-mlflow-db.sql").read_text()
    assert "CREATE DATABASE mlflow" in init
    assert "./postgres-init:/docker-entrypoint-initdb.d:ro" in compose["services"]["postgres"]["volumes"]


def test_every_named_volume_is_declared_and_every_variable_is_documented(compose):
    declared = set(compose["volumes"])
    used = {
        v.split(":")[0]
        for s in compose["services"].values()
        for v in s.get("volumes", [])
        if not v.startswith((".", "/"))
    }
    assert used == declared
    text = (DOCKER / "compose.yaml").read_text() + (DOCKER / "compose.gpu.yaml").read_text()
    variables = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    documented = set(re.findall(r"^(\w+)=", (DOCKER / ".env.example").read_text(), flags=re.M))
    optional = {"SCIN_IMAGE_TAG", "MLFLOW_ALLOWED_HOSTS"}
    assert variables - optional <= documented, variables - optional - documented


def test_gpu_overlay_reserves_gpus_for_the_code_server_only():
    overlay = load("compose.gpu.yaml")
    assert set(overlay["services"]) == {"user-code"}
    [device] = overlay["services"]["user-code"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert overlay["services"]["user-code"]["image"] != "scin-pipeline:${SCIN_IMAGE_TAG:-latest}"


def instance_ref(folder: Path, monkeypatch):
    from dagster._core.instance.ref import InstanceRef

    for key, value in PG_ENV.items():
        monkeypatch.setenv(key, value)
    return InstanceRef.from_dir(str(folder))


def validated(data) -> dict:
    """The config of a configurable class, validated against the class's own schema (env resolved)."""
    from dagster._config import process_config

    klass = getattr(importlib.import_module(data.module_name), data.class_name)
    result = process_config(klass.config_type(), yaml.safe_load(data.config_yaml))
    assert result.success, [e.message for e in result.errors]
    return result.value


def test_dagster_yaml_passes_the_instance_and_postgres_schemas(monkeypatch):
    pytest.importorskip("dagster_postgres", reason="dagster-postgres comes with the postgres extra (make, docker/)")
    ref = instance_ref(DOCKER, monkeypatch)
    assert (ref.storage_data.module_name, ref.storage_data.class_name) == ("dagster_postgres", "DagsterPostgresStorage")
    storage = validated(ref.storage_data)
    assert storage["postgres_db"] == {
        **{"username": "scin", "password": "secret", "hostname": "postgres", "db_name": "dagster", "port": 5432},
        "params": {},
        "scheme": "postgresql+psycopg2",
    }
    assert ref.run_coordinator_data.class_name == "QueuedRunCoordinator"
    validated(ref.run_coordinator_data)
    assert validated(ref.compute_logs_data)["base_dir"].startswith("/data/")
    concurrency = ref.settings["concurrency"]
    assert concurrency["pools"]["default_limit"] == 1 and concurrency["pools"]["granularity"] == "op"
    assert ref.settings["run_monitoring"]["enabled"] and ref.settings["run_retries"]["enabled"]


def test_a_misspelt_storage_key_is_caught_by_the_same_check(monkeypatch, tmp_path):
    pytest.importorskip("dagster_postgres", reason="dagster-postgres comes with the postgres extra (make, docker/)")
    shutil.copy(DOCKER / "dagster.yaml", tmp_path / "dagster.yaml")
    text = (tmp_path / "dagster.yaml").read_text().replace("      hostname:", "      host:")
    (tmp_path / "dagster.yaml").write_text(text)
    from dagster._core.errors import DagsterInvalidConfigError

    with pytest.raises((DagsterInvalidConfigError, AssertionError), match="host"):
        validated(instance_ref(tmp_path, monkeypatch).storage_data)


def test_one_code_location_name_everywhere():
    """Schedule and sensor state is keyed by the location name: the UI's workspace, the deployments'
    workspaces, the documented local topology and pyproject's [tool.dagster] must agree."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["dagster"]
    root = yaml.safe_load((REPO / "workspace.yaml").read_text())["load_from"][0]["python_module"]
    docker = load("workspace.yaml")["load_from"][0]["grpc_server"]
    assert root["module_name"] == pyproject["module_name"]
    assert root["location_name"] == docker["location_name"] == pyproject["code_location_name"]
    local_doc = (REPO / "docs" / "deployment-local.md").read_text()
    assert set(re.findall(r"location_name: (\S+)", local_doc)) == {pyproject["code_location_name"]}


def test_the_dagster_family_is_pinned_at_one_release_and_installs_by_resolution():
    """dagster, its webserver/graphql/pipes/shared (1.x.y) and its integrations (0.z.y) pin each other
    exactly: the lock must hold one release of all of them, so pip resolves them (no --no-deps anywhere)."""
    lock = dict(
        line.split("==", 1)
        for line in (REPO / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    family = ("dagster", "dagster-webserver", "dagster-graphql", "dagster-pipes", "dagster-shared")
    core = {name: lock[name] for name in family}
    assert len(set(core.values())) == 1, core
    patch = lock["dagster"].rsplit(".", 1)[1]
    assert lock["dagster-postgres"].rsplit(".", 1)[1] == patch, lock["dagster-postgres"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert f"dagster=={lock['dagster']}" in project["dependencies"]
    assert f"dagster-postgres=={lock['dagster-postgres']}" in project["optional-dependencies"]["postgres"]
    assert ".[dev,postgres]" in (REPO / "Makefile").read_text()
    for path in ("Makefile", "docker/Dockerfile"):
        assert "--no-deps" not in (REPO / path).read_text(), path
