"""Latency of one prediction through ``scin-pipeline serve`` against the model's own predict, same process, CPU.

    python bench/serve.py [--data-root DIR [--model models:/NAME@champion]]
                          [--arch baseline_cnn|resnet50] [--image-size 64] [--width 1024 --height 768]
                          [--requests 100] [--warmup 10]
    python bench/serve.py --clients 8 [--load-requests 200] [--rounds 3] [--variant NAME=SERVER_ARGS ...]
                          [--arch ...] [--image-size 64] [--width 160 --height 120]

The model: with ``--data-root`` the registry there (e.g. after ``scin-pipeline demo``), champion by
default; without it, a model built here from ``scin_pipeline.core.models`` (``--arch``, random weights:
latency does not depend on them), packaged, logged and registered in a temporary SQLite registry, and
loaded back the way the service loads it.

One SYNTHETIC photo (core.synthetic's renderer, ``--width`` x ``--height`` PNG). Per row, ``--requests``
sequential predictions after ``--warmup``; p50 and p95 in ms, and their ratio against the peer:

  (a) peer: ``package.predict_proba`` on the already decoded and preprocessed image (what the model costs);
  (b) the service's work without HTTP: ``serve.prediction.predict`` (decode once, quality check,
      training's preprocessing, predict, answer dict);
  (c) ``POST /predict`` over loopback to uvicorn serving ``create_app`` in a thread of this process
      (multipart upload, parsing, JSON), one keep-alive client.

Interleaved rounds (a, b, c, a, b, c, ...) so that load from other processes on a shared machine hits
every row alike. Synthetic images and random weights: latency only, says nothing about any model's
accuracy.

``--clients N`` measures throughput instead: each ``--variant`` (``NAME=`` followed by extra options of
``python -m scin_pipeline.serve.server``, e.g. ``unbatched=--max-batch-size 1``; default one variant with
the defaults) runs as its own server process on loopback, started from this checkout, or from another
checkout with ``NAME@DIR=...`` (e.g. a ``git worktree`` of an older commit: before/after in one run), and
N client threads
(one keep-alive connection each, N different SYNTHETIC photos) send ``--load-requests`` predictions; the
variants take turns for ``--rounds`` rounds. Per variant: requests/s (median of the rounds, and their
range), p50/p95/p99 latency over every request of every round, errors, and the ratio of requests/s and
p95 against the first variant.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU figures, also on a machine with a GPU
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scin_pipeline.core.synthetic.lesions import render_skin_image  # noqa: E402

CLASSES = ["Eczema", "Psoriasis", "Urticaria", "Tinea", "other"]


def register_bench_model(root: Path, arch: str, image_size: int) -> tuple[str, str]:
    """(tracking URI, model URI) of a freshly registered package of ``arch`` with random weights."""
    from scin_pipeline.core.models import (
        build_baseline_cnn,
        build_classifier_head,
        build_resnet50_backbone,
        compose_end_to_end,
    )
    from scin_pipeline.core.packaged_model import PackagedClassifier
    from scin_pipeline.resources import MlflowTracking, StoragePaths
    from scin_pipeline.runner import embedded_mlflow_uri

    if arch == "baseline_cnn":
        model = build_baseline_cnn(len(CLASSES), image_size)
    else:
        backbone = build_resnet50_backbone(image_size, weights=None)
        head = build_classifier_head(int(backbone.output_shape[-1]), len(CLASSES))
        model = compose_end_to_end(backbone, head, with_metadata=False)
    package_dir = PackagedClassifier(kind="keras_image", classes=CLASSES, model=model, image_size=image_size).save(
        root / "package"
    )
    uri = embedded_mlflow_uri(root)
    tracking = MlflowTracking(
        tracking_uri=uri, storage=StoragePaths(data_root=str(root)), registered_model_name="bench-serve"
    )
    with tracking.training_run(
        run_key=f"bench-serve-{arch}-{image_size}",
        run_name="bench",
        tags={"scin.synthetic_data": "true"},
        params={"arch": arch},
    ) as run:
        _, version = run.log_model(package_dir)
    return uri, f"models:/bench-serve/{version}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(app) -> tuple[object, threading.Thread, str]:
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, access_log=False, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start in 60 s")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


REPO = Path(__file__).resolve().parents[1]


def start_server_process(tracking_uri: str, model_uri: str, extra: list[str], log_path: Path, checkout: Path = REPO):
    """``python -m scin_pipeline.serve.server`` of ``checkout`` on a free port; (process, base URL) once
    /healthz says a model is served."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "scin_pipeline.serve.server", "--tracking-uri", tracking_uri]
    command += ["--model", model_uri, "--port", str(port), "--alias-poll-s", "0", *extra]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server {extra} exited {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2).json().get("serving"):
                return proc, base_url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server {extra} not ready in 180 s: {log_path.read_text()[-2000:]}")
        time.sleep(0.3)


