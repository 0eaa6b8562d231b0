"""The serving API in-process (FastAPI's TestClient) against tiny models trained on SYNTHETIC inputs and
registered in a temporary MLflow registry (conftest.py)."""

from __future__ import annotations

import functools
import io
import logging
import threading
import time

import numpy as np
import PIL.Image
import pytest
from fastapi.testclient import TestClient

from scin_pipeline.core.atomic import TMP_PREFIX, writer_namespace
from scin_pipeline.core.image_cache import preprocess_image_bytes
from scin_pipeline.core.synthetic.encoding import decompression_bomb_png
from scin_pipeline.serve import NOT_A_DIAGNOSIS, ServeError, create_app
from scin_pipeline.serve.prediction import decode_upload
from scin_pipeline_tests.serve.conftest import CLASSES, IMAGE_SIZE, ITCH, MODEL_NAME, encode, synthetic_skin_rgb

MAX_UPLOAD = 150_000


@pytest.fixture(scope="module")
def image_app(registry):
    app = create_app(f"models:/{MODEL_NAME}@champion", tracking_uri=registry.tracking_uri, max_upload_bytes=MAX_UPLOAD)
    with TestClient(app) as client:
        yield app, client


@pytest.fixture(scope="module")
def metadata_app(registry):
    app = create_app(registry.uri("sklearn_metadata"), tracking_uri=registry.tracking_uri)
    with TestClient(app) as client:
        yield app, client


@pytest.fixture(scope="module")
def multimodal_app(registry):
    app = create_app(registry.uri("keras_multimodal"), tracking_uri=registry.tracking_uri)
    with TestClient(app) as client:
        yield app, client


def post_image(client, data: bytes, *, content_type="image/png", filename="skin.png", data_fields=None):
    return client.post("/predict", files={"file": (filename, data, content_type)}, data=data_fields or {})


def post_form(client, fields: dict):
    """Questionnaire only, as multipart/form-data (what the page's FormData sends)."""
    parts = [
        (name, (None, v)) for name, value in fields.items() for v in ([value] if isinstance(value, str) else value)
    ]
    return client.post("/predict", files=parts)


def good_png(index: int = 0) -> bytes:
    return encode(synthetic_skin_rgb(index))


# ------------------------------------------------------------------------------------------ the answer


def test_the_champion_answers_with_probabilities_top_conditions_version_and_notice(image_app, registry):
    app, client = image_app
    data = good_png(1)
    response = post_image(client, data)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["notice"].startswith(NOT_A_DIAGNOSIS)
    assert "SYNTHETIC" in answer["notice"]
    assert list(answer["probabilities"]) == CLASSES
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    ranked = sorted(answer["probabilities"].items(), key=lambda item: -item[1])
    assert [t["condition"] for t in answer["top"]] == [c for c, _ in ranked]
    model = answer["model"]
    assert (model["name"], model["version"]) == (MODEL_NAME, registry.versions["keras_image"])
    assert model["alias"] == "champion" and model["uri"] == registry.uri("keras_image")
    assert model["kind"] == "keras_image" and model["synthetic_data"] is True
    assert answer["image_used"] is True and answer["metadata_used"] is False
    # Training's preprocessing of the same bytes, through the package directly: the same numbers.
    package = app.state.model_source.served.package
    direct = package.predict_proba(preprocess_image_bytes(data, IMAGE_SIZE)[None])[0]
    np.testing.assert_allclose([answer["probabilities"][c] for c in CLASSES], direct, rtol=1e-6, atol=1e-7)


