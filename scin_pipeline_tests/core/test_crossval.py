"""Out-of-fold predictions: folds keep cases and duplicate groups whole, every case is scored once by a model
that never saw it or its near duplicates, and a planted gap on Monk 7-10 that the test split is too small to
see is caught by the gate on cross-validated estimates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from scin_pipeline.core import crossval, fairness


def case_table(n: int = 600, seed: int = 0, deep_share: float = 0.06) -> pd.DataFrame:
    """``n`` cases of 4 labels and Monk bins; every 7th case shares a duplicate group with the next one."""
    rng = np.random.default_rng(seed)
    bins = rng.choice(["1-2", "3-4", "5-6", "7-10"], size=n, p=[0.4, 0.34, 0.26 - deep_share, deep_share])
    case_id = [f"c{i:04d}" for i in range(n)]
    group_id = [case_id[i - 1] if i % 7 == 1 else case_id[i] for i in range(n)]
    return pd.DataFrame(
        {"case_id": case_id, "group_id": group_id, "label": rng.choice(list("abcd"), size=n), "monk_bin": bins}
    )


def test_folds_keep_groups_whole_are_deterministic_and_spread_every_stratum():
    cases = case_table()
    folds = crossval.assign_folds(cases, 5, seed=3)
    assert folds.index.equals(cases.index) and set(folds) == set(range(5))
    assert (cases.assign(fold=folds).groupby("group_id")["fold"].nunique() == 1).all()
    assert folds.equals(crossval.assign_folds(cases, 5, seed=3))
    assert not folds.equals(crossval.assign_folds(cases, 5, seed=4))
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 3
    deep = np.bincount(folds[cases["monk_bin"] == "7-10"], minlength=5)
    assert deep.max() - deep.min() <= 2, deep  # the rare deep tones spread over the folds
    # Adding a case moves no other case's fold more than the balancing needs: same inputs, same folds.
    assert crossval.assign_folds(cases.iloc[::-1], 5, seed=3).sort_index().equals(folds)


def test_assign_folds_refuses_bad_input():
    cases = case_table(40)
    with pytest.raises(ValueError, match="monk_bin"):
        crossval.assign_folds(cases.drop(columns=["monk_bin"]), 3)
    with pytest.raises(ValueError, match="at least 2 folds"):
        crossval.assign_folds(cases, 1)
    with pytest.raises(ValueError, match="one row per case"):
        crossval.assign_folds(pd.concat([cases, cases.iloc[:1]]), 3)


def test_no_case_is_scored_by_a_model_that_saw_it_or_its_near_duplicates():
    cases = case_table(300)
    folds = crossval.assign_folds(cases, 3).to_numpy()
    groups = cases["group_id"].to_numpy()
    seen: list[tuple[set, np.ndarray]] = []

    def fit_predict(train, held_out):
        seen.append((set(cases["case_id"].iloc[train]), held_out))
        return np.full((len(held_out), 2), 0.5)

    proba = crossval.out_of_fold_proba(folds, groups, fit_predict, 2)
    assert np.isfinite(proba).all() and len(seen) == 3
    scored = np.concatenate([held for _, held in seen])
    assert sorted(scored) == list(range(len(cases)))  # every case scored exactly once
    for trained_on, held_out in seen:
        held_cases = cases.iloc[held_out]
        assert not trained_on & set(held_cases["case_id"])
        mates = set(cases.loc[cases["group_id"].isin(held_cases["group_id"]), "case_id"])
        assert not trained_on & mates  # nor any case of the same duplicate group


def test_out_of_fold_refuses_folds_that_split_a_group():
    folds = np.array([0, 1, 0, 1])
    groups = np.array(["g1", "g1", "g2", "g3"])  # g1 on both sides
    with pytest.raises(ValueError, match="both trained on and held out"):
        crossval.out_of_fold_proba(folds, groups, lambda tr, ho: np.zeros((len(ho), 2)), 2)
    with pytest.raises(ValueError, match="expected"):
        crossval.out_of_fold_proba(np.array([0, 1]), np.array(["a", "b"]), lambda tr, ho: np.zeros((1, 3)), 2)


def planted_deep_gap(n: int = 2000, seed: int = 5):
    """Features predict the label, except on Monk 7-10 (about 7 % of cases), where they are pure noise."""
    cases = case_table(n, seed=seed, deep_share=0.07)
    rng = np.random.default_rng(seed)
    y = cases["label"].map({c: i for i, c in enumerate("abcd")}).to_numpy()
    x = np.eye(4)[y] * 2.0 + rng.normal(size=(n, 4))
    deep = (cases["monk_bin"] == "7-10").to_numpy()
    x[deep] = rng.normal(size=(deep.sum(), 4))
    sensitive = pd.DataFrame({"monk_us_bin": cases["monk_bin"].to_numpy()})
    return cases, x, y, sensitive


def test_a_planted_gap_on_monk_7_10_is_caught_out_of_fold_and_unseen_on_the_test_split():
    cases, x, y, sensitive = planted_deep_gap()
    order = np.argsort([hash_of(c) for c in cases["group_id"]])
    test = np.zeros(len(cases), dtype=bool)
    test[order[: int(0.15 * len(cases))]] = True  # a 15 % test split, by group
    test = cases["group_id"].isin(cases.loc[test, "group_id"]).to_numpy()

    def fit(rows):
        return LogisticRegression(max_iter=500).fit(x[rows], y[rows])

    # Test split: fit on the rest, score the test cases.
    model = fit(np.flatnonzero(~test))
    test_table = fairness.fairness_table(
        "m",
        y[test],
        model.predict_proba(x[test]),
        list("abcd"),
        sensitive[test].reset_index(drop=True),
        n_bootstrap=200,
        min_group_n=30,
    )
    test_gate = fairness.fairness_gate(test_table, attributes=["monk_us_bin"], min_group_n=30)
    assert int(test_table.loc[test_table["group"] == "7-10", "n"].iloc[0]) < 30
    assert test_gate.status == "not_judged"  # the single split cannot see the gap

    # Out of fold over the rest (train+val).
    tv = np.flatnonzero(~test)
    folds = crossval.assign_folds(cases.iloc[tv].reset_index(drop=True), 3).to_numpy()
    oof = crossval.out_of_fold_proba(
        folds,
        cases["group_id"].to_numpy()[tv],
        lambda tr, ho: fit(tv[tr]).predict_proba(x[tv[ho]]),
        4,
    )
    cv_table = fairness.fairness_table(
        "m", y[tv], oof, list("abcd"), sensitive.iloc[tv].reset_index(drop=True), n_bootstrap=200, min_group_n=30
    )
    cv_gate = fairness.fairness_gate(
        cv_table, attributes=["monk_us_bin"], min_group_n=30, source=crossval.oof_source(3)
    )
    assert cv_gate.status == "failed", cv_gate.reason
    assert (cv_gate.worst.attribute, cv_gate.worst.group) == ("monk_us_bin", "7-10") and cv_gate.worst.n >= 30
    assert "out-of-fold" in cv_gate.reason


def hash_of(value: str) -> int:
    from scin_pipeline.core.splits import stable_hash

    return stable_hash("test-split", value)
