"""``BaseAgent`` end to end: graph definition, checkpointers, sessions, streams, state,
interrupts, concurrency, restarts, deletion and the unreachable-database fallback.

Every test runs LangGraph for real on the same database as the session registry: memory,
a SQLite file and PostgreSQL (``backend_url``); rows are checked in LangGraph's own tables.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.types import Command, interrupt
from typing_extensions import TypedDict

import bssagent
from bssagent import (
    AgentSessionManager,
    BaseAgent,
    ConfigurationError,
    InvalidInputError,
    SessionNotFoundError,
    Settings,
)
from bssagent.agent import OfflineChatModel

LLM = OfflineChatModel()
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/x"
PG_CHECKPOINT_TABLES = ("checkpoints", "checkpoint_blobs", "checkpoint_writes")
SQLITE_CHECKPOINT_TABLES = ("checkpoints", "writes")
REPO = Path(__file__).resolve().parents[1]


# -- agents ---------------------------------------------------------------------------------


def assistant(state: MessagesState) -> dict[str, Any]:
    """Reports progress on the ``custom`` stream, then asks the offline model."""
    get_stream_writer()({"progress": "thinking"})
    return {"messages": [LLM.invoke(state["messages"])]}


def chat_graph() -> StateGraph[Any]:
    graph = StateGraph(MessagesState)
    graph.add_node("assistant", assistant)
    graph.add_edge(START, "assistant")
    graph.add_edge("assistant", END)
    return graph


class ReturningAgent(BaseAgent):
    """define_graph returns an uncompiled StateGraph."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("chat", "returns a StateGraph", **kwargs)

    def define_graph(self) -> StateGraph[Any]:
        return chat_graph()


class SettingAgent(BaseAgent):
    """define_graph calls set_compiled_graph, as the seed does."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("chat", "sets a compiled graph", **kwargs)

    def define_graph(self) -> None:
        self.set_compiled_graph(chat_graph().compile())


class OwnSaverAgent(BaseAgent):
    """The graph is compiled with the caller's own checkpointer."""

    def __init__(self, saver: Any, **kwargs: Any) -> None:
        self.saver = saver
        super().__init__("own-saver", **kwargs)

    def define_graph(self) -> None:
        self.set_compiled_graph(chat_graph().compile(checkpointer=self.saver))


class AskState(TypedDict, total=False):
    question: str
    answer: str


def ask_node(state: AskState) -> dict[str, Any]:
    answer = interrupt({"question": state.get("question", "name?")})
    return {"answer": f"got {answer}"}


class AskAgent(BaseAgent):
    """One node that stops on interrupt() until resumed."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("ask", **kwargs)

    def define_graph(self) -> StateGraph[Any]:
        graph = StateGraph(AskState)
        graph.add_node("ask", ask_node)
        graph.add_edge(START, "ask")
        graph.add_edge("ask", END)
        return graph


# -- helpers --------------------------------------------------------------------------------


def settings_for(url: str, table: str, tmp_path: Path) -> Settings:
    return Settings(database_url=url, table_name=table, sqlite_path=tmp_path / "default.db")


def config(thread_id: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread_id}}


def reply(result: dict[str, Any]) -> str:
    last = result["messages"][-1]
    assert isinstance(last, AIMessage)
    return str(last.text)


def human_texts(values: dict[str, Any]) -> list[str]:
    return [str(m.text) for m in values.get("messages", []) if isinstance(m, HumanMessage)]


def backend_of(url: str) -> str:
    return url.split(":", 1)[0].replace("postgresql", "postgres")


def sqlite_file(url: str) -> Path:
    assert url.startswith("sqlite:///")
    return Path(url[len("sqlite:///") :])


def checkpoint_rows(url: str, thread_id: str) -> dict[str, int]:
    """Rows of ``thread_id`` in each of LangGraph's checkpoint tables (postgres / sqlite)."""
    if backend_of(url) == "postgres":
        with psycopg.connect(url, autocommit=True) as conn:
            return {
                t: conn.execute(
                    f"SELECT count(*) FROM {t} WHERE thread_id = %s", (thread_id,)
                ).fetchone()[0]
                for t in PG_CHECKPOINT_TABLES
            }
    with sqlite3.connect(sqlite_file(url)) as conn:
        existing = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        return {
            t: conn.execute(
                f"SELECT count(*) FROM {t} WHERE thread_id = ?", (thread_id,)
            ).fetchone()[0]
            if t in existing
            else 0
            for t in SQLITE_CHECKPOINT_TABLES
        }


def session_rows(url: str, table: str, thread_id: str) -> int:
    if backend_of(url) == "postgres":
        with psycopg.connect(url, autocommit=True) as conn:
            return conn.execute(
                f'SELECT count(*) FROM "{table}" WHERE thread_id = %s', (thread_id,)
            ).fetchone()[0]
    with sqlite3.connect(sqlite_file(url)) as conn:
        return conn.execute(
            f'SELECT count(*) FROM "{table}" WHERE thread_id = ?', (thread_id,)
        ).fetchone()[0]


