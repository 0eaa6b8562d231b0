"""Blank questionnaires and modality dropout (core.questionnaire, metadata_model, models, training): a blank
form is encoded in training as the service encodes it; the scikit-learn model gets weighted blank copies;
the Keras layer blanks whole rows while training only and survives save/load; a multimodal head trained
with dropout answers a blank form from the image, where one trained without it answers a constant.
SYNTHETIC data throughout."""

from __future__ import annotations

import functools

import keras
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score

from scin_pipeline.core import schema
from scin_pipeline.core.champion import ChampionRule
from scin_pipeline.core.metadata_model import (
    METADATA_FEATURE_COLUMNS,
    QUESTIONS,
    answered_questions,
    blank_questionnaire_features,
    fit_single_label_metadata_model,
    metadata_features,
    with_blank_questionnaires,
)
from scin_pipeline.core.models import build_multimodal_head, questionnaire_dropout
from scin_pipeline.core.questionnaire import blank_questionnaires, check_questionnaire_dropout, questionnaire_scores
from scin_pipeline.core.training import BOTH_FORMS_WEIGHT, TrainConfig, monitored_key, train_head_on_embeddings
from scin_pipeline.serve.inputs import PredictionRequest

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

AGES = np.array(schema.ENUM_VALUES["age_group"][:3])
ITCH = "condition_symptoms_itching"


