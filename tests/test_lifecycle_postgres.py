"""Session lifecycle on real PostgreSQL under concurrency, and erasure down to LangGraph's rows.

* Counters stay exact when 4 processes (2 sync with threads, 2 async with tasks) record
  requests on the same sessions at once; the maintained statistics agree with the rows.
* ``max_active_sessions`` / ``max_sessions_per_user`` hold across processes.
* Concurrent ``cleanup_inactive_sessions`` from 3 processes expires each session once.
* After ``delete_user_data`` no row of the session table, the event log or LangGraph's
  checkpoint tables names the user's threads (PostgreSQL, and SQLite's file too), and a
  late write to a deleted thread is refused.

Everything is marked ``postgres`` except the SQLite variants of the erasure tests.

Workers are spawned interpreters (as in ``tests/test_races.py``); one pool serves the module.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import sqlite3
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg
import pytest
from langchain_core.messages import AIMessage
from langgraph.graph import END, START, MessagesState, StateGraph

from bssagent import (
    AgentSessionManager,
    AsyncAgentSessionManager,
    BaseAgent,
    SessionNotFoundError,
)
from bssagent.agent import OfflineChatModel
from bssagent.demo import ChatAgent

BARRIER_TIMEOUT = 60.0
RESULT_TIMEOUT = 90.0
PG_CHECKPOINT_TABLES = ("checkpoints", "checkpoint_blobs", "checkpoint_writes")
SQLITE_CHECKPOINT_TABLES = ("checkpoints", "writes")

# These tests load 2 cores with dozens of concurrent callers on purpose: a busy database is
# not a dead one, and the 0.5 s default deadline would send some calls to the fallback
# (tests/test_reliability.py covers deadlines; tests/test_load.py runs with the defaults).
BUSY_DEADLINE = 10.0


# -- workers (module level: spawn imports them by name) ---------------------------------------


def _report(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        result = work()
    except BaseException:
        result = {"fatal": traceback.format_exc()}
    result["pid"] = os.getpid()
    return result


def _warm_up(index: int, barrier: Any) -> dict[str, Any]:
    import bssagent  # noqa: F401  (the expensive import, once per process)

    barrier.wait(BARRIER_TIMEOUT)
    return {"pid": os.getpid()}


def _plan(index: int, worker: int, i: int, threads: list[str]) -> tuple[str, float, bool]:
    """The ``i``-th request of one worker: which session, how long, whether it failed."""
    thread = threads[(index + worker + i) % len(threads)]
    return thread, 0.25 if i % 2 else 0.125, (index + worker + i) % 7 == 0


def _record_worker(
    index: int, url: str, table: str, user_of: dict[str, str], workers: int, per: int, barrier: Any
) -> dict[str, Any]:
    """Processes 0 and 1: a sync manager shared by threads; 2 and 3: an async one, tasks."""

    def work() -> dict[str, Any]:
        threads = sorted(user_of)
        errors: list[str] = []
        if index < 2:
            manager = AgentSessionManager(
                database_url=url, table_name=table, cache_size=0, deadline=BUSY_DEADLINE
            )

            def body(w: int) -> None:
                for i in range(per):
                    thread, seconds, failed = _plan(index, w, i, threads)
                    try:
                        manager.record_request(
                            user_of[thread], thread, processing_time=seconds, error=failed
                        )
                    except Exception:
                        errors.append(traceback.format_exc())

            manager.get_session_events(user_of[threads[0]], limit=1)  # connect before the start
            barrier.wait(BARRIER_TIMEOUT)
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(body, range(workers)))
            degraded = manager.is_degraded
            manager.close()
            return {"errors": errors, "degraded": degraded}

        async def main() -> dict[str, Any]:
            manager = AsyncAgentSessionManager(
                database_url=url,
                table_name=table,
                cache_size=0,
                deadline=BUSY_DEADLINE,
                pool_max_size=workers,
            )

            async def body(w: int) -> None:
                for i in range(per):
                    thread, seconds, failed = _plan(index, w, i, threads)
                    try:
                        await manager.record_request(
                            user_of[thread], thread, processing_time=seconds, error=failed
                        )
                    except Exception:
                        errors.append(traceback.format_exc())

            await manager.get_session_events(user_of[threads[0]], limit=1)
            await asyncio.to_thread(barrier.wait, BARRIER_TIMEOUT)
            await asyncio.gather(*(body(w) for w in range(workers)))
            degraded = manager.is_degraded
            await manager.close()
            return {"errors": errors, "degraded": degraded}

        return asyncio.run(main())

    return _report(work)


def _create_worker(
    index: int, url: str, table: str, options: dict[str, Any], calls: list[tuple[str, str]],
    barrier: Any,
) -> dict[str, Any]:  # fmt: skip
    """Run ``(method, user)`` calls from one thread each, all at once; outcome per call."""

    def work() -> dict[str, Any]:
        from bssagent import AgentSessionManager
        from bssagent.errors import SessionLimitError

        manager = AgentSessionManager(
            database_url=url, table_name=table, cache_size=0, deadline=BUSY_DEADLINE, **options
        )
        manager.get_session_events("warm-up", limit=1)
        start = threading.Barrier(len(calls))
        outcomes: list[str] = []

        def call(spec: tuple[str, str]) -> str:
            method, user = spec
            start.wait(BARRIER_TIMEOUT)
            try:
                return getattr(manager, method)(user).thread_id
            except SessionLimitError:
                return "limit"
            except Exception:
                return "error: " + traceback.format_exc()

        barrier.wait(BARRIER_TIMEOUT)
        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            outcomes = list(pool.map(call, calls))
        degraded = manager.is_degraded
        manager.close()
        return {"outcomes": outcomes, "degraded": degraded}

    return _report(work)


def _cleanup_worker(index: int, url: str, table: str, batch: int, barrier: Any) -> dict[str, Any]:
    def work() -> dict[str, Any]:
        from bssagent import AgentSessionManager

        manager = AgentSessionManager(
            database_url=url,
            table_name=table,
            cache_size=0,
            deadline=BUSY_DEADLINE,
            cleanup_batch_size=batch,
        )
        manager.get_session_events("warm-up", limit=1)
        barrier.wait(BARRIER_TIMEOUT)
        try:
            expired, error = manager.cleanup_inactive_sessions(60), None
        except Exception:
            expired, error = 0, traceback.format_exc()
        degraded = manager.is_degraded
        manager.close()
        return {"expired": expired, "error": error, "degraded": degraded}

    return _report(work)


class Workers:
    """Spawned processes; :meth:`run` starts one task per process, released together."""

    def __init__(self, size: int) -> None:
        ctx = mp.get_context("spawn")
        self.size = size
        self._sync = ctx.Manager()
        self._pool = ProcessPoolExecutor(max_workers=size, mp_context=ctx)
        pids = {r["pid"] for r in self.run(_warm_up, [()] * size)}
        assert len(pids) == size, "every warm-up task must run in its own process"

    def run(
        self, target: Callable[..., dict[str, Any]], args_per_task: list[tuple[Any, ...]]
    ) -> list[dict[str, Any]]:
        assert len(args_per_task) <= self.size
        barrier = self._sync.Barrier(len(args_per_task))
        futures = [
            self._pool.submit(target, i, *args, barrier) for i, args in enumerate(args_per_task)
        ]
        try:
            results = [f.result(timeout=RESULT_TIMEOUT) for f in futures]
        except BaseException:
            barrier.abort()  # nobody may hang on a failed run
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
    pool = Workers(4)
    try:
        yield pool
    finally:
        pool.close()


# -- helpers ---------------------------------------------------------------------------------


def drop_postgres_tables(url: str, table: str) -> None:
    """Drop a test's session table with its lifecycle tables and trigger functions, and the
    LangGraph checkpoints of its threads (the checkpoint tables are shared)."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        threads: list[str] = []
        for name in (table, f"{table}_tombstones"):
            if conn.execute("SELECT to_regclass(%s)", (f'"{name}"',)).fetchone()[0]:
                threads += [r[0] for r in conn.execute(f'SELECT thread_id FROM "{name}"')]
        if threads and conn.execute("SELECT to_regclass('checkpoint_writes')").fetchone()[0]:
            for name in PG_CHECKPOINT_TABLES:
                conn.execute(f"DELETE FROM {name} WHERE thread_id = ANY(%s)", (threads,))
        for suffix in ("_events", "_stats", "_tombstones", ""):
            conn.execute(f'DROP TABLE IF EXISTS "{table}{suffix}" CASCADE')
        for kind in ("insert", "update", "delete"):
            conn.execute(f'DROP FUNCTION IF EXISTS "{table}_track_{kind}"()')


