"""The cases without a usable label: unlabelled_pool (what may be learnt from, with a blocking leak check).

The rules live in scin_pipeline.core.unlabelled; this asset feeds them, stores the pool and shows its
composition beside the labelled set's.
"""

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    AssetIn,
    Config,
    MetadataValue,
    asset,
    asset_check,
)
from pydantic import Field

from scin_pipeline.assets._metadata import metric_md, table_md, versioned_output
from scin_pipeline.assets.training import frame_version
from scin_pipeline.core import unlabelled
from scin_pipeline.core.atomic import write_parquet_atomic
from scin_pipeline.resources import StoragePaths


class UnlabelledPoolConfig(Config):
    include_derm_ungradable: bool = Field(
        default=True,
        description="pool the cases every dermatologist judged ungradable (their images passed our quality "
        "rule, their answers are intact; 1,862 of the release's ~1,970 unlabelled cases); off: leave them out",
    )


@asset(
    group_name="curation",
    kinds={"pandas", "parquet"},
    code_version="1",
    description="The images and cases with no usable condition label that a model may learn from: images "
    "that passed quality, cases outside labeled_splits (reason: their label_status, or label_outside_policy), "
    "and no case whose group of linked cases (shared files, near duplicates: dedup_clusters) holds a "
    "validation or test case. One row per (case, image). Excluded candidates in "
    "tables/unlabelled_pool/excluded.parquet; composition by Monk tone, Fitzpatrick type and sex beside the "
    "labelled set's in tables/unlabelled_pool/composition.parquet and the metadata.",
)
def unlabelled_pool(
    context: AssetExecutionContext,
    config: UnlabelledPoolConfig,
    image_quality: pd.DataFrame,
    images: pd.DataFrame,
    cases: pd.DataFrame,
    labeled_splits: pd.DataFrame,
    dedup_clusters: pd.DataFrame,
    storage: StoragePaths,
):
    kept = unlabelled.quality_kept_references(images, image_quality)
    result = unlabelled.build_unlabelled_pool(
        kept, cases, labeled_splits, dedup_clusters, include_derm_ungradable=config.include_derm_ungradable
    )
    pool, excluded = result.pool, result.excluded
    composition = unlabelled.pool_composition(pool, labeled_splits, cases)
    out_dir = storage.table_files_dir("unlabelled_pool")
    write_parquet_atomic(excluded, out_dir / "excluded.parquet")
    write_parquet_atomic(composition, out_dir / "composition.parquet")
    per_case = pool.drop_duplicates("case_id")
    excluded_cases = excluded.drop_duplicates("case_id")
    version = frame_version(pool, ["case_id", "image_id", "reason", "group_id"])
    return versioned_output(
        pool,
        version,
        metadata={
            "data_version": version,
            "cases": len(per_case),
            "images": int(pool["image_id"].nunique()),
            "cases_by_reason": MetadataValue.json(
                {str(k): int(v) for k, v in per_case["reason"].value_counts().items()}
            ),
            "cases_excluded_by": MetadataValue.json(
                {str(k): int(v) for k, v in excluded_cases["excluded_by"].value_counts().items()}
            ),
            "cases_linked_to_train_cases": int(per_case["linked_to_train"].sum()),
            "labelled_cases": int(labeled_splits["case_id"].nunique()),
            "composition_vs_labelled": metric_md(composition, rows=80),
            "preview": table_md(pool, ["case_id", "image_id", "reason", "group_id"], rows=10),
        },
    )


@asset_check(
    asset=unlabelled_pool,
    blocking=True,
    additional_ins={"labeled_splits": AssetIn("labeled_splits"), "dedup_clusters": AssetIn("dedup_clusters")},
    description="No pooled image is a labelled case's, the same file as a validation/test image, a near "
    "duplicate of one (one dedup cluster), or of a case linked to a validation/test case; re-derived from "
    "dedup_clusters, not from the pool's own columns.",
)
def unlabelled_pool_no_evaluation_leak(
    unlabelled_pool: pd.DataFrame, labeled_splits: pd.DataFrame, dedup_clusters: pd.DataFrame
) -> AssetCheckResult:
    leaks = unlabelled.pool_leaks(unlabelled_pool, labeled_splits, dedup_clusters)
    return AssetCheckResult(
        passed=leaks.empty,
        metadata={
            "leaking_rows": len(leaks),
            "by_leak": MetadataValue.json({str(k): int(v) for k, v in leaks["leak"].value_counts().items()}),
            "examples": table_md(leaks, rows=20),
        },
        description=None
        if leaks.empty
        else f"{len(leaks)} pooled image reference(s) bring validation/test into training: "
        + ", ".join(f"{k} {v}" for k, v in leaks["leak"].value_counts().items()),
    )
