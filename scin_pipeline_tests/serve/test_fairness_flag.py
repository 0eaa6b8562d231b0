"""The served page and GET /model say when the champion's fairness was not judged (registry tags written by
model_comparison under unjudged_policy allow_with_flag)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from scin_pipeline.core.champion import FAIRNESS_STATUS_TAG, FAIRNESS_UNJUDGED_TAG
from scin_pipeline.serve.app import ModelInfo
from scin_pipeline.serve.model import ServedModel
from scin_pipeline.serve.prediction import model_info


def served_with(tags: dict[str, str]) -> ServedModel:
    package = SimpleNamespace(kind="sklearn_metadata", classes=["a", "b"], image_size=None, extra={}, calibration=None)
    return ServedModel(package=package, requested_uri="models:/m@champion", loaded_uri="models:/m/3", tags=tags)  # type: ignore[arg-type]


def test_model_info_carries_the_fairness_flag():
    flagged = served_with({FAIRNESS_STATUS_TAG: "not_judged", FAIRNESS_UNJUDGED_TAG: "monk_us_bin=7-10 (n=24)"})
    info = ModelInfo.model_validate(model_info(flagged))
    assert info.fairness_status == "not_judged" and info.fairness_unjudged == "monk_us_bin=7-10 (n=24)"
    plain = ModelInfo.model_validate(model_info(served_with({})))
    assert plain.fairness_status is None and plain.fairness_unjudged is None


def test_the_page_shows_the_flag_only_when_not_judged():
    page = (Path(__file__).parents[2] / "scin_pipeline" / "serve" / "static" / "index.html").read_text()
    assert 'data-testid="fairness-not-judged" hidden' in page and "Fairness NOT JUDGED" in page
    assert '$("fairness").hidden = model.fairness_status !== "not_judged";' in page
