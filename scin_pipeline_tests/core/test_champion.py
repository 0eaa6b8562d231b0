"""The champion rule: eligibility (chance margin with the answers and with blank questionnaires, fairness
gate), ranking by the weighted score with tie-breakers, the rule's text and the reason when no candidate is
eligible. Hand-made metric tables, no training."""

from __future__ import annotations

import pandas as pd
import pytest

from scin_pipeline.core.champion import (
    ChampionRule,
    champion_rule_text,
    choose_champion,
    no_champion_reason,
    twin_comparison,
)


def wide(**columns) -> pd.DataFrame:
    """A metric table; a split's blank-questionnaire scores not given are its answered ones (a candidate that
    reads no questionnaire scores the same with a blank one)."""
    table = pd.DataFrame(columns)
    for column in list(table.columns):
        split, _, metric = column.partition("_")
        if split in ("val", "train") and not metric.startswith("blank_") and f"{split}_blank_{metric}" not in table:
            table[f"{split}_blank_{metric}"] = table[column]
    return table


def test_a_candidate_failing_the_fairness_gate_is_passed_over():
    table = wide(
        model=["fair", "unfair"],
        val_macro_f1=[0.50, 0.90],
        val_balanced_accuracy=[0.55, 0.92],
        val_mean_ovr_auc=[0.7, 0.95],
    )
    gates = pd.DataFrame(
        {
            "model": ["fair", "unfair"],
            "passed": [True, False],
            "reason": ["ok", "monk_us_bin 7-10 is 0.30 below overall"],
        }
    )
    ranked = choose_champion(table, n_classes=4, config=ChampionRule(), gates=gates)
    assert ranked.loc[ranked["champion"], "model"].tolist() == ["fair"]
    unfair = ranked.set_index("model").loc["unfair"]
    assert unfair["passed_over"] == "fairness gate failed: monk_us_bin 7-10 is 0.30 below overall"
    assert pd.isna(unfair["rank"])
    # Without the gate the better-scoring model would have won.
    assert choose_champion(table, 4, ChampionRule()).loc[lambda f: f["champion"], "model"].tolist() == ["unfair"]


def test_no_eligible_candidate_means_no_champion():
    table = wide(
        model=["a", "b"], val_macro_f1=[0.3, 0.2], val_balanced_accuracy=[0.26, 0.2], val_mean_ovr_auc=[0.5, 0.5]
    )
    ranked = choose_champion(table, n_classes=4, config=ChampionRule(chance_margin=0.05))
    assert not ranked["champion"].any()
    assert ranked["passed_over"].tolist() == ["val balanced accuracy not above chance (0.250) + 0.05"] * 2
    assert ranked["rank"].isna().all()


def test_chance_margin_is_inclusive_and_a_missing_balanced_accuracy_is_not_eligible():
    table = wide(
        model=["at", "below", "unknown"],
        val_macro_f1=[0.4, 0.9, 0.9],
        val_balanced_accuracy=[0.30, 0.29, float("nan")],
        val_mean_ovr_auc=[0.6, 0.6, 0.6],
    )
    ranked = choose_champion(table, n_classes=4, config=ChampionRule(chance_margin=0.05)).set_index("model")
    assert bool(ranked.loc["at", "champion"]) and ranked.loc["at", "passed_over"] == ""
    assert "chance" in ranked.loc["below", "passed_over"] and "chance" in ranked.loc["unknown", "passed_over"]


def test_ranking_by_metric_then_tie_breakers_then_name():
    table = wide(
        model=["d", "c", "b", "a"],
        val_macro_f1=[0.6, 0.7, 0.7, 0.7],
        val_balanced_accuracy=[0.9, 0.6, 0.8, 0.8],
        val_mean_ovr_auc=[0.9, 0.9, 0.7, 0.7],
    )
    ranked = choose_champion(table, n_classes=2, config=ChampionRule(chance_margin=0.0))
    # a and b tie on macro-F1 and balanced accuracy and AUC: the name decides; c loses on balanced accuracy.
    assert ranked["model"].tolist() == ["a", "b", "c", "d"]
    assert ranked["rank"].tolist() == [1, 2, 3, 4]
    assert ranked["champion"].tolist() == [True, False, False, False]
    # The input table is not modified.
    assert "passed_over" not in table


