"""The embedded backend: one SQLite file, the zero-set-up default.

One connection per store, in autocommit mode, guarded by a lock; writes run in
``BEGIN IMMEDIATE`` transactions so concurrent processes on the same file serialize on
SQLite's own lock (``busy_timeout``) instead of failing. WAL mode lets readers proceed
while a writer commits.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ...errors import (
    MigrationError,
    SessionLimitError,
    StorageError,
    StorageUnavailableError,
)
from .. import migrations
from ..lifecycle import ENDED, OPEN, Status, check_can_be_current, check_transition
from ..model import SessionEvent, SessionStats, UserSession
from .adoption import plan_adoption
from .base import NO_LIMITS, Limits
from .memory import utcnow_after

_COLUMNS = (
    "id, namespace, user_id, thread_id, title, metadata, created_at, updated_at, is_active,"
    " status, request_count, error_count, total_processing_time, last_activity_at, ended_at,"
    " parent_thread_id"
)
_EVENT_COLUMNS = "seq, namespace, user_id, thread_id, kind, payload, created_at"
# Status sets as SQL literals (constants of the code, never user input).
_OPEN_SQL = "(" + ", ".join(f"'{s}'" for s in OPEN) + ")"
_ENDED_SQL = "(" + ", ".join(f"'{s}'" for s in ENDED) + ")"
# sqlite3 reports "cannot reach the file" as OperationalError with one of these messages.
# "database is locked" is contention, not an outage: it must never trigger the fallback.
_UNAVAILABLE = ("unable to open", "disk i/o error", "readonly database")


def quote_identifier(identifier: str) -> str:
    """A (validated) identifier quoted for SQLite."""
    return '"' + identifier.replace('"', '""') + '"'


def _ts(value: datetime) -> str:
    """A timestamp as stored: ISO 8601 in UTC with microseconds, so string order is time
    order (naive values are taken as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _now() -> str:
    return _ts(utcnow_after())


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _json(value: Any) -> str:
    # Sorted keys: the triggers compare metadata as text, so equal objects must be equal text
    # (as PostgreSQL's jsonb compares them).
    return json.dumps(value, sort_keys=True)


def _value(name: str, value: Any) -> Any:
    if name == "metadata":
        return _json(value)
    if isinstance(value, datetime):
        return _ts(value)
    if isinstance(value, bool):
        return int(value)
    return value


def _row(row: sqlite3.Row) -> UserSession:
    return UserSession(
        id=row["id"],
        namespace=row["namespace"],
        user_id=row["user_id"],
        thread_id=row["thread_id"],
        title=row["title"],
        metadata=json.loads(row["metadata"]),
        created_at=datetime.fromisoformat(row["created_at"]),
        updated_at=datetime.fromisoformat(row["updated_at"]),
        is_active=bool(row["is_active"]),
        status=row["status"],
        request_count=row["request_count"],
        error_count=row["error_count"],
        total_processing_time=row["total_processing_time"],
        last_activity_at=_dt(row["last_activity_at"]),
        ended_at=_dt(row["ended_at"]),
        parent_thread_id=row["parent_thread_id"],
    )


def _event(row: sqlite3.Row) -> SessionEvent:
    return SessionEvent(
        seq=row["seq"],
        namespace=row["namespace"],
        user_id=row["user_id"],
        thread_id=row["thread_id"],
        kind=row["kind"],
        payload=json.loads(row["payload"]),
        created_at=datetime.fromisoformat(row["created_at"]),
    )


class SqliteStore:
    """Sessions in a SQLite file. Satisfies :class:`~.base.SessionStore`.

    The statistics, the event log and the tombstones are kept by the triggers of
    ``sql/sqlite/0002_lifecycle.sql``; this class never writes them itself.

    Args:
        path: The database file; its folder is created if missing.
        table: The (validated) session table name.
        busy_timeout: Seconds to wait for another process's write lock.
        limits: Session limits enforced when creating sessions.
    """

    backend = "sqlite"

    def __init__(
        self, path: Path, table: str, busy_timeout: float = 10.0, limits: Limits = NO_LIMITS
    ) -> None:
        self._path = path
        self._table = table
        self._t = quote_identifier(table)
        self._stats = quote_identifier(f"{table}_stats")
        self._events = quote_identifier(f"{table}_events")
        self._tombstones = quote_identifier(f"{table}_tombstones")
        self._busy_timeout = busy_timeout
        self._limits = limits
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None

    # -- plumbing -------------------------------------------------------------------------

    @contextmanager
    def _cursor(self, write: bool = False) -> Iterator[sqlite3.Cursor]:
        with self._lock, _wrapped():
            conn = self._connect()
            cur = conn.cursor()
            if not write:
                yield cur
                return
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self._path,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.row_factory = sqlite3.Row
            self._enable_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            self._conn = conn
        return self._conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """Switch the file to WAL, waiting for other processes doing the same.

        Changing the journal mode needs an exclusive lock, and SQLite fails that at once
        with "database is locked" instead of waiting out ``busy_timeout``: retry ourselves.
        """
        deadline, pause = time.monotonic() + self._busy_timeout, 0.005
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode.lower() == "wal" or time.monotonic() > deadline:
                    return  # a file system without WAL support keeps its mode
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc).lower() or time.monotonic() > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def setup(self) -> None:
        """Apply pending migrations, one ``BEGIN IMMEDIATE`` transaction per file.

        The write lock of ``BEGIN IMMEDIATE`` is the migration lock: the ledger is re-read
        after taking it, so concurrent first starts apply each file exactly once.
        """
        ledger = migrations.split_statements(migrations.ledger_sql("sqlite"))
        for migration in migrations.migrations("sqlite"):
            rendered = migrations.render(migration.sql, self._table, quote_identifier)
            try:
                with self._cursor(write=True) as cur:
                    for statement in ledger:
                        cur.execute(statement)
                    done = cur.execute(
                        "SELECT 1 FROM bssagent_migrations WHERE target = ? AND version = ?",
                        (self._table, migration.version),
                    ).fetchone()
                    if done:
                        continue
                    for statement in migrations.split_statements(rendered):
                        cur.execute(statement)
                    cur.execute(
                        "INSERT INTO bssagent_migrations (target, version, name) VALUES (?, ?, ?)",
                        (self._table, migration.version, migration.name),
                    )
            except StorageUnavailableError:
                raise
            except StorageError as exc:
                raise MigrationError(
                    f"sqlite migration {migration.version:04d}_{migration.name} failed: {exc}"
                ) from exc.__cause__

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def ping(self) -> None:
        with self._cursor() as cur:
            cur.execute("SELECT 1")

    # -- operations -------------------------------------------------------------------------

    def _select_current(
        self, cur: sqlite3.Cursor, namespace: str, user_id: str
    ) -> UserSession | None:
        row = cur.execute(
            f"SELECT {_COLUMNS} FROM {self._t} WHERE namespace = ? AND user_id = ? AND is_active",
            (namespace, user_id),
        ).fetchone()
        return _row(row) if row else None

    def _select_owned(
        self, cur: sqlite3.Cursor, namespace: str, user_id: str, thread_id: str
    ) -> UserSession | None:
        row = cur.execute(
            f"SELECT {_COLUMNS} FROM {self._t} "
            "WHERE thread_id = ? AND namespace = ? AND user_id = ?",
            (thread_id, namespace, user_id),
        ).fetchone()
        return _row(row) if row else None

    def _select_target(
        self, cur: sqlite3.Cursor, namespace: str, user_id: str, thread_id: str | None
    ) -> UserSession | None:
        """The user's ``thread_id`` session, or their current one when it is ``None``."""
        if thread_id is None:
            return self._select_current(cur, namespace, user_id)
        return self._select_owned(cur, namespace, user_id, thread_id)

    def _insert(
        self,
        cur: sqlite3.Cursor,
        namespace: str,
        user_id: str,
        title: str,
        metadata: dict[str, Any],
        thread_id: str,
        *,
        is_active: bool = True,
        created_at: datetime | None = None,
        updated_at: datetime | None = None,
        parent_thread_id: str | None = None,
    ) -> UserSession:
        now = _now()
        row = cur.execute(
            f"INSERT INTO {self._t} (namespace, user_id, thread_id, title, metadata, created_at,"
            " updated_at, is_active, last_activity_at, parent_thread_id)"
            f" VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING {_COLUMNS}",
            (
                namespace,
                user_id,
                thread_id,
                title,
                _json(metadata),
                _ts(created_at) if created_at else now,
                _ts(updated_at) if updated_at else now,
                int(is_active),
                now,
                parent_thread_id,
            ),
        ).fetchone()
        return _row(row)

    def _set(self, cur: sqlite3.Cursor, session: UserSession, **changes: Any) -> UserSession:
        """Apply ``changes`` (column names from the code, values as parameters) and touch the
        row: ``updated_at`` moves forward, ``last_activity_at`` is now."""
        assignments = [f"{name} = ?" for name in changes]
        assignments += ["updated_at = ?", "last_activity_at = ?"]
        values = [_value(k, v) for k, v in changes.items()]
        row = cur.execute(
            f"UPDATE {self._t} SET {', '.join(assignments)} WHERE id = ? RETURNING {_COLUMNS}",
            (*values, _ts(utcnow_after(session.updated_at)), _now(), session.id),
        ).fetchone()
        return _row(row)

    def _subtrees(self) -> str:
        """``WITH RECURSIVE tree(id, thread_id)``: the rows whose ids are in the JSON array
        parameter, and all their descendants (children are always the same user's)."""
        return (
            f"WITH RECURSIVE tree(id, thread_id) AS (SELECT id, thread_id FROM {self._t}"
            " WHERE id IN (SELECT value FROM json_each(?))"
            f" UNION SELECT c.id, c.thread_id FROM {self._t} c"
            " JOIN tree ON c.parent_thread_id = tree.thread_id) "
        )

    def _tree(self, root: str) -> str:
        """``WITH RECURSIVE tree(id, thread_id)``: the user's rows matching ``root`` and all
        their descendants. Parameters: the root's, namespace, user_id, namespace, user_id."""
        return (
            f"WITH RECURSIVE tree(id, thread_id) AS (SELECT id, thread_id FROM {self._t}"
            f" WHERE {root} AND namespace = ? AND user_id = ?"
            f" UNION SELECT c.id, c.thread_id FROM {self._t} c"
            " JOIN tree ON c.parent_thread_id = tree.thread_id"
            " WHERE c.namespace = ? AND c.user_id = ?) "
        )

    def _enforce_limits(self, cur: sqlite3.Cursor, namespace: str, user_id: str) -> None:
        """Raise SessionLimitError (or purge) before a creation, in its transaction: the
        ``BEGIN IMMEDIATE`` write lock already serializes creators."""
        limits = self._limits
        if limits.max_sessions_per_user is not None:
            (count,) = cur.execute(
                f"SELECT count(*) FROM {self._t} WHERE namespace = ? AND user_id = ?",
                (namespace, user_id),
            ).fetchone()
            excess = count - limits.max_sessions_per_user + 1
            if excess > 0 and limits.on_user_limit == "purge":
                oldest = cur.execute(
                    f"SELECT id FROM {self._t} WHERE namespace = ? AND user_id = ?"
                    f" AND status IN {_ENDED_SQL} ORDER BY id LIMIT ?",
                    (namespace, user_id, excess),
                ).fetchall()
                # With their descendants, as delete_session does: no orphaned children.
                purged = cur.execute(
                    self._subtrees()
                    + f"DELETE FROM {self._t} WHERE id IN (SELECT id FROM tree) RETURNING id",
                    (json.dumps([r["id"] for r in oldest]),),
                ).fetchall()
                excess -= len(purged)
            if excess > 0:
                raise SessionLimitError(
                    f"user {user_id!r} has reached max_sessions_per_user="
                    f"{limits.max_sessions_per_user}"
                )
        if limits.max_active_sessions is not None:
            (open_sessions,) = cur.execute(
                f"SELECT coalesce(sum(open_sessions), 0) FROM {self._stats} WHERE namespace = ?",
                (namespace,),
            ).fetchone()
            if open_sessions >= limits.max_active_sessions:
                raise SessionLimitError(
                    f"namespace {namespace!r} has reached max_active_sessions="
                    f"{limits.max_active_sessions}"
                )

    def get_current(self, namespace: str, user_id: str) -> UserSession | None:
        with self._cursor() as cur:
            return self._select_current(cur, namespace, user_id)

    def get_or_create(
        self, namespace: str, user_id: str, title: str, metadata: dict[str, Any], thread_id: str
    ) -> tuple[UserSession, bool]:
        current = self.get_current(namespace, user_id)
        if current is not None:
            return current, False
        with self._cursor(write=True) as cur:
            # Another process may have won the race; under BEGIN IMMEDIATE its row is visible.
            current = self._select_current(cur, namespace, user_id)
            if current is not None:
                return current, False
            self._enforce_limits(cur, namespace, user_id)
            return self._insert(cur, namespace, user_id, title, metadata, thread_id), True

    def create(
        self, namespace: str, user_id: str, title: str, metadata: dict[str, Any], thread_id: str
    ) -> UserSession:
        with self._cursor(write=True) as cur:
            self._enforce_limits(cur, namespace, user_id)
            previous = self._select_current(cur, namespace, user_id)
            if previous is not None:
                self._set(cur, previous, is_active=False)
            return self._insert(cur, namespace, user_id, title, metadata, thread_id)

    def get(self, namespace: str, user_id: str, thread_id: str) -> UserSession | None:
        with self._cursor() as cur:
            return self._select_owned(cur, namespace, user_id, thread_id)

    def update(
        self, namespace: str, user_id: str, thread_id: str | None, fields: dict[str, Any]
    ) -> UserSession | None:
        with self._cursor(write=True) as cur:
            session = self._select_target(cur, namespace, user_id, thread_id)
            return None if session is None else self._set(cur, session, **fields)

    def deactivate(self, namespace: str, user_id: str) -> UserSession | None:
        with self._cursor(write=True) as cur:
            session = self._select_current(cur, namespace, user_id)
            return None if session is None else self._set(cur, session, is_active=False)

    def switch(self, namespace: str, user_id: str, thread_id: str) -> UserSession | None:
        with self._cursor(write=True) as cur:
            target = self._select_owned(cur, namespace, user_id, thread_id)
            if target is None or target.is_active:
                return target
            check_can_be_current(target.status, target.parent_thread_id, thread_id)
            previous = self._select_current(cur, namespace, user_id)
            if previous is not None:
                self._set(cur, previous, is_active=False)
            return self._set(cur, target, is_active=True)

    def delete(self, namespace: str, user_id: str, thread_id: str) -> list[str]:
        with self._cursor(write=True) as cur:
            rows = cur.execute(
                self._tree("thread_id = ?")
                + f"DELETE FROM {self._t} WHERE id IN (SELECT id FROM tree) RETURNING thread_id",
                (thread_id, namespace, user_id, namespace, user_id),
            ).fetchall()
        # The session's own thread first.
        return sorted((r["thread_id"] for r in rows), key=lambda t: t != thread_id)

    def list_active(self, namespace: str, limit: int, before_id: int | None) -> list[UserSession]:
        return self._page("namespace = ? AND is_active", (namespace,), limit, before_id)

    def list_user(
        self, namespace: str, user_id: str, limit: int, before_id: int | None
    ) -> list[UserSession]:
        return self._page("namespace = ? AND user_id = ?", (namespace, user_id), limit, before_id)

    def list_sessions(
        self,
        namespace: str,
        user_id: str | None,
        status: str | None,
        limit: int,
        before_id: int | None,
    ) -> list[UserSession]:
        where, params = "namespace = ?", [namespace]
        if user_id is not None:
            where, params = f"{where} AND user_id = ?", [*params, user_id]
        if status is not None:
            where, params = f"{where} AND status = ?", [*params, status]
        return self._page(where, tuple(params), limit, before_id)

    def count_idle(self, namespace: str, idle_before: datetime) -> int:
        with self._cursor() as cur:
            row = cur.execute(
                f"SELECT count(*) FROM {self._t} WHERE namespace = ?"
                f" AND status IN {_OPEN_SQL} AND last_activity_at < ?",
                (namespace, _ts(idle_before)),
            ).fetchone()
        return int(row[0])

    def schema_versions(self) -> list[int]:
        with self._cursor() as cur:
            if not cur.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'bssagent_migrations'"
            ).fetchone():
                return []
            rows = cur.execute(
                "SELECT version FROM bssagent_migrations WHERE target = ? ORDER BY version",
                (self._table,),
            ).fetchall()
        return [int(r[0]) for r in rows]

    def _page(
        self, where: str, params: tuple[Any, ...], limit: int, before_id: int | None
    ) -> list[UserSession]:
        if before_id is not None:
            where, params = f"{where} AND id < ?", (*params, before_id)
        with self._cursor() as cur:
            rows = cur.execute(
                f"SELECT {_COLUMNS} FROM {self._t} WHERE {where} ORDER BY id DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
        return [_row(r) for r in rows]

    def adopt(self, session: UserSession) -> UserSession:
        with self._cursor(write=True) as cur:
            if cur.execute(
                f"SELECT 1 FROM {self._tombstones} WHERE thread_id = ?", (session.thread_id,)
            ).fetchone():
                return session  # deleted meanwhile: a stale copy must not bring it back
            row = cur.execute(
                f"SELECT {_COLUMNS} FROM {self._t} WHERE thread_id = ?", (session.thread_id,)
            ).fetchone()
            stored = _row(row) if row else None
            current = self._select_current(cur, session.namespace, session.user_id)
            plan = plan_adoption(session, stored, current)
            if stored is not None and plan.action == "keep":
                return stored
            # Column names come from ADOPTED_FIELDS (code), values are parameters.
            names = list(plan.fields)
            values = [_value(name, value) for name, value in plan.fields.items()]
            if stored is not None:
                assignments = ", ".join(f"{name} = ?" for name in names)
                row = cur.execute(
                    f"UPDATE {self._t} SET {assignments} WHERE id = ? RETURNING {_COLUMNS}",
                    (*values, stored.id),
                ).fetchone()
            else:
                columns = ["namespace", "user_id", "thread_id", "created_at", *names]
                row = cur.execute(
                    f"INSERT INTO {self._t} ({', '.join(columns)})"
                    f" VALUES ({', '.join('?' * len(columns))}) RETURNING {_COLUMNS}",
                    (
                        session.namespace,
                        session.user_id,
                        session.thread_id,
                        _ts(session.created_at),
                        *values,
                    ),
                ).fetchone()
            return _row(row)

    # -- lifecycle --------------------------------------------------------------------------

    def transition(
        self, namespace: str, user_id: str, thread_id: str | None, target: Status, cascade: bool
    ) -> UserSession | None:
        with self._cursor(write=True) as cur:
            session = self._select_target(cur, namespace, user_id, thread_id)
            if session is None:
                return None
            check_transition(session.status, target, session.thread_id)
            if target not in ENDED:
                return self._set(cur, session, status=target)
            updated = self._set(
                cur, session, status=target, is_active=False, ended_at=utcnow_after()
            )
            if cascade:
                self._end_descendants(cur, namespace, user_id, session.thread_id, target)
            return updated

    def _end_descendants(
        self, cur: sqlite3.Cursor, namespace: str, user_id: str, thread_id: str, target: Status
    ) -> None:
        rows = cur.execute(
            self._tree("parent_thread_id = ?") + f"SELECT id, updated_at FROM {self._t}"
            f" WHERE id IN (SELECT id FROM tree) AND status IN {_OPEN_SQL}",
            (thread_id, namespace, user_id, namespace, user_id),
        ).fetchall()
        if not rows:
            return
        now = _now()
        updated = utcnow_after(max(datetime.fromisoformat(r["updated_at"]) for r in rows))
        cur.execute(
            f"UPDATE {self._t} SET status = ?, is_active = 0, ended_at = ?, updated_at = ?,"
            " last_activity_at = ? WHERE id IN (SELECT value FROM json_each(?))",
            (target, now, _ts(updated), now, json.dumps([r["id"] for r in rows])),
        )

    def record_request(
        self,
        namespace: str,
        user_id: str,
        thread_id: str | None,
        processing_time: float,
        error: bool,
    ) -> UserSession | None:
        params: tuple[str, ...]
        if thread_id is None:
            where, params = "namespace = ? AND user_id = ? AND is_active", (namespace, user_id)
        else:
            where = "thread_id = ? AND namespace = ? AND user_id = ?"
            params = (thread_id, namespace, user_id)
        with self._cursor(write=True) as cur:
            row = cur.execute(
                f"UPDATE {self._t} SET request_count = request_count + 1,"
                " error_count = error_count + ?,"
                " total_processing_time = total_processing_time + ?, last_activity_at = ?"
                f" WHERE {where} RETURNING {_COLUMNS}",
                (int(error), processing_time, _now(), *params),
            ).fetchone()
        return _row(row) if row else None

    def expire_idle(self, namespace: str, idle_before: datetime, batch: int) -> list[str]:
        with self._cursor(write=True) as cur:
            rows = cur.execute(
                f"SELECT id, updated_at FROM {self._t} WHERE namespace = ?"
                f" AND status IN {_OPEN_SQL} AND last_activity_at < ?"
                " ORDER BY last_activity_at, id LIMIT ?",
                (namespace, _ts(idle_before), batch),
            ).fetchall()
            if not rows:
                return []
            updated = utcnow_after(max(datetime.fromisoformat(r["updated_at"]) for r in rows))
            # The idle sessions and their open descendants: children end with the parent.
            expired = cur.execute(
                self._subtrees()
                + f"UPDATE {self._t} SET status = 'expired', is_active = 0, ended_at = ?,"
                f" updated_at = ? WHERE id IN (SELECT id FROM tree) AND status IN {_OPEN_SQL}"
                " RETURNING user_id",
                (json.dumps([r["id"] for r in rows]), _now(), _ts(updated)),
            ).fetchall()
        return [r["user_id"] for r in expired]

    def stats(self, namespace: str) -> SessionStats:
        with self._cursor() as cur:
            row = cur.execute(
                "SELECT coalesce(sum(sessions), 0) AS sessions,"
                " coalesce(sum(open_sessions), 0) AS open_sessions,"
                " coalesce(sum(current_sessions), 0) AS users,"
                " coalesce(sum(requests), 0) AS requests, coalesce(sum(errors), 0) AS errors,"
                " coalesce(sum(processing_time), 0) AS total_processing_time"
                f" FROM {self._stats} WHERE namespace = ?",
                (namespace,),
            ).fetchone()
        return SessionStats.model_validate(dict(row))

    def user_stats(self, namespace: str, user_id: str) -> SessionStats:
        with self._cursor() as cur:
            row = cur.execute(
                "SELECT count(*) AS sessions,"
                f" coalesce(sum(status IN {_OPEN_SQL}), 0) AS open_sessions,"
                " coalesce(sum(is_active), 0) AS users,"
                " coalesce(sum(request_count), 0) AS requests,"
                " coalesce(sum(error_count), 0) AS errors,"
                " coalesce(sum(total_processing_time), 0) AS total_processing_time"
                f" FROM {self._t} WHERE namespace = ? AND user_id = ?",
                (namespace, user_id),
            ).fetchone()
        return SessionStats.model_validate(dict(row))

    def create_child(
        self,
        namespace: str,
        user_id: str,
        parent_thread_id: str,
        title: str,
        metadata: dict[str, Any],
        thread_id: str,
    ) -> UserSession | None:
        with self._cursor(write=True) as cur:
            if self._select_owned(cur, namespace, user_id, parent_thread_id) is None:
                return None
            self._enforce_limits(cur, namespace, user_id)
            return self._insert(
                cur,
                namespace,
                user_id,
                title,
                metadata,
                thread_id,
                is_active=False,
                parent_thread_id=parent_thread_id,
            )

    def list_children(
        self, namespace: str, user_id: str, parent_thread_id: str, limit: int, before_id: int | None
    ) -> list[UserSession]:
        return self._page(
            "parent_thread_id = ? AND namespace = ? AND user_id = ?",
            (parent_thread_id, namespace, user_id),
            limit,
            before_id,
        )

    def events(
        self, namespace: str, user_id: str, thread_id: str | None, limit: int, after_seq: int | None
    ) -> list[SessionEvent]:
        params: tuple[str, ...] = (namespace, user_id)
        where = "namespace = ? AND user_id = ?"
        if thread_id is not None:
            where, params = f"{where} AND thread_id = ?", (*params, thread_id)
        with self._cursor() as cur:
            rows = cur.execute(
                f"SELECT {_EVENT_COLUMNS} FROM {self._events} WHERE {where} AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (*params, after_seq or 0, limit),
            ).fetchall()
        return [_event(r) for r in rows]

    def delete_user(self, namespace: str, user_id: str) -> list[str]:
        with self._cursor(write=True) as cur:
            rows = cur.execute(
                f"DELETE FROM {self._t} WHERE namespace = ? AND user_id = ? RETURNING thread_id",
                (namespace, user_id),
            ).fetchall()
            # After the sessions: their "deleted" events go too.
            cur.execute(
                f"DELETE FROM {self._events} WHERE namespace = ? AND user_id = ?",
                (namespace, user_id),
            )
        return [r["thread_id"] for r in rows]

    def is_deleted(self, thread_id: str) -> bool:
        with self._cursor() as cur:
            row = cur.execute(
                f"SELECT 1 FROM {self._tombstones} WHERE thread_id = ?", (thread_id,)
            ).fetchone()
        return row is not None

    def owner(self, namespace: str, thread_id: str) -> str | None:
        with self._cursor() as cur:
            row = cur.execute(
                f"SELECT user_id FROM {self._t} WHERE thread_id = ? AND namespace = ?",
                (thread_id, namespace),
            ).fetchone()
        return None if row is None else str(row[0])

    def unswept(self, limit: int) -> list[str]:
        with self._cursor() as cur:
            rows = cur.execute(
                f"SELECT thread_id FROM {self._tombstones} WHERE swept_at IS NULL"
                " ORDER BY deleted_at, rowid LIMIT ?",
                (limit,),
            ).fetchall()
        return [r["thread_id"] for r in rows]

    def mark_swept(self, thread_ids: list[str]) -> None:
        if not thread_ids:
            return
        with self._cursor(write=True) as cur:
            cur.execute(
                f"UPDATE {self._tombstones} SET swept_at = ?"
                " WHERE thread_id IN (SELECT value FROM json_each(?))",
                (_now(), json.dumps(thread_ids)),
            )

    def retention_due(self, namespace: str, ended_before: datetime, limit: int) -> list[str]:
        with self._cursor() as cur:
            rows = cur.execute(
                f"SELECT thread_id FROM {self._t} WHERE namespace = ? AND ended_at IS NOT NULL"
                " AND retained_at IS NULL AND ended_at < ? ORDER BY ended_at LIMIT ?",
                (namespace, _ts(ended_before), limit),
            ).fetchall()
        return [r["thread_id"] for r in rows]

    def mark_retained(self, thread_ids: list[str]) -> None:
        if not thread_ids:
            return
        with self._cursor(write=True) as cur:
            cur.execute(
                f"UPDATE {self._t} SET retained_at = ?"
                " WHERE thread_id IN (SELECT value FROM json_each(?))",
                (_now(), json.dumps(thread_ids)),
            )


@contextmanager
def _wrapped() -> Iterator[None]:
    """Translate sqlite3 errors into the bssagent error tree."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        message = str(exc).lower()
        if any(marker in message for marker in _UNAVAILABLE):
            raise StorageUnavailableError(f"sqlite: {exc}") from exc
        raise StorageError(f"sqlite: {exc}") from exc
    except sqlite3.Error as exc:
        raise StorageError(f"sqlite: {exc}") from exc
