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

from scin_pipeline.core import hamming  # noqa: E402

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

STAGE1_THRESHOLDS = (8, 10, 12, 14, 16)
STAGE2_THRESHOLDS = (4, 6, 8, 10, 12, 16, 20)
DEGENERATE = {"overexposed", "dark"}  # frames the quality filter drops: they are never searched


def _labels(root: Path):
    """The mirror's scin_labels.csv (the Monk tone labels), case_id as strings."""
    import pandas as pd

    return pd.read_csv(root / "dataset" / "scin_labels.csv", dtype={"case_id": str})


def _synthetic_images(n_cases: int, seeds, tmp: Path):
    """(key, tone, path, kind, source key) of every decodable image of synthetic mirrors (defect_rate 0.5)."""

    from scin_pipeline.core.planted import planted_near_duplicate_pairs
    from scin_pipeline.core.quality import monk_tone_per_image
    from scin_pipeline.core.synthetic.mirror import write_synthetic_mirror

    decodable = {"clean", "dark", "dark_diagnostic", "blurred", "overexposed", "near_duplicate", "exact_reuse"}
    for seed in seeds:
        root = tmp / f"mirror{seed}"
        mirror = write_synthetic_mirror(root, n_cases=n_cases, seed=seed, defect_rate=0.5, workers=os.cpu_count() or 1)
        plants = mirror.plants
        tone = monk_tone_per_image(plants.astype({"image_id": str, "case_id": str}), _labels(root))
        source_of = {a: b for a, b in planted_near_duplicate_pairs(plants).itertuples(index=False)}
        source_of.update({b: a for a, b in source_of.items()})
        for row in plants.drop_duplicates("image_id").itertuples(index=False):
            if row.planted in decodable and row.planted not in DEGENERATE:
                image_id = str(row.image_id)
                linked = source_of.get(image_id)
                yield (
                    f"{seed}:{image_id}",
                    int(tone.get(image_id, 0)),
                    root / row.image_path,
                    row.planted,
                    f"{seed}:{linked}" if linked else None,
                )


def _mirror_images(root: Path):
    """(key, tone, path, "real", None) of every image a SCIN mirror's scin_cases.csv references."""
    import pandas as pd

    from scin_pipeline.core.quality import monk_tone_per_image
    from scin_pipeline.core.schema import IMAGE_PATH_COLUMNS

    cases = pd.read_csv(root / "dataset" / "scin_cases.csv", dtype={"case_id": str})
    refs = cases.melt(id_vars="case_id", value_vars=IMAGE_PATH_COLUMNS, value_name="path").dropna(subset=["path"])
    refs = refs.assign(image_id=refs["path"].map(lambda p: Path(str(p)).stem))
    tone = monk_tone_per_image(refs, _labels(root))
    for row in refs.drop_duplicates("image_id").itertuples(index=False):
        yield str(row.image_id), int(tone.get(row.image_id, 0)), root / str(row.path), "real", None


