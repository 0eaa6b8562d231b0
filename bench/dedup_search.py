"""Benchmark and calibrate the near-duplicate search: core.hamming (the search, its cost model) and
core.dedup (its thresholds).

    python bench/dedup_search.py                 # search table: ours vs a blockwise brute-force popcount
    python bench/dedup_search.py --thresholds    # pHash / dHash distances of true vs unrelated image pairs
    python bench/dedup_search.py --calibrate     # refit the cost-model constants of core.hamming

Search table: N random uint64 hashes (seeded) plus N/100 planted near pairs (a copy of a random hash with
0..12 bits flipped), for N = 10,000 / 100,000 / 1,000,000 and max_distance 4, 6, 8, 10. Each measurement
runs in a fresh child process (so one run's peak RSS is not inflated by another's), which builds the same
data from the seed, then times ``find_near_duplicate_pairs`` (automatic plan) and, where N <= 100,000, the
blockwise brute force (``n_substrings=0``: every pair, popcount, in blocks of 2M pairs) on the same data.
RSS is sampled with psutil every 2 ms in a thread; "peak RSS" is the process peak during the search,
"+MB" the rise above the RSS just before it. The ratio is brute-force seconds / our seconds; the two pair
sets are compared for equality. Brute force at N = 1,000,000 (5e11 pairs) is not run, and nothing is
extrapolated.

Thresholds: synthetic mirrors (scin_pipeline.core.synthetic, 480 x 360) are written with defect_rate 0.5 so
that ~5 % of their files are planted near-duplicates (2-5 % crop + resize back, brightness shift 3-8 levels,
JPEG quality 75-92, copied from another case). Every decodable image is hashed with imagehash directly
(pHash, dHash, 64 bits, on PIL's "L" grey image, as the quality stage does). In addition, every clean image
gets one copy of our own with the same kind of changes (PIL bilinear instead of OpenCV), doubling the true
pairs. Printed: the distance quantiles of true pairs, of unrelated pairs, and the joint table (recall of
true pairs / unrelated pairs accepted) for thresholds on both hashes. Unrelated pairs are split into
"ordinary" (neither image a blown-out or black frame, the images the quality filter keeps) and all.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scin_pipeline.core import dedup, hamming, planted  # noqa: E402

SIZES = (10_000, 100_000, 1_000_000)
DISTANCES = (4, 6, 8, 10)
BRUTE_FORCE_MAX_N = 100_000
SEED = 20240229


# ---- data ------------------------------------------------------------------------------------------


def bench_hashes(n: int, seed: int = SEED) -> np.ndarray:
    """n random hashes with n/100 of them replaced by near copies (0..12 bits flipped) of others."""
    rng = np.random.default_rng([seed, n])
    hashes = rng.integers(0, np.iinfo(np.uint64).max, n, dtype=np.uint64, endpoint=True)
    n_planted = n // 100
    targets = rng.choice(n, size=2 * n_planted, replace=False)
    sources, copies = targets[:n_planted], targets[n_planted:]
    flips = np.zeros(n_planted, dtype=np.uint64)
    for k, n_bits in enumerate(np.arange(n_planted) % 13):
        for bit in rng.choice(64, size=int(n_bits), replace=False):
            flips[k] |= np.uint64(1) << np.uint64(bit)
    hashes[copies] = hashes[sources] ^ flips
    return hashes


# ---- measuring -------------------------------------------------------------------------------------


class PeakRss:
    """Samples this process's RSS every 2 ms in a thread (psutil)."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.before = self.process.memory_info().rss
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def measure_one(n: int, max_distance: int, method: str) -> dict:
    hashes = bench_hashes(n)
    n_substrings = 0 if method == "brute_force" else None
    plan = hamming.plan_search(n, max_distance, n_substrings=n_substrings)
    with PeakRss() as rss:
        start = time.perf_counter()
        pairs = hamming.find_near_duplicate_pairs(hashes, max_distance, n_substrings=n_substrings)
        seconds = time.perf_counter() - start
    digest = int(np.bitwise_xor.reduce(pairs["i"].to_numpy() * 1_000_003 + pairs["j"].to_numpy())) if len(pairs) else 0
    return {
        "n": n,
        "d": max_distance,
        "method": method,
        "m": plan.n_substrings,
        "seconds": seconds,
        "pairs": len(pairs),
        "digest": digest,
        "peak_mb": rss.peak / 2**20,
        "rise_mb": (rss.peak - rss.before) / 2**20,
    }


