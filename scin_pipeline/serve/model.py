"""The served model: the registry's version behind a ``models:/`` URI, unwrapped to its package.

``resolve_version`` turns the URI into one registered version (``@alias`` through
``MlflowClient.get_model_version_by_alias``, or an explicit version number) and ``load_version`` loads
exactly that version (``models:/NAME/VERSION``) with ``mlflow.pyfunc.load_model``: if the alias moves while a
version loads, the name and version shown to users are still those of the weights that answer. The pyfunc
is then unwrapped to its :class:`~scin_pipeline.core.packaged_model.PackagedClassifier`, so that the
service decodes each upload once (its quality check needs the full-size pixels) and calls the package's
``predict_proba`` directly, instead of handing raw bytes to the pyfunc, which would decode them again.
Following the alias over time (re-resolving it, swapping versions) is :mod:`.follow`'s job.

Errors a user can fix (no store, no registered model, a model that is not one of ours) are
:class:`ServeError` with one clear message; the CLI prints it and exits non-zero. An alias with no version
(no champion yet, or cleared by model_comparison) is :class:`AliasNotSet`, a ServeError that the service
turns into 503 answers instead of refusing to start.
"""

from __future__ import annotations

import contextlib
import re
import threading
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from scin_pipeline.core.champion import FAIRNESS_STATUS_TAG, FAIRNESS_UNJUDGED_TAG
from scin_pipeline.core.mlflow_registry import (
    CHAMPION_ALIAS,
    CHAMPION_CLEARED_AT_TAG,
    CHAMPION_CLEARED_REASON_TAG,
    DEFAULT_REGISTERED_MODEL_NAME,
    SYNTHETIC_TAG,
    fluent_tracking_uri,
    without_credentials,
)
from scin_pipeline.core.packaged_model import KERAS_KINDS, METADATA_KINDS, PackagedClassifier

DEFAULT_MODEL_NAME = DEFAULT_REGISTERED_MODEL_NAME
DEFAULT_MODEL_URI = f"models:/{DEFAULT_MODEL_NAME}@{CHAMPION_ALIAS}"
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
_MISSING = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


class ServeError(RuntimeError):
    """The service cannot start (or a model cannot be served); the message says what to do."""


class AliasNotSet(ServeError):
    """The registered model exists but no version holds the alias. ``cleared_at`` is set when
    model_comparison removed it on purpose (the message then holds its recorded reason)."""

    def __init__(self, message: str, *, cleared_at: str | None = None):
        super().__init__(message)
        self.cleared_at = cleared_at


@dataclass
class ServedModel:
    """A loaded package and where it came from. ``predict_proba`` is serialised by a lock: Keras does not
    promise that one model may predict from several threads at once."""

    package: PackagedClassifier
    requested_uri: str
    loaded_uri: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None  # the alias it was reached through (None: a pinned models:/NAME/VERSION)
    run_id: str | None = None
    synthetic_data: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def kind(self) -> str:
        return self.package.kind

    @property
    def fairness_status(self) -> str | None:
        """The fairness gate's outcome for this version (registry tag scin.fairness_status): passed,
        failed, not_judged; None when the version was never compared."""
        return self.tags.get(FAIRNESS_STATUS_TAG) or None

    @property
    def fairness_unjudged(self) -> str | None:
        """The gate groups too small to judge (tag scin.fairness_unjudged), when not judged."""
        return self.tags.get(FAIRNESS_UNJUDGED_TAG) or None

    @property
    def classes(self) -> list[str]:
        return list(self.package.classes)

    @property
    def uses_image(self) -> bool:
        return self.package.kind in KERAS_KINDS

    @property
    def uses_metadata(self) -> bool:
        return self.package.kind in METADATA_KINDS

    def predict_proba(self, images: np.ndarray | None, cases: pd.DataFrame | None) -> np.ndarray:
        """The package's ``predict_proba`` with only the inputs its kind uses; (N, K) rows summing to 1."""
        with self._lock:
            return self.package.predict_proba(
                images=images if self.uses_image else None, cases=cases if self.uses_metadata else None
            )

    def warm_up(self) -> None:
        """One prediction on a blank image and an empty questionnaire, so that the first user does not wait
        for graph tracing."""
        size = self.package.image_size or 1
        self.predict_proba(np.zeros((1, size, size, 3), np.uint8), pd.DataFrame(index=[0]))


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``; ServeError otherwise."""
    match = _MODELS_URI.match(model_uri or "")
    if match is None:
        raise ServeError(f"--model must be models:/NAME@ALIAS or models:/NAME/VERSION, got {model_uri!r}")
    return match["name"], match["alias"], match["version"]


def registry_client(tracking_uri: str | None = None):
    """(MlflowClient on the tracking = registry URI, the URI). None: MLflow's default ($MLFLOW_TRACKING_URI)."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri or mlflow.get_tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _no_alias_message(client, name: str, alias: str, where: str) -> AliasNotSet:
    tags = client.get_registered_model(name).tags or {}
    if alias == CHAMPION_ALIAS and CHAMPION_CLEARED_REASON_TAG in tags:
        cleared_at = tags.get(CHAMPION_CLEARED_AT_TAG) or "an unknown time"
        return AliasNotSet(
            f"no champion: model_comparison removed the alias @{alias} of {name!r} at {cleared_at}: "
            f"{tags[CHAMPION_CLEARED_REASON_TAG]}",
            cleared_at=cleared_at,
        )
    if alias == CHAMPION_ALIAS:
        return AliasNotSet(
            f"no champion yet: {name!r} in the registry at {where} has no version with the alias "
            f"@champion; run `scin-pipeline demo` first (model_comparison sets it)"
        )
    return AliasNotSet(f"{name!r} in the registry at {where} has no version with the alias @{alias}")


