"""The calibration sweep of the quality rule: scores against a synthetic mirror's plants for each value of
one threshold. Used by ``bench/curation.py`` (section 4) and tested in scin_pipeline_tests/core/test_quality.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict

import pandas as pd

from scin_pipeline.core.planted import planted_defect_scores
from scin_pipeline.core.quality import QualityConfig, decide_quality

DEFAULT_CONFIG = QualityConfig()


def threshold_sweep(
    metrics: pd.DataFrame,
    monk_tone: pd.Series | None,
    plants: pd.DataFrame,
    parameter: str,
    values: Iterable[float],
    config: QualityConfig = DEFAULT_CONFIG,
) -> pd.DataFrame:
    """planted_defect_scores for each value of one QualityConfig threshold, the others held at config.

    One row per (value, planted kind): the table bench/curation.py --calibrate prints to justify the defaults.
    """
    if parameter not in asdict(config):
        raise ValueError(f"unknown QualityConfig field {parameter!r}")
    frames = []
    for value in values:
        swept = QualityConfig(**{**asdict(config), parameter: value})
        scores = planted_defect_scores(decide_quality(metrics, monk_tone, swept), plants)
        frames.append(scores.assign(parameter=parameter, value=value))
    return pd.concat(frames, ignore_index=True)
