"""The ``bssagent`` admin command, invoked for real against SQLite and real PostgreSQL.

Each test drives :func:`bssagent.cli.main` in-process (its output captured) on a fresh
SQLite file or a fresh PostgreSQL table, checks the exit code (0 / 1 user error / 2
storage error), the printed table or ``--json`` document, and the database afterwards
through a manager. One test runs the installed console script in a subprocess.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from test_lifecycle import drop_postgres_tables

from bssagent import AgentSessionManager, SessionNotFoundError
from bssagent.cli import main
from bssagent.sessions import migrations

pytestmark = pytest.mark.timeout(60)
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/x"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Cli:
    """Runs ``bssagent --database-url URL --table-name T COMMAND ...`` in-process."""

    url: str
    table: str
    capsys: pytest.CaptureFixture[str]
    monkeypatch: pytest.MonkeyPatch

    def __call__(self, *args: str, stdin: str = "") -> Result:
        import io

        self.monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        self.capsys.readouterr()
        code = main(["--database-url", self.url, "--table-name", self.table, *args])
        captured = self.capsys.readouterr()
        return Result(code, captured.out, captured.err)

    def manager(self) -> AgentSessionManager:
        return AgentSessionManager(database_url=self.url, table_name=self.table, cache_size=0)


@pytest.fixture(params=["sqlite", "postgres"])
def cli(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    table_name: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Cli]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'cli.db'}"
    else:
        url = str(request.getfixturevalue("pg_url"))
    try:
        yield Cli(url, table_name, capsys, monkeypatch)
    finally:
        if request.param == "postgres":
            drop_postgres_tables(url, table_name)


def migration_names(url: str) -> list[str]:
    """Every migration of the URL's dialect, as ``db status`` names them."""
    dialect: Any = "postgresql" if url.startswith("postgresql") else "sqlite"
    return [f"{m.version:04d}_{m.name}" for m in migrations.migrations(dialect)]


def seed(cli: Cli) -> dict[str, str]:
    """alice: an ended session and a current one with a child; bob: one session."""
    with cli.manager() as m:
        old = m.get_or_create_user_session("alice", title="old chat")
        m.end_session("alice", old.thread_id)
        current = m.get_or_create_user_session("alice", title="current chat")
        child = m.create_child_session("alice", current.thread_id, title="sub-task")
        bob = m.get_or_create_user_session("bob", title="bob's chat")
        m.record_request("bob", processing_time=0.5)
    return {
        "old": old.thread_id,
        "current": current.thread_id,
        "child": child.thread_id,
        "bob": bob.thread_id,
    }


# -- db ----------------------------------------------------------------------------------------


def test_db_status_migrate_and_sql(cli: Cli) -> None:
    status = cli("db", "status", "--json")
    assert status.code == 0, status.err
    assert status.json()["applied"] == []
    assert status.json()["pending"] == migration_names(cli.url)

    script = cli("db", "sql")
    assert script.code == 0
    assert f'"{cli.table}"' in script.out
    assert "CREATE TABLE IF NOT EXISTS bssagent_migrations" in script.out
    assert f"VALUES ('{cli.table}', 2, 'lifecycle');" in script.out
    # Every statement names the configured table; the default name is left in comments and
    # in the ledger's record of migration 0001's name only.
    statements = [line for line in script.out.splitlines() if not line.lstrip().startswith("--")]
    assert [
        line for line in statements if "user_sessions" in line and "bssagent_migrations" not in line
    ] == []

    # What a DBA would do: run the printed script; the library then finds nothing pending.
    if cli.url.startswith("sqlite"):
        with closing(sqlite3.connect(cli.url.removeprefix("sqlite:///"))) as conn:
            conn.executescript(script.out)
    else:
        with psycopg.connect(cli.url, autocommit=True) as conn:
            conn.execute(script.out.encode())
    after = cli("db", "status", "--json").json()
    assert after == {
        "location": after["location"],
        "applied": migration_names(cli.url),
        "pending": [],
    }
    assert cli("db", "migrate", "--json").json() == {"applied": []}
    assert "-- nothing pending" in cli("db", "sql").out
    assert "0002_lifecycle" in cli("db", "sql", "--all").out
    table = cli("db", "status")
    assert "0001_user_sessions" in table.out
    assert "applied" in table.out


def test_db_migrate_applies_what_is_pending(cli: Cli) -> None:
    migrated = cli("db", "migrate")
    assert migrated.code == 0
    assert "applied: " + ", ".join(migration_names(cli.url)) in migrated.out
    assert cli("db", "status", "--json").json()["pending"] == []
    with cli.manager() as m:  # the schema works
        assert m.get_or_create_user_session("u").user_id == "u"


# -- sessions ----------------------------------------------------------------------------------


