# shellcheck shell=bash
# A throwaway PostgreSQL server for the tests marked `postgres` (tests/test_tracking_server.py).
#
#   source .ci/postgres.sh              # (what .ci/run does) start it, export SKETCHWALK_TEST_PG_URI,
#                                       # and stop + delete it when the sourcing shell exits (EXIT trap)
#   bash .ci/postgres.sh CMD [ARGS...]  # start it, run CMD with SKETCHWALK_TEST_PG_URI set, stop it;
#                                       # exits with CMD's status. E.g.
#                                       #   bash .ci/postgres.sh .venv/bin/python -m pytest -q -m postgres
#   bash .ci/postgres.sh                # start it and leave it running; prints the URI and the stop command
#
# PostgreSQL binaries: pg_ctl/initdb on PATH, else the newest /usr/lib/postgresql/*/bin, else
# `apt-get install postgresql` (through sudo when not root and sudo exists). As root, the cluster is
# owned by and run as the `postgres` system user (created if missing): PostgreSQL refuses to run as
# root. The server listens on 127.0.0.1 only (port SKETCHWALK_PG_PORT, default 55432, or the next
# free one), with its unix socket, data and log in a fresh temporary directory; fsync is off (the
# data is thrown away). It has a database `mlflow_ci` owned by a login role with a random password:
#   SKETCHWALK_TEST_PG_URI=postgresql+psycopg2://sketchwalk_ci:<password>@127.0.0.1:<port>/mlflow_ci
# If no server can be had, this says so loudly and leaves SKETCHWALK_TEST_PG_URI unset; it never
# fails the calling script by itself (with SKETCHWALK_REQUIRE_PG=1 the postgres tests then fail).

_swpg_log() { printf '[postgres.sh] %s\n' "$*" >&2; }

_swpg_loud() {
    printf '\n%s\n' "######################################################################" >&2
    printf '### postgres.sh: %s\n' "$@" >&2
    printf '%s\n\n' "######################################################################" >&2
}

# Directory holding initdb, pg_ctl and psql, or nothing.
_swpg_find_bin() {
    local p d
    p=$(command -v pg_ctl 2>/dev/null || true)
    if [ -n "$p" ]; then
        d=$(dirname "$(readlink -f "$p")")
        if [ -x "$d/initdb" ] && [ -x "$d/psql" ]; then echo "$d"; return 0; fi
    fi
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5,5 -V -r); do
        if [ -x "$d/pg_ctl" ] && [ -x "$d/initdb" ] && [ -x "$d/psql" ]; then echo "$d"; return 0; fi
    done
    return 1
}

_swpg_install() {
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo="sudo -n"
        else
            _swpg_log "not root and no password-less sudo: cannot apt-get install postgresql"
            return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        _swpg_log "no apt-get on this machine: cannot install postgresql"
        return 1
    fi
    _swpg_log "installing PostgreSQL: apt-get install -y --no-install-recommends postgresql"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || return 1
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2 || return 1
}

_swpg_free_port() {
    local port=$1 last=$(( $1 + 100 ))
    while [ "$port" -le "$last" ]; do
        if python3 - "$port" 2>/dev/null <<'PY'
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
PY
        then echo "$port"; return 0; fi
        port=$(( port + 1 ))
    done
    return 1
}

# Run a command as the cluster owner.
_swpg_as() {
    if [ -z "${_SWPG_USER:-}" ]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u "$_SWPG_USER" -- "$@"
    else
        su -s /bin/sh "$_SWPG_USER" -c "$(printf '%q ' "$@")"
    fi
}

