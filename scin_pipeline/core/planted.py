"""How well the curation rules find what a synthetic mirror planted (``core/synthetic/``: the
``synthetic_plants.csv`` it writes): precision and recall of the quality rule per planted kind, with the
share of clean images kept per Monk tone group, and of the near-duplicate search against the planted
copies. Only meaningful on a synthetic mirror; the curation assets report them when one is the source.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import pandas as pd

from scin_pipeline.core.dedup import CROSS_CASE_NEAR_DUPLICATE, EXACT_REUSE

# --------------------------------------------------------------------------------------------------------
# The quality rule
# --------------------------------------------------------------------------------------------------------

# Planted kind of the synthetic mirror -> the reason(s) the rule should give it.
PLANTED_EXPECTED_REASONS = {
    "dark": ("dark",),
    "blurred": ("blurry",),
    "overexposed": ("overexposed",),
    "corrupt_truncated": ("truncated", "corrupt"),
    "corrupt_zero_byte": ("empty_file",),
    "wrong_format": ("wrong_format",),
    "decompression_bomb": ("decompression_bomb",),
}
# Not scored: their look belongs to another case (near_duplicate, exact_reuse: the dedup stage's business)
# or there is no file (missing, rejected_path: the image_files stage's business).
UNSCORED_PLANTS = ("near_duplicate", "exact_reuse", "missing", "rejected_path")
MONK_TONE_GROUPS = {"1-3": (1, 3), "4-6": (4, 6), "7-10": (7, 10)}


def planted_defect_scores(decisions: pd.DataFrame, plants: pd.DataFrame) -> pd.DataFrame:
    """Precision and recall of the rule per planted kind of a synthetic mirror, plus fairness rows.

    ``decisions`` from decide_quality, ``plants`` the mirror's synthetic_plants.csv (image_id, planted,
    monk_tone); joined on image_id. Scored images: clean ones and every planted quality defect (not
    UNSCORED_PLANTS). Per planted kind: n_planted, n_flagged (scored images given that reason),
    true_positives, precision, recall. ``dark_diagnostic``: flagged = kept as dark-but-diagnostic.
    ``clean_kept:monk_<group>``: n_planted clean images of that Monk group, n_flagged how many were
    excluded, true_positives how many kept, recall the share kept (precision does not apply).
    """
    plants = plants[plants["image_id"].notna() & (plants["image_id"].astype(str) != "")]
    joined = plants.assign(image_id=plants["image_id"].astype(str)).merge(
        decisions.assign(image_id=decisions["image_id"].astype(str)), on="image_id", how="inner"
    )
    scored = joined[~joined["planted"].isin(UNSCORED_PLANTS)]
    rows = []
    for kind, reasons in PLANTED_EXPECTED_REASONS.items():
        planted = scored["planted"] == kind
        flagged = scored["reason"].isin(reasons)
        rows.append(
            _score_row(kind, "|".join(reasons), int(planted.sum()), int(flagged.sum()), int((planted & flagged).sum()))
        )
    planted = scored["planted"] == "dark_diagnostic"
    flagged = scored["dark_but_diagnostic"].astype(bool) & scored["keep"].astype(bool)
    rows.append(
        _score_row(
            "dark_diagnostic",
            "kept:dark_but_diagnostic",
            int(planted.sum()),
            int(flagged.sum()),
            int((planted & flagged).sum()),
        )
    )
    clean = scored[scored["planted"] == "clean"]
    for group, (lo, hi) in MONK_TONE_GROUPS.items():
        in_group = clean[clean["monk_tone"].between(lo, hi)]
        kept = int(in_group["keep"].sum())
        rows.append(
            {
                "planted": "clean",
                "reason": f"clean_kept:monk_{group}",
                "n_planted": len(in_group),
                "n_flagged": len(in_group) - kept,
                "true_positives": kept,
                "precision": np.nan,
                "recall": kept / len(in_group) if len(in_group) else np.nan,
            }
        )
    return pd.DataFrame(
        rows, columns=["planted", "reason", "n_planted", "n_flagged", "true_positives", "precision", "recall"]
    )


def _score_row(kind: str, reason: str, n_planted: int, n_flagged: int, tp: int) -> dict:
    return {
        "planted": kind,
        "reason": reason,
        "n_planted": n_planted,
        "n_flagged": n_flagged,
        "true_positives": tp,
        "precision": tp / n_flagged if n_flagged else np.nan,
        "recall": tp / n_planted if n_planted else np.nan,
    }


# --------------------------------------------------------------------------------------------------------
# The near-duplicate search
# --------------------------------------------------------------------------------------------------------

# core/synthetic/ writes the copy's row with detail "source_image_id=<id>; crop=...; ...; source_case_id=<id>".
_SOURCE_IMAGE_ID = re.compile(r"source_image_id=(-?\d+)")


def planted_near_duplicate_pairs(plants: pd.DataFrame) -> pd.DataFrame:
    """(image_id_a, image_id_b), a < b, for every planted near_duplicate row of synthetic_plants.csv."""
    rows = plants[plants["planted"].astype(str) == "near_duplicate"]
    sources = rows["detail"].astype(str).str.extract(_SOURCE_IMAGE_ID, expand=False)
    if sources.isna().any():
        bad = rows.loc[sources.isna(), "image_id"].astype(str).tolist()
        raise ValueError(f"near_duplicate plants without source_image_id in detail: {bad[:3]}")
    copies = rows["image_id"].astype(str).to_numpy()
    sources = sources.astype(str).to_numpy()
    first = copies < sources
    pairs = pd.DataFrame(
        {"image_id_a": np.where(first, copies, sources), "image_id_b": np.where(first, sources, copies)}
    )
    return pairs.drop_duplicates().sort_values(["image_id_a", "image_id_b"]).reset_index(drop=True)


def planted_near_duplicate_scores(
    pairs_or_clusters: pd.DataFrame, plants: pd.DataFrame, *, image_ids: Iterable[str] | None = None
) -> dict:
    """Precision and recall of cross-case near-duplicate detection against planted near-duplicates.

    With the ``pairs`` table of :func:`build_dedup_clusters` (pair level): a planted pair found among the
    pairs is a true positive; a detected cross-case pair (kind ``cross_case_near_duplicate``) that was not
    planted is a false positive. Exact reuse is never a false positive: it is no near-duplicate pair (rows
    of kind ``exact_reuse`` or with image_id_a == image_id_b, if a table has them, are left out).

    With the ``clusters`` table (cluster level): a planted pair is found when both images share a cluster;
    precision is the share of ``cross_case_near_duplicate`` clusters that hold at least one planted pair
    (a cluster of exact reuse is, again, no false positive).

    Only planted pairs whose two images were searched count: those in ``image_ids`` when given, else, with
    clusters, those in the clusters table. Returns n_planted, n_detected, true_positives, false_positives,
    false_negatives, precision, recall (nan where undefined), and the missed and unexpected items.
    """
    planted = planted_near_duplicate_pairs(plants)
    columns = set(pairs_or_clusters.columns)
    if {"image_id_a", "image_id_b"} <= columns:
        level = "pairs"
    elif {"image_id", "cluster_id", "cluster_kind"} <= columns:
        level = "clusters"
        if image_ids is None:
            image_ids = pairs_or_clusters["image_id"].astype(str)
    else:
        raise ValueError(
            "expected the pairs table (image_id_a, image_id_b) or the clusters table "
            "(image_id, cluster_id, cluster_kind)"
        )
    if image_ids is not None:
        searched = set(map(str, image_ids))
        planted = planted[planted["image_id_a"].isin(searched) & planted["image_id_b"].isin(searched)]
    planted_set = set(zip(planted["image_id_a"], planted["image_id_b"]))

    if level == "pairs":
        table = pairs_or_clusters
        a0, b0 = table["image_id_a"].astype(str).to_numpy(), table["image_id_b"].astype(str).to_numpy()
        a, b = np.where(a0 < b0, a0, b0), np.where(a0 < b0, b0, a0)  # either order in, a < b out
        is_link = a != b
        if "kind" in columns:
            is_link &= (table["kind"].astype(str) != EXACT_REUSE).to_numpy()
        found_set = set(zip(a[is_link], b[is_link]))
        cross_case = is_link.copy()
        if "kind" in columns:
            cross_case &= (table["kind"].astype(str) == CROSS_CASE_NEAR_DUPLICATE).to_numpy()
        elif "same_case" in columns:
            cross_case &= ~table["same_case"].astype(bool).to_numpy()
        detected = set(zip(a[cross_case], b[cross_case]))
        true_positives = len(planted_set & found_set)
        unexpected = sorted(detected - planted_set)
        n_detected = len(detected)
        precision_hits = len(detected & planted_set)
    else:
        table = pairs_or_clusters
        cluster_of = dict(zip(table["image_id"].astype(str), table["cluster_id"].astype(str)))
        found = {
            p for p in planted_set if cluster_of.get(p[0]) is not None and cluster_of.get(p[0]) == cluster_of.get(p[1])
        }
        true_positives = len(found)
        cross_clusters = set(
            table.loc[table["cluster_kind"].astype(str) == CROSS_CASE_NEAR_DUPLICATE, "cluster_id"].astype(str)
        )
        clusters_with_plant = {cluster_of[p[0]] for p in found}
        unexpected = sorted(cross_clusters - clusters_with_plant)
        n_detected = len(cross_clusters)
        precision_hits = len(cross_clusters & clusters_with_plant)
        found_set = found
    missed = sorted(planted_set - found_set)
    return {
        "level": level,
        "n_planted": len(planted_set),
        "n_detected": n_detected,
        "true_positives": true_positives,
        "false_positives": len(unexpected),
        "false_negatives": len(missed),
        "precision": precision_hits / n_detected if n_detected else float("nan"),
        "recall": true_positives / len(planted_set) if planted_set else float("nan"),
        "missed": missed,
        "unexpected": unexpected,
    }
