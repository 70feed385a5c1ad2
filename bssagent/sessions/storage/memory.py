"""The in-process backend: the memory-only fallback, and a store for tests.

Nothing survives the process. A single lock makes every operation atomic, which is how
this backend keeps the contract's one-current-session rule across threads. Without
triggers, it keeps the event log, the tombstones and the limits itself: every change of a
stored session goes through :meth:`MemoryStore._replace`, which logs its event with
:func:`~bssagent.sessions.lifecycle.event_for_change` (the mirror of the SQL triggers).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

from ...errors import JournalFullError, SessionLimitError, StorageUnavailableError
from ..lifecycle import (
    ENDED,
    OPEN,
    Status,
    check_can_be_current,
    check_transition,
    event_for_change,
)
from ..model import SessionEvent, SessionStats, UserSession, freeze
from .adoption import plan_adoption
from .base import NO_LIMITS, Limits


def utcnow_after(previous: datetime | None = None) -> datetime:
    """The current UTC time, nudged past ``previous`` so ``updated_at`` always moves."""
    now = datetime.now(timezone.utc)
    if previous is not None and now <= previous:
        now = previous + timedelta(microseconds=1)
    return now


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


class MemoryStore:
    """Sessions in dicts, guarded by one lock. Satisfies :class:`~.base.SessionStore`.

    Args:
        limits: Session limits enforced when creating sessions.
    """

    backend = "memory"

    def __init__(self, limits: Limits = NO_LIMITS) -> None:
        self._lock = threading.Lock()
        self._limits = limits
        self._by_thread: dict[str, UserSession] = {}
        self._current: dict[tuple[str, str], str] = {}
        self._next_id = 1
        self._events: list[SessionEvent] = []
        self._next_seq = 1
        # Deleted thread -> whether its checkpoints were swept (insertion order = deletion).
        self._tombstones: dict[str, bool] = {}
        self._retained: set[str] = set()
        self.writes = 0
        """Sessions inserted, changed or deleted so far (the fallback's reconciliation
        compares it before and after a pass)."""
        self.read_only = False
        """Refuse every change (``StorageUnavailableError``): the ``read_only`` fallback."""
        self.capacity: int | None = None
        """Most sessions it may create (``JournalFullError`` beyond): the fallback's bound
        (``journal_limit``); sessions adopted from the cache do not count."""
        self.made = 0

    def _writable(self, operation: str) -> None:
        """Refuse a change when this store is a read-only fallback."""
        if self.read_only:
            raise StorageUnavailableError(
                f"the database is unavailable and the fallback is read-only: {operation} refused"
            )

    def _room(self) -> None:
        """Count a session about to be created; refuse it beyond :attr:`capacity`."""
        if self.capacity is not None and self.made >= self.capacity:
            raise JournalFullError(
                f"the database is down and {self.capacity} sessions made meanwhile are already "
                "kept for replay (journal_limit): a new session is refused"
            )
        self.made += 1

    def setup(self) -> None:
        """Nothing to set up."""

    def close(self) -> None:
        """Nothing to release; the data stays readable until the store is dropped."""

    def ping(self) -> None:
        """Memory is always reachable."""

    def get_current(self, namespace: str, user_id: str) -> UserSession | None:
        with self._lock:
            thread_id = self._current.get((namespace, user_id))
            return self._by_thread[thread_id] if thread_id else None

    def get_or_create(
        self, namespace: str, user_id: str, title: str, metadata: dict[str, Any], thread_id: str
    ) -> tuple[UserSession, bool]:
        with self._lock:
            current = self._current.get((namespace, user_id))
            if current:
                return self._by_thread[current], False
            self._writable("get_or_create")
            self._enforce_limits(namespace, user_id)
            self._room()
            return self._insert(namespace, user_id, title, metadata, thread_id), True

    def create(
        self, namespace: str, user_id: str, title: str, metadata: dict[str, Any], thread_id: str
    ) -> UserSession:
        self._writable("create")
        with self._lock:
            self._enforce_limits(namespace, user_id)
            self._room()
            self._deactivate(namespace, user_id)
            return self._insert(namespace, user_id, title, metadata, thread_id)

    def get(self, namespace: str, user_id: str, thread_id: str) -> UserSession | None:
        with self._lock:
            return self._owned(namespace, user_id, thread_id)

    def update(
        self, namespace: str, user_id: str, thread_id: str | None, fields: dict[str, Any]
    ) -> UserSession | None:
        self._writable("update")
        with self._lock:
            session = self._target(namespace, user_id, thread_id)
            return None if session is None else self._replace(session, **fields)

    def deactivate(self, namespace: str, user_id: str) -> UserSession | None:
        self._writable("deactivate")
        with self._lock:
            return self._deactivate(namespace, user_id)

    def switch(self, namespace: str, user_id: str, thread_id: str) -> UserSession | None:
        self._writable("switch")
        with self._lock:
            session = self._owned(namespace, user_id, thread_id)
            if session is None or session.is_active:
                return session
            check_can_be_current(session.status, session.parent_thread_id, thread_id)
            self._deactivate(namespace, user_id)
            return self._replace(session, is_active=True)

    def delete(self, namespace: str, user_id: str, thread_id: str) -> list[str]:
        self._writable("delete")
        with self._lock:
            session = self._owned(namespace, user_id, thread_id)
            if session is None:
                return []
            tree = [session, *self._descendants(session)]
            self._remove(sorted(tree, key=lambda s: s.id))
            return [s.thread_id for s in tree]  # the session's own thread first

    def list_active(self, namespace: str, limit: int, before_id: int | None) -> list[UserSession]:
        with self._lock:
            rows = [self._by_thread[t] for (ns, _), t in self._current.items() if ns == namespace]
        return _page(rows, limit, before_id)

    def list_user(
        self, namespace: str, user_id: str, limit: int, before_id: int | None
    ) -> list[UserSession]:
        with self._lock:
            rows = self._user_sessions(namespace, user_id)
        return _page(rows, limit, before_id)

    def adopt(self, session: UserSession) -> UserSession:
        with self._lock:
            if session.thread_id in self._tombstones:
                return session  # deleted meanwhile: a stale copy must not bring it back
            stored = self._by_thread.get(session.thread_id)
            current_thread = self._current.get((session.namespace, session.user_id))
            current = self._by_thread[current_thread] if current_thread else None
            plan = plan_adoption(session, stored, current)
            if stored is not None and plan.action == "keep":
                return stored
            if stored is not None:
                return self._replace(stored, touch=False, **plan.fields)
            fields = dict(plan.fields)
            title, metadata = fields.pop("title"), fields.pop("metadata")
            is_active = fields.pop("is_active")
            return self._insert(
                session.namespace,
                session.user_id,
                title,
                metadata,
                session.thread_id,
                is_active=is_active,
                created_at=session.created_at,
                **fields,
            )

    def sessions(self) -> list[UserSession]:
        """Every stored session, oldest first (used to reconcile after a fallback)."""
        with self._lock:
            return sorted(self._by_thread.values(), key=lambda s: s.id)

    # -- lifecycle --------------------------------------------------------------------------

    def transition(
        self, namespace: str, user_id: str, thread_id: str | None, target: Status, cascade: bool
    ) -> UserSession | None:
        self._writable("transition")
        with self._lock:
            session = self._target(namespace, user_id, thread_id)
            if session is None:
                return None
            check_transition(session.status, target, session.thread_id)
            if target not in ENDED:
                return self._replace(session, status=target)
            now = utcnow_after()
            updated = self._replace(session, status=target, is_active=False, ended_at=now)
            if cascade:
                for child in self._descendants(session):
                    if child.status in OPEN:
                        self._replace(child, status=target, is_active=False, ended_at=now)
            return updated

    def record_request(
        self,
        namespace: str,
        user_id: str,
        thread_id: str | None,
        processing_time: float,
        error: bool,
    ) -> UserSession | None:
        self._writable("record_request")
        with self._lock:
            session = self._target(namespace, user_id, thread_id)
            if session is None:
                return None
            # Counters are metrics, not a change: updated_at stays (as in the SQL backends).
            return self._replace(
                session,
                updated_at=session.updated_at,
                request_count=session.request_count + 1,
                error_count=session.error_count + int(error),
                total_processing_time=session.total_processing_time + processing_time,
            )

    def expire_idle(self, namespace: str, idle_before: datetime, batch: int) -> list[str]:
        self._writable("expire_idle")
        cutoff = _utc(idle_before)
        with self._lock:
            idle = sorted(
                (
                    s
                    for s in self._by_thread.values()
                    if s.namespace == namespace and s.status in OPEN and _activity(s) < cutoff
                ),
                key=lambda s: (_activity(s), s.id),
            )[: max(batch, 0)]
            # The idle sessions and their open descendants: children end with the parent.
            doomed = {s.thread_id: s for s in idle}
            for session in idle:
                for child in self._descendants(session):
                    if child.status in OPEN:
                        doomed.setdefault(child.thread_id, child)
            now = utcnow_after()
            for session in doomed.values():
                current = self._by_thread[session.thread_id]
                self._replace(current, touch=False, status="expired", is_active=False, ended_at=now)
            return [s.user_id for s in doomed.values()]

    def stats(self, namespace: str) -> SessionStats:
        with self._lock:
            return _aggregate(s for s in self._by_thread.values() if s.namespace == namespace)

    def user_stats(self, namespace: str, user_id: str) -> SessionStats:
        with self._lock:
            return _aggregate(self._user_sessions(namespace, user_id))

    def create_child(
        self,
        namespace: str,
        user_id: str,
        parent_thread_id: str,
        title: str,
        metadata: dict[str, Any],
        thread_id: str,
    ) -> UserSession | None:
        self._writable("create_child")
        with self._lock:
            if self._owned(namespace, user_id, parent_thread_id) is None:
                return None
            self._enforce_limits(namespace, user_id)
            self._room()
            return self._insert(
                namespace,
                user_id,
                title,
                metadata,
                thread_id,
                is_active=False,
                parent_thread_id=parent_thread_id,
            )

    def list_children(
        self, namespace: str, user_id: str, parent_thread_id: str, limit: int, before_id: int | None
    ) -> list[UserSession]:
        with self._lock:
            rows = [
                s
                for s in self._user_sessions(namespace, user_id)
                if s.parent_thread_id == parent_thread_id
            ]
        return _page(rows, limit, before_id)

    def events(
        self, namespace: str, user_id: str, thread_id: str | None, limit: int, after_seq: int | None
    ) -> list[SessionEvent]:
        after = after_seq or 0
        with self._lock:
            rows = [
                e
                for e in self._events
                if e.seq > after
                and e.namespace == namespace
                and e.user_id == user_id
                and (thread_id is None or e.thread_id == thread_id)
            ][: max(limit, 0)]
        # Copies: the payloads of the log are not the caller's to change.
        return [e.model_copy(deep=True) for e in rows]

    def delete_user(self, namespace: str, user_id: str) -> list[str]:
        self._writable("delete_user")
        with self._lock:
            doomed = sorted(self._user_sessions(namespace, user_id), key=lambda s: s.id)
            self._remove(doomed)
            # After the sessions: their "deleted" events go too.
            self._events = [
                e for e in self._events if e.namespace != namespace or e.user_id != user_id
            ]
            return [s.thread_id for s in doomed]

    def is_deleted(self, thread_id: str) -> bool:
        with self._lock:
            return thread_id in self._tombstones

    def owner(self, namespace: str, thread_id: str) -> str | None:
        with self._lock:
            session = self._by_thread.get(thread_id)
            return session.user_id if session and session.namespace == namespace else None

    def list_sessions(
        self,
        namespace: str,
        user_id: str | None,
        status: str | None,
        limit: int,
        before_id: int | None,
    ) -> list[UserSession]:
        with self._lock:
            rows = [
                s
                for s in self._by_thread.values()
                if s.namespace == namespace
                and user_id in (None, s.user_id)
                and status in (None, s.status)
            ]
        return _page(rows, limit, before_id)

    def count_idle(self, namespace: str, idle_before: datetime) -> int:
        cutoff = _utc(idle_before)
        with self._lock:
            return sum(
                1
                for s in self._by_thread.values()
                if s.namespace == namespace and s.status in OPEN and _activity(s) < cutoff
            )

    def schema_versions(self) -> list[int]:
        return []

    def unswept(self, limit: int) -> list[str]:
        with self._lock:
            return [t for t, swept in self._tombstones.items() if not swept][: max(limit, 0)]

    def mark_swept(self, thread_ids: list[str]) -> None:
        self._writable("mark_swept")
        with self._lock:
            for thread_id in thread_ids:
                if thread_id in self._tombstones:
                    self._tombstones[thread_id] = True

    def retention_due(self, namespace: str, ended_before: datetime, limit: int) -> list[str]:
        cutoff = _utc(ended_before)
        with self._lock:
            due = [
                (s.ended_at, s.thread_id)
                for s in self._by_thread.values()
                if s.namespace == namespace
                and s.ended_at is not None
                and s.ended_at < cutoff
                and s.thread_id not in self._retained
            ]
        due.sort()
        return [thread_id for _, thread_id in due[: max(limit, 0)]]

    def mark_retained(self, thread_ids: list[str]) -> None:
        self._writable("mark_retained")
        with self._lock:
            self._retained.update(t for t in thread_ids if t in self._by_thread)

    # The helpers below run with the lock held.

    def _owned(self, namespace: str, user_id: str, thread_id: str) -> UserSession | None:
        session = self._by_thread.get(thread_id)
        if session is None or session.namespace != namespace or session.user_id != user_id:
            return None
        return session

    def _target(self, namespace: str, user_id: str, thread_id: str | None) -> UserSession | None:
        """The user's ``thread_id`` session, or their current one when it is ``None``."""
        if thread_id is None:
            thread_id = self._current.get((namespace, user_id))
        return self._owned(namespace, user_id, thread_id) if thread_id else None

    def _user_sessions(self, namespace: str, user_id: str) -> list[UserSession]:
        return [
            s for s in self._by_thread.values() if s.namespace == namespace and s.user_id == user_id
        ]

    def _descendants(self, session: UserSession) -> list[UserSession]:
        """The session's children, their children, ... (same user), by id."""
        children: dict[str, list[UserSession]] = {}
        for s in self._user_sessions(session.namespace, session.user_id):
            if s.parent_thread_id is not None:
                children.setdefault(s.parent_thread_id, []).append(s)
        found: dict[str, UserSession] = {}
        frontier = [session.thread_id]
        while frontier:
            parent = frontier.pop()
            for child in children.get(parent, []):
                if child.thread_id not in found and child.thread_id != session.thread_id:
                    found[child.thread_id] = child
                    frontier.append(child.thread_id)
        return sorted(found.values(), key=lambda s: s.id)

    def _enforce_limits(self, namespace: str, user_id: str) -> None:
        """Raise SessionLimitError (or purge) before a creation; nothing changes unless the
        creation may go ahead (the SQL backends roll the purge back when they raise)."""
        limits = self._limits
        purge: list[UserSession] = []
        if limits.max_sessions_per_user is not None:
            mine = self._user_sessions(namespace, user_id)
            excess = len(mine) - limits.max_sessions_per_user + 1
            if excess > 0 and limits.on_user_limit == "purge":
                ended = sorted((s for s in mine if s.status in ENDED), key=lambda s: s.id)
                # With their descendants, as delete_session does: no orphaned children.
                chosen: dict[str, UserSession] = {}
                for session in ended[:excess]:
                    chosen.setdefault(session.thread_id, session)
                    for child in self._descendants(session):
                        chosen.setdefault(child.thread_id, child)
                purge = list(chosen.values())
                excess -= len(purge)
            if excess > 0:
                raise SessionLimitError(
                    f"user {user_id!r} has reached max_sessions_per_user="
                    f"{limits.max_sessions_per_user}"
                )
        if limits.max_active_sessions is not None:
            open_sessions = sum(
                1 for s in self._by_thread.values() if s.namespace == namespace and s.status in OPEN
            )
            if open_sessions >= limits.max_active_sessions:
                raise SessionLimitError(
                    f"namespace {namespace!r} has reached max_active_sessions="
                    f"{limits.max_active_sessions}"
                )
        self._remove(purge)

    def _insert(
        self,
        namespace: str,
        user_id: str,
        title: str,
        metadata: dict[str, Any],
        thread_id: str,
        *,
        is_active: bool = True,
        created_at: datetime | None = None,
        updated_at: datetime | None = None,
        parent_thread_id: str | None = None,
        **lifecycle: Any,
    ) -> UserSession:
        """Store a new session; ``lifecycle`` may carry the other columns (an adoption)."""
        self.writes += 1
        now = utcnow_after()
        lifecycle.setdefault("last_activity_at", now)
        session = UserSession(
            id=self._next_id,
            namespace=namespace,
            user_id=user_id,
            thread_id=thread_id,
            title=title,
            metadata=dict(metadata),
            created_at=created_at or now,
            updated_at=updated_at or now,
            is_active=is_active,
            parent_thread_id=parent_thread_id,
            **lifecycle,
        )
        self._next_id += 1
        self._by_thread[thread_id] = session
        if is_active:
            self._current[(namespace, user_id)] = thread_id
        payload = {} if parent_thread_id is None else {"parent_thread_id": parent_thread_id}
        self._log(session, "created", payload)
        return session

    def _deactivate(self, namespace: str, user_id: str) -> UserSession | None:
        thread_id = self._current.get((namespace, user_id))
        if thread_id is None:
            return None
        return self._replace(self._by_thread[thread_id], is_active=False)

    def _replace(self, session: UserSession, *, touch: bool = True, **changes: Any) -> UserSession:
        """The one place a stored session changes: applies ``changes``, moves ``updated_at``
        forward (unless given), sets ``last_activity_at`` with ``touch``, keeps the current
        session index and logs the change's event."""
        self.writes += 1
        changes.setdefault("updated_at", utcnow_after(session.updated_at))
        if touch:
            changes.setdefault("last_activity_at", utcnow_after())
        if "metadata" in changes:  # model_copy does not run validators: freeze it here
            changes["metadata"] = freeze(changes["metadata"])
        updated = session.model_copy(update=changes)
        self._by_thread[session.thread_id] = updated
        key = (session.namespace, session.user_id)
        if updated.is_active:
            self._current[key] = session.thread_id
        elif self._current.get(key) == session.thread_id:
            del self._current[key]
        event = event_for_change(_tracked(session), _tracked(updated))
        if event is not None:
            self._log(updated, *event)
        return updated

    def _remove(self, sessions: Iterable[UserSession]) -> None:
        """Delete ``sessions`` (in the given order), as the SQL delete triggers do: a
        "deleted" event and a tombstone each."""
        for session in sessions:
            self.writes += 1
            del self._by_thread[session.thread_id]
            key = (session.namespace, session.user_id)
            if self._current.get(key) == session.thread_id:
                del self._current[key]
            self._retained.discard(session.thread_id)
            self._tombstones.setdefault(session.thread_id, False)
            self._log(session, "deleted", {})

    def _log(self, session: UserSession, kind: str, payload: dict[str, Any]) -> None:
        self._events.append(
            SessionEvent(
                seq=self._next_seq,
                namespace=session.namespace,
                user_id=session.user_id,
                thread_id=session.thread_id,
                kind=kind,
                payload=payload,
                created_at=datetime.now(timezone.utc),
            )
        )
        self._next_seq += 1


def _tracked(session: UserSession) -> dict[str, Any]:
    """The fields :func:`event_for_change` compares."""
    return {
        "status": session.status,
        "is_active": session.is_active,
        "error_count": session.error_count,
        "title": session.title,
        "metadata": session.metadata,
    }


def _activity(session: UserSession) -> datetime:
    return session.last_activity_at or session.updated_at


def _aggregate(sessions: Iterable[UserSession]) -> SessionStats:
    rows = list(sessions)
    return SessionStats(
        sessions=len(rows),
        open_sessions=sum(1 for s in rows if s.status in OPEN),
        users=sum(1 for s in rows if s.is_active),
        requests=sum(s.request_count for s in rows),
        errors=sum(s.error_count for s in rows),
        total_processing_time=sum(s.total_processing_time for s in rows),
    )


def _page(rows: list[UserSession], limit: int, before_id: int | None) -> list[UserSession]:
    if before_id is not None:
        rows = [s for s in rows if s.id < before_id]
    rows.sort(key=lambda s: s.id, reverse=True)
    return rows[:limit]
