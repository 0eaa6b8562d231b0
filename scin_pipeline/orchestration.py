"""Operating the pipeline: jobs, the weekly schedule, the new-release sensor and run-failure alerts.

Jobs select asset GROUPS, not asset lists, so a job picks up the assets a group gains later:
``training_job`` selects the ``training`` and ``evaluation`` groups and is an empty, harmless job in a
code location that has none of them yet.

Every job run covers all shards of the sharded ``image_quality`` asset in one run (the asset's process
pool does the fan-out), exactly as the CLI runner does; schedules and sensors put the same partition
range tags on their run requests (:func:`all_shards_tags`).

Automation is opt-in per deployment: the schedule and the release sensor start STOPPED unless
``SCIN_AUTOMATION=on`` (docker/compose.yaml sets it), so ``scin-pipeline ui`` on a laptop never launches a
full run against the bucket by itself. The failure-alert sensor is on everywhere: it only writes a JSON
line under the data root unless ``SCIN_ALERT_WEBHOOK_URL`` is set.

The release sensor's rule is plain Python (:class:`ReleaseState`, :func:`observe_release`), callable
without Dagster. Against the bucket a tick costs two metadata requests (one ``stat`` per CSV); the cases
CSV is downloaded only when an object's generation or checksum has changed, to read its ``release``
column. A re-upload of identical bytes is a new generation, hence a new run: the bucket says the object
was published again, and a rerun on unchanged content changes no table.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SkipReason,
    define_asset_job,
    run_failure_sensor,
    schedule,
    sensor,
)

from scin_pipeline.assets.curation import quality_shards
from scin_pipeline.core.alerts import DAGSTER_URL_ENV, Alert, alert_sinks_from_env, deliver, run_link, shorten
from scin_pipeline.core.paths import CASES_OBJECT, METADATA_OBJECTS
from scin_pipeline.core.raw import releases_in_csv
from scin_pipeline.core.sources import (
    CorruptObject,
    ObjectMissing,
    ScinSource,
    SourceUnreachable,
    TransientSourceError,
    crc32c_b64,
)
from scin_pipeline.resources import ScinSourceResource, StoragePaths

AUTOMATION_ENV = "SCIN_AUTOMATION"  # "on": the schedule and the release sensor start RUNNING
RELEASE_SENSOR_INTERVAL_ENV = "SCIN_RELEASE_SENSOR_INTERVAL_S"
DEFAULT_RELEASE_SENSOR_INTERVAL_S = 3600
# A sensor tick must finish well inside the daemon's evaluation timeout (60 s by default).
SENSOR_SOURCE_TIMEOUT_S = 20.0
WEEKLY_CRON = "0 3 * * 1"  # Mondays 03:00
SCHEDULE_TIMEZONE = "UTC"

TRIGGER_TAG = "scin/trigger"
# Runs launched by `scin-pipeline run`/`demo` carry ENTRY_TAG=CLI_ENTRY and deliver their failure alert themselves.
ENTRY_TAG = "scin/entry"
CLI_ENTRY = "cli"
RELEASE_TAG = "scin/release"
FINGERPRINT_TAG = "scin/release_fingerprint"

# Dagster's run tags for "one run covers this range of partitions" (single-run backfills). Dagster 1.13
# exports no public constant or RunRequest argument for them (its own constants are in the internal
# dagster._core.storage.tags), so they are named here once. The strings are stored on the runs of every
# single-run backfill and are how Dagster's maintainers say to launch a range as one run (dagster-io/dagster
# discussion 11653); test_orchestration checks that Dagster's RunRequest reads them back as the range.
PARTITION_RANGE_START_TAG = "dagster/asset_partition_range_start"
PARTITION_RANGE_END_TAG = "dagster/asset_partition_range_end"


def all_shards_tags() -> dict[str, str]:
    """Run tags that make one run cover every shard of the sharded curation asset."""
    keys = quality_shards.get_partition_keys()
    return {PARTITION_RANGE_START_TAG: keys[0], PARTITION_RANGE_END_TAG: keys[-1]}


def automation_enabled(env: dict | None = None) -> bool:
    value = (os.environ if env is None else env).get(AUTOMATION_ENV, "")
    return value.strip().lower() in ("1", "on", "true", "yes")


def release_sensor_interval_s(env: dict | None = None) -> int:
    value = (os.environ if env is None else env).get(RELEASE_SENSOR_INTERVAL_ENV, "")
    if not value.strip():
        return DEFAULT_RELEASE_SENSOR_INTERVAL_S
    try:
        seconds = int(value)
    except ValueError:
        raise ValueError(f"{RELEASE_SENSOR_INTERVAL_ENV} must be a whole number of seconds, got {value!r}") from None
    if seconds < 30:
        raise ValueError(f"{RELEASE_SENSOR_INTERVAL_ENV} must be at least 30 seconds, got {seconds}")
    return seconds


# --------------------------------------------------------------------------------------------------
# Jobs.

full_pipeline_job = define_asset_job(
    "full_pipeline",
    selection=AssetSelection.all(),
    description="Every asset and check, from the source to the reports.",
)

curation_job = define_asset_job(
    "curation_job",
    selection=AssetSelection.groups("ingest", "curation"),
    description="Ingest and curate: metadata, verified image copies, quality, near-duplicates, splits. No training.",
)

training_job = define_asset_job(
    "training_job",
    selection=AssetSelection.groups("training", "evaluation"),
    description="Train and evaluate the candidate models from the current splits (reads the curated "
    "tables; does not re-curate). GPU steps are limited by the instance's 'gpu' pool.",
)

ALL_JOBS = [full_pipeline_job, curation_job, training_job]


# --------------------------------------------------------------------------------------------------
# The weekly rerun.


@schedule(
    name="weekly_full_pipeline",
    cron_schedule=WEEKLY_CRON,
    execution_timezone=SCHEDULE_TIMEZONE,
    job=full_pipeline_job,
    default_status=DefaultScheduleStatus.RUNNING if automation_enabled() else DefaultScheduleStatus.STOPPED,
    description="Reruns the whole pipeline every Monday 03:00 UTC. Unchanged inputs change no table "
    "(content-addressed files, deterministic splits); MLflow training runs are reused by their key.",
)
def weekly_full_pipeline(context: ScheduleEvaluationContext) -> RunRequest:
    when = context.scheduled_execution_time or datetime.now(UTC)
    return RunRequest(
        run_key=f"weekly-{when.astimezone(UTC):%Y-%m-%dT%H%M}",
        tags={**all_shards_tags(), TRIGGER_TAG: "weekly_full_pipeline"},
    )


# --------------------------------------------------------------------------------------------------
# New-release detection: pure rule.


@dataclass(frozen=True)
class ReleaseState:
    """What the source's metadata objects looked like at one observation."""

    objects: dict[str, dict]  # object path -> {"generation", "size", "crc32c", "md5"}
    releases: tuple[str, ...]  # distinct values of the cases CSV's release column
    observed_at: str = field(default="", compare=False)

    @property
    def fingerprint(self) -> str:
        """Identity of the release as published: object versions and checksums plus the release ids."""
        canonical = json.dumps({"objects": self.objects, "releases": list(self.releases)}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:20]

    @property
    def release_label(self) -> str:
        return ",".join(self.releases) or "unknown"

    def to_cursor(self) -> str:
        return json.dumps(
            {
                "objects": self.objects,
                "releases": list(self.releases),
                "fingerprint": self.fingerprint,
                "observed_at": self.observed_at,
            },
            sort_keys=True,
        )

    @classmethod
    def from_cursor(cls, cursor: str | None) -> ReleaseState | None:
        """The state a cursor recorded; None for no cursor or one this code cannot read (a fresh start)."""
        if not cursor:
            return None
        try:
            raw = json.loads(cursor)
            objects = {str(k): dict(v) for k, v in raw["objects"].items()}
            return cls(objects, tuple(str(r) for r in raw.get("releases", [])), str(raw.get("observed_at", "")))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def object_versions(source: ScinSource) -> dict[str, dict]:
    """Generation, size and checksums of the two metadata CSVs.

    The bucket reports a CRC32C for every object, so this costs two metadata requests and no download.
    A local mirror without a checksum manifest reports none, and its generation (the mtime) is only as
    fine as the kernel's clock tick, so there the CRC32C is computed from the bytes (a few MB, locally).
    """
    versions = {}
    for path in METADATA_OBJECTS:
        info = source.stat(path)
        crc32c = info.crc32c
        if crc32c is None and info.md5 is None:
            data, info = source.read_bytes(path)
            crc32c = crc32c_b64(data)
        versions[path] = {"generation": info.generation, "size": info.size, "crc32c": crc32c, "md5": info.md5}
    return versions


