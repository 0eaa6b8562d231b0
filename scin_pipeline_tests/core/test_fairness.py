"""Fairness core: sensitive features from case metadata, MetricFrame-based group metrics checked against
values computed by hand, bootstrap intervals (contain the estimate, narrow with n, agree with the point
estimate at unit weights), Wilson intervals where the bootstrap has no spread (0/n, n/n), tiny groups
flagged, the gate on planted gaps and on hand-made tables, representation by split, and the reports."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from scin_pipeline.core import schema
from scin_pipeline.core.evaluation import top_k_hits
from scin_pipeline.core.fairness import (
    ATTRIBUTES,
    CI_BOOTSTRAP,
    CI_BOOTSTRAP_WILSON,
    CI_WILSON,
    FAIRNESS_METRICS,
    TABLE_COLUMNS,
    GateResult,
    _group_rng,
    bin_of,
    bootstrap_metrics,
    fairness_gate,
    fairness_table,
    group_order,
    metric_interval,
    representation_by_split,
    run_metric_name,
    run_metrics,
    sensitive_features,
    weighted_metrics,
    wilson_interval,
)
from scin_pipeline.core.schema import MISSING_GROUP, MULTIPLE_GROUP, OVERALL
from scin_pipeline_tests.core.fairness_inputs import case_frame, model_output


def proba_for(pred, k: int, top: float = 0.6) -> np.ndarray:
    pred = np.asarray(pred)
    proba = np.full((len(pred), k), (1.0 - top) / (k - 1))
    proba[np.arange(len(pred)), pred] = top
    return proba


def value(table: pd.DataFrame, attribute: str, group: str, metric: str, column: str = "value"):
    row = table[(table["attribute"] == attribute) & (table["group"] == group) & (table["metric"] == metric)]
    assert len(row) == 1, (attribute, group, metric)
    return row[column].iloc[0]


# ------------------------------------------------------------------------------ sensitive features


def test_sensitive_features_by_hand():
    features = sensitive_features(case_frame())
    assert list(features.columns) == ATTRIBUTES
    assert list(features.index) == [10, 11, 12, 13, 14]
    assert features["monk_skin_tone_us"].tolist() == ["1", "4", "7", "10", MISSING_GROUP]
    assert features["monk_us_bin"].tolist() == ["1-2", "3-4", "7-10", "7-10", MISSING_GROUP]
    assert features["monk_india_bin"].tolist() == ["1-2", "3-4", MISSING_GROUP, "7-10", "5-6"]
    assert features["fst_dermatologist"].tolist() == ["FST1", MISSING_GROUP, "FST6", "FST3", "FST2"]
    # "NONE_IDENTIFIED" / "AGE_UNKNOWN" are answers, kept apart from a missing answer.
    assert features["fst_self_reported"].tolist() == ["FST2", "NONE_IDENTIFIED", MISSING_GROUP, "FST5", "FST1"]
    assert features["age_group"].tolist() == [
        "AGE_18_TO_29",
        "AGE_UNKNOWN",
        "AGE_80_OR_ABOVE",
        MISSING_GROUP,
        "AGE_30_TO_39",
    ]
    # one box -> its group; two boxes or the release's mitigation flag -> multiple; none -> unknown
    assert features["race_ethnicity"].tolist() == [
        "WHITE",
        MULTIPLE_GROUP,
        "PREFER_NOT_TO_ANSWER",
        MULTIPLE_GROUP,
        MISSING_GROUP,
    ]


def test_sensitive_features_reads_raw_yes_flags_and_custom_bins():
    cases = case_frame()
    for column in schema.RACE_COLUMNS:
        cases[column] = cases[column].map({True: "YES", False: None})
    features = sensitive_features(cases, monk_bins=[(1, 3), (4, 6), (7, 8), (9, 10)])
    assert features["race_ethnicity"].tolist() == [
        "WHITE",
        MULTIPLE_GROUP,
        "PREFER_NOT_TO_ANSWER",
        MULTIPLE_GROUP,
        MISSING_GROUP,
    ]
    assert features["monk_us_bin"].tolist() == ["1-3", "4-6", "7-8", "9-10", MISSING_GROUP]


@pytest.mark.parametrize("bins", [[(1, 2), (3, 10), (5, 6)], [(1, 4), (6, 10)], [(2, 1), (3, 10)]])
def test_bad_monk_bins_are_refused(bins):
    with pytest.raises(ValueError, match="monk_bins"):
        sensitive_features(case_frame(), monk_bins=bins)


def test_bad_tone_and_missing_column_are_named():
    cases = case_frame()
    cases["monk_skin_tone_label_us"] = [1, 4, 12, 10, None]
    with pytest.raises(ValueError, match=r"monk_skin_tone_label_us.*row 12.*not an integer 1-10"):
        sensitive_features(cases)
    with pytest.raises(ValueError, match="age_group"):
        sensitive_features(case_frame().drop(columns=["age_group"]))


@pytest.mark.real_metadata
def test_sensitive_features_on_the_real_release(real_parsed_metadata):
    cases = real_parsed_metadata.cases
    features = sensitive_features(cases)
    tones = features["monk_skin_tone_us"].value_counts()
    # README facts: tones 1-10 = 577, 1,660, 1,265, 687, 361, 248, 137, 57, 11, 2; 28 missing.
    assert [tones[str(t)] for t in range(1, 11)] == [577, 1660, 1265, 687, 361, 248, 137, 57, 11, 2]
    assert tones[MISSING_GROUP] == 28
    assert features["monk_us_bin"].value_counts()["7-10"] == 137 + 57 + 11 + 2
    race = features["race_ethnicity"].value_counts()
    ticks = cases[[c for c in schema.RACE_COLUMNS if "two_or_more" not in c]].astype(bool).sum(axis=1)
    merged = cases["race_ethnicity_two_or_more_after_mitigation"].astype(bool)
    assert race[MULTIPLE_GROUP] == int(((ticks >= 2) | merged).sum())
    assert race[MISSING_GROUP] == int(((ticks == 0) & ~merged).sum())
    assert race.sum() == len(cases)


def test_group_order_is_natural():
    assert group_order("monk_skin_tone_us", ["10", MISSING_GROUP, "2", "1"]) == ["1", "2", "10", MISSING_GROUP]
    assert group_order("monk_us_bin", ["7-10", "1-2", MISSING_GROUP, "3-4"]) == ["1-2", "3-4", "7-10", MISSING_GROUP]
    assert group_order("age_group", [MISSING_GROUP, "AGE_40_TO_49", "AGE_18_TO_29"]) == [
        "AGE_18_TO_29",
        "AGE_40_TO_49",
        MISSING_GROUP,
    ]


# ------------------------------------------------------------------------ group metrics by hand


def hand_fixture():
    """Twelve rows, two groups of six, three classes.

    A: y 0 0 0 1 1 2, pred 0 0 1 1 1 0 -> accuracy 4/6; recall 2/3, 2/2, 0/1 -> balanced 5/9;
       F1 c0 2/3, c1 4/5, c2 0 -> macro 22/45
    B: y 0 1 1 1 2 2, pred 1 1 0 0 2 2 -> accuracy 3/6; recall 0/1, 1/3, 2/2 -> balanced 4/9;
       F1 c0 0 (TP0), c1 2*1/(3+2) = 2/5, c2 2*2/(2+2) = 1 -> macro 7/15
    all: accuracy 7/12; recall c0 2/4, c1 3/5, c2 2/3 -> balanced (1/2 + 3/5 + 2/3) / 3 = 53/90
    """
    y = np.array([0, 0, 0, 1, 1, 2, 0, 1, 1, 1, 2, 2])
    pred = np.array([0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 2, 2])
    sensitive = pd.DataFrame({"colour": ["A"] * 6 + ["B"] * 6})
    return y, proba_for(pred, 3), sensitive


def test_group_metrics_match_hand_computed_values():
    y, proba, sensitive = hand_fixture()
    table = fairness_table("m", y, proba, list("abc"), sensitive, n_bootstrap=50, min_group_n=1)
    assert list(table.columns) == TABLE_COLUMNS
    assert value(table, "colour", "A", "accuracy") == pytest.approx(4 / 6)
    assert value(table, "colour", "B", "accuracy") == pytest.approx(3 / 6)
    assert value(table, "colour", "A", "balanced_accuracy") == pytest.approx(5 / 9)
    assert value(table, "colour", "B", "balanced_accuracy") == pytest.approx(4 / 9)
    assert value(table, "colour", "A", "macro_f1") == pytest.approx(22 / 45)
    assert value(table, "colour", "B", "macro_f1") == pytest.approx(7 / 15)
    assert value(table, OVERALL, OVERALL, "accuracy") == pytest.approx(7 / 12)
    assert value(table, OVERALL, OVERALL, "balanced_accuracy") == pytest.approx(53 / 90)
    assert value(table, "colour", "B", "balanced_accuracy", "diff_to_overall") == pytest.approx(4 / 9 - 53 / 90)
    assert value(table, "colour", "B", "accuracy", "ratio_to_overall") == pytest.approx((3 / 6) / (7 / 12))
    assert value(table, "colour", "A", "accuracy", "n") == 6
    # The worst group per metric: B on accuracy and balanced accuracy.
    worst = table[table["worst"]].set_index("metric")["group"]
    assert worst["accuracy"] == "B" and worst["balanced_accuracy"] == "B"
    assert table.loc[table["attribute"] == OVERALL, "worst"].eq(False).all()


def test_unit_weights_reproduce_the_point_estimates():
    """The bootstrap's vectorised metrics and MetricFrame agree exactly at one draw per row, ties and
    absent classes included."""
    rng = np.random.default_rng(7)
    y, proba = model_output(300, 6, signal=1.0, rng=rng)
    proba = np.round(proba, 2)  # ties in the scores
    proba /= proba.sum(axis=1, keepdims=True)
    y[y == 5] = 4  # class 5 absent from y_true
    groups = pd.DataFrame({"g": rng.choice(["x", "y", "z"], size=300)})
    table = fairness_table("m", y, proba, [f"c{i}" for i in range(6)], groups, n_bootstrap=0)
    pred = proba.argmax(axis=1)
    for group in ["x", "y", "z", OVERALL]:
        rows = np.arange(300) if group == OVERALL else np.flatnonzero(groups["g"] == group)
        unit = weighted_metrics(
            y[rows], pred[rows], proba[rows], top_k_hits(y[rows], proba[rows]), np.ones((1, len(rows)))
        )
        attribute = OVERALL if group == OVERALL else "g"
        for metric in FAIRNESS_METRICS:
            assert unit[metric][0] == pytest.approx(value(table, attribute, group, metric)), (group, metric)


# ------------------------------------------------------------------------------------- intervals


def test_intervals_contain_the_estimate_and_narrow_with_n():
    rng = np.random.default_rng(8)
    widths = {}
    for n in (100, 2_000):
        y, proba = model_output(n, 5, signal=1.5, rng=rng)
        table = fairness_table("m", y, proba, list("abcde"), pd.DataFrame({"g": ["all"] * n}), n_bootstrap=200, seed=1)
        group = table[table["attribute"] == "g"]
        assert (group["ci_low"] <= group["value"]).all() and (group["value"] <= group["ci_high"]).all()
        assert (group["n_boot_valid"] == 200).all()
        widths[n] = (group["ci_high"] - group["ci_low"]).to_numpy()
    # Width shrinks like 1/sqrt(n): 20x the rows -> about 4.5x narrower; ask for at least 2.5x.
    assert (widths[2_000] * 2.5 < widths[100]).all(), widths


def test_intervals_are_reproducible_and_independent_of_other_groups():
    y, proba, sensitive = hand_fixture()
    one = fairness_table("m", y, proba, list("abc"), sensitive, n_bootstrap=100, seed=3)
    again = fairness_table("m", y, proba, list("abc"), sensitive, n_bootstrap=100, seed=3)
    pd.testing.assert_frame_equal(one, again)
    wider = sensitive.assign(other=["p", "q"] * 6)
    more = fairness_table("m", y, proba, list("abc"), wider, n_bootstrap=100, seed=3)
    pd.testing.assert_frame_equal(one, more[more["attribute"] != "other"].reset_index(drop=True))
    different_seed = fairness_table("m", y, proba, list("abc"), sensitive, n_bootstrap=100, seed=4)
    assert not np.allclose(one["ci_low"], different_seed["ci_low"], equal_nan=True)


def test_undefined_resamples_are_skipped_and_counted():
    # Group "tiny": 3 rows, classes 0, 0, 1 -> about a third of resamples hold one class (no AUC).
    rng = np.random.default_rng(9)
    y, proba = model_output(200, 3, signal=1.0, rng=rng)
    y[:3] = [0, 0, 1]
    sensitive = pd.DataFrame({"g": ["tiny"] * 3 + ["big"] * 197})
    table = fairness_table("m", y, proba, list("abc"), sensitive, n_bootstrap=200)
    valid = value(table, "g", "tiny", "mean_ovr_auc", "n_boot_valid")
    assert 80 < valid < 200
    assert value(table, "g", "tiny", "accuracy", "n_boot_valid") == 200


def test_tiny_groups_are_flagged_never_hidden_never_worst():
    rng = np.random.default_rng(10)
    y, proba = model_output(400, 4, signal=2.0, rng=rng)
    groups = np.array(["big"] * 190 + ["large"] * 190 + ["tiny"] * 20, dtype=object)
    wrong = np.flatnonzero(groups == "tiny")
    proba[wrong] = proba_for((y[wrong] + 1) % 4, 4)  # the tiny group is always wrong
    table = fairness_table("m", y, proba, list("abcd"), pd.DataFrame({"g": groups}), min_group_n=30)
    tiny = table[(table["attribute"] == "g") & (table["group"] == "tiny")]
    assert len(tiny) == len(FAIRNESS_METRICS)
    assert tiny["insufficient_data"].all() and not tiny["worst"].any()
    assert value(table, "g", "tiny", "accuracy") == 0.0
    assert np.isfinite(tiny["ci_low"]).all()
    worst = table[table["worst"] & (table["attribute"] == "g")]
    assert len(worst) == len(FAIRNESS_METRICS) and set(worst["group"]) <= {"big", "large"}
    # One judgeable group alone is not "worst": there is nothing to compare it with.
    alone = fairness_table("m", y, proba, list("abcd"), pd.DataFrame({"g": np.where(groups == "tiny", "tiny", "big")}))
    assert not alone["worst"].any()


# ------------------------------------------------------------------- degenerate bootstrap -> Wilson


@pytest.mark.parametrize("hits, n", [(0, 37), (37, 37), (1, 10), (12, 400), (0, 1)])
def test_wilson_interval_matches_scipy(hits, n):
    """Our five-line Wilson against an independent implementation (scipy comes with scikit-learn)."""
    from scipy.stats import binomtest

    expected = binomtest(hits, n).proportion_ci(0.95, method="wilson")
    assert wilson_interval(hits, n, 0.95) == pytest.approx((expected.low, expected.high), abs=1e-9)
    assert np.isnan(wilson_interval(0, 0)).all()


def degenerate_fixture(
    n_rest: int = 363, rest_hits: int = 40, n_zero: int = 37, n_all_right: int = 0, k: int = 5, seed: int = 21
):
    """Group "rest" with ``rest_hits`` of ``n_rest`` right (top-1), group "zero" with none right, not
    even in the top 3 (the true class scores lowest), group "all_right" (if any) with every row right."""
    rng = np.random.default_rng(seed)
    n = n_rest + n_zero + n_all_right
    y = rng.integers(0, k, n)
    groups = np.array(["rest"] * n_rest + ["zero"] * n_zero + ["all_right"] * n_all_right, dtype=object)
    right = np.zeros(n, dtype=bool)
    right[rng.choice(n_rest, rest_hits, replace=False)] = True
    right[n_rest + n_zero :] = True
    pred = np.where(right, y, (y + rng.integers(1, k, n)) % k)
    proba = proba_for(pred, k)
    zero = np.flatnonzero(groups == "zero")
    proba[zero] = 0.2  # true class lowest, three others above it -> top-3 miss as well
    proba[zero, y[zero]] = 0.05
    proba[zero, pred[zero]] = 0.35
    proba /= proba.sum(axis=1, keepdims=True)
    return y, proba, pd.DataFrame({"fst": groups})


def test_zero_of_37_gets_the_wilson_upper_bound():
    y, proba, sensitive = degenerate_fixture()
    table = fairness_table("m", y, proba, list("abcde"), sensitive, n_bootstrap=200, seed=5)
    assert list(table.columns) == TABLE_COLUMNS and TABLE_COLUMNS[-1] == "ci_method"
    for metric in ("accuracy", "top3_accuracy"):
        assert value(table, "fst", "zero", metric) == 0.0
        assert value(table, "fst", "zero", metric, "ci_method") == CI_WILSON
        assert value(table, "fst", "zero", metric, "ci_low") == 0.0
        # 95 % Wilson upper bound for 0/37 = z^2 / (37 + z^2) = 0.0941 (exact binomial: 0.095).
        assert value(table, "fst", "zero", metric, "ci_high") == pytest.approx(0.0941, abs=5e-4)
    for metric in ("balanced_accuracy", "macro_f1"):
        assert value(table, "fst", "zero", metric) == 0.0
        assert value(table, "fst", "zero", metric, "ci_method") == CI_BOOTSTRAP_WILSON
        assert value(table, "fst", "zero", metric, "ci_high") == pytest.approx(0.0941, abs=5e-4)
    assert value(table, "fst", "zero", "mean_ovr_auc", "ci_method") == CI_BOOTSTRAP


def test_all_right_group_gets_a_lower_bound_below_one():
    y, proba, sensitive = degenerate_fixture(n_zero=0, n_all_right=20)
    table = fairness_table("m", y, proba, list("abcde"), sensitive, n_bootstrap=200)
    for metric, method in (
        ("accuracy", CI_WILSON),
        ("top3_accuracy", CI_WILSON),
        ("balanced_accuracy", CI_BOOTSTRAP_WILSON),
        ("macro_f1", CI_BOOTSTRAP_WILSON),
    ):
        assert value(table, "fst", "all_right", metric) == 1.0
        assert value(table, "fst", "all_right", metric, "ci_method") == method
        # Wilson lower bound for 20/20 = 20 / (20 + z^2) = 0.839
        assert value(table, "fst", "all_right", metric, "ci_low") == pytest.approx(0.839, abs=1e-3)
        assert value(table, "fst", "all_right", metric, "ci_high") == 1.0


def test_groups_with_spread_keep_the_plain_percentile_interval():
    y, proba, sensitive = degenerate_fixture()
    table = fairness_table("m", y, proba, list("abcde"), sensitive, n_bootstrap=200, seed=5)
    pred = proba.argmax(axis=1)
    for attribute, group in (("fst", "rest"), (OVERALL, OVERALL)):
        rows = np.flatnonzero(sensitive["fst"] == group) if group != OVERALL else np.arange(len(y))
        boot = bootstrap_metrics(
            y[rows], pred[rows], proba[rows], top_k_hits(y[rows], proba[rows]), 200, _group_rng(5, attribute, group)
        )
        for metric in FAIRNESS_METRICS:
            assert value(table, attribute, group, metric, "ci_method") == CI_BOOTSTRAP
            low, high = np.quantile(boot[metric][np.isfinite(boot[metric])], (0.025, 0.975))
            # approx only for the last bit: BLAS matrix products may round differently between calls
            assert value(table, attribute, group, metric, "ci_low") == pytest.approx(low, rel=1e-12)
            assert value(table, attribute, group, metric, "ci_high") == pytest.approx(high, rel=1e-12)


def test_metric_interval_rules():
    spread = np.array([0.4, 0.5, 0.6, np.nan])
    flat = np.array([0.5, 0.5, np.nan, 0.5])
    hits = {"accuracy": 20, "top3_accuracy": 30}
    assert metric_interval("accuracy", spread, hits, 40)[3] == CI_BOOTSTRAP
    low, high, valid, method = metric_interval("top3_accuracy", flat, hits, 40)
    assert (low, high) == pytest.approx(wilson_interval(30, 40)) and valid == 3 and method == CI_WILSON
    # balanced accuracy stuck at 0.5 (one class all right, one all wrong): widened to cover Wilson of
    # accuracy's 20/40, the point stays inside.
    low, high, _, method = metric_interval("balanced_accuracy", flat, hits, 40)
    assert method == CI_BOOTSTRAP_WILSON and (low, high) == pytest.approx(wilson_interval(20, 40))
    low, high, _, method = metric_interval("macro_f1", np.zeros(5), {"accuracy": 3, "top3_accuracy": 9}, 40)
    assert method == CI_BOOTSTRAP_WILSON and low == 0.0 and high == pytest.approx(wilson_interval(3, 40)[1])
    assert metric_interval("mean_ovr_auc", flat, hits, 40)[:2] == (0.5, 0.5)  # AUC stays bootstrap
    assert np.isnan(metric_interval("accuracy", np.empty(0), hits, 40)[:2]).all()  # n_bootstrap=0


@pytest.mark.parametrize("metric", ["accuracy", "balanced_accuracy"])
def test_gate_passes_a_zero_of_37_group_whose_wilson_interval_overlaps(metric):
    # Overall 40/400 = 0.10, percentile interval about [0.07, 0.13]; group "zero" 0/37 -> [0, 0.094].
    # Before the Wilson rule its interval was [0, 0] and the gate failed on it.
    y, proba, sensitive = degenerate_fixture()
    table = fairness_table("m", y, proba, list("abcde"), sensitive, n_bootstrap=200, min_group_n=30)
    zero_high = value(table, "fst", "zero", metric, "ci_high")
    assert value(table, OVERALL, OVERALL, metric, "ci_low") < zero_high
    gate = fairness_gate(table, metric=metric, max_gap=0.05)
    assert gate.passed, gate.reason
    assert gate.worst.group == "zero" and gate.gap > 0.05 and gate.cis_overlap is True


@pytest.mark.parametrize("metric", ["accuracy", "balanced_accuracy"])
def test_gate_still_fails_a_large_group_with_a_clear_gap(metric):
    # Overall 400/1000 = 0.40; group "zero" 0/600 -> Wilson [0, 0.0064], far below.
    y, proba, sensitive = degenerate_fixture(n_rest=400, rest_hits=400, n_zero=600)
    table = fairness_table("m", y, proba, list("abcde"), sensitive, n_bootstrap=200, min_group_n=30)
    assert value(table, "fst", "zero", metric, "ci_high") == pytest.approx(wilson_interval(0, 600)[1])
    gate = fairness_gate(table, metric=metric, max_gap=0.10)
    assert not gate.passed
    assert gate.worst.group == "zero" and gate.cis_overlap is False
    assert "FAILED" in gate.reason


def test_mismatched_rows_are_refused():
    y, proba, sensitive = hand_fixture()
    with pytest.raises(ValueError, match="12"):
        fairness_table("m", y, proba, list("abc"), sensitive.iloc[:5])


# -------------------------------------------------------------------------------------------- gate


def planted(gap: bool, *, tiny_random: bool = False, seed: int = 11, tiny: int = 12):
    """3,000 rows of a good 5-class model; group "bad" (400 rows) gets random predictions if ``gap``;
    group "tiny" (``tiny`` rows, 12 by default) gets random predictions if ``tiny_random``."""
    rng = np.random.default_rng(seed)
    y, proba = model_output(3_000, 5, signal=3.0, rng=rng)
    groups = np.array(["ok"] * (2_600 - tiny) + ["bad"] * 400 + ["tiny"] * tiny, dtype=object)
    for name, on in (("bad", gap), ("tiny", tiny_random)):
        if on:
            rows = np.flatnonzero(groups == name)
            proba[rows] = rng.dirichlet(np.ones(5), size=len(rows))
    return fairness_table("m", y, proba, list("abcde"), pd.DataFrame({"skin": groups}), n_bootstrap=100, min_group_n=30)


def test_gate_fails_on_a_planted_gap():
    gate = fairness_gate(planted(gap=True), metric="balanced_accuracy", max_gap=0.10)
    assert not gate.passed
    assert (gate.worst.attribute, gate.worst.group) == ("skin", "bad")
    assert gate.gap > 0.10 and gate.cis_overlap is False
    assert "FAILED" in gate.reason and "skin=bad" in gate.reason
    assert gate.to_dict()["worst"]["group"] == "bad"


def test_a_stored_gate_reads_back_as_it_was_decided():
    """model_card reads the gate fairness_report stored (JSON through Parquet); it must not drift."""
    for table in (planted(gap=True), planted(gap=False, tiny_random=True)):
        gate = fairness_gate(table, metric="balanced_accuracy", max_gap=0.10)
        stored = json.loads(json.dumps(gate.to_dict()))
        read = GateResult.from_dict(stored)
        assert read.to_dict() == gate.to_dict()
        assert (read.passed, read.reason, read.worst) == (gate.passed, gate.reason, gate.worst)
        assert [g.group for g in read.insufficient_groups] == [g.group for g in gate.insufficient_groups]


def test_gate_passes_without_the_gap():
    gate = fairness_gate(planted(gap=False, tiny=0), metric="balanced_accuracy", max_gap=0.10)
    assert gate.passed and gate.status == "passed", gate.reason
    assert gate.gap <= 0.10
    assert "PASSED" in gate.reason and gate.label == "PASSED"


def test_an_insufficient_group_is_not_judged_never_passed_by_default():
    """A tiny group with no bin to fall back to: the gate cannot judge the model, so it does not pass it;
    the tiny group is named, and never the worst."""
    table = planted(gap=False, tiny_random=True)
    assert value(table, "skin", "tiny", "balanced_accuracy", "diff_to_overall") < -0.10
    gate = fairness_gate(table, metric="balanced_accuracy", max_gap=0.10)
    assert gate.status == "not_judged" and not gate.passed and gate.label == "NOT JUDGED", gate.reason
    assert [g.group for g in gate.insufficient_groups] == ["tiny"]
    assert [g.group for g in gate.unjudged_groups] == ["tiny"] and gate.worst.group != "tiny"
    assert "skin=tiny (n=12)" in gate.reason and gate.reason.startswith("NOT JUDGED")


def test_a_failure_outranks_an_unjudged_group():
    gate = fairness_gate(planted(gap=True), metric="balanced_accuracy", max_gap=0.10)
    assert gate.status == "failed" and [g.group for g in gate.unjudged_groups] == ["tiny"]
    assert "Not judged" in gate.reason


def test_a_missing_group_is_reported_but_never_required():
    rows = [("a", 500, 0.82, 0.79, 0.85, False), ("missing", 5, 0.10, 0.0, 0.5, True)]
    gate = fairness_gate(gate_table(rows), max_gap=0.10)
    assert gate.status == "passed", gate.reason
    assert [g.group for g in gate.insufficient_groups] == ["missing"] and not gate.unjudged_groups


def test_min_group_n_given_to_the_gate_overrides_the_table_flag_and_is_recorded():
    rows = [("a", 500, 0.82, 0.79, 0.85, False), ("b", 40, 0.80, 0.70, 0.90, False)]
    gate = fairness_gate(gate_table(rows), max_gap=0.10, min_group_n=50)
    assert gate.status == "not_judged" and gate.min_group_n == 50
    assert "min_group_n 50" in gate.reason and gate.to_dict()["min_group_n"] == 50


def fallback_table(deep: int, deep_bin: int, deep_value: float = 0.80, bin_value: float = 0.80) -> pd.DataFrame:
    """Monk tones 1-2 (plenty) and 8 (``deep`` rows) with the bins 1-2 and 7-10 (``deep_bin`` rows)."""
    table = gate_table([])
    extra = [
        ("monk_skin_tone_us", "1", 400, 0.80, 0.76, 0.84),
        ("monk_skin_tone_us", "8", deep, deep_value, deep_value - 0.2, min(1.0, deep_value + 0.2)),
        ("monk_us_bin", "1-2", 400, 0.80, 0.76, 0.84),
        ("monk_us_bin", "7-10", deep_bin, bin_value, bin_value - 0.05, bin_value + 0.05),
    ]
    records = [
        {
            "model": "m",
            "attribute": a,
            "group": g,
            "n": n,
            "metric": "balanced_accuracy",
            "value": v,
            "ci_low": lo,
            "ci_high": hi,
            "insufficient_data": n < 30,
        }
        for a, g, n, v, lo, hi in extra
    ]
    return pd.concat([table, pd.DataFrame(records)], ignore_index=True)


def test_a_small_tone_is_judged_through_its_bin_and_the_level_is_reported():
    table = fallback_table(deep=12, deep_bin=150)
    gate = fairness_gate(table, attributes=["monk_skin_tone_us"], min_group_n=30)
    assert gate.status == "passed", gate.reason
    assert gate.fallbacks == [
        {
            "attribute": "monk_skin_tone_us",
            "group": "8",
            "n": 12,
            "judged_as_attribute": "monk_us_bin",
            "judged_as_group": "7-10",
            "judged_n": 150,
        }
    ]
    assert "Judged at bin level: monk_skin_tone_us=8 (n=12) as monk_us_bin=7-10 (n=150)" in gate.reason
    # The bin carries the verdict: a clear gap there fails the model.
    failing = fairness_gate(fallback_table(deep=12, deep_bin=150, bin_value=0.55), attributes=["monk_skin_tone_us"])
    assert failing.status == "failed" and (failing.worst.attribute, failing.worst.group) == ("monk_us_bin", "7-10")
    # A bin that is itself too small leaves the tone unjudged; without fallback the tone is unjudged too.
    assert fairness_gate(fallback_table(deep=12, deep_bin=24), attributes=["monk_skin_tone_us"]).status == "not_judged"
    assert fairness_gate(table, attributes=["monk_skin_tone_us"], fallback=False).status == "not_judged"


def test_a_candidate_whose_only_deep_tone_group_is_tiny_is_not_judged():
    """The issue's case: US Monk 7-10 with 24 test cases (min_group_n 30), every other bin fine."""
    table = fallback_table(deep=20, deep_bin=24)
    gate = fairness_gate(table, attributes=["monk_us_bin"], min_group_n=30)
    assert gate.status == "not_judged" and not gate.passed
    assert [(g.attribute, g.group, g.n) for g in gate.unjudged_groups] == [("monk_us_bin", "7-10", 24)]
    assert "monk_us_bin=7-10 (n=24)" in gate.reason


