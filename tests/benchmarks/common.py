"""Shared parts of the benchmarks: timing, fresh databases, summary rows and their formatting.

Every benchmark module exposes ``run(url, quick) -> list[Row]`` (printing its detailed
figures as it goes) and calls :func:`standalone` when run as a script; ``run.py`` runs them
all and prints one summary table.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from urllib.parse import urlsplit

import psycopg

URL = os.environ.get("BSSAGENT_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")

# The seed's session table (before bssagent): the plain-SQL baseline for inserts and expiry.
PLAIN_TABLE_DDL = (
    "CREATE TABLE {} (id BIGSERIAL PRIMARY KEY, user_id VARCHAR(255) NOT NULL,"
    " thread_id VARCHAR(255) NOT NULL UNIQUE, is_active BOOLEAN NOT NULL DEFAULT TRUE,"
    " created_at TIMESTAMPTZ NOT NULL DEFAULT now(),"
    " updated_at TIMESTAMPTZ NOT NULL DEFAULT now())"
)
# Spelled out: the README's tables use the multiplication sign, which ruff flags as a look-alike.
TIMES = "\N{MULTIPLICATION SIGN}"
RATIO_NOTE = (
    f"ratio = bssagent ÷ baseline of the figures shown: for times, above 1{TIMES} means "
    f"bssagent is slower; for rates (/s), below 1{TIMES} does."
)


@dataclass(frozen=True)
class Row:
    """One line of the summary table (cells already formatted)."""

    measurement: str
    bssagent: str
    baseline: str
    ratio: str


# -- timing -------------------------------------------------------------------------------


def run_batch(fn: Callable[[int], object], n: int, first: int = 0) -> float:
    """Seconds per call of ``fn(first)`` ... ``fn(first + n - 1)``, called back to back."""
    start = time.perf_counter()
    for i in range(first, first + n):
        fn(i)
    return (time.perf_counter() - start) / n


def threaded_batch(
    fn: Callable[[int], object], n: int, callers: int, threads: ThreadPoolExecutor
) -> float:
    """Wall seconds per call while ``callers`` threads each make ``n`` calls at once
    (1 / throughput). ``threads`` must have at least ``callers`` workers."""
    start = time.perf_counter()
    for future in [threads.submit(run_batch, fn, n, c * n) for c in range(callers)]:
        future.result()
    return (time.perf_counter() - start) / (n * callers)


async def arun_batch(fn: Callable[[int], Awaitable[object]], n: int, first: int = 0) -> float:
    """Async :func:`run_batch`."""
    start = time.perf_counter()
    for i in range(first, first + n):
        await fn(i)
    return (time.perf_counter() - start) / n


async def gathered_batch(fn: Callable[[int], Awaitable[object]], n: int, callers: int) -> float:
    """Wall seconds per call while ``callers`` tasks each make ``n`` calls at once."""
    start = time.perf_counter()
    await asyncio.gather(*(arun_batch(fn, n, c * n) for c in range(callers)))
    return (time.perf_counter() - start) / (n * callers)


def interleave(sides: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median of each side's batches (each returns seconds per call), run in turn: one
    warm-up batch each, then ``rounds`` rounds, alternating the order so that neither side
    always follows the other. A change of load on the machine then hits every side alike."""
    for side in sides.values():
        side()
    results: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            results[name].append(sides[name]())
    return {name: statistics.median(values) for name, values in results.items()}


async def ainterleave(
    sides: Mapping[str, Callable[[], Awaitable[float]]], rounds: int
) -> dict[str, float]:
    """Async :func:`interleave`."""
    for side in sides.values():
        await side()
    results: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            results[name].append(await sides[name]())
    return {name: statistics.median(values) for name, values in results.items()}


# -- databases ----------------------------------------------------------------------------


def _with_database(url: str, name: str) -> str:
    return urlsplit(url)._replace(path=f"/{name}").geturl()


@contextmanager
def fresh_database(url: str, prefix: str) -> Iterator[str]:
    """The URL of a new, empty database on ``url``'s server, dropped on exit (even with
    connections left open), so a benchmark never meets another one's tables."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = _with_database(url, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    print(f"(fresh database {name})")
    try:
        yield _with_database(url, name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        print(f"(dropped {name})")


def header(url: str, quick: bool) -> str:
    """One line of machine facts: CPUs, load, Python, PostgreSQL server version, date."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    server = row[0] if row else "?"
    load = f" (load average {os.getloadavg()[0]:.2f})" if hasattr(os, "getloadavg") else ""
    sizes = "--quick sizes (the targets are for the full run)" if quick else "full sizes"
    return (
        f"{os.cpu_count()} CPUs{load}, Python {platform.python_version()}, "
        f"PostgreSQL {server}, {date.today().isoformat()}; {sizes}; medians"
    )


# -- formatting ---------------------------------------------------------------------------


def significant(value: float) -> str:
    """Three significant digits, trailing zeros kept (``1.20``, ``135``, ``0.0766``)."""
    if value <= 0:
        return f"{value:g}"
    return f"{value:.{max(0, 2 - math.floor(math.log10(value)))}f}"


def fmt_time(seconds: float) -> str:
    """``0.0520 µs``, ``226 µs``, ``7.90 ms``, ``2.70 s``."""
    for unit, scale in (("µs", 1e-6), ("ms", 1e-3)):
        if seconds < 999.5 * scale:  # so that rounding never prints "1000 µs"
            return f"{significant(seconds / scale)} {unit}"
    return f"{significant(seconds)} s"


def fmt_rate(per_second: float, unit: str) -> str:
    """``37.4k rows/s``, ``6.02M calls/s``, ``412 turns/s``."""
    for suffix, scale in (("M", 1e6), ("k", 1e3)):
        if per_second >= 0.9995 * scale:
            return f"{significant(per_second / scale)}{suffix} {unit}/s"
    return f"{significant(per_second)} {unit}/s"


def fmt_bytes(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:,.1f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.1f} kB"
    return f"{n:.0f} B"


def ratio(ours: float, base: float) -> str:
    return f"{significant(ours / base)}{TIMES}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def markdown_table(rows: list[Row]) -> str:
    lines = ["| measurement | bssagent | baseline | ratio |", "|---|---|---|---|"]
    lines += [f"| {r.measurement} | {r.bssagent} | {r.baseline} | {r.ratio} |" for r in rows]
    return "\n".join(lines)


def print_summary(head: str, rows: list[Row]) -> None:
    print(f"\n{head}\n\n{markdown_table(rows)}\n\n{RATIO_NOTE}")


def standalone(run: Callable[[str, bool], list[Row]], doc: str) -> None:
    """``python bench_x.py [--quick]``: one benchmark module, then its summary rows."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a quick try")
    args = parser.parse_args()
    head = header(URL, args.quick)
    print(f"{head}\n")
    print_summary(head, run(URL, args.quick))