def test_the_answer_holds_the_calibrated_probabilities_and_says_so(image_app, multimodal_app):
    app, client = image_app
    data = good_png(2)
    answer = post_image(client, data).json()
    package = app.state.model_source.served.package
    raw = package.predict_proba(preprocess_image_bytes(data, IMAGE_SIZE)[None], calibrated=False)[0]
    served = np.array([answer["probabilities"][c] for c in CLASSES])
    np.testing.assert_allclose(served, package.calibrate(raw[None])[0], rtol=1e-6, atol=1e-7)
    assert not np.allclose(served, raw, atol=1e-4)  # the temperature moved them
    calibration = answer["model"]["calibration"]
    assert calibration["calibrated"] is True and calibration["method"] == "temperature_scaling"
    assert calibration["temperature"] == pytest.approx(package.calibration.temperature)
    assert calibration["fitted_on"] == "val"
    assert f"T = {package.calibration.temperature:.2f}" in calibration["text"]
    assert "calibrated by temperature scaling" in calibration["text"]
    assert client.get("/model").json()["calibration"] == calibration
    # A version without a temperature says its numbers are the model's own.
    _, other = multimodal_app
    uncalibrated = other.get("/model").json()["calibration"]
    assert uncalibrated["calibrated"] is False and uncalibrated["temperature"] is None
    assert "not calibrated" in uncalibrated["text"]


def test_served_pixels_are_bit_identical_to_training_preprocessing():
    from scin_pipeline.core.image_cache import preprocess_image

    for rgb, fmt in [(synthetic_skin_rgb(3, (130, 70)), "PNG"), (synthetic_skin_rgb(4, (90, 200)), "JPEG")]:
        data = encode(rgb, fmt)
        served = preprocess_image(decode_upload(data), IMAGE_SIZE)
        np.testing.assert_array_equal(served, preprocess_image_bytes(data, IMAGE_SIZE))


def test_a_jpeg_is_accepted_too(image_app):
    _, client = image_app
    response = post_image(client, encode(synthetic_skin_rgb(2), "JPEG"), content_type="image/jpeg", filename="skin.jpg")
    assert response.status_code == 200, response.text
    assert response.json()["quality"]["verdict"] == "ok"


@pytest.mark.parametrize(
    "picture, issue",
    [
        (np.full((96, 96, 3), 3, np.uint8), "dark"),
        # a smooth gradient: shading without texture, i.e. a flat frame (a wall, a covered lens)
        (
            np.repeat(np.repeat(np.linspace(60, 200, 96).astype(np.uint8)[None, :, None], 96, 0), 3, 2),
            "low_information",
        ),
        ("small", "too_small"),
    ],
)
def test_the_quality_verdict_comes_with_the_prediction(image_app, picture, issue):
    _, client = image_app
    rgb = synthetic_skin_rgb(5, (40, 48)) if isinstance(picture, str) else picture
    response = post_image(client, encode(rgb))
    assert response.status_code == 200, response.text
    answer = response.json()
    quality = answer["quality"]
    assert quality["verdict"] == "warning"
    assert issue in [i["issue"] for i in quality["issues"]], quality
    assert "Monk skin tone 10" in quality["dark_reference"]
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)


def test_a_clean_photo_gets_an_ok_verdict(image_app):
    _, client = image_app
    quality = post_image(client, good_png(7)).json()["quality"]
    assert (quality["verdict"], quality["issues"], quality["width"], quality["height"]) == ("ok", [], 96, 80)


# ------------------------------------------------------------------------------------------ bad input


def _chunked_multipart(total_bytes: int):
    boundary = "synthetic-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    body = [head, b"\x89PNG\r\n\x1a\n"] + [b"\0" * 8192] * (total_bytes // 8192) + [f"\r\n--{boundary}--\r\n".encode()]
    return {"content": iter(body), "headers": {"Content-Type": f"multipart/form-data; boundary={boundary}"}}


def _multipart_without_end():
    boundary = "synthetic-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode() + good_png()
    return {"content": body, "headers": {"Content-Type": f"multipart/form-data; boundary={boundary}"}}


@functools.cache
def huge_flat_png(side: int = 7000) -> bytes:
    """The issue's upload: a valid ~143 KB PNG of 7000 x 7000 px (one grey; deflate packs it ~1000:1)."""
    import cv2

    return cv2.imencode(".png", np.full((side, side, 3), 128, np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])[1].tobytes()


