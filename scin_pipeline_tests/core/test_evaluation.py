"""Evaluation metrics: values computed by hand on tiny fixtures, agreement with sklearn where sklearn has
the metric, the documented rules for absent classes, ECE on calibrated and overconfident examples, and
the plots."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
    top_k_accuracy_score,
)

from scin_pipeline.core.evaluation import (
    AUC_ABSENT,
    METRIC_NAMES,
    case_level_predictions,
    classification_metrics,
    confusion_matrix_png,
    evaluation_table,
    expected_calibration_error,
    per_class_table,
    reliability_png,
    top_k_hits,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def proba_for(pred: list[int], k: int, top: float = 0.6) -> np.ndarray:
    """Probabilities whose argmax is ``pred``: ``top`` on it, the rest shared equally."""
    proba = np.full((len(pred), k), (1.0 - top) / (k - 1))
    proba[np.arange(len(pred)), pred] = top
    return proba


def random_model(n: int, k: int, signal: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    proba = np.exp(logits)
    return y, proba / proba.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------------- values by hand


def test_metrics_by_hand_on_six_rows():
    # y:    0 0 0 1 1 2      pred: 0 0 1 1 1 0
    # accuracy 4/6; recall c0 2/3, c1 2/2, c2 0/1 -> balanced (2/3 + 1 + 0) / 3 = 5/9
    # F1: c0 TP2 T3 P3 -> 2/3; c1 TP2 T2 P3 -> 4/5; c2 TP0 -> 0; macro = 22/45
    y = np.array([0, 0, 0, 1, 1, 2])
    proba = proba_for([0, 0, 1, 1, 1, 0], k=3)
    metrics = classification_metrics(y, proba, ["a", "b", "c"])
    assert list(metrics) == METRIC_NAMES
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["balanced_accuracy"] == pytest.approx(5 / 9)
    assert metrics["macro_f1"] == pytest.approx(22 / 45)
    assert metrics["top3_accuracy"] == 1.0  # K = 3: every class is in the top three
    # Confidence 0.6 on every row (one ECE bin), accuracy 4/6: ECE = |4/6 - 0.6|.
    assert metrics["ece"] == pytest.approx(abs(4 / 6 - 0.6))


def test_top3_by_hand_with_four_classes():
    y = np.array([0, 1, 2, 3])
    proba = np.array(
        [
            [0.4, 0.3, 0.2, 0.1],  # true class 0 ranked 1st: hit
            [0.4, 0.3, 0.2, 0.1],  # true 1 ranked 2nd: hit
            [0.1, 0.2, 0.3, 0.4],  # true 2 ranked 2nd: hit
            [0.4, 0.3, 0.2, 0.1],  # true 3 ranked 4th: miss
        ]
    )
    assert top_k_hits(y, proba).tolist() == [True, True, True, False]
    assert classification_metrics(y, proba, list("abcd"))["top3_accuracy"] == pytest.approx(0.75)


@pytest.mark.parametrize("k", [2, 3])
def test_top3_with_fewer_than_three_classes_is_one(k):
    y, proba = random_model(50, k, signal=0.0, seed=k)
    assert classification_metrics(y, proba, [f"c{i}" for i in range(k)])["top3_accuracy"] == 1.0


def test_ece_by_hand_two_bins():
    # Two rows at confidence 0.9 (one right, one wrong) and two at 0.55 (both right):
    # bins (13/15, 14/15] and (8/15, 9/15]: 2/4 * |0.5 - 0.9| + 2/4 * |1.0 - 0.55| = 0.2 + 0.225.
    proba = np.array([[0.9, 0.1], [0.9, 0.1], [0.55, 0.45], [0.55, 0.45]])
    y = np.array([0, 1, 0, 0])
    assert expected_calibration_error(y, proba) == pytest.approx(0.425)


# --------------------------------------------------------------------------- agreement with sklearn


def test_agrees_with_sklearn_when_every_class_is_present():
    y, proba = random_model(400, 6, signal=1.0, seed=1)
    pred = proba.argmax(axis=1)
    metrics = classification_metrics(y, proba, [f"c{i}" for i in range(6)])
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert metrics["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert metrics["top3_accuracy"] == pytest.approx(top_k_accuracy_score(y, proba, k=3))
    assert metrics["mean_ovr_auc"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr"))


def test_ties_follow_sklearn_top_k_order():
    y = np.array([3, 0, 2])
    proba = np.full((3, 4), 0.25)  # all tied
    assert top_k_hits(y, proba).mean() == pytest.approx(top_k_accuracy_score(y, proba, k=3, labels=range(4)))


# ------------------------------------------------------------------------------ absent classes


def test_absent_class_has_no_auc_and_leaves_the_mean():
    # Class "c" never occurs in y_true (but is predicted once): its AUC is undefined.
    y, proba3 = random_model(60, 2, signal=1.0, seed=2)
    proba = np.column_stack([proba3 * 0.9, np.full(len(y), 0.1)])
    proba[0] = [0.1, 0.1, 0.8]
    table = per_class_table(y, proba, ["a", "b", "c"])
    assert np.isnan(table.loc[2, "auc"]) and table.loc[2, "auc_note"] == AUC_ABSENT
    assert table.loc[2, "n"] == 0 and table.loc[2, "n_predicted"] == 1
    assert np.isnan(table.loc[2, "recall"])
    defined = [roc_auc_score(y == k, proba[:, k]) for k in (0, 1)]
    metrics = classification_metrics(y, proba, ["a", "b", "c"])
    assert metrics["mean_ovr_auc"] == pytest.approx(np.mean(defined))
    # macro-F1 counts the predicted-only class (F1 0): mean over the three classes, not two.
    pred = proba.argmax(axis=1)
    assert metrics["macro_f1"] == pytest.approx(f1_score(y, pred, labels=[0, 1, 2], average="macro"))
    assert metrics["macro_f1"] < f1_score(y, pred, labels=[0, 1], average="macro")


def test_class_neither_present_nor_predicted_is_left_out_of_macro_f1():
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.2, 0.7, 0.1], [0.2, 0.7, 0.1]])
    # c0: TP1 T2 P1 -> 2/3; c1: TP2 T2 P3 -> 4/5; c2 absent and never predicted -> not averaged.
    assert classification_metrics(y, proba, list("abc"))["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert np.isnan(per_class_table(y, proba, list("abc")).loc[2, "f1"])


# ------------------------------------------------------------------------------------- ECE


def calibrated_example(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Top probability p ~ U(0.4, 1) on a random class, right with probability exactly p."""
    rng = np.random.default_rng(seed)
    top = rng.uniform(0.4, 1.0, n)
    predicted = rng.integers(0, k, n)
    proba = np.repeat(((1 - top) / (k - 1))[:, None], k, axis=1)
    proba[np.arange(n), predicted] = top
    right = rng.uniform(size=n) < top
    other = (predicted + rng.integers(1, k, n)) % k
    return np.where(right, predicted, other), proba


