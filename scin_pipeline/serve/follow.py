"""Which model the service answers with, over time: ``models:/NAME@ALIAS`` is followed, ``models:/NAME/VERSION``
is pinned.

:class:`ModelFollower` holds one immutable :class:`ServingState` (the loaded version, or why none is
served). Each request reads the state once and uses that ``ServedModel`` to the end, so replacing the
state is the whole swap: a request already running finishes on the old model object, the next one gets
the new one, and nothing is ever half-loaded in between.

Following an alias: a daemon thread (started and stopped with the app's lifespan) calls :meth:`refresh`
every ``poll_s`` seconds. A refresh asks the registry which version holds the alias (one cheap call);
when it is a different version, that version is loaded and warmed up in the poller's thread while the old
one keeps answering, then swapped in. When the alias is gone (never set, or removed by model_comparison
because no candidate was eligible) the state becomes "none served" with the reason, and the app answers
``POST /predict`` with 503. A version that fails to load is logged, reported by ``GET /status`` and not
retried until the alias moves; the previous version (if any) keeps answering. Registry errors while
polling (a server restarting, a locked SQLite file) keep the current state and are reported the same way.

At start-up (:meth:`start`) errors a user must fix still stop the service: no such registered model, a
malformed URI, a pinned version that does not exist, a version that is not a SCIN package.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

from scin_pipeline.core.mlflow_registry import without_credentials
from scin_pipeline.serve.model import (
    AliasNotSet,
    ServedModel,
    ServeError,
    load_version,
    parse_model_uri,
    registry_client,
    resolve_version,
)

DEFAULT_ALIAS_POLL_S = 5.0
LOG = logging.getLogger("scin_pipeline.serve")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ServingState:
    """What answers now: ``served``, or nothing with ``reason``. Replaced whole, never changed in place."""

    served: ServedModel | None
    reason: str | None = None
    cleared_at: str | None = None  # when model_comparison removed the alias (the reason is its record)
    since: str = ""


class ModelFollower:
    """The model behind ``model_uri``, kept current (see the module docstring)."""

    def __init__(self, model_uri: str, *, tracking_uri: str | None = None, poll_s: float = DEFAULT_ALIAS_POLL_S):
        if not isinstance(poll_s, (int, float)) or poll_s < 0:
            raise ValueError(f"poll_s must be a number >= 0 (0: never re-resolve), got {poll_s!r}")
        self.requested_uri = model_uri
        self.name, self.alias, self.pinned_version = parse_model_uri(model_uri)
        self.tracking_uri = tracking_uri
        self.poll_s = float(poll_s)
        self._client = None
        self._where = ""
        self._state = ServingState(None, reason="starting", since=_now())
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed_version: str | None = None
        self._fixed = False
        self.last_checked: str | None = None
        self.last_error: str | None = None

    @classmethod
    def fixed(cls, served: ServedModel) -> ModelFollower:
        """An already loaded model, served as it is: no registry, never re-resolved (benchmarks)."""
        follower = cls(served.loaded_uri, poll_s=0)  # models:/NAME/VERSION: pinned
        follower._fixed = True
        follower._state = ServingState(served, since=_now())
        return follower

    # ------------------------------------------------------------------------------------ reading

    @property
    def state(self) -> ServingState:
        return self._state

    @property
    def served(self) -> ServedModel | None:
        return self._state.served

    @property
    def follows_alias(self) -> bool:
        return self.alias is not None and self.poll_s > 0 and not self._fixed

    def status(self) -> dict:
        state = self._state
        served = state.served
        return {
            "serving": served is not None,
            "requested_uri": self.requested_uri,
            "name": self.name,
            "alias": self.alias,
            "version": served.version if served else None,
            "uri": served.loaded_uri if served else None,
            "reason": state.reason if served is None else None,
            "cleared_at": state.cleared_at,
            "since": state.since,
            "follows_alias": self.follows_alias,
            "poll_interval_s": self.poll_s if self.follows_alias else None,
            "last_checked": self.last_checked,
            "last_error": self.last_error,
        }

    def describe(self) -> str:
        """One line for the console: what is served, or why nothing is."""
        served = self._state.served
        following = f"; following @{self.alias} every {self.poll_s:g} s" if self.follows_alias else ""
        if served is None:
            return f"no model served yet ({self._state.reason}); POST /predict answers 503 until it is{following}"
        via = f"@{self.alias} = " if self.alias else ""
        return (
            f"serving {via}{served.loaded_uri} ({served.kind}"
            f"{', trained on SYNTHETIC images' if served.synthetic_data else ''}){following}"
        )

    # ------------------------------------------------------------------------------------ updating

    def start(self) -> None:
        """The first resolution and load, in the caller's thread. ServeError for what a user must fix; an
        alias without a version is not one (the state says why nothing is served)."""
        if not self._fixed:
            self._refresh(initial=True)

    def refresh(self) -> bool:
        """Re-resolve the alias once; load and swap in a new version. True when the state changed."""
        if self._fixed or (self.alias is None and self._state.served is not None):
            return False  # pinned: never re-resolved
        return self._refresh(initial=False)

    def _registry(self):
        if self._client is None:
            self._client, uri = registry_client(self.tracking_uri)
            self._where = without_credentials(uri)
        return self._client

    def _set(self, state: ServingState, *, initial: bool = False) -> bool:
        old = self._state
        if old.served is state.served and old.reason == state.reason:
            return False
        self._state = state  # the swap: one reference, read once per request
        if initial:
            pass  # the start-up state is reported by the caller (describe())
        elif state.served is not None:
            moved = f" (was {old.served.loaded_uri})" if old.served is not None else ""
            LOG.info("now serving %s%s", state.served.loaded_uri, moved)
        else:
            LOG.warning("no model served: %s", state.reason)
        return True

    def _note_error(self, message: str) -> None:
        if message != self.last_error:
            LOG.error("%s", message)
        self.last_error = message

    def _refresh(self, *, initial: bool) -> bool:
        with self._refresh_lock:
            try:
                client = self._registry()
                registered = resolve_version(client, self.name, self.alias, self.pinned_version, self._where)
            except AliasNotSet as exc:
                self.last_checked, self.last_error = _now(), None
                self._failed_version = None
                return self._set(
                    ServingState(None, reason=str(exc), cleared_at=exc.cleared_at, since=_now()), initial=initial
                )
            except ServeError as exc:  # the registered model (or pinned version) is not there
                if initial:
                    raise
                self.last_checked, self.last_error = _now(), None
                return self._set(ServingState(None, reason=str(exc), since=_now()))
            except Exception as exc:
                if initial:
                    raise
                self._note_error(f"cannot read the registry for {self.requested_uri}: {type(exc).__name__}: {exc}")
                return False
            self.last_checked = _now()
            version = str(registered.version)
            current = self._state.served
            if current is not None and current.version == version:
                self.last_error = None
                return False
            if version == self._failed_version:
                return False
            try:
                served = load_version(
                    registered,
                    name=self.name,
                    requested_uri=self.requested_uri,
                    tracking_uri=self.tracking_uri,
                    alias=self.alias,
                )
                served.warm_up()
            except Exception as exc:
                if initial:
                    raise
                self._failed_version = version
                still = f"; still serving {current.loaded_uri}" if current is not None else ""
                self._note_error(f"cannot serve version {version} of {self.name!r}: {type(exc).__name__}: {exc}{still}")
                return False
            self._failed_version, self.last_error = None, None
            return self._set(ServingState(served, since=_now()), initial=initial)

    # ------------------------------------------------------------------------------------ polling

    def start_polling(self) -> None:
        """Re-resolve the alias every ``poll_s`` seconds in a daemon thread (nothing for a pinned URI)."""
        if not self.follows_alias or (self._thread is not None and self._thread.is_alive()):
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="scin-serve-alias-poller", daemon=True)
        self._thread.start()

    def stop_polling(self, timeout_s: float = 60.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
            except Exception as exc:  # the poller must outlive any one failure
                self._note_error(f"alias poll failed: {type(exc).__name__}: {exc}")
