"""bssagent: per-user, durable, concurrency-safe conversation sessions for LangGraph agents."""

from .agent.base import BaseAgent
from .config import Settings
from .errors import (
    BssAgentError,
    ConfigurationError,
    InvalidInputError,
    InvalidTransitionError,
    JournalFullError,
    MigrationError,
    SessionLimitError,
    SessionNotFoundError,
    StorageError,
    StorageUnavailableError,
    ThreadBusyError,
    UnknownFieldError,
)
from .sessions.manager_async import AsyncAgentSessionManager
from .sessions.manager_base import Health
from .sessions.manager_sync import AgentSessionManager
from .sessions.model import SessionEvent, SessionStats, UserSession

__version__ = "0.1.0"

__all__ = [
    "AgentSessionManager",
    "AsyncAgentSessionManager",
    "BaseAgent",
    "BssAgentError",
    "ConfigurationError",
    "Health",
    "InvalidInputError",
    "InvalidTransitionError",
    "JournalFullError",
    "MigrationError",
    "SessionEvent",
    "SessionLimitError",
    "SessionNotFoundError",
    "SessionStats",
    "Settings",
    "StorageError",
    "StorageUnavailableError",
    "ThreadBusyError",
    "UnknownFieldError",
    "UserSession",
    "__version__",
]