def observe_release(
    source: ScinSource, previous: ReleaseState | None = None, now: datetime | None = None
) -> ReleaseState:
    """The source's current release state; the cases CSV is read only when its objects changed."""
    objects = object_versions(source)
    observed_at = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    if previous is not None and previous.objects == objects:
        return ReleaseState(objects, previous.releases, observed_at)
    data, _info = source.read_bytes(CASES_OBJECT)
    return ReleaseState(objects, releases_in_csv(data), observed_at)


def describe_change(previous: ReleaseState | None, current: ReleaseState) -> str:
    """One line saying what changed between two observations (for run tags, logs and skip reasons)."""
    if previous is None:
        return f"first observation: release {current.release_label}"
    parts = []
    for path in METADATA_OBJECTS:
        before, after = previous.objects.get(path, {}), current.objects.get(path, {})
        if before != after:
            name = path.rsplit("/", 1)[-1]
            changed = [
                f"{key} {before.get(key)} -> {after.get(key)}"
                for key in sorted(after)
                if before.get(key) != after.get(key)
            ]
            parts.append(f"{name}: {', '.join(changed)}")
    if previous.releases != current.releases:
        parts.append(f"release {previous.release_label} -> {current.release_label}")
    return "; ".join(parts) or "no change"


def summarize(state: ReleaseState) -> str:
    generations = ", ".join(
        f"{p.rsplit('/', 1)[-1]} generation {state.objects[p]['generation']}"
        for p in METADATA_OBJECTS
        if p in state.objects
    )
    return f"release {state.release_label} ({generations})"