BAD_REQUESTS = {
    "not an image": (lambda c: post_image(c, b"this is a text file, not a photo"), 422, "corrupt"),
    "wrong declared type": (
        lambda c: post_image(c, good_png(), content_type="text/plain"),
        415,
        "unsupported_media_type",
    ),
    "truncated PNG": (lambda c: post_image(c, good_png()[: len(good_png()) // 2]), 422, "truncated"),
    "truncated JPEG": (
        lambda c: post_image(c, encode(synthetic_skin_rgb(0), "JPEG")[:-400], content_type="image/jpeg"),
        422,
        "truncated",
    ),
    "empty file": (lambda c: post_image(c, b""), 422, "empty_file"),
    "decompression bomb": (lambda c: post_image(c, decompression_bomb_png()), 422, "too_many_pixels"),
    "6000 x 6000 PNG (36 Mpx)": (lambda c: post_image(c, huge_flat_png(6000)), 422, "too_many_pixels"),
    "1 x 1 PNG": (lambda c: post_image(c, encode(np.full((1, 1, 3), 120, np.uint8))), 422, "too_small"),
    "1 x 40 PNG": (lambda c: post_image(c, encode(np.full((40, 1, 3), 120, np.uint8))), 422, "too_small"),
    "40 x 1 PNG": (lambda c: post_image(c, encode(np.full((1, 40, 3), 120, np.uint8))), 422, "too_small"),
    "2 x 2 JPEG": (
        lambda c: post_image(c, encode(np.full((2, 2, 3), 120, np.uint8), "JPEG"), content_type="image/jpeg"),
        422,
        "too_small",
    ),
    "no closing boundary": (lambda c: c.post("/predict", **_multipart_without_end()), 400, "bad_multipart"),
    "5,000-character file name": (
        lambda c: post_image(c, good_png(), filename="a" * 5000 + ".png"),
        400,
        "bad_multipart",
    ),
    "GIF": (
        lambda c: post_image(c, b"GIF89a" + b"\0" * 64, content_type="application/octet-stream"),
        415,
        "unsupported_format",
    ),
    "over the size limit": (lambda c: post_image(c, b"\x89PNG\r\n\x1a\n" + bytes(MAX_UPLOAD)), 413, "too_large"),
    "over the limit, streamed without a length": (
        lambda c: c.post("/predict", **_chunked_multipart(MAX_UPLOAD * 3)),
        413,
        "too_large",
    ),
    "JSON body": (lambda c: c.post("/predict", json={"file": "abc"}), 415, "unsupported_media_type"),
    "no file": (lambda c: c.post("/predict", files={"age_group": (None, "AGE_18_TO_29")}), 422, "missing_file"),
    "unknown field": (lambda c: post_image(c, good_png(), data_fields={"patient_name": "x"}), 422, "unknown_field"),
    "malformed multipart": (
        lambda c: c.post(
            "/predict", content=b"--nope\r\ngarbage", headers={"Content-Type": "multipart/form-data; boundary=b"}
        ),
        400,
        "bad_multipart",
    ),
    "two files": (
        lambda c: c.post(
            "/predict",
            files=[("file", ("a.png", good_png(), "image/png")), ("file", ("b.png", good_png(), "image/png"))],
        ),
        400,
        "bad_multipart",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(image_app, case):
    _, client = image_app
    send, status, error = BAD_REQUESTS[case]
    response = send(client)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error
    assert body["detail"] and body["notice"].startswith(NOT_A_DIAGNOSIS)
    after = post_image(client, good_png())
    assert after.status_code == 200 and set(after.json()["probabilities"]) == set(CLASSES)


def test_decode_errors_name_the_upload_never_the_client_file_name(image_app):
    _, client = image_app
    body = post_image(client, good_png()[:200], filename="jane-doe-back.png").json()
    assert body["detail"].startswith("upload: ") and "jane-doe" not in body["detail"]


# ------------------------------------------------------------------------------------------ metadata


def test_the_metadata_model_answers_from_the_questionnaire(metadata_app):
    import pandas as pd

    app, client = metadata_app
    fields = {"age_group": "AGE_30_TO_39", "sex_at_birth": "FEMALE", "symptoms": ITCH}
    response = post_form(client, fields)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["metadata_used"] is True and answer["image_used"] is False and answer["quality"] is None
    assert answer["metadata"] == {"age_group": "AGE_30_TO_39", "sex_at_birth": "FEMALE", "symptoms": [ITCH]}
    package = app.state.model_source.served.package
    direct = package.predict_proba(
        cases=pd.DataFrame([{"age_group": "AGE_30_TO_39", "sex_at_birth": "FEMALE", ITCH: True}])
    )[0]
    np.testing.assert_allclose([answer["probabilities"][c] for c in CLASSES], direct, rtol=1e-9)
    # The questionnaire matters (the synthetic class follows the age group).
    other = post_form(client, {"age_group": "AGE_18_TO_29"}).json()
    assert other["top"][0]["condition"] != answer["top"][0]["condition"]


def test_an_image_sent_to_the_metadata_model_is_quality_checked_only(metadata_app):
    _, client = metadata_app
    answer = post_image(client, good_png(), data_fields={"age_group": "AGE_30_TO_39"}).json()
    assert answer["quality"]["verdict"] == "ok" and answer["image_used"] is False


def test_check_box_groups_take_repeated_or_comma_separated_columns(metadata_app):
    _, client = metadata_app
    parts = ["body_parts_arm", "body_parts_leg"]
    repeated = post_form(client, {"body_parts": parts}).json()
    joined = post_form(client, {"body_parts": ",".join(reversed(parts))}).json()
    assert repeated["metadata"]["body_parts"] == joined["metadata"]["body_parts"] == parts
    assert repeated["probabilities"] == joined["probabilities"]


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"age_group": "AGE_12"}, "age_group"),
        ({"body_parts": "body_parts_elbow"}, "body_parts"),
        ({"symptoms": "textures_flat"}, "symptoms"),
        ({"sex_at_birth": ["MALE", "FEMALE"]}, "one value"),
    ],
)
def test_unknown_questionnaire_values_are_refused(metadata_app, fields, fragment):
    _, client = metadata_app
    response = post_form(client, fields)
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_metadata" and fragment in response.json()["detail"]


def test_the_multimodal_model_uses_image_and_questionnaire(multimodal_app):
    import pandas as pd

    app, client = multimodal_app
    data = good_png(2)
    answer = post_image(client, data, data_fields={"age_group": "AGE_40_TO_49", "textures": "textures_flat"}).json()
    assert answer["image_used"] and answer["metadata_used"]
    cases = pd.DataFrame([{"age_group": "AGE_40_TO_49", "textures_flat": True}])
    direct = app.state.model_source.served.package.predict_proba(preprocess_image_bytes(data, IMAGE_SIZE)[None], cases)[
        0
    ]
    np.testing.assert_allclose([answer["probabilities"][c] for c in CLASSES], direct, rtol=1e-5, atol=1e-7)
    assert post_form(client, {"age_group": "AGE_40_TO_49"}).json()["error"] == "missing_file"


# ------------------------------------------------------------------------------------------ page, schema


def test_the_page_is_self_contained_and_says_not_a_diagnosis(image_app):
    _, client = image_app
    response = client.get("/")
    assert response.status_code == 200
    html = response.text
    assert "NOT A DIAGNOSIS" in html and 'id="file"' in html and "/predict" in html
    for external in ('src="http', "src='http", 'href="http', "@import", "url(http", "//cdn"):
        assert external not in html
    assert "default-src 'self'" in response.headers["content-security-policy"]


def test_model_description_drives_the_questionnaire(image_app, metadata_app):
    image = image_app[1].get("/model").json()
    assert image["uses_metadata"] is False and image["synthetic_data"] is True
    assert image["max_upload_bytes"] == MAX_UPLOAD and image["stores_uploads"] is False
    fields = {f["name"]: f for f in metadata_app[1].get("/model").json()["metadata_fields"]}
    assert fields["age_group"]["multiple"] is False and "AGE_30_TO_39" in fields["age_group"]["values"]
    assert fields["symptoms"]["multiple"] is True and ITCH in fields["symptoms"]["values"]


def test_openapi_schema_describes_predict(image_app):
    _, client = image_app
    schema = client.get("/openapi.json").json()
    predict = schema["paths"]["/predict"]["post"]
    form = predict["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert form["file"]["format"] == "binary" and "AGE_30_TO_39" in form["age_group"]["enum"]
    answer_ref = predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    answer = schema["components"]["schemas"][answer_ref]
    assert {"probabilities", "notice", "model", "quality", "top"} <= set(answer["required"])
    assert {"413", "415", "422"} <= set(predict["responses"])
    # /docs would load Swagger UI from a CDN: switched off.
    assert client.get("/docs").status_code == 404


# ------------------------------------------------------------------------------------------ privacy, startup


def test_logs_hold_no_file_name_client_address_or_answers(image_app, caplog):
    _, client = image_app
    with caplog.at_level(logging.DEBUG):
        response = post_image(client, good_png(), filename="jane-doe-rash.png")
        assert response.status_code == 200
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "POST /predict 200" in text
    for private in ("jane-doe", "testclient", "skin.png"):
        assert private not in text


def test_uploads_are_stored_only_when_configured(registry, tmp_path):
    store = tmp_path / "kept"
    # An upload half-written by a killed server (pid above Linux's pid_max: dead) is swept by the next one.
    store.mkdir()
    orphan = store / f"{TMP_PREFIX}4194399@{writer_namespace()}-0123456789ab.png"
    orphan.write_bytes(b"half")
    app = create_app(f"models:/{MODEL_NAME}@champion", tracking_uri=registry.tracking_uri, store_uploads_dir=store)
    data = good_png(4)
    with TestClient(app) as client:
        assert client.get("/model").json()["stores_uploads"] is True
        assert post_image(client, data, filename="jane-doe.png").status_code == 200
        assert post_image(client, b"not an image").status_code == 422
    kept = list(store.iterdir())
    assert len(kept) == 1 and "jane" not in kept[0].name and kept[0].suffix == ".png"
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(kept[0]).convert("RGB")), decode_upload(data))