def test_bins_of_tones_and_types():
    assert bin_of("monk_skin_tone_us", "8") == ("monk_us_bin", "7-10")
    assert bin_of("monk_skin_tone_india", "2") == ("monk_india_bin", "1-2")
    assert bin_of("fst_dermatologist", "FST6") == ("fst_dermatologist_bin", "FST5-6")
    assert bin_of("fst_self_reported", "FST1") == ("fst_self_reported_bin", "FST1-2")
    assert bin_of("fst_self_reported", "NONE_IDENTIFIED") is None
    assert bin_of("monk_us_bin", "7-10") is None and bin_of("monk_skin_tone_us", "missing") is None


def gate_table(rows, overall=(0.80, 0.78, 0.82)) -> pd.DataFrame:
    """A hand-made fairness table for the gate: (group, n, value, ci_low, ci_high, insufficient)."""
    records = [
        {
            "model": "m",
            "attribute": OVERALL,
            "group": OVERALL,
            "n": 1000,
            "metric": "balanced_accuracy",
            "value": overall[0],
            "ci_low": overall[1],
            "ci_high": overall[2],
            "insufficient_data": False,
        }
    ]
    records += [
        {
            "model": "m",
            "attribute": "tone",
            "group": g,
            "n": n,
            "metric": "balanced_accuracy",
            "value": v,
            "ci_low": lo,
            "ci_high": hi,
            "insufficient_data": ins,
        }
        for g, n, v, lo, hi, ins in rows
    ]
    return pd.DataFrame(records)


