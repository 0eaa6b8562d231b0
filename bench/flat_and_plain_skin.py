"""Flat frames and plain skin: a generator of our own to calibrate the ``low_information`` rule.

    python bench/flat_and_plain_skin.py [--per-kind 40] [--workers 2] [--out DIR]

Two populations the rule must tell apart, drawn independently of the demo's generator (core/synthetic/),
which is only one of the plain-skin models here:

- **flat frames** (must be excluded): one colour, faint smooth shading and sensor noise. Colours: a
  covered lens (near black, or a dim skin-coloured glow through a finger), a wall (greys, off-whites,
  pastels), a sleeve (saturated fabric colours), a skin-coloured wall (every Monk swatch under a random
  exposure). Shading: a linear ramp (0-20 %), a vignette (0-15 %) and a very smooth blob (0-6 %, a third of
  the frame wide or more). Noise: Gaussian, sigma 1-6 grey levels, per channel or shared, optionally
  softened by demosaicing (blur 0.5-0.8 px).
- **plain skin** (must be kept): well-exposed skin without lesions, every Monk tone, five texture models:
  ``demo`` (core.synthetic's canvas, no lesion), ``pores`` (dark pores, 0.6-2.5 px, 2-10 % darker),
  ``hair`` (sparse thin dark hairs), ``mottle`` (multi-scale luminance mottling 1-3 % and redness variation
  1-3 a* units), ``lines`` (a network of faint skin lines, 2-5 % darker), each with its own lighting and
  sensor noise sigma 1-4. Plus ``weak``: the faintest of these textures at once (pores 2-4 %, mottling 0.7 %,
  lines 1.5 %): the margin case.

Sizes: long side 300-1600 px, 4:3, 3:4 or 1:1; written as PNG or JPEG (quality 70-95). Each file is named
``<population>-<kind>-<index>.<ext>`` and listed in ``index.csv`` (image_id, population, kind, monk_tone,
width, height, format, noise_sigma). Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scin_pipeline.core.schema import MONK_SKIN_TONE_HEX  # noqa: E402

FLAT_KINDS = ("covered_lens", "wall", "sleeve", "skin_coloured")
SKIN_KINDS = ("demo", "pores", "hair", "mottle", "lines", "weak")
VERSION = 1


def _swatch(tone: int) -> np.ndarray:
    h = MONK_SKIN_TONE_HEX[tone].lstrip("#")
    return np.array([int(h[i : i + 2], 16) for i in (0, 2, 4)], np.float32)


def _size(rng: np.random.Generator) -> tuple[int, int]:
    long_side = int(rng.integers(300, 1601))
    shape = rng.choice(["4:3", "3:4", "1:1"])
    short = long_side * 3 // 4 if shape != "1:1" else long_side
    return (long_side, short) if shape == "4:3" else (short, long_side) if shape == "3:4" else (long_side, long_side)


def _axes(w: int, h: int):
    return np.linspace(-1, 1, w, dtype=np.float32)[None, :], np.linspace(-1, 1, h, dtype=np.float32)[:, None]


def _smooth(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    gh, gw = max(2, math.ceil(h / cell) + 1), max(2, math.ceil(w / cell) + 1)
    field = cv2.resize(rng.standard_normal((gh, gw)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _shading(rng: np.random.Generator, w: int, h: int, ramp: float, vignette: float, blob: float) -> np.ndarray:
    xx, yy = _axes(w, h)
    angle = rng.uniform(0, 2 * np.pi)
    shade = 1 - ramp * (0.5 + 0.5 * (np.cos(angle) * xx + np.sin(angle) * yy)) - vignette * (xx * xx + yy * yy) / 2
    if blob:
        shade = shade + blob * _smooth(rng, h, w, max(w, h) * rng.uniform(0.35, 0.8))
    return shade.astype(np.float32)


def _noise(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    h, w = img.shape[:2]
    if rng.random() < 0.3:  # luminance-only noise (the same on every channel)
        noise = np.repeat(rng.normal(0, sigma, (h, w, 1)).astype(np.float32), 3, axis=2)
    else:
        noise = rng.normal(0, sigma, (h, w, 3)).astype(np.float32)
    if rng.random() < 0.4:  # demosaicing softens the noise; keep its level
        blur = rng.uniform(0.5, 0.8)
        noise = cv2.GaussianBlur(noise, (0, 0), blur)
        noise *= sigma / max(float(noise.std()), 1e-6)
    return img + noise


def flat_frame(rng: np.random.Generator, kind: str, size: tuple[int, int]) -> tuple[np.ndarray, int | None, float]:
    w, h = size
    tone = None
    if kind == "covered_lens":
        if rng.random() < 0.5:
            colour = rng.uniform(2, 30, 3)
        else:  # light through a finger: a dim, warm glow
            colour = np.array([rng.uniform(60, 140), rng.uniform(15, 50), rng.uniform(5, 30)])
    elif kind == "wall":
        grey = rng.uniform(90, 245)
        colour = grey * rng.uniform(0.9, 1.05, 3)
    elif kind == "sleeve":
        colour = rng.uniform(15, 230, 3)
    else:
        tone = int(rng.integers(1, 11))
        colour = _swatch(tone) * rng.uniform(0.7, 1.0) * rng.uniform(0.97, 1.03, 3)
    shade = _shading(rng, w, h, rng.uniform(0, 0.2), rng.uniform(0, 0.15), rng.uniform(0, 0.06) * (rng.random() < 0.5))
    img = shade[..., None] * np.asarray(colour, np.float32)[None, None, :]
    sigma = float(rng.uniform(1, 6))
    return _noise(rng, img, sigma), tone, sigma


def _to_lab(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.clip(rgb, 0, 255).astype(np.float32) / 255, cv2.COLOR_RGB2Lab)


def _from_lab(lab: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(lab, cv2.COLOR_Lab2RGB) * 255


def plain_skin(rng: np.random.Generator, kind: str, tone: int, size: tuple[int, int], index: int):
    w, h = size
    if kind == "demo":
        from scin_pipeline.core.synthetic.lesions import NO_LESION_PATTERN, render_skin_image

        img = render_skin_image(f"plain-{index}", tone, NO_LESION_PATTERN, size, 1000 + index).astype(np.float32)
        sigma = float(rng.uniform(1, 3))
        return _noise(rng, img, sigma), sigma
    scale = max(w, h) / 1000  # texture sizes are given for a 1000 px long side
    skin = _swatch(tone) * rng.uniform(0.85, 1.0) * rng.uniform(0.98, 1.02, 3)
    shade = _shading(rng, w, h, rng.uniform(0, 0.15), rng.uniform(0, 0.1), rng.uniform(0, 0.03))
    factor = np.ones((h, w), np.float32)  # multiplicative luminance texture
    redness = np.zeros((h, w), np.float32)  # a* offset
    weak = kind == "weak"
    if kind in ("pores", "weak"):
        n = int(rng.uniform(1.5, 4) * w * h / (scale * 25) ** 2)  # one pore per 13-17 px square at 1000 px
        depth = rng.uniform(0.02, 0.04) if weak else rng.uniform(0.02, 0.10)
        dots = np.zeros((h, w), np.float32)
        xs, ys = rng.integers(0, w, n), rng.integers(0, h, n)
        dots[ys, xs] = 1.0
        radius = rng.uniform(0.6, 2.5) * scale
        dots = cv2.GaussianBlur(dots, (0, 0), radius) * (2 * np.pi * radius * radius)
        factor *= 1 - depth * np.clip(dots, 0, 1)
    if kind == "hair":
        mask = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(5, 30))):
            x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
            angle, length = rng.uniform(0, np.pi), rng.uniform(40, 200) * scale
            bend = rng.uniform(-0.3, 0.3)
            pts = [
                (x0 + t * length * np.cos(angle + bend * t), y0 + t * length * np.sin(angle + bend * t))
                for t in np.linspace(0, 1, 12)
            ]
            cv2.polylines(mask, [np.array(pts, np.int32)], False, 255, max(1, round(1.2 * scale)), cv2.LINE_AA)
        factor *= 1 - rng.uniform(0.15, 0.45) * (mask.astype(np.float32) / 255)
    if kind in ("mottle", "weak"):
        amp = 0.007 if weak else rng.uniform(0.01, 0.03)
        factor *= 1 + amp * (_smooth(rng, h, w, 60 * scale) + 0.7 * _smooth(rng, h, w, 15 * scale))
        redness += (0.5 if weak else rng.uniform(1, 3)) * _smooth(rng, h, w, 30 * scale)
    if kind in ("lines", "weak"):
        lines = np.zeros((h, w), np.float32)
        for angle in rng.uniform(0, np.pi, 3):
            xx, yy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
            period = rng.uniform(12, 30) * scale
            phase = (xx * np.cos(angle) + yy * np.sin(angle)) / period + 0.6 * _smooth(rng, h, w, 80 * scale)
            lines = np.maximum(lines, np.clip(1 - np.abs(phase - np.round(phase)) * period / (1.2 * scale), 0, 1))
        factor *= 1 - (0.015 if weak else rng.uniform(0.02, 0.05)) * lines
    img = shade[..., None] * factor[..., None] * skin[None, None, :]
    if redness.any():
        lab = _to_lab(img)
        lab[..., 1] += redness
        img = _from_lab(lab)
    sigma = float(rng.uniform(1, 4))
    return _noise(rng, img, sigma), sigma


def _encode(rng: np.random.Generator, img: np.ndarray) -> tuple[bytes, str]:
    rgb = np.clip(np.round(img), 0, 255).astype(np.uint8)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if rng.random() < 0.5:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(70, 96))])
        return buf.tobytes(), "jpg"
    ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return buf.tobytes(), "png"


def _write_one(job: tuple[str, str, int, int, str]) -> dict:
    population, kind, index, seed, out = job
    rng = np.random.default_rng([seed, VERSION, index, FLAT_KINDS.index(kind) if population == "flat" else 9])
    size = _size(rng)
    if population == "flat":
        img, tone, sigma = flat_frame(rng, kind, size)
    else:
        tone = 1 + index % 10
        img, sigma = plain_skin(rng, kind, tone, size, index)
    data, ext = _encode(rng, img)
    image_id = f"{population}-{kind}-{index}"
    Path(out, f"{image_id}.{ext}").write_bytes(data)
    return dict(
        image_id=image_id,
        file=f"{image_id}.{ext}",
        population=population,
        kind=kind,
        monk_tone=tone,
        width=size[0],
        height=size[1],
        format=ext,
        noise_sigma=round(sigma, 2),
    )


def write_set(out: Path, per_kind: int = 40, seed: int = 11, workers: int = 2) -> pd.DataFrame:
    """Write (or reuse) the set under out; returns index.csv's table (with a ``path`` column)."""
    out.mkdir(parents=True, exist_ok=True)
    index_file = out / f"index_v{VERSION}_{per_kind}_{seed}.csv"
    if not index_file.exists():
        jobs = [("flat", k, i, seed, str(out)) for k in FLAT_KINDS for i in range(per_kind)]
        jobs += [("skin", k, i, seed, str(out)) for k in SKIN_KINDS for i in range(per_kind)]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            rows = list(pool.map(_write_one, jobs, chunksize=4))
        pd.DataFrame(rows).to_csv(index_file, index=False)
    table = pd.read_csv(index_file, dtype={"image_id": str})
    table["monk_tone"] = table["monk_tone"].astype("Float64")
    table["path"] = [str(out / f) for f in table["file"]]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-kind", type=int, default=40)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/scin-bench-flat"))
    args = parser.parse_args()
    table = write_set(args.out, args.per_kind, args.seed, args.workers)
    print(table.groupby(["population", "kind"]).size().to_string())


if __name__ == "__main__":
    main()
