"""``bssagent sessions`` and ``bssagent users``: see and manage sessions as an operator.

An operator names a session by its thread id alone; the command finds its owner in the
registry and then goes through the same ownership-checked calls as application code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import SessionNotFoundError
from ..sessions import validation
from ..sessions.manager_sync import AgentSessionManager
from ..sessions.model import UserSession
from .output import (
    SESSION_COLUMNS,
    JsonOption,
    console,
    manager,
    print_json,
    session_row,
    table,
)

sessions_app = typer.Typer(help="List, show, end and delete sessions.")
users_app = typer.Typer(help="A user's data: export it, or erase it.")

Thread = Annotated[str, typer.Argument(help="The session's thread id.")]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


def _owned(sessions: AgentSessionManager, thread_id: str) -> UserSession:
    thread = validation.thread_id(thread_id)
    owner = sessions._thread_owner(thread)
    if owner is None:
        raise SessionNotFoundError(f"no session has thread {thread!r} in this namespace")
    return sessions.get_session(owner, thread)


@sessions_app.command("list")
def list_(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option(help="Only this user's sessions.")] = None,
    status: Annotated[
        str | None, typer.Option(help="active, paused, completed, failed or expired.")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    before_id: Annotated[int | None, typer.Option(help="Page cursor: a row id.")] = None,
    json: JsonOption = False,
) -> None:
    """List the namespace's sessions, newest first."""
    with manager(ctx) as sessions:
        found = sessions.list_sessions(
            user_id=user, status=status, limit=limit, before_id=before_id
        )
    if json:
        print_json([s.to_dict() for s in found])
    else:
        table(f"{len(found)} session(s)", SESSION_COLUMNS, map(session_row, found))


@sessions_app.command()
def show(ctx: typer.Context, thread_id: Thread, json: JsonOption = False) -> None:
    """Show one session, its children and its latest events."""
    with manager(ctx) as sessions:
        session = _owned(sessions, thread_id)
        children = sessions.list_child_sessions(session.user_id, session.thread_id)
        events = sessions.get_session_events(session.user_id, session.thread_id, limit=1000)
    if json:
        print_json(
            {
                "session": session.to_dict(),
                "children": [c.to_dict() for c in children],
                "events": [e.to_dict() for e in events],
            }
        )
        return
    table(f"session {session.thread_id}", ("field", "value"), session.to_dict().items())
    if children:
        table("children", SESSION_COLUMNS, map(session_row, children))
    rows = [(e.seq, f"{e.created_at:%Y-%m-%d %H:%M:%S}", e.kind, e.payload) for e in events[-20:]]
    table(f"events (latest {len(rows)} of {len(events)})", ("seq", "at", "kind", "payload"), rows)


@sessions_app.command()
def end(
    ctx: typer.Context,
    thread_id: Thread,
    status: Annotated[str, typer.Option(help="completed or failed.")] = "completed",
    json: JsonOption = False,
) -> None:
    """End a session (and its children)."""
    with manager(ctx) as sessions:
        session = _owned(sessions, thread_id)
        ended = sessions.end_session(session.user_id, session.thread_id, status=status)
    if json:
        print_json(ended.to_dict())
    else:
        console.print(f"session {ended.thread_id} of {ended.user_id!r} is {ended.status}")


@sessions_app.command()
def delete(
    ctx: typer.Context, thread_id: Thread, yes: Yes = False, json: JsonOption = False
) -> None:
    """Delete a session, its children, their events and checkpoints."""
    with manager(ctx) as sessions:
        session = _owned(sessions, thread_id)
        if not yes:
            typer.confirm(
                f"Delete session {session.thread_id} of {session.user_id!r} and its conversation?",
                abort=True,
                err=True,
            )
        deleted = sessions.delete_session(session.user_id, session.thread_id)
    if json:
        print_json({"deleted": deleted})
    else:
        console.print(f"deleted {len(deleted)} session(s): " + ", ".join(deleted))


@users_app.command()
def export(
    ctx: typer.Context,
    user_id: Annotated[str, typer.Argument(help="The user id.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file, not stdout.")
    ] = None,
) -> None:
    """Export everything stored about a user as JSON (sessions, events, conversations,
    memory)."""
    with manager(ctx) as sessions, console.status(f"exporting {user_id!r}..."):
        document = sessions.export_user_data(user_id)
    if output is None:
        print_json(document)
        return
    import json

    output.write_text(json.dumps(document, indent=2, default=str, ensure_ascii=False) + "\n")
    console.print(f"wrote {len(document['sessions'])} session(s) of {user_id!r} to {output}")


@users_app.command()
def erase(
    ctx: typer.Context,
    user_id: Annotated[str, typer.Argument(help="The user id.")],
    yes: Yes = False,
    json: JsonOption = False,
) -> None:
    """Erase a user: sessions, events, memory and every checkpoint of their threads."""
    user = validation.user_id(user_id)
    if not yes:
        question = f"Erase every session, conversation and memory of {user!r}?"
        typer.confirm(question, abort=True, err=True)
    with manager(ctx) as sessions, console.status(f"erasing {user!r}..."):
        count = sessions.delete_user_data(user)
    if json:
        print_json({"user_id": user, "sessions_deleted": count})
    else:
        console.print(f"erased {user!r}: {count} session(s)")
