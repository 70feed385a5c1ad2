"""Benchmark: per-turn cost of an agent run with ``user_id=`` against raw LangGraph.

    BSSAGENT_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test \\
        .venv/bin/python tests/benchmarks/bench_agent.py [--quick]

In a fresh database (dropped at the end), both sides run the same trivial one-node graph on
the same LangGraph saver (the agent's own), side by side in one process:

1. **Turns** — ``agent.invoke(input, user_id=...)`` against
   ``graph.invoke(input, {"configurable": {"thread_id": ...}})``, alternating turn by turn
   over several conversations; medians at turns 1, 10 and 100. The agent side adds session
   resolution (creation at turn 1, a cache hit after), the run lock, the tombstone check and
   the request counter.
2. **16 concurrent conversations** — 16 users talking to one agent at once (asyncio tasks,
   ``await agent.ainvoke(input, user_id=...)``) against 16 tasks running the raw compiled
   graph's ``ainvoke`` with thread ids on the agent's async saver. Rounds (every
   conversation takes a few turns) alternate between the sides; printed: throughput
   (turns/s, median over rounds) and the median turn latency.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from common import Row, fmt_rate, fmt_time, fresh_database, ratio, standalone
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, MessagesState, StateGraph

from bssagent import AgentSessionManager, AsyncAgentSessionManager, BaseAgent

TURNS = (1, 10, 100)
CONCURRENT = 16


def reply(state: MessagesState) -> dict[str, Any]:
    return {"messages": [AIMessage(f"ok {len(state['messages'])}")]}


class Echo(BaseAgent):
    def define_graph(self) -> StateGraph[Any]:
        graph = StateGraph(MessagesState)
        graph.add_node("reply", reply)
        graph.add_edge(START, "reply")
        graph.add_edge("reply", END)
        return graph


def turns(url: str, conversations: int) -> list[Row]:
    print(f"== agent: turn cost, agent.invoke vs raw graph.invoke, {conversations} conversations")
    with (
        AgentSessionManager(database_url=url) as sessions,
        Echo("bench", session_manager=sessions) as agent,
    ):
        raw = agent.graph.copy(update={"checkpointer": agent._persistence.sync()})
        # Warm-up on a conversation of its own: opens the pools (sessions, run locks, saver),
        # so the first measured turn 1 does not pay for them.
        warm_up = RunnableConfig(configurable={"thread_id": "warm-up"})
        for _ in range(2):
            raw.invoke({"messages": ["warm-up"]}, warm_up)
            agent.invoke({"messages": ["warm-up"]}, user_id="warm-up")
        timings: dict[str, dict[int, list[float]]] = {"raw": {}, "agent": {}}
        for n in range(conversations):
            raw_cfg = RunnableConfig(configurable={"thread_id": str(uuid.uuid4())})
            user = f"bench-user-{n}"
            sides: list[tuple[str, Callable[[int], object]]] = [
                ("raw", lambda t: raw.invoke({"messages": [f"hi {t}"]}, raw_cfg)),
                ("agent", lambda t: agent.invoke({"messages": [f"hi {t}"]}, user_id=user)),
            ]
            # Turn by turn, each side in turn; who goes first alternates between conversations.
            for turn in range(1, max(TURNS) + 1):
                for name, call in sides if n % 2 == 0 else reversed(sides):
                    start = time.perf_counter()
                    call(turn)
                    if turn in TURNS:
                        timings[name].setdefault(turn, []).append(time.perf_counter() - start)
    print(f"  {'turn':>5}{'raw LangGraph':>15}{'agent.invoke':>15}{'ratio':>8}")
    rows = []
    for turn in TURNS:
        raw_s = statistics.median(timings["raw"][turn])
        agent_s = statistics.median(timings["agent"][turn])
        print(f"  {turn:>5}{fmt_time(raw_s):>15}{fmt_time(agent_s):>15}{agent_s / raw_s:>7.2f}x")
        rows.append(
            Row(
                f"agent turn with `user_id=` (sync), turn {turn}",
                fmt_time(agent_s),
                f"raw `graph.invoke` {fmt_time(raw_s)}",
                ratio(agent_s, raw_s),
            )
        )
    return rows


Turn = Callable[[int], Awaitable[object]]


async def conversation_round(conversations: list[Turn], count: int) -> tuple[float, list[float]]:
    """Every conversation takes ``count`` turns, all conversations at once: turns/s of the
    round and each turn's latency."""
    latencies: list[float] = []

    async def talk(turn: Turn) -> None:
        for t in range(count):
            start = time.perf_counter()
            await turn(t)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(talk(c) for c in conversations))
    return len(conversations) * count / (time.perf_counter() - start), latencies


