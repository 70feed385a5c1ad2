"""Session lifecycle conformance: states, children, metrics, events, expiry, limits, deletion,
export, retention and the background cleaner, on every backend and both managers.

Same pattern as ``tests/test_conformance.py``: each test body is written once against
:class:`Manager`, an adapter that makes the sync and async managers look alike (every call
is awaited), and runs on the sync and async managers, with and without the session cache,
on memory, SQLite and PostgreSQL (``backend_url`` / ``table_name`` from ``conftest.py``).
On the SQL backends, deletion is also checked in the tables themselves (the session table,
its event log, and LangGraph's checkpoint tables).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from langchain_core.messages import AIMessage
from langgraph.graph import END, START, MessagesState, StateGraph

from bssagent import (
    AgentSessionManager,
    AsyncAgentSessionManager,
    BaseAgent,
    BssAgentError,
    InvalidInputError,
    SessionNotFoundError,
    UserSession,
)
from bssagent.agent import OfflineChatModel
from bssagent.demo import ChatAgent
from bssagent.errors import InvalidTransitionError, SessionLimitError
from bssagent.sessions import migrations
from bssagent.sessions.model import SessionEvent, SessionStats

pytestmark = pytest.mark.timeout(60)

ENDED = ("completed", "failed", "expired")
EVENT_OF = {
    "paused": "paused",
    "active": "resumed",
    "completed": "ended",
    "failed": "ended",
    "expired": "expired",
}
LEGAL = [
    ("active", "paused"),
    ("active", "completed"),
    ("active", "failed"),
    ("active", "expired"),
    ("paused", "active"),
    ("paused", "completed"),
    ("paused", "failed"),
    ("paused", "expired"),
]
ILLEGAL = [("active", "active"), ("paused", "paused")] + [
    (start, target) for start in ENDED for target in ("active", "paused", *ENDED)
]
PG_CHECKPOINT_TABLES = ("checkpoints", "checkpoint_blobs", "checkpoint_writes")
SQLITE_CHECKPOINT_TABLES = ("checkpoints", "writes")
LLM = OfflineChatModel()


# -- the adapter ------------------------------------------------------------------------------


class Manager:
    """Awaitable facade over a sync or async manager: ``await m.method(...)`` for both."""

    def __init__(self, manager: AgentSessionManager | AsyncAgentSessionManager) -> None:
        self.manager = manager
        self.is_async = isinstance(manager, AsyncAgentSessionManager)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.manager, name)
        if not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return result

        return call

    async def run(self, agent: BaseAgent, text: str, *args: Any, **kwargs: Any) -> Any:
        """One agent turn: ``invoke`` with a sync manager, ``ainvoke`` with an async one."""
        payload = {"messages": [text]}
        if self.is_async:
            return await agent.ainvoke(payload, *args, **kwargs)
        return agent.invoke(payload, *args, **kwargs)

    async def state(self, thread_id: str) -> dict[str, Any] | None:
        """The latest checkpoint's values of a thread, from this manager's saver."""
        if self.is_async:
            return await self.manager.persistence.astate(thread_id)
        return self.manager.persistence.state(thread_id)

    async def close_agent(self, agent: BaseAgent) -> None:
        if self.is_async:
            await agent.aclose()
        else:
            agent.close()


VARIANTS = {
    "sync-cached": (AgentSessionManager, {}),
    "sync-nocache": (AgentSessionManager, {"cache_size": 0}),
    "async-cached": (AsyncAgentSessionManager, {}),
    "async-nocache": (AsyncAgentSessionManager, {"cache_size": 0}),
}

MakeManager = Callable[..., Manager]


class Tables:
    """Direct reads of a SQL backend's tables (the session table is ``{t}``; the event log
    ``{t}_events``, the tombstones ``{t}_tombstones``). ``%s`` placeholders on both."""

    def __init__(self, url: str, table: str) -> None:
        self.url = url
        self.table = table
        self.is_postgres = url.startswith("postgresql")
        self.checkpoint_tables = (
            PG_CHECKPOINT_TABLES if self.is_postgres else SQLITE_CHECKPOINT_TABLES
        )

    def rows(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run ``query``; ``{t}``, ``{events}`` and ``{tombstones}`` name the tables."""
        query = query.format(
            t=f'"{self.table}"',
            events=f'"{self.table}_events"',
            tombstones=f'"{self.table}_tombstones"',
        )
        if self.is_postgres:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                return [tuple(r) for r in conn.execute(query, params).fetchall()]
        path = self.url.removeprefix("sqlite:///")
        with closing(sqlite3.connect(path, timeout=10)) as conn:
            return [tuple(r) for r in conn.execute(query.replace("%s", "?"), params).fetchall()]

    def count(self, query: str, params: tuple[Any, ...] = ()) -> int:
        return int(self.rows(query, params)[0][0])

    def checkpoint_rows(self, thread_ids: list[str]) -> dict[str, int]:
        """Rows of LangGraph's tables naming any of ``thread_ids``, per table."""
        marks = ", ".join(["%s"] * len(thread_ids))
        query = "SELECT count(*) FROM {table} WHERE thread_id IN ({marks})"
        return {
            name: self.count(query.format(table=name, marks=marks), tuple(thread_ids))
            for name in self.checkpoint_tables
        }

    def mentioning(self, thread_ids: list[str]) -> int:
        """Rows of the session table and event log that name any of ``thread_ids``."""
        marks = ", ".join(["%s"] * len(thread_ids))
        payload = "payload::text" if self.is_postgres else "payload"
        sessions = self.count(
            f"SELECT count(*) FROM {{t}} WHERE thread_id IN ({marks})"
            f" OR parent_thread_id IN ({marks})",
            (*thread_ids, *thread_ids),
        )
        events = sum(
            self.count(
                f"SELECT count(*) FROM {{events}} WHERE thread_id = %s OR {payload} LIKE %s",
                (t, f"%{t}%"),
            )
            for t in thread_ids
        )
        return sessions + events


def drop_postgres_tables(url: str, table: str) -> None:
    """Drop a test's session table with its lifecycle tables and trigger functions, and
    the LangGraph checkpoints of its threads (the checkpoint tables are shared)."""
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
        conn.execute(f'DROP FUNCTION IF EXISTS "{table}_notify"()')


# Every test runs on a sync manager with the cache and an async one without it; the tests
# where the cache could hide a change (``make_all`` / ``mgr_all``) run on all four variants.
DEFAULT_VARIANTS = ["sync-cached", "async-nocache"]


async def _factory(variant: str, backend_url: str, table_name: str) -> Any:
    cls, variant_options = VARIANTS[variant]
    made: list[Manager] = []

    def factory(**options: Any) -> Manager:
        kwargs = {"database_url": backend_url, "table_name": table_name, **variant_options}
        manager = Manager(cls(**{**kwargs, **options}))
        made.append(manager)
        return manager

    try:
        yield factory
        degraded = [m.backend for m in made if m.is_degraded]
        for manager in made:
            await manager.close()
        # A silent fall back to memory would make every storage assertion meaningless.
        assert not degraded, "a manager fell back to memory during the test"
    finally:
        for manager in made:
            await manager.close()
        if backend_url.startswith("postgresql"):
            drop_postgres_tables(backend_url, table_name)


@pytest.fixture(params=DEFAULT_VARIANTS)
async def make(request: pytest.FixtureRequest, backend_url: str, table_name: str) -> Any:
    """A factory of managers of one variant, all on the same database URL and table."""
    async for factory in _factory(request.param, backend_url, table_name):
        yield factory


@pytest.fixture(params=list(VARIANTS))
async def make_all(request: pytest.FixtureRequest, backend_url: str, table_name: str) -> Any:
    """:func:`make` over all four variants (sync/async, cached/uncached)."""
    async for factory in _factory(request.param, backend_url, table_name):
        yield factory


@pytest.fixture
def mgr(make: MakeManager) -> Manager:
    return make()


@pytest.fixture
def mgr_all(make_all: MakeManager) -> Manager:
    return make_all()


@pytest.fixture
def tables(backend_url: str, table_name: str) -> Tables | None:
    """The SQL tables behind the managers, or ``None`` on memory://."""
    return None if backend_url == "memory://" else Tables(backend_url, table_name)


