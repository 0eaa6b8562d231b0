"""Per-image quality metrics, perceptual hashes, and the keep/exclude rule.

One decode per file (:mod:`scin_pipeline.core.imageio`; a PNG at least twice the working size is decoded
at half size), then everything is computed from a *working copy* scaled down to a long side of
``QualityConfig.working_long_side`` px (512) with ``cv2.INTER_AREA``. That keeps every metric cheap (the
decode itself is the floor: metrics and hashes add ~9 ms to a ~17 ms decode of a 1,200 px phone PNG) and
makes the metrics close to scale-invariant: a 1600 px and an 800 px copy of one photo give the same
brightness, redness, entropy, texture and pHash (within 2 bits); sharpness, a pixel-scale measure, still
moves with the resampling (within ~1.5x), far less than the gap between sharp and blurred photos. Images
smaller than the working size are not enlarged.

The rule (:func:`decide_quality`), first match wins:

1. the file did not decode: the decode status is the reason (``empty_file``, ``truncated``, ``corrupt``,
   ``wrong_format``, ``decompression_bomb``, ``unreadable``, ``missing``);
2. ``too_small``: the long side of the file is under ``min_long_side_px`` (160): training enlarges every
   photo to 224 px, and one this small would be mostly interpolation (a 1 x 1 or 2 x 2 file lands here too);
3. ``overexposed``: more than ``overexposed_fraction_max`` of the frame is blown out;
4. ``dark``: the median lightness is below ``dark_relative_min`` times the lightness *expected for the
   case's skin* (the CIELAB L* of its Monk skin tone swatch): a well-exposed photo of deep skin (Monk 10,
   swatch L* 14.6) is not dark, the same pixels on a Monk 1 case (L* 94.1) are. A dark image is kept, with
   ``dark_but_diagnostic``, when texture or redness is still visible (``texture >= diagnostic_texture_min``
   or ``redness_contrast >= diagnostic_redness_min``);
5. ``low_information``: a nearly flat frame, one colour with faint shading and sensor noise (a covered
   lens, a wall, a sleeve): ``structure`` below ``low_information_structure_min`` per cent, or grey-level
   entropy below ``low_information_entropy_min`` bits (a near-uniform frame without noise). ``structure`` is
   the noise-free standard deviation of the grey level at 3-16 px of the working copy, as a percentage of
   the mean grey level (:func:`coherent_band_std`): mottling, skin relief, hair and lesions live there;
   sensor noise (independent between pixels 2.8 px apart) and smooth shading (removed by the band-pass)
   do not count, and being relative it reads the same on every Monk tone. The structure test also applies
   to dark-but-diagnostic images (what made a flat dark frame look "textured" was its noise); the entropy
   test does not (their entropy is low because they are dark);
6. ``blurry``: variance of the Laplacian below ``blurry_sharpness_min``.

Dermatologist gradability is not part of this rule; it is a separate filter downstream.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import cv2
import imagehash
import numpy as np
import pandas as pd
from PIL import Image, ImageFilter, ImageStat

from scin_pipeline.core import near_duplicates
from scin_pipeline.core.image_cache import TENSOR_ERROR_KEY, TENSORS_KEY, preprocess_image
from scin_pipeline.core.imageio import (
    DECODE_FAILURE_STATUSES,
    DEFAULT_MAX_PIXELS,
    decode_image,
    halve_as_reduced_decode,
    pixel_limit_guard,
    reduced_decode_applies,
)
from scin_pipeline.core.schema import MISSING_GROUP


def hex_lightness(hex_colour: str) -> float:
    """CIELAB L* (D65) of a ``#rrggbb`` colour, as OpenCV computes it (float32)."""
    rgb = np.array([[[int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)]]], np.float32) / 255.0
    return float(cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)[0, 0, 0])


# CIELAB L* (D65) of each swatch: hex_lightness of MONK_SKIN_TONE_HEX, written out (a test recomputes them):
# OpenCV's first call costs about 0.1 s of initialisation, which importing the definitions must not pay.
MONK_SWATCH_LIGHTNESS = {
    1: 94.061279296875,
    2: 92.132568359375,
    3: 92.9443359375,
    4: 87.451171875,
    5: 77.813720703125,
    6: 55.133056640625,
    7: 42.3828125,
    8: 30.56640625,
    9: 20.99609375,
    10: 14.56298828125,
}

DECODE_FAILURE_REASONS = DECODE_FAILURE_STATUSES  # rule 1: a file that did not decode is excluded for its status
QUALITY_REASONS = ("too_small", "overexposed", "dark", "low_information", "blurry")

# cleanvision 0.3.7 defaults (ImagePropertyIssueManager.get_default_params), for the per-image scores.
_CV_LOW_INFORMATION_NORMALIZING = 0.1
_CV_BLURRY_NORMALIZING = 0.01
_CV_BLURRY_COLOR_THRESHOLD = 0.18
_CV_BLURRY_MAX_RESOLUTION = 64  # cleanvision.utils.constants.MAX_RESOLUTION_FOR_BLURRY_DETECTION