@pytest.mark.parametrize(
    "rows, passed, phrase",
    [
        ([("a", 500, 0.82, 0.79, 0.85, False), ("b", 300, 0.65, 0.60, 0.70, False)], False, "do not overlap"),
        ([("a", 500, 0.82, 0.79, 0.85, False), ("b", 40, 0.65, 0.45, 0.79, False)], True, "overlap"),
        ([("a", 500, 0.82, 0.79, 0.85, False), ("b", 300, 0.75, 0.71, 0.77, False)], True, "within max_gap"),
        ([("b", 300, 0.65, np.nan, np.nan, False)], False, "gap alone"),
        ([("b", 10, 0.20, 0.00, 0.40, True)], False, "no pass by default"),
        ([], False, "no pass by default"),
    ],
)
def test_gate_rules_on_hand_made_tables(rows, passed, phrase):
    gate = fairness_gate(gate_table(rows), metric="balanced_accuracy", max_gap=0.10)
    assert gate.passed is passed
    assert phrase in gate.reason


def test_gate_picks_the_failing_group_over_a_larger_noisy_gap():
    rows = [("noisy", 40, 0.55, 0.30, 0.79, False), ("clear", 400, 0.65, 0.62, 0.68, False)]
    gate = fairness_gate(gate_table(rows), max_gap=0.10)
    assert not gate.passed and gate.worst.group == "clear"
    assert [g.group for g in gate.failing_groups] == ["clear"]