def purge_pg_checkpoints(url: str, table: str, extra: list[str]) -> None:
    """Delete this test's rows from the shared LangGraph tables of the test database."""
    with psycopg.connect(url, autocommit=True) as conn:
        threads = list(extra)
        if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0]:
            threads += [r[0] for r in conn.execute(f'SELECT thread_id FROM "{table}"')]
        if threads and conn.execute("SELECT to_regclass('checkpoints')").fetchone()[0]:
            for t in PG_CHECKPOINT_TABLES:
                conn.execute(f"DELETE FROM {t} WHERE thread_id = ANY(%s)", (threads,))


def clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BSSAGENT_")
        and k not in ("DATABASE_URL", "GOOGLE_API_KEY", "OPENAI_API_KEY")
    }
    env["PYTHONPATH"] = str(REPO)
    return env


class Maker:
    """Builds agents on one backend and closes them (and purges PostgreSQL rows) at the end."""

    def __init__(self, url: str, table: str, tmp_path: Path) -> None:
        self.url, self.table, self.tmp_path = url, table, tmp_path
        self.agents: list[BaseAgent] = []
        self.threads: list[str] = []

    @property
    def backend(self) -> str:
        return backend_of(self.url)

    @property
    def settings(self) -> Settings:
        return settings_for(self.url, self.table, self.tmp_path)

    def __call__(self, cls: Callable[..., BaseAgent] = ReturningAgent, **kwargs: Any) -> Any:
        kwargs.setdefault("settings", self.settings)
        agent = cls(**kwargs)
        self.agents.append(agent)
        return agent

    def new_thread(self) -> str:
        thread = str(uuid.uuid4())
        self.threads.append(thread)
        return thread


@pytest.fixture
def make(backend_url: str, table_name: str, tmp_path: Path) -> Iterator[Maker]:
    maker = Maker(backend_url, table_name, tmp_path)
    yield maker
    for agent in maker.agents:
        agent.close()
    if maker.backend == "postgres":
        purge_pg_checkpoints(backend_url, table_name, maker.threads)


persistent = pytest.mark.parametrize("backend_url", ["sqlite", "postgres"], indirect=True)


# -- defining the graph ---------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ReturningAgent, SettingAgent])
def test_define_graph_styles_give_a_working_agent(make: Maker, cls: type[BaseAgent]) -> None:
    agent = make(cls)
    assert agent.graph.checkpointer is None  # compiled without one: the agent attaches its own
    thread = make.new_thread()
    assert reply(agent.invoke({"messages": ["Hello"]}, config(thread))).endswith(
        "This is turn 1 of our conversation."
    )
    assert "turn 2" in reply(agent.invoke({"messages": ["Again"]}, config(thread)))
    assert agent.graph.checkpointer is None  # the given graph itself is left untouched


def test_define_graph_may_return_a_compiled_graph(make: Maker) -> None:
    class CompiledAgent(BaseAgent):
        def define_graph(self) -> Any:
            return chat_graph().compile()

    agent = make(CompiledAgent, name="compiled")
    thread = make.new_thread()
    agent.invoke({"messages": ["one"]}, config(thread))
    assert "turn 2" in reply(agent.invoke({"messages": ["two"]}, config(thread)))


def test_define_graph_that_sets_nothing_is_a_configuration_error() -> None:
    class Empty(BaseAgent):
        def define_graph(self) -> None:
            return None

    with pytest.raises(ConfigurationError, match="define_graph"):
        Empty("empty", settings=Settings(database_url="memory://"))


def test_define_graph_returning_something_else_is_a_configuration_error() -> None:
    class Wrong(BaseAgent):
        def define_graph(self) -> Any:
            return "not a graph"

    with pytest.raises(ConfigurationError):
        Wrong("wrong", settings=Settings(database_url="memory://"))


def test_subclass_without_define_graph_cannot_be_instantiated() -> None:
    class NoGraph(BaseAgent):
        pass

    with pytest.raises(TypeError, match="define_graph"):
        NoGraph("nope", settings=Settings(database_url="memory://"))  # type: ignore[abstract]


@persistent
def test_agent_attaches_its_own_checkpointer_on_the_same_database(make: Maker) -> None:
    agent = make()
    thread = make.new_thread()
    agent.invoke({"messages": ["Hello"]}, config(thread))
    rows = checkpoint_rows(make.url, thread)
    assert rows["checkpoints"] > 0, rows
    agent.close()
    # A brand-new agent on the same settings reads the conversation back from the database.
    again = make()
    assert "turn 2" in reply(again.invoke({"messages": ["Again"]}, config(thread)))


@persistent
def test_a_checkpointer_compiled_into_the_graph_is_kept(make: Maker) -> None:
    saver = InMemorySaver()
    agent = make(OwnSaverAgent, saver=saver)
    assert agent.graph.checkpointer is saver
    thread = make.new_thread()
    agent.invoke({"messages": ["Hello"]}, config(thread))
    assert "turn 2" in reply(agent.invoke({"messages": ["Again"]}, config(thread)))
    assert saver.get_tuple(config(thread)) is not None
    assert sum(checkpoint_rows(make.url, thread).values()) == 0  # nothing in the database


def test_a_checkpointer_passed_to_the_constructor_is_used(make: Maker) -> None:
    saver = InMemorySaver()
    agent = make(checkpointer=saver)
    thread = make.new_thread()
    agent.invoke({"messages": ["Hello"]}, config(thread))
    assert saver.get_tuple(config(thread)) is not None


