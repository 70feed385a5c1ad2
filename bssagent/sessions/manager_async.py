"""The session manager (async source; the sync twin is generated from this module)."""

from __future__ import annotations

import asyncio  # sync: import threading
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from ..config import Settings
from ..errors import SessionNotFoundError, StorageUnavailableError
from . import validation
from .manager_base import DEFAULT_PAGE, DEFAULT_TITLE, Health, ManagerState, build_settings
from .model import UserSession
from .storage.base import AsyncSessionStore
from .storage.memory import MemoryStore
from .storage.offload import AsyncOffloaded  # sync-drop
from .storage.sqlite import SqliteStore

T = TypeVar("T")


def _open_store(state: ManagerState) -> AsyncSessionStore:
    settings, target = state.settings, state.target
    if target.backend == "postgres":
        from .storage.postgres_async import AsyncPostgresStore

        assert target.url is not None
        return AsyncPostgresStore(
            target.url,
            settings.table_name,
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            pool_timeout=settings.pool_timeout,
            connect_timeout=settings.connect_timeout,
            prepare_threshold=settings.prepare_threshold,
            lock_timeout=settings.migration_lock_timeout,
        )
    if target.backend == "sqlite":
        store = SqliteStore(Path(target.path or settings.sqlite_path), settings.table_name)
        return AsyncOffloaded(store)  # sync: return store
    return AsyncOffloaded(MemoryStore(), offload=False)  # sync: return MemoryStore()