async def concurrent(url: str, rounds: int, count: int) -> list[Row]:
    print(
        f"\n== agent: {CONCURRENT} concurrent conversations, agent.ainvoke vs raw graph.ainvoke,"
        f" {rounds} rounds of {count} turns each"
    )
    async with (
        AsyncAgentSessionManager(database_url=url) as sessions,
        Echo("bench", session_manager=sessions) as agent,
        agent._persistence.async_saver() as saver,
    ):
        raw = agent.graph.copy(update={"checkpointer": saver})

        def agent_turn(user: str) -> Turn:
            return lambda t: agent.ainvoke({"messages": [f"hi {t}"]}, user_id=user)

        def raw_turn(thread_id: str) -> Turn:
            config = RunnableConfig(configurable={"thread_id": thread_id})
            return lambda t: raw.ainvoke({"messages": [f"hi {t}"]}, config)

        sides = {
            "agent": [agent_turn(f"concurrent-{n}") for n in range(CONCURRENT)],
            "raw": [raw_turn(str(uuid.uuid4())) for _ in range(CONCURRENT)],
        }
        # Warm-up, one turn per conversation: opens the pools and creates the sessions, so
        # the rounds measure ongoing conversations on both sides.
        for side in sides.values():
            await conversation_round(side, 1)
        rates: dict[str, list[float]] = {name: [] for name in sides}
        latencies: dict[str, list[float]] = {name: [] for name in sides}
        for r in range(rounds):
            for name in sides if r % 2 == 0 else reversed(sides):
                turns_per_s, took = await conversation_round(sides[name], count)
                rates[name].append(turns_per_s)
                latencies[name] += took
    rate = {name: statistics.median(values) for name, values in rates.items()}
    latency = {name: statistics.median(values) for name, values in latencies.items()}
    print(f"  {'':<16}{'turns/s':>12}{'median turn':>14}")
    for name in sides:
        print(f"  {name:<16}{rate[name]:>12.0f}{fmt_time(latency[name]):>14}")
    print(
        f"  agent / raw: throughput {rate['agent'] / rate['raw']:.2f}x, "
        f"latency {latency['agent'] / latency['raw']:.2f}x"
    )
    what = f"{CONCURRENT} concurrent conversations (async)"
    return [
        Row(
            f"{what}, throughput",
            fmt_rate(rate["agent"], "turns"),
            f"raw `graph.ainvoke` {fmt_rate(rate['raw'], 'turns')}",
            ratio(rate["agent"], rate["raw"]),
        ),
        Row(
            f"{what}, median turn latency",
            fmt_time(latency["agent"]),
            f"raw `graph.ainvoke` {fmt_time(latency['raw'])}",
            ratio(latency["agent"], latency["raw"]),
        ),
    ]


def run(url: str, quick: bool) -> list[Row]:
    with fresh_database(url, "bench_agent") as db:
        rows = turns(db, conversations=5 if quick else 12)
        rows += asyncio.run(concurrent(db, rounds=4 if quick else 6, count=3 if quick else 10))
    return rows


if __name__ == "__main__":
    standalone(run, __doc__)
