"""The unlabelled pool's rule: quality-kept images of cases without a usable label, nothing of val/test."""

from __future__ import annotations

import pandas as pd
import pytest

from scin_pipeline.core import schema
from scin_pipeline.core.unlabelled import (
    CASE_GROUP_WITH_EVAL,
    DERM_UNGRADABLE,
    LABEL_OUTSIDE_POLICY,
    NEAR_DUPLICATE_OF_EVAL,
    SAME_IMAGE_AS_EVAL,
    build_unlabelled_pool,
    pool_composition,
    pool_leaks,
    quality_kept_references,
)

# (case_id, label_status, [image ids], Monk US tone, sex)
CASES = [
    ("L1", "labelled", ["a1"], 2, "FEMALE"),  # train
    ("L2", "labelled", ["b1"], 3, "MALE"),  # test
    ("L3", "labelled", ["c1"], 4, "FEMALE"),  # val
    ("L6", "labelled", ["l6"], 5, "MALE"),  # labelled, but the label policy left it out of the splits
    ("U1", "ungradable", ["u1"], 8, "FEMALE"),  # clean: pooled
    ("U2", "ungradable", ["u2", "u2b"], 2, "MALE"),  # u2 is a near duplicate of test image b1
    ("U3", "no_pathology", ["b1"], 3, "FEMALE"),  # the very file of test case L2 (exact reuse)
    ("U4", "gradable_unlabelled", ["u4a", "u4b"], 6, "MALE"),  # u4b near-duplicates val image c1
    ("U5", "ungradable", ["u5"], 9, "FEMALE"),  # near-duplicates train image a1: allowed
    ("U7", "ungradable", ["u7"], 1, "MALE"),  # its one image failed quality
    ("U8", "ungradable", ["u8"], 7, "FEMALE"),  # near-duplicates U2's u2b: linked to test through U2
    ("U9", "gradable_unlabelled", ["u9"], 10, "FEMALE"),  # clean
]
SPLIT = {"L1": "train", "L2": "test", "L3": "val"}
# Clusters as dedup_clusters would give them: connected components of near-duplicate links.
CLUSTER = {"u2": "b1", "b1": "b1", "u4b": "c1", "c1": "c1", "u5": "a1", "a1": "a1", "u8": "u2b", "u2b": "u2b"}


def inputs():
    images = pd.DataFrame(
        [(i, c, "ok", "CLOSE_UP") for c, _, ids, _, _ in CASES for i in ids],
        columns=["image_id", "case_id", "path_status", "shot_type"],
    )
    quality = images.drop_duplicates("image_id")[["image_id"]].assign(keep=True, local_path="/x.png")
    quality.loc[quality["image_id"] == "u7", "keep"] = False
    race = {c: [False] * len(CASES) for c in schema.RACE_COLUMNS}
    cases = pd.DataFrame(
        {
            "case_id": [c for c, *_ in CASES],
            "label_status": [s for _, s, *_ in CASES],
            "monk_skin_tone_label_us": pd.array([t for *_, t, _ in CASES], dtype="Int8"),
            "monk_skin_tone_label_india": pd.array([t for *_, t, _ in CASES], dtype="Int8"),
            "fst_dermatologist": [None] * len(CASES),
            "fitzpatrick_skin_type": ["FST2"] * len(CASES),
            "sex_at_birth": [s for *_, s in CASES],
            "age_group": ["AGE_30_TO_39"] * len(CASES),
            **race,
        }
    )
    splits = images[images["case_id"].isin(SPLIT)][["image_id", "case_id"]].assign(
        split=lambda f: f["case_id"].map(SPLIT)
    )
    kept = images[images["image_id"] != "u7"][["image_id", "case_id"]]
    clusters = kept.assign(cluster_id=kept["image_id"].map(lambda i: CLUSTER.get(i, i)))
    return images, quality, cases, splits, clusters


def build(**kwargs):
    images, quality, cases, splits, clusters = inputs()
    return build_unlabelled_pool(quality_kept_references(images, quality), cases, splits, clusters, **kwargs)


