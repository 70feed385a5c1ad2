"""Per-thread run locks: two runs on one conversation thread never interleave.

LangGraph's open-source runtime lets two concurrent runs on one ``thread_id`` fork from
the same parent checkpoint, and one run's updates are lost. bssagent serializes runs per
thread: with PostgreSQL through a session-level advisory lock (held on a dedicated
connection for the run, so it spans processes and replicas and is released if the process
dies), otherwise through an in-process lock.

Strategies: ``"enqueue"`` waits (up to a timeout) for the running run to finish;
``"reject"`` raises :class:`~bssagent.errors.ThreadBusyError` at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import (
    AbstractContextManager,
    AsyncExitStack,
    ExitStack,
    asynccontextmanager,
    contextmanager,
    suppress,
)
from typing import Any, Literal

from ..config import Settings, resolve_target
from ..errors import StorageUnavailableError, ThreadBusyError
from ..sessions.storage.slots import AsyncSlot

RunStrategy = Literal["enqueue", "reject"]
_TRY_LOCK = "SELECT pg_try_advisory_lock(hashtextextended('bssagent-run:' || %s, 0)) AS ok"
_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended('bssagent-run:' || %s, 0))"
_FIRST_POLL, _MAX_POLL = 0.002, 0.05


def wrap_errors() -> AbstractContextManager[None]:
    # Imported lazily: psycopg is an optional extra, needed only with PostgreSQL.
    from ..sessions.storage.postgres_common import wrap_errors as wrap

    return wrap()


def _busy(thread_id: str, strategy: RunStrategy, timeout: float) -> ThreadBusyError:
    if strategy == "reject":
        return ThreadBusyError(f"a run is already in progress on thread {thread_id!r}")
    return ThreadBusyError(f"thread {thread_id!r} stayed busy for {timeout:g} s")


class _LocalLocks:
    """One ``threading.Lock`` per thread id, dropped when no run holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    def _ref(self, thread_id: str) -> threading.Lock:
        with self._guard:
            lock, users = self._locks.get(thread_id, (threading.Lock(), 0))
            self._locks[thread_id] = (lock, users + 1)
            return lock

    def _unref(self, thread_id: str) -> None:
        with self._guard:
            lock, users = self._locks[thread_id]
            if users == 1:
                del self._locks[thread_id]
            else:
                self._locks[thread_id] = (lock, users - 1)

    @contextmanager
    def hold(self, thread_id: str, strategy: RunStrategy, timeout: float) -> Iterator[None]:
        lock = self._ref(thread_id)
        try:
            if strategy == "reject":
                acquired = lock.acquire(blocking=False)
            else:
                acquired = lock.acquire(timeout=timeout)
            if not acquired:
                raise _busy(thread_id, strategy, timeout)
            try:
                yield
            finally:
                lock.release()
        finally:
            self._unref(thread_id)

    @asynccontextmanager
    async def ahold(
        self, thread_id: str, strategy: RunStrategy, timeout: float
    ) -> AsyncIterator[None]:
        lock = self._ref(thread_id)
        try:
            deadline, pause = time.monotonic() + timeout, _FIRST_POLL
            # Polling keeps the event loop free; a blocking acquire would stall it.
            while not lock.acquire(blocking=False):
                if strategy == "reject" or time.monotonic() >= deadline:
                    raise _busy(thread_id, strategy, timeout)
                await asyncio.sleep(pause)
                pause = min(pause * 2, _MAX_POLL)
            try:
                yield
            finally:
                lock.release()
        finally:
            self._unref(thread_id)


