"""The session manager (async source; the sync twin is generated from this module)."""

from __future__ import annotations

import asyncio  # sync-drop
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import suppress
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.store.base import BaseStore, IndexConfig, Item, Op, PutOp, SearchOp
from typing_extensions import Self

from .. import observability as observe
from ..config import Settings
from ..errors import (
    InvalidInputError,
    InvalidTransitionError,
    SessionLimitError,
    SessionNotFoundError,
    StorageUnavailableError,
)
from ..persistence import Persistence
from ..store_scope import (
    PREFERENCES,
    Namespace,
    ScopedStore,
    app_root,
    item_dict,
    preference_ops,
    read_preferences,
    session_root,
    user_root,
)
from . import lifecycle, migrations, validation
from .deadline import within  # sync-drop
from .lifecycle import Status, end_status
from .manager_base import (
    DEFAULT_PAGE,
    DEFAULT_TITLE,
    Health,
    ManagerState,
    build_settings,
    jsonable,
)

# sync-only: from .deadline import Deadlines
# sync-only: from .manager_base import spawn_thread
from .model import SessionEvent, SessionStats, UserSession
from .storage.base import AsyncSessionStore
from .storage.memory import MemoryStore
from .storage.offload import AsyncOffloaded  # sync-drop
from .storage.slots import AsyncSlot, cancel  # sync: from .storage.slots import Slot
from .storage.sqlite import SqliteStore

T = TypeVar("T")
logger = logging.getLogger("bssagent.sessions")


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
            limits=state.limits,
        )
    if target.backend == "sqlite":
        store = SqliteStore(
            Path(target.path or settings.sqlite_path), settings.table_name, limits=state.limits
        )
        return AsyncOffloaded(store)  # sync: return store
    memory = MemoryStore(limits=state.limits)
    return AsyncOffloaded(memory, offload=False)  # sync: return memory