def backend_of(request: pytest.FixtureRequest) -> str:
    url = request.getfixturevalue("backend_url")
    return "memory" if url == "memory://" else "sqlite" if url.startswith("sqlite") else "postgres"


async def move(mgr: Manager, user: str, thread: str | None, target: str) -> UserSession:
    """Take the user's session (``thread``, else the current one) to ``target``."""
    if target == "paused":
        return await mgr.pause_session(user, thread)
    if target == "active":
        return await mgr.resume_session(user, thread)
    return await mgr.end_session(user, thread, target)


async def in_state(mgr: Manager, user: str, status: str) -> UserSession:
    """A new current session of ``user`` (for an ended status: the ended session)."""
    s = await mgr.create_user_session(user)
    if status == "active":
        return s
    return await move(mgr, user, s.thread_id, status)


async def everything(mgr: Manager, *users: str) -> Any:
    """What "nothing was written" compares: the users' sessions and events, the stats."""
    sessions = [await mgr.list_user_sessions(u, limit=1000) for u in users]
    events = [await mgr.get_session_events(u, limit=1000) for u in users]
    return sessions, events, await mgr.get_stats()


def kinds(events: list[SessionEvent]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(e.thread_id, e.kind, dict(e.payload)) for e in events]


async def wait_for(check: Callable[[], Any], timeout: float = 10.0) -> None:
    """Poll the (async) ``check`` until it returns true."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- transitions ------------------------------------------------------------------------------


async def test_every_legal_transition(mgr_all: Manager) -> None:
    mgr = mgr_all
    for start, target in LEGAL:
        user = f"{start}-to-{target}"
        s = await in_state(mgr, user, start)
        assert s.status == start
        assert s.is_active
        # Half of them by default (the current session), half by thread id.
        thread = None if target in ("paused", "completed", "expired") else s.thread_id
        moved = await move(mgr, user, thread, target)
        assert (moved.thread_id, moved.status) == (s.thread_id, target)
        assert moved.updated_at > s.updated_at
        assert moved.created_at == s.created_at
        assert await mgr.get_session(user, s.thread_id) == moved
        if target in ENDED:
            assert not moved.is_active
            assert not moved.is_open
            assert moved.ended_at is not None
            assert moved.ended_at >= s.created_at
            assert moved.ended_at.utcoffset() == timedelta(0)
            assert moved.is_expired() is (target == "expired")
            assert not await mgr.has_session(user)
        else:
            assert moved.is_active  # pausing and resuming keep it the current session
            assert moved.is_open
            assert moved.ended_at is None
            assert await mgr.get_current_user_session(user) == moved
            assert (await mgr.get_or_create_user_session(user)).thread_id == s.thread_id
        last = (await mgr.get_session_events(user, s.thread_id))[-1]
        assert (last.kind, last.payload) == (EVENT_OF[target], {"from": start, "to": target})


async def test_a_session_that_is_not_current_changes_state_by_thread_id(mgr: Manager) -> None:
    old = await mgr.create_user_session("alice", "old")
    new = await mgr.create_user_session("alice", "new")
    paused = await mgr.pause_session("alice", old.thread_id)
    assert (paused.status, paused.is_active) == ("paused", False)
    resumed = await mgr.resume_session("alice", old.thread_id)
    assert (resumed.status, resumed.is_active) == ("active", False)
    ended = await mgr.end_session("alice", old.thread_id, "failed")
    assert (ended.status, ended.is_active) == ("failed", False)
    current = await mgr.get_current_user_session("alice")
    assert (current.thread_id, current.status, current.is_active) == (new.thread_id, "active", True)


async def test_every_illegal_transition_raises_and_writes_nothing(mgr: Manager) -> None:
    for i, (start, target) in enumerate(ILLEGAL):
        user = f"illegal-{i}"
        s = await in_state(mgr, user, start)
        before = await everything(mgr, user)
        with pytest.raises(InvalidTransitionError) as info:
            await move(mgr, user, s.thread_id, target)
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value, BssAgentError)
        assert s.thread_id in str(info.value)
        assert await everything(mgr, user) == before, (start, target)
        if start not in ENDED:  # the default target is the current session: same refusal
            with pytest.raises(InvalidTransitionError):
                await move(mgr, user, None, target)
            assert await everything(mgr, user) == before, (start, target)


async def test_end_session_rejects_a_status_that_does_not_end(mgr: Manager) -> None:
    s = await mgr.get_or_create_user_session("alice")
    before = await everything(mgr, "alice")
    for status in ("active", "paused", "done", "", None, 1):
        with pytest.raises(InvalidInputError) as info:
            await mgr.end_session("alice", s.thread_id, status)
        assert isinstance(info.value, ValueError)
        assert info.value.field == "status"
    for bad_thread in ("not-a-uuid", 42):
        for call in (mgr.end_session, mgr.pause_session, mgr.resume_session):
            with pytest.raises(InvalidInputError):
                await call("alice", bad_thread)
    assert await everything(mgr, "alice") == before


async def test_ending_the_current_session_leaves_the_user_with_none(mgr_all: Manager) -> None:
    mgr = mgr_all
    first = await mgr.get_or_create_user_session("alice", "first")
    await mgr.get_or_create_user_session("bob")
    ended = await mgr.end_session("alice")
    assert (ended.thread_id, ended.status, ended.is_active) == (first.thread_id, "completed", False)
    assert not await mgr.has_session("alice")
    with pytest.raises(SessionNotFoundError):
        await mgr.get_current_user_session("alice")
    assert [s.user_id for s in await mgr.list_active_sessions()] == ["bob"]
    with pytest.raises(SessionNotFoundError):  # no current session to end twice
        await mgr.end_session("alice")
    second = await mgr.get_or_create_user_session("alice", "second")
    assert second.thread_id != first.thread_id
    assert (second.title, second.status, second.is_active) == ("second", "active", True)
    assert await mgr.get_current_user_session("alice") == second
    listed = await mgr.list_user_sessions("alice")
    assert [(s.thread_id, s.status, s.is_active) for s in listed] == [
        (second.thread_id, "active", True),
        (first.thread_id, "completed", False),
    ]


async def test_deactivated_sessions_stay_open(mgr: Manager) -> None:
    """Deactivating only drops the "current" mark: the session stays open and resumable."""
    s = await mgr.get_or_create_user_session("alice")
    await mgr.deactivate_session("alice")
    stored = await mgr.get_session("alice", s.thread_id)
    assert (stored.status, stored.is_active, stored.ended_at) == ("active", False, None)
    switched = await mgr.switch_session("alice", s.thread_id)
    assert (switched.status, switched.is_active) == ("active", True)


async def test_switching_to_an_ended_session_is_an_illegal_transition(mgr: Manager) -> None:
    ended = await mgr.create_user_session("alice", "ended")
    await mgr.end_session("alice", ended.thread_id)
    current = await mgr.create_user_session("alice", "current")
    before = await everything(mgr, "alice")
    with pytest.raises(InvalidTransitionError):
        await mgr.switch_session("alice", ended.thread_id)
    assert await everything(mgr, "alice") == before
    assert (await mgr.get_current_user_session("alice")).thread_id == current.thread_id


async def test_lifecycle_calls_on_foreign_or_unknown_threads(mgr: Manager) -> None:
    alice = await mgr.get_or_create_user_session("alice")
    await mgr.get_or_create_user_session("bob")
    unknown = str(uuid.uuid4())
    before = await everything(mgr, "alice", "bob")
    calls: dict[str, Callable[[str | None], Any]] = {
        "pause": lambda t: mgr.pause_session("bob", t),
        "resume": lambda t: mgr.resume_session("bob", t),
        "end": lambda t: mgr.end_session("bob", t),
        "record": lambda t: mgr.record_request("bob", t),
        "child": lambda t: mgr.create_child_session("bob", t or unknown),
    }
    for name, call in calls.items():
        for thread in (alice.thread_id, unknown):
            with pytest.raises(SessionNotFoundError) as info:
                await call(thread)
            assert type(info.value) is SessionNotFoundError, name
    assert await everything(mgr, "alice", "bob") == before
    # Without a current session, the default target does not exist either.
    for call in (mgr.pause_session, mgr.resume_session, mgr.end_session, mgr.record_request):
        with pytest.raises(SessionNotFoundError):
            await call("nobody")
    assert await mgr.list_user_sessions("nobody") == []


# -- parent and child sessions ------------------------------------------------------------------


async def test_child_sessions(mgr: Manager) -> None:
    parent = await mgr.get_or_create_user_session("alice", "parent")
    c1 = await mgr.create_child_session("alice", parent.thread_id, "sub 1", {"k": 1})
    c2 = await mgr.create_child_session("alice", parent.thread_id)
    grandchild = await mgr.create_child_session("alice", c1.thread_id, "deeper")
    for child, of in ((c1, parent), (c2, parent), (grandchild, c1)):
        assert child.parent_thread_id == of.thread_id
        assert (child.user_id, child.namespace, child.status) == ("alice", "default", "active")
        assert not child.is_active  # a child is never the current session
        assert str(uuid.UUID(child.thread_id)) == child.thread_id
    threads = {parent.thread_id, c1.thread_id, c2.thread_id, grandchild.thread_id}
    assert len(threads) == 4
    assert (c1.title, c1.metadata) == ("sub 1", {"k": 1})
    assert (c2.title, c2.metadata) == ("New Chat", {})
    assert parent.parent_thread_id is None
    # The parent stays current; children never show up as anyone's current session.
    assert (await mgr.get_current_user_session("alice")).thread_id == parent.thread_id
    assert (await mgr.get_or_create_user_session("alice")).thread_id == parent.thread_id
    assert [s.thread_id for s in await mgr.list_active_sessions()] == [parent.thread_id]
    # Direct children only, newest first, paginated.
    children = await mgr.list_child_sessions("alice", parent.thread_id)
    assert [s.thread_id for s in children] == [c2.thread_id, c1.thread_id]
    page = await mgr.list_child_sessions("alice", parent.thread_id, limit=1)
    assert [s.thread_id for s in page] == [c2.thread_id]
    rest = await mgr.list_child_sessions("alice", parent.thread_id, before_id=page[-1].id)
    assert [s.thread_id for s in rest] == [c1.thread_id]
    grand = await mgr.list_child_sessions("alice", c1.thread_id)
    assert [s.thread_id for s in grand] == [grandchild.thread_id]
    assert await mgr.list_child_sessions("alice", grandchild.thread_id) == []
    listed = await mgr.list_user_sessions("alice")
    assert len(listed) == 4
    # Without a current session, get_or_create makes a new one rather than pick a child.
    await mgr.deactivate_session("alice")
    fresh = await mgr.get_or_create_user_session("alice")
    assert fresh.thread_id not in {parent.thread_id, c1.thread_id, c2.thread_id}
    assert fresh.parent_thread_id is None


async def test_a_child_belongs_to_the_parents_user(mgr: Manager) -> None:
    parent = await mgr.get_or_create_user_session("alice")
    await mgr.get_or_create_user_session("bob")
    before = await everything(mgr, "alice", "bob")
    for parent_thread in (parent.thread_id, str(uuid.uuid4())):
        with pytest.raises(SessionNotFoundError):
            await mgr.create_child_session("bob", parent_thread)
    assert await everything(mgr, "alice", "bob") == before
    await mgr.create_child_session("alice", parent.thread_id)
    assert await mgr.list_child_sessions("bob", parent.thread_id) == []  # ownership
    with pytest.raises(InvalidInputError):
        await mgr.create_child_session("alice", "not-a-uuid")


async def test_a_child_cannot_be_switched_to(mgr: Manager) -> None:
    parent = await mgr.get_or_create_user_session("alice")
    child = await mgr.create_child_session("alice", parent.thread_id)
    before = await everything(mgr, "alice")
    with pytest.raises(InvalidTransitionError):
        await mgr.switch_session("alice", child.thread_id)
    assert await everything(mgr, "alice") == before
    assert (await mgr.get_current_user_session("alice")).thread_id == parent.thread_id
    await mgr.deactivate_session("alice")  # also without a current session to replace
    with pytest.raises(InvalidTransitionError):
        await mgr.switch_session("alice", child.thread_id)
    assert not await mgr.has_session("alice")


async def test_ending_a_session_ends_its_open_descendants(mgr: Manager) -> None:
    parent = await mgr.get_or_create_user_session("alice")
    c1 = await mgr.create_child_session("alice", parent.thread_id)
    g1 = await mgr.create_child_session("alice", c1.thread_id)
    gg1 = await mgr.create_child_session("alice", g1.thread_id)
    c2 = await mgr.create_child_session("alice", parent.thread_id)
    g2 = await mgr.create_child_session("alice", c2.thread_id)
    paused = await mgr.create_child_session("alice", parent.thread_id)
    await mgr.pause_session("alice", paused.thread_id)
    # c2 ended earlier without cascading: it keeps its status; its child g2 stays open.
    c2_ended = await mgr.end_session("alice", c2.thread_id, "completed", cascade=False)
    assert (await mgr.get_session("alice", g2.thread_id)).status == "active"
    other = await mgr.create_child_session(
        "alice", (await mgr.create_user_session("alice")).thread_id
    )
    seq = (await mgr.get_session_events("alice", limit=1000))[-1].seq

    ended = await mgr.end_session("alice", parent.thread_id, "failed")
    assert ended.status == "failed"
    for s in (c1, g1, gg1, g2, paused):
        stored = await mgr.get_session("alice", s.thread_id)
        assert (stored.status, stored.is_active) == ("failed", False), s.thread_id
        assert stored.ended_at is not None
    assert await mgr.get_session("alice", c2.thread_id) == c2_ended  # untouched
    assert (await mgr.get_session("alice", other.thread_id)).status == "active"  # other tree
    events = await mgr.get_session_events("alice", after_seq=seq)
    got = {(e.thread_id, e.kind, e.payload["from"], e.payload["to"]) for e in events}
    assert got == {
        (parent.thread_id, "ended", "active", "failed"),
        (c1.thread_id, "ended", "active", "failed"),
        (g1.thread_id, "ended", "active", "failed"),
        (gg1.thread_id, "ended", "active", "failed"),
        (g2.thread_id, "ended", "active", "failed"),
        (paused.thread_id, "ended", "paused", "failed"),
    }
    assert len(events) == len(got)
    assert events[0].thread_id == parent.thread_id


async def test_ending_without_cascade_leaves_children_open(mgr: Manager) -> None:
    parent = await mgr.get_or_create_user_session("alice")
    child = await mgr.create_child_session("alice", parent.thread_id)
    await mgr.end_session("alice", cascade=False)
    assert (await mgr.get_session("alice", child.thread_id)).status == "active"
    # Ending a child by itself does not touch its parent or siblings.
    sibling = await mgr.create_child_session("alice", parent.thread_id)
    await mgr.end_session("alice", child.thread_id, "expired")
    assert (await mgr.get_session("alice", sibling.thread_id)).status == "active"
    assert (await mgr.get_session("alice", parent.thread_id)).status == "completed"


async def open_sessions_with_ended_parents(mgr: Manager, user: str) -> list[str]:
    """Threads of the user's open sessions whose parent is ended or deleted."""
    sessions = {s.thread_id: s for s in await mgr.list_user_sessions(user, limit=1000)}
    return [
        s.thread_id
        for s in sessions.values()
        if s.is_open
        and s.parent_thread_id is not None
        and (s.parent_thread_id not in sessions or not sessions[s.parent_thread_id].is_open)
    ]


