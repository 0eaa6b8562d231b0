"""core.alerts: the alert text, the sinks chosen by the environment, delivery that never raises."""

from __future__ import annotations

import json

import pytest

from scin_pipeline.core.alerts import (
    Alert,
    AlertDeliveryError,
    JsonLinesAlertSink,
    WebhookAlertSink,
    alert_sinks_from_env,
    deliver,
    format_alert_text,
    read_alerts,
    run_link,
    shorten,
    webhook_payload,
)

ALERT = Alert(
    kind="run_failure",
    job="full_pipeline",
    run_id="r-123",
    failed_steps=["image_files", "cases"],
    error="SourceUnreachable: cannot reach gs://dx-scin-public-data: DNS lookup failed",
    time="2026-01-12T03:04:05+00:00",
    link="/runs/r-123",
)


def test_text_names_job_run_steps_error_and_link():
    text = format_alert_text(ALERT)
    for part in ("full_pipeline", "r-123", "image_files, cases", "DNS lookup failed", "/runs/r-123"):
        assert part in text
    assert "FAILED" in text.splitlines()[0]
    no_steps = format_alert_text(Alert(**{**ALERT.to_dict(), "failed_steps": []}))
    assert "outside a step" in no_steps


def test_webhook_payload_is_slack_shaped_and_carries_the_record():
    payload = webhook_payload(ALERT)
    assert payload["text"] == format_alert_text(ALERT)
    assert payload["alert"] == ALERT.to_dict()
    json.dumps(payload)  # serialisable as is


def test_run_link_and_shorten():
    assert run_link("abc") == "/runs/abc"
    assert run_link("abc", "https://dagster.example/") == "https://dagster.example/runs/abc"
    assert shorten("x" * 5000).endswith("...") and len(shorten("x" * 5000)) == 2000
    assert shorten("  short  ") == "short"


def test_sinks_from_env(tmp_path):
    [file_sink] = alert_sinks_from_env(tmp_path, env={})
    assert isinstance(file_sink, JsonLinesAlertSink)
    assert file_sink.path == tmp_path / "alerts" / "alerts.jsonl"
    sinks = alert_sinks_from_env(
        tmp_path,
        env={
            "SCIN_ALERT_WEBHOOK_URL": "https://hooks.slack.com/services/T/B/secret",
            "SCIN_ALERT_WEBHOOK_TIMEOUT_S": "3",
        },
    )
    webhook = sinks[1]
    assert isinstance(webhook, WebhookAlertSink) and webhook.timeout_s == 3
    assert "secret" not in webhook.name  # the URL's path is a credential: never in a log line


def test_a_misconfigured_webhook_is_reported_by_delivery_not_raised(tmp_path):
    sinks = alert_sinks_from_env(tmp_path, env={"SCIN_ALERT_WEBHOOK_URL": "file:///etc/passwd"})
    outcomes = deliver(ALERT, sinks)
    assert [o.ok for o in outcomes] == [True, False]
    assert "http(s) URL" in outcomes[1].detail
    assert read_alerts(tmp_path) == [ALERT.to_dict()]


def test_file_sink_appends_and_an_unwritable_one_fails_only_itself(tmp_path):
    sink = JsonLinesAlertSink(tmp_path / "alerts" / "alerts.jsonl")
    sink.send(ALERT)
    sink.send(ALERT)
    assert read_alerts(tmp_path) == [ALERT.to_dict()] * 2
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    broken = JsonLinesAlertSink(blocker / "alerts.jsonl")
    with pytest.raises(AlertDeliveryError, match="blocker"):
        broken.send(ALERT)
    outcomes = deliver(ALERT, [broken, sink])
    assert [o.ok for o in outcomes] == [False, True]
    assert len(read_alerts(tmp_path)) == 3