# -- sessions: the seed call, user_id=, thread_id= ------------------------------------------


def test_the_seed_call_then_user_id_continues_the_same_thread(make: Maker) -> None:
    agent = make()
    session = agent.session_manager.get_or_create_user_session("123", title="My First Chat")
    result = agent.invoke(
        {"messages": ["Hello"]}, {"configurable": {"thread_id": session["thread_id"]}}
    )
    assert reply(result) == "[offline model] You said: 'Hello'. This is turn 1 of our conversation."
    result = agent.invoke({"messages": ["Still there?"]}, user_id="123")
    assert "turn 2" in reply(result)
    assert agent.resolve_config(user_id="123")["configurable"]["thread_id"] == session.thread_id
    assert human_texts(agent.get_state(user_id="123").values) == ["Hello", "Still there?"]


def test_user_id_creates_the_current_session_when_there_is_none(make: Maker) -> None:
    agent = make()
    assert not agent.session_manager.has_session("newcomer")
    agent.invoke({"messages": ["hi"]}, user_id="newcomer")
    current = agent.session_manager.get_current_user_session("newcomer")
    assert human_texts(agent.get_state(config(current.thread_id)).values) == ["hi"]


def test_user_id_with_a_session_manager_passed_in(
    backend_url: str, table_name: str, tmp_path: Path
) -> None:
    manager = AgentSessionManager(
        database_url=backend_url, table_name=table_name, sqlite_path=tmp_path / "d.db"
    )
    agent = ReturningAgent(session_manager=manager)
    try:
        assert agent.session_manager is manager
        assert agent.settings.table_name == table_name
        first = manager.create_user_session("carol", title="first")
        second = manager.create_user_session("carol", title="second")
        agent.invoke({"messages": ["to the current one"]}, user_id="carol")
        agent.invoke({"messages": ["to the old one"]}, user_id="carol", thread_id=first.thread_id)
        assert human_texts(agent.get_state(config(second.thread_id)).values) == [
            "to the current one"
        ]
        assert human_texts(agent.get_state(config(first.thread_id)).values) == ["to the old one"]
        agent.close()
        # The agent does not close a manager it was given.
        assert manager.get_current_user_session("carol").thread_id == second.thread_id
    finally:
        agent.close()
        if backend_of(backend_url) == "postgres":
            purge_pg_checkpoints(backend_url, table_name, [])
        manager.close()


def test_another_users_thread_is_not_found(make: Maker) -> None:
    agent = make()
    agent.invoke({"messages": ["bob's secret"]}, user_id="bob")
    bob_thread = agent.session_manager.get_current_user_session("bob").thread_id
    with pytest.raises(SessionNotFoundError):
        agent.invoke({"messages": ["let me in"]}, user_id="alice", thread_id=bob_thread)
    with pytest.raises(SessionNotFoundError):  # a thread in the config is checked the same way
        agent.invoke({"messages": ["let me in"]}, config(bob_thread), user_id="alice")
    with pytest.raises(SessionNotFoundError):
        agent.get_state(user_id="alice", thread_id=bob_thread)
    with pytest.raises(SessionNotFoundError):
        list(agent.stream({"messages": ["x"]}, user_id="alice", thread_id=bob_thread))
    with pytest.raises(SessionNotFoundError):
        agent.delete_conversation("alice", bob_thread)
    assert human_texts(agent.get_state(config(bob_thread)).values) == ["bob's secret"]


async def test_another_users_thread_is_not_found_async(make: Maker) -> None:
    agent = make()
    try:
        await agent.ainvoke({"messages": ["bob's secret"]}, user_id="bob")
        bob_thread = (await agent.aresolve_config(user_id="bob"))["configurable"]["thread_id"]
        with pytest.raises(SessionNotFoundError):
            await agent.ainvoke({"messages": ["x"]}, user_id="alice", thread_id=bob_thread)
        with pytest.raises(SessionNotFoundError):
            await agent.aget_state(user_id="alice", thread_id=bob_thread)
        with pytest.raises(SessionNotFoundError):
            await agent.adelete_conversation("alice", bob_thread)
        assert human_texts((await agent.aget_state(config(bob_thread))).values) == ["bob's secret"]
    finally:
        await agent.aclose()


@pytest.mark.parametrize(
    "call",
    [
        lambda a: a.invoke({"messages": ["x"]}),
        lambda a: a.invoke({"messages": ["x"]}, {"configurable": {}}),
        lambda a: a.invoke({"messages": ["x"]}, {"configurable": {"thread_id": "not-a-uuid"}}),
        lambda a: a.invoke({"messages": ["x"]}, "not a dict"),
        lambda a: a.invoke({"messages": ["x"]}, run_strategy="whenever"),
        lambda a: a.stream({"messages": ["x"]}),
        lambda a: a.get_state(),
        lambda a: a.update_state({"messages": ["x"]}),
    ],
    ids=["none", "empty", "bad-uuid", "config-type", "strategy", "stream", "state", "update"],
)
def test_no_thread_or_a_bad_one_is_invalid_input(call: Callable[[BaseAgent], Any]) -> None:
    agent = ReturningAgent(settings=Settings(database_url="memory://"))
    with pytest.raises(InvalidInputError):
        call(agent)


