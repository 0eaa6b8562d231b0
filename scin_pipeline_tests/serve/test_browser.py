"""The page in a real browser: headless Chromium from Debian's package, driven by Playwright (no browser
download), against ``scin-pipeline serve`` running as a subprocess. A SYNTHETIC photo is uploaded, the
result is read off the page and compared with the JSON API's answer for the same bytes; the screenshot
goes to artifacts/screenshots/serve-prediction.png. On a phone-sized window, where the answer is below the
form, it is scrolled into view after Classify, and a refused picture is explained in plain words there.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import numpy as np
import pytest

from scin_pipeline_tests.serve.conftest import MODEL_NAME, encode, require_chromium, synthetic_skin_rgb

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO_ROOT / "artifacts" / "screenshots" / "serve-prediction.png"
MIN_SCREENSHOT_BYTES = 20_000  # a blank page compresses to a few kB
PAGE_TIMEOUT_MS = 60_000
UPLOAD_NAME = "synthetic-jane-doe-forearm.png"  # must never reach the server's log


def test_upload_a_photo_and_read_the_prediction_in_chromium(serve_process, registry):
    from playwright.sync_api import expect, sync_playwright

    chromium = require_chromium()
    png = encode(synthetic_skin_rgb(4, (320, 240)))
    tiny = encode(np.full((1, 1, 3), 200, np.uint8))  # refused (422 too_small), never a 500
    expected = httpx.post(
        f"{serve_process.base_url}/predict", files={"file": ("a.png", png, "image/png")}, timeout=60
    ).json()
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 820})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            external = []
            page.on(
                "request",
                lambda request: (
                    None
                    if request.url.startswith(serve_process.base_url) or request.url.startswith(("blob:", "data:"))
                    else external.append(request.url)
                ),
            )
            page.goto(serve_process.base_url)
            expect(page.locator("#model-line")).to_contain_text(
                f"{MODEL_NAME} version {registry.versions['keras_image']}"
            )
            expect(page.locator("#notice")).to_contain_text("NOT A DIAGNOSIS")
            expect(page.locator("#synthetic")).to_be_visible()
            expect(page.locator("#metadata")).to_be_hidden()  # the image-only champion asks no questions

            page.set_input_files("#file", files=[{"name": UPLOAD_NAME, "mimeType": "image/png", "buffer": png}])
            expect(page.locator("#preview")).to_be_visible()
            page.click("#submit")
            top = page.get_by_test_id("top-condition")
            expect(top).to_be_visible()
            best = expected["top"][0]
            expect(top.locator(".name")).to_have_text(best["condition"])
            expect(top.locator(".pct")).to_have_text(f"{100 * best['probability']:.1f} %")
            expect(page.locator("#result-notice")).to_contain_text("NOT A DIAGNOSIS")
            expect(page.locator("#quality-verdict")).to_contain_text("no problem found (320 x 240 px)")
            expect(page.locator("#result-model")).to_contain_text("SYNTHETIC")
            expect(page.get_by_test_id("calibration")).to_contain_text("calibrated by temperature scaling (T = ")
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            # A phone-sized window: the answer area is below the form and comes into view by itself.
            page.set_viewport_size({"width": 390, "height": 700})
            page.evaluate("window.scrollTo(0, 0)")
            page.set_input_files("#file", files=[{"name": "dot.png", "mimeType": "image/png", "buffer": tiny}])
            page.click("#submit")
            error = page.get_by_test_id("error")
            expect(error).to_be_visible()
            expect(page.locator("#error-title")).to_have_text("The picture is too small")
            expect(error).to_be_in_viewport()
            expect(page.locator("#result")).to_be_hidden()
            page.set_input_files("#file", files=[{"name": UPLOAD_NAME, "mimeType": "image/png", "buffer": png}])
            page.evaluate("window.scrollTo(0, 0)")
            page.click("#submit")
            expect(top).to_be_visible()
            expect(top).to_be_in_viewport()
            expect(error).to_be_hidden()
        finally:
            browser.close()

    print(f"\nscreenshot: {SCREENSHOT}")
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert SCREENSHOT.stat().st_size > MIN_SCREENSHOT_BYTES
    assert external == []  # the page loads nothing from elsewhere
    log = serve_process.log_text()
    assert re.search(r"POST /predict 200", log) and re.search(r"POST /predict 422", log)
    assert "Traceback" not in log and not re.search(r"POST /predict 500", log)
    assert "jane-doe" not in log
    assert not re.search(r"POST /predict.*127\.0\.0\.1", log)  # no client address on request lines


@pytest.fixture(scope="module")
def multimodal_serve_process(registry, tmp_path_factory):
    """``scin-pipeline serve`` pinned on the registry's multimodal version (it reads the questionnaire)."""
    from scin_pipeline_tests.deploy import services
    from scin_pipeline_tests.serve.conftest import run_server_process, serve_command

    port = services.free_port()
    command = serve_command(registry, port, "--model", registry.uri("keras_multimodal"))
    yield from run_server_process(command, port, registry, tmp_path_factory.mktemp("serve-log-mm") / "serve.log")


def test_the_page_counts_the_answers_and_warns_about_the_missing_ones(multimodal_serve_process):
    from playwright.sync_api import expect, sync_playwright

    chromium = require_chromium()
    png = encode(synthetic_skin_rgb(6, (320, 240)))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 820})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(multimodal_serve_process.base_url)
            expect(page.locator("#metadata")).to_be_visible()  # this model asks the questions
            page.select_option("#field-age_group", "AGE_30_TO_39")
            page.set_input_files("#file", files=[{"name": "skin.png", "mimeType": "image/png", "buffer": png}])
            page.click("#submit")
            expect(page.get_by_test_id("top-condition")).to_be_visible()
            expect(page.locator("#answers-count")).to_have_text("You answered 1 of 8 questions.")
            warning = page.get_by_test_id("answers-warning")
            expect(warning).to_be_visible()
            # This test model was registered without validation scores: the warning says reliance is unknown.
            expect(warning).to_contain_text("7 of 8 questions are unanswered")
            expect(warning).to_contain_text("was not measured for this version")
            expect(page.get_by_test_id("class-notes")).to_be_hidden()  # no "other" among its classes
        finally:
            browser.close()
    assert errors == []