# --------------------------------------------------------------------------------------------------
# New-release detection: the sensor.

_SOURCE_ERRORS = (SourceUnreachable, TransientSourceError, ObjectMissing, CorruptObject, OSError, ValueError)


@sensor(
    name="scin_release_sensor",
    job=full_pipeline_job,
    minimum_interval_seconds=release_sensor_interval_s(),
    default_status=DefaultSensorStatus.RUNNING if automation_enabled() else DefaultSensorStatus.STOPPED,
    description="Launches full_pipeline when the SCIN metadata CSVs get a new generation or checksum, "
    "or the release column changes. Cursor: the last seen object versions and release ids. "
    f"Interval: ${RELEASE_SENSOR_INTERVAL_ENV} (default {DEFAULT_RELEASE_SENSOR_INTERVAL_S} s).",
)
def scin_release_sensor(context: SensorEvaluationContext, scin_source: ScinSourceResource):
    previous = ReleaseState.from_cursor(context.cursor)
    if context.cursor and previous is None:
        context.log.warning("scin_release_sensor: unreadable cursor, treating this tick as the first")
    try:
        source = scin_source.open(timeout_s=SENSOR_SOURCE_TIMEOUT_S)
        source.check_reachable(timeout_s=SENSOR_SOURCE_TIMEOUT_S / 2)
        current = observe_release(source, previous)
    except _SOURCE_ERRORS as exc:
        return SkipReason(f"SCIN source {scin_source.location} not checked this tick ({type(exc).__name__}): {exc}")
    if previous is not None and current.fingerprint == previous.fingerprint:
        return SkipReason(
            f"SCIN release unchanged at {source.uri}: {summarize(current)}, "
            f"fingerprint {current.fingerprint}, first seen {previous.observed_at or 'earlier'}"
        )
    change = describe_change(previous, current)
    context.log.info(f"scin_release_sensor: {change}")
    # The cursor moves only on a change, so it keeps when the current state was first seen.
    context.update_cursor(current.to_cursor())
    return RunRequest(
        run_key=current.fingerprint,
        tags={
            **all_shards_tags(),
            TRIGGER_TAG: "scin_release_sensor",
            RELEASE_TAG: current.release_label,
            FINGERPRINT_TAG: current.fingerprint,
            "scin/release_change": shorten(change, 200),
        },
    )


