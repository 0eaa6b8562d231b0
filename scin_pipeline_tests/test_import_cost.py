"""Importing the definitions (what the UI's code server, every run worker and a no-op ``--only-stale`` rerun
pay) imports none of the heavy libraries: they are imported inside the steps that use them.

A behavioural check in a fresh interpreter (this process has imported everything already), not a
timing: bench/import_and_rerun.py measures the time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import scin_pipeline
from bench.import_and_rerun import HEAVY  # one list: what the bench times, this test forbids

PROBE = f"""
import json, sys
import {{module}}
print(json.dumps(sorted(h for h in {HEAVY!r} if h in sys.modules)))
"""


def heavy_modules_after_importing(module: str) -> list[str]:
    checkout = Path(scin_pipeline.__file__).resolve().parents[1]  # the copy under test, not an installed one
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_definitions_imports_no_heavy_library():
    assert heavy_modules_after_importing("scin_pipeline.definitions") == []


def test_the_cli_and_the_runner_import_no_heavy_library_before_a_run():
    # A no-op --only-stale rerun imports these, builds the graph and asks for staleness; nothing more.
    assert heavy_modules_after_importing("scin_pipeline.cli, scin_pipeline.runner") == []
