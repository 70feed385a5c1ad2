"""Where the PostgreSQL store keeps its pool: one per event loop for the async store, one for
the sync twin (the code generator turns ``AsyncSlot`` into ``Slot``).

An asyncio pool belongs to the loop it was opened on: its connections and background tasks
die with that loop. An async manager used from a second loop (``asyncio.run`` twice, a test
framework with a loop per test) gets a pool of its own there instead of one it cannot use.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Generic, TypeVar

T = TypeVar("T")


class AsyncSlot(Generic[T]):
    """A value, and a lock guarding its creation, per running event loop."""

    def __init__(self) -> None:
        self._values: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    def get(self) -> T | None:
        return self._values.get(asyncio.get_running_loop())

    def set(self, value: T) -> None:
        self._values[asyncio.get_running_loop()] = value

    def pop(self) -> T | None:
        return self._values.pop(asyncio.get_running_loop(), None)

    def lock(self) -> asyncio.Lock:
        return self._locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())


class Slot(Generic[T]):
    """A value, and a lock guarding its creation (the sync twin of :class:`AsyncSlot`)."""

    def __init__(self) -> None:
        self._value: T | None = None
        self._lock = threading.Lock()

    def get(self) -> T | None:
        return self._value

    def set(self, value: T) -> None:
        self._value = value

    def pop(self) -> T | None:
        value, self._value = self._value, None
        return value

    def lock(self) -> threading.Lock:
        return self._lock


def cancel(task: asyncio.Task[object] | None) -> None:
    """Cancel ``task`` on its own loop; nothing to do if that loop has closed (the task
    died with it)."""
    if task is None:
        return
    loop = task.get_loop()
    if loop.is_closed():
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if loop is running:
        task.cancel()
    else:
        loop.call_soon_threadsafe(task.cancel)
