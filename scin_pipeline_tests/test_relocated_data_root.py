"""A data root copied to a new place and the original deleted: the copy reruns, retrains nothing that is up to
date, re-evaluates from its own files and serves its champion. Every path a table, the asset metadata or the
MLflow store keeps is relative to the data root (core.data_root.DataRootLayout.relative, scin_mlflow_store), so
nothing can reach the original; deleting it makes any such read fail loudly (and any write recreate it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

REPOSITORY = Path(__file__).resolve().parents[1]
DEMO = ["demo", "--cases", "200", "--epochs", "2", "--image-size", "32"]


def cli(*args: str) -> subprocess.CompletedProcess:
    """``scin-pipeline`` from this checkout, in its own process (as a user runs it on a copied root)."""
    return subprocess.run(
        [sys.executable, "-m", "scin_pipeline.cli", *args],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=1800,
    )


def test_a_copied_data_root_reruns_and_serves_without_the_original(tmp_path):
    original, copy = tmp_path / "original" / "data", tmp_path / "moved" / "data"
    built = cli(*DEMO, "--out", str(original))
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    shutil.copytree(original, copy, symlinks=True)
    shutil.rmtree(tmp_path / "original")

    # What the tables keep is relative to the root.
    files = pd.read_parquet(copy / "tables" / "image_files.parquet")
    stored = files.loc[files["status"] == "ok", "local_path"]
    assert len(stored) and not stored.map(lambda p: Path(p).is_absolute()).any()
    candidate = pd.read_parquet(copy / "tables" / "baseline_cnn.parquet")
    assert candidate["package_dir"].iloc[0].startswith("models/baseline_cnn/")

    # Up to date in the copy: Dagster's own record (dagster_home moved with the root) says so.
    again = cli(*DEMO, "--out", str(copy), "--only-stale")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "every asset up to date" in again.stdout

    # Recomputed from the copy's own files: pixels from its images, every package from its models/ folder,
    # the evaluation logged into its MLflow runs.
    rerun = cli(*DEMO, "--out", str(copy), "--select", "image_tensors,model_evaluation")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    evaluation = pd.read_parquet(copy / "tables" / "model_evaluation.parquet")
    assert set(evaluation["model"]) >= {"baseline_cnn", "metadata_model"}

    # The web service loads the champion from the copy's registry and answers.
    from fastapi.testclient import TestClient

    from scin_pipeline.serve import create_app

    photo = next((copy / "images").glob("*.png")).read_bytes()
    app = create_app(
        "models:/scin-condition-classifier@champion", tracking_uri=f"sqlite:///{copy.resolve()}/mlflow/mlflow.db"
    )
    with TestClient(app) as client:
        answer = client.post("/predict", files={"file": ("photo.png", photo, "image/png")})
    assert answer.status_code == 200, answer.text
    assert answer.json()["probabilities"]

    assert not (tmp_path / "original").exists()  # nothing wrote to (or recreated) the original either
