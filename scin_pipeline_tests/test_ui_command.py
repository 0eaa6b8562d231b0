"""`scin-pipeline ui` starts Dagster and MLflow on loopback, and stopping it stops them all."""

from __future__ import annotations

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
