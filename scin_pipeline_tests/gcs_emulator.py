"""A local GCS for tests and benchmarks: gcp-storage-emulator on loopback, in memory, with fault injection.

Register the fixture in a conftest with ``pytest_plugins = ["scin_pipeline_tests.gcs_emulator"]``.

Why not ``gcp_storage_emulator.server.create_server``: it serves with ``http.server.HTTPServer``, one
request at a time with a listen backlog of 5, so parallel downloads would queue (or see SYN retries
of a second) and measure the emulator, not the client. This module serves the emulator's own request
handler and in-memory storage from a ``ThreadingHTTPServer``, and adds what tests need and the
emulator lacks:

- ``corrupt(path)``: replace an object's stored bytes but keep its recorded size/CRC32C/MD5, so the
  served bytes disagree with the listing (done with ``Storage.create_file`` and the object's existing
  metadata, the emulator's own public storage method);
- ``fail_next(path, status, times)`` / ``reset_next(path, times)``: answer the next downloads of an
  object with an HTTP error or a body cut off mid-way (connection closed);
- ``downloads(path)``: how many times an object's bytes were requested, so tests can prove an object
  was (or was never) downloaded;
- ``requests_seen()``: every GET's path, query and Authorization header, so tests can prove what a
  client sent (a requester-pays ``userProject``, a bearer token).

:class:`FakeTokenEndpoint` and :func:`write_service_account_key` give a service-account key whose
token exchange is answered on loopback, so credentialed clients are tested with no network.

Run ``python -m scin_pipeline_tests.gcs_emulator --port-file F`` to serve from a separate process
(the benchmark does, so the server's CPU and memory are not counted as the client's).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import logging
import os
import re
import signal
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pytest

from scin_pipeline.core.paths import BUCKET

# Downloads arrive as /download/storage/v1/b/<bucket>/o/<name>?alt=media or, from some client paths,
# as the JSON object URL with alt=media.
_MEDIA_URL = re.compile(r"^(?:/download)?/storage/v1/b/(?P<bucket>[-.\w]+)/o/(?P<name>.+)$")


def _emulator_modules():
    from gcp_storage_emulator.handlers import buckets
    from gcp_storage_emulator.server import RequestHandler
    from gcp_storage_emulator.storage import Storage

    return buckets, RequestHandler, Storage


class _Faults:
    """Per-object queues of faults to serve instead of the object's bytes, and download counters."""

    def __init__(self):
        self._lock = threading.Lock()
        self._queued: dict[tuple[str, str], collections.deque] = collections.defaultdict(collections.deque)
        self.downloads: collections.Counter = collections.Counter()
        self.seen: list[dict] = []

    def record(self, request: dict) -> None:
        with self._lock:
            self.seen.append(request)

    def add(self, bucket: str, name: str, fault: tuple, times: int) -> None:
        with self._lock:
            self._queued[(bucket, name)].extend([fault] * times)

    def take(self, bucket: str, name: str) -> tuple | None:
        with self._lock:
            self.downloads[(bucket, name)] += 1
            queue = self._queued.get((bucket, name))
            return queue.popleft() if queue else None