async def test_no_thread_is_invalid_input_async() -> None:
    agent = ReturningAgent(settings=Settings(database_url="memory://"))
    with pytest.raises(InvalidInputError):
        await agent.ainvoke({"messages": ["x"]})
    with pytest.raises(InvalidInputError):
        await agent.aget_state()
    with pytest.raises(InvalidInputError):
        async for _ in agent.astream({"messages": ["x"]}):
            pass
    await agent.aclose()


def test_constructor_validates_its_arguments() -> None:
    class Named(BaseAgent):
        def define_graph(self) -> StateGraph[Any]:
            return chat_graph()

    memory = Settings(database_url="memory://")
    for bad_name in ("", "   ", None):
        with pytest.raises(InvalidInputError):
            Named(bad_name, settings=memory)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        Named("ok", settings=memory, run_strategy="sometimes")  # type: ignore[arg-type]
    assert repr(Named("ok", settings=memory)) == "<Named name='ok'>"


# On memory:// the agent's sync and async registries share one store, so a conversation
# started with invoke(user_id=) is found by ainvoke(user_id=).
@pytest.mark.parametrize(
    "backend_url",
    [
        pytest.param(
            "memory",
        ),
        "sqlite",
        "postgres",
    ],
    indirect=True,
)
async def test_a_conversation_moves_between_invoke_and_ainvoke(make: Maker) -> None:
    agent = make()
    try:
        await asyncio.to_thread(agent.invoke, {"messages": ["sync first"]}, user_id="mover")
        result = await agent.ainvoke({"messages": ["async second"]}, user_id="mover")
        assert "turn 2" in reply(result)
        sync_thread = agent.resolve_config(user_id="mover")["configurable"]["thread_id"]
        async_thread = (await agent.aresolve_config(user_id="mover"))["configurable"]["thread_id"]
        assert sync_thread == async_thread
    finally:
        await agent.aclose()


# -- sync / async saver pairing -------------------------------------------------------------


async def test_a_sync_only_saver_refuses_async_calls(tmp_path: Path) -> None:
    from langgraph.checkpoint.sqlite import SqliteSaver

    conn = sqlite3.connect(tmp_path / "own.db", check_same_thread=False)
    agent = OwnSaverAgent(SqliteSaver(conn), settings=Settings(database_url="memory://"))
    thread = str(uuid.uuid4())
    try:
        assert "turn 1" in reply(agent.invoke({"messages": ["sync is fine"]}, config(thread)))
        with pytest.raises(ConfigurationError, match="SqliteSaver"):
            await agent.ainvoke({"messages": ["x"]}, config(thread))
        with pytest.raises(ConfigurationError):
            async for _ in agent.astream({"messages": ["x"]}, config(thread)):
                pass
        with pytest.raises(ConfigurationError):
            await agent.aget_state(config(thread))
        # The refused calls wrote nothing.
        assert human_texts(agent.get_state(config(thread)).values) == ["sync is fine"]
    finally:
        await agent.aclose()
        conn.close()


async def test_a_sync_only_saver_refuses_adelete_conversation(tmp_path: Path) -> None:
    from langgraph.checkpoint.sqlite import SqliteSaver

    conn = sqlite3.connect(tmp_path / "own.db", check_same_thread=False)
    settings = settings_for(f"sqlite:///{tmp_path / 'sessions.db'}", "user_sessions", tmp_path)
    agent = OwnSaverAgent(SqliteSaver(conn), settings=settings)
    try:
        await asyncio.to_thread(agent.invoke, {"messages": ["hi"]}, user_id="owner")
        thread = (await agent.aresolve_config(user_id="owner"))["configurable"]["thread_id"]
        with pytest.raises(ConfigurationError):
            await agent.adelete_conversation("owner", thread)
    finally:
        await agent.aclose()
        conn.close()


async def test_an_async_only_saver_refuses_sync_calls(tmp_path: Path) -> None:
    import aiosqlite
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    async with aiosqlite.connect(tmp_path / "own.db") as conn:
        agent = OwnSaverAgent(AsyncSqliteSaver(conn), settings=Settings(database_url="memory://"))
        thread = str(uuid.uuid4())
        try:
            result = await agent.ainvoke({"messages": ["async is fine"]}, config(thread))
            assert "turn 1" in reply(result)
            with pytest.raises(ConfigurationError, match="AsyncSqliteSaver"):
                agent.invoke({"messages": ["x"]}, config(thread))
            with pytest.raises(ConfigurationError):
                list(agent.stream({"messages": ["x"]}, config(thread)))
        finally:
            await agent.aclose()


# -- streaming ------------------------------------------------------------------------------


async def collect(agent: BaseAgent, use_async: bool, *args: Any, **kwargs: Any) -> list[Any]:
    if use_async:
        return [chunk async for chunk in agent.astream(*args, **kwargs)]
    return await asyncio.to_thread(lambda: list(agent.stream(*args, **kwargs)))


