"""``bssagent cleanup`` and ``bssagent stats``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .output import JsonOption, console, manager, parse_duration, print_json, table


def cleanup(
    ctx: typer.Context,
    max_idle: Annotated[
        str, typer.Option(help="Expire sessions idle longer than this: 90, 45s, 30m, 2h, 1d.")
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only count what would expire.")
    ] = False,
    json: JsonOption = False,
) -> None:
    """Expire idle sessions (in batches; safe beside running services)."""
    seconds = parse_duration(max_idle)
    with manager(ctx) as sessions:
        if dry_run:
            count = sessions.count_inactive_sessions(seconds)
        else:
            with Progress(
                SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                console=console, transient=True, disable=json,
            ) as progress:  # fmt: skip
                task = progress.add_task("expiring idle sessions", total=None)
                done = 0

                def advance(batch: int) -> None:
                    nonlocal done
                    done += batch
                    progress.update(task, description=f"expired {done:,} session(s)")

                count = sessions.cleanup_inactive_sessions(seconds, on_batch=advance)
    if json:
        print_json({"dry_run": dry_run, "max_idle_seconds": seconds, "sessions": count})
    else:
        verb = "would expire" if dry_run else "expired"
        console.print(f"{verb} {count:,} session(s) idle longer than {max_idle}")


def stats(ctx: typer.Context, json: JsonOption = False) -> None:
    """Aggregates of the namespace (counters kept by the database: no scan)."""
    with manager(ctx) as sessions:
        found = sessions.get_stats()
        location = sessions.location
    data = found.to_dict()
    if json:
        print_json(data)
    else:
        table(f"statistics of {location}", ("measure", "value"), data.items())
