"""Faults, each a test: a run killed during curation and rerun, a flaky bucket, an unwritable data root.

The pipeline runs as a user runs it, through the ``scin-pipeline`` console script in a subprocess, on a
SYNTHETIC mirror of 20 cases with 64x48 px images; a clean run of the same mirror is the reference every
recovered run must equal.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest
from dagster import AssetSelection, DagsterInstance, materialize

from scin_pipeline.assets import ALL_ASSET_CHECKS, ALL_ASSETS
from scin_pipeline.cli import EXIT_USAGE
from scin_pipeline.core.paths import CASES_OBJECT, LABELS_OBJECT
from scin_pipeline.core.sources import SYNTHETIC_MARKER
from scin_pipeline.core.synthetic.mirror import write_synthetic_mirror
from scin_pipeline.definitions import build_resources
from scin_pipeline.resources import ScinSourceResource

SCRIPT = str(Path(sys.executable).parent / "scin-pipeline")
SELECT = "group:ingest or group:curation"  # everything up to the splits; training is tested elsewhere
CLI_TIMEOUT_S = 240
# One key per row of each table: a rerun that duplicated rows would repeat a key.
TABLE_KEYS = {
    "raw_metadata": ["file_name"],
    "cases": ["case_id"],
    "images": ["case_id", "position"],
    "image_files": ["object_path"],
    "image_quality": ["image_id"],
    "quality_filtered_index": ["image_id", "case_id"],
    "dedup_clusters": ["image_id", "case_id"],
    "labeled_splits": ["image_id", "case_id"],
}
# Temporary names used by the writers (IO manager and raw store: ".tmp-*"; fetch: ".tmp-<pid>-*").
TEMP_MARKERS = (".tmp-", ".tmp", ".partial", ".write-test-")


# ---- helpers -------------------------------------------------------------------------------------------


def cli_env() -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # the runner's embedded store under each data root
    env.pop("SCIN_ALERT_WEBHOOK_URL", None)
    return env


def start_cli(data_root: Path, mirror: Path, log: Path, select: str = SELECT) -> subprocess.Popen:
    """The console script in its own process group (so the kill takes its worker processes too)."""
    return subprocess.Popen(
        [SCRIPT, "run", "--source", str(mirror), "--data-root", str(data_root), "--select", select],
        env=cli_env(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def run_cli(data_root: Path, mirror: Path, log: Path, select: str = SELECT) -> None:
    proc = start_cli(data_root, mirror, log, select)
    try:
        code = proc.wait(timeout=CLI_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 0, log.read_text()[-4000:]


def step_started(data_root: Path, step_key: str) -> bool:
    """Whether the latest run under ``data_root`` has started ``step_key``.

    Read straight from the embedded instance's SQLite files, READ-ONLY: opening a DagsterInstance here
    while the CLI initialises its own would race it to create and stamp the schema (two alembic heads).
    The layout (history/runs.db, history/runs/<run_id>.db) is Dagster's SQLite storage.
    """
    history = data_root / "dagster_home" / "history"
    try:
        with closing(sqlite3.connect(f"file:{history / 'runs.db'}?mode=ro", uri=True)) as runs:
            row = runs.execute("SELECT run_id FROM runs ORDER BY id DESC LIMIT 1").fetchone()
        if row is None:
            return False
        with closing(sqlite3.connect(f"file:{history / 'runs' / (row[0] + '.db')}?mode=ro", uri=True)) as events:
            return (
                events.execute(
                    "SELECT 1 FROM event_logs WHERE dagster_event_type = 'STEP_START' AND step_key = ? LIMIT 1",
                    (step_key,),
                ).fetchone()
                is not None
            )
    except sqlite3.Error:  # not created yet, or busy: poll again
        return False


def wait_for_step_start(data_root: Path, step_key: str, proc: subprocess.Popen, timeout_s: float = 180) -> bool:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        if step_started(data_root, step_key):
            return True
        time.sleep(0.05)
    return False


def temp_files(data_root: Path) -> list[Path]:
    """Half-written or temporary files of the pipeline (Dagster's own instance folder excluded)."""
    found = []
    for path in data_root.rglob("*"):
        if "dagster_home" in path.relative_to(data_root).parts:
            continue
        if any(marker in path.name for marker in TEMP_MARKERS):
            found.append(path)
    return found


def read_tables(data_root: Path) -> dict[str, pd.DataFrame]:
    """Every table, read back (a sharded table from its folder of partitions)."""
    tables_dir = data_root / "tables"
    tables = {}
    for name in TABLE_KEYS:
        single, sharded = tables_dir / f"{name}.parquet", tables_dir / name
        if single.exists():
            tables[name] = pd.read_parquet(single)
        else:
            tables[name] = pd.concat([pd.read_parquet(p) for p in sorted(sharded.glob("*.parquet"))], ignore_index=True)
    # Every other Parquet file the run wrote (plots' data, split report, pairs) must be readable too.
    for path in tables_dir.rglob("*.parquet"):
        pd.read_parquet(path)
    return tables


def assert_same_outcome(recovered: Path, reference: Path) -> None:
    got, want = read_tables(recovered), read_tables(reference)
    for name, keys in TABLE_KEYS.items():
        assert len(got[name]) == len(want[name]), f"{name}: {len(got[name])} rows, reference {len(want[name])}"
        duplicated = got[name].duplicated(keys)
        assert not duplicated.any(), f"{name}: duplicated {keys}: {got[name][duplicated][keys]}"
        assert set(map(tuple, got[name][keys].astype(str).to_numpy())) == set(
            map(tuple, want[name][keys].astype(str).to_numpy())
        ), name
    columns = ["image_id", "case_id", "split", "label"]
    pd.testing.assert_frame_equal(
        got["labeled_splits"][columns].reset_index(drop=True), want["labeled_splits"][columns].reset_index(drop=True)
    )
    shards = sorted(p.name for p in (recovered / "tables" / "image_quality").iterdir())
    assert shards == sorted(p.name for p in (reference / "tables" / "image_quality").iterdir())
    images = {p.name: p.stat().st_size for p in (recovered / "images").glob("*.png")}
    assert images == {p.name: p.stat().st_size for p in (reference / "images").glob("*.png")}


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults") / "mirror"
    return write_synthetic_mirror(root, n_cases=20, seed=1, image_size=(64, 48), defect_rate=0.0).root


@pytest.fixture(scope="module")
def reference(mirror, tmp_path_factory) -> Path:
    """A clean, uninterrupted run of the same mirror."""
    data_root = tmp_path_factory.mktemp("reference") / "data"
    run_cli(data_root, mirror, data_root.parent / "reference.log")
    return data_root


# ---- a run killed during curation ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["image_quality", "labeled_splits"])
def test_a_run_killed_during_curation_then_rerun_loses_and_duplicates_nothing(mirror, reference, tmp_path, kill_at):
    data_root = tmp_path / "data"
    proc = start_cli(data_root, mirror, tmp_path / "killed.log")
    try:
        started = wait_for_step_start(data_root, kill_at, proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the CLI and its quality workers
        proc.wait(timeout=30)
    assert started, f"{kill_at} never started:\n{(tmp_path / 'killed.log').read_text()[-4000:]}"
    assert proc.returncode == -signal.SIGKILL  # killed, not finished

    run_cli(data_root, mirror, tmp_path / "rerun.log")
    assert temp_files(data_root) == []
    assert_same_outcome(data_root, reference)


KILLED_WRITER = """
import sys
import numpy as np, pandas as pd
from pathlib import Path
from scin_pipeline.core.atomic import write_parquet_atomic
frame = pd.DataFrame(np.random.default_rng(0).random((3_000_000, 3)), columns=list("abc"))
write_parquet_atomic(frame, Path(sys.argv[1]))
"""


@pytest.mark.slow
def test_a_table_writer_killed_mid_write_leaves_no_partial_file_after_the_rerun(mirror, reference, tmp_path):
    """The SIGKILL lands inside the IO manager's write (deterministically: the frame takes ~1 s to write);
    readers never see the partial file (it is never renamed into place), and a rerun must remove it."""
    data_root = tmp_path / "data"
    shutil.copytree(reference, data_root, ignore=shutil.ignore_patterns("dagster_home", "mlflow"))
    shard_dir = data_root / "tables" / "image_quality"
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(shard_dir / "00.parquet")], start_new_session=True
    )
    deadline = time.monotonic() + 60
    while writer.poll() is None and time.monotonic() < deadline and not temp_files(data_root):
        time.sleep(0.002)
    if writer.poll() is None:
        os.killpg(writer.pid, signal.SIGKILL)
    writer.wait(timeout=30)
    if writer.returncode != -signal.SIGKILL or not temp_files(data_root):
        pytest.skip("the writer finished before the kill landed; the fault was not produced")
    pd.read_parquet(shard_dir)  # readers skip the dot-file: the shard set stays readable

    run_cli(data_root, mirror, tmp_path / "rerun.log", select="group:curation")
    assert temp_files(data_root) == []
    assert_same_outcome(data_root, reference)


