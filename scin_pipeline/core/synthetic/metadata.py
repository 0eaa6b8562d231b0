"""The cases of a synthetic mirror: a seeded subset of real rows, or generated rows in the release's formats.

Generated metadata needs no real file: the vocabularies and rough frequencies below were learnt from the
real SCIN 1.0.0 release, and every value is a string formatted as the release formats it (signed int64
ids, Python-literal label lists, "YES" check boxes). Each case's Monk tone and top weighted condition
(what its images show) are read here too.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import TypeVar

import numpy as np
import pandas as pd

from scin_pipeline.core.paths import image_object_path
from scin_pipeline.core.schema import CASES_COLUMNS, IMAGE_PATH_COLUMNS, LABELS_COLUMNS, SHOT_TYPE_COLUMNS
from scin_pipeline.core.synthetic.seeds import seeded_rng, stable_u64

SYNTHETIC_RELEASE = "1.0.0-synthetic"

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
    ranked = sorted(unique, key=lambda cid: (stable_u64("subset", seed, cid), cid))
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


_K = TypeVar("_K")


def _draw(rng: np.random.Generator, counts: Mapping[_K, float]) -> _K:
    keys = list(counts)
    p = np.array([counts[k] for k in keys], dtype=float)
    return keys[rng.choice(len(keys), p=p / p.sum())]


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
    rng = seeded_rng("metadata", seed)
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
