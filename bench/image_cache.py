"""Benchmark the decoded image cache (scin_pipeline.core.image_cache) against plain peers, same run.

    python bench/image_cache.py [--images 200] [--width 1600 --height 1200] [--image-size 224]
                                [--workers 2] [--batch-size 32] [--epochs 3]

SYNTHETIC images only: ``--images`` phone-sized PNGs (1600 x 1200 by default, every other one portrait)
are generated into a temp folder: 8 drawn skin bases (scin_pipeline.core.synthetic.lesions.render_skin_image,
Monk tones 1-10 and several lesion patterns) plus Gaussian sensor noise (sigma 2, its own seed per file)
so that every file differs and compresses like a photo, written with OpenCV's default PNG settings.
Every file is read once beforehand so that all peers see a warm page cache.

Build (images per second, ratio against the plain loop):
  (a) plain loop: ``cv2.imread`` + ``cv2.resize`` to S x S (INTER_AREA; squashes, no checks), one thread;
  (a2) a loop of ``preprocess_image_file`` (guarded decode + centred square), one thread, no cache;
  (b) ``build_image_cache`` from scratch with ``--workers`` threads, and with 1 thread;
  (c) ``build_image_cache`` rerun on the same inputs (every shard reused; nothing decoded).
  (a), (a2) and (b) run in ``--rounds`` interleaved rounds (a, a2, b, b1, a, ...), best of each, so that
  load from other processes on a shared machine hits every peer alike.

Read (images per second, ratio against the in-memory peer):
  (d) peer: the same uint8 array ``np.load``-ed fully into memory, batches gathered with the same
      shuffled order (``arr[order[i:i+B]]``, the copy a training step needs);
  (e) ``CachedImageSequence`` batches, shuffle on, augment off and on;
  (f) ``load_images`` (memory-mapped shard reads in index order) against ``np.load`` of one file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scin_pipeline.core.image_cache import build_image_cache, load_images, preprocess_image_file  # noqa: E402
from scin_pipeline.core.synthetic.lesions import render_skin_image  # noqa: E402

PATTERNS = (
    "eczema_blotches",
    "urticaria_wheals",
    "tinea_rings",
    "psoriasis_plaques",
    "folliculitis_papules",
    "impetigo_crusts",
    "nonspecific_marks",
    "none",
)


def write_synthetic_pngs(folder: Path, n: int, width: int, height: int) -> pd.DataFrame:
    bases = [
        render_skin_image(f"bench{k}", 1 + (k * 9) // 7 % 10, PATTERNS[k], (width, height), seed=11) for k in range(8)
    ]
    rows = []
    for i in range(n):
        rng = np.random.default_rng(i)
        base = bases[i % len(bases)]
        noisy = np.clip(base + rng.normal(0.0, 2.0, base.shape), 0, 255).astype(np.uint8)
        if i % 2:
            noisy = np.ascontiguousarray(noisy.transpose(1, 0, 2))  # portrait
        path = folder / f"{10**12 + i}.png"
        if not cv2.imwrite(str(path), cv2.cvtColor(noisy, cv2.COLOR_RGB2BGR)):
            raise RuntimeError(f"could not write {path}")
        rows.append({"image_id": path.stem, "local_path": str(path), "split": ("train", "val", "test")[i % 3]})
    return pd.DataFrame(rows)


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=1200)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3, help="passes over the array per read measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the build measurements")
    args = ap.parse_args(argv)
    size, n = args.image_size, args.images

    from scin_pipeline.core.image_cache import CachedImageSequence  # keras import (after argument parsing)

    tmp = Path(tempfile.mkdtemp(prefix="bench_image_cache_"))
    try:
        t_gen, rows = timed(lambda: write_synthetic_pngs(tmp, n, args.width, args.height))
        mb = sum(os.path.getsize(p) for p in rows["local_path"]) / n / 1e6
        for p in rows["local_path"]:  # warm page cache for every peer
            Path(p).read_bytes()
        print(
            f"{n} synthetic PNGs {args.width}x{args.height}, {mb:.2f} MB each, generated in {t_gen:.1f} s; "
            f"S={size}, workers={args.workers}, cores={os.cpu_count()}, load avg {os.getloadavg()[0]:.1f}"
        )

        def plain_loop():
            for p in rows["local_path"]:
                cv2.resize(cv2.imread(p), (size, size), interpolation=cv2.INTER_AREA)

        def guarded_loop():
            for p in rows["local_path"]:
                preprocess_image_file(p, size)

        # Interleaved rounds, best of each: other processes on a shared machine hit all peers alike.
        t_plain = t_guarded = t_build = t_build1 = float("inf")
        for r in range(args.rounds):
            t_plain = min(t_plain, timed(plain_loop)[0])
            t_guarded = min(t_guarded, timed(guarded_loop)[0])
            t, built = timed(
                lambda r=r: build_image_cache(rows, tmp / f"cache{r}", image_size=size, workers=args.workers)
            )
            t_build = min(t_build, t)
            t_build1 = min(
                t_build1,
                timed(lambda r=r: build_image_cache(rows, tmp / f"cache1-{r}", image_size=size, workers=1))[0],
            )
            shutil.rmtree(tmp / f"cache1-{r}")
            if r == 0:
                index = built  # cache0 stays for the rerun and read measurements
            else:
                shutil.rmtree(tmp / f"cache{r}")
        t_rerun, _ = timed(
            lambda: build_image_cache(rows, tmp / "cache0", image_size=size, workers=args.workers), repeat=3
        )
        assert (index["status"] == "ok").all()

        t_load, images = timed(lambda: load_images(index, tmp / "cache0"), repeat=3)
        np.save(tmp / "all.npy", images)
        t_npload, arr = timed(lambda: np.load(tmp / "all.npy"), repeat=3)
        y = np.arange(n) % 5
        bs, epochs = args.batch_size, args.epochs

        def peer_read():
            for e in range(epochs):
                order = np.random.default_rng([0, e]).permutation(n)
                for i in range(0, n, bs):
                    arr[order[i : i + bs]]

        def sequence_read(augment: bool):
            seq = CachedImageSequence(images, y, bs, shuffle=True, augment=augment, seed=0)
            for _ in range(epochs):
                for i in range(len(seq)):
                    seq[i]
                seq.on_epoch_end()

        t_peer, _ = timed(peer_read, repeat=3)
        t_seq, _ = timed(lambda: sequence_read(False), repeat=3)
        t_aug, _ = timed(lambda: sequence_read(True), repeat=3)

        def rate(t, count=n):
            return count / t

        reads = n * epochs
        table = [
            ("build", "plain loop cv2.imread + cv2.resize, 1 thread (peer)", rate(t_plain), 1.0),
            ("build", "loop of preprocess_image_file (guarded decode), 1 thread", rate(t_guarded), t_plain / t_guarded),
            ("build", f"build_image_cache, {args.workers} threads, from scratch", rate(t_build), t_plain / t_build),
            ("build", "build_image_cache, 1 thread, from scratch", rate(t_build1), t_plain / t_build1),
            ("build", "build_image_cache rerun, same inputs (all reused)", rate(t_rerun), t_plain / t_rerun),
            ("read", "in-memory array, shuffled batch gather (peer)", rate(t_peer, reads), 1.0),
            ("read", "CachedImageSequence, shuffle", rate(t_seq, reads), t_peer / t_seq),
            ("read", "CachedImageSequence, shuffle + augment", rate(t_aug, reads), t_peer / t_aug),
            ("load", "np.load of one .npy with all images (peer)", rate(t_npload), 1.0),
            ("load", "load_images (memmap shards, index order)", rate(t_load), t_npload / t_load),
        ]
        print(f"\n{'stage':<6} {'what':<56} {'img/s':>10} {'x peer':>8}")
        for stage, what, r, ratio in table:
            print(f"{stage:<6} {what:<56} {r:>10,.0f} {ratio:>8.2f}")
        print(
            f"\nbatch size {bs}, {epochs} epochs per read measurement; builds: best of {args.rounds} "
            "interleaved rounds; rerun/read/load: best of 3.\nSynthetic images: throughput only, says nothing "
            "about any model."
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
