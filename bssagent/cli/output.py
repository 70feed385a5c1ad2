"""What every admin command shares: the manager it works on, and how results are printed.

Tables (Rich) for people, ``--json`` for scripts. Admin commands never fall back to memory:
an unreachable database is an error (exit code 2), not an empty answer.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..sessions.manager_sync import AgentSessionManager
from ..sessions.model import UserSession

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
# Piped output is for scripts and logs: no terminal width to fold long thread ids into.
console = Console(width=None if sys.stdout.isatty() else 200)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


@dataclass(frozen=True)
class Target:
    """Where the admin commands work (root options; ``None``: from the environment)."""

    database_url: str | None = None
    namespace: str | None = None
    table_name: str | None = None


@contextmanager
def manager(ctx: typer.Context) -> Iterator[AgentSessionManager]:
    """A session manager on the root options' database, without the memory fallback."""
    target: Target = ctx.obj or Target()
    with AgentSessionManager(
        database_url=target.database_url,
        namespace=target.namespace,
        table_name=target.table_name,
        fallback="raise",
        cache_size=0,
    ) as sessions:
        yield sessions


def print_json(data: Any) -> None:
    # Plain print: Rich would wrap and colour the JSON, and scripts read it.
    print(json.dumps(data, indent=2, default=str, ensure_ascii=False))


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    grid = Table(title=title, title_justify="left")
    for column in columns:
        grid.add_column(column, overflow="fold")
    for row in rows:
        # Values are data, not Rich markup: "[postgres]" must print as written.
        grid.add_row(*(v if isinstance(v, Text) else escape(_text(v)) for v in row))
    console.print(grid)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


SESSION_COLUMNS = ("id", "user", "thread", "status", "current", "title", "requests", "errors")


def session_row(s: UserSession) -> tuple[Any, ...]:
    current = "yes" if s.is_active else ""
    return (s.id, s.user_id, s.thread_id, s.status, current, s.title, s.request_count,
            s.error_count)  # fmt: skip


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``"90"``, ``"45s"``, ``"30m"``, ``"1h30m"``, ``"2d"`` → seconds.

    Raises:
        typer.BadParameter: Not a duration.
    """
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise typer.BadParameter(f"{text!r} is not a duration (examples: 90, 45s, 30m, 1h30m, 2d)")
    return sum(float(n) * _UNIT[u] for n, u in parts)
