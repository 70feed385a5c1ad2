"""``BaseAgent``: a LangGraph graph with durable, per-user, one-run-at-a-time threads."""

from __future__ import annotations

import abc
import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager, suppress
from types import TracebackType
from typing import Any, cast

from langchain_core.runnables import RunnableConfig
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import StateGraph
from langgraph.pregel import Pregel
from langgraph.store.base import BaseStore, IndexConfig
from langgraph.types import Command, StateSnapshot
from typing_extensions import Self

from .. import observability as observe
from ..config import Settings
from ..errors import (
    BssAgentError,
    ConfigurationError,
    InvalidInputError,
    InvalidTransitionError,
    SessionNotFoundError,
    StorageUnavailableError,
    ThreadBusyError,
)
from ..persistence import Persistence, Saver
from ..sessions import validation
from ..sessions.manager_async import AsyncAgentSessionManager
from ..sessions.manager_sync import AgentSessionManager
from ..sessions.model import UserSession
from ..sessions.storage.memory import MemoryStore
from ..sessions.storage.offload import AsyncOffloaded
from ..store_scope import Namespace, ScopedStore, session_root, user_root
from .run_lock import RunLocks, RunStrategy

logger = logging.getLogger("bssagent.agent")
MERGED_TITLE = "Kept from an outage"
_SYNC_ONLY = {"SqliteSaver", "PostgresSaver", "ShallowPostgresSaver"}
_ASYNC_ONLY = {"AsyncSqliteSaver", "AsyncPostgresSaver", "AsyncShallowPostgresSaver"}


def _check_pairing(saver: Saver, want_async: bool) -> None:
    # The library's own savers are wrapped (bssagent.journal.RecordingSaver): check LangGraph's.
    names = {cls.__name__ for cls in type(getattr(saver, "inner", saver)).__mro__}
    if want_async and names & _SYNC_ONLY:
        raise ConfigurationError(
            f"{type(saver).__name__} only supports sync calls: use invoke/stream, or give the "
            "agent an async saver for ainvoke/astream"
        )
    if not want_async and names & _ASYNC_ONLY:
        raise ConfigurationError(
            f"{type(saver).__name__} only supports async calls: use ainvoke/astream, or give "
            "the agent a sync saver for invoke/stream"
        )


def _runnable(session: UserSession) -> str:
    """The session's thread, if runs may go to it: open and not paused."""
    if session.status != "active":
        hint = "resume it first" if session.status == "paused" else "start a new session"
        raise InvalidTransitionError(f"session {session.thread_id!r} is {session.status}: {hint}")
    return session.thread_id


def _copied(graph: Pregel[Any, Any, Any, Any], **update: Any) -> Pregel[Any, Any, Any, Any]:
    """``graph.copy(update=...)``, keeping the msgpack allowlist ``compile()`` derived from
    the graph's schemas: ``Pregel.copy`` drops it, and with ``LANGGRAPH_STRICT_MSGPACK`` on,
    LangGraph gives it to the saver on every run (without it, the state's own types come
    back as dicts)."""
    copy = graph.copy(update=update)
    allowlist = getattr(graph, "_serde_allowlist", None)
    if allowlist is not None:
        copy._serde_allowlist = allowlist
    return copy


def _replay_stopped(exc: BaseException) -> None:
    logger.warning(
        "bssagent: writing back the outage journal stopped (%s); the next run retries",
        type(exc).__name__,
    )


def _deleted(thread_id: str) -> SessionNotFoundError:
    return SessionNotFoundError(f"thread {thread_id!r} belonged to a deleted session")


