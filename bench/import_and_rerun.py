"""What a rerun that does nothing costs: importing the definitions, a full demo run, and a no-op rerun, in one run.

    python bench/import_and_rerun.py [--cases 300] [--epochs 12] [--imports 5] [--baseline DIR]

1. ``import scin_pipeline.definitions`` in ``--imports`` fresh interpreters (what the UI's code server, every
   run worker and a rerun pay): the median of the import itself (timed inside the interpreter) and of the
   whole process (interpreter start included); the heavy libraries it left in ``sys.modules``.
   ``--baseline DIR``: the same for another checkout (e.g. a ``git worktree`` of an older commit), for a
   before/after in one run; imports of the two checkouts alternate.
2. ``scin-pipeline demo --out <temp> --cases N --epochs E`` (SYNTHETIC images): a full run, wall time of
   the command.
3. The same command with ``--only-stale`` on the same data root: nothing is missing or stale, so no run
   is launched; wall time of the command (interpreter start, imports, the staleness check).

Every command runs from this checkout (``PYTHONPATH``), CPU only. Prints a table with the ratios
no-op / full and (with ``--baseline``) import after / before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Each costs 0.1-1.2 s to import on the development machine (matplotlib 0.4 s, sklearn 1 s with scipy);
# scin_pipeline_tests/test_import_cost.py forbids them in the definitions import.
HEAVY = (
    "tensorflow",
    "keras",
    "jax",
    "torch",
    "mlflow",
    "matplotlib",
    "sklearn",
    "scipy",
    "cleanvision",
    "fairlearn",
    "imagededup",
    "google.cloud.storage",
)
IMPORT_PROBE = f"""
import json, sys, time
started = time.perf_counter()
import scin_pipeline.definitions
elapsed = time.perf_counter() - started
heavy = sorted(h for h in {HEAVY!r} if h in sys.modules)
print(json.dumps({{"import_s": elapsed, "heavy": heavy, "file": scin_pipeline.definitions.__file__}}))
"""


def environment(checkout: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(checkout), "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}


def probe_import(checkout: Path) -> tuple[float, float, list[str]]:
    """(import s, process s, heavy modules left) of one fresh interpreter importing the definitions."""
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE], cwd=checkout, env=environment(checkout), capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"importing the definitions of {checkout} failed:\n{out.stderr[-2000:]}")
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    if not answer["file"].startswith(str(checkout)):
        raise RuntimeError(f"imported {answer['file']}, not the checkout {checkout}")
    return answer["import_s"], wall, answer["heavy"]


def run_cli(args: list[str], log: Path) -> float:
    """Wall seconds of ``scin-pipeline ARGS`` from this checkout; raises when it fails."""
    command = [sys.executable, "-c", "import sys; from scin_pipeline.cli import main; sys.exit(main())", *args]
    started = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command, cwd=REPO, env=environment(REPO), stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"scin-pipeline {' '.join(args)} exited {code}:\n{log.read_text()[-3000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=300, help="demo cases (default 300, the demo's default)")
    parser.add_argument("--epochs", type=int, default=12, help="demo epochs (default 12, the demo's default)")
    parser.add_argument("--imports", type=int, default=5, help="fresh interpreters per checkout (default 5)")
    parser.add_argument("--baseline", default=None, metavar="DIR", help="another checkout to compare the import")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data root (its path is printed)")
    args = parser.parse_args()

    checkouts = {"this checkout": REPO}
    if args.baseline:
        checkouts = {"baseline": Path(args.baseline).expanduser().resolve(), **checkouts}
    imports: dict[str, list[tuple[float, float, list[str]]]] = {name: [] for name in checkouts}
    for _ in range(args.imports):
        for name, checkout in checkouts.items():
            imports[name].append(probe_import(checkout))

    tmp = Path(tempfile.mkdtemp(prefix="bench-rerun-"))
    out = tmp / "data"
    demo = ["demo", "--out", str(out), "--cases", str(args.cases), "--epochs", str(args.epochs)]
    full_s = run_cli(demo, tmp / "full.log")
    noop_s = run_cli([*demo, "--only-stale"], tmp / "noop.log")
    noop_log = (tmp / "noop.log").read_text()
    if "every asset up to date" not in noop_log:
        raise RuntimeError(f"the --only-stale rerun ran something:\n{noop_log[-3000:]}")

    print(
        f"\nscin-pipeline demo --cases {args.cases} --epochs {args.epochs} (SYNTHETIC images, CPU only); "
        f"imports: median of {args.imports} fresh interpreters"
    )
    print(f"{'what':<58} {'seconds':>8} {'ratio':>22}")
    medians = {}
    for name in checkouts:
        import_s = statistics.median(i for i, _, _ in imports[name])
        process_s = statistics.median(w for _, w, _ in imports[name])
        heavy = sorted({h for _, _, hs in imports[name] for h in hs})
        medians[name] = import_s
        print(f"{f'import scin_pipeline.definitions ({name})':<58} {import_s:>8.2f}")
        print(f"{f'  python -c that import, whole process ({name})':<58} {process_s:>8.2f}")
        print(f"{f'  heavy modules left ({name})':<58} {', '.join(heavy) or 'none':>8}")
    if args.baseline:
        ratio = medians["this checkout"] / medians["baseline"]
        print(f"{'import: this checkout / baseline':<58} {'':>8} {ratio:>22.2f}")
    print(f"{'full demo run':<58} {full_s:>8.1f}")
    share = f"{noop_s / full_s:.1%} of the full run"
    print(f"{'no-op rerun (--only-stale, nothing to do)':<58} {noop_s:>8.2f} {share:>22}")
    if args.keep:
        print(f"data root kept: {out}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
