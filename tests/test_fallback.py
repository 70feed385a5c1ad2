"""The memory fallback: an unreachable database, an outage mid-run, recovery and reconciliation.

Outages are made with a loopback TCP proxy in front of the real PostgreSQL server: in
``pass`` mode it forwards bytes, in ``refuse`` mode it resets every new connection and
kills the open ones, as a crashed server or a cut network would.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from faults import Driver, TcpProxy, closed_port, make, rows_of

from bssagent import (
    BssAgentError,
    InvalidInputError,
    StorageUnavailableError,
    UnknownFieldError,
)

LOGGER = "bssagent.sessions"
KINDS = ["sync", "async"]
PASSWORD = "s3cret"


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# -- an unreachable database -------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
async def test_unreachable_database_serves_from_memory_and_warns_once(
    kind: str, table_name: str, caplog: pytest.LogCaptureFixture, drivers: list[Driver]
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{closed_port()}/test"
    m = make(drivers, kind, database_url=url, table_name=table_name, reconnect_interval=0.05)
    assert not m.degraded, "nothing is opened before the first call"

    first = await m("get_or_create_user_session", "alice")
    assert m.degraded
    for _ in range(3):
        assert (await m("get_or_create_user_session", "alice")).thread_id == first.thread_id
        await asyncio.sleep(0.06)  # let reconnect attempts come due and fail again
        assert (await m("get_current_user_session", "alice")).thread_id == first.thread_id
    second = await m("create_user_session", "alice", title="second")
    assert (await m("get_current_user_session", "alice")).thread_id == second.thread_id
    await m("update_session", "alice", {"title": "renamed"})
    assert (await m("get_session", "alice", second.thread_id)).title == "renamed"
    assert (await m("switch_session", "alice", first.thread_id)).is_active
    users = [f"user-{i}" for i in range(10)]
    for user in users:
        await m("get_or_create_user_session", user)
    await asyncio.sleep(0.06)
    active = await m("list_active_sessions")
    assert {s.user_id for s in active} == {"alice", *users}
    assert len(await m("list_user_sessions", "alice")) == 2
    assert await m("deactivate_session", "user-0")
    assert not await m("has_session", "user-0")

    assert m.degraded
    health = m.manager.health()
    assert health.status == "degraded"
    assert health.backend == "postgres"
    assert health.reason
    assert health.since is not None
    assert health.degraded_episodes == 1

    records = warnings_of(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert "unavailable" in records[0].getMessage()
    assert "127.0.0.1" in records[0].getMessage()
    for record in caplog.records:
        assert PASSWORD not in record.getMessage()
    assert PASSWORD not in caplog.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
async def test_fallback_raise_fails_fast_and_closed(
    kind: str, table_name: str, caplog: pytest.LogCaptureFixture, drivers: list[Driver]
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{closed_port()}/test"
    m = make(drivers, kind, database_url=url, table_name=table_name, fallback="raise")
    for call in (
        ("get_or_create_user_session", "alice"),
        ("create_user_session", "alice"),
        ("list_active_sessions",),
    ):
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError) as info:
            await m(*call)
        assert time.monotonic() - started < 4.0, f"{call[0]} took too long to fail"
        assert isinstance(info.value, BssAgentError)
        assert info.value.__cause__ is not None, "the driver error is chained"
        assert PASSWORD not in str(info.value)
    assert not m.degraded  # nothing is served from memory
    health = m.manager.health()
    assert (health.status, health.breaker, health.failures) == ("unavailable", "open", 3)
    # Logged once, on entry, without the password.
    logged = warnings_of(caplog)
    assert [getattr(r, "bssagent_event", None) for r in logged] == ["unavailable"]
    assert PASSWORD not in logged[0].getMessage()
    assert PASSWORD not in caplog.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
async def test_bad_input_while_database_is_down(
    kind: str, table_name: str, caplog: pytest.LogCaptureFixture, drivers: list[Driver]
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    url = f"postgresql://postgres@127.0.0.1:{closed_port()}/test"
    m = make(drivers, kind, database_url=url, table_name=table_name)
    bad_calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
        ("get_or_create_user_session", ("",), {}),
        ("get_or_create_user_session", ("u\x00",), {}),
        ("get_or_create_user_session", ("u", "t", {"x": float("nan")}), {}),
        ("get_or_create_user_session", ("u", ""), {}),
        ("create_user_session", ("u", ""), {}),
        ("get_current_user_session", (42,), {}),
        ("get_session", ("u", "not-a-uuid"), {}),
        ("list_active_sessions", (), {"limit": 0}),
    ]

    async def check_bad_input() -> None:
        for method, args, kwargs in bad_calls:
            with pytest.raises(InvalidInputError) as info:
                await m(method, *args, **kwargs)
            assert info.value.field, f"{method}{args}: the error names the field"
        with pytest.raises(UnknownFieldError):
            await m("update_session", "u", {"is_active": False})

    await check_bad_input()
    assert not m.degraded, "a caller's mistake must not switch to the fallback"
    assert m.manager.health().status == "ok"
    assert not warnings_of(caplog)

    await m("get_or_create_user_session", "u")  # the database really is down
    assert m.degraded
    await check_bad_input()  # and the fallback validates exactly the same way
    assert m.manager.health().degraded_episodes == 1
    assert len(warnings_of(caplog)) == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_get_or_create_validates_title_and_metadata_for_cached_users(
    kind: str, drivers: list[Driver]
) -> None:
    m = make(drivers, kind, database_url="memory://")
    first = await m("get_or_create_user_session", "u")
    with pytest.raises(InvalidInputError):
        await m("get_or_create_user_session", "u", "t", {"x": float("nan")})
    with pytest.raises(InvalidInputError):
        await m("get_or_create_user_session", "u", "")
    assert (await m("get_or_create_user_session", "u")).thread_id == first.thread_id


# -- an outage mid-run, through the proxy -----------------------------------------------------


@pytest.mark.postgres
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
async def test_outage_and_recovery_through_proxy(
    kind: str,
    pg_url: str,
    table_name: str,
    proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
    drivers: list[Driver],
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    m = make(
        drivers,
        kind,
        database_url=proxy.url(pg_url),
        table_name=table_name,
        reconnect_interval=0.2,
        pool_timeout=0.5,
    )
    other = make(drivers, "sync", database_url=pg_url, table_name=table_name)

    alice = await m("get_or_create_user_session", "alice")
    bob = await m("get_or_create_user_session", "bob")
    assert not m.degraded
    assert proxy.accepted > 0, "the manager really goes through the proxy"

    proxy.refuse()
    started = time.monotonic()
    ursula = await m("get_or_create_user_session", "ursula")  # new user: needs storage
    assert time.monotonic() - started < 5.0, "the outage is detected within the pool timeout"
    assert m.degraded
    assert m.manager.health().status == "degraded"
    # Known users keep their thread, also where the call is served by the memory store.
    assert (await m("get_or_create_user_session", "alice")).thread_id == alice.thread_id
    assert (await m("get_session", "alice", alice.thread_id)).thread_id == alice.thread_id
    assert [s.thread_id for s in await m("list_user_sessions", "bob")] == [bob.thread_id]
    assert (await m("get_or_create_user_session", "ursula")).thread_id == ursula.thread_id
    # Meanwhile another process gives victor a session in the database, and we one in memory.
    victor_db = await other("get_or_create_user_session", "victor")
    victor_mem = await m("get_or_create_user_session", "victor")
    assert victor_mem.thread_id != victor_db.thread_id
    assert rows_of(pg_url, table_name, "ursula") == []

    proxy.pass_()
    await asyncio.sleep(0.3)  # > reconnect_interval
    await m("list_active_sessions")  # any call that reaches storage tries again
    assert not m.degraded
    health = m.manager.health()
    assert health.status == "ok"
    assert health.degraded_episodes == 1
    assert health.since is None

    # The session made in memory is now the user's current one in PostgreSQL.
    assert rows_of(pg_url, table_name, "ursula") == [(ursula.thread_id, True, {})]
    # Known users were not duplicated.
    assert rows_of(pg_url, table_name, "alice") == [(alice.thread_id, True, {})]
    assert rows_of(pg_url, table_name, "bob") == [(bob.thread_id, True, {})]
    # The database wins for victor; the memory session is kept, inactive and marked.
    assert rows_of(pg_url, table_name, "victor") == [
        (victor_db.thread_id, True, {}),
        (victor_mem.thread_id, False, {"bssagent_merged": True}),
    ]
    assert (await m("get_or_create_user_session", "victor")).thread_id == victor_db.thread_id
    assert (await m("get_current_user_session", "ursula")).thread_id == ursula.thread_id

    messages = [r.getMessage() for r in warnings_of(caplog)]
    assert len(messages) == 2, messages
    assert "unavailable" in messages[0]
    assert "back" in messages[1]


@pytest.mark.postgres
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
async def test_fallback_raise_through_proxy_recovers(
    kind: str, pg_url: str, table_name: str, proxy: TcpProxy, drivers: list[Driver]
) -> None:
    m = make(
        drivers,
        kind,
        database_url=proxy.url(pg_url),
        table_name=table_name,
        fallback="raise",
        pool_timeout=0.5,
        cache_size=0,
    )
    alice = await m("get_or_create_user_session", "alice")
    proxy.refuse()
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError):
        await m("get_or_create_user_session", "alice")
    assert time.monotonic() - started < 5.0
    assert not m.degraded
    proxy.pass_()
    deadline = time.monotonic() + 10
    while True:  # the pool reconnects in the background
        try:
            again = await m("get_or_create_user_session", "alice")
            break
        except StorageUnavailableError:
            assert time.monotonic() < deadline, "the pool never reconnected"
            await asyncio.sleep(0.1)
    assert again.thread_id == alice.thread_id
    assert not m.degraded


# -- reconciliation after an outage -----------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
async def test_first_call_after_recovery_keeps_the_memory_session(
    kind: str, pg_url: str, table_name: str, proxy: TcpProxy, drivers: list[Driver]
) -> None:
    m = make(
        drivers,
        kind,
        database_url=proxy.url(pg_url),
        table_name=table_name,
        reconnect_interval=0.2,
        pool_timeout=0.5,
        cache_size=0,
    )
    await m("get_or_create_user_session", "warmup")
    proxy.refuse()
    ursula = await m("get_or_create_user_session", "ursula")
    assert m.degraded
    proxy.pass_()
    await asyncio.sleep(0.3)
    after = await m("get_or_create_user_session", "ursula")  # this call reconnects
    assert not m.degraded
    assert after.thread_id == ursula.thread_id, "ursula lost her conversation thread"
    assert rows_of(pg_url, table_name, "ursula") == [(ursula.thread_id, True, {})]


@pytest.mark.postgres
@pytest.mark.timeout(60)
async def test_new_chat_during_outage_stays_current(
    pg_url: str, table_name: str, proxy: TcpProxy, drivers: list[Driver]
) -> None:
    m = make(
        drivers,
        "sync",
        database_url=proxy.url(pg_url),
        table_name=table_name,
        reconnect_interval=0.2,
        pool_timeout=0.5,
    )
    old = await m("get_or_create_user_session", "alice")
    proxy.refuse()
    new = await m("create_user_session", "alice", title="during the outage")
    assert m.degraded
    proxy.pass_()
    await asyncio.sleep(0.3)
    await m("list_active_sessions")
    assert not m.degraded
    assert (await m("get_current_user_session", "alice")).thread_id == new.thread_id
    assert rows_of(pg_url, table_name, "alice") == [
        (old.thread_id, False, {}),
        (new.thread_id, True, {}),
    ]
