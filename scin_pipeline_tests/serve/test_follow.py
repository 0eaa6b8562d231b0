"""The service follows the registry alias: no champion -> 503 with the reason; the alias moved -> the new
version answers without a restart while a request already running finishes on the old one; the alias
removed -> 503 again; a pinned models:/NAME/VERSION never moves.

Each test gets its own registry (a temporary SQLite store) holding two versions, registered from the
packages the session's ``registry`` fixture already trained (keras_image and sklearn_metadata), so moving
or removing the alias here never disturbs the other serving tests. Most tests call the follower's
``refresh()`` (what the poller thread runs) themselves, with polling off, so nothing depends on timing;
one test checks the poller thread itself, waiting (bounded) for what it must do.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from scin_pipeline.serve import create_app
from scin_pipeline_tests.serve.conftest import MODEL_NAME, encode, synthetic_skin_rgb

CHAMPION = f"models:/{MODEL_NAME}@champion"
WAIT_S = 180  # an upper bound for the bounded waits below, never a speed requirement


@dataclass
class Store:
    tracking: object  # MlflowTracking
    uri: str
    versions: dict[str, str]


@pytest.fixture
def store(registry, tmp_path, monkeypatch) -> Store:
    """A fresh registry: keras_image and sklearn_metadata versions, no alias yet."""
    from scin_pipeline.resources import MlflowTracking, StoragePaths
    from scin_pipeline.runner import embedded_mlflow_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "data"
    uri = embedded_mlflow_uri(root.resolve())
    tracking = MlflowTracking(
        tracking_uri=uri, storage=StoragePaths(data_root=str(root)), registered_model_name=MODEL_NAME
    )
    versions = {}
    for kind in ("keras_image", "sklearn_metadata"):
        package_dir = registry.data_root / "packages" / kind
        assert package_dir.is_dir(), package_dir
        with tracking.training_run(
            run_key=f"follow-{kind}",
            run_name=kind,
            tags={"scin.synthetic_data": "true", "scin.candidate": kind},
            params={},
        ) as run:
            _, versions[kind] = run.log_model(package_dir)
    return Store(tracking, uri, versions)


def photo(index: int = 0) -> bytes:
    return encode(synthetic_skin_rgb(index))


def predict(client, index: int = 0):
    return client.post("/predict", files={"file": ("skin.png", photo(index), "image/png")})


def wait_for_status(client, predicate) -> dict:
    """GET /status until ``predicate(status)``; fails after WAIT_S (the poller runs every 0.05 s)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        status = client.get("/status").json()
        if predicate(status):
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"the poller did not get there in {WAIT_S} s; last status: {status}")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------ no champion


def test_without_a_champion_the_service_starts_and_predict_answers_503_with_the_reason(store):
    app = create_app(CHAMPION, tracking_uri=store.uri, alias_poll_s=0)
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "ok", "serving": False, "model": None}
        response = predict(client)
        assert response.status_code == 503
        body = response.json()
        assert body["error"] == "no_model" and body["alias"] == "champion" and body["name"] == MODEL_NAME
        assert body["detail"].startswith("no champion yet") and "scin-pipeline demo" in body["detail"]
        assert "NOT A DIAGNOSIS" in body["notice"] and body["cleared_at"] is None
        assert client.get("/model").status_code == 503
        status = client.get("/status").json()
        assert status["serving"] is False and status["version"] is None
        assert status["reason"] == body["detail"]
        page = client.get("/")
        assert page.status_code == 200 and 'id="unavailable"' in page.text


def test_a_champion_removed_by_model_comparison_gives_its_recorded_reason(store):
    store.tracking.set_champion(store.versions["keras_image"], reason="an earlier winner")
    reason = "no eligible candidate by the rule (...); baseline_cnn: fairness gate failed: monk bin 7-10"
    store.tracking.clear_champion(reason=reason)
    app = create_app(CHAMPION, tracking_uri=store.uri, alias_poll_s=0)
    with TestClient(app) as client:
        response = predict(client)
        assert response.status_code == 503
        body = response.json()
        assert reason in body["detail"] and body["detail"].startswith("no champion: model_comparison removed")
        assert body["cleared_at"] and body["cleared_at"] in body["detail"]
        assert client.get("/status").json()["cleared_at"] == body["cleared_at"]


# ------------------------------------------------------------------------------------------ following


