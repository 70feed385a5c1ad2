"""Run a synchronous store from async code without blocking the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from ..lifecycle import Status
from ..model import SessionEvent, SessionStats, UserSession
from .base import SessionStore

T = TypeVar("T")


class AsyncOffloaded:
    """Adapt a :class:`~.base.SessionStore` to :class:`~.base.AsyncSessionStore`.

    With ``offload`` (the default, for SQLite) each call runs in a worker thread through
    :func:`asyncio.to_thread`; without it (for the memory store, whose calls never block)
    calls run inline.
    """

    def __init__(self, store: SessionStore, *, offload: bool = True) -> None:
        self.sync = store
        self.backend = store.backend
        self._offload = offload

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._offload:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    async def setup(self) -> None:
        await self._run(self.sync.setup)

    async def close(self) -> None:
        await self._run(self.sync.close)

    async def ping(self) -> None:
        await self._run(self.sync.ping)

    async def get_current(self, namespace: str, user_id: str) -> UserSession | None:
        return await self._run(self.sync.get_current, namespace, user_id)

    async def get_or_create(
        self, namespace: str, user_id: str, title: str, metadata: dict[str, Any], thread_id: str
    ) -> tuple[UserSession, bool]:
        return await self._run(
            self.sync.get_or_create, namespace, user_id, title, metadata, thread_id
        )

    async def create(
        self, namespace: str, user_id: str, title: str, metadata: dict[str, Any], thread_id: str
    ) -> UserSession:
        return await self._run(self.sync.create, namespace, user_id, title, metadata, thread_id)

    async def get(self, namespace: str, user_id: str, thread_id: str) -> UserSession | None:
        return await self._run(self.sync.get, namespace, user_id, thread_id)

    async def update(
        self, namespace: str, user_id: str, thread_id: str | None, fields: dict[str, Any]
    ) -> UserSession | None:
        return await self._run(self.sync.update, namespace, user_id, thread_id, fields)

    async def deactivate(self, namespace: str, user_id: str) -> UserSession | None:
        return await self._run(self.sync.deactivate, namespace, user_id)

    async def switch(self, namespace: str, user_id: str, thread_id: str) -> UserSession | None:
        return await self._run(self.sync.switch, namespace, user_id, thread_id)

    async def delete(self, namespace: str, user_id: str, thread_id: str) -> list[str]:
        return await self._run(self.sync.delete, namespace, user_id, thread_id)

    async def list_active(
        self, namespace: str, limit: int, before_id: int | None
    ) -> list[UserSession]:
        return await self._run(self.sync.list_active, namespace, limit, before_id)

    async def list_user(
        self, namespace: str, user_id: str, limit: int, before_id: int | None
    ) -> list[UserSession]:
        return await self._run(self.sync.list_user, namespace, user_id, limit, before_id)

    async def adopt(self, session: UserSession) -> UserSession:
        return await self._run(self.sync.adopt, session)

    async def transition(
        self, namespace: str, user_id: str, thread_id: str | None, target: Status, cascade: bool
    ) -> UserSession | None:
        return await self._run(self.sync.transition, namespace, user_id, thread_id, target, cascade)

    async def record_request(
        self,
        namespace: str,
        user_id: str,
        thread_id: str | None,
        processing_time: float,
        error: bool,
    ) -> UserSession | None:
        return await self._run(
            self.sync.record_request, namespace, user_id, thread_id, processing_time, error
        )

    async def expire_idle(self, namespace: str, idle_before: datetime, batch: int) -> list[str]:
        return await self._run(self.sync.expire_idle, namespace, idle_before, batch)

    async def stats(self, namespace: str) -> SessionStats:
        return await self._run(self.sync.stats, namespace)

    async def user_stats(self, namespace: str, user_id: str) -> SessionStats:
        return await self._run(self.sync.user_stats, namespace, user_id)

    async def create_child(
        self,
        namespace: str,
        user_id: str,
        parent_thread_id: str,
        title: str,
        metadata: dict[str, Any],
        thread_id: str,
    ) -> UserSession | None:
        return await self._run(
            self.sync.create_child, namespace, user_id, parent_thread_id, title, metadata, thread_id
        )

    async def list_children(
        self, namespace: str, user_id: str, parent_thread_id: str, limit: int, before_id: int | None
    ) -> list[UserSession]:
        return await self._run(
            self.sync.list_children, namespace, user_id, parent_thread_id, limit, before_id
        )

    async def events(
        self, namespace: str, user_id: str, thread_id: str | None, limit: int, after_seq: int | None
    ) -> list[SessionEvent]:
        return await self._run(self.sync.events, namespace, user_id, thread_id, limit, after_seq)

    async def delete_user(self, namespace: str, user_id: str) -> list[str]:
        return await self._run(self.sync.delete_user, namespace, user_id)

    async def is_deleted(self, thread_id: str) -> bool:
        return await self._run(self.sync.is_deleted, thread_id)

    async def owner(self, namespace: str, thread_id: str) -> str | None:
        return await self._run(self.sync.owner, namespace, thread_id)

    async def list_sessions(
        self,
        namespace: str,
        user_id: str | None,
        status: str | None,
        limit: int,
        before_id: int | None,
    ) -> list[UserSession]:
        args = (namespace, user_id, status, limit, before_id)
        return await self._run(self.sync.list_sessions, *args)

    async def count_idle(self, namespace: str, idle_before: datetime) -> int:
        return await self._run(self.sync.count_idle, namespace, idle_before)

    async def schema_versions(self) -> list[int]:
        return await self._run(self.sync.schema_versions)

    async def unswept(self, limit: int) -> list[str]:
        return await self._run(self.sync.unswept, limit)

    async def mark_swept(self, thread_ids: list[str]) -> None:
        await self._run(self.sync.mark_swept, thread_ids)

    async def retention_due(self, namespace: str, ended_before: datetime, limit: int) -> list[str]:
        return await self._run(self.sync.retention_due, namespace, ended_before, limit)

    async def mark_retained(self, thread_ids: list[str]) -> None:
        await self._run(self.sync.mark_retained, thread_ids)
