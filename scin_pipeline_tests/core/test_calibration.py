"""Temperature scaling on toys whose optimum is known: labels drawn from softmax(z / T0) while the "model"
reports softmax(z), so the model is miscalibrated by exactly T0 and the NLL-minimising temperature is T0 (the
NLL is a proper scoring rule and the scaled family holds the truth)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from scin_pipeline.core.calibration import (
    MIN_FIT_ROWS,
    T_MAX,
    T_MIN,
    TemperatureScaling,
    fit_temperature,
    fit_temperature_answered_and_blank,
    mean_nll,
    scale_probabilities,
)
from scin_pipeline.core.evaluation import evaluation_table, expected_calibration_error


def miscalibrated_toy(true_temperature: float, n: int = 40_000, k: int = 5, seed: int = 0):
    """(the model's probabilities softmax(z), labels drawn from softmax(z / true_temperature))."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, (n, k))
    truth = softmax(logits / true_temperature, axis=1)
    y = (rng.random((n, 1)) > truth.cumsum(axis=1)).sum(axis=1)
    return softmax(logits, axis=1), y


@pytest.mark.parametrize("true_temperature", [2.5, 0.5])
def test_the_fit_recovers_the_temperature_that_miscalibrated_the_model(true_temperature):
    proba, y = miscalibrated_toy(true_temperature)
    fit = fit_temperature(proba, y)
    assert fit.fitted and not fit.at_bound
    assert fit.temperature == pytest.approx(true_temperature, rel=0.04)
    assert fit.nll_after < fit.nll_before
    assert fit.fitted_rows == len(y)
    # Over- (T0 > 1) and under-confident (T0 < 1) models both end up better calibrated on fresh rows.
    fresh_proba, fresh_y = miscalibrated_toy(true_temperature, seed=1)
    before = expected_calibration_error(fresh_y, fresh_proba)
    after = expected_calibration_error(fresh_y, fit.apply(fresh_proba))
    assert before > 0.05 and after < 0.02


def test_the_fitted_temperature_is_the_minimum_of_the_validation_nll_on_a_fine_grid():
    proba, y = miscalibrated_toy(1.7, n=3_000, seed=3)
    fit = fit_temperature(proba, y)
    grid = np.exp(np.linspace(np.log(T_MIN), np.log(T_MAX), 4001))
    nll = np.array([mean_nll(proba, y, t) for t in grid])
    assert fit.temperature == pytest.approx(grid[nll.argmin()], rel=2e-3)
    assert fit.nll_after <= nll.min() + 1e-9
    assert fit.nll_before == pytest.approx(mean_nll(proba, y, 1.0))


def test_scaling_keeps_the_predicted_class_and_rows_summing_to_one():
    proba, _ = miscalibrated_toy(2.0, n=500)
    for temperature in (0.3, 1.0, 4.0):
        scaled = scale_probabilities(proba, temperature)
        assert (scaled.argmax(axis=1) == proba.argmax(axis=1)).all()
        np.testing.assert_allclose(scaled.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(scale_probabilities(proba, 1.0), proba)
    # T > 1 lowers the top probability, T < 1 raises it.
    assert (scale_probabilities(proba, 4.0).max(axis=1) <= proba.max(axis=1) + 1e-12).all()
    assert (scale_probabilities(proba, 0.3).max(axis=1) >= proba.max(axis=1) - 1e-12).all()
    assert scale_probabilities(np.zeros((0, 3)), 2.0).shape == (0, 3)


def test_scaling_is_softmax_of_the_logits_over_t_even_when_a_probability_underflowed_to_zero():
    logits = np.array([[8.0, 1.0, -2.0], [0.5, 0.2, 0.1]])
    np.testing.assert_allclose(scale_probabilities(softmax(logits, axis=1), 2.0), softmax(logits / 2.0, axis=1))
    underflowed = np.array([[1.0, 0.0, 0.0]])
    scaled = scale_probabilities(underflowed, 2.0)
    assert np.isfinite(scaled).all() and scaled[0, 0] > 0.99


def test_no_fit_when_every_validation_row_is_right_or_the_rows_are_too_few():
    proba, _ = miscalibrated_toy(2.0, n=200)
    perfect = fit_temperature(proba, proba.argmax(axis=1))
    assert not perfect.fitted and perfect.temperature == 1.0
    assert "no finite optimum" in perfect.note
    few = fit_temperature(proba[: MIN_FIT_ROWS - 1], np.zeros(MIN_FIT_ROWS - 1, int))
    assert not few.fitted and few.temperature == 1.0 and f"fewer than {MIN_FIT_ROWS}" in few.note
    np.testing.assert_array_equal(few.apply(proba), proba)
    assert "not fitted" in few.describe()


def test_a_fit_pushed_to_a_bound_is_flagged():
    # Every row wrong with confidence: the NLL keeps falling towards the uniform distribution (T -> inf).
    proba = np.tile([[0.9, 0.05, 0.05]], (50, 1))
    fit = fit_temperature(proba, np.ones(50, int))
    assert fit.fitted and fit.at_bound and fit.temperature == pytest.approx(T_MAX, rel=1e-3)


def test_round_trips_through_a_dict_and_refuses_bad_values():
    proba, y = miscalibrated_toy(2.0, n=300)
    fit = fit_temperature(proba, y)
    assert TemperatureScaling.from_dict(fit.to_dict()) == fit
    assert "T = " in fit.describe() and "val split" in fit.describe()
    with pytest.raises(ValueError, match="unknown fields"):
        TemperatureScaling.from_dict({**fit.to_dict(), "bias": 1.0})
    with pytest.raises(ValueError, match="positive"):
        TemperatureScaling(temperature=0.0)
    with pytest.raises(ValueError, match="not supported"):
        TemperatureScaling(method="platt")
    with pytest.raises(ValueError, match="shape"):
        fit_temperature(proba, y[:-1])
    with pytest.raises(ValueError, match="outside"):
        fit_temperature(proba, np.full(len(y), 7))


def test_one_temperature_for_both_forms_serves_answered_and_blank_better_than_either_alone():
    # The same cases and labels (drawn from softmax(z)); over-confident with answers (softmax(1.5 z): T ~ 1.5)
    # and more so with a blank form (softmax(3 z): T ~ 3).
    rng = np.random.default_rng(5)
    logits = rng.normal(0.0, 2.0, (20_000, 4))
    y = (rng.random((len(logits), 1)) > softmax(logits, axis=1).cumsum(axis=1)).sum(axis=1)
    answered, blank = softmax(1.5 * logits, axis=1), softmax(3 * logits, axis=1)
    both = fit_temperature_answered_and_blank(answered, blank, y)
    alone = {"answered": fit_temperature(answered, y), "blank": fit_temperature(blank, y)}
    assert alone["answered"].temperature == pytest.approx(1.5, rel=0.05)
    assert alone["blank"].temperature == pytest.approx(3.0, rel=0.05)
    assert alone["answered"].temperature < both.temperature < alone["blank"].temperature
    assert both.fitted_rows == 2 * len(y) and both.questionnaire == "answered+blank" and both.fitted

    def served_nll(t: float) -> float:  # a served form is either: the NLL over both
        return (mean_nll(answered, y, t) + mean_nll(blank, y, t)) / 2

    def served_ece(t: float) -> float:  # the guard's figure: each form's ECE, averaged
        forms = (answered, blank)
        return sum(expected_calibration_error(y, scale_probabilities(p, t)) for p in forms) / 2

    assert served_nll(both.temperature) < min(served_nll(fit.temperature) for fit in alone.values())
    assert both.nll_after == pytest.approx(served_nll(both.temperature))
    assert both.ece_before == pytest.approx(served_ece(1.0)) and both.ece_after == pytest.approx(
        served_ece(both.temperature)
    )
    assert both.ece_after < both.ece_before
    assert "answered and with a blank questionnaire" in both.describe()
    assert TemperatureScaling.from_dict(both.to_dict()) == both
    # A package written before these fields existed still loads (one form, no ECE recorded).
    old = {
        k: v for k, v in alone["answered"].to_dict().items() if k not in ("questionnaire", "ece_before", "ece_after")
    }
    assert TemperatureScaling.from_dict(old).questionnaire == ""

    # Over-confident with answers, under-confident blank: pooled, the two forms' gaps cancel in shared bins
    # (pooled ECE 0.109 at T = 1); per form, the NLL's compromise T serves neither better: not applied.
    opposite = fit_temperature_answered_and_blank(softmax(2 * logits, axis=1), softmax(logits / 2, axis=1), y)
    assert not opposite.fitted and opposite.temperature == 1.0 and opposite.ece_after > opposite.ece_before
    assert opposite.ece_before > 0.15  # each form's own miscalibration, which a pooled ECE would hide

    with pytest.raises(ValueError, match="differ in shape"):
        fit_temperature_answered_and_blank(answered, blank[:-1], y)
    few = fit_temperature_answered_and_blank(answered[:12], blank[:12], y[:12])
    assert not few.fitted and few.fitted_rows == 24  # 12 cases: under MIN_FIT_ROWS (20) per form


def test_a_temperature_that_would_raise_the_validation_ece_is_not_applied():
    # 50 rows answered at 0.6 and right 60 % of the time (calibrated), 5 wrong at ~1 with the true class at
    # 1e-9: those dominate the NLL, whose optimum flattens every row towards 1/K, away from the accuracy.
    proba = np.array([[0.6, 0.2, 0.1, 0.1]] * 50 + [[1 - 3e-9, 1e-9, 1e-9, 1e-9]] * 5)
    y = np.array([0] * 30 + [1] * 25)
    fit = fit_temperature(proba, y)
    assert not fit.fitted and fit.temperature == 1.0
    assert fit.ece_before == pytest.approx(expected_calibration_error(y, proba))
    assert fit.ece_after > fit.ece_before and fit.nll_after == fit.nll_before == pytest.approx(mean_nll(proba, y))
    assert "would raise the validation ECE from 0.091 to" in fit.note and "not applied" in fit.describe()
    np.testing.assert_array_equal(fit.apply(proba), proba)
    # The rejected T is the NLL's optimum, and it does raise the ECE on these rows.
    grid = np.exp(np.linspace(np.log(T_MIN), np.log(T_MAX), 801))
    best = grid[np.argmin([mean_nll(proba, y, t) for t in grid])]
    assert expected_calibration_error(y, scale_probabilities(proba, best)) == pytest.approx(fit.ece_after, abs=0.01)


def test_the_ece_the_fit_checks_is_the_ece_model_evaluation_reports():
    proba, y = miscalibrated_toy(2.0, n=2_000, seed=4)
    fit = fit_temperature(proba, y)
    table = evaluation_table("toy", y, fit.apply(proba), [f"c{i}" for i in range(5)], uncalibrated_proba=proba)
    overall = table[table["class"].isna() | (table["class"] == "")].set_index("metric")["value"]
    assert overall["ece_uncalibrated"] == pytest.approx(fit.ece_before)
    assert overall["ece"] == pytest.approx(fit.ece_after) and fit.ece_after < fit.ece_before
