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
from datetime import datetime
from pathlib import Path
from typing import Any

from ...errors import MigrationError, StorageError, StorageUnavailableError
from .. import migrations
from ..model import UserSession
from .adoption import plan_adoption
from .memory import utcnow_after

_COLUMNS = "id, namespace, user_id, thread_id, title, metadata, created_at, updated_at, is_active"
# sqlite3 reports "cannot reach the file" as OperationalError with one of these messages.
# "database is locked" is contention, not an outage: it must never trigger the fallback.
_UNAVAILABLE = ("unable to open", "disk i/o error", "readonly database")


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


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
    )


class SqliteStore:
    """Sessions in a SQLite file. Satisfies :class:`~.base.SessionStore`.

    Args:
        path: The database file; its folder is created if missing.
        table: The (validated) session table name.
        busy_timeout: Seconds to wait for another process's write lock.
    """

    backend = "sqlite"

    def __init__(self, path: Path, table: str, busy_timeout: float = 10.0) -> None:
        self._path = path
        self._table = table
        self._t = _quote(table)
        self._busy_timeout = busy_timeout
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
            rendered = migrations.render(migration.sql, self._table, _quote)
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

    def _insert(
        self,
        cur: sqlite3.Cursor,
        namespace: str,
        user_id: str,
        title: str,
        metadata: dict[str, Any],
        thread_id: str,
        *,
        on_conflict: str = "",
        is_active: bool = True,
        created_at: datetime | None = None,
        updated_at: datetime | None = None,
    ) -> UserSession | None:
        now = utcnow_after().isoformat()
        row = cur.execute(
            f"INSERT INTO {self._t} "
            "(namespace, user_id, thread_id, title, metadata, created_at, updated_at, is_active) "
            f"VALUES (?, ?, ?, ?, ?, ?, ?, ?) {on_conflict} RETURNING {_COLUMNS}",
            (
                namespace,
                user_id,
                thread_id,
                title,
                json.dumps(metadata),
                created_at.isoformat() if created_at else now,
                updated_at.isoformat() if updated_at else now,
                int(is_active),
            ),
        ).fetchone()
        return _row(row) if row else None

    def _set(self, cur: sqlite3.Cursor, session: UserSession, **changes: Any) -> UserSession:
        assignments = ", ".join(f"{name} = ?" for name in changes)
        values = [json.dumps(v) if k == "metadata" else v for k, v in changes.items()]
        row = cur.execute(
            f"UPDATE {self._t} SET {assignments}, updated_at = ? WHERE id = ? RETURNING {_COLUMNS}",
            (*values, utcnow_after(session.updated_at).isoformat(), session.id),
        ).fetchone()
        return _row(row)

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
            created = self._insert(
                cur,
                namespace,
                user_id,
                title,
                metadata,
                thread_id,
                on_conflict="ON CONFLICT (namespace, user_id) WHERE is_active DO NOTHING",
            )
            if created is not None:
                return created, True
            # Another process won the race; under BEGIN IMMEDIATE its row is visible.
            current = self._select_current(cur, namespace, user_id)
            assert current is not None
            return current, False

    def create(
        self, namespace: str, user_id: str, title: str, metadata: dict[str, Any], thread_id: str
    ) -> UserSession:
        with self._cursor(write=True) as cur:
            previous = self._select_current(cur, namespace, user_id)
            if previous is not None:
                self._set(cur, previous, is_active=0)
            created = self._insert(cur, namespace, user_id, title, metadata, thread_id)
            assert created is not None
            return created

    def get(self, namespace: str, user_id: str, thread_id: str) -> UserSession | None:
        with self._cursor() as cur:
            return self._select_owned(cur, namespace, user_id, thread_id)

    def update(
        self, namespace: str, user_id: str, thread_id: str | None, fields: dict[str, Any]
    ) -> UserSession | None:
        with self._cursor(write=True) as cur:
            session = (
                self._select_current(cur, namespace, user_id)
                if thread_id is None
                else self._select_owned(cur, namespace, user_id, thread_id)
            )
            return None if session is None else self._set(cur, session, **fields)

    def deactivate(self, namespace: str, user_id: str) -> UserSession | None:
        with self._cursor(write=True) as cur:
            session = self._select_current(cur, namespace, user_id)
            return None if session is None else self._set(cur, session, is_active=0)

    def switch(self, namespace: str, user_id: str, thread_id: str) -> UserSession | None:
        with self._cursor(write=True) as cur:
            target = self._select_owned(cur, namespace, user_id, thread_id)
            if target is None or target.is_active:
                return target
            previous = self._select_current(cur, namespace, user_id)
            if previous is not None:
                self._set(cur, previous, is_active=0)
            return self._set(cur, target, is_active=1)

    def delete(self, namespace: str, user_id: str, thread_id: str) -> bool:
        with self._cursor(write=True) as cur:
            cur.execute(
                f"DELETE FROM {self._t} WHERE thread_id = ? AND namespace = ? AND user_id = ?",
                (thread_id, namespace, user_id),
            )
            return cur.rowcount > 0

    def list_active(self, namespace: str, limit: int, before_id: int | None) -> list[UserSession]:
        return self._page("namespace = ? AND is_active", (namespace,), limit, before_id)

    def list_user(
        self, namespace: str, user_id: str, limit: int, before_id: int | None
    ) -> list[UserSession]:
        return self._page("namespace = ? AND user_id = ?", (namespace, user_id), limit, before_id)

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
            row = cur.execute(
                f"SELECT {_COLUMNS} FROM {self._t} WHERE thread_id = ?", (session.thread_id,)
            ).fetchone()
            stored = _row(row) if row else None
            current = self._select_current(cur, session.namespace, session.user_id)
            plan = plan_adoption(session, stored, current)
            if stored is not None and plan.action == "keep":
                return stored
            if stored is not None:
                row = cur.execute(
                    f"UPDATE {self._t} SET title = ?, metadata = ?, is_active = ?, updated_at = ?"
                    f" WHERE id = ? RETURNING {_COLUMNS}",
                    (
                        session.title,
                        json.dumps(plan.metadata),
                        int(plan.is_active),
                        session.updated_at.isoformat(),
                        stored.id,
                    ),
                ).fetchone()
                return _row(row)
            adopted = self._insert(
                cur,
                session.namespace,
                session.user_id,
                session.title,
                plan.metadata,
                session.thread_id,
                is_active=plan.is_active,
                created_at=session.created_at,
                updated_at=session.updated_at,
            )
            assert adopted is not None
            return adopted


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
