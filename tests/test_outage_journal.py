"""Conversations through a PostgreSQL outage, end to end (a real server behind the tests'
loopback proxy, which refuses connections while "down"):

* runs during the outage continue the conversation with its history (the memory saver is
  seeded from the thread's latest checkpoint), and store writes made by nodes go on;
* when the database returns, every turn and every store write made meanwhile is in
  PostgreSQL exactly once, the thread's history continuous;
* if the thread moved on in the database meanwhile (another replica ran it), the outage
  run is kept in a child session marked ``bssagent_merged_from``, not mixed into the thread;
* past ``journal_limit``, new conversations and new sessions are refused with
  ``JournalFullError`` and what was accepted is still written back.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from faults import Driver, TcpProxy, count_messages, make, one_node
from langchain_core.messages import HumanMessage
from langgraph.graph import MessagesState, StateGraph
from langgraph.store.base import BaseStore

from bssagent import (
    AsyncAgentSessionManager,
    BaseAgent,
    JournalFullError,
    StorageUnavailableError,
)

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(90)]
KINDS = ["sync", "async"]


class NoteTaker(BaseAgent):
    """Replies with how many messages the thread holds, and notes each user message in the
    user's memory (LangGraph's store)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("note-taker", **kwargs)

    def define_graph(self) -> StateGraph[Any]:
        def reply(state: MessagesState, *, store: BaseStore) -> dict[str, Any]:
            said = [m for m in state["messages"] if isinstance(m, HumanMessage)][-1]
            store.put(("notes",), str(uuid.uuid4()), {"text": said.text})
            return count_messages(state)

        return one_node(reply)


def registry(drivers: list[Driver], kind: str, url: str, table: str, **options: Any) -> Driver:
    settings = {
        "database_url": url,
        "table_name": table,
        "deadline": 0.3,
        "breaker_threshold": 1,
        "reconnect_interval": 0.5,
        "cache_size": 100,
        **options,
    }
    return make(drivers, kind, **settings)


def is_async(d: Driver) -> bool:
    return isinstance(d.manager, AsyncAgentSessionManager)


async def turn(d: Driver, agent: BaseAgent, user: str, text: str) -> str:
    if is_async(d):
        result = await agent.ainvoke({"messages": [text]}, user_id=user)
    else:
        result = agent.invoke({"messages": [text]}, user_id=user)
    return str(result["messages"][-1].text)


async def replay(d: Driver, agent: BaseAgent) -> int:
    return await agent.areplay_journal() if is_async(d) else agent.replay_journal()


async def close(d: Driver, agent: BaseAgent) -> None:
    if is_async(d):
        await agent.aclose()
    else:
        agent.close()


def stored_messages(pg_url: str, thread: str) -> list[str]:
    """The thread's messages as PostgreSQL has them (read without bssagent)."""
    from langgraph.checkpoint.postgres import PostgresSaver

    with PostgresSaver.from_conn_string(pg_url) as saver:
        found = saver.get_tuple({"configurable": {"thread_id": thread}})
    return [] if found is None else [m.text for m in found.checkpoint["channel_values"]["messages"]]


def stored_notes(pg_url: str, user: str) -> list[str]:
    from langgraph.store.postgres import PostgresStore

    with PostgresStore.from_conn_string(pg_url) as store:
        items = store.search(("bssagent", "default", "users", user, "notes"), limit=1000)
    return sorted(item.value["text"] for item in items)


async def outage_turn(d: Driver, agent: BaseAgent, user: str, text: str) -> str | None:
    """A turn right after the database went away: the run that finds out raises a typed
    error (its turn is not kept, and the caller knows); later ones run in memory."""
    try:
        return await turn(d, agent, user, text)
    except StorageUnavailableError:
        return None


async def until_written_back(d: Driver, agent: BaseAgent, user: str, said: list[str]) -> None:
    """Turns go on until runs are back on PostgreSQL and the journal is written back."""
    started = time.monotonic()
    while agent.is_degraded or agent._persistence.journal:
        assert time.monotonic() - started < 10, "not back on PostgreSQL within 10 s"
        await asyncio.sleep(0.6)
        said += ["after", await turn(d, agent, user, "after")]
        await replay(d, agent)  # what the background writer does; here, deterministically


@pytest.mark.parametrize("kind", KINDS)
async def test_a_conversation_continues_through_an_outage_and_is_written_back_once(
    kind: str, drivers: list[Driver], proxy: TcpProxy, pg_url: str, table_name: str
) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    m = registry(drivers, kind, proxy.url(pg_url), table_name)
    agent = NoteTaker(session_manager=m.manager)
    try:
        said = ["one", await turn(m, agent, user, "one")]
        thread = (await m("get_current_user_session", user)).thread_id
        proxy.refuse()
        reply = await outage_turn(m, agent, user, "two")
        if reply is not None:
            said += ["two", reply]
        for text in ("three", "four"):
            reply = await turn(m, agent, user, text)
            said += [text, reply]
            # The reply counts what the thread holds: the history from before the outage.
            assert reply == f"{len(said) - 1} messages"
        assert agent.is_degraded
        assert agent._persistence.journal.threads() == [thread]
        proxy.pass_()
        await until_written_back(m, agent, user, said)
        # Every message once, in order; every note (store write) once, outage ones included.
        assert stored_messages(pg_url, thread) == said
        assert stored_notes(pg_url, user) == sorted(said[::2])
    finally:
        await close(m, agent)


