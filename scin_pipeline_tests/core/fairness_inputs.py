"""Inputs shared by the fairness tests: a model's outputs with a chosen signal, and five hand-made cases."""

from __future__ import annotations

import numpy as np
import pandas as pd

from scin_pipeline.core import schema


def model_output(n: int, k: int, signal: float, rng: np.random.Generator):
    """Labels and softmax probabilities of a model whose true-class logit is raised by ``signal``."""
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    proba = np.exp(logits)
    return y, proba / proba.sum(axis=1, keepdims=True)


def case_frame() -> pd.DataFrame:
    """Five cases in the parsed-metadata layout (race boxes as bools, tones as Int8, enums as category)."""
    race = {c: [False] * 5 for c in schema.RACE_COLUMNS}
    race["race_ethnicity_white"] = [True, True, False, False, False]
    race["race_ethnicity_asian"] = [False, True, False, False, False]  # case 2: two boxes
    race["race_ethnicity_prefer_not_to_answer"] = [False, False, True, False, False]
    race["race_ethnicity_two_or_more_after_mitigation"] = [False, False, False, True, False]
    frame = pd.DataFrame(
        {
            "case_id": ["c1", "c2", "c3", "c4", "c5"],
            "monk_skin_tone_label_us": pd.array([1, 4, 7, 10, None], dtype="Int8"),
            "monk_skin_tone_label_india": pd.array([2, 3, None, 9, 6], dtype="Int8"),
            "fst_dermatologist": pd.Categorical(["FST1", None, "FST6", "FST3", "FST2"], categories=schema.FST_VALUES),
            "fitzpatrick_skin_type": pd.Categorical(["FST2", "NONE_IDENTIFIED", None, "FST5", "FST1"]),
            "sex_at_birth": pd.Categorical(["FEMALE", "MALE", None, "FEMALE", "OTHER_OR_UNSPECIFIED"]),
            "age_group": pd.Categorical(["AGE_18_TO_29", "AGE_UNKNOWN", "AGE_80_OR_ABOVE", None, "AGE_30_TO_39"]),
            **race,
        },
        index=[10, 11, 12, 13, 14],
    )
    return frame
