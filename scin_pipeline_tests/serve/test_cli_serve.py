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


def test_the_limit_options_default_to_the_documented_limits():
    import argparse

    import pytest

    from scin_pipeline.serve.limits import ServeLimits, add_limit_arguments, limits_from_args

    parser = argparse.ArgumentParser()
    add_limit_arguments(parser)
    limits = limits_from_args(parser.parse_args([]))
    assert limits == ServeLimits()
    assert (limits.max_upload_bytes, limits.max_pixels) == (10 * 2**20, 25_000_000)
    assert limits.max_concurrent_predictions == 2
    assert (limits.header_timeout_s, limits.body_timeout_s, limits.keep_alive_s) == (10.0, 30.0, 5)
    assert (limits.queue_timeout_s, limits.limit_concurrency) == (10.0, 32)
    assert (limits.max_batch_size, limits.max_batch_wait_ms, limits.max_queued_predictions) == (8, 5.0, 32)
    custom = limits_from_args(parser.parse_args(["--max-megapixels", "12.5", "--body-timeout-s", "60"]))
    assert (custom.max_pixels, custom.body_timeout_s) == (12_500_000, 60.0)
    batching = limits_from_args(
        parser.parse_args(["--max-batch-size", "4", "--max-batch-wait-ms", "0", "--max-queued-predictions", "2"])
    )
    assert (batching.max_batch_size, batching.max_batch_wait_ms, batching.max_queued_predictions) == (4, 0.0, 2)
    assert batching.app_options()["max_batch_size"] == 4
    for bad, fragment in [
        (["--max-megapixels", "0"], "--max-megapixels"),
        (["--limit-concurrency", "2"], "limit_concurrency"),
        (["--header-timeout-s", "0"], "header_timeout_s"),
        (["--queue-timeout-s", "-1"], "queue_timeout_s"),
        (["--max-batch-size", "0"], "max_batch_size"),
        (["--max-batch-wait-ms", "-1"], "max_batch_wait_ms"),
        (["--max-queued-predictions", "0"], "max_queued_predictions"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            limits_from_args(parser.parse_args(bad))


def test_serve_takes_the_limit_options(tmp_path, capsys):
    args = build_parser().parse_args(["serve"])
    assert (args.max_upload_mb, args.max_megapixels, args.max_concurrent_predictions) == (10.0, 25.0, 2)
    assert (args.header_timeout_s, args.body_timeout_s, args.limit_concurrency) == (10.0, 30.0, 32)
    assert main(["serve", "--data-root", str(tmp_path), "--max-megapixels", "0"]) == EXIT_USAGE
    assert "--max-megapixels" in capsys.readouterr().err
    assert main(["serve", "--data-root", str(tmp_path), "--body-timeout-s", "0"]) == EXIT_USAGE
    assert "body_timeout_s" in capsys.readouterr().err
    assert not (tmp_path / "mlflow").exists()
