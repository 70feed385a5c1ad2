"""``bssagent demo`` (the main job) and ``bssagent chat``: the demo agent, interactively."""

from __future__ import annotations

from typing import Annotated

import typer

from ..environment import setup_environment_variables


def demo() -> None:
    """Run the scripted multi-user demo on the configured database (SQLite by default)."""
    from ..demo import run_demo

    run_demo(setup_environment_variables())


def chat(user: Annotated[str, typer.Option(help="The user id to talk as.")]) -> None:
    """Talk to the demo agent as one user (empty line or Ctrl-D quits, /new starts a chat)."""
    from ..agent.chat_models import default_chat_model
    from ..demo import ChatAgent, _reply
    from ..sessions.manager_sync import AgentSessionManager

    settings = setup_environment_variables()
    llm, description = default_chat_model()
    print(f"chat model: {description}; empty line or Ctrl-D to quit, /new for a new chat")
    with (
        AgentSessionManager(settings=settings) as sessions,
        ChatAgent(llm, session_manager=sessions) as agent,
    ):
        session = sessions.get_or_create_user_session(user)
        print(f"user {user}, thread {session.thread_id} ({session.title!r})")
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            if not line:
                break
            if line == "/new":
                session = sessions.create_user_session(user)
                print(f"new thread {session.thread_id}")
                continue
            result = agent.invoke({"messages": [line]}, user_id=user)
            print(f"agent> {_reply(result)}")
