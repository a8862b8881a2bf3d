#!/bin/sh
# What the test suite needs from Debian, besides Python: PostgreSQL (the second store
# backend), Chromium (the oversight board's browser tests, driven by Playwright
# through its executable path; Playwright's own browser download is not used), and
# Redis (the smoke run of the benchmark against Redis locks). Installs what is missing
# with apt-get (root, or sudo), then starts the throwaway PostgreSQL server
# (tests/postgres.sh) and the benchmarks' peers (bench/peers.sh). Idempotent.
set -eu
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
