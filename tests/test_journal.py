"""The outage journal's parts (``bssagent.journal``) on LangGraph's real savers and stores:
recording each thread's latest checkpoint, seeding a memory saver from it, the steps that
write a memory run back (idempotent on PostgreSQL), and the bounds.

The end-to-end behaviour through a real outage is in ``test_outage_journal.py``.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from faults import count_messages, one_node
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import MessagesState
from langgraph.store.base import PutOp
from langgraph.store.memory import InMemoryStore
from langgraph.types import Command, interrupt

from bssagent import JournalFullError, StorageUnavailableError
from bssagent.journal import (
    Journal,
    JournalingStore,
    Latest,
    LatestCheckpoints,
    RecordingSaver,
    Snapshot,
    Step,
    continues,
    memory_chain,
    replay_steps,
    seed,
)


def counter_graph(saver: Any, *, ask: bool = False) -> Any:
    """Replies with how many messages the thread holds; ``ask`` interrupts before replying."""

    def reply(state: MessagesState) -> dict[str, Any]:
        if ask:
            interrupt("ok?")
        return count_messages(state)

    return one_node(reply).compile(checkpointer=saver)


def outage_after_one_turn() -> tuple[InMemorySaver, Any, Latest, InMemorySaver, Snapshot]:
    """A conversation's first turn on a "database" saver (recorded), then the memory saver of
    an outage seeded from it: (database saver, its graph, the remembered latest, memory, the
    seeded writes)."""
    latest = LatestCheckpoints(10)
    db_saver = InMemorySaver()
    database = counter_graph(RecordingSaver(db_saver, latest))
    database.invoke({"messages": ["one"]}, config("t"))
    found = latest.lookup("t")[1]
    assert found is not None
    memory = InMemorySaver()
    return db_saver, database, found, memory, seed(memory, found)


def write_back(saver: Any, steps: list[Step]) -> None:
    """What the agent's write-back does with the steps, on ``saver``."""
    for step in steps:
        if step.put:
            saver.put(step.parent, step.checkpoint, step.metadata, step.versions)
        for task_id, path, writes in step.writes:
            saver.put_writes(step.config, writes, task_id, path)


def config(thread: str) -> Any:
    return {"configurable": {"thread_id": thread}}


def texts(graph: Any, thread: str) -> list[str]:
    return [m.text for m in graph.get_state(config(thread)).values.get("messages", [])]


def test_the_recording_saver_remembers_each_threads_latest_checkpoint() -> None:
    latest = LatestCheckpoints(10)
    saver = RecordingSaver(InMemorySaver(), latest)
    graph = counter_graph(saver)
    graph.invoke({"messages": ["one"]}, config("t"))
    graph.invoke({"messages": ["two"]}, config("t"))
    known, found = latest.lookup("t")
    assert known
    assert found is not None
    assert found.checkpoint["id"] == saver.get_tuple(config("t")).checkpoint["id"]  # type: ignore[union-attr]
    assert [m.text for m in found.checkpoint["channel_values"]["messages"]] == texts(graph, "t")
    # A read of a thread with no checkpoint is remembered as "none", an unseen one as unknown.
    assert saver.get_tuple(config("empty")) is None
    assert latest.lookup("empty") == (True, None)
    assert latest.lookup("never") == (False, None)
    saver.delete_thread("t")
    assert latest.lookup("t") == (False, None)


def test_the_latest_checkpoints_are_bounded_least_recently_used_first() -> None:
    latest = LatestCheckpoints(2)
    saver = RecordingSaver(InMemorySaver(), latest)
    graph = counter_graph(saver)
    for thread in ("a", "b", "c"):
        graph.invoke({"messages": ["hi"]}, config(thread))
    assert [latest.lookup(t)[0] for t in ("a", "b", "c")] == [False, True, True]
    off = LatestCheckpoints(0)
    counter_graph(RecordingSaver(InMemorySaver(), off)).invoke({"messages": ["x"]}, config("a"))
    assert off.lookup("a") == (False, None)


