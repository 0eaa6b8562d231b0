"""Micro-batched predictions: requests that arrive within a few milliseconds of each other share one model call.

A Keras ``predict`` costs about the same for 1 row as for 8 (its fixed cost per call dominates at these
sizes), and the model is called from one thread at a time anyway (:class:`~.model.ServedModel`'s lock).
So instead of each request taking the lock in turn, each request puts its already decoded and preprocessed
row on a bounded queue, and one worker thread takes what is queued: it starts a batch with the first row,
waits at most ``max_batch_wait_ms`` for more (or stops at ``max_batch_size``), stacks the rows, calls
``predict_proba`` once, and hands each request its own row of the answer.

- Same answers: the rows are independent (the image model has no batch statistics at inference, the
  questionnaire is encoded row by row), so a row predicted in a batch equals its single prediction to
  float32 rounding (a test compares them, 1e-6).
- A swapped model: each served model object has its own batcher and worker (:class:`Batchers`), so a
  request finishes on the model it started with, one batch never mixes two versions, and a slow call
  of the old model never holds up the new one. A worker with nothing to do for ``IDLE_EXIT_S`` ends
  (and lets a replaced model be freed); the next row starts a new one.
- Bounded: at most ``max_queued`` rows wait (a row is a preprocessed model input, kilobytes; the
  full-size pixels are gone by then). A request that finds the queue full raises :class:`QueueFull`; the
  app answers 503 ``busy`` with ``Retry-After``.
- Failures: an exception from a batched call is retried row by row, so one bad row fails only its own
  request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from scin_pipeline.serve.model import ServedModel

LOG = logging.getLogger("scin_pipeline.serve")
IDLE_EXIT_S = 30.0


class QueueFull(RuntimeError):
    """Every place in the prediction queue is taken."""


@dataclass
class _Row:
    images: np.ndarray | None  # (1, S, S, 3) uint8, or None for a model without images
    cases: pd.DataFrame  # one case row
    future: Future = field(default_factory=Future)


def stack_cases(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """One case frame of single-row frames (index 0..N-1). A check box another request ticked and this
    one did not is False in its row (what the encoding reads for an absent column); a choice it did not
    answer is missing (None), as an absent column reads."""
    stacked = pd.DataFrame([frame.iloc[0].to_dict() if len(frame.columns) else {} for frame in frames])
    for column in stacked.columns:
        present = stacked[column].dropna()
        if len(present) and all(isinstance(value, bool | np.bool_) for value in present):
            stacked[column] = [isinstance(value, bool | np.bool_) and bool(value) for value in stacked[column]]
    return stacked


def predict_rows(served: ServedModel, rows: list[_Row]) -> np.ndarray:
    """(len(rows), K) probabilities of ``rows`` in one ``predict_proba`` call."""
    images = None
    if served.uses_image:
        parts = [row.images for row in rows if row.images is not None]
        assert len(parts) == len(rows)  # an image model's request always carries its image
        images = np.concatenate(parts)
    return served.predict_proba(images, stack_cases([row.cases for row in rows]))


class MicroBatcher:
    """One worker thread that predicts the queued rows of one served model in batches (see the module
    docstring). The worker starts with the first row and ends after ``IDLE_EXIT_S`` without one."""

    def __init__(
        self,
        served: ServedModel,
        *,
        max_batch_size: int,
        max_batch_wait_ms: float,
        max_queued: int,
        idle_exit_s: float = IDLE_EXIT_S,
    ) -> None:
        self.served = served
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max_batch_wait_ms / 1000
        self.idle_exit_s = idle_exit_s
        self._queue: queue.Queue[_Row | None] = queue.Queue(maxsize=max_queued)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches = 0  # model calls made, and rows predicted: for tests and logs
        self.rows = 0

    async def predict(self, images: np.ndarray | None, cases: pd.DataFrame) -> np.ndarray:
        """The (K,) probabilities of one row; QueueFull at once when no place is free."""
        row = _Row(images, cases)
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} predictions are already waiting") from None
        self._ensure_running()  # after the put: a worker that is ending sees the row, or a new one starts
        return await asyncio.wrap_future(row.future)

    @property
    def running(self) -> bool:
        return self._thread is not None

    def _ensure_running(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="scin-serve-batcher", daemon=True)
                self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish what is queued, then end the worker thread."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout_s)

    def _next(self) -> _Row | None:
        """The first row of the next batch; None: end the worker (stopped, or idle)."""
        while True:
            try:
                return self._queue.get(timeout=self.idle_exit_s)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return None

    def _collect(self, first: _Row) -> tuple[list[_Row], bool]:
        """``first`` and the rows that arrive within the wait, up to the batch size; (rows, stop seen)."""
        batch = [first]
        deadline = time.monotonic() + self.max_batch_wait_s
        while len(batch) < self.max_batch_size:
            try:
                row = self._queue.get_nowait()  # already waiting: no need to wait for it
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    row = self._queue.get(timeout=left)
                except queue.Empty:
                    break
            if row is None:
                return batch, True
            batch.append(row)
        return batch, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._next()
            if first is None:
                break
            batch, stopping = self._collect(first)
            self._predict_batch(batch)
        with self._lock:
            if self._thread is threading.current_thread():
                self._thread = None

    def _predict_batch(self, rows: list[_Row]) -> None:
        rows = [row for row in rows if row.future.set_running_or_notify_cancel()]  # drop cancelled requests
        if not rows:
            return
        try:
            probabilities = predict_rows(self.served, rows)
        except Exception as exc:
            if len(rows) == 1:
                rows[0].future.set_exception(exc)
                return
            LOG.warning("a batch of %d predictions failed; predicting its rows one by one", len(rows))
            for row in rows:
                try:
                    row.future.set_result(predict_rows(self.served, [row])[0])
                except Exception as row_exc:
                    row.future.set_exception(row_exc)
            return
        self.batches += 1
        self.rows += len(rows)
        for row, answer in zip(rows, probabilities, strict=True):
            row.future.set_result(answer)


class Batchers:
    """The :class:`MicroBatcher` of each served model object: the current one, and a replaced one while
    requests that started on it finish (it is dropped here when another model is asked for; its worker
    ends once idle)."""

    def __init__(self, *, max_batch_size: int, max_batch_wait_ms: float, max_queued: int) -> None:
        self.max_batch_size, self.max_batch_wait_ms, self.max_queued = max_batch_size, max_batch_wait_ms, max_queued
        self._by_model: dict[int, MicroBatcher] = {}
        self._lock = threading.Lock()

    def for_model(self, served: ServedModel) -> MicroBatcher:
        with self._lock:
            batcher = self._by_model.get(id(served))
            if batcher is None or batcher.served is not served:
                batcher = MicroBatcher(
                    served,
                    max_batch_size=self.max_batch_size,
                    max_batch_wait_ms=self.max_batch_wait_ms,
                    max_queued=self.max_queued,
                )
                for key, other in list(self._by_model.items()):
                    if not other.running:
                        del self._by_model[key]
                self._by_model[id(served)] = batcher
            return batcher

    def stop(self) -> None:
        with self._lock:
            batchers = list(self._by_model.values())
        for batcher in batchers:
            batcher.stop()
