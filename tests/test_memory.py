"""Per-user memory through LangGraph's store: preferences and their scopes, isolation between
users and namespaces, what agents' nodes see, erase and export, semantic search.

Every test runs on memory, SQLite and real PostgreSQL (``backend_url``), with the sync and
the async manager (through the awaitable ``Manager`` adapter of ``test_lifecycle``). Each
test uses its own manager namespace, so the LangGraph ``store`` table that tests share on
PostgreSQL holds nothing another test reads; its rows are deleted afterwards.
"""

from __future__ import annotations

import hashlib
import math
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from typing import Any

import psycopg
import pytest
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.store.base import BaseStore, InvalidNamespaceError
from test_lifecycle import Manager, drop_postgres_tables

from bssagent import (
    AgentSessionManager,
    AsyncAgentSessionManager,
    BaseAgent,
    ConfigurationError,
    InvalidInputError,
    SessionNotFoundError,
)
from bssagent.store_scope import label

pytestmark = pytest.mark.timeout(60)
MANAGERS = {"sync": AgentSessionManager, "async": AsyncAgentSessionManager}


# -- fixtures ---------------------------------------------------------------------------------


class StoreRows:
    """Direct reads of LangGraph's ``store`` table (None on memory://)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def prefixes(self, like: str) -> list[str]:
        """Stored namespace prefixes (dot-joined) matching the SQL LIKE pattern ``like``."""
        query = "SELECT prefix FROM store WHERE prefix LIKE %s ORDER BY prefix"
        if self.url.startswith("postgresql"):
            with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                if not conn.execute("SELECT to_regclass('store')").fetchone()[0]:
                    return []
                return [r[0] for r in conn.execute(query, (like,))]
        with closing(sqlite3.connect(self.url.removeprefix("sqlite:///"), timeout=10)) as conn:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'store'").fetchone():
                return []
            return [r[0] for r in conn.execute(query.replace("%s", "?"), (like,))]


@pytest.fixture
def namespace() -> str:
    # A dot and a star: labels must escape both.
    return f"mem.{uuid.uuid4().hex[:8]}*"


@pytest.fixture(params=list(MANAGERS))
async def make(
    request: pytest.FixtureRequest, backend_url: str, table_name: str, namespace: str
) -> AsyncIterator[Callable[..., Manager]]:
    made: list[Manager] = []

    def factory(**options: Any) -> Manager:
        kwargs = {"database_url": backend_url, "table_name": table_name, "namespace": namespace}
        manager = Manager(MANAGERS[request.param](**{**kwargs, **options}))
        made.append(manager)
        return manager

    try:
        yield factory
        assert not [m for m in made if m.is_degraded], "a manager fell back to memory"
    finally:
        for manager in made:
            await manager.close()
        if backend_url.startswith("postgresql"):
            purge_store(backend_url, table_name)
            drop_postgres_tables(backend_url, table_name)


def purge_store(url: str, table: str) -> None:
    """Delete the store rows of a test: its namespace's, and its threads' session memory."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        if not conn.execute("SELECT to_regclass('store')").fetchone()[0]:
            return
        threads: list[str] = []
        for name in (table, f"{table}_tombstones"):
            if conn.execute("SELECT to_regclass(%s)", (f'"{name}"',)).fetchone()[0]:
                threads += [r[0] for r in conn.execute(f'SELECT thread_id FROM "{name}"')]
        conn.execute(
            "DELETE FROM store WHERE prefix LIKE 'bssagent.mem%%' OR split_part(prefix, '.', 3)"
            " = ANY(%s)",
            (threads,),
        )


@pytest.fixture
def mgr(make: Callable[..., Manager]) -> Manager:
    return make()


@pytest.fixture
def rows(backend_url: str) -> StoreRows | None:
    return None if backend_url == "memory://" else StoreRows(backend_url)


def memory(mgr: Manager, user_id: str) -> Any:
    """The user's scoped store, called the way the manager's flavour calls it."""
    store = mgr.manager.user_memory(user_id)
    return AwaitableStore(store, mgr.is_async)


class AwaitableStore:
    """``await s.put(...)`` for both flavours: ``aput`` on async managers, ``put`` on sync."""

    def __init__(self, store: BaseStore, is_async: bool) -> None:
        self.store = store
        self.is_async = is_async

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, f"a{name}" if self.is_async else name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            return await result if self.is_async else result

        return call


# -- preferences --------------------------------------------------------------------------------


