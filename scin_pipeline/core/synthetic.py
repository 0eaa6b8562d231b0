"""A synthetic stand-in for the SCIN bucket, laid out exactly like ``gs://dx-scin-public-data``.

No SCIN photograph can be reached offline, so the demo and the tests run on a *synthetic mirror*::

    <root>/dataset/scin_cases.csv        real rows (verbatim subset) or generated rows, same columns
    <root>/dataset/scin_labels.csv
    <root>/dataset/images/<int64>.png    one synthetic image per image reference
    <root>/SYNTHETIC_DATA.md             marker: its presence says "these images are not SCIN photographs"
    <root>/synthetic_plants.csv          ground truth of what was planted, one row per image file

Images are drawn, not photographed: a skin-coloured background whose colour is the case's Monk Skin Tone
swatch (US label, else India label, else tone 3), with a lighting gradient, mottling and fine texture, plus
a lesion pattern chosen by the case's top weighted condition (argmax of ``weighted_skin_condition_label``,
ties broken by name), see ``CONDITION_PATTERNS``. Lesion colours are derived from the skin colour (erythema
on deep skin is a darker red-brown, not bright red), placement and scale are random per image, and every
image is seeded by (seed, image_id), so the whole mirror is a pure function of its arguments.

Planted problems (``synthetic_plants.csv`` column ``planted``; ``clean`` for ordinary images). The
``defect_rate`` share of image files is split equally over the ten kinds in ``DEFECT_KINDS``; when a mirror
has >= 60 distinct image files (and defect_rate > 0) every kind is planted at least once:

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

Columns of ``synthetic_plants.csv``: image_id, image_path, case_id (the first case referencing the file),
monk_tone and monk_tone_source (us / india / default) used for the skin colour, condition (top weighted
condition, '' when unlabelled), pattern (what the file actually shows: a near duplicate shows its source's
lesion, a dark frame ``none``, no file or an undecodable stub ''), planted, detail.
"""

from __future__ import annotations

import ast
import hashlib
import math
import struct
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from scin_pipeline.core.paths import (
    CASES_OBJECT,
    IMAGE_PREFIX,
    LABELS_OBJECT,
    UnsafeObjectPath,
    image_id_from_path,
    image_object_path,
)
from scin_pipeline.core.schema import MONK_SKIN_TONE_HEX

MARKER_FILE = "SYNTHETIC_DATA.md"
PLANTS_FILE = "synthetic_plants.csv"
SYNTHETIC_RELEASE = "1.0.0-synthetic"
DEFAULT_SYNTHETIC_CASES = 200

# Column lists of the real v1.0.0 files, copied so that generated metadata needs no real file at run time.
CASES_COLUMNS: tuple[str, ...] = (
    "case_id",
    "source",
    "release",
    "year",
    "age_group",
    "sex_at_birth",
    "fitzpatrick_skin_type",
    "race_ethnicity_american_indian_or_alaska_native",
    "race_ethnicity_asian",
    "race_ethnicity_black_or_african_american",
    "race_ethnicity_hispanic_latino_or_spanish_origin",
    "race_ethnicity_middle_eastern_or_north_african",
    "race_ethnicity_native_hawaiian_or_pacific_islander",
    "race_ethnicity_white",
    "race_ethnicity_other_race",
    "race_ethnicity_prefer_not_to_answer",
    "textures_raised_or_bumpy",
    "textures_flat",
    "textures_rough_or_flaky",
    "textures_fluid_filled",
    "body_parts_head_or_neck",
    "body_parts_arm",
    "body_parts_palm",
    "body_parts_back_of_hand",
    "body_parts_torso_front",
    "body_parts_torso_back",
    "body_parts_genitalia_or_groin",
    "body_parts_buttocks",
    "body_parts_leg",
    "body_parts_foot_top_or_side",
    "body_parts_foot_sole",
    "body_parts_other",
    "condition_symptoms_bothersome_appearance",
    "condition_symptoms_bleeding",
    "condition_symptoms_increasing_size",
    "condition_symptoms_darkening",
    "condition_symptoms_itching",
    "condition_symptoms_burning",
    "condition_symptoms_pain",
    "condition_symptoms_no_relevant_experience",
    "other_symptoms_fever",
    "other_symptoms_chills",
    "other_symptoms_fatigue",
    "other_symptoms_joint_pain",
    "other_symptoms_mouth_sores",
    "other_symptoms_shortness_of_breath",
    "other_symptoms_no_relevant_symptoms",
    "related_category",
    "condition_duration",
    "image_1_path",
    "image_2_path",
    "image_3_path",
    "image_1_shot_type",
    "image_2_shot_type",
    "image_3_shot_type",
    "combined_race",
    "race_ethnicity_two_or_more_after_mitigation",
)
LABELS_COLUMNS: tuple[str, ...] = (
    "case_id",
    "dermatologist_gradable_for_skin_condition_1",
    "dermatologist_gradable_for_skin_condition_2",
    "dermatologist_gradable_for_skin_condition_3",
    "dermatologist_skin_condition_on_label_name",
    "dermatologist_skin_condition_confidence",
    "weighted_skin_condition_label",
    "dermatologist_gradable_for_fitzpatrick_skin_type_1",
    "dermatologist_gradable_for_fitzpatrick_skin_type_2",
    "dermatologist_gradable_for_fitzpatrick_skin_type_3",
    "dermatologist_fitzpatrick_skin_type_label_1",
    "dermatologist_fitzpatrick_skin_type_label_2",
    "dermatologist_fitzpatrick_skin_type_label_3",
    "gradable_for_monk_skin_tone_india",
    "gradable_for_monk_skin_tone_us",
    "monk_skin_tone_label_india",
    "monk_skin_tone_label_us",
)
IMAGE_PATH_COLUMNS = ("image_1_path", "image_2_path", "image_3_path")
SHOT_TYPE_COLUMNS = ("image_1_shot_type", "image_2_shot_type", "image_3_shot_type")

