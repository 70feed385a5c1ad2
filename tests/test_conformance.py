"""The conformance suite: one contract, every backend, both managers.

Each test body is written once against :class:`Manager`, a small adapter that makes the
sync :class:`~bssagent.AgentSessionManager` and the async
:class:`~bssagent.AsyncAgentSessionManager` look alike (every call is awaited). The
``make`` fixture is parametrized over the two managers, with and without the session cache
(``cache_size=0`` makes every read reach the storage), and over the three backends through
``backend_url`` (memory, SQLite, PostgreSQL). Every manager gets ``table_name`` so each
PostgreSQL test has a table of its own.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pydantic
import pytest

from bssagent import (
    AgentSessionManager,
    AsyncAgentSessionManager,
    BssAgentError,
    SessionNotFoundError,
    UnknownFieldError,
    UserSession,
)
from bssagent.sessions.model import thaw

SYNC_THREADS = 32
ASYNC_TASKS = 64


class Manager:
    """Awaitable facade over a sync or async manager: ``await m.method(...)`` for both.

    Properties (``is_degraded``, ``namespace``, ``backend``, ...) pass through unchanged.
    """

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

    async def race(self, n: int, method: str, *args: Any) -> list[Any]:
        """Call ``method(*args)`` ``n`` times at once: threads (sync) or tasks (async)."""
        fn = getattr(self.manager, method)
        if self.is_async:
            return list(await asyncio.gather(*(fn(*args) for _ in range(n))))
        barrier = threading.Barrier(n)

        def work() -> Any:
            barrier.wait(timeout=30)
            return fn(*args)

        with ThreadPoolExecutor(max_workers=n) as pool:
            futures = [pool.submit(work) for _ in range(n)]
            return [f.result(timeout=60) for f in futures]

    async def context(self) -> tuple[Any, list[str]]:
        """Use the manager as a (async) context manager; return what ``as`` bound and the
        sequence of calls seen (``"call"`` inside, ``"close"`` for each close)."""
        events: list[str] = []
        real_close = self.manager.close

        def spy_close() -> Any:
            events.append("close")
            return real_close()

        self.manager.close = spy_close  # type: ignore[method-assign]
        try:
            if self.is_async:
                async with self.manager as entered:
                    await entered.get_or_create_user_session("ctx")
                    events.append("call")
            else:
                with self.manager as entered:
                    entered.get_or_create_user_session("ctx")
                    events.append("call")
        finally:
            del self.manager.close
        return entered, events


VARIANTS = {
    "sync-cached": (AgentSessionManager, {}),
    "sync-nocache": (AgentSessionManager, {"cache_size": 0}),
    "async-cached": (AsyncAgentSessionManager, {}),
    "async-nocache": (AsyncAgentSessionManager, {"cache_size": 0}),
}

MakeManager = Callable[..., Manager]


@pytest.fixture(params=list(VARIANTS))
async def make(request: pytest.FixtureRequest, backend_url: str, table_name: str) -> Any:
    """A factory of managers of one variant, all on the same database URL and table."""
    cls, variant_options = VARIANTS[request.param]
    made: list[Manager] = []

    def factory(**options: Any) -> Manager:
        kwargs = {"database_url": backend_url, "table_name": table_name, **variant_options}
        manager = Manager(cls(**{**kwargs, **options}))
        made.append(manager)
        return manager

    yield factory
    degraded = [m.backend for m in made if m.is_degraded]
    for manager in made:
        await manager.close()
    # A silent fall back to memory would make every storage assertion meaningless.
    assert not degraded, "a manager fell back to memory during the test"


@pytest.fixture
def mgr(make: MakeManager) -> Manager:
    return make()


@pytest.fixture
def cached(mgr: Manager) -> bool:
    """Whether this variant caches current sessions (``cache_size`` > 0)."""
    return bool(mgr.settings.cache_size)


def _is_memory(m: Manager) -> bool:
    return m.backend == "memory"


async def _not_found(coro: Any) -> SessionNotFoundError:
    with pytest.raises(SessionNotFoundError) as info:
        await coro
    assert type(info.value) is SessionNotFoundError
    return info.value


def _ids(sessions: list[UserSession]) -> list[int]:
    return [s.id for s in sessions]


def _assert_utc(s: UserSession) -> None:
    for stamp in (s.created_at, s.updated_at):
        assert stamp.tzinfo is not None
        assert stamp.utcoffset() == timedelta(0)


# -- the current session --------------------------------------------------------------------


async def test_get_or_create_returns_the_same_session_twice(mgr: Manager) -> None:
    first = await mgr.get_or_create_user_session("alice", "Hello", {"k": 1})
    second = await mgr.get_or_create_user_session("alice", "Other title", {"k": 2})
    assert second.thread_id == first.thread_id
    assert second.id == first.id
    # The second call found the session: its title and metadata are not applied.
    assert (second.title, second.metadata) == ("Hello", {"k": 1})
    assert first.is_active
    assert first.user_id == "alice"
    _assert_utc(first)
    stored = await mgr.list_user_sessions("alice")
    assert [s.thread_id for s in stored] == [first.thread_id]


async def test_get_or_create_defaults(mgr: Manager) -> None:
    session = await mgr.get_or_create_user_session("alice")
    assert session.title == "New Chat"
    assert session.metadata == {}
    assert session.namespace == "default" == mgr.namespace
    assert session.created_at == session.updated_at


async def test_create_user_session_keeps_the_old_one_inactive(mgr: Manager) -> None:
    old = await mgr.get_or_create_user_session("alice", "Old")
    new = await mgr.create_user_session("alice", "New", {"n": 1})
    assert new.thread_id != old.thread_id
    assert new.id > old.id
    assert new.is_active
    assert (new.title, new.metadata) == ("New", {"n": 1})
    assert (await mgr.get_current_user_session("alice")).thread_id == new.thread_id
    assert (await mgr.get_or_create_user_session("alice")).thread_id == new.thread_id
    old_now = await mgr.get_session("alice", old.thread_id)
    assert not old_now.is_active
    assert old_now.title == "Old"
    assert old_now.updated_at > old.updated_at
    listed = await mgr.list_user_sessions("alice")
    assert [(s.thread_id, s.is_active) for s in listed] == [
        (new.thread_id, True),
        (old.thread_id, False),
    ]


async def test_create_user_session_for_a_new_user(mgr: Manager) -> None:
    session = await mgr.create_user_session("bob")
    assert session.is_active
    assert session.title == "New Chat"
    assert await mgr.has_session("bob")


async def test_get_current_user_session_raises_for_unknown_user(mgr: Manager) -> None:
    error = await _not_found(mgr.get_current_user_session("nobody"))
    assert isinstance(error, ValueError)
    assert isinstance(error, BssAgentError)
    with pytest.raises(ValueError):  # the seed API raised ValueError; callers catch that
        await mgr.get_current_user_session("nobody")
    assert not await mgr.has_session("nobody")
    # Asking did not create anything.
    assert await mgr.list_user_sessions("nobody") == []
    assert await mgr.list_active_sessions() == []


# -- updates --------------------------------------------------------------------------------


async def test_update_session_title_and_metadata(mgr: Manager) -> None:
    created = await mgr.get_or_create_user_session("alice", "T0", {"a": 1, "b": 2})
    s1 = await mgr.update_session("alice", {"title": "T1"})
    assert (s1.title, s1.metadata) == ("T1", {"a": 1, "b": 2})
    s2 = await mgr.update_session("alice", {"metadata": {"c": [1, "x"]}})
    assert (s2.title, s2.metadata) == ("T1", {"c": [1, "x"]})  # metadata is replaced whole
    s3 = await mgr.update_session("alice", {"title": "T3", "metadata": {}})
    assert (s3.title, s3.metadata) == ("T3", {})
    for s in (s1, s2, s3):
        assert s.thread_id == created.thread_id
        assert s.created_at == created.created_at
        assert s.is_active
    stored = await mgr.get_session("alice", created.thread_id)
    assert (stored.title, stored.metadata) == ("T3", {})
    current = await mgr.get_current_user_session("alice")
    assert (current.title, current.updated_at) == ("T3", s3.updated_at)


async def test_updated_at_strictly_increases_on_every_change(mgr: Manager) -> None:
    first = await mgr.get_or_create_user_session("alice")
    stamps = [first.updated_at]

    async def stored() -> UserSession:
        return await mgr.get_session("alice", first.thread_id)

    for i in range(5):  # back-to-back changes, well within one clock tick
        returned = await mgr.update_session("alice", {"title": f"t{i}"})
        assert returned.updated_at == (await stored()).updated_at
        stamps.append(returned.updated_at)
    stamps.append((await mgr.update_session("alice", {"metadata": {"x": 1}})).updated_at)
    await mgr.deactivate_session("alice")
    stamps.append((await stored()).updated_at)
    stamps.append((await mgr.switch_session("alice", first.thread_id)).updated_at)
    second = await mgr.create_user_session("alice")  # deactivates the first
    stamps.append((await stored()).updated_at)
    stamps.append((await mgr.switch_session("alice", first.thread_id)).updated_at)
    assert all(a < b for a, b in itertools.pairwise(stamps)), stamps
    assert (await stored()).created_at == first.created_at
    # Switching away changed the second session too.
    assert (await mgr.get_session("alice", second.thread_id)).updated_at > second.updated_at


async def test_update_rejects_unknown_fields_and_writes_nothing(mgr: Manager) -> None:
    before = await mgr.get_or_create_user_session("alice", "Keep", {"keep": True})
    for updates in ({"title": "Changed", "is_active": False}, {"thread_id": "x"}, {"id": 1}):
        with pytest.raises(UnknownFieldError) as info:
            await mgr.update_session("alice", updates)
        assert info.value.field == "updates"
    after = await mgr.get_session("alice", before.thread_id)
    assert after == before
    mgr.manager.clear_memory_cache()
    assert await mgr.get_current_user_session("alice") == before


async def test_update_session_by_thread_id_changes_an_inactive_session(mgr: Manager) -> None:
    old = await mgr.create_user_session("alice", "Old")
    new = await mgr.create_user_session("alice", "New")
    updated = await mgr.update_session("alice", {"title": "Old renamed"}, thread_id=old.thread_id)
    assert (updated.thread_id, updated.title, updated.is_active) == (
        old.thread_id,
        "Old renamed",
        False,
    )
    current = await mgr.get_current_user_session("alice")
    assert (current.thread_id, current.title) == (new.thread_id, "New")


async def test_update_session_without_a_current_session(mgr: Manager) -> None:
    await _not_found(mgr.update_session("nobody", {"title": "x"}))
    await mgr.create_user_session("alice")
    await mgr.deactivate_session("alice")
    await _not_found(mgr.update_session("alice", {"title": "x"}))


# -- deactivate / delete --------------------------------------------------------------------


async def test_deactivate_session(mgr: Manager) -> None:
    session = await mgr.get_or_create_user_session("alice")
    assert await mgr.has_session("alice")
    assert await mgr.deactivate_session("alice") is True
    assert not await mgr.has_session("alice")
    await _not_found(mgr.get_current_user_session("alice"))
    assert await mgr.deactivate_session("alice") is False
    assert await mgr.deactivate_session("never-seen") is False
    kept = await mgr.get_session("alice", session.thread_id)  # stays stored, inactive
    assert not kept.is_active
    assert await mgr.list_active_sessions() == []
    fresh = await mgr.get_or_create_user_session("alice")
    assert fresh.thread_id != session.thread_id
    assert fresh.is_active


async def test_delete_session(mgr: Manager) -> None:
    old = await mgr.create_user_session("alice", "Old")
    current = await mgr.create_user_session("alice", "Current")
    assert await mgr.delete_session("alice", old.thread_id) == [old.thread_id]
    await _not_found(mgr.get_session("alice", old.thread_id))
    assert (await mgr.get_current_user_session("alice")).thread_id == current.thread_id
    await mgr.delete_session("alice", current.thread_id)
    assert not await mgr.has_session("alice")
    assert await mgr.list_user_sessions("alice") == []
    assert await mgr.list_active_sessions() == []
    await _not_found(mgr.delete_session("alice", current.thread_id))  # already gone


# -- listings and pages ---------------------------------------------------------------------


async def _walk(fetch: Callable[..., Any], limit: int) -> list[list[UserSession]]:
    pages: list[list[UserSession]] = []
    before: int | None = None
    while True:
        page = await fetch(limit=limit, before_id=before)
        assert len(page) <= limit
        if not page:
            return pages
        pages.append(page)
        before = page[-1].id
        assert len(pages) < 50, "pagination does not terminate"


async def test_list_active_sessions_pages(mgr: Manager) -> None:
    users = [f"user-{i}" for i in range(7)]
    created = [await mgr.get_or_create_user_session(u) for u in users]
    # Past sessions of another user are not active and must not show up.
    await mgr.create_user_session("zed")
    zed = await mgr.create_user_session("zed")
    newest_first = [zed, *reversed(created)]

    everything = await mgr.list_active_sessions()
    assert [s.thread_id for s in everything] == [s.thread_id for s in newest_first]
    assert all(s.is_active for s in everything)
    ids = _ids(everything)
    assert ids == sorted(ids, reverse=True)
    assert len(set(ids)) == len(ids)

    pages = await _walk(mgr.list_active_sessions, 3)
    assert [len(p) for p in pages] == [3, 3, 2]
    walked = [s for p in pages for s in p]
    assert _ids(walked) == ids  # every session once, in order, no duplicates

    assert _ids(await mgr.list_active_sessions(limit=1)) == ids[:1]
    assert _ids(await mgr.list_active_sessions(before_id=ids[0] + 1000)) == ids
    assert await mgr.list_active_sessions(before_id=min(ids)) == []
    assert _ids(await mgr.list_active_sessions(limit=1000, before_id=ids[2])) == ids[3:]


async def test_list_user_sessions_pages(mgr: Manager) -> None:
    created = [await mgr.create_user_session("alice", f"chat {i}") for i in range(7)]
    await mgr.create_user_session("bob")  # someone else's sessions never show up
    listed = await mgr.list_user_sessions("alice")
    assert [s.title for s in listed] == [f"chat {i}" for i in reversed(range(7))]
    assert [s.is_active for s in listed] == [True] + [False] * 6
    assert {s.user_id for s in listed} == {"alice"}

    pages = await _walk(lambda **kw: mgr.list_user_sessions("alice", **kw), 2)
    assert [len(p) for p in pages] == [2, 2, 2, 1]
    walked = [s.thread_id for p in pages for s in p]
    assert walked == [s.thread_id for s in reversed(created)]
    assert len(set(walked)) == 7

    pages = await _walk(lambda **kw: mgr.list_user_sessions("alice", **kw), 7)
    assert [len(p) for p in pages] == [7]  # an exact multiple ends with an empty page
    assert await mgr.list_user_sessions("nobody") == []


# -- switching and ownership ----------------------------------------------------------------


async def test_switch_session(mgr: Manager) -> None:
    first = await mgr.create_user_session("alice", "First")
    second = await mgr.create_user_session("alice", "Second")
    switched = await mgr.switch_session("alice", first.thread_id)
    assert (switched.thread_id, switched.is_active, switched.title) == (
        first.thread_id,
        True,
        "First",
    )
    assert (await mgr.get_current_user_session("alice")).thread_id == first.thread_id
    assert (await mgr.get_or_create_user_session("alice")).thread_id == first.thread_id
    assert not (await mgr.get_session("alice", second.thread_id)).is_active
    active = await mgr.list_active_sessions()
    assert [s.thread_id for s in active] == [first.thread_id]
    listed = await mgr.list_user_sessions("alice")
    assert sum(s.is_active for s in listed) == 1
    # Switching to the current session is a no-op that returns it.
    again = await mgr.switch_session("alice", first.thread_id)
    assert again.thread_id == first.thread_id
    assert again.is_active
    # Switching works after a deactivation as well.
    await mgr.deactivate_session("alice")
    assert (await mgr.switch_session("alice", second.thread_id)).is_active
    assert (await mgr.get_current_user_session("alice")).thread_id == second.thread_id


async def test_foreign_threads_look_like_unknown_ones(mgr: Manager) -> None:
    alice = await mgr.create_user_session("alice", "Private", {"secret": "s"})
    alice_old = await mgr.create_user_session("alice", "Current")
    await mgr.switch_session("alice", alice.thread_id)  # alice_old is inactive now
    bob = await mgr.get_or_create_user_session("bob")
    unknown = str(uuid.uuid4())

    calls = {
        "get_session": lambda tid: mgr.get_session("bob", tid),
        "switch_session": lambda tid: mgr.switch_session("bob", tid),
        "delete_session": lambda tid: mgr.delete_session("bob", tid),
        "update_session": lambda tid: mgr.update_session("bob", {"title": "x"}, thread_id=tid),
    }
    for name, call in calls.items():
        for foreign in (alice.thread_id, alice_old.thread_id):
            error_foreign = await _not_found(call(foreign))
            error_unknown = await _not_found(call(unknown))
            assert str(error_foreign).replace(foreign, "<t>") == str(error_unknown).replace(
                unknown, "<t>"
            ), name

    # Nothing happened to alice's sessions, nor to bob's current one.
    assert await mgr.get_session("alice", alice.thread_id) == await mgr.get_current_user_session(
        "alice"
    )
    current = await mgr.get_current_user_session("alice")
    assert (current.thread_id, current.title, current.metadata) == (
        alice.thread_id,
        "Private",
        {"secret": "s"},
    )
    assert not (await mgr.get_session("alice", alice_old.thread_id)).is_active
    assert (await mgr.get_current_user_session("bob")).thread_id == bob.thread_id
    assert [s.thread_id for s in await mgr.list_user_sessions("bob")] == [bob.thread_id]


# -- namespaces -----------------------------------------------------------------------------


async def test_namespaces_isolate(make: MakeManager) -> None:
    a = make(namespace="a")
    b = make(namespace="b")
    assert (a.namespace, b.namespace) == ("a", "b")
    sa = await a.get_or_create_user_session("alice", "in a")
    sb = await b.get_or_create_user_session("alice", "in b")
    assert sa.thread_id != sb.thread_id
    assert (sa.namespace, sb.namespace) == ("a", "b")
    assert (await a.get_or_create_user_session("alice")).thread_id == sa.thread_id
    assert (await b.get_current_user_session("alice")).thread_id == sb.thread_id
    assert [s.thread_id for s in await a.list_active_sessions()] == [sa.thread_id]
    assert [s.thread_id for s in await b.list_active_sessions()] == [sb.thread_id]
    assert [s.thread_id for s in await a.list_user_sessions("alice")] == [sa.thread_id]

    only_a = await a.create_user_session("carol")
    assert not await b.has_session("carol")
    assert await b.list_user_sessions("carol") == []
    await _not_found(b.get_session("carol", only_a.thread_id))
    await _not_found(b.get_session("alice", sa.thread_id))
    await _not_found(b.switch_session("alice", sa.thread_id))
    await _not_found(b.update_session("alice", {"title": "x"}, thread_id=sa.thread_id))
    await _not_found(b.delete_session("alice", sa.thread_id))
    assert await b.deactivate_session("carol") is False
    assert await b.deactivate_session("alice") is True  # b's alice only

    assert (await a.get_current_user_session("alice")).title == "in a"
    assert await a.has_session("carol")
    assert not await b.has_session("alice")
    assert {s.user_id for s in await a.list_active_sessions()} == {"alice", "carol"}
    assert await b.list_active_sessions() == []


# -- the session value ----------------------------------------------------------------------


async def test_thread_ids_are_canonical_uuid4_without_user_data(mgr: Manager) -> None:
    user = "alice.smith@example.com"
    sessions = [await mgr.get_or_create_user_session(user)]
    sessions += [await mgr.create_user_session(user) for _ in range(5)]
    thread_ids = [s.thread_id for s in sessions]
    assert len(set(thread_ids)) == len(thread_ids)
    for tid in thread_ids:
        parsed = uuid.UUID(tid)
        assert str(parsed) == tid  # canonical: lower-case, hyphenated, 36 characters
        assert parsed.version == 4
        for part in (user, "alice", "smith", "example"):
            assert part not in tid


async def test_session_value(mgr: Manager) -> None:
    metadata = {"lang": "日本語", "nested": {"a": [1, 2.5, True, None]}, "emoji": "🙂"}
    s = await mgr.get_or_create_user_session("alice", "Título", metadata)
    assert isinstance(s, UserSession)
    assert s["thread_id"] == s.thread_id
    assert s["user_id"] == "alice"
    assert s["title"] == "Título"
    assert s.get("metadata") == metadata
    assert s.get("no_such_field", "fallback") == "fallback"
    with pytest.raises(KeyError):
        s["no_such_field"]
    assert s.config == {"configurable": {"thread_id": s.thread_id}}
    assert set(s.keys()) == {
        "id",
        "namespace",
        "user_id",
        "thread_id",
        "title",
        "metadata",
        "created_at",
        "updated_at",
        "is_active",
        "status",
        "request_count",
        "error_count",
        "total_processing_time",
        "last_activity_at",
        "ended_at",
        "parent_thread_id",
    }
    encoded = json.dumps(s.to_dict())
    decoded = json.loads(encoded)
    assert decoded["thread_id"] == s.thread_id
    assert decoded["metadata"] == metadata
    assert isinstance(decoded["created_at"], str)
    assert UserSession.model_validate(decoded) == s
    _assert_utc(s)


async def test_session_is_immutable(mgr: Manager) -> None:
    s = await mgr.get_or_create_user_session("alice", "Title")
    for field, value in (("title", "Changed"), ("thread_id", str(uuid.uuid4())), ("id", 99)):
        with pytest.raises(pydantic.ValidationError):
            setattr(s, field, value)
    with pytest.raises(pydantic.ValidationError):
        del s.title
    assert s.title == "Title"
    assert (await mgr.get_current_user_session("alice")).title == "Title"


async def test_session_metadata_is_read_only_and_never_aliased(mgr: Manager) -> None:
    """Sessions are shared by the cache, so their metadata refuses in-place changes; a
    mutable copy is one ``thaw`` away, and changing it leaves the stored session alone."""
    s = await mgr.get_or_create_user_session("alice", "T", {"tags": ["a"], "n": {"x": 1}})
    with pytest.raises(TypeError):
        s.metadata["tags"].append("b")
    with pytest.raises(TypeError):
        s.metadata["added"] = True
    with pytest.raises(TypeError):
        s.metadata["n"].update(x=2)
    copy = thaw(s.metadata)
    copy["tags"].append("b")
    copy["added"] = True
    assert s.to_dict()["metadata"] == {"tags": ["a"], "n": {"x": 1}}
    assert json.loads(json.dumps(s.metadata)) == {"tags": ["a"], "n": {"x": 1}}
    assert (await mgr.get_current_user_session("alice")).metadata == {"tags": ["a"], "n": {"x": 1}}
    assert (await mgr.get_session("alice", s.thread_id)).metadata == {"tags": ["a"], "n": {"x": 1}}


# -- persistence, cache, lifetime -----------------------------------------------------------


async def test_sessions_survive_a_restart(make: MakeManager) -> None:
    first = make()
    if _is_memory(first):
        pytest.skip("memory:// keeps nothing across managers by design")
    metadata = {"lang": "日本語", "nested": {"a": [1, 2.5, True, None]}}
    old = await first.create_user_session("alice", "Old", metadata)
    current = await first.create_user_session("alice", "Current")
    bob = await first.get_or_create_user_session("bob")
    await first.close()

    second = make()
    assert (await second.get_current_user_session("alice")) == current
    assert (await second.get_or_create_user_session("bob")) == bob
    restored = await second.get_session("alice", old.thread_id)
    assert (restored.title, restored.metadata, restored.is_active) == ("Old", metadata, False)
    assert restored.created_at == old.created_at
    assert [s.thread_id for s in await second.list_user_sessions("alice")] == [
        current.thread_id,
        old.thread_id,
    ]
    assert {s.thread_id for s in await second.list_active_sessions()} == {
        current.thread_id,
        bob.thread_id,
    }
    # The restarted manager keeps going on the same rows.
    assert (await second.switch_session("alice", old.thread_id)).is_active
    third = make()
    assert (await third.get_current_user_session("alice")).thread_id == old.thread_id


async def test_session_count_and_clear_memory_cache(mgr: Manager, cached: bool) -> None:
    assert await mgr.get_session_count() == 0
    sessions = [await mgr.get_or_create_user_session(f"user-{i}") for i in range(3)]
    expected = 3 if cached else 0
    assert await mgr.get_session_count() == expected
    await mgr.clear_memory_cache()
    assert await mgr.get_session_count() == 0
    # The data is still there: the next reads go to the storage.
    for s in sessions:
        assert (await mgr.get_current_user_session(s.user_id)) == s
    assert await mgr.get_session_count() == expected
    await mgr.deactivate_session("user-0")
    assert await mgr.get_session_count() == (2 if cached else 0)


async def test_managers_are_context_managers_and_close_is_idempotent(mgr: Manager) -> None:
    await mgr.get_or_create_user_session("alice")
    entered, events = await mgr.context()
    assert entered is mgr.manager
    assert events == ["call", "close"]  # closed on exit, not before
    await mgr.close()  # closing again (and again) is harmless
    await mgr.close()


async def test_close_is_idempotent_before_any_call(make: MakeManager) -> None:
    m = make()
    await m.close()
    await m.close()
    assert not m.is_degraded


# -- concurrency ----------------------------------------------------------------------------


async def test_concurrent_get_or_create_for_a_new_user(mgr: Manager) -> None:
    n = ASYNC_TASKS if mgr.is_async else SYNC_THREADS
    results = await mgr.race(n, "get_or_create_user_session", "racer")
    assert len(results) == n
    assert {s.thread_id for s in results} == {results[0].thread_id}
    await mgr.clear_memory_cache()
    stored = await mgr.list_user_sessions("racer")
    assert [s.thread_id for s in stored] == [results[0].thread_id]  # one row, no losers
    assert [s.user_id for s in await mgr.list_active_sessions()] == ["racer"]
    assert not mgr.is_degraded


async def test_concurrent_get_or_create_for_many_users(mgr: Manager) -> None:
    """Many users at once, twice each: one current session per user, nothing shared."""
    users = [f"u{i}" for i in range(16)]

    async def run_all() -> list[UserSession]:
        if mgr.is_async:
            calls = [mgr.manager.get_or_create_user_session(u) for u in users * 2]
            return list(await asyncio.gather(*calls))
        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(mgr.manager.get_or_create_user_session, users * 2))

    results = await run_all()
    by_user: dict[str, set[str]] = {}
    for s in results:
        by_user.setdefault(s.user_id, set()).add(s.thread_id)
    assert all(len(tids) == 1 for tids in by_user.values())
    assert set(by_user) == set(users)
    active = await mgr.list_active_sessions()
    assert sorted(s.user_id for s in active) == sorted(users)


# -- PostgreSQL specifics -------------------------------------------------------------------


@pytest.fixture
def pg_manager(pg_url: str, table_name: str) -> Iterator[AgentSessionManager]:
    m = AgentSessionManager(database_url=pg_url, table_name=table_name, cache_size=0)
    yield m
    m.close()


def test_postgres_timestamps_are_utc_whatever_the_session_timezone(
    monkeypatch: pytest.MonkeyPatch, pg_manager: AgentSessionManager
) -> None:
    """The contract promises UTC timestamps; a server (or PGTZ) in another zone must not leak."""
    monkeypatch.setenv("PGTZ", "America/New_York")
    s = pg_manager.get_or_create_user_session("alice")
    _assert_utc(s)
