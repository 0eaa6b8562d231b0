"""Run-failure alerts: what an alert says and where it goes, with no Dagster in sight.

An :class:`Alert` is a plain record (job, run id, failed steps, the root error, when, a link). It is
delivered to every configured :class:`AlertSink`:

- :class:`JsonLinesAlertSink` always: one JSON line appended to ``<data_root>/alerts/alerts.jsonl``, so
  an alert is never lost even when nothing else is configured, and a deployment can tail the file.
- :class:`WebhookAlertSink` when ``SCIN_ALERT_WEBHOOK_URL`` is set: an HTTP POST of JSON whose ``text``
  field is what a Slack incoming webhook shows (Mattermost, Teams workflows and most e-mail relays such
  as a Zapier/SES/Mailgun hook accept the same shape); the full alert rides along under ``alert``.

Delivery never raises (:func:`deliver`): an alerting path that can crash the thing reporting a failure
would hide the first failure behind a second one. Each sink's outcome comes back for logging instead.
The webhook is posted with the standard library (urllib) because one JSON POST with a timeout needs
nothing more, and the URL (a secret for Slack) is never written to a log, only its host.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from scin_pipeline.core.data_root import DataRootLayout

WEBHOOK_URL_ENV = "SCIN_ALERT_WEBHOOK_URL"
WEBHOOK_TIMEOUT_ENV = "SCIN_ALERT_WEBHOOK_TIMEOUT_S"
# Base URL of the Dagster webserver, so that alert links are clickable (else the link is a path).
DAGSTER_URL_ENV = "SCIN_DAGSTER_URL"
DEFAULT_WEBHOOK_TIMEOUT_S = 10.0
_MAX_ERROR_CHARS = 2000  # a Slack message holds ~40k characters; a stack dump is not an alert


@dataclass(frozen=True)
class Alert:
    kind: str  # "run_failure"
    job: str
    run_id: str
    failed_steps: list[str]
    error: str  # the root cause, one or a few lines
    time: str  # ISO 8601, UTC
    link: str  # "/runs/<run_id>" or a full URL when SCIN_DAGSTER_URL is set
    tags: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def run_link(run_id: str, base_url: str | None = None) -> str:
    """The run's page in the Dagster UI: a path, or a full URL under ``base_url``."""
    path = f"/runs/{run_id}"
    return f"{base_url.rstrip('/')}{path}" if base_url else path


def shorten(text: str, limit: int = _MAX_ERROR_CHARS) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_alert_text(alert: Alert) -> str:
    """The human message: one headline, then the failed steps, the error and the link."""
    steps = ", ".join(alert.failed_steps) if alert.failed_steps else "none recorded (the run failed outside a step)"
    lines = [
        f"SCIN pipeline: run of job `{alert.job}` FAILED ({alert.time})",
        f"run id: {alert.run_id}",
        f"failed steps: {steps}",
        f"error: {alert.error or 'no error message'}",
        f"details: {alert.link}",
    ]
    return "\n".join(lines)


def webhook_payload(alert: Alert) -> dict:
    """Slack-compatible JSON: ``text`` is displayed; ``alert`` carries the structured record."""
    return {"text": format_alert_text(alert), "alert": alert.to_dict()}


class AlertDeliveryError(RuntimeError):
    """A sink could not deliver an alert; the message says which sink and why."""


class AlertSink(Protocol):
    name: str

    def send(self, alert: Alert) -> None:
        """Deliver the alert or raise AlertDeliveryError."""


class JsonLinesAlertSink:
    """Appends one JSON object per line; a single O_APPEND write, so concurrent writers do not interleave."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = f"file {self.path}"

    def send(self, alert: Alert) -> None:
        line = (json.dumps(alert.to_dict(), sort_keys=True) + "\n").encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:
            raise AlertDeliveryError(f"cannot append to {self.path}: {exc.strerror or exc}") from None


class WebhookAlertSink:
    """POSTs :func:`webhook_payload` as JSON; any answer other than 2xx is a delivery error."""

    def __init__(self, url: str, timeout_s: float = DEFAULT_WEBHOOK_TIMEOUT_S):
        parsed = urllib.parse.urlparse(url)
        if timeout_s <= 0:
            raise ValueError(f"{WEBHOOK_TIMEOUT_ENV} must be positive, got {timeout_s}")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"{WEBHOOK_URL_ENV} must be an http(s) URL, got scheme {parsed.scheme!r}")
        self.url = url
        self.timeout_s = timeout_s
        # The path of a Slack webhook URL is its secret: name the host only.
        self.name = f"webhook {parsed.scheme}://{parsed.netloc}"

    def send(self, alert: Alert) -> None:
        body = json.dumps(webhook_payload(alert)).encode("utf-8")
        request = urllib.request.Request(
            self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            raise AlertDeliveryError(f"{self.name} answered HTTP {exc.code}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AlertDeliveryError(f"{self.name} unreachable: {reason}") from None
        if not 200 <= status < 300:
            raise AlertDeliveryError(f"{self.name} answered HTTP {status}")


def alert_sinks_from_env(data_root: str | Path, env: Mapping[str, str] | None = None) -> list[AlertSink]:
    """The file sink under the data root, plus the webhook when SCIN_ALERT_WEBHOOK_URL is set."""
    env = os.environ if env is None else env
    sinks: list[AlertSink] = [JsonLinesAlertSink(DataRootLayout.of(data_root).alerts_file)]
    url = (env.get(WEBHOOK_URL_ENV) or "").strip()
    if url:
        try:
            timeout = float(env.get(WEBHOOK_TIMEOUT_ENV) or DEFAULT_WEBHOOK_TIMEOUT_S)
            sinks.append(WebhookAlertSink(url, timeout_s=timeout))
        except ValueError as exc:
            # A misconfigured hook must not swallow the alert: the file still gets it, and the
            # delivery outcome names the configuration problem.
            sinks.append(_MisconfiguredSink(f"webhook from {WEBHOOK_URL_ENV}", str(exc)))
    return sinks


class _MisconfiguredSink:
    def __init__(self, name: str, problem: str):
        self.name = name
        self.problem = problem

    def send(self, alert: Alert) -> None:
        raise AlertDeliveryError(f"{self.name} not used: {self.problem}")


@dataclass(frozen=True)
class Delivery:
    sink: str
    ok: bool
    detail: str = ""


def deliver(alert: Alert, sinks: Iterable[AlertSink]) -> list[Delivery]:
    """Send to every sink; one sink failing neither raises nor stops the others."""
    outcomes = []
    for sink in sinks:
        try:
            sink.send(alert)
            outcomes.append(Delivery(sink.name, True))
        except Exception as exc:  # noqa: BLE001 - reporting a failure must not fail
            outcomes.append(Delivery(getattr(sink, "name", type(sink).__name__), False, f"{type(exc).__name__}: {exc}"))
    return outcomes


def read_alerts(data_root: str | Path) -> list[dict]:
    """Every alert recorded under a data root, oldest first (for tests, scripts and the docs)."""
    path = DataRootLayout.of(data_root).alerts_file
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
