"""Throughput of ``scin-pipeline predict`` against the model's own ``predict_proba``, same images, same run, CPU.

    python bench/predict.py [--arch resnet50|baseline_cnn] [--image-size 224] [--images 200]
                            [--width 1024 --height 768] [--batch-size 32] [--workers 2] [--rounds 3]

The model: built here from ``scin_pipeline.core.models`` (``--arch``, random weights: throughput does not
depend on them), packaged, logged and registered in a temporary SQLite registry (bench/serve.py's
``register_bench_model``) and loaded back the way ``predict`` loads it. The images: ``--images`` SYNTHETIC
photos (core.synthetic's renderer), ``--width`` x ``--height`` PNG files in a temporary folder.

Rows, in img/s:

  (a) peer: ``package.predict_proba`` on the already decoded and preprocessed images, ``--batch-size`` per
      call (what the model alone costs);
  (b) ``predict``'s work: ``file_prediction.classify_files`` over the files (read, guarded decode, quality
      verdict, training's preprocessing, the model call per batch) into a CSV, ``--workers`` decode threads;
  (c) the whole command, ``scin-pipeline predict FOLDER`` in a fresh process (start-up and model loading
      included), once.

(a) and (b) alternate for ``--rounds`` rounds (median reported) so that load from other processes on a
shared machine hits both alike. Synthetic images and random weights: throughput only, nothing about any
model's accuracy.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU figures, also on a machine with a GPU
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve import register_bench_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PATTERNS = ("eczema_blotches", "psoriasis_plaques", "urticaria_wheals")


def write_photos(folder: Path, n: int, width: int, height: int) -> list[Path]:
    from scin_pipeline.core.synthetic.encoding import encode_png
    from scin_pipeline.core.synthetic.lesions import render_skin_image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"photo-{i:05d}.png"
        path.write_bytes(
            encode_png(render_skin_image(f"bench-predict-{i}", 1 + i % 10, PATTERNS[i % 3], (width, height), seed=i))
        )
        paths.append(path)
    return paths


def model_alone(served, images, batch_size: int) -> float:
    import pandas as pd

    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        served.predict_proba(batch, pd.DataFrame(index=range(len(batch))))
    return len(images) / (time.perf_counter() - started)


def predict_files(served, files: list[Path], batch_size: int, workers: int) -> float:
    from scin_pipeline.serve.file_prediction import classify_files, output_columns

    started = time.perf_counter()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=output_columns(served.classes), restval="")
    writer.writeheader()
    for row in classify_files(served, files, batch_size=batch_size, workers=workers):
        if row["status"] != "ok":
            raise RuntimeError(f"bench photo refused: {row['error_detail']}")
        writer.writerow(row)
    return len(files) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["resnet50", "baseline_cnn"], default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import numpy as np

    from scin_pipeline.core.image_cache import preprocess_image
    from scin_pipeline.serve.model import load_served_model
    from scin_pipeline.serve.prediction import decode_photo

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp_name:
        tmp = Path(tmp_name)
        tracking_uri, model_uri = register_bench_model(tmp / "registry", args.arch, args.image_size)
        files = write_photos(tmp / "photos", args.images, args.width, args.height)
        served = load_served_model(model_uri, tracking_uri=tracking_uri)
        # The peer's input: the same files, decoded and preprocessed once, outside the timing.
        images = np.stack([preprocess_image(decode_photo(p.read_bytes(), str(p)), args.image_size) for p in files])
        model_alone(served, images[: args.batch_size], args.batch_size)  # warm-up: graph tracing
        peer, ours = [], []
        for _ in range(args.rounds):
            peer.append(model_alone(served, images, args.batch_size))
            ours.append(predict_files(served, files, args.batch_size, args.workers))
        # This checkout's CLI (python -m), not whichever scin-pipeline script is on PATH.
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": str(REPO)}
        command = [sys.executable, "-m", "scin_pipeline.cli", "predict", str(tmp / "photos")]
        command += ["--model", model_uri, "--out", str(tmp / "predictions.csv"), "--batch-size", str(args.batch_size)]
        command += ["--workers", str(args.workers)]
        started = time.perf_counter()
        subprocess.run(command, env=env, cwd=REPO, check=True, capture_output=True)
        whole = args.images / (time.perf_counter() - started)

    peer_rate, our_rate = statistics.median(peer), statistics.median(ours)
    print(
        f"{args.arch} at {args.image_size} px, {args.images} SYNTHETIC {args.width} x {args.height} PNGs, "
        f"batch {args.batch_size}, {args.workers} decode threads, {os.cpu_count()} CPUs, median of {args.rounds}"
    )
    print(f"{'row':58s} {'img/s':>8s} {'vs (a)':>7s}")
    for label, rate in [
        ("(a) package.predict_proba on decoded images (peer)", peer_rate),
        ("(b) predict: read, decode, quality, preprocess, predict", our_rate),
        ("(c) scin-pipeline predict FOLDER, fresh process, once", whole),
    ]:
        print(f"{label:58s} {rate:8.1f} {rate / peer_rate:7.2f}")
    print(f"rounds (a): {', '.join(f'{r:.1f}' for r in peer)}; (b): {', '.join(f'{r:.1f}' for r in ours)}")


if __name__ == "__main__":
    main()
