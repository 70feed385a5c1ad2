"""Schema migrations: the SQL files, the ledger, custom table names, packaging, tooling."""

from __future__ import annotations

import multiprocessing as mp
import queue
import shutil
import sqlite3
import subprocess
import sys
import traceback
import uuid
import zipfile
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bssagent import AgentSessionManager, AsyncAgentSessionManager, ConfigurationError
from bssagent.sessions import migrations as mig
from bssagent.sessions.storage.postgres_sync import PostgresStore

REPO = Path(__file__).resolve().parents[1]
LIFECYCLE_SUFFIXES = ("_idle_idx", "_retention_idx", "_parent_idx")
SUFFIXES = (
    "_pkey", "_thread_id_key", "_one_active_idx", "_user_idx", "_active_idx", *LIFECYCLE_SUFFIXES
)  # fmt: skip
SQLITE_SUFFIXES = ("_one_active_idx", "_user_idx", "_active_idx", *LIFECYCLE_SUFFIXES)


def expected_ledger(target: str, dialect: mig.Dialect = "postgresql") -> list[tuple[Any, ...]]:
    return sorted((target, m.version, m.name) for m in mig.migrations(dialect))


def pg_ledger(conn: psycopg.Connection[Any], target: str) -> list[tuple[Any, ...]]:
    return sorted(
        conn.execute(
            "SELECT target, version, name FROM bssagent_migrations WHERE target = %s", (target,)
        ).fetchall()
    )


def pg_indexes(conn: psycopg.Connection[Any], table: str) -> set[str]:
    rows = conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s", (table,))
    return {r[0] for r in rows}


def drop_pg_table(url: str, table: str) -> None:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP TABLE IF EXISTS "{table}"')
        conn.execute("DELETE FROM bssagent_migrations WHERE target = %s", (table,))


# -- custom table names ------------------------------------------------------------------------


@pytest.mark.postgres
def test_custom_table_name_postgres(pg_url: str, table_name: str) -> None:
    with AgentSessionManager(database_url=pg_url, table_name=table_name) as manager:
        session = manager.get_or_create_user_session("alice")
    with psycopg.connect(pg_url, connect_timeout=5) as conn:
        assert conn.execute("SELECT to_regclass(%s)", (f'"{table_name}"',)).fetchone() == (
            table_name,
        )
        assert pg_indexes(conn, table_name) == {table_name + s for s in SUFFIXES}
        constraints = {
            r[0]
            for r in conn.execute(
                "SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass",
                (f'"{table_name}"',),
            )
        }
        stored = conn.execute(f'SELECT thread_id FROM "{table_name}"').fetchall()
        assert pg_ledger(conn, table_name) == expected_ledger(table_name)
    assert f"{table_name}_thread_id_key" in constraints
    assert stored == [(session.thread_id,)]


@pytest.mark.postgres
def test_longest_table_name_keeps_index_names_whole(pg_url: str) -> None:
    name = "t" + uuid.uuid4().hex + "x" * 7  # 40 characters, the maximum
    assert len(name) == 40
    try:
        with AgentSessionManager(database_url=pg_url, table_name=name) as manager:
            manager.get_or_create_user_session("alice")
        with psycopg.connect(pg_url, connect_timeout=5) as conn:
            assert pg_indexes(conn, name) == {name + s for s in SUFFIXES}
    finally:
        drop_pg_table(pg_url, name)


def test_custom_table_name_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    with AgentSessionManager(database_url=f"sqlite:///{db}", table_name="chats") as manager:
        manager.get_or_create_user_session("alice")
    with sqlite3.connect(db) as conn:
        objects = set(conn.execute("SELECT type, name FROM sqlite_master WHERE tbl_name = 'chats'"))
        ledger = sorted(conn.execute("SELECT target, version, name FROM bssagent_migrations"))
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert ("table", "chats") in objects
    assert {("index", "chats" + s) for s in SQLITE_SUFFIXES} <= objects
    assert "user_sessions" not in tables
    assert ledger == expected_ledger("chats", "sqlite")


# -- the ledger ---------------------------------------------------------------------------------


@pytest.mark.postgres
def test_ledger_records_each_migration_once_per_target(pg_url: str, table_name: str) -> None:
    second = table_name + "_b"
    try:
        for table in (table_name, second, table_name):
            with AgentSessionManager(database_url=pg_url, table_name=table) as manager:
                manager.get_or_create_user_session("alice")
        with psycopg.connect(pg_url, connect_timeout=5) as conn:
            assert pg_ledger(conn, table_name) == expected_ledger(table_name)
            assert pg_ledger(conn, second) == expected_ledger(second)
    finally:
        drop_pg_table(pg_url, second)


