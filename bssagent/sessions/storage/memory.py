"""The in-process backend: the memory-only fallback, and a store for tests.

Nothing survives the process. A single lock makes every operation atomic, which is how
this backend keeps the contract's one-current-session rule across threads.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from typing import Any

from ..model import UserSession, freeze
from .adoption import plan_adoption


def utcnow_after(previous: datetime | None = None) -> datetime:
    """The current UTC time, nudged past ``previous`` so ``updated_at`` always moves."""
    now = datetime.now(timezone.utc)
    if previous is not None and now <= previous:
        now = previous + timedelta(microseconds=1)
    return now


class MemoryStore:
    """Sessions in dicts, guarded by one lock. Satisfies :class:`~.base.SessionStore`."""

    backend = "memory"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_thread: dict[str, UserSession] = {}
        self._current: dict[tuple[str, str], str] = {}
        self._next_id = 1

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
            return self._insert(namespace, user_id, title, metadata, thread_id), True

    def create(
        self, namespace: str, user_id: str, title: str, metadata: dict[str, Any], thread_id: str
    ) -> UserSession:
        with self._lock:
            self._deactivate(namespace, user_id)
            return self._insert(namespace, user_id, title, metadata, thread_id)

    def get(self, namespace: str, user_id: str, thread_id: str) -> UserSession | None:
        with self._lock:
            return self._owned(namespace, user_id, thread_id)

    def update(
        self, namespace: str, user_id: str, thread_id: str | None, fields: dict[str, Any]
    ) -> UserSession | None:
        with self._lock:
            if thread_id is None:
                thread_id = self._current.get((namespace, user_id))
            session = self._owned(namespace, user_id, thread_id) if thread_id else None
            if session is None:
                return None
            return self._replace(session, **fields)

    def deactivate(self, namespace: str, user_id: str) -> UserSession | None:
        with self._lock:
            return self._deactivate(namespace, user_id)

    def switch(self, namespace: str, user_id: str, thread_id: str) -> UserSession | None:
        with self._lock:
            session = self._owned(namespace, user_id, thread_id)
            if session is None or session.is_active:
                return session
            self._deactivate(namespace, user_id)
            self._current[(namespace, user_id)] = thread_id
            return self._replace(session, is_active=True)

    def delete(self, namespace: str, user_id: str, thread_id: str) -> bool:
        with self._lock:
            session = self._owned(namespace, user_id, thread_id)
            if session is None:
                return False
            del self._by_thread[thread_id]
            if session.is_active:
                del self._current[(namespace, user_id)]
            return True

    def list_active(self, namespace: str, limit: int, before_id: int | None) -> list[UserSession]:
        with self._lock:
            rows = [self._by_thread[t] for (ns, _), t in self._current.items() if ns == namespace]
        return _page(rows, limit, before_id)

    def list_user(
        self, namespace: str, user_id: str, limit: int, before_id: int | None
    ) -> list[UserSession]:
        with self._lock:
            rows = [
                s
                for s in self._by_thread.values()
                if s.namespace == namespace and s.user_id == user_id
            ]
        return _page(rows, limit, before_id)

    def adopt(self, session: UserSession) -> UserSession:
        with self._lock:
            key = (session.namespace, session.user_id)
            stored = self._by_thread.get(session.thread_id)
            current_thread = self._current.get(key)
            current = self._by_thread[current_thread] if current_thread else None
            plan = plan_adoption(session, stored, current)
            if plan.action == "keep":
                assert stored is not None
                return stored
            changes = {"is_active": plan.is_active, "metadata": freeze(plan.metadata)}
            if stored is None:
                changes["id"] = self._next_id
                self._next_id += 1
            adopted = session.model_copy(update=changes)
            self._by_thread[session.thread_id] = adopted
            if plan.is_active:
                self._current[key] = session.thread_id
            elif current_thread == session.thread_id:
                del self._current[key]
            return adopted

    def sessions(self) -> list[UserSession]:
        """Every stored session, oldest first (used to reconcile after a fallback)."""
        with self._lock:
            return sorted(self._by_thread.values(), key=lambda s: s.id)

    # The helpers below run with the lock held.

    def _owned(self, namespace: str, user_id: str, thread_id: str) -> UserSession | None:
        session = self._by_thread.get(thread_id)
        if session is None or session.namespace != namespace or session.user_id != user_id:
            return None
        return session

    def _insert(
        self, namespace: str, user_id: str, title: str, metadata: dict[str, Any], thread_id: str
    ) -> UserSession:
        now = utcnow_after()
        session = UserSession(
            id=self._next_id,
            namespace=namespace,
            user_id=user_id,
            thread_id=thread_id,
            title=title,
            metadata=dict(metadata),
            created_at=now,
            updated_at=now,
            is_active=True,
        )
        self._next_id += 1
        self._by_thread[thread_id] = session
        self._current[(namespace, user_id)] = thread_id
        return session

    def _deactivate(self, namespace: str, user_id: str) -> UserSession | None:
        thread_id = self._current.pop((namespace, user_id), None)
        if thread_id is None:
            return None
        return self._replace(self._by_thread[thread_id], is_active=False)

    def _replace(self, session: UserSession, **changes: Any) -> UserSession:
        changes["updated_at"] = utcnow_after(session.updated_at)
        if "metadata" in changes:  # model_copy does not run validators: freeze it here
            changes["metadata"] = freeze(changes["metadata"])
        updated = session.model_copy(update=changes)
        self._by_thread[session.thread_id] = updated
        return updated


def _page(rows: list[UserSession], limit: int, before_id: int | None) -> list[UserSession]:
    if before_id is not None:
        rows = [s for s in rows if s.id < before_id]
    rows.sort(key=lambda s: s.id, reverse=True)
    return rows[:limit]