def thresholds(n_cases: int, seeds, mirror: Path | None = None, limit: int | None = None) -> None:
    """Margins of the near-duplicate detector per threshold and per Monk tone, on synthetic mirrors or on a
    mirror of real images. True pairs: one re-upload copy of each image (bench/near_duplicate_generator's
    combined transformation: uneven crop 0-8 % a side, downscale 0.5-1.0, gain +-15 % and offset, JPEG
    60-95), plus a synthetic mirror's planted near-duplicates. Clean images: everything else."""
    from PIL import Image

    sys.path.insert(0, str(REPO / "bench"))
    from near_duplicate_generator import reupload

    from scin_pipeline.core import near_duplicates
    from scin_pipeline.core.quality import working_copy

    def descriptor(rgb: np.ndarray) -> bytes:
        gray = Image.fromarray(np.ascontiguousarray(working_copy(rgb, 512))).convert("L")
        return near_duplicates.image_descriptor(gray)

    keys, tones, kinds, links, blobs = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        found = _mirror_images(mirror) if mirror else _synthetic_images(n_cases, seeds, Path(tmp))
        for n, (key, tone, path, kind, linked) in enumerate(found):
            if limit and n >= limit:
                break
            try:
                with Image.open(path) as image:
                    rgb = np.asarray(image.convert("RGB"))
            except (OSError, ValueError):
                continue  # the quality stage would exclude it
            rng = np.random.default_rng([int.from_bytes(key.encode()[-8:], "little"), 13])
            copy, _ = reupload(rgb, rng, "combined")
            for k, (name, pixels) in enumerate(((key, rgb), (f"{key}~copy", copy))):
                keys.append(name)
                tones.append(tone)
                kinds.append(kind if k == 0 else "own copy")
                links.append(linked if k == 0 else key)
                blobs.append(descriptor(pixels))
    hashes, keypoints = near_duplicates.split_descriptors(blobs)
    keys, tones, kinds = np.array(keys), np.array(tones), np.array(kinds)
    index = {k: n for n, k in enumerate(keys)}
    # Duplicate groups: an image with its own copy, a planted copy with its source (and their copies).
    group = np.arange(len(keys))
    for n, linked in enumerate(links):
        if linked in index:
            a, b = sorted((group[n], group[index[linked]]))
            group[group == b] = a
    loosest = max(STAGE1_THRESHOLDS)
    cand = near_duplicates.candidate_pairs(hashes, loosest)
    i, j, dist = cand["i"].to_numpy(), cand["j"].to_numpy(), cand["crop_phash_distance"].to_numpy()
    dup = group[i] == group[j]
    inliers = near_duplicates.verify_pairs(keypoints, cand)
    originals = kinds != "own copy"
    # the true pairs: each image with its own copy (distance from the search, or above the loosest threshold)
    true_i = np.flatnonzero(originals)
    true_j = np.array([index[f"{k}~copy"] for k in keys[true_i]])
    pair_of = {(a, b): (d, m) for a, b, d, m in zip(i, j, dist, inliers)}
    true_d = np.array([pair_of.get((min(a, b), max(a, b)), (loosest + 1, 0))[0] for a, b in zip(true_i, true_j)])
    true_m = np.array([pair_of.get((min(a, b), max(a, b)), (loosest + 1, 0))[1] for a, b in zip(true_i, true_j)])
    # nearest clean image of every image (crop pHash distance), over the pairs within the loosest threshold
    nearest = np.full(len(keys), loosest + 1)
    np.minimum.at(nearest, i[~dup], dist[~dup])
    np.minimum.at(nearest, j[~dup], dist[~dup])
    most_inliers = np.zeros(len(keys), dtype=np.int64)
    np.maximum.at(most_inliers, i[~dup], inliers[~dup])
    np.maximum.at(most_inliers, j[~dup], inliers[~dup])
    tone_values = sorted(set(tones.tolist()))
    source = f"mirror {mirror}" if mirror else f"synthetic mirrors, seeds {list(seeds)}, {n_cases} cases each"
    print(
        f"{source}: {int(originals.sum())} images (quality-degenerate frames left out) + one re-upload copy each; "
        f"{len(cand):,} pairs within crop pHash {loosest}, {int((~dup).sum()):,} of them between unrelated images"
    )
    print(f"Monk tones (0 = unknown): {', '.join(f'{t}: {int((tones[originals] == t).sum())}' for t in tone_values)}\n")

    def cell(t_mask, recall, margin):
        return f"{recall:.3f}; {margin:+d}" if t_mask.any() else "-"

    print(
        "Stage 1, crop pHash <= T. Each cell: recall of own copies; margin = (distance from an image of that tone "
        f"to its nearest clean image, minimum) - T (above {loosest}: shown as {loosest + 1}). Negative: unrelated "
        "images become candidates, which stage 2 must reject.\n"
    )
    print("| T | " + " | ".join(f"Monk {t}" for t in tone_values) + " | all |")
    print("| ---: |" + " ---: |" * (len(tone_values) + 1))
    for threshold in STAGE1_THRESHOLDS:
        cells = []
        for t in (*tone_values, None):
            mask = np.ones(len(keys), bool) if t is None else tones == t
            tm = mask[true_i]
            recall = float(np.mean(true_d[tm] <= threshold)) if tm.any() else float("nan")
            cells.append(cell(tm, recall, int(nearest[mask].min()) - threshold))
        print(f"| {threshold} | " + " | ".join(cells) + " |")
    print(
        f"\nStage 2, ORB inliers >= M on the candidates within crop pHash {loosest}. Each cell: recall of own "
        "copies (stage 1 at the default included); margin = M - (most inliers of an image of that tone with any "
        "clean image). Positive: no unrelated pair is accepted.\n"
    )
    print("| M | " + " | ".join(f"Monk {t}" for t in tone_values) + " | all |")
    print("| ---: |" + " ---: |" * (len(tone_values) + 1))
    default_t = near_duplicates.DEFAULT_MAX_CROP_PHASH_DISTANCE
    for threshold in STAGE2_THRESHOLDS:
        cells = []
        for t in (*tone_values, None):
            mask = np.ones(len(keys), bool) if t is None else tones == t
            tm = mask[true_i]
            recall = float(np.mean((true_m[tm] >= threshold) & (true_d[tm] <= default_t))) if tm.any() else float("nan")
            cells.append(cell(tm, recall, threshold - int(most_inliers[mask].max())))
        print(f"| {threshold} | " + " | ".join(cells) + " |")
    accepted = (~dup) & (dist <= default_t) & (inliers >= near_duplicates.DEFAULT_MIN_INLIERS)
    print(
        f"\ndefaults: crop pHash <= {default_t}, inliers >= {near_duplicates.DEFAULT_MIN_INLIERS}; "
        f"own copies found {np.mean((true_d <= default_t) & (true_m >= near_duplicates.DEFAULT_MIN_INLIERS)):.3f}; "
        f"pairs of unrelated images accepted: {int(accepted.sum())}"
        + (" (on real images, look at them: some are near duplicates nobody planted)" if mirror else "")
    )
    for a, b, d, m in list(zip(i[accepted], j[accepted], dist[accepted], inliers[accepted]))[:20]:
        print(f"  {keys[a]} ~ {keys[b]}: crop pHash {d}, inliers {m}")


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
    parser.add_argument("--mirror", type=Path, help="--thresholds on the images of this SCIN mirror (real images)")
    parser.add_argument("--limit", type=int, help="--thresholds: at most this many images")
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--one", nargs=3, metavar=("N", "D", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        n, d, method = args.one
        print(json.dumps(measure_one(int(n), int(d), method)))
    elif args.thresholds:
        thresholds(args.cases, args.seeds, args.mirror, args.limit)
    elif args.calibrate:
        calibrate()
    else:
        search_table(args.sizes, args.distances)


if __name__ == "__main__":
    main()
