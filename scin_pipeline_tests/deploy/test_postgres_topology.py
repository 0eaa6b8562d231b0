"""The deployment topology without Docker: PostgreSQL from Debian's packages, Dagster code servers, the
webserver and the daemon as processes on loopback, the MLflow server on PostgreSQL.

One topology serves the module (starting it is most of the cost). The probe's every-minute schedule is
started when the topology comes up, so its first tick (at the next minute boundary) happens while the
run and MLflow tests work; the tick test comes last and usually waits for nothing.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from dagster import AssetKey, DagsterEventType

from scin_pipeline.orchestration import TRIGGER_TAG, WEEKLY_CRON
from scin_pipeline_tests.deploy.probe_location import PROBE_LOCATION, PROBE_SCHEDULE
from scin_pipeline_tests.deploy.services import wait_until
from scin_pipeline_tests.deploy.topology import REPOSITORY, SCIN_LOCATION

pytestmark = pytest.mark.slow

INGEST_SELECTION = ["raw_metadata", "cases", "images", "metadata_quarantine"]

SCHEDULE_QUERY = """
query Schedule($selector: ScheduleSelector!) { scheduleOrError(scheduleSelector: $selector) { __typename
  ... on Schedule { name cronSchedule executionTimezone scheduleState { status
        ticks(limit: 10) { status timestamp runIds error { message } } }
      futureTicks(limit: 1) { results { timestamp } } }
  ... on PythonError { message } ... on ScheduleNotFoundError { message } } }
"""
SCHEDULE_DRY_RUN_MUTATION = """
mutation DryRun($selector: ScheduleSelector!, $timestamp: Float) {
  scheduleDryRun(selectorData: $selector, timestamp: $timestamp) { __typename
    ... on DryRunInstigationTick { evaluationResult { runRequests { runKey tags { key value } }
        skipReason error { message } } }
    ... on PythonError { message } } }