def check_chunks(mode: str, chunks: list[Any], expected_reply: str) -> None:
    if mode == "values":
        assert human_texts(chunks[0]) == ["Hello"]
        assert reply(chunks[-1]) == expected_reply
    elif mode == "updates":
        assert len(chunks) == 1
        assert set(chunks[0]) == {"assistant"}
        assert chunks[0]["assistant"]["messages"][-1].text == expected_reply
    elif mode == "messages":
        tokens = [m for m, meta in chunks if meta["langgraph_node"] == "assistant"]
        assert len(tokens) > 1, "the reply should arrive token by token"
        assert all(isinstance(t, AIMessageChunk) for t in tokens)
        assert "".join(str(t.content) for t in tokens) == expected_reply
    elif mode == "custom":
        assert chunks == [{"progress": "thinking"}]
    elif mode == "debug":
        kinds = {c["type"] for c in chunks}
        assert {"checkpoint", "task", "task_result"} <= kinds, kinds
        results = [c["payload"] for c in chunks if c["type"] == "task_result"]
        assert [r["name"] for r in results] == ["assistant"]
    else:  # pragma: no cover
        raise AssertionError(mode)


EXPECTED_FIRST = "[offline model] You said: 'Hello'. This is turn 1 of our conversation."


@pytest.mark.parametrize("backend_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("mode", ["values", "updates", "messages", "custom", "debug"])
async def test_stream_modes(make: Maker, mode: str, use_async: bool) -> None:
    agent = make()
    thread = make.new_thread()
    try:
        chunks = await collect(
            agent, use_async, {"messages": ["Hello"]}, config(thread), stream_mode=mode
        )
        check_chunks(mode, chunks, EXPECTED_FIRST)
        # The streamed run was checkpointed like any other.
        assert "turn 2" in reply(agent.invoke({"messages": ["next"]}, config(thread)))
    finally:
        await agent.aclose()


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
async def test_several_stream_modes_at_once(make: Maker, use_async: bool) -> None:
    agent = make()
    modes = ["values", "updates", "messages", "custom", "debug"]
    try:
        chunks = await collect(
            agent, use_async, {"messages": ["Hello"]}, user_id="streamer", stream_mode=modes
        )
        assert all(isinstance(c, tuple) and len(c) == 2 for c in chunks)
        by_mode: dict[str, list[Any]] = {m: [] for m in modes}
        for mode, payload in chunks:
            by_mode[mode].append(payload)
        for mode in modes:
            check_chunks(mode, by_mode[mode], EXPECTED_FIRST)
        if use_async:
            state = await agent.aget_state(user_id="streamer")
        else:
            state = await asyncio.to_thread(agent.get_state, user_id="streamer")
        assert reply(state.values) == EXPECTED_FIRST
    finally:
        await agent.aclose()


def test_a_stream_checks_its_arguments_before_iteration(make: Maker) -> None:
    agent = make()
    with pytest.raises(SessionNotFoundError):
        agent.stream({"messages": ["x"]}, user_id="a", thread_id=str(uuid.uuid4()))


def test_an_abandoned_stream_releases_the_thread(make: Maker) -> None:
    agent = make()
    thread = make.new_thread()
    stream = agent.stream({"messages": ["Hello"]}, config(thread), stream_mode="messages")
    next(stream)
    stream.close()  # closed half-way: the run lock must be released
    result = agent.invoke({"messages": ["again"]}, config(thread), run_strategy="reject")
    assert "again" in reply(result)


async def test_an_abandoned_async_stream_releases_the_thread(make: Maker) -> None:
    agent = make()
    thread = make.new_thread()
    try:
        stream = agent.astream({"messages": ["Hello"]}, config(thread), stream_mode="messages")
        await stream.__anext__()
        await stream.aclose()  # closed half-way: the run lock must be released at once
        result = await agent.ainvoke({"messages": ["again"]}, config(thread), run_strategy="reject")
        assert "again" in reply(result)
    finally:
        await agent.aclose()


# -- state ----------------------------------------------------------------------------------


def test_get_state_history_and_update_state(make: Maker) -> None:
    agent = make()
    agent.invoke({"messages": ["one"]}, user_id="historian")
    agent.invoke({"messages": ["two"]}, user_id="historian")
    state = agent.get_state(user_id="historian")
    assert human_texts(state.values) == ["one", "two"]
    assert len(state.values["messages"]) == 4
    assert state.next == ()

    history = agent.get_state_history(user_id="historian")
    assert isinstance(history, list)
    assert len(history) >= 4
    assert (
        history[0].config["configurable"]["checkpoint_id"]
        == (state.config["configurable"]["checkpoint_id"])
    )
    steps = [h.metadata["step"] for h in history]
    assert steps == sorted(steps, reverse=True)  # newest first
    assert len(agent.get_state_history(user_id="historian", limit=2)) == 2
    oldest = history[-1]
    assert oldest.values.get("messages", []) == []

    written = agent.update_state(
        {"messages": [AIMessage("a note from the operator")]},
        user_id="historian",
        as_node="assistant",
    )
    assert written["configurable"]["thread_id"] == state.config["configurable"]["thread_id"]
    after = agent.get_state(user_id="historian")
    assert after.values["messages"][-1].text == "a note from the operator"
    assert len(agent.get_state_history(user_id="historian")) == len(history) + 1
    assert "turn 3" in reply(agent.invoke({"messages": ["three"]}, user_id="historian"))


async def test_async_state_matches_sync_state(make: Maker) -> None:
    agent = make()
    try:
        await agent.ainvoke({"messages": ["one"]}, user_id="historian")
        await agent.ainvoke({"messages": ["two"]}, user_id="historian")
        thread = (await agent.aresolve_config(user_id="historian"))["configurable"]["thread_id"]
        astate = await agent.aget_state(user_id="historian")
        assert human_texts(astate.values) == ["one", "two"]
        ahistory = await agent.aget_state_history(config(thread))
        assert (
            ahistory[0].config["configurable"]["checkpoint_id"]
            == (astate.config["configurable"]["checkpoint_id"])
        )
        assert len(await agent.aget_state_history(config(thread), limit=3)) == 3
        # The sync saver reads the same checkpoints (same database, or the same memory saver).
        sync_state = await asyncio.to_thread(agent.get_state, config(thread))
        assert sync_state.values == astate.values
        sync_history = await asyncio.to_thread(agent.get_state_history, config(thread))
        assert [h.config for h in sync_history] == [h.config for h in ahistory]
    finally:
        await agent.aclose()


# -- interrupt / resume ---------------------------------------------------------------------


def test_interrupt_then_continue_execution(make: Maker) -> None:
    agent = make(AskAgent)
    thread = make.new_thread()
    first = agent.invoke({"question": "your name?"}, config(thread))
    assert [i.value for i in first["__interrupt__"]] == [{"question": "your name?"}]
    paused = agent.get_state(config(thread))
    assert paused.next == ("ask",)
    assert [i.value for i in paused.interrupts] == [{"question": "your name?"}]
    done = agent.continue_execution("Ada", config(thread))
    assert done["answer"] == "got Ada"
    assert agent.get_state(config(thread)).next == ()

    # Again, resumed with an explicit Command through invoke.
    agent.invoke({"question": "again?"}, config(thread))
    assert agent.get_state(config(thread)).next == ("ask",)
    assert agent.invoke(Command(resume="Grace"), config(thread))["answer"] == "got Grace"
    # ... and with continue_execution(command=...).
    agent.invoke({"question": "once more?"}, config(thread))
    result = agent.continue_execution(command=Command(resume="Linus"), config=config(thread))
    assert result["answer"] == "got Linus"


@persistent
def test_an_interrupted_run_resumes_in_a_new_agent_instance(make: Maker) -> None:
    agent = make(AskAgent)
    agent.invoke({"question": "q?"}, user_id="pauser")
    agent.close()
    restarted = make(AskAgent)
    assert restarted.get_state(user_id="pauser").next == ("ask",)
    assert restarted.continue_execution("later", user_id="pauser")["answer"] == "got later"


async def test_interrupt_then_resume_async(make: Maker) -> None:
    agent = make(AskAgent)
    try:
        first = await agent.ainvoke({"question": "name?"}, user_id="async-asker")
        assert "__interrupt__" in first
        assert (await agent.aget_state(user_id="async-asker")).next == ("ask",)
        done = await agent.acontinue_execution("Ada", user_id="async-asker")
        assert done["answer"] == "got Ada"
        await agent.ainvoke({"question": "again?"}, user_id="async-asker")
        done = await agent.ainvoke(Command(resume="Grace"), user_id="async-asker")
        assert done["answer"] == "got Grace"
        assert (await agent.aget_state(user_id="async-asker")).next == ()
    finally:
        await agent.aclose()


# -- one agent, many users at once ----------------------------------------------------------

USERS = [f"user-{i:02d}" for i in range(16)]


def assert_isolated(states: dict[str, Any], threads: dict[str, str]) -> None:
    assert len(set(threads.values())) == len(USERS), "two users share a thread"
    for user, state in states.items():
        texts = human_texts(state.values)
        assert texts == [f"{user} says one", f"{user} says two"], (user, texts)
        assert reply(state.values).endswith("This is turn 2 of our conversation.")
        assert f"{user} says two" in reply(state.values)


def test_one_agent_16_threads_for_16_users(make: Maker) -> None:
    agent = make()
    barrier = threading.Barrier(len(USERS))

    def talk(user: str) -> str:
        barrier.wait(30)
        for line in ("one", "two"):
            agent.invoke({"messages": [f"{user} says {line}"]}, user_id=user)
        return agent.resolve_config(user_id=user)["configurable"]["thread_id"]

    with ThreadPoolExecutor(len(USERS)) as pool:
        threads = dict(zip(USERS, pool.map(talk, USERS), strict=True))
    states = {u: agent.get_state(config(threads[u])) for u in USERS}
    assert_isolated(states, threads)
    for user in USERS:
        assert agent.session_manager.get_current_user_session(user).thread_id == threads[user]


def test_the_lazy_session_manager_is_created_once() -> None:
    # On memory:// each extra registry is a separate store, so a user's first turn can land
    # on a thread that the registry kept by the agent never heard of (the turn is lost).
    seen: list[int] = []
    for _ in range(10):
        agent = ReturningAgent(settings=Settings(database_url="memory://"))
        barrier = threading.Barrier(16)

        def first_use(_: int, agent: BaseAgent = agent, barrier: Any = barrier) -> int:
            barrier.wait(30)
            return id(agent.session_manager)

        with ThreadPoolExecutor(16) as pool:
            seen.append(len(set(pool.map(first_use, range(16)))))
        agent.close()
    assert seen == [1] * 10, f"distinct registries per agent: {seen}"


async def test_one_agent_16_tasks_for_16_users(make: Maker) -> None:
    agent = make()
    try:
        start = asyncio.Event()

        async def talk(user: str) -> str:
            await start.wait()
            for line in ("one", "two"):
                await agent.ainvoke({"messages": [f"{user} says {line}"]}, user_id=user)
            return (await agent.aresolve_config(user_id=user))["configurable"]["thread_id"]

        tasks = [asyncio.create_task(talk(u)) for u in USERS]
        await asyncio.sleep(0)
        start.set()
        threads = dict(zip(USERS, await asyncio.gather(*tasks), strict=True))
        states = {u: await agent.aget_state(config(threads[u])) for u in USERS}
        assert_isolated(states, threads)
    finally:
        await agent.aclose()


# -- restart: a second process continues the conversation -----------------------------------

RESTART_SCRIPT = """
import json, sys
import bssagent
from bssagent.agent import OfflineChatModel
from bssagent.demo import ChatAgent

url, table, sqlite_path, user = sys.argv[1:5]
settings = bssagent.Settings(database_url=url, table_name=table, sqlite_path=sqlite_path)
with ChatAgent(OfflineChatModel(), settings=settings) as agent:
    result = agent.invoke({"messages": ["after the restart"]}, user_id=user)
    thread = agent.resolve_config(user_id=user)["configurable"]["thread_id"]
    print(json.dumps({
        "reply": result["messages"][-1].text,
        "thread_id": thread,
        "degraded": agent.is_degraded,
    }))
"""


@persistent
@pytest.mark.timeout(60)
def test_a_second_process_continues_the_conversation(make: Maker) -> None:
    agent = make()
    agent.invoke({"messages": ["before the restart"]}, user_id="restarter")
    thread = agent.resolve_config(user_id="restarter")["configurable"]["thread_id"]
    agent.close()

    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            RESTART_SCRIPT,
            make.url,
            make.table,
            str(make.tmp_path / "default.db"),
            "restarter",
        ],
        cwd=make.tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["thread_id"] == thread
    assert out["degraded"] is False
    assert out["reply"] == (
        "[offline model] You said: 'after the restart'. This is turn 2 of our conversation."
    )
    state = make().get_state(user_id="restarter")
    assert human_texts(state.values) == ["before the restart", "after the restart"]


