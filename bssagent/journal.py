"""Conversations through an outage: what lets a run continue in memory while PostgreSQL is
down, and what is written back when it returns.

* :class:`LatestCheckpoints` remembers, per thread, the latest checkpoint the database saver
  wrote or read (a bounded LRU of references, no I/O). :class:`RecordingSaver` is the thin
  wrapper around LangGraph's own saver that feeds it; every call is LangGraph's.
* When runs fall back to the memory saver, :func:`seed` puts the thread's latest checkpoint
  into it first, so the conversation keeps its context.
* :class:`Journal` lists the threads that ran in memory (and from which checkpoint they
  started) and the store writes made meanwhile; it is bounded by ``journal_limit``, beyond
  which new writes raise :class:`~bssagent.errors.JournalFullError` instead of being accepted
  and lost.
* :func:`replay_steps` says what to write back: the thread's memory checkpoints oldest first,
  each with its pending writes. Writing them is idempotent (LangGraph's savers upsert by
  checkpoint id); the caller decides where (:func:`continues`).

Only checkpoints of the root namespace are remembered for seeding (subgraph checkpoints are
per run); graphs with ``DeltaChannel`` state keep only part of a channel in one checkpoint and
are not seeded.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
)
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.store.base import BaseStore, Op, PutOp, Result

from .errors import JournalFullError

Write = tuple[str, str, Any, str]  # task_id, channel, value, task_path


def _config(thread: str, ns: str = "", checkpoint_id: str | None = None) -> RunnableConfig:
    conf: dict[str, Any] = {"thread_id": thread, "checkpoint_ns": ns}
    if checkpoint_id:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


@dataclass
class Latest:
    """A thread's latest root checkpoint: what ``put`` got, and the writes made on it."""

    parent_config: RunnableConfig
    checkpoint: Checkpoint
    metadata: CheckpointMetadata
    writes: list[Write] = field(default_factory=list)


class LatestCheckpoints:
    """Thread -> its latest root checkpoint (or None: known to have none), least recently
    used dropped first. Thread-safe.

    Args:
        size: Threads remembered (0 remembers none).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._latest: OrderedDict[str, Latest | None] = OrderedDict()
        # Writes for a checkpoint whose put has not arrived yet: LangGraph saves a step's
        # writes without waiting for the step's checkpoint (durability="async").
        self._early: dict[str, tuple[str, list[Write]]] = {}

    def _set(self, thread: str, latest: Latest | None) -> None:
        if self.size == 0:
            return
        with self._lock:
            known = self._latest.get(thread)
            # A read that began before a newer put must not take the thread back in time
            # (only delete_thread, through discard(), removes a thread's checkpoints).
            if known is not None and (
                latest is None or latest.checkpoint["id"] < known.checkpoint["id"]
            ):
                return
            early = self._early.pop(thread, None)
            if latest is not None and early is not None and early[0] == latest.checkpoint["id"]:
                latest.writes.extend(early[1])
            self._latest[thread] = latest
            self._latest.move_to_end(thread)
            while len(self._latest) > self.size:
                evicted, _ = self._latest.popitem(last=False)
                self._early.pop(evicted, None)

    def lookup(self, thread: str) -> tuple[bool, Latest | None]:
        """Whether the thread is known, and its latest checkpoint (None: it has none)."""
        with self._lock:
            if thread not in self._latest:
                return False, None
            return True, self._latest[thread]

    def read(self, config: RunnableConfig, found: CheckpointTuple | None) -> None:
        """A ``get_tuple`` of the thread's latest root checkpoint returned ``found``."""
        conf = config.get("configurable", {})
        if conf.get("checkpoint_id") or conf.get("checkpoint_ns", ""):
            return  # a past checkpoint, or a subgraph's
        thread = str(conf["thread_id"])
        if found is None:
            self._set(thread, None)
            return
        writes = [(t, c, v, "") for t, c, v in found.pending_writes or ()]
        self._set(thread, Latest(found.parent_config or _config(thread), found.checkpoint,
                                 found.metadata, writes))  # fmt: skip

    def put(self, config: RunnableConfig, checkpoint: Checkpoint, meta: CheckpointMetadata) -> None:
        """The saver stored ``checkpoint`` (``config`` names its parent)."""
        conf = config["configurable"]
        if not conf.get("checkpoint_ns", ""):
            self._set(str(conf["thread_id"]), Latest(config, checkpoint, meta))

    def add_writes(
        self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str, path: str
    ) -> None:
        """The saver stored ``writes`` of a task run from the checkpoint ``config`` names."""
        conf = config["configurable"]
        if self.size == 0 or conf.get("checkpoint_ns", ""):
            return
        thread, checkpoint_id = str(conf["thread_id"]), str(conf.get("checkpoint_id"))
        added = [(task_id, c, v, path) for c, v in writes]
        with self._lock:
            latest = self._latest.get(thread)
            if latest is not None and latest.checkpoint["id"] == checkpoint_id:
                latest.writes.extend(added)
            elif latest is None or checkpoint_id > latest.checkpoint["id"]:
                early = self._early.get(thread)
                if early is None or early[0] != checkpoint_id:
                    early = self._early[thread] = (checkpoint_id, [])
                early[1].extend(added)

    def discard(self, thread: str) -> None:
        with self._lock:
            self._latest.pop(thread, None)
            self._early.pop(thread, None)

    def clear(self) -> None:
        with self._lock:
            self._latest.clear()
            self._early.clear()


