"""`scin-pipeline ui` starts Dagster and MLflow on loopback, and stopping it stops them all."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

SCRIPT = str(Path(sys.executable).parent / "scin-pipeline")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, timeout_s: float) -> bytes:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.mark.slow
def test_ui_serves_dagster_and_mlflow_and_stops_cleanly(tmp_path):
    dagster_port, mlflow_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            SCRIPT,
            "ui",
            "--data-root",
            str(tmp_path / "data"),
            "--source",
            str(tmp_path),
            "--port",
            str(dagster_port),
            "--mlflow-port",
            str(mlflow_port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    descendants: list[psutil.Process] = []
    try:
        info = wait_for(f"http://127.0.0.1:{dagster_port}/server_info", 150)
        assert b"dagster_webserver_version" in info
        wait_for(f"http://127.0.0.1:{mlflow_port}/", 60)
        # Telemetry is off in the server the UI asks.
        telemetry = json.loads(wait_for(f"http://127.0.0.1:{mlflow_port}/ajax-api/3.0/mlflow/ui-telemetry", 30))
        assert telemetry["disable_ui_telemetry"] is True
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert len(descendants) >= 2  # dagster dev (and its webserver, daemon) plus the MLflow server
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        _gone, alive = psutil.wait_procs(descendants, timeout=30)
        assert not alive, [p.cmdline()[:3] for p in alive]
    finally:
        # Whatever happened, leave nothing running: `dagster dev` ignores SIGTERM, so kill by group.
        for process in [psutil.Process(proc.pid) if proc.poll() is None else None, *descendants]:
            try:
                if process is not None and process.is_running():
                    os.killpg(os.getpgid(process.pid), signal.SIGKILL)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass


class FinishedProcess:
    """Stands in for a child of `scin-pipeline ui`: records its command and environment, already exited."""

    started: list[FinishedProcess] = []

    def __init__(self, command, env=None, start_new_session=False):
        self.command, self.env, self.pid = list(command), dict(env or {}), -1
        FinishedProcess.started.append(self)

    def poll(self):
        return 0


def test_ui_starts_mlflow_with_telemetry_off_on_the_runs_list_with_metric_columns(tmp_path, monkeypatch, capsys):
    import json

    import mlflow

    from scin_pipeline import cli
    from scin_pipeline.core import mlflow_ui

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    monkeypatch.delenv("DO_NOT_TRACK", raising=False)
    monkeypatch.delenv("SCIN_MLFLOW_UI_URL", raising=False)
    monkeypatch.setattr(cli.subprocess, "Popen", FinishedProcess)
    FinishedProcess.started = []
    root = tmp_path / "data"
    assert cli.main(["ui", "--data-root", str(root), "--source", str(tmp_path), "--mlflow-port", "5123"]) == 0

    dagster, server = FinishedProcess.started
    assert dagster.command[1:3] == ["dev", "-h"]
    # Dagster knows the MLflow UI's address: the candidates' asset metadata links to their runs there.
    assert dagster.env["SCIN_MLFLOW_UI_URL"] == "http://127.0.0.1:5123"
    db = root.resolve() / "mlflow" / "mlflow.db"
    assert server.command[1:] == [
        "ui",
        "--host",
        "127.0.0.1",
        "--port",
        "5123",
        "--backend-store-uri",
        f"sqlite:///{db}",
    ]
    assert server.env["MLFLOW_DISABLE_TELEMETRY"] == "true" and server.env["DO_NOT_TRACK"] == "true"
    assert server.env["MLFLOW_TRACKING_URI"] == f"sqlite:///{db}"
    # The printed link opens the experiment's runs list, classic-ML mode, with the shared view of metrics.
    experiment = mlflow.MlflowClient(f"sqlite:///{db}").get_experiment_by_name("scin-pipeline")
    assert experiment is not None
    link = next(line for line in capsys.readouterr().out.splitlines() if "runs" in line).split()[-1]
    assert link == (
        f"http://127.0.0.1:5123/#/experiments/{experiment.experiment_id}/runs"
        "?workflowType=machine_learning&viewStateShareKey=scin-pipeline-candidates"
    )
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags["mlflow.sharedViewState.scin-pipeline-candidates"])
    assert "metrics.`best_val_macro_f1`" in view["selectedColumns"]
    assert "metrics.`test_balanced_accuracy`" in view["selectedColumns"]
    assert view["orderByKey"] == "metrics.`best_val_macro_f1`" and view["orderByAsc"] is False
    assert set(mlflow_ui.RUNS_VIEW_METRICS) == {c[len("metrics.`") : -1] for c in view["selectedColumns"][1:]}


def test_a_users_own_telemetry_choice_is_kept():
    from scin_pipeline.core.mlflow_ui import ui_environment

    env = ui_environment({"DO_NOT_TRACK": "false", "PATH": "/bin"}, tracking_uri="sqlite:///x.db")
    assert env["DO_NOT_TRACK"] == "false" and env["MLFLOW_DISABLE_TELEMETRY"] == "true" and env["PATH"] == "/bin"
