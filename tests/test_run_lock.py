"""Runs on one thread never interleave: the lost-update reproduction, for real.

The graph reads a counter from the thread's state, sleeps a few milliseconds and writes
counter + 1. Two unserialized runs fork from the same checkpoint and one increment is lost
(shown first, on plain LangGraph). Through ``BaseAgent`` every run is serialized, across
processes on PostgreSQL (advisory lock) and across threads / tasks everywhere else:

* ``enqueue``: every run waits its turn, so N runs add exactly N;
* ``reject``: a run that finds the thread busy raises ``ThreadBusyError`` and writes
  nothing, so the counter equals the number of successful runs exactly.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from typing_extensions import TypedDict

from bssagent import BaseAgent, Settings, ThreadBusyError

BARRIER_TIMEOUT = 60.0
RESULT_TIMEOUT = 90.0
NODE_DELAY = 0.01


class CounterState(TypedDict, total=False):
    counter: int


def counter_graph(delay: float) -> StateGraph[Any]:
    def bump(state: CounterState) -> dict[str, Any]:
        value = state.get("counter", 0)
        time.sleep(delay)  # widen the read-modify-write window
        return {"counter": value + 1}

    graph = StateGraph(CounterState)
    graph.add_node("bump", bump)
    graph.add_edge(START, "bump")
    graph.add_edge("bump", END)
    return graph


class CounterAgent(BaseAgent):
    def __init__(self, delay: float = NODE_DELAY, **kwargs: Any) -> None:
        self.delay = delay
        super().__init__("counter", "counts its runs", **kwargs)

    def define_graph(self) -> StateGraph[Any]:
        return counter_graph(self.delay)


def config(thread_id: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread_id}}


def purge_pg_thread(url: str, thread_id: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('checkpoints')").fetchone()[0]:
            for table in ("checkpoints", "checkpoint_blobs", "checkpoint_writes"):
                conn.execute(f"DELETE FROM {table} WHERE thread_id = %s", (thread_id,))


# -- worker processes -----------------------------------------------------------------------
#
# One module-wide pool of spawned processes (fresh interpreters, as separate application
# processes would be) serves every cross-process test, so the interpreters start once.
# Each task blocks on a barrier shared at start-up, which also forces every task of a batch
# onto its own process.

POOL_SIZE = 8
_BARRIERS: dict[int, Any] = {}


def _init_worker(barrier4: Any, barrier8: Any) -> None:
    _BARRIERS.update({4: barrier4, 8: barrier8})


def _warm_up() -> int:
    import os

    _BARRIERS[POOL_SIZE].wait(BARRIER_TIMEOUT)
    return os.getpid()


def _guarded(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return work()
    except BaseException:
        return {"fatal": traceback.format_exc()}


def _counter_worker(
    url: str, table: str, thread_id: str, runs: int, strategy: str, delay: float
) -> dict[str, Any]:
    import os

    def work() -> dict[str, Any]:
        agent = CounterAgent(
            delay,
            settings=Settings(database_url=url, table_name=table),
            run_strategy=strategy,  # type: ignore[arg-type]
        )
        agent.get_state(config(thread_id))  # open the saver before the start line
        _BARRIERS[4].wait(BARRIER_TIMEOUT)
        ok = busy = 0
        errors: list[str] = []
        for _ in range(runs):
            try:
                agent.invoke({}, config(thread_id))
            except ThreadBusyError:
                busy += 1
            except Exception:
                errors.append(traceback.format_exc())
            else:
                ok += 1
        degraded = agent.is_degraded
        agent.close()
        return {"ok": ok, "busy": busy, "errors": errors, "degraded": degraded}

    return {**_guarded(work), "pid": os.getpid()}


def _first_turn_worker(url: str, table: str, index: int) -> dict[str, Any]:
    import os

    def work() -> dict[str, Any]:
        from bssagent.agent import OfflineChatModel
        from bssagent.demo import ChatAgent

        _BARRIERS[8].wait(BARRIER_TIMEOUT)
        agent = ChatAgent(OfflineChatModel(), settings=Settings(database_url=url, table_name=table))
        try:
            result = agent.invoke({"messages": [f"hello from {index}"]}, user_id=f"user-{index}")
            thread = agent.resolve_config(user_id=f"user-{index}")["configurable"]["thread_id"]
            return {
                "reply": result["messages"][-1].text,
                "thread_id": thread,
                "degraded": agent.is_degraded,
            }
        finally:
            agent.close()

    return {**_guarded(work), "pid": os.getpid()}


@pytest.fixture(scope="module")
def processes() -> Iterator[ProcessPoolExecutor]:
    ctx = mp.get_context("spawn")
    pool = ProcessPoolExecutor(
        POOL_SIZE,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(ctx.Barrier(4), ctx.Barrier(POOL_SIZE)),
    )
    try:
        pids = [pool.submit(_warm_up) for _ in range(POOL_SIZE)]
        assert len({f.result(timeout=RESULT_TIMEOUT) for f in pids}) == POOL_SIZE
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_batch(
    pool: ProcessPoolExecutor, target: Callable[..., dict[str, Any]], args: list[tuple[Any, ...]]
) -> list[dict[str, Any]]:
    """Run ``target(*args)`` once per tuple, each in its own process, released together."""
    futures = [pool.submit(target, *a) for a in args]
    reports = [f.result(timeout=RESULT_TIMEOUT) for f in futures]
    fatal = [r["fatal"] for r in reports if "fatal" in r]
    assert not fatal, "a worker crashed:\n" + "\n".join(fatal)
    assert len({r["pid"] for r in reports}) == len(args), "two tasks shared a process"
    return reports


# -- the reproduction: plain LangGraph loses updates ----------------------------------------


def test_unserialized_langgraph_runs_lose_updates() -> None:
    """The control: without bssagent, concurrent runs on one thread lose increments."""
    graph = counter_graph(NODE_DELAY).compile(checkpointer=InMemorySaver())
    cfg = config(str(uuid.uuid4()))
    barrier = threading.Barrier(8)

    def body(_: int) -> None:
        barrier.wait(30)
        for _ in range(5):
            graph.invoke({}, cfg)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(body, range(8)))
    final = graph.get_state(cfg).values["counter"]
    assert final < 40, "the unserialized control run lost nothing: the test proves nothing"


# -- across processes on PostgreSQL ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_four_processes_enqueue_lose_nothing(
    processes: ProcessPoolExecutor, pg_url: str, table_name: str
) -> None:
    thread = str(uuid.uuid4())
    try:
        reports = run_batch(
            processes,
            _counter_worker,
            [(pg_url, table_name, thread, 10, "enqueue", NODE_DELAY) for _ in range(4)],
        )
        errors = [e for r in reports for e in r["errors"]]
        assert not errors, errors[0]
        assert not any(r["degraded"] for r in reports)
        assert [r["ok"] for r in reports] == [10] * 4
        with CounterAgent(settings=Settings(database_url=pg_url, table_name=table_name)) as a:
            state = a.get_state(config(thread))
            assert state.values["counter"] == 40
            # 40 runs, each its own chain link: 3 checkpoints per run (input, start, bump).
            assert len(a.get_state_history(config(thread))) == 3 * 40
    finally:
        purge_pg_thread(pg_url, thread)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_four_processes_reject_count_exactly_the_successful_runs(
    processes: ProcessPoolExecutor, pg_url: str, table_name: str
) -> None:
    thread = str(uuid.uuid4())
    try:
        reports = run_batch(
            processes,
            _counter_worker,
            [(pg_url, table_name, thread, 10, "reject", 0.03) for _ in range(4)],
        )
        errors = [e for r in reports for e in r["errors"]]
        assert not errors, errors[0]
        assert not any(r["degraded"] for r in reports)
        ok = sum(r["ok"] for r in reports)
        busy = sum(r["busy"] for r in reports)
        assert ok + busy == 40
        assert busy > 0, "no run was ever rejected: the processes did not overlap"
        assert ok > 0
        with CounterAgent(settings=Settings(database_url=pg_url, table_name=table_name)) as a:
            assert a.get_state(config(thread)).values["counter"] == ok
    finally:
        purge_pg_thread(pg_url, thread)


# -- in one process: threads and asyncio tasks ----------------------------------------------


class CounterMaker:
    """Builds counter agents on one backend; closes them and purges their PostgreSQL rows."""

    def __init__(self, url: str, table: str, tmp_path: Path) -> None:
        self.url, self.table, self.tmp_path = url, table, tmp_path
        self.agents: list[CounterAgent] = []
        self.threads: list[str] = []

    def __call__(
        self, strategy: str = "enqueue", delay: float = NODE_DELAY
    ) -> tuple[CounterAgent, str]:
        agent = CounterAgent(
            delay,
            settings=Settings(
                database_url=self.url, table_name=self.table, sqlite_path=self.tmp_path / "d.db"
            ),
            run_strategy=strategy,  # type: ignore[arg-type]
        )
        self.agents.append(agent)
        return agent, self.new_thread()

    def new_thread(self) -> str:
        thread = str(uuid.uuid4())
        self.threads.append(thread)
        return thread


@pytest.fixture
def counter_agent(backend_url: str, table_name: str, tmp_path: Path) -> Iterator[CounterMaker]:
    maker = CounterMaker(backend_url, table_name, tmp_path)
    yield maker
    for agent in maker.agents:
        agent.close()
    if backend_url.startswith("postgresql"):
        for thread in maker.threads:
            purge_pg_thread(backend_url, thread)


def run_threads(agent: CounterAgent, thread: str, workers: int, runs: int) -> tuple[int, int]:
    barrier = threading.Barrier(workers)
    counts = {"ok": 0, "busy": 0}
    lock = threading.Lock()

    def body(_: int) -> None:
        barrier.wait(30)
        for _ in range(runs):
            try:
                agent.invoke({}, config(thread))
            except ThreadBusyError:
                key = "busy"
            else:
                key = "ok"
            with lock:
                counts[key] += 1

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(body, range(workers)))
    return counts["ok"], counts["busy"]


async def run_tasks(agent: CounterAgent, thread: str, workers: int, runs: int) -> tuple[int, int]:
    start = asyncio.Event()
    counts = {"ok": 0, "busy": 0}

    async def body() -> None:
        await start.wait()
        for _ in range(runs):
            try:
                await agent.ainvoke({}, config(thread))
            except ThreadBusyError:
                counts["busy"] += 1
            else:
                counts["ok"] += 1

    tasks = [asyncio.create_task(body()) for _ in range(workers)]
    await asyncio.sleep(0)
    start.set()
    await asyncio.gather(*tasks)
    return counts["ok"], counts["busy"]


@pytest.mark.timeout(60)
def test_threads_enqueue_lose_nothing(counter_agent: CounterMaker) -> None:
    agent, thread = counter_agent("enqueue")
    ok, busy = run_threads(agent, thread, workers=8, runs=5)
    assert (ok, busy) == (40, 0)
    assert agent.get_state(config(thread)).values["counter"] == 40


@pytest.mark.timeout(60)
def test_threads_reject_count_exactly_the_successful_runs(counter_agent: CounterMaker) -> None:
    agent, thread = counter_agent("reject", delay=0.03)
    ok, busy = run_threads(agent, thread, workers=8, runs=5)
    assert ok + busy == 40
    assert busy > 0, "no run was rejected: the threads did not overlap"
    assert agent.get_state(config(thread)).values["counter"] == ok


@pytest.mark.timeout(60)
async def test_tasks_enqueue_lose_nothing(counter_agent: CounterMaker) -> None:
    agent, thread = counter_agent("enqueue")
    try:
        ok, busy = await run_tasks(agent, thread, workers=8, runs=5)
        assert (ok, busy) == (40, 0)
        assert (await agent.aget_state(config(thread))).values["counter"] == 40
    finally:
        await agent.aclose()


@pytest.mark.timeout(60)
async def test_tasks_reject_count_exactly_the_successful_runs(counter_agent: CounterMaker) -> None:
    agent, thread = counter_agent("reject", delay=0.03)
    try:
        ok, busy = await run_tasks(agent, thread, workers=8, runs=5)
        assert ok + busy == 40
        assert busy > 0, "no run was rejected: the tasks did not overlap"
        assert (await agent.aget_state(config(thread))).values["counter"] == ok
    finally:
        await agent.aclose()


@pytest.mark.timeout(60)
async def test_sync_and_async_runs_share_one_lock(counter_agent: CounterMaker) -> None:
    """A thread running invoke and tasks running ainvoke still never interleave."""
    agent, thread = counter_agent("enqueue")
    try:
        sync_side = asyncio.to_thread(run_threads, agent, thread, 4, 5)
        async_side = run_tasks(agent, thread, workers=4, runs=5)
        (ok_sync, _), (ok_async, _) = await asyncio.gather(sync_side, async_side)
        assert ok_sync + ok_async == 40
        assert (await agent.aget_state(config(thread))).values["counter"] == 40
    finally:
        await agent.aclose()


class GatedCounterAgent(BaseAgent):
    """A counter whose node waits at a gate, to hold its thread busy for as long as needed."""

    def __init__(self, **kwargs: Any) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gated_threads: set[str] = set()
        super().__init__("gated-counter", **kwargs)

    def define_graph(self) -> StateGraph[Any]:
        def bump(state: CounterState, config: RunnableConfig) -> dict[str, Any]:
            if config["configurable"]["thread_id"] in self.gated_threads:
                self.entered.set()
                assert self.gate.wait(30)
            return {"counter": state.get("counter", 0) + 1}

        graph = StateGraph(CounterState)
        graph.add_node("bump", bump)
        graph.add_edge(START, "bump")
        graph.add_edge("bump", END)
        return graph


@pytest.fixture
def gated(counter_agent: CounterMaker) -> Iterator[tuple[GatedCounterAgent, str]]:
    m = counter_agent
    agent = GatedCounterAgent(
        settings=Settings(database_url=m.url, table_name=m.table, sqlite_path=m.tmp_path / "d.db")
    )
    try:
        yield agent, m.new_thread()
    finally:
        agent.gate.set()
        agent.close()


def hold_thread(agent: GatedCounterAgent, thread: str) -> threading.Thread:
    """Start a run on ``thread`` and return once it is inside its node (holding the lock)."""
    agent.gated_threads.add(thread)
    holder = threading.Thread(target=agent.invoke, args=({}, config(thread)))
    holder.start()
    assert agent.entered.wait(30)
    return holder


@pytest.mark.timeout(60)
def test_per_call_strategy_overrides_the_agents(gated: tuple[GatedCounterAgent, str]) -> None:
    agent, thread = gated  # the agent's own strategy is "enqueue"
    holder = hold_thread(agent, thread)
    with pytest.raises(ThreadBusyError, match="already in progress"):
        agent.invoke({}, config(thread), run_strategy="reject")
    with pytest.raises(ThreadBusyError):
        list(agent.stream({}, config(thread), run_strategy="reject"))
    with pytest.raises(ThreadBusyError):
        agent.update_state({"counter": 100}, config(thread), run_strategy="reject")
    agent.gate.set()
    holder.join(30)
    # Only the holder's run wrote anything.
    assert agent.get_state(config(thread)).values["counter"] == 1
    # Once free, the same call goes through.
    assert agent.invoke({}, config(thread), run_strategy="reject")["counter"] == 2


@pytest.mark.timeout(60)
async def test_async_reject_while_a_sync_run_holds_the_thread(
    gated: tuple[GatedCounterAgent, str],
) -> None:
    agent, thread = gated
    holder = await asyncio.to_thread(hold_thread, agent, thread)
    try:
        with pytest.raises(ThreadBusyError):
            await agent.ainvoke({}, config(thread), run_strategy="reject")
        with pytest.raises(ThreadBusyError):
            async for _ in agent.astream({}, config(thread), run_strategy="reject"):
                pass
        agent.gate.set()
        await asyncio.to_thread(holder.join, 30)
        assert (await agent.aget_state(config(thread))).values["counter"] == 1
    finally:
        agent.gate.set()
        await agent.aclose()


@pytest.mark.timeout(60)
def test_enqueue_gives_up_after_run_timeout(counter_agent: CounterMaker) -> None:
    m = counter_agent
    agent = GatedCounterAgent(
        settings=Settings(database_url=m.url, table_name=m.table, sqlite_path=m.tmp_path / "d.db"),
        run_timeout=0.3,
    )
    thread = m.new_thread()
    try:
        holder = hold_thread(agent, thread)
        t0 = time.monotonic()
        with pytest.raises(ThreadBusyError, match="stayed busy"):
            agent.invoke({}, config(thread))
        assert 0.25 <= time.monotonic() - t0 < 10
        agent.gate.set()
        holder.join(30)
        assert agent.get_state(config(thread)).values["counter"] == 1
    finally:
        agent.gate.set()
        agent.close()


@pytest.mark.timeout(60)
def test_different_threads_run_in_parallel(
    gated: tuple[GatedCounterAgent, str], counter_agent: CounterMaker
) -> None:
    """The lock is per thread: while thread A is busy, thread B runs on the same agent."""
    agent, thread_a = gated
    thread_b = counter_agent.new_thread()
    holder = hold_thread(agent, thread_a)
    try:
        assert agent.invoke({}, config(thread_b), run_strategy="reject")["counter"] == 1
        assert holder.is_alive()  # B completed while A was still parked inside its node
        with pytest.raises(ThreadBusyError):
            agent.invoke({}, config(thread_a), run_strategy="reject")
    finally:
        agent.gate.set()
        holder.join(30)
    assert agent.get_state(config(thread_a)).values["counter"] == 1


# -- first run on a brand-new database: LangGraph's setup under bssagent's lock -------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_eight_processes_start_on_an_empty_database(
    processes: ProcessPoolExecutor, fresh_database: str
) -> None:
    reports = run_batch(
        processes, _first_turn_worker, [(fresh_database, "user_sessions", i) for i in range(8)]
    )
    assert not any(r["degraded"] for r in reports), "a worker fell back to memory"
    for i, r in enumerate(reports):
        assert r["reply"] == (
            f"[offline model] You said: 'hello from {i}'. This is turn 1 of our conversation."
        )
    threads = {r["thread_id"] for r in reports}
    assert len(threads) == 8
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        versions = [r[0] for r in conn.execute("SELECT v FROM checkpoint_migrations ORDER BY v")]
        assert versions == sorted(set(versions)), "a LangGraph migration ran twice"
        assert versions == list(range(len(versions)))
        stored = {
            r[0]: r[1]
            for r in conn.execute(
                "SELECT thread_id, count(*) FROM checkpoints GROUP BY thread_id"
            ).fetchall()
        }
        assert set(stored) == threads
        sessions = conn.execute("SELECT user_id, thread_id FROM user_sessions").fetchall()
        assert {t for _, t in sessions} == threads
        assert len(sessions) == 8
