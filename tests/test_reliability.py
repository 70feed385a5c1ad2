"""Deadlines and the circuit breaker, against a real PostgreSQL behind a loopback proxy that
black-holes traffic (a hung server, or a network that drops everything).

* A black-holed call returns control within ``deadline`` + 100 ms, sync and async, without
  stalling the event loop; the fallback answers (``memory``), or a typed error does
  (``raise``), and the read-only fallback serves known users and refuses creation.
* After ``breaker_threshold`` failures the breaker opens: calls skip the database and take
  under 5 ms; after ``reconnect_interval`` one call probes; when the database answers, the
  breaker closes and what was written meanwhile is in PostgreSQL exactly once.
* Only connection-class failures and deadline expiries count: bad input, unknown sessions
  and other errors never open it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from faults import Counter, Driver, TcpProxy, make, rows_of

from bssagent import (
    AsyncAgentSessionManager,
    BaseAgent,
    InvalidInputError,
    SessionNotFoundError,
    StorageUnavailableError,
)

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]
KINDS = ["sync", "async"]
DEADLINE = 0.3
SLACK = 0.1  # the bound: deadline + 100 ms


async def timed(d: Driver, *call: Any) -> tuple[float, Any]:
    """Seconds the call took, and its result (or the exception it raised)."""
    started = time.perf_counter()
    try:
        result = await d(*call)
    except Exception as exc:
        result = exc
    return time.perf_counter() - started, result


def manager(
    drivers: list[Driver], kind: str, proxy: TcpProxy, pg_url: str, table: str, **options: Any
) -> Driver:
    settings = {
        "database_url": proxy.url(pg_url),
        "table_name": table,
        "deadline": DEADLINE,
        "breaker_threshold": 2,
        "reconnect_interval": 60.0,
        "cache_size": 0,  # every call goes to the database
        **options,
    }
    return make(drivers, kind, **settings)


@pytest.mark.parametrize("kind", KINDS)
async def test_black_holed_calls_return_within_the_deadline_and_the_breaker_opens(
    kind: str, drivers: list[Driver], proxy: TcpProxy, pg_url: str, table_name: str
) -> None:
    m = manager(drivers, kind, proxy, pg_url, table_name, reconnect_interval=1.0, cache_size=100)
    before = await m("get_or_create_user_session", "known")  # cached: known during the outage
    proxy.blackhole()

    # Closed breaker: each call tries the database and gives up at the deadline.
    for i in range(2):
        took, session = await timed(m, "get_or_create_user_session", f"outage-{i}")
        assert took < DEADLINE + SLACK, f"call {i} took {took:.3f} s"
        assert session.user_id == f"outage-{i}"  # served by the memory fallback
    health = m.manager.health()
    assert (health.status, health.reason, health.breaker) == (
        "degraded",
        "DeadlineExceeded",
        "open",
    )
    # Open breaker: straight to the fallback.
    for i in range(20):
        took, _ = await timed(m, "get_or_create_user_session", f"open-{i}")
        assert took < 0.005, f"an open breaker still waited {took * 1e3:.1f} ms"
    took, known = await timed(m, "get_current_user_session", "known")
    assert took < 0.005
    assert known.thread_id == before.thread_id  # known users keep their thread

    # Half-open: every reconnect_interval one call probes. Once the database answers, the
    # breaker closes and what was written meanwhile is replayed: within 10 s (a connection
    # abandoned during the outage may hold the pool's opening for up to connect_timeout).
    proxy.pass_()
    recovered_at, started, i = None, time.monotonic(), 0
    while time.monotonic() - started < 10:
        took, _ = await timed(m, "get_or_create_user_session", f"after-{i}")
        assert took < DEADLINE + SLACK
        i += 1
        if m.manager.health().status == "ok":
            recovered_at = time.monotonic() - started
            break
        await asyncio.sleep(0.1)
    assert recovered_at is not None, "not back to the database within 10 s"
    assert m.manager.health().breaker == "closed"
    users = [
        "outage-0",
        "outage-1",
        *(f"open-{j}" for j in range(20)),
        *(f"after-{j}" for j in range(i)),
    ]
    for user in users:
        assert len(rows_of(pg_url, table_name, user)) == 1, f"{user} is not in PostgreSQL once"


@pytest.mark.parametrize("kind", KINDS)
async def test_fallback_raise_fails_within_the_deadline_then_fast(
    kind: str, drivers: list[Driver], proxy: TcpProxy, pg_url: str, table_name: str
) -> None:
    m = manager(drivers, kind, proxy, pg_url, table_name, fallback="raise")
    await m("get_or_create_user_session", "known")
    proxy.blackhole()
    for _ in range(2):
        took, error = await timed(m, "get_or_create_user_session", "new")
        assert isinstance(error, StorageUnavailableError)
        assert "deadline" in str(error)
        assert took < DEADLINE + SLACK
    took, error = await timed(m, "list_active_sessions")
    assert isinstance(error, StorageUnavailableError)
    assert "unavailable since" in str(error)
    assert took < 0.005
    health = m.manager.health()
    assert (health.status, health.breaker, health.failures) == ("unavailable", "open", 2)
    assert not m.degraded


async def test_a_black_holed_call_does_not_stall_the_event_loop(
    drivers: list[Driver], proxy: TcpProxy, pg_url: str, table_name: str
) -> None:
    m = manager(drivers, "async", proxy, pg_url, table_name)
    await m("get_or_create_user_session", "known")
    proxy.blackhole()
    gaps: list[float] = []

    async def tick() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        await asyncio.gather(*(m("get_or_create_user_session", f"u{i}") for i in range(5)))
    finally:
        ticker.cancel()
    assert gaps
    assert max(gaps) < 0.05, f"the loop stalled for {max(gaps) * 1e3:.0f} ms"


@pytest.mark.parametrize("kind", KINDS)
async def test_read_only_fallback_serves_known_users_and_refuses_changes(
    kind: str, drivers: list[Driver], proxy: TcpProxy, pg_url: str, table_name: str
) -> None:
    m = manager(drivers, kind, proxy, pg_url, table_name, fallback="read_only", cache_size=100)
    known = await m("get_or_create_user_session", "known")
    proxy.blackhole()
    took, again = await timed(m, "get_current_user_session", "known")
    assert again.thread_id == known.thread_id  # from the cache
    for call in (
        ("get_or_create_user_session", "stranger"),
        ("create_user_session", "known"),
        ("update_session", "known", {"title": "x"}),
        ("delete_user_data", "known"),
    ):
        took, error = await timed(m, *call)
        assert isinstance(error, StorageUnavailableError), call
        assert took < DEADLINE + SLACK
    assert m.manager.health().status == "degraded"
    proxy.pass_()
    assert rows_of(pg_url, table_name, "stranger") == []


@pytest.mark.parametrize("kind", KINDS)
async def test_only_connection_failures_and_deadlines_count(
    kind: str, drivers: list[Driver], proxy: TcpProxy, pg_url: str, table_name: str
) -> None:
    m = manager(drivers, kind, proxy, pg_url, table_name, breaker_threshold=1)
    session = await m("get_or_create_user_session", "alice")
    for _ in range(5):
        with pytest.raises(InvalidInputError):
            await m("get_or_create_user_session", "")
        with pytest.raises(SessionNotFoundError):
            await m("get_session", "bob", session.thread_id)  # another user's thread
        with pytest.raises(InvalidInputError):
            await m("update_session", "alice", {"title": "x" * 300})
    health = m.manager.health()
    assert (health.status, health.breaker, health.failures) == ("ok", "closed", 0)
    assert not m.degraded


async def turn(d: Driver, agent: BaseAgent, text: str) -> str:
    if isinstance(d.manager, AsyncAgentSessionManager):
        result = await agent.ainvoke({"messages": [text]}, user_id="alice")
    else:
        result = agent.invoke({"messages": [text]}, user_id="alice")
    return str(result["messages"][-1].text)


@pytest.mark.parametrize("kind", KINDS)
async def test_runs_with_fallback_raise_fail_typed_during_an_outage(
    kind: str, drivers: list[Driver], proxy: TcpProxy, pg_url: str, table_name: str
) -> None:
    m = manager(drivers, kind, proxy, pg_url, table_name, fallback="raise", cache_size=100)
    agent = Counter(session_manager=m.manager)
    try:
        assert await turn(m, agent, "one") == "1 messages"
        proxy.refuse()
        for text in ("two", "three"):
            with pytest.raises(StorageUnavailableError):
                await turn(m, agent, text)
    finally:
        if kind == "async":
            await agent.aclose()
        else:
            agent.close()