@pytest.mark.postgres
def test_applying_twice_is_a_no_op_postgres(pg_url: str, table_name: str) -> None:
    store = PostgresStore(pg_url, table_name)
    try:
        store.setup()
        with psycopg.connect(pg_url, autocommit=True, connect_timeout=5) as conn:
            before = conn.execute(
                "SELECT version, applied_at FROM bssagent_migrations WHERE target = %s",
                (table_name,),
            ).fetchall()
            # A probe: if 0001 ran again, IF NOT EXISTS would bring this index back.
            conn.execute(f'DROP INDEX "{table_name}_active_idx"')
        store.setup()
        other = PostgresStore(pg_url, table_name)
        try:
            other.setup()
        finally:
            other.close()
        with AgentSessionManager(database_url=pg_url, table_name=table_name) as manager:
            manager.get_or_create_user_session("alice")
        with psycopg.connect(pg_url, connect_timeout=5) as conn:
            after = conn.execute(
                "SELECT version, applied_at FROM bssagent_migrations WHERE target = %s",
                (table_name,),
            ).fetchall()
            indexes = pg_indexes(conn, table_name)
    finally:
        store.close()
    assert after == before
    assert len(before) == len(mig.migrations("postgresql"))
    assert f"{table_name}_active_idx" not in indexes


def test_applying_twice_is_a_no_op_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    with AgentSessionManager(database_url=url) as manager:
        first = manager.get_or_create_user_session("alice")
    with sqlite3.connect(tmp_path / "s.db") as conn:
        before = conn.execute(
            "SELECT target, version, applied_at FROM bssagent_migrations"
        ).fetchall()
        conn.execute("DROP INDEX user_sessions_active_idx")
    with AgentSessionManager(database_url=url) as manager:
        again = manager.get_or_create_user_session("alice")
    with sqlite3.connect(tmp_path / "s.db") as conn:
        after = conn.execute(
            "SELECT target, version, applied_at FROM bssagent_migrations"
        ).fetchall()
        index = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'user_sessions_active_idx'"
        ).fetchall()
    assert after == before
    assert index == []
    assert again.thread_id == first.thread_id


