#!/bin/sh
# The peers the comparison benchmarks measure Formicary against, on loopback: Debian's
# PostgreSQL and Redis servers, installed when missing (their Python clients come with
# the bench extra: pip install -e '.[bench]'). Idempotent: running servers are reused.
#
#   sh bench/peers.sh && .venv/bin/python bench/compare_claims.py
#
# PostgreSQL runs a cluster of its own in /tmp/formicary-bench-pg on port 54339 with
# the server's default durability (fsync and synchronous_commit on: the relay's
# SQLite store commits with synchronous=FULL) and room for 500 connections. Redis runs
# on port 63799 without persistence (no snapshots, no append-only file): locks are
# transient state, as a Redis lock service usually treats them.
set -eu
PG_PORT=${FORMICARY_BENCH_PG_PORT:-54339}
PG_DIR=${FORMICARY_BENCH_PG_DIR:-/tmp/formicary-bench-pg}
REDIS_PORT=${FORMICARY_BENCH_REDIS_PORT:-63799}

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
missing=""
ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1 || missing="$missing postgresql"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
if [ -n "$missing" ]; then
    echo "peers.sh: installing Debian's$missing" >&2
    $SUDO apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $missing >/dev/null
fi

BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
as_owner() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
if [ ! -f "$PG_DIR/PG_VERSION" ]; then
    mkdir -p "$PG_DIR"
    [ "$(id -u)" -ne 0 ] || chown postgres "$PG_DIR"
    as_owner "$BIN/initdb" -D "$PG_DIR" -U formicary --auth=trust -E UTF8 >/dev/null
fi
if ! as_owner "$BIN/pg_ctl" -D "$PG_DIR" status >/dev/null 2>&1; then
    as_owner "$BIN/pg_ctl" -D "$PG_DIR" -l "$PG_DIR/server.log" -w start -o \
        "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=500" >/dev/null
fi
if ! redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes \
        --save "" --logfile /tmp/formicary-bench-redis.log >/dev/null
    tries=0  # --daemonize returns before it listens
    until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do
        tries=$((tries + 1))
        [ "$tries" -lt 100 ] || { echo "peers.sh: redis did not start" >&2; exit 1; }
        sleep 0.1
    done
fi
echo "peers.sh: postgresql on 127.0.0.1:$PG_PORT, redis on 127.0.0.1:$REDIS_PORT" >&2
