"""How many questions were answered, and the warning when the served model relies on missing answers
(serve.prediction.answers_summary), through POST /predict and GET /model; what "other" means. Models: the
tiny SYNTHETIC ones of conftest.py, the multimodal one also with the validation scores a pipeline-trained
package records (core.questionnaire)."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from scin_pipeline.core.metadata_model import QUESTIONS
from scin_pipeline.core.questionnaire import QUESTIONNAIRE_EXTRA, questionnaire_scores
from scin_pipeline.serve import create_app, load_served_model
from scin_pipeline.serve.app import ModelInfo
from scin_pipeline.serve.inputs import CHECKBOX_FIELDS, CHOICE_FIELDS
from scin_pipeline.serve.model import ServedModel
from scin_pipeline.serve.prediction import OTHER_EXPLAINED, model_info
from scin_pipeline_tests.serve.conftest import ITCH, encode, synthetic_skin_rgb

TWO_ANSWERS = {"age_group": "AGE_30_TO_39", "symptoms": ITCH}
EVERY_ANSWER = {
    **{name: values[0] for name, values in CHOICE_FIELDS.items()},
    **{name: columns[0] for name, columns in CHECKBOX_FIELDS.items()},
}


def client_for(registry, kind: str, record: dict | None):
    """A TestClient on the registry's ``kind`` version, its package carrying ``record`` as its questionnaire
    scores (None: as registered, without)."""
    served = load_served_model(registry.uri(kind), tracking_uri=registry.tracking_uri)
    if record is not None:
        served.package = copy.copy(served.package)
        served.package.extra = {**served.package.extra, QUESTIONNAIRE_EXTRA: record}
    return TestClient(create_app(served_model=served))


def predict(client, fields: dict, *, image: bool = True) -> dict:
    # An unanswered question is sent empty, as the page's form sends it (and the body stays multipart).
    parts = [(name, (None, value)) for name, value in fields.items()] or [("age_group", (None, ""))]
    if image:
        parts.append(("file", ("skin.png", encode(synthetic_skin_rgb(5)), "image/png")))
    response = client.post("/predict", files=parts)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def relying(registry):
    """The multimodal version with scores that drop without answers (0.80 -> 0.50 macro-F1)."""
    record = questionnaire_scores(
        0.3, {"macro_f1": 0.8, "balanced_accuracy": 0.82}, {"macro_f1": 0.5, "balanced_accuracy": 0.55}
    )
    with client_for(registry, "keras_multimodal", record) as client:
        yield client


def test_the_answer_counts_the_questions_answered_and_warns_about_the_missing_ones(relying):
    answer = predict(relying, TWO_ANSWERS)
    answers = answer["answers"]
    assert answers["given"] == 2 and answers["questions"] == len(QUESTIONS) == 8
    assert answers["missing"] == [q for q in QUESTIONS if q not in ("age_group", "symptoms")]
    assert answers["read_by_model"] is True
    warning = answers["warning"]
    assert warning.startswith("This model relies on the questionnaire, and 6 of 8 questions are unanswered (")
    assert "sex at birth" in warning and "body parts" in warning and "age group" not in warning
    assert "macro-F1 was 0.80 with each case's answers and 0.50 with none" in warning
    assert "SYNTHETIC" in warning  # the scores were measured on synthetic images: said where they are shown
    blank = predict(relying, {})["answers"]
    assert blank["given"] == 0 and len(blank["missing"]) == 8 and "8 of 8 questions" in blank["warning"]
    # /model carries the scores the warning quotes.
    described = relying.get("/model").json()["questionnaire"]
    assert described["val_macro_f1"] == 0.8 and described["val_blank_macro_f1"] == 0.5
    assert described["questionnaire_dropout"] == 0.3


def test_every_question_answered_means_no_warning(relying):
    answers = predict(relying, EVERY_ANSWER)["answers"]
    assert answers == {"given": 8, "questions": 8, "missing": [], "read_by_model": True, "warning": None}


def test_no_warning_when_the_model_scored_as_well_without_answers(registry):
    record = questionnaire_scores(0.3, {"macro_f1": 0.6}, {"macro_f1": 0.61})
    with client_for(registry, "keras_multimodal", record) as client:
        answers = predict(client, TWO_ANSWERS)["answers"]
    assert answers["given"] == 2 and answers["warning"] is None


def test_a_version_without_recorded_scores_warns_that_reliance_was_not_measured(registry):
    with client_for(registry, "keras_multimodal", None) as client:
        assert client.get("/model").json()["questionnaire"] is None
        warning = predict(client, TWO_ANSWERS)["answers"]["warning"]
    assert "6 of 8 questions are unanswered" in warning and "was not measured for this version" in warning


def test_a_metadata_only_model_with_no_answer_says_its_answer_is_the_same_for_everyone(registry):
    with client_for(registry, "sklearn_metadata", None) as client:
        blank = predict(client, {}, image=False)["answers"]
        partial = predict(client, TWO_ANSWERS, image=False)["answers"]
    assert blank["given"] == 0 and "its answer is the same for everyone" in blank["warning"]
    assert partial["given"] == 2 and "same for everyone" not in partial["warning"]


def test_an_image_only_model_counts_the_answers_it_does_not_read(registry):
    with client_for(registry, "keras_image", None) as client:
        answers = predict(client, TWO_ANSWERS)["answers"]
        assert client.get("/model").json()["questionnaire"] is None
    assert answers["given"] == 2 and answers["read_by_model"] is False and answers["warning"] is None


def test_other_is_explained_in_the_model_description_and_on_the_page():
    def served(classes: list[str]) -> ServedModel:
        package = SimpleNamespace(kind="keras_image", classes=classes, image_size=32, extra={}, calibration=None)
        return ServedModel(package=package, requested_uri="models:/m/1", loaded_uri="models:/m/1")  # type: ignore[arg-type]

    info = ModelInfo.model_validate(model_info(served(["Eczema", "other"])))
    assert info.class_notes == {"other": OTHER_EXPLAINED}
    assert "not one condition" in OTHER_EXPLAINED and "does not mean healthy skin" in OTHER_EXPLAINED
    assert ModelInfo.model_validate(model_info(served(["Eczema", "Psoriasis"]))).class_notes == {}
    page = (Path(__file__).parents[2] / "scin_pipeline" / "serve" / "static" / "index.html").read_text()
    # The page shows the note of a class in the answer's top list, the count and the warning.
    assert 'data-testid="class-notes"' in page and "answer.model.class_notes" in page
    assert '"You answered " + given.given + " of " + given.questions + " questions."' in page
    assert '$("answers-warning").textContent = given.warning || "";' in page
