"""Long-term memory: an agent remembers what a user told it, in every later session of that
user, and never for anyone else.

Nodes read and write the run's user's memory through LangGraph's store (``store:
BaseStore``), which bssagent scopes to that user; the application sets preferences through
the session manager. Runs on the default SQLite file, or on ``BSSAGENT_DATABASE_URL``, with
any chat model (the offline one when no provider key is set).
"""

from __future__ import annotations

import re
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import SystemMessage
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.store.base import BaseStore

from bssagent import AgentSessionManager, BaseAgent
from bssagent.agent import default_chat_model
from bssagent.environment import setup_environment_variables

FACT = re.compile(r"remember that my (?P<what>[\w ]+?) is (?P<value>[^.!]+)", re.IGNORECASE)


class MemoryAgent(BaseAgent):
    """Notes facts users state about themselves; answers with what it knows about them."""

    def __init__(self, llm: BaseChatModel, **kwargs: Any) -> None:
        self.llm = llm
        super().__init__("memory_agent", "A chat assistant with long-term memory", **kwargs)

    def define_graph(self) -> StateGraph[Any]:
        def remember(state: MessagesState, store: BaseStore) -> dict[str, Any]:
            found = FACT.search(state["messages"][-1].text)
            if found:
                store.put(("facts",), found["what"].lower(), {"value": found["value"].strip()})
            return {}

        def assistant(state: MessagesState, store: BaseStore) -> dict[str, Any]:
            known = [*store.search(("facts",)), *store.search(("preferences",))]
            facts = "; ".join(f"{i.key} = {i.value['value']}" for i in known) or "nothing yet"
            system = SystemMessage(f"What you know about this user: {facts}.")
            return {"messages": [self.llm.invoke([system, *state["messages"]])]}

        graph = StateGraph(MessagesState)
        graph.add_node("remember", remember)
        graph.add_node("assistant", assistant)
        graph.add_edge(START, "remember")
        graph.add_edge("remember", "assistant")
        graph.add_edge("assistant", END)
        return graph


def say(agent: MemoryAgent, sessions: AgentSessionManager, user: str, text: str) -> None:
    result = agent.invoke({"messages": [text]}, user_id=user)
    thread = sessions.get_current_user_session(user).thread_id
    print(f"[{user} @ {thread}] {text}")
    print(f"  agent: {result['messages'][-1].text}")


def main() -> None:
    settings = setup_environment_variables()
    llm, description = default_chat_model()
    print("Chat model:", description)
    with (
        AgentSessionManager(settings=settings) as sessions,
        MemoryAgent(llm, session_manager=sessions) as agent,
    ):
        for user in ("alice", "bob"):  # a clean slate, so every run prints the same
            sessions.delete_user_data(user)
        say(agent, sessions, "alice", "Hi! Remember that my favourite city is Lisbon.")
        sessions.set_user_preferences("alice", {"language": "Portuguese"})

        sessions.create_user_session("alice", title="A new chat")  # a second session
        say(agent, sessions, "alice", "What do you know about me?")
        say(agent, sessions, "bob", "What do you know about me?")
        print("alice's preferences:", sessions.get_user_preferences("alice"))
        print("bob's preferences:", sessions.get_user_preferences("bob"))


if __name__ == "__main__":
    main()
