"""Training throughput of the transfer-learning path on a GPU host (JAX, mixed_bfloat16), with a peer.

    python bench/gpu_train.py                        # ResNet50, 224 px, batch 256, 40 steps per phase
    python bench/gpu_train.py --backbone efficientnetv2_b0   # efficientnet_transfer's backbone
    python bench/gpu_train.py --small                # CPU sanity run: 64 px, batch 16, 6 steps
    python bench/gpu_train.py --image-size 160 --batch-size 128 --steps 30 --workers 8

What runs ("ours"): ``core.training.fine_tune_transfer``, the function the Dagster training asset calls,
on a SYNTHETIC decoded cache held in memory (uint8 (N, S, S, 3), N = steps x batch), with its default
loader ``core.image_cache.CachedImageSequence`` (geometric augmentation on, ``--workers`` threads;
``--loader array`` swaps in a plain in-memory PyDataset without augmentation), one epoch per phase:
"frozen" (backbone frozen, head trained) and "fine_tune" (top ``--unfreeze`` layers trainable, BN frozen).
Peer, in the same process on the same model: a raw ``model.fit`` on the same in-memory uint8 array
(Keras slices it itself; no augmentation, no macro-metric callback, no checkpointing), same batch, same
trainable layers, same optimizer and loss.

Timing: a callback reads the loss of train batch ``--warmup`` (forcing JAX to finish the work queued so
far) and of the last batch; img/s = (steps - warmup) x batch / the time between. So compilation, the
warm-up steps and the per-epoch validation prediction are excluded; the input pipeline (cache ->
augment -> device) is included. ratio = ours img/s / peer img/s.

Imports: keras, numpy and scin_pipeline.core.{backend,models,training,image_cache}; none of them imports
tensorflow or dagster at module level. Where tensorflow is installed, ``keras.utils.set_random_seed``
imports it to seed it too; with tensorflow blocked from import (a meta-path hook raising ImportError)
the --small run completes, so a JAX-only GPU host needs no tensorflow. Backbone weights=None (no
download; speed does not depend on them). A --small run on CPU is a sanity check only: its ratios
(6 steps, 2 warm-up, shared 2-core machine) are noise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scin_pipeline.core.backend import apply_mixed_precision, describe_backend, select_backend  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50", help="a key of core.models.BACKBONES")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40, help="train steps per phase (one epoch)")
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from the timing (compile, ramp-up)")
    parser.add_argument("--workers", type=int, default=8, help="loader threads (CachedImageSequence)")
    parser.add_argument("--unfreeze", type=int, default=30, help="top backbone layers trainable in phase 2")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--loader", choices=("cache", "array"), default="cache")
    parser.add_argument("--backend", default="jax")
    parser.add_argument("--precision", choices=("bfloat16", "off", "auto"), default="bfloat16")
    parser.add_argument("--small", action="store_true", help="CPU sanity: 64 px, batch 16, 6 steps, warm-up 2")
    args = parser.parse_args()
    if args.small:
        args.image_size, args.batch_size, args.steps, args.warmup, args.workers = 64, 16, 6, 2, 2
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    return args


def _timer_class():
    import keras

    class ThroughputTimer(keras.callbacks.Callback):
        """Images/s between the end of batch ``warmup - 1`` and the end of the last batch of each fit."""

        def __init__(self, warmup: int, steps: int, batch_size: int):
            super().__init__()
            self.warmup, self.steps, self.batch_size = warmup, steps, batch_size
            self.rates: list[float] = []

        def on_train_begin(self, logs=None):
            self._start = None

        def on_train_batch_end(self, batch, logs=None):
            if batch == self.warmup - 1 or batch == self.steps - 1:
                float(np.asarray(logs["loss"]))  # blocks until this step's work is done
                now = time.perf_counter()
                if batch == self.warmup - 1:
                    self._start = now
                elif self._start is not None:
                    self.rates.append((self.steps - self.warmup) * self.batch_size / (now - self._start))
                    self._start = None

    return ThroughputTimer


def _array_batches_class():
    import keras

    class InMemoryBatches(keras.utils.PyDataset):
        """Plain shuffled batches of the in-memory cache, no augmentation (--loader array)."""

        def __init__(self, images, y, *, batch_size, shuffle, augment, seed, metadata=None, workers=1):
            super().__init__(workers=workers, use_multiprocessing=False)
            self.images, self.y, self.batch_size = images, y, batch_size
            self.order = np.random.default_rng(seed).permutation(len(y)) if shuffle else np.arange(len(y))

        def __len__(self):
            return len(self.y) // self.batch_size

        def __getitem__(self, index):
            rows = np.sort(self.order[index * self.batch_size : (index + 1) * self.batch_size])
            return self.images[rows], self.y[rows]

    return InMemoryBatches


def main() -> None:
    args = parse_args()
    backend = select_backend(args.backend)
    policy = apply_mixed_precision(args.precision)
    import functools

    import keras

    from scin_pipeline.core.models import (
        backbone_spec,
        build_backbone,
        build_classifier_head,
        compose_end_to_end,
        unfreeze_top,
    )
    from scin_pipeline.core.training import TrainConfig, _compile, default_dataset_factory, fine_tune_transfer

    n = args.steps * args.batch_size
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    images = rng.integers(0, 256, (n, args.image_size, args.image_size, 3), dtype=np.uint8)
    y = (np.arange(n) % args.classes).astype(np.int32)
    val_images, val_y = images[: args.batch_size], y[: args.batch_size]
    print(
        f"SYNTHETIC cache in memory: {n} images {args.image_size} px ({images.nbytes / 2**30:.2f} GiB), "
        f"made in {time.perf_counter() - started:.1f} s"
    )
    print(f"backend {backend}, policy {policy}, devices: {describe_backend()['devices']}")

    if args.loader == "cache":
        factory = functools.partial(default_dataset_factory, workers=args.workers)
        loader = f"CachedImageSequence (augment on, {args.workers} threads)"
    else:
        factory = functools.partial(_array_batches_class(), workers=args.workers)
        loader = f"in-memory PyDataset (no augmentation, {args.workers} threads)"

    keras.utils.set_random_seed(0)
    backbone = build_backbone(args.backbone, args.image_size, weights=None)
    head = build_classifier_head(backbone.output_shape[-1], args.classes)
    timer = _timer_class()(args.warmup, args.steps, args.batch_size)
    config = TrainConfig(
        epochs=1,
        fine_tune_epochs=1,
        batch_size=args.batch_size,
        unfreeze_layers=args.unfreeze,
        early_stopping_patience=1,
        mixed_precision=args.precision,
        augment=True,
        loader_workers=args.workers,
        class_weighting="none",
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as checkpoint_dir:  # as the asset runs it: with resume checkpoints
        fine_tune_transfer(
            backbone,
            head,
            images,
            y,
            val_images,
            val_y,
            config=config,
            dataset_factory=factory,
            callbacks=[timer],
            checkpoint_dir=checkpoint_dir,
        )
    ours = list(timer.rates)
    ours_wall = time.perf_counter() - started

    # Peer: raw model.fit on the in-memory array, same model, same phases.
    peer_timer = _timer_class()(args.warmup, args.steps, args.batch_size)
    started = time.perf_counter()
    backbone.trainable = False
    model = compose_end_to_end(backbone, head, with_metadata=False)
    for phase in ("frozen", "fine_tune"):
        if phase == "fine_tune":
            unfreeze_top(backbone, args.unfreeze)
        _compile(model, config.learning_rate)
        model.fit(images, y, batch_size=args.batch_size, epochs=1, shuffle=True, callbacks=[peer_timer], verbose=0)
    peer = list(peer_timer.rates)
    peer_wall = time.perf_counter() - started

    print(
        f"\n{backbone_spec(args.backbone).label} {args.image_size} px, batch {args.batch_size}, "
        f"{args.steps} steps per phase, "
        f"first {args.warmup} excluded (compile + warm-up); loader: {loader}"
    )
    print(f"{'phase':<10} {'ours img/s':>11} {'peer img/s':>11} {'ratio':>7}")
    for phase, ours_rate, peer_rate in zip(("frozen", "fine_tune"), ours, peer):
        print(f"{phase:<10} {ours_rate:>11.1f} {peer_rate:>11.1f} {ours_rate / peer_rate:>6.2f}x")
    print(f"wall time incl. compile and validation: ours {ours_wall:.1f} s, peer {peer_wall:.1f} s")
    print(
        "ours = fine_tune_transfer (asset path: loader, macro metrics, checkpoints); "
        "peer = raw model.fit on the in-memory uint8 array; ratio = ours / peer"
    )
    print(
        f"tensorflow imported: {'tensorflow' in sys.modules} (keras.utils.set_random_seed imports it only "
        f"where installed, to seed it too); dagster imported: {'dagster' in sys.modules}"
    )


if __name__ == "__main__":
    main()
