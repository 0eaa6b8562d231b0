"""The labelling queue: which unlabelled cases a dermatologist's label would help most, and why.

Labels are the scarce resource in SCIN (3,061 labelled of 5,033 cases). A case is worth a grader's time when
the model is unsure about it (its answer is not already known) and when it belongs to a skin-tone or skin-type
group the labelled set holds little of (a label there fills a gap the fairness report can see). The rule,
one pure function (:func:`labelling_queue`):

    priority = uncertainty x representation weight (Monk) x representation weight (Fitzpatrick) x status weight

- **uncertainty**: the normalised entropy of the model's class probabilities, H(p) / log K, in [0, 1]
  (1: no idea); the margin between the two most likely classes is reported beside it.
- **representation weight** of a group: how far the labelled set falls short of an even share,
  ``(1 / G) / share among labelled cases``, clipped to [1, ``max_representation_weight``] (G: the known
  groups of the attribute; a group no labelled case has gets the cap; an over-represented group is never
  pushed down; "missing" and answers off the scale weigh 1). Monk: the US graders' bins (1-2, 3-4, 5-6,
  7-10). Fitzpatrick: the dermatologist's type binned (FST1-2, 3-4, 5-6), the self-reported one where the
  dermatologist gave none.
- **status weight**: ``gradable_unlabelled`` and ``no_labels_row`` 1 (nobody labelled them yet), ``ungradable``
  ``ungradable_weight`` (graders judged the photos insufficient once; our quality rule disagrees, so a second
  look may label them, but it is less likely), ``no_pathology`` ``no_pathology_weight`` (a grader already
  answered), ``malformed`` 1; ``label_outside_policy`` 0 (it has a label).

Every row carries its reason in words. The model's guess is kept in the table but not in the graders' CSV
(:data:`CSV_COLUMNS`): showing it would anchor them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

MONK = "monk_us_bin"
FITZPATRICK = "fst_bin"


def weighed_groups() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The Monk bins and Fitzpatrick bins whose representation is weighed (the fairness report's); anything
    else ("missing", "NONE_IDENTIFIED") weighs 1. core.fairness is imported here, not at the top: the
    definitions import this module for QueueConfig's defaults and must not load fairlearn and scikit-learn."""
    from scin_pipeline.core.fairness import DEFAULT_MONK_BINS, KNOWN_GROUP_ORDER

    monk = tuple(f"{low}-{high}" for low, high in DEFAULT_MONK_BINS)
    return monk, tuple(KNOWN_GROUP_ORDER["fst_dermatologist_bin"])


STATUS_TEXT = {
    "gradable_unlabelled": "gradable, never labelled",
    "no_labels_row": "never graded",
    "malformed": "its label could not be read",
    "ungradable": "judged ungradable once",
    "no_pathology": "a grader saw no pathology",
    "label_outside_policy": "labelled, outside the label policy",
}
QUEUE_COLUMNS = [
    "rank",
    "case_id",
    "priority",
    "uncertainty",
    "margin",
    "monk_us_bin",
    "monk_weight",
    "fst_bin",
    "fst_source",
    "fst_weight",
    "status",
    "status_weight",
    "n_images",
    "image_ids",
    "model_top_class",
    "model_top_probability",
    "reason",
]
# What a curator hands to graders: no model guess (it would anchor them).
CSV_COLUMNS = ["rank", "case_id", "image_ids", "priority", "monk_us_bin", "fst_bin", "status", "reason"]


