"""Column names and enum vocabularies of the SCIN v1.0.0 metadata, as published in the bucket.

The vocabularies are what the release actually contains (checked on the real CSVs). A value outside
them is kept (the categorical grows to hold it) and flagged, never dropped: a new release may add values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

RACE_COLUMNS = [
    "race_ethnicity_american_indian_or_alaska_native",
    "race_ethnicity_asian",
    "race_ethnicity_black_or_african_american",
    "race_ethnicity_hispanic_latino_or_spanish_origin",
    "race_ethnicity_middle_eastern_or_north_african",
    "race_ethnicity_native_hawaiian_or_pacific_islander",
    "race_ethnicity_white",
    "race_ethnicity_other_race",
    "race_ethnicity_prefer_not_to_answer",
    "race_ethnicity_two_or_more_after_mitigation",
]
TEXTURE_COLUMNS = [
    "textures_raised_or_bumpy",
    "textures_flat",
    "textures_rough_or_flaky",
    "textures_fluid_filled",
]
BODY_PART_COLUMNS = [
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
]
SYMPTOM_COLUMNS = [
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
]
# Check-box answers: "YES" when ticked, empty otherwise.
YES_FLAG_COLUMNS = RACE_COLUMNS + TEXTURE_COLUMNS + BODY_PART_COLUMNS + SYMPTOM_COLUMNS

IMAGE_PATH_COLUMNS = ["image_1_path", "image_2_path", "image_3_path"]
SHOT_TYPE_COLUMNS = ["image_1_shot_type", "image_2_shot_type", "image_3_shot_type"]

GRADABLE_CONDITION_COLUMNS = [f"dermatologist_gradable_for_skin_condition_{i}" for i in (1, 2, 3)]
GRADABLE_FST_COLUMNS = [f"dermatologist_gradable_for_fitzpatrick_skin_type_{i}" for i in (1, 2, 3)]
DERM_FST_COLUMNS = [f"dermatologist_fitzpatrick_skin_type_label_{i}" for i in (1, 2, 3)]
LABEL_NAMES_COLUMN = "dermatologist_skin_condition_on_label_name"
LABEL_CONFIDENCE_COLUMN = "dermatologist_skin_condition_confidence"
WEIGHTED_LABEL_COLUMN = "weighted_skin_condition_label"

# The full headers of the two files, in the release's order (the synthetic mirror writes these).
CASES_COLUMNS = [
    "case_id",
    "source",
    "release",
    "year",
    "age_group",
    "sex_at_birth",
    "fitzpatrick_skin_type",
    *RACE_COLUMNS[:-1],
    *TEXTURE_COLUMNS,
    *BODY_PART_COLUMNS,
    *SYMPTOM_COLUMNS,
    "related_category",
    "condition_duration",
    *IMAGE_PATH_COLUMNS,
    *SHOT_TYPE_COLUMNS,
    "combined_race",
    RACE_COLUMNS[-1],
]
LABELS_COLUMNS = [
    "case_id",
    *GRADABLE_CONDITION_COLUMNS,
    LABEL_NAMES_COLUMN,
    LABEL_CONFIDENCE_COLUMN,
    WEIGHTED_LABEL_COLUMN,
    *GRADABLE_FST_COLUMNS,
    *DERM_FST_COLUMNS,
    "gradable_for_monk_skin_tone_india",
    "gradable_for_monk_skin_tone_us",
    "monk_skin_tone_label_india",
    "monk_skin_tone_label_us",
]

# Columns without which nothing downstream can be trusted; a file missing one is refused outright.
REQUIRED_CASE_COLUMNS = [
    "case_id",
    "release",
    "age_group",
    "sex_at_birth",
    "fitzpatrick_skin_type",
    *IMAGE_PATH_COLUMNS,
    *SHOT_TYPE_COLUMNS,
]
REQUIRED_LABEL_COLUMNS = [
    "case_id",
    *GRADABLE_CONDITION_COLUMNS,
    LABEL_NAMES_COLUMN,
    LABEL_CONFIDENCE_COLUMN,
    WEIGHTED_LABEL_COLUMN,
    "dermatologist_fitzpatrick_skin_type_label_1",
    "monk_skin_tone_label_us",
    "monk_skin_tone_label_india",
]

FST_VALUES = ["FST1", "FST2", "FST3", "FST4", "FST5", "FST6"]
GRADABILITY_VALUES = [
    "DEFAULT_YES_IMAGE_QUALITY_SUFFICIENT",
    "YES_IMAGE_QUALITY_SUFFICIENT_NO_DISCERNIBLE_PATHOLOGY",
    "NO_IMAGE_QUALITY_INSUFFICIENT",
]

# Enum columns and their known values, in a meaningful order (ordinal where the scale is ordinal).
ENUM_VALUES: dict[str, list[str]] = {
    "age_group": [
        "AGE_18_TO_29",
        "AGE_30_TO_39",
        "AGE_40_TO_49",
        "AGE_50_TO_59",
        "AGE_60_TO_69",
        "AGE_70_TO_79",
        "AGE_80_OR_ABOVE",
        "AGE_UNKNOWN",
    ],
    "sex_at_birth": ["FEMALE", "MALE", "INTERSEX_OR_NON_BINARY", "OTHER_OR_UNSPECIFIED"],
    "fitzpatrick_skin_type": [*FST_VALUES, "NONE_IDENTIFIED"],
    "related_category": [
        "RASH",
        "ACNE",
        "GROWTH_OR_MOLE",
        "PIGMENTARY_PROBLEM",
        "NAIL_PROBLEM",
        "HAIR_LOSS",
        "OTHER_HAIR_PROBLEM",
        "LOOKS_HEALTHY",
        "OTHER_ISSUE_DESCRIPTION",
    ],
    "condition_duration": [
        "ONE_DAY",
        "LESS_THAN_ONE_WEEK",
        "ONE_TO_FOUR_WEEKS",
        "ONE_TO_THREE_MONTHS",
        "THREE_TO_TWELVE_MONTHS",
        "MORE_THAN_ONE_YEAR",
        "MORE_THAN_FIVE_YEARS",
        "SINCE_CHILDHOOD",
        "UNKNOWN",
    ],
    **{col: list(GRADABILITY_VALUES) for col in GRADABLE_CONDITION_COLUMNS},
    **{col: ["YES", "NO"] for col in GRADABLE_FST_COLUMNS},
    **{col: list(FST_VALUES) for col in DERM_FST_COLUMNS},
}
SHOT_TYPE_VALUES = ["CLOSE_UP", "AT_AN_ANGLE", "AT_DISTANCE"]

# Group names of the reports (data report, quality exclusion rates, fairness report, model card). A row whose
# answer is absent (the question was not answered, no grader gave a label) is in the group MISSING_GROUP:
# counted, never dropped. Answers that mean "don't know" (AGE_UNKNOWN, NONE_IDENTIFIED, OTHER_OR_UNSPECIFIED)
# are answers and keep their own groups.
MISSING_GROUP = "missing"
# Race/ethnicity with several boxes ticked, where each row must be in one group (the fairness report; the data
# report counts the boxes multi-select instead).
MULTIPLE_GROUP = "multiple"
# The block over all rows, beside the per-group ones: its attribute and its group name.
OVERALL = "overall"


def is_missing(value: Any) -> bool:
    """None, NaN, NaT or pd.NA: an absent answer. An empty list ("no label") and an unticked box (False) are
    answers, not missing values."""
    return value is None or value is pd.NA or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def group_name(value: Any) -> str:
    """A value as the reports' group name: missing (and blank text) is MISSING_GROUP; a tone read as float (a
    hand-built or NaN-holding column) is still tone "3", not "3.0"."""
    if is_missing(value):
        return MISSING_GROUP
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    text = str(value).strip()
    return text if text else MISSING_GROUP


def group_labels(values: pd.Series) -> pd.Series:
    """Each value of a column as its group name (object dtype); Int8 Monk tones give "1".."10"."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        values = values.astype(object)
    return values.map(group_name).astype(object)


