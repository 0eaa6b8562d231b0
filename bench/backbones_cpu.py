"""Embedding extraction on CPU, backbone against backbone: ResNet50 (image_embeddings) vs EfficientNetV2-B0
(efficientnet_embeddings), the same images, in one run.

    python bench/backbones_cpu.py                          # 224 px, 128 images, batch 32, 3 rounds
    python bench/backbones_cpu.py --image-size 64 --images 512

What runs: ``core.training.extract_embeddings`` (what the embeddings assets call) on each backbone as
``core.models.build_backbone`` builds it (preprocessing inside, pooled stages concatenated, float32 out),
weights=None (offline; the cost does not depend on the weight values), on the same SYNTHETIC random uint8
images held in memory, TensorFlow backend, float32. Each backbone is warmed up on one batch first (tracing
excluded); then ``--repeats`` rounds, each timing one pass of each backbone over all images, the order
alternating per round; the table shows each backbone's best round (least disturbed by other processes on a
shared machine), img/s, and the ratio EfficientNetV2-B0 / ResNet50 from the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BACKBONES = ("resnet50", "efficientnetv2_b0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from scin_pipeline.core.backend import describe_backend, select_backend

    select_backend("tensorflow")
    import keras
    import numpy as np

    from scin_pipeline.core.models import backbone_spec, build_backbone
    from scin_pipeline.core.training import extract_embeddings

    keras.utils.set_random_seed(0)
    images = np.random.default_rng(0).integers(
        0, 256, (args.images, args.image_size, args.image_size, 3), dtype=np.uint8
    )
    models = {name: build_backbone(name, args.image_size, weights=None) for name in BACKBONES}
    for model in models.values():
        extract_embeddings(model, images[: args.batch_size], batch_size=args.batch_size)
    best: dict[str, float] = {}
    dims: dict[str, int] = {}
    for round_index in range(args.repeats):
        order = list(BACKBONES) if round_index % 2 == 0 else list(reversed(BACKBONES))
        for name in order:
            started = time.perf_counter()
            embeddings = extract_embeddings(models[name], images, batch_size=args.batch_size)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)
            dims[name] = int(embeddings.shape[1])

    described = describe_backend()
    print(
        f"SYNTHETIC images: {args.images} x {args.image_size} px, batch {args.batch_size}, "
        f"backend {described['backend']}, {os.cpu_count()} CPUs, best of {args.repeats} rounds"
    )
    print(f"{'backbone':<18} {'params':>10} {'dim':>6} {'seconds':>8} {'img/s':>8}")
    for name in BACKBONES:
        rate = args.images / best[name]
        params = models[name].count_params()
        print(f"{backbone_spec(name).label:<18} {params:>10,} {dims[name]:>6} {best[name]:>8.2f} {rate:>8.1f}")
    ratio = best["resnet50"] / best["efficientnetv2_b0"]
    print(f"EfficientNetV2-B0 / ResNet50 img/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()
