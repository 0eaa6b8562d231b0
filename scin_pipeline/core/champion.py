"""The champion rule: which evaluated candidate the registry alias ``champion`` points at, and why.

Candidates are ranked on one split (validation by default; the test split only reports) by one metric,
ties broken by further metrics and then by name. A candidate is eligible only when its balanced accuracy on
that split beats chance (1/K) by a margin and the fairness gate did not fail it; an ineligible one is kept in
the table with the reason it was passed over. The gate has three outcomes (``core.fairness``): failed always
excludes; "not judged" (some gate group too small to judge, even at bin level) follows ``unjudged_policy``:
``block`` (the default, and ``scin-pipeline run``'s) excludes the candidate too, ``allow_with_flag`` (the
demo's, on synthetic images) keeps it eligible and its ``fairness_status`` says "not_judged", which
``model_comparison`` puts on the model version (tag ``scin.fairness_status``), the card and the served
page. ``model_comparison`` (scin_pipeline.assets.evaluation) feeds the rule from its Launchpad config and
sets or clears the alias.

Blank questionnaires. The service takes a photo with any number of answers, none included (the page says
"leave blank what you do not know"), and a candidate that reads the questionnaire may answer a blank form
from outside everything it learnt (the old multimodal champion answered "other 100 %" for every photo).
``model_evaluation`` therefore scores the selection split a second time with every questionnaire blank
(split ``<split>_blank``, ``blank_split``; a candidate that reads no questionnaire scores the same on both),
and the rule reads both:

- eligibility: the chance floor applies to the blank-questionnaire balanced accuracy too. A candidate whose
  answer to a blank form barely depends on the photo scores about 1/K there, and is passed over whatever it
  scores with answers: for everyone who leaves the form blank it is a constant.
- ranking: by ``(1 - w) x metric with the answers + w x metric with blank questionnaires``,
  ``w = blank_questionnaire_weight`` (default 0.5). The pipeline has no record of how often people leave
  the form blank, so by default both kinds of request weigh the same; an image-only candidate scores the
  same either way and is ranked exactly as before. A weighted score rather than a second floor ("blank score
  at least the image-only candidate's"): a floor is a cliff that a few validation cases decide, while the
  weight makes a multimodal candidate that serves blank forms worse than the image-only one pay in
  proportion, and lets one that serves both well win. ``w = 0`` ranks on the answered score alone (the rule
  before blank questionnaires, the eligibility floor aside).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd

UNJUDGED_POLICIES = ("block", "allow_with_flag")
# On every registered candidate version: the fairness gate's outcome (passed, failed, not_judged) and, when
# not judged, which gate groups were too small. The served page reads them (serve.model).
FAIRNESS_STATUS_TAG = "scin.fairness_status"
FAIRNESS_UNJUDGED_TAG = "scin.fairness_unjudged"
# On every candidate's MLflow run (fairness_report sets them with FAIRNESS_STATUS_TAG): the gate's reason,
# so MLflow's run comparison shows why a candidate passed or failed beside its per-group metrics.
FAIRNESS_REASON_TAG = "scin.fairness_reason"


@dataclass(frozen=True)
class ChampionRule:
    """The rule's settings (defaults = ``model_comparison``'s config defaults)."""

    selection_split: str = "val"
    selection_metric: str = "macro_f1"
    tie_breakers: Sequence[str] = ("balanced_accuracy", "mean_ovr_auc")
    chance_margin: float = 0.05
    unjudged_policy: Literal["block", "allow_with_flag"] = "block"
    blank_questionnaire_weight: float = 0.5

    def __post_init__(self):
        if self.unjudged_policy not in UNJUDGED_POLICIES:
            raise ValueError(f"unjudged_policy must be one of {UNJUDGED_POLICIES}, got {self.unjudged_policy!r}")
        if not 0.0 <= self.blank_questionnaire_weight <= 1.0:
            raise ValueError(f"blank_questionnaire_weight must be in [0, 1], got {self.blank_questionnaire_weight}")

    @property
    def score_column(self) -> str:
        """The ranked table's column of the weighted score the rule ranks by."""
        return f"{self.selection_split}_selection_score"


def blank_split(split: str) -> str:
    """The name of ``split`` scored with every questionnaire blank (model_evaluation's ``split`` value)."""
    return f"{split}_blank"


def _score_text(config: ChampionRule) -> str:
    metric, w = config.selection_metric, config.blank_questionnaire_weight
    if w == 0:
        return f"{metric} with the questionnaire as answered"
    if w == 1:
        return f"{metric} with every questionnaire blank"
    return f"{1 - w:.2f} x {metric} with the questionnaire as answered + {w:.2f} x {metric} with it blank"


def gate_statuses(gates: pd.DataFrame) -> pd.Series:
    """model -> "passed" / "failed" / "not_judged"; a gates table from before the three outcomes (no
    ``status`` column) reads passed/failed from ``passed``."""
    if "status" in gates:
        status = gates["status"].astype(str)
    else:
        status = gates["passed"].astype(bool).map({True: "passed", False: "failed"})
    return pd.Series(status.to_numpy(), index=gates["model"].astype(str).to_numpy())


def champion_rule_text(config: ChampionRule) -> str:
    """The rule in one sentence (asset metadata, the registry's champion reason)."""
    return (
        f"highest {config.selection_split} {_score_text(config)} (ties: "
        f"{', '.join(config.tie_breakers)}, then name), among candidates whose {config.selection_split} "
        f"balanced accuracy beats chance (1/K) by at least {config.chance_margin:.2f} both with the "
        "questionnaire as answered and with it blank (a blank form must get its answer from the photo) and "
        "that pass the fairness gate"
        + (
            " (one it could not judge, a gate group too small even at bin level, is not eligible)"
            if config.unjudged_policy == "block"
            else " or that it could not judge (a gate group too small even at bin level: allowed, flagged "
            "'fairness not judged' on the model version, card and page)"
        )
    )