class RunLocks:
    """Run locks for one database (see the module docstring).

    A run first takes the in-process lock of its thread, then (with PostgreSQL) the
    thread's advisory lock on a dedicated connection: so a process uses at most one lock
    connection per busy thread, and runs inside one process never depend on the database
    to exclude each other. If PostgreSQL is unreachable and the fallback is ``memory``,
    runs proceed under the in-process lock alone, and the database is tried again after
    ``reconnect_interval``.

    Args:
        settings: Where the data lives; PostgreSQL gets cross-process locks.
        pool_size: Connections for holding PostgreSQL locks: the most threads running at
            once per process (and per event loop) before runs wait for a connection.
    """

    def __init__(self, settings: Settings, pool_size: int = 64) -> None:
        self._settings = settings
        self._target = resolve_target(settings)
        self._pool_size = pool_size
        self._local = _LocalLocks()
        self._sync_pool: Any = None
        # One pool per event loop, closed when its loop ends (see sessions/storage/slots.py).
        self._pools: AsyncSlot[Any] = AsyncSlot(close=lambda pool: pool.close())
        self._guard = threading.Lock()
        self._down_until = 0.0

    @property
    def cross_process(self) -> bool:
        """Whether locks hold across processes (PostgreSQL, unless it was just found down)."""
        return self._target.backend == "postgres" and time.monotonic() >= self._down_until

    def _kwargs(self) -> dict[str, Any]:
        from ..sessions.storage.postgres_common import connection_kwargs

        s = self._settings
        return connection_kwargs(s.connect_timeout, s.prepare_threshold)

    def outage(self, exc: StorageUnavailableError) -> None:
        """The database went away (seen here or elsewhere): local locks for
        ``reconnect_interval``.

        Raises:
            StorageUnavailableError: ``exc``, unless ``fallback="memory"`` (no runs without
                the database's locks).
        """
        if self._settings.fallback != "memory":
            raise exc
        self._down_until = time.monotonic() + self._settings.reconnect_interval

    def _direct(self, stack: ExitStack, pool: Any, thread_id: str) -> Any:
        """After a pool timeout: a connection of its own for this run (see
        ``connect_past_pool``), or ThreadBusyError when the pool is really full."""
        from ..sessions.storage.postgres_sync import connect_past_pool

        conn = connect_past_pool(self._target.url or "", self._kwargs(), pool, self._pool_size)
        if conn is None:
            raise self._pool_busy(thread_id)
        return stack.enter_context(conn)

    async def _adirect(self, stack: AsyncExitStack, pool: Any, thread_id: str) -> Any:
        from ..sessions.storage.postgres_async import connect_past_pool

        url, kwargs = self._target.url or "", self._kwargs()
        conn = await connect_past_pool(url, kwargs, pool, self._pool_size)
        if conn is None:
            raise self._pool_busy(thread_id)
        return await stack.enter_async_context(conn)

    def _pool_busy(self, thread_id: str) -> ThreadBusyError:
        return ThreadBusyError(
            f"no run-lock connection became free for thread {thread_id!r} "
            f"(pool of {self._pool_size})"
        )

    @contextmanager
    def hold(self, thread_id: str, strategy: RunStrategy, timeout: float) -> Iterator[None]:
        """Hold ``thread_id``'s run lock for the duration of the block.

        Errors raised inside the block pass through unchanged.
        """
        deadline = time.monotonic() + timeout
        with self._local.hold(thread_id, strategy, timeout), ExitStack() as stack:
            conn = None
            if self.cross_process:
                from psycopg_pool import PoolTimeout

                try:
                    with wrap_errors():
                        pool = self._sync_lock_pool()
                        try:
                            conn = stack.enter_context(pool.connection())
                        except PoolTimeout:
                            conn = self._direct(stack, pool, thread_id)
                        pause = _FIRST_POLL
                        while not conn.execute(_TRY_LOCK, (thread_id,)).fetchone()["ok"]:
                            if strategy == "reject" or time.monotonic() >= deadline:
                                raise _busy(thread_id, strategy, timeout)
                            time.sleep(pause)
                            pause = min(pause * 2, _MAX_POLL)
                except StorageUnavailableError as exc:
                    self.outage(exc)
                    conn = None
            try:
                yield
            finally:
                if conn is not None:
                    with suppress(Exception):  # a dead connection released the lock already
                        conn.execute(_UNLOCK, (thread_id,))

    @asynccontextmanager
    async def ahold(
        self, thread_id: str, strategy: RunStrategy, timeout: float
    ) -> AsyncIterator[None]:
        """Async :meth:`hold`: waiting never blocks the event loop."""
        deadline = time.monotonic() + timeout
        async with self._local.ahold(thread_id, strategy, timeout), AsyncExitStack() as stack:
            conn = None
            if self.cross_process:
                from psycopg_pool import PoolTimeout

                try:
                    with wrap_errors():
                        pool = await self._async_lock_pool()
                        try:
                            conn = await stack.enter_async_context(pool.connection())
                        except PoolTimeout:
                            conn = await self._adirect(stack, pool, thread_id)
                        pause = _FIRST_POLL
                        while not (await (await conn.execute(_TRY_LOCK, (thread_id,))).fetchone())[
                            "ok"
                        ]:
                            if strategy == "reject" or time.monotonic() >= deadline:
                                raise _busy(thread_id, strategy, timeout)
                            await asyncio.sleep(pause)
                            pause = min(pause * 2, _MAX_POLL)
                except StorageUnavailableError as exc:
                    self.outage(exc)
                    conn = None
            try:
                yield
            finally:
                if conn is not None:
                    with suppress(Exception):
                        await conn.execute(_UNLOCK, (thread_id,))

    def _pool_args(self) -> dict[str, Any]:
        s = self._settings
        return {
            "kwargs": self._kwargs(),
            "min_size": 0,
            "max_size": self._pool_size,
            "timeout": s.pool_timeout,
            "open_timeout": s.connect_timeout + 1,
            "name": "bssagent-run-locks",
        }

    def _sync_lock_pool(self) -> Any:
        from ..sessions.storage.postgres_sync import open_pool

        with self._guard:
            if self._sync_pool is None:
                self._sync_pool = open_pool(self._target.url or "", **self._pool_args())
            return self._sync_pool

    async def _async_lock_pool(self) -> Any:
        from ..sessions.storage.postgres_async import open_pool

        pool = self._pools.get()
        if pool is None:
            opened = await open_pool(self._target.url or "", **self._pool_args())
            # Another task of this loop may have opened one meanwhile: keep the first.
            pool = self._pools.get()
            if pool is None:
                self._pools.set(opened)
                return opened
            await opened.close()
        return pool

    def close(self) -> None:
        """Close the sync lock pool. Idempotent."""
        with self._guard:
            pool, self._sync_pool = self._sync_pool, None
        if pool is not None:
            pool.close()

    async def aclose(self) -> None:
        """Close the running loop's lock pool, then the sync one. Idempotent."""
        pool = self._pools.pop()
        if pool is not None:
            await pool.close()
        await asyncio.to_thread(self.close)
