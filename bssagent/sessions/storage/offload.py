"""Run a synchronous store from async code without blocking the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from ..model import UserSession
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

    async def delete(self, namespace: str, user_id: str, thread_id: str) -> bool:
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