async def test_idle_expiry_by_cleanup_ends_children_with_their_parent(
    mgr: Manager, request: pytest.FixtureRequest
) -> None:
    """A child "is ended or deleted with its parent": lazy expiry and end_session cascade;
    a cleanup that expires an idle parent must not leave an open child under it."""
    parent = await mgr.get_or_create_user_session("alice")
    child = await mgr.create_child_session("alice", parent.thread_id)
    await asyncio.sleep(0.45)
    await mgr.record_request("alice", child.thread_id)  # the child is busy, the parent idle
    # The parent and, with it, its child: both counted.
    assert await mgr.cleanup_inactive_sessions(0.3) == 2
    assert await open_sessions_with_ended_parents(mgr, "alice") == []


async def test_a_limit_purge_does_not_orphan_children(
    make: MakeManager, request: pytest.FixtureRequest
) -> None:
    m = make(max_sessions_per_user=3)
    parent = await m.create_user_session("alice")
    child = await m.create_child_session("alice", parent.thread_id)
    await m.end_session("alice", cascade=False)
    await m.create_user_session("alice")
    await m.create_user_session("alice")  # purges the parent, the oldest ended session
    assert await m.is_thread_deleted(parent.thread_id)
    orphans = [
        s.thread_id
        for s in await m.list_user_sessions("alice")
        if s.parent_thread_id is not None and await m.is_thread_deleted(s.parent_thread_id)
    ]
    assert orphans == [], f"child {child.thread_id} outlived its deleted parent"


