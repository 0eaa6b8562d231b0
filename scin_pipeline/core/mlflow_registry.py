"""What the pipeline (resources/mlflow_tracking.py) and the web service (serve/) agree on about MLflow: the
registered model's default name, the champion alias and the tags both read, the scoped tracking URI of
MLflow's fluent API, and URIs shown without credentials. No Dagster here: serve/ imports it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

DEFAULT_REGISTERED_MODEL_NAME = "scin-condition-classifier"
CHAMPION_ALIAS = "champion"
# On the registered model while no version holds the alias (set by clear_champion, removed by set_champion):
# why there is no champion, and when it was cleared. `scin-pipeline serve` shows them in its 503 answers.
CHAMPION_CLEARED_REASON_TAG = "scin.champion_cleared_reason"
CHAMPION_CLEARED_AT_TAG = "scin.champion_cleared_at"
# On every training run (and so on its registered version): "true" when the images were synthetic.
SYNTHETIC_TAG = "scin.synthetic_data"
# The MLflow UI's address as a browser reaches it, for run links in Dagster metadata (MlflowTracking.run_url):
# `scin-pipeline ui` sets it for the UI it starts; docker/compose.yaml for its published port.
MLFLOW_UI_URL_ENV = "SCIN_MLFLOW_UI_URL"


@contextlib.contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for the block; restore the previous URI and env var after."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils  # only place the unset state lives

    previous_uri = getattr(tracking_utils, "_tracking_uri", None)
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_uri)  # pyright: ignore[reportArgumentType]  # mlflow handles None (unset), unlike its annotation
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def without_credentials(uri: str) -> str:
    """``uri`` without a user name or password (for logs, links and error messages)."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))
    return uri
