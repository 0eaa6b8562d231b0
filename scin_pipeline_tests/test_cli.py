"""The scin-pipeline console script, as a user meets it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from scin_pipeline.cli import EXIT_UNREACHABLE, EXIT_USAGE, build_parser, main
from scin_pipeline.core.alerts import read_alerts
from scin_pipeline_tests.blank_forms import assert_follows_the_image, blank_form_answers
from scin_pipeline_tests.tiny_mirror import write_tiny_mirror

SCRIPT = str(Path(sys.executable).parent / "scin-pipeline")


def closed_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_run_against_an_unreachable_bucket_says_so_and_points_at_the_demo(tmp_path):
    env = {**os.environ, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{closed_loopback_port()}"}
    proc = subprocess.run(
        [SCRIPT, "run", "--data-root", str(tmp_path / "data")], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == EXIT_UNREACHABLE
    assert "cannot reach" in proc.stderr
    assert "scin-pipeline demo" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_run_checks_the_source_with_the_configured_credentials(tmp_path, capsys, monkeypatch):
    """The reachability check before a run opens the source as the run will: $SCIN_GCS_* and --set."""
    monkeypatch.delenv("SCIN_GCS_AUTH", raising=False)
    data_root = str(tmp_path / "data")
    auth = "resources.scin_source.config.auth=service_account_key"
    assert main(["run", "--source", "gcs", "--data-root", data_root, "--set", auth]) == EXIT_USAGE
    assert "needs service_account_key_file" in capsys.readouterr().err

    key = tmp_path / "absent-key.json"
    monkeypatch.setenv("SCIN_GCS_AUTH", "service_account_key")
    monkeypatch.setenv("SCIN_GCS_SERVICE_ACCOUNT_KEY", str(key))
    assert main(["run", "--source", "gcs", "--data-root", data_root]) == EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert f"service-account key file {key} not found" in err
    assert "scin-pipeline demo" not in err  # no network is not the problem: the offline hint would mislead


def test_unwritable_data_root_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["run", "--source", str(tmp_path), "--data-root", str(blocker / "data")])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "cannot write to the data root" in err and str(blocker / "data") in err


def test_run_on_a_mirror_prints_a_summary_and_writes_the_tables(tmp_path, capsys):
    mirror = write_tiny_mirror(tmp_path / "mirror")
    code = main(["run", "--source", str(mirror), "--data-root", str(tmp_path / "data"), "--select", "group:ingest"])
    out = capsys.readouterr().out
    assert code == 0  # the failed checks here are not blocking
    assert "succeeded" in out and "FAILED images:image_paths_safe" in out
    assert (tmp_path / "data" / "dagster_home" / "dagster.yaml").exists()
    assert len(pd.read_parquet(tmp_path / "data" / "tables" / "cases.parquet")) == 4
    # --strict turns a failed ERROR check into a non-zero exit.
    assert (
        main(
            [
                "run",
                "--source",
                str(mirror),
                "--data-root",
                str(tmp_path / "data"),
                "--strict",
                "--select",
                "group:ingest",
            ]
        )
        == 1
    )
    # The whole graph: one missing file of five trips the blocking quarantine gate of curation.
    assert main(["run", "--source", str(mirror), "--data-root", str(tmp_path / "data")]) == 1
    assert "quarantined_fraction_below_threshold (ERROR, blocking)" in capsys.readouterr().out


def test_limit_cases_and_select(tmp_path, capsys):
    mirror = write_tiny_mirror(tmp_path / "mirror")
    code = main(
        [
            "run",
            "--source",
            str(mirror),
            "--data-root",
            str(tmp_path / "data"),
            "--limit-cases",
            "2",
            "--select",
            "key:raw_metadata or key:cases or key:images or key:metadata_quarantine",
        ]
    )
    assert code == 0, capsys.readouterr()
    assert len(pd.read_parquet(tmp_path / "data" / "tables" / "cases.parquet")) == 2
    assert not (tmp_path / "data" / "tables" / "image_files.parquet").exists()


def test_a_blocking_check_failure_exits_non_zero_says_why_and_alerts(tmp_path, capsys):
    mirror = write_tiny_mirror(tmp_path / "mirror")
    labels = mirror / "dataset" / "scin_labels.csv"
    labels.write_text(labels.read_text().replace("weighted_skin_condition_label", "weighted", 1))
    assert main(["run", "--source", str(mirror), "--data-root", str(tmp_path / "data")]) == 1
    out = capsys.readouterr().out
    # The reason is in the summary, not only the check's name: the file and the missing column.
    failed = next(
        line for line in out.splitlines() if "FAILED raw_metadata:metadata_required_columns (ERROR, blocking)" in line
    )
    assert "scin_labels.csv" in failed and "weighted_skin_condition_label" in failed
    # A failed CLI run alerts as the failure sensor does: one line in alerts.jsonl naming the run.
    alerts = read_alerts(tmp_path / "data")
    assert len(alerts) == 1
    run_id = out.split("run ", 1)[1].split(" ", 1)[0]
    assert alerts[0]["run_id"] == run_id and alerts[0]["job"] == "full_pipeline"
    assert alerts[0]["failed_steps"] == ["raw_metadata_metadata_required_columns"]
    assert alerts[0]["tags"]["scin/entry"] == "cli"
    assert "alert: file " in out and "delivered" in out


def test_a_missing_cases_column_is_named_with_its_file(tmp_path, capsys):
    mirror = write_tiny_mirror(tmp_path / "mirror")
    cases = mirror / "dataset" / "scin_cases.csv"
    cases.write_text(cases.read_text().replace("image_1_path", "image_one_path", 1))
    assert (
        main(["run", "--source", str(mirror), "--data-root", str(tmp_path / "data"), "--select", "raw_metadata"]) == 1
    )
    out = capsys.readouterr().out
    failed = next(line for line in out.splitlines() if "FAILED raw_metadata:metadata_required_columns" in line)
    assert "scin_cases.csv" in failed and "image_1_path" in failed


def test_a_cli_run_is_a_run_of_the_named_job_and_can_be_reexecuted(tmp_path, capsys):
    from dagster import DagsterInstance, ReexecutionOptions, RunsFilter, build_reconstructable_job, execute_job

    mirror = write_tiny_mirror(tmp_path / "mirror")
    data = tmp_path / "data"
    assert main(["run", "--source", str(mirror), "--data-root", str(data)]) == 1  # the quarantine gate
    assert main(["run", "--source", str(mirror), "--data-root", str(data), "--select", "group:ingest"]) == 0
    out = capsys.readouterr().out
    # Each step reported as it went, with rows and seconds.
    assert "  started   raw_metadata" in out
    assert any(line.startswith("  finished  parsed_metadata") and "cases 4 rows" in line for line in out.splitlines())
    with DagsterInstance.from_config(str(data / "dagster_home")) as instance:
        full = instance.get_runs(RunsFilter(job_name="full_pipeline"))
        curation = instance.get_runs(RunsFilter(job_name="curation_job"))
        assert len(full) == 1 and len(curation) == 1  # the smallest named job that covers group:ingest
        run = curation[0]
        assert run.tags["scin/entry"] == "cli"
        # The run records its data root as resource config: a re-execution (what the UI's button does)
        # reconstructs the job from the code location and writes to the same place.
        assert run.run_config["resources"]["storage"]["config"]["data_root"] == str(data.resolve())
        job = build_reconstructable_job(
            "scin_pipeline.definitions", "named_job", reconstructable_args=("curation_job",)
        )
        with execute_job(
            job, instance, run_config=run.run_config, reexecution_options=ReexecutionOptions(parent_run_id=run.run_id)
        ) as again:
            assert again.success
            assert again.dagster_run.parent_run_id == run.run_id
            assert {e.asset_key.to_user_string() for e in again.get_asset_materialization_events()} >= {
                "raw_metadata",
                "cases",
                "image_files",
            }


def test_select_takes_the_comma_list_and_adds_multi_asset_siblings(tmp_path, capsys):
    mirror = write_tiny_mirror(tmp_path / "mirror")
    code = main(
        ["run", "--source", str(mirror), "--data-root", str(tmp_path / "data"), "--select", "raw_metadata,cases,images"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "also selected metadata_quarantine" in out
    assert (tmp_path / "data" / "tables" / "metadata_quarantine.parquet").exists()
    assert not (tmp_path / "data" / "tables" / "image_files.parquet").exists()


def test_a_bad_selection_is_one_line_with_an_example(tmp_path, capsys):
    mirror = write_tiny_mirror(tmp_path / "mirror")
    assert (
        main(
            [
                "run",
                "--source",
                str(mirror),
                "--data-root",
                str(tmp_path / "data"),
                "--select",
                "raw_metadata,no_such_asset",
            ]
        )
        == EXIT_USAGE
    )
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert "e.g. 'raw_metadata,cases'" in captured.err and "labeled_splits" in captured.err


def test_source_and_data_root_default_to_the_environment_else_the_documented_defaults(monkeypatch):
    # The same names and defaults as the code location (core.data_root owns them).
    monkeypatch.delenv("SCIN_SOURCE", raising=False)
    monkeypatch.delenv("SCIN_DATA_ROOT", raising=False)
    for command in ("run", "ui"):
        args = build_parser().parse_args([command])
        assert (args.source, args.data_root) == ("gcs", "data")
    monkeypatch.setenv("SCIN_SOURCE", "/srv/mirror")
    monkeypatch.setenv("SCIN_DATA_ROOT", "/srv/data")
    for command in ("run", "ui"):
        args = build_parser().parse_args([command])
        assert (args.source, args.data_root) == ("/srv/mirror", "/srv/data")
    assert build_parser().parse_args(["serve"]).data_root == "/srv/data"


def test_bad_arguments_are_usage_errors(tmp_path, capsys):
    assert main(["run", "--source", str(tmp_path), "--limit-cases", "0"]) == EXIT_USAGE
    with pytest.raises(SystemExit):
        main(["nonsense"])


def test_demo_on_synthetic_metadata_marks_everything_synthetic(tmp_path, capsys):
    out = tmp_path / "demo"
    # 40 synthetic cases hold too few labels to train on: the ingest stage only (the demo's training
    # config is dropped for the unselected ops).
    assert main(["demo", "--synthetic-metadata", "--cases", "40", "--out", str(out), "--select", "group:ingest"]) == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed
    assert "metadata: SYNTHETIC metadata (--synthetic-metadata); images: SYNTHETIC" in printed
    assert (out / "synthetic_mirror" / "SYNTHETIC_DATA.md").exists()
    report = (out / "tables" / "data_report" / "data_report.md").read_text()
    assert report.startswith("SYNTHETIC DATA")
    raw = pd.read_parquet(out / "tables" / "raw_metadata.parquet")
    assert raw["synthetic"].all()
    # A rerun with the same parameters reuses the mirror and fetches nothing.
    assert main(["demo", "--synthetic-metadata", "--cases", "40", "--out", str(out), "--select", "group:ingest"]) == 0
    assert "reusing the SYNTHETIC mirror" in capsys.readouterr().out
    assert not pd.read_parquet(out / "tables" / "image_files.parquet")["fetched"].any()
    # The synthetic metadata is not the real release: none of its case ids is a real one.
    assert not set(pd.read_parquet(out / "tables" / "cases.parquet")["case_id"]) & _bundled_case_ids()


def _bundled_case_ids() -> set[str]:
    from scin_pipeline.core import bundled_metadata

    cases = pd.read_csv(bundled_metadata.metadata_dir() / "scin_cases.csv", dtype=str, usecols=["case_id"])
    return set(cases["case_id"])


def test_demo_uses_the_bundled_real_metadata_by_default(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SCIN_METADATA_DIR", raising=False)
    out = tmp_path / "demo"
    assert main(["demo", "--cases", "20", "--out", str(out), "--select", "group:ingest"]) == 0
    printed = capsys.readouterr().out
    assert "metadata: bundled real SCIN 1.0.0 metadata; images: SYNTHETIC" in printed
    assert "NOTE: images are synthetic" in printed
    ids = set(pd.read_parquet(out / "tables" / "cases.parquet")["case_id"])
    assert len(ids) == 20 and ids <= _bundled_case_ids()
    assert "real SCIN metadata" in (out / "synthetic_mirror" / "SYNTHETIC_DATA.md").read_text()


def test_demo_metadata_and_synthetic_metadata_exclude_each_other(tmp_path):
    with pytest.raises(SystemExit):
        main(["demo", "--metadata", str(tmp_path), "--synthetic-metadata", "--out", str(tmp_path / "d")])


def test_demo_scin_metadata_dir_overrides_the_bundled_copy(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SCIN_METADATA_DIR", str(tmp_path / "absent"))
    assert main(["demo", "--cases", "5", "--out", str(tmp_path / "d")]) == EXIT_USAGE
    assert "SCIN_METADATA_DIR" in capsys.readouterr().err and not (tmp_path / "d").exists()


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
    # The demo trains every candidate on CPU, logs them to MLflow and names a champion.
    comparison = pd.read_parquet(out / "tables" / "model_comparison.parquet")
    assert set(comparison["model"]) == {
        "baseline_cnn",
        "resnet50_transfer",
        "resnet50_fixmatch",
        "efficientnet_transfer",
        "metadata_model",
        "metadata_model_self_trained",
        "multimodal",
    }
    assert comparison.set_index("model").loc["metadata_model_self_trained", "twin"] == "metadata_model"
    # Every candidate registered, with its test ECE before and after the val-fitted temperature.
    assert comparison["registered_version"].astype(str).str.fullmatch(r"\d+").all(), comparison["registered_version"]
    assert comparison[["test_ece_uncalibrated", "test_ece"]].notna().all().all()
    for name in ("unlabelled_pool", "labelling_queue"):
        assert (out / "tables" / f"{name}.parquet").exists(), name
    assert (out / "tables" / "labelling_queue" / "labelling_queue.csv").exists()
    assert comparison["champion"].fillna(False).sum() == 1
    # A blank questionnaire: the champion's answer (and the multimodal candidate's, trained with modality
    # dropout) follows the image across 10 different images, and the rule saw both validation scores.
    champion = str(comparison.loc[comparison["champion"].fillna(False).astype(bool), "model"].iloc[0])
    for model in dict.fromkeys([champion, "multimodal"]):
        assert_follows_the_image(blank_form_answers(out, model), f"demo {model} (champion: {champion})")
    assert comparison[["val_macro_f1", "val_blank_macro_f1", "val_selection_score"]].notna().all().all()
    assert (out / "mlflow" / "mlflow.db").exists()
    assert "NOT FOR DIAGNOSIS" in (out / "tables" / "model_card" / "model_card.md").read_text().upper()
    # Nothing changed: an --only-stale rerun launches no run.
    capsys.readouterr()
    assert (
        main(["demo", "--metadata", str(scin_metadata_dir), "--cases", "300", "--out", str(out), "--only-stale"]) == 0
    )
    assert "every asset up to date" in capsys.readouterr().out