def gps_tagged_jpeg(rgb: np.ndarray) -> bytes:
    """A JPEG with the EXIF a phone writes: GPS position (IFD 0x8825), camera make and model, capture time."""
    exif = PIL.Image.Exif()
    exif[0x010F] = "SyntheticPhoneMaker"  # Make
    exif[0x0110] = "SynthPhone 12 Pro"  # Model
    exif[0x0132] = "2026:01:02 03:04:05"  # DateTime
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 29.0), 3: "E", 4: (2.0, 17.0, 40.0)}  # GPSInfo: Paris
    buffer = io.BytesIO()
    PIL.Image.fromarray(rgb).save(buffer, format="JPEG", quality=92, exif=exif)
    return buffer.getvalue()


def test_stored_uploads_keep_pixels_only_no_gps_or_camera(registry, tmp_path):
    store = tmp_path / "kept"
    data = gps_tagged_jpeg(synthetic_skin_rgb(6, (120, 90)))
    with PIL.Image.open(io.BytesIO(data)) as sent:  # the test photo really carries the metadata
        assert sent.getexif().get_ifd(0x8825)[2] == (48.0, 51.0, 29.0) and sent.getexif()[0x0110] == "SynthPhone 12 Pro"
    app = create_app(f"models:/{MODEL_NAME}@champion", tracking_uri=registry.tracking_uri, store_uploads_dir=store)
    with TestClient(app) as client:
        assert post_image(client, data, content_type="image/jpeg", filename="IMG_0001.jpg").status_code == 200
    (kept,) = store.iterdir()
    raw = kept.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and kept.suffix == ".png"
    traces = (b"Exif", b"SynthPhone", b"SyntheticPhoneMaker", b"2026:01:02", b"eXIf", b"tEXt", b"iTXt", b"IMG_0001")
    assert [trace for trace in traces if trace in raw] == []
    with PIL.Image.open(kept) as stored:
        assert not stored.getexif() and not stored.info.get("exif")
        np.testing.assert_array_equal(np.asarray(stored.convert("RGB")), decode_upload(data))


