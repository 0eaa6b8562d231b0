"""The model card: every section, the not-for-diagnosis statement, the SCIN licence and citation, the
synthetic banner first, per-group metrics with intervals, and a manifest that is valid JSON."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from scin_pipeline.core.evaluation import classification_metrics
from scin_pipeline.core.fairness import fairness_gate, fairness_table
from scin_pipeline.core.fairness_report import SYNTHETIC_BANNER
from scin_pipeline.core.model_card import (
    MODEL_CARD_SECTIONS,
    NOT_FOR_DIAGNOSIS,
    SCIN_CITATION,
    SCIN_LICENCE_NAME,
    build_model_card,
)


@pytest.fixture(scope="module")
def card_inputs():
    rng = np.random.default_rng(0)
    n, k = 400, 3
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 2.0
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    sensitive = pd.DataFrame(
        {
            "monk_us_bin": rng.choice(["1-2", "3-4", "5-6", "7-10"], n, p=[0.4, 0.4, 0.17, 0.03]),
            "sex_at_birth": rng.choice(["FEMALE", "MALE"], n),
        }
    )
    classes = ["Eczema", "Psoriasis", "Urticaria"]
    table = fairness_table("cnn", y, proba, classes, sensitive, n_bootstrap=40)
    return dict(
        model_name="cnn",
        model_version=3,
        model_uri="models:/scin-condition-classifier/3",
        kind="keras_image",
        classes=classes,
        metrics=classification_metrics(y, proba, classes),
        fairness_table=table,
        gate=fairness_gate(table),
        data_summary={
            "release": "1.0.0",
            "n_cases": 3061,
            "splits": {"train": 2138, "val": 462, "test": 461},
            "exclusions": {
                "ungradable images": {"n": 1925, "why": "grader 1 said image quality insufficient"},
                "near-duplicate of a kept image": 15,
            },
        },
        preprocessing={"image_size": 224, "augmentation": "flips, 90-degree turns"},
    )


def test_every_section_and_the_statements(card_inputs):
    markdown, manifest = build_model_card(**card_inputs, synthetic=False)
    headings = [line[3:] for line in markdown.splitlines() if line.startswith("## ")]
    assert headings == MODEL_CARD_SECTIONS
    assert NOT_FOR_DIAGNOSIS in markdown and "NOT FOR DIAGNOSIS" in NOT_FOR_DIAGNOSIS
    assert SCIN_LICENCE_NAME == "SCIN Data Use License" and SCIN_LICENCE_NAME in markdown
    assert SCIN_CITATION in markdown and "arXiv:2402.18545" in SCIN_CITATION
    for phrase in (
        "US-only",
        "Self-selected",
        "Rare deep skin tones",
        "Synthetic images when run offline",
        "re-identif",
        "ungradable images",
        "grader 1 said image quality insufficient",
        "image_size: 224",
        "models:/scin-condition-classifier/3",
    ):
        assert phrase in markdown, phrase
    assert SYNTHETIC_BANNER not in markdown
    assert "THIS CARD COMES FROM SUCH A RUN" not in markdown


def test_metrics_carry_intervals_per_group(card_inputs):
    markdown, manifest = build_model_card(**card_inputs, synthetic=False)
    overall = {r["metric"]: r for r in manifest["metrics"]["overall"]}
    assert overall["balanced_accuracy"]["ci_low"] <= overall["balanced_accuracy"]["value"]
    assert overall["ece"]["ci_low"] is None  # no interval computed for ECE: None, not NaN
    table = card_inputs["fairness_table"]
    deep = table[(table["group"] == "7-10") & (table["metric"] == "balanced_accuracy")].iloc[0]
    assert f"{deep['value']:.3f} [{deep['ci_low']:.3f}, {deep['ci_high']:.3f}]" in markdown
    assert f"Monk skin tone bins (US lay graders) 7-10: n = {deep['n']:,} test rows" in markdown
    assert "insufficient data" in markdown  # 3% of 400 rows is below the minimum n


def test_manifest_is_json_with_the_same_facts(card_inputs):
    markdown, manifest = build_model_card(**card_inputs, synthetic=True)
    text = json.dumps(manifest, allow_nan=False)
    again = json.loads(text)
    assert again["intended_use"]["not_for_diagnosis"] is True
    assert again["data"]["licence"] == SCIN_LICENCE_NAME and again["data"]["citation"] == SCIN_CITATION
    assert again["model"]["version"] == "3" and again["model"]["classes"] == card_inputs["classes"]
    assert again["synthetic"] is True
    assert again["fairness_gate"]["passed"] == card_inputs["gate"].passed
    assert len(again["metrics"]["by_group"]) == len(card_inputs["fairness_table"])
    assert again["data"]["exclusions"]["near-duplicate of a kept image"] == 15
    assert again["sections"] == MODEL_CARD_SECTIONS


def test_synthetic_card_says_so_first(card_inputs):
    markdown, _ = build_model_card(**card_inputs, synthetic=True)
    assert markdown.splitlines()[0] == SYNTHETIC_BANNER
    assert "THIS CARD COMES FROM SUCH A RUN" in markdown
    assert "SYNTHETIC stand-ins" in markdown


def test_card_is_deterministic(card_inputs):
    assert build_model_card(**card_inputs, synthetic=False) == build_model_card(**card_inputs, synthetic=False)


def test_the_first_lines_say_when_fairness_was_not_judged(card_inputs):
    from scin_pipeline.core.model_card import fairness_headline

    gate = fairness_gate(card_inputs["fairness_table"], min_group_n=30)
    assert gate.status == "not_judged"  # monk_us_bin 7-10 holds ~3 % of 400 rows
    markdown, manifest = build_model_card(**{**card_inputs, "gate": gate}, synthetic=False)
    head = "\n".join(markdown.splitlines()[:8])
    assert "**Fairness gate: NOT JUDGED**" in head and "min_group_n 30" in head and "max_gap 0.10" in head
    assert "WARNING: fairness was NOT JUDGED for monk_us_bin=7-10" in head
    assert manifest["fairness_gate"]["status"] == "not_judged"
    passed = fairness_gate(card_inputs["fairness_table"], attributes=["sex_at_birth"], min_group_n=30)
    assert passed.status == "passed" and "WARNING" not in fairness_headline(passed)
