"""case_patterns: unsupervised structure of every case, labelled or not (the rules: core/case_patterns.py)."""

import hashlib

import numpy as np
import pandas as pd
from dagster import AssetExecutionContext, Config, MetadataValue, asset
from pydantic import Field

from scin_pipeline.assets._metadata import metric_md, table_md, versioned_output
from scin_pipeline.core.atomic import write_bytes_atomic, write_parquet_atomic, write_text_atomic
from scin_pipeline.core.rendering import png_data_uri_bytes
from scin_pipeline.resources import ScinSourceResource, StoragePaths

GROUP = "exploration"
REPORT_FILE = "case_patterns.md"


class CasePatternsConfig(Config):
    """How each view is clustered (core.case_patterns.PatternConfig; defaults are its own)."""

    k_min: int = Field(default=2, ge=2, description="smallest number of clusters tried")
    k_max: int = Field(default=10, ge=2, description="largest number of clusters tried")
    variance_kept: float = Field(default=0.8, gt=0, le=1, description="PCA keeps the fewest components with this share")
    n_bootstrap: int = Field(default=50, ge=0, description="bootstrap refits measuring stability")
    seed: int = 0


@asset(
    group_name=GROUP,
    kinds={"scikitlearn", "matplotlib"},
    code_version="1",
    description="Clusters of EVERY case, labelled or not: on the questionnaire's condition answers (k-means "
    "after PCA, k by the highest mean silhouette, stability by bootstrap adjusted Rand index) and, as a second "
    "view, on the image embeddings of the cases that have embedded images. One row per case (its clusters and "
    "2-D map position); each cluster's profile (answers, duration, age, sex, Monk tone, label composition of "
    "its labelled members), the maps and a Markdown report in the metadata and in tables/case_patterns/.",
)
def case_patterns(
    context: AssetExecutionContext,
    config: CasePatternsConfig,
    cases: pd.DataFrame,
    images: pd.DataFrame,
    image_embeddings: pd.DataFrame,
    storage: StoragePaths,
    scin_source: ScinSourceResource,
):
    from scin_pipeline.core import case_patterns as core

    if config.k_max < config.k_min:
        raise ValueError(f"case_patterns: k_max ({config.k_max}) must be >= k_min ({config.k_min})")
    pattern_config = core.PatternConfig(
        k_min=config.k_min,
        k_max=config.k_max,
        variance_kept=config.variance_kept,
        n_bootstrap=config.n_bootstrap,
        seed=config.seed,
    )
    embeddings, image_rows = None, None
    if len(image_embeddings):
        embeddings = np.load(storage.resolve(str(image_embeddings["embeddings_file"].iloc[0])), mmap_mode="r")
        image_rows = images[["image_id", "case_id"]].merge(image_embeddings[["image_id", "row"]], on="image_id")
    patterns = core.find_case_patterns(cases, pattern_config, embeddings=embeddings, image_rows=image_rows)
    synthetic = scin_source.is_synthetic()

    out_dir = storage.table_files_dir("case_patterns")
    note = " (SYNTHETIC images)" if synthetic else ""
    maps = core.map_pngs(patterns, title_note=note)
    for name, png in maps.items():
        write_bytes_atomic(png, out_dir / f"{name}.png")
    summary = patterns.summary()
    selection = pd.concat(
        [view.selection.assign(view=name) for name, view in patterns.views.items() if not view.selection.empty]
        or [pd.DataFrame(columns=["view", "k", "silhouette", "inertia", "smallest_cluster"])],
        ignore_index=True,
    )
    write_parquet_atomic(patterns.profiles, out_dir / "profiles.parquet")
    write_parquet_atomic(summary, out_dir / "summary.parquet")
    write_parquet_atomic(selection, out_dir / "k_selection.parquet")
    intro = "Produced by the `case_patterns` asset."
    markdown = core.patterns_markdown(
        patterns, intro=intro, synthetic_images=synthetic, plots={name: f"{name}.png" for name in maps}
    )
    write_text_atomic(markdown, out_dir / REPORT_FILE)
    inline = core.patterns_markdown(
        patterns,
        intro=intro,
        synthetic_images=synthetic,
        plots={name: png_data_uri_bytes(png) for name, png in maps.items()},
    )

    table = patterns.assignments
    version = hashlib.sha256(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes()).hexdigest()[:16]
    metadata = {
        "data_version": version,
        "cases": len(table),
        "labelled_cases": int(table["has_label"].sum()),
        "no_answers": int((table["questionnaire_cluster"] == core.NO_ANSWERS).sum()),
        "cases_with_images": int(table["has_images"].sum()),
        "summary": metric_md(summary),
        "cross_view_ari": float(patterns.cross_view_ari) if np.isfinite(patterns.cross_view_ari) else "n/a",
        "report": MetadataValue.md(inline),
        "report_path": MetadataValue.path(storage.stored(out_dir / REPORT_FILE)),
        "clusters": table_md(
            table.groupby("questionnaire_cluster", dropna=True).size().rename("cases").reset_index(), rows=20
        ),
    }
    for name, png in maps.items():
        metadata[f"map_{name}"] = MetadataValue.md(f"![{name}]({png_data_uri_bytes(png)})")
    if synthetic:
        metadata["note"] = core.SYNTHETIC_IMAGES_NOTE
    context.log.info("case_patterns: " + "; ".join(f"{r.view} k={r.k} ({r.status})" for r in summary.itertuples()))
    return versioned_output(table, version, metadata=metadata)
