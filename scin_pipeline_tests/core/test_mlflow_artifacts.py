"""MLflow artifact locations relative to the store that records them (scin_mlflow_store): the store of a copied
data root reads and writes its own artifacts, and MLflow finds the repository through its plugin entry point."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

import scin_mlflow_store
from scin_mlflow_store import SCHEME, resolve, store_folder, store_relative_uri


def test_locations_name_the_path_under_the_store_and_resolve_under_the_store_in_use(tmp_path):
    uri = store_relative_uri("artifacts/scin-pipeline")
    assert uri == "scin-store:///artifacts/scin-pipeline"
    folder = (tmp_path / "copy" / "mlflow").resolve()
    store = f"sqlite:///{folder}/mlflow.db"
    assert store_folder(store) == folder
    # MLflow appends run ids to the experiment's location (and writes "scin-store:/..." back).
    assert resolve("scin-store:/artifacts/scin-pipeline/run-1/artifacts", store) == (
        folder / "artifacts" / "scin-pipeline" / "run-1" / "artifacts"
    )
    # A store that is not a SQLite file (a server) has no folder to resolve against.
    assert store_folder("http://127.0.0.1:5000") is None
    with pytest.raises(Exception, match="relative to the SQLite store"):
        resolve(uri, "http://127.0.0.1:5000")
    for bad in ("/artifacts", "artifacts/../../etc", ""):
        with pytest.raises(ValueError):
            store_relative_uri(bad)
    with pytest.raises(ValueError, match="leaves"):
        resolve("scin-store:///artifacts/../../etc", store)


def test_mlflow_finds_the_repository_through_its_plugin_entry_point():
    from mlflow.store.artifact.artifact_repository_registry import get_registered_artifact_repositories

    assert get_registered_artifact_repositories()[SCHEME] is scin_mlflow_store.artifact_repository


def test_the_resolver_imports_nothing_of_scin_pipeline():
    # A process serving a registered model with plain MLflow (no scin_pipeline) must resolve the locations.
    code = "import sys, scin_mlflow_store; print(sorted(m for m in sys.modules if m.startswith('scin_pipeline')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


# The copy is opened in a fresh process, as a moved data root is: MLflow caches artifact repositories by run
# id for the life of a process.
COPY_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from scin_pipeline.resources import MlflowTracking, StoragePaths
    from scin_pipeline.serve.model import load_served_model

    root, run_id = Path(sys.argv[1]), sys.argv[2]
    uri = f"sqlite:///{root}/mlflow/mlflow.db"
    tracking = MlflowTracking(storage=StoragePaths(data_root=str(root)), tracking_uri=uri)
    print(Path(tracking.client().download_artifacts(run_id, "notes/trained.txt")).read_text())
    served = load_served_model(tracking.model_uri_for_alias("champion"), tracking_uri=uri)
    print("served version", served.version)
    with tracking.log_to_run(run_id) as run:
        run.log_text("written in the copy", "notes/evaluated.txt")
    """
)


def test_a_copied_data_root_reads_and_writes_its_own_artifacts(tmp_path):
    from scin_pipeline.resources import MlflowTracking, StoragePaths
    from scin_pipeline_tests.resources.test_mlflow_tracking import metadata_package, tags_for

    original = (tmp_path / "original" / "data").resolve()
    tracking = MlflowTracking(
        storage=StoragePaths(data_root=str(original)), tracking_uri=f"sqlite:///{original}/mlflow/mlflow.db"
    )
    with tracking.training_run(run_key="k1", run_name="m", tags=tags_for("metadata_model"), params={"C": 1}) as run:
        _, version = run.log_model(metadata_package(tmp_path / "package"))
        run.log_text("trained", "notes/trained.txt")
    tracking.set_champion(version, reason="the only candidate")
    client = tracking.client()
    # Nothing MLflow stored names the root: the experiment's, the run's and the version's locations.
    experiment = client.get_experiment_by_name("scin-pipeline")
    assert experiment is not None and experiment.artifact_location == f"{SCHEME}:///artifacts/scin-pipeline"
    assert client.get_run(run.run_id).info.artifact_uri.startswith(f"{SCHEME}:")
    version_location = client.get_model_version_download_uri(tracking.registered_model_name, version)
    assert version_location.startswith(f"{SCHEME}:") and str(original) not in version_location

    copy = tmp_path / "moved" / "data"
    shutil.copytree(original, copy)
    shutil.rmtree(tmp_path / "original")
    done = subprocess.run(
        [sys.executable, "-c", COPY_SCRIPT, str(copy), run.run_id], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained" in done.stdout and f"served version {version}" in done.stdout
    written = copy / "mlflow" / "artifacts" / "scin-pipeline" / run.run_id / "artifacts" / "notes" / "evaluated.txt"
    assert written.read_text() == "written in the copy"
    assert not (tmp_path / "original").exists()  # nothing read from, or written to, the original
