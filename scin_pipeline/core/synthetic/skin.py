"""The skin a synthetic image is drawn on (vectorised numpy/cv2; float32 RGB in 0..255 until encoding).

The background is the case's Monk Skin Tone swatch (``schema.MONK_SKIN_TONE_HEX``) under a per-image
exposure and white balance, with a lighting gradient and vignette, mottling and fine texture. Erythema is
derived from the skin colour (on deep skin a darker red-brown, not bright red).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from scin_pipeline.core.schema import MONK_SKIN_TONE_HEX


def monk_tone_rgb(tone: int) -> np.ndarray:
    hex_colour = MONK_SKIN_TONE_HEX[tone].lstrip("#")
    return np.array([int(hex_colour[i : i + 2], 16) for i in (0, 2, 4)], dtype=np.float32)


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Zero-mean, unit-std noise varying over about `cell` pixels."""
    gh, gw = max(2, math.ceil(h / cell) + 1), max(2, math.ceil(w / cell) + 1)
    small = rng.standard_normal((gh, gw), dtype=np.float32)
    field_ = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    std = float(field_.std())
    return (field_ - float(field_.mean())) / (std if std > 1e-6 else 1.0)


def erythema_colour(skin: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """Red of inflamed skin relative to the skin colour: pink-red on light skin, red-brown on deep skin."""
    lum = float(luminance(skin)) / 255.0
    red = skin * np.array([1.02, 0.52, 0.56], np.float32) + np.array([50.0, 0.0, 6.0], np.float32) * lum
    return np.clip(skin + strength * (red - skin), 0, 255).astype(np.float32)


class Canvas:
    """An image being painted, with the per-image fields the lesion painters share."""

    def __init__(self, rng: np.random.Generator, tone: int, size: tuple[int, int]):
        w, h = size
        self.rng, self.h, self.w = rng, h, w
        self.scale = min(w, h) / 360.0  # lesion sizes are specified for a 480x360 image
        # Per-image exposure and white balance: a shared brightness factor and a small per-channel tint.
        # Exposure only darkens (the lightest swatches sit near 255, and a clean photo must not clip).
        tint = rng.uniform(0.88, 1.0) * rng.uniform(0.98, 1.02, 3)
        self.skin = (monk_tone_rgb(tone) * tint).astype(np.float32)
        # Separable 1-D axes broadcast to 2-D: no full coordinate grids to allocate.
        xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
        yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
        angle = rng.uniform(0, 2 * np.pi)
        # Light falls off across the frame (0 to -strength) and towards the corners (vignette).
        ramp = 0.5 + 0.25 * (np.float32(np.cos(angle)) * xx + np.float32(np.sin(angle)) * yy)
        lighting = 1 - np.float32(rng.uniform(0.05, 0.14)) * ramp
        lighting = lighting - np.float32(rng.uniform(0.02, 0.08)) * (xx * xx + yy * yy)
        mottle = 1 + 0.022 * smooth_noise(rng, h, w, 90 * self.scale + 2)
        mottle += 0.015 * smooth_noise(rng, h, w, 18 * self.scale + 2)
        # Fine texture: mostly luminance (pores, skin lines), a little chroma; weaker on deep skin in
        # absolute terms because it is multiplicative in real photographs.
        self.fine = cv2.GaussianBlur(rng.standard_normal((h, w), dtype=np.float32), (0, 0), 0.7)
        self.fine *= np.float32(1.0 / max(float(self.fine.std()), 1e-6))
        lum = float(luminance(self.skin)) / 255.0
        grain_levels = (1.2 + 3.0 * lum) / float(self.skin.mean())  # about 1.2-4.2 grey levels of grain
        shade = lighting * mottle + np.float32(grain_levels) * self.fine
        # Per-channel grain of +-1 level (small integers: much cheaper than normal draws, same look).
        chroma = rng.integers(-1, 2, (h, w, 3), dtype=np.int8)
        self.img = shade[..., None] * self.skin[None, None, :] + chroma
        self.coverage = np.zeros((h, w), np.float32)  # max lesion alpha per pixel

    # Geometry ------------------------------------------------------------------------------------------
    def centre(self, margin: float = 0.18) -> tuple[float, float]:
        return (self.rng.uniform(margin, 1 - margin) * self.w, self.rng.uniform(margin, 1 - margin) * self.h)

    def ellipse(self, cx, cy, rx, ry, theta, reach: float):
        """ROI slices and normalised elliptical radius r (1 on the ellipse) over a box of `reach` radii."""
        extent = max(rx, ry) * reach + 2
        y0, y1 = max(0, int(cy - extent)), min(self.h, int(cy + extent) + 1)
        x0, x1 = max(0, int(cx - extent)), min(self.w, int(cx + extent) + 1)
        if y0 >= y1 or x0 >= x1:
            return None
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dx, dy = xx - cx, yy - cy
        c, s = math.cos(theta), math.sin(theta)
        u, v = (dx * c + dy * s) / rx, (-dx * s + dy * c) / ry
        return (slice(y0, y1), slice(x0, x1)), np.sqrt(u * u + v * v)

    def warp(self, r: np.ndarray, amount: float, cell: float) -> np.ndarray:
        """Make an ellipse irregular: perturb its radius field with smooth noise."""
        if amount <= 0:
            return r
        return r * (1 + amount * smooth_noise(self.rng, r.shape[0], r.shape[1], cell))

    # Painting -------------------------------------------------------------------------------------------
    def paint(self, roi, alpha: np.ndarray, colour, texture: float = 0.0) -> None:
        ys, xs = roi
        alpha = np.clip(alpha, 0, 1).astype(np.float32)
        colour = np.asarray(colour, np.float32)
        if colour.ndim == 1:
            colour = np.broadcast_to(colour, alpha.shape + (3,))
        if texture:
            colour = colour * (1 + texture * self.fine[ys, xs])[..., None]
        region = self.img[ys, xs]
        self.img[ys, xs] = region + (colour - region) * alpha[..., None]
        self.coverage[ys, xs] = np.maximum(self.coverage[ys, xs], alpha)
