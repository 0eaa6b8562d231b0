"""Benchmark image ingestion: our fetch_images against google-cloud-storage's transfer_manager.

    python bench/ingest.py [--images N] [--size-kb K] [--workers W]

A gcp-storage-emulator (scin_pipeline_tests.gcs_emulator, threaded, in memory) is started in its own
process on loopback and N objects of ~K KB (a PNG signature followed by random, incompressible bytes)
are uploaded under dataset/images/. Each measured phase then runs in a fresh child process, so the
peak RSS of one phase is not inflated by memory an earlier phase left behind, and the server's CPU and
memory are never counted as the client's:

  (a) fetch_images into an empty folder (list, download, CRC32C-verify, atomic rename);
  (b) transfer_manager.download_many_to_path, thread workers, same worker count (its own CRC32C
      check of each response, no listing);
  (c) fetch_images again over (a)'s folder: resume, every copy re-verified locally, nothing fetched;
  (d) transfer_manager again over (b)'s folder with skip_if_exists=True, the peer of (c) (it only
      checks that a file with the name exists).

Each phase runs ``--repeat`` times for time and RSS (psutil, sampled every 2 ms in a thread; medians
shown, the methods alternating), and once more under tracemalloc for the peak of Python allocations
(tracemalloc slows allocation, so it is kept out of the timed runs). Ratios: (a) and (b) against (b),
(c) and (d) against (d).

Loopback numbers measure client overhead (CPU, memory, request count), not GCS network throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

IMAGE_PREFIX = "dataset/images/"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---- measuring ------------------------------------------------------------------------------------


class RssSampler:
    """Peak resident set size of this process while the block runs, sampled in a thread."""

    def __init__(self, interval_s: float = 0.002):
        import psutil

        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.start_rss = self.peak_rss = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)
            self._stop.wait(self._interval_s)

    def __enter__(self) -> RssSampler:
        self.start_rss = self.peak_rss = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)


def run_phase(phase: str, dest: Path, names: list[str], workers: int) -> dict:
    """The work of one phase; returns what it did, for a sanity check by the parent."""
    if phase in ("ours", "ours_resume"):
        from scin_pipeline.core.fetch import FetchRequest, fetch_images
        from scin_pipeline.core.sources import GcsBucketSource

        requests = [FetchRequest(n[len(IMAGE_PREFIX) : -len(".png")], n) for n in names]
        results = fetch_images(
            GcsBucketSource(),
            requests,
            dest,
            quarantine_dir=dest.parent / (dest.name + "-quarantine"),
            workers=workers,
        )
        statuses = sorted({r.status for r in results})
        return {
            "ok": sum(r.status == "ok" for r in results),
            "fetched": sum(r.fetched for r in results),
            "statuses": statuses,
        }
    if phase in ("tm", "tm_resume"):
        from google.cloud import storage
        from google.cloud.storage import transfer_manager

        client = storage.Client.create_anonymous_client()
        bucket = client.bucket("dx-scin-public-data")
        outcome = transfer_manager.download_many_to_path(
            bucket,
            [n[len(IMAGE_PREFIX) :] for n in names],
            destination_directory=str(dest),
            blob_name_prefix=IMAGE_PREFIX,
            worker_type=transfer_manager.THREAD,
            max_workers=workers,
            raise_exception=True,
            skip_if_exists=(phase == "tm_resume"),
        )
        return {
            "ok": sum(1 for r in outcome if r is None or not isinstance(r, Exception)),
            "fetched": None,
            "statuses": [],
        }
    raise ValueError(phase)


def child_main(args) -> None:
    names = json.loads(Path(args.names_file).read_text())
    dest = Path(args.dest)
    # Import everything both methods use before measuring: import time and module memory are the
    # same for any caller and would swamp the resume phases.
    import google.cloud.storage.transfer_manager  # noqa: F401
    import psutil  # noqa: F401

    import scin_pipeline.core.fetch  # noqa: F401
    import scin_pipeline.core.sources  # noqa: F401

    if args.mode == "alloc":
        import tracemalloc

        tracemalloc.start()
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        done = run_phase(args.child, dest, names, args.workers)
        _, peak = tracemalloc.get_traced_memory()
        print(json.dumps({"py_peak": peak - base, **done}))
        return
    with RssSampler() as rss:
        start = time.perf_counter()
        done = run_phase(args.child, dest, names, args.workers)
        seconds = time.perf_counter() - start
    print(
        json.dumps({"seconds": seconds, "peak_rss": rss.peak_rss, "rss_growth": rss.peak_rss - rss.start_rss, **done})
    )


# ---- orchestration --------------------------------------------------------------------------------


def start_emulator(workdir: Path) -> tuple[subprocess.Popen, str]:
    port_file = workdir / "emulator.port"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "scin_pipeline_tests.gcs_emulator", "--port-file", str(port_file)],
        cwd=REPO,
        env=env,
    )
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the emulator did not start")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port_file.read_text().strip()}"


def upload_objects(endpoint: str, count: int, size_kb: int) -> tuple[list[str], int]:
    import numpy as np
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project="bench", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint}
    )
    bucket = client.bucket("dx-scin-public-data")
    rng = np.random.default_rng(0)
    names, total = [], 0
    for _ in range(count):
        # Sizes vary +-20% around the target like real photos; ids are signed int64-like as in SCIN.
        size = int(size_kb * 1024 * rng.uniform(0.8, 1.2))
        data = PNG_SIGNATURE + rng.bytes(size - len(PNG_SIGNATURE))
        name = f"{IMAGE_PREFIX}{int(rng.integers(-(2**62), 2**62))}.png"
        bucket.blob(name).upload_from_string(
            data, content_type="image/png"
        )  # serial: the emulator's store is not thread-safe for writes
        names.append(name)
        total += len(data)
    client.close()
    return names, total


def run_child(phase: str, mode: str, dest: Path, names_file: Path, workers: int, endpoint: str) -> dict:
    env = {**os.environ, "STORAGE_EMULATOR_HOST": endpoint}
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            phase,
            "--mode",
            mode,
            "--dest",
            str(dest),
            "--names-file",
            str(names_file),
            "--workers",
            str(workers),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"phase {phase}/{mode} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratio(value: float, peer: float) -> str:
    return f"x{value / peer:.2f}" if peer else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size-kb", type=int, default=500)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per phase; the median is shown")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--dest", help=argparse.SUPPRESS)
    parser.add_argument("--names-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return

    workdir = Path(tempfile.mkdtemp(prefix="scin-bench-ingest-"))
    emulator, endpoint = start_emulator(workdir)
    try:
        started = time.perf_counter()
        names, total_bytes = upload_objects(endpoint, args.images, args.size_kb)
        upload_s = time.perf_counter() - started
        names_file = workdir / "names.json"
        names_file.write_text(json.dumps(names))
        mb = total_bytes / 1e6

        labels = {
            "ours": "(a) fetch_images, empty dir",
            "tm": "(b) transfer_manager (threads)",
            "ours_resume": "(c) fetch_images re-run (resume)",
            "tm_resume": "(d) transfer_manager re-run, skip_if_exists",
        }
        runs: dict[str, list[dict]] = {phase: [] for phase in labels}
        # Alternate the methods so drift on a shared machine hits both alike; fresh folders each time.
        for rep in range(args.repeat):
            for phase, folder in (
                ("ours", f"ours-{rep}"),
                ("tm", f"tm-{rep}"),
                ("ours_resume", f"ours-{rep}"),
                ("tm_resume", f"tm-{rep}"),
            ):
                runs[phase].append(run_child(phase, "time", workdir / folder, names_file, args.workers, endpoint))
        measured = {}
        for phase, label in labels.items():
            timed = runs[phase]
            alloc_dir = workdir / ("ours-alloc" if phase.startswith("ours") else "tm-alloc")
            alloc = run_child(phase, "alloc", alloc_dir, names_file, args.workers, endpoint)
            measured[phase] = {
                "label": label,
                "seconds": statistics.median(r["seconds"] for r in timed),
                "peak_rss": statistics.median(r["peak_rss"] for r in timed),
                "rss_growth": statistics.median(r["rss_growth"] for r in timed),
                "py_peak": alloc["py_peak"],
            }
            for r in timed + [alloc]:
                if phase.startswith("ours") and (r["ok"] != len(names) or r["statuses"] != ["ok"]):
                    raise RuntimeError(f"{label}: not every image ended ok: {r}")
        fetched_on_resume = [r["fetched"] for r in runs["ours_resume"]]
        if any(fetched_on_resume):
            raise RuntimeError(f"resume fetched {fetched_on_resume} images, expected 0")

        print(
            f"{len(names)} objects, {mb:.1f} MB (~{args.size_kb} KB each), {args.workers} workers; emulator: "
            f"threaded gcp-storage-emulator in its own process on loopback (upload took {upload_s:.1f}s); "
            f"{os.cpu_count()} CPUs; Python {sys.version.split()[0]}"
        )
        columns = [
            ("method", 46),
            ("seconds", 8),
            ("MB/s", 7),
            ("img/s", 7),
            ("time vs peer", 12),
            ("peak RSS MB", 17),
            ("RSS growth MB", 17),
            ("peak py alloc MB", 18),
        ]
        header = " ".join(
            f"{name:<{width}}" if i == 0 else f"{name:>{width}}" for i, (name, width) in enumerate(columns)
        )
        print(header)
        print("-" * len(header))
        peers = {"ours": "tm", "tm": "tm", "ours_resume": "tm_resume", "tm_resume": "tm_resume"}
        for phase, peer in peers.items():
            m, p = measured[phase], measured[peer]
            cells = [
                m["label"],
                f"{m['seconds']:.2f}",
                f"{mb / m['seconds']:.0f}",
                f"{len(names) / m['seconds']:.0f}",
                ratio(m["seconds"], p["seconds"]),
                f"{m['peak_rss'] / 1e6:.0f} ({ratio(m['peak_rss'], p['peak_rss'])})",
                f"{m['rss_growth'] / 1e6:.1f} ({ratio(m['rss_growth'], p['rss_growth'])})",
                f"{m['py_peak'] / 1e6:.2f} ({ratio(m['py_peak'], p['py_peak'])})",
            ]
            print(
                " ".join(
                    f"{cell:<{width}}" if i == 0 else f"{cell:>{width}}"
                    for i, (cell, (_, width)) in enumerate(zip(cells, columns, strict=True))
                )
            )
        print("ratios: (a),(b) vs (b) transfer_manager; (c),(d) vs (d) transfer_manager skip_if_exists;")
        print("lower is better. RSS growth = peak during the phase minus RSS when it started.")
    finally:
        emulator.terminate()
        try:
            emulator.wait(timeout=10)
        except subprocess.TimeoutExpired:
            emulator.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
