"""The champion rule: which evaluated candidate the registry alias ``champion`` points at, and why.

Candidates are ranked on one split (validation by default; the test split only reports) by one metric,
ties broken by further metrics and then by name. A candidate is eligible only when its balanced accuracy on
that split beats chance (1/K) by a margin and it passed the fairness gate; an ineligible one is kept in the
table with the reason it was passed over. ``model_comparison`` (scin_pipeline.assets.evaluation) feeds the
rule from its Launchpad config and sets or clears the alias.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class ChampionRule:
    """The rule's settings (defaults = ``model_comparison``'s config defaults)."""

    selection_split: str = "val"
    selection_metric: str = "macro_f1"
    tie_breakers: Sequence[str] = ("balanced_accuracy", "mean_ovr_auc")
    chance_margin: float = 0.05


def champion_rule_text(config: ChampionRule) -> str:
    """The rule in one sentence (asset metadata, the registry's champion reason)."""
    return (
        f"highest {config.selection_split} {config.selection_metric} (ties: "
        f"{', '.join(config.tie_breakers)}, then name), among candidates whose {config.selection_split} "
        f"balanced accuracy beats chance (1/K) by at least {config.chance_margin:.2f} and that pass the "
        "fairness gate"
    )


def choose_champion(
    wide: pd.DataFrame, n_classes: int, config: ChampionRule, gates: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Rank candidates by the rule; ``passed_over`` says why an ineligible one was not considered.

    ``wide``: one row per model, columns ``<split>_<metric>``. ``gates`` (model, passed, reason): a
    candidate failing the fairness gate is passed over, whatever its average metrics. Returns ``wide`` with
    ``passed_over``, ``rank`` (1 = champion; missing when passed over) and ``champion``, ranked first.
    """
    split = config.selection_split
    table = wide.copy()
    chance = 1.0 / max(n_classes, 1)
    table["passed_over"] = ""
    if gates is not None and len(gates):
        failed = gates[~gates["passed"].astype(bool)].set_index("model")["reason"]
        unfair = table["model"].isin(failed.index)
        table.loc[unfair, "passed_over"] = [f"fairness gate failed: {failed[m]}" for m in table.loc[unfair, "model"]]
    low = ~(table[f"{split}_balanced_accuracy"] >= chance + config.chance_margin) & (table["passed_over"] == "")
    table.loc[low, "passed_over"] = (
        f"{split} balanced accuracy not above chance ({chance:.3f}) + {config.chance_margin:.2f}"
    )
    keys = [f"{split}_{config.selection_metric}", *[f"{split}_{m}" for m in config.tie_breakers]]
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
