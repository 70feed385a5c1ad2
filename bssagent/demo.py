"""The main job: a scripted multi-user conversation on the embedded default.

Several users talk to one agent instance; half-way, everything is closed and re-opened
(a restart), and each conversation continues where it stopped, because sessions and
checkpoints live in the database (SQLite unless ``BSSAGENT_DATABASE_URL`` says otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage
from langgraph.graph import END, START, MessagesState, StateGraph

from .agent.base import BaseAgent
from .agent.chat_models import default_chat_model
from .config import Settings
from .sessions.manager_sync import AgentSessionManager

SCRIPT = {
    "alice": ["Hi, I'm planning a trip to Lisbon.", "What should I pack for March?"],
    "bob": ["Can you help me write a haiku?", "Make it about the sea."],
    "carol": ["What's a good name for a cat?"],
}


class ChatAgent(BaseAgent):
    """A one-node chat agent: the whole conversation goes to the chat model each turn."""

    def __init__(self, llm: BaseChatModel, **kwargs: Any) -> None:
        self.llm = llm
        super().__init__("demo_chat", "A friendly chat assistant", **kwargs)

    def define_graph(self) -> StateGraph[Any]:
        def assistant(state: MessagesState) -> dict[str, Any]:
            return {"messages": [self.llm.invoke(state["messages"])]}

        graph = StateGraph(MessagesState)
        graph.add_node("assistant", assistant)
        graph.add_edge(START, "assistant")
        graph.add_edge("assistant", END)
        return graph


def _reply(result: dict[str, Any]) -> str:
    last = result["messages"][-1]
    return str(last.text if isinstance(last, AIMessage) else last)


def run_demo(settings: Settings | None = None, out: Callable[[str], None] = print) -> None:
    """Run the scripted conversation, printing what a newcomer needs to see."""
    settings = settings or Settings()
    llm, description = default_chat_model()
    out(f"bssagent demo — chat model: {description}")

    for phase, turn in (("before the restart", 0), ("after the restart", 1)):
        # A fresh manager and agent per phase: the second phase is a restarted process.
        with (
            AgentSessionManager(settings=settings) as sessions,
            ChatAgent(llm, session_manager=sessions) as agent,
        ):
            backend = sessions.backend
            if turn == 0:
                out(f"storage: {backend} ({sessions.location})\n")
            out(f"— {phase} —")
            for user, lines in SCRIPT.items():
                if turn >= len(lines):
                    continue
                session = sessions.get_or_create_user_session(user, title=f"{user}'s chat")
                result = agent.invoke({"messages": [lines[turn]]}, user_id=user)
                out(f"[{user}] thread {session.thread_id}")
                out(f"  {user}: {lines[turn]}")
                out(f"  agent: {_reply(result)}")
            if turn == 1:
                out("\nactive sessions:")
                for s in sessions.list_active_sessions(limit=10):
                    out(f"  {s.user_id:<6} {s.thread_id}  {s.title!r}  updated {s.updated_at:%X}")
            if agent.is_degraded:
                out("(storage unreachable: this run kept everything in memory)")
        out("")
    out("Run the demo again: every conversation continues from the database.")
