"""One prediction: decode the upload once, check its quality, preprocess it as in training, predict.

Preprocessing is training's own code, not a copy: ``core.image_cache``'s guarded decoder (the one behind
``preprocess_image_bytes``) and ``preprocess_image``. The two steps are called separately only so that the
quality check can look at the full-size decoded pixels without a second decode; a test checks that the
result is bit-identical to ``preprocess_image_bytes``.

The quality check is ``core.quality``'s: ``image_metrics`` on the decoded image and the curation stage's
rule ``decide_quality`` with its default ``QualityConfig``, plus a size check. Its verdict is shown with
the prediction, never instead of it ("warning" + issues, or "ok"): a person should see both the answer and
why it deserves less trust.

- dark: the curation rule judges lightness relative to the case's Monk skin tone, and no tone is known
  for an upload. The reference is the deepest swatch (Monk 10, L* 14.6), so only frames too dark for any
  skin are flagged: a lighter reference would call well-exposed photos of deep skin "dark", a warning that
  would fall on one group of people.
- too small: a short side under ``MIN_SHORT_SIDE`` (64) px is flagged, not refused: the model enlarges it
  and can still answer, but fine detail is absent. A side under ``MIN_SIDE`` (16) px is refused (422
  ``too_small``) before the quality code runs: such a picture (1 x 1, 1 x N, 2 x 2, ...) holds no skin to
  look at, and the quality metrics are not made for it.
- too many pixels: the decoder refuses a header that declares more than ``max_pixels`` (the service's
  ``--max-megapixels``) before any pixel buffer exists (422 ``too_many_pixels``).
- overexposed, low information, blurry: the curation thresholds as they are (measured on the synthetic
  mirror; see QualityConfig).

Answers: every answer says how many of the questionnaire's questions were answered (``answers``) and, for a
model that reads the questionnaire, warns when some are missing and the model relies on them: its package
records its validation macro-F1 with every case's answers and with blank questionnaires (core.questionnaire),
and "relies" means the blank score is the lower one. The warning gives both scores, so a person can judge
how much it matters. A metadata-only model with no answer at all answers the same for everyone, and says so.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from scin_pipeline.core.image_cache import decode_bytes_rgb, preprocess_image
from scin_pipeline.core.metadata_model import QUESTIONS, answered_questions
from scin_pipeline.core.quality import MONK_SWATCH_LIGHTNESS, QualityConfig, decide_quality, image_metrics
from scin_pipeline.core.questionnaire import QUESTIONNAIRE_EXTRA
from scin_pipeline.core.splits import OTHER
from scin_pipeline.serve.inputs import PredictionRequest, RequestError
from scin_pipeline.serve.limits import DEFAULT_MAX_PIXELS
from scin_pipeline.serve.model import ServedModel

NOT_A_DIAGNOSIS = (
    "NOT A DIAGNOSIS. This is a demonstration of a machine-learning model: it can be wrong, it "
    "has not been validated for clinical use, and it cannot replace a doctor. See a doctor or "
    "dermatologist about any skin concern."
)
SYNTHETIC_NOTICE = "This model was trained on SYNTHETIC images: its output says nothing about real skin conditions."
MIN_SHORT_SIDE = 64
MIN_SIDE = 16
DARK_REFERENCE_MONK_TONE = 10
TOP_K = 3
UPLOAD_NAME = "upload"  # what error messages call the file: never the client's own file name
# ImagePreprocessError.kind -> (HTTP status, error code). A picture over the pixel limit is 422, not 413: the
# request is small; its content declares a picture too large to decode. The decoder calls it a decompression
# bomb whatever the limit; the service says what the sender can change.
ERROR_BY_DECODE_KIND = {
    "unsupported_format": (415, "unsupported_format"),
    "empty_file": (422, "empty_file"),
    "truncated": (422, "truncated"),
    "corrupt": (422, "corrupt"),
    "decompression_bomb": (422, "too_many_pixels"),
}
QUALITY_METRICS_SHOWN = ("brightness_median", "overexposed_fraction", "entropy", "sharpness", "texture")
# What the class "other" is (core.splits: the conditions with too few cases to be a class of their own).
OTHER_EXPLAINED = (
    '"other" is not one condition: it stands for every condition outside the ones this model names, those '
    "too rare in its training data to be learnt on their own. It does not mean healthy skin, nor that "
    "nothing was found."
)


def notice_for(served: ServedModel) -> str:
    return f"{NOT_A_DIAGNOSIS} {SYNTHETIC_NOTICE}" if served.synthetic_data else NOT_A_DIAGNOSIS


def decode_upload(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The full-size RGB pixels of uploaded PNG/JPEG bytes (:func:`decode_photo`, named ``upload``: never the
    client's file name); RequestError when refused."""
    try:
        return decode_photo(data, UPLOAD_NAME, max_pixels)
    except RequestError as exc:
        if exc.error != "too_many_pixels":
            raise
        advice = f". This service takes pictures of up to {max_pixels:,} pixels: send a smaller copy of the photo"
        raise RequestError(exc.status, exc.error, exc.detail + advice) from None


