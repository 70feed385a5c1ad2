"""Session states and their legal transitions, in one place (pure).

::

    active ⇄ paused            (pause_session / resume_session)
    active, paused → completed | failed | expired      (end_session / idle expiry)
    completed, failed, expired: final

``is_active`` is separate: it marks the user's *current* session, which is always an open
(``active`` or ``paused``) one. Ending the current session leaves the user with none until
the next ``get_or_create_user_session``.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from ..errors import InvalidInputError, InvalidTransitionError

Status = Literal["active", "paused", "completed", "failed", "expired"]
STATUSES: tuple[Status, ...] = get_args(Status)
OPEN: tuple[Status, ...] = ("active", "paused")
ENDED: tuple[Status, ...] = ("completed", "failed", "expired")

TRANSITIONS: dict[Status, frozenset[Status]] = {
    "active": frozenset({"paused", "completed", "failed", "expired"}),
    "paused": frozenset({"active", "completed", "failed", "expired"}),
    "completed": frozenset(),
    "failed": frozenset(),
    "expired": frozenset(),
}


def status(value: object) -> Status:
    """Validate a session status (a filter)."""
    if value not in STATUSES:
        raise InvalidInputError("status", f"must be one of {list(STATUSES)}, got {value!r}")
    return value


def end_status(value: object) -> Status:
    """Validate the ``status`` argument of ``end_session``."""
    if value not in ENDED:
        raise InvalidInputError("status", f"must be one of {list(ENDED)}, got {value!r}")
    return value


def check_transition(current: Status, target: Status, thread_id: str) -> None:
    """Raise :class:`~bssagent.errors.InvalidTransitionError` unless ``current → target``
    is legal."""
    if target not in TRANSITIONS[current]:
        raise InvalidTransitionError(
            f"session {thread_id!r} cannot go from {current!r} to {target!r}"
        )


def check_can_be_current(status: str, parent_thread_id: str | None, thread_id: str) -> None:
    """Raise :class:`~bssagent.errors.InvalidTransitionError` unless the session may become
    the user's current one: it must be open, and not a child session."""
    if status not in OPEN:
        raise InvalidTransitionError(
            f"session {thread_id!r} is {status!r}: only an open session can be the current one"
        )
    if parent_thread_id is not None:
        raise InvalidTransitionError(
            f"session {thread_id!r} is a child session: it cannot be the current one"
        )


def event_for_change(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The event a row change logs (the SQL triggers of ``sql/*/0002`` do the same)."""
    if new["status"] != old["status"]:
        kind = {"paused": "paused", "active": "resumed", "expired": "expired"}.get(
            new["status"], "ended"
        )
        return kind, {"from": old["status"], "to": new["status"]}
    if new["is_active"] and not old["is_active"]:
        return "switched", {}
    if old["is_active"] and not new["is_active"]:
        return "deactivated", {}
    if new["error_count"] > old["error_count"]:
        return "error", {"error_count": new["error_count"]}
    fields = [f for f in ("title", "metadata") if new[f] != old[f]]
    return ("updated", {"fields": fields}) if fields else None
