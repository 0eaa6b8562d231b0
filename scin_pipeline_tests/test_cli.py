"""The scin-pipeline console script, as a user meets it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from scin_pipeline.cli import EXIT_UNREACHABLE, EXIT_USAGE, main
from scin_pipeline_tests.tiny_mirror import write_tiny_mirror

SCRIPT = str(Path(sys.executable).parent / "scin-pipeline")


def closed_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_run_against_an_unreachable_bucket_says_so_and_points_at_the_demo(tmp_path):
    env = {**os.environ, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{closed_loopback_port()}"}
    proc = subprocess.run([SCRIPT, "run", "--data-root", str(tmp_path / "data")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_UNREACHABLE
    assert "cannot reach" in proc.stderr
    assert "scin-pipeline demo" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_unwritable_data_root_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["run", "--source", str(tmp_path), "--data-root", str(blocker / "data")])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "cannot write to the data root" in err and str(blocker / "data") in err


def test_run_on_a_mirror_prints_a_summary_and_writes_the_tables(tmp_path, capsys):
    mirror = write_tiny_mirror(tmp_path / "mirror")
    code = main(["run", "--source", str(mirror), "--data-root", str(tmp_path / "data"),
                 "--select", "group:ingest"])
    out = capsys.readouterr().out
    assert code == 0  # the failed checks here are not blocking
    assert "succeeded" in out and "FAILED images:image_paths_safe" in out
    assert (tmp_path / "data" / "dagster_home" / "dagster.yaml").exists()
    assert len(pd.read_parquet(tmp_path / "data" / "tables" / "cases.parquet")) == 4
    # --strict turns a failed ERROR check into a non-zero exit.
    assert main(["run", "--source", str(mirror), "--data-root", str(tmp_path / "data"), "--strict",
                 "--select", "group:ingest"]) == 1
    # The whole graph: one missing file of five trips the blocking quarantine gate of curation.
    assert main(["run", "--source", str(mirror), "--data-root", str(tmp_path / "data")]) == 1
    assert "quarantined_fraction_below_threshold (ERROR, blocking)" in capsys.readouterr().out


def test_limit_cases_and_select(tmp_path, capsys):
    mirror = write_tiny_mirror(tmp_path / "mirror")
    code = main(["run", "--source", str(mirror), "--data-root", str(tmp_path / "data"),
                 "--limit-cases", "2", "--select",
                 "key:raw_metadata or key:cases or key:images or key:metadata_quarantine"])
    assert code == 0, capsys.readouterr()
    assert len(pd.read_parquet(tmp_path / "data" / "tables" / "cases.parquet")) == 2
    assert not (tmp_path / "data" / "tables" / "image_files.parquet").exists()


def test_a_blocking_check_failure_exits_non_zero(tmp_path, capsys):
    mirror = write_tiny_mirror(tmp_path / "mirror")
    labels = mirror / "dataset" / "scin_labels.csv"
    labels.write_text(labels.read_text().replace("weighted_skin_condition_label", "weighted", 1))
    assert main(["run", "--source", str(mirror), "--data-root", str(tmp_path / "data")]) == 1
    out = capsys.readouterr().out
    assert "FAILED raw_metadata:metadata_required_columns (ERROR, blocking)" in out


def test_bad_arguments_are_usage_errors(tmp_path, capsys):
    assert main(["run", "--source", str(tmp_path), "--limit-cases", "0"]) == EXIT_USAGE
    with pytest.raises(SystemExit):
        main(["nonsense"])


def test_demo_on_synthetic_metadata_marks_everything_synthetic(tmp_path, capsys):
    out = tmp_path / "demo"
    # 40 synthetic cases hold too few labels to train on: the ingest stage only (the demo's training
    # config is dropped for the unselected ops).
    assert main(["demo", "--cases", "40", "--out", str(out), "--select", "group:ingest"]) == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed
    assert (out / "synthetic_mirror" / "SYNTHETIC_DATA.md").exists()
    report = (out / "tables" / "data_report" / "data_report.md").read_text()
    assert report.startswith("SYNTHETIC DATA")
    raw = pd.read_parquet(out / "tables" / "raw_metadata.parquet")
    assert raw["synthetic"].all()
    # A rerun with the same parameters reuses the mirror and fetches nothing.
    assert main(["demo", "--cases", "40", "--out", str(out), "--select", "group:ingest"]) == 0
    assert "reusing the SYNTHETIC mirror" in capsys.readouterr().out
    assert not pd.read_parquet(out / "tables" / "image_files.parquet")["fetched"].any()


@pytest.mark.real_metadata
@pytest.mark.slow
def test_demo_on_real_metadata_300_cases(scin_metadata_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--metadata", str(scin_metadata_dir), "--cases", "300", "--out", str(out)]) == 0
    for name in ("raw_metadata", "cases", "images", "metadata_quarantine", "image_files", "data_report"):
        assert (out / "tables" / f"{name}.parquet").exists(), name
    cases = pd.read_parquet(out / "tables" / "cases.parquet")
    assert len(cases) == 300
    files = pd.read_parquet(out / "tables" / "image_files.parquet")
    plants = pd.read_csv(out / "synthetic_mirror" / "synthetic_plants.csv", dtype=str)
    missing_planted = set(plants.loc[plants["planted"] == "missing", "image_id"])
    assert missing_planted and missing_planted <= set(files.loc[files["status"] == "missing", "image_id"])
    # The demo trains all four candidates on CPU, logs them to MLflow and names a champion.
    comparison = pd.read_parquet(out / "tables" / "model_comparison.parquet")
    assert set(comparison["model"]) == {"baseline_cnn", "resnet50_transfer", "metadata_model", "multimodal"}
    assert comparison["champion"].fillna(False).sum() == 1
    assert (out / "mlflow" / "mlflow.db").exists()
    assert "NOT FOR DIAGNOSIS" in (out / "tables" / "model_card" / "model_card.md").read_text().upper()
    # Nothing changed: an --only-stale rerun launches no run.
    capsys.readouterr()
    assert main(["demo", "--metadata", str(scin_metadata_dir), "--cases", "300", "--out", str(out),
                 "--only-stale"]) == 0
    assert "every asset up to date" in capsys.readouterr().out
