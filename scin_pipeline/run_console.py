"""What ``scin-pipeline run``/``demo`` print while a run goes: one line per step, progress of long steps,
and nothing else by default (TensorFlow/absl C++ logs and MLflow's progress bars are off unless -v).

The lines come from the run's own event log in the instance (public ``get_records_for_run``), read by a
thread while the run executes: what the CLI prints is exactly what the UI's run view holds.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from scin_pipeline.core.progress import PROGRESS_PREFIX

INVOCATION_TAG = "scin/invocation"  # finds the run that one runner call launched
POLL_S = 0.5

# Environment that quiets the libraries' own console output; each is read when the library logs.
QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "2",  # TensorFlow's C++ INFO and WARNING lines
    "ABSL_MIN_LOG_LEVEL": "2",  # absl's C++ logging (XLA, JAX)
    "GRPC_VERBOSITY": "ERROR",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # the download/upload bars of artifacts
    "MLFLOW_LOGGING_LEVEL": "ERROR",  # read when mlflow is imported ("Creating initial MLflow database tables")
}
# Lines that native libraries write straight to file descriptor 2 before any setting above is read (TF 2.21
# prints "oneDNN custom operations are on" through absl whatever TF_CPP_MIN_LOG_LEVEL says): absl/glog's
# "I0000 00:00:1796226684.197802 17370 port.cc:153] ..." format and absl's pre-initialisation notice.
NATIVE_LOG_LINE = re.compile(
    rb"^(?:[IW]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\]\s]+:\d+\] "
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR)"
)
QUIET_LOGGERS = ("absl", "tensorflow", "keras", "jax", "mlflow", "alembic", "urllib3", "h5py")


@contextmanager
def native_log_lines_dropped() -> Iterator[None]:
    """File descriptor 2 goes through a pipe that drops :data:`NATIVE_LOG_LINE` lines and passes every
    other byte on, for the duration; then fd 2 is restored. No-op where fd 2 cannot be duplicated."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as source:
            for line in source:
                if not NATIVE_LOG_LINE.match(line):
                    os.write(saved, line)

    thread = threading.Thread(target=pump, name="scin-stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)  # the pipe's last write end closes: the pump reads to the end and stops
        # A child process still holding the pipe (none should outlive a run) must not hang the caller.
        thread.join(timeout=5)
        os.close(saved)


@contextmanager
def quiet_console(verbose: int = 0) -> Iterator[None]:
    """Libraries' logs off for the duration (verbose >= 1 leaves them as they are); the environment, the
    loggers and file descriptor 2 are restored afterwards, so a caller in a longer process (a test) keeps
    its state."""
    if verbose:
        yield
        return
    saved_env = {name: os.environ.get(name) for name in QUIET_ENV}
    saved_levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with native_log_lines_dropped():
            yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)


def row_count(metadata) -> int | None:
    """A materialisation's ``dagster/row_count`` (set by the table IO manager), when it has one."""
    value = metadata.get("dagster/row_count")
    return None if value is None else int(getattr(value, "value", value))


class StepEcho:
    """Turns the run's event records into console lines: started, finished (rows, seconds), FAILED."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo = echo
        self.started_at: dict[str, float] = {}
        self.rows: dict[str, list[str]] = {}

    def __call__(self, record) -> None:
        from dagster import DagsterEventType

        entry = record.event_log_entry
        event = entry.dagster_event
        if event is None:
            message = entry.user_message or ""
            if message.startswith(PROGRESS_PREFIX):
                step = f"{entry.step_key}: " if entry.step_key else ""
                self.echo(f"    {step}{message[len(PROGRESS_PREFIX) :]}")
            return
        step = event.step_key or ""
        kind = event.event_type
        if kind == DagsterEventType.STEP_START:
            self.started_at[step] = entry.timestamp
            self.echo(f"  started   {step}")
        elif kind == DagsterEventType.ASSET_MATERIALIZATION:
            materialization = event.event_specific_data.materialization
            rows = row_count(materialization.metadata)
            label = materialization.asset_key.to_user_string()
            partition = f"[{materialization.partition}]" if materialization.partition else ""
            if rows is not None and not partition:
                self.rows.setdefault(step, []).append(f"{label} {rows:,} rows")
        elif kind in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
            elapsed = entry.timestamp - self.started_at.get(step, entry.timestamp)
            rows = ", ".join(self.rows.pop(step, []))
            if kind == DagsterEventType.STEP_SUCCESS:
                self.echo(f"  finished  {step}  {elapsed:.1f} s{'  ' + rows if rows else ''}")
            else:
                self.echo(f"  FAILED    {step}  {elapsed:.1f} s")


@contextmanager
def follow_run(instance, invocation: str, on_record: Callable | None) -> Iterator[None]:
    """While the body runs, feed every event record of the run tagged ``invocation`` to ``on_record``
    (in order, each once); the last records are read after the body ends."""
    if on_record is None:
        yield
        return
    from dagster import RunsFilter

    stop = threading.Event()
    state: dict = {"run_id": None, "cursor": None}

    def drain() -> None:
        if state["run_id"] is None:
            runs = instance.get_runs(filters=RunsFilter(tags={INVOCATION_TAG: invocation}), limit=1)
            if not runs:
                return
            state["run_id"] = runs[0].run_id
        while True:
            connection = instance.get_records_for_run(state["run_id"], cursor=state["cursor"], limit=200)
            for record in connection.records:
                try:
                    on_record(record)
                except Exception:  # noqa: BLE001 - a console line must never break the run
                    pass
            state["cursor"] = connection.cursor
            if not connection.has_more:
                return

    def loop() -> None:
        while not stop.wait(POLL_S):
            try:
                drain()
            except Exception:  # noqa: BLE001 - storage busy: read again on the next tick
                continue

    thread = threading.Thread(target=loop, name="scin-run-console", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        try:
            drain()
        except Exception:  # noqa: BLE001
            pass