@dataclass(frozen=True)
class QueueConfig:
    ungradable_weight: float = 0.5
    no_pathology_weight: float = 0.0
    max_representation_weight: float = 3.0

    def __post_init__(self):
        for name in ("ungradable_weight", "no_pathology_weight"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        if self.max_representation_weight < 1:
            raise ValueError(f"max_representation_weight must be >= 1, got {self.max_representation_weight}")

    def status_weights(self) -> dict[str, float]:
        return {
            "gradable_unlabelled": 1.0,
            "no_labels_row": 1.0,
            "malformed": 1.0,
            "ungradable": self.ungradable_weight,
            "no_pathology": self.no_pathology_weight,
            "label_outside_policy": 0.0,
        }


def normalised_entropy(proba: np.ndarray) -> np.ndarray:
    """H(p) / log K per row, in [0, 1]; K is the number of columns."""
    p = np.clip(np.asarray(proba, dtype=np.float64), 1e-12, 1.0)
    k = p.shape[1]
    if k < 2:
        return np.zeros(len(p))
    return -(p * np.log(p)).sum(axis=1) / np.log(k)


def top_two_margin(proba: np.ndarray) -> np.ndarray:
    """Top class probability minus the second's (0: a coin toss between two classes)."""
    ranked = np.sort(np.asarray(proba, dtype=np.float64), axis=1)
    return ranked[:, -1] - (ranked[:, -2] if ranked.shape[1] > 1 else 0.0)


def representation_weights(labelled_groups: pd.Series, groups: tuple[str, ...], max_weight: float) -> dict[str, float]:
    """group -> weight (see the module docstring) for each of ``groups``, from the labelled cases' groups of
    one attribute (shares among the labelled cases whose group is one of ``groups``)."""
    known = labelled_groups[labelled_groups.isin(groups)]
    even = 1.0 / len(groups)
    share = known.value_counts(normalize=True) if len(known) else pd.Series(dtype=float)
    return {g: float(np.clip(even / share[g], 1.0, max_weight)) if g in share else float(max_weight) for g in groups}


def fitzpatrick_bin(features: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """The dermatologist's Fitzpatrick bin, else the self-reported one; and which source gave it."""
    _, fst_groups = weighed_groups()
    derm, own = features["fst_dermatologist_bin"].astype(str), features["fst_self_reported_bin"].astype(str)
    use_derm = derm.isin(fst_groups)
    use_own = ~use_derm & own.isin(fst_groups)
    source = np.select([use_derm.to_numpy(), use_own.to_numpy()], ["dermatologist", "self_reported"], default="")
    return derm.where(use_derm, own), pd.Series(source, index=features.index)


def labelling_queue(
    pool_cases: pd.DataFrame,
    proba: np.ndarray,
    classes: list[str],
    pool_features: pd.DataFrame,
    labelled_features: pd.DataFrame,
    config: QueueConfig = QueueConfig(),
) -> pd.DataFrame:
    """The pool's cases ranked by priority (highest first), cases of weight 0 left out. Columns
    ``QUEUE_COLUMNS``.

    ``pool_cases``: one row per case with case_id, status (why it has no label: the pool's ``reason``),
    n_images, image_ids. ``proba``: the model's (n cases, K) probabilities for them, ``classes`` their names.
    ``pool_features`` / ``labelled_features``: ``fairness.sensitive_features`` of the pool's cases (rows
    aligned with ``pool_cases``) and of the labelled cases (what is under-represented is read from them).
    """
    proba = np.asarray(proba, dtype=np.float64)
    if proba.shape != (len(pool_cases), len(classes)):
        raise ValueError(f"proba must be ({len(pool_cases)}, {len(classes)}), got {proba.shape}")
    missing = [c for c in ("case_id", "status", "n_images", "image_ids") if c not in pool_cases.columns]
    if missing:
        raise ValueError(f"pool_cases lacks column(s) {', '.join(missing)}")
    unknown = sorted(set(pool_cases["status"].astype(str)) - set(config.status_weights()))
    if unknown:
        raise ValueError(f"pool_cases has unknown status value(s) {unknown}; known: {sorted(config.status_weights())}")
    cap = config.max_representation_weight
    monk_groups, fst_groups = weighed_groups()
    labelled_monk = labelled_features[MONK].astype(str)
    labelled_fst, _ = fitzpatrick_bin(labelled_features)
    monk_weights = representation_weights(labelled_monk, monk_groups, cap)
    fst_weights = representation_weights(labelled_fst, fst_groups, cap)
    labelled_monk_share = labelled_monk[labelled_monk.isin(monk_groups)].value_counts(normalize=True)
    labelled_fst_share = labelled_fst[labelled_fst.isin(fst_groups)].value_counts(normalize=True)

    frame = pool_cases.reset_index(drop=True)[["case_id", "status", "n_images", "image_ids"]].copy()
    frame["case_id"] = frame["case_id"].astype(str)
    frame["uncertainty"] = normalised_entropy(proba)
    frame["margin"] = top_two_margin(proba)
    frame["model_top_class"] = [classes[k] for k in proba.argmax(axis=1)] if len(proba) else []
    frame["model_top_probability"] = proba.max(axis=1) if len(proba) else []
    frame[MONK] = pool_features[MONK].astype(str).to_numpy()
    fst, source = fitzpatrick_bin(pool_features.reset_index(drop=True))
    frame[FITZPATRICK], frame["fst_source"] = fst.to_numpy(), source.to_numpy()
    frame["monk_weight"] = frame[MONK].map(lambda g: monk_weights.get(g, 1.0))
    frame["fst_weight"] = frame[FITZPATRICK].map(lambda g: fst_weights.get(g, 1.0))
    frame["status_weight"] = frame["status"].astype(str).map(config.status_weights())
    frame["priority"] = frame["uncertainty"] * frame["monk_weight"] * frame["fst_weight"] * frame["status_weight"]

    def reason(row) -> str:
        parts = [f"model uncertainty {row.uncertainty:.2f} (entropy/log K; top-2 margin {row.margin:.2f})"]
        if row.monk_weight > 1:
            share = labelled_monk_share.get(row.monk_us_bin, 0.0)
            parts.append(f"Monk {row.monk_us_bin} is {share:.0%} of labelled cases (x{row.monk_weight:.1f})")
        if row.fst_weight > 1:
            share = labelled_fst_share.get(row.fst_bin, 0.0)
            parts.append(f"{row.fst_bin} ({row.fst_source}) is {share:.0%} of labelled cases (x{row.fst_weight:.1f})")
        status = f"{row.status}: {STATUS_TEXT[row.status]}"
        parts.append(status + (f" (x{row.status_weight:.2f})" if row.status_weight < 1 else ""))
        return "; ".join(parts)

    frame = frame[frame["priority"] > 0]
    frame = frame.sort_values(["priority", "case_id"], ascending=[False, True], kind="stable").reset_index(drop=True)
    frame["reason"] = [reason(row) for row in frame.itertuples()]
    frame["rank"] = np.arange(1, len(frame) + 1)
    return frame[QUEUE_COLUMNS]


def pool_cases_table(pool: pd.DataFrame) -> pd.DataFrame:
    """One row per pooled case (case_id, status = the pool's reason, n_images, image_ids) from the
    ``unlabelled_pool`` table (one row per image reference)."""
    grouped = pool.assign(case_id=pool["case_id"].astype(str), image_id=pool["image_id"].astype(str)).groupby(
        "case_id", sort=True
    )
    return pd.DataFrame(
        {
            "case_id": list(grouped.groups),
            "status": grouped["reason"].first().astype(str).to_numpy(),
            "n_images": grouped["image_id"].nunique().to_numpy(),
            "image_ids": grouped["image_id"].agg(lambda s: " ".join(sorted(set(s)))).to_numpy(),
        }
    )
