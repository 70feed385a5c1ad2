"""Pure parts of the PostgreSQL backend shared by its async source and sync twin:
the queries (composed once with :mod:`psycopg.sql`), error translation, connection options.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg_pool
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from ...errors import StorageError, StorageUnavailableError
from ..model import SessionEvent, SessionStats, UserSession
from .adoption import ADOPTED_FIELDS

# pg_try_advisory_lock key for schema set-up: b"bssagent" as a signed 64-bit integer.
MIGRATION_LOCK_KEY = int.from_bytes(b"bssagent", "big", signed=True)
COLUMNS = (
    "id", "namespace", "user_id", "thread_id", "title", "metadata",
    "created_at", "updated_at", "is_active", "status", "request_count", "error_count",
    "total_processing_time", "last_activity_at", "ended_at", "parent_thread_id",
)  # fmt: skip
ADOPT_INSERT = ("namespace", "user_id", "thread_id", "created_at", *ADOPTED_FIELDS)
EVENT_COLUMNS = ("seq", "namespace", "user_id", "thread_id", "kind", "payload", "created_at")
# SQLSTATE classes meaning "the server is unreachable or going away", not "your query is bad":
# 08 connection exception, 53300 too many connections, 57P01-57P05 shutdown / cannot connect.
_UNAVAILABLE_STATES = ("08", "53300", "57P0")


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` is a connection-class failure (the only kind that triggers fallback).

    A pool timeout alone is not: the store probes the server to tell a full pool from an
    outage (see ``_connection``).
    """
    if isinstance(exc, psycopg_pool.PoolTimeout | psycopg_pool.TooManyRequests):
        return False
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


def server_options(url: str, origin: str | None = None) -> str:
    """libpq ``options`` for bssagent connections: the caller's own (from the DSN, else
    ``PGOPTIONS``) plus ``jit=off`` unless they set ``jit`` themselves, and the writer's
    ``bssagent.origin`` (a hex id), which change notifications carry so that a process can
    skip its own.

    Every bssagent statement is short. A planner estimate above ``jit_above_cost`` (easy with
    a recursive CTE on a big table) makes PostgreSQL spend ~15 ms compiling a query that runs
    in 0.4 ms: measured on the expiry probe, 10 ms instead of 0.5 ms.
    """
    given = str(conninfo_to_dict(url).get("options") or os.environ.get("PGOPTIONS", ""))
    options = given if "jit" in given else f"{given} -c jit=off".strip()
    return options if origin is None else f"{options} -c bssagent.origin={origin}"


def network_options(url: str) -> dict[str, Any]:
    """TCP keepalives and ``tcp_user_timeout`` for bssagent connections, unless the DSN sets
    its own: a connection to a server that vanished (a cut network, a powered-off host)
    then fails within seconds instead of hanging until the kernel gives up (minutes).
    A call abandoned at its deadline (see ``sessions/deadline.py``) ends the same way."""
    given = conninfo_to_dict(url)
    defaults = {
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": 10_000,  # ms of unacknowledged data
    }
    return {k: v for k, v in defaults.items() if k not in given}


def to_session(row: dict[str, Any]) -> UserSession:
    return UserSession.model_validate(row)


def to_event(row: dict[str, Any]) -> SessionEvent:
    return SessionEvent.model_validate(row)


def to_stats(row: dict[str, Any] | None) -> SessionStats:
    return SessionStats.model_validate(row or {})


def jsonb(value: dict[str, Any] | None) -> Jsonb | None:
    return None if value is None else Jsonb(value)


@dataclass(frozen=True)
class Queries:
    """Every statement of the backend, for one table."""

    current: sql.Composed
    owned: sql.Composed
    by_thread: sql.Composed
    owner: sql.Composed
    # (by user, by status, before an id) -> the page query
    sessions_page: dict[tuple[bool, bool, bool], sql.Composed]
    count_idle: sql.Composed
    schema_versions: sql.Composed
    insert_if_no_current: sql.Composed
    insert: sql.Composed
    insert_full: sql.Composed
    overwrite: sql.Composed
    lock_user: sql.SQL
    deactivate_current: sql.Composed
    activate: sql.Composed
    update_current: sql.Composed
    update_owned: sql.Composed
    list_active: sql.Composed
    list_active_before: sql.Composed
    list_user: sql.Composed
    list_user_before: sql.Composed
    # lifecycle (migration 0002)
    owned_for_update: sql.Composed
    current_for_update: sql.Composed
    set_status: sql.Composed
    end_descendants: sql.Composed
    record_owned: sql.Composed
    record_current: sql.Composed
    expire_idle: sql.Composed
    stats: sql.Composed
    user_stats: sql.Composed
    insert_child: sql.Composed
    list_children: sql.Composed
    list_children_before: sql.Composed
    delete_tree: sql.Composed
    delete_user: sql.Composed
    delete_user_events: sql.Composed
    events: sql.Composed
    is_deleted: sql.Composed
    unswept: sql.Composed
    mark_swept: sql.Composed
    retention_due: sql.Composed
    mark_retained: sql.Composed
    count_user: sql.Composed
    purge_ended: sql.Composed
    open_in_namespace: sql.Composed


