"""Generate bssagent's sync modules from their async sources, as psycopg does.

The async code is the source of truth; each sync twin is a mechanical translation, so the
two can never drift. Run ``python tests/tools/async_to_sync.py`` after editing an async
source; ``--check`` (run by the test suite) fails when a twin is out of date.

Translation: ``async def/with/for`` lose ``async``, ``await`` disappears, ``Async``-prefixed
names and ``*_async`` modules lose the prefix/suffix, and a line carrying a trailing
``# sync: <code>`` comment is replaced by ``<code>`` at the same indentation, and one
ending in ``# sync-drop`` is left out; a comment line ``# sync-only: <code>`` becomes
``<code>``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAIRS = [
    ("bssagent/sessions/storage/postgres_async.py", "bssagent/sessions/storage/postgres_sync.py"),
    ("bssagent/sessions/manager_async.py", "bssagent/sessions/manager_sync.py"),
]
_MARKER = re.compile(r"^(\s*)(.*?)\s+# sync: (.*)$")
_DROP = re.compile(r"\s# sync-drop$")
_SYNC_ONLY = re.compile(r"^(\s*)# sync-only: (.*)$")
_RULES = [
    (re.compile(r"\basync (def|with|for) "), r"\1 "),
    (re.compile(r"\bawait "), ""),
    (re.compile(r"\basynccontextmanager\b"), "contextmanager"),
    (re.compile(r"\bAsyncIterator\b"), "Iterator"),
    (re.compile(r"\bAsyncGenerator\b"), "Generator"),
    (re.compile(r"\bAwaitable\[(\w+)\]"), r"\1"),
    (re.compile(r"\b__aenter__\b"), "__enter__"),
    (re.compile(r"\b__aexit__\b"), "__exit__"),
    (re.compile(r"\bAsync([A-Z]\w*)"), r"\1"),
    (re.compile(r"\b(\w+)_async\b"), r"\1_sync"),
]


def translate(source: str, origin: str) -> str:
    lines = [
        f"# WARNING: generated from {origin}",
        "# by tests/tools/async_to_sync.py. Do not edit: change the async source instead.",
    ]
    for line in source.splitlines():
        if _DROP.search(line):
            continue
        sync_only = _SYNC_ONLY.match(line)
        if sync_only:
            lines.append(sync_only[1] + sync_only[2])
            continue
        marker = _MARKER.match(line)
        if marker:
            lines.append(marker[1] + marker[3])
            continue
        for pattern, replacement in _RULES:
            line = pattern.sub(replacement, line)
        lines.append(line)
    return _format("\n".join(lines) + "\n")


def _format(code: str) -> str:
    ruff = [sys.executable, "-m", "ruff"]
    stdin = ["--quiet", "--stdin-filename", "x.py", "-"]
    code = subprocess.run(
        [*ruff, "check", "--select", "I,F401,SIM117", "--fix", *stdin],
        input=code, capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout  # fmt: skip
    return subprocess.run(
        [*ruff, "format", *stdin],
        input=code, capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if a sync twin is stale")
    args = parser.parse_args()
    stale = []
    for source, target in PAIRS:
        generated = translate((ROOT / source).read_text(encoding="utf-8"), source)
        path = ROOT / target
        if path.exists() and path.read_text(encoding="utf-8") == generated:
            continue
        stale.append(target)
        if not args.check:
            path.write_text(generated, encoding="utf-8")
    if args.check and stale:
        print("stale sync twins (run tests/tools/async_to_sync.py):", *stale, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
