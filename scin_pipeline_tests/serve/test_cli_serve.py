"""``scin-pipeline serve``'s start-up errors, in-process (the running server is covered by test_browser and
test_load, which start it as a subprocess)."""

from __future__ import annotations

from scin_pipeline.cli import EXIT_FAILED, EXIT_USAGE, build_parser, main


def test_serve_defaults_to_the_champion_on_loopback():
    args = build_parser().parse_args(["serve"])
    assert (args.model, args.host, args.port) == ("models:/scin-condition-classifier@champion", "127.0.0.1", 8000)
    assert args.store_uploads is None


def test_serve_without_a_trained_data_root_says_run_the_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["serve", "--data-root", str(tmp_path / "empty")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "no MLflow store" in err and "scin-pipeline demo" in err
    assert not (tmp_path / "empty").exists()  # nothing created


def test_serve_with_an_unknown_model_fails_with_one_line(registry, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = main(["serve", "--data-root", str(registry.data_root), "--model", "models:/not-a-model@champion"])
    assert code == EXIT_FAILED
    err = capsys.readouterr().err.strip()
    assert err.startswith("scin-pipeline: ") and "no model named 'not-a-model'" in err and "\n" not in err


def test_serve_rejects_a_bad_port(tmp_path, capsys):
    assert main(["serve", "--data-root", str(tmp_path), "--port", "0"]) == EXIT_USAGE
    assert "--port" in capsys.readouterr().err


def test_serve_follows_the_alias_every_few_seconds_by_default(tmp_path, capsys):
    assert build_parser().parse_args(["serve"]).alias_poll_s == 5.0
    assert build_parser().parse_args(["serve", "--alias-poll-s", "0"]).alias_poll_s == 0.0
    assert main(["serve", "--data-root", str(tmp_path), "--alias-poll-s", "-1"]) == EXIT_USAGE
    assert "--alias-poll-s" in capsys.readouterr().err
