"""``scin-pipeline serve``: try the registry's champion on one photo, in a browser or as a JSON API.

- :mod:`.model`: resolve ``models:/NAME@champion`` to one registered version, load exactly that version,
  unwrap the packaged classifier;
- :mod:`.follow`: follow the alias while serving (poll, load the new version aside, swap it in; no version:
  503 with the reason); a pinned ``models:/NAME/VERSION`` is never re-resolved;
- :mod:`.inputs`: the upload (size cap while reading, memory only) and the optional questionnaire;
- :mod:`.prediction`: one decode, training's preprocessing, the quality verdict, the answer with its
  "NOT A DIAGNOSIS" notice;
- :mod:`.limits`: what one request may cost (bytes, pixels, prediction slots) and how long a client may take;
- :mod:`.app`: the FastAPI application (page, ``POST /predict``, ``GET /model``, ``GET /status``, OpenAPI
  schema);
- :mod:`.server`: uvicorn with those limits (a deadline for request headers, which uvicorn lacks);
  ``python -m scin_pipeline.serve.server``;
- ``static/index.html``: the page, self-contained (no CDN, no external asset).

docs/serving.md describes the service for users.
"""

from scin_pipeline.serve.app import create_app
from scin_pipeline.serve.follow import DEFAULT_ALIAS_POLL_S, ModelFollower
from scin_pipeline.serve.limits import DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_BYTES, ServeLimits
from scin_pipeline.serve.model import DEFAULT_MODEL_URI, AliasNotSet, ServedModel, ServeError, load_served_model
from scin_pipeline.serve.prediction import NOT_A_DIAGNOSIS

__all__ = [
    "DEFAULT_ALIAS_POLL_S",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DEFAULT_MODEL_URI",
    "NOT_A_DIAGNOSIS",
    "AliasNotSet",
    "ModelFollower",
    "ServeError",
    "ServeLimits",
    "ServedModel",
    "create_app",
    "load_served_model",
]