DEFAULT_MONK_TONE = 3  # used when neither the US nor the India Monk label is usable

# US-grader Monk tone counts of the real release (README), used to draw synthetic tones.
REAL_MONK_US_COUNTS = (577, 1660, 1265, 687, 361, 248, 137, 57, 11, 2)

# Top-weighted condition counts of the real release (README) for the 8 conditions that get a pattern.
SYNTHETIC_CONDITION_COUNTS = {
    "Eczema": 488,
    "Allergic Contact Dermatitis": 270,
    "Urticaria": 214,
    "Insect Bite": 185,
    "Folliculitis": 142,
    "Psoriasis": 109,
    "Tinea": 93,
    "Impetigo": 69,
}
SYNTHETIC_LABELLED_SHARE = 0.6  # the real release: 3,061 of 5,033 cases carry a condition label

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

BOMB_DECLARED_SIZE = (30000, 30000)
PLANTS_COLUMNS = (
    "image_id",
    "image_path",
    "case_id",
    "monk_tone",
    "monk_tone_source",
    "condition",
    "pattern",
    "planted",
    "detail",
)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class SyntheticMirror:
    """What write_synthetic_mirror wrote."""

    root: Path
    n_cases: int
    n_image_refs: int  # non-empty image_{1,2,3}_path cells of the written cases
    n_files_written: int  # files under dataset/images (a zero-byte or corrupt file counts, a missing one not)
    plants: pd.DataFrame = field(repr=False)  # one row per image file (and per rejected reference)


# --------------------------------------------------------------------------------------------------------
# Deterministic helpers
# --------------------------------------------------------------------------------------------------------


def _stable_u64(*parts: object) -> int:
    """A 64-bit number from the parts, stable across processes and Python versions (unlike hash())."""
    text = "|".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def _rng(*parts: object) -> np.random.Generator:
    return np.random.default_rng(_stable_u64("scin-synthetic", *parts))


def select_case_ids(case_ids: list[str], n_cases: int | None, seed: int) -> list[str]:
    """The n_cases ids with the smallest hash(seed, case_id), in their original order.

    Hashing is a uniform random draw, so labelled and unlabelled cases keep their natural proportion; a
    larger N for the same seed gives a superset of a smaller N.
    """
    unique = list(dict.fromkeys(case_ids))
    if n_cases is None:
        return unique
    if n_cases < 1 or n_cases > len(unique):
        raise ValueError(f"n_cases must be between 1 and {len(unique)}, got {n_cases}")
    ranked = sorted(unique, key=lambda cid: (_stable_u64("subset", seed, cid), cid))
    chosen = set(ranked[:n_cases])
    return [cid for cid in unique if cid in chosen]


def top_condition(weighted_label: str) -> str:
    """Argmax of a weighted_skin_condition_label literal ('' when empty or unreadable); ties by name."""
    if not weighted_label:
        return ""
    try:
        weights = ast.literal_eval(weighted_label)  # a literal only: never eval() data
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return ""
    if not isinstance(weights, dict) or not weights:
        return ""
    ranked = sorted(
        ((name, w) for name, w in weights.items() if isinstance(name, str) and isinstance(w, (int, float))),
        key=lambda item: (-float(item[1]), item[0]),
    )
    return ranked[0][0] if ranked else ""


def pattern_for_condition(condition: str) -> str:
    return CONDITION_PATTERNS.get(condition, NONSPECIFIC_PATTERN)


def _parse_tone(text: str) -> int | None:
    try:
        tone = int(str(text).strip())
    except ValueError:
        return None
    return tone if 1 <= tone <= 10 else None


def case_monk_tone(us_label: str, india_label: str) -> tuple[int, str]:
    """(tone, source): the US label, else the India label, else DEFAULT_MONK_TONE."""
    tone = _parse_tone(us_label)
    if tone is not None:
        return tone, "us"
    tone = _parse_tone(india_label)
    if tone is not None:
        return tone, "india"
    return DEFAULT_MONK_TONE, "default"


def monk_tone_rgb(tone: int) -> np.ndarray:
    hex_colour = MONK_SKIN_TONE_HEX[tone].lstrip("#")
    return np.array([int(hex_colour[i : i + 2], 16) for i in (0, 2, 4)], dtype=np.float32)


# --------------------------------------------------------------------------------------------------------
# Synthetic metadata (no real file needed)
# --------------------------------------------------------------------------------------------------------