def test_a_picture_over_the_pixel_limit_is_refused_from_its_header(registry):
    app = create_app(
        f"models:/{MODEL_NAME}@champion", tracking_uri=registry.tracking_uri, max_pixels=100 * 100, alias_poll_s=0
    )
    with TestClient(app) as client:
        assert client.get("/model").json()["max_pixels"] == 10_000
        assert post_image(client, encode(synthetic_skin_rgb(1, (100, 100)))).status_code == 200
        refused = post_image(client, encode(synthetic_skin_rgb(1, (101, 100))))
        assert refused.status_code == 422 and refused.json()["error"] == "too_many_pixels"
        assert "101 x 100" in refused.json()["detail"] and "10,000 pixels" in refused.json()["detail"]


def test_tiny_pictures_are_refused_with_a_plain_message_never_a_500(image_app):
    _, client = image_app
    for height, width in [(1, 1), (1, 300), (300, 1), (2, 2), (15, 200)]:
        response = post_image(client, encode(np.full((height, width, 3), 90, np.uint8)))
        assert response.status_code == 422, (height, width, response.text)
        body = response.json()
        assert body["error"] == "too_small" and f"{width} x {height} px, too small" in body["detail"]
    small_but_usable = post_image(client, encode(synthetic_skin_rgb(2, (16, 40)))).json()
    assert [i["issue"] for i in small_but_usable["quality"]["issues"]][:1] == ["too_small"]


