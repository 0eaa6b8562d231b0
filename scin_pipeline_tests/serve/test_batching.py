"""Micro-batched predictions (serve.batching): a batch answers what single predictions answer, requests that
arrive together share one model call, and a full queue is a clean 503."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from scin_pipeline.serve import create_app, load_served_model
from scin_pipeline.serve.batching import MicroBatcher, QueueFull, stack_cases
from scin_pipeline.serve.inputs import CHECKBOX_FIELDS, CHOICE_FIELDS, PredictionRequest
from scin_pipeline.serve.prediction import decode_upload, predict, prepare_inputs
from scin_pipeline_tests.serve.conftest import MODEL_NAME, encode, synthetic_skin_rgb

N = 8
WAIT_S = 30


def questionnaire(i: int) -> dict:
    """A different questionnaire per i: some fields answered, some not, 0-2 boxes ticked per group."""
    answers: dict = {}
    for j, (name, values) in enumerate(CHOICE_FIELDS.items()):
        if (i + j) % 3:
            answers[name] = values[(i * 7 + j) % len(values)]
    for j, (name, columns) in enumerate(CHECKBOX_FIELDS.items()):
        ticked = [columns[(i + j + k) % len(columns)] for k in range((i + j) % 3)]
        if ticked:
            answers[name] = sorted(set(ticked))
    return answers


def requests_of(n: int) -> list[PredictionRequest]:
    return [
        PredictionRequest(image=encode(synthetic_skin_rgb(i, (72 + 8 * i, 64 + 4 * i))), metadata=questionnaire(i))
        for i in range(n)
    ]


@pytest.mark.parametrize("kind", ["keras_multimodal", "keras_image", "sklearn_metadata"])
def test_a_batch_of_different_images_and_questionnaires_answers_what_single_predictions_answer(registry, kind):
    served = load_served_model(registry.uri(kind), tracking_uri=registry.tracking_uri)
    requests = requests_of(N)
    assert len({tuple(sorted(map(str, r.metadata.items()))) for r in requests}) == N  # all different
    prepared = [prepare_inputs(served, r, decode_upload(r.image)) for r in requests]
    single = np.stack([served.predict_proba(images, cases)[0] for _, images, cases in prepared])
    batcher = MicroBatcher(served, max_batch_size=N, max_batch_wait_ms=1000, max_queued=N)

    async def all_at_once():
        return await asyncio.gather(*(batcher.predict(images, cases) for _, images, cases in prepared))

    try:
        batched = np.stack(asyncio.run(all_at_once()))
    finally:
        batcher.stop()
    assert (batcher.batches, batcher.rows) == (1, N)  # one model call for the 8
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-6)
    if kind != "keras_image":  # the questionnaire matters to these: the rows differ
        assert len({tuple(np.round(row, 6)) for row in single}) > 1


def test_stacked_questionnaires_encode_like_single_ones():
    from scin_pipeline.core.metadata_model import metadata_features

    frames = [r.cases() for r in requests_of(5)] + [PredictionRequest(image=None).cases()]
    stacked = metadata_features(stack_cases(frames))
    singles = np.concatenate([metadata_features(frame).to_numpy() for frame in frames])
    np.testing.assert_array_equal(stacked.to_numpy(), singles)


def test_concurrent_requests_share_model_calls_and_get_their_own_answers(registry):
    uri = registry.uri("keras_multimodal")
    app = create_app(uri, tracking_uri=registry.tracking_uri, alias_poll_s=0, max_batch_wait_ms=200)
    served = app.state.model_source.served
    requests = requests_of(N)
    expected = [predict(served, r)["probabilities"] for r in requests]
    answers: dict[int, dict] = {}
    with TestClient(app) as client:

        def send(i: int) -> None:
            metadata = requests[i].metadata
            fields = [(k, (None, v)) for k, vs in metadata.items() for v in ([vs] if isinstance(vs, str) else vs)]
            response = client.post("/predict", files=[("file", ("p.png", requests[i].image, "image/png")), *fields])
            answers[i] = response.json() if response.status_code == 200 else {"status": response.status_code}

        threads = [threading.Thread(target=send, args=(i,)) for i in range(N)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_S)
        batcher = app.state.batchers.for_model(served)
    for i in range(N):
        sent = {k: v if isinstance(v, str) else sorted(v) for k, v in requests[i].metadata.items()}
        assert {k: v if isinstance(v, str) else sorted(v) for k, v in answers[i]["metadata"].items()} == sent
        got = answers[i]["probabilities"]
        assert got.keys() == expected[i].keys()
        np.testing.assert_allclose([got[c] for c in got], [expected[i][c] for c in got], rtol=0, atol=1e-6)
    assert batcher.rows == N and batcher.batches < N  # some requests shared a model call


def test_a_full_prediction_queue_is_answered_503_busy_at_once(registry, monkeypatch):
    app = create_app(
        f"models:/{MODEL_NAME}@champion",
        tracking_uri=registry.tracking_uri,
        alias_poll_s=0,
        max_batch_size=1,
        max_queued_predictions=1,
    )
    served = app.state.model_source.served
    entered, release = threading.Event(), threading.Event()
    original = served.predict_proba

    def held(images, cases):
        entered.set()
        if not release.wait(WAIT_S):
            raise RuntimeError("never released")
        return original(images, cases)

    monkeypatch.setattr(served, "predict_proba", held)
    png = encode(synthetic_skin_rgb(0))
    results: dict[str, object] = {}
    with TestClient(app) as client:

        def send(name: str) -> None:
            results[name] = client.post("/predict", files={"file": ("p.png", png, "image/png")})

        first = threading.Thread(target=send, args=("first",))
        first.start()
        assert entered.wait(WAIT_S), "the first request never reached the model"
        second = threading.Thread(target=send, args=("second",))
        second.start()  # waits in the queue (its one place) behind the held model call
        batcher = app.state.batchers.for_model(served)
        deadline = time.monotonic() + WAIT_S
        while batcher._queue.qsize() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        busy = client.post("/predict", files={"file": ("p.png", png, "image/png")})
        waited = time.monotonic() - started
        release.set()
        first.join(WAIT_S)
        second.join(WAIT_S)
        assert busy.status_code == 503, busy.text
        assert busy.json()["error"] == "busy" and busy.headers["retry-after"] == "1"
        assert "NOT A DIAGNOSIS" in busy.json()["notice"]
        assert waited < 5  # refused at once, not after a wait
        assert results["first"].status_code == 200 and results["second"].status_code == 200  # type: ignore[union-attr]
        assert client.post("/predict", files={"file": ("p.png", png, "image/png")}).status_code == 200


def test_the_queue_refuses_above_its_bound_without_a_worker_in_between():
    class Slow:
        uses_image = False

        def predict_proba(self, images, cases):
            time.sleep(0.2)
            return np.full((len(cases), 2), 0.5)

    batcher = MicroBatcher(Slow(), max_batch_size=1, max_batch_wait_ms=0, max_queued=2)  # type: ignore[arg-type]

    async def flood():
        tasks = [asyncio.ensure_future(batcher.predict(None, PredictionRequest(image=None).cases())) for _ in range(6)]
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        results = asyncio.run(flood())
    finally:
        batcher.stop()
    refused = [r for r in results if isinstance(r, QueueFull)]
    answered = [r for r in results if isinstance(r, np.ndarray)]
    assert refused and answered and len(refused) + len(answered) == 6
    assert len(answered) <= 3  # the 2 places of the queue, and at most one row the worker already took
