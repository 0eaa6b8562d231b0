"""Embedding extraction on CPU: ``core.training.extract_embeddings`` vs a raw ``model.predict``.

    python bench/train_cpu.py                         # both backends (tensorflow, jax), 128 px, 256 images
    python bench/train_cpu.py --image-size 96 --images 384 --backends jax

Each backend runs in its own child process (Keras fixes its backend at import). In the child: a ResNet50
backbone (weights=None: offline; the cost does not depend on the weight values) at the given size,
SYNTHETIC random uint8 images held in memory. Both methods use the same batch size and are warmed up
first on one batch (tracing / compilation excluded from the timing; stated in the table). Then one timed
pass each over all images, in alternating order over --repeats rounds; the table shows the best round
(least disturbed by the other processes on this shared 2-core machine), img/s, and the ratio
ours / model.predict measured in the same child. The outputs of the two are compared (max |diff|).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _child(args) -> dict:
    import numpy as np

    from scin_pipeline.core.backend import describe_backend, select_backend

    select_backend(args.child)
    import keras

    from scin_pipeline.core.models import build_resnet50_backbone
    from scin_pipeline.core.training import extract_embeddings

    keras.utils.set_random_seed(0)
    backbone = build_resnet50_backbone(args.image_size, weights=None)
    images = np.random.default_rng(0).integers(
        0, 256, (args.images, args.image_size, args.image_size, 3), dtype=np.uint8
    )
    methods = {
        "model.predict": lambda: backbone.predict(images, batch_size=args.batch_size, verbose=0),
        "extract_embeddings": lambda: extract_embeddings(backbone, images, batch_size=args.batch_size),
    }
    warm = images[: args.batch_size]
    backbone.predict(warm, batch_size=args.batch_size, verbose=0)
    extract_embeddings(backbone, warm, batch_size=args.batch_size)
    best, outputs = {}, {}
    for round_index in range(args.repeats):
        order = list(methods) if round_index % 2 == 0 else list(reversed(methods))
        for name in order:
            start = time.perf_counter()
            outputs[name] = methods[name]()
            took = time.perf_counter() - start
            best[name] = min(best.get(name, float("inf")), took)
    diff = float(np.abs(outputs["model.predict"] - outputs["extract_embeddings"]).max())
    return {
        "backend": describe_backend()["backend"],
        "seconds": best,
        "max_abs_diff": diff,
        "dtype": str(outputs["extract_embeddings"].dtype),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default="tensorflow,jax")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return

    print(
        f"ResNet50 backbone (weights=None), {args.image_size} px, {args.images} SYNTHETIC uint8 images, "
        f"batch {args.batch_size}; warm-up on one batch excluded; best of {args.repeats} rounds"
    )
    print(f"{'backend':<11} {'method':<20} {'seconds':>8} {'img/s':>8} {'ratio':>7}  max|diff|")
    for backend_name in args.backends.split(","):
        env = {**os.environ, "KERAS_BACKEND": backend_name, "TF_CPP_MIN_LOG_LEVEL": "3"}
        command = [
            sys.executable,
            __file__,
            "--child",
            backend_name,
            "--image-size",
            str(args.image_size),
            "--images",
            str(args.images),
            "--batch-size",
            str(args.batch_size),
            "--repeats",
            str(args.repeats),
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{backend_name:<11} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        report = json.loads(done.stdout.strip().splitlines()[-1])
        peer = report["seconds"]["model.predict"]
        for name, seconds in report["seconds"].items():
            print(
                f"{report['backend']:<11} {name:<20} {seconds:>8.2f} {args.images / seconds:>8.1f} "
                f"{peer / seconds:>6.2f}x  {report['max_abs_diff']:.1e}"
            )
    print("ratio = model.predict seconds / this method's seconds, same child process (>1: faster than predict)")


if __name__ == "__main__":
    main()
