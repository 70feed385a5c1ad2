# WARNING: generated from bssagent/sessions/storage/postgres_async.py
# by tests/tools/async_to_sync.py. Do not edit: change the async source instead.
"""The PostgreSQL backend. The async module is the source; the sync twin is generated.

The library opens its own pool with the options the queries need (autocommit, dict rows,
``prepare_threshold``, ``connect_timeout``) and health-checks connections on checkout, so a
server restart does not hand out dead connections.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg import Connection, sql
from psycopg.rows import DictRow
from psycopg_pool import ConnectionPool, PoolTimeout

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
from .slots import Slot

_POLL_SECONDS = 0.05


@contextmanager
def migration_lock(conn: Connection[Any], timeout: float) -> Iterator[None]:
    """Hold bssagent's schema set-up lock on ``conn`` (autocommit, outside a transaction).

    Polls ``pg_try_advisory_lock`` instead of blocking in ``pg_advisory_lock``: a session
    queued on a blocking advisory lock makes a concurrent ``CREATE INDEX CONCURRENTLY`` wait
    for it, and the two deadlock.

    Raises:
        MigrationError: The lock was not free within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        cur = conn.execute("SELECT pg_try_advisory_lock(%s) AS ok", (MIGRATION_LOCK_KEY,))
        row = cur.fetchone()
        if row is not None and (row["ok"] if isinstance(row, dict) else row[0]):
            break
        if time.monotonic() > deadline:
            raise MigrationError(f"the schema set-up lock was not free within {timeout:g} s")
        time.sleep(_POLL_SECONDS)
    try:
        yield
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))


def open_pool(
    url: str,
    *,
    kwargs: dict[str, Any],
    min_size: int,
    max_size: int,
    timeout: float,
    open_timeout: float,
    name: str,
    origin: str | None = None,
) -> ConnectionPool[Connection[DictRow]]:
    """Open a health-checked pool the way every bssagent pool is opened.

    One direct connection first: a refused or unknown host fails at once here, where a pool
    would keep retrying in the background until its timeout. The pool is closed again if it
    cannot open. Errors are psycopg's (wrap them with ``wrap_errors``).
    """
    kwargs = {**kwargs, **network_options(url), "options": server_options(url, origin)}
    probe = Connection.connect(url, **kwargs)
    probe.close()
    pool: ConnectionPool[Connection[DictRow]] = ConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout,
        kwargs=kwargs,
        check=ConnectionPool.check_connection,
        open=False,
        name=name,
    )
    try:
        pool.open(wait=True, timeout=open_timeout)
    except BaseException:
        pool.close()
        raise
    return pool


def connect_past_pool(
    url: str, kwargs: dict[str, Any], pool: ConnectionPool[Any], max_size: int
) -> Connection[DictRow] | None:
    """After a pool timeout: a connection of its own, or ``None`` if the pool is full.

    A pool timeout alone cannot tell a full pool from a dead server or from a pool still
    reconnecting after an outage. The direct attempt raises the connection error if the
    server is gone, and serves the caller while the pool catches up.
    """
    direct = Connection.connect(url, **kwargs)
    if pool.get_stats().get("pool_size", 0) >= max_size:
        direct.close()
        return None
    return direct