async def test_deleting_a_session_deletes_its_descendants(
    mgr: Manager, tables: Tables | None
) -> None:
    parent = await mgr.get_or_create_user_session("alice")
    c1 = await mgr.create_child_session("alice", parent.thread_id)
    g1 = await mgr.create_child_session("alice", c1.thread_id)
    c2 = await mgr.create_child_session("alice", parent.thread_id)
    other = await mgr.create_user_session("alice")  # another tree, with a child
    other_child = await mgr.create_child_session("alice", other.thread_id)

    # Deleting a child takes only its own subtree.
    assert await mgr.delete_session("alice", c1.thread_id) == [c1.thread_id, g1.thread_id]
    assert (await mgr.get_session("alice", parent.thread_id)).status == "active"
    assert [s.thread_id for s in await mgr.list_child_sessions("alice", parent.thread_id)] == [
        c2.thread_id
    ]
    deleted = await mgr.delete_session("alice", parent.thread_id)
    assert deleted == [parent.thread_id, c2.thread_id]  # parent written after its children
    for t in (parent.thread_id, c1.thread_id, g1.thread_id, c2.thread_id):
        assert await mgr.is_thread_deleted(t)
        with pytest.raises(SessionNotFoundError):
            await mgr.get_session("alice", t)
    assert not await mgr.is_thread_deleted(other.thread_id)
    assert not await mgr.is_thread_deleted(str(uuid.uuid4()))
    remaining = {s.thread_id for s in await mgr.list_user_sessions("alice")}
    assert remaining == {other.thread_id, other_child.thread_id}
    assert (await mgr.get_current_user_session("alice")).thread_id == other.thread_id
    stats = await mgr.get_user_stats("alice")
    assert (stats.sessions, stats.open_sessions, stats.users) == (2, 2, 1)
    if tables is not None:
        gone = (parent.thread_id, c1.thread_id, g1.thread_id, c2.thread_id)
        marks = "%s, %s, %s, %s"
        assert tables.count(f"SELECT count(*) FROM {{t}} WHERE thread_id IN ({marks})", gone) == 0
        query = f"SELECT count(*) FROM {{tombstones}} WHERE thread_id IN ({marks})"
        assert tables.count(query, gone) == 4


async def test_delete_session_returns_the_sessions_thread_first(mgr: Manager) -> None:
    """ "The deleted thread ids (the session's first)", also when the parent row was
    written after its children (an update moves a PostgreSQL row to the end of the heap)."""
    parent = await mgr.get_or_create_user_session("alice")
    child = await mgr.create_child_session("alice", parent.thread_id)
    await mgr.update_session("alice", {"title": "renamed after the child was created"})
    deleted = await mgr.delete_session("alice", parent.thread_id)
    assert deleted == [parent.thread_id, child.thread_id]


# -- request metrics and statistics ----------------------------------------------------------


async def test_record_request_counts_exactly(mgr: Manager) -> None:
    s = await mgr.get_or_create_user_session("alice")
    other = await mgr.create_child_session("alice", s.thread_id)
    last = s.last_activity_at
    assert (s.request_count, s.error_count, s.total_processing_time) == (0, 0, 0.0)
    assert last is not None
    times = [0.25, 0.5, 0.125, 2.0]
    for i, seconds in enumerate(times):
        r = await mgr.record_request("alice", processing_time=seconds, error=i == 1)
        assert r.thread_id == s.thread_id
        assert r.request_count == i + 1
        assert r.last_activity_at is not None
        assert r.last_activity_at >= last
        last = r.last_activity_at
    assert (r.request_count, r.error_count, r.total_processing_time) == (4, 1, 2.875)
    assert r.last_activity_at > s.last_activity_at
    assert r.updated_at == s.updated_at  # metrics are not a change of the session
    stored = await mgr.get_session("alice", s.thread_id)
    assert (stored.request_count, stored.error_count, stored.total_processing_time) == (4, 1, 2.875)
    assert stored.last_activity_at == r.last_activity_at
    # By thread id, on a session that is not the current one.
    c = await mgr.record_request("alice", other.thread_id, processing_time=1, error=True)
    assert (c.thread_id, c.request_count, c.error_count, c.total_processing_time) == (
        other.thread_id, 1, 1, 1.0,
    )  # fmt: skip
    assert (await mgr.get_session("alice", s.thread_id)).request_count == 4
    # Defaults: no time, no error.
    d = await mgr.record_request("alice")
    assert (d.request_count, d.error_count, d.total_processing_time) == (5, 1, 2.875)


async def test_record_request_is_seen_by_get_current_user_session(
    mgr_all: Manager, request: pytest.FixtureRequest
) -> None:
    mgr = mgr_all
    s = await mgr.get_or_create_user_session("alice")
    recorded = await mgr.record_request("alice", processing_time=0.5)
    current = await mgr.get_current_user_session("alice")
    assert current.thread_id == s.thread_id
    assert (current.request_count, current.total_processing_time) == (1, 0.5)
    assert current.last_activity_at == recorded.last_activity_at


async def test_record_request_rejects_bad_arguments_and_writes_nothing(mgr: Manager) -> None:
    await mgr.get_or_create_user_session("alice")
    before = await everything(mgr, "alice")
    for seconds in (-1, -0.001, float("nan"), float("inf"), "1", None, True):
        with pytest.raises(InvalidInputError) as info:
            await mgr.record_request("alice", processing_time=seconds)
        assert info.value.field == "processing_time"
    for flag in (1, 0, "yes", None):
        with pytest.raises(InvalidInputError) as info:
            await mgr.record_request("alice", error=flag)
        assert info.value.field == "error"
    assert await everything(mgr, "alice") == before


async def test_user_stats_and_namespace_stats_are_exact(make: MakeManager) -> None:
    mgr = make()
    other_ns = make(namespace="elsewhere")
    empty = await mgr.get_user_stats("nobody")
    assert empty == SessionStats()
    assert (empty.error_rate, empty.average_processing_time) == (0.0, 0.0)
    assert await mgr.get_stats() == SessionStats()

    a1 = await mgr.create_user_session("alice")
    for seconds, error in ((0.5, False), (1.5, True), (0.25, False), (0.75, True)):
        await mgr.record_request("alice", processing_time=seconds, error=error)
    a2 = await mgr.create_user_session("alice")  # a1 stays open, not current
    await mgr.record_request("alice", processing_time=1.0)
    child = await mgr.create_child_session("alice", a2.thread_id)
    await mgr.record_request("alice", child.thread_id, processing_time=0.5, error=True)
    await mgr.pause_session("alice")  # paused is still open
    b = await mgr.get_or_create_user_session("bob")
    await mgr.record_request("bob", processing_time=2.0)
    await mgr.end_session("bob")
    await mgr.get_or_create_user_session("carol")
    await other_ns.get_or_create_user_session("alice")
    await other_ns.record_request("alice", processing_time=8.0, error=True)

    alice = await mgr.get_user_stats("alice")
    assert (alice.sessions, alice.open_sessions, alice.users) == (3, 3, 1)
    assert (alice.requests, alice.errors, alice.total_processing_time) == (6, 3, 4.5)
    assert alice.error_rate == 0.5
    assert alice.average_processing_time == 0.75
    assert alice.to_dict() == {
        "sessions": 3, "open_sessions": 3, "users": 1, "requests": 6, "errors": 3,
        "total_processing_time": 4.5, "error_rate": 0.5, "average_processing_time": 0.75,
    }  # fmt: skip
    json.dumps(alice.to_dict())
    bob = await mgr.get_user_stats("bob")
    assert (bob.sessions, bob.open_sessions, bob.users, bob.requests, bob.errors) == (1, 0, 0, 1, 0)
    assert (bob.error_rate, bob.average_processing_time) == (0.0, 2.0)

    total = await mgr.get_stats()
    assert (total.sessions, total.open_sessions, total.users) == (5, 4, 2)
    assert (total.requests, total.errors, total.total_processing_time) == (7, 3, 6.5)
    assert total.error_rate == 3 / 7
    assert total.average_processing_time == 6.5 / 7
    elsewhere = await other_ns.get_stats()
    assert (elsewhere.sessions, elsewhere.requests, elsewhere.errors) == (1, 1, 1)

    # Deletion and expiry keep the aggregates exact.
    await mgr.delete_session("alice", a1.thread_id)
    expired = await mgr.cleanup_inactive_sessions(0)
    assert expired == 3  # alice's paused a2, its child, carol's
    total = await mgr.get_stats()
    assert (total.sessions, total.open_sessions, total.users) == (4, 0, 0)
    assert (total.requests, total.errors, total.total_processing_time) == (3, 1, 3.5)
    await mgr.delete_user_data("alice")
    total = await mgr.get_stats()
    assert (total.sessions, total.requests, total.total_processing_time) == (2, 1, 2.0)
    assert await mgr.get_user_stats("bob") == bob
    assert (await mgr.get_session("bob", b.thread_id)).request_count == 1


