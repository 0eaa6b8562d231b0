"""Benchmark and calibrate the curation stage: per-image quality + hashes, against its peers.

    python bench/curation.py [--images 1000] [--workers 2] [--skip-big] [--cache DIR]
    python bench/curation.py --calibrate [--labelled SAMPLE.csv]    # margins of every threshold, only

``--calibrate`` runs section 4 and section 5 only. Section 5, the margins: for each threshold of the rule, the
value of the nearest clean image per Monk tone (the one closest to being excluded by that threshold) and
of the nearest defect it must catch, each with its margin (the ratio to the threshold; > 1 = on the
right side), on three sources: the calibration mirror (section 4), our flat-frame and plain-skin set
(bench/flat_and_plain_skin.py: flat frames are the defect of ``low_information_structure_min``, plain
skin counts as clean), and, with ``--labelled``, your own images: a CSV with columns ``path``,
``monk_tone`` (1-10, may be empty) and ``label`` (``clean``, or the defect: ``dark``, ``blurred``,
``overexposed``, ``flat``, ``tiny``, ``dark_diagnostic``). Re-tune a threshold where a margin is near
or under 1, then pass the new value as run config (README, "Re-tuning the quality rule").

1. Throughput. ``--images`` phone-sized PNGs are written once into a cache folder under /tmp (synthetic
   skin from scin_pipeline.core.synthetic, long side 800-1,600 px, 4:3 either way, Monk tones 1-10, a
   condition pattern, plus Gaussian sensor noise sigma 1.5 so that the PNGs are 0.8-3.5 MB like phone
   photos). Every file is read once beforehand so that all peers see a warm page cache. Then, on the same
   files and with the same number of processes (``--workers``), each in a fresh child process:

   (a) ours: ``assess_images`` (one decode, every quality metric, cleanvision's per-image properties, pHash
       and dHash), rows kept in a list as the asset keeps them;
   (b) cleanvision: ``Imagelab(filepaths=...).find_issues(n_jobs=W)`` with its defaults (all nine issue
       types, including its exact and near duplicate hashing);
   (c) imagehash: ``imagehash.phash(PIL.Image.open(path))`` per file, W processes;
   (d) plain decode: ``cv2.imread(path)`` per file, W processes: the practical limit of any stage that
       has to look at every pixel.

   Wall-clock time includes starting the worker processes (spawn for a, c, d; cleanvision forks).
   Peak RSS is the sum over the child and all its descendants, sampled every 20 ms with psutil (shared
   library pages are counted once per process, so it over-states).

2. Memory of our stage at N = 1,000 and N = 5,000 images (the same files under 5 different ids each):
   streaming keeps it flat. Skipped with --skip-big (only N = --images is run).

3. The near-duplicate search (scin_pipeline.core.hamming.find_near_duplicate_pairs) over 10,000 and
   1,000,000 random 64-bit hashes with 1 % planted near pairs, at the dedup stage's default pHash distance;
   1,000,000 is skipped with --skip-big.

4. Calibration of the quality rule: a synthetic mirror with planted defects (400 cases, every Monk tone
   equally often, 60 % of the files defective, seed 7, 1280 x 960 so that the images take the
   production path: decoded at half size, then area-averaged to the 512 px working copy), assessed once.
   Printed: precision / recall per planted reason with the defaults, the exclusion rate of clean images
   per Monk tone, and a sweep of each QualityConfig threshold with the others held (the two OR-ed
   "texture or redness visible" tests each with the other switched off), with the range of values where
   every planted reason keeps precision and recall >= 0.9, dark-but-diagnostic images are kept (>= 0.9),
   and clean deep skin (Monk 7-10) is excluded no more often than clean light skin (Monk 1-3).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_CACHE = Path("/tmp/scin-bench-curation")
PHONE_SEED = 20240601
PHONE_VERSION = 1  # bump when the way phone images are drawn changes (invalidates the cache)
CALIBRATION = dict(n_cases=400, seed=7, image_size=(1280, 960), defect_rate=0.6)

# Values swept per threshold (the others held at their defaults).
SWEEPS = {
    "dark_relative_min": [round(0.05 * k, 2) for k in range(1, 20)],
    "diagnostic_redness_min": [0.5, 1, 2, 3, 4, 6, 8, 10, 12, 15, 20, 30],
    "diagnostic_texture_min": [0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0],
    "overexposed_fraction_max": [0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99],
    "blurry_sharpness_min": [0.5, 1, 1.25, 1.5, 2, 3, 4, 6, 8, 10, 12.5, 15, 20, 30],
    "low_information_entropy_min": [0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0],
}

SWEPT_ALONE = {
    "diagnostic_redness_min": {"diagnostic_texture_min": float("inf")},
    "diagnostic_texture_min": {"diagnostic_redness_min": float("inf")},
}


# ---- measuring ------------------------------------------------------------------------------------


class TreeRssSampler:
    """Peak of (RSS of this process + RSS of all its descendants) while the block runs."""

    def __init__(self, interval_s: float = 0.02):
        import psutil

        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.peak_rss = 0

    def _sample(self) -> int:
        import psutil

        total = self._process.memory_info().rss
        for child in self._process.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.peak_rss = max(self.peak_rss, self._sample())

    def __enter__(self) -> TreeRssSampler:
        self.peak_rss = self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._sample())


# ---- phone-sized images ---------------------------------------------------------------------------


def _write_phone_image(job: tuple[int, str]) -> int:
    import cv2
    import numpy as np

    from scin_pipeline.core.synthetic.lesions import CONDITION_PATTERNS, NO_LESION_PATTERN, render_skin_image

    index, target = job
    rng = np.random.default_rng([PHONE_SEED, index])
    long_side = int(rng.integers(800, 1601))
    short_side = long_side * 3 // 4
    size = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    patterns = sorted(set(CONDITION_PATTERNS.values())) + [NO_LESION_PATTERN]
    rgb = render_skin_image(
        f"phone-{index}", int(rng.integers(1, 11)), patterns[int(rng.integers(len(patterns)))], size, PHONE_SEED
    )
    noisy = np.clip(rgb + rng.normal(0, 1.5, rgb.shape).astype(np.float32), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(noisy, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    tmp = Path(target + ".tmp")
    tmp.write_bytes(buf.tobytes())
    tmp.rename(target)
    return len(buf)


def phone_images(cache: Path, n: int, workers: int) -> list[str]:
    folder = cache / f"phone_v{PHONE_VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / f"{i}.png") for i in range(n)]
    todo = [(i, p) for i, p in enumerate(paths) if not Path(p).exists()]
    if todo:
        print(f"writing {len(todo)} phone-sized PNGs into {folder} (cached for later runs) ...", flush=True)
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_write_phone_image, todo, chunksize=4))
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return paths


def calibration_mirror(cache: Path, workers: int) -> tuple[Path, object]:
    """The calibration mirror (cached); every Monk tone equally often (tone = 1 + case index mod 10)."""
    import pandas as pd

    from scin_pipeline.core.synthetic.metadata import generate_synthetic_metadata
    from scin_pipeline.core.synthetic.mirror import PLANTS_FILE, write_synthetic_mirror

    root = cache / "calibration_v2"
    mirror = root / "mirror"
    plants_file = mirror / PLANTS_FILE
    if not plants_file.exists():
        print(f"writing the calibration mirror into {mirror} ...", flush=True)
        cases, labels = generate_synthetic_metadata(CALIBRATION["n_cases"], CALIBRATION["seed"])
        labels["monk_skin_tone_label_us"] = [str(1 + i % 10) for i in range(len(labels))]
        meta = root / "metadata"
        meta.mkdir(parents=True, exist_ok=True)
        cases.to_csv(meta / "scin_cases.csv", index=False)
        labels.to_csv(meta / "scin_labels.csv", index=False)
        write_synthetic_mirror(
            mirror,
            metadata_dir=meta,
            seed=CALIBRATION["seed"],
            image_size=CALIBRATION["image_size"],
            defect_rate=CALIBRATION["defect_rate"],
            workers=workers,
            overwrite=True,
        )
    plants = pd.read_csv(plants_file, dtype={"image_id": str, "case_id": str}, keep_default_na=False)
    plants = plants[plants["image_id"] != ""].reset_index(drop=True)
    return mirror, plants


def assessed_calibration_mirror(cache: Path, workers: int):
    """The calibration mirror's quality assessments (one row per referenced file; a planted missing file
    is assessed as missing) and its plants table."""
    from scin_pipeline.core.quality import assess_images, assessments_frame

    mirror, plants = calibration_mirror(cache, workers)
    images = mirror / "dataset" / "images"
    items = [
        (i, None if planted == "missing" else str(images / f"{i}.png"))
        for i, planted in plants[["image_id", "planted"]].itertuples(index=False)
    ]
    return assessments_frame(assess_images(items, workers=workers)), plants


# ---- phases (each in a fresh child process) -------------------------------------------------------


def _phash_file(path: str) -> int:
    import imagehash
    from PIL import Image

    with Image.open(path) as im:
        return int(str(imagehash.phash(im)), 16)


def _decode_file(path: str) -> int:
    import cv2

    return int(cv2.imread(path, cv2.IMREAD_COLOR).shape[0])


def _init_single_thread() -> None:
    import cv2

    cv2.setNumThreads(1)


def child_main(phase: str, paths_file: str, workers: int, repeat: int) -> None:
    import multiprocessing

    paths = json.loads(Path(paths_file).read_text())
    result: dict = {"phase": phase, "n": len(paths) * repeat}
    with TreeRssSampler() as rss:
        t0 = time.perf_counter()
        if phase == "ours":
            from scin_pipeline.core.quality import assess_images

            items = ((f"{k}-{i}", p) for k in range(repeat) for i, p in enumerate(paths))
            rows = list(assess_images(items, workers=workers))
            result["not_ok"] = sum(r["decode_status"] != "ok" for r in rows)
        elif phase == "cleanvision":
            from cleanvision import Imagelab

            lab = Imagelab(filepaths=paths)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                lab.find_issues(n_jobs=workers)
            result["issue_types"] = sorted(lab.issue_summary["issue_type"])
        elif phase in ("imagehash", "decode"):
            fn = _phash_file if phase == "imagehash" else _decode_file
            with ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_single_thread
            ) as pool:
                list(pool.map(fn, paths, chunksize=8))
        else:
            raise ValueError(phase)
        result["seconds"] = time.perf_counter() - t0
    result["peak_rss_mb"] = rss.peak_rss / 1e6
    print("RESULT " + json.dumps(result), flush=True)


def dedup_child(n: int) -> None:
    import numpy as np

    try:
        from scin_pipeline.core.dedup import DEFAULT_MAX_PHASH_DISTANCE
        from scin_pipeline.core.hamming import find_near_duplicate_pairs
    except ImportError as err:
        print("RESULT " + json.dumps({"error": f"dedup not available ({err})"}), flush=True)
        return
    rng = np.random.default_rng(n)
    hashes = rng.integers(0, 2**64, n, dtype=np.uint64)
    n_planted = n // 100
    sources = rng.choice(n, n_planted, replace=False)
    targets = rng.choice(np.setdiff1d(np.arange(n), sources), n_planted, replace=False)
    for s, t in zip(sources, targets):  # a copy of another hash with 0-8 bits flipped
        flips = rng.choice(64, int(rng.integers(0, 9)), replace=False)
        mask = np.uint64(sum(1 << int(b) for b in flips))
        hashes[t] = hashes[s] ^ mask
    with TreeRssSampler(interval_s=0.005) as rss:
        t0 = time.perf_counter()
        pairs = find_near_duplicate_pairs(hashes, DEFAULT_MAX_PHASH_DISTANCE)
        seconds = time.perf_counter() - t0
    found = set(zip(pairs["i"].tolist(), pairs["j"].tolist()))
    recalled = sum((min(s, t), max(s, t)) in found for s, t in zip(sources, targets))
    print(
        "RESULT "
        + json.dumps(
            {
                "n": n,
                "max_distance": DEFAULT_MAX_PHASH_DISTANCE,
                "seconds": seconds,
                "pairs": len(pairs),
                "planted": n_planted,
                "planted_found": recalled,
                "peak_rss_mb": rss.peak_rss / 1e6,
            }
        ),
        flush=True,
    )


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"child {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


# ---- report ---------------------------------------------------------------------------------------


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


def throughput_section(paths: list[str], workers: int, cache: Path) -> None:
    paths_file = cache / f"paths_{len(paths)}.json"
    sizes = [os.path.getsize(p) for p in paths]
    for p in paths:  # warm the page cache for every peer alike
        Path(p).read_bytes()
    print(
        f"\n## Throughput: {len(paths)} PNGs, {sum(sizes) / len(sizes) / 1e6:.2f} MB on average "
        f"({min(sizes) / 1e6:.2f}-{max(sizes) / 1e6:.2f} MB), {workers} processes each, {os.cpu_count()} cores\n"
    )
    labels = {
        "ours": "(a) ours: assess_images (quality + cleanvision properties + pHash + dHash)",
        "cleanvision": "(b) cleanvision Imagelab.find_issues(), defaults",
        "imagehash": "(c) imagehash: PIL open + imagehash.phash",
        "decode": "(d) plain decode: cv2.imread",
    }
    results = {}
    for phase in ("decode", "imagehash", "ours", "cleanvision"):
        print(f"  running {phase} ...", flush=True)
        results[phase] = run_child(["--child", phase, "--paths-file", str(paths_file), "--workers", str(workers)])
    ours_rate = results["ours"]["n"] / results["ours"]["seconds"]
    rows = []
    for phase, label in labels.items():
        r = results[phase]
        rate = r["n"] / r["seconds"]
        rows.append(
            [
                label,
                f"{rate:.1f}",
                f"{r['seconds']:.1f}",
                f"{r['peak_rss_mb']:.0f}",
                "1.00x" if phase == "ours" else f"{ours_rate / rate:.2f}x",
            ]
        )
    print()
    print_table(["stage", "img/s", "seconds", "peak RSS MB (tree)", "ours / this"], rows)
    rate = {k: r["n"] / r["seconds"] for k, r in results.items()}
    print(
        f"\nours / cleanvision = {rate['ours'] / rate['cleanvision']:.2f}x (goal >= 3x); "
        f"ours / decode = {rate['ours'] / rate['decode']:.2f}x (goal >= 0.5x); "
        f"ours / imagehash = {rate['ours'] / rate['imagehash']:.2f}x"
    )
    if results["ours"].get("not_ok"):
        print(f"(ours: {results['ours']['not_ok']} files did not decode)")


def memory_section(paths: list[str], workers: int, cache: Path, skip_big: bool) -> None:
    paths_file = cache / f"paths_{len(paths)}.json"
    print(f"\n## Memory of our stage (same {len(paths)} files; N > {len(paths)} reuses them under new ids)\n")
    rows = []
    for repeat in [1] if skip_big else [1, 5]:
        r = run_child(
            ["--child", "ours", "--paths-file", str(paths_file), "--workers", str(workers), "--repeat", str(repeat)]
        )
        rows.append([f"{r['n']:,}", f"{r['n'] / r['seconds']:.1f}", f"{r['peak_rss_mb']:.0f}"])
    print_table(["N images", "img/s", "peak RSS MB (process + workers)"], rows)


def dedup_section(skip_big: bool) -> None:
    print("\n## Near-duplicate search (core.hamming.find_near_duplicate_pairs)\n")
    rows = []
    for n in [10_000] if skip_big else [10_000, 1_000_000]:
        r = run_child(["--dedup-child", str(n)])
        if "error" in r:
            print(r["error"])
            return
        rows.append(
            [
                f"{r['n']:,}",
                r["max_distance"],
                f"{r['seconds']:.2f}",
                f"{r['pairs']:,}",
                f"{r['planted_found']}/{r['planted']}",
                f"{r['peak_rss_mb']:.0f}",
            ]
        )
    print_table(["hashes", "max distance", "seconds", "pairs found", "planted pairs found", "peak RSS MB"], rows)


def calibration_section(cache: Path, workers: int) -> None:

    from bench.quality_calibration import threshold_sweep
    from scin_pipeline.core.planted import planted_defect_scores
    from scin_pipeline.core.quality import (
        QualityConfig,
        decide_quality,
        exclusion_rates_by_monk_tone,
    )

    frame, plants = assessed_calibration_mirror(cache, workers)
    tones = plants["monk_tone"]
    config = QualityConfig()
    decisions = decide_quality(frame, tones, config)
    n_clean = int((plants["planted"] == "clean").sum())
    print(
        f"\n## Calibration: synthetic mirror {CALIBRATION}, {len(plants)} files ({n_clean} clean), "
        f"every Monk tone equally often\n"
    )
    print("Defaults: " + ", ".join(f"{k}={v}" for k, v in asdict(config).items()) + "\n")
    scores = planted_defect_scores(decisions, plants)
    print_table(list(scores.columns), [[*r[:5], _fmt(r[5]), _fmt(r[6])] for r in scores.itertuples(index=False)])

    clean = plants["planted"] == "clean"
    rates = exclusion_rates_by_monk_tone(decisions[clean], tones[clean])
    print("\nClean images excluded, per Monk tone:\n")
    print_table(list(rates.columns), [[_fmt(v) for v in r] for r in rates.itertuples(index=False)])
    near = plants["planted"] == "near_duplicate"
    if near.any():
        flagged = decisions.loc[near, "reason"].value_counts().to_dict()
        print(
            f"\n(not scored) near_duplicate files: {int(near.sum())}, excluded by reason: {flagged or 'none'}: "
            "they show another case's skin, so the tone-relative rule may call them dark"
        )

    print(
        "\nThreshold sweeps (one threshold at a time, the others at their defaults). min P / min R: the "
        "lowest precision / recall over the planted reasons; diag kept: dark-but-diagnostic kept; "
        "clean excl: share of clean images excluded per Monk group.\n"
    )
    for parameter, values in SWEEPS.items():
        # The two "visible" tests are OR-ed; each is swept with the other switched off, so that the table
        # shows what that test alone separates.
        held = QualityConfig(**{**asdict(config), **SWEPT_ALONE.get(parameter, {})})
        sweep = threshold_sweep(frame, tones, plants, parameter, values, held)
        rows, good = [], []
        for value, group in sweep.groupby("value", sort=True):
            defects = group[~group["planted"].isin(["clean", "dark_diagnostic"])]
            diag = float(group.loc[group["planted"] == "dark_diagnostic", "recall"].iloc[0])
            clean_rows = group[group["planted"] == "clean"].set_index("reason")["recall"]
            excl = {g: 1 - float(clean_rows[f"clean_kept:monk_{g}"]) for g in ("1-3", "4-6", "7-10")}
            min_p, min_r = float(defects["precision"].fillna(1.0).min()), float(defects["recall"].min())
            ok = min_p >= 0.9 and min_r >= 0.9 and diag >= 0.9 and excl["7-10"] <= excl["1-3"]
            good.append(value) if ok else None
            marker = " <- default" if value == getattr(config, parameter) else ""
            rows.append(
                [
                    f"{value:g}{marker}",
                    _fmt(min_p),
                    _fmt(min_r),
                    _fmt(diag),
                    _fmt(excl["1-3"]),
                    _fmt(excl["4-6"]),
                    _fmt(excl["7-10"]),
                    "yes" if ok else "no",
                ]
            )
        span = f"{min(good):g} to {max(good):g}" if good else "none"
        alone = f" (with {', '.join(SWEPT_ALONE[parameter])} switched off)" if parameter in SWEPT_ALONE else ""
        print(f"### {parameter}{alone}: all criteria met from {span}\n")
        print_table([parameter, "min P", "min R", "diag kept", "clean excl 1-3", "4-6", "7-10", "ok"], rows)
        print()


# threshold -> (metric column, "min": clean must be >= / "max": clean must be <=, the defect kinds it
# must catch, the kinds that must stay on the clean side besides clean images). The two diagnostic
# thresholds only judge dark images: they have no clean rows.
THRESHOLD_METRICS = {
    "min_long_side_px": ("long_side", "min", ("tiny",), ()),
    "overexposed_fraction_max": ("overexposed_fraction", "max", ("overexposed",), ()),
    "dark_relative_min": ("dark_relative", "min", ("dark", "dark_diagnostic"), ()),
    "diagnostic_texture_min": ("texture", "min", ("dark",), ("dark_diagnostic",)),
    "diagnostic_redness_min": ("redness_contrast", "min", ("dark",), ("dark_diagnostic",)),
    "low_information_structure_min": ("structure", "min", ("flat",), ("blurred", "dark_diagnostic")),
    "low_information_entropy_min": ("entropy", "min", (), ()),  # noise-free uniform frames: none planted
    "blurry_sharpness_min": ("sharpness", "min", ("blurred",), ()),
}


def _nearest(v, side: str, limit: float, clean_side: bool):
    """(value, margin, n) of the image nearest the threshold among v; None when v is empty."""
    if v.empty:
        return None
    # The clean side of a "min" threshold is above it: the nearest clean image is the lowest value.
    pick = float(v.min() if (side == "min") == clean_side else v.max())
    above, below = (pick, limit) if (side == "min") == clean_side else (limit, pick)
    ratio = above / below if below > 0 else float("inf")
    return pick, ratio, int(len(v))


def margin_rows(source: str, frame, labels, tones, config) -> list[list]:
    """One row per (threshold, group): the nearest image's value and its margin (ratio to the threshold,
    > 1 = on its side). Groups: clean images per Monk tone, then each defect kind and each must-keep kind."""
    import numpy as np
    import pandas as pd

    from scin_pipeline.core.quality import decide_quality

    decisions = decide_quality(frame, tones, config)
    ok = (frame["decode_status"] == "ok").to_numpy()
    values = frame.assign(
        long_side=np.maximum(frame["width"].astype(float), frame["height"].astype(float)),
        dark_relative=decisions["dark_relative"].astype(float),
    )
    labels = pd.Series(np.asarray(labels, dtype=object), index=frame.index)
    tone_label = pd.to_numeric(pd.Series(np.asarray(tones), index=frame.index), errors="coerce")
    rows = []
    for threshold, (metric, side, defects, keeps) in THRESHOLD_METRICS.items():
        limit = float(getattr(config, threshold))
        column = values[metric].astype(float)

        groups = []
        if not threshold.startswith("diagnostic_"):
            groups = [(f"clean, Monk {t}", (labels == "clean") & (tone_label == t), True) for t in range(1, 11)]
            groups.append(("clean, tone unknown", (labels == "clean") & tone_label.isna(), True))
        groups += [(f"keep: {k}", labels == k, True) for k in keeps]
        groups += [(f"catch: {k}", labels == k, False) for k in defects]
        for name, mask, clean_side in groups:
            found = _nearest(column[mask.to_numpy() & ok & column.notna().to_numpy()], side, limit, clean_side)
            if found is None:
                continue
            pick, ratio, n = found
            flag = "" if ratio > 1 else "  <-- on the wrong side"
            rows.append([source, f"{threshold}={limit:g}", name, n, f"{pick:.3g}", f"x{ratio:.2f}{flag}"])
    return rows


def margins_section(cache: Path, workers: int, labelled: Path | None) -> None:
    import numpy as np
    import pandas as pd

    from bench.flat_and_plain_skin import write_set
    from scin_pipeline.core.quality import QualityConfig, assess_images, assessments_frame

    config = QualityConfig()
    print("\n## Margins: the nearest image to each threshold, per Monk tone and per defect\n")
    print(
        "value: the nearest image's metric; margin: its ratio to the threshold, > 1 on the right side "
        "(clean: kept by this threshold; catch: excluded by it). A margin near 1 is a threshold to re-tune.\n"
    )
    rows = []
    frame, plants = assessed_calibration_mirror(cache, workers)
    rows += margin_rows("calibration mirror", frame, plants["planted"], plants["monk_tone"], config)

    table = write_set(cache / "flat_and_plain_skin", per_kind=20, workers=workers)
    frame = assessments_frame(assess_images(zip(table["image_id"], table["path"]), workers=workers))
    fine = table["kind"].isin(["pores", "lines", "hair", "weak"]) & (table["population"] == "skin")
    labels = np.where(table["population"] == "flat", "flat", np.where(fine, "fine_texture_only", "clean"))
    tones = table["monk_tone"].where(table["population"] == "skin")
    rows += margin_rows("flat and plain skin", frame, labels, tones, config)
    structure = frame["structure"].astype(float)
    print(
        f"(flat and plain skin: {int(fine.sum())} of its plain-skin patches carry only texture finer than "
        f"the 512 px working copy (pores, skin lines, sparse hair, or all faintly); left out of the clean "
        f"rows above; {int((structure[fine.to_numpy()] < config.low_information_structure_min).sum())} of "
        "them read as flat)\n"
    )
    if labelled is not None:
        sample = pd.read_csv(labelled, dtype={"path": str, "label": str})
        sample["image_id"] = [str(i) for i in range(len(sample))]
        frame = assessments_frame(assess_images(zip(sample["image_id"], sample["path"]), workers=workers))
        tones = pd.to_numeric(sample.get("monk_tone"), errors="coerce") if "monk_tone" in sample else None
        rows += margin_rows(f"labelled: {labelled.name}", frame, sample["label"], tones, config)
    print_table(["source", "threshold", "nearest of", "n", "value", "margin"], rows)


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.2f}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-big", action="store_true", help="skip N=5,000 memory and 1,000,000-hash search")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--only", choices=["throughput", "memory", "dedup", "calibration", "margins"], action="append")
    parser.add_argument("--calibrate", action="store_true", help="the calibration sweep and the margins only")
    parser.add_argument("--labelled", type=Path, help="CSV of your own images: path, monk_tone, label")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--paths-file", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--dedup-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child, args.paths_file, args.workers, args.repeat)
        return
    if args.dedup_child:
        dedup_child(args.dedup_child)
        return
    sections = (
        ["calibration", "margins"]
        if args.calibrate
        else args.only or ["throughput", "memory", "dedup", "calibration", "margins"]
    )
    args.cache.mkdir(parents=True, exist_ok=True)
    print(f"# bench/curation.py: {args.images} images, {args.workers} workers, cache {args.cache}")
    if "throughput" in sections or "memory" in sections:
        paths = phone_images(args.cache, args.images, args.workers)
        (args.cache / f"paths_{len(paths)}.json").write_text(json.dumps(paths))
        if "throughput" in sections:
            throughput_section(paths, args.workers, args.cache)
        if "memory" in sections:
            memory_section(paths, args.workers, args.cache, args.skip_big)
    if "dedup" in sections:
        dedup_section(args.skip_big)
    if "calibration" in sections:
        calibration_section(args.cache, args.workers)
    if "margins" in sections:
        margins_section(args.cache, args.workers, args.labelled)


if __name__ == "__main__":
    main()