class AsyncAgentSessionManager:
    """Maps users to LangGraph threads: one current session per user, several chats each.

    Configured from ``BSSAGENT_*`` settings (see :mod:`bssagent.config`); every keyword
    argument overrides its setting. Storage is opened lazily on the first call, and the
    schema is migrated then. The manager is safe to share between tasks and threads.

    If the database cannot be reached (at start or later) and ``fallback="memory"`` (the
    default), calls keep working from memory: a WARNING is logged once, :attr:`is_degraded`
    turns true, and every ``reconnect_interval`` seconds one call tries the database again.
    When it answers, sessions created meanwhile are written to it (the database wins for a
    user who meanwhile got a current session elsewhere). With ``fallback="raise"``,
    :class:`~bssagent.errors.StorageUnavailableError` reaches the caller instead.

    Args:
        database_url: ``postgresql://``, ``sqlite:///`` or ``memory://``; default: the
            ``BSSAGENT_DATABASE_URL`` / ``DATABASE_URL`` variable, else the SQLite file.
        namespace: Scope of this manager's sessions (one database, several apps).
        table_name: The session table (a plain SQL identifier).
        cache_size: Current sessions cached (LRU); 0 disables the cache.
        cache_ttl: Seconds a cached session is trusted without asking the database.
        fallback: ``"memory"`` or ``"raise"`` (see above).
        settings: A :class:`~bssagent.config.Settings` to start from instead of the
            environment.
        store: A storage backend to use instead of the one the settings name (any object
            satisfying the storage contract in :mod:`bssagent.sessions.storage.base`).
        **options: Any other :class:`~bssagent.config.Settings` field
            (``connect_timeout``, ``pool_max_size``, ``prepare_threshold``, ...).

    Raises:
        ConfigurationError: A setting is invalid (nothing is opened).
    """

    def __init__(
        self,
        *,
        database_url: str | None = None,
        namespace: str | None = None,
        table_name: str | None = None,
        cache_size: int | None = None,
        cache_ttl: float | None = None,
        fallback: str | None = None,
        settings: Settings | None = None,
        store: AsyncSessionStore | None = None,
        **options: Any,
    ) -> None:
        resolved = build_settings(
            settings,
            {
                "database_url": database_url,
                "namespace": namespace,
                "table_name": table_name,
                "cache_size": cache_size,
                "cache_ttl": cache_ttl,
                "fallback": fallback,
                **options,
            },
        )
        self._state = ManagerState(resolved)
        self._store = store if store is not None else _open_store(self._state)
        self._ready = False
        self._setup_lock = asyncio.Lock()  # sync: self._setup_lock = threading.Lock()
        self._closed = False

    # -- properties -----------------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        """The resolved settings."""
        return self._state.settings

    @property
    def namespace(self) -> str:
        """The namespace every call of this manager is scoped to."""
        return self._state.namespace

    @property
    def backend(self) -> str:
        """The configured backend: ``"postgres"``, ``"sqlite"`` or ``"memory"``."""
        return self._state.target.backend

    @property
    def store(self) -> AsyncSessionStore:
        """The storage backend (the contract of :mod:`bssagent.sessions.storage.base`)."""
        return self._store

    @property
    def location(self) -> str:
        """Where the sessions are stored, safe to print or log (no password)."""
        return self._state.location()

    @property
    def is_degraded(self) -> bool:
        """True while the memory-only fallback serves calls."""
        return self._state.degraded

    def health(self) -> Health:
        """The storage status: ``ok`` or ``degraded``, with the reason and since when."""
        return self._state.health()

    # -- plumbing -------------------------------------------------------------------------

    async def _call(
        self,
        primary: Callable[[AsyncSessionStore], Awaitable[T]],
        fallback: Callable[[MemoryStore], T],
    ) -> T:
        """Run ``primary`` on the configured store, or ``fallback`` on memory if it is down."""
        state = self._state
        if not state.should_try_primary():
            return fallback(state.memory)
        try:
            if not self._ready:
                await self._setup()
            if state.degraded:
                # Before the call, so that it sees what was written while degraded.
                await self._reconcile()
            return await primary(self._store)
        except StorageUnavailableError as exc:
            if state.settings.fallback == "raise":
                raise
            if state.enter_degraded(exc):
                await self._store.close()
            return fallback(state.memory)

    async def _setup(self) -> None:
        async with self._setup_lock:
            if not self._ready:
                await self._store.setup()
                self._ready = True

    async def _reconcile(self) -> None:
        """The database is back: write the sessions made in memory, then leave degraded mode."""
        # Ended sessions first: a chat started during the outage replaces the old current
        # one only once the old one's deactivation is written.
        sessions = sorted(self._state.memory.sessions(), key=lambda s: s.is_active)
        for session in sessions:
            await self._store.adopt(session)
        self._state.leave_degraded(len(sessions))

    def _new_thread_id(self) -> str:
        return str(uuid.uuid4())

    # -- the seed's API -------------------------------------------------------------------

    async def create_user_session(
        self, user_id: str, title: str = DEFAULT_TITLE, metadata: dict[str, Any] | None = None
    ) -> UserSession:
        """Start a new chat for the user; it becomes the current session.

        The previous current session stays stored, inactive (see :meth:`switch_session`).

        Raises:
            InvalidInputError: A bad ``user_id``, ``title`` or ``metadata``.
        """
        user_id = validation.user_id(user_id)
        title = validation.title(title)
        meta = {} if metadata is None else validation.metadata(metadata)
        ns, thread_id = self.namespace, self._new_thread_id()
        session = await self._call(
            lambda s: s.create(ns, user_id, title, meta, thread_id),
            lambda m: m.create(ns, user_id, title, meta, thread_id),
        )
        self._state.remember(user_id, session)
        return session

    async def get_or_create_user_session(
        self, user_id: str, title: str = DEFAULT_TITLE, metadata: dict[str, Any] | None = None
    ) -> UserSession:
        """The user's current session, created (with ``title``) if there is none.

        Concurrent calls for the same new user, from any number of threads, tasks or
        processes, all return the same session. A cached user costs no I/O.

        Raises:
            InvalidInputError: A bad ``user_id``, ``title`` or ``metadata``.
        """
        user_id = validation.user_id(user_id)
        title = validation.title(title)
        meta = {} if metadata is None else validation.metadata(metadata)
        cached = self._state.cache.get(user_id)
        if cached is not None:
            return cached
        ns, thread_id = self.namespace, self._new_thread_id()
        session, _ = await self._call(
            lambda s: s.get_or_create(ns, user_id, title, meta, thread_id),
            lambda m: m.get_or_create(ns, user_id, title, meta, thread_id),
        )
        self._state.remember(user_id, session)
        return session

    async def get_current_user_session(self, user_id: str) -> UserSession:
        """The user's current session.

        Raises:
            SessionNotFoundError: The user has no current session.
            InvalidInputError: A bad ``user_id``.
        """
        user_id = validation.user_id(user_id)
        cached = self._state.cache.get(user_id)
        if cached is not None:
            return cached
        ns = self.namespace
        session = await self._call(
            lambda s: s.get_current(ns, user_id), lambda m: m.get_current(ns, user_id)
        )
        if session is None:
            raise SessionNotFoundError(f"no current session for user {user_id!r}")
        self._state.remember(user_id, session)
        return session

    async def update_session(
        self, user_id: str, updates: dict[str, Any], *, thread_id: str | None = None
    ) -> UserSession:
        """Change ``title`` and/or ``metadata`` (replaced whole) of a session of the user.

        Args:
            user_id: The owner.
            updates: ``{"title": ...}``, ``{"metadata": {...}}`` or both; nothing else.
            thread_id: The session to change; default: the current one.

        Raises:
            UnknownFieldError: ``updates`` names another field (nothing is written).
            SessionNotFoundError: No such session for this user.
        """
        user_id = validation.user_id(user_id)
        fields = validation.updates(updates)
        thread = None if thread_id is None else validation.thread_id(thread_id)
        ns = self.namespace
        session = await self._call(
            lambda s: s.update(ns, user_id, thread, fields),
            lambda m: m.update(ns, user_id, thread, fields),
        )
        if session is None:
            raise SessionNotFoundError(f"no such session for user {user_id!r}")
        self._state.remember(user_id, session)
        return session

    async def deactivate_session(self, user_id: str) -> bool:
        """End the user's current session (it stays stored). Whether there was one."""
        user_id = validation.user_id(user_id)
        ns = self.namespace
        session = await self._call(
            lambda s: s.deactivate(ns, user_id), lambda m: m.deactivate(ns, user_id)
        )
        if session is None:
            self._state.forget(user_id)
            return False
        self._state.remember(user_id, session)
        return True

    async def list_active_sessions(
        self, *, limit: int = DEFAULT_PAGE, before_id: int | None = None
    ) -> list[UserSession]:
        """A page of the namespace's current sessions, newest first.

        Args:
            limit: Page size, 1-1000.
            before_id: Cursor: pass the last ``id`` of the previous page.
        """
        limit = validation.limit(limit)
        cursor = validation.cursor(before_id)
        ns = self.namespace
        return await self._call(
            lambda s: s.list_active(ns, limit, cursor), lambda m: m.list_active(ns, limit, cursor)
        )

    def clear_memory_cache(self) -> None:
        """Forget every cached session; the next calls read the database."""
        self._state.cache.clear()

    async def has_session(self, user_id: str) -> bool:
        """Whether the user has a current session."""
        try:
            await self.get_current_user_session(user_id)
        except SessionNotFoundError:
            return False
        return True

    def get_session_count(self) -> int:
        """How many sessions this process holds in its memory cache."""
        return len(self._state.cache)

    # -- several chats per user -----------------------------------------------------------

    async def list_user_sessions(
        self, user_id: str, *, limit: int = DEFAULT_PAGE, before_id: int | None = None
    ) -> list[UserSession]:
        """A page of the user's sessions (current and past), newest first."""
        user_id = validation.user_id(user_id)
        limit = validation.limit(limit)
        cursor = validation.cursor(before_id)
        ns = self.namespace
        return await self._call(
            lambda s: s.list_user(ns, user_id, limit, cursor),
            lambda m: m.list_user(ns, user_id, limit, cursor),
        )

    async def get_session(self, user_id: str, thread_id: str) -> UserSession:
        """The user's session on ``thread_id``, current or not.

        Raises:
            SessionNotFoundError: No such thread, or it belongs to someone else.
        """
        user_id = validation.user_id(user_id)
        thread = validation.thread_id(thread_id)
        ns = self.namespace
        session = await self._call(
            lambda s: s.get(ns, user_id, thread), lambda m: m.get(ns, user_id, thread)
        )
        if session is None:
            raise SessionNotFoundError(f"no session {thread!r} for user {user_id!r}")
        return session

    async def switch_session(self, user_id: str, thread_id: str) -> UserSession:
        """Make one of the user's sessions the current one.

        Raises:
            SessionNotFoundError: No such thread, or it belongs to someone else.
        """
        user_id = validation.user_id(user_id)
        thread = validation.thread_id(thread_id)
        ns = self.namespace
        session = await self._call(
            lambda s: s.switch(ns, user_id, thread), lambda m: m.switch(ns, user_id, thread)
        )
        if session is None:
            raise SessionNotFoundError(f"no session {thread!r} for user {user_id!r}")
        self._state.remember(user_id, session)
        return session

    async def delete_session(self, user_id: str, thread_id: str) -> None:
        """Delete one of the user's sessions from the registry.

        Raises:
            SessionNotFoundError: No such thread, or it belongs to someone else.
        """
        user_id = validation.user_id(user_id)
        thread = validation.thread_id(thread_id)
        ns = self.namespace
        deleted = await self._call(
            lambda s: s.delete(ns, user_id, thread), lambda m: m.delete(ns, user_id, thread)
        )
        self._state.forget(user_id)
        if not deleted:
            raise SessionNotFoundError(f"no session {thread!r} for user {user_id!r}")

    # -- lifetime -------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the storage connections. Idempotent."""
        if not self._closed:
            self._closed = True
            await self._store.close()

    async def __aenter__(self) -> AsyncAgentSessionManager:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
