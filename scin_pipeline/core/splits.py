"""Label policy and leak-free, stratified, deterministic train/val/test splits.

The notebooks' 16 % validation accuracy came from leakage: images of one case on both sides of the split,
and near-duplicates never removed. Here the unit of splitting is a *group*: a connected component of cases
linked by shared or near-duplicate images (see ``core.dedup.case_groups``). A whole group lands in one
split, so no case and no duplicate cluster can straddle two splits.

Determinism: groups are ordered by a hash of (seed, group id), never by file order or randomness, so the
same inputs and seed give the same split on any machine, and adding a case moves no other case.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")
OTHER = "other"


@dataclass(frozen=True)
class LabelPolicy:
    """How a case's condition label(s) are derived from the dermatologists' weighted labels.

    mode="top1": the highest-weighted condition, kept when its weight >= ``min_weight``.
    mode="multilabel": every condition among the ``top_k`` most frequent (by cases mentioning it) whose
    weight >= ``min_weight``; ``label`` is then the highest-weighted of them (used for stratification).
    Classes with fewer than ``min_cases_per_class`` cases are merged into ``other`` or dropped.
    Ties at the top weight (925 of 3,061 labelled SCIN cases) keep the release's order, or are dropped
    with ``drop_tied_top=True``.
    """

    mode: Literal["top1", "multilabel"] = "top1"
    min_weight: float = 0.0
    top_k: int | None = None
    min_cases_per_class: int = 20
    rare_classes: Literal["other", "drop"] = "other"
    drop_tied_top: bool = False

    def __post_init__(self):
        if self.mode not in ("top1", "multilabel"):
            raise ValueError(f"label policy mode must be 'top1' or 'multilabel', got {self.mode!r}")
        if self.rare_classes not in ("other", "drop"):
            raise ValueError(f"rare_classes must be 'other' or 'drop', got {self.rare_classes!r}")
        if not 0 <= self.min_weight <= 1:
            raise ValueError(f"min_weight must be within [0, 1], got {self.min_weight}")
        if self.mode == "multilabel" and not self.top_k:
            raise ValueError("multilabel mode needs top_k (the number of conditions to predict)")


def assign_labels(cases: pd.DataFrame, policy: LabelPolicy) -> pd.DataFrame:
    """One row per case that receives a label: case_id, label, labels (list), label_weight.

    Unlabelled cases, cases below ``min_weight`` and (with rare_classes="drop") rare classes are left out;
    ``label_policy_report`` says how many and why.
    """
    rows = []
    names_col, weights_col = cases["weighted_label_names"], cases["weighted_label_weights"]
    if policy.mode == "multilabel":
        mentions = pd.Series([n for names in names_col.dropna() for n in names]).value_counts()
        # Most frequent first; ties by name for determinism.
        ranked = sorted(mentions.items(), key=lambda kv: (-kv[1], kv[0]))
        vocabulary = [name for name, _ in ranked[: policy.top_k]]
        allowed = set(vocabulary)
    for case_id, names, weights, tied in zip(
        cases["case_id"], names_col, weights_col, cases.get("top_label_tied", pd.Series(False, index=cases.index))
    ):
        if not isinstance(names, (list, np.ndarray)) or len(names) == 0:
            continue
        names, weights = list(names), [float(w) for w in weights]
        if policy.drop_tied_top and tied:
            continue
        if policy.mode == "top1":
            if weights[0] < policy.min_weight:
                continue
            rows.append((case_id, names[0], [names[0]], weights[0]))
        else:
            chosen = [(n, w) for n, w in zip(names, weights) if n in allowed and w >= policy.min_weight]
            if chosen:
                rows.append((case_id, chosen[0][0], [n for n, _ in chosen], chosen[0][1]))
            elif policy.rare_classes == "other":
                rows.append((case_id, OTHER, [OTHER], weights[0]))
    labels = pd.DataFrame(rows, columns=["case_id", "label", "labels", "label_weight"])
    counts = labels["label"].value_counts()
    rare = set(counts[counts < policy.min_cases_per_class].index) - {OTHER}
    if rare:
        if policy.rare_classes == "drop":
            labels["labels"] = [[n for n in ls if n not in rare] for ls in labels["labels"]]
            labels = labels[~labels["label"].isin(rare)]
        else:
            # Rare names become `other`, keeping rank order and listing `other` once.
            labels["labels"] = [list(dict.fromkeys(OTHER if n in rare else n for n in ls)) for ls in labels["labels"]]
            labels["label"] = labels["label"].where(~labels["label"].isin(rare), OTHER)
    labels["case_id"] = labels["case_id"].astype("string")
    return labels.reset_index(drop=True)


def stable_hash(seed: int | str, value: str) -> int:
    """A 64-bit hash that is the same on every machine and Python run (unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{value}".encode(), digest_size=8).digest(), "big")


def stable_shard(key: str, n_shards: int) -> str:
    """The shard ("00".."NN") a key belongs to: fixed for the key, spread evenly over the shards."""
    return f"{stable_hash('shard', key) % n_shards:02d}"


@dataclass(frozen=True)
class SplitConfig:
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0

    def __post_init__(self):
        if len(self.fractions) != 3 or any(f < 0 for f in self.fractions) or abs(sum(self.fractions) - 1) > 1e-6:
            raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {self.fractions}")


def assign_group_splits(groups: pd.DataFrame, config: SplitConfig = SplitConfig()) -> pd.Series:
    """Assign each group to a split, stratified by the group's label.

    ``groups`` has one row per group: group_id, label (the stratum: the group's most common label),
    weight (its size, e.g. cases). Within each stratum, groups in hash order go one by one to the split
    furthest below its target share, so every class with three or more groups reaches val and test.
    """
    targets = np.asarray(config.fractions, dtype=float)
    assignment: dict[Hashable, str] = {}  # group_id -> split
    for _label, stratum in sorted(groups.groupby("label", observed=True), key=lambda kv: str(kv[0])):
        order = sorted(stratum.itertuples(index=False), key=lambda r: stable_hash(config.seed, str(r.group_id)))
        filled = np.zeros(3)
        for row in order:
            # The split furthest below its target share (filled / target smallest; ties: train, val,
            # test): a class's first three groups go to train, val and test, so val and test see it.
            with np.errstate(divide="ignore"):
                fill_ratio = np.where(targets > 0, filled / targets, np.inf)
            choice = int(np.argmin(fill_ratio))
            filled[choice] += row.weight
            assignment[row.group_id] = SPLITS[choice]
    return pd.Series(assignment, name="split").reindex(groups["group_id"].to_numpy())


def make_splits(labels: pd.DataFrame, case_groups: pd.Series, config: SplitConfig = SplitConfig()) -> pd.DataFrame:
    """Split labelled cases, keeping each duplicate group whole. Returns case_id, group_id, label, split.

    ``case_groups`` maps case_id -> group id (cases linked by shared or near-duplicate images); a case
    absent from it is its own group.
    """
    frame = labels[["case_id", "label"]].copy()
    frame["group_id"] = frame["case_id"].map(case_groups).fillna(frame["case_id"]).astype(str)
    per_group = (
        frame.groupby("group_id")
        .agg(
            label=("label", lambda s: s.value_counts().sort_index().idxmax()),  # the most common; ties by name
            weight=("case_id", "size"),
        )
        .reset_index()
    )
    split_of_group = assign_group_splits(per_group, config)
    frame["split"] = pd.Categorical(frame["group_id"].map(split_of_group), categories=list(SPLITS))
    return frame


# Who is in which split with which label: the columns the splits' data version covers.
SPLITS_VERSION_COLUMNS = ["image_id", "case_id", "split", "label"]


def splits_data_version(table: pd.DataFrame) -> str:
    """A short content hash of who is in which split with which label: the data version every trained
    model is tagged with, so a model is traceable to the exact split it saw."""
    key = table[SPLITS_VERSION_COLUMNS].astype(str)
    return hashlib.sha256(pd.util.hash_pandas_object(key, index=False).to_numpy().tobytes()).hexdigest()[:16]


def leakage(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    """Values of ``key`` (case_id, cluster_id, group_id) that appear in more than one split."""
    spread = frame.groupby(key, observed=True)["split"].nunique()
    bad = spread[spread > 1].index
    return (
        frame[frame[key].isin(bad)]
        .groupby(key, observed=True)["split"]
        .agg(lambda s: sorted(set(map(str, s))))
        .rename("splits")
        .reset_index()
    )


def class_presence(frame: pd.DataFrame, min_per_split: int) -> pd.DataFrame:
    """Per class and split, the number of cases; ``ok`` when val and test each hold >= min_per_split."""
    table = (
        frame.drop_duplicates("case_id")
        .groupby(["label", "split"], observed=False)
        .size()
        .unstack("split", fill_value=0)
        .reindex(columns=list(SPLITS), fill_value=0)
    )
    table["ok"] = (table["val"] >= min_per_split) & (table["test"] >= min_per_split)
    return table.reset_index()
