"""The CLI's console: progress lines of long steps and the quieting of libraries' logs."""

from __future__ import annotations

import logging
import os

from scin_pipeline.core.progress import PROGRESS_PREFIX, Progress, report, tracked
from scin_pipeline.run_console import QUIET_ENV, quiet_console


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_emits_at_most_every_interval_and_always_at_the_end():
    clock, lines = FakeClock(), []
    progress = Progress("image_quality", 100, lines.append, unit="images", every_s=10, clock=clock)
    for _ in tracked(range(100), progress):
        clock.now += 0.5  # 50 s in all: a line at 10, 20, 30, 40 s and the last item
    assert len(lines) == 5
    assert all(line.startswith(PROGRESS_PREFIX) for line in lines)
    assert lines[-1] == f"{PROGRESS_PREFIX}image_quality: 100/100 images (100%), 50 s"
    assert lines[0].startswith(f"{PROGRESS_PREFIX}image_quality: 20/100 images (20%)")


def test_progress_without_a_sink_counts_silently():
    progress = Progress("x", 3, None)
    assert list(tracked("abc", progress)) == ["a", "b", "c"] and progress.done == 3
    report(None, "nothing happens")


def test_quiet_console_restores_the_environment_and_logger_levels(monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")  # a user's own setting wins
    absl = logging.getLogger("absl")
    before = absl.level
    with quiet_console(verbose=0):
        assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == QUIET_ENV["TF_CPP_MIN_LOG_LEVEL"]
        assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "true"
        assert absl.level == logging.ERROR
    assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "true"
    assert absl.level == before


def test_verbose_leaves_everything_as_it_is(monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    with quiet_console(verbose=1):
        assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ


def test_native_info_and_warning_lines_are_dropped_from_fd2_and_the_rest_passes(capfd):
    native_info = (
        b"I0000 00:00:1796226684.197802   17370 port.cc:153] oneDNN custom operations are on. "
        b"You may see slightly different numerical results.\n"
    )
    absl_notice = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    native_error = b"E0000 00:00:1796226684.197802   17370 cuda.cc:12] a real error\n"
    with quiet_console(verbose=0):
        os.write(2, native_info + absl_notice + b"a line of ours\n" + native_error)
    err = capfd.readouterr().err
    assert "oneDNN" not in err and "InitializeLog" not in err
    assert "a line of ours" in err and "a real error" in err
    # fd 2 is itself again afterwards.
    os.write(2, native_info)
    assert "oneDNN" in capfd.readouterr().err


def test_verbose_keeps_native_lines(capfd):
    with quiet_console(verbose=1):
        os.write(2, b"I0000 00:00:1.5   1 port.cc:1] kept\n")
    assert "kept" in capfd.readouterr().err