# --------------------------------------------------------------------------------------------------
# Run-failure alerts.


def _root_error(error) -> str:
    """The innermost cause of a Dagster SerializableErrorInfo: the message a person can act on."""
    while error is not None and error.cause is not None:
        error = error.cause
    if error is None:
        return ""
    message = (error.message or "").strip()
    return f"{error.cls_name}: {message}" if error.cls_name and not message.startswith(error.cls_name) else message


def alert_for_run(run, step_failures, failure_message: str | None = None, now: datetime | None = None) -> Alert:
    """The alert for one failed run: its job, id, failed steps and root error. ``step_failures`` are its
    STEP_FAILURE events; ``failure_message`` the run failure's message, used when no step failed."""
    failed_steps = sorted({event.step_key for event in step_failures if event.step_key})
    errors = [
        _root_error(event.step_failure_data.error)
        for event in step_failures
        if event.step_failure_data and event.step_failure_data.error
    ]
    if not errors:  # a run-level failure (bad config, a killed worker): the failure event says why
        errors = [failure_message or "run failed"]
    return Alert(
        kind="run_failure",
        job=run.job_name,
        run_id=run.run_id,
        failed_steps=failed_steps,
        error=shorten(" | ".join(dict.fromkeys(errors))),
        time=(now or datetime.now(UTC)).isoformat(timespec="seconds"),
        link=run_link(run.run_id, os.environ.get(DAGSTER_URL_ENV)),
        tags={k: v for k, v in run.tags.items() if k.startswith("scin/")},
    )


def alert_from_failure(context: RunFailureSensorContext, now: datetime | None = None) -> Alert:
    """The alert for the failed run a failure sensor was called for."""
    return alert_for_run(context.dagster_run, context.get_step_failure_events(), context.failure_event.message, now=now)


@run_failure_sensor(
    name="run_failure_alert_sensor",
    default_status=DefaultSensorStatus.RUNNING,
    description="On every failed run in this code location: one JSON line in "
    "<data_root>/alerts/alerts.jsonl, and a POST to $SCIN_ALERT_WEBHOOK_URL (Slack-compatible) when set. "
    "Runs launched by `scin-pipeline run`/`demo` (tag scin/entry=cli, no parent run) are skipped: the CLI "
    "alerts for them.",
)
def run_failure_alert_sensor(context: RunFailureSensorContext, storage: StoragePaths) -> None:
    # A re-execution from the UI inherits the parent's tags but has a parent: that one is the sensor's.
    if context.dagster_run.tags.get(ENTRY_TAG) == CLI_ENTRY and context.dagster_run.parent_run_id is None:
        context.log.info(f"run {context.dagster_run.run_id} came from the CLI, which delivered its alert itself")
        return
    alert = alert_from_failure(context)
    for outcome in deliver(alert, alert_sinks_from_env(storage.root)):
        if outcome.ok:
            context.log.info(f"alert for run {alert.run_id} delivered to {outcome.sink}")
        else:
            context.log.error(f"alert for run {alert.run_id} NOT delivered to {outcome.sink}: {outcome.detail}")


ALL_SCHEDULES = [weekly_full_pipeline]
ALL_SENSORS = [scin_release_sensor, run_failure_alert_sensor]
