#!/bin/sh
# What the test suite needs from Debian, besides Python: PostgreSQL (the second store
# backend), Chromium (the oversight board's browser tests, driven by Playwright
# through its executable path; Playwright's own browser download is not used), and
# Redis (the smoke run of the benchmark against Redis locks). Installs what is missing
# with apt-get (root, or sudo), then starts the throwaway PostgreSQL server
# (tests/postgres.sh) and the benchmarks' peers (bench/peers.sh). Idempotent.
# `sh tests/system.sh stop` stops those three servers again (their files stay).
set -eu
if [ "${1:-}" = stop ]; then
    as_owner() {
        if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
    }
    BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    for dir in "${FORMICARY_PG_DIR:-/tmp/formicary-pg-${FORMICARY_PG_PORT:-54329}}" \
        "${FORMICARY_BENCH_PG_DIR:-/tmp/formicary-bench-pg}"; do
        [ -n "$BIN" ] && [ -d "$dir" ] || continue
        # (status, as postgres.sh asks it: a stale pid file is no running server)
        status=0
        as_owner "$BIN/pg_ctl" -D "$dir" status >/dev/null 2>&1 || status=$?
        if [ "$status" -ne 0 ] && [ "$status" -ne 3 ]; then  # 3: none runs; else unreadable
            echo "system.sh: cannot tell whether postgresql runs in $dir: run this as" \
                "its owner (or root)" >&2
        fi
        [ "$status" -eq 0 ] || continue
        if as_owner "$BIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null; then
            echo "system.sh: stopped postgresql in $dir" >&2
        else
            echo "system.sh: could not stop postgresql in $dir" >&2
        fi
    done
    port=${FORMICARY_BENCH_REDIS_PORT:-63799}
    if redis-cli -p "$port" ping >/dev/null 2>&1; then
        redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
        echo "system.sh: stopped redis on 127.0.0.1:$port" >&2
    fi
    exit 0
fi
missing=""
ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1 || missing="$missing postgresql"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
if [ -n "$missing" ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    echo "system.sh: installing Debian's$missing" >&2
    $SUDO apt-get update -q >/dev/null
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing \
        >/dev/null
fi
sh "$(dirname "$0")/postgres.sh"
exec sh "$(dirname "$0")/../bench/peers.sh"
