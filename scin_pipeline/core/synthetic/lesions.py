"""The lesion pattern of a synthetic image, painted on its skin canvas, and the rendered image.

Images are drawn, not photographed: the case's skin (see ``skin``) plus a lesion pattern chosen by the
case's top weighted condition (argmax of ``weighted_skin_condition_label``, ties broken by name), see
``CONDITION_PATTERNS``. Lesion colours are derived from the skin colour, placement and scale are random
per image, and every image is seeded by (seed, image_id).
"""

from __future__ import annotations

import math

import numpy as np

from scin_pipeline.core.synthetic.seeds import seeded_rng
from scin_pipeline.core.synthetic.skin import Canvas, erythema_colour, luminance, smooth_noise

# Pattern family drawn for a top condition. Allergic Contact Dermatitis gets its own look (sharp-edged,
# vesicular red patch) so that it is not an Eczema copy; every other condition and unlabelled cases get
# weak nonspecific marks.
CONDITION_PATTERNS = {
    "Eczema": "eczema_blotches",
    "Allergic Contact Dermatitis": "contact_dermatitis_patch",
    "Urticaria": "urticaria_wheals",
    "Insect Bite": "insect_bite_dots",
    "Folliculitis": "folliculitis_papules",
    "Psoriasis": "psoriasis_plaques",
    "Tinea": "tinea_rings",
    "Impetigo": "impetigo_crusts",
}
NONSPECIFIC_PATTERN = "nonspecific_marks"
NO_LESION_PATTERN = "none"


def pattern_for_condition(condition: str) -> str:
    return CONDITION_PATTERNS.get(condition, NONSPECIFIC_PATTERN)


def _edge(signed_distance_px: np.ndarray, edge_px: float) -> np.ndarray:
    """0..1 ramp across an edge `edge_px` wide (positive distance = inside)."""
    return np.clip(signed_distance_px / max(edge_px, 0.5) + 0.5, 0, 1)


def _paint_eczema(cv: Canvas, strength: float, ref: np.ndarray) -> None:
    # Large, ill-defined patches (a noise field thresholded inside a wide region), a rough surface, and
    # small dark excoriations (scratch marks): diffuse where contact dermatitis is sharp and compact.
    rng, s = cv.rng, cv.scale
    for _ in range(int(rng.integers(1, 3))):
        cx, cy = cv.centre()
        rx = rng.uniform(70, 130) * s
        ry = rx * rng.uniform(0.6, 1.0)
        got = cv.ellipse(cx, cy, rx, ry, rng.uniform(0, np.pi), 1.0)
        if got is None:
            continue
        roi, r = got
        noise = smooth_noise(rng, r.shape[0], r.shape[1], 18 * s + 2)
        patchy = np.clip((0.85 - r * r) * 1.8 + 0.6 * noise, 0, 1)
        cv.paint(roi, patchy * rng.uniform(0.5, 0.75) * strength, erythema_colour(ref, 0.8 * strength), texture=0.16)
        scratch = erythema_colour(ref, strength) * 0.6
        for _ in range(int(rng.integers(6, 16))):
            angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.75)
            sx, sy = cx + math.cos(angle) * dist * rx, cy + math.sin(angle) * dist * ry
            length = rng.uniform(4, 9) * s + 1
            mark = cv.ellipse(sx, sy, length, length * 0.25 + 0.4, rng.uniform(0, np.pi), 1.5)
            if mark is not None:
                cv.paint(mark[0], _edge((1 - mark[1]) * length * 0.3, 0.8) * 0.8 * strength, scratch)


