"""The session value returned by every manager call."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class UserSession(BaseModel):
    """One conversation of one user: an immutable snapshot of a ``user_sessions`` row.

    Read it as attributes (``s.thread_id``), as a mapping (``s["thread_id"]``, as the
    original seed API did), or hand :attr:`config` straight to a LangGraph graph.

    Attributes:
        id: Database row id; increases with creation, and serves as the pagination cursor.
        namespace: The manager namespace the session lives in.
        user_id: The owner.
        thread_id: Random UUID4 string naming the LangGraph thread; carries no user data.
        title: Human-readable title.
        metadata: Free-form JSON object (at most 16 KiB).
        created_at: Creation time (UTC).
        updated_at: Time of the last change (UTC).
        is_active: True exactly for the user's current session.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: int
    namespace: str = "default"
    user_id: str
    thread_id: str
    title: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    updated_at: datetime
    is_active: bool

    def __getitem__(self, key: str) -> Any:
        """Mapping-style access to a field: ``session["thread_id"]``."""
        if key in type(self).model_fields:
            return getattr(self, key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        """Return the field ``key``, or ``default`` when there is no such field."""
        try:
            return self[key]
        except KeyError:
            return default

    def keys(self) -> list[str]:
        """The field names, so ``dict(session)``-style code keeps working."""
        return list(type(self).model_fields)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (timestamps as ISO 8601 strings)."""
        return self.model_dump(mode="json")

    @property
    def config(self) -> dict[str, Any]:
        """The LangGraph ``RunnableConfig`` for this session's thread."""
        return {"configurable": {"thread_id": self.thread_id}}
