"""Async use: several users talk to one agent instance at once, each in their own thread."""

from __future__ import annotations

import asyncio

from bssagent import AsyncAgentSessionManager
from bssagent.agent import default_chat_model
from bssagent.demo import ChatAgent
from bssagent.environment import setup_environment_variables


async def talk(agent: ChatAgent, user: str, lines: list[str]) -> None:
    for line in lines:
        result = await agent.ainvoke({"messages": [line]}, user_id=user)
        print(f"[{user}] {result['messages'][-1].text}")


async def main() -> None:
    settings = setup_environment_variables()
    llm, description = default_chat_model()
    print("Chat model:", description)
    async with (
        AsyncAgentSessionManager(settings=settings) as sessions,
        ChatAgent(llm, session_manager=sessions) as agent,
    ):
        users = {
            f"async-user-{i}": [f"hello from user {i}", "and a second message"] for i in range(4)
        }
        await asyncio.gather(*(talk(agent, user, lines) for user, lines in users.items()))
        for user in users:
            session = await sessions.get_current_user_session(user)
            state = await agent.aget_state(user_id=user)
            print(f"{user}: thread {session.thread_id}, {len(state.values['messages'])} messages")


if __name__ == "__main__":
    asyncio.run(main())
