"""Choose the Keras 3 backend and the mixed-precision policy, and describe both for the run log.

Keras reads ``KERAS_BACKEND`` once, when ``keras`` is first imported, so the backend of a process is
fixed by whoever imports keras first. ``select_backend`` therefore sets the environment variable and
must run before any ``import keras`` in the process (the Dagster training asset calls it at the top of
its compute function; the models and training modules import keras lazily inside functions for this
reason). Asking for a different backend after keras was imported raises ``BackendError`` instead of
silently training on the wrong one.

``"auto"`` means: the ``KERAS_BACKEND`` environment variable when set (deployment decides), else JAX
when it is installed and sees a GPU/TPU (the design's GPU host), else TensorFlow (the CPU default of
this project), else whichever of JAX / PyTorch is installed. Mixed precision ``"auto"`` turns on
``mixed_bfloat16`` only where an accelerator is visible: on CPU bfloat16 matmuls are emulated and slower
than float32.

This module imports neither keras nor a backend at module level.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

BACKENDS = ("tensorflow", "jax", "torch")
BACKEND_CHOICES = ("auto", *BACKENDS)
MIXED_PRECISION_CHOICES = ("auto", "bfloat16", "off")
# The pip package to install for each backend (the import name is the backend name).
_BACKEND_PACKAGES = {"tensorflow": "tensorflow-cpu (or tensorflow)", "jax": "jax", "torch": "torch"}


class BackendError(RuntimeError):
    """The requested Keras backend cannot be used in this process."""


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _jax_sees_accelerator() -> bool:
    try:
        import jax

        return any(d.platform != "cpu" for d in jax.devices())
    except Exception:  # a jax without a usable plugin is simply "no accelerator"
        return False


def _resolve_auto() -> str:
    from_env = os.environ.get("KERAS_BACKEND", "").strip().lower()
    if from_env:
        return from_env
    if _installed("jax") and _jax_sees_accelerator():
        return "jax"
    for name in ("tensorflow", "jax", "torch"):
        if _installed(name):
            return name
    raise BackendError("no Keras backend is installed: install one of tensorflow-cpu, jax or torch")


def _imported_keras_backend() -> str | None:
    """The backend of an already imported keras, or None when keras is not imported yet."""
    if "keras" not in sys.modules:
        return None
    import keras

    return keras.config.backend()


def select_backend(name: str = "auto") -> str:
    """Fix the Keras backend of this process (sets ``KERAS_BACKEND``) and return its name.

    Must be called before keras is imported. Raises ``BackendError`` when the backend's package is not
    installed, or when keras is already imported with another backend.
    """
    requested = (name or "auto").strip().lower()
    if requested not in BACKEND_CHOICES:
        raise BackendError(f"unknown Keras backend {name!r}: choose one of {', '.join(BACKEND_CHOICES)}")
    backend = _resolve_auto() if requested == "auto" else requested
    if backend not in BACKENDS:
        raise BackendError(f"KERAS_BACKEND={backend!r} is not a supported backend: choose one of {', '.join(BACKENDS)}")
    if not _installed(backend):
        raise BackendError(
            f"Keras backend {backend!r} needs the Python package {_BACKEND_PACKAGES[backend]!r}, "
            f"which is not installed in {sys.prefix}: pip install it, or choose another backend"
        )
    active = _imported_keras_backend()
    if active is not None and active != backend:
        raise BackendError(
            f"keras is already imported in this process with backend {active!r}, so backend {backend!r} "
            "can no longer be selected (Keras reads KERAS_BACKEND once, at import). Set "
            f"KERAS_BACKEND={backend} in the environment of the process (e.g. the Dagster code location / "
            "run worker, or `KERAS_BACKEND=... dagster dev`), or call select_backend() before anything "
            "imports keras (look for a module-level `import keras` in the code location)."
        )
    os.environ["KERAS_BACKEND"] = backend
    return backend


def _active_backend() -> str:
    return _imported_keras_backend() or os.environ.get("KERAS_BACKEND") or _resolve_auto()


def accelerator_devices(backend: str | None = None) -> list[str]:
    """Names of the GPUs/TPUs the given (default: active) backend can use; empty on CPU."""
    backend = backend or _active_backend()
    try:
        if backend == "jax":
            import jax

            return [str(d) for d in jax.devices() if d.platform != "cpu"]
        if backend == "tensorflow":
            import tensorflow as tf

            return [d.name for d in tf.config.list_physical_devices() if d.device_type in ("GPU", "TPU")]
        if backend == "torch":
            import torch

            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []
    return []


def mixed_precision_policy(setting: str = "auto") -> str:
    """The Keras dtype policy name for a config setting: "mixed_bfloat16" or "float32"."""
    setting = (setting or "auto").strip().lower()
    if setting not in MIXED_PRECISION_CHOICES:
        raise ValueError(f"mixed_precision={setting!r}: choose one of {', '.join(MIXED_PRECISION_CHOICES)}")
    if setting == "bfloat16":
        return "mixed_bfloat16"
    if setting == "off":
        return "float32"
    return "mixed_bfloat16" if accelerator_devices() else "float32"


def apply_mixed_precision(setting: str = "auto") -> str:
    """Set the global Keras dtype policy for ``setting`` and return its name.

    Call it BEFORE building models: a layer takes the global policy when it is created.
    """
    policy = mixed_precision_policy(setting)
    import keras

    keras.config.set_dtype_policy(policy)
    return policy


def describe_backend() -> dict:
    """Backend, devices and dtype policy of this process, flat and JSON-friendly (for MLflow params)."""
    import keras

    backend = keras.config.backend()
    accelerators = accelerator_devices(backend)
    return {
        "backend": backend,
        "keras_version": keras.__version__,
        "devices": ", ".join(accelerators) if accelerators else "cpu",
        "policy": keras.config.dtype_policy().name,
    }