# -- the SQL file applied by hand ----------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.timeout(60)
def test_psql_applied_file_is_adopted_by_the_library(fresh_database: str) -> None:
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed")
    script = REPO / "sql" / "postgresql" / "0001_user_sessions.sql"
    command = [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", fresh_database, "-f", str(script)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr

    with psycopg.connect(fresh_database, connect_timeout=5) as conn:
        by_hand = pg_indexes(conn, "user_sessions")
        assert conn.execute("SELECT to_regclass('bssagent_migrations')").fetchone() == (None,)
    assert by_hand == {"user_sessions" + s for s in SUFFIXES if s not in LIFECYCLE_SUFFIXES}

    with AgentSessionManager(database_url=fresh_database, cache_size=0) as manager:
        first = manager.get_or_create_user_session("alice")
        assert manager.get_or_create_user_session("alice").thread_id == first.thread_id
        second = manager.create_user_session("alice", title="second")
        assert manager.get_current_user_session("alice").thread_id == second.thread_id
        assert not manager.is_degraded

    # Applying the file by hand again, after the library, is harmless too.
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    with psycopg.connect(fresh_database, connect_timeout=5) as conn:
        assert pg_ledger(conn, "user_sessions") == expected_ledger("user_sessions")
        assert pg_indexes(conn, "user_sessions") == {"user_sessions" + s for s in SUFFIXES}
        rows = conn.execute("SELECT thread_id, is_active FROM user_sessions ORDER BY id").fetchall()
    assert rows == [(first.thread_id, False), (second.thread_id, True)]


# -- packaging ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_wheel_ships_sql_files_and_py_typed(tmp_path: Path) -> None:
    pytest.importorskip("hatchling")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    command += ["--no-cache-dir", "-q", "-w", str(tmp_path), str(REPO)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=100, check=False)
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("bssagent-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "bssagent/py.typed" in names
        for source in sorted((REPO / "sql").rglob("*.sql")):
            packaged = "bssagent/_sql/" + source.relative_to(REPO / "sql").as_posix()
            assert packaged in names
            assert zf.read(packaged) == source.read_bytes()
    assert "bssagent/_sql/postgresql/0001_user_sessions.sql" in names
    assert "bssagent/_sql/sqlite/0001_user_sessions.sql" in names


def test_sql_root_finds_the_checkout_files() -> None:
    root = mig.sql_root()
    assert root == REPO / "sql"
    for dialect in ("postgresql", "sqlite"):
        files = sorted(p for p in (root / dialect).glob("*.sql") if p.name != "ledger.sql")
        loaded = mig.migrations(dialect)
        assert [m.version for m in loaded] == list(range(1, len(files) + 1))
        assert [m.sql for m in loaded] == [p.read_text(encoding="utf-8") for p in files]
        assert mig.ledger_sql(dialect) == (root / dialect / "ledger.sql").read_text("utf-8")


# -- configuration errors --------------------------------------------------------------------------


BAD_NAMES = ["user-sessions", "1abc", 'a"b', "a b", "", "x" * 41, "t; DROP TABLE x", "é"]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("cls", [AgentSessionManager, AsyncAgentSessionManager])
def test_invalid_table_name_fails_before_any_io(name: str, cls: type, tmp_path: Path) -> None:
    folder = tmp_path / "never-created"
    with pytest.raises(ConfigurationError, match="table_name"):
        cls(database_url=f"sqlite:///{folder / 'db.sqlite'}", table_name=name)
    assert not folder.exists(), "nothing may be created for a rejected configuration"
    with pytest.raises(ConfigurationError, match="table_name"):
        cls(database_url="postgresql://postgres:pw@127.0.0.1:1/none", table_name=name)


def test_invalid_table_name_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BSSAGENT_TABLE_NAME", "bad-name")
    with pytest.raises(ConfigurationError, match="table_name"):
        AgentSessionManager(database_url="memory://")


# -- concurrent SQLite set-up -------------------------------------------------------------------


def _sqlite_setup_worker(out: Any, index: int, url: str, barrier: Any) -> None:
    result: dict[str, Any] = {"index": index}
    try:
        manager = AgentSessionManager(database_url=url, cache_size=0)
        barrier.wait(60)
        result["shared"] = manager.get_or_create_user_session("shared").thread_id
        result["own"] = manager.get_or_create_user_session(f"user-{index}").thread_id
        result["degraded"] = manager.is_degraded
        manager.close()
    except BaseException:
        result["error"] = traceback.format_exc()
    out.put(result)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_concurrent_sqlite_setup_on_a_new_file(tmp_path: Path) -> None:
    db = tmp_path / "new" / "sessions.db"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    barrier = ctx.Barrier(4)
    procs = [
        ctx.Process(
            target=_sqlite_setup_worker, args=(out, i, f"sqlite:///{db}", barrier), daemon=True
        )
        for i in range(4)
    ]
    for p in procs:
        p.start()
    try:
        reports = [out.get(timeout=90) for _ in procs]
    except queue.Empty:
        pytest.fail("a worker did not report in time")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    errors = [r["error"] for r in reports if "error" in r]
    assert not errors, errors[0]
    assert not any(r["degraded"] for r in reports), "a process fell back to memory"
    assert len({r["shared"] for r in reports}) == 1
    with sqlite3.connect(db) as conn:
        ledger = sorted(conn.execute("SELECT target, version, name FROM bssagent_migrations"))
        rows = conn.execute("SELECT count(*), sum(is_active) FROM user_sessions").fetchone()
    assert ledger == expected_ledger("user_sessions", "sqlite")
    assert rows == (5, 5)


# -- tooling ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_generated_sync_twins_are_current() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "tools" / "async_to_sync.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr


# -- connection options ------------------------------------------------------------------------


@pytest.mark.postgres
def test_pool_connections_run_without_jit_and_keep_the_dsns_own_options(
    pg_url: str, table_name: str
) -> None:
    # JIT compiling a short statement costs ~15 ms (the expiry probe went 0.5 -> 10 ms).
    sep = "&" if "?" in pg_url else "?"
    custom = f"{pg_url}{sep}options=-c%20application_name%3Dmine"
    for url, app in ((pg_url, None), (custom, "mine")):
        store = PostgresStore(url, table_name)
        try:
            with store._connection() as conn:
                assert conn.execute("SHOW jit").fetchone() == {"jit": "off"}
                if app is not None:
                    row = conn.execute("SHOW application_name").fetchone()
                    assert row == {"application_name": app}
        finally:
            store.close()
    # A DSN that chooses jit itself is obeyed.
    store = PostgresStore(f"{pg_url}{sep}options=-c%20jit%3Don", table_name)
    try:
        with store._connection() as conn:
            assert conn.execute("SHOW jit").fetchone() == {"jit": "on"}
    finally:
        store.close()
