"""The storage contract every backend implements, sync and async.

Stores are thin: they execute one logical operation each and map rows to
:class:`~bssagent.sessions.model.UserSession`. Validation, caching, id generation and the
fallback live in the manager. Arguments reaching a store have already been validated.

The contract, for every backend (the conformance suite in ``tests/`` checks each point):

* **One current session.** At most one session per ``(namespace, user_id)`` has
  ``is_active``; the storage itself enforces it (a partial unique index in SQL backends),
  so concurrent callers in several processes cannot break it.
* **get_or_create is race-free.** Concurrent calls for the same new user all return the
  same session, and none of them fails.
* **Ownership.** Every method taking a ``thread_id`` also takes the ``user_id`` and
  ``namespace`` and acts only on a row matching all three; a foreign or unknown thread
  looks the same: ``None`` / ``False``.
* **Timestamps.** ``updated_at`` moves forward on every change; both are timezone-aware UTC.
* **Pages.** Listings return at most ``limit`` rows, newest (highest ``id``) first, strictly
  below ``before_id`` when it is given.
* **Errors.** Driver errors are wrapped: connection-class failures as
  :class:`~bssagent.errors.StorageUnavailableError`, the rest as
  :class:`~bssagent.errors.StorageError`.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..model import UserSession


class SessionStore(Protocol):
    """The synchronous storage contract (see the module docstring)."""

    backend: str
    """``"postgres"``, ``"sqlite"`` or ``"memory"``."""

    def setup(self) -> None:
        """Connect and apply pending migrations; safe to call from many processes at once."""

    def close(self) -> None:
        """Release connections. Idempotent."""

    def ping(self) -> None:
        """Raise :class:`~bssagent.errors.StorageUnavailableError` if the backend is down."""

    def get_current(self, namespace: str, user_id: str) -> UserSession | None:
        """The user's active session, or ``None``."""

    def get_or_create(
        self, namespace: str, user_id: str, title: str, metadata: dict[str, Any], thread_id: str
    ) -> tuple[UserSession, bool]:
        """The active session, creating it with ``thread_id`` if there is none.

        Returns:
            The session and whether this call created it.
        """

    def create(
        self, namespace: str, user_id: str, title: str, metadata: dict[str, Any], thread_id: str
    ) -> UserSession:
        """Start a new current session; the previous one stays stored, inactive."""

    def get(self, namespace: str, user_id: str, thread_id: str) -> UserSession | None:
        """The user's session on ``thread_id`` (active or not), or ``None``."""

    def update(
        self, namespace: str, user_id: str, thread_id: str | None, fields: dict[str, Any]
    ) -> UserSession | None:
        """Apply ``fields`` (``title`` / ``metadata``) to ``thread_id`` or, if ``None``, to the
        current session; ``None`` if there is no such session."""

    def deactivate(self, namespace: str, user_id: str) -> UserSession | None:
        """Make the current session inactive; return it, or ``None`` if there was none."""

    def switch(self, namespace: str, user_id: str, thread_id: str) -> UserSession | None:
        """Make the user's ``thread_id`` session the current one; ``None`` if not theirs."""

    def delete(self, namespace: str, user_id: str, thread_id: str) -> bool:
        """Delete the user's ``thread_id`` session; whether a row was deleted."""

    def list_active(self, namespace: str, limit: int, before_id: int | None) -> list[UserSession]:
        """A page of the namespace's active sessions, newest first."""

    def list_user(
        self, namespace: str, user_id: str, limit: int, before_id: int | None
    ) -> list[UserSession]:
        """A page of the user's sessions (active or not), newest first."""

    def adopt(self, session: UserSession) -> UserSession:
        """Store a session written elsewhere (the memory fallback), idempotently.

        Follows :func:`~.adoption.plan_adoption`: the newer ``updated_at`` wins for a stored
        thread; a user never gets two current sessions, and if the user meanwhile got
        another current session, that one stays current and the adopted one is stored
        inactive with ``metadata["bssagent_merged"] = True``.
        """


class AsyncSessionStore(Protocol):
    """The asynchronous storage contract: :class:`SessionStore` with coroutines."""

    backend: str

    async def setup(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...
    async def get_current(self, namespace: str, user_id: str) -> UserSession | None: ...
    async def get_or_create(
        self, namespace: str, user_id: str, title: str, metadata: dict[str, Any], thread_id: str
    ) -> tuple[UserSession, bool]: ...
    async def create(
        self, namespace: str, user_id: str, title: str, metadata: dict[str, Any], thread_id: str
    ) -> UserSession: ...
    async def get(self, namespace: str, user_id: str, thread_id: str) -> UserSession | None: ...
    async def update(
        self, namespace: str, user_id: str, thread_id: str | None, fields: dict[str, Any]
    ) -> UserSession | None: ...
    async def deactivate(self, namespace: str, user_id: str) -> UserSession | None: ...
    async def switch(self, namespace: str, user_id: str, thread_id: str) -> UserSession | None: ...
    async def delete(self, namespace: str, user_id: str, thread_id: str) -> bool: ...
    async def list_active(
        self, namespace: str, limit: int, before_id: int | None
    ) -> list[UserSession]: ...
    async def list_user(
        self, namespace: str, user_id: str, limit: int, before_id: int | None
    ) -> list[UserSession]: ...
    async def adopt(self, session: UserSession) -> UserSession: ...
