"""Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks"): one parameter T > 0
that divides the logits, fitted by minimising the negative log-likelihood (NLL) on the validation split.

``softmax(z / T)``: T > 1 softens over-confident outputs, T < 1 sharpens under-confident ones; the predicted
class never changes (dividing by a positive T keeps the order of each row's logits), so accuracy,
balanced accuracy and F1 are untouched and only the probabilities move.

Decisions:

- The packaged models output probabilities, not logits. ``log p`` is the logit vector up to a constant per
  row, and softmax ignores that constant, so ``softmax(log p / T)`` is temperature scaling exactly. A float32
  softmax can underflow to 0; probabilities are floored at ``PROBABILITY_FLOOR`` (1e-12) before the log, for
  the fit and for every application alike, so the fitted T is the T of the transform that is applied.
- The fit minimises the mean NLL over ``log T`` in ``[log T_MIN, log T_MAX]`` (0.1 to 10) with scipy's
  bounded Brent search. The NLL is convex in ``1/T``, hence unimodal in ``log T``, so a bounded scalar search
  finds the optimum. A fit that ends on a bound is flagged (``at_bound``).
- No finite optimum exists when every validation row is predicted correctly: the NLL then keeps falling as
  T -> 0 (the derivative in 1/T is ``mean(E_p[z] - z_y) < 0`` for every row whose true logit is the row's
  strict maximum). Such a fit, and one on fewer than ``MIN_FIT_ROWS`` rows, is not done: T stays 1 and
  ``note`` says why, rather than a bound pretending to be a measurement.
- The fitted T is kept only when it lowers the validation NLL (it always does unless the search tolerance
  says otherwise; then T = 1) and does not raise the validation ECE (the calibration figure every report
  shows). The NLL is dominated by the few confidently wrong rows: on a small validation split of a weak
  model (the synthetic demo: 69 rows, accuracy ~0.45) its optimum can be T ~ 5-9, which flattens every
  answer towards 1/K and leaves the confidences further from the accuracy than before (ECE 0.21 -> 0.34
  on those very rows). Such a T is not applied (T = 1, ``note`` says why, both ECEs recorded): the
  probabilities a page calls calibrated must not be less calibrated by the measure it reports.
- ``expected_calibration_error``: top-label ECE, Guo et al. (2017), 15 equal-width bins right-closed
  ``(lo, hi]`` with 0 in the first; own code (sklearn has none), here beside the fit that checks it and
  numpy-only, since this module ships inside every packaged model; ``core.evaluation`` reports it.
- A model that reads the questionnaire is served both with answers and with a blank form, and its
  confidence differs between the two. One T is fitted on the validation rows twice, as answered and blank
  (:func:`fit_temperature_answered_and_blank`, ``questionnaire = "answered+blank"``), rather than on the
  answered rows alone: it then serves an empty form as well as a filled one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

METHOD = "temperature_scaling"
PROBABILITY_FLOOR = 1e-12
T_MIN, T_MAX = 0.1, 10.0
MIN_FIT_ROWS = 20
FITTED_ON = "val"
_BOUND_TOLERANCE = 1e-3  # relative: a T this close to a bound is "at the bound"
ECE_BINS = 15


def _log_probabilities(proba) -> np.ndarray:
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probabilities must have shape (N, K) with K >= 2, got {p.shape}")
    return np.log(np.maximum(p, PROBABILITY_FLOOR))


def scale_probabilities(proba, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row by row, float64 (N, K); T == 1 returns ``proba`` unchanged (as float64)."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    p = np.asarray(proba, dtype=np.float64)
    if temperature == 1.0 or len(p) == 0:
        return p
    return np.exp(log_softmax(_log_probabilities(p) / temperature, axis=1))


def ece_bin_index(confidence: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Bin of each confidence: right-closed equal-width bins ``(lo, hi]`` over [0, 1], 0 in bin 0."""
    return np.clip(np.ceil(np.asarray(confidence) * n_bins).astype("int64") - 1, 0, n_bins - 1)


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE of the top prediction (module docstring): ``sum_b n_b / N * |accuracy_b - confidence_b|``."""
    proba = np.asarray(proba)
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == np.asarray(y_true)
    bins = ece_bin_index(confidence, n_bins)
    # Per bin |sum(correct) - sum(confidence)| / N equals n_b / N * |accuracy_b - confidence_b|.
    gap = np.abs(
        np.bincount(bins, weights=correct.astype("float64"), minlength=n_bins)
        - np.bincount(bins, weights=confidence, minlength=n_bins)
    )
    return float(gap.sum() / len(confidence))


def mean_nll(proba, y_true, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes under ``softmax(log p / T)`` (nats per row)."""
    log_p, y = _validated(proba, y_true)
    return _nll(log_p, y, temperature)


