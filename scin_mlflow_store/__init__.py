"""MLflow artifact locations relative to the SQLite store that records them, so a copied or moved store (a
scin-pipeline data root) reads and writes its own artifacts.

MLflow's SQLite store records every artifact location as it was when the experiment was created: the
experiment's, each run's (``<experiment location>/<run id>/artifacts``), each logged model's and each
registered version's ``storage_location``. A plain path becomes an absolute ``file://`` URI, so a copy of
the store would read (and write) the ORIGINAL folder's artifacts, or fail once it is gone.

An experiment created with a location of this scheme, ``scin-store:///artifacts/<experiment>``, names its
folder relative to the folder holding the SQLite database. MLflow derives every run, model and version
location from it by appending to the path, and asks the artifact repository registered for the scheme,
:func:`artifact_repository` (MLflow's documented plugin entry point ``mlflow.artifact_repository``, see
pyproject.toml), which resolves the URI against the database of the store in use (the tracking or registry
URI MLflow passes, else the MLflow UI server's backend store, else the process's tracking URI) and returns
MLflow's own local repository on that folder. Nothing is rewritten when a store is opened.

Standalone on purpose: the standard library and MLflow only (imported when a repository is made, not at
import: MLflow loads its entry points while importing its registry), no scin_pipeline import, so that a
process serving a registered model with plain MLflow and without scin_pipeline resolves these locations too.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

SCHEME = "scin-store"
# The MLflow UI server's backend store URI (mlflow.server.constants.BACKEND_STORE_URI_ENV_VAR).
_SERVER_STORE_ENV = "_MLFLOW_SERVER_FILE_STORE"


def store_relative_uri(relative: str) -> str:
    """``scin-store:///<relative>``: a location named relative to the SQLite store's folder."""
    path = PurePosixPath(str(relative))
    if not relative or path.is_absolute() or any(p in ("..", ".") for p in path.parts):
        raise ValueError(f"a store-relative artifact location must be a relative path inside it, got {relative!r}")
    return f"{SCHEME}:///{path.as_posix()}"


def store_folder(store_uri: str | None) -> Path | None:
    """The folder holding the SQLite database of ``store_uri`` (``sqlite:///<folder>/<file>``), or None for a
    store that is not a SQLite file."""
    if not store_uri or not store_uri.startswith("sqlite:///"):
        return None
    database = store_uri[len("sqlite:///") :].split("?", 1)[0]
    if database in ("", ":memory:"):
        return None
    return Path(database).expanduser().resolve().parent


def resolve(artifact_uri: str, store_uri: str | None) -> Path:
    """The folder ``artifact_uri`` (this scheme) names, under the folder of the SQLite store ``store_uri``."""
    parts = urlsplit(artifact_uri)
    if parts.scheme != SCHEME or parts.netloc:
        raise ValueError(f"not a {SCHEME}:/// artifact location: {artifact_uri!r}")
    relative = PurePosixPath(unquote(parts.path).lstrip("/"))
    if ".." in relative.parts:
        raise ValueError(f"{artifact_uri!r} leaves its store's folder")
    folder = store_folder(store_uri)
    if folder is None:
        from mlflow.exceptions import MlflowException

        raise MlflowException(
            f"the artifact location {artifact_uri} is relative to the SQLite store that recorded it "
            f"(sqlite:///<folder>/mlflow.db); the store in use is {store_uri or 'not set'}: open that store "
            "(scin-pipeline: --data-root, or MLFLOW_TRACKING_URI)"
        )
    return folder.joinpath(*relative.parts)


def _store_in_use(tracking_uri: str | None, registry_uri: str | None) -> str | None:
    for uri in (tracking_uri, registry_uri):
        if store_folder(uri) is not None:
            return uri
    from mlflow.tracking._tracking_service.utils import get_tracking_uri  # the process's (fluent) URI

    for uri in (os.environ.get(_SERVER_STORE_ENV), get_tracking_uri()):
        if store_folder(uri) is not None:
            return uri
    return tracking_uri or registry_uri


def artifact_repository(artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None):
    """The repository MLflow's registry asks for a ``scin-store:///`` URI (it calls the entry point with
    these arguments): MLflow's local repository on the folder the URI names. A factory, not a subclass, so
    that importing this module imports no MLflow."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    folder = resolve(artifact_uri, _store_in_use(tracking_uri, registry_uri))
    return LocalArtifactRepository(folder.as_uri(), tracking_uri=tracking_uri, registry_uri=registry_uri)
