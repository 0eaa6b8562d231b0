"""The labelling queue's rule: model uncertainty weighted towards thin Monk and Fitzpatrick groups."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scin_pipeline.core.labelling_queue import (
    CSV_COLUMNS,
    QueueConfig,
    labelling_queue,
    normalised_entropy,
    pool_cases_table,
    representation_weights,
    top_two_margin,
)

CLASSES = ["Eczema", "Tinea", "Urticaria", "other"]
SURE = [0.97, 0.01, 0.01, 0.01]
UNSURE = [0.25, 0.25, 0.25, 0.25]


def features(monk: list[str], derm: list[str], own: list[str] | None = None) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "monk_us_bin": monk,
            "fst_dermatologist_bin": derm,
            "fst_self_reported_bin": own or ["missing"] * len(monk),
        }
    )


# Labelled set: 60 % Monk 1-2, 30 % 3-4, 10 % 5-6, none 7-10; Fitzpatrick 80 % FST1-2, 20 % FST3-4.
LABELLED = features(["1-2"] * 6 + ["3-4"] * 3 + ["5-6"], ["FST1-2"] * 8 + ["FST3-4"] * 2)


def pool(cases: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "case_id": [c for c, _ in cases],
            "status": [s for _, s in cases],
            "n_images": 1,
            "image_ids": [f"img-{c}" for c, _ in cases],
        }
    )


def test_entropy_and_margin():
    proba = np.array([UNSURE, SURE, [0.5, 0.5, 0, 0]])
    assert normalised_entropy(proba) == pytest.approx([1.0, 0.1209, 0.5], abs=1e-3)
    assert top_two_margin(proba) == pytest.approx([0.0, 0.96, 0.0])


def test_representation_weight_is_the_shortfall_from_an_even_share_capped():
    groups = ("1-2", "3-4", "5-6", "7-10")
    weights = representation_weights(LABELLED["monk_us_bin"], groups, max_weight=3.0)
    # Even share 0.25: 1-2 holds 0.6 (never pushed below 1), 3-4 0.3 (1), 5-6 0.1 (2.5), 7-10 none (the cap).
    assert weights == pytest.approx({"1-2": 1.0, "3-4": 1.0, "5-6": 2.5, "7-10": 3.0})


def test_uncertain_cases_of_thin_groups_come_first_and_each_says_why():
    cases = pool([("a", "gradable_unlabelled"), ("b", "gradable_unlabelled"), ("c", "gradable_unlabelled")])
    proba = np.array([UNSURE, UNSURE, SURE])
    pool_features = features(["1-2", "7-10", "7-10"], ["FST1-2", "missing", "FST5-6"], ["missing", "FST5-6", "missing"])
    queue = labelling_queue(cases, proba, CLASSES, pool_features, LABELLED)
    assert queue["case_id"].tolist() == ["b", "c", "a"]
    b = queue.iloc[0]
    # Monk 7-10 and FST5-6 (self-reported: no dermatologist type) are absent from the labelled set: the cap.
    assert b["monk_weight"] == 3.0 and b["fst_weight"] == 3.0 and b["fst_source"] == "self_reported"
    assert b["priority"] == pytest.approx(9.0)
    assert "Monk 7-10 is 0% of labelled cases (x3.0)" in b["reason"]
    assert "FST5-6 (self_reported)" in b["reason"] and "never labelled" in b["reason"]
    # A confident model on a thin group still ranks above an unsure one on the majority here (x9 vs x1),
    # but below the unsure thin case.
    assert queue.set_index("case_id").loc["c", "priority"] == pytest.approx(normalised_entropy(np.array([SURE]))[0] * 9)
    assert queue["rank"].tolist() == [1, 2, 3]


def test_status_weights_push_down_ungradable_and_leave_out_answered_cases():
    cases = pool(
        [("u", "ungradable"), ("g", "gradable_unlabelled"), ("n", "no_pathology"), ("p", "label_outside_policy")]
    )
    proba = np.array([UNSURE] * 4)
    pool_features = features(["1-2"] * 4, ["FST1-2"] * 4)
    queue = labelling_queue(cases, proba, CLASSES, pool_features, LABELLED, QueueConfig(ungradable_weight=0.5))
    assert queue["case_id"].tolist() == ["g", "u"]  # no_pathology (weight 0) and a labelled case left out
    assert queue.set_index("case_id").loc["u", "priority"] == pytest.approx(0.5)
    assert "judged ungradable once (x0.50)" in queue.iloc[1]["reason"]
    also = labelling_queue(cases, proba, CLASSES, pool_features, LABELLED, QueueConfig(no_pathology_weight=0.2))
    assert "n" in set(also["case_id"])


def test_the_graders_csv_carries_no_model_guess_and_bad_input_is_named():
    assert "model_top_class" not in CSV_COLUMNS and "model_top_probability" not in CSV_COLUMNS
    cases = pool([("a", "gradable_unlabelled")])
    with pytest.raises(ValueError, match=r"proba must be \(1, 4\)"):
        labelling_queue(cases, np.array([UNSURE, UNSURE]), CLASSES, features(["1-2"], ["FST1-2"]), LABELLED)
    with pytest.raises(ValueError, match="unknown status"):
        labelling_queue(pool([("a", "??")]), np.array([UNSURE]), CLASSES, features(["1-2"], ["FST1-2"]), LABELLED)


def test_pool_cases_table_has_one_row_per_case_with_its_images():
    pool_table = pd.DataFrame(
        {"case_id": ["1", "1", "2"], "image_id": ["b", "a", "c"], "reason": ["ungradable"] * 2 + ["no_pathology"]}
    )
    table = pool_cases_table(pool_table)
    assert table.to_dict("records") == [
        {"case_id": "1", "status": "ungradable", "n_images": 2, "image_ids": "a b"},
        {"case_id": "2", "status": "no_pathology", "n_images": 1, "image_ids": "c"},
    ]
