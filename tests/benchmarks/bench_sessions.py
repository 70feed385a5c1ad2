"""Benchmark: get_or_create_user_session against raw baselines, side by side, as ratios.

    BSSAGENT_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test \\
        .venv/bin/python tests/benchmarks/bench_sessions.py [--quick]

In a fresh database (dropped at the end), with the sync ``AgentSessionManager`` (callers are
threads) and the async ``AsyncAgentSessionManager`` (callers are asyncio tasks), each at 1
and at 16 concurrent callers:

- **cache hit**: a cached user, against a dict lookup;
- **cache miss**: an existing user with ``cache_size=0``, against a raw psycopg point query
  with the manager's WHERE clause on the same table;
- **new user**: a never-seen user (locked insert, triggers, commit), against a raw psycopg
  ``INSERT ... RETURNING`` of one row into the seed's plain session table.

The raw side uses psycopg like the manager's side: ``psycopg.Connection`` for sync,
``AsyncConnection`` for async, one reused connection for 1 caller, and for 16 callers a
``psycopg_pool`` pool of the manager's size (``pool_max_size``), so both sides queue for
connections alike. The two sides' batches alternate; figures are medians of the batches'
time per call. With 16 callers a figure is wall time ÷ calls, i.e. 1 / throughput.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import psycopg
from common import (
    PLAIN_TABLE_DDL,
    Row,
    ainterleave,
    arun_batch,
    fmt_rate,
    fmt_time,
    fresh_database,
    gathered_batch,
    interleave,
    ratio,
    run_batch,
    standalone,
    threaded_batch,
)
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from bssagent import AgentSessionManager, AsyncAgentSessionManager

CALLERS = (1, 16)
TABLE, PLAIN = "sessions", "plain_sessions"
POINT_QUERY = (
    "SELECT id, namespace, user_id, thread_id, title, metadata, created_at, updated_at,"
    f' is_active FROM "{TABLE}" WHERE namespace = %s AND user_id = %s AND is_active'
)
INSERT = f'INSERT INTO "{PLAIN}" (user_id, thread_id) VALUES (%s, %s) RETURNING *'
# Hot managers keep their entries for the whole run: with the default 60 s TTL, a long run
# would turn some "hits" into database reads.
LONG_TTL = 3600.0


@dataclass(frozen=True)
class Sizes:
    users: int
    hit: int  # calls per batch (all callers together)
    miss: int
    new: int
    rounds: int


FULL = Sizes(users=2000, hit=20_000, miss=1000, new=300, rounds=7)
QUICK = Sizes(users=500, hit=4000, miss=320, new=96, rounds=5)

SyncCall = Callable[[int], object]
AsyncCall = Callable[[int], Awaitable[object]]
Call = TypeVar("Call", SyncCall, AsyncCall)


@dataclass(frozen=True)
class Case(Generic[Call]):
    """One comparison: bssagent's call and the baseline's, ``calls`` per batch."""

    name: str
    ours: Call
    base: Call
    base_name: str
    calls: int


def new_user() -> str:
    return f"new-{uuid.uuid4()}"


def new_row(_: int) -> tuple[str, str]:
    return new_user(), str(uuid.uuid4())


def sync_side(
    fn: SyncCall, calls: int, callers: int, threads: ThreadPoolExecutor
) -> Callable[[], float]:
    """One batch of ``calls`` calls, shared by ``callers`` threads (inline for one)."""
    n = calls // callers
    if callers == 1:
        return lambda: run_batch(fn, n)
    return lambda: threaded_batch(fn, n, callers, threads)


def async_side(fn: AsyncCall, calls: int, callers: int) -> Callable[[], Awaitable[float]]:
    """One batch of ``calls`` calls, shared by ``callers`` tasks."""
    n = calls // callers
    if callers == 1:
        return lambda: arun_batch(fn, n)
    return lambda: gathered_batch(fn, n, callers)


def report(
    kind: str, case: Case[SyncCall] | Case[AsyncCall], callers: int, ours: float, base: float
) -> Row:
    """Print one comparison and return its summary row."""
    each = "caller" if callers == 1 else "callers"
    rate = f" ({fmt_rate(1 / ours, 'calls')})" if callers > 1 else ""
    base_rate = f" ({fmt_rate(1 / base, 'calls')})" if callers > 1 else ""
    print(
        f"  {kind:<6}{case.name:<28}{callers:>4} {fmt_time(ours):>10}{fmt_time(base):>10}"
        f"{ours / base:>8.2f}x  vs {case.base_name}"
    )
    return Row(
        f"`get_or_create_user_session`, {kind}, {case.name}, {callers} {each}",
        fmt_time(ours) + rate,
        f"{case.base_name} {fmt_time(base)}{base_rate}",
        ratio(ours, base),
    )


def sync_rows(url: str, sizes: Sizes, users: list[str]) -> list[Row]:
    with (
        AgentSessionManager(database_url=url, table_name=TABLE, cache_ttl=LONG_TTL) as hot,
        AgentSessionManager(database_url=url, table_name=TABLE, cache_size=0) as cold,
        psycopg.connect(url, autocommit=True) as conn,
        ConnectionPool(
            url,
            min_size=cold.settings.pool_min_size,
            max_size=cold.settings.pool_max_size,
            kwargs={"autocommit": True},
        ) as pool,
        ThreadPoolExecutor(max_workers=max(CALLERS)) as threads,
    ):
        conn.execute(PLAIN_TABLE_DDL.format(f'"{PLAIN}"'))
        plain = {u: hot.get_or_create_user_session(u) for u in users}
        # As autovacuum soon would: without statistics on a fresh table, the planner may
        # pick the namespace-wide active index for a one-user lookup.
        conn.execute(f'ANALYZE "{TABLE}"')

        def raw(sql: str, params: Callable[[int], tuple[str, ...]], callers: int) -> SyncCall:
            if callers == 1:
                return lambda i: conn.execute(sql, params(i)).fetchone()

            def pooled(i: int) -> object:
                with pool.connection() as c:
                    return c.execute(sql, params(i)).fetchone()

            return pooled

        def user(i: int) -> str:
            return users[i % len(users)]

        def existing(i: int) -> tuple[str, str]:
            return ("default", user(i))

        rows = []
        for callers in CALLERS:
            via = "1 connection" if callers == 1 else f"pool of {pool.max_size}"
            cases = [
                Case("cache hit", lambda i: hot.get_or_create_user_session(user(i)),
                     lambda i: plain[user(i)], "dict lookup", sizes.hit),
                Case("cache miss (existing user)",
                     lambda i: cold.get_or_create_user_session(user(i)),
                     raw(POINT_QUERY, existing, callers),
                     f"psycopg point query ({via})", sizes.miss),
                Case("new user", lambda i: cold.get_or_create_user_session(new_user()),
                     raw(INSERT, new_row, callers), f"psycopg INSERT ({via})", sizes.new),
            ]  # fmt: skip
            for case in cases:
                got = interleave(
                    {
                        "ours": sync_side(case.ours, case.calls, callers, threads),
                        "base": sync_side(case.base, case.calls, callers, threads),
                    },
                    sizes.rounds,
                )
                rows.append(report("sync", case, callers, got["ours"], got["base"]))
    return rows


async def async_rows(url: str, sizes: Sizes, users: list[str]) -> list[Row]:
    async with (
        AsyncAgentSessionManager(database_url=url, table_name=TABLE, cache_ttl=LONG_TTL) as hot,
        AsyncAgentSessionManager(database_url=url, table_name=TABLE, cache_size=0) as cold,
        await psycopg.AsyncConnection.connect(url, autocommit=True) as conn,
        AsyncConnectionPool(
            url,
            min_size=cold.settings.pool_min_size,
            max_size=cold.settings.pool_max_size,
            kwargs={"autocommit": True},
        ) as pool,
    ):
        plain = {u: await hot.get_or_create_user_session(u) for u in users}

        def raw(sql: str, params: Callable[[int], tuple[str, ...]], callers: int) -> AsyncCall:
            async def direct(i: int) -> object:
                return await (await conn.execute(sql, params(i))).fetchone()

            async def pooled(i: int) -> object:
                async with pool.connection() as c:
                    return await (await c.execute(sql, params(i))).fetchone()

            return direct if callers == 1 else pooled

        def user(i: int) -> str:
            return users[i % len(users)]

        def existing(i: int) -> tuple[str, str]:
            return ("default", user(i))

        # A coroutine, as the batch awaits every call: the baseline includes one await too.
        async def lookup(i: int) -> object:
            return plain[user(i)]

        rows = []
        for callers in CALLERS:
            via = "1 AsyncConnection" if callers == 1 else f"async pool of {pool.max_size}"
            cases = [
                Case("cache hit", lambda i: hot.get_or_create_user_session(user(i)),
                     lookup, "dict lookup", sizes.hit),
                Case("cache miss (existing user)",
                     lambda i: cold.get_or_create_user_session(user(i)),
                     raw(POINT_QUERY, existing, callers),
                     f"psycopg point query ({via})", sizes.miss),
                Case("new user", lambda i: cold.get_or_create_user_session(new_user()),
                     raw(INSERT, new_row, callers), f"psycopg INSERT ({via})", sizes.new),
            ]  # fmt: skip
            for case in cases:
                got = await ainterleave(
                    {
                        "ours": async_side(case.ours, case.calls, callers),
                        "base": async_side(case.base, case.calls, callers),
                    },
                    sizes.rounds,
                )
                rows.append(report("async", case, callers, got["ours"], got["base"]))
    return rows


def run(url: str, quick: bool) -> list[Row]:
    sizes = QUICK if quick else FULL
    print(f"== sessions: get_or_create_user_session, {sizes.users:,} existing users")
    users = [f"user-{i}" for i in range(sizes.users)]
    with fresh_database(url, "bench_sessions") as db:
        print(f"  {'':<34}{'callers':>7}{'bssagent':>10}{'baseline':>10}{'ratio':>9}")
        rows = sync_rows(db, sizes, users)
        rows += asyncio.run(async_rows(db, sizes, users))
    return rows


if __name__ == "__main__":
    standalone(run, __doc__)
