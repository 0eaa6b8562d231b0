"""Quality metrics, hashes, the keep/exclude rule (the dark rule in particular), and the parallel stage."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import cv2
import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.quality_calibration import threshold_sweep
from scin_pipeline.core import near_duplicates
from scin_pipeline.core.planted import planted_defect_scores
from scin_pipeline.core.quality import (
    MONK_SWATCH_LIGHTNESS,
    ROW_COLUMNS,
    QualityConfig,
    assess_image,
    assess_images,
    assessments_frame,
    decide_quality,
    derm_ungradable_by_monk_tone,
    exclusion_rates_by_monk_tone,
    exclusions_by_monk_tone,
    hash_to_uint64,
    monk_tone_per_image,
)
from scin_pipeline.core.schema import MISSING_GROUP, MONK_SKIN_TONE_HEX
from scin_pipeline.core.synthetic.lesions import render_skin_image
from scin_pipeline.core.synthetic.metadata import generate_synthetic_metadata
from scin_pipeline.core.synthetic.mirror import write_synthetic_mirror
from scin_pipeline_tests.core.cleanvision_check import cleanvision_scores, validate_against_cleanvision
from scin_pipeline_tests.core.hashes import uint64_to_hash, uint64_to_hex

SIZE = (160, 120)


def _save_png(path: Path, rgb: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    path.write_bytes(buf.tobytes())
    return str(path)


def _skin(key: str, tone: int, pattern: str = "none", size=SIZE) -> np.ndarray:
    return render_skin_image(key, tone, pattern, size, 0)


def _assess(tmp_path: Path, name: str, rgb: np.ndarray) -> dict:
    return assess_image(name, _save_png(tmp_path / f"{name}.png", rgb))


def _hamming(a, b) -> int:
    return bin(int(a) ^ int(b)).count("1")


def _darken(rgb: np.ndarray, factor: float) -> np.ndarray:
    return np.clip(rgb.astype(np.float32) * factor, 0, 255).astype(np.uint8)


def _with_red_lesion(rgb: np.ndarray) -> np.ndarray:
    # A bright, textured red patch, as under a close flash in an otherwise dark shot.
    out = rgb.copy()
    mask = np.zeros(rgb.shape[:2], np.uint8)
    cv2.ellipse(mask, (80, 60), (28, 20), 15, 0, 360, 255, -1)
    rng = np.random.default_rng(5)
    lesion = np.clip(np.array([190, 70, 70]) * (1 + 0.15 * rng.standard_normal(rgb.shape[:2]))[..., None], 0, 255)
    out[mask > 0] = lesion[mask > 0].astype(np.uint8)
    return out


# ----------------------------------------------------------------------------------------------------
# One image
# ----------------------------------------------------------------------------------------------------


def test_row_has_every_column_and_sane_values(tmp_path):
    row = _assess(tmp_path, "1", _skin("a", 3, "eczema_blotches"))
    assert list(row) == list(ROW_COLUMNS)
    assert row["decode_status"] == "ok" and row["decode_reason"] is None
    assert (row["width"], row["height"]) == SIZE
    assert 0 <= row["brightness_p05"] <= row["brightness_median"] <= row["brightness_p95"] <= 100
    assert 0 <= row["underexposed_fraction"] <= 1 and 0 <= row["overexposed_fraction"] <= 1
    assert isinstance(row["phash"], np.uint64) and isinstance(row["dhash"], np.uint64)
    assert row["aspect_ratio"] == pytest.approx(120 / 160)
    # The near-duplicate descriptor: crop pHashes, then ORB keypoints (core.near_duplicates reads it back).
    crop_hashes, keypoints = near_duplicates.split_descriptors([row["near_duplicate_descriptor"]])
    assert crop_hashes.shape == (1, len(near_duplicates.CROP_MARGINS))
    assert len(near_duplicates.decode_keypoints(keypoints[0])[0]) > 10


def test_darker_copy_has_lower_brightness(tmp_path):
    base = _skin("b", 4)
    bright = _assess(tmp_path, "bright", base)
    dark = _assess(tmp_path, "dark", _darken(base, 0.5))
    assert dark["brightness_mean"] < bright["brightness_mean"] - 10
    assert dark["brightness_p95"] < bright["brightness_p95"]
    assert dark["dark_score"] < bright["dark_score"]


def test_blurred_copy_has_lower_sharpness(tmp_path):
    base = _skin("c", 5, "psoriasis_plaques")
    sharp = _assess(tmp_path, "sharp", base)
    blurred = _assess(tmp_path, "blurred", cv2.GaussianBlur(base, (0, 0), 3))
    assert blurred["sharpness"] < sharp["sharpness"] / 5
    assert blurred["texture"] < sharp["texture"]


def test_saturated_copy_has_higher_overexposed_fraction(tmp_path):
    base = _skin("d", 2)
    normal = _assess(tmp_path, "normal", base)
    blown = _assess(tmp_path, "blown", np.clip(base.astype(np.float32) * 1.6, 0, 255).astype(np.uint8))
    assert blown["overexposed_fraction"] > 0.5 > normal["overexposed_fraction"]
    assert blown["light_score"] < normal["light_score"]


def test_grey_file_gets_the_grayscale_flag(tmp_path):
    colour = _skin("e", 3, "tinea_rings")
    grey = cv2.cvtColor(colour, cv2.COLOR_RGB2GRAY)
    grey_path = tmp_path / "grey.png"
    Image.fromarray(grey).save(grey_path)  # mode L, as cleanvision tests it
    assert assess_image("grey", str(grey_path))["grayscale_score"] == 0.0
    assert _assess(tmp_path, "colour", colour)["grayscale_score"] == 1.0


def test_redness_contrast_sees_a_red_lesion(tmp_path):
    plain = _assess(tmp_path, "plain", _skin("f", 3))
    lesion = _assess(tmp_path, "lesion", _with_red_lesion(_skin("f", 3)))
    assert lesion["redness_contrast"] > plain["redness_contrast"] + 10
    assert lesion["redness"] > plain["redness"]


def test_working_copy_makes_metrics_scale_invariant(tmp_path):
    big = _skin("g", 6, "eczema_blotches", size=(1600, 1200))
    half = cv2.resize(big, (800, 600), interpolation=cv2.INTER_AREA)
    a, b = _assess(tmp_path, "big", big), _assess(tmp_path, "half", half)
    for col in ("brightness_mean", "redness", "entropy", "overexposed_fraction", "texture"):
        assert a[col] == pytest.approx(b[col], abs=0.05 * max(1.0, abs(a[col])))
    assert _hamming(a["phash"], b["phash"]) <= 2


def test_blurry_rule_works_on_phone_sized_photos(tmp_path):
    # Blur as the synthetic mirror plants it (sigma 6 px at 480 px width), on a 1600 px photo.
    big = _skin("g2", 8, "tinea_rings", size=(1600, 1200))
    sharp = _assess(tmp_path, "sharp", big)
    blurred = _assess(tmp_path, "blurred", cv2.GaussianBlur(big, (0, 0), 6 * 1600 / 480))
    threshold = QualityConfig().blurry_sharpness_min
    assert blurred["sharpness"] < threshold < sharp["sharpness"]


@pytest.mark.parametrize(
    "content,status",
    [
        (b"", "empty_file"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 10, "truncated"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 100, "wrong_format"),
        (os.urandom(2000).replace(b"\x89", b"\x00").replace(b"\xff", b"\x00"), "corrupt"),
    ],
)
def test_decode_failures_give_a_row_with_the_reason_and_no_metrics(tmp_path, content, status):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    row = assess_image("bad", str(path))
    assert row["decode_status"] == status and str(path) in row["decode_reason"]
    assert np.isnan(row["brightness_mean"]) and row["phash"] is None
    assert row["near_duplicate_descriptor"] is None
    assert list(row) == list(ROW_COLUMNS)


def test_no_path_is_missing():
    row = assess_image("42", None)
    assert row["decode_status"] == "missing" and "42" in row["decode_reason"]


# ----------------------------------------------------------------------------------------------------
# Hashes
# ----------------------------------------------------------------------------------------------------


def test_hash_to_uint64_round_trips_and_matches_imagehash_hex():
    rng = np.random.default_rng(2)
    for _ in range(20):
        h = imagehash.ImageHash(rng.random((8, 8)) > 0.5)
        value = hash_to_uint64(h)
        assert isinstance(value, np.uint64)
        assert int(value) == int(str(h), 16)
        assert uint64_to_hex(value) == str(h)
        assert imagehash.hex_to_hash(uint64_to_hex(value)) == h
        assert uint64_to_hash(value) == h
    assert hash_to_uint64(imagehash.ImageHash(np.ones((8, 8), bool))) == np.uint64(2**64 - 1)


def test_hashes_identical_near_duplicate_and_unrelated(tmp_path):
    a = _skin("h1", 3, "eczema_blotches")
    crop = cv2.resize(a[3:117, 4:156], SIZE, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 80])
    near = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    rows = {
        name: _assess(tmp_path, name, img)
        for name, img in {
            "a": a,
            "a_again": a.copy(),
            "near": near,
            "other": _skin("h2", 3, "eczema_blotches"),
            "other_tone": _skin("h3", 8, "tinea_rings"),
        }.items()
    }
    assert rows["a"]["phash"] == rows["a_again"]["phash"] and rows["a"]["dhash"] == rows["a_again"]["dhash"]
    assert _hamming(rows["a"]["phash"], rows["near"]["phash"]) <= 8
    for other in ("other", "other_tone"):
        assert _hamming(rows["a"]["phash"], rows[other]["phash"]) >= 16


def test_phash_is_imagehash_phash_of_the_file(tmp_path):
    small = _save_png(tmp_path / "s.png", _skin("i", 4, "urticaria_wheals"))
    with Image.open(small) as im:
        assert assess_image("s", small)["phash"] == hash_to_uint64(imagehash.phash(im))
    big = _save_png(tmp_path / "b.png", _skin("i", 4, "urticaria_wheals", size=(1200, 900)))
    with Image.open(big) as im:  # ours hashes the 512 px working copy: the same picture, a bit or two apart
        assert _hamming(assess_image("b", big)["phash"], hash_to_uint64(imagehash.phash(im))) <= 3


# ----------------------------------------------------------------------------------------------------
# The rule
# ----------------------------------------------------------------------------------------------------


def _decide(rows: list[dict], tones: list) -> pd.DataFrame:
    frame = assessments_frame(rows)
    return decide_quality(frame, pd.Series(tones, index=frame.index, dtype="Int64"))


def test_monk_swatch_lightness_gets_darker():
    values = [MONK_SWATCH_LIGHTNESS[t] for t in range(1, 11)]
    assert values[0] == pytest.approx(94.1, abs=0.1) and values[-1] == pytest.approx(14.6, abs=0.1)
    assert values[3:] == sorted(values[3:], reverse=True)


def test_dark_image_excluded_and_dark_image_with_red_lesion_kept_as_diagnostic(tmp_path):
    skin = _skin("j", 2)
    rows = [
        _assess(tmp_path, "clean", skin),
        _assess(tmp_path, "dark", _darken(skin, 0.15)),
        _assess(tmp_path, "dark_lesion", _with_red_lesion(_darken(skin, 0.15))),
    ]
    out = _decide(rows, [2, 2, 2]).set_index("image_id")
    assert out.loc["clean", "keep"] and out.loc["clean", "reason"] is None
    assert not out.loc["dark", "keep"] and out.loc["dark", "reason"] == "dark"
    assert not out.loc["dark", "dark_but_diagnostic"]
    assert out.loc["dark_lesion", "keep"] and out.loc["dark_lesion", "dark_but_diagnostic"]
    assert out.loc["dark_lesion", "dark_relative"] < QualityConfig().dark_relative_min


def test_well_exposed_deep_skin_is_not_dark_but_the_same_pixels_on_monk_1_are(tmp_path):
    deep = _assess(tmp_path, "deep", _skin("k", 10))
    assert deep["brightness_median"] < 20  # a Monk 10 photo is dark in absolute terms
    out = _decide([deep, dict(deep, image_id="deep_as_monk_1")], [10, 1]).set_index("image_id")
    assert out.loc["deep", "keep"] and out.loc["deep", "dark_relative"] > 0.6
    assert out.loc["deep_as_monk_1", "reason"] == "dark"


def test_unknown_tone_falls_back_to_the_population_median(tmp_path):
    rows = [_assess(tmp_path, str(i), _skin(f"l{i}", 3)) for i in range(3)]
    rows.append(_assess(tmp_path, "dim", _darken(_skin("l9", 3), 0.15)))
    out = _decide(rows, [None, None, None, None]).set_index("image_id")
    assert (out["expected_lightness_source"] == "population_median").all()
    assert out.loc["dim", "reason"] == "dark" and out.loc[["0", "1", "2"], "keep"].all()


def test_every_decode_failure_is_excluded_with_its_status(tmp_path):
    files = {"empty": b"", "cut": b"\x89PNG\r\n\x1a\n\x00", "jpeg": b"\xff\xd8\xff\xe0\x00\x10"}
    rows = []
    for name, content in files.items():
        (tmp_path / f"{name}.png").write_bytes(content)
        rows.append(assess_image(name, str(tmp_path / f"{name}.png")))
    rows.append(assess_image("gone", None))
    out = _decide(rows, [1, 5, 9, None]).set_index("image_id")
    assert not out["keep"].any()
    assert out["reason"].to_dict() == {
        "empty": "empty_file",
        "cut": "truncated",
        "jpeg": "wrong_format",
        "gone": "missing",
    }


def test_overexposed_blurry_and_low_information_reasons(tmp_path):
    skin = _skin("m", 3, "psoriasis_plaques")
    flat = np.full((120, 160, 3), (200, 170, 150), np.uint8)
    rows = [
        _assess(tmp_path, "over", np.clip(skin.astype(int) * 2 + 40, 0, 255).astype(np.uint8)),
        _assess(tmp_path, "blur", cv2.GaussianBlur(skin, (0, 0), 4)),
        _assess(tmp_path, "flat", flat),
    ]
    out = _decide(rows, [3, 3, 3]).set_index("image_id")
    assert out["reason"].to_dict() == {"over": "overexposed", "blur": "blurry", "flat": "low_information"}


def _plain_skin_patch(tone: int, size=(480, 360), seed: int = 0, noise: float = 2.0) -> np.ndarray:
    """Plain skin without a lesion, drawn here (not by core/synthetic): the tone's swatch under a soft
    light ramp, multiplicative mottling of 1.2 % (two scales), redness varying by 1 a* unit, sensor noise."""
    rng = np.random.default_rng([seed, tone])
    w, h = size
    swatch = np.array([int(MONK_SKIN_TONE_HEX[tone][i : i + 2], 16) for i in (1, 3, 5)], np.float32)

    def smooth(cell: float) -> np.ndarray:
        small = rng.standard_normal((int(h / cell) + 2, int(w / cell) + 2)).astype(np.float32)
        field = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        return (field - field.mean()) / field.std()

    ramp = 1 - 0.08 * np.linspace(0, 1, w, dtype=np.float32)[None, :]
    shade = ramp * (1 + 0.012 * (smooth(w / 12) + smooth(w / 40)))
    rgb = shade[..., None] * swatch * np.float32(0.95)
    lab = cv2.cvtColor(np.clip(rgb, 0, 255) / 255, cv2.COLOR_RGB2Lab)
    lab[..., 1] += smooth(w / 20)
    rgb = cv2.cvtColor(lab, cv2.COLOR_Lab2RGB) * 255 + rng.normal(0, noise, (h, w, 3)).astype(np.float32)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def _flat_frame(colour, size=(480, 360), seed: int = 0, noise: float = 3.0, ramp: float = 0.12) -> np.ndarray:
    """One colour, a faint light ramp and vignette, sensor noise: a covered lens, a wall, a sleeve."""
    rng = np.random.default_rng(seed)
    w, h = size
    xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    shade = 1 - ramp * (xx + 1) / 2 - 0.06 * (xx * xx + yy * yy)
    rgb = shade[..., None] * np.asarray(colour, np.float32) + rng.normal(0, noise, (h, w, 3)).astype(np.float32)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("tone", [1, 2, 5, 8, 9, 10])
def test_plain_skin_without_lesion_is_kept_on_every_tone_light_and_deep(tmp_path, tone):
    rows = [
        _assess(tmp_path, f"plain{i}", _plain_skin_patch(tone, size, seed=i, noise=noise))
        for i, (size, noise) in enumerate([((480, 360), 2.0), ((360, 480), 4.0), ((1024, 768), 3.0)])
    ]
    rows.append(_assess(tmp_path, "demo", _skin("plain-demo", tone, "none", (480, 360))))
    out = _decide(rows, [tone] * len(rows)).set_index("image_id")
    assert out["keep"].all(), out[["reason"]].join(assessments_frame(rows).set_index("image_id")["structure"])


@pytest.mark.parametrize(
    "colour",
    [(8, 7, 6), (110, 35, 20), (200, 200, 195), (150, 170, 205), (30, 40, 110), (246, 237, 228), (41, 36, 32)],
    ids=["covered_lens", "finger_glow", "wall", "pastel_wall", "sleeve", "monk1_wall", "monk10_wall"],
)
def test_flat_frames_of_any_colour_are_low_information(tmp_path, colour):
    rows = [
        _assess(tmp_path, f"flat{i}", _flat_frame(colour, size, seed=i, noise=noise))
        for i, (size, noise) in enumerate([((480, 360), 1.0), ((360, 480), 6.0), ((1024, 768), 3.0)])
    ]
    # Judged against Monk 10, the darkest swatch: a flat frame in that very colour still shows no skin. A
    # covered lens is also dark, which comes first.
    out = _decide(rows, [10] * len(rows)).set_index("image_id")
    expected = {"dark", "low_information"} if max(colour) < 20 else {"low_information"}
    assert out["reason"].isin(expected).all(), out[["reason"]].join(
        assessments_frame(rows).set_index("image_id")["structure"]
    )


def test_flat_jpeg_frame_is_low_information_and_structure_ignores_noise_level(tmp_path):
    frames = {sigma: _flat_frame((180, 150, 130), (800, 600), seed=1, noise=sigma) for sigma in (1.0, 6.0)}
    rows = []
    for sigma, rgb in frames.items():
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
        (tmp_path / f"j{sigma}.jpg").write_bytes(buf.tobytes())
        rows.append(assess_image(f"j{sigma}", str(tmp_path / f"j{sigma}.jpg")))
    assert all(r["structure"] < QualityConfig().low_information_structure_min / 2 for r in rows)
    assert (_decide(rows, [4, 4])["reason"] == "low_information").all()


def test_a_dark_flat_frame_is_not_kept_as_diagnostic_for_its_noise(tmp_path):
    row = _assess(tmp_path, "lens", _flat_frame((12, 10, 9), noise=6.0))
    # Noisier sensors make the noise pass the texture test: what the rule sees then.
    row = dict(row, texture=2 * QualityConfig().diagnostic_texture_min)
    out = _decide([row], [1]).iloc[0]
    assert out["reason"] == "low_information" and not out["dark_but_diagnostic"]


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (2, 2), (1, 4), (40, 30), (159, 100)])
def test_tiny_and_degenerate_images_are_too_small_without_crashing(tmp_path, shape):
    w, h = shape
    rgb = np.full((h, w, 3), (180, 140, 120), np.uint8)
    row = _assess(tmp_path, "tiny", rgb)
    assert row["decode_status"] == "ok", row["decode_reason"]
    out = _decide([row], [3]).iloc[0]
    assert out["reason"] == "too_small" and not out["keep"]


def test_min_long_side_is_the_long_side_and_configurable(tmp_path):
    rows = [_assess(tmp_path, "wide", _skin("n1", 4, "psoriasis_plaques", (200, 120)))]
    rows.append(_assess(tmp_path, "tall", _skin("n2", 4, "psoriasis_plaques", (120, 200))))
    frame = assessments_frame(rows)
    tones = pd.Series([4, 4], index=frame.index)
    assert decide_quality(frame, tones)["keep"].all()  # 200 px long side >= 160
    strict = decide_quality(frame, tones, QualityConfig(min_long_side_px=224))
    assert (strict["reason"] == "too_small").all()


def test_too_small_and_low_information_are_reported_per_monk_tone(tmp_path):
    rows = [
        _assess(tmp_path, "tiny", _skin("o1", 9, size=(100, 75))),
        _assess(tmp_path, "flat", _flat_frame((41, 36, 32))),
        _assess(tmp_path, "plain", _plain_skin_patch(9)),
    ]
    frame = assessments_frame(rows)
    tones = pd.Series([9, 9, 9], index=frame.index)
    rates = exclusion_rates_by_monk_tone(decide_quality(frame, tones), tones).set_index("monk_tone")
    assert rates.loc["9", "n_excluded"] == 2
    assert rates.loc["9", "rate_too_small"] == pytest.approx(1 / 3)
    assert rates.loc["9", "rate_low_information"] == pytest.approx(1 / 3)


def test_threshold_sweep_is_monotone_and_rejects_unknown_fields(tmp_path, mirror):
    frame, plants = mirror
    sweep = threshold_sweep(frame, plants["monk_tone"], plants, "dark_relative_min", [0.1, 0.4, 0.9])
    flagged = sweep[sweep["planted"] == "dark"].set_index("value")["n_flagged"]
    assert flagged.is_monotonic_increasing
    with pytest.raises(ValueError):
        threshold_sweep(frame, plants["monk_tone"], plants, "no_such_threshold", [1])


def test_monk_tone_per_image_us_graders_then_india_first_known_tone_for_shared_files():
    cases = pd.DataFrame(
        {
            "case_id": ["c1", "c2", "c3", "c4"],
            "monk_skin_tone_label_us": pd.array([7, None, None, 2], dtype="Int8"),
            "monk_skin_tone_label_india": pd.array([3, 5, None, 9], dtype="Int8"),
        }
    )
    images = pd.DataFrame(
        {"image_id": ["10", "20", "30", "40", "40", "50", None], "case_id": ["c1", "c2", "c3", "c3", "c4", None, "c1"]}
    )
    tones = monk_tone_per_image(images, cases)
    # 10: US tone; 20: no US tone, India's; 30: no tone at all (absent); 40: shared by c3 (no tone) and c4,
    # takes the first KNOWN tone; 50 has no case.
    assert tones.to_dict() == {"10": 7, "20": 5, "40": 2}
    assert tones.index.name == "image_id" and str(tones.dtype) == "Float64"


def test_exclusion_rates_by_monk_tone():
    decisions = pd.DataFrame(
        {
            "image_id": list("abcdef"),
            "keep": [True, False, True, False, False, True],
            "reason": [None, "dark", None, "blurry", "dark", None],
        }
    )
    tones = pd.Series([1, 1, 9, 9, 9, None])
    out = exclusion_rates_by_monk_tone(decisions, tones).set_index("monk_tone")
    assert list(out.index) == ["1", "9", MISSING_GROUP]
    assert out.loc["1", "rate"] == 0.5 and out.loc["9", "n_excluded"] == 2
    assert out.loc["9", "rate_dark"] == pytest.approx(1 / 3) and out.loc["9", "rate_blurry"] == pytest.approx(1 / 3)
    assert out.loc[MISSING_GROUP, "rate"] == 0.0


# ----------------------------------------------------------------------------------------------------
# A synthetic mirror with planted defects, every Monk tone equally represented
# ----------------------------------------------------------------------------------------------------


def _balanced_tone_mirror(root: Path, n_cases: int, seed: int, size) -> pd.DataFrame:
    cases, labels = generate_synthetic_metadata(n_cases, seed)
    labels["monk_skin_tone_label_us"] = [str(1 + i % 10) for i in range(len(labels))]
    meta = root / "metadata"
    meta.mkdir(parents=True)
    cases.to_csv(meta / "scin_cases.csv", index=False)
    labels.to_csv(meta / "scin_labels.csv", index=False)
    mirror = write_synthetic_mirror(root / "mirror", metadata_dir=meta, seed=seed, image_size=size, defect_rate=0.5)
    plants = mirror.plants[mirror.plants["image_id"].astype(str) != ""].reset_index(drop=True)
    return plants.assign(path=[str(root / "mirror" / "dataset" / "images" / f"{i}.png") for i in plants["image_id"]])


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    plants = _balanced_tone_mirror(tmp_path_factory.mktemp("quality_mirror"), 120, 11, SIZE)
    items = [
        (i, None if planted == "missing" else p)
        for i, p, planted in plants[["image_id", "path", "planted"]].itertuples(index=False)
    ]
    frame = assessments_frame(assess_images(items, workers=2))
    return frame, plants


def test_precision_and_recall_per_planted_reason(mirror):
    frame, plants = mirror
    scores = planted_defect_scores(decide_quality(frame, plants["monk_tone"]), plants).set_index("planted")
    defects = scores.drop(index="clean")
    assert (defects["n_planted"] >= 10).all(), defects  # every kind is really there
    assert (defects["recall"] >= 0.9).all(), defects
    assert (defects.drop(index="dark_diagnostic")["precision"] >= 0.9).all(), defects


def test_clean_deep_skin_is_excluded_no_more_often_than_clean_light_skin(mirror):
    frame, plants = mirror
    decisions = decide_quality(frame, plants["monk_tone"])
    clean = plants["planted"] == "clean"
    rates = exclusion_rates_by_monk_tone(decisions[clean], plants.loc[clean, "monk_tone"]).set_index("monk_tone")
    n = rates["n"]
    excluded = rates["n_excluded"]
    deep = excluded.loc[["7", "8", "9", "10"]].sum() / n.loc[["7", "8", "9", "10"]].sum()
    light = excluded.loc[["1", "2", "3"]].sum() / n.loc[["1", "2", "3"]].sum()
    assert n.loc[["7", "8", "9", "10"]].sum() >= 20
    assert deep <= light


def test_mirror_rows_are_in_input_order_and_match_a_serial_run(mirror):
    frame, plants = mirror
    assert frame["image_id"].tolist() == plants["image_id"].astype(str).tolist()
    sample = plants.iloc[::25]
    serial = assessments_frame(assess_images(zip(sample["image_id"], sample["path"]), workers=0))
    parallel = frame.iloc[::25].reset_index(drop=True)
    pd.testing.assert_frame_equal(serial, parallel)


def test_cleanvision_scores_recompute_our_per_image_scores(mirror):
    frame, _ = mirror
    theirs = cleanvision_scores(frame)
    ok = frame[frame["decode_status"] == "ok"]
    assert len(theirs) == len(ok)
    for issue in ("dark", "light", "blurry", "low_information", "odd_aspect_ratio", "grayscale"):
        np.testing.assert_allclose(theirs[f"{issue}_score"], ok[f"{issue}_score"], atol=1e-9)
    assert theirs["odd_size_score"].between(0, 1).all()


# ----------------------------------------------------------------------------------------------------
# The parallel stage
# ----------------------------------------------------------------------------------------------------


def segfault_on_poison(image_id: str, path, config: QualityConfig) -> dict:
    """Run in the workers: dies like a crashing decoder would on a poisoned item."""
    if image_id.startswith("poison"):
        os.kill(os.getpid(), signal.SIGSEGV)
    return assess_image(image_id, path, config)


def test_a_worker_crash_marks_only_that_item_unreadable(tmp_path):
    path = _save_png(tmp_path / "x.png", _skin("n", 4))
    items = [(f"img{i}", path) for i in range(9)]
    items.insert(4, ("poison-1", path))
    rows = list(assess_images(items, workers=2, chunksize=2, assess_one=segfault_on_poison))
    assert [r["image_id"] for r in rows] == [i for i, _ in items]
    by_id = {r["image_id"]: r for r in rows}
    assert by_id["poison-1"]["decode_status"] == "unreadable"
    assert "worker process died" in by_id["poison-1"]["decode_reason"]
    assert all(r["decode_status"] == "ok" for r in rows if r["image_id"] != "poison-1")


def test_items_are_consumed_lazily(tmp_path):
    path = _save_png(tmp_path / "y.png", _skin("o", 6))
    consumed = 0

    def items():
        nonlocal consumed
        for i in range(1000):
            consumed += 1
            yield f"id{i}", path

    stream = assess_images(items(), workers=2, chunksize=2)
    first = next(stream)
    assert first["image_id"] == "id0"
    assert consumed <= 3 * 2 * 2 + 2  # the in-flight window, not the whole input
    stream.close()


def test_agreement_with_cleanvision_on_a_sample(tmp_path):
    # 640 x 480: ours works on the 512 px working copy, cleanvision on the full image.
    paths, rng = [], np.random.default_rng(4)
    patterns = ["eczema_blotches", "tinea_rings", "none", "psoriasis_plaques", "insect_bite_dots"]
    for i in range(30):
        img = _skin(f"p{i}", 1 + i % 10, patterns[i % 5], size=(640, 480))
        if i % 3 == 1:
            img = _darken(img, rng.uniform(0.1, 0.6))
        if i % 3 == 2:
            img = cv2.GaussianBlur(img, (0, 0), rng.uniform(1, 8))
        paths.append(_save_png(tmp_path / f"{i}.png", img))
    ours = assessments_frame(assess_images([(str(i), p) for i, p in enumerate(paths)], workers=0))
    report = validate_against_cleanvision(paths, ours).set_index("issue")
    assert report.loc["dark", "spearman"] > 0.8 and report.loc["blurry", "spearman"] > 0.8
    assert report.loc["dark", "flag_agreement"] >= 0.9 and report.loc["light", "flag_agreement"] >= 0.9
    assert (report["n"] == 30).all()


def test_binned_percentiles_agree_with_numpy_to_the_bin_width():
    from scin_pipeline.core.quality import binned_percentiles

    rng = np.random.default_rng(8)
    values = (rng.beta(2, 5, (300, 200)) * 100).astype(np.float32)
    q = (1, 5, 50, 95, 99)
    np.testing.assert_allclose(
        binned_percentiles(values, q, lo=0, hi=100, step=0.05), np.percentile(values, q), atol=0.05
    )
    mask = (values > 30).astype(np.uint8) * 255
    np.testing.assert_allclose(
        binned_percentiles(values, (50,), lo=0, hi=100, step=0.05, mask=mask),
        np.percentile(values[values > 30], 50),
        atol=0.05,
    )
    assert np.isnan(binned_percentiles(values, (50,), lo=0, hi=100, step=0.05, mask=np.zeros_like(mask))).all()


def test_the_written_out_swatch_lightness_is_what_opencv_computes():
    from scin_pipeline.core.quality import hex_lightness
    from scin_pipeline.core.schema import MONK_SKIN_TONE_HEX

    assert MONK_SWATCH_LIGHTNESS == {tone: hex_lightness(h) for tone, h in MONK_SKIN_TONE_HEX.items()}


def test_ungradable_exclusions_are_counted_per_monk_tone_beside_the_quality_ones():
    # References (one per row): tone US, else India; keep = image quality passed.
    references = pd.DataFrame(
        {
            "monk_skin_tone_label_us": pd.array([9, 9, 9, None, 2, None], dtype="Int8"),
            "monk_skin_tone_label_india": pd.array([1, None, None, 9, None, None], dtype="Int8"),
            "keep": [True, True, False, True, True, True],
        }
    )
    # Dropped as dermatologist-ungradable: two deep-tone references (one found through the India tone) and
    # the quality-excluded one, which the gradability filter never saw (not counted).
    dropped = pd.Series([True, False, True, True, False, False])
    ungradable = derm_ungradable_by_monk_tone(references, dropped).set_index("monk_tone")
    assert list(ungradable.index) == ["2", "9", MISSING_GROUP]
    assert ungradable.loc["9", "n_refs_quality_kept"] == 3 and ungradable.loc["9", "n_refs_derm_ungradable"] == 2
    assert ungradable.loc["9", "rate_refs_derm_ungradable"] == pytest.approx(2 / 3)
    assert ungradable.loc["2", "n_refs_derm_ungradable"] == 0
    files = exclusion_rates_by_monk_tone(
        pd.DataFrame({"keep": [True, False, True], "reason": [None, "dark", None]}), pd.Series([1, 9, None])
    )
    table = exclusions_by_monk_tone(files, ungradable.reset_index()).set_index("monk_tone")
    # One row per tone either stage saw, in tone order; the file counts of tone 2 (no file) are 0.
    assert list(table.index) == ["1", "2", "9", MISSING_GROUP]
    assert table.loc["9", "n_excluded"] == 1 and table.loc["9", "n_refs_derm_ungradable"] == 2
    assert table.loc["2", "n"] == 0 and table.loc["1", "n_refs_derm_ungradable"] == 0
    assert table["n_refs_derm_ungradable"].sum() == 2


@pytest.mark.parametrize("size", [(1300, 975), (641, 480)])  # halved by the decoder, and not
def test_training_tensors_come_from_the_same_decode_without_moving_any_metric(tmp_path, size):
    from scin_pipeline.core.image_cache import TENSORS_KEY, preprocess_image_file

    path = _save_png(tmp_path / "1.png", render_skin_image("t", 8, "psoriasis_plaques", size, 0))
    plain = assess_image("1", path)
    with_tensors = assess_image("1", path, QualityConfig(tensor_sizes=(64, 224)))
    tensors = with_tensors.pop(TENSORS_KEY)
    assert with_tensors.pop("tensor_error") is None
    assert set(with_tensors) == set(plain) == set(ROW_COLUMNS)
    for column in ROW_COLUMNS:  # bit-identical metrics, hashes and descriptor
        assert with_tensors[column] == plain[column] or (
            isinstance(plain[column], float) and np.isnan(plain[column]) and np.isnan(with_tensors[column])
        ), column
    assert sorted(tensors) == [64, 224]
    for side, tensor in tensors.items():  # what image_tensors' own decode + resize gave before
        assert np.array_equal(tensor, preprocess_image_file(path, side))


def test_failed_decodes_carry_no_tensors(tmp_path):
    path = tmp_path / "2.png"
    path.write_bytes(b"")
    row = assess_image("2", str(path), QualityConfig(tensor_sizes=(64,)))
    assert row["decode_status"] == "empty_file" and "tensors" not in row
