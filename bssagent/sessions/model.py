"""The session value returned by every manager call."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, NoReturn

from pydantic import BaseModel, ConfigDict, Field, field_validator


def _read_only(self: object, *args: object, **kwargs: object) -> NoReturn:
    raise TypeError("session metadata is read-only; pass changes to update_session")


class FrozenDict(dict[str, Any]):
    """A ``dict`` that refuses changes: a session's metadata is a snapshot, shared safely."""

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __copy__(self) -> dict[str, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return thaw(self)  # type: ignore[no-any-return]


class FrozenList(list[Any]):
    """A ``list`` that refuses changes (inside frozen metadata)."""

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only
    append = clear = extend = insert = pop = remove = reverse = sort = _read_only


def freeze(value: Any) -> Any:
    """A read-only deep copy of a decoded JSON value."""
    if isinstance(value, dict):
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return FrozenList(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """A mutable deep copy of a (frozen) JSON value."""
    if isinstance(value, dict):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, list):
        return [thaw(v) for v in value]
    return value


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
        metadata: Free-form JSON object (at most 16 KiB), read-only: ``dict(s.metadata)`` or
            :func:`thaw` gives a mutable copy.
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

    @field_validator("created_at", "updated_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        # Backends return their own zone (PostgreSQL: the session's TimeZone); expose UTC.
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

    @field_validator("metadata")
    @classmethod
    def _freeze(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Sessions are shared by the cache: their metadata must not be changed in place.
        return value if isinstance(value, FrozenDict) else freeze(value)

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
