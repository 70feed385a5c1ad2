"""Shared fixtures.

PostgreSQL tests read the server from ``BSSAGENT_TEST_DATABASE_URL`` (``tests/run.sh`` sets
it after making sure a server runs). Without it they skip locally, and fail under
``CI=true``: in CI a missing database is an error, never a silent skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import faults
import pytest

PG_URL_ENV = "BSSAGENT_TEST_DATABASE_URL"


def _pg_url() -> str | None:
    return os.environ.get(PG_URL_ENV) or None


@pytest.fixture(scope="session")
def pg_url() -> str:
    """A reachable PostgreSQL URL (skip locally / fail in CI when there is none)."""
    url = _pg_url()
    if url is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {PG_URL_ENV} is not set: PostgreSQL tests must run in CI")
        pytest.skip(f"{PG_URL_ENV} not set (run the suite with `bash tests/run.sh`)")
    import psycopg

    try:
        psycopg.connect(url, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL at {PG_URL_ENV} is unreachable in CI: {exc}")
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    return url


@pytest.fixture
def table_name() -> Iterator[str]:
    """A fresh session-table name; dropped afterwards from PostgreSQL if it was created."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    url = _pg_url()
    if url is not None:
        import psycopg

        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
                for suffix in ("", "_stats", "_events", "_tombstones"):
                    conn.execute(f'DROP TABLE IF EXISTS "{name}{suffix}" CASCADE')
                for suffix in ("insert", "update", "delete"):
                    conn.execute(f'DROP FUNCTION IF EXISTS "{name}_track_{suffix}"()')
                conn.execute(f'DROP FUNCTION IF EXISTS "{name}_notify"()')
                if conn.execute("SELECT to_regclass('bssagent_migrations')").fetchone()[0]:
                    conn.execute("DELETE FROM bssagent_migrations WHERE target = %s", (name,))
        except psycopg.OperationalError:
            pass


@pytest.fixture
def fresh_database(pg_url: str) -> Iterator[str]:
    """A brand-new, empty PostgreSQL database (dropped afterwards); yields its URL."""
    import psycopg

    name = f"bssagent_fresh_{uuid.uuid4().hex[:12]}"
    admin = urlsplit(pg_url)._replace(path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlsplit(pg_url)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


BACKENDS = ["memory", "sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL for each backend: memory, SQLite (temporary file), PostgreSQL."""
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sessions.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def proxy(pg_url: str) -> Iterator[faults.TcpProxy]:
    """A proxy in front of the test server (the tests using it need PostgreSQL)."""
    parts = urlsplit(pg_url)
    p = faults.TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
async def drivers() -> AsyncIterator[list[faults.Driver]]:
    """Drivers made by the test are closed afterwards, even when it fails."""
    made: list[faults.Driver] = []
    yield made
    for d in made:
        await d.close()
