"""Curation assets: image_quality (sharded) -> quality_filtered_index, dedup_clusters -> labeled_splits.

Every decision is a function of scin_pipeline.core (quality, dedup, splits); these assets feed it, store
the result, and make it visible: counts per reason, exclusion rates per Monk skin tone, a contact sheet,
precision and recall on planted defects when the source is a synthetic mirror.
"""

import os
import time
from pathlib import Path
from typing import Literal

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    BackfillPolicy,
    Config,
    MetadataValue,
    Output,
    StaticPartitionsDefinition,
    asset,
    asset_check,
)
from pydantic import Field

from scin_pipeline.assets._metadata import image_md, table_md, versioned_output
from scin_pipeline.core import dedup, image_cache, planted, quality, splits
from scin_pipeline.core.atomic import write_parquet_atomic
from scin_pipeline.core.contact_sheet import write_contact_sheet
from scin_pipeline.core.progress import Progress, tracked
from scin_pipeline.core.report import split_report
from scin_pipeline.core.synthetic.mirror import PLANTS_FILE
from scin_pipeline.resources import ScinSourceResource, StoragePaths

GROUP = "curation"
N_QUALITY_SHARDS = 16
quality_shards = StaticPartitionsDefinition([f"{i:02d}" for i in range(N_QUALITY_SHARDS)])
_DEFAULT_QUALITY = quality.QualityConfig()


def synthetic_plants(scin_source: ScinSourceResource) -> pd.DataFrame | None:
    """The planted-defect list of a synthetic mirror (None for a real source)."""
    source = scin_source.open()
    if not source.is_synthetic():
        return None
    path = Path(scin_source.location) / PLANTS_FILE  # a fixed name at the mirror root, not a CSV path
    return pd.read_csv(path, dtype={"image_id": str, "case_id": str}) if path.exists() else None


class ImageQualityConfig(Config):
    """Thresholds of the keep/exclude rule; defaults measured in bench/curation.py (see QualityConfig)."""

    workers: int = Field(default=0, ge=0, description="worker processes (0: one per CPU core)")
    dark_relative_min: float = Field(
        default=_DEFAULT_QUALITY.dark_relative_min,
        description="dark when median L* < this x the L* of the case's Monk swatch",
    )
    diagnostic_texture_min: float = Field(
        default=_DEFAULT_QUALITY.diagnostic_texture_min, description="a dark image is kept when texture >= this"
    )
    diagnostic_redness_min: float = Field(
        default=_DEFAULT_QUALITY.diagnostic_redness_min,
        description="a dark image is kept when redness contrast >= this",
    )
    overexposed_fraction_max: float = Field(default=_DEFAULT_QUALITY.overexposed_fraction_max)
    blurry_sharpness_min: float = Field(default=_DEFAULT_QUALITY.blurry_sharpness_min)
    low_information_entropy_min: float = Field(default=_DEFAULT_QUALITY.low_information_entropy_min)
    low_information_structure_min: float = Field(
        default=_DEFAULT_QUALITY.low_information_structure_min,
        description="a nearly flat frame (covered lens, wall, sleeve) when structure (noise-free texture at "
        "3-16 px, % of the mean grey level) < this",
    )
    min_long_side_px: int = Field(
        default=_DEFAULT_QUALITY.min_long_side_px, ge=1, description="too_small when the long side is under this"
    )
    tensor_sizes: list[int] = Field(
        default=[image_cache.DEFAULT_IMAGE_SIZE],
        description="sides (px) of the square uint8 training tensors written from the same decode, for every "
        "kept image (image_tensors indexes them; training reads them); [] writes none",
    )
    tensor_shard_size: int = Field(default=image_cache.DEFAULT_SHARD_SIZE, ge=1, description="images per .npy shard")

    def rule(self) -> quality.QualityConfig:
        return quality.QualityConfig(
            dark_relative_min=self.dark_relative_min,
            diagnostic_texture_min=self.diagnostic_texture_min,
            diagnostic_redness_min=self.diagnostic_redness_min,
            overexposed_fraction_max=self.overexposed_fraction_max,
            blurry_sharpness_min=self.blurry_sharpness_min,
            low_information_entropy_min=self.low_information_entropy_min,
            low_information_structure_min=self.low_information_structure_min,
            min_long_side_px=self.min_long_side_px,
            tensor_sizes=tuple(self.tensor_sizes),
        )


