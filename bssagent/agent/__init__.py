"""Agents: :class:`BaseAgent`, its checkpointers and run locks, and chat models."""

from .base import BaseAgent
from .chat_models import OfflineChatModel, default_chat_model

__all__ = ["BaseAgent", "OfflineChatModel", "default_chat_model"]