def test_sessions_list_with_filters_and_pages(cli: Cli) -> None:
    threads = seed(cli)
    every = cli("sessions", "list", "--json")
    assert every.code == 0
    listed = every.json()
    assert [s["thread_id"] for s in listed] == [
        threads["bob"],
        threads["child"],
        threads["current"],
        threads["old"],
    ]
    alice = cli("sessions", "list", "--user", "alice", "--json").json()
    assert {s["thread_id"] for s in alice} == {threads["old"], threads["current"], threads["child"]}
    ended = cli("sessions", "list", "--status", "completed", "--json").json()
    assert [s["thread_id"] for s in ended] == [threads["old"]]
    mine = cli("sessions", "list", "--user", "alice", "--status", "active", "--json").json()
    assert {s["thread_id"] for s in mine} == {threads["current"], threads["child"]}
    page = cli("sessions", "list", "--limit", "2", "--json").json()
    rest = cli("sessions", "list", "--before-id", str(page[-1]["id"]), "--json").json()
    assert [s["thread_id"] for s in page + rest] == [s["thread_id"] for s in listed]
    table = cli("sessions", "list", "--user", "bob")
    assert threads["bob"] in table.out  # whole: piped output is not folded
    assert "bob's chat" in table.out
    bad = cli("sessions", "list", "--status", "bogus")
    assert bad.code == 1
    assert "status" in bad.err


def test_sessions_show(cli: Cli) -> None:
    threads = seed(cli)
    shown = cli("sessions", "show", threads["current"], "--json")
    assert shown.code == 0
    doc = shown.json()
    assert doc["session"]["user_id"] == "alice"
    assert doc["session"]["title"] == "current chat"
    assert [c["thread_id"] for c in doc["children"]] == [threads["child"]]
    assert [e["kind"] for e in doc["events"]] == ["created"]
    table = cli("sessions", "show", threads["current"])
    assert "current chat" in table.out
    assert "created" in table.out
    assert threads["child"] in table.out


def test_sessions_end_and_delete(cli: Cli) -> None:
    threads = seed(cli)
    ended = cli("sessions", "end", threads["current"], "--status", "failed", "--json")
    assert ended.code == 0
    assert ended.json()["status"] == "failed"
    again = cli("sessions", "end", threads["current"])
    assert again.code == 1
    assert "cannot go from 'failed'" in again.err
    with cli.manager() as m:
        assert m.get_session("alice", threads["child"]).status == "failed"  # cascade

    refused = cli("sessions", "delete", threads["current"], stdin="n\n")
    assert refused.code == 1
    with cli.manager() as m:
        assert m.get_session("alice", threads["current"]).thread_id == threads["current"]
    deleted = cli("sessions", "delete", threads["current"], stdin="y\n", *["--json"])
    assert deleted.code == 0
    assert sorted(deleted.json()["deleted"]) == sorted([threads["current"], threads["child"]])
    with cli.manager() as m, pytest.raises(SessionNotFoundError):
        m.get_session("alice", threads["current"])
    assert cli("sessions", "delete", threads["bob"], "--yes").code == 0


@pytest.mark.parametrize("command", ["show", "end", "delete"])
def test_unknown_or_malformed_threads_are_user_errors(cli: Cli, command: str) -> None:
    seed(cli)
    unknown = cli("sessions", command, str(uuid.uuid4()), "--yes" if command == "delete" else "")
    assert unknown.code == 1
    malformed = cli("sessions", command, "not-a-thread")
    assert malformed.code == 1
    assert "thread_id" in malformed.err


# -- users -------------------------------------------------------------------------------------


def test_users_export_and_erase(cli: Cli, tmp_path: Path) -> None:
    threads = seed(cli)
    exported = cli("users", "export", "alice")
    assert exported.code == 0
    doc = exported.json()
    assert doc["user_id"] == "alice"
    assert {s["thread_id"] for s in doc["sessions"]} == {
        threads["old"],
        threads["current"],
        threads["child"],
    }
    target = tmp_path / "alice.json"
    written = cli("users", "export", "alice", "-o", str(target))
    assert written.code == 0
    assert json.loads(target.read_text())["user_id"] == "alice"

    declined = cli("users", "erase", "alice", stdin="n\n")
    assert declined.code == 1
    with cli.manager() as m:
        assert len(m.list_user_sessions("alice")) == 3
    erased = cli("users", "erase", "alice", "--yes", "--json")
    assert erased.code == 0
    assert erased.json() == {"user_id": "alice", "sessions_deleted": 3}
    confirmed = cli("users", "erase", "bob", stdin="y\n")
    assert confirmed.code == 0
    with cli.manager() as m:
        assert m.list_user_sessions("alice") == []
        assert m.list_user_sessions("bob") == []


# -- cleanup, stats, doctor --------------------------------------------------------------------