def test_a_moved_alias_is_served_without_restart_and_a_request_in_flight_finishes_on_the_old_model(store, monkeypatch):
    store.tracking.set_champion(store.versions["keras_image"], reason="first")
    app = create_app(CHAMPION, tracking_uri=store.uri, alias_poll_s=0)
    follower = app.state.model_source
    old = follower.served
    assert old.version == store.versions["keras_image"]
    entered, release = threading.Event(), threading.Event()
    original = old.predict_proba

    def held(images, cases):  # the old model's prediction waits until the swap is done
        entered.set()
        if not release.wait(WAIT_S):
            raise RuntimeError("never released")
        return original(images, cases)

    monkeypatch.setattr(old, "predict_proba", held)
    with TestClient(app) as client:
        in_flight = {}
        worker = threading.Thread(target=lambda: in_flight.setdefault("response", predict(client, 1)))
        worker.start()
        try:
            assert entered.wait(WAIT_S), "the first request never reached the model"
            store.tracking.set_champion(store.versions["sklearn_metadata"], reason="moved")
            assert follower.refresh() is True  # the poller's step: resolve, load aside, swap
            assert follower.served is not old
            after = predict(client, 2)
            assert after.status_code == 200, after.text
            model = after.json()["model"]
            assert (model["name"], model["version"], model["alias"]) == (
                MODEL_NAME,
                store.versions["sklearn_metadata"],
                "champion",
            )
            assert model["kind"] == "sklearn_metadata"
            status = client.get("/status").json()
            assert status["serving"] and status["version"] == store.versions["sklearn_metadata"]
            assert not in_flight  # still held on the old model
        finally:
            release.set()
            worker.join(WAIT_S)
        first = in_flight["response"]
        assert first.status_code == 200, first.text
        assert first.json()["model"]["version"] == store.versions["keras_image"]
        assert first.json()["model"]["kind"] == "keras_image" and first.json()["image_used"] is True
        assert follower.refresh() is False  # nothing moved since


def test_removing_the_alias_switches_to_503_and_setting_it_again_recovers(store):
    store.tracking.set_champion(store.versions["keras_image"], reason="first")
    app = create_app(CHAMPION, tracking_uri=store.uri, alias_poll_s=0)
    follower = app.state.model_source
    with TestClient(app) as client:
        assert predict(client).status_code == 200
        store.tracking.clear_champion(reason="no eligible candidate: every one failed the fairness gate")
        assert follower.refresh() is True
        response = predict(client)
        assert response.status_code == 503
        assert "every one failed the fairness gate" in response.json()["detail"]
        assert client.get("/healthz").json()["serving"] is False
        store.tracking.set_champion(store.versions["sklearn_metadata"], reason="back")
        assert follower.refresh() is True
        answer = predict(client)
        assert answer.status_code == 200 and answer.json()["model"]["version"] == store.versions["sklearn_metadata"]


def test_the_poller_thread_follows_the_alias_and_stops_with_the_app(store):
    store.tracking.set_champion(store.versions["keras_image"], reason="first")
    app = create_app(CHAMPION, tracking_uri=store.uri, alias_poll_s=0.05)
    follower = app.state.model_source
    with TestClient(app) as client:
        assert client.get("/status").json()["follows_alias"] is True
        assert client.get("/status").json()["poll_interval_s"] == 0.05
        store.tracking.set_champion(store.versions["sklearn_metadata"], reason="moved")
        wait_for_status(client, lambda s: s["version"] == store.versions["sklearn_metadata"])
        assert predict(client).json()["model"]["version"] == store.versions["sklearn_metadata"]
        store.tracking.clear_champion(reason="cleared while serving")
        wait_for_status(client, lambda s: not s["serving"])
        response = predict(client)
        assert response.status_code == 503 and "cleared while serving" in response.json()["detail"]
        assert response.headers["Retry-After"] == "1"
    assert not any(t.name == "scin-serve-alias-poller" and t.is_alive() for t in threading.enumerate())
    assert follower._thread is None


def test_a_pinned_version_is_never_re_resolved(store):
    store.tracking.set_champion(store.versions["keras_image"], reason="first")
    app = create_app(f"models:/{MODEL_NAME}/{store.versions['keras_image']}", tracking_uri=store.uri, alias_poll_s=0.05)
    follower = app.state.model_source
    with TestClient(app) as client:
        status = client.get("/status").json()
        assert status["follows_alias"] is False and status["alias"] is None and follower._thread is None
        store.tracking.clear_champion(reason="gone")
        assert follower.refresh() is False
        answer = predict(client).json()["model"]
        assert (answer["version"], answer["alias"]) == (store.versions["keras_image"], None)


def test_a_version_that_cannot_be_loaded_leaves_the_old_one_answering(store):
    store.tracking.set_champion(store.versions["keras_image"], reason="first")
    app = create_app(CHAMPION, tracking_uri=store.uri, alias_poll_s=0)
    follower = app.state.model_source
    client_ = store.tracking.client()
    broken = client_.create_model_version(MODEL_NAME, source=(store.tracking.root / "no-such-model").as_uri())
    store.tracking.set_champion(broken.version, reason="a broken version")
    with TestClient(app) as client:
        assert follower.refresh() is False
        assert follower.refresh() is False  # not retried while the alias stays on it
        status = client.get("/status").json()
        assert status["version"] == store.versions["keras_image"]
        assert f"cannot serve version {broken.version}" in status["last_error"]
        assert predict(client).json()["model"]["version"] == store.versions["keras_image"]
        store.tracking.set_champion(store.versions["sklearn_metadata"], reason="fixed")
        assert follower.refresh() is True
        assert client.get("/status").json()["last_error"] is None
