"""Tests share one process per worker: a run must not break the streams later tests rely on."""

from __future__ import annotations

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
