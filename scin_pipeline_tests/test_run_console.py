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