# ---- a flaky bucket ----------------------------------------------------------------------------------------

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
}


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # A client that drops a kept-alive connection after a 503 is part of the fault, not news.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FlakyProxy:
    """A loopback HTTP proxy in front of the emulator that answers 503 to a seeded share of requests.

    A request target (method + path) gets at most ``max_in_a_row`` 503s in a row: a flaky server, not a
    dead one, so the outcome does not hinge on how many retries a random streak would need.
    """

    def __init__(self, upstream: str, failure_rate: float = 0.3, seed: int = 7, max_in_a_row: int = 2):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.failure_rate = failure_rate
        self.max_in_a_row = max_in_a_row
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._streak: collections.Counter = collections.Counter()
        self.served_503 = 0
        self.forwarded = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy.should_fail(self.command, urlparse(self.path).path):
                    payload = json.dumps({"error": {"code": 503, "message": "injected by FlakyProxy"}}).encode()
                    self.send_response(503)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                connection = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                finally:
                    connection.close()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

            def log_message(self, *args):
                pass

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def should_fail(self, method: str, path: str) -> bool:
        with self._lock:
            target = (method, path)
            if self._streak[target] < self.max_in_a_row and self._rng.random() < self.failure_rate:
                self._streak[target] += 1
                self.served_503 += 1
                return True
            self._streak[target] = 0
            self.forwarded += 1
            return False

    def __enter__(self) -> FlakyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def upload_mirror(emulator, mirror: Path) -> dict[str, bytes]:
    uploaded = {}
    for path in sorted(mirror.rglob("*")):
        object_path = path.relative_to(mirror).as_posix()
        if path.is_file() and (object_path.startswith("dataset/") or object_path == SYNTHETIC_MARKER):
            emulator.upload(object_path, path.read_bytes())
            uploaded[object_path] = path.read_bytes()
    return uploaded


