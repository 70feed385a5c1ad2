"""What the sync and async session managers share: settings, cache, degraded-mode state.

Pure logic only (no I/O, nothing to await), so both twins use it unchanged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar

import pydantic
from langchain_core.messages import BaseMessage, message_to_dict

from .. import observability as observe
from ..config import Settings, StorageTarget, redact_url, resolve_target
from ..errors import ConfigurationError, JournalFullError, StorageUnavailableError
from .cache import VersionedLRU
from .model import UserSession
from .storage.base import Limits
from .storage.memory import MemoryStore, utcnow_after

logger = logging.getLogger("bssagent.sessions")
T = TypeVar("T")

DEFAULT_TITLE = "New Chat"
DEFAULT_PAGE = 100


@dataclass(frozen=True)
class Health:
    """A manager's view of its storage.

    Attributes:
        status: ``"ok"`` when the configured backend serves calls; ``"degraded"`` while the
            memory fallback does (``fallback="memory"`` / ``"read_only"``); ``"unavailable"``
            while calls fail (``fallback="raise"``).
        backend: The configured backend (``postgres`` / ``sqlite`` / ``memory``).
        reason: Why (the error class, or ``DeadlineExceeded``), else ``None``.
        since: When the outage began (UTC), else ``None``.
        degraded_episodes: Outages this manager has seen.
        breaker: ``closed`` / ``open`` / ``half_open`` (see ``ManagerState.breaker``).
        failures: Connection failures and deadline expiries in a row.
    """

    status: Literal["ok", "degraded", "unavailable"]
    backend: str
    reason: str | None
    since: datetime | None
    degraded_episodes: int
    breaker: Literal["closed", "open", "half_open"] = "closed"
    failures: int = 0


def limits_of(settings: Settings) -> Limits:
    """The storage :class:`~.storage.base.Limits` the settings ask for."""
    return Limits(
        max_sessions_per_user=settings.max_sessions_per_user,
        on_user_limit=settings.session_limit_policy,
        max_active_sessions=settings.max_active_sessions,
    )


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: LangChain messages as their dicts, others as text."""
    if isinstance(value, BaseMessage):
        return message_to_dict(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


def spawn_thread(
    target: Callable[..., object], *args: object, name: str = "bssagent-cleaner"
) -> threading.Thread:
    """Start ``target(*args)`` in a daemon thread (the sync manager's background work)."""
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    return thread


def build_settings(settings: Settings | None, overrides: dict[str, Any]) -> Settings:
    """Settings from the environment, with explicit keyword arguments winning."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        if settings is None:
            return Settings(**given)
        return Settings(**{**settings.model_dump(), **given})
    except pydantic.ValidationError as exc:
        raise ConfigurationError(f"invalid bssagent settings: {exc}") from None


class ManagerState:
    """Cache and degraded-mode bookkeeping of one manager (thread-safe)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.target: StorageTarget = resolve_target(settings)
        self.namespace = settings.namespace
        self.cache: VersionedLRU[str, UserSession] = VersionedLRU(
            settings.cache_size, settings.cache_ttl
        )
        self.limits = limits_of(settings)
        self.memory = self._fresh_memory()
        # Reentrant: fallbacks run under it and may record deletions (which take it too).
        self._lock = threading.RLock()
        self._since: datetime | None = None
        self._reason: str | None = None
        self._next_retry = 0.0
        self._episodes = 0
        self._deletions: list[tuple[str, str | None]] = []
        # The circuit breaker: connection-class failures and deadline expiries in a row.
        self._failures = 0
        self._down_since: datetime | None = None  # fallback="raise": unavailable since
        self._flushed: dict[str, UserSession] = {}

    def _fresh_memory(self) -> MemoryStore:
        memory = MemoryStore(limits=self.limits)
        memory.read_only = self.settings.fallback == "read_only"
        memory.capacity = self.settings.journal_limit
        return memory

    @property
    def degraded(self) -> bool:
        return self._since is not None

    @property
    def breaker(self) -> Literal["closed", "open", "half_open"]:
        """``closed`` (calls go to the database), ``open`` (they go straight to the
        fallback), ``half_open`` (the next call probes the database)."""
        with self._lock:
            if self._failures < self.settings.breaker_threshold:
                return "closed"
            return "open" if time.monotonic() < self._next_retry else "half_open"

    def should_try_primary(self) -> bool:
        """Whether a call should go to the configured backend: yes while the breaker is
        closed; while it is open, only the one caller that claims a due probe."""
        if self._failures == 0:
            return True
        with self._lock:
            if self._failures < self.settings.breaker_threshold:
                return True
            now = time.monotonic()
            if now < self._next_retry:
                return False
            self._next_retry = now + self.settings.reconnect_interval
            return True

    def _count_failure(self, exc: BaseException) -> None:
        self._failures += 1
        if self._failures >= self.settings.breaker_threshold:
            self._next_retry = time.monotonic() + self.settings.reconnect_interval
        self._reason = type(exc.__cause__ or exc).__name__  # or DeadlineExceeded

    def record_failure(self, exc: BaseException) -> bool:
        """A connection-class failure or deadline expiry with ``fallback="raise"``; True if
        it began an outage."""
        with self._lock:
            self._count_failure(exc)
            if self._down_since is not None:
                return False
            self._down_since = datetime.now(timezone.utc)
            self._episodes += 1
            reason = self._reason
        logger.warning(
            "bssagent: %s storage unavailable (%s, %s); calls fail with "
            "StorageUnavailableError until it returns",
            self.target.backend, reason, self.location(),
            extra=observe.log_fields("unavailable", component="sessions", reason=reason,
                                     backend=self.target.backend, location=self.location()),
        )  # fmt: skip
        observe.degraded("sessions", True)
        return True

    def record_success(self) -> None:
        """The database answered: the breaker closes."""
        if self._failures == 0 and self._down_since is None:
            return
        with self._lock:
            self._failures = 0
            was_down, self._down_since = self._down_since, None
        if was_down is not None:
            logger.warning(
                "bssagent: %s storage is back", self.target.backend,
                extra=observe.log_fields("recovered", component="sessions",
                                         backend=self.target.backend, location=self.location()),
            )  # fmt: skip
            observe.degraded("sessions", False)

    def unavailable(self) -> StorageUnavailableError:
        """The error a call gets while the breaker is open and ``fallback="raise"``."""
        since = self._down_since.isoformat() if self._down_since else "now"
        return StorageUnavailableError(
            f"{self.target.backend} unavailable since {since} ({self._reason}); "
            f"next attempt in at most {self.settings.reconnect_interval:g} s"
        )

    def enter_degraded(self, exc: BaseException) -> bool:
        """Record a connection-class failure; True if this call started degraded mode."""
        with self._lock:
            self._count_failure(exc)
            if self._since is not None:
                return False
            self._since = datetime.now(timezone.utc)
            self._episodes += 1
        # Known users keep their sessions: copy the cached ones into the fallback store (and
        # those last flushed for staleness: in an outage, stale knowledge beats none).
        for session in (*self._flushed.values(), *self.cache.values()):
            self.memory.adopt(session)
        logger.warning(
            "bssagent: %s storage unavailable (%s, %s); serving sessions from memory until it "
            "returns",
            self.target.backend,
            self._reason,
            self.location(),
            extra=observe.log_fields("degraded", component="sessions", reason=self._reason,
                             backend=self.target.backend, location=self.location()),
        )  # fmt: skip
        observe.degraded("sessions", True)
        return True

    def delete_in_memory(
        self, memory: MemoryStore, user_id: str, thread_id: str | None
    ) -> list[str]:
        """A deletion while degraded: done in memory, and replayed on the database by the
        reconciliation (so a session seeded from the cache does not come back)."""
        memory._writable("delete")
        with self._lock:
            self._deletions.append((user_id, thread_id))
        if thread_id is None:
            return memory.delete_user(self.namespace, user_id)
        deleted = memory.delete(self.namespace, user_id, thread_id)
        # Unknown to memory may still be in the database: report it deleted there too.
        return deleted or [thread_id]

    def pending_deletions(self) -> list[tuple[str, str | None]]:
        with self._lock:
            return list(self._deletions)

    def in_memory(
        self, fallback: Callable[[MemoryStore], T], force: bool = False
    ) -> tuple[bool, T | None]:
        """Run ``fallback`` on the memory store if still degraded (or ``force``), atomically
        with respect to :meth:`leave_degraded`; ``(False, None)`` if degraded mode ended."""
        with self._lock:
            if self._since is None and not force:
                return False, None
            try:
                return True, fallback(self.memory)
            except JournalFullError:
                observe.journal("sessions", "refused")
                raise

    def memory_version(self) -> int:
        """Changes to the fallback data so far (writes to memory, deletions recorded)."""
        with self._lock:
            return self.memory.writes + len(self._deletions)

    def leave_degraded(self, reconciled: int, version: int) -> bool:
        """Leave degraded mode if nothing was served from memory since ``version``."""
        with self._lock:
            if self._since is None:
                return True
            if self.memory.writes + len(self._deletions) != version:
                return False
            self._since = None
            self._reason = None
            self._failures = 0
            self._deletions = []
            self.memory = self._fresh_memory()
            self.cache.clear()
        logger.warning(
            "bssagent: %s storage is back; %d session(s) from memory reconciled",
            self.target.backend,
            reconciled,
            extra=observe.log_fields("recovered", component="sessions", reconciled=reconciled,
                             backend=self.target.backend, location=self.location()),
        )  # fmt: skip
        observe.degraded("sessions", False)
        return True

    def location(self) -> str:
        """Where the data lives, safe for logs (no password)."""
        if self.target.backend == "postgres":
            return redact_url(self.target.url)
        if self.target.backend == "sqlite":
            return str(Path(self.target.path or ""))
        return "memory"

    def health(self) -> Health:
        breaker = self.breaker
        with self._lock:
            status: Literal["ok", "degraded", "unavailable"] = (
                "degraded" if self._since else "unavailable" if self._down_since else "ok"
            )
            return Health(
                status=status,
                backend=self.target.backend,
                reason=self._reason if status != "ok" else None,
                since=self._since or self._down_since,
                degraded_episodes=self._episodes,
                breaker=breaker,
                failures=self._failures,
            )

    def remember(self, user_id: str, session: UserSession | None) -> None:
        """Cache ``session`` as the user's current one (or forget a no-longer-current one)."""
        if session is None:
            return
        if session.is_active:
            self.cache.put(user_id, session, session.updated_at)
        else:
            self.cache.invalidate(user_id, session.updated_at)

    def flush_cache(self) -> None:
        """Stop trusting every cached session (changes made elsewhere may have been missed),
        keeping them only to seed the fallback should the database be down too."""
        with self._lock:
            self._flushed = {s.user_id: s for s in self.cache.values()}
            self.cache.clear()

    def forget(self, user_id: str) -> None:
        """Invalidate the user's cached session after a change whose result is unknown."""
        self.cache.invalidate(user_id, utcnow_after())