async def test_preferences_scopes_merge_and_removal(mgr: Manager) -> None:
    user = "alice"
    first = await mgr.get_or_create_user_session(user)
    assert await mgr.get_user_preferences(user) == {}

    assert await mgr.set_user_preferences(user, {"language": "pt", "units": "metric"}) == {
        "language": "pt",
        "units": "metric",
    }
    assert await mgr.set_user_preferences(user, {"theme": "dark", "language": "en"}, scope="app")
    session_layer = await mgr.set_user_preferences(user, {"theme": "light"}, scope="session")
    assert session_layer == {"theme": "light"}

    # In effect: app < user < session (given a thread).
    assert await mgr.get_user_preferences(user) == {
        "theme": "dark",
        "language": "pt",
        "units": "metric",
    }
    assert await mgr.get_user_preferences(user, thread_id=first.thread_id) == {
        "theme": "light",
        "language": "pt",
        "units": "metric",
    }
    assert await mgr.get_user_preferences(user, scope="app") == {"theme": "dark", "language": "en"}
    assert await mgr.get_user_preferences(user, scope="session") == {"theme": "light"}

    # A new session has its own session layer; the user layer follows the user.
    second = await mgr.create_user_session(user)
    assert await mgr.get_user_preferences(user, scope="session") == {}
    assert await mgr.get_user_preferences(user, thread_id=second.thread_id) == {
        "theme": "dark",
        "language": "pt",
        "units": "metric",
    }
    assert await mgr.get_user_preferences(user, scope="session", thread_id=first.thread_id) == {
        "theme": "light"
    }

    # None removes a name; JSON values of every kind round-trip.
    value = {"nested": [1, 2.5, True, None, "é"], "n": 0}
    after = await mgr.set_user_preferences(user, {"units": None, "profile": value})
    assert after == {"language": "pt", "profile": value}
    assert await mgr.get_user_preferences(user, scope="user") == after
    # Other users see app-wide values only.
    assert await mgr.get_user_preferences("bob") == {"theme": "dark", "language": "en"}


BAD_CALLS: list[tuple[dict[str, Any], str]] = [
    ({"user_id": ""}, "user_id"),
    ({"user_id": 7}, "user_id"),
    ({"preferences": ["a"]}, "preferences"),
    ({"preferences": {"": 1}}, "preferences"),
    ({"preferences": {"a\x00b": 1}}, "preferences"),
    ({"preferences": {"x": float("nan")}}, "preferences"),
    ({"preferences": {"x": object()}}, "preferences"),
    ({"preferences": {"x": "\x00"}}, "preferences"),
    ({"preferences": {"x": "a" * 17_000}}, "preferences"),
    ({"preferences": {f"k{i}": i for i in range(101)}}, "preferences"),
    ({"scope": "global"}, "scope"),
    ({"scope": None}, "scope"),
    ({"thread_id": "not-a-uuid", "scope": "session"}, "thread_id"),
    ({"thread_id": str(uuid.uuid4()), "scope": "user"}, "thread_id"),
]


@pytest.mark.parametrize(("override", "field"), BAD_CALLS)
async def test_bad_preferences_get_a_typed_error_and_write_nothing(
    mgr: Manager, rows: StoreRows | None, namespace: str, override: dict[str, Any], field: str
) -> None:
    await mgr.get_or_create_user_session("alice")
    call = {"user_id": "alice", "preferences": {"ok": 1}, "scope": "user", **override}
    user_id, preferences = call.pop("user_id"), call.pop("preferences")
    with pytest.raises(InvalidInputError) as caught:
        await mgr.set_user_preferences(user_id, preferences, **call)
    assert caught.value.field == field
    for scope in ("user", "session", "app"):
        assert await mgr.get_user_preferences("alice", scope=scope) == {}
    if rows is not None:
        assert rows.prefixes(f"bssagent.{label(namespace)}.%") == []


async def test_a_scope_holds_at_most_100_names(mgr: Manager) -> None:
    await mgr.set_user_preferences("alice", {f"k{i}": i for i in range(60)})
    with pytest.raises(InvalidInputError, match="at most 100"):
        await mgr.set_user_preferences("alice", {f"n{i}": i for i in range(41)})
    assert len(await mgr.get_user_preferences("alice")) == 60  # nothing of the refused call
    # Changing and removing existing names, and adding up to the bound, is fine.
    changes: dict[str, Any] = {f"k{i}": None for i in range(10)}
    changes.update({f"n{i}": i for i in range(50)})
    assert len(await mgr.set_user_preferences("alice", changes)) == 100


