"""The memory fallback: an unreachable database, an outage mid-run, recovery and reconciliation.

Outages are made with a loopback TCP proxy in front of the real PostgreSQL server: in
``pass`` mode it forwards bytes, in ``refuse`` mode it resets every new connection and
kills the open ones, as a crashed server or a cut network would.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from bssagent import (
    AgentSessionManager,
    AsyncAgentSessionManager,
    BssAgentError,
    InvalidInputError,
    StorageUnavailableError,
    UnknownFieldError,
)

LOGGER = "bssagent.sessions"
KINDS = ["sync", "async"]
PASSWORD = "s3cret"


# -- a loopback TCP proxy -----------------------------------------------------------------------


class TcpProxy:
    """Forward 127.0.0.1:<port> to ``target``; :meth:`refuse` simulates an outage."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.target = target
        self.mode = "pass"
        self.accepted = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def url(self, base: str) -> str:
        """``base`` (a postgresql:// URL) pointed at the proxy instead."""
        parts = urlsplit(base)
        userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return parts._replace(netloc=f"{userinfo}127.0.0.1:{self.port}").geturl()

    def refuse(self) -> None:
        """Reset new connections from now on, and kill the open ones."""
        self.mode = "refuse"
        with self._lock:
            victims, self._open = list(self._open), set()
        for sock in victims:
            _kill(sock)

    def pass_(self) -> None:
        self.mode = "pass"

    def close(self) -> None:
        self._stop.set()
        self.refuse()
        self._listener.close()
        self._thread.join(5)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self.mode != "pass":
                _kill(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _kill(client)
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._open.discard(src)


def _kill(sock: socket.socket) -> None:
    """Abort a connection with a reset (SO_LINGER 0), waking any thread blocked on it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@pytest.fixture
def proxy(pg_url: str) -> Iterator[TcpProxy]:
    """A proxy in front of the test server (the tests using it need PostgreSQL)."""
    parts = urlsplit(pg_url)
    p = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    try:
        yield p
    finally:
        p.close()


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- one driver for both managers --------------------------------------------------------------


class Driver:
    """Call a sync or an async manager the same way from an async test."""

    def __init__(self, kind: str, **kwargs: Any) -> None:
        cls = AgentSessionManager if kind == "sync" else AsyncAgentSessionManager
        self.manager: Any = cls(**kwargs)

    async def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.manager, method)(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    @property
    def degraded(self) -> bool:
        return bool(self.manager.is_degraded)

    async def close(self) -> None:
        await self("close")


@pytest.fixture
async def drivers() -> AsyncIterator[list[Driver]]:
    """Drivers made by the test are closed afterwards, even when it fails."""
    made: list[Driver] = []
    yield made
    for d in made:
        await d.close()


def make(drivers: list[Driver], kind: str, **kwargs: Any) -> Driver:
    d = Driver(kind, **kwargs)
    drivers.append(d)
    return d


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def rows_of(pg_url: str, table: str, user_id: str) -> list[tuple[str, bool, dict[str, Any]]]:
    with psycopg.connect(pg_url, connect_timeout=5) as conn:
        return conn.execute(
            f'SELECT thread_id, is_active, metadata FROM "{table}" WHERE user_id = %s ORDER BY id',
            (user_id,),
        ).fetchall()


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
    assert not m.degraded
    assert m.manager.health().status == "ok"
    assert not warnings_of(caplog)
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
