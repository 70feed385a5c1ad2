"""The seed's example program, unchanged but for the chat model.

The seed uses ``ChatGoogleGenerativeAI(model="gemini-2.5-flash")``; here the model comes from
``default_chat_model()``: Gemini when ``GOOGLE_API_KEY`` is set (extra ``google``), OpenAI when
``OPENAI_API_KEY`` is set (extra ``openai``), otherwise a deterministic offline model.

Run it twice: the second run continues the same thread (turn 2 of the conversation).
"""

from langgraph.graph import END, START, MessagesState, StateGraph

from bssagent.agent import default_chat_model
from bssagent.core import AgentSessionManager, BaseAgent
from bssagent.environment import setup_environment_variables

# Setup environment variables
setup_environment_variables()

# Initialize LLM
llm, llm_description = default_chat_model()
print("Chat model:", llm_description)


# Define assistant node
def assistant_node(state: MessagesState):
    return {"messages": [llm.invoke(state["messages"])]}


# Define custom agent
class MyAgent(BaseAgent):
    def define_graph(self):
        graph = StateGraph(MessagesState)
        graph.add_node("assistant", assistant_node)
        graph.add_edge(START, "assistant")
        graph.add_edge("assistant", END)
        self.set_compiled_graph(graph.compile())


def main():
    # Initialize session manager
    session_manager = AgentSessionManager()

    # Create or retrieve user session
    user_session = session_manager.get_or_create_user_session(user_id="123", title="My First Chat")

    # Display active sessions
    print("Active sessions:", session_manager.list_active_sessions())

    # Create agent instance
    agent = MyAgent(name="my_agent", description="My first agent")

    # Define thread configuration
    thread = {"configurable": {"thread_id": user_session["thread_id"]}}

    # Invoke agent with session context
    result = agent.invoke({"messages": ["Hello, how can I help you today?"]}, thread)

    print("Agent response:", result)

    # Update session with new title
    session_manager.update_session(user_id="123", updates={"title": "Updated Chat Session"})

    # Display updated session info
    updated_session = session_manager.get_current_user_session("123")
    print("Updated session:", updated_session)


if __name__ == "__main__":
    main()
