"""Several replicas on one PostgreSQL: a change made by one reaches the others' caches within
1 s through LISTEN/NOTIFY (migration 0003), sync and async.

Each replica is a manager with its own cache (and, in one test, a separate process). The
database stays the source of truth; these tests check that the caches stop serving what it
no longer says.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import psycopg
import pytest
from faults import Driver, make

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]
KINDS = ["sync", "async"]


async def until(predicate: Any, within: float) -> float:
    """Seconds until ``await predicate()`` is true; fails after ``within`` seconds."""
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < within, f"not within {within} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def feed_connected(d: Driver) -> bool:
    return d.manager._feed is not None and d.manager._feed.connected


@pytest.mark.parametrize("kind", KINDS)
async def test_a_change_by_one_replica_reaches_the_others_cache(
    kind: str, drivers: list[Driver], pg_url: str, table_name: str
) -> None:
    a = make(drivers, kind, database_url=pg_url, table_name=table_name, cache_ttl=3600)
    b = make(drivers, "sync", database_url=pg_url, table_name=table_name)
    first = await a("get_or_create_user_session", "alice")  # cached by a for an hour
    await until(lambda: feed_connected(a), 5)

    second = await b("create_user_session", "alice")  # b starts a new chat

    async def a_sees_it() -> bool:
        current = await a("get_or_create_user_session", "alice")
        return bool(current.thread_id == second.thread_id)

    took = await until(a_sees_it, 1.0)
    assert first.thread_id != second.thread_id
    # Title, end and delete reach a too.
    await b("update_session", "alice", {"title": "renamed"})
    await until(lambda: _title_is(a, "alice", "renamed"), 1.0)
    await b("end_session", "alice")

    async def a_has_no_current() -> bool:
        return not await a("has_session", "alice")

    await until(a_has_no_current, 1.0)
    assert took < 1.0


async def _title_is(d: Driver, user: str, title: str) -> bool:
    return bool((await d("get_or_create_user_session", user)).title == title)


async def test_a_change_by_another_process_arrives_within_a_second(
    drivers: list[Driver], pg_url: str, table_name: str
) -> None:
    a = make(drivers, "async", database_url=pg_url, table_name=table_name, cache_ttl=3600)
    await a("get_or_create_user_session", "bob")
    await until(lambda: feed_connected(a), 5)
    script = (
        "import sys, time\n"
        "from bssagent import AgentSessionManager\n"
        "with AgentSessionManager(database_url=sys.argv[1], table_name=sys.argv[2]) as m:\n"
        "    s = m.create_user_session('bob')\n"
        "    print(s.thread_id, time.time(), flush=True)\n"
    )
    # In a thread: the event loop keeps serving a's change feed meanwhile.
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", script, pg_url, table_name],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    out = done.stdout.split()
    thread, committed = out[0], float(out[1])

    async def a_sees_it() -> bool:
        return bool((await a("get_or_create_user_session", "bob")).thread_id == thread)

    while not await a_sees_it():
        assert time.time() - committed < 1.0, "the other process's change took over 1 s"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("kind", KINDS)
async def test_own_writes_keep_the_cache_and_bulk_changes_flush_it(
    kind: str, drivers: list[Driver], pg_url: str, table_name: str
) -> None:
    a = make(drivers, kind, database_url=pg_url, table_name=table_name, cache_ttl=3600)
    b = make(drivers, "sync", database_url=pg_url, table_name=table_name)
    await a("get_or_create_user_session", "warm")
    await until(lambda: feed_connected(a), 5)
    mine = await a("create_user_session", "carol")
    await asyncio.sleep(0.3)  # a's own notification has arrived by now, and was skipped
    assert a.manager._state.cache.get("carol") == mine

    users = [f"bulk-{i}" for i in range(30)]
    for user in users:
        await a("get_or_create_user_session", user)
    assert await b("cleanup_inactive_sessions", 0) >= 30  # one statement, 30+ users

    async def flushed() -> bool:
        return all(a.manager._state.cache.get(u) is None for u in users)

    await until(flushed, 1.0)
    fresh = await a("get_or_create_user_session", "bulk-0")
    assert fresh.status == "active"  # not the expired session a had cached


@pytest.mark.parametrize("kind", KINDS)
async def test_a_lost_feed_connection_flushes_the_cache_and_reconnects(
    kind: str, drivers: list[Driver], pg_url: str, table_name: str
) -> None:
    a = make(
        drivers, kind, database_url=pg_url, table_name=table_name, cache_ttl=3600,
        reconnect_interval=0.2,
    )  # fmt: skip
    await a("get_or_create_user_session", "dave")
    await until(lambda: feed_connected(a), 5)
    await a("get_or_create_user_session", "dave")  # cached again after the feed's first flush
    assert a.manager._state.cache.get("dave") is not None
    with psycopg.connect(pg_url, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE %s",
            (f'LISTEN "{table_name}_changes"%',),
        ).fetchall()
    assert killed, "the listener connection was not found"

    async def flushed() -> bool:
        return a.manager._state.cache.get("dave") is None

    await until(flushed, 2.0)
    await until(lambda: feed_connected(a), 5)  # back, after reconnect_interval


async def test_without_notifications_staleness_is_bounded_by_the_ttl(
    drivers: list[Driver], pg_url: str, table_name: str
) -> None:
    options = {"database_url": pg_url, "table_name": table_name, "notifications": False}
    a = make(drivers, "sync", cache_ttl=0.5, **options)
    b = make(drivers, "sync", **options)
    await a("get_or_create_user_session", "erin")
    assert a.manager._feed is None
    new = await b("create_user_session", "erin")

    async def a_sees_it() -> bool:
        return bool((await a("get_or_create_user_session", "erin")).thread_id == new.thread_id)

    assert not await a_sees_it()  # stale: the cache is trusted for cache_ttl
    await until(a_sees_it, 1.0)


def test_an_async_manager_serves_one_event_loop_after_another(pg_url: str, table_name: str) -> None:
    """``asyncio.run`` three times with one async manager: each loop gets its own pool and
    change feed (another replica's change reaches the cache every time), the pool ends with
    its loop, and close() works from yet another loop."""
    from bssagent import AgentSessionManager, AsyncAgentSessionManager

    m = AsyncAgentSessionManager(database_url=pg_url, table_name=table_name)
    other = AgentSessionManager(database_url=pg_url, table_name=table_name, cache_size=0)

    async def replaced_session_is_seen() -> None:
        await m.get_or_create_user_session("alice")  # cached
        newer = other.create_user_session("alice")  # another replica replaces it
        started = time.monotonic()
        while (await m.get_or_create_user_session("alice")).thread_id != newer.thread_id:
            assert time.monotonic() - started < 2, "the change did not reach this loop's cache"
            await asyncio.sleep(0.02)

    try:
        for _ in range(3):
            asyncio.run(replaced_session_is_seen())
            # The loop's pool went with the loop (closed, and nothing here keeps it).
            assert not m.store._pools._values
        asyncio.run(m.close())
    finally:
        other.close()


def test_an_async_agent_serves_one_event_loop_after_another(pg_url: str, table_name: str) -> None:
    """The agent's savers, stores and run locks are per event loop too: a conversation goes
    on across ``asyncio.run`` calls, and each loop's pools end with it."""
    from faults import Counter

    from bssagent import AsyncAgentSessionManager

    agent = Counter(session_manager=AsyncAgentSessionManager(database_url=pg_url,
                                                             table_name=table_name))  # fmt: skip

    async def turn(text: str) -> str:
        result = await agent.ainvoke({"messages": [text]}, user_id="alice")
        return str(result["messages"][-1].text)

    replies = []
    for n in range(3):
        replies.append(asyncio.run(turn(f"turn {n}")))
        assert not agent._persistence._async  # this loop's saver pool went with it
        assert not agent._locks._pools._values  # and its run-lock pool
    assert replies == ["1 messages", "3 messages", "5 messages"]
    asyncio.run(agent.aclose())