class AsyncAgentSessionManager:
    """Maps users to LangGraph threads: one current session per user, several chats each.

    Configured from ``BSSAGENT_*`` settings (see :mod:`bssagent.config`); every keyword
    argument overrides its setting. Storage is opened lazily on the first call, and the
    schema is migrated then. The manager is safe to share between tasks and threads.

    Every PostgreSQL call has a hard deadline (``deadline``, 0.5 s). A circuit breaker counts
    connection failures and deadline expiries: after ``breaker_threshold`` in a row calls
    skip the database, and every ``reconnect_interval`` seconds one call probes it. Meanwhile,
    with ``fallback="memory"`` (the default), calls keep working from memory: a WARNING is
    logged once and :attr:`is_degraded` turns true; when the database answers, sessions
    created meanwhile are written to it (the database wins for a user who meanwhile got a
    current session elsewhere). ``fallback="read_only"`` serves known users from the cache
    and refuses changes; ``fallback="raise"`` fails every call. Both raise
    :class:`~bssagent.errors.StorageUnavailableError`. :meth:`health` tells which state.

    Args:
        database_url: ``postgresql://``, ``sqlite:///`` or ``memory://``; default: the
            ``BSSAGENT_DATABASE_URL`` / ``DATABASE_URL`` variable, else the SQLite file.
        namespace: Scope of this manager's sessions (one database, several apps).
        table_name: The session table (a plain SQL identifier).
        cache_size: Current sessions cached (LRU); 0 disables the cache.
        cache_ttl: Seconds a cached session is trusted without asking the database.
        fallback: ``"memory"``, ``"read_only"`` or ``"raise"`` (see above).
        settings: A :class:`~bssagent.config.Settings` to start from instead of the
            environment.
        store: A storage backend to use instead of the one the settings name (any object
            satisfying the storage contract in :mod:`bssagent.sessions.storage.base`).
        checkpointer: The LangGraph saver holding the conversations, for deleting, pruning
            and exporting them; default: LangGraph's saver on the same database.
        memory_store: The LangGraph store holding long-term memory and preferences;
            default: LangGraph's store on the same database.
        memory_index: LangGraph's ``IndexConfig`` (``dims``, ``embed``, ``fields``) for
            semantic search over memories in the default store (PostgreSQL needs the
            ``pgvector`` extension).
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
        checkpointer: BaseCheckpointSaver[Any] | Persistence | None = None,
        memory_store: BaseStore | None = None,
        memory_index: IndexConfig | None = None,
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
        self._persistence = (
            checkpointer
            if isinstance(checkpointer, Persistence)
            else Persistence(resolved, checkpointer, memory_store, memory_index)
        )
        self._cleaner: Any = None
        self._cleaner_every: float | None = None
        self._feed: Any = None  # the change feed (PostgreSQL) and its task / thread
        self._feed_runner: Any = None
        # sync-only: self._wake = threading.Event()
        self._ready = False
        self._setup_locks: AsyncSlot[None] = AsyncSlot()  # the set-up lock (async: per loop)
        self._tasks_lock = threading.RLock()  # starting the feed and cleaner, from any loop
        # sync-only: self._deadlines = Deadlines(resolved.pool_max_size + 2)
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
    def persistence(self) -> Persistence:
        """LangGraph's savers and stores on this manager's database (shared with its
        agents)."""
        return self._persistence

    @property
    def location(self) -> str:
        """Where the sessions are stored, safe to print or log (no password)."""
        return self._state.location()

    @property
    def is_degraded(self) -> bool:
        """True while the memory-only fallback serves calls."""
        return self._state.degraded

    def health(self) -> Health:
        """The storage status: ``ok``, ``degraded`` or ``unavailable``, with the reason, since
        when, and the breaker's state."""
        return self._state.health()

    async def schema_status(self) -> dict[str, list[str]]:
        """The schema migrations (``"0001_user_sessions"``, ...) ``applied`` to this table
        and still ``pending`` (nothing is applied; memory:// has no schema: both empty).

        Raises:
            StorageError: The database cannot be read (never falls back to memory).
        """
        if self.backend == "memory":
            return {"applied": [], "pending": []}
        done = set(await self._store.schema_versions())
        files = migrations.migrations("postgresql" if self.backend == "postgres" else "sqlite")
        names = {m.version: f"{m.version:04d}_{m.name}" for m in files}
        return {
            "applied": [names.get(v, f"{v:04d}") for v in sorted(done)],
            "pending": [names[v] for v in sorted(names) if v not in done],
        }

    async def migrate(self) -> list[str]:
        """Apply the pending migrations now (otherwise the first call applies them);
        returns the ones that were pending and are now applied.

        Raises:
            StorageError: The database cannot be reached or a migration fails.
        """
        pending = (await self.schema_status())["pending"]
        await self._setup()
        return pending

    # -- plumbing -------------------------------------------------------------------------

    async def _call(
        self,
        primary: Callable[[AsyncSessionStore], Awaitable[T]],
        fallback: Callable[[MemoryStore], T],
    ) -> T:
        """Run ``primary`` on the configured store within the deadline, or ``fallback`` on
        memory while it is unreachable (the breaker and the modes: see the class
        docstring)."""
        state = self._state
        if not state.should_try_primary():  # the breaker is open: no wait for a dead server
            if state.settings.fallback == "raise":
                raise state.unavailable()
            served, result = state.in_memory(fallback)
            if served:
                return cast(T, result)
        try:
            if not self._ready:
                await self._setup()
            self._restart_orphans()  # sync-drop
            if state.degraded:
                # Before the call, so that it sees what was written while degraded.
                await self._reconcile()
            result = await self._deadlined(primary)
        except StorageUnavailableError as exc:
            raising = state.settings.fallback == "raise"
            if state.record_failure(exc) if raising else state.enter_degraded(exc):
                # Fresh connections after the outage; closing must not hold up this call.
                with suppress(StorageUnavailableError):
                    await self._deadlined(lambda s: s.close())
            if raising:
                raise
            return cast(T, state.in_memory(fallback, force=True)[1])
        state.record_success()
        return result

    async def _deadlined(self, call: Callable[[AsyncSessionStore], Awaitable[T]]) -> T:
        """``call(store)`` within the ``deadline`` setting (PostgreSQL: a network can hang;
        SQLite and memory are local)."""
        if self.backend != "postgres":
            return await call(self._store)
        # sync-only: return self._deadlines.run(lambda: call(self._store), self.settings.deadline)
        return await within(call(self._store), self.settings.deadline)  # sync-drop

    async def _creating(
        self,
        primary: Callable[[AsyncSessionStore], Awaitable[T]],
        fallback: Callable[[MemoryStore], T],
    ) -> T:
        """:meth:`_call` for a creation: at a session limit, expire the idle sessions first
        (with ``session_timeout``) and try once more before raising SessionLimitError."""
        try:
            return await self._call(primary, fallback)
        except SessionLimitError:
            if self.settings.session_timeout is None or not await self.cleanup_inactive_sessions():
                raise
        return await self._call(primary, fallback)

    async def _setup(self) -> None:
        async with self._setup_locks.lock():
            if not self._ready:
                await self._store.setup()  # under the database's migration lock
                with self._tasks_lock:
                    if not self._ready:
                        self._ready = True
                        self._follow_changes()
                        if self.settings.cleanup_interval is not None:
                            self.start_cleaner()

    def _follow_changes(self) -> None:
        """Start the change feed: other processes' changes reach this cache in milliseconds
        (without it, a cached session may be stale for up to ``cache_ttl``)."""
        if not self.settings.notifications or self.backend != "postgres":
            return
        from .storage.postgres_async import AsyncChangeFeed, AsyncPostgresStore

        store = self._store
        if not isinstance(store, AsyncPostgresStore):
            return  # a store of the caller's own
        state, ns = self._state, self.namespace

        def changed(namespace: str, user_id: str | None) -> None:
            if namespace != ns:
                return
            if user_id is None:
                state.flush_cache()
            else:
                state.forget(user_id)

        assert state.target.url is not None
        self._feed = AsyncChangeFeed(
            state.target.url, self.settings.table_name, store.origin, changed, state.flush_cache,
            connect_timeout=self.settings.connect_timeout, retry=self.settings.reconnect_interval,
        )  # fmt: skip
        # sync-only: self._feed_runner = spawn_thread(self._feed.run, name="bssagent-changes")
        self._feed_runner = asyncio.get_running_loop().create_task(self._feed.run())  # sync-drop

    async def _reconcile(self) -> None:
        """The database is back: replay what was written in memory, then leave degraded mode.

        Calls made meanwhile still write to memory; the loop replays again until a pass
        finds nothing new (replays are idempotent), and leaving degraded mode is atomic with
        that check, so no write made during the reconciliation is lost.
        """
        ns, state = self.namespace, self._state
        while True:
            version = state.memory_version()
            # Deletions first, so that nothing deleted during the outage comes back.
            for user_id, thread in state.pending_deletions():
                if thread is None:
                    await self._deadlined(lambda s: s.delete_user(ns, user_id))  # noqa: B023
                else:
                    await self._deadlined(lambda s: s.delete(ns, user_id, thread))  # noqa: B023
            # Ended sessions first: a chat started during the outage replaces the old
            # current one only once the old one's deactivation is written.
            sessions = sorted(state.memory.sessions(), key=lambda s: s.is_active)
            for session in sessions:
                await self._deadlined(lambda s: s.adopt(session))  # noqa: B023
            if state.leave_degraded(len(sessions), version):
                return

    def _restart_orphans(self) -> None:  # sync-drop
        # Background tasks die with the loop they ran on (asyncio.run twice, a loop  # sync-drop
        # per test): the change feed and the cleaner start again on this one.  # sync-drop
        with self._tasks_lock:  # sync-drop
            feed, cleaner = self._feed_runner, self._cleaner  # sync-drop
            orphaned = feed is not None and feed.get_loop().is_closed()  # sync-drop
            if orphaned and self._feed is not None:  # sync-drop
                self._feed.stop()  # sync-drop
                self._follow_changes()  # sync-drop
            if cleaner is not None and cleaner.get_loop().is_closed():  # sync-drop
                self._cleaner = None  # sync-drop
                self.start_cleaner(self._cleaner_every)  # sync-drop

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
        session = await self._creating(
            lambda s: s.create(ns, user_id, title, meta, thread_id),
            lambda m: m.create(ns, user_id, title, meta, thread_id),
        )
        self._state.remember(user_id, session)
        observe.session_created(ns)
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
        started = time.perf_counter()
        user_id = validation.user_id(user_id)
        title = validation.title(title)
        meta = {} if metadata is None else validation.metadata(metadata)
        cached = self._state.cache.get(user_id)
        timeout = self.settings.session_timeout
        ns = self.namespace
        if cached is not None and not cached.is_expired(timeout):
            observe.session_resolved(ns, started, hit=True, created=False)
            return cached
        thread_id = self._new_thread_id()
        with observe.span("bssagent.get_or_create_user_session", namespace=ns) as span:
            session, created = await self._creating(
                lambda s: s.get_or_create(ns, user_id, title, meta, thread_id),
                lambda m: m.get_or_create(ns, user_id, title, meta, thread_id),
            )
            if session.is_expired(timeout):
                # Idle past session_timeout: expire it (the next cleanup would) and start
                # anew. A concurrent caller may have expired it first: the same outcome.
                with suppress(InvalidTransitionError):
                    await self._transition(user_id, session.thread_id, "expired", cascade=True)
                session, created = await self._creating(
                    lambda s: s.get_or_create(ns, user_id, title, meta, thread_id),
                    lambda m: m.get_or_create(ns, user_id, title, meta, thread_id),
                )
            if span is not None:
                span.set_attribute("bssagent.created", created)
        self._state.remember(user_id, session)
        observe.session_resolved(ns, started, hit=False, created=created)
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

    async def list_sessions(
        self,
        *,
        user_id: str | None = None,
        status: str | None = None,
        limit: int = DEFAULT_PAGE,
        before_id: int | None = None,
    ) -> list[UserSession]:
        """A page of the namespace's sessions, newest first, optionally one user's and / or
        in one status (an operator's view: ``bssagent sessions list``).

        Args:
            user_id: Only this user's sessions.
            status: Only sessions in this state (``active``, ``paused``, ``completed``,
                ``failed``, ``expired``).
            limit: Page size, 1-1000.
            before_id: Cursor: pass the last ``id`` of the previous page.
        """
        user = None if user_id is None else validation.user_id(user_id)
        state = None if status is None else lifecycle.status(status)
        limit = validation.limit(limit)
        cursor = validation.cursor(before_id)
        ns = self.namespace
        return await self._call(
            lambda s: s.list_sessions(ns, user, state, limit, cursor),
            lambda m: m.list_sessions(ns, user, state, limit, cursor),
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

    async def delete_session(self, user_id: str, thread_id: str) -> list[str]:
        """Delete one of the user's sessions, its child sessions, and their checkpoints.

        Returns:
            The deleted thread ids (the session's first).

        Raises:
            SessionNotFoundError: No such thread, or it belongs to someone else.
        """
        user_id = validation.user_id(user_id)
        thread = validation.thread_id(thread_id)
        ns = self.namespace
        deleted: list[str] = await self._call(
            lambda s: s.delete(ns, user_id, thread),
            lambda m: self._state.delete_in_memory(m, user_id, thread),
        )
        self._state.forget(user_id)
        if not deleted:
            raise SessionNotFoundError(f"no session {thread!r} for user {user_id!r}")
        await self.sweep_deleted_threads()
        return deleted

    # -- lifecycle --------------------------------------------------------------------------

    async def _transition(
        self, user_id: str, thread_id: str | None, target: Status, cascade: bool
    ) -> UserSession:
        ns = self.namespace
        session = await self._call(
            lambda s: s.transition(ns, user_id, thread_id, target, cascade),
            lambda m: m.transition(ns, user_id, thread_id, target, cascade),
        )
        if session is None:
            which = "current session" if thread_id is None else f"session {thread_id!r}"
            raise SessionNotFoundError(f"no {which} for user {user_id!r}")
        self._state.remember(user_id, session)
        if target not in ("active", "paused"):
            observe.session_ended(ns, target)
        return session

    async def end_session(
        self,
        user_id: str,
        thread_id: str | None = None,
        status: str = "completed",
        *,
        cascade: bool = True,
    ) -> UserSession:
        """End a session of the user (default: the current one) as ``completed``, ``failed``
        or ``expired``; with ``cascade``, its open child sessions end the same way.

        Ending the current session leaves the user with none until the next
        :meth:`get_or_create_user_session`.

        Raises:
            SessionNotFoundError: No such session for the user.
            InvalidTransitionError: The session has already ended.
        """
        user_id = validation.user_id(user_id)
        thread = None if thread_id is None else validation.thread_id(thread_id)
        return await self._transition(user_id, thread, end_status(status), cascade)

    async def pause_session(self, user_id: str, thread_id: str | None = None) -> UserSession:
        """Pause an active session (default: the current one); it stays current.

        Raises:
            SessionNotFoundError: No such session for the user.
            InvalidTransitionError: The session is not active.
        """
        user_id = validation.user_id(user_id)
        thread = None if thread_id is None else validation.thread_id(thread_id)
        return await self._transition(user_id, thread, "paused", cascade=False)

    async def resume_session(self, user_id: str, thread_id: str | None = None) -> UserSession:
        """Resume a paused session (default: the current one).

        Raises:
            SessionNotFoundError: No such session for the user.
            InvalidTransitionError: The session is not paused.
        """
        user_id = validation.user_id(user_id)
        thread = None if thread_id is None else validation.thread_id(thread_id)
        return await self._transition(user_id, thread, "active", cascade=False)

    async def record_request(
        self,
        user_id: str,
        thread_id: str | None = None,
        *,
        processing_time: float = 0.0,
        error: bool = False,
    ) -> UserSession:
        """Count one request on a session (default: the current one), atomically in storage.

        ``BaseAgent`` calls this for every run made with ``user_id=``; call it yourself for
        work done outside an agent.

        Raises:
            SessionNotFoundError: No such session for the user.
        """
        user_id = validation.user_id(user_id)
        thread = None if thread_id is None else validation.thread_id(thread_id)
        seconds = validation.duration(processing_time)
        failed = validation.flag("error", error)
        ns = self.namespace
        session = await self._call(
            lambda s: s.record_request(ns, user_id, thread, seconds, failed),
            lambda m: m.record_request(ns, user_id, thread, seconds, failed),
        )
        if session is None:
            raise SessionNotFoundError(f"no such session for user {user_id!r}")
        self._state.remember(user_id, session)
        return session

    async def get_user_stats(self, user_id: str) -> SessionStats:
        """Aggregates of the user's sessions: counts, requests, errors, rates."""
        user_id = validation.user_id(user_id)
        ns = self.namespace
        return await self._call(
            lambda s: s.user_stats(ns, user_id), lambda m: m.user_stats(ns, user_id)
        )

    async def get_stats(self) -> SessionStats:
        """Aggregates of the namespace, read from counters kept by the database (no scan)."""
        ns = self.namespace
        return await self._call(lambda s: s.stats(ns), lambda m: m.stats(ns))

    def _idle_cutoff(self, max_idle_seconds: float | None) -> datetime:
        idle = max_idle_seconds if max_idle_seconds is not None else self.settings.session_timeout
        if idle is None:
            raise InvalidInputError("max_idle_seconds", "required when session_timeout is off")
        seconds = validation.duration(idle, field="max_idle_seconds")
        try:
            return datetime.now(timezone.utc) - timedelta(seconds=seconds)
        except OverflowError:  # idle since before year 1: nothing can be
            return datetime.min.replace(tzinfo=timezone.utc)

    async def count_inactive_sessions(self, max_idle_seconds: float | None = None) -> int:
        """How many open sessions :meth:`cleanup_inactive_sessions` would expire now (a dry
        run: nothing changes).

        Raises:
            InvalidInputError: No ``max_idle_seconds`` and no ``session_timeout``.
        """
        cutoff, ns = self._idle_cutoff(max_idle_seconds), self.namespace
        return await self._call(
            lambda s: s.count_idle(ns, cutoff), lambda m: m.count_idle(ns, cutoff)
        )

    async def cleanup_inactive_sessions(
        self,
        max_idle_seconds: float | None = None,
        *,
        on_batch: Callable[[int], object] | None = None,
    ) -> int:
        """Expire open sessions idle longer than ``max_idle_seconds`` (default: the
        ``session_timeout`` setting), in batches; returns how many.

        Safe to run from several processes at once (rows being expired elsewhere are
        skipped); an idle run costs one indexed probe. ``on_batch`` is called with each
        batch's count (progress reports).

        Raises:
            InvalidInputError: No ``max_idle_seconds`` and no ``session_timeout``.
        """
        if on_batch is not None and not callable(on_batch):
            raise InvalidInputError("on_batch", "must be callable")
        cutoff = self._idle_cutoff(max_idle_seconds)
        batch, ns, total = self.settings.cleanup_batch_size, self.namespace, 0
        while True:
            users = await self._call(
                lambda s: s.expire_idle(ns, cutoff, batch),
                lambda m: m.expire_idle(ns, cutoff, batch),
            )
            for user in users:
                self._state.forget(user)
            total += len(users)
            observe.session_ended(ns, "expired", len(users))
            observe.maintained(ns, "expired", len(users))
            if on_batch is not None:
                on_batch(len(users))
            if len(users) < batch:
                return total

    # -- parent and child sessions ----------------------------------------------------------

    async def create_child_session(
        self,
        user_id: str,
        parent_thread_id: str,
        title: str = DEFAULT_TITLE,
        metadata: dict[str, Any] | None = None,
    ) -> UserSession:
        """A new session under one of the user's sessions (for a sub-agent or sub-task).

        The child has its own thread, is never the current session, and is ended or
        deleted with its parent.

        Raises:
            SessionNotFoundError: The parent is not one of the user's sessions.
        """
        user_id = validation.user_id(user_id)
        parent = validation.thread_id(parent_thread_id)
        title = validation.title(title)
        meta = {} if metadata is None else validation.metadata(metadata)
        ns, thread_id = self.namespace, self._new_thread_id()
        child = await self._creating(
            lambda s: s.create_child(ns, user_id, parent, title, meta, thread_id),
            lambda m: m.create_child(ns, user_id, parent, title, meta, thread_id),
        )
        if child is None:
            raise SessionNotFoundError(f"no session {parent!r} for user {user_id!r}")
        observe.session_created(ns)
        return child

    async def list_child_sessions(
        self,
        user_id: str,
        parent_thread_id: str,
        *,
        limit: int = DEFAULT_PAGE,
        before_id: int | None = None,
    ) -> list[UserSession]:
        """A page of a session's direct children, newest first."""
        user_id = validation.user_id(user_id)
        parent = validation.thread_id(parent_thread_id)
        limit = validation.limit(limit)
        cursor = validation.cursor(before_id)
        ns = self.namespace
        return await self._call(
            lambda s: s.list_children(ns, user_id, parent, limit, cursor),
            lambda m: m.list_children(ns, user_id, parent, limit, cursor),
        )

    # -- event log ------------------------------------------------------------------------

    async def get_session_events(
        self,
        user_id: str,
        thread_id: str | None = None,
        *,
        limit: int = DEFAULT_PAGE,
        after_seq: int | None = None,
    ) -> list[SessionEvent]:
        """A page of the user's events (of one session, if given), oldest first; pass the
        last ``seq`` as ``after_seq`` for the next page."""
        user_id = validation.user_id(user_id)
        thread = None if thread_id is None else validation.thread_id(thread_id)
        limit = validation.limit(limit)
        after = validation.cursor(after_seq, field="after_seq")
        ns = self.namespace
        return await self._call(
            lambda s: s.events(ns, user_id, thread, limit, after),
            lambda m: m.events(ns, user_id, thread, limit, after),
        )

    async def is_thread_deleted(self, thread_id: str) -> bool:
        """Whether ``thread_id`` belonged to a deleted session (a tombstone says so)."""
        thread = validation.thread_id(thread_id)
        return await self._call(lambda s: s.is_deleted(thread), lambda m: m.is_deleted(thread))

    # -- memory: preferences and long-term state (LangGraph's store) ------------------------

    def user_memory(self, user_id: str) -> ScopedStore:
        """The user's long-term memory: LangGraph's store, seen from the user's namespace.

        Use it as any LangGraph store (``put`` / ``get`` / ``search`` / ``list_namespaces``
        and their ``a``-prefixed async twins). Namespaces are relative to the user's, so
        none reaches another user's items; agents hand their nodes the same view. Nothing
        is opened until the first call.
        """
        return self._memory(user_root(self.namespace, validation.user_id(user_id)))

    def _memory(self, root: Namespace) -> ScopedStore:
        p = self._persistence
        return ScopedStore(p.store, root, abase=p.async_store)

    async def _batch(self, ops: list[Op], root: Namespace = ()) -> list[Any]:
        """Run store operations (namespaces relative to ``root``), errors translated.

        While the database is down (found by the registry, or by this call), they go to the
        outage store, whose writes are written back when it returns (``fallback="memory"``;
        the other modes raise ``StorageUnavailableError``)."""
        p = self._persistence
        if self._state.degraded:
            with suppress(StorageUnavailableError):
                p.outage(StorageUnavailableError("the session registry found the database down"))
        try:
            return await self._stored(ops, root)
        except StorageUnavailableError as exc:
            p.outage(exc)  # raises it again unless the fallback is memory
        return await self._stored(ops, root)  # on the outage store now

    async def _stored(self, ops: list[Op], root: Namespace) -> list[Any]:
        store = self._memory(root)
        async with self._persistence.aerrors():  # sync: with self._persistence.errors():
            return await store.abatch(ops)  # sync: return store.batch(ops)

    async def _thread_owner(self, thread_id: str) -> str | None:
        """Who owns ``thread_id`` in this namespace (None: nobody; the thread is unknown)."""
        ns = self.namespace
        return await self._call(lambda s: s.owner(ns, thread_id), lambda m: m.owner(ns, thread_id))

    async def _preferences_at(self, user_id: str, scope: str, thread_id: str | None) -> Namespace:
        if scope == "app":
            return (*app_root(self.namespace), PREFERENCES)
        if scope == "user":
            return (*user_root(self.namespace, user_id), PREFERENCES)
        session = await (
            self.get_current_user_session(user_id)
            if thread_id is None
            else self.get_session(user_id, thread_id)
        )
        return (*session_root(session.thread_id), PREFERENCES)

    async def get_user_preferences(
        self, user_id: str, *, scope: str | None = None, thread_id: str | None = None
    ) -> dict[str, Any]:
        """The user's preferences.

        With ``scope=None``, the values in effect: app-wide ones, overridden by the user's,
        overridden by the session's when ``thread_id`` is given. With ``scope="app"``,
        ``"user"`` or ``"session"`` (``thread_id``, default the current session), that
        layer alone.

        Raises:
            SessionNotFoundError: The session is not one of the user's (or there is none).
        """
        user_id = validation.user_id(user_id)
        scopes = (
            [validation.scope(scope)]
            if scope is not None
            else ["app", "user"] + ([] if thread_id is None else ["session"])
        )
        thread = None if thread_id is None else validation.thread_id(thread_id)
        spaces = [await self._preferences_at(user_id, s, thread) for s in scopes]
        found = await self._batch([SearchOp(ns, limit=validation.MAX_PAGE_SIZE) for ns in spaces])
        merged: dict[str, Any] = {}
        for space, items in zip(spaces, found, strict=True):
            merged.update(read_preferences(space, items))
        return merged

    async def set_user_preferences(
        self,
        user_id: str,
        preferences: dict[str, Any],
        *,
        scope: str = "user",
        thread_id: str | None = None,
    ) -> dict[str, Any]:
        """Set (or, with ``None``, remove) preferences in one scope; returns that scope's
        preferences after the change.

        ``scope="user"`` (default) is shared by all the user's sessions, ``"session"`` holds
        for one session (``thread_id``, default the current one), ``"app"`` for every user
        of the namespace. Values are JSON; a scope holds at most 100 names.

        Raises:
            InvalidInputError: Bad values, or more than 100 names (nothing is written).
            SessionNotFoundError: The session is not one of the user's (or there is none).
        """
        user_id = validation.user_id(user_id)
        scope = validation.scope(scope)
        changes = validation.preferences(preferences)
        thread = None if thread_id is None else validation.thread_id(thread_id)
        if thread is not None and scope != "session":
            raise InvalidInputError("thread_id", "is only for scope='session'")
        space = await self._preferences_at(user_id, scope, thread)
        (items,) = await self._batch([SearchOp(space, limit=validation.MAX_PAGE_SIZE)])
        after = {**read_preferences(space, items), **changes}
        after = {name: value for name, value in after.items() if value is not None}
        if len(after) > validation.MAX_PREFERENCES:
            raise InvalidInputError(
                "preferences", f"a scope holds at most {validation.MAX_PREFERENCES} names"
            )
        await self._batch(list(preference_ops(space, changes)))
        return after

    async def _erase_memory(self, roots: list[Namespace]) -> None:
        """Delete every store item under ``roots`` (searched together, then deleted)."""
        page = validation.MAX_PAGE_SIZE
        while True:
            found = await self._batch([SearchOp(root, limit=page) for root in roots])
            doomed: list[Op] = [PutOp(i.namespace, i.key, None) for items in found for i in items]
            if doomed:
                await self._batch(doomed)
            if len(doomed) < page:
                return

    async def _export_memory(self, root: Namespace) -> list[dict[str, Any]]:
        items: list[Item] = []
        while True:
            search = SearchOp((), limit=validation.MAX_PAGE_SIZE, offset=len(items))
            (batch,) = await self._batch([search], root)
            if not batch:
                return [item_dict(item) for item in items]
            items.extend(batch)

    # -- privacy and housekeeping ---------------------------------------------------------

    async def delete_user_data(self, user_id: str) -> int:
        """Erase the user: sessions, events, memory (store items of the user and of their
        sessions) and every checkpoint of their threads.

        Tombstones (thread ids only) keep a late write from bringing a thread back.
        Returns the number of sessions deleted.
        """
        user_id = validation.user_id(user_id)
        ns = self.namespace
        threads: list[str] = await self._call(
            lambda s: s.delete_user(ns, user_id),
            lambda m: self._state.delete_in_memory(m, user_id, None),
        )
        self._state.forget(user_id)
        await self._erase_memory([user_root(ns, user_id)])
        await self.sweep_deleted_threads()
        return len(threads)

    async def export_user_data(self, user_id: str) -> dict[str, Any]:
        """A JSON document with the user's sessions, events and conversation state."""
        user_id = validation.user_id(user_id)
        sessions: list[UserSession] = []
        cursor: int | None = None
        while page := await self.list_user_sessions(user_id, limit=1000, before_id=cursor):
            sessions.extend(page)
            cursor = page[-1].id
        events: list[SessionEvent] = []
        after: int | None = None
        while batch := await self.get_session_events(user_id, limit=1000, after_seq=after):
            events.extend(batch)
            after = batch[-1].seq
        conversations, session_memory = {}, {}
        for session in sessions:
            session_memory[session.thread_id] = await self._export_memory(
                session_root(session.thread_id)
            )
            # sync-only: state = self._persistence.state(session.thread_id)
            state = await self._persistence.astate(session.thread_id)  # sync-drop
            conversations[session.thread_id] = jsonable(state)
        return {
            "user_id": user_id,
            "namespace": self.namespace,
            "exported_at": datetime.now(timezone.utc).isoformat(),
            "sessions": [s.to_dict() for s in reversed(sessions)],
            "events": [e.to_dict() for e in events],
            "conversations": conversations,
            "memory": {
                "user": await self._export_memory(user_root(self.namespace, user_id)),
                "sessions": session_memory,
            },
        }

    async def sweep_deleted_threads(self) -> int:
        """Delete the checkpoints and session memory of deleted sessions not swept yet;
        returns how many threads.

        Deletion calls this itself; it is also part of :meth:`run_maintenance`, which
        finishes a sweep a crash interrupted.
        """
        total = 0
        while threads := await self._call(lambda s: s.unswept(500), lambda m: m.unswept(500)):
            # sync-only: self._persistence.delete_threads(threads)
            await self._persistence.adelete_threads(threads)  # sync-drop
            await self._erase_memory([session_root(t) for t in threads])
            await self._call(lambda s: s.mark_swept(threads), lambda m: m.mark_swept(threads))
            total += len(threads)
        observe.maintained(self.namespace, "swept", total)
        return total

    async def apply_retention(
        self, retention_period: float | None = None, mode: str | None = None
    ) -> int:
        """Apply the checkpoint retention policy to sessions ended longer ago than
        ``retention_period`` seconds (default: the setting); returns how many threads.

        ``mode="keep_latest"`` keeps only each thread's latest checkpoint (LangGraph's
        ``prune``; savers without it, SQLite's and memory's, are left alone and not
        counted), ``"delete"`` deletes them all. Open sessions are never touched, so resumable
        threads stay resumable.
        """
        period = (
            retention_period if retention_period is not None else self.settings.retention_period
        )
        if period is None:
            raise InvalidInputError("retention_period", "required when the setting is off")
        strategy = mode or self.settings.retention_mode
        if strategy not in ("keep_latest", "delete"):
            raise InvalidInputError("mode", "must be 'keep_latest' or 'delete'")
        seconds = validation.duration(period, field="retention_period")
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=seconds)
        ns, total = self.namespace, 0
        while threads := await self._call(
            lambda s: s.retention_due(ns, cutoff, 200), lambda m: m.retention_due(ns, cutoff, 200)
        ):
            # sync-only: pruned = self._persistence.prune(threads, strategy)
            pruned = await self._persistence.aprune(threads, strategy)  # sync-drop
            # Marked either way, so a saver without prune is not asked again every round.
            await self._call(lambda s: s.mark_retained(threads), lambda m: m.mark_retained(threads))
            if pruned:
                total += len(threads)
            else:
                logger.info("bssagent: this checkpointer has no prune; keep_latest skipped")
        observe.maintained(ns, "retained", total)
        return total

    async def run_maintenance(self) -> dict[str, int]:
        """One round of housekeeping: expiry (with ``session_timeout``), retention (with
        ``retention_period``) and the deletion sweep. The background cleaner runs this."""
        report = {"expired": 0, "retained": 0, "swept": await self.sweep_deleted_threads()}
        if self.settings.session_timeout is not None:
            report["expired"] = await self.cleanup_inactive_sessions()
        if self.settings.retention_period is not None:
            report["retained"] = await self.apply_retention()
        return report

    def start_cleaner(self, interval: float | None = None) -> None:
        """Run :meth:`run_maintenance` every ``interval`` seconds (default: the
        ``cleanup_interval`` setting) in the background until :meth:`close`."""
        every = validation.duration(interval or self.settings.cleanup_interval or 60.0)
        with self._tasks_lock:
            if self._cleaner is not None or self._closed:
                return
            self._cleaner_every = every
            # sync-only: self._cleaner = spawn_thread(self._clean_forever, every)
            self._cleaner = asyncio.create_task(self._clean_forever(every))  # sync-drop

    async def _clean_forever(self, interval: float) -> None:
        while not self._closed:
            await asyncio.sleep(interval)  # sync: self._wake.wait(interval)
            if self._closed:
                return
            try:
                report = await self.run_maintenance()
                fields = observe.log_fields("maintenance", namespace=self.namespace, **report)
                logger.info("bssagent: maintenance %s", report, extra=fields)
            except Exception:  # the cleaner must survive a bad round; the next one retries
                logger.exception("bssagent: background maintenance failed")

    # -- lifetime -------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the storage connections. Idempotent."""
        # Not guarded by _closed: calls after close() reopen connections lazily, and a
        # second close() must release them again.
        self._closed = True
        if self._cleaner is not None:
            cancel(self._cleaner)  # sync: self._wake.set()
            # sync-only: self._cleaner.join()
            self._cleaner = None
        if self._feed is not None:
            self._feed.stop()
            self._feed = None
            cancel(self._feed_runner)  # sync-drop
            self._feed_runner = None
            self._ready = False  # a later call reopens the connections, and the feed
        await self._store.close()
        # sync-only: self._deadlines.close()
        await self._persistence.aclose()  # sync: self._persistence.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