# Value vocabularies and rough frequencies learnt from the real release.
_AGE_GROUPS = {
    "AGE_UNKNOWN": 2864,
    "AGE_18_TO_29": 769,
    "AGE_40_TO_49": 435,
    "AGE_30_TO_39": 422,
    "AGE_50_TO_59": 322,
    "AGE_60_TO_69": 165,
    "AGE_70_TO_79": 55,
}
_SEX = {"OTHER_OR_UNSPECIFIED": 2559, "FEMALE": 1666, "MALE": 807}
_SELF_FST = {
    "": 2530,
    "FST3": 661,
    "FST2": 542,
    "FST4": 427,
    "NONE_IDENTIFIED": 328,
    "FST5": 214,
    "FST1": 188,
    "FST6": 143,
}
_RACE_YES_SHARE = {
    "race_ethnicity_american_indian_or_alaska_native": 0.015,
    "race_ethnicity_asian": 0.019,
    "race_ethnicity_black_or_african_american": 0.059,
    "race_ethnicity_hispanic_latino_or_spanish_origin": 0.058,
    "race_ethnicity_middle_eastern_or_north_african": 0.002,
    "race_ethnicity_native_hawaiian_or_pacific_islander": 0.001,
    "race_ethnicity_white": 0.372,
    "race_ethnicity_other_race": 0.003,
}
_YES_SHARE = {
    "textures_raised_or_bumpy": 0.58,
    "textures_flat": 0.16,
    "textures_rough_or_flaky": 0.21,
    "textures_fluid_filled": 0.12,
    "body_parts_head_or_neck": 0.15,
    "body_parts_arm": 0.34,
    "body_parts_palm": 0.04,
    "body_parts_back_of_hand": 0.10,
    "body_parts_torso_front": 0.16,
    "body_parts_torso_back": 0.13,
    "body_parts_genitalia_or_groin": 0.04,
    "body_parts_buttocks": 0.08,
    "body_parts_leg": 0.34,
    "body_parts_foot_top_or_side": 0.08,
    "body_parts_foot_sole": 0.02,
    "body_parts_other": 0.11,
    "condition_symptoms_bothersome_appearance": 0.30,
    "condition_symptoms_bleeding": 0.04,
    "condition_symptoms_increasing_size": 0.20,
    "condition_symptoms_darkening": 0.08,
    "condition_symptoms_itching": 0.54,
    "condition_symptoms_burning": 0.20,
    "condition_symptoms_pain": 0.15,
    "condition_symptoms_no_relevant_experience": 0.06,
    "other_symptoms_fever": 0.02,
    "other_symptoms_chills": 0.02,
    "other_symptoms_fatigue": 0.08,
    "other_symptoms_joint_pain": 0.06,
    "other_symptoms_mouth_sores": 0.02,
    "other_symptoms_shortness_of_breath": 0.03,
}
_RELATED_CATEGORY = {
    "RASH": 2876,
    "": 1254,
    "OTHER_ISSUE_DESCRIPTION": 414,
    "LOOKS_HEALTHY": 290,
    "ACNE": 74,
    "GROWTH_OR_MOLE": 45,
    "PIGMENTARY_PROBLEM": 37,
    "NAIL_PROBLEM": 20,
    "OTHER_HAIR_PROBLEM": 12,
    "HAIR_LOSS": 11,
}
_DURATION = {
    "LESS_THAN_ONE_WEEK": 1386,
    "": 997,
    "ONE_TO_FOUR_WEEKS": 960,
    "ONE_DAY": 784,
    "ONE_TO_THREE_MONTHS": 318,
    "THREE_TO_TWELVE_MONTHS": 237,
    "MORE_THAN_ONE_YEAR": 201,
    "MORE_THAN_FIVE_YEARS": 91,
    "UNKNOWN": 39,
    "SINCE_CHILDHOOD": 20,
}
_SHOT_TYPES = {"CLOSE_UP": 5029, "AT_AN_ANGLE": 3015, "AT_DISTANCE": 2364}
_IMAGES_PER_CASE = {1: 0.39, 2: 0.16, 3: 0.45}  # from how often image_2/image_3 are empty
_THREE_GRADER_SHARE = 0.14  # 716 of 5,033 real cases
_FST_GRADABLE_SHARE = 0.85


def _draw(rng: np.random.Generator, counts: dict, size: int | None = None):
    keys = list(counts)
    p = np.array([counts[k] for k in keys], dtype=float)
    idx = rng.choice(len(keys), size=size, p=p / p.sum())
    return keys[idx] if size is None else [keys[i] for i in idx]