def resolve_version(client, name: str, alias: str | None, version: str | None, where: str):
    """The ModelVersion behind ``@alias`` (or ``version``). AliasNotSet when the model exists without the
    alias; ServeError when there is no such model or version."""
    from mlflow.exceptions import MlflowException

    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code not in _MISSING:
            raise
    try:
        client.get_registered_model(name)
        known = True
    except MlflowException as exc:
        if exc.error_code not in _MISSING:
            raise
        known = False
    if not known:
        raise ServeError(
            f"the registry at {where} has no model named {name!r}: no model has been trained yet; "
            f"run `scin-pipeline demo` (or the training job) first, or pass --model"
        ) from None
    if alias is not None:
        raise _no_alias_message(client, name, alias, where) from None
    raise ServeError(f"{name!r} in the registry at {where} has no version {version}") from None


def load_version(
    registered, *, name: str, requested_uri: str, tracking_uri: str | None, alias: str | None = None
) -> ServedModel:
    """Load exactly the registered version ``registered`` (a ModelVersion) as a ServedModel."""
    import mlflow

    loaded_uri = f"models:/{name}/{registered.version}"
    where = without_credentials(tracking_uri or mlflow.get_tracking_uri())
    # The fluent loader reads the process-wide URI: point it at ours for the call, restore it after.
    scope = fluent_tracking_uri(tracking_uri) if tracking_uri else contextlib.nullcontext()
    with scope:
        try:
            pyfunc = mlflow.pyfunc.load_model(loaded_uri)
        except Exception as exc:
            raise ServeError(f"cannot load {loaded_uri} from {where}: {type(exc).__name__}: {exc}") from exc
    package = getattr(pyfunc.unwrap_python_model(), "package", None)
    if not isinstance(package, PackagedClassifier):
        raise ServeError(
            f"{loaded_uri} is not a SCIN packaged classifier (its pyfunc holds no "
            f"PackagedClassifier); only models logged by scin_pipeline can be served"
        )
    tags = dict(registered.tags or {})
    return ServedModel(
        package=package,
        requested_uri=requested_uri,
        loaded_uri=loaded_uri,
        name=name,
        version=str(registered.version),
        alias=alias,
        run_id=registered.run_id,
        synthetic_data=tags.get(SYNTHETIC_TAG, "").lower() == "true",
        tags=tags,
    )


def load_served_model(model_uri: str, *, tracking_uri: str | None = None) -> ServedModel:
    """Resolve ``model_uri`` (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``) and load that version, once.

    ``tracking_uri`` (also the registry URI) None: MLflow's own default (``$MLFLOW_TRACKING_URI``).
    """
    name, alias, version = parse_model_uri(model_uri)
    client, uri = registry_client(tracking_uri)
    registered = resolve_version(client, name, alias, version, without_credentials(uri))
    return load_version(registered, name=name, requested_uri=model_uri, tracking_uri=tracking_uri, alias=alias)