def test_ece_of_a_calibrated_model_is_near_zero():
    y, proba = calibrated_example(20_000, 4, seed=3)
    assert expected_calibration_error(y, proba) < 0.02


def test_ece_of_an_overconfident_model_is_large():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 4, 5_000)
    proba = proba_for(rng.integers(0, 4, 5_000).tolist(), k=4, top=0.97)  # 97% sure, 25% right
    assert expected_calibration_error(y, proba) > 0.2


# ------------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    "y, proba, message",
    [
        ([0, 1], [[0.5, 0.5], [0.9, 0.3]], "row 1 sums to 1.2"),
        ([0, 2], [[0.5, 0.5], [0.5, 0.5]], "row 1 holds 2"),
        ([0, 1], [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]], "shape"),
        ([0, 1, 1], [[0.5, 0.5], [0.5, 0.5]], "shape"),
        ([0, 1], [[0.5, 0.5], [np.nan, 1.0]], "row 1"),
    ],
)
def test_bad_input_is_named(y, proba, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(np.array(y), np.array(proba), ["a", "b"])


# -------------------------------------------------------------------------------- long table


def test_evaluation_table_long_form():
    y = np.array([0, 0, 0, 1, 1, 2])
    proba = proba_for([0, 0, 1, 1, 1, 0], k=4)  # class "d" absent: AUC NaN, kept
    table = evaluation_table("cnn", y, proba, list("abcd"))
    assert list(table.columns) == ["model", "metric", "value", "class"]
    assert (table["model"] == "cnn").all()
    overall = table[table["class"] == ""].set_index("metric")["value"]
    assert set(overall.index) == set(METRIC_NAMES) | {"n"}
    assert overall["n"] == 6
    assert overall["accuracy"] == pytest.approx(4 / 6)
    per_class = table[table["class"] != ""]
    assert per_class.groupby("class").size().to_dict() == {c: 5 for c in "abcd"}
    auc_d = per_class[(per_class["class"] == "d") & (per_class["metric"] == "auc")]["value"]
    assert len(auc_d) == 1 and np.isnan(auc_d.iloc[0])
    recall_a = per_class[(per_class["class"] == "a") & (per_class["metric"] == "recall")]["value"]
    assert recall_a.iloc[0] == pytest.approx(2 / 3)


def test_evaluation_table_reports_the_ece_before_calibration_beside_the_served_one():
    from scin_pipeline.core.calibration import scale_probabilities
    from scin_pipeline.core.evaluation import expected_calibration_error

    y = np.array([0, 0, 0, 1, 1, 2, 2, 1])
    raw = proba_for([0, 1, 1, 1, 1, 2, 0, 1], k=3, top=0.95)  # over-confident: 5 of 8 right at 0.95
    calibrated = scale_probabilities(raw, 3.0)
    table = evaluation_table("cnn", y, calibrated, list("abc"), uncalibrated_proba=raw)
    overall = table[table["class"] == ""].set_index("metric")["value"]
    assert overall["ece_uncalibrated"] == pytest.approx(expected_calibration_error(y, raw))
    assert overall["ece"] == pytest.approx(expected_calibration_error(y, calibrated))
    assert overall["ece"] < overall["ece_uncalibrated"]
    assert "ece_uncalibrated" not in set(evaluation_table("cnn", y, raw, list("abc"))["metric"])
    with pytest.raises(ValueError, match="shape"):
        evaluation_table("cnn", y, calibrated, list("abc"), uncalibrated_proba=raw[:, :2])


# ------------------------------------------------------------------------------ per case (fairness unit)


def test_case_level_predictions_average_a_cases_images_per_model():
    predictions = pd.DataFrame(
        {
            "model": ["m", "m", "m", "m", "n", "m"],
            "split": ["test", "test", "test", "val", "test", "test"],
            "case_id": ["c2", "c1", "c1", "c1", "c1", "c3"],
            "image_id": ["4", "1", "2", "3", "1", "5"],
            "y_true": [1, 0, 0, 0, 0, 2],
            "p_0": [0.1, 0.8, 0.2, 0.0, 0.3, 0.2],
            "p_1": [0.7, 0.1, 0.2, 1.0, 0.6, 0.3],
            "p_2": [0.2, 0.1, 0.6, 0.0, 0.1, 0.5],
        }
    )
    out = case_level_predictions(predictions)
    assert list(out.columns) == ["model", "case_id", "p_0", "p_1", "p_2", "y_true", "y_pred"]
    # One row per (model, case), sorted; the val row of c1 is not part of the test split.
    assert list(zip(out["model"], out["case_id"])) == [("m", "c1"), ("m", "c2"), ("m", "c3"), ("n", "c1")]
    assert out[["p_0", "p_1", "p_2"]].to_numpy() == pytest.approx(
        np.array([[0.5, 0.15, 0.35], [0.1, 0.7, 0.2], [0.2, 0.3, 0.5], [0.3, 0.6, 0.1]])
    )
    # c1 under m: its two images predict classes 0 and 2; the case predicts the argmax of their mean (0).
    assert out["y_pred"].tolist() == [0, 1, 2, 1]
    assert out["y_true"].tolist() == [0, 1, 2, 0]
    val = case_level_predictions(predictions, split="val")
    assert val[["model", "case_id", "y_pred"]].values.tolist() == [["m", "c1", 1]]


# --------------------------------------------------------------------------------------- plots


def _png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.size


def test_confusion_matrix_png_scales_with_classes():
    small = confusion_matrix_png([0, 1, 1, 2], [0, 1, 2, 2], list("abc"), "three classes")
    y, proba = random_model(300, 20, signal=1.0, seed=5)
    names = [f"Condition with a long name {i}" for i in range(20)]
    big = confusion_matrix_png(y, proba.argmax(axis=1), names, "twenty classes")
    assert _png_size(big)[0] > _png_size(small)[0]
    # A class absent from y_true: an empty row, still drawn.
    assert _png_size(confusion_matrix_png([0, 0], [0, 1], list("abc"), "absent")) == _png_size(small)


def test_reliability_png():
    y, proba = calibrated_example(500, 3, seed=6)
    width, height = _png_size(reliability_png(y, proba))
    assert width > 300 and height > 300