def test_gate_refuses_unknown_metric_and_attribute():
    table = gate_table([("a", 500, 0.82, 0.79, 0.85, False)])
    with pytest.raises(ValueError, match="no metric 'auc'"):
        fairness_gate(table, metric="auc")
    with pytest.raises(ValueError, match="not in the table"):
        fairness_gate(table, attributes=["age"])


# ------------------------------------------------------------------------------- representation


def test_representation_by_split():
    cases = case_frame()
    splits = pd.DataFrame(
        {
            "case_id": ["c1", "c1", "c2", "c3", "c4"],  # c1 has two images, c5 none
            "split": ["train", "train", "train", "val", "test"],
        }
    )
    table = representation_by_split(splits, cases, ["monk_us_bin"])
    train = table[table["split"] == "train"].set_index("group")
    assert train.loc["1-2", "n"] == 1 and train.loc["1-2", "n_images"] == 2
    assert train.loc["3-4", "share"] == pytest.approx(0.5)
    assert train.loc["7-10", "n"] == 0  # every group of the data set appears, at 0 when absent
    assert train.loc["7-10", "share_in_dataset"] == pytest.approx(2 / 5)
    assert train.loc["1-2", "share_ratio"] == pytest.approx(0.5 / 0.2)
    union = table[table["split"] == "all_splits"].set_index("group")
    assert union["n"].sum() == 4 and union.loc[MISSING_GROUP, "n"] == 0
    assert list(table["split"].unique()) == ["train", "val", "test", "all_splits"]
    with pytest.raises(ValueError, match="'c9' is not in cases"):
        representation_by_split(pd.DataFrame({"case_id": ["c9"], "split": ["test"]}), cases)


