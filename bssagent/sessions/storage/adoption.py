"""How a store takes in a session written elsewhere (the memory fallback): pure rules.

After an outage, the sessions a process created or changed in memory are written to the
database. Each backend's ``adopt`` reads what it holds for the thread and for the user,
asks :func:`plan_adoption` what to do, and does it in one transaction.

The rules: the newer write wins, judged by ``updated_at``; a user never ends up with two
current sessions, and when the database already has a different current session for the
user (another process made it meanwhile) the database's stays current and the incoming one
is stored inactive, marked ``metadata["bssagent_merged"] = True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..lifecycle import OPEN
from ..model import UserSession, thaw

MERGED_KEY = "bssagent_merged"


# The columns an adoption writes (besides the identity columns namespace, user_id,
# thread_id and created_at, which an insert adds).
ADOPTED_FIELDS = (
    "title", "metadata", "is_active", "status", "request_count", "error_count",
    "total_processing_time", "last_activity_at", "ended_at", "updated_at", "parent_thread_id",
)  # fmt: skip


@dataclass(frozen=True)
class AdoptionPlan:
    """What to do: ``keep`` the stored row, ``overwrite`` it, or ``insert`` a new one,
    and with :attr:`fields` (every column of :data:`ADOPTED_FIELDS`)."""

    action: Literal["keep", "overwrite", "insert"]
    fields: dict[str, Any]

    @property
    def is_active(self) -> bool:
        return bool(self.fields["is_active"])

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self.fields["metadata"])


def plan_adoption(
    incoming: UserSession, stored: UserSession | None, current: UserSession | None
) -> AdoptionPlan:
    """Decide how to adopt ``incoming``.

    The whole session is taken in, its lifecycle (status, counters, ended_at, parent)
    included: a session ended or used while the database was away stays ended or counted.
    Counters are the newer copy's (not summed): another process's requests on the same
    session during the outage are not added.

    Args:
        incoming: The session from memory.
        stored: The database's row for the same thread, if any.
        current: The database's current session of the user, if any.
    """
    if stored is not None and incoming.updated_at <= stored.updated_at:
        return AdoptionPlan("keep", {})
    fields = {name: getattr(incoming, name) for name in ADOPTED_FIELDS}
    fields["metadata"] = thaw(incoming.metadata)
    taken = current is not None and current.thread_id != incoming.thread_id
    # Never two current sessions, and the current session is always an open one.
    active = incoming.is_active and incoming.status in OPEN and not taken
    if incoming.is_active and not active:
        fields["metadata"][MERGED_KEY] = True
    fields["is_active"] = active
    return AdoptionPlan("overwrite" if stored else "insert", fields)
