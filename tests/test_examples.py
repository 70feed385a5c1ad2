"""The examples, the FastAPI app, the demo command and the SSE helper, run for real.

Every program runs in a fresh process in a temporary working directory (so the default
SQLite file lands there), without provider keys (so the offline model answers), on SQLite,
on PostgreSQL and with an unreachable PostgreSQL URL.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from langgraph.graph import END, START, MessagesState, StateGraph

from bssagent import BaseAgent, Settings
from bssagent.agent import OfflineChatModel
from bssagent.agent.sse import format_sse, stream_sse

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/x"
THREAD_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}"
PROCESS_TIMEOUT = 60


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without bssagent settings or provider keys, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BSSAGENT_")
        and k not in ("DATABASE_URL", "GOOGLE_API_KEY", "OPENAI_API_KEY")
    }
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=PROCESS_TIMEOUT
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def purge_pg(url: str, threads: list[str]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        if threads and conn.execute("SELECT to_regclass('checkpoints')").fetchone()[0]:
            for t in ("checkpoints", "checkpoint_blobs", "checkpoint_writes"):
                conn.execute(f"DELETE FROM {t} WHERE thread_id = ANY(%s)", (threads,))


@pytest.fixture
def pg_threads(pg_url: str) -> Iterator[list[str]]:
    """Thread ids whose LangGraph rows are deleted from the test database afterwards."""
    threads: list[str] = []
    yield threads
    purge_pg(pg_url, threads)


# -- examples/seed_example.py ---------------------------------------------------------------


def run_seed(tmp_path: Path, env: dict[str, str]) -> tuple[str, str]:
    """Run the seed example; return its output and the session's thread id."""
    proc = run([sys.executable, str(EXAMPLES / "seed_example.py")], tmp_path, env)
    out = proc.stdout
    assert "Chat model: the offline model" in out
    lines = {line.split(":", 1)[0]: line for line in out.splitlines() if ":" in line}
    assert lines["Active sessions"].startswith("Active sessions: [")
    assert "user_id='123'" in lines["Active sessions"]
    assert lines["Agent response"].startswith("Agent response: {'messages': [")
    assert "Hello, how can I help you today?" in lines["Agent response"]
    updated = lines["Updated session"]
    assert "title='Updated Chat Session'" in updated
    assert "user_id='123'" in updated
    assert "is_active=True" in updated
    threads = set(re.findall(r"thread_id='(" + THREAD_RE + ")'", out))
    assert len(threads) == 1, f"one thread expected in the output, got {threads}"
    return out, threads.pop()


@pytest.mark.timeout(120)
def test_seed_example_twice_on_sqlite(tmp_path: Path) -> None:
    env = clean_env()
    first, thread = run_seed(tmp_path, env)
    assert "This is turn 1 of our conversation." in first
    assert "title='My First Chat'" in first.split("Agent response")[0]
    assert (tmp_path / ".bssagent" / "bssagent.db").is_file()

    second, thread_again = run_seed(tmp_path, env)
    assert thread_again == thread
    assert "This is turn 2 of our conversation." in second
    # The title the first run set is what the second run finds.
    assert "title='Updated Chat Session'" in second.split("Agent response")[0]


@pytest.mark.timeout(120)
def test_seed_example_twice_on_postgres(
    tmp_path: Path, pg_url: str, table_name: str, pg_threads: list[str]
) -> None:
    env = clean_env(BSSAGENT_DATABASE_URL=pg_url, BSSAGENT_TABLE_NAME=table_name)
    first, thread = run_seed(tmp_path, env)
    pg_threads.append(thread)
    assert "This is turn 1 of our conversation." in first
    assert not (tmp_path / ".bssagent").exists(), "PostgreSQL run wrote the SQLite file"

    second, thread_again = run_seed(tmp_path, env)
    assert thread_again == thread
    assert "This is turn 2 of our conversation." in second
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            f'SELECT user_id, title, is_active FROM "{table_name}" WHERE thread_id = %s',
            (thread,),
        ).fetchone()
        assert row == ("123", "Updated Chat Session", True)
        assert conn.execute(
            "SELECT count(*) FROM checkpoints WHERE thread_id = %s", (thread,)
        ).fetchone()[0]


