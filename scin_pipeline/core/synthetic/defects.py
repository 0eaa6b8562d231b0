"""Planted problems of a synthetic mirror: which image file gets which defect, and the bytes it then holds.

The ``defect_rate`` share of image files is split equally over the ten kinds in ``DEFECT_KINDS``; when a
mirror has >= 60 distinct image files (and defect_rate > 0) every kind is planted at least once:

- ``dark``: underexposed (intensities x 0.08-0.2) and no lesion at all: a quality filter should drop it.
- ``dark_diagnostic``: underexposed background (x0.08-0.16; frame mean luminance <= 45 of 255), but a
  strongly visible, textured red lesion, lit as by a close flash and coloured from a fixed light reference
  skin so it stays red on every tone: must be KEPT by the rule "exclude dark images unless texture or
  redness is visible". Patterns that may not be clearly red (nonspecific marks, insect bites, psoriasis
  scale) are drawn as eczema here, and a lesion covering under 3 % of the frame gets eczema blotches added
  (``pattern`` then reads e.g. ``tinea_rings+eczema_blotches``).
- ``blurred``: Gaussian blur, sigma 6-10 px at 480 px width (scaled with the width).
- ``overexposed``: gain chosen so that the median pixel clips: blown highlights on any skin tone.
- ``near_duplicate``: a clean image of ANOTHER case, mildly changed (2-5 % crop and resize back,
  brightness shift of 3-8 levels, JPEG re-encode at quality 75-92, saved as PNG); ``detail`` names the
  source image and case.
- ``corrupt_truncated``: a valid PNG cut to half its bytes.
- ``corrupt_zero_byte``: an empty file.
- ``wrong_format``: JPEG bytes saved under the ``.png`` name.
- ``decompression_bomb``: a tiny, structurally valid PNG (correct CRCs) whose IHDR declares 30000 x 30000
  RGB pixels; only a few rows of zeros are actually in the IDAT.
- ``missing``: the reference stays in the CSV, no file is written. The real release's one absent file
  (``KNOWN_MISSING_IMAGE_PATHS``) is also left missing whenever its case is in the subset.

Not chosen, but recorded:

- ``exact_reuse``: the real release references 15 files from several cases (42 references). Such a file
  is written once (so the reuse is exact by construction) and recorded with this value when the subset
  holds >= 2 of its references. Files shared anywhere in the release never receive a planted defect.
- ``rejected_path``: an image reference that ``paths.image_id_from_path`` refuses; nothing is written or
  joined for it; ``image_id`` is empty, ``image_path`` holds the raw reference and ``detail`` the reason.
  The reference itself stays in the copied CSV (the mirror mirrors; later stages must reject it).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from scin_pipeline.core.synthetic.encoding import (
    BOMB_DECLARED_SIZE,
    decompression_bomb_png,
    encode_jpeg,
    encode_png,
)
from scin_pipeline.core.synthetic.lesions import (
    NO_LESION_PATTERN,
    render_dark_diagnostic_lesion,
    render_skin_image,
    render_with_canvas,
)
from scin_pipeline.core.synthetic.seeds import seeded_rng, stable_u64
from scin_pipeline.core.synthetic.skin import luminance

PLANT_CLEAN = "clean"
PLANT_EXACT_REUSE = "exact_reuse"
PLANT_REJECTED_PATH = "rejected_path"
DEFECT_KINDS: tuple[str, ...] = (
    "dark",
    "dark_diagnostic",
    "blurred",
    "overexposed",
    "near_duplicate",
    "corrupt_truncated",
    "corrupt_zero_byte",
    "wrong_format",
    "decompression_bomb",
    "missing",
)
MIN_FILES_FOR_EVERY_KIND = 60

# The one image the real release references but the bucket lacks.
KNOWN_MISSING_IMAGE_PATHS = frozenset({"dataset/images/-2243186711511406658.png"})

DARK_DIAGNOSTIC_MAX_MEAN = 45.0  # mean luminance (0-255) a dark_diagnostic frame never exceeds

PLANT_MEANINGS = {
    PLANT_CLEAN: "ordinary synthetic image",
    PLANT_EXACT_REUSE: "one file referenced by several cases, as in the real release (written once)",
    PLANT_REJECTED_PATH: "image path refused by the path rule; no file written",
    "dark": "underexposed (x0.08-0.2), no lesion: should be excluded",
    "dark_diagnostic": "underexposed background with a clearly visible red, textured lesion: should be kept",
    "blurred": "Gaussian blur, sigma 6-10 px at 480 px width",
    "overexposed": "blown highlights (median pixel clipped)",
    "near_duplicate": "mildly altered copy of another case's image (detail names the source)",
    "corrupt_truncated": "valid PNG cut to half its bytes",
    "corrupt_zero_byte": "empty file",
    "wrong_format": "JPEG bytes under a .png name",
    "decompression_bomb": "tiny PNG whose header declares 30000 x 30000 pixels",
    "missing": "referenced in the CSV, no file written",
}


def defect_counts(n_files: int, defect_rate: float) -> int:
    """How many files each defect kind gets."""
    if defect_rate <= 0 or n_files == 0:
        return 0
    per_kind = int(round(defect_rate * n_files / len(DEFECT_KINDS)))
    return max(per_kind, 1) if n_files >= MIN_FILES_FOR_EVERY_KIND else per_kind


def plant_defects(files: dict[str, dict], *, seed: int, defect_rate: float, shared_in_release: set[str]) -> None:
    """Set ``planted`` and ``detail`` (and ``source_id`` of a near duplicate) of every file, in place.

    ``files``: image_id -> the file's plants row (planted ``clean``) plus ``other_cases``, the further
    cases referencing it. Exact reuse and the release's own missing file first, then seeded defects.
    """
    for info in files.values():
        if info["other_cases"]:
            info["planted"] = PLANT_EXACT_REUSE
            info["detail"] = "same file also referenced by case_id " + ";".join(info["other_cases"])
        elif info["image_path"] in KNOWN_MISSING_IMAGE_PATHS:
            info["planted"] = "missing"
            info["detail"] = "absent from the real release bucket"
    eligible = sorted(
        (
            i
            for i, info in files.items()
            if info["planted"] == PLANT_CLEAN and info["image_path"] not in shared_in_release
        ),
        key=lambda i: (stable_u64("defect-order", seed, i), i),
    )
    per_kind = defect_counts(len(files), defect_rate)
    n_defects = min(per_kind * len(DEFECT_KINDS), len(eligible))
    for k, image_id in enumerate(eligible[:n_defects]):
        files[image_id]["planted"] = DEFECT_KINDS[k % len(DEFECT_KINDS)]

    # Near-duplicate sources: clean images of another case, each used at most once, in seeded order.
    sources = [i for i in eligible[n_defects:] if files[i]["planted"] == PLANT_CLEAN]
    used: set[str] = set()
    for image_id in eligible[:n_defects]:
        info = files[image_id]
        if info["planted"] != "near_duplicate":
            continue
        source = next((s for s in sources if s not in used and files[s]["case_id"] != info["case_id"]), None)
        if source is None:  # a one-case mirror has nothing to copy from: the image stays clean
            info["planted"] = PLANT_CLEAN
            continue
        used.add(source)
        info["source_id"] = source


@dataclass(frozen=True)
class ImageJob:
    """Everything needed to write one image file; pure data so it can cross a process boundary."""

    image_id: str
    target: str  # absolute file path
    tone: int
    pattern: str
    planted: str
    size: tuple[int, int]
    seed: int
    source_id: str = ""  # near_duplicate: the image copied
    source_tone: int = 0
    source_pattern: str = ""


def image_bytes(job: ImageJob) -> tuple[bytes | None, str, str]:
    """(file content or None for 'write nothing', detail text, pattern the file shows or '')."""
    w, _ = job.size
    prng = seeded_rng("defect", job.seed, job.image_id)
    kind = job.planted
    if kind == "missing":
        return None, "", ""
    if kind == "corrupt_zero_byte":
        return b"", "empty file", ""
    if kind == "decompression_bomb":
        data = decompression_bomb_png()
        return data, f"IHDR declares {BOMB_DECLARED_SIZE[0]}x{BOMB_DECLARED_SIZE[1]} RGB; {len(data)} bytes", ""
    if kind == "dark":
        rgb, _ = render_with_canvas(job.image_id, job.tone, NO_LESION_PATTERN, job.size, job.seed)
        factor = prng.uniform(0.08, 0.2)
        out = np.clip(rgb * factor, 0, 255).astype(np.uint8)
        return encode_png(out), f"intensity x{factor:.3f}, no lesion", NO_LESION_PATTERN
    if kind == "dark_diagnostic":
        rgb, cv, drawn = render_dark_diagnostic_lesion(job.image_id, job.tone, job.pattern, job.size, job.seed)
        background = prng.uniform(0.08, 0.16)
        lesion = prng.uniform(0.7, 0.9)
        # Underexposed background, lesion kept bright (as under a close flash): the gain rises with the
        # lesion's own alpha (square root: half-transparent lesion pixels count as lesion), so its red
        # and texture stay visible while the frame mean stays dark.
        weight = np.sqrt(cv.coverage)
        # A frame mostly covered by lesion must still read as underexposed: cap its mean luminance.
        lum = luminance(rgb.astype(np.float32))
        base_mean, lesion_mean = float(lum.mean()), float((lum * weight).mean())
        expected_mean = background * base_mean + (lesion - background) * lesion_mean
        if lesion_mean > 0 and expected_mean > DARK_DIAGNOSTIC_MAX_MEAN:
            lesion = background + (DARK_DIAGNOSTIC_MAX_MEAN - background * base_mean) / lesion_mean
        gain = background + (lesion - background) * weight
        out = np.clip(rgb.astype(np.float32) * gain[..., None], 0, 255).astype(np.uint8)
        return encode_png(out), f"background x{background:.3f}, lesion x{lesion:.3f}", drawn
    if kind == "near_duplicate":
        src = render_skin_image(job.source_id, job.source_tone, job.source_pattern, job.size, job.seed)
        h, w_ = src.shape[:2]
        crop = prng.uniform(0.02, 0.05)
        left, top = int(round(w_ * crop * prng.uniform(0, 1))), int(round(h * crop * prng.uniform(0, 1)))
        cw, ch = int(round(w_ * (1 - crop))), int(round(h * (1 - crop)))
        cropped = src[top : top + ch, left : left + cw]
        resized = cv2.resize(cropped, (w_, h), interpolation=cv2.INTER_LINEAR)
        shift = float(prng.choice([-1, 1]) * prng.uniform(3, 8))
        shifted = np.clip(resized.astype(np.float32) + shift, 0, 255).astype(np.uint8)
        quality = int(prng.integers(75, 93))
        reencoded = cv2.imdecode(np.frombuffer(encode_jpeg(shifted, quality), np.uint8), cv2.IMREAD_COLOR)
        assert reencoded is not None  # the JPEG we have just encoded decodes
        out = cv2.cvtColor(reencoded, cv2.COLOR_BGR2RGB)
        detail = (
            f"source_image_id={job.source_id}; crop={crop:.3f}; brightness_shift={shift:+.1f}; jpeg_quality={quality}"
        )
        return encode_png(out), detail, job.source_pattern

    rgb, _ = render_with_canvas(job.image_id, job.tone, job.pattern, job.size, job.seed)
    if kind in (PLANT_CLEAN, PLANT_EXACT_REUSE):
        return encode_png(rgb), "", job.pattern
    if kind == "blurred":
        sigma = prng.uniform(6, 10) * w / 480
        return encode_png(cv2.GaussianBlur(rgb, (0, 0), sigma)), f"gaussian sigma={sigma:.2f}px", job.pattern
    if kind == "overexposed":
        median = max(float(np.median(luminance(rgb.astype(np.float32)))), 1.0)
        gain = prng.uniform(1.2, 1.6) * 255 / median
        out = np.clip(rgb.astype(np.float32) * gain + prng.uniform(10, 40), 0, 255).astype(np.uint8)
        return encode_png(out), f"gain x{gain:.2f}, median clipped", job.pattern
    if kind == "corrupt_truncated":
        data = encode_png(rgb)
        return data[: len(data) // 2], f"valid PNG of {len(data)} bytes cut to {len(data) // 2}", job.pattern
    if kind == "wrong_format":
        return encode_jpeg(rgb, 90), "JPEG bytes under a .png name", job.pattern
    raise ValueError(f"unknown planted kind {kind!r}")