# -- the event log ---------------------------------------------------------------------------


async def test_event_log_kinds_payloads_and_order(mgr: Manager) -> None:
    u = "alice"
    first = await mgr.get_or_create_user_session(u, "T0")
    await mgr.get_or_create_user_session(u)  # finding it writes nothing
    await mgr.update_session(u, {"title": "T1"})
    await mgr.update_session(u, {"metadata": {"a": 1}})
    await mgr.update_session(u, {"title": "T2", "metadata": {}})
    await mgr.record_request(u)  # a successful request is a metric, not an event
    await mgr.record_request(u, error=True)
    await mgr.record_request(u, error=True)
    await mgr.pause_session(u)
    await mgr.resume_session(u)
    second = await mgr.create_user_session(u)
    await mgr.switch_session(u, first.thread_id)
    await mgr.deactivate_session(u)
    await mgr.switch_session(u, first.thread_id)
    child = await mgr.create_child_session(u, first.thread_id)
    await mgr.end_session(u)
    assert await mgr.cleanup_inactive_sessions(0) == 1  # the second session, still open
    await mgr.delete_session(u, first.thread_id)

    f, s, c = first.thread_id, second.thread_id, child.thread_id
    expected = [
        (f, "created", {}),
        (f, "updated", {"fields": ["title"]}),
        (f, "updated", {"fields": ["metadata"]}),
        (f, "updated", {"fields": ["title", "metadata"]}),
        (f, "error", {"error_count": 1}),
        (f, "error", {"error_count": 2}),
        (f, "paused", {"from": "active", "to": "paused"}),
        (f, "resumed", {"from": "paused", "to": "active"}),
        (f, "deactivated", {}),
        (s, "created", {}),
        (s, "deactivated", {}),
        (f, "switched", {}),
        (f, "deactivated", {}),
        (f, "switched", {}),
        (c, "created", {"parent_thread_id": f}),
        (f, "ended", {"from": "active", "to": "completed"}),
        (c, "ended", {"from": "active", "to": "completed"}),
        (s, "expired", {"from": "active", "to": "expired"}),
        (f, "deleted", {}),
        (c, "deleted", {}),
    ]
    events = await mgr.get_session_events(u)
    assert kinds(events) == expected
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert all((e.namespace, e.user_id) == ("default", u) for e in events)
    assert all(e.created_at.utcoffset() == timedelta(0) for e in events)
    stamps = [e.created_at for e in events]
    assert all(a <= b for a, b in itertools.pairwise(stamps))
    assert all(json.loads(json.dumps(e.to_dict()))["kind"] == e.kind for e in events)
    # One session's events.
    assert kinds(await mgr.get_session_events(u, s)) == [x for x in expected if x[0] == s]
    assert kinds(await mgr.get_session_events(u, c)) == [x for x in expected if x[0] == c]


async def test_event_pages_and_ownership(make: MakeManager) -> None:
    mgr = make()
    alice = await mgr.get_or_create_user_session("alice")
    for i in range(6):
        await mgr.update_session("alice", {"title": f"t{i}"})
    await mgr.create_user_session("alice")
    bob = await mgr.get_or_create_user_session("bob")
    everything_ = await mgr.get_session_events("alice")
    assert len(everything_) == 9
    pages, after = [], None
    while page := await mgr.get_session_events("alice", limit=2, after_seq=after):
        pages.append(page)
        after = page[-1].seq
    assert [len(p) for p in pages] == [2, 2, 2, 2, 1]
    assert [e for p in pages for e in p] == everything_
    mid = everything_[3].seq
    assert await mgr.get_session_events("alice", after_seq=mid) == everything_[4:]
    assert await mgr.get_session_events("alice", after_seq=everything_[-1].seq) == []
    thread_pages = await mgr.get_session_events("alice", alice.thread_id, limit=3)
    assert [e.thread_id for e in thread_pages] == [alice.thread_id] * 3
    # Another user's thread yields nothing, as an unknown one does.
    assert await mgr.get_session_events("bob", alice.thread_id) == []
    assert await mgr.get_session_events("mallory", alice.thread_id) == []
    assert await mgr.get_session_events("alice", bob.thread_id) == []
    assert kinds(await mgr.get_session_events("bob")) == [(bob.thread_id, "created", {})]
    assert await mgr.get_session_events("alice", str(uuid.uuid4())) == []
    # Namespaces see their own log only.
    assert await make(namespace="other").get_session_events("alice") == []
    for bad in ({"limit": 0}, {"limit": 1001}, {"after_seq": 0}, {"after_seq": -1}):
        with pytest.raises(InvalidInputError):
            await mgr.get_session_events("alice", **bad)


# -- expiry ----------------------------------------------------------------------------------


async def test_session_timeout_expires_lazily(make_all: MakeManager) -> None:
    mgr = make_all(session_timeout=0.3)
    first = await mgr.get_or_create_user_session("alice")
    assert (await mgr.get_or_create_user_session("alice")).thread_id == first.thread_id
    paused = await mgr.get_or_create_user_session("bob")
    await mgr.pause_session("bob")
    parent_child = await mgr.create_child_session("alice", first.thread_id)
    await asyncio.sleep(0.45)
    assert first.is_expired(0.3)
    second = await mgr.get_or_create_user_session("alice")
    assert second.thread_id != first.thread_id
    assert (second.status, second.is_active) == ("active", True)
    old = await mgr.get_session("alice", first.thread_id)
    assert (old.status, old.is_active) == ("expired", False)
    assert old.ended_at is not None
    assert old.is_expired()
    # Expiring a session expires its open children, as ending does.
    assert (await mgr.get_session("alice", parent_child.thread_id)).status == "expired"
    events = await mgr.get_session_events("alice", first.thread_id)
    assert (events[-1].kind, events[-1].payload) == ("expired", {"from": "active", "to": "expired"})
    # A paused session expires too.
    bob = await mgr.get_or_create_user_session("bob")
    assert bob.thread_id != paused.thread_id
    assert (await mgr.get_session("bob", paused.thread_id)).status == "expired"


async def test_activity_keeps_a_session_alive(make: MakeManager) -> None:
    mgr = make(session_timeout=0.4)
    first = await mgr.get_or_create_user_session("alice")
    await asyncio.sleep(0.25)
    await mgr.record_request("alice")
    await asyncio.sleep(0.25)  # 0.5 s since creation, 0.25 s since the request
    assert (await mgr.get_or_create_user_session("alice")).thread_id == first.thread_id
    assert (await mgr.get_session("alice", first.thread_id)).status == "active"