def test_a_memory_saver_seeded_from_the_latest_checkpoint_continues_the_conversation() -> None:
    memory = outage_after_one_turn()[3]
    outage = counter_graph(memory)
    result = outage.invoke({"messages": ["two"]}, config("t"))
    assert result["messages"][-1].text == "3 messages"
    assert texts(outage, "t") == ["one", "1 messages", "two", "3 messages"]


def test_an_interrupted_thread_is_seeded_with_its_pending_interrupt() -> None:
    latest = LatestCheckpoints(10)
    database = counter_graph(RecordingSaver(InMemorySaver(), latest), ask=True)
    database.invoke({"messages": ["one"]}, config("t"))
    assert database.get_state(config("t")).interrupts
    memory = InMemorySaver()
    found = latest.lookup("t")[1]
    assert found is not None
    assert found.writes
    seed(memory, found)
    outage = counter_graph(memory, ask=True)
    assert outage.get_state(config("t")).interrupts  # the question is still pending


def test_replaying_a_memory_run_rebuilds_the_history_once() -> None:
    db_saver, database, found, memory, seeded = outage_after_one_turn()
    base = found.checkpoint["id"]
    outage = counter_graph(memory)
    outage.invoke({"messages": ["two"]}, config("t"))
    outage.invoke({"messages": ["three"]}, config("t"))
    chain = memory_chain(memory, "t")
    head = db_saver.get_tuple(config("t"))
    assert head is not None
    assert continues(head.checkpoint["id"], base, chain)
    steps = replay_steps(memory, chain, "t", base, seeded)
    assert base not in {s.checkpoint["id"] for s in steps}  # already in the database
    assert all(s.put for s in steps)
    before = len(list(db_saver.list(config("t"))))
    for _ in range(2):  # idempotent: the second pass changes nothing
        write_back(db_saver, steps)
    assert texts(database, "t") == texts(outage, "t")
    assert len(list(db_saver.list(config("t")))) == before + len(steps)
    # Once written back, the chain continues the database's head (a retried replay is safe).
    head = db_saver.get_tuple(config("t"))
    assert head is not None
    assert continues(head.checkpoint["id"], base, chain)


def test_a_run_that_does_not_continue_the_head_is_copied_whole_to_another_thread() -> None:
    db_saver, database, found, memory, seeded = outage_after_one_turn()
    counter_graph(memory).invoke({"messages": ["outage"]}, config("t"))
    database.invoke({"messages": ["elsewhere"]}, config("t"))  # the thread moved on
    chain = memory_chain(memory, "t")
    head = db_saver.get_tuple(config("t"))
    assert head is not None
    assert not continues(head.checkpoint["id"], found.checkpoint["id"], chain)
    assert not continues("another", None, chain)
    steps = replay_steps(memory, chain, "t", found.checkpoint["id"], seeded, into="copy")
    # The copy starts the new thread: its first checkpoint's parent is the other thread's.
    assert "checkpoint_id" not in steps[0].parent["configurable"]
    write_back(db_saver, steps)
    assert texts(database, "copy") == ["one", "1 messages", "outage", "3 messages"]
    assert texts(database, "t") == ["one", "1 messages", "elsewhere", "3 messages"]


@pytest.mark.postgres
def test_writing_back_twice_on_postgresql_stores_each_checkpoint_once(pg_url: str) -> None:
    from langgraph.checkpoint.postgres import PostgresSaver

    thread = str(uuid.uuid4())
    with PostgresSaver.from_conn_string(pg_url) as db_saver:
        db_saver.setup()
        latest = LatestCheckpoints(10)
        database = counter_graph(RecordingSaver(db_saver, latest))
        database.invoke({"messages": ["one"]}, config(thread))
        found = latest.lookup(thread)[1]
        assert found is not None
        memory = InMemorySaver()
        seeded = seed(memory, found)
        outage = counter_graph(memory)
        outage.invoke({"messages": ["two"]}, config(thread))
        chain = memory_chain(memory, thread)
        steps = replay_steps(memory, chain, thread, found.checkpoint["id"], seeded)
        before = len(list(db_saver.list(config(thread))))
        for _ in range(2):
            write_back(db_saver, steps)
        assert texts(database, thread) == ["one", "1 messages", "two", "3 messages"]
        assert len(list(db_saver.list(config(thread)))) == before + len(steps)
        db_saver.delete_thread(thread)


