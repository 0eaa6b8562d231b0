"""MLflow tracking and the model registry for the training assets: a small ConfigurableResource over plain
MLflow (no dagster-mlflow: its resource sets global state at start-up and knows nothing of run keys).

Where things go. ``tracking_uri`` (None: ``$MLFLOW_TRACKING_URI``, else the embedded
``sqlite:///<data_root>/mlflow/mlflow.db``, the data root being the ``storage`` resource's: one
``StoragePaths`` owns it, shared with the assets and the IO manager). With a SQLite store the experiment is
created with its artifacts under ``<data_root>/mlflow/artifacts/<experiment>``: MLflow's own default for a
database store is ``./mlruns`` relative to whatever the working directory happens to be. Registry URI =
tracking URI.

One MLflow run per training materialisation, found again by its run key. ``training_run(run_key=...)``
looks for a run of the experiment tagged ``scin.run_key == run_key``: one that did not finish (RUNNING,
FAILED or KILLED: the process died, the step failed, the run was cancelled) is resumed (same run id, status
back to RUNNING, ``TrackedRun.resumed``), so a retried materialisation continues its run instead of
leaving a dead duplicate behind. A FINISHED run is never reopened: ``find_finished_run`` lets the caller
skip the work, and calling ``training_run`` anyway starts a new run (a deliberate retrain). The run ends
FINISHED on success, FAILED on an exception, KILLED on an interrupt (Dagster's termination, Ctrl-C), and
the exception propagates.

Global state. Logging (params, metrics, artifacts, tags, registry) goes through an ``MlflowClient`` bound
to this resource's URI. Only two things need MLflow's fluent API, which reads the process-wide tracking
URI: the run itself (``mlflow.pyfunc.log_model`` attaches the model to the *active* run and its
experiment) and the model logging. So the tracking URI is set for the duration of ``training_run`` only,
and restored afterwards together with ``$MLFLOW_TRACKING_URI`` (``mlflow.set_tracking_uri`` also writes that
variable, and MLflow's own scoped helper unsets it on exit, which would lose a user's setting). Two
``training_run`` blocks must therefore not be open at once in one thread (MLflow refuses a second active
run); Dagster runs each training step in its own process, or sequentially in-process.

Concurrency: with SQLite, the first use of a fresh store (schema creation) and the experiment creation
run under a file lock next to the database, so parallel training steps do not race to create them.
"""

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from dagster import ConfigurableResource, MetadataValue
from pydantic import Field

from scin_pipeline.core.mlflow_registry import (
    CHAMPION_ALIAS,
    CHAMPION_CLEARED_AT_TAG,
    CHAMPION_CLEARED_REASON_TAG,
    DEFAULT_REGISTERED_MODEL_NAME,
    MLFLOW_UI_URL_ENV,
    SYNTHETIC_TAG,
    fluent_tracking_uri,
    without_credentials,
)
from scin_pipeline.core.mlflow_ui import experiment_ui_tags
from scin_pipeline.resources.storage import StoragePaths

# The tags of a training run (SYNTHETIC_TAG, shared with serve/, lives in core.mlflow_registry).
DAGSTER_RUN_ID_TAG = "dagster.run_id"
DAGSTER_ASSET_KEY_TAG = "dagster.asset_key"
DAGSTER_CODE_VERSION_TAG = "dagster.code_version"
SPLITS_DATA_VERSION_TAG = "scin.splits_data_version"
RUN_KEY_TAG = "scin.run_key"
CANDIDATE_TAG = "scin.candidate"
KERAS_BACKEND_TAG = "scin.keras_backend"
WEIGHTS_TAG = "scin.weights"  # the image backbone's weights (imagenet, or none: random init)
TRAINING_MODE_TAG = "scin.mode"  # the transfer candidates: head_on_embeddings or fine_tune
MODEL_URI_TAG = "scin.model_uri"  # set once the packaged model is logged
REGISTERED_VERSION_TAG = "scin.registered_version"
MODEL_KIND_TAG = "scin.model_kind"
RESUME_COUNT_TAG = "scin.resume_count"
PREVIOUS_DAGSTER_RUNS_TAG = "scin.previous_dagster_run_ids"
CHAMPION_REASON_TAG = "scin.champion_reason"
_MAX_TAG_VALUE = 4000  # under MLflow's 5000-character limit on tag values, whatever the store
# Run tags copied onto a registered model version, so the registry alone says where a version came from.
_VERSION_TAG_PREFIXES = ("dagster.", "scin.")
_RUN_KEY_PATTERN = re.compile(r"[A-Za-z0-9_.:/=+@-]{1,250}")
_UNFINISHED = ("RUNNING", "SCHEDULED", "FAILED", "KILLED")
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_VALUE = 6000
_INITIALISED_STORES: set[str] = set()