@pytest.fixture
def table(pg_url: str, table_name: str) -> Iterator[str]:
    """``table_name``, with everything migration 0002 adds dropped afterwards too."""
    try:
        yield table_name
    finally:
        drop_postgres_tables(pg_url, table_name)


def rows(url: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        return [tuple(r) for r in conn.execute(query, params).fetchall()]


def stats_row(url: str, table: str) -> tuple[Any, ...]:
    """The maintained aggregates (summed over shards) and the same figures from the rows."""
    kept = rows(
        url,
        "SELECT sum(sessions), sum(open_sessions), sum(current_sessions), sum(requests),"
        f' sum(errors), sum(processing_time) FROM "{table}_stats" WHERE namespace = %s',
        ("default",),
    )[0]
    real = rows(
        url,
        "SELECT count(*), count(*) FILTER (WHERE status IN ('active', 'paused')),"
        " count(*) FILTER (WHERE is_active), coalesce(sum(request_count), 0),"
        " coalesce(sum(error_count), 0), coalesce(sum(total_processing_time), 0)"
        f' FROM "{table}" WHERE namespace = %s',
        ("default",),
    )[0]
    return tuple(int(v) if i < 5 else float(v) for i, v in enumerate(kept)), tuple(
        int(v) if i < 5 else float(v) for i, v in enumerate(real)
    )


# -- counters --------------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_counters_are_exact_after_concurrent_record_request_from_processes(
    pg_url: str, table: str, workers: Workers
) -> None:
    procs, threads_per_proc, per = 4, 8, 50
    with AgentSessionManager(
        database_url=pg_url, table_name=table, cache_size=0, deadline=BUSY_DEADLINE
    ) as m:
        sessions = [m.get_or_create_user_session(f"user-{i}") for i in range(3)]
        sessions.append(m.create_child_session("user-0", sessions[0].thread_id))
        user_of = {s.thread_id: s.user_id for s in sessions}
        started = time.time()
        reports = workers.run(
            _record_worker, [(pg_url, table, user_of, threads_per_proc, per)] * procs
        )
        errors = [e for r in reports for e in r["errors"]]
        assert not errors, f"{len(errors)} calls failed; first:\n{errors[0]}"
        assert not any(r["degraded"] for r in reports)

        threads = sorted(user_of)
        expected = {t: [0, 0, 0.0] for t in threads}
        for index in range(procs):
            for w in range(threads_per_proc):
                for i in range(per):
                    thread, seconds, failed = _plan(index, w, i, threads)
                    expected[thread][0] += 1
                    expected[thread][1] += int(failed)
                    expected[thread][2] += seconds
        assert sum(e[0] for e in expected.values()) == procs * threads_per_proc * per == 1600
        for s in sessions:
            stored = m.get_session(s.user_id, s.thread_id)
            got = [stored.request_count, stored.error_count, stored.total_processing_time]
            assert got == expected[s.thread_id], s.thread_id
            assert stored.last_activity_at.timestamp() >= started - 1
            # Every failed request logged one "error" event, with the counter it reached.
            errs = [e for e in m.get_session_events(s.user_id, s.thread_id, limit=1000)
                    if e.kind == "error"]  # fmt: skip
            assert sorted(e.payload["error_count"] for e in errs) == list(
                range(1, expected[s.thread_id][1] + 1)
            )
        total = m.get_stats()
        requests = sum(e[0] for e in expected.values())
        failures = sum(e[1] for e in expected.values())
        seconds = sum(e[2] for e in expected.values())
        assert (total.requests, total.errors, total.total_processing_time) == (
            requests, failures, seconds,
        )  # fmt: skip
        assert total.error_rate == failures / requests
        assert total.average_processing_time == seconds / requests
        user0 = m.get_user_stats("user-0")
        assert user0.requests == sum(
            expected[s.thread_id][0] for s in sessions if s.user_id == "user-0"
        )
    kept, real = stats_row(pg_url, table)
    assert kept == real


