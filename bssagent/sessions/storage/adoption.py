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

from ..model import UserSession, thaw

MERGED_KEY = "bssagent_merged"


@dataclass(frozen=True)
class AdoptionPlan:
    """What to do: ``keep`` the stored row, ``overwrite`` it, or ``insert`` a new one."""

    action: Literal["keep", "overwrite", "insert"]
    is_active: bool
    metadata: dict[str, Any]


def plan_adoption(
    incoming: UserSession, stored: UserSession | None, current: UserSession | None
) -> AdoptionPlan:
    """Decide how to adopt ``incoming``.

    Args:
        incoming: The session from memory.
        stored: The database's row for the same thread, if any.
        current: The database's current session of the user, if any.
    """
    metadata = thaw(incoming.metadata)
    if stored is not None and incoming.updated_at <= stored.updated_at:
        return AdoptionPlan("keep", stored.is_active, thaw(stored.metadata))
    taken = current is not None and current.thread_id != incoming.thread_id
    active = incoming.is_active and not taken
    if incoming.is_active and not active:
        metadata[MERGED_KEY] = True
    return AdoptionPlan("overwrite" if stored else "insert", active, metadata)
