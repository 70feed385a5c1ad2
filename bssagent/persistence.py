"""LangGraph's persistence for the agents: checkpoint savers and stores, opened on the same
database as the sessions.

Only LangGraph's own classes are used: ``PostgresSaver`` / ``AsyncPostgresSaver`` and
``PostgresStore`` / ``AsyncPostgresStore`` (sharing one pool per event loop),
``SqliteSaver`` / ``AsyncSqliteSaver`` and ``SqliteStore``, and ``InMemorySaver`` /
``InMemoryStore`` (the ``memory://`` backend, and the fallback when the database is
unreachable). Sync calls get sync savers and async calls async ones on the same tables, so a
conversation can move between ``invoke`` and ``ainvoke``. Each is opened on first use, so an
agent whose graph never touches the store opens none.

LangGraph's ``setup()`` is not safe to run from several processes at once on an empty
PostgreSQL database; here it runs under bssagent's migration lock.

While PostgreSQL is down (``fallback="memory"``), conversations carry on in memory and are
written back when it returns: this module holds the memory saver and store of an outage and
does the writing back; :mod:`bssagent.journal` holds the bookkeeping.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, Literal

from langgraph.checkpoint.base import BaseCheckpointSaver, CheckpointTuple
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.store.base import BaseStore, IndexConfig
from langgraph.store.memory import InMemoryStore

from . import observability as observe
from .config import Settings, StorageTarget, redact_url, resolve_target
from .errors import ConfigurationError, JournalFullError, StorageError, StorageUnavailableError
from .journal import (
    Journal,
    JournalingStore,
    LatestCheckpoints,
    RecordingSaver,
    Step,
    continues,
    memory_chain,
    replay_steps,
    seed,
)
from .sessions.storage.slots import cancel, on_loop_end

logger = logging.getLogger("bssagent.agent")

Saver = BaseCheckpointSaver[Any]
_RETIRE_AFTER = 60.0  # seconds a pool dropped at an outage stays open for runs still on it


_PGVECTOR = "SELECT 1 FROM pg_available_extensions WHERE name = 'vector'"


def _require_pgvector(found: object) -> None:
    if not found:
        raise ConfigurationError(
            "memory_index on PostgreSQL needs the pgvector extension, which this server does "
            "not have (Debian: postgresql-<version>-pgvector)"
        )


def _refused(exc: BaseException) -> bool:
    """Whether a store write failed for what it is, so that it would fail again: a value
    PostgreSQL cannot take (SQLSTATE classes 22 data, 23 integrity, 42 syntax/access rule) or
    one that does not serialize. A timeout, a lock or a lost connection would not."""
    cause = exc.__cause__ if isinstance(exc, StorageError) else exc
    if isinstance(cause, TypeError | ValueError | UnicodeError):
        return True
    state = getattr(cause, "sqlstate", None)
    return isinstance(state, str) and state[:2] in ("22", "23", "42")


class _LoopEntry:
    """What one event loop holds open on PostgreSQL: a pool, and the saver and store on it."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.saver: Saver | None = None
        self.store: BaseStore | None = None
        self.stale = False  # the database went away since: reopen before the next use
        self.guard: asyncio.Task[None] | None = None  # closes the pool when the loop ends


