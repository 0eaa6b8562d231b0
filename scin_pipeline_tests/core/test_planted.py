"""Tests for core.planted: precision and recall of the curation rules against a synthetic mirror's plants,
counted exactly on hand-made tables."""

from __future__ import annotations

import pandas as pd

from scin_pipeline.core.dedup import CROSS_CASE_NEAR_DUPLICATE, EXACT_REUSE, SAME_CASE_MULTI_ANGLE
from scin_pipeline.core.planted import planted_defect_scores, planted_near_duplicate_scores

# --------------------------------------------------------------------------------------------------------
# Scores against plants
# --------------------------------------------------------------------------------------------------------


def test_planted_scores_count_exactly():
    plants = pd.DataFrame(
        {
            "image_id": ["5", "6", "7"],
            "case_id": ["a", "b", "c"],
            "planted": ["near_duplicate", "near_duplicate", "clean"],
            "detail": [
                "source_image_id=1; crop=0.03; source_case_id=x",
                "source_image_id=-2; crop=0.04; source_case_id=y",
                "",
            ],
        }
    )
    pairs = pd.DataFrame(
        {
            "image_id_a": ["1", "7", "8", "3"],
            "image_id_b": ["5", "9", "8", "4"],
            "phash_distance": [2, 3, 0, 1],
            "dhash_distance": [1, 2, 0, 1],
            "same_case": [False, False, False, True],
            "kind": [CROSS_CASE_NEAR_DUPLICATE, CROSS_CASE_NEAR_DUPLICATE, EXACT_REUSE, SAME_CASE_MULTI_ANGLE],
        }
    )
    scores = planted_near_duplicate_scores(pairs, plants)
    assert (scores["true_positives"], scores["false_positives"], scores["false_negatives"]) == (1, 1, 1)
    assert scores["precision"] == 0.5 and scores["recall"] == 0.5
    assert scores["missed"] == [("-2", "6")] and scores["unexpected"] == [("7", "9")]


def test_planted_defect_scores_counts():
    decisions = pd.DataFrame(
        {
            "image_id": ["1", "2", "3", "4", "5", "6"],
            "keep": [False, False, True, False, True, True],
            "reason": ["dark", "dark", None, "blurry", None, None],
            "dark_but_diagnostic": [False, False, True, False, False, False],
        }
    )
    plants = pd.DataFrame(
        {
            "image_id": ["1", "2", "3", "4", "5", "6"],
            "planted": ["dark", "clean", "dark_diagnostic", "blurred", "blurred", "clean"],
            "monk_tone": [1, 2, 9, 3, 3, 9],
        }
    )
    out = planted_defect_scores(decisions, plants).set_index("planted")
    assert out.loc["dark", ["n_planted", "n_flagged", "true_positives"]].tolist() == [1, 2, 1]
    assert out.loc["dark", "precision"] == 0.5 and out.loc["dark", "recall"] == 1.0
    assert out.loc["blurred", "recall"] == 0.5 and out.loc["blurred", "precision"] == 1.0
    assert out.loc["dark_diagnostic", "recall"] == 1.0
    clean = out.loc["clean"].set_index("reason")
    assert clean.loc["clean_kept:monk_1-3", "recall"] == 0.0 and clean.loc["clean_kept:monk_7-10", "recall"] == 1.0
