"""The deployment topology on one machine, without Docker: PostgreSQL (Dagster's instance storage and the
MLflow backend store), two Dagster code servers (``scin_pipeline`` and the test's ``deploy_probe``), the
webserver, the daemon and the MLflow tracking server, each a process on loopback.

``start_topology`` writes the same ``dagster.yaml`` and ``workspace.yaml`` that docs/deployment-local.md
shows, starts the services in dependency order (Postgres; code servers and MLflow; webserver and daemon)
and returns once the webserver has loaded both code locations, the daemon's scheduler and run queue
report healthy and MLflow answers ``/health``. ``Topology.stop`` stops all of them (Postgres belongs
to its caller) and says what, if anything, outlived it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from scin_pipeline_tests.deploy import services
from scin_pipeline_tests.deploy.probe_location import PROBE_LOCATION
from scin_pipeline_tests.deploy.services import PostgresCluster, Service, graphql, http_get, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SCIN_LOCATION = "scin_pipeline"
REPOSITORY = "__repository__"  # the repository name Dagster gives a Definitions object
PROBE_MODULE = "scin_pipeline_tests.deploy.probe_location"
# SQLAlchemy 2.1 resolves a bare postgresql:// to the psycopg 3 driver; the one installed is psycopg2.
SQLALCHEMY_SCHEME = "postgresql+psycopg2"
STARTUP_TIMEOUT_S = 240  # generous: two shared cores, several helpers' tests at once

DAGSTER_YAML = """\
# Dagster instance of the one-machine deployment: everything in PostgreSQL, runs queued and launched by
# the daemon as local processes. The password comes from the environment, never from this file.
storage:
  postgres:
    postgres_db:
      hostname: 127.0.0.1
      port: {port}
      username: {user}
      password:
        env: DAGSTER_PG_PASSWORD
      db_name: dagster
      scheme: {scheme}  # the psycopg2 driver: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    max_concurrent_runs: 2
run_launcher:
  module: dagster.core.launcher
  class: DefaultRunLauncher
scheduler:
  module: dagster.core.scheduler
  class: DagsterDaemonScheduler
telemetry:
  enabled: false
"""

WORKSPACE_YAML = """\
load_from:
  - grpc_server:
      host: 127.0.0.1
      port: {scin_port}
      location_name: {scin_location}
  - grpc_server:
      host: 127.0.0.1
      port: {probe_port}
      location_name: {probe_location}
"""

WORKSPACE_QUERY = """
{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
    locationOrLoadError { __typename ... on PythonError { message } } } } } }
"""
DAEMON_HEALTH_QUERY = "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } } }"
NEEDED_DAEMONS = ("SCHEDULER", "QUEUED_RUN_COORDINATOR")

LAUNCH_RUN_MUTATION = """
mutation Launch($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on PythonError { message stack }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
    ... on PipelineNotFoundError { message }
    ... on UnauthorizedError { message }
  }
}
"""
RUN_STATUS_QUERY = """
query Run($runId: ID!) { runOrError(runId: $runId) { __typename
  ... on Run { runId status jobName tags { key value } }
  ... on RunNotFoundError { message } ... on PythonError { message } } }
"""
RUN_FAILURE_EVENTS_QUERY = """
query Events($runId: ID!) { logsForRun(runId: $runId) { __typename
  ... on EventConnection { events { __typename ... on MessageEvent { message }
      ... on ExecutionStepFailureEvent { error { message } } } } } }
"""
START_SCHEDULE_MUTATION = """
mutation Start($selector: ScheduleSelector!) { startSchedule(scheduleSelector: $selector) { __typename
  ... on ScheduleStateResult { scheduleState { status } }
  ... on PythonError { message } ... on ScheduleNotFoundError { message }
  ... on UnauthorizedError { message } } }