@asset(
    group_name=GROUP,
    kinds={"opencv", "parquet", "numpy"},
    code_version="5",
    partitions_def=quality_shards,
    # One run can cover every shard (a process pool inside); a multi-run backfill fans shards out
    # across run workers or machines instead.
    backfill_policy=BackfillPolicy.single_run(),
    pool="cpu",
    description="Per image, from one decode: brightness, contrast, exposure, sharpness, redness, texture, "
    "entropy, size, cleanvision-style scores, pHash and dHash, the near-duplicate descriptor (crop pHashes, "
    "ORB keypoints); keep or exclude with a reason code. From the same decode, every kept image's uint8 "
    "training tensor at each of tensor_sizes (cache/image_tensors/<S>px/, where tensor_shard and tensor_offset "
    f"point; image_tensors is their index). Sharded ({N_QUALITY_SHARDS} static partitions by image id); "
    "tables/image_quality/<shard>.parquet.",
)
def image_quality(
    context: AssetExecutionContext,
    config: ImageQualityConfig,
    image_files: pd.DataFrame,
    images: pd.DataFrame,
    cases: pd.DataFrame,
    storage: StoragePaths,
):
    keys = sorted(context.partition_keys)
    files = image_files[image_files["image_id"].notna()].copy()
    files["shard"] = files["image_id"].map(lambda i: splits.stable_shard(str(i), N_QUALITY_SHARDS))
    files = files[files["shard"].isin(keys)]
    # Stored relative to the data root: read under this run's root.
    items = (
        (str(r.image_id), storage.resolve_or_none(r.local_path) if r.status == "ok" else None)
        for r in files.itertuples()
    )
    workers = config.workers or os.cpu_count() or 1
    started = time.perf_counter()
    progress = Progress(
        f"image_quality ({len(keys)} of {N_QUALITY_SHARDS} shards)", len(files), context.log.info, unit="images"
    )
    rule = config.rule()
    # The workers' one decode per image also gives its training tensors: spooled as they come, copied
    # into the cache's shards once the rule has decided which images are kept (core.image_cache).
    with image_cache.TensorSpool(storage.image_tensors_dir, rule.tensor_sizes) as spool:
        rows = spool.take(quality.assess_images(items, config=rule, workers=workers))
        metrics = quality.assessments_frame(tracked(rows, progress))
        elapsed = time.perf_counter() - started
        # A file that never arrived keeps the reason image_files gave (missing, corrupt download).
        by_id = files.set_index("image_id")
        not_fetched = by_id["status"].ne("ok").reindex(metrics["image_id"]).to_numpy()
        metrics.loc[not_fetched, "decode_status"] = "missing"
        metrics.loc[not_fetched, "decode_reason"] = (
            by_id["reason"].reindex(metrics.loc[not_fetched, "image_id"]).to_numpy()
        )
        tone = metrics["image_id"].map(quality.monk_tone_per_image(images, cases))
        decisions = quality.decide_quality(metrics, tone, rule)
        table = pd.concat([metrics, decisions.drop(columns=["image_id"])], axis=1)
        table["monk_tone"] = tone.astype("Float64")
        table["local_path"] = by_id["local_path"].reindex(table["image_id"]).to_numpy()
        table["shard"] = by_id["shard"].reindex(table["image_id"]).to_numpy()
        decided = table[["image_id", "local_path", "shard", "keep"]].rename(columns={"shard": "partition"})
        placed = spool.write_shards(
            # The files under this run's data root (the table keeps their paths relative to it).
            decided.assign(local_path=decided["local_path"].map(storage.resolve_or_none)),
            shard_size=config.tensor_shard_size,
        )
    table = pd.concat([table, placed.drop(columns=["image_id"])], axis=1)
    reasons = table["reason"].value_counts().to_dict()
    context.add_output_metadata(
        {
            "shards": ", ".join(keys) if len(keys) < N_QUALITY_SHARDS else "all",
            "images": len(table),
            "kept": int(table["keep"].sum()),
            "excluded_by_reason": MetadataValue.json({str(k): int(v) for k, v in reasons.items()}),
            "images_per_second": round(len(table) / elapsed, 1) if elapsed > 0 else 0.0,
            "workers": workers,
            "tensor_sizes": ", ".join(f"{s} px" for s in rule.tensor_sizes) or "none",
            "tensors_cached": int((table["tensor_status"] == "ok").sum()),
            "tensors_failed": int((table["tensor_status"] == "failed").sum()),
        }
    )
    by_shard = {key: table[table["shard"] == key].reset_index(drop=True) for key in keys}
    return by_shard if len(keys) > 1 else by_shard[keys[0]]