def test_the_journal_refuses_new_threads_and_writes_beyond_its_limit() -> None:
    journal = Journal(2)
    journal.add_thread("a", None)
    journal.add_thread("b", "base")
    journal.add_thread("a", None)  # already journaled: no new room taken
    with pytest.raises(JournalFullError) as raised:
        journal.add_thread("c", None)
    assert isinstance(raised.value, StorageUnavailableError)
    assert journal.threads() == ["a", "b"]
    assert journal.base("b") == (True, "base", {})
    assert journal.refused == 1
    store = JournalingStore(InMemoryStore(), journal)
    store.put(("n",), "k1", {"v": 1})
    store.put(("n",), "k2", {"v": 2})
    with pytest.raises(JournalFullError):
        store.put(("n",), "k3", {"v": 3})
    assert store.get(("n",), "k3") is None  # refused before it was applied
    assert store.search(("n",))
    assert journal.has_ops
    assert [op.key for op in journal.peek_ops()] == ["k1", "k2"]
    with pytest.raises(JournalFullError):
        journal.add_ops([PutOp(("n",), "k3", None)])
    journal.drop_ops(1)
    assert [op.key for op in journal.peek_ops()] == ["k2"]
    journal.drop_ops(1)
    assert not journal.has_ops


def test_an_answer_given_during_the_outage_is_written_back() -> None:
    """A resume that leads to another question adds writes to the seeded checkpoint itself
    (no new checkpoint): they are written back too."""

    def ask_twice(state: MessagesState) -> dict[str, Any]:
        first, second = interrupt("first?"), interrupt("second?")
        return {"messages": [AIMessage(f"{first} then {second}")]}

    latest = LatestCheckpoints(10)
    db_saver = InMemorySaver()
    database = one_node(ask_twice).compile(checkpointer=RecordingSaver(db_saver, latest))
    database.invoke({"messages": ["hi"]}, config("t"))
    found = latest.lookup("t")[1]
    assert found is not None
    memory = InMemorySaver()
    seeded = seed(memory, found)
    outage = one_node(ask_twice).compile(checkpointer=memory)
    outage.invoke(Command(resume="yes"), config("t"))  # answered during the outage
    assert outage.get_state(config("t")).interrupts[0].value == "second?"
    chain = memory_chain(memory, "t")
    steps = replay_steps(memory, chain, "t", found.checkpoint["id"], seeded)
    assert [s.put for s in steps] == [False]  # new writes on the seeded checkpoint only
    write_back(db_saver, steps)
    assert database.get_state(config("t")).interrupts[0].value == "second?"
    result = database.invoke(Command(resume="ok"), config("t"))
    assert result["messages"][-1].text == "yes then ok"


def test_writes_saved_before_their_checkpoint_are_remembered_with_it() -> None:
    """LangGraph saves a step's writes without waiting for the step's checkpoint."""
    latest = LatestCheckpoints(10)
    first: Any = {"id": "1", "channel_versions": {}, "channel_values": {}}
    second: Any = {"id": "2", "channel_versions": {}, "channel_values": {}}
    latest.put({"configurable": {"thread_id": "t", "checkpoint_ns": ""}}, first, {})
    at_second = {"configurable": {"thread_id": "t", "checkpoint_ns": "", "checkpoint_id": "2"}}
    latest.add_writes(at_second, [("__interrupt__", "ask")], "task", "")
    latest.put({"configurable": {"thread_id": "t", "checkpoint_ns": "", "checkpoint_id": "1"}},
               second, {})  # fmt: skip
    found = latest.lookup("t")[1]
    assert found is not None
    assert found.writes == [("task", "__interrupt__", "ask", "")]
    # A read that began before the newer put does not take the thread back in time.
    stale: Any = type("T", (), {"checkpoint": first, "parent_config": None, "metadata": {},
                                "pending_writes": []})()  # fmt: skip
    latest.read(config("t"), stale)
    latest.read(config("t"), None)
    found = latest.lookup("t")[1]
    assert found is not None
    assert found.checkpoint["id"] == "2"


