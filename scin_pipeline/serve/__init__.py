"""``scin-pipeline serve``: try the registry's champion on one photo, in a browser or as a JSON API.

- :mod:`.model`: resolve ``models:/NAME@champion`` to one registered version, load exactly that version,
  unwrap the packaged classifier;
- :mod:`.follow`: follow the alias while serving (poll, load the new version aside, swap it in; no version:
  503 with the reason); a pinned ``models:/NAME/VERSION`` is never re-resolved;
- :mod:`.inputs`: the upload (size cap while reading, memory only) and the optional questionnaire;
- :mod:`.prediction`: one decode, training's preprocessing, the quality verdict, the answer with its
  "NOT A DIAGNOSIS" notice;
- :mod:`.limits`: what one request may cost (bytes, pixels, prediction slots) and how long a client may take;
- :mod:`.batching`: requests that arrive together share one model call (a bounded queue, one worker per model);
- :mod:`.app`: the FastAPI application (page, ``POST /predict``, ``GET /model``, ``GET /status``, OpenAPI
  schema);
- :mod:`.server`: uvicorn with those limits (a deadline for request headers, which uvicorn lacks);
  ``python -m scin_pipeline.serve.server``;
- ``static/index.html``: the page, self-contained (no CDN, no external asset).

docs/serving.md describes the service for users.
"""

import importlib

# Loaded on first use (PEP 562): the CLI reads the serve options (.limits) without importing FastAPI, MLflow
# and the model code, which only `scin-pipeline serve` itself needs.
_EXPORTS = {
    "create_app": "app",
    "DEFAULT_ALIAS_POLL_S": "follow",
    "ModelFollower": "follow",
    "DEFAULT_MAX_PIXELS": "limits",
    "DEFAULT_MAX_UPLOAD_BYTES": "limits",
    "ServeLimits": "limits",
    "DEFAULT_MODEL_URI": "model",
    "AliasNotSet": "model",
    "ServedModel": "model",
    "ServeError": "model",
    "load_served_model": "model",
    "NOT_A_DIAGNOSIS": "prediction",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
