"""A fresh generator of near-duplicate benchmark images (independent of scin_pipeline.core.synthetic).

Photo-like skin: a Monk-like tone (ten swatches of our own), white balance and exposure per photo,
multi-octave mottling and redness, pores, occasional hairs, a lighting gradient and vignette, sensor noise;
lesions in a few condition styles (eczema patches, acne papules, psoriasis plaques with scale, a pigmented
naevus, urticarial wheals); sizes 400-1000 px per side. Every "original" is stored as a phone-like JPEG
(quality 90-96) and decoded, as a re-uploader would find it.

Re-upload copies of an original, one per transformation family and two combined:

- ``crop``: uneven crop, 0-8 % per side, each side drawn separately;
- ``downscale``: factor 0.5-1.0 (area, bilinear or PIL bicubic resampling);
- ``brightness``: gain 0.85-1.15 and an offset of -12..12 levels;
- ``jpeg``: re-encoded at quality 60-95;
- ``combined``: all four, in that order.

Negatives: ``hard`` (an unrelated photo of the same condition style and the same skin tone, shot under
similar lighting) and ``plain`` (flat-ish skin, no lesion, faint texture: the images whose hashes encode
little beyond the lighting). Every image is drawn from its own ``np.random.default_rng([seed, kind, k])``
stream, so a set is deterministic and any image can be rendered alone.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

# Ten skin swatches from light to deep (sRGB), our own approximations of a ten-step tone scale.
TONES = (
    (246, 237, 228),
    (243, 231, 219),
    (247, 234, 208),
    (234, 218, 186),
    (215, 189, 150),
    (160, 126, 86),
    (130, 92, 67),
    (96, 65, 52),
    (58, 49, 42),
    (41, 36, 32),
)
STYLES = ("eczema", "acne", "psoriasis", "naevus", "urticaria")
FAMILIES = ("crop", "downscale", "brightness", "jpeg", "combined")
MAX_CROP = 0.08


@dataclass
class BenchImage:
    key: str  # unique name
    rgb: np.ndarray  # decoded uint8 RGB
    group: str  # images of one group are near duplicates of each other; negatives are their own group
    role: str  # "source", a family name, "hard" or "plain"
    style: str
    tone: int  # 1..10
    params: dict = field(default_factory=dict)


# ---- skin and lesions ------------------------------------------------------------------------------


def _noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Zero-mean unit-std noise varying over about ``cell`` px (bicubic upsampling of a coarse grid)."""
    gh, gw = max(2, math.ceil(h / cell) + 2), max(2, math.ceil(w / cell) + 2)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    out = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return (out - out.mean()) / max(float(out.std()), 1e-6)


def _fractal(rng, h, w, cells, persistence=0.6) -> np.ndarray:
    total, amp, norm = np.zeros((h, w), np.float32), 1.0, 0.0
    for cell in cells:
        total += amp * _noise(rng, h, w, cell)
        norm += amp * amp
        amp *= persistence
    return total / math.sqrt(norm)


def _window(h, w, cy, cx, extent):
    """The slices of the (h, w) frame within ``extent`` px of (cy, cx), and the centre in window coordinates."""
    y0, y1 = max(0, int(cy - extent)), min(h, int(cy + extent) + 1)
    x0, x1 = max(0, int(cx - extent)), min(w, int(cx + extent) + 1)
    return (slice(y0, max(y1, y0 + 1)), slice(x0, max(x1, x0 + 1))), cy - y0, cx - x0


def _blob(rng, h, w, cy, cx, ry, rx, roughness=0.35, blur=0.0):
    """An irregular blob (ellipse with a noisy border, soft edge, values 0..1) in a window around it:
    returns (mask, window slices)."""
    window, wy, wx = _window(h, w, cy, cx, 1.6 * max(rx, ry) + 3 * blur + 2)
    wh, ww = window[0].stop - window[0].start, window[1].stop - window[1].start
    y, x = np.ogrid[:wh, :ww]
    angle = rng.uniform(0, math.pi)
    ca, sa = math.cos(angle), math.sin(angle)
    dy, dx = (y - wy), (x - wx)
    u = (dx * ca + dy * sa) / max(rx, 1.0)
    v = (-dx * sa + dy * ca) / max(ry, 1.0)
    radius = np.sqrt(u * u + v * v)
    border = _noise(rng, wh, ww, max(4.0, min(rx, ry) / 1.5)) * roughness
    mask = np.clip((1.0 + border - radius) * 4.0, 0.0, 1.0).astype(np.float32)
    if blur > 0:
        mask = cv2.GaussianBlur(mask, (0, 0), blur)
    return mask, window


