"""Fixtures of the serving tests: a registry under a temporary data root holding three tiny, really trained
models (keras_image as the champion, sklearn_metadata, keras_multimodal; SYNTHETIC inputs, tagged so), and
``scin-pipeline serve`` started as a subprocess on a free loopback port. The champion carries a temperature
fitted on held-out images, as the training skeleton fits one on the validation split; the others carry none.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import pytest

from scin_pipeline.core import schema
from scin_pipeline_tests.deploy import services

CLASSES = ["Eczema", "Psoriasis", "Urticaria"]
PATTERNS = ["eczema_blotches", "psoriasis_plaques", "urticaria_wheals"]
IMAGE_SIZE = 24
MODEL_NAME = "scin-condition-classifier"
ITCH = "condition_symptoms_itching"
SERVER_START_TIMEOUT_S = 180


def synthetic_skin_rgb(index: int, size: tuple[int, int] = (96, 80), tone: int | None = None) -> np.ndarray:
    """A SYNTHETIC skin photo (core.synthetic's renderer): class index % 3 sets the painted pattern."""
    from scin_pipeline.core.synthetic.lesions import render_skin_image

    return render_skin_image(f"serve-test-{index}", tone or 1 + index % 10, PATTERNS[index % 3], size, seed=7)


def encode(rgb: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(rgb).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def synthetic_cases(n: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """SYNTHETIC questionnaires whose class follows the age group (and the itching box for class 1)."""
    rng = np.random.default_rng(seed)
    ages = np.array(schema.ENUM_VALUES["age_group"][:3])
    y = rng.integers(0, 3, n)
    return pd.DataFrame({"age_group": ages[y], ITCH: y == 1, "sex_at_birth": rng.choice(["FEMALE", "MALE"], n)}), y


@dataclass
class Registry:
    data_root: Path
    tracking_uri: str
    versions: dict[str, str] = field(default_factory=dict)  # kind -> registered version
    champion_kind: str = "keras_image"

    def uri(self, kind: str) -> str:
        return f"models:/{MODEL_NAME}/{self.versions[kind]}"


def _train_packages(folder: Path) -> dict[str, Path]:
    import keras
    from sklearn.linear_model import LogisticRegression

    from scin_pipeline.core.calibration import TemperatureScaling, mean_nll
    from scin_pipeline.core.image_cache import preprocess_image
    from scin_pipeline.core.metadata_model import METADATA_FEATURE_COLUMNS, metadata_features
    from scin_pipeline.core.models import build_baseline_cnn
    from scin_pipeline.core.packaged_model import PackagedClassifier

    keras.utils.set_random_seed(0)
    n = 36
    images = np.stack([preprocess_image(synthetic_skin_rgb(i), IMAGE_SIZE) for i in range(n)])
    y_images = np.arange(n) % 3
    cases, y_cases = synthetic_cases(n)
    features = metadata_features(cases).to_numpy()
    packages = {}

    cnn = build_baseline_cnn(len(CLASSES), IMAGE_SIZE)
    cnn.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    cnn.fit(images, y_images, epochs=2, batch_size=12, verbose=0)
    packages["keras_image"] = PackagedClassifier(
        kind="keras_image", classes=CLASSES, model=cnn, image_size=IMAGE_SIZE, extra={"data": "synthetic"}
    )
    # The served version carries a temperature: a fixed T = 1.7, its NLL on held-out rows recorded as a fit
    # records it. A fit to these 30 rows may be refused (its optimum can raise their ECE); the fit and that
    # guard are tested in core/test_calibration.py, serving a temperature here.
    held_out = np.stack([preprocess_image(synthetic_skin_rgb(i), IMAGE_SIZE) for i in range(n, n + 30)])
    raw, y_held_out = packages["keras_image"].predict_proba(held_out), np.arange(n, n + 30) % 3
    packages["keras_image"].calibration = TemperatureScaling(
        temperature=1.7,
        fitted_rows=len(raw),
        nll_before=mean_nll(raw, y_held_out),
        nll_after=mean_nll(raw, y_held_out, 1.7),
    )

    logistic = LogisticRegression(max_iter=500).fit(features, y_cases)
    packages["sklearn_metadata"] = PackagedClassifier(
        kind="sklearn_metadata", classes=CLASSES, model=logistic, metadata_columns=list(METADATA_FEATURE_COLUMNS)
    )

    image_in = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), dtype="uint8", name="image")
    metadata_in = keras.Input((len(METADATA_FEATURE_COLUMNS),), name="metadata")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255.0)(image_in))
    x = keras.layers.Concatenate()([x, keras.layers.Dense(8, activation="relu")(metadata_in)])
    out = keras.layers.Dense(len(CLASSES), activation="softmax", dtype="float32")(x)
    multimodal = keras.Model({"image": image_in, "metadata": metadata_in}, out)
    multimodal.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    multimodal.fit(
        {"image": images, "metadata": features.astype(np.float32)}, y_cases, epochs=2, batch_size=12, verbose=0
    )
    packages["keras_multimodal"] = PackagedClassifier(
        kind="keras_multimodal",
        classes=CLASSES,
        model=multimodal,
        image_size=IMAGE_SIZE,
        metadata_columns=list(METADATA_FEATURE_COLUMNS),
    )
    return {kind: package.save(folder / kind) for kind, package in packages.items()}


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> Registry:
    """Three registered versions under ``<tmp>/data`` (the embedded store of ``--data-root``); the
    keras_image one is the champion. Tagged scin.synthetic_data=true, as the pipeline tags synthetic runs."""
    from scin_pipeline.resources import MlflowTracking, StoragePaths
    from scin_pipeline.runner import embedded_mlflow_uri

    root = tmp_path_factory.mktemp("serve") / "data"
    uri = embedded_mlflow_uri(root.resolve())
    tracking = MlflowTracking(
        tracking_uri=uri, storage=StoragePaths(data_root=str(root)), registered_model_name=MODEL_NAME
    )
    registry = Registry(data_root=root, tracking_uri=uri)
    for kind, package_dir in _train_packages(root / "packages").items():
        with tracking.training_run(
            run_key=f"serve-test-{kind}",
            run_name=kind,
            tags={"scin.synthetic_data": "true", "scin.candidate": kind},
            params={"kind": kind},
        ) as run:
            _, version = run.log_model(package_dir)
        registry.versions[kind] = version
    tracking.set_champion(registry.versions[registry.champion_kind], reason="serving tests: the image model")
    return registry


