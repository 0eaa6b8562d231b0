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

Cost per request (:mod:`.limits` says why each default): the body is read under a byte cap and a time limit
(``body_timeout_s``: 408 ``timeout``); the picture's pixel count is checked from its header before it is
decoded (``max_pixels``: 422 ``too_many_pixels``); decoding (with the quality check and preprocessing)
runs in at most ``max_concurrent_predictions`` threads at once, and a request that finds none free within
``queue_timeout_s`` is answered 503 ``busy`` with ``Retry-After``. The model call is micro-batched
(:mod:`.batching`: ``max_batch_size`` rows per call, ``max_batch_wait_ms``, a queue of
``max_queued_predictions`` rows; full: 503 ``busy``). Request headers are timed by the HTTP
protocol (:mod:`.server`).

Privacy: uploads live in memory for the duration of the request and are written nowhere unless
``store_uploads_dir`` is set; then the decoded pixels are written, re-encoded as PNG under a random name, so
nothing of the file but its pixels is kept (no EXIF: no GPS position, camera make or model, capture time; no
file name). The request log line holds the method, path, status and time only: no client address
(uvicorn's access log is off), no file name, no form value. A client that goes away mid-request is one
info line, not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import os
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scin_pipeline.core.atomic import write_bytes_atomic
from scin_pipeline.serve.batching import Batchers, QueueFull
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
from scin_pipeline.serve.limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_BATCH_WAIT_MS,
    DEFAULT_MAX_CONCURRENT_PREDICTIONS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_QUEUED_PREDICTIONS,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_QUEUE_TIMEOUT_S,
    ServeLimits,
)
from scin_pipeline.serve.model import DEFAULT_MODEL_URI, ServedModel
from scin_pipeline.serve.prediction import (
    NOT_A_DIAGNOSIS,
    answer,
    decode_upload,
    model_info,
    notice_for,
    prepare_inputs,
)

CLIENT_CLOSED_REQUEST = 499  # nginx's code for "the client went away before the answer": logged, never sent
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


class QuestionnaireRecord(BaseModel):
    questionnaire_dropout: float = Field(
        description="share of training examples whose whole questionnaire was blanked (modality dropout)"
    )
    val_macro_f1: float | None = Field(description="validation macro-F1 with each case's answers")
    val_blank_macro_f1: float | None = Field(description="validation macro-F1 with every questionnaire blank")
    val_balanced_accuracy: float | None
    val_blank_balanced_accuracy: float | None


class CalibrationInfo(BaseModel):
    calibrated: bool = Field(description="the probabilities served are calibrated (a fitted temperature)")
    method: Literal["temperature_scaling"] | None = Field(description="null: not calibrated")
    temperature: float | None = Field(
        description="T of softmax(logits / T), fitted on the validation split by minimising the negative "
        "log-likelihood; T > 1 softens an over-confident model, T < 1 sharpens an under-confident one"
    )
    fitted_on: str | None = Field(description="the split T was fitted on (val)")
    text: str = Field(description="one sentence for people, shown on the page")


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
    fairness_status: Literal["passed", "failed", "not_judged"] | None = Field(
        default=None,
        description="the fairness gate's outcome for this version (registry tag scin.fairness_status); "
        "not_judged: some skin-tone group had too few cases to judge, and the version was named champion "
        "anyway (unjudged_policy allow_with_flag); null: never compared",
    )
    fairness_unjudged: str | None = Field(
        default=None, description="the groups too small to judge, when not_judged (tag scin.fairness_unjudged)"
    )
    run_id: str | None = Field(description="MLflow run that trained it")
    questionnaire: QuestionnaireRecord | None = Field(
        default=None,
        description="a model that reads the questionnaire: how it was trained to do without it and its "
        "validation scores with and without answers (null: reads none, or not recorded for this version)",
    )
    class_notes: dict[str, str] = Field(
        default_factory=dict, description="what a class means when it is not one condition's name (e.g. other)"
    )
    calibration: CalibrationInfo = Field(description="whether and how the probabilities are calibrated")


class MetadataField(BaseModel):
    name: str
    multiple: bool = Field(description="a check-box group: a list of ticked case columns")
    values: list[str]


class ModelDescription(ModelInfo):
    notice: str
    max_upload_bytes: int
    max_pixels: int = Field(description="largest picture accepted, in pixels (width x height)")
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