def test_the_pool_holds_unlabelled_quality_kept_cases_and_nothing_linked_to_val_or_test():
    result = build()
    pool = result.pool.set_index("image_id")
    assert set(result.pool["case_id"]) == {"U1", "U5", "L6", "U9"}
    assert pool.loc["u1", "reason"] == "ungradable" and pool.loc["u9", "reason"] == "gradable_unlabelled"
    assert pool.loc["l6", "reason"] == LABEL_OUTSIDE_POLICY and pool.loc["l6", "label_status"] == "labelled"
    # Linked to a training case only: no leak, kept, and flagged for the folds of a cross-validation.
    assert bool(pool.loc["u5", "linked_to_train"]) and not bool(pool.loc["u1", "linked_to_train"])
    excluded = result.excluded.set_index("image_id")["excluded_by"].to_dict()
    assert excluded == {
        "u2": NEAR_DUPLICATE_OF_EVAL,
        "u2b": CASE_GROUP_WITH_EVAL,  # U2's other photo: the case goes whole
        "b1": SAME_IMAGE_AS_EVAL,
        "u4b": NEAR_DUPLICATE_OF_EVAL,
        "u4a": CASE_GROUP_WITH_EVAL,
        "u8": CASE_GROUP_WITH_EVAL,  # a near duplicate of U2's photo, and U2 is linked to test
    }
    assert "u7" not in pool.index and "u7" not in excluded  # failed quality: never a candidate
    assert pool_leaks(result.pool, inputs()[3], inputs()[4]).empty


def test_ungradable_cases_can_be_left_out():
    result = build(include_derm_ungradable=False)
    assert set(result.pool["case_id"]) == {"L6", "U9"}
    assert result.excluded.set_index("image_id").loc["u1", "excluded_by"] == DERM_UNGRADABLE


@pytest.mark.parametrize(
    ("case_id", "image_id", "leak", "split"),
    [
        ("L2", "b1", "labelled_case", "test"),
        ("U3", "b1", SAME_IMAGE_AS_EVAL, "test"),
        ("U2", "u2", NEAR_DUPLICATE_OF_EVAL, "test"),
        ("U4", "u4a", CASE_GROUP_WITH_EVAL, "val"),
    ],
)
def test_a_planted_leak_is_found_from_the_clusters_whatever_the_pool_says(case_id, image_id, leak, split):
    _images, _quality, _cases, splits, clusters = inputs()
    pool = build().pool
    # The planted row claims to be its own cluster and group: the check must not believe it.
    planted = pd.DataFrame([{"case_id": case_id, "image_id": image_id, "cluster_id": image_id, "group_id": case_id}])
    leaks = pool_leaks(pd.concat([pool, planted], ignore_index=True), splits, clusters)
    assert leaks[["case_id", "image_id", "leak", "evaluation_split"]].values.tolist() == [
        [case_id, image_id, leak, split]
    ]


def test_composition_sets_the_pool_beside_the_labelled_set():
    _images, _quality, cases, splits, _clusters = inputs()
    table = pool_composition(build().pool, splits, cases)
    monk = table[table["attribute"] == "monk_us_bin"].set_index("group")
    # Labelled: L1 (2), L2 (3), L3 (4). Pool: U1 (8), U5 (9), L6 (5), U9 (10).
    assert monk.loc["7-10", "pool_n"] == 3 and monk.loc["7-10", "labelled_n"] == 0
    assert monk.loc["3-4", "labelled_n"] == 2 and monk.loc["3-4", "labelled_share"] == pytest.approx(2 / 3)
    assert monk.loc["5-6", "pool_share"] == pytest.approx(1 / 4)
    sex = table[table["attribute"] == "sex_at_birth"].set_index("group")
    assert sex.loc["FEMALE", "pool_n"] == 3 and sex.loc["MALE", "labelled_n"] == 1
    assert {"fst_dermatologist", "fst_self_reported", "monk_india_bin"} <= set(table["attribute"])


def test_the_composition_of_a_run_whose_splits_hold_no_case_counts_the_pool_alone():
    # A tiny run (or one killed before splitting) has no labelled case: the labelled columns are zeros, not a
    # KeyError that fails unlabelled_pool.
    images, quality, cases, splits, clusters = inputs()
    table = pool_composition(build().pool, splits.iloc[0:0], cases)
    assert (table["labelled_n"] == 0).all()
    monk = table[table["attribute"] == "monk_us_bin"].set_index("group")
    assert monk.loc["7-10", "pool_n"] == 3


def test_a_reference_to_an_unknown_case_is_named():
    images, quality, cases, splits, clusters = inputs()
    with pytest.raises(ValueError, match="case_id U1 is not in cases"):
        build_unlabelled_pool(
            quality_kept_references(images, quality), cases[cases["case_id"] != "U1"], splits, clusters
        )