def test_the_rule_reads_its_own_split_and_metric():
    table = wide(
        model=["a", "b"],
        val_macro_f1=[0.9, 0.1],
        val_balanced_accuracy=[0.9, 0.9],
        train_macro_f1=[0.1, 0.9],
        train_balanced_accuracy=[0.9, 0.9],
        train_top3_accuracy=[0.5, 0.5],
    )
    rule = ChampionRule(selection_split="train", selection_metric="macro_f1", tie_breakers=("top3_accuracy",))
    assert choose_champion(table, 2, rule).loc[lambda f: f["champion"], "model"].tolist() == ["b"]


def test_rule_text_states_split_metric_weights_ties_and_margin():
    assert champion_rule_text(ChampionRule()) == (
        "highest val 0.50 x macro_f1 with the questionnaire as answered + 0.50 x macro_f1 with it blank (ties: "
        "balanced_accuracy, mean_ovr_auc, then name), among candidates whose val balanced accuracy beats chance "
        "(1/K) by at least 0.05 both with the questionnaire as answered and with it blank (a blank form must get "
        "its answer from the photo) and that pass the fairness gate (one it could not judge, a gate group too "
        "small even at bin level, is not eligible)"
    )
    text = champion_rule_text(
        ChampionRule(selection_metric="top3_accuracy", tie_breakers=(), chance_margin=0.1, blank_questionnaire_weight=0)
    )
    assert "highest val top3_accuracy with the questionnaire as answered (ties: , then name)" in text
    assert "at least 0.10" in text
    assert "0.25 x macro_f1 with the questionnaire as answered + 0.75 x macro_f1 with it blank" in champion_rule_text(
        ChampionRule(blank_questionnaire_weight=0.75)
    )
    assert "highest val macro_f1 with every questionnaire blank" in champion_rule_text(
        ChampionRule(blank_questionnaire_weight=1)
    )


def test_a_candidate_that_answers_a_blank_form_at_chance_is_passed_over():
    # "answers" is the best with the questionnaire as answered, but with a blank one its answer is a constant:
    # balanced accuracy 1/K exactly. It is passed over whatever the weight.
    table = wide(
        model=["answers", "image"],
        val_macro_f1=[0.90, 0.60],
        val_balanced_accuracy=[0.92, 0.62],
        val_mean_ovr_auc=[0.95, 0.8],
        val_blank_macro_f1=[0.10, 0.60],
        val_blank_balanced_accuracy=[0.25, 0.62],
    )
    for weight in (0.0, 0.5):
        ranked = choose_champion(table, 4, ChampionRule(blank_questionnaire_weight=weight)).set_index("model")
        assert bool(ranked.loc["image", "champion"]), weight
        assert ranked.loc["answers", "passed_over"] == (
            "val balanced accuracy with blank questionnaires (0.250) not above chance (0.250) + 0.05: with a blank "
            "form its answer hardly changes from one case to the next"
        )
        assert pd.isna(ranked.loc["answers", "rank"])


def test_the_weighted_score_trades_answered_against_blank_questionnaires():
    # multimodal: best with answers, weaker than the image model without; both eligible.
    table = wide(
        model=["multimodal", "image"],
        val_macro_f1=[0.80, 0.65],
        val_balanced_accuracy=[0.80, 0.66],
        val_mean_ovr_auc=[0.9, 0.85],
        val_blank_macro_f1=[0.45, 0.65],
        val_blank_balanced_accuracy=[0.47, 0.66],
    )

    def ranking(weight: float) -> pd.DataFrame:
        return choose_champion(table, 4, ChampionRule(blank_questionnaire_weight=weight)).set_index("model")

    assert ranking(0.0).loc["multimodal", "champion"]  # answered score alone: 0.80 > 0.65
    balanced = ranking(0.5)
    assert balanced.loc["image", "champion"]  # 0.5 x 0.80 + 0.5 x 0.45 = 0.625 < 0.65
    assert balanced.loc["multimodal", "val_selection_score"] == pytest.approx(0.625)
    assert balanced.loc["image", "val_selection_score"] == pytest.approx(0.65)  # the same either way
    assert ranking(0.3).loc["multimodal", "champion"]  # 0.7 x 0.80 + 0.3 x 0.45 = 0.695 > 0.65
    # A multimodal candidate that serves blank forms about as well as the image model wins at 0.5.
    table.loc[0, "val_blank_macro_f1"] = 0.62
    assert ranking(0.5).loc["multimodal", "champion"]


