"""The questionnaire as a whole: blank forms, modality dropout, and what a package records of both.

Why: the service takes a photo with any number of answers, none included (the page says "leave blank what
you do not know"). A model that never saw a blank form in training answers one from outside everything it
learnt: the multimodal champion answered "other 100 %" for 12 of 12 different photos. So the candidates that
read the questionnaire (``metadata_model``, ``multimodal``) are trained with modality dropout: per training
example, with probability ``questionnaire_dropout`` the whole questionnaire is replaced by the blank one,
encoded exactly as the service encodes a blank form (``blank_questionnaires``: case rows with no column,
what ``serve.inputs`` builds; ``metadata_model.blank_questionnaire_features`` is its feature vector). The
Keras model does it with a layer (``models.questionnaire_dropout``), the scikit-learn one with weighted
blank copies of its training rows (``metadata_model.with_blank_questionnaires``). Both are scored on
validation with every case's answers and with every questionnaire blank (``questionnaire_scores``, in the
package's ``extra`` under ``QUESTIONNAIRE_EXTRA``); ``model_evaluation`` scores every candidate both ways
for the champion rule (``core.champion``).

Numpy and pandas only: the asset modules read the default rate at import time, which must stay light.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# The default rate of modality dropout (the metadata_model and multimodal configs read it). 0.3: most training
# examples keep their answers, so what the answers add is still learnt, while a blank form is common enough
# in training (about every third example) to be learnt as a case of its own; multimodal-learning practice
# drops a whole modality at 0.2-0.5.
DEFAULT_QUESTIONNAIRE_DROPOUT = 0.3
# The ``extra`` entry of a package that reads the questionnaire (``questionnaire_scores``); the service's
# answer-count warning reads it (serve.prediction).
QUESTIONNAIRE_EXTRA = "questionnaire"


def blank_questionnaires(n: int) -> pd.DataFrame:
    """``n`` case rows with no answer at all: what the service builds from a blank form (no column)."""
    return pd.DataFrame(index=pd.RangeIndex(n))


def check_questionnaire_dropout(rate: float) -> float:
    """``rate`` as a float, or ValueError when it is not in [0, 1) (1 would never show an answer)."""
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"questionnaire_dropout must be in [0, 1), got {rate}")
    return rate


def questionnaire_scores(dropout: float, answered: dict, blank: dict) -> dict:
    """What a package that reads the questionnaire records of it: the modality dropout rate, and the
    validation macro-F1 and balanced accuracy with every case's answers (``val_*``, from ``answered``) and
    with every questionnaire blank (``val_blank_*``, from ``blank``); None where not measured (no
    validation rows)."""

    def number(metrics: dict, name: str) -> float | None:
        value = metrics.get(name)
        return round(float(value), 4) if value is not None and np.isfinite(value) else None

    scores: dict = {"questionnaire_dropout": check_questionnaire_dropout(dropout)}
    for name in ("macro_f1", "balanced_accuracy"):
        scores[f"val_{name}"] = number(answered, name)
        scores[f"val_blank_{name}"] = number(blank, name)
    return scores
