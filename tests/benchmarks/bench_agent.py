"""Benchmark: per-turn cost of ``agent.invoke(..., user_id=...)`` against raw LangGraph.

    BSSAGENT_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test \\
        .venv/bin/python tests/benchmarks/bench_agent.py [--backend postgres|sqlite]

Both sides run the same trivial one-node graph on the same LangGraph saver (the agent's
own), side by side in one process, alternating turn by turn. The raw side is
``graph.invoke(input, {"configurable": {"thread_id": ...}})``; the agent side adds session
resolution (a cache hit after the first turn) and the per-thread run lock. Printed: median
milliseconds per turn at turns 1, 10 and 100 over several threads, and the overhead ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage
from langgraph.graph import END, START, MessagesState, StateGraph

from bssagent import AgentSessionManager, BaseAgent, Settings

TURNS = (1, 10, 100)
THREADS = 5


def reply(state: MessagesState) -> dict[str, Any]:
    return {"messages": [AIMessage(f"ok {len(state['messages'])}")]}


class Echo(BaseAgent):
    def define_graph(self) -> StateGraph[Any]:
        graph = StateGraph(MessagesState)
        graph.add_node("reply", reply)
        graph.add_edge(START, "reply")
        graph.add_edge("reply", END)
        return graph


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["postgres", "sqlite"], default="postgres")
    args = parser.parse_args()
    table = f"bench_{uuid.uuid4().hex[:8]}"
    if args.backend == "postgres":
        url = os.environ.get(
            "BSSAGENT_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
        )
        settings = Settings(database_url=url, table_name=table)
    else:
        path = Path(tempfile.mkdtemp()) / "bench.db"
        settings = Settings(sqlite_path=path, table_name=table)

    with (
        AgentSessionManager(settings=settings) as sessions,
        Echo("bench", session_manager=sessions) as agent,
    ):
        raw = agent.graph.copy(update={"checkpointer": agent._persistence.sync()})
        timings: dict[str, dict[int, list[float]]] = {"raw": {}, "agent": {}}
        for n in range(THREADS):
            raw_cfg = {"configurable": {"thread_id": str(uuid.uuid4())}}
            user = f"bench-user-{n}-{uuid.uuid4().hex[:6]}"
            for turn in range(1, max(TURNS) + 1):
                start = time.perf_counter()
                raw.invoke({"messages": [f"hi {turn}"]}, raw_cfg)
                middle = time.perf_counter()
                agent.invoke({"messages": [f"hi {turn}"]}, user_id=user)
                end = time.perf_counter()
                if turn in TURNS:
                    timings["raw"].setdefault(turn, []).append(middle - start)
                    timings["agent"].setdefault(turn, []).append(end - middle)
    print(f"backend: {args.backend}; median of {THREADS} threads; same saver on both sides")
    print(f"{'turn':>5}{'raw LangGraph ms':>18}{'agent.invoke ms':>18}{'ratio':>8}")
    for turn in TURNS:
        raw_ms = statistics.median(timings["raw"][turn]) * 1000
        agent_ms = statistics.median(timings["agent"][turn]) * 1000
        print(f"{turn:>5}{raw_ms:>18.2f}{agent_ms:>18.2f}{agent_ms / raw_ms:>7.2f}x")
    if args.backend == "postgres":
        import psycopg

        with psycopg.connect(settings.database_url.get_secret_value(), autocommit=True) as conn:
            for suffix in ("", "_stats", "_events", "_tombstones"):
                conn.execute(f'DROP TABLE IF EXISTS "{table}{suffix}" CASCADE')
            for op in ("insert", "update", "delete"):
                conn.execute(f'DROP FUNCTION IF EXISTS "{table}_track_{op}"()')
            conn.execute("DELETE FROM bssagent_migrations WHERE target = %s", (table,))


if __name__ == "__main__":
    main()
