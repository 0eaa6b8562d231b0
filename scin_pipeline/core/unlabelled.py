"""The unlabelled pool: the images and cases without a usable condition label that a model may learn from.

SCIN 1.0.0 has 5,033 cases and 3,061 with a condition label; the other ~1,970 (1,862 judged ungradable by
every dermatologist, 63 with no discernible pathology, 47 gradable but unlabelled) are used by no model.
Self-training, consistency training and a labelling queue can use them, provided they do not bring the
validation or test split into training by the back door. The rule, one pure function
(:func:`build_unlabelled_pool`):

1. **Images that passed quality**: image references whose file passed the image-quality rule
   (``image_quality.keep``, path ``ok``). Dermatologist gradability is *not* required (the dermatologists
   judged 1,862 of these cases ungradable; their questionnaire answers are intact and their images passed
   our quality rule) unless ``include_derm_ungradable`` is off; every row says why it has no label.
2. **No usable label**: cases that are not in ``labeled_splits``: ``reason`` is the case's
   ``label_status`` (``ungradable``, ``no_pathology``, ``gradable_unlabelled``, ``no_labels_row``,
   ``malformed``), or ``label_outside_policy`` for a labelled case the label policy left out (below
   ``min_weight``, a dropped rare class, a dropped tie) or whose images the split never saw.
3. **Nothing of validation or test**: a case is left out, with all its images, when its case group (cases
   linked by a shared file or a near-duplicate image, ``dedup.case_groups`` over ``dedup_clusters``, the
   very groups ``labeled_splits`` keeps whole) holds a validation or test case: then one of its images is
   the same file as, or a near duplicate of, a val/test image, or it is linked to one through its own other
   photos. A leak through the unlabelled pool is still a leak: a model trained on pseudo-labels of a test
   case's re-upload has seen that test case. Cases linked only to *training* cases stay (no leak).

:func:`pool_leaks` re-derives the leak from the clusters alone (not from the pool's own columns) and is
what the blocking check runs; :func:`pool_composition` sets the pool beside the labelled set by Monk tone,
Fitzpatrick type and sex.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from scin_pipeline.core.dedup import case_groups

# Why a pooled case has no usable label (the pool's ``reason``): its label_status, or this.
LABEL_OUTSIDE_POLICY = "label_outside_policy"
REASONS = ("ungradable", "no_pathology", "gradable_unlabelled", "no_labels_row", "malformed", LABEL_OUTSIDE_POLICY)
# Why a candidate image was left out of the pool (the excluded table's ``excluded_by``), most severe first.
SAME_IMAGE_AS_EVAL = "same_image_as_val_test"
NEAR_DUPLICATE_OF_EVAL = "near_duplicate_of_val_test"
CASE_GROUP_WITH_EVAL = "case_group_with_val_test"
DERM_UNGRADABLE = "derm_ungradable"
EVALUATION_SPLITS = ("val", "test")

POOL_COLUMNS = [
    "case_id",
    "image_id",
    "reason",
    "label_status",
    "group_id",
    "cluster_id",
    "linked_to_train",
    "local_path",
    "shot_type",
]
EXCLUDED_COLUMNS = ["case_id", "image_id", "reason", "excluded_by"]
LEAK_COLUMNS = ["case_id", "image_id", "leak", "evaluation_split"]


@dataclass(frozen=True)
class PoolResult:
    pool: pd.DataFrame  # POOL_COLUMNS, one row per (case, image) reference
    excluded: pd.DataFrame  # EXCLUDED_COLUMNS: candidates left out, and why


def _require(frame: pd.DataFrame, name: str, columns: list[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} lacks column(s) {', '.join(missing)}")


def quality_kept_references(images: pd.DataFrame, image_quality: pd.DataFrame) -> pd.DataFrame:
    """The image references whose path is safe and whose file passed the quality rule: image_id, case_id,
    shot_type, local_path (one row per reference: a file shared by two cases is two rows)."""
    _require(images, "images", ["image_id", "case_id", "path_status"])
    _require(image_quality, "image_quality", ["image_id", "keep"])
    decided = image_quality.assign(image_id=image_quality["image_id"].astype(str)).drop_duplicates("image_id")
    decided = decided.set_index("image_id")
    refs = images[images["path_status"] == "ok"].copy()
    refs = refs[refs["image_id"].notna()]
    refs["image_id"], refs["case_id"] = refs["image_id"].astype(str), refs["case_id"].astype(str)
    keep = decided["keep"].reindex(refs["image_id"]).fillna(False).astype(bool).to_numpy()
    refs = refs[keep]
    refs["local_path"] = decided["local_path"].reindex(refs["image_id"]).to_numpy() if "local_path" in decided else None
    if "shot_type" not in refs:
        refs["shot_type"] = None
    return refs[["image_id", "case_id", "shot_type", "local_path"]].drop_duplicates(["image_id", "case_id"])


def _evaluation_links(labeled_splits: pd.DataFrame, clusters: pd.DataFrame) -> tuple[dict, dict, dict]:
    """image_id, cluster_id and case group of every val/test image -> its split (from the clusters)."""
    splits = labeled_splits.assign(
        image_id=labeled_splits["image_id"].astype(str),
        case_id=labeled_splits["case_id"].astype(str),
        split=labeled_splits["split"].astype(str),
    )
    evaluation = splits[splits["split"].isin(EVALUATION_SPLITS)]
    cluster_of = _cluster_of(clusters)
    groups = case_groups(clusters) if len(clusters) else pd.Series(dtype=str)
    image_split = dict(zip(evaluation["image_id"], evaluation["split"]))
    cluster_split = {cluster_of.get(i, i): s for i, s in image_split.items()}
    group_split = {groups.get(c, c): s for c, s in zip(evaluation["case_id"], evaluation["split"])}
    return image_split, cluster_split, group_split


def _cluster_of(clusters: pd.DataFrame) -> dict:
    if clusters.empty:
        return {}
    return dict(zip(clusters["image_id"].astype(str), clusters["cluster_id"].astype(str)))


def build_unlabelled_pool(
    kept_references: pd.DataFrame,
    cases: pd.DataFrame,
    labeled_splits: pd.DataFrame,
    clusters: pd.DataFrame,
    *,
    include_derm_ungradable: bool = True,
) -> PoolResult:
    """The unlabelled pool (see the module docstring for the rule).

    ``kept_references``: :func:`quality_kept_references` (local_path and shot_type optional). ``cases``:
    case_id, label_status. ``labeled_splits``: image_id, case_id, split (every labelled case the models use).
    ``clusters``: ``dedup_clusters`` (image_id, case_id, cluster_id) over every image that passed quality,
    labelled or not.
    """
    _require(kept_references, "kept_references", ["image_id", "case_id"])
    _require(cases, "cases", ["case_id", "label_status"])
    _require(labeled_splits, "labeled_splits", ["image_id", "case_id", "split"])
    _require(clusters, "dedup_clusters", ["image_id", "case_id", "cluster_id"])
    status = cases.assign(case_id=cases["case_id"].astype(str)).set_index("case_id")["label_status"].astype(str)
    refs = kept_references.assign(
        image_id=kept_references["image_id"].astype(str), case_id=kept_references["case_id"].astype(str)
    )
    unknown = ~refs["case_id"].isin(status.index)
    if unknown.any():
        image_id, case_id = refs.loc[unknown, "image_id"].iloc[0], refs.loc[unknown, "case_id"].iloc[0]
        raise ValueError(f"image {image_id}: case_id {case_id} is not in cases")
    for optional in ("local_path", "shot_type"):  # absent where there are no files (metadata-only benches)
        if optional not in refs:
            refs[optional] = None
    labelled_cases = set(labeled_splits["case_id"].astype(str))
    candidates = refs[~refs["case_id"].isin(labelled_cases)].copy()
    candidates["label_status"] = candidates["case_id"].map(status).to_numpy()
    candidates["reason"] = np.where(
        candidates["label_status"] == "labelled", LABEL_OUTSIDE_POLICY, candidates["label_status"]
    )

    groups = case_groups(clusters) if len(clusters) else pd.Series(dtype=str)
    cluster_of = _cluster_of(clusters)
    candidates["cluster_id"] = candidates["image_id"].map(lambda i: cluster_of.get(i, i))
    candidates["group_id"] = candidates["case_id"].map(lambda c: groups.get(c, c))
    image_split, cluster_split, group_split = _evaluation_links(labeled_splits, clusters)
    train_groups = set(
        labeled_splits.loc[labeled_splits["split"].astype(str) == "train", "case_id"]
        .astype(str)
        .map(lambda c: groups.get(c, c))
    )
    candidates["linked_to_train"] = candidates["group_id"].isin(train_groups)

    # Most severe first: the same file, a near duplicate, then a link through the case's other photos or a
    # linked case. A case is left out whole when any of its images is.
    same = candidates["image_id"].isin(image_split.keys())
    near = candidates["cluster_id"].isin(cluster_split.keys()) & ~same
    linked = candidates["group_id"].isin(group_split.keys()) & ~same & ~near
    candidates["excluded_by"] = np.select(
        [same, near, linked], [SAME_IMAGE_AS_EVAL, NEAR_DUPLICATE_OF_EVAL, CASE_GROUP_WITH_EVAL], default=""
    )
    if not include_derm_ungradable:
        ungradable = (candidates["label_status"] == "ungradable") & (candidates["excluded_by"] == "")
        candidates.loc[ungradable, "excluded_by"] = DERM_UNGRADABLE
    candidates = candidates.sort_values(["case_id", "image_id"], kind="stable").reset_index(drop=True)
    excluded = candidates[candidates["excluded_by"] != ""][EXCLUDED_COLUMNS].reset_index(drop=True)
    pool = candidates[candidates["excluded_by"] == ""]
    pool = pool[~pool["case_id"].isin(set(excluded["case_id"]))]  # whole cases only
    return PoolResult(pool=pool[POOL_COLUMNS].reset_index(drop=True), excluded=excluded)


def pool_leaks(pool: pd.DataFrame, labeled_splits: pd.DataFrame, clusters: pd.DataFrame) -> pd.DataFrame:
    """Every pool row that brings validation or test into training, re-derived from ``clusters`` and
    ``labeled_splits`` (the pool's own cluster and group columns are not trusted): ``labelled_case`` (a case
    the splits use), ``same_image_as_val_test``, ``near_duplicate_of_val_test`` (one cluster),
    ``case_group_with_val_test`` (the case is linked to a val/test case by shared or near-duplicate images).
    Empty when the pool is clean. Columns ``LEAK_COLUMNS``."""
    _require(pool, "unlabelled_pool", ["case_id", "image_id"])
    _require(labeled_splits, "labeled_splits", ["image_id", "case_id", "split"])
    _require(clusters, "dedup_clusters", ["image_id", "case_id", "cluster_id"])
    rows = pool[["case_id", "image_id"]].astype(str).reset_index(drop=True)
    split_of_case = dict(zip(labeled_splits["case_id"].astype(str), labeled_splits["split"].astype(str)))
    image_split, cluster_split, group_split = _evaluation_links(labeled_splits, clusters)
    cluster_of = _cluster_of(clusters)
    groups = case_groups(clusters) if len(clusters) else pd.Series(dtype=str)
    found = []
    for case_id, image_id in rows.itertuples(index=False):
        cluster = cluster_of.get(image_id, image_id)
        group = groups.get(case_id, case_id)
        if case_id in split_of_case:
            found.append((case_id, image_id, "labelled_case", split_of_case[case_id]))
        elif image_id in image_split:
            found.append((case_id, image_id, SAME_IMAGE_AS_EVAL, image_split[image_id]))
        elif cluster in cluster_split:
            found.append((case_id, image_id, NEAR_DUPLICATE_OF_EVAL, cluster_split[cluster]))
        elif group in group_split:
            found.append((case_id, image_id, CASE_GROUP_WITH_EVAL, group_split[group]))
    return pd.DataFrame(found, columns=LEAK_COLUMNS)


COMPOSITION_ATTRIBUTES = ("monk_us_bin", "monk_india_bin", "fst_dermatologist", "fst_self_reported", "sex_at_birth")


def pool_composition(
    pool: pd.DataFrame, labeled_splits: pd.DataFrame, cases: pd.DataFrame, attributes=COMPOSITION_ATTRIBUTES
) -> pd.DataFrame:
    """The pool's cases beside the labelled set's, per attribute and group: one row per (attribute, group)
    with ``labelled_n``, ``labelled_share``, ``pool_n``, ``pool_share`` (shares of that set's cases) and
    ``pool_to_labelled`` (pool share / labelled share: above 1, the pool holds relatively more of the group).
    """
    from scin_pipeline.core.fairness import representation_by_split

    sets = pd.concat(
        [
            labeled_splits[["case_id"]].astype(str).drop_duplicates().assign(split="labelled"),
            pool[["case_id"]].astype(str).drop_duplicates().assign(split="unlabelled_pool"),
        ],
        ignore_index=True,
    )
    table = representation_by_split(sets, cases, list(attributes))
    wide = table[table["split"].isin(["labelled", "unlabelled_pool"])].pivot_table(
        index=["attribute", "group"], columns="split", values=["n", "share"], sort=False
    )
    # Either set may be empty (a tiny run whose splits hold no case, or an empty pool): both columns still exist.
    wide = wide.reindex(columns=pd.MultiIndex.from_product([["n", "share"], ["labelled", "unlabelled_pool"]]))
    out = pd.DataFrame(
        {
            "attribute": [a for a, _ in wide.index],
            "group": [g for _, g in wide.index],
            "labelled_n": wide[("n", "labelled")].fillna(0).astype(int).to_numpy(),
            "labelled_share": wide[("share", "labelled")].to_numpy(),
            "pool_n": wide[("n", "unlabelled_pool")].fillna(0).astype(int).to_numpy(),
            "pool_share": wide[("share", "unlabelled_pool")].to_numpy(),
        }
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        out["pool_to_labelled"] = out["pool_share"] / out["labelled_share"]
    return out.reset_index(drop=True)