@pytest.mark.parametrize("kind", KINDS)
async def test_an_outage_run_on_a_thread_that_moved_on_goes_to_a_merged_child_session(
    kind: str, drivers: list[Driver], proxy: TcpProxy, pg_url: str, table_name: str
) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    m = registry(drivers, kind, proxy.url(pg_url), table_name)
    other = registry(drivers, kind, pg_url, table_name, cache_size=0)  # a replica with a network
    agent, elsewhere = (
        NoteTaker(session_manager=m.manager),
        NoteTaker(session_manager=other.manager),
    )
    try:
        await turn(m, agent, user, "one")
        thread = (await m("get_current_user_session", user)).thread_id
        proxy.refuse()
        while await outage_turn(m, agent, user, "outage") is None:
            pass
        await turn(other, elsewhere, user, "elsewhere")  # the thread moves on in PostgreSQL
        proxy.pass_()
        await until_written_back(m, agent, user, [])
        history = stored_messages(pg_url, thread)
        assert history[:4] == ["one", "1 messages", "elsewhere", "3 messages"]
        assert "outage" not in history
        children = await m("list_child_sessions", user, thread)
        assert [c.metadata for c in children] == [{"bssagent_merged_from": thread}]
        kept = stored_messages(pg_url, children[0].thread_id)
        assert kept[:4] == ["one", "1 messages", "outage", "3 messages"]
        assert "elsewhere" not in kept
    finally:
        await close(m, agent)
        await close(other, elsewhere)


@pytest.mark.parametrize("kind", KINDS)
async def test_past_the_journal_limit_new_work_is_refused_and_accepted_work_kept(
    kind: str, drivers: list[Driver], proxy: TcpProxy, pg_url: str, table_name: str
) -> None:
    alice, bob, carol = (f"{n}-{uuid.uuid4().hex[:8]}" for n in ("alice", "bob", "carol"))
    m = registry(drivers, kind, proxy.url(pg_url), table_name, journal_limit=1)
    agent = NoteTaker(session_manager=m.manager)
    try:
        said = ["one", await turn(m, agent, alice, "one")]
        thread = (await m("get_current_user_session", alice)).thread_id
        proxy.refuse()
        while (reply := await outage_turn(m, agent, alice, "two")) is None:
            pass
        said += ["two", reply]
        # Bob's new session is the one session the journal holds; his conversation would be
        # a second thread: refused, typed, before anything ran.
        with pytest.raises(JournalFullError):
            await turn(m, agent, bob, "hi")
        assert (await m("get_current_user_session", bob)).thread_id
        with pytest.raises(JournalFullError):  # a second new session
            await m("get_or_create_user_session", carol)
        proxy.pass_()
        await until_written_back(m, agent, alice, said)
        assert stored_messages(pg_url, thread) == said
        assert await m("has_session", bob)  # the session accepted in memory was stored too
    finally:
        await close(m, agent)


async def test_two_replicas_writing_back_one_thread_at_once_keep_each_run_once(
    drivers: list[Driver], proxy: TcpProxy, pg_url: str, table_name: str
) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    a, b = (registry(drivers, "sync", proxy.url(pg_url), table_name) for _ in range(2))
    agent_a, agent_b = NoteTaker(session_manager=a.manager), NoteTaker(session_manager=b.manager)
    try:
        await turn(a, agent_a, user, "one")
        thread = (await a("get_current_user_session", user)).thread_id
        agent_b.get_state(user_id=user)  # both replicas now know the thread's latest checkpoint
        await b("get_current_user_session", user)
        proxy.refuse()
        for d, agent, text in ((a, agent_a, "from a"), (b, agent_b, "from b")):
            while await outage_turn(d, agent, user, text) is None:
                pass
        proxy.pass_()
        await asyncio.sleep(1.0)  # past reconnect_interval: the database is tried again
        started = time.monotonic()
        while agent_a._persistence.journal or agent_b._persistence.journal:
            assert time.monotonic() - started < 10, "not written back within 10 s"
            # Both at once, each under the thread's PostgreSQL run lock (a busy thread is
            # skipped and retried).
            await asyncio.gather(
                asyncio.to_thread(agent_a.replay_journal),
                asyncio.to_thread(agent_b.replay_journal),
            )
        history = stored_messages(pg_url, thread)
        children = await a("list_child_sessions", user, thread)
        assert [c.metadata for c in children] == [{"bssagent_merged_from": thread}]
        kept = stored_messages(pg_url, children[0].thread_id)
        # One replica continued the thread, the other's run was kept apart: each once.
        assert {history[2], kept[2]} == {"from a", "from b"}
        assert history == ["one", "1 messages", history[2], "3 messages"]
        assert kept == ["one", "1 messages", kept[2], "3 messages"]
    finally:
        await close(a, agent_a)
        await close(b, agent_b)


@pytest.mark.parametrize("kind", KINDS)
async def test_preferences_set_during_an_outage_are_written_back(
    kind: str, drivers: list[Driver], proxy: TcpProxy, pg_url: str, table_name: str
) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    m = registry(drivers, kind, proxy.url(pg_url), table_name)
    await m("set_user_preferences", user, {"language": "en"})
    proxy.refuse()
    while True:  # the call that finds the database gone raises, typed; then memory serves
        try:
            await m("set_user_preferences", user, {"tone": "brief"})
            break
        except StorageUnavailableError:
            pass
    assert m.manager.persistence.is_degraded  # the store found out (the registry need not)
    assert await m("get_user_preferences", user) == {"tone": "brief"}  # outage writes only
    proxy.pass_()
    started = time.monotonic()
    while await m("get_user_preferences", user) != {"language": "en", "tone": "brief"}:
        assert time.monotonic() - started < 10, "not written back within 10 s"
        await asyncio.sleep(0.2)
    from langgraph.store.postgres import PostgresStore

    with PostgresStore.from_conn_string(pg_url) as store:
        items = store.search(("bssagent", "default", "users", user), limit=100)
    assert sorted(i.key for i in items) == ["language", "tone"]