# -- deletion -------------------------------------------------------------------------------


def assert_thread_gone(make: Maker, agent: BaseAgent, thread: str) -> None:
    assert agent.get_state(config(thread)).values == {}
    assert agent.get_state_history(config(thread)) == []
    if make.backend != "memory":
        assert sum(checkpoint_rows(make.url, thread).values()) == 0, checkpoint_rows(
            make.url, thread
        )
        assert session_rows(make.url, make.table, thread) == 0


def assert_thread_kept(make: Maker, agent: BaseAgent, thread: str) -> None:
    assert human_texts(agent.get_state(config(thread)).values)
    if make.backend != "memory":
        rows = checkpoint_rows(make.url, thread)
        assert rows["checkpoints"] > 0, rows
        assert session_rows(make.url, make.table, thread) == 1


def test_delete_conversation_removes_checkpoints_and_the_session(make: Maker) -> None:
    agent = make()
    sm = agent.session_manager
    doomed = sm.create_user_session("deleter", title="doomed")
    agent.invoke({"messages": ["forget me"]}, user_id="deleter")
    agent.invoke({"messages": ["forget me too"]}, user_id="deleter")
    kept = sm.create_user_session("deleter", title="kept")
    agent.invoke({"messages": ["remember me"]}, user_id="deleter")
    other = sm.get_or_create_user_session("bystander")
    agent.invoke({"messages": ["not mine to delete"]}, user_id="bystander")
    if make.backend != "memory":
        rows = checkpoint_rows(make.url, doomed.thread_id)
        assert all(rows.values()), rows  # every LangGraph table held rows for the thread

    agent.delete_conversation("deleter", doomed.thread_id)

    assert_thread_gone(make, agent, doomed.thread_id)
    assert_thread_kept(make, agent, kept.thread_id)
    assert_thread_kept(make, agent, other.thread_id)
    with pytest.raises(SessionNotFoundError):
        sm.get_session("deleter", doomed.thread_id)
    with pytest.raises(SessionNotFoundError):
        agent.delete_conversation("deleter", doomed.thread_id)


