"""The PostgreSQL backend. The async module is the source; the sync twin is generated.

The library opens its own pool with the options the queries need (autocommit, dict rows,
``prepare_threshold``, ``connect_timeout``) and health-checks connections on checkout, so a
server restart does not hand out dead connections.
"""

from __future__ import annotations

import asyncio  # sync: import threading
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.rows import DictRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ...errors import MigrationError, SessionLimitError, StorageError, StorageUnavailableError
from .. import migrations
from ..lifecycle import ENDED, Status, check_can_be_current, check_transition
from ..model import SessionEvent, SessionStats, UserSession
from .adoption import plan_adoption
from .base import NO_LIMITS, Limits
from .postgres_common import (
    MIGRATION_LOCK_KEY,
    build_queries,
    connection_kwargs,
    jsonb,
    network_options,
    server_options,
    to_event,
    to_session,
    to_stats,
    wrap_errors,
)
from .slots import AsyncSlot

_POLL_SECONDS = 0.05


@asynccontextmanager
async def migration_lock(conn: AsyncConnection[Any], timeout: float) -> AsyncIterator[None]:
    """Hold bssagent's schema set-up lock on ``conn`` (autocommit, outside a transaction).

    Polls ``pg_try_advisory_lock`` instead of blocking in ``pg_advisory_lock``: a session
    queued on a blocking advisory lock makes a concurrent ``CREATE INDEX CONCURRENTLY`` wait
    for it, and the two deadlock.

    Raises:
        MigrationError: The lock was not free within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s) AS ok", (MIGRATION_LOCK_KEY,))
        row = await cur.fetchone()
        if row is not None and (row["ok"] if isinstance(row, dict) else row[0]):
            break
        if time.monotonic() > deadline:
            raise MigrationError(f"the schema set-up lock was not free within {timeout:g} s")
        await asyncio.sleep(_POLL_SECONDS)  # sync: time.sleep(_POLL_SECONDS)
    try:
        yield
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))


async def open_pool(
    url: str,
    *,
    kwargs: dict[str, Any],
    min_size: int,
    max_size: int,
    timeout: float,
    open_timeout: float,
    name: str,
    origin: str | None = None,
) -> AsyncConnectionPool[AsyncConnection[DictRow]]:
    """Open a health-checked pool the way every bssagent pool is opened.

    One direct connection first: a refused or unknown host fails at once here, where a pool
    would keep retrying in the background until its timeout. The pool is closed again if it
    cannot open. Errors are psycopg's (wrap them with ``wrap_errors``).
    """
    kwargs = {**kwargs, **network_options(url), "options": server_options(url, origin)}
    probe = await AsyncConnection.connect(url, **kwargs)
    await probe.close()
    pool: AsyncConnectionPool[AsyncConnection[DictRow]] = AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout,
        kwargs=kwargs,
        check=AsyncConnectionPool.check_connection,
        open=False,
        name=name,
    )
    try:
        await pool.open(wait=True, timeout=open_timeout)
    except BaseException:
        await pool.close()
        raise
    return pool


async def connect_past_pool(
    url: str, kwargs: dict[str, Any], pool: AsyncConnectionPool[Any], max_size: int
) -> AsyncConnection[DictRow] | None:
    """After a pool timeout: a connection of its own, or ``None`` if the pool is full.

    A pool timeout alone cannot tell a full pool from a dead server or from a pool still
    reconnecting after an outage. The direct attempt raises the connection error if the
    server is gone, and serves the caller while the pool catches up.
    """
    direct = await AsyncConnection.connect(url, **kwargs)
    if pool.get_stats().get("pool_size", 0) >= max_size:
        await direct.close()
        return None
    return direct


class AsyncPostgresStore:
    """Sessions in PostgreSQL. Satisfies :class:`~.base.AsyncSessionStore`.

    Args:
        url: libpq conninfo or ``postgresql://`` URL (secret: never logged).
        table: The (validated) session table name.
        min_size: Pool connections kept open.
        max_size: Pool connections at most.
        pool_timeout: Seconds to wait for a free connection.
        connect_timeout: Seconds to open one connection.
        prepare_threshold: psycopg's; ``None`` behind a transaction-mode pooler.
        lock_timeout: Seconds to wait for the migration lock and for table locks.
        limits: Session limits enforced when creating sessions.
    """

    backend = "postgres"

    def __init__(
        self,
        url: str,
        table: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        pool_timeout: float = 2.0,
        connect_timeout: float = 2.0,
        prepare_threshold: int | None = 5,
        lock_timeout: float = 60.0,
        limits: Limits = NO_LIMITS,
    ) -> None:
        self._url = url
        self._limits = limits
        self._table = table
        self._q = build_queries(table)
        self._min_size = max(1, min_size)
        self._max_size = max(self._min_size, max_size)
        self._pool_timeout = pool_timeout
        self._connect_timeout = connect_timeout
        self._kwargs = connection_kwargs(connect_timeout, prepare_threshold)
        self._lock_timeout = lock_timeout
        self.origin = uuid.uuid4().hex
        """Marks this store's writes in change notifications (see :class:`AsyncChangeFeed`)."""
        # One pool per event loop (the sync twin: one): see slots.py.
        self._pools: AsyncSlot[AsyncConnectionPool[AsyncConnection[DictRow]]] = AsyncSlot(
            close=lambda pool: pool.close()
        )

    # -- plumbing -------------------------------------------------------------------------

    async def _get_pool(self) -> AsyncConnectionPool[AsyncConnection[DictRow]]:
        pool = self._pools.get()
        if pool is not None:
            return pool
        async with self._pools.lock():
            pool = self._pools.get()
            if pool is None:
                pool = await open_pool(
                    self._url,
                    kwargs=self._kwargs,
                    min_size=self._min_size,
                    max_size=self._max_size,
                    timeout=self._pool_timeout,
                    open_timeout=self._connect_timeout + 1,
                    name="bssagent",
                    origin=self.origin,
                )
                self._pools.set(pool)
        return pool

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection[DictRow]]:
        with wrap_errors():
            pool = await self._get_pool()
            try:
                async with pool.connection() as conn:
                    yield conn
            except PoolTimeout:  # only getting a connection raises it
                direct = await connect_past_pool(self._url, self._kwargs, pool, self._max_size)
                if direct is None:
                    raise StorageError(
                        f"all {self._max_size} pool connections stayed busy for "
                        f"{self._pool_timeout:g} s"
                    ) from None
                async with direct:
                    yield direct

    async def _one(self, query: sql.Composed, params: tuple[Any, ...]) -> UserSession | None:
        async with self._connection() as conn:
            cur = await conn.execute(query, params)
            row = await cur.fetchone()
        return to_session(row) if row else None

    async def _many(self, query: sql.Composed, params: tuple[Any, ...]) -> list[UserSession]:
        async with self._connection() as conn:
            cur = await conn.execute(query, params)
            rows = await cur.fetchall()
        return [to_session(r) for r in rows]

    def _user_key(self, namespace: str, user_id: str) -> str:
        return f"bssagent:{self._table}:{namespace}:{user_id}"

    async def setup(self) -> None:
        """Apply pending migrations under the migration lock, one transaction per file."""
        async with self._connection() as conn, migration_lock(conn, self._lock_timeout):
            await conn.execute(migrations.ledger_sql("postgresql"), prepare=False)
            cur = await conn.execute(
                "SELECT version FROM bssagent_migrations WHERE target = %s", (self._table,)
            )
            done = {row["version"] for row in await cur.fetchall()}
            for migration in migrations.migrations("postgresql"):
                if migration.version not in done:
                    await self._apply(conn, migration)

    async def _apply(self, conn: AsyncConnection[DictRow], migration: migrations.Migration) -> None:
        rendered = migrations.render(
            migration.sql, self._table, lambda name: sql.Identifier(name).as_string()
        )
        try:
            with wrap_errors():
                async with conn.transaction():
                    await conn.execute(
                        sql.SQL("SET LOCAL lock_timeout = {}").format(
                            sql.Literal(f"{int(self._lock_timeout * 1000)}ms")
                        )
                    )
                    await conn.execute(rendered, prepare=False)
                    await conn.execute(
                        "INSERT INTO bssagent_migrations (target, version, name)"
                        " VALUES (%s, %s, %s)",
                        (self._table, migration.version, migration.name),
                    )
        except StorageUnavailableError:
            raise
        except StorageError as exc:
            raise MigrationError(
                f"migration {migration.version:04d}_{migration.name} failed: {exc}"
            ) from exc.__cause__

    async def close(self) -> None:
        """Close this event loop's pool (the sync twin: the pool). Idempotent."""
        async with self._pools.lock():
            pool = self._pools.pop()
        if pool is not None:
            await pool.close()

    async def ping(self) -> None:
        async with self._connection() as conn:
            await conn.execute("SELECT 1")

    # -- operations -------------------------------------------------------------------------

    async def get_current(self, namespace: str, user_id: str) -> UserSession | None:
        return await self._one(self._q.current, (namespace, user_id))

    async def get_or_create(
        self, namespace: str, user_id: str, title: str, metadata: dict[str, Any], thread_id: str
    ) -> tuple[UserSession, bool]:
        current = await self.get_current(namespace, user_id)
        if current is not None:
            return current, False
        # Creation takes the user's lock, as create/switch/adopt do: without it, this insert
        # could land between their "deactivate" and "insert" and fail them. ON CONFLICT
        # still guards against writers that do not take the lock (hand-written SQL).
        async with self._connection() as conn, conn.transaction():
            await conn.execute(self._q.lock_user, (self._user_key(namespace, user_id),))
            cur = await conn.execute(self._q.current, (namespace, user_id))
            row = await cur.fetchone()
            if row:
                return to_session(row), False
            await self._enforce_limits(conn, namespace, user_id)
            cur = await conn.execute(
                self._q.insert_if_no_current,
                (namespace, user_id, thread_id, title, jsonb(metadata)),
            )
            row = await cur.fetchone()
        if row is None:
            raise StorageError("get_or_create: the current session changed under the user lock")
        return to_session(row), True

    async def create(
        self, namespace: str, user_id: str, title: str, metadata: dict[str, Any], thread_id: str
    ) -> UserSession:
        async with self._connection() as conn, conn.transaction():
            await conn.execute(self._q.lock_user, (self._user_key(namespace, user_id),))
            await self._enforce_limits(conn, namespace, user_id)
            await conn.execute(self._q.deactivate_current, (namespace, user_id))
            cur = await conn.execute(
                self._q.insert, (namespace, user_id, thread_id, title, jsonb(metadata))
            )
            row = await cur.fetchone()
        assert row is not None
        return to_session(row)

    async def get(self, namespace: str, user_id: str, thread_id: str) -> UserSession | None:
        return await self._one(self._q.owned, (thread_id, namespace, user_id))

    async def update(
        self, namespace: str, user_id: str, thread_id: str | None, fields: dict[str, Any]
    ) -> UserSession | None:
        values = (fields.get("title"), jsonb(fields.get("metadata")))
        if thread_id is None:
            return await self._one(self._q.update_current, (*values, namespace, user_id))
        return await self._one(self._q.update_owned, (*values, thread_id, namespace, user_id))

    async def deactivate(self, namespace: str, user_id: str) -> UserSession | None:
        return await self._one(self._q.deactivate_current, (namespace, user_id))

    async def switch(self, namespace: str, user_id: str, thread_id: str) -> UserSession | None:
        async with self._connection() as conn, conn.transaction():
            await conn.execute(self._q.lock_user, (self._user_key(namespace, user_id),))
            cur = await conn.execute(self._q.owned, (thread_id, namespace, user_id))
            row = await cur.fetchone()
            if row is None or row["is_active"]:
                return to_session(row) if row else None
            check_can_be_current(row["status"], row["parent_thread_id"], thread_id)
            await conn.execute(self._q.deactivate_current, (namespace, user_id))
            cur = await conn.execute(self._q.activate, (row["id"],))
            row = await cur.fetchone()
        assert row is not None
        return to_session(row)

    async def delete(self, namespace: str, user_id: str, thread_id: str) -> list[str]:
        async with self._connection() as conn:
            cur = await conn.execute(self._q.delete_tree, (thread_id, namespace, user_id))
            deleted = [row["thread_id"] for row in await cur.fetchall()]
        # The session's own thread first, then its descendants.
        return sorted(deleted, key=lambda t: t != thread_id)

    async def list_active(
        self, namespace: str, limit: int, before_id: int | None
    ) -> list[UserSession]:
        if before_id is None:
            return await self._many(self._q.list_active, (namespace, limit))
        return await self._many(self._q.list_active_before, (namespace, before_id, limit))

    async def list_user(
        self, namespace: str, user_id: str, limit: int, before_id: int | None
    ) -> list[UserSession]:
        if before_id is None:
            return await self._many(self._q.list_user, (namespace, user_id, limit))
        return await self._many(self._q.list_user_before, (namespace, user_id, before_id, limit))

    async def adopt(self, session: UserSession) -> UserSession:
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                self._q.lock_user, (self._user_key(session.namespace, session.user_id),)
            )
            cur = await conn.execute(self._q.is_deleted, (session.thread_id,))
            if await cur.fetchone() is not None:
                return session  # deleted meanwhile: a stale copy must not bring it back
            cur = await conn.execute(self._q.by_thread, (session.thread_id,))
            row = await cur.fetchone()
            stored = to_session(row) if row else None
            cur = await conn.execute(self._q.current, (session.namespace, session.user_id))
            row = await cur.fetchone()
            plan = plan_adoption(session, stored, to_session(row) if row else None)
            if stored is not None and plan.action == "keep":
                return stored
            params = {**plan.fields, "metadata": jsonb(plan.metadata)}
            if stored is not None:
                cur = await conn.execute(self._q.overwrite, {**params, "id": stored.id})
            else:
                identity = {
                    "namespace": session.namespace,
                    "user_id": session.user_id,
                    "thread_id": session.thread_id,
                    "created_at": session.created_at,
                }
                cur = await conn.execute(self._q.insert_full, {**params, **identity})
            row = await cur.fetchone()
        assert row is not None
        return to_session(row)

    # -- lifecycle ------------------------------------------------------------------------

    async def _enforce_limits(
        self, conn: AsyncConnection[DictRow], namespace: str, user_id: str
    ) -> None:
        """Raise SessionLimitError (or purge) before a creation; runs in its transaction,
        under the user's lock."""
        limits = self._limits
        if limits.max_sessions_per_user is not None:
            cur = await conn.execute(self._q.count_user, (namespace, user_id))
            row = await cur.fetchone()
            excess = (row["n"] if row else 0) - limits.max_sessions_per_user + 1
            if excess > 0 and limits.on_user_limit == "purge":
                cur = await conn.execute(self._q.purge_ended, (namespace, user_id, excess))
                excess -= len(await cur.fetchall())
            if excess > 0:
                raise SessionLimitError(
                    f"user {user_id!r} has reached max_sessions_per_user="
                    f"{limits.max_sessions_per_user}"
                )
        if limits.max_active_sessions is not None:
            # One creator per namespace at a time, so two cannot both take the last place.
            await conn.execute(self._q.lock_user, (f"bssagent-limit:{self._table}:{namespace}",))
            cur = await conn.execute(self._q.open_in_namespace, (namespace,))
            row = await cur.fetchone()
            if row is not None and row["n"] >= limits.max_active_sessions:
                raise SessionLimitError(
                    f"namespace {namespace!r} has reached max_active_sessions="
                    f"{limits.max_active_sessions}"
                )

    async def transition(
        self, namespace: str, user_id: str, thread_id: str | None, target: Status, cascade: bool
    ) -> UserSession | None:
        async with self._connection() as conn, conn.transaction():
            if thread_id is None:
                cur = await conn.execute(self._q.current_for_update, (namespace, user_id))
            else:
                cur = await conn.execute(self._q.owned_for_update, (thread_id, namespace, user_id))
            row = await cur.fetchone()
            if row is None:
                return None
            check_transition(row["status"], target, row["thread_id"])
            ended = target in ENDED
            cur = await conn.execute(
                self._q.set_status, {"status": target, "ended": ended, "id": row["id"]}
            )
            updated = await cur.fetchone()
            if cascade and ended:
                await conn.execute(
                    self._q.end_descendants, (row["thread_id"], namespace, user_id, target)
                )
        assert updated is not None
        return to_session(updated)

    async def record_request(
        self,
        namespace: str,
        user_id: str,
        thread_id: str | None,
        processing_time: float,
        error: bool,
    ) -> UserSession | None:
        if thread_id is None:
            return await self._one(
                self._q.record_current, (int(error), processing_time, namespace, user_id)
            )
        return await self._one(
            self._q.record_owned, (int(error), processing_time, thread_id, namespace, user_id)
        )

    async def expire_idle(self, namespace: str, idle_before: datetime, batch: int) -> list[str]:
        async with self._connection() as conn:
            cur = await conn.execute(self._q.expire_idle, (namespace, idle_before, batch))
            return [row["user_id"] for row in await cur.fetchall()]

    async def stats(self, namespace: str) -> SessionStats:
        async with self._connection() as conn:
            cur = await conn.execute(self._q.stats, (namespace,))
            return to_stats(await cur.fetchone())

    async def user_stats(self, namespace: str, user_id: str) -> SessionStats:
        async with self._connection() as conn:
            cur = await conn.execute(self._q.user_stats, (namespace, user_id))
            return to_stats(await cur.fetchone())

    async def create_child(
        self,
        namespace: str,
        user_id: str,
        parent_thread_id: str,
        title: str,
        metadata: dict[str, Any],
        thread_id: str,
    ) -> UserSession | None:
        async with self._connection() as conn, conn.transaction():
            await conn.execute(self._q.lock_user, (self._user_key(namespace, user_id),))
            cur = await conn.execute(self._q.owned, (parent_thread_id, namespace, user_id))
            if await cur.fetchone() is None:
                return None
            await self._enforce_limits(conn, namespace, user_id)
            cur = await conn.execute(
                self._q.insert_child,
                (namespace, user_id, thread_id, title, jsonb(metadata), parent_thread_id),
            )
            row = await cur.fetchone()
        assert row is not None
        return to_session(row)

    async def list_children(
        self, namespace: str, user_id: str, parent_thread_id: str, limit: int, before_id: int | None
    ) -> list[UserSession]:
        if before_id is None:
            return await self._many(
                self._q.list_children, (parent_thread_id, namespace, user_id, limit)
            )
        return await self._many(
            self._q.list_children_before,
            (parent_thread_id, namespace, user_id, before_id, limit),
        )

    async def events(
        self, namespace: str, user_id: str, thread_id: str | None, limit: int, after_seq: int | None
    ) -> list[SessionEvent]:
        async with self._connection() as conn:
            cur = await conn.execute(
                self._q.events,
                (namespace, user_id, thread_id, thread_id, after_seq or 0, limit),
            )
            return [to_event(row) for row in await cur.fetchall()]

    async def delete_user(self, namespace: str, user_id: str) -> list[str]:
        async with self._connection() as conn, conn.transaction():
            cur = await conn.execute(self._q.delete_user, (namespace, user_id))
            threads = [row["thread_id"] for row in await cur.fetchall()]
            # After the sessions: their "deleted" events go too.
            await conn.execute(self._q.delete_user_events, (namespace, user_id))
        return threads

    async def is_deleted(self, thread_id: str) -> bool:
        async with self._connection() as conn:
            cur = await conn.execute(self._q.is_deleted, (thread_id,))
            return await cur.fetchone() is not None

    async def owner(self, namespace: str, thread_id: str) -> str | None:
        async with self._connection() as conn:
            cur = await conn.execute(self._q.owner, (thread_id, namespace))
            row = await cur.fetchone()
            return None if row is None else str(row["user_id"])

    async def list_sessions(
        self,
        namespace: str,
        user_id: str | None,
        status: str | None,
        limit: int,
        before_id: int | None,
    ) -> list[UserSession]:
        shape = (user_id is not None, status is not None, before_id is not None)
        params = (namespace, user_id, status, before_id, limit)
        query = self._q.sessions_page[shape]
        return await self._many(query, tuple(p for p in params if p is not None))

    async def count_idle(self, namespace: str, idle_before: datetime) -> int:
        async with self._connection() as conn:
            cur = await conn.execute(self._q.count_idle, (namespace, idle_before))
            row = await cur.fetchone()
            return int(row["idle"]) if row else 0

    async def schema_versions(self) -> list[int]:
        async with self._connection() as conn:
            cur = await conn.execute("SELECT to_regclass('bssagent_migrations') AS ledger")
            found = await cur.fetchone()
            if found is None or found["ledger"] is None:
                return []
            cur = await conn.execute(self._q.schema_versions, (self._table,))
            return [int(r["version"]) for r in await cur.fetchall()]

    async def unswept(self, limit: int) -> list[str]:
        async with self._connection() as conn:
            cur = await conn.execute(self._q.unswept, (limit,))
            return [row["thread_id"] for row in await cur.fetchall()]

    async def mark_swept(self, thread_ids: list[str]) -> None:
        async with self._connection() as conn:
            await conn.execute(self._q.mark_swept, (thread_ids,))

    async def retention_due(self, namespace: str, ended_before: datetime, limit: int) -> list[str]:
        async with self._connection() as conn:
            cur = await conn.execute(self._q.retention_due, (namespace, ended_before, limit))
            return [row["thread_id"] for row in await cur.fetchall()]

    async def mark_retained(self, thread_ids: list[str]) -> None:
        async with self._connection() as conn:
            await conn.execute(self._q.mark_retained, (thread_ids,))