# Sensitive attributes as the reports title them.
ATTRIBUTE_TITLES = {
    "monk_skin_tone_us": "Monk skin tone (US lay graders)",
    "monk_us_bin": "Monk skin tone bins (US lay graders)",
    "monk_skin_tone_india": "Monk skin tone (India lay graders)",
    "monk_india_bin": "Monk skin tone bins (India lay graders)",
    "fst_self_reported": "Fitzpatrick skin type, self-reported",
    "fst_self_reported_bin": "Fitzpatrick skin type bins, self-reported",
    "fst_dermatologist": "Fitzpatrick skin type, dermatologist-estimated (grader 1)",
    "fst_dermatologist_bin": "Fitzpatrick skin type bins, dermatologist-estimated (grader 1)",
    "race_ethnicity": "Race/ethnicity, self-reported",
    "combined_race": "Race/ethnicity combination, as released (combined_race)",
    "sex_at_birth": "Sex at birth, self-reported",
    "age_group": "Age group, self-reported",
    OVERALL: "All rows",
}
MONK_TONES = list(range(1, 11))

# The published Monk Skin Tone scale swatches (sRGB), tone 1 (lightest) to 10 (deepest): the one copy,
# used by the dark rule (their L*), the synthetic images (skin colour) and the report's plots.
MONK_SKIN_TONE_HEX = {
    1: "#f6ede4",
    2: "#f3e7db",
    3: "#f7ead0",
    4: "#eadaba",
    5: "#d7bd96",
    6: "#a07e56",
    7: "#825c43",
    8: "#604134",
    9: "#3a312a",
    10: "#292420",
}
