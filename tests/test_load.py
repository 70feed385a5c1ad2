"""Load: several processes at a steady rate against one PostgreSQL, for 30 s in CI.

Each worker process (its own managers and agent, as a replica would have) mixes
``get_or_create_user_session`` over a few hundred users, new chats, request counters,
preferences and agent turns at a fixed pace. Checked: zero errors, a bounded p99, database
connections bounded by the pools, and memory flat (resident size at the end within a margin
of what it was after warm-up). ``BSSAGENT_LOAD_SECONDS`` makes it a longer soak on demand.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import statistics
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import psycopg
import pytest
from test_lifecycle import drop_postgres_tables

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
SECONDS = float(os.environ.get("BSSAGENT_LOAD_SECONDS", "30"))
WORKERS = 3
RATE = 60.0  # operations per second per worker
POOL = 4  # each worker's session pool (and checkpoint pool) at most


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(url: str, table: str, seed: int, seconds: float) -> dict[str, Any]:
    """One replica under steady load; returns latencies per operation, errors and memory."""
    from langchain_core.messages import AIMessage
    from langgraph.graph import END, START, MessagesState, StateGraph

    from bssagent import AgentSessionManager, BaseAgent

    class Echo(BaseAgent):
        def define_graph(self) -> Any:
            graph = StateGraph(MessagesState)
            graph.add_node("reply", lambda state: {"messages": [AIMessage("ok")]})
            graph.add_edge(START, "reply")
            graph.add_edge("reply", END)
            return graph

    rng = random.Random(seed)
    users = [f"load-{seed}-{i}" for i in range(200)] + [f"shared-{i}" for i in range(50)]
    latencies: dict[str, list[float]] = {}
    errors: list[str] = []
    memory: list[int] = []
    with AgentSessionManager(
        database_url=url, table_name=table, namespace=table, pool_max_size=POOL, pool_timeout=5.0
    ) as sessions, Echo("load", session_manager=sessions) as agent:  # fmt: skip
        operations = {
            "get_or_create": lambda u: sessions.get_or_create_user_session(u),
            "new_chat": lambda u: sessions.create_user_session(u),
            "record_request": lambda u: sessions.record_request(
                u, sessions.get_or_create_user_session(u).thread_id, processing_time=0.01
            ),
            "preferences": lambda u: sessions.set_user_preferences(u, {"n": rng.random()}),
            "agent_turn": lambda u: agent.invoke({"messages": ["hi"]}, user_id=u),
        }
        weights = [70, 5, 10, 7, 8]
        started = time.monotonic()
        tick = 0
        while (now := time.monotonic()) - started < seconds:
            if not memory and now - started > min(5.0, seconds / 3):
                memory.append(rss_bytes())  # after warm-up
            name = rng.choices(list(operations), weights)[0]
            user = rng.choice(users)
            began = time.perf_counter()
            try:
                operations[name](user)
            except Exception:
                errors.append(f"{name}: {traceback.format_exc(limit=3)}")
            latencies.setdefault(name, []).append(time.perf_counter() - began)
            tick += 1
            pause = started + tick / RATE - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        memory.append(rss_bytes())
        degraded = sessions.is_degraded
    return {"latencies": latencies, "errors": errors, "memory": memory, "degraded": degraded}


def connections(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchone()
    return int(row[0]) if row else 0


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 100 else max(values)


def test_steady_load_from_several_processes(pg_url: str, table_name: str) -> None:
    baseline = connections(pg_url)
    peak = 0
    try:
        with ProcessPoolExecutor(WORKERS, mp_context=mp.get_context("spawn")) as pool:
            futures = [
                pool.submit(worker, pg_url, table_name, seed, SECONDS) for seed in range(WORKERS)
            ]
            while not all(f.done() for f in futures):
                peak = max(peak, connections(pg_url) - baseline)
                time.sleep(0.5)
            results = [f.result() for f in futures]
    finally:
        drop_postgres_tables(pg_url, table_name)
        with psycopg.connect(pg_url, autocommit=True) as conn:  # the workers' preferences
            if conn.execute("SELECT to_regclass('store')").fetchone()[0]:
                conn.execute(
                    "DELETE FROM store WHERE prefix LIKE %s", (f"bssagent.{table_name}.%",)
                )

    errors = [e for r in results for e in r["errors"]]
    assert not errors, f"{len(errors)} errors, first: {errors[0]}"
    assert not any(r["degraded"] for r in results)
    merged: dict[str, list[float]] = {}
    for r in results:
        for name, values in r["latencies"].items():
            merged.setdefault(name, []).extend(values)
    done = sum(len(v) for v in merged.values())
    assert done >= WORKERS * RATE * SECONDS * 0.8, f"only {done} operations"
    all_ops = [v for values in merged.values() for v in values]
    assert p99(merged["get_or_create"]) < 0.05  # a cache hit or one indexed read
    assert p99(all_ops) < 0.25
    # Per worker: the session pool, the checkpoint/store pool, run locks taken one at a time
    # (a few connections), and the change feed's one.
    growth = [r["memory"][1] / r["memory"][0] for r in results]
    print(
        f"\n{WORKERS} processes x {SECONDS:g} s: {done} operations, p99 get_or_create "
        f"{p99(merged['get_or_create']) * 1e3:.1f} ms, p99 all {p99(all_ops) * 1e3:.1f} ms, "
        f"peak connections {peak}, memory end/warm {max(growth):.3f}"
    )
    assert 0 < peak <= WORKERS * (2 * POOL + 4 + 1), f"{peak} connections"
    for r in results:
        warm, end = r["memory"]
        assert end <= warm * 1.25 + 20e6, f"memory grew from {warm / 1e6:.0f} to {end / 1e6:.0f} MB"