class AnswersSummary(BaseModel):
    given: int = Field(description="questions answered (a check-box group counts when one box is ticked)")
    questions: int = Field(description="questions in the questionnaire")
    missing: list[str] = Field(description="the questions not answered")
    read_by_model: bool = Field(description="the model reads the questionnaire")
    warning: str | None = Field(
        description="set when the model reads the questionnaire, some answers are missing and its validation "
        "score is lower without answers (or that was not measured); null otherwise"
    )


class PredictionResponse(BaseModel):
    notice: str = Field(description="NOT A DIAGNOSIS, always")
    probabilities: dict[str, float] = Field(
        description="probability per condition (sums to 1); calibrated when model.calibration.calibrated"
    )
    top: list[RankedCondition] = Field(description="the most probable conditions, best first")
    model: ModelInfo
    quality: QualityVerdict | None = Field(description="the image's quality check (null: no image sent)")
    image_used: bool
    metadata_used: bool
    metadata: dict[str, str | list[str]] = Field(description="the questionnaire answers received")
    answers: AnswersSummary


class ErrorResponse(BaseModel):
    error: str = Field(
        description="short code, e.g. too_large, too_many_pixels, too_small, truncated, unsupported_media_type, "
        "timeout, busy"
    )
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
        400: "malformed multipart body (cut off, no closing boundary, a part header too long)",
        408: "the upload did not arrive within the body timeout (`timeout`)",
        413: "upload over the size limit",
        415: "not multipart/form-data, or not a PNG/JPEG image",
        422: "empty, truncated or corrupt image; more pixels than the limit (`too_many_pixels`); a side under "
        "16 px (`too_small`); unknown field or value; no image",
    }.items()
}
_UNAVAILABLE: dict[int | str, dict[str, Any]] = {  # FastAPI's type for `responses`
    503: {
        "model": UnavailableResponse,
        "description": "`no_model`: no version holds the alias (no champion yet, or model_comparison removed it), "
        "the reason is in `detail`; or `busy` (an ErrorResponse): every prediction slot stayed taken for the "
        "queue timeout, try again after `Retry-After` seconds",
    }
}


# ------------------------------------------------------------------------------------------------ app