def _unique_int64_strings(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        for value in rng.integers(-(2**63), 2**63 - 1, size=n - len(out), dtype=np.int64, endpoint=True):
            text = str(int(value))
            if text not in taken:
                taken.add(text)
                out.append(text)
    return out


def _fst_for_tone(rng: np.random.Generator, tone: int) -> str:
    # Monk 1-10 onto Fitzpatrick 1-6, with one step of grader disagreement now and then.
    base = 1 + round((tone - 1) * 5 / 9)
    return f"FST{int(np.clip(base + rng.choice([-1, 0, 0, 0, 1]), 1, 6))}"


def _condition_label_fields(rng: np.random.Generator, top: str, n_graders: int) -> tuple[str, str, str]:
    """(names, confidences, weighted) literals in the real format, with `top` the strict argmax."""
    others_pool = [c for c in SYNTHETIC_CONDITION_COUNTS if c != top]
    names: list[str] = []
    confidences: list[int] = []
    weight_sum: dict[str, float] = {}
    for _ in range(n_graders):
        top_conf = int(rng.integers(3, 6))
        extra = [str(c) for c in rng.choice(others_pool, size=int(rng.integers(0, 3)), replace=False)]
        grader_names = [top] + extra
        grader_conf = [top_conf] + [int(rng.integers(1, top_conf)) for _ in extra]
        names += grader_names
        confidences += grader_conf
        total = float(sum(grader_conf))
        for name, conf in zip(grader_names, grader_conf):
            weight_sum[name] = weight_sum.get(name, 0.0) + conf / total / n_graders
    ranked = sorted(weight_sum.items(), key=lambda item: (-item[1], item[0]))
    weighted = "{" + ", ".join(f"{name!r}: {round(w, 2)}" for name, w in ranked) + "}"
    return str(names), str(confidences), weighted


def generate_synthetic_metadata(n_cases: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cases and labels tables (all values strings) in the real columns and value formats."""
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    rng = _rng("metadata", seed)
    taken: set[str] = set()
    case_ids = _unique_int64_strings(rng, n_cases, taken)
    tone_p = np.array(REAL_MONK_US_COUNTS, dtype=float)
    cond_names = list(SYNTHETIC_CONDITION_COUNTS)
    cond_p = np.array([SYNTHETIC_CONDITION_COUNTS[c] for c in cond_names], dtype=float)
    cases_rows, labels_rows = [], []
    for case_id in case_ids:
        case = {col: "" for col in CASES_COLUMNS}
        case.update(case_id=case_id, source="SCIN", release=SYNTHETIC_RELEASE, year="2023")
        case["age_group"] = _draw(rng, _AGE_GROUPS)
        case["sex_at_birth"] = _draw(rng, _SEX)
        case["fitzpatrick_skin_type"] = _draw(rng, _SELF_FST)
        races = [col for col, p in _RACE_YES_SHARE.items() if rng.random() < p]
        for col in races:
            case[col] = "YES"
        if len(races) > 2:
            case["race_ethnicity_two_or_more_after_mitigation"] = "YES"
            case["combined_race"] = "TWO_OR_MORE_AFTER_MITIGATION"
        elif races:
            case["combined_race"] = ",".join(sorted(c.removeprefix("race_ethnicity_").upper() for c in races))
        elif rng.random() < 0.01:
            case["race_ethnicity_prefer_not_to_answer"] = "YES"
            case["combined_race"] = "PREFER_NOT_TO_ANSWER"
        for col, p in _YES_SHARE.items():
            if rng.random() < p:
                case[col] = "YES"
        no_symptom = not any(case[c] for c in _YES_SHARE if c.startswith("other_symptoms_"))
        if no_symptom and rng.random() < 0.9:
            case["other_symptoms_no_relevant_symptoms"] = "YES"
        case["related_category"] = _draw(rng, _RELATED_CATEGORY)
        case["condition_duration"] = _draw(rng, _DURATION)
        n_images = int(_draw(rng, _IMAGES_PER_CASE))
        for k, image_id in enumerate(_unique_int64_strings(rng, n_images, taken)):
            case[IMAGE_PATH_COLUMNS[k]] = image_object_path(image_id)
            case[SHOT_TYPE_COLUMNS[k]] = _draw(rng, _SHOT_TYPES)
        cases_rows.append(case)

        label = {col: "" for col in LABELS_COLUMNS}
        label["case_id"] = case_id
        tone_us = int(rng.choice(10, p=tone_p / tone_p.sum())) + 1
        tone_india = int(np.clip(tone_us + rng.choice([-1, 0, 0, 1]), 1, 10))
        label.update(
            gradable_for_monk_skin_tone_india="True",
            gradable_for_monk_skin_tone_us="True",
            monk_skin_tone_label_us=str(tone_us),
            monk_skin_tone_label_india=str(tone_india),
        )
        n_graders = 3 if rng.random() < _THREE_GRADER_SHARE else 1
        labelled = rng.random() < SYNTHETIC_LABELLED_SHARE
        for g in range(1, n_graders + 1):
            label[f"dermatologist_gradable_for_skin_condition_{g}"] = (
                "DEFAULT_YES_IMAGE_QUALITY_SUFFICIENT" if labelled else "NO_IMAGE_QUALITY_INSUFFICIENT"
            )
            fst_gradable = rng.random() < _FST_GRADABLE_SHARE
            label[f"dermatologist_gradable_for_fitzpatrick_skin_type_{g}"] = "YES" if fst_gradable else "NO"
            label[f"dermatologist_fitzpatrick_skin_type_label_{g}"] = (
                _fst_for_tone(rng, tone_us) if fst_gradable else ""
            )
        if labelled:
            top = cond_names[int(rng.choice(len(cond_names), p=cond_p / cond_p.sum()))]
            names, confs, weighted = _condition_label_fields(rng, top, n_graders)
        else:
            names, confs, weighted = "[]", "[]", "{}"
        label["dermatologist_skin_condition_on_label_name"] = names
        label["dermatologist_skin_condition_confidence"] = confs
        label["weighted_skin_condition_label"] = weighted
        labels_rows.append(label)
    cases = pd.DataFrame(cases_rows, columns=list(CASES_COLUMNS), dtype=str)
    labels = pd.DataFrame(labels_rows, columns=list(LABELS_COLUMNS), dtype=str)
    return cases, labels


# --------------------------------------------------------------------------------------------------------
# Image rendering (vectorised numpy/cv2; float32 RGB in 0..255 until encoding)
# --------------------------------------------------------------------------------------------------------


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Zero-mean, unit-std noise varying over about `cell` pixels."""
    gh, gw = max(2, math.ceil(h / cell) + 1), max(2, math.ceil(w / cell) + 1)
    small = rng.standard_normal((gh, gw), dtype=np.float32)
    field_ = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    std = float(field_.std())
    return (field_ - float(field_.mean())) / (std if std > 1e-6 else 1.0)


def erythema_colour(skin: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """Red of inflamed skin relative to the skin colour: pink-red on light skin, red-brown on deep skin."""
    lum = float(_luminance(skin)) / 255.0
    red = skin * np.array([1.02, 0.52, 0.56], np.float32) + np.array([50.0, 0.0, 6.0], np.float32) * lum
    return np.clip(skin + strength * (red - skin), 0, 255).astype(np.float32)


class _Canvas:
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
        mottle = 1 + 0.022 * _smooth_noise(rng, h, w, 90 * self.scale + 2)
        mottle += 0.015 * _smooth_noise(rng, h, w, 18 * self.scale + 2)
        # Fine texture: mostly luminance (pores, skin lines), a little chroma; weaker on deep skin in
        # absolute terms because it is multiplicative in real photographs.
        self.fine = cv2.GaussianBlur(rng.standard_normal((h, w), dtype=np.float32), (0, 0), 0.7)
        self.fine *= np.float32(1.0 / max(float(self.fine.std()), 1e-6))
        lum = float(_luminance(self.skin)) / 255.0
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
        return r * (1 + amount * _smooth_noise(self.rng, r.shape[0], r.shape[1], cell))

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


def _edge(signed_distance_px: np.ndarray, edge_px: float) -> np.ndarray:
    """0..1 ramp across an edge `edge_px` wide (positive distance = inside)."""
    return np.clip(signed_distance_px / max(edge_px, 0.5) + 0.5, 0, 1)


def _paint_eczema(cv: _Canvas, strength: float, ref: np.ndarray) -> None:
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
        noise = _smooth_noise(rng, r.shape[0], r.shape[1], 18 * s + 2)
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


def _paint_contact_dermatitis(cv: _Canvas, strength: float, ref: np.ndarray) -> None:
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


def _paint_urticaria(cv: _Canvas, strength: float, ref: np.ndarray) -> None:
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


def _paint_insect_bite(cv: _Canvas, strength: float, ref: np.ndarray) -> None:
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


def _paint_folliculitis(cv: _Canvas, strength: float, ref: np.ndarray) -> None:
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


def _paint_psoriasis(cv: _Canvas, strength: float, ref: np.ndarray) -> None:
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
        flakes = np.clip(_smooth_noise(rng, r.shape[0], r.shape[1], 5 * s + 1) * 0.8 + 0.5, 0, 1)
        cv.paint(roi, plaque * flakes * 0.85 * strength, silver, texture=0.08)


def _paint_tinea(cv: _Canvas, strength: float, ref: np.ndarray) -> None:
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


def _paint_impetigo(cv: _Canvas, strength: float, ref: np.ndarray) -> None:
    # Honey-coloured crusts on a red base.
    rng, s = cv.rng, cv.scale
    lum = float(_luminance(ref)) / 255.0
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


def _paint_nonspecific(cv: _Canvas, strength: float, ref: np.ndarray) -> None:
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
DARK_DIAGNOSTIC_MAX_MEAN = 45.0  # mean luminance (0-255) a dark_diagnostic frame never exceeds
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
    rgb, _ = _render(image_key, tone, pattern, size, seed)
    return rgb


def _render(image_key: str, tone: int, pattern: str, size, seed):
    if pattern not in _PAINTERS:
        raise ValueError(f"unknown pattern {pattern!r}")
    cv = _Canvas(_rng("image", seed, image_key), tone, size)
    _PAINTERS[pattern](cv, 1.0, cv.skin)
    return np.clip(cv.img, 0, 255).astype(np.uint8), cv


def _render_dark_diagnostic_lesion(image_key: str, tone: int, pattern: str, size, seed):
    """(rgb, canvas, drawn) for a dark_diagnostic frame before darkening: a vivid, clearly sized lesion.

    Lesion colours come from a fixed light reference skin so they stay red on every tone; a lesion that
    ends up covering under DARK_DIAGNOSTIC_MIN_COVERAGE of the frame (one small crust, say) gets eczema
    blotches added, and `drawn` names both patterns.
    """
    drawn = _dark_diagnostic_pattern(pattern)
    cv = _Canvas(_rng("image", seed, image_key), tone, size)
    _PAINTERS[drawn](cv, 1.0, _VIVID_REFERENCE_SKIN)
    if (cv.coverage > 0.5).mean() < DARK_DIAGNOSTIC_MIN_COVERAGE and drawn != "eczema_blotches":
        _PAINTERS["eczema_blotches"](cv, 1.0, _VIVID_REFERENCE_SKIN)
        drawn = f"{drawn}+eczema_blotches"
    return np.clip(cv.img, 0, 255).astype(np.uint8), cv, drawn


def _encode_png(rgb: np.ndarray) -> bytes:
    # Sub filter + Huffman-only deflate: about 3x faster than the default on noisy skin texture, and the
    # files are barely bigger (texture noise does not compress anyway).
    params = [
        cv2.IMWRITE_PNG_COMPRESSION,
        1,
        cv2.IMWRITE_PNG_FILTER,
        cv2.IMWRITE_PNG_FILTER_SUB,
        cv2.IMWRITE_PNG_STRATEGY,
        cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
    ]
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def decompression_bomb_png(
    width: int = BOMB_DECLARED_SIZE[0], height: int = BOMB_DECLARED_SIZE[1], rows: int = 4
) -> bytes:
    """A small PNG whose IHDR declares width x height RGB pixels; its IDAT holds only `rows` zero rows.

    Every chunk has a correct CRC, so header-level checks accept it; the declared size is what a careful
    reader must refuse before allocating (30000 x 30000 x 3 bytes = 2.7 GB).
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no interlace
    scanlines = b"\x00" * ((1 + 3 * width) * rows)  # filter byte 0 + zero pixels per row
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(scanlines, 9))
        + _png_chunk(b"IEND", b"")
    )


@dataclass(frozen=True)
class _ImageJob:
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


def _image_bytes(job: _ImageJob) -> tuple[bytes | None, str, str]:
    """(file content or None for 'write nothing', detail text, pattern the file shows or '')."""
    w, _ = job.size
    prng = _rng("defect", job.seed, job.image_id)
    kind = job.planted
    if kind == "missing":
        return None, "", ""
    if kind == "corrupt_zero_byte":
        return b"", "empty file", ""
    if kind == "decompression_bomb":
        data = decompression_bomb_png()
        return data, f"IHDR declares {BOMB_DECLARED_SIZE[0]}x{BOMB_DECLARED_SIZE[1]} RGB; {len(data)} bytes", ""
    if kind == "dark":
        rgb, _ = _render(job.image_id, job.tone, NO_LESION_PATTERN, job.size, job.seed)
        factor = prng.uniform(0.08, 0.2)
        out = np.clip(rgb * factor, 0, 255).astype(np.uint8)
        return _encode_png(out), f"intensity x{factor:.3f}, no lesion", NO_LESION_PATTERN
    if kind == "dark_diagnostic":
        rgb, cv, drawn = _render_dark_diagnostic_lesion(job.image_id, job.tone, job.pattern, job.size, job.seed)
        background = prng.uniform(0.08, 0.16)
        lesion = prng.uniform(0.7, 0.9)
        # Underexposed background, lesion kept bright (as under a close flash): the gain rises with the
        # lesion's own alpha (square root: half-transparent lesion pixels count as lesion), so its red
        # and texture stay visible while the frame mean stays dark.
        weight = np.sqrt(cv.coverage)
        # A frame mostly covered by lesion must still read as underexposed: cap its mean luminance.
        lum = _luminance(rgb.astype(np.float32))
        base_mean, lesion_mean = float(lum.mean()), float((lum * weight).mean())
        expected_mean = background * base_mean + (lesion - background) * lesion_mean
        if lesion_mean > 0 and expected_mean > DARK_DIAGNOSTIC_MAX_MEAN:
            lesion = background + (DARK_DIAGNOSTIC_MAX_MEAN - background * base_mean) / lesion_mean
        gain = background + (lesion - background) * weight
        out = np.clip(rgb.astype(np.float32) * gain[..., None], 0, 255).astype(np.uint8)
        return _encode_png(out), f"background x{background:.3f}, lesion x{lesion:.3f}", drawn
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
        reencoded = cv2.imdecode(np.frombuffer(_encode_jpeg(shifted, quality), np.uint8), cv2.IMREAD_COLOR)
        out = cv2.cvtColor(reencoded, cv2.COLOR_BGR2RGB)
        detail = (
            f"source_image_id={job.source_id}; crop={crop:.3f}; brightness_shift={shift:+.1f}; jpeg_quality={quality}"
        )
        return _encode_png(out), detail, job.source_pattern

    rgb, _ = _render(job.image_id, job.tone, job.pattern, job.size, job.seed)
    if kind in (PLANT_CLEAN, PLANT_EXACT_REUSE):
        return _encode_png(rgb), "", job.pattern
    if kind == "blurred":
        sigma = prng.uniform(6, 10) * w / 480
        return _encode_png(cv2.GaussianBlur(rgb, (0, 0), sigma)), f"gaussian sigma={sigma:.2f}px", job.pattern
    if kind == "overexposed":
        median = max(float(np.median(_luminance(rgb.astype(np.float32)))), 1.0)
        gain = prng.uniform(1.2, 1.6) * 255 / median
        out = np.clip(rgb.astype(np.float32) * gain + prng.uniform(10, 40), 0, 255).astype(np.uint8)
        return _encode_png(out), f"gain x{gain:.2f}, median clipped", job.pattern
    if kind == "corrupt_truncated":
        data = _encode_png(rgb)
        return data[: len(data) // 2], f"valid PNG of {len(data)} bytes cut to {len(data) // 2}", job.pattern
    if kind == "wrong_format":
        return _encode_jpeg(rgb, 90), "JPEG bytes under a .png name", job.pattern
    raise ValueError(f"unknown planted kind {kind!r}")


def _write_job(job: _ImageJob) -> tuple[str, bool, str, str]:
    data, detail, drawn = _image_bytes(job)
    if data is not None:
        Path(job.target).write_bytes(data)
    return job.image_id, data is not None, detail, drawn


# --------------------------------------------------------------------------------------------------------
# The mirror
# --------------------------------------------------------------------------------------------------------


def _read_metadata(metadata_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    metadata_dir = Path(metadata_dir)
    tables = []
    for obj in (CASES_OBJECT, LABELS_OBJECT):
        path = metadata_dir / Path(obj).name
        if not path.is_file():
            raise ValueError(
                f"metadata_dir {metadata_dir} lacks {Path(obj).name} (need scin_cases.csv and scin_labels.csv)"
            )
        # Strings only: case_id is a signed int64 that float parsing would corrupt, and "" must stay "".
        tables.append(pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8"))
    cases, labels = tables
    missing_cols = [c for c in ("case_id", *IMAGE_PATH_COLUMNS) if c not in cases.columns]
    if missing_cols:
        raise ValueError(f"{metadata_dir / Path(CASES_OBJECT).name} lacks columns {missing_cols}")
    if "case_id" not in labels.columns:
        raise ValueError(f"{metadata_dir / Path(LABELS_OBJECT).name} lacks column case_id")
    return cases, labels


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    # Minimal quoting and "\n" line ends: what the release itself uses, so unchanged rows round-trip.
    df.to_csv(path, index=False, lineterminator="\n", encoding="utf-8")


def _prepare_out_root(out_root: Path, overwrite: bool) -> None:
    if out_root.exists() and not out_root.is_dir():
        raise ValueError(f"out_root {out_root} exists and is not a directory")
    if out_root.exists() and any(out_root.iterdir()):
        if not overwrite:
            raise ValueError(f"out_root {out_root} is not empty; pass overwrite=True to replace a synthetic mirror")
        # Without the marker this could be a real SCIN mirror: never delete what might be real images.
        if not (out_root / MARKER_FILE).is_file():
            raise ValueError(f"refusing to overwrite {out_root}: it has no {MARKER_FILE}, so it may not be synthetic")
        for name in (MARKER_FILE, PLANTS_FILE, CASES_OBJECT, LABELS_OBJECT):
            (out_root / name).unlink(missing_ok=True)
        images_dir = out_root / IMAGE_PREFIX
        if images_dir.is_dir():
            for entry in images_dir.iterdir():
                try:
                    image_id_from_path(IMAGE_PREFIX + entry.name)
                except UnsafeObjectPath:
                    continue  # not a file this generator writes
                if entry.is_file() or entry.is_symlink():
                    entry.unlink()
    (out_root / IMAGE_PREFIX).mkdir(parents=True, exist_ok=True)


def _defect_counts(n_files: int, defect_rate: float) -> int:
    """How many files each defect kind gets."""
    if defect_rate <= 0 or n_files == 0:
        return 0
    per_kind = int(round(defect_rate * n_files / len(DEFECT_KINDS)))
    return max(per_kind, 1) if n_files >= MIN_FILES_FOR_EVERY_KIND else per_kind


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_synthetic_mirror(
    out_root: Path,
    *,
    metadata_dir: Path | None = None,
    n_cases: int | None = None,
    seed: int = 0,
    image_size: tuple[int, int] = (480, 360),
    defect_rate: float = 0.04,
    overwrite: bool = False,
    workers: int = 1,
) -> SyntheticMirror:
    """Write a synthetic mirror of the SCIN bucket layout under out_root (see the module docstring).

    metadata_dir: a folder with the real scin_cases.csv / scin_labels.csv; the chosen cases' rows are
    copied verbatim (n_cases None = all). None: metadata is generated (n_cases default 200).
    image_size is (width, height). workers > 1 renders images in a process pool; the output does not
    depend on it. out_root must be empty or absent; overwrite=True replaces a previous synthetic mirror
    (one holding MARKER_FILE) by deleting only what this function writes, and refuses any other folder.
    Raises ValueError on bad arguments or metadata, before anything is written.
    """
    out_root = Path(out_root)
    width, height = (int(v) for v in image_size)
    if width < 16 or height < 16:
        raise ValueError(f"image_size must be at least 16x16, got {image_size}")
    if not 0 <= defect_rate <= 1:
        raise ValueError(f"defect_rate must be within [0, 1], got {defect_rate}")

    # 1. Metadata: everything is read and checked before out_root is touched.
    if metadata_dir is not None:
        all_cases, all_labels = _read_metadata(Path(metadata_dir))
        chosen = set(select_case_ids(all_cases["case_id"].tolist(), n_cases, seed))
        cases = all_cases[all_cases["case_id"].isin(chosen)]
        labels = all_labels[all_labels["case_id"].isin(chosen)]
        source_text = (
            f"real SCIN metadata from `{Path(metadata_dir)}` (scin_cases.csv sha256 "
            f"{_file_digest(Path(metadata_dir) / Path(CASES_OBJECT).name)[:16]}..., scin_labels.csv sha256 "
            f"{_file_digest(Path(metadata_dir) / Path(LABELS_OBJECT).name)[:16]}...): the rows of "
            f"{len(chosen)} of {all_cases['case_id'].nunique()} cases, copied verbatim"
        )
    else:
        n_generated = DEFAULT_SYNTHETIC_CASES if n_cases is None else n_cases
        all_cases, all_labels = generate_synthetic_metadata(n_generated, seed)
        cases, labels = all_cases, all_labels
        source_text = f"synthetic metadata generated by scin-pipeline (release `{SYNTHETIC_RELEASE}`)"

    # Files the whole release shares between cases never carry a defect (their reuse is the plant).
    release_refs = all_cases[list(IMAGE_PATH_COLUMNS)].to_numpy().ravel()
    release_ref_counts = pd.Series(release_refs[release_refs != ""]).value_counts()
    shared_in_release = set(release_ref_counts[release_ref_counts > 1].index)

    label_by_case = labels.drop_duplicates("case_id").set_index("case_id")
    case_info: dict[str, tuple[int, str, str]] = {}
    for case_id in cases["case_id"]:
        row = label_by_case.loc[case_id] if case_id in label_by_case.index else None

        def get(col: str, row=row) -> str:
            return str(row[col]) if row is not None and col in row.index else ""

        tone, tone_source = case_monk_tone(get("monk_skin_tone_label_us"), get("monk_skin_tone_label_india"))
        case_info[case_id] = (tone, tone_source, top_condition(get("weighted_skin_condition_label")))

    # 2. Image references: validated, grouped per file (first referencing case owns the file's look).
    files: dict[str, dict] = {}
    plants_rows: list[dict] = []
    n_image_refs = 0
    for case_id, *paths in cases[["case_id", *IMAGE_PATH_COLUMNS]].itertuples(index=False):
        tone, tone_source, condition = case_info[case_id]
        for path in paths:
            if path == "":
                continue
            n_image_refs += 1
            try:
                image_id = image_id_from_path(path)
            except UnsafeObjectPath as err:
                plants_rows.append(
                    dict(
                        image_id="",
                        image_path=path,
                        case_id=case_id,
                        monk_tone=tone,
                        monk_tone_source=tone_source,
                        condition=condition,
                        pattern="",
                        planted=PLANT_REJECTED_PATH,
                        detail=err.reason,
                    )
                )
                continue
            if image_id in files:
                files[image_id]["other_cases"].append(case_id)
                continue
            files[image_id] = dict(
                image_id=image_id,
                image_path=path,
                case_id=case_id,
                monk_tone=tone,
                monk_tone_source=tone_source,
                condition=condition,
                pattern=pattern_for_condition(condition),
                planted=PLANT_CLEAN,
                detail="",
                other_cases=[],
            )

    # 3. Plants: exact reuse and the release's own missing file first, then seeded defects.
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
        key=lambda i: (_stable_u64("defect-order", seed, i), i),
    )
    per_kind = _defect_counts(len(files), defect_rate)
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

    # 4. Write.
    _prepare_out_root(out_root, overwrite)
    _write_csv(cases, out_root / CASES_OBJECT)
    _write_csv(labels, out_root / LABELS_OBJECT)
    images_dir = out_root / IMAGE_PREFIX
    jobs = []
    for info in files.values():
        source = files.get(info.get("source_id", ""))
        jobs.append(
            _ImageJob(
                image_id=info["image_id"],
                target=str(images_dir / f"{info['image_id']}.png"),
                tone=info["monk_tone"],
                pattern=info["pattern"],
                planted=info["planted"],
                size=(width, height),
                seed=seed,
                source_id=source["image_id"] if source else "",
                source_tone=source["monk_tone"] if source else 0,
                source_pattern=source["pattern"] if source else "",
            )
        )
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_write_job, jobs, chunksize=max(1, len(jobs) // (workers * 8))))
    else:
        results = [_write_job(job) for job in jobs]
    n_files_written = 0
    for image_id, written, detail, drawn in results:
        info = files[image_id]
        n_files_written += written
        info["pattern"] = drawn  # what the file shows: a copy shows its source's lesion, a dark frame none
        if detail:
            info["detail"] = detail if not info["detail"] else f"{info['detail']}; {detail}"
        if info["planted"] == "near_duplicate":
            info["detail"] += f"; source_case_id={files[info['source_id']]['case_id']}"

    rows = [{col: info[col] for col in PLANTS_COLUMNS} for info in files.values()] + plants_rows
    plants = pd.DataFrame(rows, columns=list(PLANTS_COLUMNS))
    plants["monk_tone"] = plants["monk_tone"].astype(int)
    _write_csv(plants, out_root / PLANTS_FILE)
    (out_root / MARKER_FILE).write_text(
        _marker_text(
            plants,
            seed=seed,
            source_text=source_text,
            n_cases=len(cases),
            n_image_refs=n_image_refs,
            n_files_written=n_files_written,
            image_size=(width, height),
            defect_rate=defect_rate,
        ),
        encoding="utf-8",
    )
    return SyntheticMirror(
        root=out_root, n_cases=len(cases), n_image_refs=n_image_refs, n_files_written=n_files_written, plants=plants
    )


_PLANT_MEANINGS = {
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


def _marker_text(
    plants: pd.DataFrame, *, seed, source_text, n_cases, n_image_refs, n_files_written, image_size, defect_rate
) -> str:
    counts = plants["planted"].value_counts()
    table = "\n".join(
        f"| `{kind}` | {int(counts.get(kind, 0))} | {meaning} |" for kind, meaning in _PLANT_MEANINGS.items()
    )
    return f"""# SYNTHETIC DATA: these are not SCIN photographs

Every image under `dataset/images/` in this folder is SYNTHETIC. It was drawn by scin-pipeline
(`scin_pipeline.core.synthetic`): a skin-coloured background following the case's Monk skin tone plus a
drawn pattern chosen from the case's top condition label. These pictures are not photographs of anyone,
are not part of the SCIN dataset, and carry NO medical meaning: do not use them to learn, judge or
illustrate any skin condition. They exist only to exercise the pipeline offline.

- Metadata: {source_text}.
- Seed: {seed}. Cases: {n_cases}. Image references: {n_image_refs}. Files written: {n_files_written}.
- Image size: {image_size[0]} x {image_size[1]} px. Defect rate: {defect_rate}.

## What was planted

`{PLANTS_FILE}` lists every image file with what was planted in it (column `planted`), its case, the Monk
tone and the condition used to draw it, the pattern drawn, and details.

| planted | files | meaning |
| --- | --- | --- |
{table}
"""
