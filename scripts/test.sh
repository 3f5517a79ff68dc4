#!/usr/bin/env bash
# The project's test command (CI runs exactly this, see .ci/run): installs what the tests need on
# a fresh Debian machine, then runs `cargo test --workspace` with any extra arguments.
#
# Needs: PostgreSQL's server binaries (initdb, pg_ctl), for the store tests' throwaway servers
# (mdbus_store::testing::PgServer looks in the same places: `pg_config --bindir`, the newest
# /usr/lib/postgresql/*/bin, PATH). Installed with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

has_server() { [ -x "$1/initdb" ] && [ -x "$1/pg_ctl" ]; }

postgres_bindir() {
    local d
    if command -v pg_config > /dev/null 2>&1; then
        d="$(pg_config --bindir 2> /dev/null || true)"
        if [ -n "$d" ] && has_server "$d"; then echo "$d"; return 0; fi
    fi
    for d in $(ls -d /usr/lib/postgresql/*/bin 2> /dev/null | sort -t/ -k5,5 -n -r); do
        if has_server "$d"; then echo "$d"; return 0; fi
    done
    local IFS=:
    for d in $PATH; do
        if [ -n "$d" ] && has_server "$d"; then echo "$d"; return 0; fi
    done
    return 1
}

if ! postgres_bindir > /dev/null; then
    echo "test.sh: no PostgreSQL server binaries found; installing the postgresql package" >&2
    if [ "$(id -u)" -eq 0 ]; then
        sudo=()
    elif command -v sudo > /dev/null 2>&1; then
        sudo=(sudo)
    else
        echo "test.sh: installing PostgreSQL needs root (or sudo): run 'apt-get install postgresql' as root" >&2
        exit 1
    fi
    if ! command -v apt-get > /dev/null 2>&1; then
        echo "test.sh: no apt-get on this machine: install PostgreSQL's server (initdb, pg_ctl) by hand" >&2
        exit 1
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql
    if ! bindir="$(postgres_bindir)"; then
        echo "test.sh: the postgresql package is installed but initdb/pg_ctl are still not found" >&2
        exit 1
    fi
    echo "test.sh: PostgreSQL server binaries in $bindir" >&2
fi

exec cargo test --workspace "$@"
