"""Hard deadlines for database calls: control returns to the caller in time, whatever the
server does.

``asyncio.wait_for`` around a psycopg query is not enough: on timeout it cancels the query
and then waits for psycopg's own cancellation, which against a hung or black-holed server
takes as long as the network gives up (about 10 s measured), and ``statement_timeout`` needs
a server that answers. So the call runs apart from its caller — a task (async) or a worker
thread (sync) — and the caller stops waiting at the deadline. The abandoned call finishes or
fails on its own later (TCP keepalives and ``tcp_user_timeout`` bound it) and its result is
dropped. The circuit breaker keeps abandoned calls few: once it opens, no new ones start.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..errors import StorageUnavailableError

T = TypeVar("T")


class DeadlineExceeded(StorageUnavailableError):
    """A database call outlived its deadline (to callers: a StorageUnavailableError)."""


def expired(seconds: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"database deadline of {seconds:g} s exceeded")


async def within(call: Awaitable[T], seconds: float) -> T:
    """Await ``call``, or raise StorageUnavailableError after ``seconds`` (the call is
    cancelled and left to end on its own)."""
    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if done:
        return task.result()
    task.cancel()
    task.add_done_callback(_drop)
    raise expired(seconds)


def _drop(finished: asyncio.Future[Any] | concurrent.futures.Future[Any]) -> None:
    # Retrieve the abandoned call's outcome, so nothing logs "exception never retrieved".
    if not finished.cancelled():
        finished.exception()


class Deadlines:
    """Runs sync calls on worker threads with a deadline (the sync twin of :func:`within`).

    Args:
        workers: Threads at most; calls beyond them queue, and the queueing counts against
            their deadline too.
    """

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def run(self, call: Callable[[], T], seconds: float) -> T:
        """``call()``, or StorageUnavailableError after ``seconds``."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self._workers, thread_name_prefix="bssagent-db"
            )
        future = self._pool.submit(call)
        try:
            return future.result(timeout=seconds)
        except concurrent.futures.TimeoutError:
            future.cancel()  # if still queued; a running call is left to end on its own
            future.add_done_callback(_drop)
            raise expired(seconds) from None

    def close(self) -> None:
        """Stop the worker threads once their calls end (without waiting for them)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