def _paint_contact_dermatitis(cv: Canvas, strength: float, ref: np.ndarray) -> None:
    # A geometric, sharply bordered red patch (the shape of the contact) with tiny pale vesicles.
    rng, s = cv.rng, cv.scale
    cx, cy = cv.centre()
    rx, ry = rng.uniform(60, 120) * s, rng.uniform(25, 55) * s
    theta = rng.uniform(0, np.pi)
    got = cv.ellipse(cx, cy, rx, ry, theta, 1.3)
    if got is None:
        return
    roi, r = got
    # A superellipse-like rectangle: sharp straight edges read as "contact", unlike eczema's blotches.
    yy, xx = np.mgrid[roi[0], roi[1]].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    c, sn = math.cos(theta), math.sin(theta)
    u, v = np.abs(dx * c + dy * sn) / rx, np.abs(-dx * sn + dy * c) / ry
    box = np.maximum(u, v)
    alpha = _edge((1 - box) * min(rx, ry), 1.5 * s + 0.5) * rng.uniform(0.7, 0.9) * strength
    cv.paint(roi, alpha, erythema_colour(ref, strength), texture=0.06)
    vesicle = np.clip(cv.fine[roi] - 1.6, 0, 1) * (alpha > 0.5)
    cv.paint(roi, vesicle * 0.8, np.minimum(ref * 1.05 + 30, 255))


def _paint_urticaria(cv: Canvas, strength: float, ref: np.ndarray) -> None:
    # Raised pale-pink wheals (filled, smooth) surrounded by a diffuse red flare.
    rng, s = cv.rng, cv.scale
    pale = np.clip(erythema_colour(ref, 0.35) * 1.06 + 10, 0, 255)
    for _ in range(int(rng.integers(2, 6))):
        cx, cy = cv.centre(0.1)
        rx = rng.uniform(22, 60) * s
        got = cv.ellipse(cx, cy, rx, rx * rng.uniform(0.5, 1.0), rng.uniform(0, np.pi), 2.2)
        if got is None:
            continue
        roi, r = got
        r = cv.warp(r, 0.18, 14 * s + 2)
        flare = np.exp(-((np.maximum(r - 0.8, 0) / 0.55) ** 2)) * 0.75 * strength
        cv.paint(roi, flare, erythema_colour(ref, 0.9 * strength))
        wheal = _edge((1 - r) * rx, 3 * s + 1) * 0.85 * strength
        cv.paint(roi, wheal, pale, texture=0.02)


def _paint_insect_bite(cv: Canvas, strength: float, ref: np.ndarray) -> None:
    # A few discrete red papules with a central punctum and a soft pink halo.
    rng, s = cv.rng, cv.scale
    cx0, cy0 = cv.centre(0.25)
    for _ in range(int(rng.integers(1, 5))):
        cx, cy = cx0 + rng.normal(0, 60 * s), cy0 + rng.normal(0, 45 * s)
        papule_r = rng.uniform(7, 13) * s + 1
        got = cv.ellipse(cx, cy, papule_r, papule_r * rng.uniform(0.8, 1.0), 0.0, 3.5)
        if got is None:
            continue
        roi, r = got
        halo = np.exp(-((r / 2.2) ** 2)) * 0.55 * strength
        cv.paint(roi, halo, erythema_colour(ref, 0.7 * strength))
        papule = _edge((1 - r) * papule_r, 2 * s + 0.5) * 0.9 * strength
        cv.paint(roi, papule, erythema_colour(ref, 1.0 * strength) * 0.92)
        punctum = _edge((0.25 - r) * papule_r, 1.0) * 0.9 * strength
        cv.paint(roi, punctum, erythema_colour(ref, 1.0) * 0.55)


def _paint_folliculitis(cv: Canvas, strength: float, ref: np.ndarray) -> None:
    # Many small follicular papules, some with a pale yellow pustule head, scattered over a region.
    rng, s = cv.rng, cv.scale
    cx0, cy0 = cv.centre(0.25)
    spread_x, spread_y = rng.uniform(60, 120) * s, rng.uniform(45, 90) * s
    red = erythema_colour(ref, strength)
    pus = np.array([238, 226, 180], np.float32)
    for _ in range(int(rng.integers(30, 80))):
        cx, cy = cx0 + rng.normal(0, spread_x), cy0 + rng.normal(0, spread_y)
        rad = rng.uniform(2.5, 5.0) * s + 0.7
        got = cv.ellipse(cx, cy, rad, rad, 0.0, 1.8)
        if got is None:
            continue
        roi, r = got
        cv.paint(roi, np.exp(-(r**2) * 1.3) * 0.9 * strength, red)
        if rng.random() < 0.3:
            cv.paint(roi, np.exp(-((r / 0.4) ** 2)) * 0.8 * strength, pus)