_swpg_start() {
    local bin port dir tmp password user=sketchwalk_ci db=mlflow_ci
    bin=$(_swpg_find_bin) || { _swpg_install && bin=$(_swpg_find_bin); } || {
        _swpg_log "no PostgreSQL binaries (pg_ctl, initdb, psql) found or installable"
        return 1
    }
    _swpg_log "PostgreSQL binaries: $bin ($("$bin/pg_ctl" --version))"

    _SWPG_USER=""
    if [ "$(id -u)" -eq 0 ]; then
        _SWPG_USER=postgres
        if ! id -u postgres >/dev/null 2>&1; then
            _swpg_log "creating the system user postgres (PostgreSQL refuses to run as root)"
            useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin postgres \
                || adduser --system --group --no-create-home postgres || return 1
        fi
    fi

    port=$(_swpg_free_port "${SKETCHWALK_PG_PORT:-55432}") || { _swpg_log "no free port"; return 1; }
    # As root the directory must be reachable by the postgres user: /tmp, not a private TMPDIR.
    if [ -n "$_SWPG_USER" ]; then tmp=/tmp; else tmp=${TMPDIR:-/tmp}; fi
    dir=$(mktemp -d "$tmp/sketchwalk-pg.XXXXXX") || return 1
    _SWPG_DIR=$dir
    _SWPG_BIN=$bin
    chmod 700 "$dir"
    if [ -n "$_SWPG_USER" ]; then chown "$_SWPG_USER:" "$dir" || return 1; fi
    password=$(python3 -c 'import secrets; print(secrets.token_hex(16))') || return 1

    _swpg_as "$bin/initdb" -D "$dir/data" -U postgres -E UTF8 --no-locale \
        --auth-local=trust --auth-host=scram-sha-256 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; return 1; }
    _swpg_as "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
        start >&2 || { cat "$dir/server.log" >&2; return 1; }
    _SWPG_RUNNING=1
    _swpg_as "$bin/psql" -X -q -h "$dir" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 \
        -c "CREATE ROLE $user LOGIN PASSWORD '$password'" \
        -c "CREATE DATABASE $db OWNER $user" >&2 || return 1
    # The URI works over TCP with the password (not only through the trusted unix socket).
    PGPASSWORD=$password "$bin/psql" -X -q -h 127.0.0.1 -p "$port" -U "$user" -d "$db" -v ON_ERROR_STOP=1 \
        -c "SELECT 1" >/dev/null || { _swpg_log "password login over TCP failed"; return 1; }

    export SKETCHWALK_TEST_PG_URI="postgresql+psycopg2://$user:$password@127.0.0.1:$port/$db"
    _swpg_log "PostgreSQL is up on 127.0.0.1:$port (data in $dir); SKETCHWALK_TEST_PG_URI is set"
}

_swpg_stop() {
    if [ -n "${_SWPG_RUNNING:-}" ]; then
        _swpg_as "$_SWPG_BIN/pg_ctl" -D "$_SWPG_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
        _SWPG_RUNNING=""
    fi
    if [ -n "${_SWPG_DIR:-}" ] && [ -d "$_SWPG_DIR" ]; then rm -rf "$_SWPG_DIR"; fi
    _SWPG_DIR=""
}

_swpg_main() {
    unset SKETCHWALK_TEST_PG_URI
    if ! _swpg_start; then
        _swpg_stop
        unset SKETCHWALK_TEST_PG_URI
        _swpg_loud "NO PostgreSQL SERVER: SKETCHWALK_TEST_PG_URI is NOT set." \
                   "Tests marked 'postgres' (tests/test_tracking_server.py) will FAIL where" \
                   "CI or SKETCHWALK_REQUIRE_PG=1 is set, and skip otherwise."
        return 1
    fi
    return 0
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
    # Sourced: keep the server for the rest of the sourcing shell, stop it when that shell exits.
    if _swpg_main; then trap '_swpg_stop' EXIT; fi
    true
else
    set -uo pipefail
    if [ $# -gt 0 ]; then
        _swpg_main || true
        trap '_swpg_stop' EXIT
        trap 'exit 130' INT TERM
        "$@"
        exit $?
    fi
    _swpg_main || exit 1
    echo "export SKETCHWALK_TEST_PG_URI='$SKETCHWALK_TEST_PG_URI'"
    if [ -n "$_SWPG_USER" ]; then
        echo "# stop: runuser -u $_SWPG_USER -- $_SWPG_BIN/pg_ctl -D $_SWPG_DIR/data -m fast stop && rm -rf $_SWPG_DIR"
    else
        echo "# stop: $_SWPG_BIN/pg_ctl -D $_SWPG_DIR/data -m fast stop && rm -rf $_SWPG_DIR"
    fi
fi
