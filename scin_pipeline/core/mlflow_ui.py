"""How `scin-pipeline ui` starts the MLflow UI and what it opens on: the server's command and environment,
the experiment tags that make the UI show this experiment as classic model training with its metrics as
columns, and the runs-list address. Pure (no MLflow, no Dagster import): the CLI applies them.

Decisions (MLflow 3.17):

- Telemetry off. MLflow's Python side and its UI ask ``mlflow.telemetry.utils.is_telemetry_disabled``,
  which honours ``MLFLOW_DISABLE_TELEMETRY=true`` and the cross-tool ``DO_NOT_TRACK=true``; with either,
  the server answers the UI's ``/ajax-api/3.0/mlflow/ui-telemetry`` with ``disable_ui_telemetry: true``.
  Both are set for the server process (a user's own value wins: it is their machine).
- Classic ML, not GenAI. The UI picks its mode from the experiment tag ``mlflow.experimentKind``
  (``custom_model_development``: training runs, metrics, models) and the ``workflowType`` query parameter
  (``machine_learning``); without either it opens in GenAI mode (traces, prompts) on an empty page.
- Metric columns. The runs table shows no metric by default (only Source, Models, Dataset). The UI's own
  "share view" mechanism stores a view (selected columns, sort) as the experiment tag
  ``mlflow.sharedViewState.<key>`` and opens it with ``?viewStateShareKey=<key>``: we write that view, with
  the candidates' headline metrics as columns and the runs sorted by the validation score.
- The link goes to the runs list (``#/experiments/<id>/runs``), not to MLflow's home page, whose
  telemetry notice would greet every new browser profile.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from urllib.parse import urlencode

TELEMETRY_OFF = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
# MLflow 3's job-execution workers (six idle processes) only slow the UI's start and stop here.
NO_JOB_WORKERS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
CLASSIC_ML_KIND = "custom_model_development"
WORKFLOW_TYPE = "machine_learning"
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
RUNS_VIEW_KEY = "scin-pipeline-candidates"
# The runs list's metric columns, in this order: how each candidate was selected (validation, the restored
# epoch's weights), how it does on test, and whether it passed the fairness gate.
RUNS_VIEW_METRICS = (
    "best_val_macro_f1",
    "best_val_balanced_accuracy",
    "best_epoch",
    "test_balanced_accuracy",
    "test_macro_f1",
    "test_mean_ovr_auc",
    "test_ece",
    "fairness_gate_passed",
)
RUNS_VIEW_SORT = "best_val_macro_f1"


def ui_environment(base: Mapping[str, str], *, tracking_uri: str) -> dict[str, str]:
    """The MLflow UI server's environment: ``base`` plus the tracking URI and telemetry and job workers
    off, each unless ``base`` already sets it."""
    env = dict(base)
    for key, value in {"MLFLOW_TRACKING_URI": tracking_uri, **TELEMETRY_OFF, **NO_JOB_WORKERS}.items():
        env.setdefault(key, value)
    return env


def ui_command(mlflow_executable: str, *, backend_store_uri: str, port: int, host: str = "127.0.0.1") -> list[str]:
    """``mlflow ui`` on ``host:port`` over ``backend_store_uri``."""
    return [mlflow_executable, "ui", "--host", host, "--port", str(port), "--backend-store-uri", backend_store_uri]


def metric_column(name: str) -> str:
    """The runs table's key of a metric column (the UI's canonical ``metrics.`name``` form)."""
    return f"metrics.`{name}`"


def runs_view_state(metrics: Sequence[str] = RUNS_VIEW_METRICS, sort_by: str = RUNS_VIEW_SORT) -> dict:
    """The shared view the link opens: the Models column, then ``metrics``, highest ``sort_by`` first."""
    return {
        "selectedColumns": ["attributes.`Models`", *(metric_column(m) for m in metrics)],
        "orderByKey": metric_column(sort_by),
        "orderByAsc": False,
    }


def experiment_ui_tags(metrics: Sequence[str] = RUNS_VIEW_METRICS, sort_by: str = RUNS_VIEW_SORT) -> dict[str, str]:
    """The experiment tags the UI reads: classic-ML mode and the shared runs view (module docstring)."""
    return {
        EXPERIMENT_KIND_TAG: CLASSIC_ML_KIND,
        SHARED_VIEW_TAG_PREFIX + RUNS_VIEW_KEY: json.dumps(runs_view_state(metrics, sort_by)),
    }


def runs_url(base_url: str, experiment_id: str) -> str:
    """The experiment's runs list in the MLflow UI at ``base_url``, classic-ML mode, with the shared view."""
    query = urlencode({"workflowType": WORKFLOW_TYPE, "viewStateShareKey": RUNS_VIEW_KEY})
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"
