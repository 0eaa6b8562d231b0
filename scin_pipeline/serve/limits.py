"""What one request may cost the service, and how long a client may take: the limits of ``scin-pipeline serve``.

Every limit has a default chosen for the demo machine (2 cores, a few GB) and a command-line option
(:func:`add_limit_arguments`, used by the ``serve`` subcommand and by ``python -m scin_pipeline.serve.server``).

Memory (measured on the synthetic demo data root, 8 concurrent uploads of a 143 KB, 7000 x 7000 PNG): the
body is small, the decode is not. Decoding, the quality metrics and the square crop cost about 5-6 bytes per
pixel at their peak (the BGR buffer, its RGB copy, the crop), so a 49 Mpx picture cost about 230 MB, and
before these limits 8 at once took the process from 0.99 to 2.8 GB. Two limits bound that:

- ``max_pixels`` (default 25 Mpx): the pixel count the image header declares is checked before a pixel
  buffer exists (the guarded decoder of core.image_cache reads the PNG IHDR, or the JPEG header through
  PIL, and refuses above the limit). 25 Mpx takes a 24 MP photo (6000 x 4000, what cameras and
  high-resolution phone modes write by default; phones default to 12 MP) and keeps one decode near
  150 MB; the model looks at a 224 px square anyway. It is half the 50 Mpx decompression-bomb limit of
  the training pipeline, which reads files the pipeline chose, not files strangers send.
- ``max_concurrent_predictions`` (default 2): decodes and predictions run in at most this many threads;
  a request waits up to ``queue_timeout_s`` (default 10 s) for a free slot and is then answered 503
  ``busy`` with ``Retry-After``. So the decoded pixels held at once are at most 2 x 25 Mpx, about 300 MB
  over the idle process, however many clients send pictures.

Predictions are micro-batched (:mod:`.batching`): a request decoded in its slot puts its preprocessed row
(kilobytes) on a queue of at most ``max_queued_predictions`` (default 32) rows and frees the slot; one
worker predicts up to ``max_batch_size`` (default 8) queued rows in one model call, waiting at most
``max_batch_wait_ms`` (default 5 ms) after the first for more. A Keras ``predict`` of 8 rows costs about
what one costs, so under concurrent clients the service answers several times more requests per second
(docs/serving.md has the figures); alone, a request waits at most the 5 ms. A request that finds the
queue full is answered 503 ``busy`` with ``Retry-After: 1`` at once. 32 rows is 4 full batches; with the
default ``limit_concurrency`` it is never reached unless that is raised.

Bodies waiting for a slot are held in memory (at most ``max_upload_bytes`` each): ``limit_concurrency``
(default 32, uvicorn's own limit on open connections and running requests; uvicorn answers 503 above
it) bounds them to 32 x 10 MiB.

Time: uvicorn closes idle keep-alive connections (``keep_alive_s``, its default 5 s) but has no timeout for
a request that is still arriving. ``header_timeout_s`` (default 10 s; the request line and headers are a
few hundred bytes) is enforced by the HTTP protocol of :mod:`.server`: a connection whose request headers
are not complete in time gets 408 and is closed. ``body_timeout_s`` (default 30 s) is enforced by the app
while it reads the upload: 30 s carries a 3 MB phone photo at 0.8 Mbit/s and the whole 10 MiB at
2.8 Mbit/s; a body not complete by then gets 408 ``timeout`` and the connection is closed.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

MIB = 2**20
DEFAULT_MAX_UPLOAD_BYTES = 10 * MIB  # phone photos are 2-6 MB
DEFAULT_MAX_PIXELS = 25_000_000
DEFAULT_MAX_CONCURRENT_PREDICTIONS = 2
DEFAULT_QUEUE_TIMEOUT_S = 10.0
DEFAULT_LIMIT_CONCURRENCY = 32
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_KEEP_ALIVE_S = 5
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_MAX_BATCH_WAIT_MS = 5.0
DEFAULT_MAX_QUEUED_PREDICTIONS = 32


@dataclass(frozen=True)
class ServeLimits:
    """The limits of one service (see the module docstring for each default)."""

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_concurrent_predictions: int = DEFAULT_MAX_CONCURRENT_PREDICTIONS
    queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    keep_alive_s: int = DEFAULT_KEEP_ALIVE_S
    limit_concurrency: int = DEFAULT_LIMIT_CONCURRENCY
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_batch_wait_ms: float = DEFAULT_MAX_BATCH_WAIT_MS
    max_queued_predictions: int = DEFAULT_MAX_QUEUED_PREDICTIONS

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "max_upload_bytes",
            "max_pixels",
            "max_concurrent_predictions",
            "keep_alive_s",
            "max_batch_size",
            "max_queued_predictions",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.limit_concurrency, bool) or not isinstance(self.limit_concurrency, int):
            problems.append(f"limit_concurrency must be an int, got {self.limit_concurrency!r}")
        elif self.limit_concurrency < self.max_concurrent_predictions + 1:
            problems.append(
                f"limit_concurrency ({self.limit_concurrency}) must exceed max_concurrent_predictions "
                f"({self.max_concurrent_predictions})"
            )
        for name in ("body_timeout_s", "header_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                problems.append(f"{name} must be a positive number of seconds, got {value!r}")
        value = self.queue_timeout_s
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            problems.append(f"queue_timeout_s must be a number of seconds >= 0, got {value!r}")
        value = self.max_batch_wait_ms
        if not isinstance(value, int | float) or not math.isfinite(value) or not 0 <= value <= 1000:
            problems.append(f"max_batch_wait_ms must be a number of milliseconds in [0, 1000], got {value!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def app_options(self) -> dict:
        """The keyword arguments of :func:`scin_pipeline.serve.app.create_app` these limits set."""
        return {
            "max_upload_bytes": self.max_upload_bytes,
            "max_pixels": self.max_pixels,
            "max_concurrent_predictions": self.max_concurrent_predictions,
            "queue_timeout_s": self.queue_timeout_s,
            "body_timeout_s": self.body_timeout_s,
            "max_batch_size": self.max_batch_size,
            "max_batch_wait_ms": self.max_batch_wait_ms,
            "max_queued_predictions": self.max_queued_predictions,
        }


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The limit options of ``scin-pipeline serve`` (read back with :func:`limits_from_args`)."""
    group = parser.add_argument_group("limits (docs/serving.md, Limits)")
    group.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_BYTES / MIB,
        help="largest accepted upload in MiB (default 10)",
    )
    group.add_argument(
        "--max-megapixels",
        type=float,
        default=DEFAULT_MAX_PIXELS / 1e6,
        metavar="MP",
        help="largest picture in millions of pixels, checked from its header before decoding (default 25: "
        "a 24 MP photo passes; one decode then stays near 150 MB)",
    )
    group.add_argument(
        "--max-concurrent-predictions",
        type=int,
        default=DEFAULT_MAX_CONCURRENT_PREDICTIONS,
        metavar="N",
        help="decodes (and their quality checks) running at once; predictions are batched (default 2)",
    )
    group.add_argument(
        "--queue-timeout-s",
        type=float,
        default=DEFAULT_QUEUE_TIMEOUT_S,
        metavar="S",
        help="how long a request waits for a free prediction slot before 503 busy (default 10; 0: never waits)",
    )
    group.add_argument(
        "--body-timeout-s",
        type=float,
        default=DEFAULT_BODY_TIMEOUT_S,
        metavar="S",
        help="the upload must arrive within S seconds, else 408 (default 30)",
    )
    group.add_argument(
        "--header-timeout-s",
        type=float,
        default=DEFAULT_HEADER_TIMEOUT_S,
        metavar="S",
        help="the request headers must arrive within S seconds, else 408 and the connection is closed (default 10)",
    )
    group.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULT_MAX_BATCH_SIZE,
        metavar="N",
        help="predict up to N queued requests in one model call (default 8; 1: one at a time)",
    )
    group.add_argument(
        "--max-batch-wait-ms",
        type=float,
        default=DEFAULT_MAX_BATCH_WAIT_MS,
        metavar="MS",
        help="after the first request of a batch, wait at most MS ms for more (default 5; 0: take only "
        "what is already queued)",
    )
    group.add_argument(
        "--max-queued-predictions",
        type=int,
        default=DEFAULT_MAX_QUEUED_PREDICTIONS,
        metavar="N",
        help="decoded requests waiting for the model; above it 503 busy at once (default 32)",
    )
    group.add_argument(
        "--limit-concurrency",
        type=int,
        default=DEFAULT_LIMIT_CONCURRENCY,
        metavar="N",
        help="open connections and requests at once; uvicorn answers 503 above it (default 32)",
    )


def limits_from_args(args: argparse.Namespace) -> ServeLimits:
    """ServeLimits from :func:`add_limit_arguments`' options; ValueError (one line) when one is out of range."""
    if not 0 < args.max_upload_mb <= 1024:
        raise ValueError("--max-upload-mb must be in (0, 1024]")
    if not 0 < args.max_megapixels <= 1000:
        raise ValueError("--max-megapixels must be in (0, 1000]")
    try:
        return ServeLimits(
            max_upload_bytes=int(args.max_upload_mb * MIB),
            max_pixels=max(1, int(args.max_megapixels * 1e6)),
            max_concurrent_predictions=args.max_concurrent_predictions,
            queue_timeout_s=args.queue_timeout_s,
            body_timeout_s=args.body_timeout_s,
            header_timeout_s=args.header_timeout_s,
            limit_concurrency=args.limit_concurrency,
            max_batch_size=args.max_batch_size,
            max_batch_wait_ms=args.max_batch_wait_ms,
            max_queued_predictions=args.max_queued_predictions,
        )
    except ValueError as exc:
        raise ValueError(f"serve limits: {exc}") from None