class AsyncChangeFeed:
    """Follows the session table's change notifications (migration 0003) on a dedicated
    connection, so that every process's cache learns of another's changes within
    milliseconds.

    ``on_change(namespace, user_id)`` is called for each change made by another store
    (``user_id`` is ``None`` for a bulk change: forget the whole namespace); ``on_gap()``
    whenever notifications may have been missed (on every (re)connection): the caller then
    forgets everything. Reconnects every ``retry`` seconds until :meth:`stop`.
    """

    def __init__(
        self,
        url: str,
        table: str,
        origin: str,
        on_change: Callable[[str, str | None], None],
        on_gap: Callable[[], None],
        *,
        connect_timeout: float = 2.0,
        retry: float = 5.0,
    ) -> None:
        self._url = url
        self._listen = sql.SQL("LISTEN {}").format(sql.Identifier(f"{table}_changes"))
        self._origin = origin
        self._on_change = on_change
        self._on_gap = on_gap
        self._kwargs = {
            **connection_kwargs(connect_timeout, None),
            **network_options(url),
            "options": server_options(url),
        }
        self._retry = retry
        self._stopped = False
        self.connected = False
        """Whether notifications are being received right now."""

    async def run(self) -> None:
        """Listen until :meth:`stop` (a background task or thread)."""
        while not self._stopped:
            try:
                async with await AsyncConnection.connect(self._url, **self._kwargs) as conn:
                    await conn.execute(self._listen)
                    self._on_gap()  # changes made before LISTEN took effect were not heard
                    self.connected = True
                    while not self._stopped:
                        async for note in conn.notifies(timeout=0.5):
                            self._deliver(note.payload)
            except psycopg.Error:
                pass
            except asyncio.CancelledError:  # sync-drop
                # Its loop is ending (asyncio.run cancels what is left): with nobody  # sync-drop
                # listening, nothing cached may be trusted until a feed runs again.  # sync-drop
                self._on_gap()  # sync-drop
                raise  # sync-drop
            finally:
                if self.connected:
                    self.connected = False
                    self._on_gap()
            if not self._stopped:
                await asyncio.sleep(self._retry)  # sync: time.sleep(self._retry)

    def _deliver(self, payload: str) -> None:
        try:
            change = json.loads(payload)
            if change.get("origin") == self._origin:
                return  # our own write: our cache is already right
            self._on_change(str(change["namespace"]), change.get("user_id"))
        except (ValueError, KeyError, TypeError, AttributeError):
            self._on_gap()  # not a message we understand: forget everything, to be safe

    def stop(self) -> None:
        """Stop after the current wait (at most half a second)."""
        self._stopped = True
