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
* **Lifecycle.** ``transition`` checks :data:`~bssagent.sessions.lifecycle.TRANSITIONS` on
  the locked row; ending a session clears ``is_active`` and sets ``ended_at``.
* **Metrics and events.** Counters move atomically in storage (no read-modify-write in
  Python); every change is logged in the event log; :meth:`SessionStore.stats` reads
  maintained aggregates, never a scan.
* **Deletion.** Deleting a session deletes its descendants, leaves a tombstone per thread,
  and the tombstones stay "unswept" until the checkpoints are deleted too.
* **Limits.** Creations honour the store's :class:`Limits` in the creating transaction,
  raising :class:`~bssagent.errors.SessionLimitError`.
* **Errors.** Driver errors are wrapped: connection-class failures as
  :class:`~bssagent.errors.StorageUnavailableError`, the rest as
  :class:`~bssagent.errors.StorageError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from ..lifecycle import Status
from ..model import SessionEvent, SessionStats, UserSession


@dataclass(frozen=True)
class Limits:
    """Session limits a store enforces when it creates a session (in the same transaction).

    Attributes:
        max_sessions_per_user: Sessions a user may have stored; ``None``: no limit.
        on_user_limit: ``"purge"`` deletes the user's oldest ended sessions to make room
            (raising only when none is ended); ``"raise"`` raises at once.
        max_active_sessions: Open sessions in the namespace; ``None``: no limit.
    """

    max_sessions_per_user: int | None = None
    on_user_limit: Literal["purge", "raise"] = "purge"
    max_active_sessions: int | None = None

    @property
    def any(self) -> bool:
        return self.max_sessions_per_user is not None or self.max_active_sessions is not None


NO_LIMITS = Limits()


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

    def delete(self, namespace: str, user_id: str, thread_id: str) -> list[str]:
        """Delete the user's ``thread_id`` session and its descendants; the deleted thread
        ids (empty if the session is not the user's)."""

    def list_active(self, namespace: str, limit: int, before_id: int | None) -> list[UserSession]:
        """A page of the namespace's active sessions, newest first."""

    def list_user(
        self, namespace: str, user_id: str, limit: int, before_id: int | None
    ) -> list[UserSession]:
        """A page of the user's sessions (active or not), newest first."""

    def transition(
        self, namespace: str, user_id: str, thread_id: str | None, target: Status, cascade: bool
    ) -> UserSession | None:
        """Move the user's session (``thread_id``, else the current one) to ``target``.

        With ``cascade`` (ended targets only), its open descendants end the same way.
        ``None`` if there is no such session; raises ``InvalidTransitionError`` if illegal.
        """

    def record_request(
        self,
        namespace: str,
        user_id: str,
        thread_id: str | None,
        processing_time: float,
        error: bool,
    ) -> UserSession | None:
        """Count one request (and its time, and whether it failed); bump last activity."""

    def expire_idle(self, namespace: str, idle_before: datetime, batch: int) -> list[str]:
        """Expire at most ``batch`` open sessions idle since before ``idle_before`` (oldest
        first; rows another process is expiring are skipped); their user ids."""

    def stats(self, namespace: str) -> SessionStats:
        """Aggregates of the namespace (maintained, not computed by a scan)."""

    def user_stats(self, namespace: str, user_id: str) -> SessionStats:
        """Aggregates of one user's sessions."""

    def create_child(
        self,
        namespace: str,
        user_id: str,
        parent_thread_id: str,
        title: str,
        metadata: dict[str, Any],
        thread_id: str,
    ) -> UserSession | None:
        """A new (not current) session under the user's ``parent_thread_id``; ``None`` if the
        parent is not the user's."""

    def list_children(
        self, namespace: str, user_id: str, parent_thread_id: str, limit: int, before_id: int | None
    ) -> list[UserSession]:
        """A page of the session's direct children, newest first."""

    def events(
        self, namespace: str, user_id: str, thread_id: str | None, limit: int, after_seq: int | None
    ) -> list[SessionEvent]:
        """A page of the user's events (of one thread, if given), oldest first."""

    def delete_user(self, namespace: str, user_id: str) -> list[str]:
        """Delete the user's sessions and events; the deleted thread ids."""

    def is_deleted(self, thread_id: str) -> bool:
        """Whether a tombstone marks ``thread_id`` as deleted."""

    def owner(self, namespace: str, thread_id: str) -> str | None:
        """The user whose session ``thread_id`` is, or ``None`` if it is none of ours."""

    def list_sessions(
        self,
        namespace: str,
        user_id: str | None,
        status: str | None,
        limit: int,
        before_id: int | None,
    ) -> list[UserSession]:
        """Sessions of the namespace, newest first, optionally of one user / in one status
        (for operators: ``bssagent sessions list``)."""

    def count_idle(self, namespace: str, idle_before: datetime) -> int:
        """How many open sessions were last active before ``idle_before`` (a dry run of
        :meth:`expire_idle`)."""

    def schema_versions(self) -> list[int]:
        """The migration versions applied to this table (none on memory)."""

    def unswept(self, limit: int) -> list[str]:
        """Deleted threads whose checkpoints have not been deleted yet."""

    def mark_swept(self, thread_ids: list[str]) -> None:
        """Record that the checkpoints of ``thread_ids`` are gone."""

    def retention_due(self, namespace: str, ended_before: datetime, limit: int) -> list[str]:
        """Threads of sessions ended before ``ended_before`` whose retention has not run."""

    def mark_retained(self, thread_ids: list[str]) -> None:
        """Record that the retention policy ran on ``thread_ids``."""

    def adopt(self, session: UserSession) -> UserSession:
        """Store a session written elsewhere (the memory fallback), idempotently.

        Follows :func:`~.adoption.plan_adoption`: the newer ``updated_at`` wins for a stored
        thread; a user never gets two current sessions, and if the user meanwhile got
        another current session, that one stays current and the adopted one is stored
        inactive with ``metadata["bssagent_merged"] = True``. A thread with a tombstone is
        not stored again (returned as given): deleted stays deleted.
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
    async def delete(self, namespace: str, user_id: str, thread_id: str) -> list[str]: ...
    async def list_active(
        self, namespace: str, limit: int, before_id: int | None
    ) -> list[UserSession]: ...
    async def list_user(
        self, namespace: str, user_id: str, limit: int, before_id: int | None
    ) -> list[UserSession]: ...
    async def adopt(self, session: UserSession) -> UserSession: ...
    async def transition(
        self, namespace: str, user_id: str, thread_id: str | None, target: Status, cascade: bool
    ) -> UserSession | None: ...
    async def record_request(
        self,
        namespace: str,
        user_id: str,
        thread_id: str | None,
        processing_time: float,
        error: bool,
    ) -> UserSession | None: ...
    async def expire_idle(self, namespace: str, idle_before: datetime, batch: int) -> list[str]: ...
    async def stats(self, namespace: str) -> SessionStats: ...
    async def user_stats(self, namespace: str, user_id: str) -> SessionStats: ...
    async def create_child(
        self,
        namespace: str,
        user_id: str,
        parent_thread_id: str,
        title: str,
        metadata: dict[str, Any],
        thread_id: str,
    ) -> UserSession | None: ...
    async def list_children(
        self, namespace: str, user_id: str, parent_thread_id: str, limit: int, before_id: int | None
    ) -> list[UserSession]: ...
    async def events(
        self, namespace: str, user_id: str, thread_id: str | None, limit: int, after_seq: int | None
    ) -> list[SessionEvent]: ...
    async def delete_user(self, namespace: str, user_id: str) -> list[str]: ...
    async def is_deleted(self, thread_id: str) -> bool: ...
    async def owner(self, namespace: str, thread_id: str) -> str | None: ...
    async def list_sessions(
        self,
        namespace: str,
        user_id: str | None,
        status: str | None,
        limit: int,
        before_id: int | None,
    ) -> list[UserSession]: ...
    async def count_idle(self, namespace: str, idle_before: datetime) -> int: ...
    async def schema_versions(self) -> list[int]: ...
    async def unswept(self, limit: int) -> list[str]: ...
    async def mark_swept(self, thread_ids: list[str]) -> None: ...
    async def retention_due(
        self, namespace: str, ended_before: datetime, limit: int
    ) -> list[str]: ...
    async def mark_retained(self, thread_ids: list[str]) -> None: ...