def build_queries(table: str) -> Queries:
    """Compose the statements for ``table`` (validated) with identifiers, never f-strings."""
    t = sql.Identifier(table)
    cols = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
    names = {
        "t": t,
        "cols": cols,
        "stats": sql.Identifier(f"{table}_stats"),
        "events": sql.Identifier(f"{table}_events"),
        "tombstones": sql.Identifier(f"{table}_tombstones"),
        "ecols": sql.SQL(", ").join(map(sql.Identifier, EVENT_COLUMNS)),
    }

    def q(text: str) -> sql.Composed:
        return sql.SQL(text).format(**names)

    # updated_at always moves forward, even when two changes share a transaction timestamp.
    touch = (
        "updated_at = GREATEST(now(), updated_at + interval '1 microsecond'),"
        " last_activity_at = now()"
    )
    owned = " WHERE thread_id = %s AND namespace = %s AND user_id = %s"
    current = " WHERE namespace = %s AND user_id = %s AND is_active"
    record = (
        "UPDATE {t} SET request_count = request_count + 1, error_count = error_count + %s,"
        " total_processing_time = total_processing_time + %s, last_activity_at = now()"
    )
    # A session and all its descendants (children, their children, ...), owned by the user.
    tree = (
        "WITH RECURSIVE tree AS ("
        " SELECT id, thread_id FROM {t}" + owned + " UNION"
        " SELECT c.id, c.thread_id FROM {t} c JOIN tree ON c.parent_thread_id = tree.thread_id)"
    )
    descendants = (
        "WITH RECURSIVE tree AS ("
        " SELECT id, thread_id FROM {t}"
        " WHERE parent_thread_id = %s AND namespace = %s AND user_id = %s UNION"
        " SELECT c.id, c.thread_id FROM {t} c JOIN tree ON c.parent_thread_id = tree.thread_id)"
    )
    page_children = (
        "SELECT {cols} FROM {t} WHERE parent_thread_id = %s AND namespace = %s AND user_id = %s"
    )
    insert_cols = "(namespace, user_id, thread_id, title, metadata)"
    page_active = "SELECT {cols} FROM {t} WHERE namespace = %s AND is_active"
    page_user = "SELECT {cols} FROM {t} WHERE namespace = %s AND user_id = %s"
    page_end = " ORDER BY id DESC LIMIT %s"
    return Queries(
        current=q("SELECT {cols} FROM {t} WHERE namespace = %s AND user_id = %s AND is_active"),
        owned=q("SELECT {cols} FROM {t} WHERE thread_id = %s AND namespace = %s AND user_id = %s"),
        by_thread=q("SELECT {cols} FROM {t} WHERE thread_id = %s"),
        owner=q("SELECT user_id FROM {t} WHERE thread_id = %s AND namespace = %s"),
        sessions_page={
            (by_user, by_status, before): q(
                "SELECT {cols} FROM {t} WHERE namespace = %s"
                + (" AND user_id = %s" if by_user else "")
                + (" AND status = %s" if by_status else "")
                + (" AND id < %s" if before else "")
                + page_end
            )
            for by_user, by_status, before in itertools.product((False, True), repeat=3)
        },
        count_idle=q(
            "SELECT count(*) AS idle FROM {t} WHERE namespace = %s"
            " AND status IN ('active', 'paused') AND last_activity_at < %s"
        ),
        schema_versions=q(
            "SELECT version FROM bssagent_migrations WHERE target = %s ORDER BY version"
        ),
        insert_if_no_current=q(
            "INSERT INTO {t} " + insert_cols + " VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (namespace, user_id) WHERE is_active DO NOTHING RETURNING {cols}"
        ),
        insert=q(
            "INSERT INTO {t} " + insert_cols + " VALUES (%s, %s, %s, %s, %s) RETURNING {cols}"
        ),
        insert_full=sql.SQL("INSERT INTO {t} ({names}) VALUES ({values}) RETURNING {cols}").format(
            t=t,
            cols=cols,
            names=sql.SQL(", ").join(map(sql.Identifier, ADOPT_INSERT)),
            values=sql.SQL(", ").join(map(sql.Placeholder, ADOPT_INSERT)),
        ),
        overwrite=sql.SQL("UPDATE {t} SET {assignments} WHERE id = %(id)s RETURNING {cols}").format(
            t=t,
            cols=cols,
            assignments=sql.SQL(", ").join(
                sql.SQL("{} = {}").format(sql.Identifier(n), sql.Placeholder(n))
                for n in ADOPTED_FIELDS
            ),
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
        list_active=q(page_active + page_end),
        list_active_before=q(page_active + " AND id < %s" + page_end),
        list_user=q(page_user + page_end),
        list_user_before=q(page_user + " AND id < %s" + page_end),
        owned_for_update=q("SELECT {cols} FROM {t}" + owned + " FOR UPDATE"),
        current_for_update=q("SELECT {cols} FROM {t}" + current + " FOR UPDATE"),
        set_status=q(
            "UPDATE {t} SET status = %(status)s,"
            " is_active = is_active AND NOT %(ended)s,"
            " ended_at = CASE WHEN %(ended)s THEN now() ELSE ended_at END, "
            + touch
            + " WHERE id = %(id)s RETURNING {cols}"
        ),
        end_descendants=q(
            descendants
            + " UPDATE {t} SET status = %s, is_active = FALSE, ended_at = now(), "
            + touch
            + " WHERE id IN (SELECT id FROM tree) AND status IN ('active', 'paused')"
        ),
        record_owned=q(record + owned + " RETURNING {cols}"),
        record_current=q(record + current + " RETURNING {cols}"),
        # The idle sessions (skipping rows another cleaner holds) and their open
        # descendants: children end with their parent.
        expire_idle=q(
            "WITH RECURSIVE picked AS (SELECT id, thread_id FROM {t} WHERE namespace = %s"
            " AND status IN ('active', 'paused') AND last_activity_at < %s"
            " ORDER BY last_activity_at LIMIT %s FOR UPDATE SKIP LOCKED),"
            " tree AS (SELECT id, thread_id FROM picked UNION"
            " SELECT c.id, c.thread_id FROM {t} c JOIN tree ON c.parent_thread_id = tree.thread_id)"
            " UPDATE {t} SET status = 'expired', is_active = FALSE, ended_at = now(),"
            " updated_at = GREATEST(now(), updated_at + interval '1 microsecond')"
            " WHERE id IN (SELECT id FROM tree) AND status IN ('active', 'paused')"
            " RETURNING user_id"
        ),
        stats=q(
            "SELECT coalesce(sum(sessions), 0) AS sessions,"
            " coalesce(sum(open_sessions), 0) AS open_sessions,"
            " coalesce(sum(current_sessions), 0) AS users,"
            " coalesce(sum(requests), 0) AS requests, coalesce(sum(errors), 0) AS errors,"
            " coalesce(sum(processing_time), 0) AS total_processing_time"
            " FROM {stats} WHERE namespace = %s"
        ),
        user_stats=q(
            "SELECT count(*) AS sessions,"
            " count(*) FILTER (WHERE status IN ('active', 'paused')) AS open_sessions,"
            " count(*) FILTER (WHERE is_active) AS users,"
            " coalesce(sum(request_count), 0) AS requests,"
            " coalesce(sum(error_count), 0) AS errors,"
            " coalesce(sum(total_processing_time), 0) AS total_processing_time"
            " FROM {t} WHERE namespace = %s AND user_id = %s"
        ),
        insert_child=q(
            "INSERT INTO {t} (namespace, user_id, thread_id, title, metadata, is_active,"
            " parent_thread_id) VALUES (%s, %s, %s, %s, %s, FALSE, %s) RETURNING {cols}"
        ),
        list_children=q(page_children + page_end),
        list_children_before=q(page_children + " AND id < %s" + page_end),
        delete_tree=q(
            tree + " DELETE FROM {t} WHERE id IN (SELECT id FROM tree) RETURNING thread_id"
        ),
        delete_user=q("DELETE FROM {t} WHERE namespace = %s AND user_id = %s RETURNING thread_id"),
        delete_user_events=q("DELETE FROM {events} WHERE namespace = %s AND user_id = %s"),
        events=q(
            "SELECT {ecols} FROM {events} WHERE namespace = %s AND user_id = %s"
            " AND (%s::text IS NULL OR thread_id = %s) AND seq > %s ORDER BY seq LIMIT %s"
        ),
        is_deleted=q("SELECT 1 AS deleted FROM {tombstones} WHERE thread_id = %s"),
        unswept=q(
            "SELECT thread_id FROM {tombstones} WHERE swept_at IS NULL ORDER BY deleted_at LIMIT %s"
        ),
        mark_swept=q("UPDATE {tombstones} SET swept_at = now() WHERE thread_id = ANY(%s)"),
        retention_due=q(
            "SELECT thread_id FROM {t} WHERE namespace = %s AND ended_at IS NOT NULL"
            " AND retained_at IS NULL AND ended_at < %s ORDER BY ended_at LIMIT %s"
        ),
        mark_retained=q("UPDATE {t} SET retained_at = now() WHERE thread_id = ANY(%s)"),
        count_user=q("SELECT count(*) AS n FROM {t} WHERE namespace = %s AND user_id = %s"),
        # The oldest ended sessions with their descendants, as delete_session does.
        purge_ended=q(
            "WITH RECURSIVE picked AS (SELECT id, thread_id FROM {t} WHERE namespace = %s"
            " AND user_id = %s AND status IN ('completed', 'failed', 'expired')"
            " ORDER BY id LIMIT %s),"
            " tree AS (SELECT id, thread_id FROM picked UNION"
            " SELECT c.id, c.thread_id FROM {t} c JOIN tree ON c.parent_thread_id = tree.thread_id)"
            " DELETE FROM {t} WHERE id IN (SELECT id FROM tree) RETURNING thread_id"
        ),
        open_in_namespace=q(
            "SELECT coalesce(sum(open_sessions), 0) AS n FROM {stats} WHERE namespace = %s"
        ),
    )