async def test_adelete_conversation_removes_checkpoints_and_the_session(make: Maker) -> None:
    agent = make()
    try:
        asm = agent.async_session_manager
        doomed = await asm.create_user_session("deleter", title="doomed")
        await agent.ainvoke({"messages": ["forget me"]}, user_id="deleter")
        kept = await asm.create_user_session("deleter", title="kept")
        await agent.ainvoke({"messages": ["remember me"]}, user_id="deleter")
        if make.backend != "memory":
            rows = checkpoint_rows(make.url, doomed.thread_id)
            assert all(rows.values()), rows

        await agent.adelete_conversation("deleter", doomed.thread_id)

        assert (await agent.aget_state(config(doomed.thread_id))).values == {}
        assert await agent.aget_state_history(config(doomed.thread_id)) == []
        assert human_texts((await agent.aget_state(config(kept.thread_id))).values) == [
            "remember me"
        ]
        with pytest.raises(SessionNotFoundError):
            await asm.get_session("deleter", doomed.thread_id)
        if make.backend != "memory":
            assert sum(checkpoint_rows(make.url, doomed.thread_id).values()) == 0
            assert session_rows(make.url, make.table, doomed.thread_id) == 0
            assert checkpoint_rows(make.url, kept.thread_id)["checkpoints"] > 0
    finally:
        await agent.aclose()


