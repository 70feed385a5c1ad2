"""The agent's LangGraph checkpoint savers, opened on the same database as the sessions.

Only LangGraph's own savers are used: ``PostgresSaver`` / ``AsyncPostgresSaver``,
``SqliteSaver`` / ``AsyncSqliteSaver``, and ``InMemorySaver`` (the ``memory://`` backend and
the fallback when the database is unreachable). Sync calls get a sync saver and async calls
an async one on the same tables, so a conversation can move between ``invoke`` and
``ainvoke``.

LangGraph's ``setup()`` is not safe to run from several processes at once on an empty
PostgreSQL database; here it runs under bssagent's migration lock.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver

from .config import Settings, StorageTarget, redact_url, resolve_target
from .errors import StorageUnavailableError

logger = logging.getLogger("bssagent.agent")

Saver = BaseCheckpointSaver[Any]


class Checkpointers:
    """Lazily opened savers for one database: one sync, and async ones per event loop.

    Args:
        settings: Where the data lives (the session manager's settings).
    """

    def __init__(self, settings: Settings, saver: Saver | None = None) -> None:
        self.settings = settings
        self._given = saver
        self.target: StorageTarget = resolve_target(settings)
        self._lock = threading.RLock()
        self._sync: Saver | None = None
        self._sync_resource: Any = None
        self._memory: InMemorySaver | None = None
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[Saver, Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._degraded_reason: str | None = None
        self._down_until = 0.0
        self._loop_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def is_degraded(self) -> bool:
        """True while an unreachable database makes the savers fall back to memory."""
        return self._degraded_reason is not None

    def _fallback(self, exc: StorageUnavailableError) -> InMemorySaver:
        """Serve from memory for ``reconnect_interval``, then try the database again."""
        if self.settings.fallback == "raise":
            raise exc
        with self._lock:
            self._down_until = time.monotonic() + self.settings.reconnect_interval
            if self._degraded_reason is None:
                self._degraded_reason = type(exc.__cause__ or exc).__name__
                logger.warning(
                    "bssagent: checkpoint storage unavailable (%s, %s); conversations are kept "
                    "in memory until it returns",
                    self._degraded_reason,
                    redact_url(self.target.url),
                )
            return self._memory_saver()

    def _recovered(self) -> None:
        with self._lock:
            if self._degraded_reason is not None:
                self._degraded_reason = None
                logger.warning("bssagent: checkpoint storage is back")

    def _memory_saver(self) -> InMemorySaver:
        with self._lock:
            if self._memory is None:
                self._memory = InMemorySaver()
            return self._memory

    def _down(self) -> bool:
        return time.monotonic() < self._down_until

    # -- sync -----------------------------------------------------------------------------

    def sync(self) -> Saver:
        """The sync saver, opened (and set up) on first use; memory while the database is
        down (retried every ``reconnect_interval``)."""
        if self._given is not None:
            return self._given
        with self._lock:
            if self._sync is not None:
                return self._sync
            if self.target.backend == "memory":
                self._sync = self._memory_saver()
                return self._sync
            if self._down():
                return self._memory_saver()
            try:
                self._sync, self._sync_resource = self._open_sync()
            except StorageUnavailableError as exc:
                return self._fallback(exc)
        self._recovered()
        return self._sync

    def _open_sync(self) -> tuple[Saver, Any]:
        if self.target.backend == "memory":
            return self._memory_saver(), None
        if self.target.backend == "sqlite":
            from langgraph.checkpoint.sqlite import SqliteSaver

            db = sqlite3.connect(self._sqlite_path(), check_same_thread=False, timeout=10.0)
            sqlite_saver = SqliteSaver(db)
            sqlite_saver.setup()
            return sqlite_saver, db
        from langgraph.checkpoint.postgres import PostgresSaver

        from .sessions.storage.postgres_common import connection_kwargs, wrap_errors
        from .sessions.storage.postgres_sync import migration_lock, open_pool

        s = self.settings
        with wrap_errors():
            pool = open_pool(
                self.target.url or "",
                kwargs=connection_kwargs(s.connect_timeout, s.prepare_threshold),
                min_size=1,
                max_size=max(2, s.pool_max_size),
                timeout=s.pool_timeout,
                open_timeout=s.connect_timeout + 1,
                name="bssagent-checkpoints",
            )
            try:
                saver = PostgresSaver(pool)
                with pool.connection() as conn, migration_lock(conn, s.migration_lock_timeout):
                    saver.setup()
            except BaseException:
                pool.close()
                raise
        return saver, pool

    def _sqlite_path(self) -> str:
        path = Path(self.target.path or self.settings.sqlite_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(path)

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
        loop = asyncio.get_running_loop()
        entry = self._async.get(loop)
        if entry is None:
            # One opener per event loop: concurrent first runs would each open a pool.
            async with self._loop_locks.setdefault(loop, asyncio.Lock()):
                entry = self._async.get(loop)
                if entry is None:
                    try:
                        entry = await self._open_async_postgres()
                    except StorageUnavailableError as exc:
                        fallback = self._fallback(exc)
                    else:
                        self._async[loop] = entry
                        self._recovered()
        if entry is None:
            yield fallback
            return
        yield entry[0]

    async def _open_async_postgres(self) -> tuple[Saver, Any]:
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

        from .sessions.storage.postgres_async import migration_lock, open_pool
        from .sessions.storage.postgres_common import connection_kwargs, wrap_errors

        s = self.settings
        with wrap_errors():
            pool = await open_pool(
                self.target.url or "",
                kwargs=connection_kwargs(s.connect_timeout, s.prepare_threshold),
                min_size=1,
                max_size=max(2, s.pool_max_size),
                timeout=s.pool_timeout,
                open_timeout=s.connect_timeout + 1,
                name="bssagent-checkpoints",
            )
            try:
                saver = AsyncPostgresSaver(pool)
                async with (
                    pool.connection() as conn,
                    migration_lock(conn, s.migration_lock_timeout),
                ):
                    await saver.setup()
            except BaseException:
                await pool.close()
                raise
        return saver, pool

    # -- whole threads (deletion, retention, export) ---------------------------------------

    def delete_threads(self, thread_ids: list[str]) -> None:
        """Delete every checkpoint of ``thread_ids`` (LangGraph's ``delete_thread``)."""
        saver = self.sync()
        for thread_id in thread_ids:
            saver.delete_thread(thread_id)

    async def adelete_threads(self, thread_ids: list[str]) -> None:
        """Async :meth:`delete_threads`."""
        async with self.async_saver() as saver:
            for thread_id in thread_ids:
                await saver.adelete_thread(thread_id)

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
        """Close the sync saver's connections. Idempotent."""
        with self._lock:
            resource, self._sync, self._sync_resource = self._sync_resource, None, None
        if resource is not None:
            resource.close()

    async def aclose(self) -> None:
        """Close the running loop's async saver, then the sync one. Idempotent."""
        entry = self._async.pop(asyncio.get_running_loop(), None)
        if entry is not None and entry[1] is not None:
            await entry[1].close()
        self.close()