# -- limits ----------------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_max_active_sessions_holds_across_processes(
    pg_url: str, table: str, workers: Workers
) -> None:
    limit, procs, per_proc = 5, 4, 6
    calls = [
        [("get_or_create_user_session", f"p{p}-u{i}") for i in range(per_proc)]
        for p in range(procs)
    ]
    options = {"max_active_sessions": limit}
    reports = workers.run(_create_worker, [(pg_url, table, options, c) for c in calls])
    assert not any(r["degraded"] for r in reports)
    outcomes = [o for r in reports for o in r["outcomes"]]
    assert not [o for o in outcomes if o.startswith("error")], outcomes
    assert len(outcomes) == procs * per_proc
    assert sum(o != "limit" for o in outcomes) == limit
    assert outcomes.count("limit") == procs * per_proc - limit
    (open_rows,) = rows(
        pg_url, f"SELECT count(*) FROM \"{table}\" WHERE status IN ('active', 'paused')"
    )[0]
    assert open_rows == limit
    with AgentSessionManager(database_url=pg_url, table_name=table) as m:
        assert m.get_stats().open_sessions == limit
        assert len(m.list_active_sessions()) == limit
    kept, real = stats_row(pg_url, table)
    assert kept == real


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_max_sessions_per_user_holds_across_processes(
    pg_url: str, table: str, workers: Workers
) -> None:
    limit, procs, per_proc = 3, 4, 4
    calls = [[("create_user_session", "bob")] * per_proc for _ in range(procs)]
    options = {"max_sessions_per_user": limit, "session_limit_policy": "raise"}
    reports = workers.run(_create_worker, [(pg_url, table, options, c) for c in calls])
    outcomes = [o for r in reports for o in r["outcomes"]]
    assert not [o for o in outcomes if o.startswith("error")], outcomes
    created = [o for o in outcomes if o != "limit"]
    assert len(created) == limit
    stored = rows(
        pg_url, f'SELECT thread_id, is_active FROM "{table}" WHERE user_id = %s', ("bob",)
    )
    assert sorted(t for t, _ in stored) == sorted(created)
    assert sum(active for _, active in stored) == 1