@persistent
def test_delete_conversation_with_a_compiled_in_saver(make: Maker) -> None:
    saver = InMemorySaver()
    agent = make(OwnSaverAgent, saver=saver)
    agent.invoke({"messages": ["hi"]}, user_id="owner")
    thread = agent.resolve_config(user_id="owner")["configurable"]["thread_id"]
    assert saver.get_tuple(config(thread)) is not None
    agent.delete_conversation("owner", thread)
    assert saver.get_tuple(config(thread)) is None
    assert session_rows(make.url, make.table, thread) == 0


# -- unreachable database -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_unreachable_database_still_answers_degraded(tmp_path: Path) -> None:
    agent = ReturningAgent(settings=settings_for(UNREACHABLE, "t_unreachable", tmp_path))
    try:
        assert "turn 1" in reply(agent.invoke({"messages": ["anyone?"]}, user_id="lonely"))
        assert agent.is_degraded
        assert "turn 2" in reply(agent.invoke({"messages": ["still?"]}, user_id="lonely"))
        thread = agent.resolve_config(user_id="lonely")["configurable"]["thread_id"]
        # The seed's way (no session manager involved) works too.
        seed_thread = str(uuid.uuid4())
        assert "turn 1" in reply(agent.invoke({"messages": ["seed"]}, config(seed_thread)))
        agent.delete_conversation("lonely", thread)
        assert agent.get_state(config(thread)).values == {}
    finally:
        agent.close()


@pytest.mark.timeout(60)
async def test_unreachable_database_still_answers_degraded_async(tmp_path: Path) -> None:
    agent = ReturningAgent(settings=settings_for(UNREACHABLE, "t_unreachable", tmp_path))
    try:
        seed_thread = str(uuid.uuid4())
        result = await agent.ainvoke({"messages": ["seed"]}, config(seed_thread))
        assert "turn 1" in reply(result)
        assert agent.is_degraded
        assert "turn 2" in reply(await agent.ainvoke({"messages": ["more"]}, config(seed_thread)))
        result = await agent.ainvoke({"messages": ["anyone?"]}, user_id="lonely")
        assert "turn 1" in reply(result)
        result = await agent.ainvoke({"messages": ["still?"]}, user_id="lonely")
        assert "turn 2" in reply(result)
    finally:
        await agent.aclose()


def test_unreachable_database_with_fallback_raise_fails_closed(tmp_path: Path) -> None:
    settings = Settings(database_url=UNREACHABLE, table_name="t_x", fallback="raise")
    agent = ReturningAgent(settings=settings)
    try:
        with pytest.raises(bssagent.StorageUnavailableError):
            agent.invoke({"messages": ["x"]}, config(str(uuid.uuid4())))
        assert not agent.is_degraded
    finally:
        agent.close()


def test_an_agent_with_only_its_own_saver_opens_no_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given its own checkpointer and no registry, an agent keeps to it: config-only runs do
    not open the default SQLite file just to look for tombstones."""
    monkeypatch.chdir(tmp_path)
    for name in ("BSSAGENT_DATABASE_URL", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    saver = InMemorySaver()
    agent = OwnSaverAgent(saver)
    thread = str(uuid.uuid4())
    agent.invoke({"messages": ["hello"]}, {"configurable": {"thread_id": thread}})
    result = agent.invoke({"messages": ["again"]}, {"configurable": {"thread_id": thread}})
    assert "turn 2" in result["messages"][-1].text
    assert saver.get_tuple({"configurable": {"thread_id": thread}}) is not None
    assert not (tmp_path / ".bssagent").exists()
    agent.close()


_STRICT_SCRIPT = """
import operator, uuid
from dataclasses import dataclass
from typing import Annotated, TypedDict
from langgraph.graph import END, START, StateGraph
from bssagent import BaseAgent, Settings

@dataclass
class Point:
    x: int

class State(TypedDict):
    points: Annotated[list[Point], operator.add]

class Plotter(BaseAgent):
    def define_graph(self):
        graph = StateGraph(State)
        graph.add_node("plot", lambda state: {"points": [Point(len(state["points"]))]})
        graph.add_edge(START, "plot")
        graph.add_edge("plot", END)
        return graph

agent = Plotter("plotter", settings=Settings(database_url="memory://"))
config = {"configurable": {"thread_id": str(uuid.uuid4())}}
agent.invoke({"points": []}, config)
print(*[type(p).__name__ for p in agent.invoke({"points": []}, config)["points"]])
"""


def test_strict_msgpack_keeps_the_graphs_own_types() -> None:
    """With LANGGRAPH_STRICT_MSGPACK on, LangGraph allows the types of a compiled graph's
    schemas; the agent's copies of the graph (its saver and store attached) keep that."""
    env = {**os.environ, "LANGGRAPH_STRICT_MSGPACK": "true"}
    done = subprocess.run([sys.executable, "-c", _STRICT_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=60, check=True)  # fmt: skip
    assert done.stdout.split() == ["Point", "Point"]
