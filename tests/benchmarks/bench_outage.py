"""Benchmark: carrying conversations through an outage, against raw LangGraph.

    BSSAGENT_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test \\
        .venv/bin/python tests/benchmarks/bench_outage.py [--quick]

In a fresh database (dropped at the end), reached through the tests' loopback proxy, which
refuses connections during the outage (the registry, savers and run locks all find the
server gone, as in a real one):

1. **Write-back** — conversations that ran in memory during the outage (each seeded from
   its latest checkpoint, then a few turns) written back with ``agent.replay_journal()``
   (head check, then LangGraph's ``put`` / ``put_writes`` per checkpoint, under each thread's
   run lock) against the same checkpoints written with LangGraph's ``PostgresSaver.put`` /
   ``put_writes`` directly (into copies of the threads). Printed: checkpoints per second.
2. **A turn during the outage** — ``agent.invoke(..., user_id=...)`` on the memory saver
   (the first one seeds the thread) against raw ``graph.invoke`` on LangGraph's
   ``InMemorySaver``.
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from contextlib import closing
from pathlib import Path
from urllib.parse import urlsplit

from bench_agent import Echo
from common import Row, fmt_rate, fmt_time, fresh_database, ratio, standalone
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.memory import InMemorySaver

from bssagent import AgentSessionManager, StorageUnavailableError
from bssagent.journal import memory_chain, replay_steps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from faults import TcpProxy  # the tests' proxy, one directory up

TURNS_BEFORE = 5


def run(url: str, quick: bool) -> list[Row]:
    conversations, turns_during = (20, 3) if quick else (100, 5)
    print(f"== outage: {conversations} conversations, {turns_during} turns each in memory")
    parts = urlsplit(url)
    with (
        fresh_database(url, "bench_outage") as db,
        closing(TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432))) as proxy,
        AgentSessionManager(database_url=proxy.url(db), reconnect_interval=0.5) as sessions,
        Echo("bench", session_manager=sessions) as agent,
    ):
        users = [f"user-{n}" for n in range(conversations)]
        for user in users:
            for t in range(TURNS_BEFORE):
                agent.invoke({"messages": [f"before {t}"]}, user_id=user)
        proxy.refuse()
        while True:  # the run that finds the server gone raises (typed); then memory serves
            try:
                agent.invoke({"messages": ["found out"]}, user_id="someone")
                break
            except StorageUnavailableError:
                pass
        raw = agent.graph.copy(update={"checkpointer": InMemorySaver()})
        ours: list[float] = []
        theirs: list[float] = []
        for t in range(turns_during):
            for user in users:
                cfg = RunnableConfig(configurable={"thread_id": f"raw-{user}"})
                start = time.perf_counter()
                raw.invoke({"messages": [f"during {t}"]}, cfg)
                theirs.append(time.perf_counter() - start)
                start = time.perf_counter()
                agent.invoke({"messages": [f"during {t}"]}, user_id=user)
                ours.append(time.perf_counter() - start)
        assert agent.is_degraded
        p = agent._persistence
        memory = p._memory_saver()
        # The baseline: the same checkpoints, written with LangGraph's saver directly.
        plan = []
        for thread in p.journal.threads():
            _, base, seeded = p.journal.base(thread)
            chain = memory_chain(memory, thread)
            plan += replay_steps(memory, chain, thread, base, seeded, into=str(uuid.uuid4()))
        proxy.pass_()
        time.sleep(0.6)  # past reconnect_interval: the database is tried again
        saver = p.sync()
        start = time.perf_counter()
        for step in plan:
            saver.put(step.parent, step.checkpoint, step.metadata, step.versions)
            for task_id, path, writes in step.writes:
                saver.put_writes(step.config, writes, task_id, path)
        raw_s = time.perf_counter() - start
        start = time.perf_counter()
        written = agent.replay_journal()
        ours_s = time.perf_counter() - start
        assert written == conversations + 1, "not everything was written back"
        assert not p.journal
        raw_rate, our_rate = len(plan) / raw_s, len(plan) / ours_s
        print(f"  write-back: {len(plan)} checkpoints, {fmt_rate(our_rate, 'checkpoints')} "
              f"(raw PostgresSaver {fmt_rate(raw_rate, 'checkpoints')})")  # fmt: skip
        turn_ours, turn_raw = statistics.median(ours), statistics.median(theirs)
        print(f"  turn in memory: {fmt_time(turn_ours)} (raw {fmt_time(turn_raw)})")
    return [
        Row(
            f"writing back {conversations} conversations run in memory during an outage "
            f"({len(plan)} checkpoints)",
            fmt_rate(our_rate, "checkpoints"),
            "LangGraph `PostgresSaver.put`/`put_writes` of the same "
            + fmt_rate(raw_rate, "checkpoints"),
            ratio(our_rate, raw_rate),
        ),
        Row(
            "agent turn with `user_id=` during an outage (memory saver, seeded)",
            fmt_time(turn_ours),
            f"raw `graph.invoke` on `InMemorySaver` {fmt_time(turn_raw)}",
            ratio(turn_ours, turn_raw),
        ),
    ]


if __name__ == "__main__":
    standalone(run, __doc__)