async def test_cleanup_inactive_sessions_in_batches(make: MakeManager) -> None:
    without = make()
    with pytest.raises(InvalidInputError):  # no max_idle_seconds and no session_timeout
        await without.cleanup_inactive_sessions()
    mgr = make(cleanup_batch_size=2, session_timeout=0.25)
    users = [f"idle-{i}" for i in range(4)]
    idle = [await mgr.get_or_create_user_session(u) for u in users]
    await mgr.pause_session(users[0])  # paused sessions are open: they expire too
    children = [await mgr.create_child_session(users[1], idle[1].thread_id) for _ in range(2)]
    ended = await mgr.get_or_create_user_session("ended")
    await mgr.end_session("ended")
    await asyncio.sleep(0.4)
    recent = await mgr.get_or_create_user_session("recent")
    ended_before = await mgr.get_session("ended", ended.thread_id)

    assert await mgr.cleanup_inactive_sessions() == 6  # 4 + 2 children, in batches of 2
    for s in (*idle, *children):
        stored = await mgr.get_session(s.user_id, s.thread_id)
        assert (stored.status, stored.is_active) == ("expired", False)
        assert stored.ended_at is not None
    for u in users:
        assert not await mgr.has_session(u)  # no stale cached session
    assert await mgr.get_session("ended", ended.thread_id) == ended_before
    assert (await mgr.get_current_user_session("recent")).thread_id == recent.thread_id
    stats = await mgr.get_stats()
    assert (stats.open_sessions, stats.users) == (1, 1)
    # An idle run (nothing to do) returns 0; so does a run on a round multiple of the batch.
    assert await mgr.cleanup_inactive_sessions() == 0
    more = [await mgr.get_or_create_user_session(f"more-{i}") for i in range(3)]
    assert await mgr.cleanup_inactive_sessions(0) == 4  # the 3 new ones and "recent"
    assert await mgr.cleanup_inactive_sessions(0) == 0
    expired_events = [
        e for u in [*users, "recent", *(m.user_id for m in more)]
        for e in await mgr.get_session_events(u) if e.kind == "expired"
    ]  # fmt: skip
    assert len(expired_events) == 10  # each session expired exactly once


async def test_count_inactive_sessions_is_a_dry_run_and_cleanup_reports_batches(
    make: MakeManager,
) -> None:
    mgr = make(cleanup_batch_size=2)
    sessions = [await mgr.get_or_create_user_session(f"dry-{i}") for i in range(5)]
    await mgr.create_child_session("dry-0", sessions[0].thread_id)
    await asyncio.sleep(0.3)
    assert await mgr.count_inactive_sessions(0.2) == 6
    assert await mgr.count_inactive_sessions(3600) == 0
    for s in sessions:  # nothing changed
        assert (await mgr.get_session(s.user_id, s.thread_id)).status == "active"
    batches: list[int] = []
    assert await mgr.cleanup_inactive_sessions(0.2, on_batch=batches.append) == 6
    assert sum(batches) == 6
    assert len(batches) >= 3  # batches of 2 (a parent's child counts in its parent's batch)
    assert await mgr.count_inactive_sessions(0) == 0
    with pytest.raises(InvalidInputError) as info:
        await mgr.count_inactive_sessions()
    assert info.value.field == "max_idle_seconds"


async def test_list_sessions_filters_by_user_and_status_in_pages(mgr: Manager) -> None:
    a1 = await mgr.get_or_create_user_session("lister-a")
    await mgr.end_session("lister-a", status="failed")
    a2 = await mgr.get_or_create_user_session("lister-a")
    b1 = await mgr.get_or_create_user_session("lister-b")
    await mgr.pause_session("lister-b")
    every = await mgr.list_sessions()
    assert [s.thread_id for s in every] == [b1.thread_id, a2.thread_id, a1.thread_id]
    assert [s.thread_id for s in await mgr.list_sessions(user_id="lister-a")] == [
        a2.thread_id,
        a1.thread_id,
    ]
    assert [s.thread_id for s in await mgr.list_sessions(status="failed")] == [a1.thread_id]
    assert [s.thread_id for s in await mgr.list_sessions(status="paused")] == [b1.thread_id]
    assert await mgr.list_sessions(user_id="lister-b", status="active") == []
    first = await mgr.list_sessions(limit=1)
    rest = await mgr.list_sessions(before_id=first[-1].id)
    assert first + rest == every
    for bad, field in (({"status": "done"}, "status"), ({"user_id": ""}, "user_id"),
                       ({"limit": 0}, "limit"), ({"before_id": -1}, "before_id")):  # fmt: skip
        with pytest.raises(InvalidInputError) as info:
            await mgr.list_sessions(**bad)
        assert info.value.field == field


async def test_a_deleted_thread_is_not_brought_back_by_reconciliation(mgr: Manager) -> None:
    """A replica may hold a stale copy of a session another one deleted (in its cache, or
    seeded into its fallback): replaying it must not recreate the thread."""
    stale = await mgr.get_or_create_user_session("ghost")
    await mgr.delete_user_data("ghost")
    adopted = (
        await mgr.manager.store.adopt(stale) if mgr.is_async else mgr.manager.store.adopt(stale)
    )
    assert adopted == stale
    assert await mgr.list_user_sessions("ghost") == []
    assert await mgr.is_thread_deleted(stale.thread_id)


async def test_schema_status_and_migrate(mgr: Manager) -> None:
    status = await mgr.schema_status()
    if mgr.backend == "memory":
        assert status == {"applied": [], "pending": []}
        assert await mgr.migrate() == []
        return
    dialect: Any = "postgresql" if mgr.backend == "postgres" else "sqlite"
    names = [f"{m.version:04d}_{m.name}" for m in migrations.migrations(dialect)]
    assert status == {"applied": [], "pending": names}
    assert await mgr.migrate() == names
    assert await mgr.schema_status() == {"applied": names, "pending": []}
    assert await mgr.migrate() == []
    assert (await mgr.get_or_create_user_session("after-migrate")).status == "active"


async def test_cleanup_rejects_a_bad_idle_time(
    mgr: Manager, request: pytest.FixtureRequest
) -> None:
    for bad in (-1, float("nan"), "10"):
        with pytest.raises(InvalidInputError) as info:
            await mgr.cleanup_inactive_sessions(bad)
        assert info.value.field == "max_idle_seconds"


async def test_an_idle_time_longer_than_the_calendar_expires_nothing(mgr: Manager) -> None:
    """Hypothesis found it: 2,000 years before now is before year 1 (OverflowError)."""
    await mgr.get_or_create_user_session("alice")
    assert await mgr.count_inactive_sessions(63_931_509_673) == 0
    assert await mgr.cleanup_inactive_sessions(999_999_999_999) == 0


# -- limits ----------------------------------------------------------------------------------


async def test_max_sessions_per_user_purges_the_oldest_ended(make: MakeManager) -> None:
    m = make(max_sessions_per_user=3)
    a = await m.create_user_session("alice", "a")
    b = await m.create_user_session("alice", "b")
    c = await m.create_user_session("alice", "c")
    await m.get_or_create_user_session("bob")  # other users do not count
    before = await everything(m, "alice")
    with pytest.raises(SessionLimitError):  # nothing ended: nothing to purge
        await m.create_user_session("alice", "d")
    with pytest.raises(SessionLimitError):
        await m.create_child_session("alice", c.thread_id)
    assert await everything(m, "alice") == before
    assert (await m.get_current_user_session("alice")).thread_id == c.thread_id

    await m.end_session("alice", b.thread_id, "failed")
    await m.end_session("alice", a.thread_id)
    d = await m.create_user_session("alice", "d")  # purges a (oldest ended), not b
    assert await m.is_thread_deleted(a.thread_id)
    assert not await m.is_thread_deleted(b.thread_id)
    assert [s.title for s in await m.list_user_sessions("alice")] == ["d", "c", "b"]
    deleted = [e for e in await m.get_session_events("alice") if e.kind == "deleted"]
    assert [e.thread_id for e in deleted] == [a.thread_id]
    child = await m.create_child_session("alice", d.thread_id)  # purges b
    assert await m.is_thread_deleted(b.thread_id)
    assert {s.thread_id for s in await m.list_user_sessions("alice")} == {
        c.thread_id, d.thread_id, child.thread_id,
    }  # fmt: skip
    with pytest.raises(SessionLimitError):
        await m.create_user_session("alice", "e")
    # The purged threads' checkpoints are swept by the next maintenance round.
    assert await m.sweep_deleted_threads() == 2
    assert await m.sweep_deleted_threads() == 0
    stats = await m.get_user_stats("alice")
    assert stats.sessions == 3