def choose_champion(
    wide: pd.DataFrame, n_classes: int, config: ChampionRule, gates: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Rank candidates by the rule; ``passed_over`` says why an ineligible one was not considered.

    ``wide``: one row per model, columns ``<split>_<metric>``, ``<split>_blank_<metric>`` (blank
    questionnaires) included. ``gates`` (model, status or passed, reason): a candidate the fairness gate
    failed is passed over, whatever its average metrics; one it could not judge is passed over under
    ``unjudged_policy="block"``. Returns ``wide`` with ``<split>_selection_score`` (the weighted score ranked
    by), ``fairness_status`` ("passed", "failed", "not_judged"; "" without gates), ``passed_over``, ``rank``
    (1 = champion; missing when passed over) and ``champion``, ranked first.
    """
    split, blank = config.selection_split, blank_split(config.selection_split)
    answered_key, blank_key = f"{split}_{config.selection_metric}", f"{blank}_{config.selection_metric}"
    lacking = [c for c in (answered_key, blank_key, f"{blank}_balanced_accuracy") if c not in wide]
    if lacking:
        raise ValueError(
            f"the metric table lacks {lacking} (it has {sorted(wide.columns)}): the rule reads the {split} split "
            f"scored with the answers and with blank questionnaires (model_evaluation's split {blank!r})"
        )
    table = wide.copy()
    w = config.blank_questionnaire_weight
    # w = 0 or 1 reads one column alone, so a missing score on the other side does not blank the score.
    table[config.score_column] = (
        table[answered_key]
        if w == 0
        else table[blank_key]
        if w == 1
        else (1 - w) * table[answered_key] + w * table[blank_key]
    )
    chance = 1.0 / max(n_classes, 1)
    table["passed_over"] = ""
    table["fairness_status"] = ""
    if gates is not None and len(gates):
        status = gate_statuses(gates)
        reasons = pd.Series(gates["reason"].astype(str).to_numpy(), index=status.index)
        table["fairness_status"] = table["model"].astype(str).map(status).fillna("")
        unfair = (table["fairness_status"] == "failed").to_numpy()
        table.loc[unfair, "passed_over"] = [f"fairness gate failed: {reasons[m]}" for m in table.loc[unfair, "model"]]
        if config.unjudged_policy == "block":
            unjudged = (table["fairness_status"] == "not_judged").to_numpy()
            table.loc[unjudged, "passed_over"] = [
                f"fairness not judged (unjudged_policy block): {reasons[m]}" for m in table.loc[unjudged, "model"]
            ]
    low = ~(table[f"{split}_balanced_accuracy"] >= chance + config.chance_margin) & (table["passed_over"] == "")
    table.loc[low, "passed_over"] = (
        f"{split} balanced accuracy not above chance ({chance:.3f}) + {config.chance_margin:.2f}"
    )
    low_blank = ~(table[f"{blank}_balanced_accuracy"] >= chance + config.chance_margin) & (table["passed_over"] == "")
    table.loc[low_blank, "passed_over"] = [
        f"{split} balanced accuracy with blank questionnaires ({value:.3f}) not above chance ({chance:.3f}) + "
        f"{config.chance_margin:.2f}: with a blank form its answer hardly changes from one case to the next"
        for value in table.loc[low_blank, f"{blank}_balanced_accuracy"]
    ]
    keys = [config.score_column, *[f"{split}_{m}" for m in config.tie_breakers]]
    eligible = table[table["passed_over"] == ""].sort_values(
        keys + ["model"], ascending=[False] * len(keys) + [True], na_position="last"
    )
    table["rank"] = table["model"].map({m: i + 1 for i, m in enumerate(eligible["model"])}).astype("Int64")
    table["champion"] = table["rank"] == 1
    return table.sort_values(["rank", "model"], na_position="last").reset_index(drop=True)


def no_champion_reason(ranked: pd.DataFrame, rule: str) -> str:
    """Why no candidate is champion: the rule and each candidate's reason for being passed over."""
    passed_over = "; ".join(f"{model}: {why}" for model, why in zip(ranked["model"], ranked["passed_over"]) if why)
    return f"no eligible candidate by the rule ({rule}); {passed_over or 'no candidate was evaluated'}"


TWIN_METRICS = ("val_macro_f1", "val_balanced_accuracy", "test_balanced_accuracy", "test_macro_f1", "test_mean_ovr_auc")


def twin_comparison(wide: pd.DataFrame, twins: dict[str, str], metrics: Sequence[str] = TWIN_METRICS) -> pd.DataFrame:
    """Each semi-supervised candidate beside its supervised twin (the same model on the same labelled rows and
    split, without the unlabelled cases): one row per (candidate, metric) with both values and the
    difference (candidate - twin). Pairs whose candidate or twin was not evaluated are left out."""
    by_model = wide.set_index(wide["model"].astype(str))
    rows = []
    for model, twin in twins.items():
        if model not in by_model.index or twin not in by_model.index:
            continue
        for metric in metrics:
            if metric not in by_model.columns:
                continue
            column = by_model[metric].astype(float).to_dict()
            value, twin_value = float(column[model]), float(column[twin])
            rows.append((model, twin, metric, value, twin_value, value - twin_value))
    return pd.DataFrame(rows, columns=["model", "twin", "metric", "value", "twin_value", "difference"])
