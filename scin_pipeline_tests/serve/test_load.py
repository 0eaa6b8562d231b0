"""A bounded load test on loopback: 200 predictions from 8 concurrent clients against ``scin-pipeline
serve`` (subprocess). Latency percentiles are printed, not asserted (speed belongs in bench/serve.py);
the assertion is that every request got a well-formed answer."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from scin_pipeline_tests.serve.conftest import CLASSES, encode, synthetic_skin_rgb

pytestmark = pytest.mark.slow

REQUESTS = 200
CLIENTS = 8


def test_200_requests_from_8_clients_all_succeed(serve_process):
    photos = [encode(synthetic_skin_rgb(i, (160, 120))) for i in range(CLIENTS)]

    def client_loop(worker: int) -> list[tuple[float, int, bool]]:
        results = []
        with httpx.Client(base_url=serve_process.base_url, timeout=60) as client:
            for _ in range(worker, REQUESTS, CLIENTS):
                started = time.perf_counter()
                try:
                    response = client.post("/predict", files={"file": ("p.png", photos[worker], "image/png")})
                    status = response.status_code
                    well_formed = status == 200 and set(response.json()["probabilities"]) == set(CLASSES)
                except httpx.HTTPError:
                    status, well_formed = -1, False
                results.append((time.perf_counter() - started, status, well_formed))
        return results

    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [r for worker in pool.map(client_loop, range(CLIENTS)) for r in worker]
    wall = time.perf_counter() - started
    latencies_ms = np.array([r[0] for r in results]) * 1000
    errors = [r[1] for r in results if not r[2]]
    p50, p95, p99 = np.percentile(latencies_ms, [50, 95, 99])
    print(
        f"\nload test on loopback: {len(results)} requests, {CLIENTS} concurrent clients, {wall:.1f} s wall, "
        f"{len(results) / wall:.1f} req/s; latency p50 {p50:.1f} ms, p95 {p95:.1f} ms, p99 {p99:.1f} ms; "
        f"errors {len(errors)}"
    )
    assert len(results) == REQUESTS
    assert errors == []