def _paint(img: np.ndarray, mask: np.ndarray, window, colour, alpha: float = 1.0) -> None:
    m = (mask * alpha)[..., None]
    region = img[window]
    region *= 1 - m
    region += m * np.asarray(colour, np.float32)


def _erythema(skin: np.ndarray, strength: float) -> np.ndarray:
    lum = float(skin @ np.array([0.299, 0.587, 0.114], np.float32)) / 255
    red = skin * np.array([1.0, 0.55, 0.58], np.float32) + np.array([55.0, 0, 8.0], np.float32) * lum
    return np.clip(skin + strength * (red - skin), 0, 255).astype(np.float32)


def _lesions(rng, img: np.ndarray, skin: np.ndarray, style: str) -> None:
    h, w = img.shape[:2]
    s = min(h, w)
    if style == "eczema":
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
            mask, win = _blob(rng, h, w, cy, cx, rng.uniform(0.08, 0.25) * s, rng.uniform(0.08, 0.3) * s, 0.6)
            rough = np.clip(0.6 + 0.4 * _noise(rng, *mask.shape, s / 90), 0, 1)
            _paint(img, mask * rough, win, _erythema(skin, rng.uniform(0.5, 0.9)), 0.85)
    elif style == "acne":
        for _ in range(int(rng.integers(8, 35))):
            cy, cx = rng.uniform(0.05, 0.95) * h, rng.uniform(0.05, 0.95) * w
            r = rng.uniform(0.008, 0.025) * s
            mask, win = _blob(rng, h, w, cy, cx, r, r * rng.uniform(0.8, 1.2), 0.2, blur=r / 2)
            _paint(img, mask, win, _erythema(skin, rng.uniform(0.6, 1.0)), 0.9)
            if rng.uniform() < 0.4:  # a pustule's pale head
                head, win = _blob(rng, h, w, cy, cx, r / 3, r / 3, 0.1)
                _paint(img, head, win, (240, 232, 200), 0.7)
    elif style == "psoriasis":
        for _ in range(int(rng.integers(1, 5))):
            cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
            mask, win = _blob(rng, h, w, cy, cx, rng.uniform(0.06, 0.18) * s, rng.uniform(0.06, 0.22) * s, 0.25)
            _paint(img, mask, win, _erythema(skin, rng.uniform(0.7, 1.0)), 0.95)
            scale = np.clip(_noise(rng, *mask.shape, s / 120) - 0.3, 0, 1) * mask
            _paint(img, scale, win, (225, 222, 215), 0.8)
    elif style == "naevus":
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        r = rng.uniform(0.05, 0.14) * s
        mask, win = _blob(rng, h, w, cy, cx, r, r * rng.uniform(0.7, 1.3), 0.3)
        brown = skin * np.array([0.45, 0.32, 0.25], np.float32) * rng.uniform(0.7, 1.1)
        variegation = np.clip(0.75 + 0.25 * _noise(rng, *mask.shape, r / 3), 0.4, 1.0)
        _paint(img, mask * variegation, win, brown, 0.95)
    elif style == "urticaria":
        for _ in range(int(rng.integers(2, 7))):
            cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
            r = rng.uniform(0.04, 0.12) * s
            outer, win = _blob(rng, h, w, cy, cx, r, r * rng.uniform(0.7, 1.4), 0.3, blur=r / 6)
            _paint(img, outer, win, _erythema(skin, 0.55), 0.8)
            inner, win = _blob(rng, h, w, cy, cx, r * 0.55, r * 0.6, 0.3)
            _paint(img, inner, win, skin * 1.04, 0.6)
    elif style != "plain":
        raise ValueError(f"unknown style {style!r}")