class QualityFilterConfig(Config):
    exclude_derm_ungradable: bool = Field(
        default=True,
        description="also drop cases no dermatologist could grade (reported apart from "
        "image quality): such cases carry no condition label",
    )
    max_quarantined_fraction: float = Field(
        default=0.10,
        ge=0,
        le=1,
        description="blocking check: at most this share of files may be missing or undecodable",
    )


@asset(
    group_name=GROUP,
    kinds={"pandas", "parquet"},
    code_version="1",
    description="The image references kept for training: image quality passed (and, by default, the case "
    "is dermatologist-gradable). Metadata: counts per reason, exclusion rate per Monk skin tone, a contact "
    "sheet of examples per reason, and precision/recall on planted defects for a synthetic mirror.",
    check_specs=[
        AssetCheckSpec(
            "quarantined_fraction_below_threshold",
            asset="quality_filtered_index",
            blocking=True,
            description="Missing or undecodable files stay below the configured share of all files.",
        )
    ],
)
def quality_filtered_index(
    context: AssetExecutionContext,
    config: QualityFilterConfig,
    image_quality: pd.DataFrame,
    images: pd.DataFrame,
    cases: pd.DataFrame,
    scin_source: ScinSourceResource,
    storage: StoragePaths,
):
    out_dir = storage.table_files_dir("quality_filtered_index")
    case_info = cases.set_index("case_id")[
        [
            "derm_gradable",
            "monk_skin_tone_label_us",
            "monk_skin_tone_label_india",
            "fst_dermatologist",
            "fitzpatrick_skin_type",
        ]
    ]
    decided = image_quality.set_index("image_id")
    refs = images[images["path_status"] == "ok"][["image_id", "case_id", "position", "shot_type"]].copy()
    refs = refs.join(decided[["keep", "reason", "local_path", "dark_but_diagnostic"]], on="image_id")
    refs = refs.join(case_info, on="case_id")
    refs["keep"] = refs["keep"].fillna(False).astype(bool)
    refs["excluded_by"] = refs["reason"].where(~refs["keep"])
    ungradable = refs["keep"] & ~refs["derm_gradable"].fillna(False).astype(bool)
    dropped_ungradable = ungradable & bool(config.exclude_derm_ungradable)
    refs.loc[dropped_ungradable, "excluded_by"] = "derm_ungradable"
    refs["kept"] = refs["excluded_by"].isna()
    write_parquet_atomic(refs, out_dir / "all_references.parquet")

    # Per distinct file: the image-quality reasons; gradability is a separate, per-case filter.
    per_file = image_quality.drop_duplicates("image_id").reset_index(drop=True)
    failed = per_file["decode_status"].ne("ok")
    quarantined_fraction = float(failed.mean()) if len(per_file) else 0.0
    # Files excluded by image quality and, per reference, cases dropped as dermatologist-ungradable: one
    # table per Monk tone, so a filter that weighs on deep tones shows whichever stage it comes from.
    rates = quality.exclusions_by_monk_tone(
        quality.exclusion_rates_by_monk_tone(per_file, per_file["monk_tone"]),
        quality.derm_ungradable_by_monk_tone(refs, dropped_ungradable),
    )
    write_parquet_atomic(rates, out_dir / "exclusion_rates_by_monk_tone.parquet")

    examples = {
        str(reason): [storage.resolve_or_none(p) for p in group["local_path"].head(6)]
        for reason, group in per_file[per_file["reason"].notna()].groupby("reason")
    }
    sheet = write_contact_sheet(examples, out_dir / "contact_sheet.png", title="Excluded images, by reason")

    metadata = {
        "references_kept": int(refs["kept"].sum()),
        "references_total": len(refs),
        "files_excluded_by_quality_reason": MetadataValue.json(
            {str(k): int(v) for k, v in per_file["reason"].value_counts().items()}
        ),
        "references_excluded_derm_ungradable": int(dropped_ungradable.sum()),
        "dark_but_diagnostic_kept": int(per_file["dark_but_diagnostic"].fillna(False).sum()),
        "quarantined_fraction": round(quarantined_fraction, 4),
        "exclusion_rate_by_monk_tone": table_md(rates, rows=30),
        "contact_sheet": image_md(sheet),
    }
    plants = synthetic_plants(scin_source)
    if plants is not None:
        scores = planted.planted_defect_scores(per_file.drop(columns=["monk_tone"]), plants)
        write_parquet_atomic(scores, out_dir / "planted_defect_scores.parquet")
        metadata["planted_defect_scores (synthetic)"] = table_md(scores, rows=30)
    kept = refs[refs["kept"]].drop(columns=["keep", "reason", "excluded_by", "kept"]).reset_index(drop=True)
    yield Output(kept, metadata=metadata)
    yield AssetCheckResult(
        check_name="quarantined_fraction_below_threshold",
        passed=quarantined_fraction <= config.max_quarantined_fraction,
        description=(
            f"{quarantined_fraction:.1%} of the image files were quarantined (unreadable or missing), "
            f"above the limit max_quarantined_fraction={config.max_quarantined_fraction:.1%}"
            if quarantined_fraction > config.max_quarantined_fraction
            else None
        ),
        metadata={
            "quarantined_fraction": round(quarantined_fraction, 4),
            "threshold": config.max_quarantined_fraction,
            "by_status": MetadataValue.json(
                {str(k): int(v) for k, v in per_file.loc[failed, "decode_status"].value_counts().items()}
            ),
        },
    )