class RecordingSaver(BaseCheckpointSaver[Any]):
    """LangGraph's saver ``inner``, unchanged, telling ``latest`` what it wrote and read.

    Every method delegates; ``put_writes`` keeps LangGraph's ``task_path`` parameter (the
    graph loop checks the signature for it).
    """

    def __init__(self, inner: BaseCheckpointSaver[Any], latest: LatestCheckpoints) -> None:
        super().__init__(serde=inner.serde)
        self.inner = inner
        self.latest = latest

    @property
    def config_specs(self) -> list[Any]:
        return self.inner.config_specs

    def get_next_version(self, current: Any, channel: None) -> Any:
        return self.inner.get_next_version(current, channel)

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        found = self.inner.get_tuple(config)
        self.latest.read(config, found)
        return found

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        found = await self.inner.aget_tuple(config)
        self.latest.read(config, found)
        return found

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        return self.inner.list(config, filter=filter, before=before, limit=limit)

    def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        return self.inner.alist(config, filter=filter, before=before, limit=limit)

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        saved = self.inner.put(config, checkpoint, metadata, new_versions)
        self.latest.put(config, checkpoint, metadata)
        return saved

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        saved = await self.inner.aput(config, checkpoint, metadata, new_versions)
        self.latest.put(config, checkpoint, metadata)
        return saved

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        self.inner.put_writes(config, writes, task_id, task_path)
        self.latest.add_writes(config, writes, task_id, task_path)

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        await self.inner.aput_writes(config, writes, task_id, task_path)
        self.latest.add_writes(config, writes, task_id, task_path)

    def delete_thread(self, thread_id: str) -> None:
        self.inner.delete_thread(thread_id)
        self.latest.discard(thread_id)

    async def adelete_thread(self, thread_id: str) -> None:
        await self.inner.adelete_thread(thread_id)
        self.latest.discard(thread_id)

    # Which threads the runs touched is not known here: forget them all.
    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self.inner.delete_for_runs(run_ids)
        self.latest.clear()

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await self.inner.adelete_for_runs(run_ids)
        self.latest.clear()

    def with_allowlist(self, extra_allowlist: Collection[tuple[str, ...]]) -> RecordingSaver:
        return RecordingSaver(self.inner.with_allowlist(extra_allowlist), self.latest)

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self.inner.copy_thread(source_thread_id, target_thread_id)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await self.inner.acopy_thread(source_thread_id, target_thread_id)

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self.inner.prune(thread_ids, strategy=strategy)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        await self.inner.aprune(thread_ids, strategy=strategy)

    def get_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, Any]:
        return self.inner.get_delta_channel_history(config=config, channels=channels)

    async def aget_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, Any]:
        return await self.inner.aget_delta_channel_history(config=config, channels=channels)


Snapshot = dict[Any, Any]
"""The writes ``InMemorySaver`` keeps on one checkpoint, as stored (serialized)."""


def _stored_writes(memory: InMemorySaver, thread: str, ns: str, checkpoint_id: str) -> Snapshot:
    """The writes ``memory`` holds on a checkpoint: ``(task_id, idx) -> (task_id, channel,
    serialized value, task_path)``. LangGraph's ``pending_writes`` drop the task path, which
    PostgreSQL orders writes by; ``InMemorySaver`` keeps it in ``writes``."""
    stored = getattr(memory, "writes", None)
    if isinstance(stored, Mapping):
        return dict(stored.get((thread, ns, checkpoint_id), {}))
    found = memory.get_tuple(_config(thread, ns, checkpoint_id))  # another layout: no paths
    writes = (found.pending_writes if found is not None else None) or []
    return {(t, i): (t, c, memory.serde.dumps_typed(v), "") for i, (t, c, v) in enumerate(writes)}