async def test_max_sessions_per_user_raise_policy(make: MakeManager) -> None:
    m = make(max_sessions_per_user=2, session_limit_policy="raise")
    a = await m.create_user_session("alice")
    await m.end_session("alice", a.thread_id)
    b = await m.get_or_create_user_session("alice")
    await m.end_session("alice")
    before = await everything(m, "alice")
    with pytest.raises(SessionLimitError):
        await m.get_or_create_user_session("alice")
    with pytest.raises(SessionLimitError):
        await m.create_user_session("alice")
    assert await everything(m, "alice") == before
    assert not await m.is_thread_deleted(a.thread_id)
    assert not await m.has_session("alice")
    await m.delete_session("alice", b.thread_id)  # room again
    assert (await m.get_or_create_user_session("alice")).thread_id not in (a.thread_id, b.thread_id)


async def test_max_active_sessions(make: MakeManager) -> None:
    m = make(max_active_sessions=3)
    for user in ("u1", "u2", "u3"):
        await m.get_or_create_user_session(user)
    before = await everything(m, "u1", "u4")
    with pytest.raises(SessionLimitError):
        await m.get_or_create_user_session("u4")
    with pytest.raises(SessionLimitError):  # the old session would stay open: a 4th
        await m.create_user_session("u1")
    with pytest.raises(SessionLimitError):
        await m.create_child_session("u1", (await m.get_current_user_session("u1")).thread_id)
    # Nothing idle: a cleanup changes nothing, the limit still holds.
    assert await m.cleanup_inactive_sessions(3600) == 0
    with pytest.raises(SessionLimitError):
        await m.get_or_create_user_session("u4")
    assert await everything(m, "u1", "u4") == before
    assert (await m.get_stats()).open_sessions == 3
    await m.pause_session("u2")  # paused is still open
    with pytest.raises(SessionLimitError):
        await m.get_or_create_user_session("u4")
    await m.end_session("u2")
    assert (await m.get_or_create_user_session("u4")).is_active
    assert (await m.get_stats()).open_sessions == 3
    # Another namespace has its own count.
    assert await make(namespace="other", max_active_sessions=3).get_or_create_user_session("u5")


async def test_max_active_sessions_tries_a_cleanup_before_refusing(
    make: MakeManager, request: pytest.FixtureRequest
) -> None:
    m = make(max_active_sessions=2, session_timeout=0.2)
    await m.get_or_create_user_session("u1")
    await m.get_or_create_user_session("u2")
    await asyncio.sleep(0.3)
    s = await m.get_or_create_user_session("u3")
    assert s.is_active
    assert (await m.get_stats()).open_sessions == 1


# -- deletion, export, retention -------------------------------------------------------------


@pytest.fixture
async def agent(mgr: Manager) -> Any:
    """The demo's chat agent (offline model) on the test's manager."""
    bot = ChatAgent(LLM, session_manager=mgr.manager)
    yield bot
    await mgr.close_agent(bot)


async def test_delete_user_data_erases_everything(
    mgr: Manager, agent: BaseAgent, tables: Tables | None
) -> None:
    s1 = await mgr.get_or_create_user_session("alice", "one")
    for text in ("hello", "again"):
        await mgr.run(agent, text, user_id="alice")
    s2 = await mgr.create_user_session("alice", "two")
    for text in ("second chat", "more"):
        await mgr.run(agent, text, user_id="alice")
    child = await mgr.create_child_session("alice", s2.thread_id)
    bob = await mgr.get_or_create_user_session("bob")
    await mgr.run(agent, "bob's turn", user_id="bob")
    threads = [s1.thread_id, s2.thread_id, child.thread_id]
    assert (await mgr.state(s1.thread_id))["messages"]
    assert (await mgr.get_user_stats("alice")).requests == 4
    if tables is not None:
        assert sum(tables.checkpoint_rows(threads).values()) > 0
    bob_events = await mgr.get_session_events("bob")

    assert await mgr.delete_user_data("alice") == 3
    assert await mgr.list_user_sessions("alice") == []
    assert await mgr.get_session_events("alice") == []
    assert await mgr.get_user_stats("alice") == SessionStats()
    assert not await mgr.has_session("alice")
    for t in threads:
        assert await mgr.is_thread_deleted(t)
        assert await mgr.state(t) is None
        with pytest.raises(SessionNotFoundError):
            await mgr.get_session("alice", t)
    # Bob is untouched.
    assert (await mgr.get_current_user_session("bob")).thread_id == bob.thread_id
    assert await mgr.get_session_events("bob") == bob_events
    assert (await mgr.state(bob.thread_id))["messages"]
    assert (await mgr.get_stats()).sessions == 1
    if tables is not None:
        assert tables.count("SELECT count(*) FROM {t} WHERE user_id = %s", ("alice",)) == 0
        assert tables.count("SELECT count(*) FROM {events} WHERE user_id = %s", ("alice",)) == 0
        assert tables.mentioning(threads) == 0
        assert tables.checkpoint_rows(threads) == dict.fromkeys(tables.checkpoint_tables, 0)
        assert sum(tables.checkpoint_rows([bob.thread_id]).values()) > 0
    # A late write to a deleted thread (config only, no user) is refused, recreates nothing.
    for t in threads:
        with pytest.raises(SessionNotFoundError):
            await mgr.run(agent, "late", {"configurable": {"thread_id": t}})
        assert await mgr.state(t) is None
    if tables is not None:
        assert tables.checkpoint_rows(threads) == dict.fromkeys(tables.checkpoint_tables, 0)
    # Deleting again is a no-op; the user may come back, on a new thread.
    assert await mgr.delete_user_data("alice") == 0
    back = await mgr.get_or_create_user_session("alice")
    assert back.thread_id not in threads
    assert not await mgr.is_thread_deleted(back.thread_id)


async def test_export_user_data(mgr: Manager, agent: BaseAgent) -> None:
    s1 = await mgr.get_or_create_user_session("alice", "first", {"lang": "en"})
    await mgr.run(agent, "hello there", user_id="alice")
    await mgr.record_request("alice", processing_time=0.5, error=True)
    await mgr.end_session("alice")
    s2 = await mgr.get_or_create_user_session("alice", "second")
    child = await mgr.create_child_session("alice", s2.thread_id)
    await mgr.get_or_create_user_session("bob", "not exported")

    exported = await mgr.export_user_data("alice")
    decoded = json.loads(json.dumps(exported))
    assert decoded == exported  # plain JSON data
    assert (exported["user_id"], exported["namespace"]) == ("alice", "default")
    assert isinstance(exported["exported_at"], str)
    assert [s["thread_id"] for s in exported["sessions"]] == [
        s1.thread_id, s2.thread_id, child.thread_id,
    ]  # fmt: skip
    first = exported["sessions"][0]
    assert (first["title"], first["metadata"], first["status"]) == (
        "first",
        {"lang": "en"},
        "completed",
    )
    assert (first["request_count"], first["error_count"]) == (2, 1)
    assert exported["sessions"][2]["parent_thread_id"] == s2.thread_id
    events = exported["events"]
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    assert {e["user_id"] for e in events} == {"alice"}
    assert [e["kind"] for e in events if e["thread_id"] == s1.thread_id] == [
        "created", "error", "ended",
    ]  # fmt: skip
    assert set(exported["conversations"]) == {s1.thread_id, s2.thread_id, child.thread_id}
    messages = exported["conversations"][s1.thread_id]["messages"]
    assert [m["type"] for m in messages] == ["human", "ai"]
    assert messages[0]["data"]["content"] == "hello there"
    assert exported["conversations"][s2.thread_id] is None
    assert "not exported" not in json.dumps(exported)
    empty = await mgr.export_user_data("nobody")
    assert (empty["sessions"], empty["events"], empty["conversations"]) == ([], [], {})


