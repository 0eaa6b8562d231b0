"""The cases without a usable label: unlabelled_pool (what may be learnt from, with a blocking leak check) and
labelling_queue (which of them a dermatologist should label next, and why).

The rules live in scin_pipeline.core.unlabelled and core.labelling_queue; these assets feed them, store the
results and show them: the pool's composition beside the labelled set's, the queue's top cases.
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
from scin_pipeline.core.atomic import write_parquet_atomic, write_text_atomic
from scin_pipeline.core.labelling_queue import QueueConfig
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


_DEFAULT_QUEUE = QueueConfig()


class LabellingQueueConfig(Config):
    ungradable_weight: float = Field(
        default=_DEFAULT_QUEUE.ungradable_weight,
        ge=0,
        le=1,
        description="priority factor of a case the graders judged ungradable once (0: leave them out)",
    )
    no_pathology_weight: float = Field(
        default=_DEFAULT_QUEUE.no_pathology_weight,
        ge=0,
        le=1,
        description="priority factor of a case a grader saw no pathology in (0: leave them out)",
    )
    max_representation_weight: float = Field(
        default=_DEFAULT_QUEUE.max_representation_weight,
        ge=1,
        description="cap of the weight towards a Monk bin or Fitzpatrick bin the labelled set holds little of",
    )

    def rule(self) -> QueueConfig:
        return QueueConfig(
            ungradable_weight=self.ungradable_weight,
            no_pathology_weight=self.no_pathology_weight,
            max_representation_weight=self.max_representation_weight,
        )


@asset(
    group_name="evaluation",
    kinds={"pandas", "csv"},
    code_version="1",
    description="The unlabelled pool's cases ranked by how much a dermatologist's label would help: the "
    "metadata model's uncertainty (normalised entropy) weighted towards the Monk and Fitzpatrick bins the "
    "labelled set holds little of and by why the case has no label; the reason in words per case. The graders' "
    "CSV (no model guess: it would anchor them) is <data root>/tables/labelling_queue/labelling_queue.csv.",
)
def labelling_queue(
    context: AssetExecutionContext,
    config: LabellingQueueConfig,
    unlabelled_pool: pd.DataFrame,
    metadata_model: pd.DataFrame,
    labeled_splits: pd.DataFrame,
    cases: pd.DataFrame,
    storage: StoragePaths,
):
    # The supervised metadata model, not the champion: every pooled case has questionnaire answers (not every
    # one has cached pixels), and the queue need not wait for the fairness gate. Its own uncertainty, not the
    # self-trained twin's, whose confidence on the pool is what its pseudo-labels were chosen by.
    from scin_pipeline.core import fairness
    from scin_pipeline.core.labelling_queue import CSV_COLUMNS, pool_cases_table
    from scin_pipeline.core.labelling_queue import labelling_queue as rank_cases
    from scin_pipeline.core.packaged_model import PackagedClassifier

    by_case = cases.assign(case_id=cases["case_id"].astype(str))
    pool_cases = pool_cases_table(unlabelled_pool)
    pool_rows = pool_cases[["case_id"]].merge(by_case, on="case_id", how="left")
    labelled_rows = labeled_splits[["case_id"]].astype(str).drop_duplicates().merge(by_case, on="case_id", how="left")
    package = PackagedClassifier.load(storage.resolve(str(metadata_model["package_dir"].iloc[0])))  # stored relative
    proba = package.predict_proba(cases=pool_rows) if len(pool_rows) else None
    queue = rank_cases(
        pool_cases,
        proba if proba is not None else pd.DataFrame(columns=package.classes).to_numpy(float),
        list(package.classes),
        fairness.sensitive_features(pool_rows),
        fairness.sensitive_features(labelled_rows),
        config.rule(),
    )
    csv_path = storage.labelling_queue_csv
    write_text_atomic(queue[CSV_COLUMNS].to_csv(index=False), csv_path)
    version = frame_version(queue, ["case_id", "priority"])
    return versioned_output(
        queue,
        version,
        metadata={
            "data_version": version,
            "cases": len(queue),
            "pool_cases": len(pool_cases),
            "left_out_weight_0": len(pool_cases) - len(queue),
            "model": f"metadata_model (registered version {metadata_model['registered_version'].iloc[0]})",
            "csv": MetadataValue.path(storage.stored(csv_path)),
            "by_monk_us_bin_top_100": MetadataValue.json(
                {str(k): int(v) for k, v in queue.head(100)["monk_us_bin"].value_counts().items()}
            ),
            "queue": metric_md(
                queue[["rank", "case_id", "priority", "uncertainty", "monk_us_bin", "fst_bin", "status", "reason"]],
                rows=30,
            ),
        },
    )