def _make_handler(storage, faults: _Faults):
    _, RequestHandler, _ = _emulator_modules()

    class FaultInjectingHandler(RequestHandler):
        def do_GET(self):
            parsed = urlparse(self.path)
            faults.record(
                {
                    "path": parsed.path,
                    "query": parse_qs(parsed.query),
                    "authorization": self.headers.get("Authorization"),
                }
            )
            match = _MEDIA_URL.match(parsed.path)
            is_media = match and (
                parsed.path.startswith("/download/") or parse_qs(parsed.query).get("alt") == ["media"]
            )
            if is_media:
                bucket, name = match.group("bucket"), unquote(match.group("name"))
                fault = faults.take(bucket, name)
                if fault is not None:
                    return self._serve_fault(fault, bucket, name)
            return super().do_GET()

        def _serve_fault(self, fault: tuple, bucket: str, name: str) -> None:
            kind = fault[0]
            if kind == "status":
                status = fault[1]
                body = json.dumps({"error": {"code": status, "message": f"injected fault for {name}"}}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            if kind == "reset":
                content = storage.get_file(bucket, name)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content[: len(content) // 2])
                self.wfile.flush()
                self.close_connection = True  # the rest never comes: the client sees a broken body
                return
            raise ValueError(f"unknown fault {fault!r}")

    return FaultInjectingHandler


class GcsEmulator:
    """One emulator on 127.0.0.1 (a free port), in-memory storage, with the SCIN bucket created."""

    def __init__(self, bucket: str = BUCKET, host: str = "127.0.0.1", port: int = 0):
        buckets, _, Storage = _emulator_modules()
        self.bucket = bucket
        self.storage = Storage(use_memory_fs=True)
        buckets.create_bucket(bucket, self.storage)
        self._faults = _Faults()
        handler = functools.partial(_make_handler(self.storage, self._faults), self.storage)
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None
        self._client = None
        self.host, self.port = self._httpd.server_address[:2]
        self.endpoint = f"http://{self.host}:{self.port}"

    # ---- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> GcsEmulator:
        # A short poll interval: shutdown() waits for the next poll, and tests start one server each.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="gcs-emulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> GcsEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- content -----------------------------------------------------------------------------------

    @property
    def client(self):
        """An anonymous client bound to this emulator (independent of STORAGE_EMULATOR_HOST)."""
        if self._client is None:
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            self._client = storage.Client(
                project="test",
                credentials=AnonymousCredentials(),
                client_options={"api_endpoint": self.endpoint},
            )
        return self._client

    def upload(self, path: str, data: bytes, content_type: str = "application/octet-stream") -> dict:
        """Store an object through the real upload API (the emulator computes its CRC32C and MD5)."""
        self.client.bucket(self.bucket).blob(path).upload_from_string(data, content_type=content_type)
        return dict(self.storage.get_file_obj(self.bucket, path))

    def metadata(self, path: str) -> dict:
        return dict(self.storage.get_file_obj(self.bucket, path))

    def stored_bytes(self, path: str) -> bytes:
        return self.storage.get_file(self.bucket, path)

    def corrupt(self, path: str, data: bytes | None = None) -> bytes:
        """Make the served bytes disagree with the listed checksums; returns the new stored bytes.

        By default one byte is flipped (same size, different CRC32C). The object's metadata (size,
        crc32c, md5Hash, generation) is passed back unchanged, so listings still describe the original.
        """
        metadata = self.storage.get_file_obj(self.bucket, path)
        if data is None:
            original = bytearray(self.storage.get_file(self.bucket, path))
            original[len(original) // 2] ^= 0xFF
            data = bytes(original)
        self.storage.create_file(self.bucket, path, data, metadata)
        return data

    def delete(self, path: str) -> None:
        self.storage.delete_file(self.bucket, path)

    # ---- faults and counters -----------------------------------------------------------------------

    def fail_next(self, path: str, status: int = 503, times: int = 1) -> None:
        """Answer the next ``times`` downloads of ``path`` with HTTP ``status``."""
        self._faults.add(self.bucket, path, ("status", status), times)

    def reset_next(self, path: str, times: int = 1) -> None:
        """Serve the next ``times`` downloads of ``path`` with half the body, then close the connection."""
        self._faults.add(self.bucket, path, ("reset", None), times)

    def requests_seen(self) -> list[dict]:
        """Every GET so far (listings, metadata, downloads): ``path``, ``query`` (parsed) and ``authorization``."""
        with self._faults._lock:
            return list(self._faults.seen)

    def downloads(self, path: str | None = None) -> int:
        """Download requests seen for ``path`` (faulted ones included), or for all objects."""
        if path is None:
            return sum(self._faults.downloads.values())
        return self._faults.downloads[(self.bucket, path)]


@pytest.fixture
def gcs_emulator(monkeypatch):
    """A running GcsEmulator with STORAGE_EMULATOR_HOST pointing at it for the test's duration."""
    # The emulator logs every 404 at ERROR and every string response at WARNING; tests expect 404s.
    emulator_logger = logging.getLogger("gcp_storage_emulator")
    previous_level = emulator_logger.level
    emulator_logger.setLevel(logging.CRITICAL)
    emulator = GcsEmulator().start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.endpoint)
    try:
        yield emulator
    finally:
        emulator.stop()
        emulator_logger.setLevel(previous_level)


class FakeTokenEndpoint:
    """An OAuth2 token endpoint on loopback for service-account keys (``token_uri`` in the key file).

    Answers the JWT-bearer grant google-auth sends with a bearer token (``token-1``, ``token-2``, ...) and
    keeps each grant's decoded JWT claims (``grants``); ``refuse(error)`` makes every later exchange fail
    with HTTP 400 and that OAuth2 error, as Google's endpoint does for a deleted or disabled key.
    """

    def __init__(self):
        from http.server import BaseHTTPRequestHandler

        self.grants: list[dict] = []
        self._refusal: str | None = None
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                form = parse_qs(self.rfile.read(length).decode())
                endpoint.grants.append(_jwt_claims(form["assertion"][0]))
                if endpoint._refusal is not None:
                    status, body = 400, {"error": endpoint._refusal, "error_description": "refused by the test"}
                else:
                    status, body = 200, {"access_token": f"token-{len(endpoint.grants)}", "expires_in": 3600}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format, *args):  # quiet: pytest shows stderr of a failing test
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.token_uri = f"http://127.0.0.1:{self._httpd.server_address[1]}/token"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-token", daemon=True
        )

    def refuse(self, error: str = "invalid_grant") -> None:
        self._refusal = error

    def __enter__(self) -> FakeTokenEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _jwt_claims(assertion: str) -> dict:
    import base64

    payload = assertion.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def write_service_account_key(
    path: Path, token_uri: str, email: str = "reader@scin-test.iam.gserviceaccount.com"
) -> Path:
    """A service-account JSON key with a fresh RSA key, exchanging tokens at ``token_uri``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    key = {
        "type": "service_account",
        "project_id": "scin-test",
        "private_key_id": "test-key-1",
        "private_key": pem,
        "client_email": email,
        "client_id": "1",
        "token_uri": token_uri,
    }
    path.write_text(json.dumps(key))
    return path


def closed_loopback_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a GcsEmulator until SIGTERM/SIGINT.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path, required=True, help="the chosen port is written here once serving")
    args = parser.parse_args()
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    emulator = GcsEmulator(port=args.port).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(str(emulator.port))
    os.replace(tmp, args.port_file)
    stop.wait()
    emulator.stop()


if __name__ == "__main__":
    main()