@pytest.mark.timeout(60)
def test_seed_example_with_an_unreachable_database(tmp_path: Path) -> None:
    env = clean_env(BSSAGENT_DATABASE_URL=UNREACHABLE)
    proc = run([sys.executable, str(EXAMPLES / "seed_example.py")], tmp_path, env)
    assert "This is turn 1 of our conversation." in proc.stdout
    assert "title='Updated Chat Session'" in proc.stdout
    assert "storage unavailable" in proc.stderr
    assert "127.0.0.1:1" in proc.stderr  # the warning names the (password-free) location


# -- examples/async_example.py --------------------------------------------------------------


def check_async_example(out: str) -> list[str]:
    threads = []
    for i in range(4):
        user = f"async-user-{i}"
        assert f"[{user}] [offline model] You said: 'hello from user {i}'. This is turn 1" in out
        assert f"[{user}] [offline model] You said: 'and a second message'. This is turn 2" in (out)
        match = re.search(rf"^{user}: thread ({THREAD_RE}), 4 messages$", out, re.MULTILINE)
        assert match, f"no summary line for {user}:\n{out}"
        threads.append(match.group(1))
    assert len(set(threads)) == 4
    return threads


@pytest.mark.timeout(60)
def test_async_example_on_sqlite(tmp_path: Path) -> None:
    proc = run([sys.executable, str(EXAMPLES / "async_example.py")], tmp_path, clean_env())
    check_async_example(proc.stdout)
    assert (tmp_path / ".bssagent" / "bssagent.db").is_file()


@pytest.mark.timeout(60)
def test_async_example_on_postgres(
    tmp_path: Path, pg_url: str, table_name: str, pg_threads: list[str]
) -> None:
    env = clean_env(BSSAGENT_DATABASE_URL=pg_url, BSSAGENT_TABLE_NAME=table_name)
    proc = run([sys.executable, str(EXAMPLES / "async_example.py")], tmp_path, env)
    threads = check_async_example(proc.stdout)
    pg_threads.extend(threads)
    with psycopg.connect(pg_url) as conn:
        stored = conn.execute(f'SELECT user_id, thread_id FROM "{table_name}"').fetchall()
    assert sorted(t for _, t in stored) == sorted(threads)


# -- examples/memory_example.py -------------------------------------------------------------


def check_memory_example(out: str) -> list[str]:
    """The preference told in alice's first session reaches her second one, not bob's."""
    said = re.findall(rf"^\[(\w+) @ ({THREAD_RE})\] (.*)$", out, re.MULTILINE)
    assert [(user, text) for user, _, text in said] == [
        ("alice", "Hi! Remember that my favourite city is Lisbon."),
        ("alice", "What do you know about me?"),
        ("bob", "What do you know about me?"),
    ]
    assert said[0][1] != said[1][1], "alice's second question must be in a new session"
    replies = re.findall(r"^  agent: (.*)$", out, re.MULTILINE)
    assert replies[1].endswith(
        "[What you know about this user: favourite city = Lisbon; language = Portuguese.]"
    )
    assert replies[2].endswith("[What you know about this user: nothing yet.]")
    assert "alice's preferences: {'language': 'Portuguese'}" in out
    assert "bob's preferences: {}" in out
    return [thread for _, thread, _ in said]


@pytest.mark.timeout(120)
def test_memory_example_on_sqlite_twice(tmp_path: Path) -> None:
    for _ in range(2):  # the second run starts from the first run's database
        proc = run([sys.executable, str(EXAMPLES / "memory_example.py")], tmp_path, clean_env())
        check_memory_example(proc.stdout)


@pytest.mark.timeout(120)
def test_memory_example_on_postgres(
    tmp_path: Path, pg_url: str, table_name: str, pg_threads: list[str]
) -> None:
    env = clean_env(BSSAGENT_DATABASE_URL=pg_url, BSSAGENT_TABLE_NAME=table_name)
    proc = run([sys.executable, str(EXAMPLES / "memory_example.py")], tmp_path, env)
    pg_threads.extend(check_memory_example(proc.stdout))
    with psycopg.connect(pg_url) as conn:
        users = conn.execute(
            "SELECT prefix, key FROM store WHERE prefix LIKE 'bssagent.default.users.alice.%'"
            " ORDER BY key"
        ).fetchall()
    assert users == [
        ("bssagent.default.users.alice.facts", "favourite city"),
        ("bssagent.default.users.alice.preferences", "language"),
    ]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DELETE FROM store WHERE prefix LIKE 'bssagent.default.users.%'")


# -- examples/fastapi_app.py ----------------------------------------------------------------


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    frames = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        frames.append((lines["event"], json.loads(lines["data"])))
    return frames


