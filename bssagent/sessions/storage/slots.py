"""Per-event-loop state: the PostgreSQL session store keeps its pool in a slot (one per loop
for the async store, one for the sync twin: the code generator turns ``AsyncSlot`` into
``Slot``), the agent's run locks theirs, and ``Persistence`` closes its per-loop pools with
:func:`on_loop_end`.

An asyncio pool belongs to the loop it was opened on: its connections and background tasks
die with that loop. An async manager used from a second loop (``asyncio.run`` twice, a test
framework with a loop per test) gets a pool of its own there instead of one it cannot use,
and each loop's pool is closed when that loop ends (``asyncio.run`` cancels the tasks left on
it, and a guard task closes the pool then).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class AsyncSlot(Generic[T]):
    """A value, and a lock guarding its creation, per running event loop.

    Args:
        close: Awaited on a loop's value when that loop ends with the value still set.
    """

    def __init__(self, close: Callable[[T], Awaitable[Any]] | None = None) -> None:
        self._close = close
        self._values: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self._guards: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
            weakref.WeakKeyDictionary()
        )

    def get(self) -> T | None:
        return self._values.get(asyncio.get_running_loop())

    def set(self, value: T) -> None:
        loop = asyncio.get_running_loop()
        self._values[loop] = value
        if self._close is not None:
            self._guards[loop] = on_loop_end(lambda: self._loop_ended(loop, value))

    async def _loop_ended(self, loop: asyncio.AbstractEventLoop, value: T) -> None:
        if self._values.get(loop) is not value:
            return  # popped (and closed) by its owner
        # Forget the loop: values referencing it would keep it (and themselves) alive.
        for held in (self._values, self._guards, self._locks):
            held.pop(loop, None)
        if self._close is not None:
            await self._close(value)

    def pop(self) -> T | None:
        loop = asyncio.get_running_loop()
        guard = self._guards.pop(loop, None)
        if guard is not None:
            guard.cancel()
        return self._values.pop(loop, None)

    def lock(self) -> asyncio.Lock:
        return self._locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())


class Slot(Generic[T]):
    """A value, and a lock guarding its creation (the sync twin of :class:`AsyncSlot`;
    ``close`` is for the async one's loops and unused here)."""

    def __init__(self, close: Callable[[T], Any] | None = None) -> None:
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


def on_loop_end(callback: Callable[[], Awaitable[Any]]) -> asyncio.Task[None]:
    """Await ``callback`` when the running loop ends (``asyncio.run`` cancels the tasks left
    on it), or when the returned task is cancelled: the callback must tell the two apart
    (its owner forgets what it cleaned up before cancelling). What the callback cannot close
    any more (a pool whose workers were cancelled with the loop) is closed on collection."""

    async def guard() -> None:
        try:
            await asyncio.get_running_loop().create_future()  # never set
        except asyncio.CancelledError:
            with contextlib.suppress(asyncio.CancelledError):
                await callback()
            raise

    return asyncio.get_running_loop().create_task(guard())


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
        with contextlib.suppress(RuntimeError):  # the loop closed since: the task died with it
            loop.call_soon_threadsafe(task.cancel)
