"""A bounded, thread-safe LRU cache with a time-to-live and newest-wins writes."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class VersionedLRU(Generic[K, V]):
    """Least-recently-used cache whose entries expire ``ttl`` seconds after being written.

    Every write carries a version (a session's ``updated_at``) and never replaces a newer
    one, so a slow read that finishes after a concurrent write cannot put stale data back.
    :meth:`invalidate` leaves a versioned tombstone for the same reason. All operations take
    one short lock and do no I/O: safe from threads and from async code.

    Args:
        maxsize: Entries kept (tombstones included); 0 disables the cache.
        ttl: Seconds an entry stays valid.
        clock: Monotonic clock, injectable for tests.
    """

    def __init__(
        self, maxsize: int, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._maxsize = maxsize
        self._ttl = ttl
        self._clock = clock
        # key -> (expires_at, version, value or None for a tombstone)
        self._data: OrderedDict[K, tuple[float, datetime, V | None]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """Return the live value for ``key`` (marking it recently used), or ``None``."""
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            if item[0] <= self._clock():
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return item[2]

    def put(self, key: K, value: V, version: datetime) -> None:
        """Store ``value`` unless a live entry with a newer version is present."""
        self._write(key, value, version)

    def invalidate(self, key: K, version: datetime) -> None:
        """Forget ``key``, and refuse older writes to it until the entry expires."""
        self._write(key, None, version)

    def _write(self, key: K, value: V | None, version: datetime) -> None:
        if self._maxsize <= 0:
            return
        with self._lock:
            now = self._clock()
            item = self._data.get(key)
            if item is not None and item[0] > now and item[1] > version:
                return
            self._data[key] = (now + self._ttl, version, value)
            self._data.move_to_end(key)
            while len(self._data) > self._maxsize:
                self._data.popitem(last=False)

    def clear(self) -> None:
        """Forget everything, tombstones included."""
        with self._lock:
            self._data.clear()

    def values(self) -> list[V]:
        """The live values (a snapshot)."""
        with self._lock:
            now = self._clock()
            return [v for expires, _, v in self._data.values() if v is not None and expires > now]

    def __len__(self) -> int:
        """The number of live values (tombstones not counted)."""
        return len(self.values())