@pytest.fixture(params=["sqlite", "postgres"])
def fastapi_client(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    table_name: str,
) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    monkeypatch.chdir(tmp_path)
    for key in ("GOOGLE_API_KEY", "OPENAI_API_KEY", "DATABASE_URL", "BSSAGENT_DATABASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("BSSAGENT_TABLE_NAME", table_name)
    pg_url = None
    if request.param == "postgres":
        pg_url = request.getfixturevalue("pg_url")
        monkeypatch.setenv("BSSAGENT_DATABASE_URL", pg_url)
    # A fresh copy of the module per test: the app keeps its agent in app.state.
    spec = importlib.util.spec_from_file_location(
        f"fastapi_app_{uuid.uuid4().hex}", EXAMPLES / "fastapi_app.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with TestClient(module.app) as client:
        client.backend = request.param  # type: ignore[attr-defined]
        yield client
        threads = [s["thread_id"] for u in ("alice", "bob") for s in sessions_of(client, u)]
    if pg_url is not None:
        purge_pg(pg_url, threads)


def sessions_of(client: Any, user: str) -> list[dict[str, Any]]:
    response = client.get("/sessions", headers={"X-User-Id": user})
    assert response.status_code == 200, response.text
    return response.json()


def chat(client: Any, user: str, message: str, **body: Any) -> Any:
    return client.post("/chat", json={"message": message, **body}, headers={"X-User-Id": user})


@pytest.mark.timeout(60)
def test_fastapi_app_streams_a_conversation(fastapi_client: Any) -> None:
    client = fastapi_client
    response = chat(client, "alice", "Hello")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = parse_sse(response.text)
    kinds = [kind for kind, _ in frames]
    assert kinds[-1] == "final"
    assert set(kinds[:-1]) == {"token"}
    assert len(kinds) > 2
    final = frames[-1][1]
    expected = "[offline model] You said: 'Hello'. This is turn 1 of our conversation."
    assert final["content"] == expected
    assert "".join(data["content"] for kind, data in frames if kind == "token") == expected

    listed = sessions_of(client, "alice")
    assert [s["thread_id"] for s in listed] == [final["thread_id"]]
    assert listed[0]["is_active"] is True

    again = parse_sse(chat(client, "alice", "More").text)
    assert again[-1] == (
        "final",
        {"thread_id": final["thread_id"], "content": again[-1][1]["content"]},
    )
    assert "This is turn 2 of our conversation." in again[-1][1]["content"]

    # A new session, then back to the first one by its thread id.
    created = client.post("/sessions", headers={"X-User-Id": "alice"}, params={"title": "Two"})
    assert created.status_code == 200
    assert created.json()["title"] == "Two"
    fresh = parse_sse(chat(client, "alice", "New topic").text)[-1][1]
    assert fresh["thread_id"] == created.json()["thread_id"]
    assert "turn 1" in fresh["content"]
    old = parse_sse(chat(client, "alice", "Back", thread_id=final["thread_id"]).text)[-1][1]
    assert old["thread_id"] == final["thread_id"]
    assert "turn 3" in old["content"]
    assert len(sessions_of(client, "alice")) == 2

    health = client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "backend": client.backend}


@pytest.mark.timeout(60)
def test_fastapi_app_keeps_users_apart(fastapi_client: Any) -> None:
    client = fastapi_client
    alice = parse_sse(chat(client, "alice", "my secret").text)[-1][1]
    switched = client.post(f"/sessions/{alice['thread_id']}/switch", headers={"X-User-Id": "bob"})
    assert switched.status_code == 404
    assert switched.json()["error"] == "SessionNotFoundError"
    assert sessions_of(client, "bob") == []
    unknown = client.post(f"/sessions/{uuid.uuid4()}/switch", headers={"X-User-Id": "alice"})
    assert unknown.status_code == 404
    # Whatever bob tries, alice's conversation is untouched.
    chat(client, "bob", "let me in", thread_id=alice["thread_id"])
    after = parse_sse(chat(client, "alice", "still mine?").text)[-1][1]
    assert "This is turn 2 of our conversation." in after["content"]


@pytest.mark.timeout(60)
def test_fastapi_chat_on_a_foreign_thread_is_404(fastapi_client: Any) -> None:
    client = fastapi_client
    alice = parse_sse(chat(client, "alice", "my secret").text)[-1][1]
    response = chat(client, "bob", "let me in", thread_id=alice["thread_id"])
    assert "my secret" not in response.text
    assert response.status_code == 404


@pytest.mark.timeout(60)
def test_fastapi_chat_on_a_foreign_thread_leaks_nothing(fastapi_client: Any) -> None:
    client = fastapi_client
    alice = parse_sse(chat(client, "alice", "my secret").text)[-1][1]
    response = chat(client, "bob", "let me in", thread_id=alice["thread_id"])
    assert response.status_code == 404
    assert response.json()["error"] == "SessionNotFoundError"
    assert "my secret" not in response.text


@pytest.mark.timeout(60)
def test_fastapi_app_rejects_bad_input(fastapi_client: Any) -> None:
    client = fastapi_client
    too_long = "x" * 300
    response = chat(client, too_long, "hi")
    assert response.status_code == 400
    assert response.json()["error"] == "InvalidInputError"
    assert client.get("/sessions", headers={"X-User-Id": too_long}).status_code == 400
    assert client.post("/chat", json={"message": "hi"}).status_code == 422  # no header
    assert chat(client, "alice", "").status_code == 422  # empty message
    bad_thread = chat(client, "alice", "hi", thread_id="not-a-uuid")
    assert bad_thread.status_code == 400
    assert bad_thread.json()["detail"].startswith("thread_id:")
    assert sessions_of(client, "alice") == []


# -- the bssagent command -------------------------------------------------------------------


def demo_turns(out: str) -> dict[str, list[int]]:
    """The turn numbers the agent announced to each user, in order."""
    turns: dict[str, list[int]] = {}
    user = None
    for line in out.splitlines():
        header = re.match(r"^\[(\w+)\] thread (" + THREAD_RE + ")$", line)
        if header:
            user = header.group(1)
            continue
        said = re.search(r"This is turn (\d+) of our conversation\.", line)
        if said and line.startswith("  agent:"):
            assert user is not None
            turns.setdefault(user, []).append(int(said.group(1)))
    return turns


def demo_threads(out: str) -> dict[str, set[str]]:
    threads: dict[str, set[str]] = {}
    for user, thread in re.findall(r"^\[(\w+)\] thread (" + THREAD_RE + ")$", out, re.M):
        threads.setdefault(user, set()).add(thread)
    return threads


@pytest.mark.timeout(120)
def test_bssagent_demo_twice_continues_every_conversation(tmp_path: Path) -> None:
    script = REPO / ".venv" / "bin" / "bssagent"
    command = (
        [str(script), "demo"] if script.exists() else [sys.executable, "-m", "bssagent.cli", "demo"]
    )
    env = clean_env()
    first = run(command, tmp_path, env).stdout
    assert "chat model: the offline model" in first
    assert f"storage: sqlite ({Path('.bssagent') / 'bssagent.db'})" in first
    assert demo_turns(first) == {"alice": [1, 2], "bob": [1, 2], "carol": [1]}
    assert "active sessions:" in first
    assert "(storage unreachable" not in first

    second = run(command, tmp_path, env).stdout
    assert demo_turns(second) == {"alice": [3, 4], "bob": [3, 4], "carol": [2]}
    assert demo_threads(second) == demo_threads(first)
    assert all(len(t) == 1 for t in demo_threads(first).values())


def test_bssagent_chat_talks_starts_a_new_chat_and_remembers(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "bssagent.cli", "chat", "--user", "dora"]
    env = clean_env()
    first = subprocess.run(
        command, cwd=tmp_path, env=env, input="hello\nagain\n/new\nfresh start\n\n",
        capture_output=True, text=True, timeout=PROCESS_TIMEOUT,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    threads = re.findall(r"thread (" + THREAD_RE + ")", first.stdout)
    assert len(threads) == 2
    assert threads[0] != threads[1]
    turns = re.findall(r"This is turn (\d+)", first.stdout)
    assert turns == ["1", "2", "1"]  # /new starts a conversation of its own
    second = subprocess.run(
        command, cwd=tmp_path, env=env, input="back\n", capture_output=True, text=True,
        timeout=PROCESS_TIMEOUT,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert f"thread {threads[1]}" in second.stdout  # the current chat, after a restart
    assert re.findall(r"This is turn (\d+)", second.stdout) == ["2"]


# -- stream_sse -----------------------------------------------------------------------------


class GatedAgent(BaseAgent):
    """A chat agent whose node waits at a gate, to keep its thread busy on demand."""

    def __init__(self, **kwargs: Any) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.llm = OfflineChatModel()
        super().__init__("gated", **kwargs)

    def define_graph(self) -> StateGraph[Any]:
        def assistant(state: MessagesState) -> dict[str, Any]:
            self.entered.set()
            assert self.gate.wait(30)
            return {"messages": [self.llm.invoke(state["messages"])]}

        graph = StateGraph(MessagesState)
        graph.add_node("assistant", assistant)
        graph.add_edge(START, "assistant")
        graph.add_edge("assistant", END)
        return graph


def test_format_sse() -> None:
    assert format_sse("token", {"content": "héllo"}) == (
        'event: token\ndata: {"content": "héllo"}\n\n'
    )


@pytest.mark.parametrize("backend_url", ["memory", "sqlite", "postgres"], indirect=True)
@pytest.mark.timeout(60)
async def test_stream_sse_reports_a_busy_thread_as_an_error_frame(
    backend_url: str, table_name: str, tmp_path: Path
) -> None:
    agent = GatedAgent(
        settings=Settings(
            database_url=backend_url, table_name=table_name, sqlite_path=tmp_path / "d.db"
        )
    )
    thread = str(uuid.uuid4())
    config = {"configurable": {"thread_id": thread}}
    try:
        holder = asyncio.create_task(
            asyncio.to_thread(agent.invoke, {"messages": ["first"]}, config)
        )
        assert await asyncio.to_thread(agent.entered.wait, 30)

        frames = [
            f
            async for f in stream_sse(
                agent, {"messages": ["second"]}, config, run_strategy="reject"
            )
        ]
        parsed = parse_sse("".join(frames))
        assert len(parsed) == 1
        kind, data = parsed[0]
        assert kind == "error"
        assert data["type"] == "ThreadBusyError"
        assert thread in data["message"]

        agent.gate.set()
        await holder
        # Free again: the same call now streams tokens and a final frame.
        parsed = parse_sse(
            "".join(
                [
                    f
                    async for f in stream_sse(
                        agent, {"messages": ["second"]}, config, run_strategy="reject"
                    )
                ]
            )
        )
        assert parsed[-1][0] == "final"
        assert parsed[-1][1]["thread_id"] == thread
        assert "This is turn 2 of our conversation." in parsed[-1][1]["content"]
        assert {kind for kind, _ in parsed[:-1]} == {"token"}
    finally:
        agent.gate.set()
        await agent.aclose()
        if backend_url.startswith("postgresql"):
            purge_pg(backend_url, [thread])


@pytest.mark.timeout(30)
async def test_stream_sse_releases_the_thread_when_the_client_goes_away() -> None:
    from bssagent.demo import ChatAgent

    agent = ChatAgent(OfflineChatModel(), settings=Settings(database_url="memory://"))
    config = {"configurable": {"thread_id": str(uuid.uuid4())}}
    try:
        frames = stream_sse(agent, {"messages": ["hi"]}, config)
        assert (await frames.__anext__()).startswith("event: token")
        await frames.aclose()  # what Starlette does when the client disconnects
        result = await agent.ainvoke({"messages": ["back"]}, config, run_strategy="reject")
        assert "You said: 'back'" in result["messages"][-1].text
    finally:
        await agent.aclose()


async def test_stream_sse_hides_unexpected_errors() -> None:
    class Broken(BaseAgent):
        def define_graph(self) -> StateGraph[Any]:
            def boom(state: MessagesState) -> dict[str, Any]:
                raise RuntimeError("internal detail: password=hunter2")

            graph = StateGraph(MessagesState)
            graph.add_node("boom", boom)
            graph.add_edge(START, "boom")
            graph.add_edge("boom", END)
            return graph

    agent = Broken("broken", settings=Settings(database_url="memory://"))
    frames = [f async for f in stream_sse(agent, {"messages": ["hi"]}, user_id="u1")]
    assert parse_sse("".join(frames)) == [
        ("error", {"type": "RuntimeError", "message": "the run failed"})
    ]
    await agent.aclose()


async def test_stream_sse_counts_the_run_on_the_users_session() -> None:
    from bssagent import AsyncAgentSessionManager
    from bssagent.demo import ChatAgent

    async with (
        AsyncAgentSessionManager(database_url="memory://") as sessions,
        ChatAgent(OfflineChatModel(), session_manager=sessions) as agent,
    ):
        frames = [f async for f in stream_sse(agent, {"messages": ["hi"]}, user_id="u1")]
        assert frames[-1].startswith("event: final")
        session = await sessions.get_current_user_session("u1")
        assert session.request_count == 1
        assert session.error_count == 0
