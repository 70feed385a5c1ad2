"""Server-sent events from an agent run, for any ASGI framework (FastAPI, Starlette, ...).

Frames (each ``event: <name>\\ndata: <json>\\n\\n``):

* ``token`` — ``{"content": "..."}``: a piece of the model's reply (``messages`` stream mode);
* ``final`` — ``{"thread_id": "...", "content": "..."}``: the last AI message once the run ends;
* ``error`` — ``{"type": "...", "message": "..."}``: the run failed. bssagent's own errors carry
  their message; any other error is reported by type only, so nothing internal leaks.

Nothing is printed or logged; message content never reaches logs.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage

from ..errors import BssAgentError

if TYPE_CHECKING:
    from langchain_core.runnables import RunnableConfig

    from .base import BaseAgent

__all__ = ["format_sse", "stream_sse"]


def format_sse(event: str, data: dict[str, Any]) -> str:
    """One SSE frame: ``event`` and its JSON ``data``."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _text(message: BaseMessage) -> str:
    return message.text if isinstance(message.text, str) else str(message.content)


async def stream_sse(
    agent: BaseAgent,
    input: Any,
    config: RunnableConfig | None = None,
    **kwargs: Any,
) -> AsyncIterator[str]:
    """Run ``agent.astream`` and yield SSE frames (see the module docstring).

    Takes the arguments of :meth:`BaseAgent.astream` (``user_id=``, ``thread_id=``, ...),
    except ``stream_mode``, which this helper sets.
    """
    final: BaseMessage | None = None
    try:
        user_id = kwargs.pop("user_id", None)
        # Resolved first, for the thread id of the final frame; user_id still goes to the run
        # so that it is ownership-checked and counted on the session like any other.
        resolved = await agent.aresolve_config(
            config, user_id=user_id, thread_id=kwargs.pop("thread_id", None)
        )
        run = agent.astream(
            input, resolved, user_id=user_id, stream_mode=["messages", "values"], **kwargs
        )
        # aclosing: when the client goes away, the run (and its thread lock) ends at once.
        async with aclosing(run) as chunks:
            async for mode, payload in chunks:
                if mode == "messages":
                    message = payload[0]
                    if isinstance(message, AIMessageChunk) and _text(message):
                        yield format_sse("token", {"content": _text(message)})
                elif mode == "values" and isinstance(payload, dict):
                    messages = payload.get("messages") or []
                    if messages and isinstance(messages[-1], AIMessage):
                        final = messages[-1]
        thread_id = resolved["configurable"]["thread_id"]
        yield format_sse(
            "final", {"thread_id": thread_id, "content": _text(final) if final else ""}
        )
    except BssAgentError as exc:
        yield format_sse("error", {"type": type(exc).__name__, "message": str(exc)})
    except Exception as exc:
        yield format_sse("error", {"type": type(exc).__name__, "message": "the run failed"})
