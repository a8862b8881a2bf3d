#!/bin/sh
# A PostgreSQL server on loopback for the tests' second store backend (issue: "both
# store backends pass the same suite"). Installs Debian's postgresql if it is
# missing, then runs a throwaway cluster of its own (not the system's), owned by the
# postgres user when run as root, listening on 127.0.0.1:$FORMICARY_PG_PORT only,
# trust authentication for user formicary. Idempotent: a running cluster is reused.
# fsync is off: nothing here tests the database server's own durability.
set -eu
PORT=${FORMICARY_PG_PORT:-54329}
DIR=${FORMICARY_PG_DIR:-/tmp/formicary-pg-$PORT}

bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

if [ -z "$(bindir)" ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    echo "postgres.sh: installing Debian's postgresql" >&2
    $SUDO apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q postgresql >/dev/null
fi
BIN=$(bindir)

as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

if [ ! -f "$DIR/PG_VERSION" ]; then
    mkdir -p "$DIR"
    [ "$(id -u)" -ne 0 ] || chown postgres "$DIR"
    as_owner "$BIN/initdb" -D "$DIR" -U formicary --auth=trust -E UTF8 >/dev/null
fi
if ! as_owner "$BIN/pg_ctl" -D "$DIR" status >/dev/null 2>&1; then
    as_owner "$BIN/pg_ctl" -D "$DIR" -l "$DIR/server.log" -w start -o \
        "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=500" \
        >/dev/null
fi
echo "postgres.sh: postgresql://formicary@127.0.0.1:$PORT/postgres" >&2