"""


def schedule_selector(location: str, name: str) -> dict:
    return {"repositoryLocationName": location, "repositoryName": REPOSITORY, "scheduleName": name}


def test_run_launched_through_graphql_is_queued_executed_and_stored_in_postgres(topology):
    run_id = topology.launch_run("curation_job", INGEST_SELECTION)

    status = topology.wait_for_run(run_id)

    assert status == "SUCCESS", topology.failure_messages(run_id)
    ((stored_status, job_name),) = topology.postgres.query(
        "dagster", "SELECT status, pipeline_name FROM runs WHERE run_id = %s", (run_id,)
    )
    assert (stored_status, job_name) == ("SUCCESS", "curation_job")
    events = topology.postgres.query(
        "dagster", "SELECT dagster_event_type, asset_key FROM event_logs WHERE run_id = %s", (run_id,)
    )
    event_types = {event_type for event_type, _ in events}
    # Enqueued by the webserver, dequeued and launched by the daemon: the QueuedRunCoordinator's path.
    queue_path = (
        DagsterEventType.RUN_ENQUEUED,
        DagsterEventType.RUN_STARTING,
        DagsterEventType.RUN_START,
        DagsterEventType.RUN_SUCCESS,
    )
    assert {event.value for event in queue_path} <= event_types
    materialised = {
        AssetKey.from_db_string(key).to_user_string()
        for event_type, key in events
        if event_type == DagsterEventType.ASSET_MATERIALIZATION.value
    }
    assert materialised == set(INGEST_SELECTION)
    # The code server ran with the deployment's SCIN_DATA_ROOT and SCIN_SOURCE: the tiny mirror's 4 cases.
    cases = pd.read_parquet(topology.data_root / "tables" / "cases.parquet")
    assert sorted(cases["case_id"]) == ["101", "102", "103", "104"]


def test_project_schedule_is_served_and_evaluates_on_the_code_server(topology):
    selector = schedule_selector(SCIN_LOCATION, "weekly_full_pipeline")
    assert topology.start_schedule(SCIN_LOCATION, "weekly_full_pipeline") == "RUNNING"

    schedule = topology.graphql(SCHEDULE_QUERY, {"selector": selector})["scheduleOrError"]
    assert (schedule["cronSchedule"], schedule["executionTimezone"]) == (WEEKLY_CRON, "UTC")
    next_tick = datetime.fromtimestamp(schedule["futureTicks"]["results"][0]["timestamp"], UTC)
    assert timedelta(0) < next_tick - datetime.now(UTC) <= timedelta(days=7)
    # The weekly schedule cannot tick during a test; a dry run evaluates it on the code server instead.
    dry_run = topology.graphql(SCHEDULE_DRY_RUN_MUTATION, {"selector": selector, "timestamp": next_tick.timestamp()})[
        "scheduleDryRun"
    ]
    result = dry_run["evaluationResult"]
    assert result["error"] is None, result["error"]
    (request,) = result["runRequests"]
    assert {"key": TRIGGER_TAG, "value": "weekly_full_pipeline"} in request["tags"]


def test_mlflow_server_on_postgres_records_a_training_run(topology):
    from sklearn.linear_model import SGDClassifier
    from sklearn.model_selection import train_test_split

    from scin_pipeline.resources import MlflowTracking, StoragePaths

    # A tiny SYNTHETIC training, three epochs of SGD: the point is where the run is recorded, not the model.
    rng = np.random.default_rng(0)
    features = rng.normal(size=(120, 4))
    labels = (features[:, 0] + 0.5 * features[:, 1] > 0).astype(int)
    x_train, x_val, y_train, y_val = train_test_split(features, labels, test_size=0.25, random_state=0)
    tracking = MlflowTracking(
        tracking_uri=topology.mlflow_url,
        storage=StoragePaths(data_root=str(topology.data_root)),
        experiment_name="deploy-topology-synthetic",
    )
    model = SGDClassifier(loss="log_loss", random_state=0)
    with tracking.training_run(
        run_key="deploy-topology:synthetic-sgd",
        run_name="synthetic-sgd",
        tags={"scin.synthetic_data": "true"},
        params={"loss": "log_loss"},
    ) as run:
        for epoch in range(3):
            model.partial_fit(x_train, y_train, classes=[0, 1])
            run.log_epoch(epoch, {"val_accuracy": float(model.score(x_val, y_val))})
        run.log_bytes(json.dumps({"coef": model.coef_.tolist()}).encode(), "synthetic_model.json")

    ((status, name),) = topology.postgres.query(
        "mlflow", "SELECT status, name FROM runs WHERE run_uuid = %s", (run.run_id,)
    )
    assert (status, name) == ("FINISHED", "synthetic-sgd")
    steps = topology.postgres.query(
        "mlflow", "SELECT step FROM metrics WHERE run_uuid = %s AND key = 'val_accuracy' ORDER BY step", (run.run_id,)
    )
    assert [step for (step,) in steps] == [0, 1, 2]
    params = topology.postgres.query("mlflow", "SELECT key, value FROM params WHERE run_uuid = %s", (run.run_id,))
    assert ("loss", "log_loss") in params
    # Artifacts go through the server (--serve-artifacts) into its --artifacts-destination.
    (artifact,) = topology.mlflow_artifacts.glob(f"*/{run.run_id}/artifacts/synthetic_model.json")
    assert json.loads(artifact.read_text())["coef"] == model.coef_.tolist()


def test_daemon_processes_a_schedule_tick_and_launches_its_run(topology):
    selector = schedule_selector(PROBE_LOCATION, PROBE_SCHEDULE)

    def successful_tick():
        schedule = topology.graphql(SCHEDULE_QUERY, {"selector": selector})["scheduleOrError"]
        ticks = schedule["scheduleState"]["ticks"]
        failed = [t["error"]["message"] for t in ticks if t["status"] == "FAILURE" and t["error"]]
        assert not failed, failed
        return next((t for t in ticks if t["status"] == "SUCCESS" and t["runIds"]), None)

    # Cron ticks fall on minute boundaries, and the scheduler daemon wakes once a minute.
    tick = wait_until(
        successful_tick, timeout_s=150, what=f"a tick of {PROBE_SCHEDULE}", services=list(topology.services.values())
    )

    run_id = tick["runIds"][0]
    assert topology.wait_for_run(run_id) == "SUCCESS", topology.failure_messages(run_id)
    stored_ticks = topology.postgres.query(
        "dagster",
        "SELECT status FROM job_ticks WHERE type = 'SCHEDULE' AND tick_body LIKE %s",
        (f"%{PROBE_SCHEDULE}%",),
    )
    assert ("SUCCESS",) in stored_ticks
    ((job_name,),) = topology.postgres.query("dagster", "SELECT pipeline_name FROM runs WHERE run_id = %s", (run_id,))
    assert job_name == "deploy_probe_job"
