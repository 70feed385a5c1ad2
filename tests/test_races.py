"""Multi-process races: get-or-create, first-time schema set-up, create_user_session.

Workers are separate interpreters (``spawn``), as separate application processes would be;
each task makes its own manager and waits on a shared barrier, so the processes really
start their calls together. The PostgreSQL / SQLite tables are then checked directly.
Spawning is costly (every interpreter imports bssagent and LangGraph), so one pool of
spawned processes serves the whole module.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import sqlite3
import threading
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bssagent.sessions.migrations import migrations

pytestmark = pytest.mark.slow

BARRIER_TIMEOUT = 60.0
RESULT_TIMEOUT = 90.0

# These tests load 2 cores with dozens of concurrent callers on purpose: a busy database is
# not a dead one, and the 0.5 s default deadline would send some calls to the fallback
# (tests/test_reliability.py covers deadlines; tests/test_load.py runs with the defaults).
BUSY_DEADLINE = 10.0


# -- helpers running in the spawned workers (module level: spawn imports them by name) -----


def _report(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``work``; a crash becomes a ``fatal`` entry instead of a lost result."""
    try:
        result = work()
    except BaseException:
        result = {"fatal": traceback.format_exc()}
    result["pid"] = os.getpid()
    return result


def _warm_up(index: int, barrier: Any) -> dict[str, Any]:
    import bssagent  # noqa: F401  (the expensive import, done once per process)

    barrier.wait(BARRIER_TIMEOUT)
    return {"pid": os.getpid()}


