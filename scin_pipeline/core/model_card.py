"""A model card for the champion: Markdown for people, a JSON manifest (the same facts) for machines.

Sections (:data:`MODEL_CARD_SECTIONS`): model details, intended use, out-of-scope uses (not for
diagnosis), data (SCIN, its licence and attribution, what was excluded and why), preprocessing,
metrics overall and per group with intervals, the fairness gate, limitations, ethical considerations,
licence and citation. The text is deterministic (no timestamps): the same inputs give the same card.

The SCIN licence and citation are constants copied from the data set's own README and LICENSE
(``shared/data/scin``): the licence name is "SCIN Data Use License"; it allows sharing and adapting
with attribution and forbids re-identification of contributors (its Section 3(b)).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import cast

import numpy as np
import pandas as pd

from scin_pipeline.core.fairness import GateResult
from scin_pipeline.core.fairness_report import SYNTHETIC_BANNER, group_metrics_wide
from scin_pipeline.core.rendering import markdown_text_table
from scin_pipeline.core.schema import ATTRIBUTE_TITLES, OVERALL

SCIN_DATASET_NAME = "Skin Condition Image Network (SCIN)"
SCIN_RELEASE = "1.0.0"
SCIN_SOURCE_URI = "gs://dx-scin-public-data/dataset/"
SCIN_LICENCE_NAME = "SCIN Data Use License"
SCIN_LICENCE_SUMMARY = (
    "Sharing and adapting are allowed with attribution, a notice of the licence "
    "and its disclaimer of warranties, and an indication of modifications; any "
    "attempt to re-identify or re-link contributors is forbidden and ends all rights."
)
SCIN_COPYRIGHT = "SCIN dataset (c) Google LLC"
SCIN_CITATION = (
    'Ward A., Li J., Wang J., et al. "Crowdsourcing Dermatology Images with Google Search Ads: '
    'Creating a Real-World Skin Condition Dataset." arXiv:2402.18545 (2024).'
)
SCIN_ARXIV_ID = "2402.18545"
MODIFICATIONS_NOTICE = (
    "This model was trained on an adapted subset of SCIN: images filtered for quality "
    "and near-duplicates, resized, and labelled with one condition per case from the "
    "dermatologists' weighted labels (details under Data and Preprocessing)."
)
NOT_FOR_DIAGNOSIS = (
    "NOT FOR DIAGNOSIS. This model is for education and research only. It must not be "
    "used to diagnose, triage, treat or reassure any person about a skin condition, and "
    "it is not a medical device. Anyone concerned about their skin should see a "
    "clinician."
)
INTENDED_USES = [
    "Education: showing how a skin-condition classifier is built, evaluated and audited for fairness.",
    "Research: studying performance gaps across skin tone, Fitzpatrick type, race/ethnicity, sex and age "
    "on a crowdsourced, consumer-photo data set.",
]
OUT_OF_SCOPE_USES = [
    "Diagnosis, triage, screening or any clinical decision about a person.",
    "Reassuring a user that a lesion is benign, or alarming them that it is not.",
    "Use outside the United States population that contributed to SCIN, or on image types unlike SCIN's "
    "consumer phone photos (dermoscopy, histology).",
    "Any attempt to identify or re-identify the contributors of SCIN (forbidden by its licence).",
]
ETHICAL_CONSIDERATIONS = [
    "Skin-condition models have historically performed worse on deeper skin tones; per-group metrics with "
    "intervals are reported here so a gap is visible, and a fairness gate blocks a champion with a clear "
    "gap. A passed gate is not proof of equal performance: small groups cannot be judged.",
    "A wrong prediction about a skin condition can delay care (a missed serious condition) or cause "
    "needless worry; this is why the model is not for diagnosis.",
    "SCIN contributors consented to research and education use under an IRB-approved study; their images "
    "were de-identified. Re-identification is forbidden by the SCIN Data Use License.",
    "Demographic attributes are self-reported (race/ethnicity, sex, age, Fitzpatrick type) or estimated by "
    "lay graders (Monk skin tone) and dermatologists (Fitzpatrick type); they are imperfect proxies. They "
    "audit every model; models that take metadata (kinds sklearn_metadata, keras_multimodal) also use age "
    "group, sex at birth and self-reported Fitzpatrick type as inputs, which can carry a group's base "
    "rates into predictions for an individual.",
]
MODEL_CARD_SECTIONS = [
    "Model details",
    "Intended use",
    "Out-of-scope uses",
    "Data",
    "Preprocessing",
    "Metrics",
    "Metrics by group",
    "Fairness gate",
    "Limitations",
    "Ethical considerations",
    "Licence and citation",
]
MANIFEST_SCHEMA = "scin-pipeline/model-card/v1"
DEEP_TONE_GROUPS = {"monk_us_bin": "7-10", "monk_india_bin": "7-10"}


def _json_safe(value):
    """Plain JSON types; NaN/inf become None (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _format(value) -> str:
    if isinstance(value, (float, np.floating)):
        return "undefined" if not math.isfinite(float(value)) else f"{float(value):.4g}"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{int(value):,}"
    return str(value)


def _bullets(mapping: Mapping, indent: int = 0) -> list[str]:
    lines = []
    pad = "  " * indent
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            lines.append(f"{pad}- {key}:")
            lines += _bullets(value, indent + 1)
        elif isinstance(value, (list, tuple)):
            lines.append(f"{pad}- {key}: " + ", ".join(_format(v) for v in value))
        else:
            lines.append(f"{pad}- {key}: {_format(value)}")
    return lines


def _table(frame: pd.DataFrame) -> str:
    return markdown_text_table(frame, _format)


def _overall_with_intervals(metrics: Mapping[str, float], fairness_table: pd.DataFrame) -> pd.DataFrame:
    """Overall metrics; the interval from the fairness table's overall block where it has the metric."""
    overall = fairness_table[fairness_table["attribute"] == OVERALL].set_index("metric")
    rows = []
    for name, value in metrics.items():
        low = cast(float, overall.loc[name, "ci_low"]) if name in overall.index else float("nan")
        high = cast(float, overall.loc[name, "ci_high"]) if name in overall.index else float("nan")
        rows.append({"metric": name, "value": float(value), "ci_low": float(low), "ci_high": float(high)})
    return pd.DataFrame(rows, columns=["metric", "value", "ci_low", "ci_high"])


def _limitations(fairness_table: pd.DataFrame, synthetic: bool) -> list[str]:
    deep = []
    for attribute, group in DEEP_TONE_GROUPS.items():
        rows = fairness_table[(fairness_table["attribute"] == attribute) & (fairness_table["group"] == group)]
        if not rows.empty:
            deep.append(f"{ATTRIBUTE_TITLES[attribute]} {group}: n = {int(rows['n'].iloc[0]):,} test rows")
    deep_text = ("; ".join(deep) + ". ") if deep else ""
    limitations = [
        "US-only: every SCIN contributor lived in the United States; performance elsewhere is unknown.",
        "Self-selected contributors: people who answered Google Search ads and chose to share photos of "
        "their own skin. They are not a clinical or population sample, and common, everyday conditions "
        "dominate.",
        "Rare deep skin tones: Monk tones 9-10 hold about a dozen cases in the whole release and "
        f"Fitzpatrick type 6 under 2%. {deep_text}Metrics for these groups have wide intervals or are "
        "flagged 'insufficient data'; the absence of a measured gap there is not evidence of no gap.",
        "Labels are retrospective dermatologist differentials from photos and a questionnaire, not "
        "confirmed clinical diagnoses; one label per case (the top-weighted condition) simplifies cases "
        "where several conditions were present.",
        "Photos are consumer phone images of varying quality; images judged unusable were excluded, so "
        "the model has not been tested on them.",
        "Synthetic images when run offline: the SCIN images cannot be fetched in the offline build, where "
        "the pipeline trains and evaluates on synthetic stand-in images; numbers from such a run describe "
        "no real skin." + (" THIS CARD COMES FROM SUCH A RUN." if synthetic else ""),
    ]
    return limitations


def fairness_headline(gate: GateResult) -> str:
    """The card's first statement about fairness: the gate's outcome, its bar (metric, max_gap, min_group_n)
    and where its estimates come from; when the gate could not judge, a warning naming the groups."""
    bar = f"{gate.metric}, max_gap {gate.max_gap:.2f}"
    if gate.min_group_n is not None:
        bar += f", min_group_n {gate.min_group_n}"
    line = f"> **Fairness gate: {gate.label}** ({bar}; estimates: {gate.source})."
    if gate.status == "not_judged":
        line += (
            f" **WARNING: fairness was NOT JUDGED for {gate.unjudged_summary() or 'some gate groups'}**: too few "
            "cases to judge, even at bin level. This version was named champion without fairness evidence "
            "for those groups (unjudged_policy allow_with_flag)."
        )
    return line


def build_model_card(
    *,
    model_name: str,
    model_version: str | int,
    model_uri: str,
    kind: str,
    classes: Sequence[str],
    metrics: Mapping[str, float],
    fairness_table: pd.DataFrame,
    gate: GateResult,
    data_summary: Mapping,
    preprocessing: Mapping,
    synthetic: bool,
) -> tuple[str, dict]:
    """Markdown model card and its JSON manifest (JSON-serialisable dict with the same facts).

    ``metrics``: overall test metrics (e.g. ``evaluation.classification_metrics``); intervals are
    taken from ``fairness_table``'s overall block. ``data_summary``: free-form facts about the data
    (release, counts, splits, label policy); its ``exclusions`` entry (reason -> count, or reason ->
    {n, why}) is rendered as what was excluded and why. ``preprocessing``: free-form settings (image
    size, filters, augmentation).
    """
    classes = [str(c) for c in classes]
    data_summary = dict(data_summary)
    exclusions = data_summary.pop("exclusions", None)
    overall = _overall_with_intervals(metrics, fairness_table)
    attributes = [a for a in fairness_table["attribute"].unique() if a != OVERALL]
    limitations = _limitations(fairness_table, synthetic)

    lines: list[str] = [SYNTHETIC_BANNER, ""] if synthetic else []
    lines += [f"# Model card: {model_name} (version {model_version})", "", f"> {NOT_FOR_DIAGNOSIS}", ""]
    lines += [fairness_headline(gate), ""]
    lines += [
        "## Model details",
        "",
        f"- name: {model_name}",
        f"- version: {model_version}",
        f"- URI: `{model_uri}`",
        f"- kind: {kind}",
        f"- classes ({len(classes)}): " + ", ".join(classes),
        f"- images: {'SYNTHETIC stand-ins (offline run)' if synthetic else 'SCIN photographs'}",
        "",
    ]
    lines += ["## Intended use", "", *[f"- {u}" for u in INTENDED_USES], "", f"**{NOT_FOR_DIAGNOSIS}**", ""]
    lines += ["## Out-of-scope uses", "", *[f"- {u}" for u in OUT_OF_SCOPE_USES], ""]
    lines += [
        "## Data",
        "",
        f"{SCIN_DATASET_NAME}, release {SCIN_RELEASE}, from `{SCIN_SOURCE_URI}`: crowdsourced "
        "photos of skin, nail and hair conditions with self-reported demographics and "
        "dermatologist labels. Licence: "
        f"{SCIN_LICENCE_NAME}. {SCIN_COPYRIGHT}. Cite: {SCIN_CITATION}",
        "",
        MODIFICATIONS_NOTICE,
        "",
    ]
    if data_summary:
        lines += _bullets(data_summary) + [""]
    lines += ["### What was excluded and why", ""]
    if isinstance(exclusions, Mapping) and exclusions:
        lines += _bullets(exclusions)
    elif exclusions:
        lines.append(str(exclusions))
    else:
        lines.append("The run did not report its exclusions.")
    lines += ["", "## Preprocessing", "", *(_bullets(preprocessing) or ["Not reported by the run."]), ""]
    level = float(fairness_table["ci_level"].iloc[0]) if "ci_level" in fairness_table else 0.95
    lines += [
        "## Metrics",
        "",
        f"On the test split; intervals are {level:.0%} percentile bootstrap intervals.",
        "",
        _table(overall),
        "",
    ]
    lines += [
        "## Metrics by group",
        "",
        "Estimate [interval] per group; groups below the minimum n are shown and marked 'insufficient data'.",
        "",
    ]
    for attribute in attributes:
        lines += [
            f"### {ATTRIBUTE_TITLES.get(attribute, attribute)} (`{attribute}`)",
            "",
            _table(group_metrics_wide(fairness_table, attribute)),
            "",
        ]
    lines += ["## Fairness gate", "", f"**{gate.label}**: {gate.reason}", ""]
    lines += ["## Limitations", "", *[f"- {item}" for item in limitations], ""]
    lines += ["## Ethical considerations", "", *[f"- {item}" for item in ETHICAL_CONSIDERATIONS], ""]
    lines += [
        "## Licence and citation",
        "",
        f"- Data: {SCIN_LICENCE_NAME}. {SCIN_LICENCE_SUMMARY}",
        f"- {SCIN_COPYRIGHT}; the data are provided as-is, without warranties (licence Section 5).",
        f"- Cite: {SCIN_CITATION}",
        f"- Modifications: {MODIFICATIONS_NOTICE}",
        "",
    ]
    markdown = "\n".join(lines)

    manifest = _json_safe(
        {
            "schema": MANIFEST_SCHEMA,
            "synthetic": bool(synthetic),
            "model": {
                "name": model_name,
                "version": str(model_version),
                "uri": model_uri,
                "kind": kind,
                "classes": classes,
            },
            "intended_use": {
                "uses": INTENDED_USES,
                "not_for_diagnosis": True,
                "statement": NOT_FOR_DIAGNOSIS,
                "out_of_scope": OUT_OF_SCOPE_USES,
            },
            "data": {
                "dataset": SCIN_DATASET_NAME,
                "release": SCIN_RELEASE,
                "source": SCIN_SOURCE_URI,
                "licence": SCIN_LICENCE_NAME,
                "licence_summary": SCIN_LICENCE_SUMMARY,
                "copyright": SCIN_COPYRIGHT,
                "citation": SCIN_CITATION,
                "arxiv": SCIN_ARXIV_ID,
                "modifications": MODIFICATIONS_NOTICE,
                "summary": data_summary,
                "exclusions": exclusions,
            },
            "preprocessing": dict(preprocessing),
            "metrics": {
                "overall": overall.to_dict("records"),
                "ci_level": level,
                "by_group": fairness_table.to_dict("records"),
            },
            "fairness_gate": gate.to_dict(),
            "limitations": limitations,
            "ethical_considerations": ETHICAL_CONSIDERATIONS,
            "sections": MODEL_CARD_SECTIONS,
        }
    )
    assert isinstance(manifest, dict)  # _json_safe turns the mapping into a dict
    json.dumps(manifest, allow_nan=False)  # fail here, not in the caller, if anything is not JSON
    return markdown, manifest
