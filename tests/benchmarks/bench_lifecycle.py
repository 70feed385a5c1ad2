"""Benchmark: session lifecycle at scale on PostgreSQL, against the issue's targets.

    BSSAGENT_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test \\
        .venv/bin/python tests/benchmarks/bench_lifecycle.py

Runs in a fresh database (CREATE DATABASE, dropped at the end):

1. **Lookup scaling** — ``get_current_user_session`` with ``cache_size=0`` on a 1,000,000-row
   table vs a 1,000-row table (target: ratio <= 1.2). Tables are created through the
   manager (migrations, triggers), then filled with one ``INSERT ... SELECT generate_series``
   (the triggers keep the statistics and the event log, as for any write).
2. **Expiry** — ``cleanup_inactive_sessions`` expiring 100,000 idle sessions of the big
   table in batches (target: >= 30,000 rows/s), then the idle probe: a cleanup with nothing
   to do (target: < 10 ms).
3. **Retention** — 100 threads x 100 turns through an agent (one-node graph), the sessions
   ended, then checkpoint bytes before / after ``apply_retention(0, "keep_latest")`` and
   after ``"delete"``.

Options: ``--rows``, ``--idle``, ``--threads``, ``--turns`` shrink the run for a quick try;
``--parts 12`` / ``--parts 3`` run only some parts. The figures are wall-clock: run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import psycopg
from langchain_core.messages import AIMessage
from langgraph.graph import END, START, MessagesState, StateGraph

from bssagent import AgentSessionManager, BaseAgent

URL = os.environ.get("BSSAGENT_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
CHECKPOINT_TABLES = ("checkpoints", "checkpoint_blobs", "checkpoint_writes")


def per_op(fn: Callable[[int], object], n: int, batches: int = 7) -> float:
    """Median seconds per call of ``fn(i)`` over ``batches`` batches of ``n`` calls."""
    results = []
    for b in range(batches):
        start = time.perf_counter()
        for i in range(n):
            fn(b * n + i)
        results.append((time.perf_counter() - start) / n)
    return statistics.median(results)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def fill(url: str, table: str, rows: int, idle: int) -> float:
    """Insert ``rows`` current sessions (users ``user-1..``), the first ``idle`` of them idle
    for two hours; returns the seconds the INSERT took."""
    with psycopg.connect(url, autocommit=True) as conn:
        start = time.perf_counter()
        conn.execute(
            f'INSERT INTO "{table}" (namespace, user_id, thread_id, title, created_at,'
            " updated_at, last_activity_at)"
            " SELECT 'default', 'user-' || i, gen_random_uuid()::text, 'bench',"
            " t, t, t FROM (SELECT i, CASE WHEN i <= %s THEN now() - interval '2 hours'"
            " ELSE now() END AS t FROM generate_series(1, %s) AS i) AS g",
            (idle, rows),
        )
        took = time.perf_counter() - start
        conn.execute(f'VACUUM ANALYZE "{table}"')
    return took


def raw_expiry(conn: psycopg.Connection[Any], rows: int, idle: int, batch: int) -> float:
    """Rows/s of the plain way: the seed's table (no lifecycle columns, no triggers, a partial
    index on ``updated_at WHERE is_active``), expired by batched ``UPDATE``s from raw psycopg."""
    conn.execute(
        "CREATE TABLE raw_sessions (id BIGSERIAL PRIMARY KEY, user_id VARCHAR(255) NOT NULL,"
        " thread_id VARCHAR(255) NOT NULL UNIQUE, is_active BOOLEAN NOT NULL DEFAULT TRUE,"
        " created_at TIMESTAMPTZ NOT NULL DEFAULT now(), updated_at TIMESTAMPTZ NOT NULL)"
    )
    conn.execute("CREATE INDEX raw_sessions_idle_idx ON raw_sessions (updated_at) WHERE is_active")
    conn.execute(
        "INSERT INTO raw_sessions (user_id, thread_id, updated_at)"
        " SELECT 'user-' || i, gen_random_uuid()::text, CASE WHEN i <= %s"
        " THEN now() - interval '2 hours' ELSE now() END FROM generate_series(1, %s) AS i",
        (idle, rows),
    )
    conn.execute("VACUUM ANALYZE raw_sessions")
    query = (
        "UPDATE raw_sessions SET is_active = FALSE WHERE id IN (SELECT id FROM raw_sessions"
        " WHERE is_active AND updated_at < now() - interval '1 hour' ORDER BY updated_at"
        " LIMIT %s FOR UPDATE SKIP LOCKED)"
    )
    done, start = 0, time.perf_counter()
    while (n := conn.execute(query, (batch,)).rowcount) > 0:
        done += n
    took = time.perf_counter() - start
    assert done == idle, done
    return done / took


class EchoAgent(BaseAgent):
    """A one-node graph: every turn appends the user's message and a short reply."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("echo", **kwargs)

    def define_graph(self) -> StateGraph[Any]:
        def reply(state: MessagesState) -> dict[str, Any]:
            return {"messages": [AIMessage(f"ok {len(state['messages'])}")]}

        graph = StateGraph(MessagesState)
        graph.add_node("reply", reply)
        graph.add_edge(START, "reply")
        graph.add_edge("reply", END)
        return graph


