"""The session value returned by every manager call."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, NoReturn

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .lifecycle import OPEN, Status


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
        status: ``active``, ``paused``, ``completed``, ``failed`` or ``expired`` (see
            :mod:`bssagent.sessions.lifecycle`).
        request_count: Requests recorded on the session (agent runs, ``record_request``).
        error_count: Of those, how many failed.
        total_processing_time: Seconds spent in those requests.
        last_activity_at: The last request or change (UTC); idleness is measured from it.
        ended_at: When the session was completed, failed or expired, else ``None``.
        parent_thread_id: The parent session's thread for a child session, else ``None``.
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
    status: Status = "active"
    request_count: int = 0
    error_count: int = 0
    total_processing_time: float = 0.0
    last_activity_at: datetime | None = None
    ended_at: datetime | None = None
    parent_thread_id: str | None = None

    @field_validator("created_at", "updated_at", "last_activity_at", "ended_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        # Backends return their own zone (PostgreSQL: the session's TimeZone); expose UTC.
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

    @field_validator("metadata")
    @classmethod
    def _freeze(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Sessions are shared by the cache: their metadata must not be changed in place.
        return value if isinstance(value, FrozenDict) else freeze(value)

    @model_validator(mode="before")
    @classmethod
    def _activity_defaults_to_update(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("last_activity_at") is None:
            data = {**data, "last_activity_at": data.get("updated_at")}
        return data

    def is_expired(
        self, max_idle_seconds: float | None = None, now: datetime | None = None
    ) -> bool:
        """Whether the session has expired, or (given ``max_idle_seconds``) has been idle
        longer than that and would be expired by the next cleanup."""
        if self.status == "expired":
            return True
        if max_idle_seconds is None or self.status not in OPEN:
            return False
        now = now or datetime.now(timezone.utc)
        idle_since = self.last_activity_at or self.updated_at
        return (now - idle_since).total_seconds() > max_idle_seconds

    @property
    def is_open(self) -> bool:
        """Whether the session can still take requests (``active`` or ``paused``)."""
        return self.status in OPEN

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


class SessionEvent(BaseModel):
    """One entry of the append-only event log.

    Attributes:
        seq: Position in the log (increasing).
        thread_id: The session's thread.
        kind: ``created``, ``switched``, ``deactivated``, ``updated``, ``paused``,
            ``resumed``, ``ended``, ``expired``, ``deleted`` or ``error``.
        payload: Small details (the states of a transition, the changed field names);
            never message content.
        created_at: When it happened (UTC).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    seq: int
    namespace: str
    user_id: str
    thread_id: str
    kind: str
    payload: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime

    @field_validator("created_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return UserSession._utc(value) or value

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return self.model_dump(mode="json")


class SessionStats(BaseModel):
    """Aggregates over sessions (a namespace's, or one user's).

    Attributes:
        sessions: Sessions stored.
        open_sessions: Sessions ``active`` or ``paused``.
        users: Users with a current session (for one user: 1 or 0).
        requests: Requests recorded.
        errors: Failed requests.
        error_rate: ``errors / requests`` (0 without requests).
        average_processing_time: Seconds per request (0 without requests).
    """

    model_config = ConfigDict(frozen=True)

    sessions: int = 0
    open_sessions: int = 0
    users: int = 0
    requests: int = 0
    errors: int = 0
    total_processing_time: float = 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def average_processing_time(self) -> float:
        return self.total_processing_time / self.requests if self.requests else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict, the derived rates included."""
        return {
            **self.model_dump(mode="json"),
            "error_rate": self.error_rate,
            "average_processing_time": self.average_processing_time,
        }
