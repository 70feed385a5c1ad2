"""The seed's import path: ``from bssagent.core import AgentSessionManager, BaseAgent``."""

from ..agent.base import BaseAgent
from ..errors import SessionNotFoundError
from ..sessions.manager_async import AsyncAgentSessionManager
from ..sessions.manager_base import Health
from ..sessions.manager_sync import AgentSessionManager
from ..sessions.model import SessionEvent, SessionStats, UserSession

__all__ = [
    "AgentSessionManager",
    "AsyncAgentSessionManager",
    "BaseAgent",
    "Health",
    "SessionEvent",
    "SessionNotFoundError",
    "SessionStats",
    "UserSession",
]