# -- expiry ----------------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_concurrent_cleanups_expire_each_session_exactly_once(
    pg_url: str, table: str, workers: Workers
) -> None:
    n, batch = 3000, 50
    with AgentSessionManager(
        database_url=pg_url, table_name=table, cache_size=0, deadline=BUSY_DEADLINE
    ) as m:
        fresh = m.get_or_create_user_session("fresh")  # creates the schema; stays active
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                f'INSERT INTO "{table}" (namespace, user_id, thread_id, title, last_activity_at,'
                " updated_at, created_at)"
                " SELECT 'default', 'idle-' || i, gen_random_uuid()::text, 'idle',"
                " now() - interval '1 hour', now() - interval '1 hour', now() - interval '1 hour'"
                " FROM generate_series(1, %s) AS i",
                (n,),
            )
        reports = workers.run(_cleanup_worker, [(pg_url, table, batch)] * 3)
        errors = [r["error"] for r in reports if r["error"]]
        assert not errors, errors[0]
        assert not any(r["degraded"] for r in reports)
        assert sum(r["expired"] for r in reports) == n
        assert m.cleanup_inactive_sessions(60) == 0  # nothing left: the idle probe
        assert m.get_current_user_session("fresh").thread_id == fresh.thread_id
        stats = m.get_stats()
        assert (stats.sessions, stats.open_sessions, stats.users) == (n + 1, 1, 1)
    (expired, ended) = rows(
        pg_url,
        f"SELECT count(*) FILTER (WHERE status = 'expired'), count(ended_at) FROM \"{table}\"",
    )[0]
    assert (expired, ended) == (n, n)
    twice = rows(
        pg_url,
        f"SELECT thread_id FROM \"{table}_events\" WHERE kind = 'expired'"
        " GROUP BY thread_id HAVING count(*) <> 1",
    )
    assert twice == []
    (events,) = rows(pg_url, f"SELECT count(*) FROM \"{table}_events\" WHERE kind = 'expired'")[0]
    assert events == n
    kept, real = stats_row(pg_url, table)
    assert kept == real