def test_multipart_problems_are_400_in_plain_words(image_app):
    _, client = image_app
    cut = client.post("/predict", **_multipart_without_end()).json()
    assert "closing boundary" in cut["detail"] and "cut off" in cut["detail"]
    long_name = post_image(client, good_png(), filename="b" * 5000 + ".png").json()
    assert "file name" in long_name["detail"] and "bbbb" not in long_name["detail"]


def test_when_every_prediction_slot_is_taken_the_answer_is_503_busy_with_retry_after(registry, monkeypatch):
    import scin_pipeline.serve.app as app_module

    release, entered = threading.Event(), threading.Event()
    real = app_module.prepare_inputs

    def held(*args):
        entered.set()
        release.wait(30)
        return real(*args)

    monkeypatch.setattr(app_module, "prepare_inputs", held)
    app = create_app(
        f"models:/{MODEL_NAME}@champion",
        tracking_uri=registry.tracking_uri,
        alias_poll_s=0,
        max_concurrent_predictions=1,
        queue_timeout_s=0.2,
    )
    results = {}
    with TestClient(app) as client:
        first = threading.Thread(target=lambda: results.setdefault("first", post_image(client, good_png())))
        first.start()
        assert entered.wait(30)
        started = time.monotonic()
        busy = post_image(client, good_png())
        waited = time.monotonic() - started
        release.set()
        first.join(30)
        assert busy.status_code == 503 and busy.json()["error"] == "busy", busy.text
        assert busy.headers["retry-after"] == "1" and 0.2 <= waited < 5
        assert results["first"].status_code == 200
        assert post_image(client, good_png()).status_code == 200  # the slot was given back


def test_startup_fails_clearly_without_a_model_or_with_a_bad_uri(registry):
    # (A registered model without a champion starts and answers 503: test_follow.py.)
    with pytest.raises(ServeError, match="no model named 'no-such-model'"):
        create_app("models:/no-such-model@champion", tracking_uri=registry.tracking_uri)
    with pytest.raises(ServeError, match="has no version 99"):
        create_app(f"models:/{MODEL_NAME}/99", tracking_uri=registry.tracking_uri)
    with pytest.raises(ServeError, match="models:/NAME@ALIAS"):
        create_app("runs:/abc/model", tracking_uri=registry.tracking_uri)
