"""The ``bssagent`` command (Typer, Rich tables, ``--json`` for scripts).

    bssagent demo | chat --user ID
    bssagent db migrate | status | sql [--all]
    bssagent sessions list [--user U] [--status S] [--limit N] | show T | end T | delete T
    bssagent users export U [-o FILE] | erase U [--yes]
    bssagent cleanup --max-idle 30m [--dry-run]
    bssagent stats
    bssagent doctor

The database comes from ``--database-url`` (before the command) or the environment
(``BSSAGENT_DATABASE_URL`` / ``DATABASE_URL``, else the SQLite file), like the library's.
Exit codes: 0 success, 1 a user error (bad arguments or input, unknown session, refused
confirmation), 2 a storage error (unreachable database, failed migration).
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import BssAgentError, StorageError
from . import chat, db, doctor, maintenance, sessions
from .output import Target, errors

EXIT_USER_ERROR = 1
EXIT_STORAGE_ERROR = 2

app = typer.Typer(
    name="bssagent",
    help="Per-user LangGraph sessions: the demo, and tools to operate a bssagent service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def root(
    ctx: typer.Context,
    database_url: Annotated[
        str | None,
        typer.Option(help="postgresql://, sqlite:/// or memory:// (default: environment)."),
    ] = None,
    namespace: Annotated[str | None, typer.Option(help="The manager namespace.")] = None,
    table_name: Annotated[str | None, typer.Option(help="The session table.")] = None,
) -> None:
    ctx.obj = Target(database_url, namespace, table_name)


app.command()(chat.demo)
app.command()(chat.chat)
app.add_typer(db.app, name="db")
app.add_typer(sessions.sessions_app, name="sessions")
app.add_typer(sessions.users_app, name="users")
app.command()(maintenance.cleanup)
app.command()(maintenance.stats)
app.command()(doctor.doctor)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bssagent`` console script; returns the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        # Not standalone: errors come back here to get bssagent's exit codes, and a
        # typer.Exit(code) raised by a command comes back as the return value.
        code = app(args=argv, prog_name="bssagent", standalone_mode=False)
    except typer.Exit as done:
        return int(done.exit_code)
    except typer.Abort:
        errors.print("aborted")
        return EXIT_USER_ERROR
    except typer.TyperException as exc:  # usage errors: Typer would exit 2; ours is 1
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            errors.print(f"error: {escape(exc.format_message())}")
        return EXIT_USER_ERROR
    except StorageError as exc:
        errors.print(f"[red]storage error:[/] {escape(str(exc))}")
        return EXIT_STORAGE_ERROR
    except BssAgentError as exc:
        errors.print(f"[red]error:[/] {escape(str(exc))}")
        return EXIT_USER_ERROR
    return code if isinstance(code, int) else 0
