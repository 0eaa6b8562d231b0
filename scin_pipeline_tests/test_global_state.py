"""Tests share one process per worker: a run must not break the streams later tests rely on."""

from __future__ import annotations

import subprocess
import sys

from dagster import DagsterInstance, asset, materialize


def test_a_dagster_run_leaves_absls_stream_and_pytests_capture_open(tmp_path, capsys):
    # absl comes with TensorFlow/Keras; its handler is created once, bound to a stream.
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler().python_handler

    @asset
    def one() -> int:
        return 1

    # An instance with settings (ours disable telemetry) makes every run call logging.config.dictConfig,
    # which closes every logging handler in the process.
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with DagsterInstance.from_config(str(home)) as instance:
        assert materialize([one], instance=instance).success
    # absl writes to the process's own stderr (conftest pins it): a capture stream bound there would be
    # closed by the run above, and with it pytest's capture for every later test of this worker.
    assert handler.stream is sys.__stderr__ and not handler.stream.closed
    print("stderr still writable", file=sys.stderr)
    print("stdout still writable")
    assert "stderr still writable" in capsys.readouterr().err


def test_importing_the_definitions_leaves_the_warning_filters_as_they_were():
    """Beta APIs used on purpose are silenced at their call site, not by a global filter: the import adds
    no filter, and no Dagster beta/preview/superseded warning escapes it (-W error turns one into a failure).
    A fresh interpreter, since this worker has imported the definitions already."""
    code = (
        "import warnings; before = list(warnings.filters); import scin_pipeline.definitions; "
        "assert warnings.filters == before, [f for f in warnings.filters if f not in before]"
    )
    strict = [f"-Werror::dagster.{name}" for name in ("BetaWarning", "PreviewWarning", "SupersessionWarning")]
    done = subprocess.run([sys.executable, *strict, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