def render_photo(
    rng: np.random.Generator,
    style: str,
    tone: int,
    *,
    lighting: tuple[float, float] | None = None,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """One photo-like uint8 RGB image (before the phone's JPEG). ``lighting`` = (angle, strength)."""
    h, w = size if size is not None else (int(rng.integers(400, 1001)), int(rng.integers(400, 1001)))
    s = min(h, w)
    skin = np.array(TONES[tone - 1], np.float32) * rng.uniform(0.9, 1.08)  # exposure
    skin = np.clip(skin * rng.uniform(0.96, 1.04, 3).astype(np.float32), 0, 255)  # white balance
    plain = style == "plain"
    texture = rng.uniform(0.3, 0.6) if plain else rng.uniform(0.7, 1.3)
    mottle = _fractal(rng, h, w, (s / 3, s / 8, s / 20)) * 0.05 * texture
    redness = np.maximum(_fractal(rng, h, w, (s / 4, s / 12)), -0.7) * 0.035 * texture
    pores = _noise(rng, h, w, 2.5) * 0.035 * texture
    base = 1 + mottle + pores
    img = np.stack([base * (skin[c] * (1 + redness * f)) for c, f in enumerate((0.5, -0.35, -0.2))], axis=-1)
    _lesions(rng, img, skin, style)
    if not plain and rng.uniform() < 0.35:  # a few hairs
        hair = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(3, 15))):
            pts = np.cumsum(rng.normal(0, s / 40, (8, 2)), axis=0) + rng.uniform(0, 1, 2) * (w, h)
            cv2.polylines(hair, [pts.astype(np.int32)], False, 255, max(1, s // 400), cv2.LINE_AA)
        _paint(img, hair.astype(np.float32) / 255, (slice(None), slice(None)), skin * 0.3, 0.8)
    angle, strength = lighting if lighting is not None else (rng.uniform(0, 2 * math.pi), rng.uniform(0.05, 0.3))
    yn = ((np.arange(h, dtype=np.float32) - h / 2) / s)[:, None]
    xn = ((np.arange(w, dtype=np.float32) - w / 2) / s)[None, :]
    light = 1 + strength * (xn * math.cos(angle) + yn * math.sin(angle)) - rng.uniform(0, 0.25) * (xn**2 + yn**2)
    img *= light[..., None]
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(1.0, 3.5))  # sensor noise
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# ---- encoding and the re-upload transformations ----------------------------------------------------


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=int(quality))
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def uneven_crop(rgb: np.ndarray, fractions) -> np.ndarray:
    left, right, top, bottom = fractions
    h, w = rgb.shape[:2]
    return rgb[round(h * top) : h - round(h * bottom), round(w * left) : w - round(w * right)].copy()


def downscale(rgb: np.ndarray, factor: float, method: str) -> np.ndarray:
    h, w = rgb.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    if method == "pil_bicubic":
        return np.asarray(Image.fromarray(rgb).resize(size, Image.BICUBIC))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if method == "area" else cv2.INTER_LINEAR)


def brighten(rgb: np.ndarray, gain: float, offset: float) -> np.ndarray:
    return np.clip(rgb.astype(np.float32) * gain + offset + 0.5, 0, 255).astype(np.uint8)


