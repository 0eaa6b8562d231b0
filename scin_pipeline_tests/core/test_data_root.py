"""The data-root layout (core.data_root): every folder named once, pure paths, nothing created."""

from __future__ import annotations

from pathlib import Path

import pytest

from scin_pipeline.core.data_root import (
    DATA_ROOT_ENV,
    DEFAULT_DATA_ROOT,
    DEFAULT_SOURCE,
    METADATA_DIR_ENV,
    SOURCE_ENV,
    DataRootLayout,
    default_data_root,
    embedded_mlflow_uri,
)


def relative(layout: DataRootLayout, path: Path) -> str:
    return path.relative_to(layout.root).as_posix()


def test_every_folder_of_the_documented_layout(tmp_path):
    layout = DataRootLayout.of(tmp_path)
    assert layout.root == tmp_path
    assert {
        "tables": relative(layout, layout.tables),
        "table": relative(layout, layout.table_file("cases")),
        "partition": relative(layout, layout.table_partition_file("image_quality", "07")),
        "table files": relative(layout, layout.table_files("data_report")),
        "raw": relative(layout, layout.raw),
        "images": relative(layout, layout.images),
        "quarantine": relative(layout, layout.quarantine("image_files")),
        "cache": relative(layout, layout.cache),
        "image tensors": relative(layout, layout.image_tensors),
        "image embeddings": relative(layout, layout.image_embeddings),
        "model package": relative(layout, layout.model_package("baseline_cnn", "abc123")),
        "checkpoints": relative(layout, layout.checkpoints("baseline_cnn", "abc123")),
        "mlflow": relative(layout, layout.mlflow),
        "mlflow db": relative(layout, layout.mlflow_db),
        "mlflow artifacts": relative(layout, layout.mlflow_artifacts),
        "dagster home": relative(layout, layout.dagster_home),
        "alerts": relative(layout, layout.alerts),
        "alerts file": relative(layout, layout.alerts_file),
        "synthetic mirror": relative(layout, layout.synthetic_mirror),
        "synthetic mirror params": relative(layout, layout.synthetic_mirror_params),
    } == {
        "tables": "tables",
        "table": "tables/cases.parquet",
        "partition": "tables/image_quality/07.parquet",
        "table files": "tables/data_report",
        "raw": "raw",
        "images": "images",
        "quarantine": "quarantine/image_files",
        "cache": "cache",
        "image tensors": "cache/image_tensors",
        "image embeddings": "cache/image_embeddings",
        "model package": "models/baseline_cnn/abc123",
        "checkpoints": "checkpoints/baseline_cnn/abc123",
        "mlflow": "mlflow",
        "mlflow db": "mlflow/mlflow.db",
        "mlflow artifacts": "mlflow/artifacts",
        "dagster home": "dagster_home",
        "alerts": "alerts",
        "alerts file": "alerts/alerts.jsonl",
        "synthetic mirror": "synthetic_mirror",
        "synthetic mirror params": "synthetic_mirror.json",
    }
    assert list(tmp_path.iterdir()) == []  # paths only: nothing was created


def test_the_embedded_mlflow_uri_is_the_store_under_the_root(tmp_path):
    layout = DataRootLayout.of(tmp_path / "data")
    assert layout.mlflow_uri == f"sqlite:///{tmp_path}/data/mlflow/mlflow.db"
    assert embedded_mlflow_uri(tmp_path / "data") == layout.mlflow_uri
    assert embedded_mlflow_uri(str(tmp_path / "data")) == layout.mlflow_uri


def test_the_runner_and_the_cli_use_the_same_uri(tmp_path):
    from scin_pipeline.runner import embedded_mlflow_uri as runner_uri

    assert runner_uri(tmp_path / "data") == DataRootLayout.of(tmp_path / "data").mlflow_uri


def test_a_relative_or_home_root_is_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert DataRootLayout.of("data").root == tmp_path / "data"
    assert DataRootLayout.of("~/scin").root == tmp_path / "home" / "scin"
    assert DataRootLayout.of("data/../data2").tables == tmp_path / "data2" / "tables"


def test_the_default_root_is_the_environment_else_data(monkeypatch):
    monkeypatch.delenv("SCIN_DATA_ROOT", raising=False)
    assert default_data_root() == DEFAULT_DATA_ROOT == "data"
    monkeypatch.setenv("SCIN_DATA_ROOT", "/srv/scin")
    assert default_data_root() == "/srv/scin"


def test_the_deployments_variable_names_and_defaults_are_the_documented_ones():
    # README "Configuration", docker/compose.yaml and the docs name these; renaming one breaks deployments.
    assert (DATA_ROOT_ENV, SOURCE_ENV, METADATA_DIR_ENV) == ("SCIN_DATA_ROOT", "SCIN_SOURCE", "SCIN_METADATA_DIR")
    assert (DEFAULT_DATA_ROOT, DEFAULT_SOURCE) == ("data", "gcs")


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "..\\x", "a\x00b"])
def test_a_name_is_one_path_segment_never_a_way_out(tmp_path, bad):
    layout = DataRootLayout.of(tmp_path)
    for build in (
        lambda: layout.table_file(bad),
        lambda: layout.table_partition_file("image_quality", bad),
        lambda: layout.table_files(bad),
        lambda: layout.quarantine(bad),
        lambda: layout.model_package(bad, "k"),
        lambda: layout.model_package("baseline_cnn", bad),
        lambda: layout.checkpoints(bad, "k"),
        lambda: layout.checkpoints("baseline_cnn", bad),
    ):
        with pytest.raises(ValueError, match="one non-empty path segment"):
            build()


def test_paths_are_stored_relative_to_the_root_and_read_back_under_the_current_one(tmp_path):
    original, copy = DataRootLayout.of(tmp_path / "a"), DataRootLayout.of(tmp_path / "b")
    stored = original.relative(original.images / "123.png")
    assert stored == "images/123.png"
    assert original.relative(original.root) == "."
    # Read back under whichever root reads it: a copied root reads its own file.
    assert copy.resolve(stored) == copy.root / "images" / "123.png"
    # A table written before paths were stored relative keeps its absolute path.
    assert copy.resolve("/elsewhere/x.png") == Path("/elsewhere/x.png")
    with pytest.raises(ValueError, match="not under the data root"):
        original.relative(tmp_path / "outside.png")
    with pytest.raises(ValueError, match="leaves the data root"):
        copy.resolve("images/../../x.png")
