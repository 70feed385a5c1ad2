# WARNING: generated from bssagent/sessions/storage/postgres_async.py
# by tests/tools/async_to_sync.py. Do not edit: change the async source instead.
"""The PostgreSQL backend. The async module is the source; the sync twin is generated.

The library opens its own pool with the options the queries need (autocommit, dict rows,
``prepare_threshold``, ``connect_timeout``) and health-checks connections on checkout, so a
server restart does not hand out dead connections.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from psycopg import Connection, sql
from psycopg.rows import DictRow
from psycopg_pool import ConnectionPool

from ...errors import MigrationError, StorageError, StorageUnavailableError
from .. import migrations
from ..model import UserSession
from .adoption import plan_adoption
from .postgres_common import (
    MIGRATION_LOCK_KEY,
    build_queries,
    connection_kwargs,
    jsonb,
    to_session,
    wrap_errors,
)

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
    ) -> None:
        self._url = url
        self._table = table
        self._q = build_queries(table)
        self._min_size = max(1, min_size)
        self._max_size = max(self._min_size, max_size)
        self._pool_timeout = pool_timeout
        self._connect_timeout = connect_timeout
        self._kwargs = connection_kwargs(connect_timeout, prepare_threshold)
        self._lock_timeout = lock_timeout
        self._pool: ConnectionPool[Connection[DictRow]] | None = None
        self._pool_lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------------------

    def _get_pool(self) -> ConnectionPool[Connection[DictRow]]:
        if self._pool is not None:
            return self._pool
        with self._pool_lock:
            if self._pool is None:
                # One direct connection first: a refused or unknown host fails at once here,
                # where a pool would keep retrying in the background until its timeout.
                probe = Connection.connect(self._url, **self._kwargs)
                probe.close()
                pool: ConnectionPool[Connection[DictRow]] = ConnectionPool(
                    self._url,
                    min_size=self._min_size,
                    max_size=self._max_size,
                    timeout=self._pool_timeout,
                    kwargs=self._kwargs,
                    check=ConnectionPool.check_connection,
                    open=False,
                    name="bssagent",
                )
                try:
                    pool.open(wait=True, timeout=self._connect_timeout + 1)
                except BaseException:
                    pool.close()
                    raise
                self._pool = pool
        return self._pool

    @contextmanager
    def _connection(self) -> Iterator[Connection[DictRow]]:
        with wrap_errors():
            pool = self._get_pool()
            with pool.connection() as conn:
                yield conn

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
        with self._pool_lock:
            pool, self._pool = self._pool, None
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
        with self._connection() as conn:
            for _ in range(10):
                cur = conn.execute(self._q.current, (namespace, user_id))
                row = cur.fetchone()
                if row:
                    return to_session(row), False
                # ON CONFLICT on the partial unique index: a concurrent creator wins and we
                # read its row on the next loop turn; nobody sees a UniqueViolation.
                cur = conn.execute(
                    self._q.insert_if_no_current,
                    (namespace, user_id, thread_id, title, jsonb(metadata)),
                )
                row = cur.fetchone()
                if row:
                    return to_session(row), True
        raise StorageError("get_or_create did not settle after 10 attempts")

    def create(
        self, namespace: str, user_id: str, title: str, metadata: dict[str, Any], thread_id: str
    ) -> UserSession:
        with self._connection() as conn, conn.transaction():
            conn.execute(self._q.lock_user, (self._user_key(namespace, user_id),))
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
            conn.execute(self._q.deactivate_current, (namespace, user_id))
            cur = conn.execute(self._q.activate, (row["id"],))
            row = cur.fetchone()
        assert row is not None
        return to_session(row)

    def delete(self, namespace: str, user_id: str, thread_id: str) -> bool:
        with self._connection() as conn:
            cur = conn.execute(self._q.delete, (thread_id, namespace, user_id))
            return cur.fetchone() is not None

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
            cur = conn.execute(self._q.by_thread, (session.thread_id,))
            row = cur.fetchone()
            stored = to_session(row) if row else None
            cur = conn.execute(self._q.current, (session.namespace, session.user_id))
            row = cur.fetchone()
            plan = plan_adoption(session, stored, to_session(row) if row else None)
            if stored is not None and plan.action == "keep":
                return stored
            if stored is not None:
                params: tuple[Any, ...] = (
                    session.title,
                    jsonb(plan.metadata),
                    plan.is_active,
                    session.updated_at,
                    stored.id,
                )
                cur = conn.execute(self._q.overwrite, params)
            else:
                params = (
                    session.namespace,
                    session.user_id,
                    session.thread_id,
                    session.title,
                    jsonb(plan.metadata),
                    session.created_at,
                    session.updated_at,
                    plan.is_active,
                )
                cur = conn.execute(self._q.insert_full, params)
            row = cur.fetchone()
        assert row is not None
        return to_session(row)
