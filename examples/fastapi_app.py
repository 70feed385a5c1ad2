"""A FastAPI chat service: one session registry and one agent for every request.

    pip install -e '.[web]' && uvicorn examples.fastapi_app:app

Each request names its user in the ``X-User-Id`` header — a stand-in for your
authentication: take the user id from a verified token, never from the client as-is.

    curl -N -X POST localhost:8000/chat -H 'X-User-Id: 123' -H 'Content-Type: application/json' \\
         -d '{"message": "Hello"}'
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from bssagent import (
    AsyncAgentSessionManager,
    BssAgentError,
    SessionNotFoundError,
    ThreadBusyError,
)
from bssagent.agent import default_chat_model
from bssagent.agent.sse import stream_sse
from bssagent.demo import ChatAgent
from bssagent.environment import setup_environment_variables


class ChatRequest(BaseModel):
    message: str = Field(min_length=1, max_length=10_000)
    thread_id: str | None = None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = setup_environment_variables()
    llm, _ = default_chat_model()
    async with (
        AsyncAgentSessionManager(settings=settings) as sessions,
        ChatAgent(llm, session_manager=sessions) as agent,
    ):
        app.state.sessions, app.state.agent = sessions, agent
        yield


app = FastAPI(title="bssagent chat", lifespan=lifespan)


def user_id(x_user_id: Annotated[str, Header()]) -> str:
    return x_user_id


User = Annotated[str, Depends(user_id)]


@app.exception_handler(BssAgentError)
async def bssagent_error(request: Request, exc: BssAgentError) -> JSONResponse:
    # Bad input -> 400, someone else's or a missing thread -> 404, a busy thread -> 409,
    # storage trouble -> 503.
    status = 404 if isinstance(exc, SessionNotFoundError) else 400
    if isinstance(exc, ThreadBusyError):
        status = 409
    elif not isinstance(exc, ValueError):
        status = 503
    return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=status)


@app.post("/chat")
async def chat(body: ChatRequest, user: User) -> StreamingResponse:
    """Stream the agent's reply in the user's current (or chosen) session, as SSE."""
    sessions: AsyncAgentSessionManager = app.state.sessions
    # Resolve the session before the response starts, so a bad user id is a 400 and a
    # thread that is not the user's is a 404 (inside the stream, only an SSE error is left).
    if body.thread_id is None:
        await sessions.get_or_create_user_session(user)
    else:
        await sessions.get_session(user, body.thread_id)
    stream = stream_sse(
        app.state.agent, {"messages": [body.message]}, user_id=user, thread_id=body.thread_id
    )
    return StreamingResponse(stream, media_type="text/event-stream")


@app.get("/sessions")
async def list_sessions(user: User, limit: int = 20, before_id: int | None = None) -> Any:
    sessions: AsyncAgentSessionManager = app.state.sessions
    page = await sessions.list_user_sessions(user, limit=limit, before_id=before_id)
    return [s.to_dict() for s in page]


@app.post("/sessions")
async def new_session(user: User, title: str = "New Chat") -> Any:
    sessions: AsyncAgentSessionManager = app.state.sessions
    return (await sessions.create_user_session(user, title=title)).to_dict()


@app.post("/sessions/{thread_id}/switch")
async def switch(thread_id: str, user: User) -> Any:
    sessions: AsyncAgentSessionManager = app.state.sessions
    return (await sessions.switch_session(user, thread_id)).to_dict()


@app.get("/health")
async def health() -> Any:
    sessions: AsyncAgentSessionManager = app.state.sessions
    report = sessions.health()
    if report.status != "ok":
        raise HTTPException(503, detail={"status": report.status, "reason": report.reason})
    return {"status": report.status, "backend": report.backend}
