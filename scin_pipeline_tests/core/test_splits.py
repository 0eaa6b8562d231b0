"""Label policy and grouped, stratified, deterministic splits."""

from __future__ import annotations

import pandas as pd
import pytest

from scin_pipeline.core.splits import (
    OTHER,
    LabelPolicy,
    SplitConfig,
    assign_labels,
    class_presence,
    leakage,
    make_splits,
)


def cases_frame(rows: list[tuple[str, list[str], list[float]]], tied: set[str] = frozenset()) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "case_id": [r[0] for r in rows],
            "weighted_label_names": [r[1] for r in rows],
            "weighted_label_weights": [r[2] for r in rows],
            "top_label_tied": [r[0] in tied for r in rows],
        }
    )


def many(prefix: str, n: int, names: list[str], weights: list[float]):
    return [(f"{prefix}{i}", names, weights) for i in range(n)]


def test_top1_policy_min_weight_and_rare_classes_merged_into_other():
    cases = cases_frame(
        many("e", 5, ["Eczema", "Tinea"], [0.6, 0.4])
        + many("u", 5, ["Urticaria"], [1.0])
        + [("r1", ["Rare"], [1.0]), ("w1", ["Eczema"], [0.3]), ("n1", [], [])]
    )
    labels = assign_labels(cases, LabelPolicy(min_weight=0.5, min_cases_per_class=2))
    by_case = labels.set_index("case_id")
    assert "w1" not in by_case.index and "n1" not in by_case.index  # below min_weight; unlabelled
    assert by_case.loc["r1", "label"] == OTHER and by_case.loc["r1", "labels"] == [OTHER]
    assert by_case.loc["e0", "label"] == "Eczema" and by_case.loc["e0", "labels"] == ["Eczema"]
    dropped = assign_labels(cases, LabelPolicy(min_weight=0.5, min_cases_per_class=2, rare_classes="drop"))
    assert "r1" not in set(dropped["case_id"])
    assert set(dropped["label"]) == {"Eczema", "Urticaria"}


def test_multilabel_policy_keeps_the_top_k_conditions_in_rank_order():
    cases = cases_frame(
        many("a", 4, ["Eczema", "Tinea", "Acne"], [0.5, 0.3, 0.2])
        + many("b", 3, ["Tinea"], [1.0])
        + [("c", ["Zoster", "Eczema"], [0.6, 0.4]), ("d", ["Zoster"], [1.0])]
    )
    labels = assign_labels(cases, LabelPolicy(mode="multilabel", top_k=2, min_cases_per_class=1))
    by_case = labels.set_index("case_id")
    assert by_case.loc["a0", "labels"] == [
        "Eczema",
        "Tinea",
    ]  # Tinea (7 mentions), Eczema (5) are top-2; Acne (4) is not
    assert by_case.loc["c", "labels"] == ["Eczema"] and by_case.loc["c", "label"] == "Eczema"
    assert by_case.loc["d", "label"] == OTHER


def test_tied_top_labels_can_be_dropped():
    cases = cases_frame([("t", ["A", "B"], [0.5, 0.5]), ("u", ["A"], [1.0])], tied={"t"})
    assert set(assign_labels(cases, LabelPolicy(min_cases_per_class=1))["case_id"]) == {"t", "u"}
    assert set(assign_labels(cases, LabelPolicy(min_cases_per_class=1, drop_tied_top=True))["case_id"]) == {"u"}


@pytest.mark.parametrize(
    "kwargs", [dict(mode="topk"), dict(min_weight=2), dict(mode="multilabel"), dict(rare_classes="keep")]
)
def test_invalid_policies_are_refused(kwargs):
    with pytest.raises(ValueError):
        LabelPolicy(**kwargs)


def labelled(n_per_class: dict[str, int]) -> pd.DataFrame:
    rows = [(f"{label}-{i}", label) for label, n in n_per_class.items() for i in range(n)]
    return pd.DataFrame(rows, columns=["case_id", "label"])


def test_groups_stay_whole_and_no_case_or_group_leaks():
    labels = labelled({"A": 60, "B": 40, "C": 9})
    # Chain cases into groups of three: share near-duplicates, and so on.
    groups = pd.Series({cid: f"g{i // 3}" for i, cid in enumerate(labels["case_id"])})
    split = make_splits(labels, groups)
    assert split.groupby("group_id")["split"].nunique().max() == 1
    assert leakage(split, "case_id").empty and leakage(split, "group_id").empty


def test_split_fractions_and_stratification():
    split = make_splits(labelled({"A": 200, "B": 100, "C": 20}), pd.Series(dtype=str))
    shares = split["split"].value_counts(normalize=True)
    assert abs(shares["train"] - 0.7) < 0.02 and abs(shares["val"] - 0.15) < 0.02
    presence = class_presence(split, min_per_split=3).set_index("label")
    assert presence["ok"].all()
    for label, n in (("A", 200), ("B", 100), ("C", 20)):
        assert abs(presence.loc[label, "train"] / n - 0.7) < 0.06


def test_small_class_still_reaches_val_and_test():
    presence = class_presence(make_splits(labelled({"A": 50, "Tiny": 3}), pd.Series(dtype=str)), 1)
    assert presence.set_index("label").loc["Tiny", ["train", "val", "test"]].tolist() == [1, 1, 1]


def test_splits_are_deterministic_and_seeded_and_stable_under_additions():
    labels = labelled({"A": 80, "B": 50})
    first = make_splits(labels, pd.Series(dtype=str)).set_index("case_id")["split"]
    shuffled = make_splits(labels.sample(frac=1, random_state=3), pd.Series(dtype=str)).set_index("case_id")["split"]
    assert first.sort_index().equals(shuffled.sort_index())
    other_seed = make_splits(labels, pd.Series(dtype=str), SplitConfig(seed=1)).set_index("case_id")["split"]
    assert not first.sort_index().equals(other_seed.sort_index())


def test_leakage_detects_a_planted_leak():
    split = make_splits(labelled({"A": 30}), pd.Series(dtype=str))
    split["cluster_id"] = split["case_id"]
    split.loc[split.index[:2], "cluster_id"] = "shared"
    if split.loc[split.index[0], "split"] == split.loc[split.index[1], "split"]:
        other = next(s for s in ("train", "val", "test") if s != split.loc[split.index[0], "split"])
        split.loc[split.index[1], "split"] = other
    bad = leakage(split, "cluster_id")
    assert bad["cluster_id"].tolist() == ["shared"] and len(bad["splits"].iloc[0]) == 2


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError):
        SplitConfig(fractions=(0.8, 0.3, 0.1))


@pytest.mark.real_metadata
def test_real_labels_top10_multilabel_every_class_in_val_and_test(real_parsed_metadata):
    labels = assign_labels(real_parsed_metadata.cases, LabelPolicy(mode="multilabel", top_k=10))
    assert len(labels) == 3061
    assert labels["label"].nunique() == 11  # ten conditions + other
    split = make_splits(labels, pd.Series(dtype=str))
    assert class_presence(split, min_per_split=10)["ok"].all()