async def test_retention_prunes_ended_sessions_only(
    mgr: Manager, agent: BaseAgent, request: pytest.FixtureRequest
) -> None:
    ended = await mgr.get_or_create_user_session("alice")
    for text in ("one", "two", "three"):
        await mgr.run(agent, text, user_id="alice")
    await mgr.end_session("alice")
    open_ = await mgr.get_or_create_user_session("alice")
    for text in ("four", "five"):
        await mgr.run(agent, text, user_id="alice")

    def history(thread: str) -> int:
        saver = mgr.manager.persistence.sync()
        return len(list(saver.list({"configurable": {"thread_id": thread}})))

    kept_open = history(open_.thread_id)
    before = history(ended.thread_id)
    assert before > 3
    latest = await mgr.state(ended.thread_id)
    # The ended session only; SQLite's and memory's savers have no prune: nothing done there.
    pruned = 1 if backend_of(request) == "postgres" else 0
    assert await mgr.apply_retention(0, "keep_latest") == pruned
    assert await mgr.apply_retention(0, "keep_latest") == 0  # done once
    assert await mgr.state(ended.thread_id) == latest  # the latest state is intact
    if backend_of(request) == "postgres":
        assert history(ended.thread_id) == 1
    assert history(open_.thread_id) == kept_open
    with pytest.raises(InvalidInputError):
        await mgr.apply_retention(0, "shred")
    with pytest.raises(InvalidInputError):
        await mgr.apply_retention()  # no retention_period setting

    await mgr.end_session("alice", open_.thread_id, "failed")
    assert await mgr.apply_retention(0, "delete") == 1
    assert await mgr.state(open_.thread_id) is None
    assert await mgr.get_session("alice", open_.thread_id)  # the session itself stays


async def test_run_maintenance_report(make: MakeManager, request: pytest.FixtureRequest) -> None:
    m = make(session_timeout=0.2, retention_period=0, max_sessions_per_user=2)
    a = await m.get_or_create_user_session("alice")
    await m.end_session("alice")
    await m.get_or_create_user_session("alice")
    await m.end_session("alice")
    await m.get_or_create_user_session("alice")  # purges a: tombstoned, not swept yet
    assert await m.is_thread_deleted(a.thread_id)
    await m.get_or_create_user_session("bob")
    await asyncio.sleep(0.3)
    # Sweep first, then expiry (alice's and bob's current sessions), then retention (the
    # ended sessions, the two just expired included; keep_latest prunes on PostgreSQL only).
    retained = 3 if backend_of(request) == "postgres" else 0
    assert await m.run_maintenance() == {"expired": 2, "retained": retained, "swept": 1}
    assert await m.run_maintenance() == {"expired": 0, "retained": 0, "swept": 0}


# -- the background cleaner ------------------------------------------------------------------


def cleaner_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "bssagent-cleaner" and t.is_alive()}


def cleaner_tasks() -> set[asyncio.Task[Any]]:
    return {
        t for t in asyncio.all_tasks()
        if not t.done() and "_clean_forever" in getattr(t.get_coro(), "__qualname__", "")
    }  # fmt: skip


async def check_cleaner(mgr: Manager, make: MakeManager, explicit: bool) -> None:
    threads_before = cleaner_threads()
    users = [f"u{i}" for i in range(3)]
    for u in users:
        await mgr.get_or_create_user_session(u)
    if explicit:
        await mgr.start_cleaner(0.05)
        await mgr.start_cleaner(0.05)  # a second start is a no-op
    running = cleaner_tasks() if mgr.is_async else cleaner_threads() - threads_before
    assert len(running) == 1

    async def all_expired() -> bool:
        stats = await mgr.get_stats()
        return stats.open_sessions == 0

    await wait_for(all_expired)
    for u in users:
        assert not await mgr.has_session(u)
        assert [e.kind for e in await mgr.get_session_events(u)] == ["created", "expired"]
    await mgr.close()
    await asyncio.sleep(0)  # let a cancelled task finish
    assert not (cleaner_tasks() if mgr.is_async else cleaner_threads() - threads_before)
    if not explicit:
        return
    # Closed: nothing expires any more (memory:// stays readable through the same manager).
    observer = mgr if mgr.backend == "memory" else make()
    late = await observer.create_user_session("late")
    await asyncio.sleep(0.35)  # > session_timeout + 2 intervals
    assert (await observer.get_session("late", late.thread_id)).status == "active"


async def test_start_cleaner_expires_in_the_background_until_close(make: MakeManager) -> None:
    mgr = make(session_timeout=0.1)
    await check_cleaner(mgr, make, explicit=True)


async def test_cleanup_interval_starts_the_cleaner(make: MakeManager) -> None:
    mgr = make(session_timeout=0.1, cleanup_interval=0.05)
    await check_cleaner(mgr, make, explicit=False)


# -- agents ----------------------------------------------------------------------------------


class FlakyAgent(BaseAgent):
    """Answers with the offline model, raises on "boom"."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("flaky", **kwargs)

    def define_graph(self) -> StateGraph[Any]:
        def node(state: MessagesState) -> dict[str, Any]:
            if state["messages"][-1].content == "boom":
                raise RuntimeError("boom")
            return {"messages": [AIMessage("ok")]}

        graph = StateGraph(MessagesState)
        graph.add_node("node", node)
        graph.add_edge(START, "node")
        graph.add_edge("node", END)
        return graph


async def test_agent_runs_are_recorded_and_refused_on_closed_sessions(mgr: Manager) -> None:
    bot = FlakyAgent(session_manager=mgr.manager)
    try:
        s = await mgr.get_or_create_user_session("alice")
        await mgr.run(bot, "hi", user_id="alice")
        with pytest.raises(RuntimeError):
            await mgr.run(bot, "boom", user_id="alice")
        await mgr.run(bot, "again", user_id="alice", thread_id=s.thread_id)
        stored = await mgr.get_session("alice", s.thread_id)
        assert (stored.request_count, stored.error_count) == (3, 1)
        assert stored.total_processing_time > 0
        await mgr.pause_session("alice")
        with pytest.raises(InvalidTransitionError):
            await mgr.run(bot, "paused?", user_id="alice")
        await mgr.resume_session("alice")
        await mgr.run(bot, "back", user_id="alice")
        await mgr.end_session("alice")
        with pytest.raises(InvalidTransitionError):
            await mgr.run(bot, "ended?", user_id="alice", thread_id=s.thread_id)
        stored = await mgr.get_session("alice", s.thread_id)
        assert (stored.request_count, stored.error_count) == (4, 1)  # refusals do not count
        # With user_id only, the next run starts a new session.
        await mgr.run(bot, "new chat", user_id="alice")
        current = await mgr.get_current_user_session("alice")
        assert current.thread_id != s.thread_id
        assert (await mgr.get_session("alice", current.thread_id)).request_count == 1
        # A config-only run is not counted (no user), but a deleted thread is refused.
        await mgr.run(bot, "anonymous", current.config)
        assert (await mgr.get_session("alice", current.thread_id)).request_count == 1
        await mgr.delete_session("alice", s.thread_id)
        with pytest.raises(SessionNotFoundError):
            await mgr.run(bot, "late", s.config)
        assert await mgr.state(s.thread_id) is None
    finally:
        await mgr.close_agent(bot)


async def test_concurrent_record_request_in_one_process(mgr: Manager) -> None:
    s = await mgr.get_or_create_user_session("alice")
    n, per = 8, 25

    def work(_: int) -> None:
        for i in range(per):
            mgr.manager.record_request("alice", s.thread_id, processing_time=0.25, error=i % 5 == 0)

    if mgr.is_async:

        async def task() -> None:
            for i in range(per):
                await mgr.manager.record_request(
                    "alice", s.thread_id, processing_time=0.25, error=i % 5 == 0
                )

        await asyncio.gather(*(task() for _ in range(n)))
    else:
        with ThreadPoolExecutor(max_workers=n) as pool:
            list(pool.map(work, range(n)))
    stored = await mgr.get_session("alice", s.thread_id)
    assert (stored.request_count, stored.error_count) == (n * per, n * 5)
    assert stored.total_processing_time == n * per * 0.25
    stats = await mgr.get_stats()
    assert (stats.requests, stats.errors, stats.total_processing_time) == (n * per, n * 5, 50.0)
    errors = [e for e in await mgr.get_session_events("alice", limit=1000) if e.kind == "error"]
    assert sorted(e.payload["error_count"] for e in errors) == list(range(1, n * 5 + 1))