@pytest.mark.postgres
@pytest.mark.timeout(60)
def test_concurrent_get_or_create_on_a_timed_out_session(pg_url: str, table: str) -> None:
    """Concurrent callers of a user whose session timed out all get the same new session
    (the get-or-create contract), none an error."""
    users, callers = [f"u{i}" for i in range(4)], 8
    with AgentSessionManager(
        database_url=pg_url,
        table_name=table,
        cache_size=0,
        deadline=BUSY_DEADLINE,
        session_timeout=0.2,
    ) as m:
        old = {u: m.get_or_create_user_session(u).thread_id for u in users}
        time.sleep(0.3)
        failures: list[str] = []
        for user in users:
            start = threading.Barrier(callers)

            def call(_: int, user: str = user, start: threading.Barrier = start) -> str:
                start.wait(30)
                try:
                    return m.get_or_create_user_session(user).thread_id
                except Exception as exc:
                    return f"{type(exc).__name__}: {exc}"

            with ThreadPoolExecutor(max_workers=callers) as pool:
                got = set(pool.map(call, range(callers)))
            failures += [g for g in got if "Error" in g]
            new = {g for g in got if "Error" not in g}
            assert len(new) == 1
            assert new != {old[user]}
        assert failures == []


# -- erasure ---------------------------------------------------------------------------------


class CheckpointTables:
    """LangGraph's tables of one database, read directly."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_postgres = url.startswith("postgresql")
        self.names = PG_CHECKPOINT_TABLES if self.is_postgres else SQLITE_CHECKPOINT_TABLES

    def query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        if self.is_postgres:
            return rows(self.url, sql, params)
        with closing(sqlite3.connect(self.url.removeprefix("sqlite:///"), timeout=10)) as conn:
            return [tuple(r) for r in conn.execute(sql.replace("%s", "?"), params).fetchall()]

    def counts(self, thread_ids: list[str]) -> dict[str, int]:
        marks = ", ".join(["%s"] * len(thread_ids))
        return {
            name: self.query(
                f"SELECT count(*) FROM {name} WHERE thread_id IN ({marks})", tuple(thread_ids)
            )[0][0]
            for name in self.names
        }

    def session_rows(self, table: str, user: str, thread_ids: list[str]) -> dict[str, int]:
        """Rows of the session table and event log naming the user or their threads."""
        marks = ", ".join(["%s"] * len(thread_ids))
        text = "payload::text" if self.is_postgres else "payload"
        likes = " OR ".join([f"{text} LIKE %s"] * len(thread_ids))
        return {
            "sessions": self.query(
                f'SELECT count(*) FROM "{table}" WHERE user_id = %s OR thread_id IN ({marks})'
                f" OR parent_thread_id IN ({marks})",
                (user, *thread_ids, *thread_ids),
            )[0][0],
            "events": self.query(
                f'SELECT count(*) FROM "{table}_events" WHERE user_id = %s'
                f" OR thread_id IN ({marks}) OR {likes}",
                (user, *thread_ids, *(f"%{t}%" for t in thread_ids)),
            )[0][0],
        }

    def tombstones(self, table: str, thread_ids: list[str]) -> list[tuple[Any, ...]]:
        marks = ", ".join(["%s"] * len(thread_ids))
        return self.query(
            f'SELECT thread_id, swept_at IS NOT NULL FROM "{table}_tombstones"'
            f" WHERE thread_id IN ({marks})",
            tuple(thread_ids),
        )


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"])
def erasure_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """``(url, table)`` on PostgreSQL (dropped afterwards) or a SQLite file."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'erase.db'}", "user_sessions"
        return
    url = request.getfixturevalue("pg_url")
    yield url, request.getfixturevalue("table")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_delete_user_data_leaves_no_row_and_refuses_late_writes(
    erasure_db: tuple[str, str], flavour: str
) -> None:
    url, table = erasure_db
    db = CheckpointTables(url)
    cls = AgentSessionManager if flavour == "sync" else AsyncAgentSessionManager
    manager: Any = cls(database_url=url, table_name=table, cache_size=0, deadline=BUSY_DEADLINE)
    agent = ChatAgent(OfflineChatModel(), session_manager=manager)

    async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        return await result if asyncio.iscoroutine(result) else result

    async def turn(text: str, config: Any = None, **kwargs: Any) -> Any:
        run = agent.ainvoke if flavour == "async" else agent.invoke
        return await call(run, {"messages": [text]}, config, **kwargs)

    try:
        threads = []
        for chat in range(2):
            if chat:
                await call(manager.create_user_session, "alice", f"chat {chat}")
            for t in range(2):
                await turn(f"chat {chat} turn {t}", user_id="alice")
            threads.append((await call(manager.get_current_user_session, "alice")).thread_id)
        child = await call(manager.create_child_session, "alice", threads[0])
        threads.append(child.thread_id)
        await turn("bob here", user_id="bob")
        bob = (await call(manager.get_current_user_session, "bob")).thread_id
        before = db.counts(threads[:2])
        assert all(n > 0 for n in before.values()), before
        assert (await call(manager.get_user_stats, "alice")).requests == 4

        assert await call(manager.delete_user_data, "alice") == 3

        assert db.counts(threads) == dict.fromkeys(db.names, 0)
        assert db.session_rows(table, "alice", threads) == {"sessions": 0, "events": 0}
        # What stays: one tombstone per thread (thread id only, no user), already swept.
        assert sorted(db.tombstones(table, threads)) == sorted((t, True) for t in threads)
        assert all(n > 0 for n in db.counts([bob]).values())  # bob keeps his conversation

        for thread in threads:
            with pytest.raises(SessionNotFoundError):
                await turn("late", {"configurable": {"thread_id": thread}})
        with pytest.raises(SessionNotFoundError):
            await turn("late", user_id="alice", thread_id=threads[0])
        assert db.counts(threads) == dict.fromkeys(db.names, 0)
        assert db.session_rows(table, "alice", threads) == {"sessions": 0, "events": 0}
    finally:
        await call(agent.aclose if flavour == "async" else agent.close)
        await call(manager.close)