def seed(memory: InMemorySaver, latest: Latest) -> Snapshot:
    """Put ``latest`` into ``memory`` as the thread's latest checkpoint, with its writes;
    returns those writes as stored (what a run adds to them is new).

    Every channel's version counts as new, so every channel's value is stored (a put stores
    only the channels named in ``new_versions``)."""
    checkpoint = latest.checkpoint
    saved = memory.put(latest.parent_config, checkpoint, latest.metadata,
                       dict(checkpoint["channel_versions"]))  # fmt: skip
    for task_id, path, writes in _by_task(latest.writes):
        memory.put_writes(saved, writes, task_id, path)
    thread = str(saved["configurable"]["thread_id"])
    return _stored_writes(memory, thread, "", checkpoint["id"])


def _by_task(writes: Iterable[Write]) -> list[tuple[str, str, list[tuple[str, Any]]]]:
    tasks: dict[tuple[str, str], list[tuple[str, Any]]] = {}
    for task_id, channel, value, path in writes:
        tasks.setdefault((task_id, path), []).append((channel, value))
    return [(task_id, path, w) for (task_id, path), w in tasks.items()]


@dataclass(frozen=True)
class Saved:
    """One checkpoint of a memory run, with the writes made on it (as stored)."""

    ns: str
    parent_id: str | None
    checkpoint: Checkpoint
    metadata: CheckpointMetadata
    writes: Snapshot

    @property
    def id(self) -> str:
        return str(self.checkpoint["id"])


@dataclass(frozen=True)
class Step:
    """One checkpoint to write back: ``put(parent, checkpoint, metadata, versions)`` (unless
    ``put`` is false: the checkpoint is there, only writes made on it are new), then
    ``put_writes(config, writes, task_id, task_path)`` for each ``(task_id, path, writes)``."""

    parent: RunnableConfig
    checkpoint: Checkpoint
    metadata: CheckpointMetadata
    config: RunnableConfig
    writes: list[tuple[str, str, list[tuple[str, Any]]]]
    put: bool = True

    @property
    def versions(self) -> ChannelVersions:
        return dict(self.checkpoint["channel_versions"])


def memory_chain(memory: InMemorySaver, thread: str) -> list[Saved]:
    """The thread's checkpoints in ``memory`` (every namespace), oldest first."""
    chain = []
    for t in memory.list({"configurable": {"thread_id": thread}}):
        ns = str(t.config["configurable"].get("checkpoint_ns", ""))
        parent = (t.parent_config or {}).get("configurable", {}).get("checkpoint_id")
        writes = _stored_writes(memory, thread, ns, t.checkpoint["id"])
        chain.append(Saved(ns, parent, t.checkpoint, t.metadata, writes))
    return sorted(chain, key=lambda saved: saved.id)


def continues(head: str | None, base: str | None, chain: Sequence[Saved]) -> bool:
    """Whether the database's latest checkpoint ``head`` is where the memory ``chain``
    started (``base``; None: from nothing) or a part of it already written back: then the
    chain continues the thread. Otherwise the thread moved on elsewhere meanwhile (or its
    history was not known when the outage began)."""
    return head == base or head in {saved.id for saved in chain}


def replay_steps(
    memory: InMemorySaver,
    chain: Sequence[Saved],
    thread: str,
    base: str | None,
    seeded: Snapshot,
    into: str | None = None,
) -> list[Step]:
    """What to write to the database for a memory ``chain`` (see :func:`memory_chain`); an
    empty list when the run wrote nothing.

    Into the same thread, the checkpoint the chain started from (``base``) is there already
    with the ``seeded`` writes: only writes made on it since (a resume value, a new
    interrupt) are written. Into another thread (``into``), the whole chain is copied, its
    first checkpoint without a parent (the parent is the other thread's)."""
    target = into or thread
    ids = {saved.id for saved in chain}
    steps: list[Step] = []
    for saved in chain:
        writes = saved.writes
        is_base = into is None and saved.id == base
        if is_base:
            writes = {k: w for k, w in writes.items() if seeded.get(k) != w}
            if not writes:
                continue
        grouped = _by_task(
            (task_id, channel, memory.serde.loads_typed(value), path)
            for task_id, channel, value, path in writes.values()
        )
        parent = saved.parent_id if into is None or saved.parent_id in ids else None
        steps.append(
            Step(
                _config(target, saved.ns, parent),
                saved.checkpoint,
                saved.metadata,
                _config(target, saved.ns, saved.id),
                grouped,
                put=not is_base,
            )
        )
    return steps


