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
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import MessagesState
from langgraph.store.base import PutOp
from langgraph.store.memory import InMemoryStore
from langgraph.types import interrupt

from bssagent import JournalFullError, StorageUnavailableError
from bssagent.journal import (
    Journal,
    JournalingStore,
    LatestCheckpoints,
    RecordingSaver,
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


def write_back(saver: Any, steps: list[Step]) -> None:
    """What the agent's write-back does with the steps, on ``saver``."""
    for step in steps:
        saver.put(step.parent, step.checkpoint, step.metadata, step.versions)
        for task_id, writes in step.writes:
            saver.put_writes(step.config, writes, task_id)


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
    latest = LatestCheckpoints(10)
    database = counter_graph(RecordingSaver(InMemorySaver(), latest))
    database.invoke({"messages": ["one"]}, config("t"))
    memory = InMemorySaver()
    found = latest.lookup("t")[1]
    assert found is not None
    seed(memory, found)
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
    latest = LatestCheckpoints(10)
    db_saver = InMemorySaver()
    database = counter_graph(RecordingSaver(db_saver, latest))
    database.invoke({"messages": ["one"]}, config("t"))
    found = latest.lookup("t")[1]
    assert found is not None
    base = found.checkpoint["id"]
    memory = InMemorySaver()
    seed(memory, found)
    outage = counter_graph(memory)
    outage.invoke({"messages": ["two"]}, config("t"))
    outage.invoke({"messages": ["three"]}, config("t"))
    chain = memory_chain(memory, "t")
    head = db_saver.get_tuple(config("t"))
    assert head is not None
    assert continues(head.checkpoint["id"], base, chain)
    steps = replay_steps(chain, "t", base)
    assert base not in {s.checkpoint["id"] for s in steps}  # already in the database
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
    latest = LatestCheckpoints(10)
    db_saver = InMemorySaver()
    database = counter_graph(RecordingSaver(db_saver, latest))
    database.invoke({"messages": ["one"]}, config("t"))
    found = latest.lookup("t")[1]
    assert found is not None
    memory = InMemorySaver()
    seed(memory, found)
    counter_graph(memory).invoke({"messages": ["outage"]}, config("t"))
    database.invoke({"messages": ["elsewhere"]}, config("t"))  # the thread moved on
    chain = memory_chain(memory, "t")
    head = db_saver.get_tuple(config("t"))
    assert head is not None
    assert not continues(head.checkpoint["id"], found.checkpoint["id"], chain)
    assert not continues("another", None, chain)
    write_back(db_saver, replay_steps(chain, "t", found.checkpoint["id"], into="copy"))
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
        seed(memory, found)
        outage = counter_graph(memory)
        outage.invoke({"messages": ["two"]}, config(thread))
        chain = memory_chain(memory, thread)
        steps = replay_steps(chain, thread, found.checkpoint["id"])
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
    assert journal.base("b") == (True, "base")
    assert journal.refused == 1
    store = JournalingStore(InMemoryStore(), journal)
    store.put(("n",), "k1", {"v": 1})
    store.put(("n",), "k2", {"v": 2})
    with pytest.raises(JournalFullError):
        store.put(("n",), "k3", {"v": 3})
    assert store.get(("n",), "k3") is None  # refused before it was applied
    assert store.search(("n",))
    assert journal.has_ops
    ops = journal.take_ops()
    assert [op.key for op in ops] == ["k1", "k2"]
    assert not journal.has_ops
    journal.restore_ops(ops)  # a failed replay puts them back
    with pytest.raises(JournalFullError):
        journal.add_ops([PutOp(("n",), "k3", None)])
    assert [op.key for op in journal.take_ops()] == ["k1", "k2"]