class SlowAgent(BaseAgent):
    """One node that signals it started, then takes ``delay`` seconds."""

    def __init__(self, delay: float, **kwargs: Any) -> None:
        self.delay = delay
        self.started = threading.Event()
        super().__init__("slow", **kwargs)

    def define_graph(self) -> StateGraph[Any]:
        def node(state: MessagesState) -> dict[str, Any]:
            self.started.set()
            time.sleep(self.delay)
            return {"messages": [AIMessage("done")]}

        graph = StateGraph(MessagesState)
        graph.add_node("node", node)
        graph.add_edge(START, "node")
        graph.add_edge("node", END)
        return graph


@pytest.mark.timeout(60)
def test_a_run_in_flight_during_delete_user_data_does_not_recreate_the_thread(
    erasure_db: tuple[str, str],
) -> None:
    url, table = erasure_db
    db = CheckpointTables(url)
    with AgentSessionManager(
        database_url=url, table_name=table, cache_size=0, deadline=BUSY_DEADLINE
    ) as manager:
        agent = SlowAgent(0.5, session_manager=manager)
        try:
            thread = manager.get_or_create_user_session("alice").thread_id
            outcome: dict[str, Any] = {}

            def run() -> None:
                try:
                    outcome["result"] = agent.invoke({"messages": ["secret"]}, user_id="alice")
                except Exception as exc:
                    outcome["error"] = exc

            runner = threading.Thread(target=run)
            runner.start()
            assert agent.started.wait(10)
            assert manager.delete_user_data("alice") == 1
            runner.join(30)
            assert not runner.is_alive()
            # The run finished after the sweep: what it wrote must be gone all the same,
            # without waiting for a maintenance round.
            assert db.counts([thread]) == dict.fromkeys(db.names, 0), outcome
            assert manager.run_maintenance()["swept"] == 0
            assert db.counts([thread]) == dict.fromkeys(db.names, 0)
        finally:
            agent.close()