class DedupConfig(Config):
    method: Literal["auto", "keypoints", "hashes"] = Field(
        default="auto",
        description="keypoints: crop pHash candidates verified by ORB keypoint geometry (survives crops, "
        "rescaling, brightness, JPEG); hashes: the earlier pHash AND dHash rule with the dHash256 check; "
        "auto: keypoints where image_quality has descriptors",
    )
    max_crop_phash_distance: int = Field(default=dedup.DEFAULT_MAX_CROP_PHASH_DISTANCE, ge=0, le=32)
    min_keypoint_inliers: int = Field(default=dedup.DEFAULT_MIN_KEYPOINT_INLIERS, ge=3, le=1000)
    max_phash_distance: int = Field(default=dedup.DEFAULT_MAX_PHASH_DISTANCE, ge=0, le=32)
    max_dhash_distance: int = Field(default=dedup.DEFAULT_MAX_DHASH_DISTANCE, ge=0, le=32)
    max_dhash256_distance: int | None = Field(
        default=dedup.DEFAULT_MAX_DHASH256_DISTANCE,
        ge=0,
        le=256,
        description="verify each candidate with the 256-bit dHash (None: no verification)",
    )


@asset(
    group_name=GROUP,
    kinds={"numpy", "parquet"},
    code_version="3",
    description="Near-duplicate clusters among the images that passed quality: candidates whose crop pHashes "
    "are within the configured Hamming distance (exact multi-index hashing search), each verified by ORB "
    "keypoint matches agreeing with one crop-and-rescale map; connected-component clusters "
    "typed exact_reuse, same_case_multi_angle or cross_case_near_duplicate. Pairs in "
    "tables/dedup_clusters/pairs.parquet.",
)
def dedup_clusters(
    context: AssetExecutionContext,
    config: DedupConfig,
    image_quality: pd.DataFrame,
    images: pd.DataFrame,
    scin_source: ScinSourceResource,
    storage: StoragePaths,
) -> pd.DataFrame:
    # Only images that passed quality: they are the ones a split can leak, and blown-out or black frames
    # all hash alike, so including them would only add false clusters.
    columns = [c for c in ("image_id", "phash", "dhash", "dhash256", dedup.DESCRIPTOR_COLUMN) if c in image_quality]
    hashed = image_quality[image_quality["keep"].astype(bool)][columns]
    refs = images[(images["path_status"] == "ok") & images["image_id"].isin(hashed["image_id"])]
    started = time.perf_counter()
    clusters, pairs = dedup.build_dedup_clusters(
        refs[["image_id", "case_id"]],
        hashed,
        max_phash_distance=config.max_phash_distance,
        max_dhash_distance=config.max_dhash_distance,
        max_dhash256_distance=config.max_dhash256_distance,
        method=config.method,
        max_crop_phash_distance=config.max_crop_phash_distance,
        min_keypoint_inliers=config.min_keypoint_inliers,
    )
    elapsed = time.perf_counter() - started
    out_dir = storage.table_files_dir("dedup_clusters")
    write_parquet_atomic(pairs, out_dir / "pairs.parquet")
    distinct = clusters.drop_duplicates("cluster_id")
    metadata = {
        "clusters_by_kind": MetadataValue.json(
            {str(k): int(v) for k, v in distinct["cluster_kind"].value_counts().items()}
        ),
        "near_duplicate_pairs": len(pairs),
        "largest_cluster": int(clusters["cluster_size"].max()) if len(clusters) else 0,
        "search_seconds": round(elapsed, 3),
        "pairs_preview": table_md(pairs, rows=20),
    }
    plants = synthetic_plants(scin_source)
    if plants is not None:
        scores = planted.planted_near_duplicate_scores(pairs, plants, image_ids=hashed["image_id"])
        summary = {k: v for k, v in scores.items() if not isinstance(v, list)}
        summary.update({k: v[:10] for k, v in scores.items() if isinstance(v, list)})  # a sample, not all
        metadata["planted_near_duplicates (synthetic)"] = MetadataValue.json(summary)
    context.add_output_metadata(metadata)
    return clusters