async def test_session_preferences_are_ownership_checked(mgr: Manager) -> None:
    bob = await mgr.get_or_create_user_session("bob")
    with pytest.raises(SessionNotFoundError):
        await mgr.set_user_preferences("alice", {"x": 1}, scope="session", thread_id=bob.thread_id)
    with pytest.raises(SessionNotFoundError):
        await mgr.get_user_preferences("alice", thread_id=bob.thread_id)
    with pytest.raises(SessionNotFoundError):  # alice has no current session
        await mgr.set_user_preferences("alice", {"x": 1}, scope="session")
    assert await mgr.get_user_preferences("bob", scope="session") == {}


# -- isolation ------------------------------------------------------------------------------------

# Ids that would collide if labels were not escaped: "a.b" is two labels joined by LangGraph's
# separator, "*" its wildcard, "%2E" what "." escapes to.
TRICKY_USERS = ["a", "a.b", "a*", "a%2Eb", "a%", "b", "a b"]


async def test_users_cannot_reach_each_others_memory(mgr: Manager, rows: StoreRows | None) -> None:
    for user in TRICKY_USERS:
        store = memory(mgr, user)
        await store.put(("notes",), "secret", {"owner": user})
        await store.put(("notes", "deep"), "other", {"owner": user})
    for user in TRICKY_USERS:
        store = memory(mgr, user)
        found = await store.search(())
        assert sorted((tuple(i.namespace), i.key) for i in found) == [
            (("notes",), "secret"),
            (("notes", "deep"), "other"),
        ]
        assert {i.value["owner"] for i in found} == {user}
        assert await store.list_namespaces() == [("notes",), ("notes", "deep")]
        assert (await store.get(("notes",), "secret")).value == {"owner": user}
        # Namespaces are relative: naming another user's path lands inside one's own.
        await store.put(("bssagent", "x", "users", "b"), "k", {"owner": user})
        assert await store.search(("users",)) == []
        assert [i.value for i in await store.search(("bssagent",))] == [{"owner": user}]
        # LangGraph refuses labels holding its separator, so there is no "..".
        with pytest.raises(InvalidNamespaceError):
            await store.put(("..", "users", "b"), "k", {"owner": user})
        # Wildcards in list filters stay inside the scope too.
        listed = await store.list_namespaces(prefix=("*",), max_depth=1)
        assert sorted(listed) == [("bssagent",), ("notes",)]
    b_items = await memory(mgr, "b").search(("notes",))
    assert [i.value for i in b_items] == [{"owner": "b"}, {"owner": "b"}]
    if rows is not None:
        # Seven users, seven distinct roots in the table.
        roots = {
            ".".join(p.split(".")[:4])
            for p in rows.prefixes(f"bssagent.{label(mgr.namespace)}.users.%")
        }
        assert len(roots) == len(TRICKY_USERS)


async def test_managers_in_other_namespaces_do_not_share_memory(
    make: Callable[..., Manager], namespace: str
) -> None:
    first, other = make(), make(namespace=namespace + "-other")
    await first.set_user_preferences("alice", {"lang": "pt"})
    await first.set_user_preferences("alice", {"theme": "dark"}, scope="app")
    await memory(first, "alice").put(("notes",), "n", {"v": 1})
    assert await other.get_user_preferences("alice") == {}
    assert await memory(other, "alice").search(()) == []
    await other.set_user_preferences("alice", {"lang": "fr"})
    assert await first.get_user_preferences("alice") == {"theme": "dark", "lang": "pt"}


# -- agents ---------------------------------------------------------------------------------------