def in_child(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--one", *args], capture_output=True, text=True, check=True, cwd=REPO
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def search_table(sizes, distances) -> None:
    print(f"core.hamming search, {os.cpu_count()} CPUs, numpy {np.__version__}; each cell a fresh process\n")
    header = (
        "| N | max_distance | plan | ours s | pairs | peak RSS MB (+search) | brute force s | brute peak RSS MB "
        "(+search) | same pairs | brute / ours |"
    )
    print(header)
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for n in sizes:
        for d in distances:
            ours = in_child(str(n), str(d), "ours")
            plan = f"MIH m={ours['m']}" if ours["m"] else "brute force"
            cells = [
                f"{n:,}",
                str(d),
                plan,
                f"{ours['seconds']:.2f}",
                f"{ours['pairs']:,}",
                f"{ours['peak_mb']:.0f} (+{ours['rise_mb']:.0f})",
            ]
            if n <= BRUTE_FORCE_MAX_N:
                brute = in_child(str(n), str(d), "brute_force")
                same = "yes" if (brute["pairs"], brute["digest"]) == (ours["pairs"], ours["digest"]) else "NO"
                cells += [
                    f"{brute['seconds']:.2f}",
                    f"{brute['peak_mb']:.0f} (+{brute['rise_mb']:.0f})",
                    same,
                    f"{brute['seconds'] / ours['seconds']:.1f}x",
                ]
            else:
                cells += ["not run", "not run", "-", "-"]
            print("| " + " | ".join(cells) + " |", flush=True)


# ---- thresholds ------------------------------------------------------------------------------------


def _packed(image_hash) -> np.uint64:
    return np.uint64(int.from_bytes(np.packbits(image_hash.hash.ravel()).tobytes(), "big"))


def _hash_pair(image):
    import imagehash

    grey = image.convert("L")
    return _packed(imagehash.phash(grey)), _packed(imagehash.dhash(grey))


def _altered_copy(image, rng):
    """The near-duplicate plant's changes, redone with PIL: crop 2-5 % and resize back, shift brightness by
    3-8 levels, re-encode as JPEG at quality 75-92."""
    from PIL import Image

    width, height = image.size
    crop = rng.uniform(0.02, 0.05)
    crop_w, crop_h = round(width * (1 - crop)), round(height * (1 - crop))
    left, top = round(width * crop * rng.uniform()), round(height * crop * rng.uniform())
    resized = image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.BILINEAR)
    shifted = np.clip(np.asarray(resized, np.float32) + rng.choice([-1, 1]) * rng.uniform(3, 8), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(shifted.astype(np.uint8)).save(buffer, "JPEG", quality=int(rng.integers(75, 93)))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def thresholds(n_cases: int, seeds) -> None:
    import pandas as pd
    from PIL import Image

    from scin_pipeline.core.synthetic.mirror import write_synthetic_mirror

    decodable = {
        "clean",
        "dark",
        "dark_diagnostic",
        "blurred",
        "overexposed",
        "near_duplicate",
        "wrong_format",
        "exact_reuse",
    }
    degenerate = {"overexposed", "dark"}  # frames the quality filter drops
    records, true_p, true_d, origin = [], [], [], []
    related: set[tuple[str, str]] = set()  # planted (copy, source) pairs: true pairs, not unrelated ones
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            root = Path(tmp) / f"mirror{seed}"
            mirror = write_synthetic_mirror(
                root, n_cases=n_cases, seed=seed, defect_rate=0.5, workers=os.cpu_count() or 1
            )
            plants = mirror.plants
            by_id = {}
            for row in plants.itertuples(index=False):
                if row.planted not in decodable:
                    continue
                with Image.open(root / row.image_path) as image:
                    image = image.convert("RGB")
                phash, dhash = _hash_pair(image)
                by_id[row.image_id] = (phash, dhash)
                records.append((f"{seed}:{row.image_id}", row.planted, phash, dhash))
                if row.planted == "clean":
                    copy_p, copy_d = _hash_pair(_altered_copy(image, rng))
                    true_p.append(int(np.bitwise_count(phash ^ copy_p)))
                    true_d.append(int(np.bitwise_count(dhash ^ copy_d)))
                    origin.append("own copy")
            near = planted.planted_near_duplicate_pairs(plants)
            for a, b in near.itertuples(index=False):
                true_p.append(int(np.bitwise_count(by_id[a][0] ^ by_id[b][0])))
                true_d.append(int(np.bitwise_count(by_id[a][1] ^ by_id[b][1])))
                origin.append("planted")
            related |= {(f"{seed}:{a}", f"{seed}:{b}") for a, b in near.itertuples(index=False)}
    true_p, true_d, origin = np.array(true_p), np.array(true_d), np.array(origin)
    table = pd.DataFrame(records, columns=["key", "planted", "phash", "dhash"])
    keys = table["key"].to_numpy()
    phash = table["phash"].to_numpy(np.uint64)
    dhash = table["dhash"].to_numpy(np.uint64)
    i, j = np.triu_indices(len(table), k=1)
    unrelated_p = np.bitwise_count(phash[i] ^ phash[j])
    unrelated_d = np.bitwise_count(dhash[i] ^ dhash[j])
    a, b = np.minimum(keys[i], keys[j]), np.maximum(keys[i], keys[j])
    is_related = np.array([(x, y) in related for x, y in zip(a, b)])
    kinds = table["planted"].to_numpy()
    ordinary = ~np.isin(kinds[i], list(degenerate)) & ~np.isin(kinds[j], list(degenerate)) & ~is_related
    everything = ~is_related

    print(f"synthetic mirrors: seeds {list(seeds)}, {n_cases} cases each, 480 x 360; {len(table)} decodable images")
    print(
        f"true pairs: {len(true_p)} ({(origin == 'planted').sum()} planted by the generator, "
        f"{(origin == 'own copy').sum()} own copies); unrelated pairs: {ordinary.sum():,} ordinary, "
        f"{everything.sum():,} with blown-out/black frames\n"
    )
    q = [50, 90, 99, 100]
    print("| pairs | hash | p50 | p90 | p99 | max | min |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for label, mask in (("true, planted", origin == "planted"), ("true, own copies", origin == "own copy")):
        for name, values in (("pHash", true_p[mask]), ("dHash", true_d[mask])):
            p = np.percentile(values, q)
            print(f"| {label} | {name} | " + " | ".join(f"{v:.0f}" for v in p) + f" | {values.min()} |")
    for label, mask in (("unrelated, ordinary", ordinary), ("unrelated, all", everything)):
        for name, values in (("pHash", unrelated_p[mask]), ("dHash", unrelated_d[mask])):
            p = np.percentile(values, [50, 1, 0.1, 0.01])
            print(
                f"| {label} | {name} | {p[0]:.0f} | p1 {p[1]:.0f} | p0.1 {p[2]:.0f} | p0.01 {p[3]:.0f} | "
                f"{values.min()} |"
            )

    print(
        "\nJoint rule pHash <= P AND dHash <= D. Each cell: true pairs accepted (planted + own copies, of "
        f"{len(true_p)}); unrelated ordinary pairs accepted (of {ordinary.sum():,}); all unrelated pairs accepted\n"
    )
    d_values = (8, 10, 12, 14, 16)
    print("| P \\ D | " + " | ".join(str(d) for d in d_values) + " |")
    print("| ---: |" + " --- |" * len(d_values))
    accepted = {}
    for p_max in (8, 10, 12, 14, 16, 18):
        cells = []
        for d_max in d_values:
            accept_true = (true_p <= p_max) & (true_d <= d_max)
            accept_unrelated = (unrelated_p <= p_max) & (unrelated_d <= d_max)
            n_true, n_false = int(accept_true.sum()), int((accept_unrelated & ordinary).sum())
            accepted[p_max, d_max] = (
                n_true,
                n_false,
                accept_true[origin == "planted"].mean(),
                accept_true[origin == "own copy"].mean(),
            )
            cells.append(f"{n_true}; {n_false}; {int((accept_unrelated & everything).sum())}")
        print(f"| {p_max} | " + " | ".join(cells) + " |")
    # The pick: the most true pairs among the cells that accept no ordinary unrelated pair and whose pHash
    # step looser (+2) accepts none either: one step of margin on the hash that is searched.
    safe = [
        (v[0], -p_max, -d_max)
        for (p_max, d_max), v in accepted.items()
        if v[1] == 0 and accepted.get((p_max + 2, d_max), (0, 1))[1] == 0
    ]
    if safe:
        _, p_pick, d_pick = max(safe)
        n_true, _, planted_recall, own_recall = accepted[-p_pick, -d_pick]
        print(
            f"\npick: pHash <= {-p_pick}, dHash <= {-d_pick}: {n_true} of {len(true_p)} true pairs (recall "
            f"{planted_recall:.3f} planted, {own_recall:.3f} own copies), 0 of {ordinary.sum():,} ordinary "
            "unrelated pairs, also 0 at pHash + 2"
        )
    print(
        f"\nmodule defaults: pHash <= {dedup.DEFAULT_MAX_PHASH_DISTANCE}, dHash <= {dedup.DEFAULT_MAX_DHASH_DISTANCE}"
    )


# ---- calibration -----------------------------------------------------------------------------------


def calibrate() -> None:
    """Time the search over a grid of (N, d, m) and fit the cost-model constants (non-negative least squares
    on relative error)."""
    from scipy.optimize import nnls

    features, seconds, labels = [], [], []
    brute = []
    hamming.find_near_duplicate_pairs(bench_hashes(3000), 4)  # warm-up: imports, first allocations
    for n in (3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000):
        hashes = bench_hashes(n)
        for d in (2, 4, 6, 8, 10):
            for m in range(3, 11):
                tables = hamming.substring_tables(m, d)
                searched = [t for t in tables if t.radius >= 0]
                masks = [hamming.keys_within_radius(t.width, t.radius) for t in searched]
                pairs = n * (n - 1) / 2
                row = [
                    sum((v - 1) * 2.0 ** (t.width - 1) for v, t in zip(masks, searched)),
                    sum(masks),
                    sum(pairs * v / 2.0**t.width for v, t in zip(masks, searched)),
                    n * len(searched),
                    sum(2.0**t.width for t in searched),
                ]
                guess = 1e-9 * np.dot(row, [1, 7e4, 6, 70, 6])
                if guess > 8:
                    continue
                start = time.perf_counter()
                hamming.find_near_duplicate_pairs(hashes, d, n_substrings=m)
                features.append(row)
                seconds.append(time.perf_counter() - start)
                labels.append((n, d, m))
            if n <= 30_000:
                start = time.perf_counter()
                hamming.find_near_duplicate_pairs(hashes, d, n_substrings=0)
                brute.append((time.perf_counter() - start) / (n * (n - 1) / 2))
        print(f"timed N = {n:,}", flush=True)
    features, seconds = np.array(features), np.array(seconds)
    weights = 1 / np.maximum(seconds, 0.01)
    constants, _ = nnls(features * weights[:, None], seconds * weights)
    names = ("SWEEP_NS", "MASK_NS", "CANDIDATE_NS", "BUILD_NS", "KEYSPACE_NS")
    for name, value in zip(names, constants * 1e9):
        print(f"{name} = {value:.3g}")
    print(f"BRUTE_NS = {np.median(brute) * 1e9:.3g}")
    predicted = features @ constants
    worst = 1.0
    for key in sorted({(n, d) for n, d, _ in labels}):
        rows = [k for k, label in enumerate(labels) if label[:2] == key]
        best = min(rows, key=lambda k: seconds[k])
        chosen = min(rows, key=lambda k: predicted[k])
        worst = max(worst, seconds[chosen] / seconds[best])
        print(
            f"N={key[0]:>9,} d={key[1]:>2}: fastest m={labels[best][2]} {seconds[best]:.3f}s, "
            f"model picks m={labels[chosen][2]} {seconds[chosen]:.3f}s"
        )
    print(f"worst ratio of the model's pick to the fastest m: {worst:.2f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=list(SIZES))
    parser.add_argument("--distances", type=lambda s: [int(v) for v in s.split(",")], default=list(DISTANCES))
    parser.add_argument("--thresholds", action="store_true")
    parser.add_argument("--cases", type=int, default=400, help="cases per synthetic mirror (--thresholds)")
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--one", nargs=3, metavar=("N", "D", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        n, d, method = args.one
        print(json.dumps(measure_one(int(n), int(d), method)))
    elif args.thresholds:
        thresholds(args.cases, args.seeds)
    elif args.calibrate:
        calibrate()
    else:
        search_table(args.sizes, args.distances)


if __name__ == "__main__":
    main()
