"""Run the asset graph on embedded defaults, as a real run of a named job, and summarise the outcome.

Used by the ``scin-pipeline`` console script and by the tests. The Dagster instance (SQLite) and the
MLflow store live under the data root, so one folder holds a whole, inspectable run history; a CLI run is
listed in the UI under its job's name (``full_pipeline``, or the smaller job that covers ``--select``) and
can be re-executed from there.
"""

from __future__ import annotations

import errno
import re
import sys
import tempfile
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from dagster import AssetsDefinition, BetaWarning, DagsterInstance, Definitions

from scin_pipeline.assets import ALL_ASSET_CHECKS, ALL_ASSETS
from scin_pipeline.core.atomic import describe_os_error
from scin_pipeline.core.data_root import DataRootLayout
from scin_pipeline.orchestration import CLI_ENTRY, ENTRY_TAG, all_shards_tags
from scin_pipeline.run_console import INVOCATION_TAG, row_count


class DataRootError(RuntimeError):
    """The data root cannot be created or written."""


def prepare_data_root(data_root: str | Path) -> Path:
    """Create the data root and prove it is writable, with a clear error when it is not."""
    root = Path(data_root).expanduser().resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as exc:
        # e.g. "<path> is a file, not a folder" rather than the bare "File exists" of mkdir.
        why = describe_os_error(exc)
        if exc.errno == errno.ENOENT and exc.filename is not None:
            # mkdir's ENOENT after its parents were made: the file system refuses new folders (/proc).
            why = f"{exc.filename} cannot be created ({exc.strerror})"
        raise DataRootError(f"cannot write to the data root {root}: {why}") from None
    return root


def embedded_instance(root: Path) -> DagsterInstance:
    """A SQLite-backed Dagster instance under <data_root>/dagster_home (telemetry off: runs offline)."""
    home = DataRootLayout.of(root).dagster_home
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text("telemetry:\n  enabled: false\n")
    return DagsterInstance.from_config(str(home))


def embedded_mlflow_uri(root: str | Path) -> str:
    """The embedded MLflow store of a data root (the layout owns it: ``core.data_root``)."""
    return DataRootLayout.of(root).mlflow_uri


class CheckOutcome(NamedTuple):
    name: str  # "<asset>:<check>"
    passed: bool
    severity: str  # "ERROR" | "WARN"
    blocking: bool
    reason: str = ""  # why it failed, one line


@dataclass
class RunSummary:
    success: bool
    run_id: str
    job_name: str = ""
    materialized: dict[str, int | None] = field(default_factory=dict)  # asset -> rows (when known)
    checks: list[CheckOutcome] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # one line per failed step
    alert_deliveries: list[str] = field(default_factory=list)  # where a failed run's alert went

    @property
    def failed_blocking_checks(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed and c.blocking]

    @property
    def failed_checks(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    def exit_code(self, strict: bool = False) -> int:
        if not self.success or self.failed_blocking_checks:
            return 1
        if strict and any(not c.passed and c.severity == "ERROR" for c in self.checks):
            return 1
        return 0

    def render(self) -> str:
        job = f" of {self.job_name}" if self.job_name else ""
        lines = [f"run {self.run_id}{job}: {'succeeded' if self.success else 'FAILED'}"]
        if self.materialized:
            lines.append("materialised:")
            width = max(len(k) for k in self.materialized)
            for key, rows in self.materialized.items():
                lines.append(f"  {key:<{width}}  {'' if rows is None else f'{rows:,} rows'}")
        if self.checks:
            passed = sum(1 for c in self.checks if c.passed)
            lines.append(f"checks: {passed}/{len(self.checks)} passed")
            for check in self.checks:
                if not check.passed:
                    why = f": {check.reason}" if check.reason else ""
                    lines.append(
                        f"  FAILED {check.name} ({check.severity}{', blocking' if check.blocking else ''}){why}"
                    )
        for failure in self.failures:
            lines.append(f"step failed: {failure}")
        for delivery in self.alert_deliveries:
            lines.append(f"alert: {delivery}")
        return "\n".join(lines)


def stale_asset_keys(root: Path, source: str) -> list:
    """Assets (or any partition of them) that are missing or stale by Dagster's code and data versions.

    Uses Dagster's own stale-status resolver, the one behind the UI's "Materialize changed and missing"
    and the daemon's ``RunRequest(stale_assets_only=True)``. Dagster 1.13 has no public API that answers
    "which assets are stale" outside a sensor or the GraphQL of a running webserver, so this is the one
    function around the internals: ``dagster._core.definitions.data_version.CachingStaleStatusResolver``
    and ``StaleStatus``, with an ``AssetGraphView`` as its loading context (the context the automation
    daemon uses over an asset graph; not ``LoadingContextForTest``, a test helper). Config edits are not
    tracked by Dagster's versions: a changed config is a deliberate rerun with ``--select``.
    """
    from datetime import UTC, datetime

    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.definitions.temporal_context import TemporalContext

    from scin_pipeline.definitions import build_resources

    instance = embedded_instance(root)
    graph = Definitions(
        assets=ALL_ASSETS, asset_checks=ALL_ASSET_CHECKS, resources=build_resources(data_root=str(root), source=source)
    ).resolve_asset_graph()
    loading_context = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=datetime.now(UTC), last_event_id=None),
        instance=instance,
        asset_graph=graph,
    )
    resolver = CachingStaleStatusResolver(instance, asset_graph=graph, loading_context=loading_context)
    stale = []
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        partitions = node.partitions_def.get_partition_keys() if node.partitions_def is not None else [None]
        if any(resolver.get_status(key, p) != StaleStatus.FRESH for p in partitions):
            stale.append(key)
    return stale


