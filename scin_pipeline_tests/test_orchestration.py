"""Jobs, the weekly schedule, the new-release sensor and the run-failure alerts, evaluated in-process."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from dagster import (
    AssetKey,
    DagsterInstance,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    Definitions,
    PartitionKeyRange,
    RunRequest,
    SkipReason,
    build_run_status_sensor_context,
    build_schedule_context,
    build_sensor_context,
    job,
    op,
)

from scin_pipeline.assets import ALL_ASSET_CHECKS, ALL_ASSETS
from scin_pipeline.assets.curation import quality_shards
from scin_pipeline.core.alerts import WEBHOOK_URL_ENV, read_alerts
from scin_pipeline.core.paths import CASES_OBJECT, LABELS_OBJECT
from scin_pipeline.core.sources import LocalMirrorSource
from scin_pipeline.core.synthetic.mirror import write_synthetic_mirror
from scin_pipeline.definitions import build_resources, defs
from scin_pipeline.orchestration import (
    ALL_JOBS,
    CLI_ENTRY,
    ENTRY_TAG,
    FINGERPRINT_TAG,
    RELEASE_TAG,
    ReleaseState,
    all_shards_tags,
    automation_enabled,
    observe_release,
    release_sensor_interval_s,
    run_failure_alert_sensor,
    scin_release_sensor,
    weekly_full_pipeline,
)
from scin_pipeline.resources import ScinSourceResource, StoragePaths
from scin_pipeline_tests.gcs_emulator import closed_loopback_port  # gcs_emulator: a fixture (conftest plugin)
from scin_pipeline_tests.tiny_mirror import cases_csv, labels_csv, write_tiny_mirror


def asset_keys_in_groups(*groups: str) -> set[AssetKey]:
    return {spec.key for spec in defs.resolve_all_asset_specs() if spec.group_name in groups}


def job_asset_keys(name: str) -> set[AssetKey]:
    return set(defs.resolve_job_def(name).asset_layer.selected_asset_keys)


# ---- definitions ----------------------------------------------------------------------------------


def test_definitions_load_with_every_job_schedule_and_sensor():
    Definitions.validate_loadable(defs)
    jobs = {j.name for j in defs.resolve_all_job_defs() if not j.name.startswith("__")}
    assert {"full_pipeline", "curation_job", "training_job"} <= jobs
    assert {s.name for s in defs.schedules} == {"weekly_full_pipeline"}
    assert {s.name for s in defs.sensors} == {"scin_release_sensor", "run_failure_alert_sensor"}


def test_jobs_select_by_group_so_they_follow_the_assets_a_group_gains():
    assert job_asset_keys("curation_job") == asset_keys_in_groups("ingest", "curation")
    assert AssetKey("labeled_splits") in job_asset_keys("curation_job")
    # Empty while no training or evaluation asset exists; the lead's training assets join it by group.
    assert job_asset_keys("training_job") == asset_keys_in_groups("training", "evaluation")
    assert not job_asset_keys("training_job") & asset_keys_in_groups("ingest", "curation")
    assert job_asset_keys("full_pipeline") == {spec.key for spec in defs.resolve_all_asset_specs()}


def k8s_limits(op_def) -> dict:
    """The container resource limits a step asks Kubernetes for (its ``dagster-k8s/config`` tag)."""
    config = op_def.tags.get("dagster-k8s/config") or {}
    if isinstance(config, str):
        config = json.loads(config)
    return config.get("container_config", {}).get("resources", {}).get("limits", {})


def gpu_pool() -> str:
    """The one concurrency pool of the steps that ask Kubernetes for a GPU (the training assets declare
    it; docker/compose.yaml's daemon sets its limit)."""
    pools = {a.op.pool for a in defs.assets if "nvidia.com/gpu" in k8s_limits(a.op)}
    assert len(pools) == 1 and None not in pools, f"GPU steps must share one pool, got {pools}"
    return pools.pop()


def test_every_step_that_asks_kubernetes_for_a_gpu_is_in_the_gpu_pool():
    """The pool (one step per GPU, docker/dagster.yaml) and the k8s GPU request must travel together:
    a GPU step outside the pool would oversubscribe a GPU host; a pool member without the request would
    get a pod with no GPU on Kubernetes."""
    pool = gpu_pool()
    for assets_def in defs.assets:
        op_def = assets_def.op
        limits = k8s_limits(op_def)
        asks_for_gpu = "nvidia.com/gpu" in limits
        assert asks_for_gpu == (op_def.pool == pool), f"{op_def.name}: pool {op_def.pool}, k8s limits {limits}"


def test_the_shard_range_tags_are_the_ones_dagster_reads():
    """all_shards_tags names Dagster's partition-range run tags by their documented strings (no public
    constant exists): Dagster's own RunRequest must read them back as the range of every shard."""
    keys = quality_shards.get_partition_keys()
    assert RunRequest(tags=all_shards_tags()).partition_key_range == PartitionKeyRange(keys[0], keys[-1])


def test_automation_is_opt_in_and_failure_alerts_are_always_on():
    assert not automation_enabled({})
    assert automation_enabled({"SCIN_AUTOMATION": "on"}) and automation_enabled({"SCIN_AUTOMATION": "1"})
    assert not automation_enabled({"SCIN_AUTOMATION": "off"})
    # Imported without SCIN_AUTOMATION (the test environment): schedule and release sensor are stopped.
    assert weekly_full_pipeline.default_status == DefaultScheduleStatus.STOPPED
    assert scin_release_sensor.default_status == DefaultSensorStatus.STOPPED
    assert run_failure_alert_sensor.default_status == DefaultSensorStatus.RUNNING


def test_release_sensor_interval_defaults_to_an_hour_and_rejects_nonsense():
    assert release_sensor_interval_s({}) == 3600
    sensor_interval = scin_release_sensor.minimum_interval_seconds
    assert sensor_interval == 3600
    assert release_sensor_interval_s({"SCIN_RELEASE_SENSOR_INTERVAL_S": "600"}) == 600
    with pytest.raises(ValueError, match="SCIN_RELEASE_SENSOR_INTERVAL_S"):
        release_sensor_interval_s({"SCIN_RELEASE_SENSOR_INTERVAL_S": "hourly"})
    with pytest.raises(ValueError, match="at least 30"):
        release_sensor_interval_s({"SCIN_RELEASE_SENSOR_INTERVAL_S": "5"})


# ---- the weekly schedule ----------------------------------------------------------------------------


def test_weekly_schedule_requests_a_full_pipeline_run_on_mondays_at_three_utc():
    from dagster._utils.schedules import cron_string_iterator

    assert weekly_full_pipeline.job_name == "full_pipeline"
    assert weekly_full_pipeline.execution_timezone == "UTC"
    wednesday = datetime(2026, 1, 7, 12, 0, tzinfo=UTC)
    ticks = cron_string_iterator(wednesday.timestamp(), weekly_full_pipeline.cron_schedule, "UTC")
    first, second = next(ticks), next(ticks)
    assert (first.weekday(), first.hour, first.minute) == (0, 3, 0)  # the next Monday, 03:00
    assert (second - first).days == 7

    data = weekly_full_pipeline.evaluate_tick(build_schedule_context(scheduled_execution_time=first))
    assert data.skip_message is None
    [request] = data.run_requests
    assert request.run_key == "weekly-2026-01-12T0300"
    assert request.tags["scin/trigger"] == "weekly_full_pipeline"
    for key, value in all_shards_tags().items():  # one run covers every curation shard
        assert request.tags[key] == value


def test_a_scheduled_run_request_is_launchable_and_covers_every_shard(tmp_path):
    """The partition range tags of a schedule/sensor request let a job run all shards in one run
    (what the daemon launches); curation_job stands in for full_pipeline, which will also train."""
    mirror = write_synthetic_mirror(tmp_path / "mirror", n_cases=20, seed=1, image_size=(200, 150), defect_rate=0.0)
    data_root = tmp_path / "data"
    data = weekly_full_pipeline.evaluate_tick(
        build_schedule_context(scheduled_execution_time=datetime(2026, 1, 12, 3, tzinfo=UTC))
    )
    [request] = data.run_requests
    local_defs = Definitions(
        assets=ALL_ASSETS,
        asset_checks=ALL_ASSET_CHECKS,
        jobs=ALL_JOBS,
        resources=build_resources(data_root=str(data_root), source=str(mirror.root)),
    )
    result = local_defs.resolve_job_def("curation_job").execute_in_process(
        instance=DagsterInstance.ephemeral(),
        tags=request.tags,
        raise_on_error=False,
        run_config={"ops": {"image_quality": {"config": {"workers": 1}}}},
    )
    assert result.success
    shards = sorted(p.stem for p in (data_root / "tables" / "image_quality").glob("*.parquet"))
    assert shards == [f"{i:02d}" for i in range(16)]
    assert len(pd.read_parquet(data_root / "tables" / "labeled_splits.parquet")) > 0


# ---- the release sensor: pure rule -------------------------------------------------------------------


def test_release_state_round_trips_through_the_cursor_and_tolerates_a_bad_one(tmp_path):
    state = observe_release(LocalMirrorSource(write_tiny_mirror(tmp_path / "m")))
    assert state.releases == ("1.0.0",)
    again = ReleaseState.from_cursor(state.to_cursor())
    assert again == state and again.fingerprint == state.fingerprint
    assert ReleaseState.from_cursor(None) is None
    assert ReleaseState.from_cursor("not json") is None
    assert ReleaseState.from_cursor('{"objects": 3}') is None


# ---- the release sensor: ticks ------------------------------------------------------------------------


def tick(location: str, cursor: str | None):
    """One sensor evaluation; returns (result, cursor after the tick)."""
    context = build_sensor_context(cursor=cursor, resources={"scin_source": ScinSourceResource(location=location)})
    result = scin_release_sensor(context)
    return result, context.cursor


def test_release_sensor_on_a_mirror_runs_once_per_release(tmp_path):
    mirror = write_tiny_mirror(tmp_path / "mirror")
    first, cursor = tick(str(mirror), None)
    assert isinstance(first, RunRequest)
    assert first.tags[RELEASE_TAG] == "1.0.0"
    assert first.run_key == first.tags[FINGERPRINT_TAG] == json.loads(cursor)["fingerprint"]
    for key, value in all_shards_tags().items():
        assert first.tags[key] == value

    unchanged, cursor_after = tick(str(mirror), cursor)
    assert isinstance(unchanged, SkipReason)
    assert "unchanged" in unchanged.skip_message and "1.0.0" in unchanged.skip_message
    assert cursor_after == cursor

    # New labels content (same release id): a new object version, so a new run with a new key.
    labels = mirror / LABELS_OBJECT
    labels.write_text(labels_csv().replace("Eczema", "Dermatitis"))
    relabelled, cursor2 = tick(str(mirror), cursor)
    assert isinstance(relabelled, RunRequest)
    assert relabelled.run_key != first.run_key
    assert "scin_labels.csv" in relabelled.tags["scin/release_change"]

    # A new value in the release column (same length, so the size alone would not tell).
    (mirror / CASES_OBJECT).write_text(cases_csv().replace("1.0.0", "1.1.0"))
    new_release, cursor3 = tick(str(mirror), cursor2)
    assert isinstance(new_release, RunRequest)
    assert new_release.tags[RELEASE_TAG] == "1.1.0"
    assert "release 1.0.0 -> 1.1.0" in new_release.tags["scin/release_change"]
    assert len({first.run_key, relabelled.run_key, new_release.run_key}) == 3
    assert isinstance(tick(str(mirror), cursor3)[0], SkipReason)


def test_release_sensor_on_the_bucket_follows_object_generations(gcs_emulator):
    gcs_emulator.upload(CASES_OBJECT, cases_csv().encode(), "text/csv")
    gcs_emulator.upload(LABELS_OBJECT, labels_csv().encode(), "text/csv")
    first, cursor = tick("gcs", None)
    assert isinstance(first, RunRequest) and first.tags[RELEASE_TAG] == "1.0.0"
    cases_downloads = gcs_emulator.downloads(CASES_OBJECT)

    unchanged, _ = tick("gcs", cursor)
    assert isinstance(unchanged, SkipReason)
    # An unchanged tick asks for metadata only: the CSV is not downloaded again.
    assert gcs_emulator.downloads(CASES_OBJECT) == cases_downloads

    before = gcs_emulator.metadata(LABELS_OBJECT)["generation"]
    gcs_emulator.upload(LABELS_OBJECT, labels_csv().encode(), "text/csv")  # the same bytes, republished
    assert gcs_emulator.metadata(LABELS_OBJECT)["generation"] != before
    republished, _ = tick("gcs", cursor)
    assert isinstance(republished, RunRequest)
    assert republished.run_key != first.run_key
    assert "generation" in republished.tags["scin/release_change"]


def test_release_sensor_reads_with_the_resources_credentials(gcs_emulator, monkeypatch):
    """The sensor opens the source as the resource says (here ADC and a requester-pays billing project)."""
    from google.auth.credentials import AnonymousCredentials

    gcs_emulator.upload(CASES_OBJECT, cases_csv().encode(), "text/csv")
    gcs_emulator.upload(LABELS_OBJECT, labels_csv().encode(), "text/csv")
    uploads = len(gcs_emulator.requests_seen())
    monkeypatch.setattr("google.auth.default", lambda scopes=None, **kw: (AnonymousCredentials(), None))
    resource = ScinSourceResource(location="gcs", auth="application_default", user_project="billing-3")
    result = scin_release_sensor(build_sensor_context(resources={"scin_source": resource}))
    assert isinstance(result, RunRequest)
    seen = gcs_emulator.requests_seen()[uploads:]
    assert seen and all(r["query"].get("userProject") == ["billing-3"] for r in seen)


def test_release_sensor_skips_with_the_reason_when_the_source_is_unreachable(tmp_path, monkeypatch):
    absent = tmp_path / "no-such-mirror"
    result, cursor = tick(str(absent), None)
    assert isinstance(result, SkipReason)
    assert str(absent) in result.skip_message and "does not exist" in result.skip_message
    assert cursor is None

    endpoint = f"http://127.0.0.1:{closed_loopback_port()}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    result, _ = tick("gcs", None)
    assert isinstance(result, SkipReason)
    assert "cannot reach" in result.skip_message and endpoint in result.skip_message


# ---- run-failure alerts ----------------------------------------------------------------------------------


@op
def planted_failure():
    raise ValueError("planted failure for the alert test")


@job
def failing_job():
    planted_failure()


def evaluate_failure_sensor(data_root: Path, tags: dict | None = None):
    instance = DagsterInstance.ephemeral()
    result = failing_job.execute_in_process(instance=instance, raise_on_error=False, tags=tags)
    assert not result.success
    context = build_run_status_sensor_context(
        sensor_name="run_failure_alert_sensor",
        dagster_event=result.get_run_failure_event(),
        dagster_instance=instance,
        dagster_run=instance.get_run_by_id(result.run_id),
        resources={"storage": StoragePaths(data_root=str(data_root))},
    ).for_run_failure()
    run_failure_alert_sensor(context)
    return result.run_id


def test_failure_sensor_records_the_job_run_steps_and_error(tmp_path, monkeypatch):
    monkeypatch.delenv(WEBHOOK_URL_ENV, raising=False)
    run_id = evaluate_failure_sensor(tmp_path / "data")
    [alert] = read_alerts(tmp_path / "data")
    assert alert["job"] == "failing_job" and alert["run_id"] == run_id
    assert alert["failed_steps"] == ["planted_failure"]
    assert alert["error"] == "ValueError: planted failure for the alert test"
    assert alert["link"] == f"/runs/{run_id}"
    datetime.fromisoformat(alert["time"])  # a parseable timestamp
    evaluate_failure_sensor(tmp_path / "data")
    assert len(read_alerts(tmp_path / "data")) == 2  # appended, never overwritten


def test_failure_sensor_leaves_cli_runs_to_the_cli(tmp_path, monkeypatch):
    """A failed `scin-pipeline run` delivers its own alert (test_cli); the sensor, which now sees such runs
    as runs of this code location, must not send a second one."""
    monkeypatch.delenv(WEBHOOK_URL_ENV, raising=False)
    evaluate_failure_sensor(tmp_path / "data", tags={ENTRY_TAG: CLI_ENTRY})
    assert read_alerts(tmp_path / "data") == []
    evaluate_failure_sensor(tmp_path / "data", tags={ENTRY_TAG: "ui"})
    assert len(read_alerts(tmp_path / "data")) == 1


class _Recorder(BaseHTTPRequestHandler):
    received: list[dict]
    status = 200

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append({"content_type": self.headers["Content-Type"], "json": json.loads(body)})
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def webhook():
    """A loopback HTTP server that records each POSTed JSON body; .status sets its answer."""
    handler = type("Recorder", (_Recorder,), {"received": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}/services/T000/B000/secret"
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


def test_failure_sensor_posts_a_slack_compatible_json_to_the_webhook(tmp_path, monkeypatch, webhook):
    monkeypatch.setenv(WEBHOOK_URL_ENV, webhook.url)
    monkeypatch.setenv("SCIN_DAGSTER_URL", "http://dagster.example:3000/")
    run_id = evaluate_failure_sensor(tmp_path / "data")
    [post] = webhook.received
    assert post["content_type"] == "application/json"
    text = post["json"]["text"]
    assert "failing_job" in text and run_id in text and "planted failure for the alert test" in text
    assert post["json"]["alert"]["link"] == f"http://dagster.example:3000/runs/{run_id}"
    assert read_alerts(tmp_path / "data")[0]["run_id"] == run_id  # the file gets it too


@pytest.mark.parametrize("problem", ["http_500", "closed_port", "bad_url"])
def test_a_broken_webhook_never_fails_the_sensor_and_the_file_still_gets_the_alert(
    tmp_path, monkeypatch, webhook, problem
):
    url = {
        "http_500": webhook.url,
        "closed_port": f"http://127.0.0.1:{closed_loopback_port()}/hook",
        "bad_url": "ftp://example.org/hook",
    }[problem]
    webhook.status = 500
    monkeypatch.setenv(WEBHOOK_URL_ENV, url)
    monkeypatch.setenv("SCIN_ALERT_WEBHOOK_TIMEOUT_S", "5")
    run_id = evaluate_failure_sensor(tmp_path / "data")  # does not raise
    assert [a["run_id"] for a in read_alerts(tmp_path / "data")] == [run_id]
