"""The ingestion graph run in-process with dagster.materialize() on temporary folders."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from dagster import AssetKey, AssetSelection, DagsterInstance, materialize

from scin_pipeline.assets import ALL_ASSET_CHECKS, ALL_ASSETS
from scin_pipeline.assets.report import DAGSTER_INLINE_MARKDOWN_CHARS
from scin_pipeline.definitions import build_resources
from scin_pipeline_tests.tiny_mirror import MISSING_IMAGE, TRAVERSAL, write_tiny_mirror

INGEST = AssetSelection.groups("ingest")


def run_graph(mirror: Path, data_root: Path, instance: DagsterInstance, selection=INGEST):
    """The ingest group on the tiny mirror (its one missing file of five would, rightly, trip the
    curation quarantine gate; curation is tested on synthetic mirrors in test_curation_assets)."""
    return materialize(
        [*ALL_ASSETS, *ALL_ASSET_CHECKS],
        instance=instance,
        resources=build_resources(data_root=str(data_root), source=str(mirror)),
        selection=selection,
        raise_on_error=False,
    )


def check_results(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


@pytest.fixture
def tiny_run(tmp_path):
    mirror = write_tiny_mirror(tmp_path / "mirror")
    data_root = tmp_path / "data"
    instance = DagsterInstance.ephemeral()
    result = run_graph(mirror, data_root, instance)
    return mirror, data_root, instance, result


def test_graph_materialises_every_table_at_its_documented_place(tiny_run):
    _mirror, data_root, _instance, result = tiny_run
    assert result.success
    for name in ("raw_metadata", "cases", "images", "metadata_quarantine", "image_files", "data_report"):
        assert (data_root / "tables" / f"{name}.parquet").exists(), name
    cases = pd.read_parquet(data_root / "tables" / "cases.parquet")
    assert cases["case_id"].tolist() == ["101", "102", "103", "104"]
    assert cases["case_id"].dtype == "string"
    assert cases.set_index("case_id").loc["102", "monk_skin_tone_label_us"] == 8
    raw = pd.read_parquet(data_root / "tables" / "raw_metadata.parquet")
    assert set(raw["file_name"]) == {"scin_cases.csv", "scin_labels.csv"}
    for row in raw.itertuples():  # verbatim copies, content-addressed
        # Stored relative to the data root (a copied root reads its own copy).
        assert row.local_path == f"raw/{row.sha256}/{row.file_name}"
        assert (data_root / row.local_path).read_bytes() == (_mirror / "dataset" / row.file_name).read_bytes()
    assert (data_root / "tables" / "data_report" / "data_report.md").exists()
    assert list((data_root / "tables" / "data_report").glob("*.png"))
    # The report's metadata opens with its headline numbers, short enough to be shown in place.
    report_metadata = result.asset_materializations_for_node("data_report")[0].metadata
    assert next(iter(report_metadata)) == "headline"
    headline = report_metadata["headline"].value
    assert "- cases: 4" in headline and len(headline) < DAGSTER_INLINE_MARKDOWN_CHARS


def test_image_files_statuses_and_verified_copies(tiny_run):
    mirror, data_root, _instance, _result = tiny_run
    files = pd.read_parquet(data_root / "tables" / "image_files.parquet").set_index("object_path")
    # 3.png is referenced by two cases and fetched once.
    assert sorted(files.index) == sorted([f"dataset/images/{i}.png" for i in (1, 2, 3, 4, 5)] + [TRAVERSAL])
    assert files.loc[MISSING_IMAGE, "status"] == "missing"
    assert files.loc[TRAVERSAL, "status"] == "rejected"
    assert "traversal" in files.loc[TRAVERSAL, "reason"]
    for image_id in ("1", "2", "3", "4"):
        row = files.loc[f"dataset/images/{image_id}.png"]
        assert row["status"] == "ok"
        assert row["local_path"] == f"images/{image_id}.png"  # relative to the data root
        local = data_root / row["local_path"]
        assert local.read_bytes() == (mirror / "dataset" / "images" / f"{image_id}.png").read_bytes()
        assert row["bytes"] == local.stat().st_size


def test_checks_turn_red_on_the_planted_problems_and_green_elsewhere(tiny_run):
    _mirror, _data_root, _instance, result = tiny_run
    checks = check_results(result)
    assert checks["image_paths_safe"] is False  # the traversal reference
    assert checks["image_files_verified"] is False  # 5.png is missing
    assert checks["case_id_unique"] is True
    assert checks["labels_reference_known_cases"] is True
    assert checks["label_literals_parse"] is True
    assert checks["metadata_required_columns"] is True


def test_second_run_fetches_nothing_and_changes_no_table(tiny_run):
    mirror, data_root, instance, _result = tiny_run
    before = {
        p.name: p.read_bytes()
        for p in (data_root / "tables").glob("*.parquet")
        if p.name not in ("image_files.parquet",)
    }
    again = run_graph(mirror, data_root, instance)
    assert again.success
    files = pd.read_parquet(data_root / "tables" / "image_files.parquet")
    assert not files["fetched"].any()
    mat = [e for e in again.get_asset_materialization_events() if e.asset_key == AssetKey("image_files")][0]
    assert mat.event_specific_data.materialization.metadata["fetched_now"].value == 0
    for name in ("cases.parquet", "images.parquet", "raw_metadata.parquet"):
        assert pd.read_parquet(data_root / "tables" / name).equals(
            pd.read_parquet(__import__("io").BytesIO(before[name]))
        )


def test_missing_required_column_blocks_everything_downstream(tmp_path):
    mirror = write_tiny_mirror(tmp_path / "mirror")
    cases_csv = mirror / "dataset" / "scin_cases.csv"
    cases_csv.write_text(cases_csv.read_text().replace("sex_at_birth", "sex", 1))
    result = run_graph(mirror, tmp_path / "data", DagsterInstance.ephemeral())
    assert not result.success
    assert check_results(result)["metadata_required_columns"] is False
    materialised = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialised == {"raw_metadata"}


def test_selection_materialises_only_the_selected_assets(tmp_path):
    mirror = write_tiny_mirror(tmp_path / "mirror")
    result = run_graph(
        mirror,
        tmp_path / "data",
        DagsterInstance.ephemeral(),
        selection=["raw_metadata", "cases", "images", "metadata_quarantine"],
    )
    assert result.success
    assert not (tmp_path / "data" / "tables" / "image_files.parquet").exists()
    assert (tmp_path / "data" / "tables" / "cases.parquet").exists()


def test_graph_on_the_gcs_path_through_the_emulator(gcs_emulator, tmp_path):
    """The real GCS code path (anonymous client, STORAGE_EMULATOR_HOST) end to end."""
    mirror = write_tiny_mirror(tmp_path / "mirror")
    for path in sorted(p for p in mirror.rglob("*") if p.is_file()):
        gcs_emulator.upload(path.relative_to(mirror).as_posix(), path.read_bytes())
    # 4.png's stored bytes no longer match the checksum the listing reports.
    gcs_emulator.corrupt("dataset/images/4.png")
    data_root = tmp_path / "data"
    instance = DagsterInstance.ephemeral()
    result = materialize(
        [*ALL_ASSETS, *ALL_ASSET_CHECKS],
        instance=instance,
        selection=INGEST,
        resources=build_resources(data_root=str(data_root), source="gcs"),
    )
    assert result.success
    files = pd.read_parquet(data_root / "tables" / "image_files.parquet").set_index("object_path")
    assert files.loc["dataset/images/1.png", "status"] == "ok"
    assert (data_root / files.loc["dataset/images/1.png", "local_path"]).read_bytes() == (
        mirror / "dataset" / "images" / "1.png"
    ).read_bytes()
    assert files.loc[MISSING_IMAGE, "status"] == "missing"
    assert files.loc["dataset/images/4.png", "status"] == "corrupt"
    assert "crc32c" in files.loc["dataset/images/4.png", "reason"]
    assert not (data_root / "images" / "4.png").exists()
    assert list((data_root / "quarantine" / "image_files").glob("4.png*"))
    raw = pd.read_parquet(data_root / "tables" / "raw_metadata.parquet")
    assert raw["source_uri"].iloc[0] == "gs://dx-scin-public-data"
    assert raw["generation"].notna().all() and raw["crc32c"].notna().all()
    verified = [f"dataset/images/{i}.png" for i in (1, 2, 3)]
    downloads_before = {path: gcs_emulator.downloads(path) for path in verified}
    again = materialize(
        [*ALL_ASSETS, *ALL_ASSET_CHECKS],
        instance=instance,
        resources=build_resources(data_root=str(data_root), source="gcs"),
        selection=["image_files"],
    )
    assert again.success
    files = pd.read_parquet(data_root / "tables" / "image_files.parquet")
    ok = files[files["status"] == "ok"]
    assert len(ok) == 3 and not ok["fetched"].any()
    assert {path: gcs_emulator.downloads(path) for path in verified} == downloads_before
