"""The FastAPI application of ``scin-pipeline serve``: the page, ``POST /predict``, ``GET /model``, ``GET /status``,
``GET /healthz``.

The model comes from a :class:`~scin_pipeline.serve.follow.ModelFollower`: ``models:/NAME@ALIAS`` is
re-resolved every ``alias_poll_s`` seconds by a thread that runs with the app's lifespan, and a new version
is swapped in without a restart; each request reads the current model once and finishes on it. While no
version holds the alias, ``POST /predict`` and ``GET /model`` answer 503 with the reason (the one
model_comparison recorded when it removed the alias, else "no champion yet"); the page, ``/status`` and
``/healthz`` keep working.

FastAPI (on Starlette, served by uvicorn) rather than bare Starlette: the OpenAPI schema of the answers
comes from the pydantic models below. ``POST /predict`` reads its multipart body itself
(:mod:`scin_pipeline.serve.inputs`: a size cap enforced while reading, nothing spooled to disk), so its
request schema is declared by hand (``openapi_extra``). FastAPI's /docs and /redoc pages are switched off:
they load their scripts from a CDN; the schema is at ``/openapi.json``.

Privacy: uploads live in memory for the duration of the request and are written nowhere unless
``store_uploads_dir`` is set (then under a random name, with no metadata). The request log line holds the
method, path, status and time only: no client address (uvicorn's access log is off), no file name, no
form value.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from scin_pipeline.core.atomic import write_bytes_atomic
from scin_pipeline.serve.follow import DEFAULT_ALIAS_POLL_S, ModelFollower, ServingState
from scin_pipeline.serve.inputs import (
    CHECKBOX_FIELDS,
    CHOICE_FIELDS,
    FILE_FIELD,
    PredictionRequest,
    RequestError,
    metadata_field_descriptions,
    read_prediction_request,
)
from scin_pipeline.serve.model import DEFAULT_MODEL_URI, ServedModel
from scin_pipeline.serve.prediction import NOT_A_DIAGNOSIS, model_info, notice_for, predict

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # phone photos are 2-6 MB
PAGE_RESOURCE = "static/index.html"
LOG = logging.getLogger("scin_pipeline.serve")
# The page loads nothing from elsewhere; the browser is told to refuse it too.
PAGE_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


# ------------------------------------------------------------------------------------------------ schema


class ModelInfo(BaseModel):
    name: str | None = Field(description="registered model name")
    version: str | None = Field(description="registered model version that answers")
    alias: str | None = Field(
        description="the alias this version was reached through (e.g. champion); "
        "null: the service was started on a pinned version"
    )
    uri: str = Field(description="the exact version loaded, models:/NAME/VERSION")
    kind: Literal["keras_image", "keras_multimodal", "sklearn_metadata"]
    classes: list[str]
    image_size: int | None = Field(description="side in px of the square the image is resized to")
    uses_image: bool
    uses_metadata: bool
    synthetic_data: bool = Field(
        description="the version was trained on SYNTHETIC images (registry tag scin.synthetic_data)"
    )
    run_id: str | None = Field(description="MLflow run that trained it")


class MetadataField(BaseModel):
    name: str
    multiple: bool = Field(description="a check-box group: a list of ticked case columns")
    values: list[str]


class ModelDescription(ModelInfo):
    notice: str
    max_upload_bytes: int
    stores_uploads: bool = Field(description="accepted uploads are kept on the server (--store-uploads)")
    metadata_fields: list[MetadataField] = Field(
        description="optional questionnaire fields of POST /predict (used when uses_metadata)"
    )


class QualityIssue(BaseModel):
    issue: Literal["too_small", "dark", "overexposed", "low_information", "blurry"]
    detail: str


class QualityVerdict(BaseModel):
    verdict: Literal["ok", "warning"]
    issues: list[QualityIssue]
    width: int
    height: int
    dark_reference: str
    metrics: dict[str, float]


class RankedCondition(BaseModel):
    condition: str
    probability: float


class PredictionResponse(BaseModel):
    notice: str = Field(description="NOT A DIAGNOSIS, always")
    probabilities: dict[str, float] = Field(description="probability per condition (sums to 1)")
    top: list[RankedCondition] = Field(description="the most probable conditions, best first")
    model: ModelInfo
    quality: QualityVerdict | None = Field(description="the image's quality check (null: no image sent)")
    image_used: bool
    metadata_used: bool
    metadata: dict[str, str | list[str]] = Field(description="the questionnaire answers received")


class ErrorResponse(BaseModel):
    error: str = Field(description="short code, e.g. too_large, truncated, unsupported_media_type")
    detail: str
    notice: str


class UnavailableResponse(ErrorResponse):
    error: Literal["no_model"]
    detail: str = Field(
        description="why no version is served, e.g. the reason model_comparison recorded when "
        "it removed the alias @champion"
    )
    requested_uri: str
    name: str
    alias: str | None
    cleared_at: str | None = Field(
        description="when model_comparison removed the alias (null: never set, or not removed by the pipeline)"
    )


class ServingStatus(BaseModel):
    serving: bool = Field(description="a version is loaded and answers POST /predict")
    requested_uri: str = Field(description="what the service was started with (--model)")
    name: str
    alias: str | None = Field(description="the alias followed (null: a pinned models:/NAME/VERSION)")
    version: str | None = Field(description="the registered version that answers now")
    uri: str | None = Field(description="models:/NAME/VERSION of the version that answers now")
    reason: str | None = Field(description="why nothing is served (when serving is false)")
    cleared_at: str | None
    since: str = Field(description="when the current state began (UTC, ISO 8601)")
    follows_alias: bool = Field(description="the alias is re-resolved and a new version swapped in")
    poll_interval_s: float | None
    last_checked: str | None = Field(description="the last time the registry was asked (UTC)")
    last_error: str | None = Field(description="the last registry or load error, while it lasts")


def _predict_request_schema() -> dict:
    properties: dict = {
        FILE_FIELD: {
            "type": "string",
            "format": "binary",
            "description": "PNG or JPEG image (required unless the model is metadata-only)",
        }
    }
    for name, values in CHOICE_FIELDS.items():
        properties[name] = {"type": "string", "enum": values}
    for name, columns in CHECKBOX_FIELDS.items():
        properties[name] = {
            "type": "array",
            "items": {"type": "string", "enum": columns},
            "description": "ticked case columns (repeat the field, or comma-separate)",
        }
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": {"type": "object", "properties": properties}}},
        }
    }


_ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "malformed multipart body",
        413: "upload over the size limit",
        415: "not multipart/form-data, or not a PNG/JPEG image",
        422: "empty, truncated, corrupt or decompression-bomb image; unknown field or value; no image",
    }.items()
}
_UNAVAILABLE = {
    503: {
        "model": UnavailableResponse,
        "description": "no version holds the alias (no champion yet, "
        "or model_comparison removed it): the reason is in `detail`",
    }
}


# ------------------------------------------------------------------------------------------------ app


def _store_upload(folder: Path, data: bytes) -> None:
    suffix = ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg"
    write_bytes_atomic(data, folder / f"{uuid.uuid4().hex}{suffix}")


def _page_html() -> str:
    return resources.files("scin_pipeline.serve").joinpath(PAGE_RESOURCE).read_text(encoding="utf-8")


def create_app(
    model_uri: str = DEFAULT_MODEL_URI,
    *,
    tracking_uri: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    store_uploads_dir: str | os.PathLike | None = None,
    served_model: ServedModel | None = None,
    alias_poll_s: float = DEFAULT_ALIAS_POLL_S,
) -> FastAPI:
    """The service for ``model_uri``. Its version is resolved and loaded now: a ServeError here means it
    cannot start (no such model, a model that is not ours); an alias that holds no version is not one: the
    service starts and answers 503 until it does. ``alias_poll_s``: how often the alias is re-resolved
    while the app runs (0: never; a pinned ``models:/NAME/VERSION`` never is).

    ``served_model`` skips the registry (an already loaded model, e.g. for benchmarks).
    """
    if not isinstance(max_upload_bytes, int) or max_upload_bytes < 1:
        raise ValueError(f"max_upload_bytes must be a positive int, got {max_upload_bytes!r}")
    if served_model is not None:
        served_model.warm_up()
        follower = ModelFollower.fixed(served_model)
    else:
        follower = ModelFollower(model_uri, tracking_uri=tracking_uri, poll_s=alias_poll_s)
        follower.start()
    store = Path(store_uploads_dir).expanduser().resolve() if store_uploads_dir else None
    page = _page_html()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        follower.start_polling()
        try:
            yield
        finally:
            await run_in_threadpool(follower.stop_polling)

    app = FastAPI(
        title="SCIN skin-condition classifier (NOT A DIAGNOSIS)",
        description="Classifies a skin photo with the registry's model. " + NOT_A_DIAGNOSIS,
        version="1",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.model_source = follower

    def notice(served: ServedModel | None) -> str:
        return notice_for(served) if served is not None else NOT_A_DIAGNOSIS

    def error_response(status: int, error: str, detail: str, served: ServedModel | None) -> JSONResponse:
        return JSONResponse(
            {"error": error, "detail": detail, "notice": notice(served)},
            status_code=status,
            headers={"Cache-Control": "no-store"},
        )

    def unavailable_response(state: ServingState) -> JSONResponse:
        headers = {"Cache-Control": "no-store"}
        if follower.follows_alias:
            headers["Retry-After"] = str(max(1, math.ceil(follower.poll_s)))
        body = {
            "error": "no_model",
            "detail": state.reason or "no model is loaded",
            "notice": NOT_A_DIAGNOSIS,
            "requested_uri": follower.requested_uri,
            "name": follower.name,
            "alias": follower.alias,
            "cleared_at": state.cleared_at,
        }
        return JSONResponse(body, status_code=503, headers=headers)

    @app.middleware("http")
    async def log_without_personal_data(request: Request, call_next):
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            # The traceback names code, not the request; form values and file names never reach a log.
            LOG.exception("%s %s failed", request.method, request.url.path)
            response = error_response(500, "internal_error", "the service failed on this request", follower.served)
        LOG.info(
            "%s %s %d %.1f ms",
            request.method,
            request.url.path,
            response.status_code,
            (time.perf_counter() - started) * 1000,
        )
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers=PAGE_SECURITY_HEADERS)

    @app.get("/healthz")
    def healthz() -> dict:
        """Liveness: 200 while the process serves HTTP, with or without a model (see /status)."""
        served = follower.served
        return {"status": "ok", "serving": served is not None, "model": served.loaded_uri if served else None}

    @app.get("/status", response_model=ServingStatus)
    def status() -> JSONResponse:
        """Which registered version answers, or why none does; when the registry was last asked."""
        return JSONResponse(
            ServingStatus.model_validate(follower.status()).model_dump(mode="json"),
            headers={"Cache-Control": "no-store"},
        )

    @app.get("/model", response_model=ModelDescription, responses=_UNAVAILABLE)
    def describe_model():
        state = follower.state
        served = state.served
        if served is None:
            return unavailable_response(state)
        description = {
            **model_info(served),
            "notice": notice(served),
            "max_upload_bytes": max_upload_bytes,
            "stores_uploads": store is not None,
            "metadata_fields": metadata_field_descriptions(),
        }
        return JSONResponse(
            ModelDescription.model_validate(description).model_dump(mode="json"), headers={"Cache-Control": "no-store"}
        )

    @app.post(
        "/predict",
        response_model=PredictionResponse,
        responses={**_ERROR_RESPONSES, **_UNAVAILABLE},
        openapi_extra=_predict_request_schema(),
        summary="Class probabilities for one skin photo (NOT A DIAGNOSIS)",
    )
    async def predict_endpoint(request: Request):
        state = follower.state  # read once: this request answers with this model, whatever is swapped in
        served = state.served
        if served is None:
            return unavailable_response(state)
        try:
            parsed: PredictionRequest = await read_prediction_request(request, max_upload_bytes=max_upload_bytes)
            answer = await run_in_threadpool(predict, served, parsed)
            if store is not None and parsed.image is not None:
                await run_in_threadpool(_store_upload, store, parsed.image)
        except RequestError as exc:
            return error_response(exc.status, exc.error, exc.detail, served)
        return JSONResponse(
            PredictionResponse.model_validate(answer).model_dump(mode="json"), headers={"Cache-Control": "no-store"}
        )

    return app
