"""Run the benchmark suite and print one summary table in Markdown.

    BSSAGENT_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test \\
        .venv/bin/python tests/benchmarks/run.py [--quick] [--only NAME[,NAME]]

Benchmarks, in this order (each also runs alone: ``python tests/benchmarks/bench_NAME.py``):

- ``sessions``: get_or_create_user_session, sync and async managers, 1 and 16 concurrent
  callers, cache hit / cache miss / new user, against a dict lookup and raw psycopg;
- ``agent``: agent turn at turns 1 / 10 / 100 and 16 concurrent conversations, against raw
  LangGraph on the same saver;
- ``lifecycle``: lookup on 1,000,000 vs 1,000 rows, expiring 100,000 idle sessions and the
  idle probe against raw psycopg, checkpoint retention of 100 ended 100-turn threads;
- ``outage``: turns in memory during a (proxied) outage against raw LangGraph on
  ``InMemorySaver``, and writing them back against LangGraph's ``PostgresSaver.put``.

Each benchmark works in a fresh database of its own, dropped at the end. Every figure is
printed next to its baseline, run side by side in the same process; the table at the end
collects them under a line of machine facts. The full run takes several minutes (about 3 on
2 cores, most of it the 1,000,000-row table and 10,000 retention turns); ``--quick`` shrinks
every size and finishes well within two minutes (about 30 s), for trying it out.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import bench_agent
import bench_lifecycle
import bench_outage
import bench_sessions
from common import URL, Row, header, print_summary

BENCHMARKS: dict[str, Callable[[str, bool], list[Row]]] = {
    "sessions": bench_sessions.run,
    "agent": bench_agent.run,
    "lifecycle": bench_lifecycle.run,
    "outage": bench_outage.run,
}


def names(value: str) -> list[str]:
    chosen = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if not chosen or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark {', '.join(unknown) or value!r}; choose from "
            + ", ".join(BENCHMARKS)
        )
    # Always in suite order, each once.
    return [name for name in BENCHMARKS if name in chosen]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a quick try")
    parser.add_argument(
        "--only",
        type=names,
        default=list(BENCHMARKS),
        metavar="NAME[,NAME]",
        help=f"run only these benchmarks ({', '.join(BENCHMARKS)})",
    )
    args = parser.parse_args()
    head = header(URL, args.quick)
    print(f"{head}\n")
    rows: list[Row] = []
    started = time.perf_counter()
    for name in args.only:
        start = time.perf_counter()
        rows += BENCHMARKS[name](URL, args.quick)
        print(f"({name} took {time.perf_counter() - start:.0f} s)\n")
    print(f"(suite took {time.perf_counter() - started:.0f} s)")
    print_summary(head, rows)


if __name__ == "__main__":
    main()
