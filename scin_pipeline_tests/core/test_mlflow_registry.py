"""The MLflow conventions shared by the pipeline and the web service: the scoped fluent tracking URI
(restored afterwards, with $MLFLOW_TRACKING_URI as it was) and URIs shown without credentials."""

from __future__ import annotations

import os

import mlflow
import pytest

from scin_pipeline.core.mlflow_registry import fluent_tracking_uri, without_credentials


@pytest.mark.parametrize(
    "uri, shown",
    [
        ("https://user:secret@mlflow.example:5000/path?x=1", "https://mlflow.example:5000/path?x=1"),
        ("http://token@mlflow.example/", "http://mlflow.example/"),
        ("https://mlflow.example", "https://mlflow.example"),
        ("sqlite:////data/mlflow/mlflow.db", "sqlite:////data/mlflow/mlflow.db"),
    ],
)
def test_without_credentials(uri, shown):
    assert without_credentials(uri) == shown


@pytest.mark.parametrize("env_before", [None, "sqlite:////elsewhere/mlflow.db"])
def test_fluent_tracking_uri_is_scoped_and_restores_the_environment(tmp_path, monkeypatch, env_before):
    if env_before is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env_before)
    before = mlflow.get_tracking_uri()
    inside = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(RuntimeError, match="boom"):
        with fluent_tracking_uri(inside):
            assert mlflow.get_tracking_uri() == inside
            raise RuntimeError("boom")
    assert mlflow.get_tracking_uri() == before
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before