def _store_upload(folder: Path, rgb: np.ndarray) -> Path:
    """The decoded pixels as a new PNG under a random name: no EXIF, ICC, text chunks or file name of the
    upload survive (PIL writes only what it is given; the pixels are already EXIF-oriented)."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(rgb, "RGB").save(buffer, format="PNG", compress_level=3)
    target = folder / f"{uuid.uuid4().hex}.png"
    write_bytes_atomic(buffer.getvalue(), target)
    return target


class _RequestLog:
    """One log line per request: method, path, status, time; nothing about who sent it or what. An exception
    is logged with its traceback (it names code, not the request) and answered 500; a client that went away
    is one info line (it is not the service failing, and a traceback per disconnect would let anyone flood
    the log)."""

    def __init__(self, app: ASGIApp, failure_response) -> None:
        self.app = app
        self.failure_response = failure_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: int | None = None

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        method, path = scope["method"], scope["path"]
        try:
            await self.app(scope, receive, send_and_note)
        except ClientDisconnect:
            status = CLIENT_CLOSED_REQUEST
        except Exception:
            LOG.exception("%s %s failed", method, path)
            if status is None:
                await self.failure_response()(scope, receive, send)
                status = 500
        elapsed = (time.perf_counter() - started) * 1000
        if status == CLIENT_CLOSED_REQUEST:
            LOG.info("%s %s client disconnected after %.1f ms (no answer sent)", method, path, elapsed)
        else:
            LOG.info("%s %s %d %.1f ms", method, path, status or 0, elapsed)


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
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_concurrent_predictions: int = DEFAULT_MAX_CONCURRENT_PREDICTIONS,
    queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_batch_wait_ms: float = DEFAULT_MAX_BATCH_WAIT_MS,
    max_queued_predictions: int = DEFAULT_MAX_QUEUED_PREDICTIONS,
) -> FastAPI:
    """The service for ``model_uri``. Its version is resolved and loaded now: a ServeError here means it
    cannot start (no such model, a model that is not ours); an alias that holds no version is not one: the
    service starts and answers 503 until it does. ``alias_poll_s``: how often the alias is re-resolved
    while the app runs (0: never; a pinned ``models:/NAME/VERSION`` never is). The limits are
    :class:`~scin_pipeline.serve.limits.ServeLimits`' (ValueError when one is out of range).

    ``served_model`` skips the registry (an already loaded model, e.g. for benchmarks).
    """
    ServeLimits(  # validates the limits the app enforces (the others are the server's)
        max_upload_bytes=max_upload_bytes,
        max_pixels=max_pixels,
        max_concurrent_predictions=max_concurrent_predictions,
        queue_timeout_s=queue_timeout_s,
        body_timeout_s=body_timeout_s,
        limit_concurrency=max(max_concurrent_predictions + 1, 2),
        max_batch_size=max_batch_size,
        max_batch_wait_ms=max_batch_wait_ms,
        max_queued_predictions=max_queued_predictions,
    )
    if served_model is not None:
        served_model.warm_up()
        follower = ModelFollower.fixed(served_model)
    else:
        follower = ModelFollower(model_uri, tracking_uri=tracking_uri, poll_s=alias_poll_s)
        follower.start()
    store = Path(store_uploads_dir).expanduser().resolve() if store_uploads_dir else None
    page = _page_html()
    prediction_slots = asyncio.Semaphore(max_concurrent_predictions)
    busy_retry_after = str(max(1, math.ceil(queue_timeout_s or 1)))
    batchers = Batchers(
        max_batch_size=max_batch_size, max_batch_wait_ms=max_batch_wait_ms, max_queued=max_queued_predictions
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        follower.start_polling()
        try:
            yield
        finally:
            await run_in_threadpool(follower.stop_polling)
            await run_in_threadpool(batchers.stop)

    app = FastAPI(
        title="SCIN skin-condition classifier (NOT A DIAGNOSIS)",
        description="Classifies a skin photo with the registry's model. " + NOT_A_DIAGNOSIS,
        version="1",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.model_source = follower
    app.state.batchers = batchers

    def notice(served: ServedModel | None) -> str:
        return notice_for(served) if served is not None else NOT_A_DIAGNOSIS

    def error_response(
        status: int, error: str, detail: str, served: ServedModel | None, headers: dict | None = None
    ) -> JSONResponse:
        return JSONResponse(
            {"error": error, "detail": detail, "notice": notice(served)},
            status_code=status,
            headers={"Cache-Control": "no-store", **(headers or {})},
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

    app.add_middleware(
        _RequestLog,
        failure_response=lambda: error_response(
            500, "internal_error", "the service failed on this request", follower.served
        ),
    )

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
            "max_pixels": max_pixels,
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
            try:
                parsed: PredictionRequest = await asyncio.wait_for(
                    read_prediction_request(request, max_upload_bytes=max_upload_bytes), timeout=body_timeout_s
                )
            except TimeoutError:
                return error_response(
                    408,
                    "timeout",
                    f"the upload did not arrive within {body_timeout_s:g} s: the connection is too slow or "
                    f"stalled; try again, or send a smaller photo",
                    served,
                    headers={"Connection": "close"},
                )
            if not await _take_slot():
                return error_response(
                    503,
                    "busy",
                    "the service is busy with other photos right now: try again in a few seconds",
                    served,
                    headers={"Retry-After": busy_retry_after},
                )
            try:
                quality, images, cases = await run_in_threadpool(_prepare, served, parsed)
            finally:
                prediction_slots.release()
            try:
                probabilities = await batchers.for_model(served).predict(images, cases)
            except QueueFull:
                return error_response(
                    503,
                    "busy",
                    "the service is busy with other photos right now: try again in a second",
                    served,
                    headers={"Retry-After": "1"},
                )
            result = answer(served, parsed, quality, probabilities)
        except RequestError as exc:
            return error_response(exc.status, exc.error, exc.detail, served)
        except ClientDisconnect:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(
            PredictionResponse.model_validate(result).model_dump(mode="json"), headers={"Cache-Control": "no-store"}
        )

    async def _take_slot() -> bool:
        """A prediction slot, waiting at most ``queue_timeout_s``; False when none came free."""
        if queue_timeout_s == 0:
            if prediction_slots.locked():
                return False
            await prediction_slots.acquire()  # a free slot: does not wait
            return True
        try:
            await asyncio.wait_for(prediction_slots.acquire(), timeout=queue_timeout_s)
        except TimeoutError:
            return False
        return True

    def _prepare(served: ServedModel, parsed: PredictionRequest):
        # In a worker thread, inside a slot: the decoded pixels exist only here; what leaves is the quality
        # verdict and the model's input (a small preprocessed square), queued for the batcher.
        rgb = decode_upload(parsed.image, max_pixels) if parsed.image is not None else None
        prepared = prepare_inputs(served, parsed, rgb)
        if store is not None and rgb is not None:
            _store_upload(store, rgb)
        return prepared

    return app