def _thread_pool(n: int, body: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _get_or_create_worker(
    index: int,
    url: str,
    table: str,
    users: list[str],
    threads: int,
    barrier: Any,
) -> dict[str, Any]:
    def work() -> dict[str, Any]:
        from bssagent import AgentSessionManager

        manager = AgentSessionManager(
            database_url=url, table_name=table, cache_size=0, deadline=BUSY_DEADLINE
        )
        results: list[tuple[str, str]] = []
        errors: list[str] = []
        lock = threading.Lock()

        def body(t: int) -> None:
            order = list(users)
            random.Random(index * 1000 + t).shuffle(order)
            for user in order:
                try:
                    thread_id = manager.get_or_create_user_session(user).thread_id
                except Exception:
                    with lock:
                        errors.append(traceback.format_exc())
                else:
                    with lock:
                        results.append((user, thread_id))

        barrier.wait(BARRIER_TIMEOUT)
        _thread_pool(threads, body)
        degraded = manager.is_degraded
        manager.close()
        return {"results": results, "errors": errors, "degraded": degraded}

    return _report(work)


def _setup_worker(index: int, url: str, barrier: Any) -> dict[str, Any]:
    def work() -> dict[str, Any]:
        from bssagent import AgentSessionManager

        manager = AgentSessionManager(database_url=url, cache_size=0, deadline=BUSY_DEADLINE)
        barrier.wait(BARRIER_TIMEOUT)
        errors: list[str] = []
        shared = own = ""
        try:
            shared = manager.get_or_create_user_session("shared-user").thread_id
            own = manager.get_or_create_user_session(f"user-{index}").thread_id
        except Exception:
            errors.append(traceback.format_exc())
        degraded = manager.is_degraded
        manager.close()
        return {"shared": shared, "own": own, "errors": errors, "degraded": degraded}

    return _report(work)


def _open_worker(index: int, url: str, barrier: Any) -> dict[str, Any]:
    def work() -> dict[str, Any]:
        from bssagent import AgentSessionManager

        manager = AgentSessionManager(database_url=url, cache_size=0, deadline=BUSY_DEADLINE)
        barrier.wait(BARRIER_TIMEOUT)
        thread_id = manager.get_or_create_user_session("shared").thread_id
        health = manager.health()
        manager.close()
        return {"thread_id": thread_id, "status": health.status, "reason": health.reason}

    return _report(work)


def _create_worker(
    index: int,
    url: str,
    table: str,
    user: str,
    threads: int,
    rounds: int,
    barrier: Any,
) -> dict[str, Any]:
    def work() -> dict[str, Any]:
        from bssagent import AgentSessionManager

        manager = AgentSessionManager(
            database_url=url, table_name=table, cache_size=0, deadline=BUSY_DEADLINE
        )
        created: list[tuple[str, bool]] = []
        errors: list[str] = []
        lock = threading.Lock()

        def body(t: int) -> None:
            for r in range(rounds):
                try:
                    s = manager.create_user_session(user, title=f"p{index}-t{t}-r{r}")
                except Exception:
                    with lock:
                        errors.append(traceback.format_exc())
                else:
                    with lock:
                        created.append((s.thread_id, s.is_active))

        barrier.wait(BARRIER_TIMEOUT)
        _thread_pool(threads, body)
        degraded = manager.is_degraded
        manager.close()
        return {"created": created, "errors": errors, "degraded": degraded}

    return _report(work)


# -- helpers running in the test process ----------------------------------------------------


class Workers:
    """A pool of spawned processes; :meth:`run` starts one task per process, together."""

    def __init__(self, size: int) -> None:
        ctx = mp.get_context("spawn")
        self.size = size
        self._sync = ctx.Manager()  # barriers as proxies, which tasks can receive
        self._pool = ProcessPoolExecutor(max_workers=size, mp_context=ctx)
        pids = {r["pid"] for r in self.run(_warm_up, [()] * size)}
        assert len(pids) == size, "every warm-up task must run in its own process"

    def run(
        self, target: Callable[..., dict[str, Any]], args_per_task: list[tuple[Any, ...]]
    ) -> list[dict[str, Any]]:
        """Run ``target(index, *args, barrier)`` once per ``args`` tuple, each in its own
        process (a task blocked on the barrier holds its process), all released together."""
        assert len(args_per_task) <= self.size
        barrier = self._sync.Barrier(len(args_per_task))
        futures = [
            self._pool.submit(target, i, *args, barrier) for i, args in enumerate(args_per_task)
        ]
        try:
            results = [f.result(timeout=RESULT_TIMEOUT) for f in futures]
        except BaseException:
            barrier.abort()  # release the others: nobody may hang on a failed run
            raise
        fatal = [r["fatal"] for r in results if "fatal" in r]
        assert not fatal, "a worker crashed:\n" + "\n".join(fatal)
        assert len({r["pid"] for r in results}) == len(results), "tasks shared a process"
        return results

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._sync.shutdown()


@pytest.fixture(scope="module")
def workers() -> Iterator[Workers]:
    pool = Workers(8)
    try:
        yield pool
    finally:
        pool.close()


def assert_consistent(
    reports: list[dict[str, Any]], users: list[str], calls_per_user: int
) -> dict[str, str]:
    """No errors, no degraded manager, and one thread id per user across every caller."""
    errors = [e for r in reports for e in r["errors"]]
    assert not errors, f"{len(errors)} calls failed; first:\n{errors[0]}"
    assert not any(r["degraded"] for r in reports), "a worker fell back to memory"
    seen: dict[str, set[str]] = defaultdict(set)
    counts: dict[str, int] = defaultdict(int)
    for r in reports:
        for user, thread_id in r["results"]:
            seen[user].add(thread_id)
            counts[user] += 1
    assert set(seen) == set(users)
    assert all(n == calls_per_user for n in counts.values())
    split = {u: ids for u, ids in seen.items() if len(ids) != 1}
    assert not split, (
        f"{len(split)} users got different thread ids, e.g. {next(iter(split.items()))}"
    )
    return {u: next(iter(ids)) for u, ids in seen.items()}


# -- get_or_create race -----------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.timeout(150)
def test_get_or_create_race_postgres(pg_url: str, table_name: str, workers: Workers) -> None:
    users = [f"user-{i:03d}" for i in range(200)]
    procs, threads = 4, 8
    reports = workers.run(_get_or_create_worker, [(pg_url, table_name, users, threads)] * procs)
    winners = assert_consistent(reports, users, procs * threads)

    with psycopg.connect(pg_url, connect_timeout=5) as conn:
        rows = conn.execute(f'SELECT user_id, thread_id, is_active FROM "{table_name}"').fetchall()
    assert len(rows) == len(users), "losers' inserts must not leave rows behind"
    active = defaultdict(list)
    for user_id, thread_id, is_active in rows:
        if is_active:
            active[user_id].append(thread_id)
    assert dict(active) == {u: [t] for u, t in winners.items()}


@pytest.mark.timeout(120)
def test_get_or_create_race_sqlite(workers: Workers, tmp_path: Path) -> None:
    db = tmp_path / "race.db"
    users = [f"user-{i:03d}" for i in range(60)]
    procs, threads = 4, 4
    reports = workers.run(
        _get_or_create_worker, [(f"sqlite:///{db}", "user_sessions", users, threads)] * procs
    )
    winners = assert_consistent(reports, users, procs * threads)

    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT user_id, thread_id, is_active FROM user_sessions").fetchall()
    assert len(rows) == len(users)
    assert all(is_active == 1 for _, _, is_active in rows)
    assert {u: t for u, t, _ in rows} == winners


@pytest.mark.timeout(120)
def test_sqlite_fresh_file_opened_by_many_processes_at_once(
    workers: Workers, tmp_path: Path
) -> None:
    """Many rounds of the most racy moment: processes opening a brand-new file together.

    Nothing here is slow or contended for long, so no process may fall back to memory
    (busy_timeout is 10 s); a fallback would hand out diverging thread ids.
    """
    for round_ in range(12):
        url = f"sqlite:///{tmp_path / f'fresh-{round_}.db'}"
        reports = workers.run(_open_worker, [(url,)] * workers.size)
        degraded = [r["reason"] for r in reports if r["status"] != "ok"]
        assert not degraded, f"round {round_}: {len(degraded)} process(es) fell back: {degraded}"
        assert len({r["thread_id"] for r in reports}) == 1


# -- first-time set-up storm ---------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.timeout(120)
@pytest.mark.parametrize("storm", [1, 2])
def test_concurrent_first_setup_postgres(fresh_database: str, storm: int, workers: Workers) -> None:
    reports = workers.run(_setup_worker, [(fresh_database,)] * 8)

    errors = [e for r in reports for e in r["errors"]]
    assert not errors, f"{len(errors)} set-ups failed; first:\n{errors[0]}"
    assert not any(r["degraded"] for r in reports)
    assert len({r["shared"] for r in reports}) == 1, "the shared user got several threads"
    assert len({r["own"] for r in reports}) == 8

    expected = {(m.version, m.name) for m in migrations("postgresql")}
    with psycopg.connect(fresh_database, connect_timeout=5) as conn:
        ledger = conn.execute("SELECT target, version, name FROM bssagent_migrations").fetchall()
        indexes = conn.execute(
            "SELECT c.relname, i.indisvalid, i.indisunique, pg_get_expr(i.indpred, i.indrelid)"
            " FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE i.indrelid = 'user_sessions'::regclass"
        ).fetchall()
        listed = {
            r[0]
            for r in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'user_sessions'"
            )
        }
        rows = conn.execute(
            "SELECT user_id, count(*) FILTER (WHERE is_active), count(*)"
            " FROM user_sessions GROUP BY user_id"
        ).fetchall()

    assert sorted(ledger) == sorted(("user_sessions", v, n) for v, n in expected)
    by_name = {name: (valid, unique, pred) for name, valid, unique, pred in indexes}
    assert "user_sessions_one_active_idx" in listed
    valid, unique, predicate = by_name["user_sessions_one_active_idx"]
    assert valid
    assert unique
    assert "is_active" in predicate
    assert all(valid for valid, _, _ in by_name.values()), by_name
    assert {
        "user_sessions_pkey",
        "user_sessions_thread_id_key",
        "user_sessions_one_active_idx",
        "user_sessions_user_idx",
        "user_sessions_active_idx",
        "user_sessions_idle_idx",
        "user_sessions_retention_idx",
        "user_sessions_parent_idx",
    } == listed
    assert sorted(rows) == sorted([("shared-user", 1, 1)] + [(f"user-{i}", 1, 1) for i in range(8)])


