"""``bssagent doctor``: is everything in place? Configuration, connectivity, schema, extras,
degraded state, and how big LangGraph's tables have grown."""

from __future__ import annotations

import importlib.util
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import typer
from rich.text import Text

from ..config import resolve_target
from ..errors import StorageError
from ..sessions.storage.sqlite import quote_identifier
from .output import JsonOption, manager, print_json, table

EXTRAS = {
    "psycopg": "postgres",
    "langgraph.checkpoint.postgres": "postgres",
    "langchain_openai": "openai",
    "langchain_google_genai": "google",
    "fastapi": "web",
    "prometheus_client": "metrics",
    "opentelemetry": "otel",
}
PG_TABLES = ("checkpoints", "checkpoint_blobs", "checkpoint_writes", "store")
SQLITE_TABLES = ("checkpoints", "writes", "store")


def doctor(ctx: typer.Context, json: JsonOption = False) -> None:
    """Check the installation and the database (exit code 2 when the database fails)."""
    checks: list[tuple[str, str, str]] = []  # (check, ok | warn | fail, detail)
    with manager(ctx) as sessions:
        checks.append(("storage", "ok", f"{sessions.backend}: {sessions.location}"))
        try:
            schema = sessions.schema_status()
        except StorageError as exc:
            checks.append(("connectivity", "fail", str(exc)))
        else:
            checks.append(("connectivity", "ok", "the database answers"))
            pending = schema["pending"]
            state = "warn" if pending else "ok"
            detail = f"{len(schema['applied'])} applied" + (
                f", pending: {', '.join(pending)} (run `bssagent db migrate`)" if pending else ""
            )
            checks.append(("schema", state, detail))
            for name, size in _langgraph_tables(sessions.settings).items():
                checks.append((f"table {name}", "ok", size))
        health = sessions.health()
        checks.append(("degraded", "ok" if health.status == "ok" else "warn", health.status))
    for module, extra in EXTRAS.items():
        hint = f"pip install 'bssagent[{extra}]'"
        found = ("ok", "installed") if _importable(module) else ("absent", hint)
        checks.append((f"extra [{extra}]: {module}", *found))
    failed = any(state == "fail" for _, state, _ in checks)
    if json:
        print_json([{"check": c, "state": s, "detail": d} for c, s, d in checks])
    else:
        colour = {"ok": "green", "warn": "yellow", "fail": "red", "absent": "dim"}
        table("bssagent doctor", ("check", "state", "detail"),
              [(c, Text(s, style=colour[s]), d) for c, s, d in checks])  # fmt: skip
    if failed:
        raise typer.Exit(2)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _langgraph_tables(settings: Any) -> dict[str, str]:
    """Rows and bytes of LangGraph's checkpoint and store tables (those that exist)."""
    target = resolve_target(settings)
    if target.backend == "postgres":
        import psycopg

        from ..sessions.storage.postgres_common import wrap_errors

        sizes: dict[str, str] = {}
        with wrap_errors(), psycopg.connect(target.url or "", autocommit=True) as conn:
            for name in PG_TABLES:
                row = conn.execute(
                    "SELECT pg_total_relation_size(c.oid), c.reltuples::bigint FROM pg_class c"
                    " WHERE c.oid = to_regclass(%s)",
                    (name,),
                ).fetchone()
                if row is not None:
                    sizes[name] = f"~{max(row[1], 0):,} rows, {row[0] / 1e6:,.1f} MB"
        return sizes
    if target.backend == "sqlite":
        path = Path(target.path or settings.sqlite_path)
        if not path.exists():
            return {}
        found: dict[str, str] = {"(file)": f"{path.stat().st_size / 1e6:,.1f} MB ({path})"}
        with closing(sqlite3.connect(path, timeout=10)) as conn:
            for name in SQLITE_TABLES:
                if conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone():
                    query = f"SELECT count(*) FROM {quote_identifier(name)}"
                    found[name] = f"{conn.execute(query).fetchone()[0]:,} rows"
        return found
    return {}
