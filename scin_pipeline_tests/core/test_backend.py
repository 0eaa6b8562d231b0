"""core.backend: choosing the Keras backend per process, mixed precision, and one model across backends.

Backend choice happens at keras import, so each backend runs in its own child process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from scin_pipeline.core import backend
from scin_pipeline.core.backend import BackendError, mixed_precision_policy, select_backend


def _run_child(code: str, env_overrides: dict[str, str], *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "JAX_PLATFORMS")}
    env.update({"TF_CPP_MIN_LOG_LEVEL": "3", **env_overrides})
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


TRAIN_SAVE_LOAD = """
    import json, sys
    import numpy as np
    from scin_pipeline.core.backend import describe_backend, select_backend

    chosen = select_backend("auto")  # KERAS_BACKEND comes from the environment
    import keras
    from scin_pipeline.core.models import build_baseline_cnn
    from scin_pipeline.core.training import TrainConfig, fit_classifier, predict_in_batches

    save_to, load_from, probabilities_to = sys.argv[1:4]
    rng = np.random.default_rng(0)
    images, y = rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8), np.arange(48) % 3
    keras.utils.set_random_seed(0)
    model = build_baseline_cnn(3, 32)
    result = fit_classifier(model, (images, y), images[:12], y[:12], class_weight=None,
                            config=TrainConfig(epochs=1, batch_size=16))
    report = {"chosen": chosen, "keras": keras.config.backend(), "described": describe_backend(),
              "epochs": len(result.history), "val_macro_f1": float(result.history["val_macro_f1"].iloc[0])}
    # The jitted JAX path (and predict_on_batch elsewhere) must agree with Keras' own predict.
    report["batched_vs_predict"] = float(np.abs(predict_in_batches(model, images, batch_size=20)
                                                - model.predict(images, verbose=0)).max())
    if save_to != "-":
        model.save(save_to)
    if load_from != "-":
        model = keras.models.load_model(load_from)
    np.save(probabilities_to, model.predict(images[:8], verbose=0))
    print(json.dumps(report))
"""


def test_baseline_trains_on_tensorflow_and_jax_and_a_jax_model_loads_on_tensorflow(tmp_path):
    model_file = str(tmp_path / "baseline_jax.keras")
    jax_report = _run_child(TRAIN_SAVE_LOAD, {"KERAS_BACKEND": "jax"}, model_file, "-", str(tmp_path / "jax.npy"))
    tf_report = _run_child(TRAIN_SAVE_LOAD, {"KERAS_BACKEND": "tensorflow"}, "-", model_file, str(tmp_path / "tf.npy"))
    assert (jax_report["chosen"], jax_report["keras"], jax_report["described"]["backend"]) == ("jax",) * 3
    assert (tf_report["chosen"], tf_report["keras"], tf_report["described"]["backend"]) == ("tensorflow",) * 3
    for report in (jax_report, tf_report):
        assert report["epochs"] == 1 and 0.0 <= report["val_macro_f1"] <= 1.0
        assert report["batched_vs_predict"] < 1e-5
        assert report["described"]["policy"] == "float32" and report["described"]["devices"] == "cpu"
    saved_under_jax, loaded_under_tf = np.load(tmp_path / "jax.npy"), np.load(tmp_path / "tf.npy")
    assert saved_under_jax.shape == (8, 3)
    np.testing.assert_allclose(loaded_under_tf, saved_under_jax, atol=1e-4)


def test_auto_without_an_accelerator_or_env_var_picks_tensorflow():
    code = """
        import json, sys
        from scin_pipeline.core.backend import select_backend
        chosen = select_backend("auto")
        print(json.dumps({"chosen": chosen, "keras_imported": "keras" in sys.modules}))
    """
    report = _run_child(code, {"JAX_PLATFORMS": "cpu"})  # jax sees no GPU even on a GPU host
    assert report == {"chosen": "tensorflow", "keras_imported": False}


def test_auto_honours_the_keras_backend_env_var(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert backend._resolve_auto() == "jax"
    monkeypatch.setenv("KERAS_BACKEND", "theano")
    with pytest.raises(BackendError, match="not a supported backend"):
        select_backend("auto")


def test_select_backend_refuses_a_second_backend_once_keras_is_imported(monkeypatch):
    import keras

    active = keras.config.backend()
    other = "jax" if active != "jax" else "tensorflow"
    monkeypatch.setenv("KERAS_BACKEND", active)
    with pytest.raises(BackendError) as error:
        select_backend(other)
    message = str(error.value)
    assert f"already imported in this process with backend {active!r}" in message
    assert f"KERAS_BACKEND={other}" in message and "code location" in message
    assert select_backend(active) == active  # the active one is fine


def test_select_backend_names_a_missing_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real_find_spec(name, *a)
    )
    with pytest.raises(BackendError, match="needs the Python package 'torch'"):
        select_backend("torch")
    with pytest.raises(BackendError, match="unknown Keras backend 'mxnet'"):
        select_backend("mxnet")


def test_mixed_precision_policy(monkeypatch):
    assert mixed_precision_policy("off") == "float32"
    assert mixed_precision_policy("bfloat16") == "mixed_bfloat16"
    monkeypatch.setattr(backend, "accelerator_devices", lambda name=None: [])
    assert mixed_precision_policy("auto") == "float32"
    monkeypatch.setattr(backend, "accelerator_devices", lambda name=None: ["cuda:0"])
    assert mixed_precision_policy("auto") == "mixed_bfloat16"
    with pytest.raises(ValueError, match="mixed_precision='float16'"):
        mixed_precision_policy("float16")


def test_apply_mixed_precision_sets_the_global_policy():
    import keras

    try:
        assert backend.apply_mixed_precision("bfloat16") == "mixed_bfloat16"
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
        assert backend.describe_backend()["policy"] == "mixed_bfloat16"
    finally:
        keras.config.set_dtype_policy("float32")