def _paint_psoriasis(cv: Canvas, strength: float, ref: np.ndarray) -> None:
    # Well-demarcated red plaques carrying thick silvery-white scale.
    rng, s = cv.rng, cv.scale
    silver = np.array([214, 214, 222], np.float32)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = cv.centre()
        rx = rng.uniform(30, 75) * s
        got = cv.ellipse(cx, cy, rx, rx * rng.uniform(0.55, 1.0), rng.uniform(0, np.pi), 1.4)
        if got is None:
            continue
        roi, r = got
        r = cv.warp(r, 0.12, 20 * s + 2)
        plaque = _edge((1 - r) * rx, 1.5 * s + 0.5)
        cv.paint(roi, plaque * 0.88 * strength, erythema_colour(ref, strength))
        flakes = np.clip(smooth_noise(rng, r.shape[0], r.shape[1], 5 * s + 1) * 0.8 + 0.5, 0, 1)
        cv.paint(roi, plaque * flakes * 0.85 * strength, silver, texture=0.08)


def _paint_tinea(cv: Canvas, strength: float, ref: np.ndarray) -> None:
    # Annular plaques: a red, slightly scaly advancing ring with a clearer centre.
    rng, s = cv.rng, cv.scale
    for _ in range(int(rng.integers(1, 3))):
        cx, cy = cv.centre(0.22)
        rx = rng.uniform(35, 85) * s
        got = cv.ellipse(cx, cy, rx, rx * rng.uniform(0.75, 1.0), rng.uniform(0, np.pi), 1.35)
        if got is None:
            continue
        roi, r = got
        r = cv.warp(r, 0.06, 25 * s + 2)
        half_width = rng.uniform(4, 7) * s + 0.8
        ring = _edge(half_width - np.abs(r - 1) * rx, 1.5 * s + 0.5) * 0.9 * strength
        cv.paint(roi, ring, erythema_colour(ref, strength), texture=0.12)
        centre = _edge((0.85 - r) * rx, 4 * s) * 0.2 * strength
        cv.paint(roi, centre, erythema_colour(ref, 0.3))


def _paint_impetigo(cv: Canvas, strength: float, ref: np.ndarray) -> None:
    # Honey-coloured crusts on a red base.
    rng, s = cv.rng, cv.scale
    lum = float(luminance(ref)) / 255.0
    honey = np.array([212, 158, 62], np.float32) * (0.75 + 0.25 * lum)
    for _ in range(int(rng.integers(1, 5))):
        cx, cy = cv.centre()
        rx = rng.uniform(14, 38) * s + 1
        got = cv.ellipse(cx, cy, rx, rx * rng.uniform(0.6, 1.0), rng.uniform(0, np.pi), 1.8)
        if got is None:
            continue
        roi, r = got
        r = cv.warp(r, 0.2, 8 * s + 2)
        rim = _edge((1.45 - r) * rx, 4 * s + 1) * 0.7 * strength
        cv.paint(roi, rim, erythema_colour(ref, 0.9 * strength))
        crust = _edge((1 - r) * rx, 1.5 * s + 0.5) * 0.92 * strength
        cv.paint(roi, crust, honey, texture=0.22)


def _paint_nonspecific(cv: Canvas, strength: float, ref: np.ndarray) -> None:
    # Weak marks (a faint pink or brownish spot or two): "something" without a learnable signature.
    rng, s = cv.rng, cv.scale
    for _ in range(int(rng.integers(0, 4))):
        cx, cy = cv.centre(0.1)
        rx = rng.uniform(8, 35) * s + 1
        got = cv.ellipse(cx, cy, rx, rx * rng.uniform(0.5, 1.0), rng.uniform(0, np.pi), 1.6)
        if got is None:
            continue
        roi, r = got
        colour = erythema_colour(ref, 0.6) if rng.random() < 0.5 else ref * 0.82
        cv.paint(roi, np.exp(-(r**2)) * rng.uniform(0.12, 0.3) * strength, colour)


