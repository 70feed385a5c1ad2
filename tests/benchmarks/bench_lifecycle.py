"""Benchmark: session lifecycle at scale on PostgreSQL, against raw baselines and the issue's
targets.

    BSSAGENT_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test \\
        .venv/bin/python tests/benchmarks/bench_lifecycle.py [--quick]

Runs in a fresh database (CREATE DATABASE, dropped at the end):

1. **Lookup scaling** — ``get_current_user_session`` with ``cache_size=0`` on a 1,000,000-row
   table vs a 1,000-row table (target: ratio <= 1.2), interleaved with a raw psycopg point
   query on each table. Tables are created through the manager (migrations, triggers), then
   filled with one ``INSERT ... SELECT generate_series`` (the triggers keep the statistics
   and the event log, as for any write).
2. **Expiry** — ``cleanup_inactive_sessions`` expiring 100,000 idle sessions of the big
   table in batches (target: >= 30,000 rows/s), then a raw psycopg batched ``UPDATE`` doing
   the same to the seed's plain table (one after the other: expiry is destructive). Then the
   idle probe, a cleanup with nothing to do (target: < 10 ms), interleaved with the raw
   ``UPDATE`` finding nothing.
3. **Retention** — 100 threads x 100 turns through an agent (one-node graph), the sessions
   ended, then checkpoint bytes before / after ``apply_retention(0, "keep_latest")`` and
   after ``"delete"``.

``--quick`` shrinks every size (the targets are for the full sizes). The figures are
wall-clock: run it on an otherwise idle machine.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
from common import (
    PLAIN_TABLE_DDL,
    TIMES,
    Row,
    fmt_bytes,
    fmt_rate,
    fmt_time,
    fresh_database,
    interleave,
    ratio,
    run_batch,
    standalone,
    verdict,
)
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, MessagesState, StateGraph

from bssagent import AgentSessionManager, BaseAgent

CHECKPOINT_TABLES = ("checkpoints", "checkpoint_blobs", "checkpoint_writes")
SMALL_ROWS = 1000


@dataclass(frozen=True)
class Sizes:
    rows: int  # sessions in the big table
    idle: int  # of which idle, to expire
    threads: int  # retention: conversations
    turns: int  # retention: turns each


FULL = Sizes(rows=1_000_000, idle=100_000, threads=100, turns=100)
QUICK = Sizes(rows=100_000, idle=10_000, threads=20, turns=20)


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


# The plain way to expire: one batch of idle rows of the seed's table per statement.
RAW_EXPIRE = (
    "UPDATE raw_sessions SET is_active = FALSE WHERE id IN (SELECT id FROM raw_sessions"
    " WHERE is_active AND updated_at < now() - interval '1 hour' ORDER BY updated_at"
    " LIMIT %s FOR UPDATE SKIP LOCKED)"
)


def raw_expiry(conn: psycopg.Connection[Any], rows: int, idle: int, batch: int) -> float:
    """Rows/s of the plain way: the seed's table (no lifecycle columns, no triggers, a partial
    index on ``updated_at WHERE is_active``), expired by batched ``UPDATE``s from raw psycopg."""
    conn.execute(PLAIN_TABLE_DDL.format("raw_sessions"))
    conn.execute("CREATE INDEX raw_sessions_idle_idx ON raw_sessions (updated_at) WHERE is_active")
    conn.execute(
        "INSERT INTO raw_sessions (user_id, thread_id, updated_at)"
        " SELECT 'user-' || i, gen_random_uuid()::text, CASE WHEN i <= %s"
        " THEN now() - interval '2 hours' ELSE now() END FROM generate_series(1, %s) AS i",
        (idle, rows),
    )
    conn.execute("VACUUM ANALYZE raw_sessions")
    done, start = 0, time.perf_counter()
    while (n := conn.execute(RAW_EXPIRE, (batch,)).rowcount) > 0:
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
    counts = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for name in CHECKPOINT_TABLES:
            row = conn.execute(
                f"SELECT count(*), coalesce(sum({payload[name]}), 0) FROM {name}"
                " WHERE thread_id = ANY(%s)",
                (threads,),
            ).fetchone()
            assert row is not None
            counts[name] = (int(row[0]), int(row[1]))
    return counts


def relation_bytes(url: str) -> int:
    """pg_total_relation_size of the checkpoint tables after VACUUM FULL (disk actually held)."""
    total = 0
    with psycopg.connect(url, autocommit=True) as conn:
        for name in CHECKPOINT_TABLES:
            conn.execute(f"VACUUM FULL {name}")
            row = conn.execute("SELECT pg_total_relation_size(%s)", (name,)).fetchone()
            assert row is not None
            total += int(row[0])
    return total


def show_bytes(label: str, url: str, threads: list[str]) -> tuple[int, int]:
    """Print and return (payload bytes, disk bytes) of the checkpoints of ``threads``."""
    counts, disk = checkpoint_bytes(url, threads), relation_bytes(url)
    total = sum(b for _, b in counts.values())
    parts = "  ".join(f"{n}: {r:>6} rows {fmt_bytes(b):>9}" for n, (r, b) in counts.items())
    print(f"  {label:<20} {fmt_bytes(total):>9} payload {fmt_bytes(disk):>9} on disk | {parts}")
    return total, disk


def walking(fn: Callable[[int], object], n: int) -> Callable[[], float]:
    """Batches of ``n`` calls of ``fn(i)``, each batch going on where the last one stopped,
    so that a list indexed by ``i`` is walked rather than repeated."""
    batches = itertools.count()
    return lambda: run_batch(fn, n, next(batches) * n)


def lookup_and_expiry(url: str, rows: int, idle: int) -> list[Row]:
    print(f"== lifecycle 1. lookup scaling: get_current_user_session, cache_size=0, {rows:,} "
          f"vs {SMALL_ROWS:,} rows")  # fmt: skip
    small_idle = max(1, idle * SMALL_ROWS // rows)
    with (
        AgentSessionManager(database_url=url, table_name="big", cache_size=0) as big,
        AgentSessionManager(database_url=url, table_name="small", cache_size=0) as small,
        psycopg.connect(url, autocommit=True) as conn,
    ):
        big.get_stats()  # creates the tables: migrations and triggers
        small.get_stats()
        took = fill(url, "big", rows, idle)
        print(f"  filled {rows:,} rows in {took:.1f} s ({rows / took:,.0f} rows/s, triggers on)")
        fill(url, "small", SMALL_ROWS, small_idle)
        assert big.get_stats().sessions == rows
        rng = random.Random(7)
        big_users = [f"user-{rng.randint(idle + 1, rows)}" for _ in range(50_000)]
        small_users = [f"user-{rng.randint(small_idle + 1, SMALL_ROWS)}" for _ in range(50_000)]
        query = 'SELECT id, thread_id FROM "{}" WHERE namespace = %s AND user_id = %s AND is_active'

        def lookup(m: AgentSessionManager, users: list[str]) -> Callable[[], float]:
            return walking(lambda i: m.get_current_user_session(users[i % len(users)]), 1000)

        def raw(table: str, users: list[str]) -> Callable[[], float]:
            q = query.format(table)
            return walking(
                lambda i: conn.execute(q, ("default", users[i % len(users)])).fetchone(), 1000
            )

        got = interleave(
            {
                "manager big": lookup(big, big_users),
                "manager small": lookup(small, small_users),
                "raw big": raw("big", big_users),
                "raw small": raw("small", small_users),
            },
            rounds=7,
        )
        scaling = got["manager big"] / got["manager small"]
        raw_scaling = got["raw big"] / got["raw small"]
        print(f"  {'':<40}{'per lookup':>12}")
        for name, label in (
            ("manager small", f"manager, {SMALL_ROWS:,} rows"),
            ("manager big", f"manager, {rows:,} rows"),
            ("raw small", f"raw psycopg point query, {SMALL_ROWS:,} rows"),
            ("raw big", f"raw psycopg point query, {rows:,} rows"),
        ):
            print(f"  {label:<40}{fmt_time(got[name]):>12}")
        ok = verdict(scaling <= 1.2)
        print(f"  ratio {rows:,} / {SMALL_ROWS:,} rows: manager {scaling:.3f}x "
              f"(target <= 1.2x) {ok}, raw {raw_scaling:.3f}x")  # fmt: skip
        lookup_rows = [
            Row(
                f"`get_current_user_session`, cache off, {size:,}-row table",
                fmt_time(got[f"manager {key}"]),
                f"raw psycopg point query {fmt_time(got[f'raw {key}'])}",
                ratio(got[f"manager {key}"], got[f"raw {key}"]),
            )
            for key, size in (("big", rows), ("small", SMALL_ROWS))
        ]
        lookup_rows.append(
            Row(
                f"lookup scaling, {rows:,} ÷ {SMALL_ROWS:,} rows",
                f"{scaling:.3f}{TIMES}",
                f"raw point query {raw_scaling:.3f}{TIMES}",
                f"target ≤ 1.2{TIMES}: {ok}",
            )
        )

        batch = big.settings.cleanup_batch_size
        print(f"\n== lifecycle 2. expiry: cleanup_inactive_sessions on {idle:,} idle of "
              f"{rows:,} sessions, batches of {batch:,}")  # fmt: skip
        start = time.perf_counter()
        expired = big.cleanup_inactive_sessions(3600)
        took = time.perf_counter() - start
        rate = expired / took
        ok = verdict(expired == idle and rate >= 30_000)
        print(f"  expired {expired:,} in {took:.2f} s: {fmt_rate(rate, 'rows')} "
              f"(target >= 30,000 rows/s) {ok}")  # fmt: skip
        raw_rate = raw_expiry(conn, rows, idle, batch)
        print(
            f"  baseline: raw psycopg batched UPDATE, the seed's plain table (3 indexes, no "
            f"triggers): {fmt_rate(raw_rate, 'rows')}; bssagent / raw = {rate / raw_rate:.2f}x"
        )
        probes: dict[str, list[float]] = {"manager": [], "raw": []}
        for _ in range(25):
            start = time.perf_counter()
            assert big.cleanup_inactive_sessions(3600) == 0
            middle = time.perf_counter()
            assert conn.execute(RAW_EXPIRE, (batch,)).rowcount == 0
            probes["manager"].append(middle - start)
            probes["raw"].append(time.perf_counter() - middle)
        probe, raw_probe = (statistics.median(probes[k]) for k in ("manager", "raw"))
        probe_ok = verdict(probe < 0.010)
        print(f"  idle probe (nothing to expire): median {fmt_time(probe)}, max "
              f"{fmt_time(max(probes['manager']))} (target < 10 ms) {probe_ok}; raw UPDATE "
              f"finding nothing: {fmt_time(raw_probe)}")  # fmt: skip
        stats = big.get_stats()
        print(f"  stats after: {stats.sessions:,} sessions, {stats.open_sessions:,} open "
              f"(expected {rows - idle:,})")  # fmt: skip
    return [
        *lookup_rows,
        Row(
            f"expiring {idle:,} idle of {rows:,} sessions, batches of {batch:,}",
            f"{fmt_rate(rate, 'rows')} ({took:.2f} s; events, stats, cascade)",
            f"raw psycopg batched `UPDATE` on the seed's plain table {fmt_rate(raw_rate, 'rows')}",
            f"{ratio(rate, raw_rate)} (target ≥ 30k rows/s: {ok})",
        ),
        Row(
            "idle cleanup probe (nothing to expire)",
            fmt_time(probe),
            f"raw `UPDATE` finding nothing {fmt_time(raw_probe)}",
            f"{ratio(probe, raw_probe)} (target < 10 ms: {probe_ok})",
        ),
    ]


def retention(url: str, threads: int, turns: int) -> list[Row]:
    print(f"\n== lifecycle 3. retention: {threads} ended threads x {turns} turns (one-node graph)")
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
            sample = RunnableConfig(configurable={"thread_id": ids[0]})
            messages = len(agent.get_state(sample).values["messages"])
            assert messages == 2 * turns, messages

            before, disk_before = show_bytes("before retention", url, ids)
            start = time.perf_counter()
            done = manager.apply_retention(0, "keep_latest")
            took = time.perf_counter() - start
            kept, disk_kept = show_bytes('after "keep_latest"', url, ids)
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
            deleted, disk_deleted = show_bytes('after "delete"', url, ids)
            print(f"  delete: {done} threads in {took:.2f} s")
        finally:
            agent.close()
    what = f"{threads} ended {turns}-turn threads, checkpoints"
    return [
        Row(
            f"{what} (payload)",
            f"{fmt_bytes(kept)} (`keep_latest`), {fmt_bytes(deleted)} (`delete`)",
            f"no retention {fmt_bytes(before)}",
            f"{ratio(kept, before)} ({before / max(kept, 1):,.0f}{TIMES} smaller)",
        ),
        # The tables hold only these threads: on disk after VACUUM FULL, indexes included.
        Row(
            f"{what} (on disk after `VACUUM FULL`)",
            f"{fmt_bytes(disk_kept)} (`keep_latest`), {fmt_bytes(disk_deleted)} (`delete`)",
            f"no retention {fmt_bytes(disk_before)}",
            ratio(disk_kept, disk_before),
        ),
    ]


def run(url: str, quick: bool) -> list[Row]:
    sizes = QUICK if quick else FULL
    with fresh_database(url, "bench_lifecycle") as db:
        rows = lookup_and_expiry(db, sizes.rows, sizes.idle)
        rows += retention(db, sizes.threads, sizes.turns)
    return rows


if __name__ == "__main__":
    standalone(run, __doc__)