class PostgresStore:
    """Sessions in PostgreSQL. Satisfies :class:`~.base.SessionStore`.

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
        """Marks this store's writes in change notifications (see :class:`ChangeFeed`)."""
        # One pool per event loop (the sync twin: one): see slots.py.
        self._pools: Slot[ConnectionPool[Connection[DictRow]]] = Slot(
            close=lambda pool: pool.close()
        )

    # -- plumbing -------------------------------------------------------------------------

    def _get_pool(self) -> ConnectionPool[Connection[DictRow]]:
        pool = self._pools.get()
        if pool is not None:
            return pool
        with self._pools.lock():
            pool = self._pools.get()
            if pool is None:
                pool = open_pool(
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

    @contextmanager
    def _connection(self) -> Iterator[Connection[DictRow]]:
        with wrap_errors():
            pool = self._get_pool()
            try:
                with pool.connection() as conn:
                    yield conn
            except PoolTimeout:  # only getting a connection raises it
                direct = connect_past_pool(self._url, self._kwargs, pool, self._max_size)
                if direct is None:
                    raise StorageError(
                        f"all {self._max_size} pool connections stayed busy for "
                        f"{self._pool_timeout:g} s"
                    ) from None
                with direct:
                    yield direct

    def _one(self, query: sql.Composed, params: tuple[Any, ...]) -> UserSession | None:
        with self._connection() as conn:
            cur = conn.execute(query, params)
            row = cur.fetchone()
        return to_session(row) if row else None

    def _many(self, query: sql.Composed, params: tuple[Any, ...]) -> list[UserSession]:
        with self._connection() as conn:
            cur = conn.execute(query, params)
            rows = cur.fetchall()
        return [to_session(r) for r in rows]

    def _user_key(self, namespace: str, user_id: str) -> str:
        return f"bssagent:{self._table}:{namespace}:{user_id}"

    def setup(self) -> None:
        """Apply pending migrations under the migration lock, one transaction per file."""
        with self._connection() as conn, migration_lock(conn, self._lock_timeout):
            conn.execute(migrations.ledger_sql("postgresql"), prepare=False)
            cur = conn.execute(
                "SELECT version FROM bssagent_migrations WHERE target = %s", (self._table,)
            )
            done = {row["version"] for row in cur.fetchall()}
            for migration in migrations.migrations("postgresql"):
                if migration.version not in done:
                    self._apply(conn, migration)

    def _apply(self, conn: Connection[DictRow], migration: migrations.Migration) -> None:
        rendered = migrations.render(
            migration.sql, self._table, lambda name: sql.Identifier(name).as_string()
        )
        try:
            with wrap_errors(), conn.transaction():
                conn.execute(
                    sql.SQL("SET LOCAL lock_timeout = {}").format(
                        sql.Literal(f"{int(self._lock_timeout * 1000)}ms")
                    )
                )
                conn.execute(rendered, prepare=False)
                conn.execute(
                    "INSERT INTO bssagent_migrations (target, version, name) VALUES (%s, %s, %s)",
                    (self._table, migration.version, migration.name),
                )
        except StorageUnavailableError:
            raise
        except StorageError as exc:
            raise MigrationError(
                f"migration {migration.version:04d}_{migration.name} failed: {exc}"
            ) from exc.__cause__

    def close(self) -> None:
        """Close this event loop's pool (the sync twin: the pool). Idempotent."""
        with self._pools.lock():
            pool = self._pools.pop()
        if pool is not None:
            pool.close()

    def ping(self) -> None:
        with self._connection() as conn:
            conn.execute("SELECT 1")

    # -- operations -------------------------------------------------------------------------

    def get_current(self, namespace: str, user_id: str) -> UserSession | None:
        return self._one(self._q.current, (namespace, user_id))

    def get_or_create(
        self, namespace: str, user_id: str, title: str, metadata: dict[str, Any], thread_id: str
    ) -> tuple[UserSession, bool]:
        current = self.get_current(namespace, user_id)
        if current is not None:
            return current, False
        # Creation takes the user's lock, as create/switch/adopt do: without it, this insert
        # could land between their "deactivate" and "insert" and fail them. ON CONFLICT
        # still guards against writers that do not take the lock (hand-written SQL).
        with self._connection() as conn, conn.transaction():
            conn.execute(self._q.lock_user, (self._user_key(namespace, user_id),))
            cur = conn.execute(self._q.current, (namespace, user_id))
            row = cur.fetchone()
            if row:
                return to_session(row), False
            self._enforce_limits(conn, namespace, user_id)
            cur = conn.execute(
                self._q.insert_if_no_current,
                (namespace, user_id, thread_id, title, jsonb(metadata)),
            )
            row = cur.fetchone()
        if row is None:
            raise StorageError("get_or_create: the current session changed under the user lock")
        return to_session(row), True

    def create(
        self, namespace: str, user_id: str, title: str, metadata: dict[str, Any], thread_id: str
    ) -> UserSession:
        with self._connection() as conn, conn.transaction():
            conn.execute(self._q.lock_user, (self._user_key(namespace, user_id),))
            self._enforce_limits(conn, namespace, user_id)
            conn.execute(self._q.deactivate_current, (namespace, user_id))
            cur = conn.execute(
                self._q.insert, (namespace, user_id, thread_id, title, jsonb(metadata))
            )
            row = cur.fetchone()
        assert row is not None
        return to_session(row)

    def get(self, namespace: str, user_id: str, thread_id: str) -> UserSession | None:
        return self._one(self._q.owned, (thread_id, namespace, user_id))

    def update(
        self, namespace: str, user_id: str, thread_id: str | None, fields: dict[str, Any]
    ) -> UserSession | None:
        values = (fields.get("title"), jsonb(fields.get("metadata")))
        if thread_id is None:
            return self._one(self._q.update_current, (*values, namespace, user_id))
        return self._one(self._q.update_owned, (*values, thread_id, namespace, user_id))

    def deactivate(self, namespace: str, user_id: str) -> UserSession | None:
        return self._one(self._q.deactivate_current, (namespace, user_id))

    def switch(self, namespace: str, user_id: str, thread_id: str) -> UserSession | None:
        with self._connection() as conn, conn.transaction():
            conn.execute(self._q.lock_user, (self._user_key(namespace, user_id),))
            cur = conn.execute(self._q.owned, (thread_id, namespace, user_id))
            row = cur.fetchone()
            if row is None or row["is_active"]:
                return to_session(row) if row else None
            check_can_be_current(row["status"], row["parent_thread_id"], thread_id)
            conn.execute(self._q.deactivate_current, (namespace, user_id))
            cur = conn.execute(self._q.activate, (row["id"],))
            row = cur.fetchone()
        assert row is not None
        return to_session(row)

    def delete(self, namespace: str, user_id: str, thread_id: str) -> list[str]:
        with self._connection() as conn:
            cur = conn.execute(self._q.delete_tree, (thread_id, namespace, user_id))
            deleted = [row["thread_id"] for row in cur.fetchall()]
        # The session's own thread first, then its descendants.
        return sorted(deleted, key=lambda t: t != thread_id)

    def list_active(self, namespace: str, limit: int, before_id: int | None) -> list[UserSession]:
        if before_id is None:
            return self._many(self._q.list_active, (namespace, limit))
        return self._many(self._q.list_active_before, (namespace, before_id, limit))

    def list_user(
        self, namespace: str, user_id: str, limit: int, before_id: int | None
    ) -> list[UserSession]:
        if before_id is None:
            return self._many(self._q.list_user, (namespace, user_id, limit))
        return self._many(self._q.list_user_before, (namespace, user_id, before_id, limit))

    def adopt(self, session: UserSession) -> UserSession:
        with self._connection() as conn, conn.transaction():
            conn.execute(self._q.lock_user, (self._user_key(session.namespace, session.user_id),))
            cur = conn.execute(self._q.is_deleted, (session.thread_id,))
            if cur.fetchone() is not None:
                return session  # deleted meanwhile: a stale copy must not bring it back
            cur = conn.execute(self._q.by_thread, (session.thread_id,))
            row = cur.fetchone()
            stored = to_session(row) if row else None
            cur = conn.execute(self._q.current, (session.namespace, session.user_id))
            row = cur.fetchone()
            plan = plan_adoption(session, stored, to_session(row) if row else None)
            if stored is not None and plan.action == "keep":
                return stored
            params = {**plan.fields, "metadata": jsonb(plan.metadata)}
            if stored is not None:
                cur = conn.execute(self._q.overwrite, {**params, "id": stored.id})
            else:
                identity = {
                    "namespace": session.namespace,
                    "user_id": session.user_id,
                    "thread_id": session.thread_id,
                    "created_at": session.created_at,
                }
                cur = conn.execute(self._q.insert_full, {**params, **identity})
            row = cur.fetchone()
        assert row is not None
        return to_session(row)

    # -- lifecycle ------------------------------------------------------------------------

    def _enforce_limits(self, conn: Connection[DictRow], namespace: str, user_id: str) -> None:
        """Raise SessionLimitError (or purge) before a creation; runs in its transaction,
        under the user's lock."""
        limits = self._limits
        if limits.max_sessions_per_user is not None:
            cur = conn.execute(self._q.count_user, (namespace, user_id))
            row = cur.fetchone()
            excess = (row["n"] if row else 0) - limits.max_sessions_per_user + 1
            if excess > 0 and limits.on_user_limit == "purge":
                cur = conn.execute(self._q.purge_ended, (namespace, user_id, excess))
                excess -= len(cur.fetchall())
            if excess > 0:
                raise SessionLimitError(
                    f"user {user_id!r} has reached max_sessions_per_user="
                    f"{limits.max_sessions_per_user}"
                )
        if limits.max_active_sessions is not None:
            # One creator per namespace at a time, so two cannot both take the last place.
            conn.execute(self._q.lock_user, (f"bssagent-limit:{self._table}:{namespace}",))
            cur = conn.execute(self._q.open_in_namespace, (namespace,))
            row = cur.fetchone()
            if row is not None and row["n"] >= limits.max_active_sessions:
                raise SessionLimitError(
                    f"namespace {namespace!r} has reached max_active_sessions="
                    f"{limits.max_active_sessions}"
                )

    def transition(
        self, namespace: str, user_id: str, thread_id: str | None, target: Status, cascade: bool
    ) -> UserSession | None:
        with self._connection() as conn, conn.transaction():
            if thread_id is None:
                cur = conn.execute(self._q.current_for_update, (namespace, user_id))
            else:
                cur = conn.execute(self._q.owned_for_update, (thread_id, namespace, user_id))
            row = cur.fetchone()
            if row is None:
                return None
            check_transition(row["status"], target, row["thread_id"])
            ended = target in ENDED
            cur = conn.execute(
                self._q.set_status, {"status": target, "ended": ended, "id": row["id"]}
            )
            updated = cur.fetchone()
            if cascade and ended:
                conn.execute(
                    self._q.end_descendants, (row["thread_id"], namespace, user_id, target)
                )
        assert updated is not None
        return to_session(updated)

    def record_request(
        self,
        namespace: str,
        user_id: str,
        thread_id: str | None,
        processing_time: float,
        error: bool,
    ) -> UserSession | None:
        if thread_id is None:
            return self._one(
                self._q.record_current, (int(error), processing_time, namespace, user_id)
            )
        return self._one(
            self._q.record_owned, (int(error), processing_time, thread_id, namespace, user_id)
        )

    def expire_idle(self, namespace: str, idle_before: datetime, batch: int) -> list[str]:
        with self._connection() as conn:
            cur = conn.execute(self._q.expire_idle, (namespace, idle_before, batch))
            return [row["user_id"] for row in cur.fetchall()]

    def stats(self, namespace: str) -> SessionStats:
        with self._connection() as conn:
            cur = conn.execute(self._q.stats, (namespace,))
            return to_stats(cur.fetchone())

    def user_stats(self, namespace: str, user_id: str) -> SessionStats:
        with self._connection() as conn:
            cur = conn.execute(self._q.user_stats, (namespace, user_id))
            return to_stats(cur.fetchone())

    def create_child(
        self,
        namespace: str,
        user_id: str,
        parent_thread_id: str,
        title: str,
        metadata: dict[str, Any],
        thread_id: str,
    ) -> UserSession | None:
        with self._connection() as conn, conn.transaction():
            conn.execute(self._q.lock_user, (self._user_key(namespace, user_id),))
            cur = conn.execute(self._q.owned, (parent_thread_id, namespace, user_id))
            if cur.fetchone() is None:
                return None
            self._enforce_limits(conn, namespace, user_id)
            cur = conn.execute(
                self._q.insert_child,
                (namespace, user_id, thread_id, title, jsonb(metadata), parent_thread_id),
            )
            row = cur.fetchone()
        assert row is not None
        return to_session(row)

    def list_children(
        self, namespace: str, user_id: str, parent_thread_id: str, limit: int, before_id: int | None
    ) -> list[UserSession]:
        if before_id is None:
            return self._many(self._q.list_children, (parent_thread_id, namespace, user_id, limit))
        return self._many(
            self._q.list_children_before,
            (parent_thread_id, namespace, user_id, before_id, limit),
        )

    def events(
        self, namespace: str, user_id: str, thread_id: str | None, limit: int, after_seq: int | None
    ) -> list[SessionEvent]:
        with self._connection() as conn:
            cur = conn.execute(
                self._q.events,
                (namespace, user_id, thread_id, thread_id, after_seq or 0, limit),
            )
            return [to_event(row) for row in cur.fetchall()]

    def delete_user(self, namespace: str, user_id: str) -> list[str]:
        with self._connection() as conn, conn.transaction():
            cur = conn.execute(self._q.delete_user, (namespace, user_id))
            threads = [row["thread_id"] for row in cur.fetchall()]
            # After the sessions: their "deleted" events go too.
            conn.execute(self._q.delete_user_events, (namespace, user_id))
        return threads

    def is_deleted(self, thread_id: str) -> bool:
        with self._connection() as conn:
            cur = conn.execute(self._q.is_deleted, (thread_id,))
            return cur.fetchone() is not None

    def owner(self, namespace: str, thread_id: str) -> str | None:
        with self._connection() as conn:
            cur = conn.execute(self._q.owner, (thread_id, namespace))
            row = cur.fetchone()
            return None if row is None else str(row["user_id"])

    def list_sessions(
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
        return self._many(query, tuple(p for p in params if p is not None))

    def count_idle(self, namespace: str, idle_before: datetime) -> int:
        with self._connection() as conn:
            cur = conn.execute(self._q.count_idle, (namespace, idle_before))
            row = cur.fetchone()
            return int(row["idle"]) if row else 0

    def schema_versions(self) -> list[int]:
        with self._connection() as conn:
            cur = conn.execute("SELECT to_regclass('bssagent_migrations') AS ledger")
            found = cur.fetchone()
            if found is None or found["ledger"] is None:
                return []
            cur = conn.execute(self._q.schema_versions, (self._table,))
            return [int(r["version"]) for r in cur.fetchall()]

    def unswept(self, limit: int) -> list[str]:
        with self._connection() as conn:
            cur = conn.execute(self._q.unswept, (limit,))
            return [row["thread_id"] for row in cur.fetchall()]

    def mark_swept(self, thread_ids: list[str]) -> None:
        with self._connection() as conn:
            conn.execute(self._q.mark_swept, (thread_ids,))

    def retention_due(self, namespace: str, ended_before: datetime, limit: int) -> list[str]:
        with self._connection() as conn:
            cur = conn.execute(self._q.retention_due, (namespace, ended_before, limit))
            return [row["thread_id"] for row in cur.fetchall()]

    def mark_retained(self, thread_ids: list[str]) -> None:
        with self._connection() as conn:
            conn.execute(self._q.mark_retained, (thread_ids,))


class ChangeFeed:
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

    def run(self) -> None:
        """Listen until :meth:`stop` (a background task or thread)."""
        while not self._stopped:
            try:
                with Connection.connect(self._url, **self._kwargs) as conn:
                    conn.execute(self._listen)
                    self._on_gap()  # changes made before LISTEN took effect were not heard
                    self.connected = True
                    while not self._stopped:
                        for note in conn.notifies(timeout=0.5):
                            self._deliver(note.payload)
            except psycopg.Error:
                pass
            finally:
                if self.connected:
                    self.connected = False
                    self._on_gap()
            if not self._stopped:
                time.sleep(self._retry)

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