@dataclass(frozen=True)
class TemperatureScaling:
    """A fitted (or deliberately unfitted, T = 1) temperature and what the fit saw."""

    temperature: float = 1.0
    fitted_rows: int = 0
    nll_before: float | None = None  # validation NLL at T = 1
    nll_after: float | None = None  # validation NLL at the fitted T
    at_bound: bool = False
    note: str = ""  # why T stayed 1 ("" when fitted)
    method: str = METHOD
    fitted_on: str = FITTED_ON
    questionnaire: str = ""  # "answered+blank": the split's rows twice, each form (module docstring)
    ece_before: float | None = None  # validation ECE at T = 1 (both forms: the mean of the two)
    ece_after: float | None = None  # validation ECE at the NLL-optimal T (applied only if not higher)

    def __post_init__(self):
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {self.temperature!r}")
        if self.method != METHOD:
            raise ValueError(f"calibration method {self.method!r} is not supported (only {METHOD!r})")

    @property
    def fitted(self) -> bool:
        return not self.note

    def apply(self, proba) -> np.ndarray:
        return scale_probabilities(proba, self.temperature)

    def describe(self) -> str:
        if not self.fitted:
            return f"temperature scaling not fitted ({self.note}): probabilities are the model's own"
        forms = " (each case as answered and with a blank questionnaire)" if self.questionnaire else ""
        return f"temperature scaling, T = {self.temperature:.3f}, fitted on the {self.fitted_on} split{forms}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TemperatureScaling:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"calibration has unknown fields {unknown}")
        return cls(**data)


def fit_temperature(proba, y_true, *, min_rows: int = MIN_FIT_ROWS) -> TemperatureScaling:
    """The NLL-minimising temperature of validation probabilities ``proba`` (N, K) with true classes
    ``y_true`` (N,) (module docstring for the rules)."""
    return _fit_temperature(proba, y_true, min_rows, expected_calibration_error)


def _fit_temperature(
    proba, y_true, min_rows: int, ece_of: Callable[[np.ndarray, np.ndarray], float]
) -> TemperatureScaling:
    """:func:`fit_temperature`, the ECE guard reading ``ece_of(y, probabilities)``."""
    log_p, y = _validated(proba, y_true)
    n = len(y)
    if n < min_rows:
        return TemperatureScaling(fitted_rows=n, note=f"{n} validation rows, fewer than {min_rows}")
    before = _nll(log_p, y, 1.0)
    true_logit = log_p[np.arange(n), y]
    others = log_p.copy()
    others[np.arange(n), y] = -np.inf
    if (true_logit > others.max(axis=1)).all():
        return TemperatureScaling(
            fitted_rows=n,
            nll_before=before,
            nll_after=before,
            note="every validation row is predicted correctly: the NLL falls as T -> 0, no finite optimum",
        )
    result = minimize_scalar(
        lambda log_t: _nll(log_p, y, float(np.exp(log_t))),
        bounds=(np.log(T_MIN), np.log(T_MAX)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    temperature = float(np.exp(result.x))
    after = _nll(log_p, y, temperature)
    if not after < before:
        return TemperatureScaling(fitted_rows=n, nll_before=before, nll_after=before, note="no T lowers the NLL")
    p = np.exp(log_p)
    ece_before = ece_of(y, p)
    ece_after = ece_of(y, scale_probabilities(p, temperature))
    if ece_after > ece_before:
        return TemperatureScaling(
            fitted_rows=n,
            nll_before=before,
            nll_after=before,
            ece_before=ece_before,
            ece_after=ece_after,
            note=f"the NLL-optimal T = {temperature:.2f} would raise the validation ECE from {ece_before:.3f} to "
            f"{ece_after:.3f}: not applied",
        )
    at_bound = min(abs(temperature / T_MIN - 1), abs(temperature / T_MAX - 1)) < _BOUND_TOLERANCE
    return TemperatureScaling(
        temperature=temperature,
        fitted_rows=n,
        nll_before=before,
        nll_after=after,
        at_bound=at_bound,
        ece_before=ece_before,
        ece_after=ece_after,
    )


def fit_temperature_answered_and_blank(answered, blank, y_true, *, min_rows: int = MIN_FIT_ROWS) -> TemperatureScaling:
    """One temperature for a model that reads the questionnaire: fitted on the validation probabilities with
    every case's answers (``answered``) and with blank questionnaires (``blank``), the same rows and true
    classes ``y_true`` twice; ``fitted_rows`` counts both. ``min_rows`` applies to the split's rows. The ECE
    guard reads the mean of the two forms' ECEs: pooled, an over-confident form and an under-confident one
    share bins and their gaps cancel, so a pooled ECE can call a T calibrated that serves neither form."""
    answered, blank = np.asarray(answered, dtype=np.float64), np.asarray(blank, dtype=np.float64)
    if answered.shape != blank.shape:
        raise ValueError(f"answered and blank probabilities differ in shape: {answered.shape} vs {blank.shape}")
    y = np.asarray(y_true, dtype=np.int64)
    n = len(answered)

    def mean_of_forms(labels: np.ndarray, proba: np.ndarray) -> float:
        return (
            expected_calibration_error(labels[:n], proba[:n]) + expected_calibration_error(labels[n:], proba[n:])
        ) / 2

    fitted = _fit_temperature(np.concatenate([answered, blank]), np.concatenate([y, y]), 2 * min_rows, mean_of_forms)
    return replace(fitted, questionnaire="answered+blank")


def _validated(proba, y_true) -> tuple[np.ndarray, np.ndarray]:
    log_p, y = _log_probabilities(proba), np.asarray(y_true, dtype=np.int64)
    if y.shape != (len(log_p),):
        raise ValueError(f"y_true must have shape ({len(log_p)},) like the probabilities' rows, got {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= log_p.shape[1]):
        raise ValueError(f"y_true holds class indices outside [0, {log_p.shape[1]})")
    return log_p, y


def _nll(log_p: np.ndarray, y: np.ndarray, temperature: float) -> float:
    return float(-log_softmax(log_p / temperature, axis=1)[np.arange(len(y)), y].mean())