def test_a_table_without_blank_questionnaire_scores_is_refused():
    table = pd.DataFrame({"model": ["a"], "val_macro_f1": [0.9], "val_balanced_accuracy": [0.9]})
    with pytest.raises(ValueError, match=r"lacks \['val_blank_macro_f1', 'val_blank_balanced_accuracy'\]"):
        choose_champion(table, 2, ChampionRule())
    with pytest.raises(ValueError, match="blank_questionnaire_weight must be in"):
        ChampionRule(blank_questionnaire_weight=1.5)


def test_no_champion_reason_lists_each_passed_over_candidate():
    ranked = pd.DataFrame({"model": ["a", "b", "c"], "passed_over": ["too weak", "", "unfair"]})
    assert no_champion_reason(ranked, "RULE") == "no eligible candidate by the rule (RULE); a: too weak; c: unfair"
    empty = pd.DataFrame({"model": [], "passed_over": []})
    assert no_champion_reason(empty, "RULE") == "no eligible candidate by the rule (RULE); no candidate was evaluated"


def unjudged_fixture():
    table = wide(
        model=["judged", "unjudged"],
        val_macro_f1=[0.50, 0.90],
        val_balanced_accuracy=[0.55, 0.92],
        val_mean_ovr_auc=[0.7, 0.95],
    )
    gates = pd.DataFrame(
        {
            "model": ["judged", "unjudged"],
            "passed": [True, False],
            "status": ["passed", "not_judged"],
            "reason": ["ok", "NOT JUDGED: monk_us_bin=7-10 (n=24)"],
        }
    )
    return table, gates


def test_an_unjudged_candidate_is_blocked_under_block():
    table, gates = unjudged_fixture()
    ranked = choose_champion(table, 4, ChampionRule(), gates).set_index("model")
    assert ChampionRule().unjudged_policy == "block"
    assert ranked["champion"].fillna(False).astype(bool).tolist() == [True, False]
    assert ranked.loc["unjudged", "passed_over"].startswith("fairness not judged (unjudged_policy block)")
    assert "monk_us_bin=7-10 (n=24)" in ranked.loc["unjudged", "passed_over"]
    assert ranked.loc["unjudged", "fairness_status"] == "not_judged"
    assert "is not eligible" in champion_rule_text(ChampionRule())


def test_an_unjudged_candidate_may_win_flagged_under_allow_with_flag():
    table, gates = unjudged_fixture()
    rule = ChampionRule(unjudged_policy="allow_with_flag")
    ranked = choose_champion(table, 4, rule, gates)
    champion = ranked[ranked["champion"]].iloc[0]
    assert champion["model"] == "unjudged" and champion["fairness_status"] == "not_judged"
    assert "flagged 'fairness not judged'" in champion_rule_text(rule)
    # A failed gate excludes under either policy.
    gates.loc[1, "status"] = "failed"
    assert choose_champion(table, 4, rule, gates).loc[lambda f: f["champion"], "model"].tolist() == ["judged"]


def test_gates_stored_before_the_three_outcomes_still_read():
    table, gates = unjudged_fixture()
    ranked = choose_champion(table, 4, ChampionRule(), gates.drop(columns=["status"])).set_index("model")
    assert ranked.loc["unjudged", "fairness_status"] == "failed"


def test_a_semi_supervised_candidate_is_set_beside_its_twin():
    wide = pd.DataFrame(
        {
            "model": ["metadata_model", "metadata_model_self_trained", "baseline_cnn"],
            "val_macro_f1": [0.20, 0.18, 0.30],
            "test_mean_ovr_auc": [0.70, 0.72, 0.60],
        }
    )
    table = twin_comparison(
        wide,
        {"metadata_model_self_trained": "metadata_model", "fixmatch": "resnet50_transfer"},
        ["val_macro_f1", "test_mean_ovr_auc"],
    )
    # The pair whose candidate was not evaluated is left out; each metric once, with the difference.
    assert table[["model", "twin", "metric"]].values.tolist() == [
        ["metadata_model_self_trained", "metadata_model", "val_macro_f1"],
        ["metadata_model_self_trained", "metadata_model", "test_mean_ovr_auc"],
    ]
    assert table["difference"].tolist() == pytest.approx([-0.02, 0.02])
    assert table["twin_value"].tolist() == [0.20, 0.70]