def require_chromium() -> str:
    """Debian's /usr/bin/chromium; skip without it on a developer's machine, FAIL under CI=true."""
    found = services.chromium_path()
    if found:
        return found
    message = "Chromium at /usr/bin/chromium not found: run scripts/ensure_system_packages.sh (as root)"
    if services.ci_is_set():
        pytest.fail(f"{message} (CI is set: this test must run, not skip)")
    pytest.skip(message)


@dataclass
class ServerProcess:
    base_url: str
    proc: subprocess.Popen
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def serve_process(registry, tmp_path_factory) -> ServerProcess:
    """``scin-pipeline serve --data-root <registry>`` (default limits) on a free loopback port, in its own
    process group; the whole group is stopped (SIGTERM, then SIGKILL) at the end."""
    port = services.free_port()
    command = serve_command(registry, port)
    yield from run_server_process(command, port, registry, tmp_path_factory.mktemp("serve-log") / "serve.log")


def serve_command(registry: Registry, port: int, *options: str) -> list[str]:
    """``scin-pipeline serve`` on the registry's data root and loopback ``port``, plus ``options``."""
    scin_pipeline = str(Path(sys.executable).parent / "scin-pipeline")
    root = ["--data-root", str(registry.data_root)]
    return [scin_pipeline, "serve", *root, *options, "--host", "127.0.0.1", "--port", str(port)]


def run_server_process(command: list[str], port: int, registry: Registry, log_path: Path):
    """Start ``command`` (a server on ``port``), wait for /healthz, yield its ServerProcess, stop it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SCIN_"))}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(registry.data_root.parent),
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _ready(f"{server.base_url}/healthz"):
            if proc.poll() is not None:
                pytest.fail(f"scin-pipeline serve exited with {proc.returncode}:\n{server.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"scin-pipeline serve not ready in {SERVER_START_TIMEOUT_S} s:\n{server.log_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield server
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=20)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