def planted_cases(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """SYNTHETIC questionnaires whose class (0..2) is the age group; sex is noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    rng.shuffle(y)
    return pd.DataFrame({"age_group": AGES[y], "sex_at_birth": rng.choice(["FEMALE", "MALE"], n), ITCH: y == 1}), y


def planted_embeddings(y: np.ndarray, seed: int, signal: float = 1.5) -> np.ndarray:
    """SYNTHETIC 16-d "image embeddings": noise plus ``signal`` on the dimension of the class."""
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(0, 1, (len(y), 16)).astype(np.float32)
    embeddings[np.arange(len(y)), y] += signal
    return embeddings


def test_the_blank_form_of_training_is_the_one_the_service_encodes():
    blank = blank_questionnaire_features()
    served = metadata_features(PredictionRequest(image=None, metadata={}).cases()).to_numpy(np.float32)[0]
    np.testing.assert_array_equal(blank, served)
    # A case whose every answer is missing (NaN, unticked) encodes the same.
    nothing = pd.DataFrame({"age_group": [None], "sex_at_birth": [np.nan], ITCH: [False]})
    np.testing.assert_array_equal(blank, metadata_features(nothing).to_numpy(np.float32)[0])
    features = dict(zip(METADATA_FEATURE_COLUMNS, blank))
    assert features["age_group__missing"] == 1 and features["symptoms__none_ticked"] == 1
    assert features["symptoms__n_ticked"] == 0 and features[ITCH] == 0
    assert len(blank_questionnaires(3)) == 3 and blank_questionnaires(3).columns.empty


def test_answered_questions_count_a_check_box_group_when_a_box_is_ticked():
    cases = pd.DataFrame(
        {"age_group": ["AGE_18_TO_29", None], "sex_at_birth": [None, "MALE"], ITCH: [True, False]}, index=[7, 8]
    )
    answered = answered_questions(cases)
    assert list(answered.columns) == list(QUESTIONS) and list(answered.index) == [7, 8]
    assert answered.loc[7].sum() == 2 and bool(answered.loc[7, "age_group"]) and bool(answered.loc[7, "symptoms"])
    assert answered.loc[8].sum() == 1 and bool(answered.loc[8, "sex_at_birth"]) and not answered.loc[8, "symptoms"]
    assert not answered_questions(blank_questionnaires(1)).to_numpy().any()


def test_blank_copies_carry_the_dropout_share_of_each_examples_weight():
    X = metadata_features(planted_cases(10, 0)[0]).to_numpy()
    y, weights = np.arange(10) % 3, np.linspace(1, 2, 10)
    X_aug, y_aug, w_aug = with_blank_questionnaires(X, y, weights, 0.3)
    assert X_aug.shape == (20, X.shape[1])
    np.testing.assert_array_equal(X_aug[:10], X)
    np.testing.assert_array_equal(X_aug[10:], np.broadcast_to(blank_questionnaire_features(), X.shape))
    np.testing.assert_array_equal(y_aug, np.concatenate([y, y]))
    np.testing.assert_allclose(w_aug[:10], weights)  # the answered rows keep their weight
    np.testing.assert_allclose(w_aug[10:] / (w_aug[:10] + w_aug[10:]), 0.3)  # blanks: 30 % of each example
    same = with_blank_questionnaires(X, y, weights, 0.0)
    assert same[0] is X and same[1] is y and same[2] is weights
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="questionnaire_dropout must be in"):
            check_questionnaire_dropout(bad)


def test_the_metadata_model_with_dropout_answers_a_blank_form_with_the_class_balance():
    cases, y = planted_cases(300, 0)
    X = metadata_features(cases)
    blank = metadata_features(blank_questionnaires(1))
    plain = fit_single_label_metadata_model(X, y, 3)
    dropped = fit_single_label_metadata_model(X, y, 3, questionnaire_dropout=0.3)
    # Answers still decide: the planted age group is read as well as before.
    val_cases, val_y = planted_cases(90, 1)
    val_X = metadata_features(val_cases)
    assert balanced_accuracy_score(val_y, dropped.predict_proba(val_X).argmax(axis=1)) == 1.0
    # A blank form is an input it was trained on: balanced classes, so close to uniform (1/3 each), where the
    # model without dropout extrapolates to whatever the missing-answer columns happen to push towards.
    p_blank = dropped.predict_proba(blank)[0]
    assert np.abs(p_blank - 1 / 3).max() < 0.1, p_blank
    assert np.abs(p_blank - 1 / 3).max() < np.abs(plain.predict_proba(blank)[0] - 1 / 3).max()


def test_questionnaire_dropout_blanks_whole_rows_in_training_only_and_survives_save_load(tmp_path):
    n_features = len(METADATA_FEATURE_COLUMNS)
    blank = blank_questionnaire_features()
    metadata = keras.Input((n_features,), name="metadata")
    model = keras.Model(metadata, questionnaire_dropout(metadata, 0.3, blank))
    rows = metadata_features(planted_cases(2000, 0)[0]).to_numpy(np.float32)
    keras.utils.set_random_seed(0)
    trained = keras.ops.convert_to_numpy(model(rows, training=True))
    blanked = (trained == blank).all(axis=1)
    kept = (trained == rows).all(axis=1)
    assert (blanked | kept).all()  # each row whole: its own answers, unscaled, or the blank form
    assert abs(blanked.mean() - 0.3) < 0.04, blanked.mean()
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(rows, training=False)), rows)
    model.save(tmp_path / "dropout.keras")
    loaded = keras.saving.load_model(tmp_path / "dropout.keras")  # built-in pieces: safe_mode stays on
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(rows)), rows)
    reloaded_training = keras.ops.convert_to_numpy(loaded(rows, training=True))
    assert ((reloaded_training == blank).all(axis=1) | (reloaded_training == rows).all(axis=1)).all()
    with pytest.raises(ValueError, match="one metadata row"):
        questionnaire_dropout(metadata, 0.3, blank[:5])
    with pytest.raises(ValueError, match="needs blank_metadata"):
        build_multimodal_head(16, n_features, 3, questionnaire_dropout_rate=0.3)


def test_a_multimodal_head_trained_with_dropout_answers_a_blank_form_from_the_image():
    """The failure found on the served champion, reproduced: answers that decide the class perfectly make a
    head trained without dropout ignore the image, and a blank form then gets one constant answer for every
    image. With dropout the same head answers a blank form from the image."""
    cases, y = planted_cases(450, 0)
    val_cases, val_y = planted_cases(240, 1)
    e_train, e_val = planted_embeddings(y, 2), planted_embeddings(val_y, 3)
    m_train = metadata_features(cases).to_numpy(np.float32)
    m_val = metadata_features(val_cases).to_numpy(np.float32)
    blank = blank_questionnaire_features()
    blank_val = {"embedding": e_val, "metadata": np.repeat(blank[None], len(val_y), axis=0)}
    scores = {}
    for rate in (0.0, 0.3):
        result = train_head_on_embeddings(
            e_train,
            y,
            e_val,
            val_y,
            train_metadata=m_train,
            val_metadata=m_val,
            blank_metadata=blank,
            config=TrainConfig(epochs=12, batch_size=32, early_stopping_patience=12, seed=0),
            head_builder=functools.partial(
                build_multimodal_head,
                16,
                m_train.shape[1],
                3,
                normalize_with=e_train,
                normalize_metadata_with=m_train,
                questionnaire_dropout_rate=rate,
                blank_metadata=blank,
            ),
        )
        assert {"val_blank_macro_f1", "val_blank_balanced_accuracy"} <= set(result.history.columns)
        # Stopped, and its epoch kept, on the score the champion rule ranks it by: both forms, equal weight.
        history = result.history
        assert result.monitor == "val_both_forms_macro_f1"
        np.testing.assert_allclose(
            history["val_both_forms_macro_f1"], (history["val_macro_f1"] + history["val_blank_macro_f1"]) / 2
        )
        assert result.best_epoch == history["epoch"].iloc[int(history["val_both_forms_macro_f1"].argmax())]
        answered = result.model.predict({"embedding": e_val, "metadata": m_val}, verbose=0).argmax(axis=1)
        assert balanced_accuracy_score(val_y, answered) > 0.95, rate  # the answers decide the class
        p_blank = result.model.predict(blank_val, verbose=0)
        scores[rate] = balanced_accuracy_score(val_y, p_blank.argmax(axis=1))
        if rate:
            assert len(np.unique(p_blank.argmax(axis=1))) == 3  # the answer follows the image
            # The epoch log's blank score is the model's own (restored best epoch).
            best = result.history.set_index("epoch").loc[result.best_epoch]
            assert best["val_blank_balanced_accuracy"] == pytest.approx(scores[rate], abs=1e-6)
    assert scores[0.3] > 0.45 and scores[0.3] > scores[0.0] + 0.1, scores  # chance is 1/3


def test_questionnaire_scores_record_both_scores_and_none_where_unmeasured():
    scores = questionnaire_scores(0.3, {"macro_f1": 0.81234, "balanced_accuracy": 0.8}, {"macro_f1": 0.5})
    assert scores == {
        "questionnaire_dropout": 0.3,
        "val_macro_f1": 0.8123,
        "val_blank_macro_f1": 0.5,
        "val_balanced_accuracy": 0.8,
        "val_blank_balanced_accuracy": None,
    }
    assert questionnaire_scores(0.0, {"macro_f1": float("nan")}, {})["val_macro_f1"] is None


def test_the_monitored_key_is_the_both_forms_score_for_a_model_that_reads_the_questionnaire():
    assert monitored_key("val_macro_f1", reads_questionnaire=False) == "val_macro_f1"
    assert monitored_key("val_balanced_accuracy", reads_questionnaire=True) == "val_both_forms_balanced_accuracy"
    assert BOTH_FORMS_WEIGHT == ChampionRule().blank_questionnaire_weight  # the rule's default weight
    with pytest.raises(ValueError, match="choose one of"):
        monitored_key("val_loss", reads_questionnaire=True)
