"""Progress of long steps (images per shard, embedding batches, epochs), reported through a callback.

Assets pass ``context.log.info``, so progress lands in the Dagster run log (the UI's run view shows it)
and the CLI echoes the lines that start with :data:`PROGRESS_PREFIX`. No Dagster import here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

PROGRESS_PREFIX = "progress: "
T = TypeVar("T")


class Progress:
    """Counts work done out of ``total`` and emits a line at most every ``every_s`` seconds (and at the
    end), so a 10,000-image shard says where it is without flooding the log."""

    def __init__(
        self,
        what: str,
        total: int,
        emit: Callable[[str], None] | None,
        *,
        unit: str = "",
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.what, self.total, self.emit, self.unit = what, int(total), emit, unit
        self.every_s, self.clock = every_s, clock
        self.done = 0
        self.started = clock()
        self._last_emit = self.started

    def line(self) -> str:
        elapsed = self.clock() - self.started
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        unit = f" {self.unit}" if self.unit else ""
        return f"{PROGRESS_PREFIX}{self.what}: {self.done:,}/{self.total:,}{unit}{share}, {elapsed:.0f} s"

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if self.emit is not None and (self.done >= self.total or now - self._last_emit >= self.every_s):
            self._last_emit = now
            self.emit(self.line())


def tracked(items: Iterable[T], progress: Progress) -> Iterator[T]:
    """Yield ``items`` unchanged, advancing ``progress`` by one per item."""
    for item in items:
        yield item
        progress.advance()


def report(emit: Callable[[str], None] | None, message: str) -> None:
    """One progress line (an epoch, a phase) through ``emit`` when there is one."""
    if emit is not None:
        emit(f"{PROGRESS_PREFIX}{message}")