class NotingAgent(BaseAgent):
    """ "note X" stores X in the user's memory; anything else replies with what is stored."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("noting", **kwargs)

    def define_graph(self) -> StateGraph[Any]:
        def node(state: MessagesState, store: BaseStore, config: RunnableConfig) -> Any:
            text = state["messages"][-1].text
            if text.startswith("note "):
                store.put(("notes",), text[5:], {"text": text[5:]})
            notes = sorted(i.key for i in store.search(("notes",)))
            prefs = {i.key: i.value["value"] for i in store.search(("preferences",))}
            user = config["configurable"].get("user_id")
            return {"messages": [AIMessage(f"notes={notes} prefs={prefs} user={user}")]}

        graph = StateGraph(MessagesState)
        graph.add_node("node", node)
        graph.add_edge(START, "node")
        graph.add_edge("node", END)
        return graph


async def reply(mgr: Manager, agent: BaseAgent, text: str, *args: Any, **kwargs: Any) -> str:
    result = await mgr.run(agent, text, *args, **kwargs)
    return str(result["messages"][-1].text)


async def test_an_agent_remembers_across_sessions_of_a_user_and_not_for_others(
    mgr: Manager,
) -> None:
    agent = NotingAgent(session_manager=mgr.manager)
    try:
        assert await reply(mgr, agent, "note tea", user_id="alice") == (
            "notes=['tea'] prefs={} user=alice"
        )
        await mgr.set_user_preferences("alice", {"lang": "pt"})
        await mgr.create_user_session("alice")  # a second session
        assert await reply(mgr, agent, "hello", user_id="alice") == (
            "notes=['tea'] prefs={'lang': 'pt'} user=alice"
        )
        assert await reply(mgr, agent, "hello", user_id="bob") == "notes=[] prefs={} user=bob"

        # The seed's way (a thread id, no user): the thread's owner's memory.
        thread = (await mgr.get_current_user_session("alice")).thread_id
        config = {"configurable": {"thread_id": thread}}
        assert await reply(mgr, agent, "note jam", config) == (
            "notes=['jam', 'tea'] prefs={'lang': 'pt'} user=None"
        )
        # A thread nobody owns has memory of its own.
        stranger = {"configurable": {"thread_id": str(uuid.uuid4())}}
        assert await reply(mgr, agent, "note x", stranger) == "notes=['x'] prefs={} user=None"
        assert await reply(mgr, agent, "hi", user_id="alice") == (
            "notes=['jam', 'tea'] prefs={'lang': 'pt'} user=alice"
        )
        # The application sees what the nodes wrote.
        notes = await memory(mgr, "alice").search(("notes",))
        assert sorted(i.key for i in notes) == ["jam", "tea"]
    finally:
        await mgr.close_agent(agent)


async def test_a_graph_compiled_with_its_own_store_is_scoped_too(mgr: Manager) -> None:
    from langgraph.store.memory import InMemoryStore

    own = InMemoryStore()
    agent = NotingAgent(session_manager=mgr.manager, memory_store=own)
    try:
        await reply(mgr, agent, "note a", user_id="alice")
        await reply(mgr, agent, "note b", user_id="bob")
        assert await reply(mgr, agent, "?", user_id="alice") == "notes=['a'] prefs={} user=alice"
        assert len(own.search(())) == 2  # the data is in the given store
        assert await memory(mgr, "alice").search(()) == []  # not in the database's
    finally:
        await mgr.close_agent(agent)


# -- erase and export ---------------------------------------------------------------------------


async def test_delete_user_data_leaves_no_store_item_of_the_user(
    mgr: Manager, rows: StoreRows | None, namespace: str
) -> None:
    agent = NotingAgent(session_manager=mgr.manager)
    try:
        threads = []
        for _ in range(2):
            threads.append((await mgr.create_user_session("alice")).thread_id)
            await reply(mgr, agent, "note tea", user_id="alice")
            await mgr.set_user_preferences("alice", {"x": 1}, scope="session")
        await mgr.set_user_preferences("alice", {"lang": "pt"})
        await mgr.set_user_preferences("bob", {"lang": "fr"})
        await mgr.set_user_preferences("bob", {"theme": "dark"}, scope="app")

        exported = await mgr.export_user_data("alice")
        assert [i["key"] for i in exported["memory"]["user"]] != []
        assert {i["key"] for i in exported["memory"]["user"]} == {"tea", "lang"}
        for thread in threads:
            assert [i["key"] for i in exported["memory"]["sessions"][thread]] == ["x"]

        assert await mgr.delete_user_data("alice") == 2
        assert await memory(mgr, "alice").search(()) == []
        assert await mgr.get_user_preferences("alice") == {"theme": "dark"}  # app-wide only
        assert await mgr.get_user_preferences("bob") == {"theme": "dark", "lang": "fr"}
        if rows is not None:
            assert rows.prefixes(f"bssagent.{label(namespace)}.users.alice.%") == []
            assert rows.prefixes(f"bssagent.{label(namespace)}.users.alice") == []
            for thread in threads:
                assert rows.prefixes(f"bssagent.sessions.{thread}%") == []
            assert rows.prefixes(f"bssagent.{label(namespace)}.users.bob.%") != []
    finally:
        await mgr.close_agent(agent)


async def test_deleting_a_session_deletes_its_session_memory(
    mgr: Manager, rows: StoreRows | None
) -> None:
    old = await mgr.get_or_create_user_session("alice")
    await mgr.set_user_preferences("alice", {"x": 1}, scope="session")
    await mgr.set_user_preferences("alice", {"lang": "pt"})
    await mgr.create_user_session("alice")
    await mgr.delete_session("alice", old.thread_id)
    if rows is not None:
        assert rows.prefixes(f"bssagent.sessions.{old.thread_id}%") == []
    assert await mgr.get_user_preferences("alice") == {"lang": "pt"}


# -- semantic search ----------------------------------------------------------------------------


def embed(texts: list[str]) -> list[list[float]]:
    """A deterministic local embedding: hashed bag of words, normalised (no download)."""
    vectors = []
    for text in texts:
        vector = [0.0] * 32
        for word in text.lower().split():
            vector[int(hashlib.sha256(word.encode()).hexdigest(), 16) % 32] += 1.0
        norm = math.sqrt(sum(x * x for x in vector)) or 1.0
        vectors.append([x / norm for x in vector])
    return vectors


INDEX = {"dims": 32, "embed": embed, "fields": ["text"]}


def has_vector_support(url: str) -> bool:
    if url.startswith("postgresql"):
        with psycopg.connect(url, connect_timeout=5) as conn:
            query = "SELECT 1 FROM pg_available_extensions WHERE name = 'vector'"
            return conn.execute(query).fetchone() is not None
    if url.startswith("sqlite"):
        return hasattr(sqlite3.Connection, "enable_load_extension")
    return True


async def test_semantic_search_over_a_users_memories(
    make: Callable[..., Manager], backend_url: str
) -> None:
    mgr = make(memory_index=INDEX)
    alice, bob = memory(mgr, "alice"), memory(mgr, "bob")
    if not has_vector_support(backend_url):
        # Where the platform lacks the vector extension the error says so; nothing half-set.
        with pytest.raises(ConfigurationError, match="extension"):
            await alice.put(("memories",), "1", {"text": "drinks green tea"})
        return
    await alice.put(("memories",), "1", {"text": "drinks green tea every morning"})
    await alice.put(("memories",), "2", {"text": "works as a marine biologist"})
    await alice.put(("memories",), "3", {"text": "has a cat named pixel"})
    await bob.put(("memories",), "1", {"text": "green tea green tea green tea"})
    found = await alice.search(("memories",), query="which tea do they drink", limit=2)
    assert found[0].key == "1"
    assert found[0].value["text"].startswith("drinks green tea")
    assert found[0].score is not None
    assert found[0].score > (found[1].score or 0)
    assert all(tuple(i.namespace) == ("memories",) for i in found)
    # Bob's closer match never shows up in alice's results.
    everything = await alice.search((), query="green tea", limit=10)
    assert {i.value["text"] for i in everything} == {
        "drinks green tea every morning",
        "works as a marine biologist",
        "has a cat named pixel",
    }


# -- the scope itself ---------------------------------------------------------------------------


def test_results_outside_the_scope_are_dropped() -> None:
    """A store that matches prefixes as plain strings (LangGraph's before 3.1.1, CVE-2026-71433)
    returns ``u10``'s items for ``u1``: the scope drops them instead of passing them on."""
    from langgraph.store.base import Op, Result, SearchOp
    from langgraph.store.memory import InMemoryStore

    from bssagent.store_scope import ScopedStore, user_root

    class StringPrefixStore(InMemoryStore):
        def batch(self, ops: Any) -> list[Result]:
            widened: list[Op] = [
                op._replace(namespace_prefix=op.namespace_prefix[:-1])
                if isinstance(op, SearchOp)
                else op
                for op in ops
            ]
            return super().batch(widened)

    base = StringPrefixStore()
    base.put(user_root("ns", "u1"), "mine", {"v": 1})
    base.put(user_root("ns", "u10"), "theirs", {"v": 2})
    scoped = ScopedStore(base, user_root("ns", "u1"))
    assert len(base.search(user_root("ns", "u1"))) == 2  # the widened search finds both
    assert [(i.key, i.namespace) for i in scoped.search(())] == [("mine", ())]
