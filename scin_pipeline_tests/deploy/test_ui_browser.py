"""The Dagster UI in a real browser: headless Chromium from Debian's package, driven by Playwright (no
browser download). Against ``scin-pipeline ui`` (dagster dev on SQLite, the command users run) on the
tiny synthetic mirror: open the asset lineage graph, click "Materialize all" for a small selection, wait
until the run page says Success, and keep screenshots of both pages in artifacts/screenshots/.
"""

from __future__ import annotations

import os
import re
import sys
import urllib.parse
from pathlib import Path

import psutil
import pytest

from scin_pipeline_tests.deploy import services
from scin_pipeline_tests.deploy.topology import RUN_STATUS_QUERY, TERMINAL_STATUSES

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO_ROOT / "artifacts" / "screenshots"
# raw_metadata and the three outputs of the parsed_metadata multi-asset (not subsettable: all or none).
SELECTION = ["raw_metadata", "cases", "images", "metadata_quarantine"]
MIN_SCREENSHOT_BYTES = 20_000  # a blank 1400x900 page compresses to a few kB
UI_TIMEOUT_MS = 120_000


@pytest.fixture
def dagster_ui(tmp_path, tiny_source):
    """``scin-pipeline ui`` on free loopback ports; its base URL. Stopped (and checked stopped) after."""
    port, mlflow_port = services.free_port(), services.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "SCIN_", "MLFLOW_"))}
    # MLflow 3's server starts a job runner with six consumer processes for GenAI jobs; unused here.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    ui = services.start_service(
        "scin-pipeline-ui",
        [
            str(Path(sys.executable).parent / "scin-pipeline"),
            "ui",
            "--data-root",
            str(tmp_path / "data"),
            "--source",
            str(tiny_source),
            "--port",
            str(port),
            "--mlflow-port",
            str(mlflow_port),
        ],
        env=env,
        log_dir=tmp_path / "logs",
        cwd=tmp_path,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        services.wait_until(
            lambda: b"dagster_webserver_version" in services.http_get(f"{base_url}/server_info"),
            timeout_s=240,
            what="the Dagster UI of scin-pipeline ui",
            services=[ui],
        )
        yield base_url, tmp_path / "data"
    finally:
        # SIGTERM: the command stops dagster dev and MLflow (their own process groups) itself.
        descendants = psutil.Process(ui.proc.pid).children(recursive=True) if ui.proc.poll() is None else []
        ui.stop(grace_s=60)
        _gone, alive = psutil.wait_procs(descendants, timeout=10)
        for process in alive:
            process.kill()
        assert not alive, f"scin-pipeline ui left processes behind: {[p.pid for p in alive]}"


def test_materialise_a_selection_from_the_asset_graph_in_chromium(chromium_executable, dagster_ui):
    from playwright.sync_api import expect, sync_playwright

    base_url, data_root = dagster_ui
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    graph_png, run_png = SCREENSHOTS / "ui-asset-graph.png", SCREENSHOTS / "ui-run-success.png"
    for stale in (graph_png, run_png):
        stale.unlink(missing_ok=True)
    print(f"\nscreenshots: {SCREENSHOTS}")
    selection = " or ".join(f"key:{key}" for key in SELECTION)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_executable, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(UI_TIMEOUT_MS)
            # A first visit may open a "Join the Dagster community" dialog over the page: skip it whenever
            # it shows up before an action.
            page.add_locator_handler(page.get_by_role("button", name="Skip"), lambda skip: skip.click())

            page.goto(f"{base_url}/asset-groups~{urllib.parse.quote(selection, safe='')}/")
            graph_nodes = page.get_by_text("Never materialized", exact=True)
            expect(graph_nodes).to_have_count(len(SELECTION), timeout=UI_TIMEOUT_MS)
            for key in SELECTION:
                expect(page.get_by_role("button", name=key, exact=False).first).to_be_visible()
            page.screenshot(path=str(graph_png))

            page.get_by_role("button", name="Materialize all").click()
            # The launch toast links to the new run.
            view_run = page.get_by_role("link", name="View", exact=True)
            expect(view_run).to_have_attribute("href", re.compile(r"^/runs/[0-9a-f-]{36}$"), timeout=UI_TIMEOUT_MS)
            run_path = view_run.get_attribute("href")
            run_id = run_path.rsplit("/", 1)[-1]
            page.goto(f"{base_url}{run_path}")

            # The status comes from GraphQL, polled; the page is then checked for what a user sees.
            status = services.wait_until(
                lambda: (s := _run_status(base_url, run_id)) in TERMINAL_STATUSES and s,
                timeout_s=240,
                what=f"run {run_id} launched from the UI",
            )
            assert status == "SUCCESS"
            expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=UI_TIMEOUT_MS)
            expect(page.get_by_text("RUN_SUCCESS").first).to_be_visible(timeout=UI_TIMEOUT_MS)
            page.screenshot(path=str(run_png))
        finally:
            browser.close()

    for png in (graph_png, run_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > MIN_SCREENSHOT_BYTES, png
    # The click materialised the selection into the data root of the UI's code location.
    for key in SELECTION:
        assert (data_root / "tables" / f"{key}.parquet").exists(), key


def _run_status(base_url: str, run_id: str) -> str:
    result = services.graphql(f"{base_url}/graphql", RUN_STATUS_QUERY, {"runId": run_id})["runOrError"]
    if result["__typename"] != "Run":
        raise AssertionError(f"run {run_id}: {result}")
    return result["status"]


REEXECUTE_MUTATION = """
mutation Reexecute($params: ReexecutionParams!) { launchRunReexecution(reexecutionParams: $params) {
  __typename ... on LaunchRunSuccess { run { runId jobName } }
  ... on PythonError { message } ... on RunConfigValidationInvalid { errors { message } } } }
"""


def test_a_cli_run_is_listed_under_its_job_in_the_ui_and_reexecuted_from_there(dagster_ui, tiny_source, capsys):
    """What the UI's Re-execute button sends (launchRunReexecution with the parent run): it needs the run
    to belong to the UI's code location, which execute_job alone does not record."""
    from scin_pipeline.cli import main

    base_url, data_root = dagster_ui
    assert main(["run", "--source", str(tiny_source), "--data-root", str(data_root), "--select", "group:ingest"]) == 0
    run_id = capsys.readouterr().out.split("run ", 1)[1].split(" ", 1)[0]
    listed = services.graphql(f"{base_url}/graphql", RUN_STATUS_QUERY, {"runId": run_id})["runOrError"]
    assert listed["__typename"] == "Run" and listed["jobName"] == "curation_job" and listed["status"] == "SUCCESS"

    launched = services.graphql(
        f"{base_url}/graphql", REEXECUTE_MUTATION, {"params": {"parentRunId": run_id, "strategy": "ALL_STEPS"}}
    )["launchRunReexecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    child = launched["run"]["runId"]
    assert launched["run"]["jobName"] == "curation_job"
    status = services.wait_until(
        lambda: (s := _run_status(base_url, child)) in TERMINAL_STATUSES and s,
        timeout_s=300,
        what=f"re-execution {child} of the CLI run {run_id}",
    )
    assert status == "SUCCESS"
