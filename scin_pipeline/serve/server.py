"""Running the app under uvicorn with the limits of :mod:`.limits`; ``python -m scin_pipeline.serve.server``.

uvicorn (0.54) times out idle keep-alive connections (``timeout_keep_alive``) but not a request that is still
arriving: its keep-alive timer is cancelled by the first byte of a request and nothing replaces it, and an
ASGI app only runs once the headers are complete. A client that sends half a request line and waits would
hold its connection, and a slot of ``limit_concurrency``, for ever. :func:`header_deadline_protocol`
therefore wraps uvicorn's HTTP protocol class (httptools when installed, else h11): from the moment a
connection opens, and again after each answer, the next request's headers must be complete within
``header_timeout_s``, else the client gets 408 and the connection is closed (a connection that never sent
a byte is closed without an answer). Once the headers are in, the body is the app's to time
(``body_timeout_s``, see app.py), and a request being answered is never cut.

The log line says what happened, never who (no client address).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import TYPE_CHECKING

from scin_pipeline.serve.limits import ServeLimits, add_limit_arguments, limits_from_args

LOG = logging.getLogger("scin_pipeline.serve")
_TIMEOUT_BODY = b"request headers not received in time\n"
REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
    b"content-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n\r\n" + _TIMEOUT_BODY
)

if TYPE_CHECKING:
    # For the checker only: what the mixin uses of its host class (HttpToolsProtocol has the same names).
    from uvicorn.protocols.http.h11_impl import H11Protocol as _HostProtocol
else:
    _HostProtocol = object


class _HeaderDeadline(_HostProtocol):
    """Mixed in before uvicorn's H11Protocol or HttpToolsProtocol (both have ``loop``, ``transport``,
    ``cycle`` and ``on_response_complete``)."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport) -> None:
        self._received_since_answer = 0
        self._header_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        self._received_since_answer += len(data)
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._received_since_answer = 0
        self._arm_header_deadline()
        super().on_response_complete()  # may start a pipelined request: that one has its headers already

    def connection_lost(self, exc) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._header_deadline_passed)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_deadline_passed(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            return  # a request is being read or answered: its body is the app's to time
        if cycle is not None and self._received_since_answer == 0:
            return  # idle between requests: uvicorn's keep-alive timeout closes it
        if self._received_since_answer:
            self.transport.write(REQUEST_TIMEOUT_RESPONSE)
            LOG.info("closed a connection: request headers incomplete after %g s (408)", self.header_timeout_s)
        else:
            LOG.info("closed a connection that sent nothing in %g s", self.header_timeout_s)
        self.transport.close()


def header_deadline_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's own HTTP protocol class (as ``http="auto"`` picks it) with the header deadline mixed in."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return type(
        f"HeaderDeadline{AutoHTTPProtocol.__name__}",
        (_HeaderDeadline, AutoHTTPProtocol),
        {"header_timeout_s": float(header_timeout_s)},
    )


def uvicorn_config(app, *, host: str, port: int, limits: ServeLimits):
    """The uvicorn Config of the service: no access log (it would record client addresses), the limits."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        access_log=False,
        log_level="info",
        http=header_deadline_protocol(limits.header_timeout_s),
        limit_concurrency=limits.limit_concurrency,
        timeout_keep_alive=limits.keep_alive_s,
    )


def run_server(app, *, host: str, port: int, limits: ServeLimits) -> None:
    """Serve ``app`` until interrupted (uvicorn's signal handling: Ctrl-C / SIGTERM stop it)."""
    import uvicorn

    uvicorn.Server(uvicorn_config(app, host=host, port=port, limits=limits)).run()


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    """``python -m scin_pipeline.serve.server --tracking-uri URI [--model ...] [limits]``: the service without
    the ``scin-pipeline`` CLI's data-root handling (for a registry given by URI)."""
    parser = argparse.ArgumentParser(
        prog="python -m scin_pipeline.serve.server", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--tracking-uri", required=True, help="MLflow tracking (= registry) URI")
    parser.add_argument("--model", default=None, help="models:/NAME@ALIAS or models:/NAME/VERSION (default: champion)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--store-uploads", default=None, metavar="DIR")
    parser.add_argument("--alias-poll-s", type=float, default=None, metavar="S")
    add_limit_arguments(parser)
    args = parser.parse_args(argv)

    from scin_pipeline.serve.app import create_app
    from scin_pipeline.serve.follow import DEFAULT_ALIAS_POLL_S
    from scin_pipeline.serve.model import DEFAULT_MODEL_URI, ServeError

    try:
        limits = limits_from_args(args)
    except ValueError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    try:
        app = create_app(
            args.model or DEFAULT_MODEL_URI,
            tracking_uri=args.tracking_uri,
            store_uploads_dir=args.store_uploads,
            alias_poll_s=DEFAULT_ALIAS_POLL_S if args.alias_poll_s is None else args.alias_poll_s,
            **limits.app_options(),
        )
    except ServeError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 1
    print(f"{app.state.model_source.describe()}; at http://{args.host}:{args.port}/  (NOT A DIAGNOSIS)", flush=True)
    configure_logging()
    run_server(app, host=args.host, port=args.port, limits=limits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
