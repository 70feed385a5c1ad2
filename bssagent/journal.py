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

    def _set(self, thread: str, latest: Latest | None) -> None:
        if self.size == 0:
            return
        with self._lock:
            self._latest[thread] = latest
            self._latest.move_to_end(thread)
            while len(self._latest) > self.size:
                self._latest.popitem(last=False)

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
        with self._lock:
            latest = self._latest.get(str(conf["thread_id"]))
            if latest is not None and latest.checkpoint["id"] == conf.get("checkpoint_id"):
                latest.writes.extend((task_id, c, v, path) for c, v in writes)

    def discard(self, thread: str) -> None:
        with self._lock:
            self._latest.pop(thread, None)


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

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self.inner.delete_for_runs(run_ids)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await self.inner.adelete_for_runs(run_ids)

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


def seed(memory: InMemorySaver, latest: Latest) -> None:
    """Put ``latest`` into ``memory`` as the thread's latest checkpoint, with its writes.

    Every channel's version counts as new, so every channel's value is stored (a put stores
    only the channels named in ``new_versions``)."""
    checkpoint = latest.checkpoint
    saved = memory.put(latest.parent_config, checkpoint, latest.metadata,
                       dict(checkpoint["channel_versions"]))  # fmt: skip
    for task_id, path, writes in _by_task(latest.writes):
        memory.put_writes(saved, writes, task_id, path)


def _by_task(writes: Sequence[Write]) -> list[tuple[str, str, list[tuple[str, Any]]]]:
    tasks: dict[tuple[str, str], list[tuple[str, Any]]] = {}
    for task_id, channel, value, path in writes:
        tasks.setdefault((task_id, path), []).append((channel, value))
    return [(task_id, path, w) for (task_id, path), w in tasks.items()]


@dataclass(frozen=True)
class Step:
    """One checkpoint to write back: ``put(parent, checkpoint, metadata, versions)``, then
    ``put_writes(config, writes, task_id)`` for each ``(task_id, writes)``."""

    parent: RunnableConfig
    checkpoint: Checkpoint
    metadata: CheckpointMetadata
    config: RunnableConfig
    writes: list[tuple[str, list[tuple[str, Any]]]]

    @property
    def versions(self) -> ChannelVersions:
        return dict(self.checkpoint["channel_versions"])


def memory_chain(memory: InMemorySaver, thread: str) -> list[CheckpointTuple]:
    """The thread's checkpoints in ``memory`` (every namespace), oldest first."""
    found = memory.list({"configurable": {"thread_id": thread}})
    return sorted(found, key=lambda t: t.checkpoint["id"])


def continues(head: str | None, base: str | None, chain: Sequence[CheckpointTuple]) -> bool:
    """Whether the database's latest checkpoint ``head`` is where the memory ``chain``
    started (``base``; None: from nothing) or a part of it already written back: then the
    chain continues the thread. Otherwise the thread moved on elsewhere meanwhile (or its
    history was not known when the outage began)."""
    return head == base or head in {t.checkpoint["id"] for t in chain}


def replay_steps(
    chain: Sequence[CheckpointTuple], thread: str, base: str | None, into: str | None = None
) -> list[Step]:
    """What to write to the database for a memory ``chain`` (see :func:`memory_chain`).

    Into the same thread, the checkpoint the chain started from (``base``) is already
    there and is skipped; into another thread (``into``), the whole chain is copied."""
    target = into or thread
    steps: list[Step] = []
    for t in chain:
        checkpoint_id = t.checkpoint["id"]
        if into is None and checkpoint_id == base:
            continue
        ns = str(t.config["configurable"].get("checkpoint_ns", ""))
        parent_id = (t.parent_config or {}).get("configurable", {}).get("checkpoint_id")
        parent = _config(target, ns, parent_id)
        tasks: dict[str, list[tuple[str, Any]]] = {}
        for task_id, channel, value in t.pending_writes or ():
            tasks.setdefault(task_id, []).append((channel, value))
        steps.append(Step(parent, t.checkpoint, t.metadata, _config(target, ns, checkpoint_id),
                          list(tasks.items())))  # fmt: skip
    return steps


class Journal:
    """What was written in memory while the database was down, for replay. Thread-safe.

    Args:
        limit: Most threads, and most store writes, it holds.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._threads: dict[str, str | None] = {}  # thread -> checkpoint its run started from
        self._ops: list[PutOp] = []
        self._targets: dict[str, str] = {}  # thread -> where its run goes instead (a merge)
        self.refused = 0
        """Writes refused because the journal was full (since the process started)."""

    def __bool__(self) -> bool:
        return bool(self._threads or self._ops)

    @property
    def has_ops(self) -> bool:
        return bool(self._ops)

    def add_thread(self, thread: str, base: str | None) -> None:
        """Journal ``thread`` (whose memory run started from checkpoint ``base``).

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
            self._threads[thread] = base

    def base(self, thread: str) -> tuple[bool, str | None]:
        """Whether ``thread`` is journaled, and the checkpoint its memory run started from."""
        with self._lock:
            return thread in self._threads, self._threads.get(thread)

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

    def take_ops(self) -> list[PutOp]:
        """The journaled store writes, oldest first, removed from the journal."""
        with self._lock:
            ops, self._ops = self._ops, []
            return ops

    def restore_ops(self, ops: list[PutOp]) -> None:
        """Put back writes taken by :meth:`take_ops` whose replay failed (before newer ones)."""
        with self._lock:
            self._ops[:0] = ops


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