def reupload(rgb: np.ndarray, rng: np.random.Generator, family: str) -> tuple[np.ndarray, dict]:
    """A re-upload copy of ``rgb`` under one transformation family (or all of them: ``combined``)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}")
    params: dict = {}
    out = rgb
    if family in ("crop", "combined"):
        params["crop"] = [round(float(v), 4) for v in rng.uniform(0, MAX_CROP, 4)]
        out = uneven_crop(out, params["crop"])
    if family in ("downscale", "combined"):
        params["scale"] = round(float(rng.uniform(0.5, 1.0)), 4)
        params["resample"] = str(rng.choice(["area", "bilinear", "pil_bicubic"]))
        out = downscale(out, params["scale"], params["resample"])
    if family in ("brightness", "combined"):
        params["gain"] = round(float(rng.uniform(0.85, 1.15)), 4)
        params["offset"] = round(float(rng.uniform(-12, 12)), 2)
        out = brighten(out, params["gain"], params["offset"])
    if family in ("jpeg", "combined"):
        params["quality"] = int(rng.integers(60, 96))
        out = jpeg_roundtrip(out, params["quality"])
    return np.ascontiguousarray(out), params


# ---- the benchmark set -----------------------------------------------------------------------------

_KIND = {"source": 0, "hard": 1, "plain": 2, "copy": 3, "scale": 4}


def _photo(seed: int, kind: str, k: int, style: str, tone: int, lighting=None, size=None) -> np.ndarray:
    rng = np.random.default_rng([seed, _KIND[kind], k])
    raw = render_photo(rng, style, tone, lighting=lighting, size=size)
    return jpeg_roundtrip(raw, int(rng.integers(90, 97)))  # the phone's JPEG


def source_spec(seed: int, k: int) -> tuple[str, int, tuple[float, float]]:
    rng = np.random.default_rng([seed, 99, k])
    return str(STYLES[k % len(STYLES)]), int(rng.integers(1, 11)), (rng.uniform(0, 2 * math.pi), rng.uniform(0.05, 0.3))


def benchmark_set(
    seed: int, n_sources: int, *, combined_copies: int = 2, hard_per_source: int = 1, n_plain: int | None = None
) -> list[BenchImage]:
    """Sources, their re-upload copies (one per single family plus ``combined_copies`` combined), one or more
    hard negatives per source (same style, same tone, similar lighting) and plain-skin negatives."""
    images: list[BenchImage] = []
    n_plain = n_sources // 2 if n_plain is None else n_plain
    for k in range(n_sources):
        style, tone, lighting = source_spec(seed, k)
        group = f"g{k}"
        source = _photo(seed, "source", k, style, tone, lighting)
        images.append(BenchImage(f"s{k}", source, group, "source", style, tone))
        families = [f for f in FAMILIES if f != "combined"] + ["combined"] * combined_copies
        for c, family in enumerate(families):
            copy, params = reupload(source, np.random.default_rng([seed, _KIND["copy"], k, c]), family)
            images.append(BenchImage(f"s{k}-{family}{c}", copy, group, family, style, tone, params))
        for n in range(hard_per_source):
            jitter = np.random.default_rng([seed, 98, k, n]).uniform(-0.3, 0.3)
            hard = _photo(seed, "hard", k * 16 + n, style, tone, (lighting[0] + jitter, lighting[1]))
            images.append(BenchImage(f"h{k}-{n}", hard, f"h{k}-{n}", "hard", style, tone))
    for k in range(n_plain):
        tone = int(np.random.default_rng([seed, 97, k]).integers(1, 11))
        images.append(BenchImage(f"p{k}", _photo(seed, "plain", k, "plain", tone), f"p{k}", "plain", "plain", tone))
    return images


def scale_set(seed: int, n: int, *, long_side: tuple[int, int] = (330, 520), duplicate_rate: float = 0.1):
    """``n`` small images for timing a search at scale: mostly unrelated photos of every style and tone,
    ``duplicate_rate`` of them combined re-upload copies of earlier ones (a sixth of all are plain skin).
    Yields (key, group, style, rgb)."""
    n_copies = int(n * duplicate_rate)
    n_originals = n - n_copies
    originals = []
    for k in range(n_originals):
        rng = np.random.default_rng([seed, 96, k])
        style = str(rng.choice(STYLES + ("plain",)))
        side = int(rng.integers(*long_side))
        aspect = rng.uniform(0.6, 1.0)
        size = (side, round(side * aspect)) if rng.uniform() < 0.5 else (round(side * aspect), side)
        rgb = _photo(seed, "scale", k, style, int(rng.integers(1, 11)), size=size)
        if k < n_copies:
            originals.append((style, rgb))
        yield f"x{k}", f"x{k}", style, rgb
    for c in range(n_copies):
        style, rgb = originals[c]
        copy, _ = reupload(rgb, np.random.default_rng([seed, _KIND["copy"], 10**6 + c]), "combined")
        yield f"x{c}-copy", f"x{c}", style, copy