def checkpoint_bytes(url: str, threads: list[str]) -> dict[str, tuple[int, int]]:
    """Per LangGraph table: (rows, payload bytes) of ``threads``."""
    payload = {
        "checkpoints": "octet_length(checkpoint::text) + octet_length(metadata::text)",
        "checkpoint_blobs": "coalesce(octet_length(blob), 0)",
        "checkpoint_writes": "octet_length(blob)",
    }
    with psycopg.connect(url, autocommit=True) as conn:
        return {
            name: tuple(  # type: ignore[misc]
                int(v)
                for v in conn.execute(
                    f"SELECT count(*), coalesce(sum({payload[name]}), 0) FROM {name}"
                    " WHERE thread_id = ANY(%s)",
                    (threads,),
                ).fetchone()
            )
            for name in CHECKPOINT_TABLES
        }


def relation_bytes(url: str) -> int:
    """pg_total_relation_size of the checkpoint tables after VACUUM FULL (disk actually held)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for name in CHECKPOINT_TABLES:
            conn.execute(f"VACUUM FULL {name}")
        return sum(
            conn.execute("SELECT pg_total_relation_size(%s)", (name,)).fetchone()[0]
            for name in CHECKPOINT_TABLES
        )


def show_bytes(label: str, counts: dict[str, tuple[int, int]], disk: int) -> int:
    total = sum(b for _, b in counts.values())
    parts = "  ".join(f"{n}: {r:>6} rows {b / 1e6:>8.2f} MB" for n, (r, b) in counts.items())
    print(f"  {label:<26} {total / 1e6:>9.2f} MB payload  {disk / 1e6:>9.2f} MB on disk  | {parts}")
    return total


def lookup_and_expiry(url: str, rows: int, idle: int) -> None:
    print(f"== 1. lookup scaling: get_current_user_session, cache_size=0, {rows:,} vs 1,000 rows")
    small_rows, small_idle = 1000, max(1, idle * 1000 // rows)
    with (
        AgentSessionManager(database_url=url, table_name="big", cache_size=0) as big,
        AgentSessionManager(database_url=url, table_name="small", cache_size=0) as small,
        psycopg.connect(url, autocommit=True) as conn,
    ):
        big.get_stats()  # creates the tables: migrations and triggers
        small.get_stats()
        took = fill(url, "big", rows, idle)
        print(f"  filled {rows:,} rows in {took:.1f} s ({rows / took:,.0f} rows/s, triggers on)")
        fill(url, "small", small_rows, small_idle)
        assert big.get_stats().sessions == rows
        rng = random.Random(7)
        big_users = [f"user-{rng.randint(idle + 1, rows)}" for _ in range(50_000)]
        small_users = [f"user-{rng.randint(small_idle + 1, small_rows)}" for _ in range(50_000)]
        query = 'SELECT id, thread_id FROM "{}" WHERE namespace = %s AND user_id = %s AND is_active'

        def lookup(m: AgentSessionManager, users: list[str]) -> Callable[[int], object]:
            return lambda i: m.get_current_user_session(users[i % len(users)])

        def raw(table: str, users: list[str]) -> Callable[[int], object]:
            q = query.format(table)
            return lambda i: conn.execute(q, ("default", users[i % len(users)])).fetchone()

        for fn in (lookup(big, big_users), lookup(small, small_users)):
            per_op(fn, 500, batches=2)  # warm-up: pools, prepared statements, caches
        # Interleave the two tables' batches, so a load change hits both alike.
        big_t, small_t = [], []
        for _ in range(5):
            big_t.append(per_op(lookup(big, big_users), 1000, batches=1))
            small_t.append(per_op(lookup(small, small_users), 1000, batches=1))
        big_s, small_s = statistics.median(big_t), statistics.median(small_t)
        raw_big = per_op(raw("big", big_users), 1000, batches=5)
        raw_small = per_op(raw("small", small_users), 1000, batches=5)
        ratio = big_s / small_s
        print(f"  {'':<36}{'µs/op':>10}")
        print(f"  {'manager, 1,000 rows':<36}{small_s * 1e6:>10.1f}")
        print(f"  {f'manager, {rows:,} rows':<36}{big_s * 1e6:>10.1f}")
        print(f"  {'raw psycopg point query, 1,000 rows':<36}{raw_small * 1e6:>10.1f}")
        print(f"  {f'raw psycopg point query, {rows:,} rows':<36}{raw_big * 1e6:>10.1f}")
        ok = verdict(ratio <= 1.2)
        print(f"  ratio {rows:,} / 1,000 rows: {ratio:.3f}x  (target <= 1.2x)  {ok}")

        print(f"\n== 2. expiry: cleanup_inactive_sessions on {idle:,} idle of {rows:,} sessions")
        print(f"  batch size {big.settings.cleanup_batch_size:,}")
        start = time.perf_counter()
        expired = big.cleanup_inactive_sessions(3600)
        took = time.perf_counter() - start
        rate = expired / took
        print(f"  expired {expired:,} in {took:.2f} s: {rate:,.0f} rows/s  (target >= 30,000)  "
              f"{verdict(expired == idle and rate >= 30_000)}")  # fmt: skip
        raw_rate = raw_expiry(conn, rows, idle, big.settings.cleanup_batch_size)
        print(
            f"  baseline: raw psycopg batched UPDATE, the seed's plain table (3 indexes, no "
            f"triggers): {raw_rate:,.0f} rows/s; bssagent / raw = {rate / raw_rate:.2f}x"
        )
        probes = []
        for _ in range(25):
            start = time.perf_counter()
            assert big.cleanup_inactive_sessions(3600) == 0
            probes.append(time.perf_counter() - start)
        probe = statistics.median(probes)
        ok = verdict(probe < 0.010)
        print(f"  idle probe (nothing to expire): median {probe * 1e3:.2f} ms, max "
              f"{max(probes) * 1e3:.2f} ms  (target < 10 ms)  {ok}")  # fmt: skip
        stats = big.get_stats()
        print(f"  stats after: {stats.sessions:,} sessions, {stats.open_sessions:,} open "
              f"(expected {rows - idle:,})")  # fmt: skip


def retention(url: str, threads: int, turns: int) -> None:
    print(f"\n== 3. retention: {threads} ended threads x {turns} turns (one-node graph)")
    with AgentSessionManager(database_url=url, table_name="ret") as manager:
        agent = EchoAgent(session_manager=manager)
        try:
            users = [f"ret-{i}" for i in range(threads)]
            ids = [manager.get_or_create_user_session(u).thread_id for u in users]

            def talk(user: str) -> None:
                for t in range(turns):
                    agent.invoke({"messages": [f"turn {t} of {user}"]}, user_id=user)

            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(talk, users))
            took = time.perf_counter() - start
            print(f"  {threads * turns:,} turns in {took:.1f} s ({threads * turns / took:,.0f}/s)")
            for u in users:
                manager.end_session(u)
            sample = {"configurable": {"thread_id": ids[0]}}
            messages = len(agent.get_state(sample).values["messages"])
            assert messages == 2 * turns, messages

            before = show_bytes("before retention", checkpoint_bytes(url, ids), relation_bytes(url))
            start = time.perf_counter()
            done = manager.apply_retention(0, "keep_latest")
            took = time.perf_counter() - start
            kept = show_bytes(
                'after "keep_latest"', checkpoint_bytes(url, ids), relation_bytes(url)
            )
            assert len(agent.get_state(sample).values["messages"]) == messages
            print(f"  keep_latest: {done} threads in {took:.2f} s; latest state intact "
                  f"({messages} messages); payload x{kept / before:.4f} "
                  f"({before / max(kept, 1):,.0f}x smaller)")  # fmt: skip
            # Each thread is retained once; clear the marks so "delete" applies to the same ones.
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute('UPDATE "ret" SET retained_at = NULL')
            start = time.perf_counter()
            done = manager.apply_retention(0, "delete")
            took = time.perf_counter() - start
            show_bytes('after "delete"', checkpoint_bytes(url, ids), relation_bytes(url))
            print(f"  delete: {done} threads in {took:.2f} s")
        finally:
            agent.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--idle", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=100)
    parser.add_argument("--turns", type=int, default=100)
    parser.add_argument("--parts", default="123", help="which parts to run, e.g. 12 or 3")
    args = parser.parse_args()

    name = f"bench_lifecycle_{uuid.uuid4().hex[:8]}"
    admin = urlsplit(URL)._replace(path="/postgres").geturl()
    url = urlsplit(URL)._replace(path=f"/{name}").geturl()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        version = conn.execute("SHOW server_version").fetchone()[0]
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(f"PostgreSQL {version}, fresh database {name}, {os.cpu_count()} CPUs{load}\n")
    try:
        if "1" in args.parts or "2" in args.parts:
            lookup_and_expiry(url, args.rows, args.idle)
        if "3" in args.parts:
            retention(url, args.threads, args.turns)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        print(f"\n(dropped {name})")


if __name__ == "__main__":
    main()
