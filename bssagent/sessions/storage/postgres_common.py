"""Pure parts of the PostgreSQL backend shared by its async source and sync twin:
the queries (composed once with :mod:`psycopg.sql`), error translation, connection options.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg_pool
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from ...errors import StorageError, StorageUnavailableError
from ..model import UserSession

# pg_try_advisory_lock key for schema set-up: b"bssagent" as a signed 64-bit integer.
MIGRATION_LOCK_KEY = int.from_bytes(b"bssagent", "big", signed=True)
COLUMNS = (
    "id", "namespace", "user_id", "thread_id", "title", "metadata",
    "created_at", "updated_at", "is_active",
)  # fmt: skip
# SQLSTATE classes meaning "the server is unreachable or going away", not "your query is bad":
# 08 connection exception, 53300 too many connections, 57P01-57P05 shutdown / cannot connect,
# 57014 query cancelled (our own deadline).
_UNAVAILABLE_STATES = ("08", "53300", "57P0", "57014")


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` is a connection-class failure (the only kind that triggers fallback)."""
    if isinstance(exc, psycopg_pool.PoolTimeout | psycopg_pool.TooManyRequests):
        return True
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        state = exc.sqlstate
        # No SQLSTATE: the failure happened client-side (refused, reset, closed, timed out).
        return state is None or state.startswith(_UNAVAILABLE_STATES)
    return False


@contextmanager
def wrap_errors() -> Iterator[None]:
    """Translate psycopg errors into the bssagent error tree, chaining the original."""
    try:
        yield
    except (psycopg.Error, psycopg_pool.PoolTimeout, psycopg_pool.TooManyRequests) as exc:
        kind = type(exc).__name__
        if is_unavailable(exc):
            raise StorageUnavailableError(f"postgres unavailable ({kind})") from exc
        raise StorageError(f"postgres error ({kind}, sqlstate={exc.sqlstate})") from exc


def connection_kwargs(connect_timeout: float, prepare_threshold: int | None) -> dict[str, Any]:
    """Options every bssagent connection needs (the ones LangGraph users must remember)."""
    return {
        "autocommit": True,
        "row_factory": dict_row,
        "prepare_threshold": prepare_threshold,
        # libpq counts whole seconds, and treats values below 2 as 2.
        "connect_timeout": max(2, math.ceil(connect_timeout)),
    }


def to_session(row: dict[str, Any]) -> UserSession:
    return UserSession.model_validate(row)


def jsonb(value: dict[str, Any] | None) -> Jsonb | None:
    return None if value is None else Jsonb(value)


@dataclass(frozen=True)
class Queries:
    """Every statement of the backend, for one table."""

    current: sql.Composed
    owned: sql.Composed
    by_thread: sql.Composed
    insert_if_no_current: sql.Composed
    insert: sql.Composed
    insert_full: sql.Composed
    overwrite: sql.Composed
    lock_user: sql.SQL
    deactivate_current: sql.Composed
    activate: sql.Composed
    update_current: sql.Composed
    update_owned: sql.Composed
    delete: sql.Composed
    list_active: sql.Composed
    list_active_before: sql.Composed
    list_user: sql.Composed
    list_user_before: sql.Composed


def build_queries(table: str) -> Queries:
    """Compose the statements for ``table`` (validated) with identifiers, never f-strings."""
    t = sql.Identifier(table)
    cols = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))

    def q(text: str) -> sql.Composed:
        return sql.SQL(text).format(t=t, cols=cols)

    # updated_at always moves forward, even when two changes share a transaction timestamp.
    touch = "updated_at = GREATEST(now(), updated_at + interval '1 microsecond')"
    insert_cols = "(namespace, user_id, thread_id, title, metadata)"
    page_active = "SELECT {cols} FROM {t} WHERE namespace = %s AND is_active"
    page_user = "SELECT {cols} FROM {t} WHERE namespace = %s AND user_id = %s"
    page_end = " ORDER BY id DESC LIMIT %s"
    return Queries(
        current=q("SELECT {cols} FROM {t} WHERE namespace = %s AND user_id = %s AND is_active"),
        owned=q("SELECT {cols} FROM {t} WHERE thread_id = %s AND namespace = %s AND user_id = %s"),
        by_thread=q("SELECT {cols} FROM {t} WHERE thread_id = %s"),
        insert_if_no_current=q(
            "INSERT INTO {t} " + insert_cols + " VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (namespace, user_id) WHERE is_active DO NOTHING RETURNING {cols}"
        ),
        insert=q(
            "INSERT INTO {t} " + insert_cols + " VALUES (%s, %s, %s, %s, %s) RETURNING {cols}"
        ),
        insert_full=q(
            "INSERT INTO {t} (namespace, user_id, thread_id, title, metadata, created_at,"
            " updated_at, is_active) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING {cols}"
        ),
        overwrite=q(
            "UPDATE {t} SET title = %s, metadata = %s, is_active = %s, updated_at = %s"
            " WHERE id = %s RETURNING {cols}"
        ),
        # Serializes create/switch per user; transaction-scoped, so it works behind poolers.
        lock_user=sql.SQL("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"),
        deactivate_current=q(
            "UPDATE {t} SET is_active = FALSE, "
            + touch
            + " WHERE namespace = %s AND user_id = %s AND is_active RETURNING {cols}"
        ),
        activate=q("UPDATE {t} SET is_active = TRUE, " + touch + " WHERE id = %s RETURNING {cols}"),
        update_current=q(
            "UPDATE {t} SET title = COALESCE(%s, title), metadata = COALESCE(%s, metadata), "
            + touch
            + " WHERE namespace = %s AND user_id = %s AND is_active RETURNING {cols}"
        ),
        update_owned=q(
            "UPDATE {t} SET title = COALESCE(%s, title), metadata = COALESCE(%s, metadata), "
            + touch
            + " WHERE thread_id = %s AND namespace = %s AND user_id = %s RETURNING {cols}"
        ),
        delete=q(
            "DELETE FROM {t} WHERE thread_id = %s AND namespace = %s AND user_id = %s RETURNING id"
        ),
        list_active=q(page_active + page_end),
        list_active_before=q(page_active + " AND id < %s" + page_end),
        list_user=q(page_user + page_end),
        list_user_before=q(page_user + " AND id < %s" + page_end),
    )