# The named jobs, smallest first: a CLI run is a run of the smallest one that covers its selection.
JOBS_BY_SIZE = ("curation_job", "training_job", "full_pipeline")


def job_covering(asset_graph, keys: frozenset | None) -> str:
    """The smallest named job whose selection includes ``keys`` (None: everything -> ``full_pipeline``)."""
    from scin_pipeline.orchestration import ALL_JOBS

    if keys:
        selections = {job.name: job.selection for job in ALL_JOBS}
        for name in JOBS_BY_SIZE:
            if keys <= selections[name].resolve(asset_graph):
                return name
    return "full_pipeline"


def resource_run_config(root: Path, source: str) -> dict:
    """The data root and source as run config of the job's resources: recorded with the run, so a
    re-execution from the UI writes to the same data root and reads the same source. The data root is
    set on ``storage`` only: the IO manager and MLflow take that resource as a nested dependency."""
    return {
        "resources": {
            "scin_source": {"config": {"location": source}},
            "storage": {"config": {"data_root": str(root)}},
        }
    }


class RunConfigError(ValueError):
    """Run config the job does not accept; the message is one line naming the key."""


def merge_run_config(base: Mapping, override: Mapping) -> dict:
    """``override`` deep-merged over ``base`` (mappings merged key by key, anything else replaced): a user's
    config file changes the one field it names and keeps the rest of what the runner built."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_run_config(merged[key], value)
        else:
            merged[key] = value
    return merged


def validate_job_run_config(job_name: str, run_config: Mapping, keys: frozenset | None = None) -> None:
    """Check ``run_config`` against the named job (the subset for ``keys``) with Dagster's public
    ``validate_run_config``, before anything runs; raises RunConfigError with one line naming the key."""
    from dagster import DagsterInvalidConfigError, validate_run_config

    from scin_pipeline.definitions import named_job

    job = named_job(job_name)
    if keys is not None:
        job = job.get_subset(asset_selection=set(keys))
    try:
        validate_run_config(job, dict(run_config))
    except DagsterInvalidConfigError as err:
        raise RunConfigError(describe_config_error(err)) from None


def describe_config_error(err) -> str:
    """The first of Dagster's config errors as one line naming the dotted key: ``unknown key a.b.c`` for a
    key the job does not have (with the keys allowed there when they are few), else ``a.b.c: reason``."""
    first = err.errors[0] if getattr(err, "errors", None) else None
    if first is None:
        return "invalid run config: " + " ".join(str(err).split())
    path = ".".join(entry.field_name for entry in first.stack.entries if hasattr(entry, "field_name"))
    message = " ".join(first.message.split())
    unexpected = re.findall(r'unexpected config entr(?:y|ies) "?([^".]+)"?', message)
    expected = re.search(r'Expected: "\{ (.*) \}"', message)
    message = re.sub(r" at path root[^ ]*\.?", "", message.split(" Expected:")[0]).rstrip(". ")
    if unexpected:
        names = [n.strip() for n in unexpected[0].replace("[", "").replace("]", "").split(",")]
        keys = ", ".join(f"{path}.{name}" if path else name for name in names)
        allowed = re.findall(r"(\w+)\??:", expected.group(1)) if expected and len(expected.group(1)) < 400 else []
        allowed = list(dict.fromkeys(name for name in allowed if name != "env"))  # {env: VAR} is Dagster's own
        hint = f" (allowed there: {', '.join(allowed)})" if allowed else ""
        return f"invalid run config: unknown key {keys}{hint}"
    return f"invalid run config at {path or 'the top level'}: {message}"


def run_pipeline(
    *,
    data_root: str | Path,
    source: str,
    limit_cases: int | None = None,
    select: str | None = None,
    run_config: dict | None = None,
    log_level: str = "INFO",
    only_stale: bool = False,
    echo: Callable[[str], None] | None = None,
) -> RunSummary:
    """Launch the graph (or ``select``) as a run of the named job that covers it, in the data root's
    Dagster instance. ``only_stale``: only what is missing or stale, and no run at all when everything is
    up to date (an idempotent rerun does no work). ``echo`` gets one line per step as the run goes
    (started, finished with rows and seconds, progress of long steps), and the note about added
    multi-asset siblings. A failed run writes the same alert as ``run_failure_alert_sensor``."""
    from scin_pipeline.definitions import build_resources
    from scin_pipeline.selection import resolve_selection

    root = prepare_data_root(data_root)
    graph = Definitions(
        assets=ALL_ASSETS, asset_checks=ALL_ASSET_CHECKS, resources=build_resources(data_root=str(root), source=source)
    ).resolve_asset_graph()
    with warnings.catch_warnings():
        # Dagster's own parser behind resolve_selection (AssetSelection.from_string) turns a "group:" term
        # into AssetSelection.groups(..., include_sources=...), a beta parameter that warns; not ours to change.
        warnings.filterwarnings(
            "ignore", message=r"Parameter `include_sources` of function `AssetSelection.groups`", category=BetaWarning
        )
        resolved = resolve_selection(select, graph)
    if resolved is not None and resolved.note and echo:
        echo(resolved.note)
    keys = None if resolved is None else resolved.keys
    if only_stale:
        stale = frozenset(stale_asset_keys(root, source))
        keys = stale if keys is None else stale & keys
        if not keys:
            return RunSummary(success=True, run_id="none (every asset up to date)")
    return _execute_job(root, source, limit_cases, keys, graph, run_config, log_level, echo)


def _execute_job(
    root: Path,
    source: str,
    limit_cases: int | None,
    keys: frozenset | None,
    graph,
    run_config: dict | None,
    log_level: str,
    echo: Callable[[str], None] | None,
) -> RunSummary:
    from scin_pipeline.run_console import StepEcho, follow_run

    # MLflow: the `mlflow` resource reads MLFLOW_TRACKING_URI, else uses SQLite under this data root; the
    # environment is not touched, so runs on different data roots in one process stay apart.
    config: dict = {
        "loggers": {"console": {"config": {"log_level": log_level}}},
        # In this process, as materialize() did: the image stage has its own process pool, and a
        # process per step would pay the package import (seconds) for each of ~20 short steps.
        "execution": {"config": {"in_process": {}}},
        **resource_run_config(root, source),
    }
    if limit_cases:
        config["ops"] = {"parsed_metadata": {"config": {"limit_cases": limit_cases}}}
    config = merge_run_config(config, run_config or {})
    if keys is not None and "ops" in config:
        # Config for an op outside the selection is an error to Dagster; callers (the demo, a --config
        # file) pass one config for the whole graph, so drop the entries of the graph's unselected ops.
        # A name that is no op of the graph stays, for validation to report.
        # load_assets_from_modules types its result as every kind of definition; this package makes assets only
        defined = [d for d in ALL_ASSETS if isinstance(d, AssetsDefinition)]
        selected = {d.node_def.name for d in defined if set(d.keys) & keys}
        every = {d.node_def.name for d in defined}
        config["ops"] = {name: value for name, value in config["ops"].items() if name in selected or name not in every}
    job_name = job_covering(graph, keys)
    validate_job_run_config(job_name, config, keys)
    invocation = uuid.uuid4().hex
    # Every shard of a sharded asset in this one run (its process pool does the fan-out).
    tags = {ENTRY_TAG: CLI_ENTRY, INVOCATION_TAG: invocation, **all_shards_tags()}
    with embedded_instance(root) as instance:
        with follow_run(instance, invocation, StepEcho(echo) if echo else None):
            result = execute_in_code_location(job_name, instance, run_config=config, tags=tags, asset_selection=keys)
        summary = _summarize(result)
        if not result.success:
            summary.alert_deliveries = _alert_failed_run(instance, result.dagster_run, root)
    return summary


DEFINITIONS_MODULE = "scin_pipeline.definitions"
CODE_LOCATION_NAME = "scin_pipeline"  # as in workspace.yaml, docker/workspace.yaml and pyproject's [tool.dagster]


def execute_in_code_location(job_name: str, instance, *, run_config: dict, tags: dict, asset_selection=None):
    """Run ``job_name`` of this code location in this process, synchronously, as ``dagster.execute_job``
    does, but recorded as a run of the code location ``scin_pipeline`` (what a run launched from the UI
    records): the UI's Re-execute button and run-failure sensors find a run by that origin, and
    ``execute_job`` leaves it empty. No public API sets it, so this is the one place that uses Dagster
    internals to do so (they are the ones ``execute_job`` itself calls)."""
    from dagster import build_reconstructable_job
    from dagster._core.definitions.repository_definition.valid_definitions import SINGLETON_REPOSITORY_NAME
    from dagster._core.execution.api import execute_run
    from dagster._core.remote_origin import (
        ManagedGrpcPythonEnvCodeLocationOrigin,
        RemoteJobOrigin,
        RemoteRepositoryOrigin,
    )
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    job = build_reconstructable_job(DEFINITIONS_MODULE, "named_job", reconstructable_args=(job_name,))
    load_data = job.repository.get_definition().repository_load_data
    job = job.with_repository_load_data(load_data)
    location = ManagedGrpcPythonEnvCodeLocationOrigin(
        LoadableTargetOrigin(executable_path=sys.executable, module_name=DEFINITIONS_MODULE),
        location_name=CODE_LOCATION_NAME,
    )
    origin = RemoteJobOrigin(
        repository_origin=RemoteRepositoryOrigin(
            code_location_origin=location, repository_name=SINGLETON_REPOSITORY_NAME
        ),
        job_name=job_name,
    )
    run = instance.create_run_for_job(
        job_def=job.get_definition(),
        run_config=run_config,
        tags=tags,
        asset_selection=frozenset(asset_selection) if asset_selection else None,
        remote_job_origin=origin,
        job_code_origin=job.get_python_origin(),
        repository_load_data=load_data,
    )
    return execute_run(job, run, instance)


def _summarize(result) -> RunSummary:
    summary = RunSummary(success=result.success, run_id=result.run_id, job_name=result.dagster_run.job_name)
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        summary.materialized[mat.asset_key.to_user_string()] = row_count(mat.metadata)
    blocking = _blocking_checks()
    for evaluation in result.get_asset_check_evaluations():
        name = f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
        summary.checks.append(
            CheckOutcome(
                name,
                evaluation.passed,
                evaluation.severity.value,
                (evaluation.asset_key, evaluation.check_name) in blocking,
                check_reason(evaluation.description, evaluation.metadata),
            )
        )
    for event in result.get_step_failure_events():
        error = event.step_failure_data.error
        message = _root_message(error) if error else "unknown error"
        summary.failures.append(f"{event.step_key}: {message}")
    return summary


def _alert_failed_run(instance, run, root: Path) -> list[str]:
    """The alert the failure sensor would send for this run (alerts.jsonl, the webhook when set), sent at
    once: no daemon may be running, and the sensor leaves CLI runs to the CLI (no alert twice)."""
    from dagster import DagsterEventType

    from scin_pipeline.core.alerts import alert_sinks_from_env, deliver
    from scin_pipeline.orchestration import alert_for_run

    records = instance.get_records_for_run(
        run.run_id, of_type={DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE}
    ).records
    events = [r.event_log_entry.dagster_event for r in records if r.event_log_entry.dagster_event]
    step_failures = [e for e in events if e.event_type == DagsterEventType.STEP_FAILURE]
    run_failure = next((e for e in events if e.event_type == DagsterEventType.RUN_FAILURE), None)
    alert = alert_for_run(
        instance.get_run_by_id(run.run_id) or run, step_failures, run_failure.message if run_failure else None
    )
    return [
        f"{o.sink}: {'delivered' if o.ok else 'NOT delivered, ' + o.detail}"
        for o in deliver(alert, alert_sinks_from_env(root))
    ]


def check_reason(description: str | None, metadata) -> str:
    """Why a check failed, in one line: its description, else its small metadata values."""
    if description:
        return " ".join(description.split())
    parts = []
    for key, value in metadata.items():
        text = str(getattr(value, "value", value))
        if "\n" in text or "|" in text or len(text) > 300:  # tables and plots: see the UI
            continue
        parts.append(f"{key}={text}")
    return "; ".join(parts)


def _blocking_checks() -> set:
    keys = set()
    for definition in [*ALL_ASSETS, *ALL_ASSET_CHECKS]:
        for spec in definition.check_specs:
            if spec.blocking:
                keys.add((spec.asset_key, spec.name))
    return keys


def _root_message(error) -> str:
    """The innermost error's message: the user-facing cause, not Dagster's wrapper."""
    while error.cause is not None:
        error = error.cause
    return f"{error.cls_name}: {error.message.strip().splitlines()[-1] if error.message.strip() else ''}"