class Persistence:
    """Lazily opened savers and stores for one database: sync ones, and async ones per loop.

    Args:
        settings: Where the data lives (the session manager's settings).
        saver: A LangGraph saver to use instead of the database's.
        store: A LangGraph store to use instead of the database's.
        index: LangGraph's ``IndexConfig`` (``dims``, ``embed``, ``fields``) for semantic
            search in the store; PostgreSQL needs the ``pgvector`` extension for it.
    """

    def __init__(
        self,
        settings: Settings,
        saver: Saver | None = None,
        store: BaseStore | None = None,
        index: IndexConfig | None = None,
    ) -> None:
        self.settings = settings
        self._given = saver
        self._given_store = store
        self.index = index
        self.target: StorageTarget = resolve_target(settings)
        self._lock = threading.RLock()
        self._opened: dict[str, Any] = {}  # "saver" / "store", sync ones
        self._resources: list[Any] = []  # a PostgreSQL pool, or SQLite connections
        self._pool: Any = None
        self._memory: InMemorySaver | None = None
        self._memory_store: InMemoryStore | None = None
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopEntry] = (
            weakref.WeakKeyDictionary()
        )
        self._degraded_reason: str | None = None
        self._down_until = 0.0
        self._loop_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        # Carrying conversations through an outage (PostgreSQL): see bssagent.journal.
        self.latest = LatestCheckpoints(settings.checkpoint_cache_size)
        self.journal = Journal(settings.journal_limit)
        self._fallback_store: JournalingStore | None = None
        self._ops_lock = threading.Lock()  # one store write-back at a time
        self._retired: list[Any] = []  # pools dropped at an outage, closed a little later
        self._retired_async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[Any]] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def is_degraded(self) -> bool:
        """True while an unreachable database makes savers and stores fall back to memory."""
        return self._degraded_reason is not None

    def _fallback(self, exc: StorageUnavailableError) -> None:
        """Serve from memory for ``reconnect_interval``, then try the database again.

        Only with ``fallback="memory"``: a run writes checkpoints, which ``read_only`` (like
        ``raise``) refuses."""
        if self.settings.fallback != "memory":
            raise exc
        with self._lock:
            self._down_until = time.monotonic() + self.settings.reconnect_interval
            if self._degraded_reason is None:
                self._drop_pools()
                self._degraded_reason = type(exc.__cause__ or exc).__name__
                location = redact_url(self.target.url)
                logger.warning(
                    "bssagent: checkpoint storage unavailable (%s, %s); conversations and "
                    "memory are kept in memory until it returns",
                    self._degraded_reason,
                    location,
                    extra=observe.log_fields("degraded", component="checkpoints",
                                             reason=self._degraded_reason, location=location),
                )  # fmt: skip
                observe.degraded("checkpoints", True)

    def _drop_pools(self) -> None:
        """Stop using the PostgreSQL pools (with their savers and stores) when an outage
        begins: after it, a fresh pool connects at once or fails at once (``open_pool``
        probes first), where an old one would still be backing off between reconnection
        attempts, and the first run would time out. Runs still using an old pool (a false
        alarm: a busy database) keep it for ``_RETIRE_AFTER`` seconds before it is closed."""
        pool, self._pool = self._pool, None
        if pool is not None:
            self._opened.clear()
            self._resources.remove(pool)
            self._retired.append(pool)
            timer = threading.Timer(_RETIRE_AFTER, self._close_retired, (pool,))
            timer.daemon = True
            timer.start()
        for entry in self._async.values():
            entry.stale = True

    def _close_retired(self, pool: Any) -> None:
        with self._lock:
            if pool not in self._retired:
                return
            self._retired.remove(pool)
        pool.close()

    def outage(self, exc: StorageUnavailableError) -> None:
        """The database went away after the savers were opened (a run failed on it, or the
        session registry found it down): runs use memory for ``reconnect_interval``.

        Raises:
            StorageUnavailableError: ``exc``, unless ``fallback="memory"``.
        """
        self._fallback(exc)

    def reachable(self) -> bool:
        """Whether the PostgreSQL server accepts a connection now (one direct attempt,
        bounded by ``connect_timeout``): tells a full pool from a dead server."""
        import psycopg

        from .sessions.storage.postgres_common import connection_kwargs

        s = self.settings
        try:
            psycopg.connect(
                self.target.url or "", **connection_kwargs(s.connect_timeout, None)
            ).close()
        except psycopg.OperationalError:
            return False
        return True

    def run_succeeded(self, saver: Saver) -> None:
        """A run on ``saver`` finished: if that was the database's, the database is back (a
        run on the memory saver proves nothing, even one that ends after the window)."""
        if self._degraded_reason is not None and not self.is_outage_saver(saver):
            self._recovered()

    def _recovered(self) -> None:
        with self._lock:
            if self._degraded_reason is not None:
                self._degraded_reason = None
                logger.warning(
                    "bssagent: checkpoint storage is back",
                    extra=observe.log_fields("recovered", component="checkpoints"),
                )
                observe.degraded("checkpoints", False)

    def _memory_saver(self) -> InMemorySaver:
        with self._lock:
            if self._memory is None:
                self._memory = InMemorySaver()
            return self._memory

    def memory_store(self) -> InMemoryStore:
        """The in-memory store (``memory://``, and the fallback)."""
        with self._lock:
            if self._memory_store is None:
                self._memory_store = InMemoryStore(index=self.index)
            return self._memory_store

    def _outage_store(self) -> BaseStore:
        """The store while PostgreSQL is down: memory, every write journaled for replay."""
        with self._lock:
            if self._fallback_store is None:
                self._fallback_store = JournalingStore(self.memory_store(), self.journal)
            return self._fallback_store

    def _down(self) -> bool:
        return time.monotonic() < self._down_until

    # -- sync -----------------------------------------------------------------------------

    def sync(self) -> Saver:
        """The sync saver, opened (and set up) on first use; memory while the database is
        down (retried every ``reconnect_interval``)."""
        if self._given is not None:
            return self._given
        found = self._open_sync("saver")
        assert isinstance(found, BaseCheckpointSaver)
        return found

    def store(self) -> BaseStore:
        """The store, opened and set up on first use; memory while the database is down.

        Its async methods work too, except SQLite's (see
        :func:`~bssagent.store_scope.needs_offload`)."""
        if self._given_store is not None:
            return self._given_store
        found = self._open_sync("store")
        assert isinstance(found, BaseStore)
        return found

    def _open_sync(self, kind: Literal["saver", "store"]) -> Any:
        """The sync saver or store: opened once; memory on memory://, or while the database
        is down (not kept: the database is tried again after ``reconnect_interval``)."""
        with self._lock:
            if self.target.backend == "memory":
                return self._memory_saver() if kind == "saver" else self.memory_store()
            outage = self._memory_saver if kind == "saver" else self._outage_store
            if self._down():
                return outage()  # even when opened: the database went away since
            opened = self._opened.get(kind)
            fresh = opened is None
            if opened is None:
                try:
                    opened = self._opened[kind] = (
                        self._new_saver() if kind == "saver" else self._new_store()
                    )
                except StorageUnavailableError as exc:
                    self._fallback(exc)
                    return outage()
        if fresh:
            self._recovered()
        if isinstance(opened, BaseStore) and self.journal.has_ops:
            self._replay_ops(opened)
        return opened

    def _sqlite(self, **kwargs: Any) -> sqlite3.Connection:
        path = self._sqlite_path()
        conn: sqlite3.Connection = sqlite3.connect(
            path, check_same_thread=False, timeout=10.0, **kwargs
        )
        self._resources.append(conn)
        return conn

    def _sqlite_path(self) -> str:
        path = Path(self.target.path or self.settings.sqlite_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(path)

    def _new_saver(self) -> Saver:
        if self.target.backend == "sqlite":
            from langgraph.checkpoint.sqlite import SqliteSaver

            sqlite_saver = SqliteSaver(self._sqlite())
            sqlite_saver.setup()
            return sqlite_saver
        from langgraph.checkpoint.postgres import PostgresSaver

        saver = PostgresSaver(self._sync_pool())
        self._setup_sync(saver.setup)
        return RecordingSaver(saver, self.latest)

    def _new_store(self) -> BaseStore:
        if self.target.backend == "sqlite":
            from langgraph.store.sqlite import SqliteStore

            if self.index and not hasattr(sqlite3.Connection, "enable_load_extension"):
                raise ConfigurationError(
                    "memory_index on SQLite needs the sqlite-vec extension, and this Python's "
                    "sqlite3 cannot load extensions: use PostgreSQL with pgvector, memory://, "
                    "or a Python built with loadable SQLite extensions"
                )

            # SqliteStore issues its own BEGIN/COMMIT: the connection must be in autocommit.
            sqlite_store = SqliteStore(self._sqlite(isolation_level=None), index=self.index)
            sqlite_store.setup()
            return sqlite_store
        from langgraph.store.postgres import PostgresStore

        store = PostgresStore(self._sync_pool(), index=self.index)  # type: ignore[arg-type]
        if self.index:
            with self.errors(), self._pool.connection() as conn:
                _require_pgvector(conn.execute(_PGVECTOR).fetchone())
        self._setup_sync(store.setup)
        return store

    def _sync_pool(self) -> Any:
        """The sync PostgreSQL pool shared by the saver and the store."""
        if self._pool is None:
            from .sessions.storage.postgres_common import connection_kwargs, wrap_errors
            from .sessions.storage.postgres_sync import open_pool

            s = self.settings
            with wrap_errors():
                self._pool = open_pool(
                    self.target.url or "",
                    kwargs=connection_kwargs(s.connect_timeout, s.prepare_threshold),
                    min_size=1,
                    max_size=max(2, s.pool_max_size),
                    timeout=s.pool_timeout,
                    open_timeout=s.connect_timeout + 1,
                    name="bssagent-checkpoints",
                )
            self._resources.append(self._pool)
        return self._pool

    def _setup_sync(self, setup: Callable[[], None]) -> None:
        from .sessions.storage.postgres_common import wrap_errors
        from .sessions.storage.postgres_sync import migration_lock

        with (
            wrap_errors(),
            self._pool.connection() as conn,
            migration_lock(conn, self.settings.migration_lock_timeout),
        ):
            setup()

    # -- async ----------------------------------------------------------------------------

    @asynccontextmanager
    async def async_saver(self) -> AsyncIterator[Saver]:
        """An async saver for the running event loop, for the duration of one run.

        PostgreSQL savers (and their pools) are kept per event loop until :meth:`aclose`;
        a SQLite one is opened per run, because an ``aiosqlite`` connection left open when
        its loop closes keeps the process from exiting.
        """
        if self._given is not None:
            yield self._given
            return
        if self.target.backend == "memory" or self._down():
            yield self._memory_saver()
            return
        if self.target.backend == "sqlite":
            import aiosqlite
            from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

            async with aiosqlite.connect(self._sqlite_path(), timeout=10.0) as conn:
                saver = AsyncSqliteSaver(conn)
                await saver.setup()
                yield saver
            return
        found = await self._async_postgres("saver")
        yield found if found is not None else self._memory_saver()  # type: ignore[misc]

    async def async_store(self) -> BaseStore:
        """The store for async calls on the running event loop (see :meth:`store`)."""
        if self._given_store is not None:
            return self._given_store
        if self.target.backend == "memory":
            return self.memory_store()
        if self._down():
            return self._outage_store()
        if self.target.backend == "sqlite":
            return await asyncio.to_thread(self.store)
        found = await self._async_postgres("store")
        if found is None:
            return self._outage_store()
        if self.journal.has_ops:
            # Through the sync store, in a worker thread: LangGraph's async store would need
            # this event loop, which a sync store call on it could be blocking meanwhile.
            await asyncio.to_thread(self.store)
        return found  # type: ignore[return-value]

    async def _async_postgres(self, kind: str) -> Saver | BaseStore | None:
        """This loop's saver or store, opened once per loop; None when the database is down."""
        loop = asyncio.get_running_loop()
        entry = self._async.get(loop)
        if entry is not None and not entry.stale and getattr(entry, kind) is not None:
            return getattr(entry, kind)  # type: ignore[no-any-return]
        # One opener per event loop: concurrent first runs would each open a pool.
        async with self._loop_locks.setdefault(loop, asyncio.Lock()):
            entry = self._async.get(loop)
            if entry is not None and entry.stale:
                del self._async[loop]
                cancel(entry.guard)
                old = entry.pool
                self._retired_async.setdefault(loop, []).append(old)
                loop.call_later(_RETIRE_AFTER, lambda: loop.create_task(self._aclose_retired(old)))
                entry = None
            try:
                if entry is None:
                    entry = self._async[loop] = _LoopEntry(await self._open_async_pool())
                    opened = entry
                    entry.guard = on_loop_end(lambda: self._loop_ended(loop, opened))
                if getattr(entry, kind) is None:
                    setattr(entry, kind, await self._new_async(entry.pool, kind))
            except StorageUnavailableError as exc:
                self._fallback(exc)
                return None
        self._recovered()
        return getattr(entry, kind)  # type: ignore[no-any-return]

    async def _open_async_pool(self) -> Any:
        from .sessions.storage.postgres_async import open_pool
        from .sessions.storage.postgres_common import connection_kwargs, wrap_errors

        s = self.settings
        with wrap_errors():
            return await open_pool(
                self.target.url or "",
                kwargs=connection_kwargs(s.connect_timeout, s.prepare_threshold),
                min_size=1,
                max_size=max(2, s.pool_max_size),
                timeout=s.pool_timeout,
                open_timeout=s.connect_timeout + 1,
                name="bssagent-checkpoints",
            )

    async def _new_async(self, pool: Any, kind: str) -> Saver | BaseStore:
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
        from langgraph.store.postgres.aio import AsyncPostgresStore

        from .sessions.storage.postgres_async import migration_lock
        from .sessions.storage.postgres_common import wrap_errors

        inner: Saver | None = AsyncPostgresSaver(pool) if kind == "saver" else None
        made: Saver | BaseStore = (
            inner if inner is not None else AsyncPostgresStore(pool, index=self.index)  # type: ignore[arg-type]
        )
        with wrap_errors():
            if kind == "store" and self.index:
                async with pool.connection() as conn:
                    _require_pgvector(await (await conn.execute(_PGVECTOR)).fetchone())
            async with (
                pool.connection() as conn,
                migration_lock(conn, self.settings.migration_lock_timeout),
            ):
                await made.setup()  # type: ignore[union-attr]
        return made if inner is None else RecordingSaver(inner, self.latest)

    @contextmanager
    def _translated(self) -> Iterator[None]:
        if self.target.backend == "postgres":
            from .sessions.storage.postgres_common import wrap_errors

            with wrap_errors():
                yield
            return
        try:
            yield
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite error ({type(exc).__name__})") from exc

    @staticmethod
    def _pool_timeout(exc: StorageError) -> BaseException | None:
        """The pool timeout behind ``exc``: a full pool, or a server gone (its connections
        are dead)? A direct probe tells (:meth:`reachable`)."""
        from psycopg_pool import PoolTimeout

        return exc.__cause__ if isinstance(exc.__cause__, PoolTimeout) else None

    @staticmethod
    def _gone(timeout: BaseException) -> StorageUnavailableError:
        lost = StorageUnavailableError("postgres unavailable (PoolTimeout; no server answers)")
        lost.__cause__ = timeout
        return lost

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Translate the database driver's errors raised by a saver or store into
        :class:`~bssagent.errors.StorageError` (``StorageUnavailableError`` when the server
        cannot be reached), the original chained. (:meth:`aerrors` in async code: telling a
        full pool from a dead server takes a connection attempt.)"""
        try:
            with self._translated():
                yield
        except StorageError as exc:
            timeout = self._pool_timeout(exc)
            if timeout is not None and not self.reachable():
                raise self._gone(timeout) from timeout
            raise

    @asynccontextmanager
    async def aerrors(self) -> AsyncIterator[None]:
        """:meth:`errors` for async code: the probe runs in a worker thread, not on the
        event loop."""
        try:
            with self._translated():
                yield
        except StorageError as exc:
            timeout = self._pool_timeout(exc)
            if timeout is not None and not await asyncio.to_thread(self.reachable):
                raise self._gone(timeout) from timeout
            raise

    # -- conversations through an outage (PostgreSQL; see bssagent.journal) ----------------

    def is_outage_saver(self, saver: Saver) -> bool:
        """Whether ``saver`` is the memory saver standing in for an unreachable PostgreSQL."""
        return self.target.backend == "postgres" and saver is self._memory

    def use_memory(self, thread: str, *, writing: bool, seedable: bool = True) -> None:
        """A call on ``thread`` is about to use the memory saver of an outage: put the
        thread's latest checkpoint in it first (when known and ``seedable``), and journal
        the thread for replay. Call it under the thread's run lock.

        Raises:
            JournalFullError: ``writing``, and ``journal_limit`` threads are journaled
                already (a read just goes without the history).
        """
        memory = self._memory_saver()
        with self._lock:
            if self.journal.base(thread)[0]:
                return
            latest = self.latest.lookup(thread)[1] if seedable else None
            if latest is None and not writing:
                return  # nothing to show, nothing to write back
            base = None if latest is None else latest.checkpoint["id"]
            try:
                self.journal.add_thread(thread, base)
            except JournalFullError:
                observe.journal("checkpoints", "refused")
                if writing:
                    raise
                return
            if latest is not None:
                self.journal.seeded(thread, seed(memory, latest))

    def _plan(self, thread: str, head: CheckpointTuple | None) -> tuple[list[Step], bool]:
        """What ``thread``'s memory run would write back into it (nothing: it wrote nothing),
        and whether it continues the database's ``head`` (else it goes to another thread)."""
        memory = self._memory_saver()
        _, base, seeded = self.journal.base(thread)
        chain = memory_chain(memory, thread)
        steps = replay_steps(memory, chain, thread, base, seeded)
        return steps, continues(None if head is None else head.checkpoint["id"], base, chain)

    def _copy(self, thread: str, target: str) -> list[Step]:
        """``thread``'s whole memory run, as written into ``target``."""
        memory = self._memory_saver()
        _, base, seeded = self.journal.base(thread)
        return replay_steps(memory, memory_chain(memory, thread), thread, base, seeded, target)

    def _replayed(self, thread: str, steps: list[Step], target: str | None) -> None:
        self.forget(thread)
        if not steps:
            return
        outcome = "replayed" if target is None else "merged"
        observe.journal("checkpoints", outcome)
        logger.log(
            logging.INFO if target is None else logging.WARNING,
            "bssagent: a conversation run during the outage was written back (%d checkpoint(s)"
            "%s)", len(steps),
            "" if target is None else "; the thread moved on meanwhile, so they went to a new "
            "thread",
            extra=observe.log_fields(outcome, component="checkpoints", checkpoints=len(steps),
                                     **({} if target is None else {"merged_into": target})),
        )  # fmt: skip

    def replay_thread(self, saver: Saver, thread: str, new_thread: Callable[[], str]) -> bool:
        """Write back what ran on ``thread`` in memory during an outage, with the database's
        ``saver``; call it under the thread's run lock. If the thread moved on in the
        database meanwhile (or its history was unknown when the outage began), the run is
        copied to ``new_thread()`` instead, so neither history overwrites the other.

        Returns:
            Whether the thread was journaled (and is now written back).
        """
        if not self.journal.base(thread)[0] or self.is_outage_saver(saver):
            return False
        with self.errors():
            head = saver.get_tuple({"configurable": {"thread_id": thread, "checkpoint_ns": ""}})
        steps, same = self._plan(thread, head)
        target = None
        if steps and not same:
            target = self.journal.target(thread, new_thread)
            steps = self._copy(thread, target)
        with self.errors():
            for step in steps:
                if step.put:
                    saver.put(step.parent, step.checkpoint, step.metadata, step.versions)
                for task_id, path, writes in step.writes:
                    saver.put_writes(step.config, writes, task_id, path)
        self._replayed(thread, steps, target)
        return True

    async def areplay_thread(
        self, saver: Saver, thread: str, new_thread: Callable[[], Awaitable[str]]
    ) -> bool:
        """Async :meth:`replay_thread`."""
        if not self.journal.base(thread)[0] or self.is_outage_saver(saver):
            return False
        async with self.aerrors():
            head = await saver.aget_tuple({"configurable": {"thread_id": thread,
                                                            "checkpoint_ns": ""}})  # fmt: skip
        steps, same = self._plan(thread, head)
        target = None
        if steps and not same:
            target = await self.journal.atarget(thread, new_thread)
            steps = self._copy(thread, target)
        async with self.aerrors():
            for step in steps:
                if step.put:
                    await saver.aput(step.parent, step.checkpoint, step.metadata, step.versions)
                for task_id, path, writes in step.writes:
                    await saver.aput_writes(step.config, writes, task_id, path)
        self._replayed(thread, steps, target)
        return True

    def forget(self, thread: str) -> None:
        """Drop what an outage kept of ``thread`` in memory (written back, or deleted)."""
        with self._lock:
            if self._memory is not None:
                self._memory.delete_thread(thread)
            self.journal.done(thread)

    def _replay_ops(self, store: BaseStore) -> None:
        """Write the store writes journaled during an outage to the database's sync
        ``store``, in order, one write-back at a time (no store call lands between journaled
        writes and their write-back).

        A write the database refuses for what it is (a NUL character PostgreSQL cannot
        store, a value that is not JSON) is dropped, logged and counted, so it cannot hold
        back the others; any other failure stops the write-back and keeps the rest journaled
        for the next store call.

        Raises:
            StorageError: The write-back stopped (the database went away, a lock timed out).
        """
        with self._ops_lock:
            ops = self.journal.peek_ops()
            if not ops:
                return
            try:
                with self.errors():
                    store.batch(ops)
                rejected = 0
            except Exception as exc:
                if not _refused(exc):
                    raise
                rejected = self._one_by_one(store, ops)  # find which, write the others
            self.journal.drop_ops(len(ops))
        self._ops_replayed(len(ops) - rejected, rejected)

    def _one_by_one(self, store: BaseStore, ops: list[Any]) -> int:
        rejected = 0
        for done, op in enumerate(ops):
            try:
                with self.errors():
                    store.batch([op])
            except Exception as exc:
                if not _refused(exc):
                    self.journal.drop_ops(done)
                    raise
                rejected += 1
                logger.warning(
                    "bssagent: a store write made during the outage was refused by the "
                    "database and dropped (%s)", type(exc.__cause__ or exc).__name__,
                    extra=observe.log_fields("rejected", component="store"),
                )  # fmt: skip
        return rejected

    def _ops_replayed(self, written: int, rejected: int) -> None:
        observe.journal("store", "replayed", written)
        observe.journal("store", "rejected", rejected)
        if written:
            logger.info(
                "bssagent: %d store write(s) made during the outage written back", written,
                extra=observe.log_fields("replayed", component="store", writes=written),
            )  # fmt: skip

    # -- whole threads (deletion, retention, export) ---------------------------------------

    def delete_threads(self, thread_ids: list[str]) -> None:
        """Delete every checkpoint of ``thread_ids`` (LangGraph's ``delete_thread``)."""
        saver = self.sync()
        for thread_id in thread_ids:
            saver.delete_thread(thread_id)
            self.forget(thread_id)

    async def adelete_threads(self, thread_ids: list[str]) -> None:
        """Async :meth:`delete_threads`."""
        async with self.async_saver() as saver:
            for thread_id in thread_ids:
                await saver.adelete_thread(thread_id)
                self.forget(thread_id)

    def prune(self, thread_ids: list[str], strategy: str) -> bool:
        """LangGraph's ``prune``; False (nothing done) where the saver has none."""
        if strategy == "delete":
            self.delete_threads(thread_ids)
            return True
        try:
            self.sync().prune(thread_ids, strategy=strategy)
        except NotImplementedError:
            return False
        return True

    async def aprune(self, thread_ids: list[str], strategy: str) -> bool:
        """Async :meth:`prune`."""
        if strategy == "delete":
            await self.adelete_threads(thread_ids)
            return True
        async with self.async_saver() as saver:
            try:
                await saver.aprune(thread_ids, strategy=strategy)
            except NotImplementedError:
                return False
        return True

    def state(self, thread_id: str) -> dict[str, Any] | None:
        """The latest checkpoint's channel values of ``thread_id`` (None without one)."""
        found = self.sync().get_tuple({"configurable": {"thread_id": thread_id}})
        return dict(found.checkpoint["channel_values"]) if found else None

    async def astate(self, thread_id: str) -> dict[str, Any] | None:
        """Async :meth:`state`."""
        async with self.async_saver() as saver:
            found = await saver.aget_tuple({"configurable": {"thread_id": thread_id}})
        return dict(found.checkpoint["channel_values"]) if found else None

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the sync saver's and store's connections. Idempotent."""
        with self._lock:
            resources, self._resources = self._resources + self._retired, []
            self._retired = []
            self._opened.clear()
            self._pool = None
        for resource in resources:
            resource.close()

    async def _aclose_retired(self, pool: Any) -> None:
        retired = self._retired_async.get(asyncio.get_running_loop(), [])
        if pool in retired:
            retired.remove(pool)
            await pool.close()

    async def _loop_ended(self, loop: asyncio.AbstractEventLoop, entry: _LoopEntry) -> None:
        """``loop`` ended without :meth:`aclose`: forget it (its entries reference it, so
        nothing else would let it go) and close its pools."""
        if self._async.get(loop) is not entry:
            return
        del self._async[loop]
        self._loop_locks.pop(loop, None)
        for pool in [*self._retired_async.pop(loop, []), entry.pool]:
            await pool.close()

    async def aclose(self) -> None:
        """Close the running loop's async saver and store, then the sync ones. Idempotent."""
        loop = asyncio.get_running_loop()
        entry = self._async.pop(loop, None)
        if entry is not None:
            cancel(entry.guard)
        for pool in [*self._retired_async.pop(loop, []), *([entry.pool] if entry else [])]:
            await pool.close()
        self.close()
