#!/usr/bin/env bash
# Make sure a PostgreSQL server is reachable for the bssagent test suite.
#
# Usage: bash tests/ensure_postgres.sh
#
# Inputs (environment):
#   BSSAGENT_TEST_PG_HOST  host to use            (default 127.0.0.1)
#   BSSAGENT_TEST_PG_PORT  port to use            (default 5432)
#   BSSAGENT_TEST_PG_DB    database to provide    (default test)
#
# Behaviour:
#   1. If a server already answers on host:port, it is used as is.
#   2. Otherwise (local hosts only) the PostgreSQL server binaries are installed
#      with apt-get if missing, and a dedicated throw-away cluster
#      ("bssagent-test-<port>", trust auth, superuser "postgres") is created
#      once and started on that port.  Re-running is idempotent.
#   3. The database is created if missing.
#
# The LAST line of stdout is the DSN to use:
#   postgresql://postgres@<host>:<port>/<db>
# Everything else goes to stderr.  Exits 1 with a message on any failure.
#
# The dedicated cluster lives in /var/lib/postgresql/bssagent-test-<port> when
# run as root (the server runs as the "postgres" user), or in
# <repo>/.pgdata/bssagent-test-<port> otherwise.  To get rid of it:
#   pg_ctl -D <dir> stop   (as the owner)   and   rm -rf <dir>
set -euo pipefail

# Keep stdout clean: only the final DSN goes to the original stdout (fd 3).
exec 3>&1 1>&2

HOST="${BSSAGENT_TEST_PG_HOST:-127.0.0.1}"
PORT="${BSSAGENT_TEST_PG_PORT:-5432}"
DB="${BSSAGENT_TEST_PG_DB:-test}"
READY_TIMEOUT=30

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

log() { printf 'ensure_postgres: %s\n' "$*" >&2; }
die() {
    printf 'ensure_postgres: ERROR: %s\n' "$*" >&2
    exit 1
}

if ! [[ "$PORT" =~ ^[0-9]{1,5}$ ]] || ((10#$PORT < 1 || 10#$PORT > 65535)); then
    die "BSSAGENT_TEST_PG_PORT must be a TCP port number, got '$PORT'"
fi
PORT=$((10#$PORT))
[[ "$DB" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]] ||
    die "BSSAGENT_TEST_PG_DB must match [A-Za-z0-9_][A-Za-z0-9_.-]*, got '$DB'"
[[ -n "$HOST" ]] || die "BSSAGENT_TEST_PG_HOST is empty"

# Explicit arguments below take precedence, but make sure stray libpq settings
# of the caller cannot redirect our administrative connections.
unset PGHOST PGHOSTADDR PGPORT PGDATABASE PGUSER PGSERVICE

IS_ROOT=0
[[ "$(id -u)" -eq 0 ]] && IS_ROOT=1

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

# Newest installed server bin dir (/usr/lib/postgresql/<ver>/bin), or empty.
newest_pg_bindir() {
    local ctl
    ctl="$(printf '%s\n' /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -n1)"
    if [[ -x "$ctl" ]]; then
        dirname "$ctl"
    fi
}

# Path of a client tool: $PATH first, then any installed server bin dir.
find_pg_tool() {
    local name="$1" cand
    if command -v "$name" >/dev/null 2>&1; then
        command -v "$name"
        return 0
    fi
    cand="$(printf '%s\n' /usr/lib/postgresql/*/bin/"$name" | sort -V | tail -n1)"
    if [[ -x "$cand" ]]; then
        printf '%s\n' "$cand"
        return 0
    fi
    return 1
}

# Exit status: 0 = accepting connections, 1 = answering but not (yet)
# accepting (e.g. starting up), 2 = nothing answers.
probe() {
    local isready rc
    if isready="$(find_pg_tool pg_isready)"; then
        rc=0
        "$isready" -q -h "$HOST" -p "$PORT" -t 3 || rc=$?
        case "$rc" in
            0) return 0 ;;
            1) return 1 ;;
            *) return 2 ;;
        esac
    fi
    # No pg_isready: a plain TCP connect is the best we can do.
    # shellcheck disable=SC2016  # $1/$2 are expanded by the inner bash
    if timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$HOST" "$PORT" 2>/dev/null; then
        return 0
    fi
    return 2
}

probe_rc() {
    local rc=0
    probe || rc=$?
    printf '%s\n' "$rc"
}

wait_ready() {
    local deadline=$((SECONDS + READY_TIMEOUT))
    while :; do
        [[ "$(probe_rc)" == 0 ]] && return 0
        ((SECONDS >= deadline)) && return 1
        sleep 1
    done
}

is_local_host() {
    case "$1" in
        127.* | localhost | ::1 | localhost.localdomain) return 0 ;;
        *) return 1 ;;
    esac
}