"""
TERMINAL_STATUSES = ("SUCCESS", "FAILURE", "CANCELED")


@dataclass
class Topology:
    postgres: PostgresCluster
    dagster_home: Path
    data_root: Path
    source: Path
    mlflow_url: str
    mlflow_artifacts: Path
    webserver_url: str
    log_dir: Path
    services: dict[str, Service] = field(default_factory=dict)

    @property
    def graphql_url(self) -> str:
        return f"{self.webserver_url}/graphql"

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        return graphql(self.graphql_url, query, variables)

    def launch_run(
        self,
        job_name: str,
        asset_keys: list[str] | None = None,
        location: str = SCIN_LOCATION,
        tags: dict | None = None,
    ) -> str:
        """launchRun through GraphQL (the webserver hands it to the QueuedRunCoordinator); the run id."""
        selector = {"repositoryLocationName": location, "repositoryName": REPOSITORY, "jobName": job_name}
        if asset_keys is not None:
            selector["assetSelection"] = [{"path": [key]} for key in asset_keys]
        params = {
            "selector": selector,
            "runConfigData": {},
            "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]},
        }
        result = self.graphql(LAUNCH_RUN_MUTATION, {"executionParams": params})["launchRun"]
        if result["__typename"] != "LaunchRunSuccess":
            raise AssertionError(f"launchRun of {job_name} failed: {result}")
        return result["run"]["runId"]

    def start_schedule(self, location: str, name: str) -> str:
        """startSchedule through GraphQL; the schedule's new status (RUNNING)."""
        selector = {"repositoryLocationName": location, "repositoryName": REPOSITORY, "scheduleName": name}
        result = self.graphql(START_SCHEDULE_MUTATION, {"selector": selector})["startSchedule"]
        if result["__typename"] != "ScheduleStateResult":
            raise AssertionError(f"startSchedule {location}/{name} failed: {result}")
        return result["scheduleState"]["status"]

    def run_status(self, run_id: str) -> str:
        result = self.graphql(RUN_STATUS_QUERY, {"runId": run_id})["runOrError"]
        if result["__typename"] != "Run":
            raise AssertionError(f"run {run_id}: {result}")
        return result["status"]

    def wait_for_run(self, run_id: str, timeout_s: float = 240) -> str:
        """Poll runOrError until the run ends; the final status (the failure messages in the error)."""
        status = wait_until(
            lambda: (s := self.run_status(run_id)) in TERMINAL_STATUSES and s,
            timeout_s=timeout_s,
            what=f"run {run_id} to finish",
            services=list(self.services.values()),
        )
        return status

    def failure_messages(self, run_id: str) -> list[str]:
        events = self.graphql(RUN_FAILURE_EVENTS_QUERY, {"runId": run_id})["logsForRun"].get("events", [])
        return [
            e.get("error", {}).get("message") or e.get("message", "") for e in events if "Failure" in e["__typename"]
        ]

    def stop(self) -> list[str]:
        """Stop every service (Postgres is its owner's to stop); the processes that survived (none)."""
        pids = []
        for service in self.services.values():
            try:
                pids.append(service.proc.pid)
                pids.extend(child.pid for child in psutil.Process(service.proc.pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        # The webserver and daemon first (they hold connections to the code servers), MLflow, then code.
        for name in ("webserver", "daemon", "mlflow", "code_server_probe", "code_server_scin"):
            if name in self.services:
                self.services[name].stop()
        survivors = []
        for pid in pids:
            try:
                process = psutil.Process(pid)
                if process.status() != psutil.STATUS_ZOMBIE:
                    survivors.append(f"{pid} {' '.join(process.cmdline()[:4])}")
            except psutil.NoSuchProcess:
                pass
        return survivors


def service_env(*, dagster_home: Path, data_root: Path, source: Path, mlflow_url: str, pg: PostgresCluster) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "SCIN_", "MLFLOW_"))}
    env.update(
        {
            "DAGSTER_HOME": str(dagster_home),
            "DAGSTER_PG_PASSWORD": pg.password,
            "SCIN_DATA_ROOT": str(data_root),
            "SCIN_SOURCE": str(source),
            "MLFLOW_TRACKING_URI": mlflow_url,
            # MLflow 3's server starts a job runner with six consumer processes for its GenAI jobs; unused here.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def start_topology(pg: PostgresCluster, *, work_dir: Path, source: Path) -> Topology:
    """Start code servers, MLflow, webserver and daemon against the running cluster ``pg``."""
    dagster_home = work_dir / "dagster_home"
    dagster_home.mkdir(parents=True)
    instance_yaml = DAGSTER_YAML.format(port=pg.port, user=pg.user, scheme=SQLALCHEMY_SCHEME)
    (dagster_home / "dagster.yaml").write_text(instance_yaml)
    scin_port, probe_port, web_port, mlflow_port = (services.free_port() for _ in range(4))
    workspace = work_dir / "workspace.yaml"
    workspace.write_text(
        WORKSPACE_YAML.format(
            scin_port=scin_port, scin_location=SCIN_LOCATION, probe_port=probe_port, probe_location=PROBE_LOCATION
        )
    )
    data_root = work_dir / "data"
    data_root.mkdir()
    mlflow_artifacts = work_dir / "mlartifacts"
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    env = service_env(dagster_home=dagster_home, data_root=data_root, source=source, mlflow_url=mlflow_url, pg=pg)
    log_dir = work_dir / "logs"
    topology = Topology(
        postgres=pg,
        dagster_home=dagster_home,
        data_root=data_root,
        source=source,
        mlflow_url=mlflow_url,
        mlflow_artifacts=mlflow_artifacts,
        webserver_url=f"http://127.0.0.1:{web_port}",
        log_dir=log_dir,
    )

    def start(name: str, argv: list[str]) -> Service:
        # cwd: a scratch folder, so nothing a service writes lands in the repository.
        service = services.start_service(name, argv, env=env, log_dir=log_dir, cwd=work_dir)
        topology.services[name] = service
        return service

    def code_server(module: str, location: str, port: int) -> list[str]:
        # -d: the repository root on sys.path (scin_pipeline_tests is not an installed package).
        return [
            str(BIN / "dagster"),
            "code-server",
            "start",
            "-m",
            module,
            "-d",
            str(REPO_ROOT),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "--location-name",
            location,
        ]

    try:
        code_servers = [
            start("code_server_scin", code_server("scin_pipeline.definitions", SCIN_LOCATION, scin_port)),
            start("code_server_probe", code_server(PROBE_MODULE, PROBE_LOCATION, probe_port)),
        ]
        mlflow = start(
            "mlflow",
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                pg.url("mlflow", scheme=SQLALCHEMY_SCHEME),
                "--artifacts-destination",
                str(mlflow_artifacts),
                "--serve-artifacts",
                "-h",
                "127.0.0.1",
                "-p",
                str(mlflow_port),
                "--workers",
                "1",
            ],
        )
        for server, port in zip(code_servers, (scin_port, probe_port)):
            wait_until(
                lambda p=port: services.tcp_open("127.0.0.1", p),
                timeout_s=STARTUP_TIMEOUT_S,
                what=f"{server.name} on port {port}",
                services=[server],
            )
        webserver = start(
            "webserver", [str(BIN / "dagster-webserver"), "-w", str(workspace), "-h", "127.0.0.1", "-p", str(web_port)]
        )
        daemon = start("daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(workspace)])
        everything = list(topology.services.values())
        wait_until(
            lambda: b"dagster_webserver_version" in http_get(f"{topology.webserver_url}/server_info"),
            timeout_s=STARTUP_TIMEOUT_S,
            what="the Dagster webserver",
            services=everything,
        )
        wait_until(
            lambda: _locations_loaded(topology),
            timeout_s=STARTUP_TIMEOUT_S,
            what="both code locations to load in the webserver",
            services=everything,
        )
        wait_until(
            lambda: _daemons_healthy(topology),
            timeout_s=STARTUP_TIMEOUT_S,
            what=f"the daemon's {', '.join(NEEDED_DAEMONS)} heartbeats",
            services=[daemon, webserver],
        )
        wait_until(
            lambda: http_get(f"{mlflow_url}/health").strip() == b"OK",
            timeout_s=STARTUP_TIMEOUT_S,
            what="the MLflow server",
            services=[mlflow],
        )
    except BaseException:
        topology.stop()
        raise
    return topology


def _locations_loaded(topology: Topology) -> bool:
    workspace = topology.graphql(WORKSPACE_QUERY)["workspaceOrError"]
    entries = {entry["name"]: entry for entry in workspace.get("locationEntries", [])}
    for name in (SCIN_LOCATION, PROBE_LOCATION):
        entry = entries.get(name)
        if entry is None or entry["loadStatus"] != "LOADED":
            return False
        if entry["locationOrLoadError"]["__typename"] == "PythonError":
            # Loaded with an error: either the code server is still starting (retry) or the code is
            # broken (the timeout then reports this message).
            raise RuntimeError(f"code location {name}: {entry['locationOrLoadError']['message'][:2000]}")
    return True


def _daemons_healthy(topology: Topology) -> bool:
    statuses = topology.graphql(DAEMON_HEALTH_QUERY)["instance"]["daemonHealth"]["allDaemonStatuses"]
    healthy = {s["daemonType"] for s in statuses if s["healthy"]}
    return all(d in healthy for d in NEEDED_DAEMONS)
