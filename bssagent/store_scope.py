"""Per-user views of a LangGraph store: where bssagent keeps memory, and who may reach it.

Layout (labels from ids are escaped with :func:`label`, so an id holding ``.`` or ``*`` stays
one label and cannot name a neighbour's namespace)::

    ("bssagent", <namespace>, "users", <user_id>, ...)        a user's memory, all sessions
    ("bssagent", <namespace>, "users", <user_id>, "preferences")   user-wide preferences
    ("bssagent", "sessions", <thread_id>, ...)                 one session's memory
    ("bssagent", "sessions", <thread_id>, "preferences")       session preferences
    ("bssagent", <namespace>, "app", "preferences")            app-wide preferences

A session's root carries no namespace: thread ids are unique UUIDs, and the deletion sweep,
which knows only thread ids, must find it.

A :class:`ScopedStore` puts its root in front of every namespace its caller uses and takes it
off every namespace it returns, so a node given a user's view reads and writes
``("preferences",)`` or ``("memories",)`` of that user and has no namespace naming another
user's. Pure logic and one thin wrapper: the storage is LangGraph's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from langgraph.store.base import (
    BaseStore,
    GetOp,
    Item,
    ListNamespacesOp,
    MatchCondition,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
)

ROOT = "bssagent"
PREFERENCES = "preferences"
Namespace = tuple[str, ...]


def label(value: str) -> str:
    """``value`` as one namespace label: ``%``, ``.`` (LangGraph's separator) and ``*`` (its
    wildcard) are percent-escaped, so the mapping is one-to-one."""
    return value.replace("%", "%25").replace(".", "%2E").replace("*", "%2A")


def user_root(namespace: str, user_id: str) -> Namespace:
    """Where ``user_id``'s memory lives."""
    return (ROOT, label(namespace), "users", label(user_id))


def session_root(thread_id: str) -> Namespace:
    """Where one session's memory lives (thread ids are UUIDs: no escaping needed)."""
    return (ROOT, "sessions", thread_id)


def app_root(namespace: str) -> Namespace:
    """Where memory shared by every user of the namespace lives."""
    return (ROOT, label(namespace), "app")


def needs_offload(store: BaseStore) -> bool:
    """Whether ``store`` has no async methods (LangGraph's ``SqliteStore``): async callers run
    its ``batch`` in a worker thread, as LangGraph's ``PostgresStore`` does itself."""
    return any(cls.__name__ == "SqliteStore" for cls in type(store).__mro__)


class ScopedStore(BaseStore):
    """A LangGraph store seen from a root namespace: every namespace is relative to it.

    Args:
        base: The LangGraph store holding the data, or a function opening it.
        root: The scope, or a function computing it.
        abase: Async twin of a ``base`` function.
        aroot: Async twin of a ``root`` function.

    Functions are called on first use, so a run whose graph never touches its store opens
    no store and looks nothing up.
    """

    def __init__(
        self,
        base: BaseStore | Callable[[], BaseStore],
        root: Namespace | Callable[[], Namespace],
        *,
        abase: Callable[[], Awaitable[BaseStore]] | None = None,
        aroot: Callable[[], Awaitable[Namespace]] | None = None,
    ) -> None:
        self._base = base if isinstance(base, BaseStore) else None
        self._open = None if isinstance(base, BaseStore) else base
        self._aopen = abase
        self._root = root if isinstance(root, tuple) else None
        self._resolve = None if isinstance(root, tuple) else root
        self._aresolve = aroot
        # LangGraph checks this before passing a ttl down.
        self.supports_ttl = self._base is not None and self._base.supports_ttl

    def _scope(self) -> tuple[BaseStore, Namespace]:
        if self._base is None:
            assert self._open is not None
            self._base = self._open()
        if self._root is None:
            assert self._resolve is not None
            self._root = self._resolve()
        return self._base, self._root

    async def _ascope(self) -> tuple[BaseStore, Namespace]:
        if self._base is None:
            if self._aopen is not None:
                self._base = await self._aopen()
            else:
                assert self._open is not None
                self._base = await asyncio.to_thread(self._open)
        if self._root is None:
            if self._aresolve is not None:
                self._root = await self._aresolve()
            else:
                assert self._resolve is not None
                self._root = await asyncio.to_thread(self._resolve)
        return self._base, self._root

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        base, root = self._scope()
        return [_out(root, r) for r in base.batch([_in(root, op) for op in ops])]

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        base, root = await self._ascope()
        inner = [_in(root, op) for op in ops]
        if needs_offload(base):
            results = await asyncio.to_thread(base.batch, inner)
        else:
            results = await base.abatch(inner)
        return [_out(root, r) for r in results]


def _in(root: Namespace, op: Op) -> Op:
    if isinstance(op, GetOp | PutOp):
        return op._replace(namespace=root + tuple(op.namespace))
    if isinstance(op, SearchOp):
        return op._replace(namespace_prefix=root + tuple(op.namespace_prefix))
    if isinstance(op, ListNamespacesOp):
        conditions = [MatchCondition("prefix", root)]
        for c in op.match_conditions or ():
            path = root + tuple(c.path) if c.match_type == "prefix" else tuple(c.path)
            conditions.append(MatchCondition(c.match_type, path))
        depth = None if op.max_depth is None else op.max_depth + len(root)
        return op._replace(match_conditions=tuple(conditions), max_depth=depth)
    raise TypeError(f"unknown store operation {type(op).__name__}")


def _inside(root: Namespace, namespace: Iterable[str]) -> bool:
    return tuple(namespace)[: len(root)] == root


def _strip(root: Namespace, namespace: Iterable[str]) -> Namespace:
    ns = tuple(namespace)
    if not _inside(root, ns):
        raise RuntimeError("the store returned a namespace outside the scope")
    return ns[len(root) :]


def _out(root: Namespace, result: Result) -> Result:
    if isinstance(result, list):
        # Defence in depth: LangGraph's stores before 3.1.1 matched a prefix as a string
        # (CVE-2026-71433), so ("u1",) also found ("u10",); whatever lies outside the scope
        # is dropped, never passed on.
        kept = [r for r in result if _inside(root, r if isinstance(r, tuple) else r.namespace)]
        return [_strip(root, r) if isinstance(r, tuple) else _out(root, r) for r in kept]  # type: ignore[return-value]
    if isinstance(result, SearchItem):
        return SearchItem(
            _strip(root, result.namespace), result.key, result.value,
            result.created_at, result.updated_at, result.score,
        )  # fmt: skip
    if isinstance(result, Item):
        return Item(
            value=result.value, key=result.key, namespace=_strip(root, result.namespace),
            created_at=result.created_at, updated_at=result.updated_at,
        )  # fmt: skip
    return result


def read_preferences(namespace: Namespace, items: Iterable[Item]) -> dict[str, Any]:
    """The preferences stored as items of exactly ``namespace`` (``{"value": ...}`` each)."""
    return {
        item.key: item.value.get("value")
        for item in items
        if tuple(item.namespace) == namespace and isinstance(item.value, dict)
    }


def preference_ops(namespace: Namespace, changes: dict[str, Any]) -> list[PutOp]:
    """One put per changed name; ``None`` deletes the name."""
    return [
        PutOp(namespace, name, None if value is None else {"value": value})
        for name, value in changes.items()
    ]


def item_dict(item: Item) -> dict[str, Any]:
    """An item as JSON-ready data (for exports)."""
    return {
        "namespace": list(item.namespace),
        "key": item.key,
        "value": item.value,
        "created_at": item.created_at.isoformat(),
        "updated_at": item.updated_at.isoformat(),
    }