def test_the_bucket_answering_503_to_a_share_of_requests_still_completes_through_retries(
    mirror, gcs_emulator, tmp_path, monkeypatch
):
    uploaded = upload_mirror(gcs_emulator, mirror)
    images = {p: data for p, data in uploaded.items() if p.startswith("dataset/images/")}
    with FlakyProxy(gcs_emulator.endpoint, failure_rate=0.3, seed=7) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        data_root = tmp_path / "data"
        resources = {
            **build_resources(data_root=str(data_root), source="gcs"),
            # fetch: up to 1 + 4 attempts per image, 0.5 s doubling backoff (the defaults)
            "scin_source": ScinSourceResource(location="gcs", download_workers=4),
        }
        result = materialize(
            [*ALL_ASSETS, *ALL_ASSET_CHECKS],
            resources=resources,
            selection=AssetSelection.groups("ingest"),
            instance=DagsterInstance.ephemeral(),
            raise_on_error=False,
        )
    assert result.success
    assert proxy.served_503 > 0 and proxy.forwarded > 0
    share = proxy.served_503 / (proxy.served_503 + proxy.forwarded)
    print(f"503s served: {proxy.served_503} of {proxy.served_503 + proxy.forwarded} requests ({share:.0%})")
    files = pd.read_parquet(data_root / "tables" / "image_files.parquet")
    assert (files["status"] == "ok").all(), files[files["status"] != "ok"][["object_path", "status", "reason"]]
    assert set(files["object_path"]) == set(images)
    retried = files[files["attempts"] > 1]
    assert len(retried) > 0  # some images needed more than one attempt, and still arrived intact
    for row in files.itertuples():
        assert (data_root / row.local_path).read_bytes() == images[row.object_path]
    raw = pd.read_parquet(data_root / "tables" / "raw_metadata.parquet").set_index("object_path")
    for object_path in (CASES_OBJECT, LABELS_OBJECT):
        assert (data_root / raw.loc[object_path, "local_path"]).read_bytes() == uploaded[object_path]


# ---- an unwritable data root --------------------------------------------------------------------------------


def unwritable_data_roots(tmp_path: Path) -> dict[str, Path]:
    """Places no process can create a folder in, root included (root ignores permission bits)."""
    a_file = tmp_path / "a-regular-file"
    a_file.write_text("not a folder")
    return {
        "a regular file": a_file,
        "under a regular file": a_file / "data",
        "inside /proc": Path("/proc/scin-pipeline-data"),
    }


@pytest.mark.parametrize("case", ["a regular file", "under a regular file", "inside /proc"])
def test_an_unwritable_data_root_is_one_clear_line_and_a_non_zero_exit(mirror, tmp_path, case):
    data_root = unwritable_data_roots(tmp_path)[case]
    if case == "inside /proc" and not Path("/proc/self").exists():
        pytest.skip("no /proc on this system")
    proc = subprocess.run(
        [SCRIPT, "run", "--source", str(mirror), "--data-root", str(data_root)],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == EXIT_USAGE
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"scin-pipeline: cannot write to the data root {data_root}")
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""