class LabeledSplitsConfig(Config):
    label_mode: Literal["top1", "multilabel"] = Field(default="top1")
    min_weight: float = Field(default=0.0, ge=0, le=1, description="minimum weighted-label weight")
    top_k: int | None = Field(default=None, ge=1, description="multilabel: the K most frequent conditions")
    min_cases_per_class: int = Field(default=20, ge=1)
    rare_classes: Literal["other", "drop"] = Field(default="other")
    drop_tied_top: bool = Field(default=False, description="drop cases whose top weight is tied")
    train_fraction: float = Field(default=0.7, ge=0, le=1)
    val_fraction: float = Field(default=0.15, ge=0, le=1)
    test_fraction: float = Field(default=0.15, ge=0, le=1)
    seed: int = 0
    min_cases_per_split: int = Field(
        default=3, ge=0, description="check: each class in val and test (20 cases per class at 15 % give 3)"
    )

    def policy(self) -> splits.LabelPolicy:
        return splits.LabelPolicy(
            mode=self.label_mode,
            min_weight=self.min_weight,
            top_k=self.top_k,
            min_cases_per_class=self.min_cases_per_class,
            rare_classes=self.rare_classes,
            drop_tied_top=self.drop_tied_top,
        )


SPLIT_COLUMNS = ["image_id", "case_id", "split", "label", "labels", "group_id", "cluster_id", "local_path"]


