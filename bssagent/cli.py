"""The ``bssagent`` command: ``bssagent demo`` and ``bssagent chat --user ID``."""

from __future__ import annotations

import argparse
import logging
import sys

from .environment import setup_environment_variables


def _chat(user_id: str) -> int:
    from .agent.chat_models import default_chat_model
    from .demo import ChatAgent, _reply
    from .sessions.manager_sync import AgentSessionManager

    settings = setup_environment_variables()
    llm, description = default_chat_model()
    print(f"chat model: {description}; empty line or Ctrl-D to quit, /new for a new chat")
    with (
        AgentSessionManager(settings=settings) as sessions,
        ChatAgent(llm, session_manager=sessions) as agent,
    ):
        session = sessions.get_or_create_user_session(user_id)
        print(f"user {user_id}, thread {session.thread_id} ({session.title!r})")
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            if not line:
                break
            if line == "/new":
                session = sessions.create_user_session(user_id)
                print(f"new thread {session.thread_id}")
                continue
            result = agent.invoke({"messages": [line]}, user_id=user_id)
            print(f"agent> {_reply(result)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bssagent`` console script."""
    parser = argparse.ArgumentParser(prog="bssagent", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="run the scripted multi-user demo (the main job)")
    chat = commands.add_parser("chat", help="talk to the demo agent as one user")
    chat.add_argument("--user", required=True, help="the user id")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "chat":
        return _chat(args.user)
    from .demo import run_demo

    run_demo(setup_environment_variables())
    return 0


if __name__ == "__main__":
    sys.exit(main())
