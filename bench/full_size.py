"""The whole graph at SCIN's real size, on a SYNTHETIC mirror, step by step, against a plain decode.

    python bench/full_size.py [--out /tmp/scin-full-size] [--cases N] [--image-px 1600] [--tensor-px 64]
                              [--epochs 3] [--workers 2] [--fresh]

(defaults: every case, 1600 px photos, 64 px tensors as the demo. On the shared 2-core development
machine --cases 450 took ~25 minutes, render included; the README's Benchmarks has its table.)

1. A synthetic mirror of the release (``core.synthetic.mirror.write_synthetic_mirror`` over the bundled
   real metadata): every real case and every image reference of SCIN 1.0.0, each image a drawn skin photo
   of ``--image-px`` on the long side (4:3; 1600 px: phone-sized PNGs of ~2-3 MB), 4 % planted defects.
   ``--cases N`` takes the first N real cases instead (a smaller trial). It is written under ``--out``
   (default under /tmp, never inside the repository) and kept: a later call with the same parameters reuses
   it (its render time is reported, not counted in the pipeline).
2. The reference: a plain ``cv2.imread`` of every image file of the mirror, ``--workers`` processes, no
   checks: the floor of any stage that must look at every pixel.
3. The whole graph with ``--only-stale`` semantics (``runner.run_pipeline(only_stale=True)``, what
   ``scin-pipeline run --only-stale`` does) on ``<out>/data``, with the demo's CPU-sized training settings
   (``cli.demo_run_config``: heads on frozen embeddings, ``--epochs``) and the training tensors at
   ``--tensor-px``. A call on a data root left by an earlier call runs only what is missing or stale (so a
   killed run resumes); ``--fresh`` starts from an empty data root. Per step (from the run's Dagster event
   log): wall time, images of the release per second, the ratio to the plain decode's time, and the peak
   resident memory of this process and its children (the quality workers) while the step ran, sampled
   every 0.1 s. Then the same call again: a no-op rerun. Every pixel decode is counted
   (``SCIN_PIPELINE_DECODE_LOG``): decodes per decodable image for the whole graph.

The table is printed and written to ``<out>/full_size.md``. Synthetic images: throughput and memory only;
no figure here says anything about skin conditions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = Path("/tmp/scin-full-size")
MIRROR_SEED = 16
DEFECT_RATE = 0.04


class PeakRss:
    """Samples the resident memory of this process and all its descendants every ``every_s`` seconds."""

    def __init__(self, every_s: float = 0.1):
        import psutil

        self._process = psutil.Process()
        self._psutil = psutil
        self.every_s = every_s
        self.samples: list[tuple[float, int]] = []  # (time.time(), bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def _rss(self) -> int:
        total = 0
        for proc in [self._process, *self._process.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self._rss()))
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, start: float | None = None, end: float | None = None) -> int:
        chosen = [b for t, b in self.samples if (start is None or t >= start) and (end is None or t <= end)]
        return max(chosen, default=0)


def _imread(path: str) -> bool:
    import cv2

    return cv2.imread(path) is not None


def plain_decode(paths: list[str], workers: int) -> tuple[float, int, int]:
    """cv2.imread of every file in ``workers`` processes: (seconds, files decoded, peak RSS bytes)."""
    import multiprocessing

    with PeakRss() as rss:
        start = time.perf_counter()
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            decoded = sum(pool.map(_imread, paths, chunksize=16))
        seconds = time.perf_counter() - start
    return seconds, decoded, rss.peak()


def render_mirror(out: Path, cases: int | None, image_px: int, workers: int) -> tuple[Path, float, bool]:
    """The mirror under out/mirror, rendered unless one with the same parameters is there: (root, s, rendered)."""
    from scin_pipeline.core import bundled_metadata
    from scin_pipeline.core.synthetic.mirror import write_synthetic_mirror

    params = {"cases": cases, "image_px": image_px, "seed": MIRROR_SEED, "defect_rate": DEFECT_RATE}
    stamp = out / "mirror.json"
    root = out / "mirror"
    if stamp.exists() and json.loads(stamp.read_text()) == params and root.exists():
        return root, 0.0, False
    stamp.unlink(missing_ok=True)
    start = time.perf_counter()
    write_synthetic_mirror(
        root,
        metadata_dir=bundled_metadata.metadata_dir(),
        n_cases=cases,
        seed=MIRROR_SEED,
        image_size=(image_px, image_px * 3 // 4),
        defect_rate=DEFECT_RATE,
        overwrite=True,
        workers=workers,
    )
    stamp.write_text(json.dumps(params))
    return root, time.perf_counter() - start, True


def step_times(data_root: Path, run_id: str) -> list[tuple[str, float, float, bool]]:
    """(step, start, end, succeeded) of every step of the run, in start order, from its event log."""
    from dagster import DagsterEventType

    from scin_pipeline.runner import embedded_instance

    kinds = {DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE}
    with embedded_instance(data_root) as instance:
        entries = [e for e in instance.all_logs(run_id) if e.dagster_event and e.dagster_event.event_type in kinds]
    started: dict[str, float] = {}
    steps = []
    for entry in entries:
        event = entry.dagster_event
        assert event is not None and entry.step_key is not None
        if event.event_type == DagsterEventType.STEP_START:
            started[entry.step_key] = entry.timestamp
        else:
            begin = started.get(entry.step_key, entry.timestamp)
            steps.append((entry.step_key, begin, entry.timestamp, event.event_type == DagsterEventType.STEP_SUCCESS))
    return sorted(steps, key=lambda s: s[1])


def run_graph(data_root: Path, mirror: Path, run_config: dict, decode_log: Path):
    """runner.run_pipeline(only_stale=True) with the decoder instrumented and memory sampled."""
    from scin_pipeline.core.imageio import DECODE_LOG_ENV
    from scin_pipeline.runner import run_pipeline

    decode_log.unlink(missing_ok=True)
    os.environ[DECODE_LOG_ENV] = str(decode_log)
    try:
        with PeakRss() as rss:
            start = time.perf_counter()
            summary = run_pipeline(
                data_root=data_root,
                source=str(mirror),
                run_config=run_config,
                log_level="WARNING",
                only_stale=True,
                echo=lambda line: print(line, flush=True),
            )
            seconds = time.perf_counter() - start
    finally:
        os.environ.pop(DECODE_LOG_ENV, None)
    decodes = Counter()
    if decode_log.exists():
        decodes = Counter(line.split("\t", 1)[1] for line in decode_log.read_text().splitlines())
    return summary, seconds, rss, decodes


def markdown_table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="mirror and data root go here (not the repo)")
    ap.add_argument("--cases", type=int, default=None, help="the first N real cases (default: every case)")
    ap.add_argument("--image-px", type=int, default=1600, help="long side of the synthetic photos (4:3)")
    ap.add_argument("--tensor-px", type=int, default=64, help="side of the training tensors (the demo's 64)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the Keras candidates")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes of the plain decode")
    ap.add_argument("--fresh", action="store_true", help="start from an empty data root")
    args = ap.parse_args(argv)
    out = args.out.expanduser().resolve()
    if out == REPO or REPO in out.parents:
        ap.error(f"--out {out} is inside the repository; the mirror must stay outside it")
    out.mkdir(parents=True, exist_ok=True)

    import pandas as pd

    from scin_pipeline.cli import demo_run_config

    print(f"mirror under {out / 'mirror'} (rendered unless one with these parameters is there)", flush=True)
    mirror, render_s, rendered = render_mirror(out, args.cases, args.image_px, args.workers)
    data_root = out / "data"
    if (rendered or args.fresh) and data_root.exists():
        shutil.rmtree(data_root)
    image_files = sorted(str(p) for p in (mirror / "dataset" / "images").glob("*"))
    image_mb = sum(os.path.getsize(p) for p in image_files) / 1e6
    n_cases = len(pd.read_csv(mirror / "dataset" / "scin_cases.csv", usecols=["case_id"]))
    each_mb = image_mb / max(len(image_files), 1)
    how = f"rendered in {render_s:.0f} s" if rendered else "reused"
    print(
        f"SYNTHETIC mirror of {n_cases:,} cases, {len(image_files):,} image files ({each_mb:.2f} MB each, long "
        f"side {args.image_px} px): {how}; {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    plain_s, plain_n, plain_rss = plain_decode(image_files, args.workers)
    print(f"plain cv2.imread, {args.workers} processes: {plain_n:,} files in {plain_s:.1f} s", flush=True)

    run_config = demo_run_config(args.tensor_px, args.epochs)
    summary, run_s, rss, decodes = run_graph(data_root, mirror, run_config, out / "decodes.log")
    if not summary.success:
        print(summary.render())
        return 1
    noop_summary, noop_s, _, _ = run_graph(data_root, mirror, run_config, out / "decodes-noop.log")

    n_images = len(image_files)
    rows = []
    steps = [] if summary.run_id.startswith("none") else step_times(data_root, summary.run_id)
    for step, begin, end, ok in steps:
        seconds = end - begin
        rows.append(
            (
                step + ("" if ok else " (FAILED)"),
                f"{seconds:,.1f}",
                f"{n_images / seconds:,.1f}" if seconds > 0 else "",
                f"{seconds / plain_s:.2f}",
                f"{rss.peak(begin, end) / 1e6:,.0f}",
            )
        )
    rows.append(
        (
            "whole run (only-stale, from empty)",
            f"{run_s:,.1f}",
            f"{n_images / run_s:,.1f}",
            f"{run_s / plain_s:.2f}",
            f"{rss.peak() / 1e6:,.0f}",
        )
    )
    rows.append(("no-op rerun (--only-stale)", f"{noop_s:,.1f}", "", f"{noop_s / plain_s:.2f}", ""))
    rows.append(
        (
            "plain cv2.imread of every file (reference)",
            f"{plain_s:,.1f}",
            f"{n_images / plain_s:,.1f}",
            "1.00",
            f"{plain_rss / 1e6:,.0f}",
        )
    )
    header = ("step", "wall s", "images/s", "x plain decode", "peak RSS MB")
    quality = pd.read_parquet(data_root / "tables" / "image_quality")
    decodable = quality.loc[quality["decode_status"] == "ok", "local_path"].astype(str)
    per_decodable = sum(decodes.values()) / max(len(decodable), 1)
    once = sum(1 for p in decodable if decodes[p] == 1)
    notes = [
        f"SYNTHETIC mirror: {n_cases:,} cases, {n_images:,} image files, long side {args.image_px} px; tensors "
        f"{args.tensor_px} px; demo training settings, {args.epochs} epochs; {os.cpu_count()} cores.",
        f"Decodes in the whole run: {sum(decodes.values()):,} for {len(decodable):,} decodable files "
        f"({per_decodable:.3f} per file; {once:,} decoded exactly once; the rest: contact-sheet thumbnails).",
        f"No-op rerun: {noop_summary.run_id}, {noop_s:.1f} s ({noop_s / run_s:.1%} of the run).",
        "Peak RSS: this process (every step runs in it: the in-process executor) and its worker processes while "
        "the step ran; memory an earlier step keeps (TensorFlow, once imported) counts in later steps' peaks.",
        f"Command: python bench/full_size.py {' '.join(argv if argv is not None else sys.argv[1:])}",
    ]
    text = markdown_table(rows, header) + "\n\n" + "\n".join(notes) + "\n"
    print("\n" + text)
    (out / "full_size.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