# -- create_user_session race ------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "backend", [pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"]
)
def test_create_user_session_race(
    backend: str, request: pytest.FixtureRequest, table_name: str, tmp_path: Path, workers: Workers
) -> None:
    if backend == "postgres":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'create.db'}"
    procs, threads, rounds = 4, 4, 5
    reports = workers.run(_create_worker, [(url, table_name, "bob", threads, rounds)] * procs)

    errors = [e for r in reports for e in r["errors"]]
    assert not errors, f"{len(errors)} creates failed; first:\n{errors[0]}"
    assert not any(r["degraded"] for r in reports)
    created = [c for r in reports for c in r["created"]]
    assert len(created) == procs * threads * rounds
    assert all(is_active for _, is_active in created), "a new session must start as current"
    assert len({t for t, _ in created}) == len(created)

    query = f'SELECT thread_id, is_active FROM "{table_name}" WHERE user_id = %s'
    if backend == "postgres":
        with psycopg.connect(url, connect_timeout=5) as conn:
            rows = conn.execute(query, ("bob",)).fetchall()
    else:
        with sqlite3.connect(tmp_path / "create.db") as conn:
            rows = conn.execute(query.replace("%s", "?"), ("bob",)).fetchall()
    assert len(rows) == len(created)
    assert {t for t, _ in rows} == {t for t, _ in created}
    current = [t for t, active in rows if active]
    assert len(current) == 1, f"exactly one current session, found {len(current)}"