@dataclass(frozen=True)
class QualityConfig:
    """Settings of the quality stage; the thresholds of the keep/exclude rule (see the module docstring).

    The defaults are measured, not guessed: ``python bench/curation.py --only calibration`` writes a
    synthetic mirror with planted defects (400 cases, the 10 Monk tones equally often, 60 % of the files
    defective, 1280 x 960 px so that files take the production path, seed 7: 809 files, 319 of them clean)
    and sweeps each threshold with the others held. Measured on it (the default sits inside the range
    where every planted reason keeps precision and recall >= 0.9, away from both edges):

    - ``dark_relative_min`` 0.40 (range 0.15-0.75): planted dark frames reach at most 0.19 of their swatch
      lightness, clean photos of any tone at least 0.75 (the lowest are Monk 7-10);
    - ``diagnostic_redness_min`` 6.0 a* units (range 1-20, texture test off): planted dark frames reach
      0.7, dark-but-diagnostic ones at least 11.3;
    - ``diagnostic_texture_min`` 1.0 L*/px (range 0.2-2.5, redness test off): dark frames reach 0.17,
      dark-but-diagnostic ones at least 2.3;
    - ``overexposed_fraction_max`` 0.5 (range 0.15-0.99): clean images reach 0.16, over-exposed ones 1.0;
    - ``blurry_sharpness_min`` 3.0 (range 1.25-8): blurred images reach 1.3, clean ones at least 9.8; the
      lowest clean values are deep skin (Monk 7-10: 9.8, Monk 1-3: 42), so this is the threshold to
      watch for fairness on real photos;
    - ``low_information_entropy_min`` 1.0 bit (range 0.25-2; no planted kind): only near-uniform frames.
      Grey-level entropy is lowest on deep skin (clean Monk 7-10 from 2.4 bits, Monk 1-3 from 4.7), so
      cleanvision's own cut (3 bits of RGB entropy) would exclude deep skin first;
    - ``low_information_structure_min`` 0.43 % (the geometric mean of the nearest flat frame and the
      nearest plain skin): measured by ``python bench/curation.py --calibrate`` on a set of our own
      (bench/flat_and_plain_skin.py, seed 11, 20 per kind: flat frames of covered lenses, walls, sleeves
      and skin colours with ramps, vignettes and smooth blobs, noise sigma 1-6, some of it softened; plain
      skin of every Monk tone, 300-1600 px, PNG and JPEG): flat frames reach at most 0.26 (walls with
      little noise), plain skin with mottling starts at 0.71 (lowest per tone 0.71-0.97); clean images of
      the calibration mirror start at 0.94 (per tone 0.94-1.01), its blurred ones at 0.57. Skin whose
      only texture is finer than the working copy (pores or skin lines alone, sub-pixel at 512 px) reads
      as flat: a limit of measuring at 512 px;
    - ``min_long_side_px`` 160: below the 224 px training size with margin (a 160 px photo is enlarged
      1.4x), above what a thumbnail or an icon is.

    With these defaults on that mirror: precision and recall 1.00 for dark, blurred, over-exposed and
    every decode failure (49 files each); all 49 dark-but-diagnostic images kept; clean images excluded:
    0 of 104 (Monk 1-3), 0 of 87 (Monk 4-6), 0 of 128 (Monk 7-10). 3 of 49 near-duplicates (copies of
    another case's photo, so of another skin tone) are called dark against their own case's tone. The
    synthetic defects are cleanly separated; thresholds for real photos need the same sweep on a
    labelled sample.
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    working_long_side: int = 512
    dark_relative_min: float = 0.40
    diagnostic_texture_min: float = 1.0
    diagnostic_redness_min: float = 6.0
    overexposed_fraction_max: float = 0.5
    blurry_sharpness_min: float = 3.0
    low_information_entropy_min: float = 1.0
    low_information_structure_min: float = 0.44
    min_long_side_px: int = 160
    # Sides (px) of the square uint8 training tensors made from the same decode (core.image_cache's
    # preprocess_image); () makes none and lets the decoder halve big PNGs (see assess_image).
    tensor_sizes: tuple[int, ...] = ()


# --------------------------------------------------------------------------------------------------------
# Hashes
# --------------------------------------------------------------------------------------------------------


def hash_to_uint64(image_hash: imagehash.ImageHash) -> np.uint64:
    """An 8x8 ImageHash as one uint64: bits in imagehash's order (row-major flatten), first bit = MSB.

    This is the same number as ``int(str(image_hash), 16)``, so hex strings stay comparable.
    """
    bits = np.asarray(image_hash.hash, dtype=bool).ravel()
    if bits.size != 64:
        raise ValueError(f"need a 64-bit hash (hash_size=8), got {bits.size} bits")
    return np.uint64(int.from_bytes(np.packbits(bits).tobytes(), "big"))


# --------------------------------------------------------------------------------------------------------
# Metrics of one decoded image
# --------------------------------------------------------------------------------------------------------

METRIC_COLUMNS = (
    "aspect_ratio",
    "brightness_mean",
    "brightness_p05",
    "brightness_median",
    "brightness_p95",
    "contrast",
    "underexposed_fraction",
    "overexposed_fraction",
    "sharpness",
    "texture",
    "redness",
    "redness_contrast",
    "entropy",
    "structure",
    "skin_fraction",
    "skin_mean_r",
    "skin_mean_g",
    "skin_mean_b",
    # cleanvision's per-image raw properties (same formulas, on the working copy; sizes from the original)
    "cv_brightness",
    "cv_brightness_perc_5",
    "cv_brightness_perc_99",
    "cv_entropy",
    "cv_blurriness",
    "cv_blurriness_grayscale_std",
    "cv_size",
    # cleanvision's per-image scores (1 = no issue, 0 = worst); odd_size is dataset-relative: see
    # cleanvision_scores() in scin_pipeline_tests/core/cleanvision_check.py
    "dark_score",
    "light_score",
    "blurry_score",
    "low_information_score",
    "odd_aspect_ratio_score",
    "grayscale_score",
)
ROW_COLUMNS = (
    "image_id",
    "decode_status",
    "decode_reason",
    "width",
    "height",
    "bytes",
    "format",
    "source_mode",
    *METRIC_COLUMNS,
    "phash",
    "dhash",
    "dhash256",
    "near_duplicate_descriptor",
)


def working_copy(rgb: np.ndarray, long_side: int) -> np.ndarray:
    """The image scaled down (area averaging, never up) so that its long side is at most long_side."""
    h, w = rgb.shape[:2]
    scale = long_side / max(h, w)
    if scale >= 1:
        return rgb
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def _shannon_entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0].astype(np.float64)
    p /= p.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: a one-value histogram gives 0.0, not -0.0


def binned_percentiles(
    values: np.ndarray, q: Sequence[float], *, lo: float, hi: float, step: float, mask: np.ndarray | None = None
) -> np.ndarray:
    """Percentiles q (0-100) of values in [lo, hi], to within one step, from one histogram.

    Written here instead of np.percentile: that sorts (partitions) a float copy per call, 5-8 ms on a
    512 px image; a bincount over fixed bins is one O(n) pass, and the thresholds never need more than
    the resolution used here (0.05 L*, 0.05 a*, 0.01 L*/px). ``mask`` (uint8, non-zero = use) selects pixels.
    """
    n_bins = int(round((hi - lo) / step)) + 1
    index = ((values - np.float32(lo)) * np.float32(1 / step) + np.float32(0.5)).astype(np.int32)
    np.clip(index, 0, n_bins - 1, out=index)
    if mask is not None:
        index = index[mask.astype(bool)]
    counts = np.bincount(index.ravel(), minlength=n_bins)
    total = int(counts.sum())
    if total == 0:
        return np.full(len(q), np.nan)
    cdf = np.cumsum(counts)
    # The value at rank q/100 * (n - 1) (numpy's default "linear" definition, here at bin resolution).
    ranks = np.asarray(q, dtype=np.float64) / 100 * (total - 1)
    return lo + np.searchsorted(cdf, ranks, side="right") * step


# Structure: the band of spatial scales between pixel noise and the illumination (3-16 px of the working
# copy: mottling, skin relief, hair, lesions), measured so that sensor noise does not count.
_STRUCTURE_SIGMAS = (0.75, 4.0)  # difference of Gaussians, in pixels of the quarter-resolution lattices
_STRUCTURE_PAIRS = (((0, 0), (2, 2)), ((0, 2), (2, 0)), ((1, 1), (3, 3)), ((1, 3), (3, 1)))
_STRUCTURE_CONFIDENCE = 2.0  # the metric is an upper bound: the covariance plus this many standard errors


def _noise_area(sigmas: tuple[float, float]) -> float:
    """Sum over lags of the squared autocorrelation of white noise after the band-pass: the number of
    pixels one independent sample of a product of two such noises is worth."""
    size = int(8 * sigmas[1]) | 1
    impulse = np.zeros((size, size), np.float32)
    impulse[size // 2, size // 2] = 1
    kernel = cv2.GaussianBlur(impulse, (0, 0), sigmas[0]) - cv2.GaussianBlur(impulse, (0, 0), sigmas[1])
    spectrum = np.abs(np.fft.fft2(kernel, (2 * size, 2 * size))) ** 2
    autocorrelation = np.real(np.fft.ifft2(spectrum))
    return float((autocorrelation**2).sum() / autocorrelation[0, 0] ** 2)


# Sensor noise softened by demosaicing or JPEG is slightly correlated even 2.8 px apart (about 0.04 for
# a 0.8 px blur): this share of the band's noise variance is taken off the covariance as well.
_STRUCTURE_NOISE_LEAK = 0.1
_STRUCTURE_NOISE_AREA = _noise_area(_STRUCTURE_SIGMAS)
_STRUCTURE_MIN_SIDE = 8  # lattices smaller than this (a working copy under 32 px) give NaN


def coherent_band_std(plane: np.ndarray) -> float:
    """Standard deviation of the noise-free part of ``plane`` in the structure band (same units as plane).

    The plane is sampled on pairs of disjoint lattices of every 4th pixel, offset by 2 px diagonally
    ((0, 0) with (2, 2), (0, 2) with (2, 0), (1, 1) with (3, 3), (1, 3) with (3, 1)); each lattice is
    band-passed (difference of Gaussians, ``_STRUCTURE_SIGMAS`` in lattice pixels: 3-16 px of the plane)
    and a border of the larger sigma's reach is dropped. Structure wider than a few pixels is nearly the
    same on both lattices of a pair; sensor noise, even softened by demosaicing or JPEG (correlated over a
    pixel or so), is independent between pixels 2.8 px apart. So the *covariance* of the two band-passed
    lattices, averaged over the four pairs, estimates the variance of the structure alone, without a noise
    model. Smooth shading (a ramp, a vignette) is removed by the band-pass. Taken off the covariance:
    ``_STRUCTURE_NOISE_LEAK`` of the band's noise variance (what softened noise still shares 2.8 px apart);
    added: ``_STRUCTURE_CONFIDENCE`` standard errors of the covariance under pure noise (noise variance
    times the square root of the noise's correlation area over the number of samples). The result is an
    upper bound, what the frame may hold given its noise: a rule that excludes below it excludes only
    frames that are flat with confidence, and a small, noisy photo gets the benefit of the doubt. 0 when
    negative,
    NaN when the plane is too small (under ``4 * _STRUCTURE_MIN_SIDE`` px a side).
    """
    h, w = plane.shape[:2]
    qh, qw = h // 4, w // 4
    if min(qh, qw) < _STRUCTURE_MIN_SIDE:
        return float("nan")
    small, large = _STRUCTURE_SIGMAS
    my, mx = (min(int(2 * large), (n - _STRUCTURE_MIN_SIDE) // 2) for n in (qh, qw))

    def band(y: int, x: int) -> np.ndarray:
        lattice = np.ascontiguousarray(plane[y : y + 4 * qh - 3 : 4, x : x + 4 * qw - 3 : 4], dtype=np.float32)
        out = cv2.GaussianBlur(lattice, (0, 0), small) - cv2.GaussianBlur(lattice, (0, 0), large)
        out = out[my : qh - my, mx : qw - mx]
        return out - np.float32(cv2.mean(out)[0])

    product = np.zeros((qh - 2 * my, qw - 2 * mx), np.float32)
    variance = 0.0
    for (ya, xa), (yb, xb) in _STRUCTURE_PAIRS:
        a, b = band(ya, xa), band(yb, xb)
        product += a * b
        variance += (float(cv2.mean(cv2.multiply(a, a))[0]) + float(cv2.mean(cv2.multiply(b, b))[0])) / 2
    product *= np.float32(1 / len(_STRUCTURE_PAIRS))
    variance /= len(_STRUCTURE_PAIRS)
    covariance = float(cv2.mean(product)[0])
    # The standard error of that covariance where there is no structure (independent band-passed noise on
    # the two lattices): noise variance over the number of independent samples.
    noise = max(variance - covariance, 0.0)
    error = noise * math.sqrt(_STRUCTURE_NOISE_AREA / (product.size * len(_STRUCTURE_PAIRS)))
    return math.sqrt(max(covariance - _STRUCTURE_NOISE_LEAK * noise + _STRUCTURE_CONFIDENCE * error, 0.0))


def image_metrics(
    rgb: np.ndarray, *, original_size: tuple[int, int], source_mode: str | None, working_long_side: int = 512
) -> dict:
    """All metrics and both hashes of one decoded RGB image (see ROW_COLUMNS for the names).

    Every statistic is a cv2 reduction (meanStdDev, countNonZero, masked mean) or a histogram: the
    decode is the floor of this stage, and these keep the metrics well below it.
    """
    width, height = original_size
    work = np.ascontiguousarray(working_copy(rgb, working_long_side))
    n_px = work.shape[0] * work.shape[1]
    pil_rgb = Image.fromarray(work)
    pil_gray = pil_rgb.convert("L")  # PIL's luma, the grey imagehash would compute: one conversion for both
    gray = np.asarray(pil_gray)

    # CIELAB on float input: L* in 0..100 and a*, b* in their own units (uint8 Lab would quantise L* to 0.4).
    work_f = work.astype(np.float32)
    lab = cv2.cvtColor(work_f * np.float32(1 / 255), cv2.COLOR_RGB2Lab)
    lightness, a_star, _ = cv2.split(lab)
    # Percentiles come from every second pixel of every second row (~49k of a 512 x 384 copy): the
    # sampling error of a 1st-99th percentile at that size is far below the bin width, at a quarter of the
    # cost. Means, fractions and the skin mask use every pixel.
    every_other = (slice(None, None, 2), slice(None, None, 2))
    l_p05, l_med, l_p95 = binned_percentiles(lightness[every_other], (5, 50, 95), lo=0, hi=100, step=0.05)
    l_mean, l_std = (float(v[0, 0]) for v in cv2.meanStdDev(lightness))

    # Skin area: not near-black or near-white, and in the warm/neutral half of the a*b* plane (skin,
    # erythema, crusts, scale); a blue shirt or green wall is not skin. The lesion itself must stay in,
    # so the test is one-sided (no "far from the median chroma" cut, which would drop the redness).
    skin = cv2.inRange(lab, (1.0, -8.0, -8.0), (98.0, 200.0, 200.0))
    skin_fraction = cv2.countNonZero(skin) / n_px
    if skin_fraction < 0.05:  # e.g. an almost black frame: judge the whole frame rather than nothing
        skin = np.full_like(skin, 255)
    a_med, a_p99 = binned_percentiles(a_star[every_other], (50, 99), lo=-128, hi=128, step=0.05, mask=skin[every_other])
    redness = cv2.mean(a_star, mask=skin)[0]
    skin_r, skin_g, skin_b, _ = cv2.mean(work, mask=skin)

    # Sharpness: the classic variance of the Laplacian of the grey working copy.
    laplacian_std = float(cv2.meanStdDev(cv2.Laplacian(gray, cv2.CV_32F))[1][0, 0])
    # Texture: the steepest 1 % of local lightness change, in L* per pixel after a light smoothing (sigma
    # 1 px drops pixel noise, keeps lesion-scale structure). L* is already brightness-normalised (cube
    # root of luminance: equal steps look equal at any exposure), which is what a dark image needs;
    # dividing by the brightness again would blow up the noise of dark frames (measured: it no longer
    # separated dark from dark-but-diagnostic frames).
    smooth = cv2.GaussianBlur(lightness, (0, 0), 1.0)
    gradient = cv2.magnitude(cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3))
    # A 3x3 Sobel weighs a one-pixel step by 8: bins of 0.08 are 0.01 L* per pixel.
    texture = float(binned_percentiles(gradient[every_other], (99,), lo=0, hi=600, step=0.08)[0]) / 8

    # Structure, relative to the frame's mean grey level (mottling and skin relief are multiplicative, so
    # the same skin gives the same percentage at every exposure and Monk tone).
    gray_f = gray.astype(np.float32)
    structure = 100 * coherent_band_std(gray_f) / max(float(cv2.mean(gray_f)[0]), 1.0)

    channels = cv2.split(work)
    # numpy comparisons, not cv2.compare: OpenCV reads a 1 x 1 (or 1 x 4) image as a scalar and fails.
    blown = (cv2.max(cv2.max(channels[0], channels[1]), channels[2]) >= 250) | (lightness > 97.0)

    # cleanvision's raw properties, same formulas as cleanvision.issue_managers.image_property (written
    # out here: importing cleanvision costs ~1 s per worker process and pulls matplotlib, and its
    # np.percentile calls on int64 copies would cost more than all our metrics together).
    squares = cv2.multiply(work_f, work_f)
    cv_pixel_brightness = cv2.sqrt(cv2.transform(squares, np.array([[0.241, 0.691, 0.068]], np.float32)))
    cv_p5, cv_p99 = binned_percentiles(cv_pixel_brightness[every_other], (5, 99), lo=0, hi=255, step=0.01) / 255
    r_mean, g_mean, b_mean, _ = cv2.mean(work)  # what ImageStat.Stat(image).mean gives, at a quarter of the cost
    cv_brightness = math.sqrt(0.241 * r_mean**2 + 0.691 * g_mean**2 + 0.068 * b_mean**2) / 255
    cv_entropy = _shannon_entropy(np.asarray(pil_rgb.histogram()))  # = PIL Image.entropy(): 768 bins
    # Blurriness: cleanvision shrinks to 64 px with PIL's default filter, then FIND_EDGES on grey. We let
    # PIL box-reduce first (reducing_gap): a third of the cost, and the same picture at 64 px.
    ratio = max(work.shape[1], work.shape[0]) / _CV_BLURRY_MAX_RESOLUTION
    small = (
        pil_rgb.resize((max(int(work.shape[1] // ratio), 1), max(int(work.shape[0] // ratio), 1)), reducing_gap=2.0)
        if ratio > 1
        else pil_rgb
    )
    small_gray = small.convert("L")
    cv_blurriness = math.sqrt(ImageStat.Stat(small_gray.filter(ImageFilter.FIND_EDGES)).var[0])
    cv_gray_std = float(np.std(small_gray.histogram()))
    aspect = min(width / height, height / width)
    is_grey_file = source_mode in ("L", "L;16", "LA", "LA;16")

    return {
        "aspect_ratio": aspect,
        "brightness_mean": l_mean,
        "brightness_p05": float(l_p05),
        "brightness_median": float(l_med),
        "brightness_p95": float(l_p95),
        "contrast": l_std,
        "underexposed_fraction": int(np.count_nonzero(lightness < 5.0)) / n_px,
        "overexposed_fraction": int(np.count_nonzero(blown)) / n_px,
        "sharpness": laplacian_std**2,
        "texture": texture,
        "redness": float(redness),
        "redness_contrast": float(a_p99 - a_med),
        "entropy": _shannon_entropy(np.asarray(pil_gray.histogram())),
        "structure": structure,
        "skin_fraction": float(skin_fraction),
        "skin_mean_r": float(skin_r),
        "skin_mean_g": float(skin_g),
        "skin_mean_b": float(skin_b),
        "cv_brightness": cv_brightness,
        "cv_brightness_perc_5": float(cv_p5),
        "cv_brightness_perc_99": float(cv_p99),
        "cv_entropy": cv_entropy,
        "cv_blurriness": cv_blurriness,
        "cv_blurriness_grayscale_std": cv_gray_std,
        "cv_size": math.sqrt(width) * math.sqrt(height),
        **_cleanvision_image_scores(cv_p99, cv_p5, cv_entropy, cv_blurriness, cv_gray_std, aspect, is_grey_file),
        "phash": hash_to_uint64(imagehash.phash(pil_gray)),
        "dhash": hash_to_uint64(imagehash.dhash(pil_gray)),
        # A 256-bit dHash (hex) to verify 64-bit candidates: it keeps the detail that tells two plain-skin
        # photos apart, where the 64-bit hashes encode little beyond the lighting (see core.dedup).
        "dhash256": str(imagehash.dhash(pil_gray, hash_size=16)),
        # Crop pHashes and ORB keypoints (bytes, ~5 KB): core.dedup's near-duplicate search, which survives
        # re-uploads (crops, rescaling, brightness, JPEG); see core.near_duplicates.
        "near_duplicate_descriptor": (
            near_duplicates.image_descriptor(gray) if min(gray.shape[:2]) >= near_duplicates.MIN_SIDE_PX else None
        ),
    }


def _cleanvision_image_scores(perc_99, perc_5, entropy, blurriness, gray_std, aspect, is_grey_file) -> dict:
    # The per-image score formulas of cleanvision 0.3.7 (BrightnessProperty, EntropyProperty,
    # BlurrinessProperty, AspectRatioProperty, ColorSpaceProperty .get_scores) with its default parameters;
    # the tests recompute them with cleanvision's own classes (scin_pipeline_tests/core/cleanvision_check.py)
    # and check that they agree.
    blur = 1 - math.exp(-blurriness * _CV_BLURRY_NORMALIZING)
    std_score = 1 - math.exp(-gray_std * _CV_BLURRY_NORMALIZING)
    if std_score <= _CV_BLURRY_COLOR_THRESHOLD:
        std_score = 0.0
    return {
        "dark_score": float(perc_99),
        "light_score": float(1 - perc_5),
        "blurry_score": float(min(blur + std_score, 1.0)),
        "low_information_score": float(min(entropy * _CV_LOW_INFORMATION_NORMALIZING, 1.0)),
        "odd_aspect_ratio_score": float(aspect),
        # cleanvision flags an image whose PIL mode is "L"; we also count 16-bit and alpha grey files.
        "grayscale_score": 0.0 if is_grey_file else 1.0,
    }


def _failed_row(image_id: str, status: str, reason: str | None, decoded=None) -> dict:
    row: dict[str, object] = {col: np.nan for col in METRIC_COLUMNS}
    row.update(
        image_id=image_id,
        decode_status=status,
        decode_reason=reason,
        width=getattr(decoded, "width", None),
        height=getattr(decoded, "height", None),
        bytes=getattr(decoded, "bytes", None),
        format=getattr(decoded, "format", None),
        source_mode=getattr(decoded, "source_mode", None),
        phash=None,
        dhash=None,
        dhash256=None,
        near_duplicate_descriptor=None,
    )
    return {col: row[col] for col in ROW_COLUMNS}


def _training_tensors(rgb: np.ndarray, sizes: tuple[int, ...]) -> tuple[dict[int, np.ndarray] | None, str | None]:
    try:
        return {int(size): preprocess_image(rgb, int(size)) for size in sizes}, None
    except Exception as err:  # noqa: BLE001 - the metrics may still be good; the reason says what failed
        return None, f"tensor_failed: preprocessing failed: {type(err).__name__}: {err}"


def assess_image(image_id: str, path: str | os.PathLike | None, config: QualityConfig = QualityConfig()) -> dict:
    """One flat row (ROW_COLUMNS) for one image: decode once, then every metric and both hashes.

    Never raises: a file that cannot be decoded gives its decode status and reason with empty metrics; a
    failure while computing metrics (a bug, not the file's fault) gives ``unreadable`` with the error text.
    ``path`` None means there is no local file (the fetch stage reported it missing).

    With ``config.tensor_sizes``, the same decode also gives the training tensors (the pipeline decodes
    each image once): the row carries ``TENSORS_KEY`` ({size: uint8 array}, from the full-size pixels,
    exactly what ``core.image_cache.preprocess_image_file`` gives) or ``TENSOR_ERROR_KEY``. The file is
    then decoded at full size and halved as OpenCV's reduced decode would (``halve_as_reduced_decode``,
    bit-identical), so the metrics are the same as without tensors.
    """
    if path is None:
        return _failed_row(image_id, "missing", f"image {image_id}: no local file")
    sizes = tuple(config.tensor_sizes)
    # With tensors to make, a full-size decode (halved below for the metrics); else the decoder may halve.
    reduce_for = None if sizes else config.working_long_side
    decoded = decode_image(path, max_pixels=config.max_pixels, min_long_side=reduce_for)
    if not decoded.ok:
        return _failed_row(image_id, decoded.status, decoded.reason, decoded)
    # ok means decoded: the pixels and their size are set (DecodedImage keeps them optional for failures)
    assert decoded.rgb is not None and decoded.width is not None and decoded.height is not None
    rgb = decoded.rgb
    extra: dict = {}
    if sizes:
        tensors, error = _training_tensors(rgb, sizes)
        extra = {TENSORS_KEY: tensors, TENSOR_ERROR_KEY: error}
        if reduced_decode_applies(decoded.format, decoded.width, decoded.height, config.working_long_side):
            rgb = halve_as_reduced_decode(rgb)
    try:
        metrics = image_metrics(
            rgb,
            original_size=(decoded.width, decoded.height),
            source_mode=decoded.source_mode,
            working_long_side=config.working_long_side,
        )
    except Exception as err:  # noqa: BLE001 - one image must never stop the run; the reason says what failed
        return _failed_row(
            image_id,
            "unreadable",
            f"{path}: decoded, but computing metrics failed: {type(err).__name__}: {err}",
            decoded,
        )
    row = dict(
        image_id=image_id,
        decode_status="ok",
        decode_reason=None,
        width=decoded.width,
        height=decoded.height,
        bytes=decoded.bytes,
        format=decoded.format,
        source_mode=decoded.source_mode,
        **metrics,
    )
    return {**{col: row[col] for col in ROW_COLUMNS}, **extra}


# --------------------------------------------------------------------------------------------------------
# Many images: worker processes, streaming, in order, surviving worker crashes
# --------------------------------------------------------------------------------------------------------

AssessOne = Callable[[str, "str | None", QualityConfig], dict]


def _worker_init(max_pixels: int) -> None:
    pixel_limit_guard(max_pixels)
    cv2.setNumThreads(1)  # one image per process: OpenCV's own threads would only fight the other workers


def _worker_ready() -> bool:
    return True


def _assess_chunk(chunk: list[tuple[str, str | None]], config: QualityConfig, assess_one: AssessOne) -> list[dict]:
    return [assess_one(image_id, path, config) for image_id, path in chunk]


def _crashed_row(image_id: str, path, detail: str) -> dict:
    return _failed_row(image_id, "unreadable", f"{path}: the worker process died while reading this file ({detail})")


def assess_images(
    items: Iterable[tuple[str, str | None]],
    *,
    config: QualityConfig = QualityConfig(),
    workers: int | None = None,
    chunksize: int = 8,
    assess_one: AssessOne = assess_image,
) -> Iterator[dict]:
    """assess_image over many (image_id, path) pairs in worker processes; rows come back in input order.

    - Streaming: ``items`` is consumed lazily and at most ``3 * workers`` chunks of ``chunksize`` items
      are in flight, so memory does not grow with the number of images (no list of all images or rows).
    - Processes are started with ``spawn``: safe when the parent has threads (Dagster, gRPC), the same on
      Linux and macOS; it costs about a second of start-up per worker per call.
    - A worker that dies (a decoder segfault, the OOM killer) breaks the pool; the chunks in flight are
      retried one item at a time in a fresh pool, and an item that kills its worker again is reported as
      ``unreadable`` with the reason, so one poisoned file never stops the run.
    - ``workers`` 0 runs in this process (no isolation; for debugging). ``assess_one`` is the per-item
      function run in the workers (module-level so that it pickles); tests substitute one that crashes.
    """
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers <= 0:
        for image_id, path in items:
            yield assess_one(image_id, path, config)
        return

    context = multiprocessing.get_context("spawn")

    def new_pool(*, check: bool = False) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=_worker_init, initargs=(config.max_pixels,)
        )
        if check:
            # After a crash, a fresh pool must first run a no-op: if even that dies, the workers cannot
            # start at all (e.g. a script without the ``if __name__ == "__main__"`` guard that spawn
            # needs), and blaming the next image would wrongly mark every file unreadable.
            try:
                pool.submit(_worker_ready).result()
            except BrokenProcessPool as err:
                pool.shutdown(wait=False, cancel_futures=True)
                raise RuntimeError(f"quality worker processes cannot start: {err}") from err
        return pool

    def chunks() -> Iterator[list[tuple[str, str | None]]]:
        chunk: list[tuple[str, str | None]] = []
        for image_id, path in items:
            chunk.append((str(image_id), None if path is None else str(path)))
            if len(chunk) == chunksize:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    pending = chunks()
    in_flight: deque = deque()  # (chunk, future), oldest first
    max_in_flight = 3 * workers
    pool = new_pool()
    try:
        while True:
            while len(in_flight) < max_in_flight:
                chunk = next(pending, None)
                if chunk is None:
                    break
                in_flight.append((chunk, pool.submit(_assess_chunk, chunk, config, assess_one)))
            if not in_flight:
                return
            chunk, future = in_flight.popleft()
            try:
                rows = future.result()
            except BrokenProcessPool:
                # Every chunk in flight may be lost; keep the ones that finished, redo the rest item by item.
                pool.shutdown(wait=False, cancel_futures=True)
                survivors = [(chunk, future)] + list(in_flight)
                in_flight.clear()
                pool = new_pool(check=True)
                for lost_chunk, lost_future in survivors:
                    done_ok = lost_future.done() and not lost_future.cancelled() and lost_future.exception() is None
                    if done_ok:
                        yield from lost_future.result()
                        continue
                    for image_id, path in lost_chunk:
                        single = pool.submit(_assess_chunk, [(image_id, path)], config, assess_one)
                        try:
                            yield from single.result()
                        except BrokenProcessPool as err:
                            pool.shutdown(wait=False, cancel_futures=True)
                            pool = new_pool(check=True)
                            yield _crashed_row(image_id, path, f"{type(err).__name__}: {err}")
                continue
            yield from rows
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def assessments_frame(rows: Iterable[dict]) -> pd.DataFrame:
    """Rows of assess_image as a typed table: hashes as nullable UInt64, ids as strings."""
    frame = pd.DataFrame(list(rows), columns=list(ROW_COLUMNS))
    for col in ("phash", "dhash"):
        frame[col] = pd.array(
            [None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v) for v in frame[col]],
            dtype="UInt64",
        )
    for col in ("width", "height", "bytes"):
        frame[col] = pd.array(
            [None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v) for v in frame[col]],
            dtype="Int64",
        )
    frame["image_id"] = frame["image_id"].astype(str)
    for col in METRIC_COLUMNS:
        frame[col] = frame[col].astype(float)
    return frame


# --------------------------------------------------------------------------------------------------------
# The rule
# --------------------------------------------------------------------------------------------------------


def monk_tone_per_image(images: pd.DataFrame, cases: pd.DataFrame) -> pd.Series:
    """image_id -> Monk skin tone of its case (US graders, else India graders); a file shared by several
    cases takes the first known tone. The ``monk_tone`` that :func:`decide_quality` judges darkness by."""
    tones = cases.set_index("case_id")
    tone = (
        tones["monk_skin_tone_label_us"].astype("Float64").fillna(tones["monk_skin_tone_label_india"].astype("Float64"))
    )
    per_ref = images[["image_id", "case_id"]].dropna().assign(tone=lambda f: f["case_id"].map(tone))
    return per_ref.dropna(subset=["tone"]).groupby("image_id")["tone"].first()


def expected_lightness(monk_tone: pd.Series, metrics: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """(expected L* of each image's skin, where it came from) for the dark rule.

    The Monk swatch lightness of the case's tone; when the tone is unknown, the population median of the
    decoded images' median lightness (the typical photo of this set). That fallback can call a
    well-exposed photo of deep skin dark, which is why the source is reported per row.
    """
    tones = pd.to_numeric(monk_tone.reindex(metrics.index), errors="coerce")
    expected = tones.map(MONK_SWATCH_LIGHTNESS).astype(float)
    ok = metrics["decode_status"] == "ok"
    population = float(metrics.loc[ok, "brightness_median"].median()) if ok.any() else float("nan")
    source = pd.Series(np.where(expected.notna(), "monk_tone", "population_median"), index=metrics.index)
    return expected.fillna(population), source


def decide_quality(
    metrics: pd.DataFrame, monk_tone: pd.Series | None, config: QualityConfig = QualityConfig()
) -> pd.DataFrame:
    """keep / reason for each row of an assessments table (see the module docstring for the rule).

    ``monk_tone`` (1-10, missing = unknown) is aligned on the index of ``metrics``; None = all unknown.
    Columns: image_id, keep, reason (None when kept), dark_relative (median L* / expected L* of the
    skin), expected_lightness, expected_lightness_source, dark_but_diagnostic (dark yet kept because
    texture or redness is visible).
    """
    if monk_tone is None:
        monk_tone = pd.Series(np.nan, index=metrics.index)
    expected, source = expected_lightness(monk_tone, metrics)
    status = metrics["decode_status"].astype(str)
    ok = status == "ok"
    dark_relative = metrics["brightness_median"].astype(float) / expected.clip(lower=1.0)

    def column(name: str) -> pd.Series:  # a table from before a metric existed reads as NaN (not judged)
        values = metrics[name] if name in metrics else pd.Series(np.nan, index=metrics.index)
        return pd.to_numeric(values, errors="coerce").astype(float)

    long_side = np.maximum(column("width"), column("height"))
    too_small = ok & (long_side < config.min_long_side_px)
    overexposed = ok & ~too_small & (metrics["overexposed_fraction"] > config.overexposed_fraction_max)
    dark = ok & ~too_small & ~overexposed & (dark_relative < config.dark_relative_min)
    visible = (metrics["texture"] >= config.diagnostic_texture_min) | (
        metrics["redness_contrast"] >= config.diagnostic_redness_min
    )
    flat = column("structure") < config.low_information_structure_min  # NaN (tiny, or an old table): not flat
    dark_diagnostic = dark & visible & ~flat
    low_information = (
        ok & ~too_small & ~overexposed & ((~dark & (metrics["entropy"] < config.low_information_entropy_min)) | flat)
    )
    # A dark image kept for its visible texture or redness is not judged blurry or low in entropy: its
    # darkness explains both, and the visible lesion is the evidence the rule asks for. It must still have
    # structure: on a flat dark frame, what looks like texture is the sensor noise.
    blurry = ok & ~too_small & ~overexposed & ~dark & (metrics["sharpness"] < config.blurry_sharpness_min)

    reason = pd.Series(None, index=metrics.index, dtype=object)
    reason[~ok] = status[~ok]
    reason[too_small] = "too_small"
    reason[overexposed] = "overexposed"
    reason[dark & ~visible] = "dark"
    reason[low_information & reason.isna()] = "low_information"
    reason[blurry & reason.isna()] = "blurry"
    reason = reason.where(reason.notna(), None)  # pyright: ignore[reportArgumentType]  # pandas-stubs omit None as `other`; pandas turns the unset entries into NaN; kept means None
    return pd.DataFrame(
        {
            "image_id": metrics["image_id"],
            "keep": reason.isna(),
            "reason": reason,
            "dark_relative": dark_relative.where(ok),
            "expected_lightness": expected,
            "expected_lightness_source": source,
            "dark_but_diagnostic": dark_diagnostic,
        },
        index=metrics.index,
    )


# --------------------------------------------------------------------------------------------------------
# Measuring the rule
# --------------------------------------------------------------------------------------------------------


def derm_ungradable_by_monk_tone(references: pd.DataFrame, dropped: pd.Series) -> pd.DataFrame:
    """Per Monk tone (1-10, and "missing"): the image references that passed image quality
    (``n_refs_quality_kept``), those of them dropped because their case is not dermatologist-gradable
    (``n_refs_derm_ungradable``) and that share (``rate_refs_derm_ungradable``).

    ``references``: one row per image reference with ``keep`` (image quality passed) and the case's
    ``monk_skin_tone_label_us`` / ``_india``; a reference's tone is the US graders', else the India graders'
    (as :func:`monk_tone_per_image`). ``dropped``: True where the gradability filter removed the reference
    (all False when the filter is off). Gradability is a per-case filter, so this counts references, not
    distinct files like :func:`exclusion_rates_by_monk_tone`."""
    tone = (
        references["monk_skin_tone_label_us"]
        .astype("Float64")
        .fillna(references["monk_skin_tone_label_india"].astype("Float64"))
    )
    label = tone.map(lambda t: MISSING_GROUP if pd.isna(t) else str(int(t)))
    quality_kept = references["keep"].fillna(False).astype(bool)
    dropped = dropped.reindex(references.index).fillna(False).astype(bool) & quality_kept
    rows = []
    for value in [str(t) for t in range(1, 11)] + [MISSING_GROUP]:
        in_tone = (label == value).to_numpy()
        if not in_tone.any():
            continue
        n_kept, n_dropped = int(quality_kept[in_tone].sum()), int(dropped[in_tone].sum())
        rows.append(
            {
                "monk_tone": value,
                "n_refs_quality_kept": n_kept,
                "n_refs_derm_ungradable": n_dropped,
                "rate_refs_derm_ungradable": n_dropped / n_kept if n_kept else float("nan"),
            }
        )
    return pd.DataFrame(
        rows, columns=["monk_tone", "n_refs_quality_kept", "n_refs_derm_ungradable", "rate_refs_derm_ungradable"]
    )


def exclusions_by_monk_tone(per_file: pd.DataFrame, ungradable: pd.DataFrame) -> pd.DataFrame:
    """The per-Monk exclusion table: :func:`exclusion_rates_by_monk_tone`'s file columns, then
    :func:`derm_ungradable_by_monk_tone`'s reference columns, one row per tone either has (counts 0 where
    a tone has files but no reference, or the reverse)."""
    merged = per_file.merge(ungradable, on="monk_tone", how="outer")
    order = {value: i for i, value in enumerate([str(t) for t in range(1, 11)] + [MISSING_GROUP])}
    merged = merged.sort_values("monk_tone", key=lambda c: c.map(order)).reset_index(drop=True)
    counts = ["n", "n_excluded", "n_refs_quality_kept", "n_refs_derm_ungradable"]
    merged[counts] = merged[counts].fillna(0).astype("int64")
    return merged


def exclusion_rates_by_monk_tone(decisions: pd.DataFrame, monk_tone: pd.Series) -> pd.DataFrame:
    """Per Monk tone (1-10, and "missing"): n, n_excluded, rate, and rate_<reason> for each reason seen."""
    tone = pd.to_numeric(monk_tone.reindex(decisions.index), errors="coerce")
    label = tone.map(lambda t: MISSING_GROUP if pd.isna(t) else str(int(t)))
    reasons = sorted(r for r in decisions["reason"].dropna().unique())
    rows = []
    order = [str(t) for t in range(1, 11)] + [MISSING_GROUP]
    for value in [v for v in order if (label == v).any()]:
        group = decisions[label == value]
        excluded = ~group["keep"].astype(bool)
        row = {"monk_tone": value, "n": len(group), "n_excluded": int(excluded.sum()), "rate": float(excluded.mean())}
        for reason in reasons:
            row[f"rate_{reason}"] = float((group["reason"] == reason).mean())
        rows.append(row)
    return pd.DataFrame(rows, columns=["monk_tone", "n", "n_excluded", "rate", *[f"rate_{r}" for r in reasons]])
