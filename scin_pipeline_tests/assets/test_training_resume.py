"""A training materialisation SIGKILLed mid-training, then rerun, resumes its MLflow run (issue 4).

The pipeline up to image_tensors is materialised in-process on a SYNTHETIC mirror, so the process that is
killed only trains ``baseline_cnn``. That process is a small driver around ``runner.run_pipeline`` (the
CLI takes no op config, and the default 20 epochs with early stopping would make the kill point
uncertain), started in its own session and killed with its whole process group as soon as the MLflow
store shows two finished epochs. The rerun must continue the SAME MLflow run from the last finished epoch:
one run per run key, each epoch logged once, the resume counted. No figure here is about skin conditions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from scin_pipeline.core.synthetic.mirror import write_synthetic_mirror
from scin_pipeline.resources.mlflow_tracking import (
    CANDIDATE_TAG,
    PREVIOUS_DAGSTER_RUNS_TAG,
    RESUME_COUNT_TAG,
    RUN_KEY_TAG,
)
from scin_pipeline.runner import embedded_mlflow_uri, run_pipeline

pytestmark = pytest.mark.slow

EPOCHS = 12
KILL_AFTER_EPOCHS = 2
UPSTREAM = "group:ingest or group:curation or key:image_tensors"
RUN_CONFIG = {
    "ops": {
        "labeled_splits": {"config": {"min_cases_per_class": 8, "rare_classes": "drop"}},
        "image_quality": {"config": {"tensor_sizes": [32]}},
        # patience = epochs: early stopping must not end the fit before the kill or between kill and rerun.
        "baseline_cnn": {"config": {"epochs": EPOCHS, "early_stopping_patience": EPOCHS, "batch_size": 16}},
    }
}
# The training process: runner.run_pipeline with the op config above (what `scin-pipeline run` does,
# plus config). Exit status 0 only when the run succeeded.
DRIVER = """
import json, sys
from scin_pipeline.runner import run_pipeline
summary = run_pipeline(data_root=sys.argv[1], source=sys.argv[2], select="key:baseline_cnn",
                       run_config=json.loads(sys.argv[3]), log_level="WARNING")
print(summary.render())
sys.exit(summary.exit_code())
"""
TRAINING_TIMEOUT_S = 300


def start_training(data_root: Path, mirror: Path, log: Path) -> subprocess.Popen:
    """The driver in its own session, so the kill takes its whole process group."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": embedded_mlflow_uri(data_root)}
    env.pop("SCIN_ALERT_WEBHOOK_URL", None)
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(data_root), str(mirror), json.dumps(RUN_CONFIG)],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def candidate_runs(client: mlflow.MlflowClient, name: str) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    return client.search_runs(experiments, filter_string=f"tags.`{CANDIDATE_TAG}` = '{name}'")


def logged_epochs(client: mlflow.MlflowClient, name: str) -> list:
    """val_macro_f1 history of the candidate's run(s); [] while none is there yet or the store is busy."""
    try:
        return [
            m
            for run in candidate_runs(client, name)
            for m in client.get_metric_history(run.info.run_id, "val_macro_f1")
        ]
    except Exception:  # the store is being created by the other process: poll again
        return []


def wait_for_epochs(client, proc: subprocess.Popen, count: int, timeout_s: float = TRAINING_TIMEOUT_S) -> list:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        history = logged_epochs(client, "baseline_cnn")
        if len(history) >= count:
            return history
        time.sleep(0.05)
    return logged_epochs(client, "baseline_cnn")


def test_a_training_killed_mid_fit_resumes_its_mlflow_run_from_the_last_finished_epoch(tmp_path):
    mirror = write_synthetic_mirror(
        tmp_path / "mirror", n_cases=200, seed=11, image_size=(160, 120), defect_rate=0.0
    ).root
    data_root = tmp_path / "data"
    upstream = run_pipeline(
        data_root=data_root, source=str(mirror), select=UPSTREAM, run_config=RUN_CONFIG, log_level="WARNING"
    )
    assert upstream.success and "image_tensors" in upstream.materialized, upstream.render()
    client = mlflow.MlflowClient(embedded_mlflow_uri(data_root))

    # 1. Train, and SIGKILL the whole process group once two epochs are in the MLflow store.
    killed_log = tmp_path / "killed.log"
    proc = start_training(data_root, mirror, killed_log)
    try:
        before_kill = wait_for_epochs(client, proc, KILL_AFTER_EPOCHS)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    killed_at_ms = int(time.time() * 1000)
    assert proc.returncode == -signal.SIGKILL, f"not killed mid-training:\n{killed_log.read_text()[-4000:]}"
    [killed_run] = candidate_runs(client, "baseline_cnn")
    assert killed_run.info.status == "RUNNING"  # SIGKILL: nobody could end the run
    finished_steps = sorted(m.step for m in client.get_metric_history(killed_run.info.run_id, "val_macro_f1"))
    assert len(finished_steps) >= KILL_AFTER_EPOCHS, before_kill
    assert finished_steps == list(range(1, len(finished_steps) + 1))
    last_finished = finished_steps[-1]
    assert last_finished < EPOCHS, "the fit ended before the kill: nothing left to resume"
    run_key = killed_run.data.tags[RUN_KEY_TAG]
    killed_dagster_run = killed_run.data.tags["dagster.run_id"]

    # 2. Rerun the same materialisation to the end.
    rerun_log = tmp_path / "rerun.log"
    rerun = start_training(data_root, mirror, rerun_log)
    try:
        code = rerun.wait(timeout=TRAINING_TIMEOUT_S)
    finally:
        if rerun.poll() is None:
            os.killpg(rerun.pid, signal.SIGKILL)
            rerun.wait(timeout=30)
    assert code == 0, rerun_log.read_text()[-4000:]

    # One MLflow run for the key: the killed one, now finished and counted as resumed once.
    runs = client.search_runs([killed_run.info.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'")
    assert [r.info.run_id for r in runs] == [killed_run.info.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags[RESUME_COUNT_TAG] == "1"
    assert run.data.tags["dagster.run_id"] != killed_dagster_run
    assert killed_dagster_run in run.data.tags[PREVIOUS_DAGSTER_RUNS_TAG].split(",")

    # Every epoch logged once, in order, through the kill; the rerun started after the last finished epoch.
    history = sorted(client.get_metric_history(run.info.run_id, "val_macro_f1"), key=lambda m: (m.timestamp, m.step))
    steps = [m.step for m in history]
    assert steps == sorted(set(steps)), f"an epoch was logged twice or out of order: {steps}"
    assert steps == list(range(1, EPOCHS + 1))
    resumed_steps = [m.step for m in history if m.timestamp > killed_at_ms]
    assert resumed_steps and resumed_steps[0] == last_finished + 1, (resumed_steps, last_finished)
    assert steps[:last_finished] == finished_steps

    # The asset's own record: trained (not reused) and resumed; its history table has every epoch once.
    table = pd.read_parquet(data_root / "tables" / "baseline_cnn.parquet")
    assert table["mlflow_run_id"].iloc[0] == run.info.run_id
    assert bool(table["resumed"].iloc[0]) and not bool(table["reused"].iloc[0])
    logged = pd.read_csv(client.download_artifacts(run.info.run_id, "history.csv", str(tmp_path)))
    assert logged["epoch"].tolist() == list(range(1, EPOCHS + 1))
