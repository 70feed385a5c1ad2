"""``bssagent db``: apply, inspect or print the schema migrations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from ..sessions import migrations
from .output import JsonOption, console, manager, print_json, table

app = typer.Typer(help="The schema: apply, inspect, or print the pending DDL for a DBA.")


@app.command()
def migrate(ctx: typer.Context, json: JsonOption = False) -> None:
    """Apply the pending migrations (the first call of the library would, too)."""
    with manager(ctx) as sessions, console.status("applying migrations..."):
        applied = sessions.migrate()
    if json:
        print_json({"applied": applied})
    elif applied:
        console.print("applied: " + ", ".join(applied))
    else:
        console.print("nothing to apply: the schema is up to date")


@app.command()
def status(ctx: typer.Context, json: JsonOption = False) -> None:
    """Show the migrations applied to the session table and the pending ones."""
    with manager(ctx) as sessions:
        found = sessions.schema_status()
        location = sessions.location
    if json:
        print_json({"location": location, **found})
        return
    rows = [(name, "applied") for name in found["applied"]]
    rows += [(name, "pending") for name in found["pending"]]
    table(f"schema of {location}", ("migration", "state"), rows)


@app.command("sql")
def sql_(
    ctx: typer.Context,
    every: Annotated[
        bool, typer.Option("--all", help="Every migration, without asking the database.")
    ] = False,
) -> None:
    """Print the pending DDL (with its ledger rows) as a script a DBA can review and run."""
    with manager(ctx) as sessions:
        dialect: migrations.Dialect = "postgresql" if sessions.backend == "postgres" else "sqlite"
        if sessions.backend == "memory":
            raise typer.BadParameter("memory:// has no schema", param_hint="--database-url")
        every_version = {m.version for m in migrations.migrations(dialect)}
        if every:
            versions = every_version
        else:
            pending = set(sessions.schema_status()["pending"])
            versions = {v for v in every_version if any(p.startswith(f"{v:04d}_") for p in pending)}
        table_name = sessions.settings.table_name
    print(migrations.script(dialect, table_name, versions, _quoting(dialect)), end="")


def _quoting(dialect: migrations.Dialect) -> Callable[[str], str]:
    """The identifier quoting the backend itself applies the migrations with."""
    if dialect == "postgresql":
        from psycopg import sql

        return lambda name: sql.Identifier(name).as_string()
    from ..sessions.storage.sqlite import quote_identifier

    return quote_identifier
