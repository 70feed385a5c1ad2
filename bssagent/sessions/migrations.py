"""The schema as versioned SQL files: discovery and rendering, pure and I/O-free except reads.

The files under ``sql/<dialect>/`` are the only source of DDL. Each backend applies the
pending ones in version order, one transaction per file, recorded in the
``bssagent_migrations`` ledger, under a lock (see the backends' ``setup``). In a wheel the
files ship as ``bssagent/_sql``; in a source checkout or editable install they are read from
the repository's ``sql/`` folder.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from ..errors import MigrationError

Dialect = Literal["postgresql", "sqlite"]
DEFAULT_TABLE = "user_sessions"
_FILE = re.compile(r"(\d{4})_(\w+)\.sql")
_TABLE_TOKEN = re.compile(rf"\b{DEFAULT_TABLE}(\w*)\b")


@dataclass(frozen=True)
class Migration:
    """One SQL file: ``NNNN_name.sql``."""

    version: int
    name: str
    sql: str


def sql_root() -> Path:
    """The folder holding ``postgresql/`` and ``sqlite/``, packaged or from the checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_sql", here.parent / "sql"):
        if (candidate / "postgresql").is_dir():
            return candidate
    raise MigrationError(f"bssagent's SQL files were not found next to {here}")


@cache
def _load(dialect: Dialect) -> tuple[str, tuple[Migration, ...]]:
    folder = sql_root() / dialect
    ledger = (folder / "ledger.sql").read_text(encoding="utf-8")
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = _FILE.fullmatch(path.name)
        if match:
            found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(f"{dialect} migrations must be numbered 1..n, found {versions}")
    return ledger, tuple(found)


def ledger_sql(dialect: Dialect) -> str:
    """The DDL of the migration ledger table."""
    return _load(dialect)[0]


def migrations(dialect: Dialect) -> tuple[Migration, ...]:
    """Every migration of ``dialect``, in version order."""
    return _load(dialect)[1]


def render(sql_text: str, table: str, quote: Callable[[str], str]) -> str:
    """Substitute the configured table name for ``user_sessions`` in a migration.

    Every identifier starting with ``user_sessions`` (the table and the names of its
    indexes and constraints) is renamed and quoted with ``quote``, which must be the
    dialect's identifier quoting (``psycopg.sql.Identifier`` for PostgreSQL). ``table`` has
    already been validated as a plain identifier.
    """
    return _TABLE_TOKEN.sub(lambda m: quote(table + m[1]), sql_text)


def split_statements(sql_text: str) -> list[str]:
    """Split a SQL script into complete statements (SQLite runs one per ``execute``)."""
    statements, buffer = [], ""
    for line in sql_text.splitlines(keepends=True):
        if not buffer and line.lstrip().startswith("--"):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        raise MigrationError(f"incomplete SQL statement: {buffer.strip()[:80]!r}")
    return statements


def script(dialect: Dialect, table: str, versions: set[int], quote: Callable[[str], str]) -> str:
    """The DDL of ``versions`` for ``table`` as one script a DBA can review and run: the
    ledger first, then each file in its own transaction, recorded in the ledger as the
    library records it (so the library then finds nothing pending)."""
    parts = [f"-- bssagent schema for table {quote(table)} ({dialect})", ledger_sql(dialect)]
    if not versions:
        parts.append("-- nothing pending: the schema is up to date")
    literal = "'" + table.replace("'", "''") + "'"
    for migration in migrations(dialect):
        if migration.version not in versions:
            continue
        parts += [
            f"-- {migration.version:04d}_{migration.name}",
            "BEGIN;",
            render(migration.sql, table, quote).strip(),
            "INSERT INTO bssagent_migrations (target, version, name)"
            f" VALUES ({literal}, {migration.version}, '{migration.name}');",
            "COMMIT;",
        ]
    return "\n".join(part.strip() for part in parts) + "\n"
