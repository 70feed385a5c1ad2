"""Fault injection for the tests: a loopback TCP proxy that passes, refuses or black-holes
traffic to a real server, one driver for the sync and async managers, and an agent whose
replies show how much history its thread holds.

Imported by the fault tests (``test_fallback``, ``test_reliability``, ``test_outage_journal``,
...); the ``proxy`` fixture is in ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import inspect
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import psycopg
from langchain_core.messages import AIMessage
from langgraph.graph import END, START, MessagesState, StateGraph

from bssagent import AgentSessionManager, AsyncAgentSessionManager, BaseAgent


class TcpProxy:
    """Forward 127.0.0.1:<port> to ``target``; :meth:`refuse` simulates an outage,
    :meth:`blackhole` a hung server or a network that drops everything."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.target = target
        self.mode = "pass"
        self.accepted = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def url(self, base: str) -> str:
        """``base`` (a postgresql:// URL) pointed at the proxy instead."""
        parts = urlsplit(base)
        userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return parts._replace(netloc=f"{userinfo}127.0.0.1:{self.port}").geturl()

    def refuse(self) -> None:
        """Reset new connections from now on, and kill the open ones."""
        self.mode = "refuse"
        with self._lock:
            victims, self._open = list(self._open), set()
        for sock in victims:
            _kill(sock)

    def blackhole(self) -> None:
        """From now on, swallow every byte both ways and accept new connections without
        answering: clients see neither data nor an error."""
        self.mode = "blackhole"

    def pass_(self) -> None:
        self.mode = "pass"

    def close(self) -> None:
        self._stop.set()
        self.refuse()
        self._listener.close()
        self._thread.join(5)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self.mode == "blackhole":
                with self._lock:
                    self._open.add(client)  # held open, never answered
                continue
            if self.mode != "pass":
                _kill(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _kill(client)
                continue
            for sock in (client, upstream):
                sock.settimeout(None)
                # Without it, Nagle and delayed ACKs add ~40 ms to a pipelined exchange.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._open.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if self.mode != "blackhole":
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._open.discard(src)


def _kill(sock: socket.socket) -> None:
    """Abort a connection with a reset (SO_LINGER 0), waking any thread blocked on it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- one driver for both managers --------------------------------------------------------------


class Driver:
    """Call a sync or an async manager the same way from an async test."""

    def __init__(self, kind: str, **kwargs: Any) -> None:
        cls = AgentSessionManager if kind == "sync" else AsyncAgentSessionManager
        self.manager: Any = cls(**kwargs)

    async def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.manager, method)(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    @property
    def degraded(self) -> bool:
        return bool(self.manager.is_degraded)

    async def close(self) -> None:
        await self("close")


def make(drivers: list[Driver], kind: str, **kwargs: Any) -> Driver:
    d = Driver(kind, **kwargs)
    drivers.append(d)
    return d


def rows_of(pg_url: str, table: str, user_id: str) -> list[tuple[str, bool, dict[str, Any]]]:
    with psycopg.connect(pg_url, connect_timeout=5) as conn:
        return conn.execute(
            f'SELECT thread_id, is_active, metadata FROM "{table}" WHERE user_id = %s ORDER BY id',
            (user_id,),
        ).fetchall()


def one_node(node: Callable[..., dict[str, Any]]) -> StateGraph[Any]:
    """A ``MessagesState`` graph running ``node`` once per turn."""
    graph = StateGraph(MessagesState)
    graph.add_node("reply", node)
    graph.add_edge(START, "reply")
    graph.add_edge("reply", END)
    return graph


def count_messages(state: MessagesState) -> dict[str, Any]:
    """Reply with how many messages the thread holds: its history, as the saver has it."""
    return {"messages": [AIMessage(f"{len(state['messages'])} messages")]}


class Counter(BaseAgent):
    """An agent replying ``"<n> messages"`` (see :func:`count_messages`)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("counter", **kwargs)

    def define_graph(self) -> StateGraph[Any]:
        return one_node(count_messages)