# Run a command with every file descriptor above 2 closed.  Used for commands
# that may leave a daemon behind (pg_ctl start, apt-get starting a cluster):
# otherwise the server would inherit e.g. our saved stdout (fd 3) and keep the
# caller's pipe open forever, so `DSN=$(bash tests/ensure_postgres.sh | tail -n1)`
# would never return.
without_extra_fds() {
    (
        for fd_path in /proc/self/fd/*; do
            fd="${fd_path##*/}"
            if [[ "$fd" =~ ^[0-9]+$ ]] && ((fd > 2)); then
                eval "exec ${fd}>&-" 2>/dev/null || true
            fi
        done
        "$@"
    ) 3>&-
}

# Run a command with root privileges (directly, or through sudo).
as_root() {
    if ((IS_ROOT)); then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run '$*' but this is not root and sudo is not installed"
    fi
}

# Run a command as the owner of the test cluster: "postgres" when we are root
# (initdb and postgres refuse to run as root), ourselves otherwise.
as_owner() {
    if ((IS_ROOT)); then
        if command -v runuser >/dev/null 2>&1; then
            (cd / && runuser -u postgres -- "$@")
        else
            (cd / && su -s /bin/bash postgres -c "$(printf '%q ' "$@")")
        fi
    else
        "$@"
    fi
}

install_server() {
    command -v apt-get >/dev/null 2>&1 ||
        die "PostgreSQL is not installed and apt-get is not available (not a Debian system?). Install PostgreSQL or set BSSAGENT_TEST_DATABASE_URL."
    log "PostgreSQL server binaries not found; installing them with apt-get (this can take a while)"
    as_root apt-get update ||
        die "'apt-get update' failed"
    without_extra_fds as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql ||
        die "'apt-get install -y postgresql' failed"
}

# Start (creating it first if needed) the dedicated test cluster on $PORT.
start_own_cluster() {
    local bindir base datadir logfile ver
    bindir="$(newest_pg_bindir)"
    [[ -n "$bindir" ]] || die "no /usr/lib/postgresql/*/bin/pg_ctl found even after installing PostgreSQL"

    if ((IS_ROOT)); then
        getent passwd postgres >/dev/null ||
            die "user 'postgres' does not exist (it is normally created by the postgresql package)"
        base=/var/lib/postgresql
        if [[ ! -d "$base" ]]; then
            mkdir -p "$base" || die "cannot create $base"
            chown postgres: "$base" || die "cannot chown $base to postgres"
        fi
    else
        base="$REPO_ROOT/.pgdata"
        mkdir -p "$base" || die "cannot create $base"
    fi
    datadir="$base/bssagent-test-$PORT"
    logfile="$base/bssagent-test-$PORT.log"

    if [[ -f "$datadir/PG_VERSION" ]]; then
        ver="$(cat "$datadir/PG_VERSION")"
        if [[ -x "/usr/lib/postgresql/$ver/bin/pg_ctl" ]]; then
            bindir="/usr/lib/postgresql/$ver/bin"
        else
            die "cluster $datadir was made by PostgreSQL $ver, whose binaries are no longer installed; remove $datadir and re-run"
        fi
        log "reusing test cluster $datadir (PostgreSQL $ver)"
    else
        if [[ -d "$datadir" ]] && [[ -n "$(ls -A "$datadir" 2>/dev/null)" ]]; then
            die "$datadir exists but is not a PostgreSQL cluster (no PG_VERSION); remove it and re-run"
        fi
        log "creating test cluster $datadir with $bindir/initdb"
        if ((IS_ROOT)); then
            if ! { mkdir -p "$datadir" && chown postgres: "$datadir" && chmod 700 "$datadir"; }; then
                die "cannot prepare $datadir"
            fi
        fi
        as_owner "$bindir/initdb" -D "$datadir" -A trust -U postgres -E UTF8 --no-locale ||
            die "initdb failed for $datadir (see messages above)"
    fi

    if as_owner "$bindir/pg_ctl" -D "$datadir" status >/dev/null 2>&1; then
        log "test cluster $datadir is already running; waiting for it on $HOST:$PORT"
        return 0
    fi

    if ((IS_ROOT)) && [[ ! -e "$logfile" ]]; then
        if ! { touch "$logfile" && chown postgres: "$logfile"; }; then
            die "cannot create $logfile"
        fi
    fi

    log "starting test cluster $datadir on $HOST:$PORT (log: $logfile)"
    if ! without_extra_fds as_owner "$bindir/pg_ctl" -D "$datadir" \
        -o "-p $PORT -k /tmp -c listen_addresses='$HOST'" \
        -l "$logfile" -w -t 60 start; then
        log "last lines of $logfile:"
        tail -n 20 "$logfile" >&2 || true
        die "could not start the test cluster in $datadir on port $PORT"
    fi
}

# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

state="$(probe_rc)"
if [[ "$state" == 0 ]]; then
    log "a server is already accepting connections on $HOST:$PORT; using it"
elif [[ "$state" == 1 ]]; then
    log "a server on $HOST:$PORT is answering but not accepting connections yet; waiting"
else
    is_local_host "$HOST" ||
        die "nothing answers on $HOST:$PORT and that host is not local, so no server can be started there"

    if [[ -z "$(newest_pg_bindir)" ]]; then
        install_server
        # The Debian package may have started its own cluster on this port.
        if [[ "$(probe_rc)" != 2 ]]; then
            log "a server now answers on $HOST:$PORT (started by the package); using it"
        else
            start_own_cluster
        fi
    else
        start_own_cluster
    fi
fi

wait_ready || die "no PostgreSQL server became ready on $HOST:$PORT within ${READY_TIMEOUT}s"

# The server-fault tests (tests/test_server_faults.py) start, freeze and kill a throw-away
# cluster of their own: they need the server binaries even when the server above is remote.
if [[ -z "$(newest_pg_bindir)" ]]; then
    install_server
fi

if ! PSQL="$(find_pg_tool psql)"; then
    log "psql not found; installing postgresql-client"
    command -v apt-get >/dev/null 2>&1 || die "psql is not installed and apt-get is not available"
    as_root apt-get update || die "'apt-get update' failed"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql-client ||
        die "'apt-get install -y postgresql-client' failed"
    PSQL="$(find_pg_tool psql)" || die "psql still not found after installing postgresql-client"
fi

psql_admin() {
    "$PSQL" -X -v ON_ERROR_STOP=1 -h "$HOST" -p "$PORT" -U postgres -d postgres -w "$@"
}

# Check that we can log in as postgres without a password prompt.
if ! err="$(psql_admin -tAc 'select 1' 2>&1 >/dev/null)"; then
    log "$err"
    case "$err" in
        *password* | *authentication* | *pg_hba.conf*)
            die "cannot log in to $HOST:$PORT as user 'postgres' without a password. Use a server with trust auth for $HOST, set PGPASSWORD (or ~/.pgpass), set BSSAGENT_TEST_DATABASE_URL to a working DSN, or pick a free BSSAGENT_TEST_PG_PORT so that a dedicated test cluster is started"
            ;;
        *)
            die "cannot connect to $HOST:$PORT as user 'postgres' (psql error above). Is it really a PostgreSQL server? Set BSSAGENT_TEST_DATABASE_URL to a working DSN, or pick a free BSSAGENT_TEST_PG_PORT so that a dedicated test cluster is started"
            ;;
    esac
fi

db_exists() {
    local out
    out="$(psql_admin -tAc "select 1 from pg_database where datname = '$DB'")" ||
        die "could not query pg_database on $HOST:$PORT"
    [[ "$out" == 1 ]]
}

if db_exists; then
    log "database '$DB' already exists"
else
    log "creating database '$DB'"
    created=0
    if CREATEDB="$(find_pg_tool createdb)"; then
        "$CREATEDB" -h "$HOST" -p "$PORT" -U postgres -w "$DB" && created=1
    else
        psql_admin -c "create database \"$DB\"" && created=1
    fi
    # Tolerate a concurrent run having created it in the meantime.
    if ((!created)) && ! db_exists; then
        die "could not create database '$DB' on $HOST:$PORT"
    fi
fi

if [[ "$HOST" == *:* ]]; then
    dsn_host="[$HOST]"
else
    dsn_host="$HOST"
fi
printf 'postgresql://postgres@%s:%s/%s\n' "$dsn_host" "$PORT" "$DB" >&3