_PAINTERS = {
    "eczema_blotches": _paint_eczema,
    "contact_dermatitis_patch": _paint_contact_dermatitis,
    "urticaria_wheals": _paint_urticaria,
    "insect_bite_dots": _paint_insect_bite,
    "folliculitis_papules": _paint_folliculitis,
    "psoriasis_plaques": _paint_psoriasis,
    "tinea_rings": _paint_tinea,
    "impetigo_crusts": _paint_impetigo,
    NONSPECIFIC_PATTERN: _paint_nonspecific,
    NO_LESION_PATTERN: lambda cv, strength, ref: None,
}

# Under a flash-lit, otherwise underexposed shot the lesion must stay clearly red on every skin tone, so
# dark_diagnostic lesions take their colours from this reference skin instead of the case's tone.
_VIVID_REFERENCE_SKIN = np.array([205, 160, 140], np.float32)
DARK_DIAGNOSTIC_MIN_COVERAGE = 0.03  # share of the frame its lesion covers at least


def _dark_diagnostic_pattern(pattern: str) -> str:
    """The lesion drawn on a dark_diagnostic image: the case's own unless it may be too small to see.

    The plant promises a clearly visible red lesion, so patterns that may not deliver one are drawn as
    eczema blotches instead: nonspecific marks are faint, a single insect bite covers well under 1 % of the
    frame, and small psoriasis plaques can be mostly silver scale rather than red.
    """
    not_clearly_red = (NONSPECIFIC_PATTERN, NO_LESION_PATTERN, "insect_bite_dots", "psoriasis_plaques")
    return "eczema_blotches" if pattern in not_clearly_red or pattern not in _PAINTERS else pattern


def render_skin_image(image_key: str, tone: int, pattern: str, size: tuple[int, int], seed: int) -> np.ndarray:
    """The clean synthetic photograph of one image (RGB uint8, shape (h, w, 3)); deterministic."""
    rgb, _ = render_with_canvas(image_key, tone, pattern, size, seed)
    return rgb


def render_with_canvas(image_key: str, tone: int, pattern: str, size, seed):
    """(rgb, canvas): the clean image and the canvas it was painted on (its coverage is the lesion's alpha)."""
    if pattern not in _PAINTERS:
        raise ValueError(f"unknown pattern {pattern!r}")
    cv = Canvas(seeded_rng("image", seed, image_key), tone, size)
    _PAINTERS[pattern](cv, 1.0, cv.skin)
    return np.clip(cv.img, 0, 255).astype(np.uint8), cv


def render_dark_diagnostic_lesion(image_key: str, tone: int, pattern: str, size, seed):
    """(rgb, canvas, drawn) for a dark_diagnostic frame before darkening: a vivid, clearly sized lesion.

    Lesion colours come from a fixed light reference skin so they stay red on every tone; a lesion that
    ends up covering under DARK_DIAGNOSTIC_MIN_COVERAGE of the frame (one small crust, say) gets eczema
    blotches added, and `drawn` names both patterns.
    """
    drawn = _dark_diagnostic_pattern(pattern)
    cv = Canvas(seeded_rng("image", seed, image_key), tone, size)
    _PAINTERS[drawn](cv, 1.0, _VIVID_REFERENCE_SKIN)
    if (cv.coverage > 0.5).mean() < DARK_DIAGNOSTIC_MIN_COVERAGE and drawn != "eczema_blotches":
        _PAINTERS["eczema_blotches"](cv, 1.0, _VIVID_REFERENCE_SKIN)
        drawn = f"{drawn}+eczema_blotches"
    return np.clip(cv.img, 0, 255).astype(np.uint8), cv, drawn
