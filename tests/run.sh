#!/usr/bin/env bash
# The one test command:  bash tests/run.sh [pytest args...]
#
#   1. creates .venv (python3 -m venv) if missing and installs the package in
#      editable mode together with the PEP 735 "dev" dependency group;
#   2. makes sure a PostgreSQL server is available (tests/ensure_postgres.sh)
#      unless BSSAGENT_TEST_DATABASE_URL is already set, and exports
#      BSSAGENT_TEST_DATABASE_URL;
#   3. runs pytest with the given arguments;
#   4. unless BSSAGENT_SKIP_LINT=1, runs ruff and mypy.
#
# Exits non-zero if any step fails (lint still runs after failing tests, so
# that one run reports everything).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'tests/run.sh: ERROR: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------- venv + deps
if [[ ! -x .venv/bin/python ]]; then
    command -v python3 >/dev/null 2>&1 || die "python3 not found"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        die "python3 >= 3.10 is required, found $(python3 --version 2>&1)"
    say "creating .venv"
    python3 -m venv .venv ||
        die "'python3 -m venv .venv' failed (on Debian: apt-get install python3-venv)"
fi

say "upgrading pip"
.venv/bin/python -m pip install -q --upgrade pip || die "could not upgrade pip in .venv"
# `pip install --group` needs pip >= 25.1.
.venv/bin/python - <<'PY' || die "pip >= 25.1 is required for '--group'; could not upgrade it"
import sys
from importlib.metadata import version
parts = []
for p in version("pip").split(".")[:2]:
    digits = "".join(c for c in p if c.isdigit())
    parts.append(int(digits or 0))
sys.exit(0 if tuple(parts) >= (25, 1) else 1)
PY

say "installing bssagent (editable) + dev dependency group"
.venv/bin/python -m pip install -q -e . --group dev || die "installing the package and its dev group failed"

# ------------------------------------------------------------------ database
if [[ -z "${BSSAGENT_TEST_DATABASE_URL:-}" ]]; then
    say "making sure PostgreSQL is available (tests/ensure_postgres.sh)"
    pg_out="$(bash tests/ensure_postgres.sh)" || die "tests/ensure_postgres.sh failed (see above)"
    BSSAGENT_TEST_DATABASE_URL="$(printf '%s\n' "$pg_out" | tail -n1)"
    [[ -n "$BSSAGENT_TEST_DATABASE_URL" ]] || die "tests/ensure_postgres.sh printed no DSN"
else
    say "using BSSAGENT_TEST_DATABASE_URL from the environment"
fi
export BSSAGENT_TEST_DATABASE_URL
# Never print a password: redact "user:secret@" in the URL.
say "PostgreSQL for the tests: $(printf '%s' "$BSSAGENT_TEST_DATABASE_URL" | sed -E 's#(//[^:/@]*):[^@]*@#\1:***@#')"

# --------------------------------------------------------------------- tests
failed=()
say "pytest $*"
pytest_rc=0
.venv/bin/python -m pytest "$@" || pytest_rc=$?
if ((pytest_rc == 5)); then
    printf 'tests/run.sh: ERROR: pytest collected no tests (exit code 5)\n' >&2
    failed+=("pytest (no tests collected)")
elif ((pytest_rc != 0)); then
    failed+=("pytest (exit code $pytest_rc)")
fi

# ---------------------------------------------------------------------- lint
if [[ "${BSSAGENT_SKIP_LINT:-0}" == 1 ]]; then
    say "skipping ruff and mypy (BSSAGENT_SKIP_LINT=1)"
else
    lint_paths=()
    for p in bssagent tests examples; do
        [[ -e "$p" ]] && lint_paths+=("$p")
    done
    say "ruff check ${lint_paths[*]}"
    .venv/bin/ruff check "${lint_paths[@]}" || failed+=("ruff")
    say "mypy"
    .venv/bin/mypy || failed+=("mypy")
fi

if ((${#failed[@]})); then
    printf 'tests/run.sh: FAILED: %s\n' "${failed[@]}" >&2
    if ((pytest_rc != 0)); then
        exit "$pytest_rc"
    fi
    exit 1
fi
say "all checks passed"