def decode_photo(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The full-size RGB pixels of PNG/JPEG bytes (training's guarded decoder, its header check at
    ``max_pixels``); RequestError (HTTP status, error code, a message starting with ``name``) when the
    decoder refuses them, or when a side is under ``MIN_SIDE`` px."""
    from scin_pipeline.core.image_cache import ImagePreprocessError

    try:
        rgb = decode_bytes_rgb(bytes(data), name, max_pixels=max_pixels)
    except ImagePreprocessError as exc:
        status, error = ERROR_BY_DECODE_KIND.get(exc.kind, (422, exc.kind))
        raise RequestError(status, error, str(exc)) from None
    height, width = rgb.shape[:2]
    if min(width, height) < MIN_SIDE:
        raise RequestError(
            422,
            "too_small",
            f"{name}: the picture is {width} x {height} px, too small to look at: each side must be at "
            f"least {MIN_SIDE} px (a photo of the skin is usually hundreds of pixels wide)",
        )
    return rgb


DEFAULT_QUALITY = QualityConfig()  # frozen: one shared default instance


def quality_verdict(rgb: np.ndarray, config: QualityConfig = DEFAULT_QUALITY) -> dict:
    """{"verdict": "ok"|"warning", "issues": [{"issue", "detail"}], width, height, dark_reference, metrics}."""
    height, width = rgb.shape[:2]
    metrics = image_metrics(
        rgb, original_size=(width, height), source_mode=None, working_long_side=config.working_long_side
    )
    frame = pd.DataFrame([{**metrics, "image_id": UPLOAD_NAME, "decode_status": "ok"}])
    decision = decide_quality(frame, pd.Series([DARK_REFERENCE_MONK_TONE], index=frame.index), config).iloc[0]
    issues = []
    if min(width, height) < MIN_SHORT_SIDE:
        issues.append(
            {
                "issue": "too_small",
                "detail": f"{width} x {height} px: the short side is under "
                f"{MIN_SHORT_SIDE} px, so the model sees an enlarged picture without fine detail",
            }
        )
    reason = decision["reason"]
    if reason == "dark":
        issues.append(
            {
                "issue": "dark",
                "detail": f"median lightness L* {metrics['brightness_median']:.1f} is "
                f"under {config.dark_relative_min:g} x the lightness of the deepest Monk skin tone "
                f"(L* {MONK_SWATCH_LIGHTNESS[DARK_REFERENCE_MONK_TONE]:.1f}): too dark for any skin",
            }
        )
    elif reason == "overexposed":
        issues.append(
            {
                "issue": "overexposed",
                "detail": f"{metrics['overexposed_fraction']:.0%} of the frame "
                f"is blown out (limit {config.overexposed_fraction_max:.0%})",
            }
        )
    elif reason == "low_information":
        issues.append(
            {
                "issue": "low_information",
                "detail": (
                    f"an almost uniform frame (grey-level entropy {metrics['entropy']:.2f} bits, "
                    f"under {config.low_information_entropy_min:g})"
                    if metrics["entropy"] < config.low_information_entropy_min
                    else f"a nearly flat frame: no skin texture or lesion (structure {metrics['structure']:.2f} %, "
                    f"under {config.low_information_structure_min:g} %)"
                ),
            }
        )
    elif reason == "blurry":
        issues.append(
            {
                "issue": "blurry",
                "detail": f"out of focus or shaken (variance of the Laplacian "
                f"{metrics['sharpness']:.2f}, under {config.blurry_sharpness_min:g})",
            }
        )
    return {
        "verdict": "warning" if issues else "ok",
        "issues": issues,
        "width": int(width),
        "height": int(height),
        "dark_reference": f"Monk skin tone {DARK_REFERENCE_MONK_TONE} (the deepest swatch): no skin tone is "
        "known for an upload, so only frames too dark for any skin are called dark",
        "metrics": {name: float(metrics[name]) for name in QUALITY_METRICS_SHOWN},
    }


def questionnaire_record(served: ServedModel) -> dict | None:
    """The package's validation scores with and without answers (core.questionnaire), for a model that
    reads the questionnaire and was trained with them recorded; None otherwise."""
    record = served.package.extra.get(QUESTIONNAIRE_EXTRA)
    return dict(record) if served.uses_metadata and isinstance(record, dict) else None


def class_notes(served: ServedModel) -> dict[str, str]:
    """Class name -> what it means, for the classes that are not a condition's name."""
    return {OTHER: OTHER_EXPLAINED} if OTHER in served.classes else {}


def question_words(question: str) -> str:
    return question.replace("_", " ")


def missing_answers_warning(served: ServedModel, missing: list[str]) -> str | None:
    """The warning for a request whose ``missing`` questions the model would have read; None when the model
    reads no questionnaire, nothing is missing, or its validation score was no lower without answers."""
    if not served.uses_metadata or not missing:
        return None
    if not served.uses_image and len(missing) == len(QUESTIONS):
        return (
            "This model reads only the questionnaire and no question was answered: its answer is the same "
            "for everyone, not a reading of this case. Answer what you know."
        )
    unanswered = (
        f"{len(missing)} of {len(QUESTIONS)} questions are unanswered ({', '.join(map(question_words, missing))})"
    )
    record = questionnaire_record(served) or {}
    answered, blank = record.get("val_macro_f1"), record.get("val_blank_macro_f1")
    if answered is None or blank is None:
        return (
            f"This model reads the questionnaire and {unanswered}. How much it relies on the answers was not "
            "measured for this version: its answer may be less reliable than with every answer. Answer what "
            "you know."
        )
    if blank >= answered:
        return None  # it scored as well with blank questionnaires: it does not rely on the answers
    synthetic = " (on SYNTHETIC images)" if served.synthetic_data else ""
    return (
        f"This model relies on the questionnaire, and {unanswered}. On validation{synthetic} its macro-F1 was "
        f"{answered:.2f} with each case's answers and {blank:.2f} with none: the fewer the answers, the less "
        "reliable its answer. Answer what you know; a missing answer is read as not answered, never guessed."
    )


def answers_summary(served: ServedModel, request: PredictionRequest) -> dict:
    """How many questions the request answered (a check-box group counts when a box is ticked), which are
    missing, whether the model reads them, and the warning when it relies on missing ones."""
    answered = answered_questions(request.cases()).iloc[0]
    missing = [question for question in QUESTIONS if not bool(answered[question])]
    return {
        "given": len(QUESTIONS) - len(missing),
        "questions": len(QUESTIONS),
        "missing": missing,
        "read_by_model": served.uses_metadata,
        "warning": missing_answers_warning(served, missing),
    }


def calibration_info(served: ServedModel) -> dict:
    """Whether the probabilities served are calibrated, and how, with one sentence for people."""
    calibration = served.package.calibration
    if calibration is None or not calibration.fitted:
        why = "this model version carries no calibration" if calibration is None else calibration.note
        return {
            "calibrated": False,
            "method": None,
            "temperature": None,
            "fitted_on": None,
            "text": f"The probabilities are the model's own outputs, not calibrated ({why}).",
        }
    return {
        "calibrated": True,
        "method": calibration.method,
        "temperature": calibration.temperature,
        "fitted_on": calibration.fitted_on,
        "text": f"The probabilities are calibrated by temperature scaling (T = {calibration.temperature:.2f}, "
        f"fitted on the {'validation' if calibration.fitted_on == 'val' else calibration.fitted_on} split"
        + (", each case with its answers and with a blank questionnaire)." if calibration.questionnaire else ")."),
    }


def model_info(served: ServedModel) -> dict:
    return {
        "name": served.name,
        "version": served.version,
        "alias": served.alias,
        "uri": served.loaded_uri,
        "kind": served.kind,
        "classes": served.classes,
        "image_size": served.package.image_size,
        "uses_image": served.uses_image,
        "uses_metadata": served.uses_metadata,
        "synthetic_data": served.synthetic_data,
        "fairness_status": served.fairness_status,
        "fairness_unjudged": served.fairness_unjudged,
        "run_id": served.run_id,
        "questionnaire": questionnaire_record(served),
        "class_notes": class_notes(served),
        "calibration": calibration_info(served),
    }


def predict(served: ServedModel, request: PredictionRequest, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """The answer of POST /predict (see app.PredictionResponse); RequestError for a refused image."""
    rgb = decode_upload(request.image, max_pixels) if request.image is not None else None
    return predict_decoded(served, request, rgb)


def predict_decoded(served: ServedModel, request: PredictionRequest, rgb: np.ndarray | None) -> dict:
    """:func:`predict` for an upload already decoded by :func:`decode_upload` (``rgb``; None: no image)."""
    quality, images, cases = prepare_inputs(served, request, rgb)
    return answer(served, request, quality, served.predict_proba(images, cases)[0])


def prepare_inputs(
    served: ServedModel, request: PredictionRequest, rgb: np.ndarray | None
) -> tuple[dict | None, np.ndarray | None, pd.DataFrame]:
    """(quality verdict, the model's image input (1, S, S, 3) or None, the case row): everything of one
    prediction but the model call, which the service batches (:mod:`.batching`)."""
    if rgb is None and served.uses_image:
        raise RequestError(422, "missing_file", "no image: send it as the file field `file` (PNG or JPEG)")
    quality = images = None
    if rgb is not None:
        quality = quality_verdict(rgb)
        if served.uses_image:
            assert served.package.image_size is not None  # the image kinds carry one (PackagedClassifier checks)
            images = preprocess_image(rgb, served.package.image_size)[None]
    return quality, images, request.cases()


def answer(served: ServedModel, request: PredictionRequest, quality: dict | None, probabilities: np.ndarray) -> dict:
    """The answer of POST /predict from one row of class probabilities."""
    order = np.argsort(-probabilities, kind="stable")[:TOP_K]
    classes = served.classes
    return {
        "notice": notice_for(served),
        "probabilities": {c: float(p) for c, p in zip(classes, probabilities)},
        "top": [{"condition": classes[i], "probability": float(probabilities[i])} for i in order],
        "model": model_info(served),
        "quality": quality,
        "image_used": served.uses_image,
        "metadata_used": served.uses_metadata,
        "metadata": request.metadata,
        "answers": answers_summary(served, request),
    }