class BaseAgent(abc.ABC):
    """Subclass it, build a LangGraph graph in :meth:`define_graph`, and run it per user.

    One instance serves every user and conversation: threads isolate conversations, so
    never create an agent per request. The graph is compiled with a checkpointer on the
    same database as the session registry (LangGraph's own savers), unless you compiled
    it with your own.

    Each call takes the conversation from ``config["configurable"]["thread_id"]`` (the
    seed's way), or from ``user_id=`` (the user's current session, created if needed),
    optionally with ``thread_id=`` to pick one of the user's sessions (ownership-checked).

    Runs on one thread never interleave (see :mod:`bssagent.agent.run_lock`).

    While PostgreSQL is unreachable (``fallback="memory"``), runs go on in memory, each
    thread starting from its latest checkpoint when the agent knows it, and what they wrote
    is written back when the database returns (:meth:`replay_journal`; see
    :mod:`bssagent.journal`).

    Nodes get a LangGraph store (``store: BaseStore`` or ``runtime.store``) scoped to the
    run's user: namespaces are relative to that user's memory, so a node reads and writes
    ``("preferences",)`` or ``("memories",)`` of this user and cannot name another user's
    (see :mod:`bssagent.store_scope`). The user is ``user_id=``, else the owner of the
    thread in the registry; a thread nobody owns gets memory of its own. The user id is
    also in ``config["configurable"]["user_id"]`` for ``user_id=`` runs.

    Args:
        name: The agent's name.
        description: What it does.
        checkpointer: A LangGraph saver to use instead of the default one.
        memory_store: A LangGraph store to use instead of the default one (still scoped
            per user).
        memory_index: LangGraph's ``IndexConfig`` for semantic search in the default store.
        session_manager: The registry for ``user_id=`` calls; default: one built from
            ``settings`` (sync and async twins are made from each other's settings).
        settings: Configuration; default: from the environment (or the manager's).
        run_strategy: ``"enqueue"`` (wait for the thread) or ``"reject"``
            (raise :class:`~bssagent.errors.ThreadBusyError`); per call too.
        run_timeout: Seconds an ``enqueue`` run waits for the thread.

    Raises:
        ConfigurationError: :meth:`define_graph` set no graph.
    """

    def __init__(
        self,
        name: str,
        description: str = "",
        *,
        checkpointer: BaseCheckpointSaver[Any] | None = None,
        memory_store: BaseStore | None = None,
        memory_index: IndexConfig | None = None,
        session_manager: AgentSessionManager | AsyncAgentSessionManager | None = None,
        settings: Settings | None = None,
        run_strategy: RunStrategy = "enqueue",
        run_timeout: float = 30.0,
    ) -> None:
        if not isinstance(name, str) or not name.strip():
            raise InvalidInputError("name", "must be a non-empty string")
        if run_strategy not in ("enqueue", "reject"):
            raise InvalidInputError("run_strategy", "must be 'enqueue' or 'reject'")
        self.name = name
        self.description = description
        self._sm: AgentSessionManager | None = None
        self._asm: AsyncAgentSessionManager | None = None
        self._owned_managers: list[AgentSessionManager | AsyncAgentSessionManager] = []
        self._manager_lock = threading.Lock()
        if isinstance(session_manager, AgentSessionManager):
            self._sm = session_manager
        elif isinstance(session_manager, AsyncAgentSessionManager):
            self._asm = session_manager
        self.settings = (
            session_manager.settings if session_manager is not None else settings or Settings()
        )
        # One set of savers per database: shared with the manager, so deleting a session
        # through the manager deletes the checkpoints this agent wrote (memory:// too).
        self._persistence = (
            session_manager.persistence
            if session_manager is not None
            else Persistence(self.settings, store=memory_store, index=memory_index)
        )
        self._own_store = memory_store
        self._locks = RunLocks(self.settings)
        self._run_strategy: RunStrategy = run_strategy
        self._run_timeout = run_timeout
        self._own_saver = checkpointer
        self._compiled: Pregel[Any, Any, Any, Any] | None = None
        self._sync_graph: Pregel[Any, Any, Any, Any] | None = None
        self._seedable = True
        self._replayer: threading.Thread | None = None
        self._areplayer: asyncio.Task[int] | None = None
        returned = self.define_graph()
        if returned is not None:
            self.set_compiled_graph(returned)
        if self._compiled is None:
            raise ConfigurationError(
                f"{type(self).__name__}.define_graph() must call self.set_compiled_graph(...) "
                "or return a StateGraph"
            )

    # -- the graph ------------------------------------------------------------------------

    @abc.abstractmethod
    def define_graph(self) -> StateGraph[Any] | Pregel[Any, Any, Any, Any] | None:
        """Build the graph: call :meth:`set_compiled_graph`, or return a (compiled) graph."""

    def set_compiled_graph(self, graph: StateGraph[Any] | Pregel[Any, Any, Any, Any]) -> None:
        """Use ``graph``. An uncompiled ``StateGraph`` is compiled; a checkpointer compiled
        into the graph is kept, otherwise the agent's own is attached at run time."""
        if isinstance(graph, StateGraph):
            graph = graph.compile()
        if not isinstance(graph, Pregel):
            raise ConfigurationError(
                f"set_compiled_graph needs a StateGraph or compiled graph, got {type(graph)!r}"
            )
        if isinstance(graph.checkpointer, BaseCheckpointSaver):
            self._own_saver = graph.checkpointer
        if isinstance(graph.store, BaseStore):
            self._own_store = graph.store
        self._compiled = graph
        self._sync_graph = None
        # A DeltaChannel keeps part of its value in earlier checkpoints' writes: one latest
        # checkpoint cannot carry it through an outage.
        self._seedable = not any(isinstance(c, DeltaChannel) for c in graph.channels.values())

    @property
    def graph(self) -> Pregel[Any, Any, Any, Any]:
        """The compiled graph as given (without the agent's checkpointer)."""
        assert self._compiled is not None
        return self._compiled

    def _graph_for(self, saver: Saver) -> Pregel[Any, Any, Any, Any]:
        return _copied(self.graph, checkpointer=saver)

    def _with_store(
        self, graph: Pregel[Any, Any, Any, Any], user_id: str | None, thread: str
    ) -> Pregel[Any, Any, Any, Any]:
        """``graph`` with a store scoped to the run's user (opened on the node's first use)."""
        own, p = self._own_store, self._persistence
        base = own if own is not None else p.store
        abase = None if own is not None else p.async_store
        if user_id is not None:
            store = ScopedStore(base, user_root(self.settings.namespace, user_id), abase=abase)
        else:
            store = ScopedStore(
                base,
                lambda: self._thread_root(thread),
                abase=abase,
                aroot=lambda: self._athread_root(thread),
            )
        return _copied(graph, store=store)

    def _thread_root(self, thread: str) -> Namespace:
        """Memory of the thread's owner; a thread nobody owns has its own."""
        owner = self.session_manager._thread_owner(thread) if self._tracks_deletions else None
        return session_root(thread) if owner is None else user_root(self.settings.namespace, owner)

    async def _athread_root(self, thread: str) -> Namespace:
        owner = (
            await self.async_session_manager._thread_owner(thread)
            if self._tracks_deletions
            else None
        )
        return session_root(thread) if owner is None else user_root(self.settings.namespace, owner)

    def _sync_runnable(self) -> Pregel[Any, Any, Any, Any]:
        saver = self._own_saver or self._persistence.sync()
        graph = self._sync_graph
        # The saver changes when the database goes down (memory) and comes back.
        if graph is None or graph.checkpointer is not saver:
            _check_pairing(saver, want_async=False)
            graph = self._sync_graph = self._graph_for(saver)
        return graph

    # -- sessions -------------------------------------------------------------------------

    @property
    def session_manager(self) -> AgentSessionManager:
        """The sync session registry used for ``user_id=`` calls."""
        with self._manager_lock:
            if self._sm is None:
                # On memory:// the twins must share one store, or a conversation started
                # with ainvoke would be invisible to invoke.
                shared = self._asm.store if self._asm is not None else None
                self._sm = AgentSessionManager(
                    settings=self.settings,
                    store=shared.sync if isinstance(shared, AsyncOffloaded) else None,
                    checkpointer=self._persistence,
                )
                if self._asm is not None:
                    # One cache for both twins, so neither serves a thread the other replaced.
                    self._sm._state = self._asm._state
                self._owned_managers.append(self._sm)
            return self._sm

    @property
    def async_session_manager(self) -> AsyncAgentSessionManager:
        """The async session registry used for ``user_id=`` calls of async methods."""
        with self._manager_lock:
            if self._asm is None:
                shared = self._sm.store if self._sm is not None else None
                self._asm = AsyncAgentSessionManager(
                    settings=self.settings,
                    checkpointer=self._persistence,
                    store=AsyncOffloaded(shared, offload=False)
                    if isinstance(shared, MemoryStore)
                    else None,
                )
                if self._sm is not None:
                    self._asm._state = self._sm._state
                self._owned_managers.append(self._asm)
            return self._asm

    @property
    def is_degraded(self) -> bool:
        """True while sessions or checkpoints are kept in memory only."""
        managers = [m for m in (self._sm, self._asm) if m is not None]
        return self._persistence.is_degraded or any(m.is_degraded for m in managers)

    @staticmethod
    def _split(
        config: RunnableConfig | None, thread_id: str | None
    ) -> tuple[dict[str, Any], str | None]:
        if config is not None and not isinstance(config, dict):
            raise InvalidInputError("config", "must be a dict (a LangGraph RunnableConfig)")
        cfg: dict[str, Any] = dict(config or {})
        configurable = cfg.get("configurable") or {}
        if not isinstance(configurable, dict):
            raise InvalidInputError("config", "configurable must be a dict")
        cfg["configurable"] = dict(configurable)
        given = thread_id if thread_id is not None else configurable.get("thread_id")
        return cfg, None if given is None else validation.thread_id(given)

    @staticmethod
    def _finish(cfg: dict[str, Any], thread: str | None) -> tuple[RunnableConfig, str]:
        if thread is None:
            raise InvalidInputError(
                "config", 'needs {"configurable": {"thread_id": ...}} or user_id='
            )
        cfg["configurable"]["thread_id"] = thread
        return RunnableConfig(**cfg), thread  # type: ignore[typeddict-item]

    def resolve_config(
        self,
        config: RunnableConfig | None = None,
        *,
        user_id: str | None = None,
        thread_id: str | None = None,
    ) -> RunnableConfig:
        """The LangGraph config a call runs with (see the class docstring)."""
        return self._resolve(config, user_id, thread_id)[0]

    async def aresolve_config(
        self,
        config: RunnableConfig | None = None,
        *,
        user_id: str | None = None,
        thread_id: str | None = None,
    ) -> RunnableConfig:
        """Async :meth:`resolve_config`."""
        return (await self._aresolve(config, user_id, thread_id))[0]

    def _resolve(
        self,
        config: RunnableConfig | None,
        user_id: str | None,
        thread_id: str | None,
        writing: bool = False,
    ) -> tuple[RunnableConfig, str]:
        """The run's config and thread; a write to a deleted thread (a tombstone) is refused,
        so a late run cannot bring a deleted conversation back."""
        cfg, thread = self._split(config, thread_id)
        if user_id is not None:
            sm = self.session_manager
            session = (
                sm.get_or_create_user_session(user_id)
                if thread is None
                else sm.get_session(user_id, thread)
            )
            thread = _runnable(session)
            cfg["configurable"]["user_id"] = user_id
        elif (
            writing
            and thread is not None
            and self._tracks_deletions
            and self.session_manager.is_thread_deleted(thread)
        ):
            raise _deleted(thread)
        return self._finish(cfg, thread)

    async def _aresolve(
        self,
        config: RunnableConfig | None,
        user_id: str | None,
        thread_id: str | None,
        writing: bool = False,
    ) -> tuple[RunnableConfig, str]:
        cfg, thread = self._split(config, thread_id)
        if user_id is not None:
            sm = self.async_session_manager
            session = (
                await sm.get_or_create_user_session(user_id)
                if thread is None
                else await sm.get_session(user_id, thread)
            )
            thread = _runnable(session)
            cfg["configurable"]["user_id"] = user_id
        elif (
            writing
            and thread is not None
            and self._tracks_deletions
            and await self.async_session_manager.is_thread_deleted(thread)
        ):
            raise _deleted(thread)
        return self._finish(cfg, thread)

    # -- request metrics --------------------------------------------------------------------

    def _record(self, user_id: str, thread: str, started: float, error: bool) -> None:
        try:
            self.session_manager.record_request(
                user_id, thread, processing_time=time.perf_counter() - started, error=error
            )
        except BssAgentError as exc:  # metrics must never mask the run's own outcome
            logger.warning("bssagent: could not record a request (%s)", type(exc).__name__)

    async def _arecord(self, user_id: str, thread: str, started: float, error: bool) -> None:
        try:
            await self.async_session_manager.record_request(
                user_id, thread, processing_time=time.perf_counter() - started, error=error
            )
        except BssAgentError as exc:
            logger.warning("bssagent: could not record a request (%s)", type(exc).__name__)

    @property
    def _tracks_deletions(self) -> bool:
        """Whether runs check the registry's tombstones: when the agent has a session
        registry, or keeps its checkpoints in the library's database. An agent given only
        its own saver opens no registry (and no database file) for this."""
        return self._sm is not None or self._asm is not None or self._own_saver is None

    @contextmanager
    def _guarded(self, thread: str) -> Iterator[None]:
        """After a run (still under its lock): if the thread's session was deleted while it
        ran, delete what the run wrote, so a run in flight cannot bring a thread back."""
        try:
            yield
        finally:
            try:
                if self._tracks_deletions and self.session_manager.is_thread_deleted(thread):
                    (self._own_saver or self._persistence.sync()).delete_thread(thread)
            except BssAgentError as exc:
                logger.warning("bssagent: post-run deletion check failed (%s)", type(exc).__name__)

    @asynccontextmanager
    async def _aguarded(self, thread: str) -> AsyncIterator[None]:
        try:
            yield
        finally:
            try:
                if self._tracks_deletions and await self.async_session_manager.is_thread_deleted(
                    thread
                ):
                    if self._own_saver is not None:
                        await self._own_saver.adelete_thread(thread)
                    else:
                        await self._persistence.adelete_threads([thread])
            except BssAgentError as exc:
                logger.warning("bssagent: post-run deletion check failed (%s)", type(exc).__name__)

    def _span(self, method: str, thread: str) -> Any:
        return observe.span(
            "bssagent.agent.run", thread, agent=self.name, method=method,
            backend=self._persistence.target.backend,
            current=not method.endswith("stream"),  # a generator may end in another context
        )  # fmt: skip

    @contextmanager
    def _recorded(self, user_id: str | None, thread: str, method: str) -> Iterator[None]:
        """Trace and measure the run, and count it on the user's session: time, and whether
        it raised (re-raised unchanged). A cancelled or abandoned run is not counted."""
        started = time.perf_counter()
        with self._span(method, thread):
            try:
                yield
            except Exception:
                observe.run_finished(self.name, started, error=True)
                if user_id is not None:
                    self._record(user_id, thread, started, error=True)
                raise
            observe.run_finished(self.name, started, error=False)
            if user_id is not None:
                self._record(user_id, thread, started, error=False)

    @asynccontextmanager
    async def _arecorded(
        self, user_id: str | None, thread: str, method: str
    ) -> AsyncIterator[None]:
        started = time.perf_counter()
        with self._span(method, thread):
            try:
                yield
            except Exception:
                observe.run_finished(self.name, started, error=True)
                if user_id is not None:
                    await self._arecord(user_id, thread, started, error=True)
                raise
            observe.run_finished(self.name, started, error=False)
            if user_id is not None:
                await self._arecord(user_id, thread, started, error=False)

    def _storage_lost(self, exc: Exception) -> StorageUnavailableError | None:
        """The typed error for a run that failed because the database went away (a
        connection-class driver error anywhere in its chain), else None. Later runs then
        use the memory saver until ``reconnect_interval`` passes (``fallback="memory"``)."""
        if self._persistence.target.backend != "postgres":
            return None
        from psycopg_pool import PoolTimeout

        from ..sessions.storage.postgres_common import is_unavailable

        def gone(error: BaseException) -> bool:
            if isinstance(error, PoolTimeout):  # a full pool, or a dead server?
                return not self._persistence.reachable()
            return is_unavailable(error)

        cause: BaseException | None = exc
        while cause is not None and not gone(cause):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            return None
        kind = type(cause).__name__
        lost = StorageUnavailableError(f"postgres unavailable during the run ({kind})")
        lost.__cause__ = cause
        self._mark_down(lost)
        return lost

    def _mark_down(self, exc: StorageUnavailableError) -> None:
        """Savers, stores and run locks go to memory for ``reconnect_interval`` (with
        ``fallback="memory"``; the other modes keep failing typed on their own)."""
        for component in (self._persistence, self._locks):
            with suppress(StorageUnavailableError):
                component.outage(exc)

    @contextmanager
    def _typed(self, graph: Pregel[Any, Any, Any, Any]) -> Iterator[None]:
        """Runs raise bssagent's StorageUnavailableError, not a driver error, when the
        database goes away mid-run; a run that succeeded on the database ends an outage."""
        try:
            yield
        except Exception as exc:
            lost = self._storage_lost(exc)
            if lost is None:
                raise
            raise lost from exc
        self._persistence.run_succeeded(graph.checkpointer)  # type: ignore[arg-type]

    def _route_around_outage(self) -> None:
        """While the session registry serves from memory (its breaker found the database
        down), runs do too: a saver opened before the outage would only fail."""
        managers = (self._sm, self._asm)
        if self._own_saver is None and any(m is not None and m.is_degraded for m in managers):
            self._mark_down(StorageUnavailableError("the session registry found the database down"))

    @contextmanager
    def _held(self, thread: str, strategy: RunStrategy) -> Iterator[None]:
        """The thread's run lock, its wait measured."""
        waiting = time.perf_counter()
        with self._locks.hold(thread, strategy, self._run_timeout):
            observe.lock_waited(self.name, time.perf_counter() - waiting)
            yield

    @asynccontextmanager
    async def _aheld(self, thread: str, strategy: RunStrategy) -> AsyncIterator[None]:
        waiting = time.perf_counter()
        async with self._locks.ahold(thread, strategy, self._run_timeout):
            observe.lock_waited(self.name, time.perf_counter() - waiting)
            yield

    def _strategy(self, run_strategy: RunStrategy | None) -> RunStrategy:
        strategy = run_strategy or self._run_strategy
        if strategy not in ("enqueue", "reject"):
            raise InvalidInputError("run_strategy", "must be 'enqueue' or 'reject'")
        return strategy

    # -- outages: conversations kept in memory, then written back --------------------------

    def _journal_applies(self, graph: Pregel[Any, Any, Any, Any]) -> bool:
        p = self._persistence
        return (
            self._own_saver is None
            and p.target.backend == "postgres"
            and (
                p.is_outage_saver(graph.checkpointer) or bool(p.journal)  # type: ignore[arg-type]
            )
        )

    def _journaled(
        self, graph: Pregel[Any, Any, Any, Any], thread: str, *, writing: bool = True
    ) -> None:
        """Before a call on ``thread`` (a writing one holds its run lock): on the memory
        saver of an outage, seed the thread with its latest checkpoint and journal it; back
        on the database, write back what the thread ran in memory first (and the other
        threads, in the background)."""
        if not self._journal_applies(graph):
            return
        p, saver = self._persistence, graph.checkpointer
        if p.is_outage_saver(saver):  # type: ignore[arg-type]
            p.use_memory(thread, writing=writing, seedable=self._seedable)
        elif writing:
            with self._write_back_failure():
                p.replay_thread(saver, thread, lambda: self._merge_target(thread))  # type: ignore[arg-type]
            self._replay_in_background()

    async def _ajournaled(
        self, graph: Pregel[Any, Any, Any, Any], thread: str, *, writing: bool = True
    ) -> None:
        if not self._journal_applies(graph):
            return
        p, saver = self._persistence, graph.checkpointer
        if p.is_outage_saver(saver):  # type: ignore[arg-type]
            p.use_memory(thread, writing=writing, seedable=self._seedable)
        elif writing:
            with self._write_back_failure():
                await p.areplay_thread(saver, thread, lambda: self._amerge_target(thread))  # type: ignore[arg-type]
            self._areplay_in_background()

    @contextmanager
    def _write_back_failure(self) -> Iterator[None]:
        """A thread's write-back failing for another reason than the database (a session
        limit, say, when its outage run had to go to a new session) does not fail the run:
        the write-back stays journaled and is retried."""
        try:
            yield
        except StorageUnavailableError:
            raise
        except BssAgentError as exc:
            _replay_stopped(exc)

    def _merge_target(self, thread: str) -> str:
        """Where an outage run goes when its thread moved on meanwhile: a child session of
        the thread's owner, or (a thread nobody owns) a new thread."""
        owner = self.session_manager._thread_owner(thread) if self._tracks_deletions else None
        if owner is None:
            return str(uuid.uuid4())
        meta = {"bssagent_merged_from": thread}
        child = self.session_manager.create_child_session(owner, thread, MERGED_TITLE, meta)
        return child.thread_id

    async def _amerge_target(self, thread: str) -> str:
        sm = self.async_session_manager
        owner = await sm._thread_owner(thread) if self._tracks_deletions else None
        if owner is None:
            return str(uuid.uuid4())
        meta = {"bssagent_merged_from": thread}
        return (await sm.create_child_session(owner, thread, MERGED_TITLE, meta)).thread_id

    def replay_journal(self) -> int:
        """Write back every conversation that ran in memory during an outage.

        Runs do it for their own thread before they start, and start this in the background
        once the database is back; call it yourself to be sure before a shutdown. A thread
        busy with a run is left to that run; a deleted one is dropped.

        Returns:
            How many threads were written back.

        Raises:
            StorageError: The database failed (what is left stays journaled).
        """
        p, done = self._persistence, 0
        for thread in p.journal.threads():
            saver = p.sync()
            if p.is_outage_saver(saver):
                break
            try:
                with self._locks.hold(thread, "reject", 0), p.errors():
                    if self._tracks_deletions and self.session_manager.is_thread_deleted(thread):
                        p.forget(thread)
                        continue
                    merge = lambda: self._merge_target(thread)  # noqa: B023, E731
                    done += p.replay_thread(saver, thread, merge)
            except ThreadBusyError:
                continue
        if p.journal.has_ops:
            p.store()  # writes the store's journal back
        return done

    async def areplay_journal(self) -> int:
        """Async :meth:`replay_journal`."""
        p, done = self._persistence, 0
        for thread in p.journal.threads():
            try:
                async with (
                    self._locks.ahold(thread, "reject", 0),
                    p.async_saver() as saver,
                ):
                    if p.is_outage_saver(saver):
                        break
                    sm = self.async_session_manager if self._tracks_deletions else None
                    if sm is not None and await sm.is_thread_deleted(thread):
                        p.forget(thread)
                        continue
                    merge = lambda: self._amerge_target(thread)  # noqa: B023, E731
                    done += await p.areplay_thread(saver, thread, merge)
            except ThreadBusyError:
                continue
        if p.journal.has_ops:
            await p.async_store()
        return done

    def _replay_in_background(self) -> None:
        if self._replayer is None or not self._replayer.is_alive():
            self._replayer = threading.Thread(
                target=self._replay_quietly, name="bssagent-replay", daemon=True
            )
            self._replayer.start()

    def _areplay_in_background(self) -> None:
        if self._areplayer is None or self._areplayer.done():
            self._areplayer = asyncio.get_running_loop().create_task(self._areplay_quietly())

    # In the background and at close: whatever fails is logged, never raised (close must
    # still close; the journal keeps what was not written).
    def _replay_quietly(self) -> int:
        try:
            return self.replay_journal()
        except Exception as exc:
            _replay_stopped(exc)
            return 0

    async def _areplay_quietly(self) -> int:
        try:
            return await self.areplay_journal()
        except Exception as exc:
            _replay_stopped(exc)
            return 0

    # -- runs -----------------------------------------------------------------------------

    def invoke(
        self,
        input: Any,
        config: RunnableConfig | None = None,
        *,
        user_id: str | None = None,
        thread_id: str | None = None,
        run_strategy: RunStrategy | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the graph to completion on the thread; LangGraph's arguments pass through.

        Raises:
            ThreadBusyError: The thread is busy (``reject``), or stayed busy (``enqueue``).
            SessionNotFoundError: ``thread_id`` is not one of ``user_id``'s sessions.
            InvalidInputError: No thread could be determined, or a bad argument.
        """
        strategy = self._strategy(run_strategy)
        cfg, thread = self._resolve(config, user_id, thread_id, writing=True)
        self._route_around_outage()
        graph = self._with_store(self._sync_runnable(), user_id, thread)
        with (
            self._recorded(user_id, thread, "invoke"),
            self._held(thread, strategy),
            self._guarded(thread),
            self._typed(graph),
        ):
            self._journaled(graph, thread)
            return graph.invoke(input, cfg, **kwargs)

    def stream(
        self,
        input: Any,
        config: RunnableConfig | None = None,
        *,
        user_id: str | None = None,
        thread_id: str | None = None,
        run_strategy: RunStrategy | None = None,
        **kwargs: Any,
    ) -> Iterator[Any]:
        """Stream the run (any ``stream_mode``, several at once); holds the thread until the
        iterator is exhausted or closed. Arguments are checked before iteration starts."""
        strategy = self._strategy(run_strategy)
        cfg, thread = self._resolve(config, user_id, thread_id, writing=True)
        self._route_around_outage()
        graph = self._with_store(self._sync_runnable(), user_id, thread)

        def run() -> Iterator[Any]:
            with (
                self._recorded(user_id, thread, "stream"),
                self._held(thread, strategy),
                self._guarded(thread),
                self._typed(graph),
            ):
                self._journaled(graph, thread)
                yield from graph.stream(input, cfg, **kwargs)

        return run()

    async def ainvoke(
        self,
        input: Any,
        config: RunnableConfig | None = None,
        *,
        user_id: str | None = None,
        thread_id: str | None = None,
        run_strategy: RunStrategy | None = None,
        **kwargs: Any,
    ) -> Any:
        """Async :meth:`invoke`, on the async saver."""
        strategy = self._strategy(run_strategy)
        cfg, thread = await self._aresolve(config, user_id, thread_id, writing=True)
        self._route_around_outage()
        # The saver first: it finds out whether the database is reachable, which decides
        # whether the run lock is PostgreSQL's or a local one.
        async with (
            self._arecorded(user_id, thread, "ainvoke"),
            self._async_graph() as graph,
            self._aheld(thread, strategy),
            self._aguarded(thread),
        ):
            graph = self._with_store(graph, user_id, thread)
            with self._typed(graph):
                await self._ajournaled(graph, thread)
                return await graph.ainvoke(input, cfg, **kwargs)

    async def astream(
        self,
        input: Any,
        config: RunnableConfig | None = None,
        *,
        user_id: str | None = None,
        thread_id: str | None = None,
        run_strategy: RunStrategy | None = None,
        **kwargs: Any,
    ) -> AsyncGenerator[Any, None]:
        """Async :meth:`stream`."""
        strategy = self._strategy(run_strategy)
        cfg, thread = await self._aresolve(config, user_id, thread_id, writing=True)
        self._route_around_outage()
        # The saver first: it finds out whether the database is reachable, which decides
        # whether the run lock is PostgreSQL's or a local one.
        async with (
            self._arecorded(user_id, thread, "astream"),
            self._async_graph() as graph,
            self._aheld(thread, strategy),
            self._aguarded(thread),
        ):
            graph = self._with_store(graph, user_id, thread)
            # aclosing: an abandoned stream must finish LangGraph's run (its pending
            # checkpoint writes) before the saver's connection and the thread are released;
            # `async for` alone leaves the inner generator to the garbage collector.
            run = cast(AsyncGenerator[Any, None], graph.astream(input, cfg, **kwargs))
            with self._typed(graph):
                await self._ajournaled(graph, thread)
                async with aclosing(run) as chunks:
                    async for chunk in chunks:
                        yield chunk

    @asynccontextmanager
    async def _async_graph(self) -> AsyncIterator[Pregel[Any, Any, Any, Any]]:
        if self._own_saver is not None:
            _check_pairing(self._own_saver, want_async=True)
            yield self._graph_for(self._own_saver)
            return
        async with self._persistence.async_saver() as saver:
            yield self._graph_for(saver)

    def continue_execution(
        self,
        resume: Any = None,
        config: RunnableConfig | None = None,
        *,
        command: Command[Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Resume a run stopped by ``interrupt()``: ``Command(resume=resume)`` (or ``command``).

        Takes the same keyword arguments as :meth:`invoke`.
        """
        return self.invoke(command or Command(resume=resume), config, **kwargs)

    async def acontinue_execution(
        self,
        resume: Any = None,
        config: RunnableConfig | None = None,
        *,
        command: Command[Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Async :meth:`continue_execution`."""
        return await self.ainvoke(command or Command(resume=resume), config, **kwargs)

    # -- state ----------------------------------------------------------------------------

    def get_state(
        self,
        config: RunnableConfig | None = None,
        *,
        user_id: str | None = None,
        thread_id: str | None = None,
    ) -> StateSnapshot:
        """The thread's current state (LangGraph ``StateSnapshot``)."""
        cfg, thread = self._resolve(config, user_id, thread_id)
        graph = self._sync_runnable()
        self._journaled(graph, thread, writing=False)
        return graph.get_state(cfg)

    async def aget_state(
        self,
        config: RunnableConfig | None = None,
        *,
        user_id: str | None = None,
        thread_id: str | None = None,
    ) -> StateSnapshot:
        """Async :meth:`get_state`."""
        cfg, thread = await self._aresolve(config, user_id, thread_id)
        async with self._async_graph() as graph:
            await self._ajournaled(graph, thread, writing=False)
            return await graph.aget_state(cfg)

    def get_state_history(
        self,
        config: RunnableConfig | None = None,
        *,
        user_id: str | None = None,
        thread_id: str | None = None,
        limit: int | None = None,
    ) -> list[StateSnapshot]:
        """The thread's checkpoints, newest first (materialized: see LangGraph #8558)."""
        cfg, thread = self._resolve(config, user_id, thread_id)
        graph = self._sync_runnable()
        self._journaled(graph, thread, writing=False)
        return list(graph.get_state_history(cfg, limit=limit))

    async def aget_state_history(
        self,
        config: RunnableConfig | None = None,
        *,
        user_id: str | None = None,
        thread_id: str | None = None,
        limit: int | None = None,
    ) -> list[StateSnapshot]:
        """Async :meth:`get_state_history`."""
        cfg, thread = await self._aresolve(config, user_id, thread_id)
        async with self._async_graph() as graph:
            await self._ajournaled(graph, thread, writing=False)
            return [s async for s in graph.aget_state_history(cfg, limit=limit)]

    def update_state(
        self,
        values: dict[str, Any] | Any,
        config: RunnableConfig | None = None,
        *,
        as_node: str | None = None,
        user_id: str | None = None,
        thread_id: str | None = None,
        run_strategy: RunStrategy | None = None,
    ) -> RunnableConfig:
        """Write ``values`` to the thread's state as if ``as_node`` ran (under the run lock)."""
        strategy = self._strategy(run_strategy)
        cfg, thread = self._resolve(config, user_id, thread_id, writing=True)
        self._route_around_outage()
        graph = self._sync_runnable()
        with self._locks.hold(thread, strategy, self._run_timeout), self._typed(graph):
            self._journaled(graph, thread)
            return graph.update_state(cfg, values, as_node=as_node)

    # -- deletion -------------------------------------------------------------------------

    def delete_conversation(self, user_id: str, thread_id: str) -> None:
        """Delete one of the user's sessions and every checkpoint of its thread.

        Raises:
            SessionNotFoundError: The thread is not one of the user's sessions.
        """
        session = self.session_manager.get_session(user_id, thread_id)
        saver = self._own_saver or self._persistence.sync()
        with self._locks.hold(session.thread_id, "enqueue", self._run_timeout):
            saver.delete_thread(session.thread_id)
            self.session_manager.delete_session(user_id, session.thread_id)

    async def adelete_conversation(self, user_id: str, thread_id: str) -> None:
        """Async :meth:`delete_conversation`."""
        session = await self.async_session_manager.get_session(user_id, thread_id)
        if self._own_saver is not None:
            _check_pairing(self._own_saver, want_async=True)
        async with self._locks.ahold(session.thread_id, "enqueue", self._run_timeout):
            if self._own_saver is not None:
                await self._own_saver.adelete_thread(session.thread_id)
            else:
                async with self._persistence.async_saver() as saver:
                    await saver.adelete_thread(session.thread_id)
            await self.async_session_manager.delete_session(user_id, session.thread_id)

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connections the agent opened (not a manager or saver you passed).

        First, what ran in memory during an outage is written back if the database is
        reachable again (a WARNING says how many conversations could not be: they are lost
        with the process). The agent stays usable: a later call opens what it needs again.
        """
        if self._persistence.journal:
            if self._replayer is not None:
                self._replayer.join(timeout=30)
            self._replay_quietly()
            self._left_behind()
        self._close()

    def _left_behind(self) -> None:
        left = len(self._persistence.journal.threads())
        if left:
            logger.warning(
                "bssagent: %d conversation(s) run during the outage could not be written back "
                "before close: the database is still unreachable",
                left,
                extra=observe.log_fields("journal_lost", component="checkpoints", threads=left),
            )

    def _close(self) -> None:
        self._sync_graph = None
        self._persistence.close()
        self._locks.close()
        for manager in self._owned_managers:
            if isinstance(manager, AgentSessionManager):
                manager.close()

    async def aclose(self) -> None:
        """Async :meth:`close`, also closing this event loop's async connections."""
        if self._persistence.journal:
            task = self._areplayer
            if task is not None and task.get_loop() is asyncio.get_running_loop():
                await asyncio.wait({task}, timeout=30)
            await self._areplay_quietly()
            self._left_behind()
        await self._persistence.aclose()
        await self._locks.aclose()
        for manager in self._owned_managers:
            if isinstance(manager, AsyncAgentSessionManager):
                await manager.close()
        self._close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r}>"