def config_hash(config: Mapping[str, Any]) -> str:
    """12 hex digits of a config's canonical JSON (keys sorted; values that are not JSON as str)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_key_for(
    *, asset_key: str, code_version: str, config: Mapping[str, Any], splits_data_version: str, inputs_version: str
) -> str:
    """The run key of a training materialisation (the one recipe): 24 hex digits of a SHA-256 over the
    asset, its code version, a hash of its config, the splits' data version and its other inputs' versions.
    Equal keys mean the same training: a FINISHED run with the key is reused, an unfinished one resumed."""
    text = f"{asset_key}:{code_version}:{config_hash(config)}:{splits_data_version}:{inputs_version}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def dagster_tags(
    context, *, code_version: str, splits_data_version: str, synthetic_data: bool, keras_backend: str | None = None
) -> dict[str, str]:
    """The standard tags of a training run, from a Dagster asset execution context."""
    try:
        asset_key = context.asset_key.to_user_string()
    except Exception:  # a multi-asset step has no single asset key
        asset_key = ",".join(key.to_user_string() for key in context.selected_asset_keys)
    tags = {
        DAGSTER_RUN_ID_TAG: str(context.run.run_id),
        DAGSTER_ASSET_KEY_TAG: asset_key,
        DAGSTER_CODE_VERSION_TAG: str(code_version),
        SPLITS_DATA_VERSION_TAG: str(splits_data_version),
        SYNTHETIC_TAG: "true" if synthetic_data else "false",
    }
    if keras_backend:
        tags[KERAS_BACKEND_TAG] = str(keras_backend)
    return tags


def _check_run_key(run_key: str) -> None:
    # The key goes into an MLflow search filter: a closed alphabet keeps the filter unambiguous.
    if not isinstance(run_key, str) or not _RUN_KEY_PATTERN.fullmatch(run_key):
        raise ValueError(
            f"run_key must be 1-250 characters of [A-Za-z0-9_.:/=+@-], got {run_key!r} (run_key_for() builds one)"
        )


def _param_text(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    if len(text) > _MAX_PARAM_VALUE:
        raise ValueError(f"parameter value longer than MLflow's {_MAX_PARAM_VALUE} characters: {text[:80]}...")
    return text


def _safe_artifact_file(filename: str) -> str:
    parts = str(filename).replace("\\", "/").split("/")
    if not filename or str(filename).startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"artifact file name must be a relative path without '.'/'..' segments, got {filename!r}")
    return "/".join(parts)


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


class MlflowTracking(ConfigurableResource):
    """MLflow runs, artifacts and the registry for the training assets (see the module docstring)."""

    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; unset: $MLFLOW_TRACKING_URI, else sqlite:///<data_root>/mlflow/mlflow.db",
    )
    # The data root of the embedded store: the `storage` resource (set its data_root there). A real class in
    # the annotation (no `from __future__ import annotations` here): Dagster reads it to accept the partial
    # resource `StoragePaths.configure_at_launch(...)` that build_resources shares.
    storage: StoragePaths
    experiment_name: str = Field(default="scin-pipeline", description="MLflow experiment of the training runs")
    registered_model_name: str = Field(
        default=DEFAULT_REGISTERED_MODEL_NAME, description="registered model that every candidate version goes to"
    )
    ui_url: str | None = Field(
        default=None,
        description="base URL of the MLflow UI, for run links in asset "
        "metadata (unset: $SCIN_MLFLOW_UI_URL, else the tracking URI when it is http)",
    )

    # ---------------------------------------------------------------- where

    @property
    def root(self) -> Path:
        return self.storage.root

    @property
    def artifact_root(self) -> Path:
        return self.storage.mlflow_artifacts_dir

    def resolved_tracking_uri(self) -> str:
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or self.storage.mlflow_uri
        database = _sqlite_path(uri)
        if database is not None:
            database.expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        return uri

    def client(self):
        """An ``MlflowClient`` on this resource's tracking (and registry) URI."""
        from mlflow import MlflowClient

        uri = self.resolved_tracking_uri()
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        if uri not in _INITIALISED_STORES and _sqlite_path(uri) is not None:
            # The first use of a SQLite store creates its schema: do it under the lock, once per process.
            with self._store_lock():
                client.search_experiments(max_results=1)
                client.search_registered_models(max_results=1)
            _INITIALISED_STORES.add(uri)
        return client

    @contextlib.contextmanager
    def _store_lock(self) -> Iterator[None]:
        database = _sqlite_path(self.resolved_tracking_uri())
        if database is None:
            yield
            return
        import fcntl

        with open(database.expanduser().resolve().with_suffix(".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def experiment_id(self, client=None) -> str:
        """The id of ``experiment_name``, created on first use (artifacts under the data root for SQLite)."""
        from mlflow.exceptions import MlflowException

        import scin_mlflow_store

        client = client or self.client()
        with self._store_lock():
            experiment = client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                artifact_location = None
                uri = self.resolved_tracking_uri()
                if _sqlite_path(uri) is not None:
                    folder = re.sub(r"[^A-Za-z0-9_.-]", "_", self.experiment_name)
                    artifact_location = (self.artifact_root / folder).as_uri()
                    store = scin_mlflow_store.store_folder(uri)
                    if store is not None and store in self.artifact_root.parents:
                        # The data root's own store: locations relative to the store's folder (scin_mlflow_store),
                        # so a copied or moved data root reads and writes its own artifacts.
                        relative = (self.artifact_root / folder).relative_to(store)
                        artifact_location = scin_mlflow_store.store_relative_uri(relative.as_posix())
                try:
                    # Tagged for the MLflow UI (classic model training, metric columns): core.mlflow_ui.
                    return client.create_experiment(
                        self.experiment_name, artifact_location=artifact_location, tags=experiment_ui_tags()
                    )
                except MlflowException as exc:
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    experiment = client.get_experiment_by_name(self.experiment_name)
                    assert experiment is not None  # it exists: creating it said so (deleted ones are found too)
        if experiment.lifecycle_stage != "active":
            raise RuntimeError(
                f"MLflow experiment {self.experiment_name!r} is deleted: restore it in the MLflow "
                f"UI (or `mlflow experiments restore`) or set experiment_name"
            )
        return experiment.experiment_id

    def prepare_ui(self) -> str:
        """The experiment's id, created if need be, with the tags the MLflow UI reads (core.mlflow_ui) set
        again: an experiment made before they existed, or whose view a user changed, opens as documented."""
        client = self.client()
        experiment_id = self.experiment_id(client)
        for key, value in experiment_ui_tags().items():
            client.set_experiment_tag(experiment_id, key, value)
        return experiment_id

    # ---------------------------------------------------------------- runs

    def runs_with_key(self, run_key: str) -> list:
        """Every (not deleted) run of the experiment tagged with ``run_key``, newest first."""
        _check_run_key(run_key)
        client = self.client()
        return list(
            client.search_runs(
                [self.experiment_id(client)],
                filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                order_by=["attributes.start_time DESC"],
                max_results=1000,
            )
        )

    def find_finished_run(self, run_key: str):
        """The newest FINISHED run with this key, or None."""
        return next((run for run in self.runs_with_key(run_key) if run.info.status == "FINISHED"), None)

    @contextlib.contextmanager
    def training_run(
        self, *, run_key: str, run_name: str, tags: Mapping[str, Any], params: Mapping[str, Any]
    ) -> Iterator["TrackedRun"]:
        """One MLflow run for one training materialisation; resumes an unfinished run with the same key."""
        import mlflow

        _check_run_key(run_key)
        client = self.client()
        experiment_id = self.experiment_id(client)
        unfinished = [run for run in self.runs_with_key(run_key) if run.info.status in _UNFINISHED]
        run_tags = {str(k): str(v) for k, v in tags.items()}
        run_tags[RUN_KEY_TAG] = run_key
        uri = self.resolved_tracking_uri()
        with fluent_tracking_uri(uri):
            if unfinished:
                previous = unfinished[0]
                old_tags = previous.data.tags
                run_tags[RESUME_COUNT_TAG] = str(int(old_tags.get(RESUME_COUNT_TAG, "0")) + 1)
                earlier = [t for t in old_tags.get(PREVIOUS_DAGSTER_RUNS_TAG, "").split(",") if t]
                old_dagster_run = old_tags.get(DAGSTER_RUN_ID_TAG)
                if (
                    old_dagster_run
                    and old_dagster_run != run_tags.get(DAGSTER_RUN_ID_TAG)
                    and old_dagster_run not in earlier
                ):
                    earlier.append(old_dagster_run)
                if earlier:
                    run_tags[PREVIOUS_DAGSTER_RUNS_TAG] = ",".join(earlier)[-5000:]
                active = mlflow.start_run(run_id=previous.info.run_id, tags=run_tags)
            else:
                active = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=run_tags)
            tracked = TrackedRun(
                tracking=self,
                client=client,
                run_id=active.info.run_id,
                experiment_id=active.info.experiment_id,
                resumed=bool(unfinished),
                tags=run_tags,
            )
            try:
                tracked.log_params(params)
                yield tracked
            except Exception:
                tracked._open = False
                mlflow.end_run("FAILED")
                raise
            except BaseException:  # Dagster's termination, KeyboardInterrupt, SystemExit
                tracked._open = False
                mlflow.end_run("KILLED")
                raise
            else:
                tracked._open = False
                mlflow.end_run("FINISHED")

    @contextlib.contextmanager
    def log_to_run(self, run_id: str) -> Iterator["TrackedRun"]:
        """Log evaluation results into a candidate's existing (usually FINISHED) run by id, leaving its
        status alone: a model's test metrics and fairness report sit beside its training record."""
        client = self.client()
        run = client.get_run(run_id)
        tracked = TrackedRun(
            tracking=self,
            client=client,
            run_id=run_id,
            experiment_id=run.info.experiment_id,
            resumed=False,
            tags=dict(run.data.tags),
        )
        try:
            yield tracked
        finally:
            tracked._open = False

    def set_run_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        client = self.client()
        for key, value in tags.items():
            client.set_tag(run_id, str(key), str(value))

    def read_artifact(self, run_id: str, path: str) -> bytes | None:
        """The bytes of the run's artifact file ``path``, or None when the run has no such file."""
        path = _safe_artifact_file(path)
        client = self.client()
        folder = path.rpartition("/")[0] or None
        if path not in {item.path for item in client.list_artifacts(run_id, folder)}:
            return None
        with tempfile.TemporaryDirectory(prefix="scin-mlflow-") as tmp:
            return Path(client.download_artifacts(run_id, path, tmp)).read_bytes()

    # ---------------------------------------------------------------- registry

    def model_uri_for_alias(self, alias: str = CHAMPION_ALIAS) -> str:
        return f"models:/{self.registered_model_name}@{alias}"

    def set_champion(self, version: str | int, *, reason: str):
        """Point the alias ``champion`` at ``version``, recording why on the version and the model."""
        if not reason or not str(reason).strip():
            raise ValueError("set_champion needs the reason (the rule that chose this version)")
        client = self.client()
        name = self.registered_model_name
        model_version = client.get_model_version(name, str(version))  # raises when there is no such version
        client.set_registered_model_alias(name, CHAMPION_ALIAS, model_version.version)
        client.set_model_version_tag(name, model_version.version, CHAMPION_REASON_TAG, reason)
        client.update_model_version(name, model_version.version, description=f"champion: {reason}")
        client.set_registered_model_tag(name, CHAMPION_REASON_TAG, f"version {model_version.version}: {reason}")
        for stale in (CHAMPION_CLEARED_REASON_TAG, CHAMPION_CLEARED_AT_TAG):
            client.delete_registered_model_tag(name, stale)
        return client.get_model_version(name, model_version.version)

    def clear_champion(self, *, reason: str):
        """Remove the alias ``champion`` (no version is served any more) and record why, and when, on the
        registered model (tags ``scin.champion_cleared_reason``, ``scin.champion_cleared_at``) and on the
        version that held it (``scin.champion_cleared_reason``). Creates the registered model when it does
        not exist yet, so the reason is there for whoever looks for a champion. Returns the ModelVersion
        that was champion, or None."""
        from mlflow.exceptions import MlflowException

        reason = str(reason or "").strip()
        if not reason:
            raise ValueError("clear_champion needs the reason (why no candidate may be champion)")
        reason = reason if len(reason) <= _MAX_TAG_VALUE else reason[: _MAX_TAG_VALUE - 3] + "..."
        client = self.client()
        name = self.registered_model_name
        try:
            client.create_registered_model(
                name, description="SCIN skin-condition classifier candidates; alias `champion` is served"
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        previous = self.champion_version()
        cleared_at = pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds")
        # The reason first, then the alias: a server that sees the alias gone finds the reason already there.
        client.set_registered_model_tag(name, CHAMPION_CLEARED_REASON_TAG, reason)
        client.set_registered_model_tag(name, CHAMPION_CLEARED_AT_TAG, cleared_at)
        client.delete_registered_model_tag(name, CHAMPION_REASON_TAG)
        if previous is not None:
            client.delete_registered_model_alias(name, CHAMPION_ALIAS)
            client.set_model_version_tag(name, previous.version, CHAMPION_CLEARED_REASON_TAG, f"{cleared_at}: {reason}")
        return previous

    def champion_cleared_reason(self) -> tuple[str, str] | None:
        """(reason, cleared_at) recorded by the last ``clear_champion`` while no champion was set since."""
        from mlflow.exceptions import MlflowException

        try:
            tags = self.client().get_registered_model(self.registered_model_name).tags or {}
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                return None
            raise
        if CHAMPION_CLEARED_REASON_TAG not in tags:
            return None
        return tags[CHAMPION_CLEARED_REASON_TAG], tags.get(CHAMPION_CLEARED_AT_TAG, "")

    def champion_version(self):
        """The ModelVersion the alias ``champion`` points at, or None (no model or no alias yet)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client().get_model_version_by_alias(self.registered_model_name, CHAMPION_ALIAS)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                return None
            raise

    # ---------------------------------------------------------------- links

    def run_url(self, run_id: str, experiment_id: str | None = None) -> str | None:
        """A link to the run in the MLflow UI, under the first address known: ``ui_url``, then
        ``$SCIN_MLFLOW_UI_URL`` (set by ``scin-pipeline ui`` and the compose file), then the tracking URI
        when it is http(s) (without credentials). None only with no UI address at all (a SQLite store and
        no UI started by us)."""
        base = self.ui_url or os.environ.get(MLFLOW_UI_URL_ENV) or None
        if base is None:
            uri = self.resolved_tracking_uri()
            base = without_credentials(uri) if uri.startswith(("http://", "https://")) else None
        if base is None:
            return None
        experiment_id = experiment_id or self.client().get_run(run_id).info.experiment_id
        return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

    def run_metadata(
        self, run_id: str, *, model_uri: str | None = None, registered_version: str | None = None
    ) -> dict[str, Any]:
        """Asset metadata: mlflow_run_id, mlflow_experiment_id, mlflow_model_uri, ..., and mlflow_run_url as
        a clickable link (``MetadataValue.url``) when the MLflow UI's address is known."""
        run = self.client().get_run(run_id)
        meta: dict[str, Any] = {
            "mlflow_run_id": run_id,
            "mlflow_experiment_id": run.info.experiment_id,
            "mlflow_run_status": run.info.status,
        }
        if model_uri:
            meta["mlflow_model_uri"] = model_uri
        if registered_version is not None:
            meta["mlflow_registered_model"] = f"models:/{self.registered_model_name}/{registered_version}"
        url = self.run_url(run_id, run.info.experiment_id)
        if url:
            meta["mlflow_run_url"] = MetadataValue.url(url)
        return meta


@dataclass
class TrackedRun:
    """The open MLflow run of one training materialisation. Methods log through the client by run id."""

    tracking: MlflowTracking
    client: Any
    run_id: str
    experiment_id: str
    resumed: bool
    tags: dict[str, str] = field(default_factory=dict)
    model_uri: str | None = None
    registered_version: str | None = None
    _open: bool = True

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError(f"MLflow run {self.run_id} has ended: log inside the training_run block")

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters; on a resumed run the ones already there must have the same value."""
        from mlflow.entities import Param

        self._check_open()
        texts = {str(k): _param_text(v) for k, v in params.items()}
        existing = self.client.get_run(self.run_id).data.params
        changed = {k: (existing[k], v) for k, v in texts.items() if k in existing and existing[k] != v}
        if changed:
            raise ValueError(
                f"MLflow run {self.run_id} already has different values for parameters "
                f"(old, new): {changed}; a run key must cover the whole config"
            )
        new = [Param(k, v) for k, v in texts.items() if k not in existing]
        for start in range(0, len(new), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[start : start + _MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics (non-numbers are skipped, e.g. a learning-rate schedule object)."""
        from mlflow.entities import Metric

        self._check_open()
        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            batch.append(Metric(str(key), number, now, int(step or 0)))
        for start in range(0, len(batch), _MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[start : start + _MAX_METRICS_PER_BATCH])

    def log_epoch(self, epoch: int, logs: Mapping[str, Any]) -> None:
        """Per-epoch metrics (Keras ``logs``) at step ``epoch``."""
        self.log_metrics(logs or {}, step=int(epoch))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values as text, cut to MLflow's limit with "...")."""
        self._check_open()
        for key, value in tags.items():
            text = str(value)
            text = text if len(text) <= _MAX_TAG_VALUE else text[: _MAX_TAG_VALUE - 3] + "..."
            self.client.set_tag(self.run_id, str(key), text)

    def log_dataset(
        self, frame: pd.DataFrame, *, name: str, digest: str, source: str | os.PathLike, context: str
    ) -> None:
        """Record ``frame`` as an input dataset of the run (MLflow's dataset tracking: name, digest, source,
        schema and size; not the rows). ``digest`` is the caller's data version, so the run names the exact
        data it used; logging the same (name, digest) again leaves one input."""
        from mlflow.data.dataset_source_registry import get_dataset_source_from_json
        from mlflow.data.pandas_dataset import from_pandas
        from mlflow.entities import DatasetInput, InputTag

        self._check_open()
        # A local file, said so: resolving a bare path makes MLflow guess between two "local" sources (warning).
        local = get_dataset_source_from_json(json.dumps({"uri": str(source)}), source_type="local")
        dataset = from_pandas(frame, source=local, name=name, digest=digest)
        tags = [InputTag(key="mlflow.data.context", value=context)]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Log a file, or a folder's files, under ``artifact_path``."""
        self._check_open()
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"cannot log {path} to MLflow run {self.run_id}: no such file")
        if artifact_path is not None:
            artifact_path = _safe_artifact_file(artifact_path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_bytes(self, data: bytes, filename: str) -> None:
        """Log ``data`` as the artifact file ``filename`` (a run-relative path)."""
        self._check_open()
        filename = _safe_artifact_file(filename)
        folder, _, base = filename.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="scin-mlflow-") as tmp:
            local = Path(tmp) / base
            local.write_bytes(bytes(data))
            self.client.log_artifact(self.run_id, str(local), folder or None)

    def log_text(self, text: str, filename: str) -> None:
        self._check_open()
        self.client.log_text(self.run_id, text, _safe_artifact_file(filename))

    def log_figure_png(self, png_bytes: bytes, filename: str) -> None:
        if not bytes(png_bytes[:8]) == b"\x89PNG\r\n\x1a\n":
            raise ValueError(f"{filename}: log_figure_png expects PNG bytes")
        if not filename.lower().endswith(".png"):
            raise ValueError(f"{filename}: a PNG figure's artifact name must end with .png")
        self.log_bytes(png_bytes, filename)

    def log_table(self, frame: pd.DataFrame, filename: str) -> None:
        """Log a table as .csv, .parquet, or .json (MLflow's table format, viewable in the UI)."""
        self._check_open()
        filename = _safe_artifact_file(filename)
        suffix = Path(filename).suffix.lower()
        if suffix == ".json":
            self.client.log_table(self.run_id, frame, filename)
        elif suffix == ".csv":
            self.log_bytes(frame.to_csv(index=False).encode(), filename)
        elif suffix == ".parquet":
            self.log_bytes(frame.to_parquet(index=False), filename)
        else:
            raise ValueError(f"{filename}: log_table writes .csv, .parquet or .json")

    def log_model(
        self, package_dir: str | os.PathLike, *, register: bool = True, name: str = "model"
    ) -> tuple[str, str | None]:
        """Log the packaged classifier as this run's pyfunc model; register it as a new version of
        ``registered_model_name`` (tagged with the model kind, run key, candidate and the run's tags).

        Returns (model_uri, registered version or None).
        """
        import mlflow
        from mlflow.exceptions import MlflowException

        from scin_pipeline.core.packaged_model import log_packaged_model, read_spec

        self._check_open()
        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            raise RuntimeError(f"log_model must be called inside the training_run block of run {self.run_id}")
        spec = read_spec(package_dir)
        info = log_packaged_model(package_dir, name=name, tags={MODEL_KIND_TAG: spec["kind"]})
        self.model_uri = info.model_uri
        if not register:
            return info.model_uri, None
        registered = self.tracking.registered_model_name
        try:
            self.client.create_registered_model(
                registered, description="SCIN skin-condition classifier candidates; alias `champion` is served"
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version_tags = {k: v for k, v in self.tags.items() if k.startswith(_VERSION_TAG_PREFIXES)}
        version_tags.update(
            {
                MODEL_KIND_TAG: spec["kind"],
                RUN_KEY_TAG: self.tags[RUN_KEY_TAG],
                CANDIDATE_TAG: self.tags.get(CANDIDATE_TAG, ""),
            }
        )
        version = self.client.create_model_version(
            registered, source=info.model_uri, run_id=self.run_id, tags=version_tags, model_id=info.model_id
        )
        self.registered_version = str(version.version)
        return info.model_uri, self.registered_version

    def metadata(self) -> dict[str, str]:
        """Asset metadata links for this run (run id, experiment, model URI, registered version, UI link)."""
        return self.tracking.run_metadata(
            self.run_id, model_uri=self.model_uri, registered_version=self.registered_version
        )