@asset(
    group_name=GROUP,
    kinds={"pandas", "parquet"},
    code_version="1",
    description="Train / val / test per image: a whole group of cases linked by shared or near-duplicate "
    "images stays in one split; stratified by label; deterministic (ids hashed with a seed). Label policy "
    "in the config. Split report: class, Monk tone and Fitzpatrick composition per split.",
    check_specs=[
        AssetCheckSpec(
            "classes_in_val_and_test",
            asset="labeled_splits",
            description="Every class has at least min_cases_per_split cases in val and in test.",
        )
    ],
)
def labeled_splits(
    context: AssetExecutionContext,
    config: LabeledSplitsConfig,
    quality_filtered_index: pd.DataFrame,
    dedup_clusters: pd.DataFrame,
    cases: pd.DataFrame,
    storage: StoragePaths,
):
    kept_cases = cases[cases["case_id"].isin(quality_filtered_index["case_id"])]
    labels = splits.assign_labels(kept_cases, config.policy())
    groups = dedup.case_groups(dedup_clusters)
    split = splits.make_splits(
        labels,
        groups,
        splits.SplitConfig(
            fractions=(config.train_fraction, config.val_fraction, config.test_fraction), seed=config.seed
        ),
    )
    table = quality_filtered_index.merge(split[["case_id", "split", "label", "group_id"]], on="case_id")
    table = table.merge(labels[["case_id", "labels"]], on="case_id")
    table = table.merge(
        dedup_clusters[["image_id", "case_id", "cluster_id", "cluster_kind"]], on=["image_id", "case_id"], how="left"
    )
    # An image that did not enter the duplicate search is its own cluster.
    table["cluster_id"] = table["cluster_id"].fillna(table["image_id"]).astype(str)
    table = table[[*SPLIT_COLUMNS, *[c for c in table.columns if c not in SPLIT_COLUMNS]]]
    table = table.sort_values(["split", "case_id", "image_id"]).reset_index(drop=True)

    out_dir = storage.table_files_dir("labeled_splits")
    report = split_report(table, cases)
    write_parquet_atomic(report, out_dir / "split_report.parquet")
    presence = splits.class_presence(table, config.min_cases_per_split)
    version = splits.splits_data_version(table)
    counts = table.groupby("split", observed=True).agg(images=("image_id", "size"), cases=("case_id", "nunique"))
    yield versioned_output(
        table,
        version,
        metadata={
            "data_version": version,
            "images_per_split": MetadataValue.json({str(k): int(v) for k, v in counts["images"].items()}),
            "cases_per_split": MetadataValue.json({str(k): int(v) for k, v in counts["cases"].items()}),
            "classes": int(table["label"].nunique()),
            "class_counts_per_split": table_md(presence, rows=60),
            "split_report": table_md(report, rows=80),
        },
    )
    short = presence[~presence["ok"]]
    yield AssetCheckResult(
        check_name="classes_in_val_and_test",
        passed=short.empty,
        severity=AssetCheckSeverity.WARN,
        metadata={"classes_short": len(short), "details": table_md(short, rows=30)},
        description=None
        if short.empty
        else f"{len(short)} class(es) missing from val or test: "
        f"{', '.join(map(str, short['label'].head(5)))}{' ...' if len(short) > 5 else ''}",
    )


@asset_check(asset=labeled_splits, blocking=True, description="No case appears in two splits.")
def no_case_leakage(labeled_splits: pd.DataFrame) -> AssetCheckResult:
    bad = splits.leakage(labeled_splits, "case_id")
    return AssetCheckResult(
        passed=bad.empty,
        metadata={"leaking_cases": len(bad), "examples": table_md(bad, rows=20)},
        description=None if bad.empty else f"{len(bad)} case(s) appear in more than one split",
    )


@asset_check(
    asset=labeled_splits,
    blocking=True,
    description="No duplicate cluster (exact reuse or near duplicate) appears in two splits.",
)
def no_cluster_leakage(labeled_splits: pd.DataFrame) -> AssetCheckResult:
    bad = splits.leakage(labeled_splits, "cluster_id")
    return AssetCheckResult(
        passed=bad.empty,
        metadata={"leaking_clusters": len(bad), "examples": table_md(bad, rows=20)},
        description=None if bad.empty else f"{len(bad)} duplicate cluster(s) appear in more than one split",
    )
