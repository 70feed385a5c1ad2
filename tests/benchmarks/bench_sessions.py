"""Benchmark: get_or_create_user_session against raw baselines, side by side, as ratios.

    BSSAGENT_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test \\
        .venv/bin/python tests/benchmarks/bench_sessions.py

Baselines run in the same process on the same table: a dict lookup (what a cache hit
competes with) and a raw psycopg primary-key-style point query on a reused connection (what
a cache miss competes with). Figures are medians of repeated batches.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from collections.abc import Callable

import psycopg

from bssagent import AgentSessionManager

URL = os.environ.get("BSSAGENT_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
USERS = 2000


def per_op(fn: Callable[[int], object], n: int, batches: int = 7) -> float:
    """Median seconds per call of ``fn(i)`` over ``batches`` batches of ``n`` calls."""
    results = []
    for _ in range(batches):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        results.append((time.perf_counter() - start) / n)
    return statistics.median(results)


def main() -> None:
    table = f"bench_{uuid.uuid4().hex[:8]}"
    users = [f"user-{i}" for i in range(USERS)]
    try:
        with (
            AgentSessionManager(database_url=URL, table_name=table) as hot,
            AgentSessionManager(database_url=URL, table_name=table, cache_size=0) as cold,
            psycopg.connect(URL, autocommit=True) as conn,
        ):
            for u in users:
                hot.get_or_create_user_session(u)
            plain = {u: hot.get_or_create_user_session(u) for u in users}
            # As autovacuum soon would: without statistics on a fresh table, the planner may
            # pick the namespace-wide active index for a one-user lookup.
            conn.execute(f'ANALYZE "{table}"')
            query = (
                f"SELECT id, namespace, user_id, thread_id, title, metadata, created_at, "
                f'updated_at, is_active FROM "{table}" '
                "WHERE namespace = %s AND user_id = %s AND is_active"
            )

            rows = [
                ("dict lookup (baseline)", per_op(lambda i: plain[users[i % USERS]], 20000)),
                ("get_or_create, cache hit", per_op(
                    lambda i: hot.get_or_create_user_session(users[i % USERS]), 20000)),
                ("raw psycopg point query (baseline)", per_op(
                    lambda i: conn.execute(query, ("default", users[i % USERS])).fetchone(), 1000)),
                ("get_or_create, cache miss (existing user)", per_op(
                    lambda i: cold.get_or_create_user_session(users[i % USERS]), 1000)),
                ("get_or_create, new user", per_op(
                    lambda i: cold.get_or_create_user_session(f"new-{uuid.uuid4()}"), 300)),
            ]  # fmt: skip
    finally:
        with psycopg.connect(URL, autocommit=True) as conn:
            for suffix in ("", "_stats", "_events", "_tombstones"):
                conn.execute(f'DROP TABLE IF EXISTS "{table}{suffix}" CASCADE')
            for op in ("insert", "update", "delete"):
                conn.execute(f'DROP FUNCTION IF EXISTS "{table}_track_{op}"()')
            conn.execute("DELETE FROM bssagent_migrations WHERE target = %s", (table,))
    base = {"hit": rows[0][1], "miss": rows[2][1]}
    print(f"{'operation':<44}{'µs/op':>10}{'ratio':>10}  vs")
    for name, seconds in rows:
        ref, ref_name = (
            (base["hit"], "dict") if "hit" in name or "dict" in name else (base["miss"], "psycopg")
        )
        print(f"{name:<44}{seconds * 1e6:>10.1f}{seconds / ref:>9.2f}x  {ref_name}")


if __name__ == "__main__":
    main()