# ------------------------------------------------------------------------------ MLflow run metrics


def test_run_metric_names_are_stable_and_safe():
    assert run_metric_name("monk_us_bin", "7-10", "balanced_accuracy") == "fair.monk_us_bin.7-10.balanced_accuracy"
    assert run_metric_name("monk_us_bin", "7-10", "balanced_accuracy", "ci_low") == (
        "fair.monk_us_bin.7-10.balanced_accuracy.ci_low"
    )
    assert run_metric_name(OVERALL, OVERALL, "macro_f1", "ci_high") == "fair.overall.macro_f1.ci_high"
    assert run_metric_name("fst_dermatologist_bin", "FST5-6", "n") == "fair.fst_dermatologist_bin.FST5-6.n"
    # A dot or a space inside a group would split or break the name: they become "_".
    assert run_metric_name("race_ethnicity", "two or.more", "accuracy") == "fair.race_ethnicity.two_or_more.accuracy"
    with pytest.raises(ValueError, match="bound must be one of"):
        run_metric_name("monk_us_bin", "7-10", "accuracy", "median")
    with pytest.raises(ValueError, match="nothing usable"):
        run_metric_name("monk_us_bin", "...", "accuracy")


def test_run_metrics_carry_every_groups_value_interval_and_n():
    y, proba, sensitive = hand_fixture()
    table = fairness_table("m", y, proba, list("abc"), sensitive, n_bootstrap=50, min_group_n=1)
    metrics = run_metrics(table)
    assert metrics["fair.colour.B.balanced_accuracy"] == pytest.approx(4 / 9)
    assert metrics["fair.overall.balanced_accuracy"] == pytest.approx(53 / 90)
    assert metrics["fair.colour.A.n"] == 6 and metrics["fair.overall.n"] == 12
    low, high = metrics["fair.colour.B.accuracy.ci_low"], metrics["fair.colour.B.accuracy.ci_high"]
    assert low == value(table, "colour", "B", "accuracy", "ci_low") and high >= low
    groups = table[["attribute", "group"]].drop_duplicates()
    assert len(metrics) == len(groups) + 3 * len(table.dropna(subset=["value", "ci_low", "ci_high"]))
    # An undefined figure is left out, not logged as NaN.
    undefined = table.assign(value=np.where(table["group"] == "A", np.nan, table["value"]))
    assert "fair.colour.A.accuracy" not in run_metrics(undefined)
    assert "fair.colour.A.accuracy.ci_low" in run_metrics(undefined)
    with pytest.raises(ValueError, match="not a fairness table"):
        run_metrics(table.drop(columns=["ci_low"]))
