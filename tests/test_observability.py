"""Metrics (Prometheus), traces (OpenTelemetry) and structured logs, on real backends.

Each test enables metrics on its own ``CollectorRegistry`` and traces on its own SDK
``TracerProvider`` with an in-memory exporter, drives the managers and an agent on memory,
SQLite and PostgreSQL (sync and async), and reads back what was recorded. Nothing is
recorded, imported or registered until enabled.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from langchain_core.messages import AIMessage
from langgraph.graph import END, START, MessagesState, StateGraph
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from test_lifecycle import Manager, drop_postgres_tables

from bssagent import AgentSessionManager, AsyncAgentSessionManager, BaseAgent
from bssagent import observability as observe

pytestmark = pytest.mark.timeout(60)
MANAGERS = {"sync": AgentSessionManager, "async": AsyncAgentSessionManager}


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    fresh = CollectorRegistry()
    observe.enable_metrics(fresh)
    try:
        yield fresh
    finally:
        observe.disable()


@pytest.fixture
def spans() -> Iterator[Callable[[], list[ReadableSpan]]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observe.enable_tracing(provider)
    try:
        yield lambda: list(exporter.get_finished_spans())
    finally:
        observe.disable()


@pytest.fixture(params=list(MANAGERS))
async def mgr(request: pytest.FixtureRequest, backend_url: str, table_name: str) -> Any:
    namespace = f"obs-{uuid.uuid4().hex[:6]}"
    manager = Manager(
        MANAGERS[request.param](
            database_url=backend_url, table_name=table_name, namespace=namespace
        )
    )
    try:
        yield manager
    finally:
        await manager.close()
        if backend_url.startswith("postgresql"):
            drop_postgres_tables(backend_url, table_name)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


class Echo(BaseAgent):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("echo", **kwargs)

    def define_graph(self) -> StateGraph[Any]:
        def reply(state: MessagesState) -> dict[str, Any]:
            if state["messages"][-1].text == "fail":
                raise RuntimeError("the node failed")
            return {"messages": [AIMessage("ok")]}

        graph = StateGraph(MessagesState)
        graph.add_node("reply", reply)
        graph.add_edge(START, "reply")
        graph.add_edge("reply", END)
        return graph


# -- metrics -----------------------------------------------------------------------------------


async def test_session_metrics(mgr: Manager, registry: CollectorRegistry) -> None:
    ns = mgr.namespace
    first = await mgr.get_or_create_user_session("alice")  # miss, created
    await mgr.get_or_create_user_session("alice")  # hit
    await mgr.get_or_create_user_session("alice")  # hit
    await mgr.create_user_session("alice")
    await mgr.create_child_session("alice", first.thread_id)
    await mgr.end_session("alice", first.thread_id, status="failed")
    await mgr.end_session("alice")
    await mgr.get_or_create_user_session("bob")
    await mgr.pause_session("bob")  # not an ending
    assert await mgr.cleanup_inactive_sessions(0) == 1  # bob's (the child ended with its parent)

    lookups = "bssagent_get_or_create_seconds_count"
    assert value(registry, lookups, namespace=ns, cache="hit") == 2
    assert value(registry, lookups, namespace=ns, cache="miss") == 2
    assert value(registry, "bssagent_sessions_created_total", namespace=ns) == 4
    ended = "bssagent_sessions_ended_total"
    assert value(registry, ended, namespace=ns, status="failed") == 1
    assert value(registry, ended, namespace=ns, status="completed") == 1
    assert value(registry, "bssagent_sessions_expired_total", namespace=ns) == 1
    maintenance = "bssagent_maintenance_total"
    assert value(registry, maintenance, namespace=ns, task="expired") == 1


async def test_run_metrics_and_no_ids_in_labels(mgr: Manager, registry: CollectorRegistry) -> None:
    agent = Echo(session_manager=mgr.manager)
    try:
        await mgr.run(agent, "hello", user_id="alice")
        await mgr.run(agent, "again", user_id="alice")
        with pytest.raises(RuntimeError):
            await mgr.run(agent, "fail", user_id="alice")
    finally:
        await mgr.close_agent(agent)
    assert value(registry, "bssagent_runs_total", agent="echo", outcome="ok") == 2
    assert value(registry, "bssagent_runs_total", agent="echo", outcome="error") == 1
    assert value(registry, "bssagent_run_seconds_count", agent="echo") == 3
    assert value(registry, "bssagent_run_lock_wait_seconds_count", agent="echo") == 3
    thread = (await mgr.get_current_user_session("alice")).thread_id
    for family in registry.collect():
        assert family.name.startswith("bssagent_")
        for sample in family.samples:
            assert set(sample.labels) <= {"namespace", "cache", "status", "agent", "outcome",
                                          "component", "to", "task", "le"}  # fmt: skip
            assert "alice" not in sample.labels.values()
            assert thread not in sample.labels.values()


async def test_degraded_gauge_and_transitions(registry: CollectorRegistry) -> None:
    with AgentSessionManager(database_url="postgresql://postgres@127.0.0.1:1/x") as down:
        down.get_or_create_user_session("alice")
        assert down.is_degraded
    gauge = "bssagent_degraded"
    assert value(registry, gauge, component="sessions") == 1
    transitions = "bssagent_degraded_transitions_total"
    assert value(registry, transitions, component="sessions", to="degraded") == 1


def test_nothing_is_recorded_until_enabled(tmp_path: Any) -> None:
    observe.disable()
    unused = CollectorRegistry()
    with AgentSessionManager(database_url=f"sqlite:///{tmp_path / 'x.db'}") as m:
        m.get_or_create_user_session("alice")
    assert list(unused.collect()) == []
    assert observe._metrics is None
    assert observe._tracer is None


# -- traces ------------------------------------------------------------------------------------


async def test_spans_for_session_resolution_and_runs(
    mgr: Manager, spans: Callable[[], list[ReadableSpan]]
) -> None:
    agent = Echo(session_manager=mgr.manager)
    try:
        await mgr.run(agent, "hello", user_id="alice")
        with pytest.raises(RuntimeError):
            await mgr.run(agent, "fail", user_id="alice")
        await mgr.get_or_create_user_session("alice")  # a cache hit: no span
    finally:
        await mgr.close_agent(agent)
    found = spans()
    resolutions = [s for s in found if s.name == "bssagent.get_or_create_user_session"]
    runs = [s for s in found if s.name == "bssagent.agent.run"]
    assert len(resolutions) == 1
    assert resolutions[0].attributes["bssagent.created"] is True
    assert resolutions[0].attributes["bssagent.namespace"] == mgr.namespace
    assert [r.attributes["bssagent.outcome"] for r in runs] == ["ok", "error"]
    assert runs[1].attributes["bssagent.error"] == "RuntimeError"
    assert runs[0].attributes["bssagent.agent"] == "echo"
    assert runs[0].attributes["bssagent.method"] == ("ainvoke" if mgr.is_async else "invoke")
    assert runs[0].attributes["bssagent.backend"] == mgr.backend
    for span in found:  # ids are opt-in, and user ids never recorded
        assert "bssagent.thread_id" not in span.attributes
        assert "alice" not in [str(v) for v in span.attributes.values()]


def test_thread_ids_on_spans_only_when_asked(tmp_path: Any) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observe.enable_tracing(provider, record_thread_ids=True)
    try:
        with (
            AgentSessionManager(database_url=f"sqlite:///{tmp_path / 'x.db'}") as m,
            Echo(session_manager=m) as agent,
        ):
            agent.invoke({"messages": ["hi"]}, user_id="alice")
            list(agent.stream({"messages": ["hi"]}, user_id="alice"))
            thread = m.get_current_user_session("alice").thread_id
    finally:
        observe.disable()
    runs = [s for s in exporter.get_finished_spans() if s.name == "bssagent.agent.run"]
    assert [r.attributes["bssagent.method"] for r in runs] == ["invoke", "stream"]
    assert {r.attributes["bssagent.thread_id"] for r in runs} == {thread}


# -- logs --------------------------------------------------------------------------------------


def test_degraded_logs_are_structured_and_carry_no_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = "postgresql://app:s3cret-pw@127.0.0.1:1/x"
    with (
        caplog.at_level(logging.WARNING, logger="bssagent"),
        AgentSessionManager(database_url=url) as down,
    ):
        down.get_or_create_user_session("alice")
    records = [r for r in caplog.records if getattr(r, "bssagent_event", None) == "degraded"]
    assert len(records) == 1
    record = records[0]
    assert record.name.startswith("bssagent")
    assert record.bssagent_component == "sessions"  # type: ignore[attr-defined]
    assert record.bssagent_reason == "OperationalError"  # type: ignore[attr-defined]
    assert "s3cret" not in record.bssagent_location  # type: ignore[attr-defined]
    for r in caplog.records:
        assert "s3cret" not in r.getMessage()
        assert "s3cret" not in str(vars(r))