class Journal:
    """What was written in memory while the database was down, for replay. Thread-safe.

    Args:
        limit: Most threads, and most store writes, it holds.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        # thread -> the checkpoint its run started from, and the writes it had then
        self._threads: dict[str, tuple[str | None, Snapshot]] = {}
        self._ops: list[PutOp] = []
        self._targets: dict[str, str] = {}  # thread -> where its run goes instead (a merge)
        self.refused = 0
        """Writes refused because the journal was full (since the process started)."""

    def __bool__(self) -> bool:
        return bool(self._threads or self._ops)

    @property
    def has_ops(self) -> bool:
        return bool(self._ops)

    def add_thread(self, thread: str, base: str | None, seeded: Snapshot | None = None) -> None:
        """Journal ``thread``, whose memory run started from checkpoint ``base`` holding the
        ``seeded`` writes.

        Raises:
            JournalFullError: ``limit`` threads are journaled already.
        """
        with self._lock:
            if thread in self._threads:
                return
            if len(self._threads) >= self.limit:
                self.refused += 1
                raise JournalFullError(
                    f"the database is down and {self.limit} conversations are already kept "
                    "for replay (journal_limit): a run on another thread is refused"
                )
            self._threads[thread] = (base, seeded or {})

    def base(self, thread: str) -> tuple[bool, str | None, Snapshot]:
        """Whether ``thread`` is journaled, the checkpoint its memory run started from, and
        the writes that checkpoint had then."""
        with self._lock:
            found = self._threads.get(thread)
        return (False, None, {}) if found is None else (True, *found)

    def seeded(self, thread: str, seeded: Snapshot) -> None:
        with self._lock:
            if thread in self._threads:
                self._threads[thread] = (self._threads[thread][0], seeded)

    def threads(self) -> list[str]:
        with self._lock:
            return list(self._threads)

    def target(self, thread: str, new: Callable[[], str]) -> str:
        """Where ``thread``'s memory run is copied when it cannot continue the thread: made
        by ``new`` once, so a replay retried after a failure reuses it."""
        with self._lock:
            found = self._targets.get(thread)
        if found is None:
            found = new()
            with self._lock:
                found = self._targets.setdefault(thread, found)
        return found

    async def atarget(self, thread: str, new: Callable[[], Awaitable[str]]) -> str:
        """Async :meth:`target`."""
        with self._lock:
            found = self._targets.get(thread)
        if found is None:
            found = await new()
            with self._lock:
                found = self._targets.setdefault(thread, found)
        return found

    def done(self, thread: str) -> None:
        """``thread`` was written back (or deleted): forget it."""
        with self._lock:
            self._threads.pop(thread, None)
            self._targets.pop(thread, None)

    def add_ops(self, ops: Sequence[Op]) -> None:
        """Journal the store writes among ``ops`` (reads are not journaled).

        Raises:
            JournalFullError: They would take the journal past ``limit`` writes.
        """
        puts = [op for op in ops if isinstance(op, PutOp)]
        if not puts:
            return
        with self._lock:
            if len(self._ops) + len(puts) > self.limit:
                self.refused += 1
                raise JournalFullError(
                    f"the database is down and {self.limit} store writes are already kept "
                    "for replay (journal_limit): this write is refused"
                )
            self._ops.extend(puts)

    def peek_ops(self) -> list[PutOp]:
        """The journaled store writes, oldest first (they stay journaled until
        :meth:`drop_ops`: meanwhile, store calls know a write-back is due)."""
        with self._lock:
            return list(self._ops)

    def drop_ops(self, count: int) -> None:
        """The first ``count`` journaled store writes are done with."""
        with self._lock:
            del self._ops[:count]


class JournalingStore(BaseStore):
    """The memory store of an outage: LangGraph's ``InMemoryStore`` (``inner``), each write
    also journaled for replay, and refused (``JournalFullError``) once the journal is full."""

    def __init__(self, inner: BaseStore, journal: Journal) -> None:
        self.inner = inner
        self.journal = journal

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        listed = list(ops)
        self.journal.add_ops(listed)
        return self.inner.batch(listed)

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        listed = list(ops)
        self.journal.add_ops(listed)
        return await self.inner.abatch(listed)