def load_round(base_url: str, photos: list[bytes], clients: int, requests: int) -> tuple[float, list[float], int]:
    """(wall s, latencies ms, errors) of ``requests`` predictions from ``clients`` concurrent clients."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    def client_loop(worker: int) -> tuple[list[float], int]:
        latencies, errors = [], 0
        with httpx.Client(base_url=base_url, timeout=120) as client:
            for _ in range(worker, requests, clients):
                started = time.perf_counter()
                response = client.post("/predict", files={"file": ("p.png", photos[worker], "image/png")})
                latencies.append((time.perf_counter() - started) * 1000)
                errors += response.status_code != 200
        return latencies, errors

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client_loop, range(clients)))
    wall = time.perf_counter() - started
    return wall, [ms for latencies, _ in results for ms in latencies], sum(errors for _, errors in results)


def run_load(args, tracking_uri: str, model_uri: str, tmp: Path) -> None:
    from scin_pipeline.core.synthetic.encoding import encode_png

    patterns = ("eczema_blotches", "psoriasis_plaques", "urticaria_wheals")
    photos = [
        encode_png(render_skin_image(f"bench-load-{i}", 1 + i % 10, patterns[i % 3], (args.width, args.height), seed=i))
        for i in range(args.clients)
    ]
    variants, checkouts = [], {}
    for spec in args.variant or ["server="]:
        name, _, extra = spec.partition("=")
        name, _, checkout = name.partition("@")
        checkouts[name] = Path(checkout).expanduser().resolve() if checkout else REPO
        variants.append((name, shlex.split(extra)))
    servers = {}
    try:
        for name, extra in variants:
            log = tmp / f"{name}.log"
            servers[name] = start_server_process(tracking_uri, model_uri, extra, log, checkouts[name])
        for _, base_url in servers.values():  # warm-up: first calls trace graphs
            load_round(base_url, photos, args.clients, 2 * args.clients)
        rates = {name: [] for name in servers}
        latencies = {name: [] for name in servers}
        errors = dict.fromkeys(servers, 0)
        for _ in range(args.rounds):
            for name, (_, base_url) in servers.items():
                wall, ms, failed = load_round(base_url, photos, args.clients, args.load_requests)
                rates[name].append(args.load_requests / wall)
                latencies[name] += ms
                errors[name] += failed
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(
        f"\n{model_uri} ({args.arch}, {args.image_size} px); {args.clients} concurrent clients, "
        f"{args.load_requests} POST /predict per round, {args.rounds} rounds, variants in turn; "
        f"{args.width} x {args.height} SYNTHETIC PNGs; server: a separate process on loopback; CPU only"
    )
    print(
        f"{'variant':<12} {'checkout':<16} {'server options':<40} {'req/s':>7} {'(range)':>13} {'p50 ms':>7} "
        f"{'p95 ms':>7} {'p99 ms':>7} {'errors':>6} {'req/s x first':>14} {'p95 x first':>12}"
    )
    first_rate = first_p95 = None
    for name, extra in variants:
        rate = float(np.median(rates[name]))
        p50, p95, p99 = np.percentile(latencies[name], [50, 95, 99])
        first_rate = first_rate or rate
        first_p95 = first_p95 or p95
        spread = f"{min(rates[name]):.1f}-{max(rates[name]):.1f}"
        print(
            f"{name:<12} {checkouts[name].name:<16} {' '.join(extra) or '(defaults)':<40} {rate:>7.1f} {spread:>13} "
            f"{p50:>7.0f} {p95:>7.0f} {p99:>7.0f} {errors[name]:>6} {rate / first_rate:>14.2f} {p95 / first_p95:>12.2f}"
        )
    print("\nLatency only: synthetic images and random weights; no accuracy is implied.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=None, help="use this data root's registry (embedded MLflow store)")
    parser.add_argument("--model", default="models:/scin-condition-classifier@champion")
    parser.add_argument("--arch", choices=("baseline_cnn", "resnet50"), default="baseline_cnn")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--clients", type=int, default=0, help="throughput with N concurrent clients (see above)")
    parser.add_argument("--load-requests", type=int, default=200, help="predictions per round (--clients)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per variant (--clients)")
    parser.add_argument(
        "--variant", action="append", metavar="NAME=SERVER_ARGS", help="a server variant (--clients; repeatable)"
    )
    args = parser.parse_args()

    import httpx

    from scin_pipeline.core.image_cache import preprocess_image_bytes
    from scin_pipeline.core.synthetic.encoding import encode_png
    from scin_pipeline.serve import create_app
    from scin_pipeline.serve.inputs import PredictionRequest
    from scin_pipeline.serve.prediction import predict

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        if args.data_root:
            from scin_pipeline.runner import embedded_mlflow_uri

            tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or embedded_mlflow_uri(
                Path(args.data_root).expanduser().resolve()
            )
            model_uri = args.model
        else:
            tracking_uri, model_uri = register_bench_model(Path(tmp), args.arch, args.image_size)
        if args.clients:
            run_load(args, tracking_uri, model_uri, Path(tmp))
            return
        app = create_app(model_uri, tracking_uri=tracking_uri, max_upload_bytes=64 * 2**20, alias_poll_s=0)
        served = app.state.model_source.served
        if served is None:
            raise SystemExit(f"nothing to benchmark: {app.state.model_source.state.reason}")
        photo = encode_png(render_skin_image("bench-serve", 6, "eczema_blotches", (args.width, args.height), seed=3))
        size = served.package.image_size
        images = preprocess_image_bytes(photo, size)[None] if served.uses_image else None
        cases = PredictionRequest(image=None).cases()
        server, thread, base_url = start_server(app)
        try:
            with httpx.Client(base_url=base_url, timeout=120) as client:

                def direct():
                    served.predict_proba(images, cases)

                def in_process():
                    predict(served, PredictionRequest(image=photo))

                def over_http():
                    response = client.post("/predict", files={"file": ("photo.png", photo, "image/png")})
                    if response.status_code != 200:
                        raise RuntimeError(f"POST /predict answered {response.status_code}: {response.text[:300]}")

                rows = {"direct": direct, "in_process": in_process, "http": over_http}
                for _ in range(args.warmup):
                    for fn in rows.values():
                        fn()
                samples = {name: [] for name in rows}
                for _ in range(args.requests):
                    for name, fn in rows.items():
                        started = time.perf_counter()
                        fn()
                        samples[name].append((time.perf_counter() - started) * 1000)
        finally:
            server.should_exit = True
            thread.join(timeout=10)

    stats = {name: np.percentile(values, [50, 95]) for name, values in samples.items()}
    peer50, peer95 = stats["direct"]
    labels = {
        "direct": "package.predict_proba, inputs already decoded + preprocessed (peer)",
        "in_process": "serve.prediction.predict: decode, quality, preprocess, predict",
        "http": "POST /predict over loopback (uvicorn, same process)",
    }
    print(
        f"\nmodel {served.loaded_uri} ({served.kind}, {size or '-'} px input); photo {args.width} x {args.height} "
        f"PNG, {len(photo) / 1024:,.0f} KiB (SYNTHETIC); {args.requests} sequential predictions per row after "
        f"{args.warmup} warm-up, rows interleaved; CPU only"
    )
    print(f"{'what':<70} {'p50 ms':>8} {'p95 ms':>8} {'p50 x peer':>11} {'p95 x peer':>11}")
    for name, (p50, p95) in stats.items():
        print(f"{labels[name]:<70} {p50:>8.1f} {p95:>8.1f} {p50 / peer50:>11.2f} {p95 / peer95:>11.2f}")
    print("\nLatency only: synthetic image, random or synthetic-trained weights; no accuracy is implied.")


if __name__ == "__main__":
    main()