@pytest.mark.postgres
def test_a_store_write_the_database_refuses_does_not_hold_back_the_others(pg_url: str) -> None:
    from bssagent import Settings
    from bssagent.persistence import Persistence

    ns = ("bssagent-test", uuid.uuid4().hex)
    p = Persistence(Settings(database_url=pg_url))
    try:
        p.journal.add_ops([
            PutOp(ns, "before", {"v": 1}),
            PutOp(ns, "refused", {"v": "NUL \x00 is not storable in PostgreSQL"}),
            PutOp(ns, "after", {"v": 2}),
        ])  # fmt: skip
        store = p.store()  # the store's first use writes the journal back
        assert not p.journal.has_ops
        assert sorted(item.key for item in store.search(ns)) == ["after", "before"]
        for item in store.search(ns):
            store.delete(ns, item.key)
    finally:
        p.close()


@settings(max_examples=40, deadline=None)
@given(
    before=st.integers(min_value=0, max_value=3),
    during=st.integers(min_value=0, max_value=3),
    moved_on=st.booleans(),
    remembered=st.booleans(),
)
def test_writing_back_any_outage_keeps_every_message_once(
    before: int, during: int, moved_on: bool, remembered: bool
) -> None:
    """Whatever happened before and during the outage, the database ends with the thread's
    own history once, and the outage run either continues it or sits whole in a copy."""
    latest = LatestCheckpoints(10 if remembered else 0)
    db_saver = InMemorySaver()
    database = counter_graph(RecordingSaver(db_saver, latest))
    for n in range(before):
        database.invoke({"messages": [f"before {n}"]}, config("t"))
    found = latest.lookup("t")[1]
    memory = InMemorySaver()
    seeded = seed(memory, found) if found is not None else {}
    base = found.checkpoint["id"] if found is not None else None
    outage = counter_graph(memory)
    for n in range(during):
        outage.invoke({"messages": [f"during {n}"]}, config("t"))
    if moved_on:
        database.invoke({"messages": ["elsewhere"]}, config("t"))
    chain = memory_chain(memory, "t")
    head = db_saver.get_tuple(config("t"))
    steps = replay_steps(memory, chain, "t", base, seeded)
    if not steps:  # nothing ran during the outage: nothing to write
        assert during == 0
        return
    same = continues(None if head is None else head.checkpoint["id"], base, chain)
    # It continues exactly when nothing else happened to the thread it started from.
    assert same == (not moved_on and (found is not None or before == 0))
    into = None if same else "copy"
    for _ in range(2):  # twice: a retried write-back changes nothing
        write_back(db_saver, replay_steps(memory, chain, "t", base, seeded, into))
    kept = texts(database, into or "t")
    assert kept == texts(outage, "t")
    assert len(kept) == len(set(kept))
    if into is not None:  # the thread itself is untouched by the outage
        assert not any(m.startswith("during") for m in texts(database, "t"))


@pytest.mark.postgres
def test_a_store_write_back_that_fails_for_a_passing_reason_keeps_the_journal(
    pg_url: str,
) -> None:
    """A busy pool (the server answers) is no reason to drop journaled writes."""
    from psycopg_pool import PoolTimeout

    from bssagent import Settings, StorageError
    from bssagent.persistence import Persistence

    class BusyStore(InMemoryStore):
        def batch(self, ops: Any) -> Any:
            raise PoolTimeout("couldn't get a connection after 2.00 sec")

    p = Persistence(Settings(database_url=pg_url))
    try:
        p.journal.add_ops([PutOp(("n",), "a", {"v": 1}), PutOp(("n",), "b", {"v": 2})])
        with pytest.raises(StorageError) as raised:
            p._replay_ops(BusyStore())
        assert not isinstance(raised.value, StorageUnavailableError)  # the server answers
        assert [op.key for op in p.journal.peek_ops()] == ["a", "b"]
    finally:
        p.close()