def make_idle(cli: Cli, thread_ids: list[str], hours: float) -> None:
    """Backdate sessions' last activity (what hours of silence would do)."""
    when = datetime.now(timezone.utc) - timedelta(hours=hours)
    if cli.url.startswith("sqlite"):
        stamp = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        with closing(sqlite3.connect(cli.url.removeprefix("sqlite:///"))) as conn, conn:
            for thread in thread_ids:
                conn.execute(
                    f'UPDATE "{cli.table}" SET last_activity_at = ? WHERE thread_id = ?',
                    (stamp, thread),
                )
    else:
        with psycopg.connect(cli.url, autocommit=True) as conn:
            conn.execute(
                f'UPDATE "{cli.table}" SET last_activity_at = %s WHERE thread_id = ANY(%s)',
                (when, thread_ids),
            )


def test_cleanup_dry_run_then_for_real(cli: Cli) -> None:
    threads = seed(cli)
    make_idle(cli, [threads["bob"]], hours=3)
    make_idle(cli, [threads["current"]], hours=1)
    dry = cli("cleanup", "--max-idle", "2h", "--dry-run", "--json")
    assert dry.code == 0
    assert dry.json() == {"dry_run": True, "max_idle_seconds": 7200.0, "sessions": 1}
    with cli.manager() as m:
        assert m.get_session("bob", threads["bob"]).status == "active"  # nothing changed
    done = cli("cleanup", "--max-idle", "2h")
    assert done.code == 0
    assert "expired 1 session(s)" in done.out
    with cli.manager() as m:
        assert m.get_session("bob", threads["bob"]).status == "expired"
        assert m.get_session("alice", threads["current"]).status == "active"
    both = cli("cleanup", "--max-idle", "30m", "--json")
    assert both.json()["sessions"] == 2  # alice's current session and its child
    assert cli("cleanup", "--max-idle", "1h30m", "--dry-run", "--json").json()["sessions"] == 0


@pytest.mark.parametrize("bad", ["", "1x", "m", "-5m", "1h-"])
def test_cleanup_rejects_bad_durations(cli: Cli, bad: str) -> None:
    result = cli("cleanup", "--max-idle", bad)
    assert result.code == 1
    assert "duration" in result.err or "max_idle" in result.err


def test_stats(cli: Cli) -> None:
    seed(cli)
    stats = cli("stats", "--json")
    assert stats.code == 0
    with cli.manager() as m:
        assert stats.json() == m.get_stats().to_dict()
    assert stats.json()["sessions"] == 4
    assert stats.json()["requests"] == 1
    table = cli("stats")
    assert "open_sessions" in table.out


def test_doctor(cli: Cli) -> None:
    seed(cli)
    with cli.manager() as m:
        m.persistence.sync()  # LangGraph's checkpoint tables, as the first agent run makes them
    result = cli("doctor", "--json")
    assert result.code == 0, result.out
    checks = {c["check"]: c for c in result.json()}
    assert checks["connectivity"]["state"] == "ok"
    assert checks["schema"]["detail"] == f"{len(migration_names(cli.url))} applied"
    assert checks["degraded"]["detail"] == "ok"
    assert checks["extra [postgres]: psycopg"]["detail"] == "installed"
    assert "rows" in checks["table checkpoints"]["detail"]
    if cli.url.startswith("sqlite"):
        assert "MB" in checks["table (file)"]["detail"]
    assert "[postgres]" in cli("doctor").out  # brackets are data, not Rich markup


# -- exit codes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["stats"],
        ["doctor"],
        ["db", "status"],
        ["db", "migrate"],
        ["sessions", "list"],
        ["users", "export", "alice"],
        ["cleanup", "--max-idle", "1h"],
    ],
)
def test_an_unreachable_database_is_exit_code_2(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--database-url", UNREACHABLE, *args])
    err = capsys.readouterr().err
    assert code == 2
    assert "127.0.0.1:1" not in err or "password" not in err
    if args[0] != "doctor":
        assert "storage error" in err


@pytest.mark.parametrize(
    "args",
    [
        ["nosuch"],
        ["sessions"],
        ["sessions", "list", "--limit", "abc"],
        ["sessions", "list", "--limit", "0"],
        ["--database-url", "mysql://x/y", "stats"],
        ["users", "erase", ""],
    ],
)
def test_usage_and_input_errors_are_exit_code_1(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    argv = args if args[0].startswith("--") else ["--database-url", url, *args]
    assert main(argv) == 1
    assert capsys.readouterr().err


def test_the_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("bssagent")
    url = f"sqlite:///{tmp_path / 'script.db'}"
    run: Callable[..., subprocess.CompletedProcess[str]] = lambda *a: subprocess.run(  # noqa: E731
        [str(script), *a], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    ok = run("--database-url", url, "db", "migrate", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["applied"] == ["0001_user_sessions", "0002_lifecycle"]
    assert run("--database-url", UNREACHABLE, "stats").returncode == 2
    assert run("--database-url", url, "sessions", "show", "nope").returncode == 1
    help_text = run("--help")
    assert help_text.returncode == 0
    assert "sessions" in help_text.stdout
