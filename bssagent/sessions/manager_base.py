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
from ..errors import ConfigurationError
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
        status: ``"ok"`` when the configured backend serves calls, ``"degraded"`` while the
            memory-only fallback does.
        backend: The configured backend (``postgres`` / ``sqlite`` / ``memory``).
        reason: Why the manager is degraded (the error class), else ``None``.
        since: When degraded mode started (UTC), else ``None``.
        degraded_episodes: How many times this manager entered degraded mode.
    """

    status: Literal["ok", "degraded"]
    backend: str
    reason: str | None
    since: datetime | None
    degraded_episodes: int


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


def spawn_thread(target: Callable[..., object], *args: object) -> threading.Thread:
    """Start ``target(*args)`` in a daemon thread (the sync manager's background cleaner)."""
    thread = threading.Thread(target=target, args=args, name="bssagent-cleaner", daemon=True)
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
        self.memory = MemoryStore(limits=self.limits)
        # Reentrant: fallbacks run under it and may record deletions (which take it too).
        self._lock = threading.RLock()
        self._since: datetime | None = None
        self._reason: str | None = None
        self._next_retry = 0.0
        self._episodes = 0
        self._deletions: list[tuple[str, str | None]] = []

    @property
    def degraded(self) -> bool:
        return self._since is not None

    def should_try_primary(self) -> bool:
        """Whether a call should go to the configured backend (always, unless degraded and
        the next reconnect attempt is not due; a due attempt is claimed by one caller)."""
        if self._since is None:
            return True
        with self._lock:
            now = time.monotonic()
            if now < self._next_retry:
                return False
            self._next_retry = now + self.settings.reconnect_interval
            return True

    def enter_degraded(self, exc: BaseException) -> bool:
        """Record a connection-class failure; True if this call started degraded mode."""
        with self._lock:
            self._next_retry = time.monotonic() + self.settings.reconnect_interval
            if self._since is not None:
                return False
            self._since = datetime.now(timezone.utc)
            self._reason = type(exc.__cause__ or exc).__name__
            self._episodes += 1
        # Known users keep their sessions: copy the cached ones into the fallback store.
        for session in self.cache.values():
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
            return True, fallback(self.memory)

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
            self._deletions = []
            self.memory = MemoryStore(limits=self.limits)
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
        with self._lock:
            return Health(
                status="degraded" if self._since else "ok",
                backend=self.target.backend,
                reason=self._reason,
                since=self._since,
                degraded_episodes=self._episodes,
            )

    def remember(self, user_id: str, session: UserSession | None) -> None:
        """Cache ``session`` as the user's current one (or forget a no-longer-current one)."""
        if session is None:
            return
        if session.is_active:
            self.cache.put(user_id, session, session.updated_at)
        else:
            self.cache.invalidate(user_id, session.updated_at)

    def forget(self, user_id: str) -> None:
        """Invalidate the user's cached session after a change whose result is unknown."""
        self.cache.invalidate(user_id, utcnow_after())
