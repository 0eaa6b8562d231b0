"""Run the asset graph in-process on embedded defaults and summarise the outcome.

Used by the ``scin-pipeline`` console script and by the tests. The Dagster instance (SQLite) and the
MLflow store live under the data root, so one folder holds a whole, inspectable run history.
"""

from __future__ import annotations

import errno
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dagster import AssetSelection, DagsterInstance, Definitions, materialize

from scin_pipeline.assets import ALL_ASSET_CHECKS, ALL_ASSETS
from scin_pipeline.core.atomic import describe_os_error
from scin_pipeline.definitions import build_resources
from scin_pipeline.orchestration import all_shards_tags


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
    home = root / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text("telemetry:\n  enabled: false\n")
    return DagsterInstance.from_config(str(home))


def embedded_mlflow_uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"


@dataclass
class RunSummary:
    success: bool
    run_id: str
    materialized: dict[str, int | None] = field(default_factory=dict)  # asset -> rows (when known)
    checks: list[tuple[str, bool, str, bool]] = field(default_factory=list)  # (name, passed, severity, blocking)
    failures: list[str] = field(default_factory=list)  # one line per failed step

    @property
    def failed_blocking_checks(self) -> list[str]:
        return [name for name, passed, _sev, blocking in self.checks if not passed and blocking]

    @property
    def failed_checks(self) -> list[str]:
        return [name for name, passed, _sev, _blocking in self.checks if not passed]

    def exit_code(self, strict: bool = False) -> int:
        if not self.success or self.failed_blocking_checks:
            return 1
        if strict and any(not p and sev == "ERROR" for _n, p, sev, _b in self.checks):
            return 1
        return 0

    def render(self) -> str:
        lines = [f"run {self.run_id}: {'succeeded' if self.success else 'FAILED'}"]
        if self.materialized:
            lines.append("materialised:")
            width = max(len(k) for k in self.materialized)
            for key, rows in self.materialized.items():
                lines.append(f"  {key:<{width}}  {'' if rows is None else f'{rows:,} rows'}")
        if self.checks:
            passed = sum(1 for c in self.checks if c[1])
            lines.append(f"checks: {passed}/{len(self.checks)} passed")
            for name, ok, severity, blocking in self.checks:
                if not ok:
                    lines.append(f"  FAILED {name} ({severity}{', blocking' if blocking else ''})")
        for failure in self.failures:
            lines.append(f"step failed: {failure}")
        return "\n".join(lines)


def stale_asset_keys(root: Path, source: str) -> list:
    """Assets (or any partition of them) that are missing or stale by Dagster's code and data versions.

    Uses Dagster's own stale-status resolver, the one behind the UI's "Materialize changed and missing";
    it is internal API (``dagster._core``), hence this one function around it. Config edits are not
    tracked by Dagster's versions: a changed config is a deliberate rerun with ``--select``.
    """
    from dagster import Definitions
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.loader import LoadingContextForTest

    instance = embedded_instance(root)
    graph = Definitions(assets=ALL_ASSETS, asset_checks=ALL_ASSET_CHECKS,
                        resources=build_resources(data_root=str(root), source=source)).resolve_asset_graph()
    resolver = CachingStaleStatusResolver(instance, asset_graph=graph,
                                          loading_context=LoadingContextForTest(instance))
    stale = []
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        partitions = node.partitions_def.get_partition_keys() if node.is_partitioned else [None]
        if any(resolver.get_status(key, p) != StaleStatus.FRESH for p in partitions):
            stale.append(key)
    return stale


def run_pipeline(*, data_root: str | Path, source: str, limit_cases: int | None = None,
                 select: str | None = None, run_config: dict | None = None,
                 log_level: str = "INFO", only_stale: bool = False) -> RunSummary:
    """Materialise the graph (or ``select``); ``only_stale``: only what is missing or stale, and no run at
    all when everything is up to date (an idempotent rerun does no work)."""
    root = prepare_data_root(data_root)
    if only_stale:
        keys = stale_asset_keys(root, source)
        if not keys:
            return RunSummary(success=True, run_id="none (every asset up to date)")
        stale_selection = AssetSelection.assets(*keys)
        select_selection = AssetSelection.from_coercible(select) if select else None
        selection = stale_selection if select_selection is None else stale_selection & select_selection
        return _materialize(root, source, limit_cases, selection, run_config, log_level)
    selection = AssetSelection.from_coercible(select) if select else None
    return _materialize(root, source, limit_cases, selection, run_config, log_level)


def _materialize(root: Path, source: str, limit_cases: int | None, selection, run_config: dict | None,
                 log_level: str) -> RunSummary:
    # MLflow: the `mlflow` resource reads MLFLOW_TRACKING_URI, else uses SQLite under this data root; the
    # environment is not touched, so runs on different data roots in one process stay apart.
    config: dict = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    if limit_cases:
        config["ops"] = {"parsed_metadata": {"config": {"limit_cases": limit_cases}}}
    for key, value in (run_config or {}).items():
        config.setdefault(key, {}).update(value)
    if selection is not None and "ops" in config:
        # Config for an op outside the selection is an error to Dagster; callers (the demo) pass one
        # config for the whole graph, so keep only the selected ops' entries.
        graph = Definitions(assets=ALL_ASSETS, asset_checks=ALL_ASSET_CHECKS,
                            resources=build_resources(data_root=str(root), source=source)).resolve_asset_graph()
        selected = selection.resolve(graph)
        ops = {d.node_def.name for d in ALL_ASSETS if set(d.keys) & selected}
        config["ops"] = {name: value for name, value in config["ops"].items() if name in ops}
    # A selected asset's checks run with it (Dagster includes them in an asset job by default).
    result = materialize(
        [*ALL_ASSETS, *ALL_ASSET_CHECKS],
        run_config=config,
        instance=embedded_instance(root),
        resources=build_resources(data_root=str(root), source=source),
        selection=selection,
        raise_on_error=False,
        # Every shard of a sharded asset in this one run (its process pool does the fan-out).
        tags={"scin/entry": "cli", **all_shards_tags()},
    )
    summary = RunSummary(success=result.success, run_id=result.run_id)
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        rows = mat.metadata.get("rows")
        summary.materialized[mat.asset_key.to_user_string()] = None if rows is None else int(rows.value)
    blocking = _blocking_checks()
    for evaluation in result.get_asset_check_evaluations():
        name = f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
        summary.checks.append((name, evaluation.passed, evaluation.severity.value,
                               (evaluation.asset_key, evaluation.check_name) in blocking))
    for event in result.get_step_failure_events():
        error = event.step_failure_data.error
        message = _root_message(error) if error else "unknown error"
        summary.failures.append(f"{event.step_key}: {message}")
    return summary


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
