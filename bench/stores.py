"""Store backends side by side: the ingest benchmark on SQLite and on PostgreSQL.

Runs ``bench/ingest.py``'s measurement (a relay process, pre-signed events, agents
publishing with a window of outstanding acks) alternately on the embedded SQLite
store and on a PostgreSQL server, ``--rounds`` times each, in one run, and prints
one JSON object with the best round of each and their ratio. The PostgreSQL server
is the one at ``--dsn`` (default: the tests' server from ``tests/postgres.sh``); the
benchmark uses its own schema, ``formicary_bench``, emptied before each round.

Usage::

    sh tests/postgres.sh
    .venv/bin/python bench/stores.py [--events 20000] [--agents 8] [--rounds 2]

Progress goes to stderr; exactly one JSON object goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

# This folder holds a federation.py (a benchmark): keep it off the path while the
# relay's packages import, so `import federation` finds the package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import federation.network  # noqa: E402, F401

sys.path.append(str(_HERE))

import ingest  # noqa: E402
import psycopg  # noqa: E402

SCHEMA = "formicary_bench"
DEFAULT_DSN = "postgresql://formicary@127.0.0.1:54329/postgres"


def fresh_schema(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
    separator = "&" if "?" in dsn else "?"
    return f"{dsn}{separator}options={quote(f'-csearch_path={SCHEMA}')}"


def one(events: int, agents: int, store: str) -> dict[str, Any]:
    argv = ["--events", str(events), "--agents", str(agents), "--verify-seconds", "0.5"]
    args = ingest.build_parser().parse_args(argv + (["--store", store] if store else []))
    return ingest.report(args, ingest.measure(args))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=DEFAULT_DSN)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    best: dict[str, dict[str, Any]] = {}
    for n in range(args.rounds):
        for backend in ("sqlite", "postgresql"):
            store = fresh_schema(args.dsn) if backend == "postgresql" else ""
            ingest.log(f"round {n + 1}/{args.rounds}: {backend}")
            result = one(args.events, args.agents, store)
            if result["ingest_events_per_s"] > best.get(backend, {}).get("ingest_events_per_s", 0):
                best[backend] = result
    sqlite, postgres = best["sqlite"], best["postgresql"]
    print(
        json.dumps(
            {
                "benchmark": "stores",
                "events": args.events,
                "agents": args.agents,
                "rounds": args.rounds,
                "sqlite_events_per_s": sqlite["ingest_events_per_s"],
                "postgresql_events_per_s": postgres["ingest_events_per_s"],
                "postgresql_over_sqlite": round(
                    postgres["ingest_events_per_s"] / sqlite["ingest_events_per_s"], 3
                ),
                "sqlite_p99_ms": sqlite["publish_latency_ms"]["p99"],
                "postgresql_p99_ms": postgres["publish_latency_ms"]["p99"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
