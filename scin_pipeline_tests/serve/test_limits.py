"""What one request may cost a running server, and how long a client may take (issue 18), against real
server processes: ``scin-pipeline serve`` with its defaults, and ``python -m scin_pipeline.serve.server`` with
short timeouts and the pixel limit raised so that 7000 x 7000 pictures are really decoded.

Memory is the server process's peak resident set (``VmHWM`` in /proc/PID/status), reset to the current RSS
before each burst (``/proc/PID/clear_refs``, value 5), so a peak of an earlier test does not count.
"""

from __future__ import annotations

import re
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from scin_pipeline_tests.deploy import services
from scin_pipeline_tests.serve.conftest import encode, run_server_process, synthetic_skin_rgb
from scin_pipeline_tests.serve.test_app import huge_flat_png

pytestmark = pytest.mark.slow

TIMEOUT_S = 2.0  # the limited server's header and body timeouts
SLOTS = 2  # its concurrent predictions
SIDE = 7000  # the picture: a valid 7000 x 7000 PNG of about 150 KB
CLIENTS = 8
MB = 2**20
# One decode of a 49 Mpx picture: the BGR buffer and its RGB copy (3 bytes per pixel each) are the peak;
# the quality metrics and the model's square work on smaller copies. Before issue 18 nothing bounded how
# many ran at once: 8 uploads took the process 1,846 MB above its idle RSS (0.99 -> 2.83 GB).
DECODE_BYTES = SIDE * SIDE * 6
REFUSED_BOUND_MB = 64  # pictures refused from their header: a few buffers of 150 KB bodies, no pixels
DECODED_BOUND_MB = SLOTS * DECODE_BYTES / MB + 128  # two decodes at a time plus bodies, arenas, parser slack


def _kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak(pid: int) -> None:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError as exc:  # not Linux >= 4.0, or not allowed: the test cannot measure a fresh peak
        pytest.skip(f"cannot reset the peak RSS of the server: {exc}")


def _burst(base_url: str, data: bytes) -> list[tuple[int, str]]:
    def one(_):
        response = httpx.post(f"{base_url}/predict", files={"file": ("big.png", data, "image/png")}, timeout=300)
        return response.status_code, response.json().get("error", "")

    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(one, range(CLIENTS)))


def _peak_growth_mb(server, data: bytes) -> tuple[float, list[tuple[int, str]]]:
    pid = server.proc.pid
    _reset_peak(pid)
    idle = _kib(pid, "VmRSS")
    answers = _burst(server.base_url, data)
    return (_kib(pid, "VmHWM") - idle) / 1024, answers


@pytest.fixture(scope="module")
def limited_server(registry, tmp_path_factory):
    port = services.free_port()
    command = [
        sys.executable,
        "-m",
        "scin_pipeline.serve.server",
        "--tracking-uri",
        registry.tracking_uri,
        "--port",
        str(port),
        "--alias-poll-s",
        "0",
        "--max-megapixels",
        "50",
        "--max-concurrent-predictions",
        str(SLOTS),
        "--queue-timeout-s",
        "300",
        "--header-timeout-s",
        str(TIMEOUT_S),
        "--body-timeout-s",
        str(TIMEOUT_S),
    ]
    yield from run_server_process(command, port, registry, tmp_path_factory.mktemp("limited-log") / "serve.log")


def test_8_concurrent_7000px_uploads_are_refused_from_the_header_by_default(serve_process):
    growth, answers = _peak_growth_mb(serve_process, huge_flat_png(SIDE))
    print(f"\ndefault limits, {CLIENTS} x {SIDE} x {SIDE} PNG at once: peak RSS +{growth:.0f} MB; {answers[0]}")
    assert answers == [(422, "too_many_pixels")] * CLIENTS
    assert growth < REFUSED_BOUND_MB


def test_8_concurrent_7000px_decodes_stay_within_two_slots(limited_server):
    growth, answers = _peak_growth_mb(limited_server, huge_flat_png(SIDE))
    print(f"\n--max-megapixels 50, {SLOTS} slots, {CLIENTS} x {SIDE} x {SIDE} PNG at once: peak RSS +{growth:.0f} MB")
    assert [status for status, _ in answers] == [200] * CLIENTS
    assert growth < DECODED_BOUND_MB


def _connect(base_url: str) -> socket.socket:
    host, port = re.match(r"http://([^:]+):(\d+)", base_url).groups()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.settimeout(30)
    return sock


def _read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed it."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received, time.monotonic()


def _multipart_head(length: int) -> bytes:
    return (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode() + b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n\x89PNG'


def test_stalled_clients_are_dropped_within_the_timeout_while_others_are_answered(limited_server):
    partial_headers = _connect(limited_server.base_url)
    partial_headers.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
    partial_body = _connect(limited_server.base_url)
    partial_body.sendall(_multipart_head(200_000))
    silent = _connect(limited_server.base_url)
    opened = time.monotonic()

    with ThreadPoolExecutor(3) as pool:
        waits = [pool.submit(_read_until_closed, s) for s in (partial_headers, partial_body, silent)]
        answer = httpx.post(
            f"{limited_server.base_url}/predict",
            files={"file": ("p.png", encode(synthetic_skin_rgb(1, (160, 120))), "image/png")},
            timeout=60,
        )
        answered = time.monotonic()
        (headers_reply, headers_closed), (body_reply, body_closed), (silent_reply, silent_closed) = [
            w.result(timeout=60) for w in waits
        ]
    for sock in (partial_headers, partial_body, silent):
        sock.close()

    assert answer.status_code == 200  # answered while the three stalled connections were held
    assert answered < min(headers_closed, body_closed)
    assert headers_reply.startswith(b"HTTP/1.1 408 ")
    assert body_reply.startswith(b"HTTP/1.1 408 ") and b'"error":"timeout"' in body_reply
    assert silent_reply == b""
    for closed in (headers_closed, body_closed, silent_closed):
        assert TIMEOUT_S - 0.5 <= closed - opened <= TIMEOUT_S + 3.0
    assert httpx.get(f"{limited_server.base_url}/healthz", timeout=30).status_code == 200


def test_a_client_that_goes_away_mid_upload_is_one_info_line(limited_server):
    before = limited_server.log_text()
    for _ in range(3):
        sock = _connect(limited_server.base_url)
        sock.sendall(_multipart_head(200_000))
        time.sleep(0.2)
        sock.close()
    deadline = time.monotonic() + 10
    while limited_server.log_text()[len(before) :].count("client disconnected") < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    new = limited_server.log_text()[len(before) :]
    assert new.count("POST /predict client disconnected") == 3, new
    assert "Traceback" not in new and " 500 " not in new and "ERROR" not in new, new
    assert "127.0.0.1" not in new  # no client address
