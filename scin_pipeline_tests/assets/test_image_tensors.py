"""One decode per image, end to end: the quality stage writes the training tensors, image_tensors indexes them.

A SYNTHETIC mirror goes through ingest, curation and image_tensors in-process (the runner, as the CLI does),
with the decoder instrumented (``SCIN_PIPELINE_DECODE_LOG``: one line per pixel decode, worker processes
included). No figure here says anything about skin.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scin_pipeline.core.data_root import DataRootLayout
from scin_pipeline.core.image_cache import load_images, preprocess_image_file
from scin_pipeline.core.imageio import DECODE_LOG_ENV
from scin_pipeline.core.synthetic.mirror import write_synthetic_mirror
from scin_pipeline.runner import run_pipeline

S = 48
UPTO_TENSORS = "group:ingest or group:curation or key:image_tensors"
RUN_CONFIG = {
    "ops": {
        "image_quality": {"config": {"tensor_sizes": [S], "tensor_shard_size": 16}},
        "quality_filtered_index": {"config": {"max_quarantined_fraction": 0.3}},
        # Rare conditions dropped: their cases are kept by quality but in no split (images without a label)
        "labeled_splits": {"config": {"min_cases_per_class": 6, "rare_classes": "drop"}},
    }
}


@pytest.fixture(scope="module")
def tensors_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tensors")
    # 200 x 160 px: above the too_small bar (160 px long side); 15 % planted defects, so some images are excluded
    mirror = write_synthetic_mirror(root / "mirror", n_cases=70, seed=11, image_size=(200, 160), defect_rate=0.15)
    data_root = root / "data"
    log = root / "decodes.log"
    with pytest.MonkeyPatch.context() as env:  # the decode log only for this run
        env.setenv(DECODE_LOG_ENV, str(log))
        summary = run_pipeline(
            data_root=data_root,
            source=str(mirror.root),
            log_level="WARNING",
            run_config=RUN_CONFIG,
            select=UPTO_TENSORS,
        )
    assert summary.success, summary.render()
    logged = [line.split("\t", 1)[1] for line in log.read_text().splitlines()] if log.exists() else []
    decodes = Counter(os.path.realpath(p) for p in logged)
    return data_root, mirror, decodes


def decode_count(decodes: Counter, data_root: Path, stored_path: str) -> int:
    """How often the file a table names was decoded: tables store paths relative to the data root."""
    return decodes[os.path.realpath(DataRootLayout.of(data_root).resolve(stored_path))]


def table(data_root: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(data_root / "tables" / f"{name}.parquet")


def test_every_kept_image_is_decoded_exactly_once_by_the_whole_pipeline(tensors_run):
    data_root, _mirror, decodes = tensors_run
    quality = pd.read_parquet(data_root / "tables" / "image_quality")
    kept = quality[quality["keep"]]
    assert len(kept) >= 50
    # Decoded once for metrics, hashes and the tensor together; image_tensors decodes nothing.
    assert [decode_count(decodes, data_root, p) for p in kept["local_path"]] == [1] * len(kept)
    # Excluded images: once by the quality stage, plus at most the contact sheet's thumbnail (<= 6 per reason).
    excluded = quality[~quality["keep"] & quality["decode_status"].eq("ok")]
    assert len(excluded) and all(decode_count(decodes, data_root, p) in (1, 2) for p in excluded["local_path"])
    per_reason = excluded.groupby("reason")["local_path"].apply(
        lambda paths: sum(decode_count(decodes, data_root, p) - 1 for p in paths)
    )
    assert (per_reason <= 6).all()


def test_image_tensors_covers_every_kept_image_labelled_or_not_bit_identical_to_the_old_path(tensors_run):
    data_root, _mirror, _decodes = tensors_run
    index = table(data_root, "image_tensors")
    quality = pd.read_parquet(data_root / "tables" / "image_quality")
    kept_ids = set(quality.loc[quality["keep"], "image_id"])
    labelled_ids = set(table(data_root, "labeled_splits")["image_id"])
    assert "split" not in index.columns  # consumers join on image_id
    assert set(index["image_id"]) == kept_ids and index["image_id"].is_unique
    # every image the consumers may ask for: the gradable kept ones, the unlabelled pool (ungradable included)
    assert set(table(data_root, "quality_filtered_index")["image_id"]) <= kept_ids
    pool_ids = set(table(data_root, "unlabelled_pool")["image_id"])
    assert pool_ids and pool_ids <= kept_ids
    assert kept_ids - labelled_ids, "the mirror must have kept images outside the splits (unlabelled)"
    assert (index["status"] == "ok").all() and (index["image_size"] == S).all()
    images = load_images(index, data_root / "cache" / "image_tensors")
    layout = DataRootLayout.of(data_root)
    paths = table(data_root, "image_files").set_index("image_id")["local_path"]
    for k, image_id in enumerate(index["image_id"]):
        # the separate decode + resize that image_tensors did before (core.image_cache.preprocess_image_file)
        assert np.array_equal(images[k], preprocess_image_file(layout.resolve(paths[image_id]), S)), image_id


def test_excluded_images_are_not_cached_and_shards_hold_one_partition_each(tensors_run):
    data_root, _mirror, _decodes = tensors_run
    quality = pd.read_parquet(data_root / "tables" / "image_quality")
    assert (quality.loc[~quality["keep"], "tensor_status"] == "excluded").all()
    assert quality.loc[~quality["keep"], "tensor_shard"].isna().all()
    cached = quality[quality["tensor_status"] == "ok"]
    assert set(cached["image_id"]) == set(quality.loc[quality["keep"], "image_id"])
    folder = data_root / "cache" / "image_tensors" / f"{S}px"
    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted(cached["tensor_shard"].unique())  # no spool, no temp file, nothing stale
    assert sum(np.load(folder / f, mmap_mode="r").shape[0] for f in files) == len(cached)
    for shard, group in cached.groupby("tensor_shard"):
        assert shard.startswith(f"q{group['shard'].iloc[0]}-") and group["shard"].nunique() == 1
        assert sorted(group["tensor_offset"]) == list(range(len(group)))


def test_rerun_of_the_quality_stage_keeps_shards_and_index(tensors_run, tmp_path):
    data_root, mirror, _decodes = tensors_run
    folder = data_root / "cache" / "image_tensors" / f"{S}px"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    index_before = table(data_root, "image_tensors")
    # A changed threshold re-runs the quality stage (it decodes again for its metrics) and the index.
    config = {
        "ops": {
            **RUN_CONFIG["ops"],
            "image_quality": {
                "config": {**RUN_CONFIG["ops"]["image_quality"]["config"], "workers": 1, "blurry_sharpness_min": 2.9}
            },
        }
    }
    summary = run_pipeline(
        data_root=data_root,
        source=str(mirror.root),
        log_level="WARNING",
        run_config=config,
        select="key:image_quality or key:quality_filtered_index or key:image_tensors",
    )
    assert summary.success, summary.render()
    after = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert after == before  # same kept images: every shard found under its name, none rewritten
    pd.testing.assert_frame_equal(table(data_root, "image_tensors"), index_before)


def test_asking_for_a_size_the_quality_stage_did_not_cache_fails_naming_the_setting(tensors_run):
    data_root, mirror, _decodes = tensors_run
    summary = run_pipeline(
        data_root=data_root,
        source=str(mirror.root),
        log_level="WARNING",
        run_config={"ops": {"image_tensors": {"config": {"image_size": 96}}}},
        select="key:image_tensors",
    )
    assert not summary.success
    (failure,) = summary.failures
    assert "no 96 px training tensors (cached: 48 px)" in failure and "image_quality.tensor_sizes=[96]" in failure
