"""Contended work claiming: Formicary's ledger against the queues people build on
PostgreSQL (``FOR UPDATE SKIP LOCKED`` with a lease) and on Redis (``SET NX PX``
locks), in one run, and what each does when a holder pauses past its lease.

Theory of operation
-------------------
Each system runs the same worker loop with ``--agents`` workers, one connection
each, all in this process (asyncio for the peers' clients, trio for the SDK), on
the same loopback machine as the servers:

    claim the next open item (leased for ``--ttl-ms``) -> process it -> mark it done

* **Formicary**: a fresh relay process per run (SQLite store, ``synchronous=FULL``);
  ``wo.next`` with a lease, ``wo.update done`` with the claim's fencing token (the
  SDK's ``Ledger``, as an agent uses it).
* **PostgreSQL** (fsync on): ``UPDATE jobs SET owner, attempt = attempt + 1,
  lease_until = now() + ttl WHERE id = (SELECT id FROM jobs WHERE NOT done AND
  (lease_until IS NULL OR lease_until < now()) ORDER BY id LIMIT 1 FOR UPDATE SKIP
  LOCKED) RETURNING id, attempt`` over a partial index on the open rows, then
  ``UPDATE jobs SET done WHERE id AND owner`` (autocommit).
* **Redis** (no persistence: ``bench/peers.sh``): ``SRANDMEMBER`` for a candidate,
  ``SET lock NX PX ttl`` to take it, ``SISMEMBER`` to see it was not finished in
  between, ``INCR`` for an attempt number, then one script that removes the item
  and deletes the lock if it is still the worker's.

**Throughput** (``claims_per_s``): ``--items`` items, worked off as fast as the
workers go with no work per item; the clock runs from the first claim to the last
finish. Claim latency is from asking to holding, retries included. The systems
alternate, ``--rounds`` times; each figure is the median round.

**Pauses** (``double_processed``): ``--pause-items`` items, ``--pausers`` of the
workers each stall after claiming their first item for three leases (a GC pause, a
suspended VM), then write their result to the sink, as the worker loop does after
processing. The sink counts the items written more than once. A *fenced* worker
passes a token that rises with each grant of the item, and a fenced sink refuses a
token below the largest it has seen (the demo's Workbench). Formicary's token comes
with every claim; the peers are run both as usually built (no token) and fenced by
hand (PostgreSQL's ``attempt`` column, Redis' ``INCR``), to show the difference is
the token, and who has to remember to build it.

Usage::

    sh bench/peers.sh                      # PostgreSQL and Redis on loopback
    .venv/bin/pip install -e '.[bench]'    # their Python clients
    .venv/bin/python bench/compare_claims.py [--agents 20,200] [--items 4000]

It uses the table ``formicary_bench_jobs`` and Redis keys under ``formicary-bench:``.
Progress on stderr; one JSON object on stdout (exit 0), or one with ``error`` (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from ingest import percentile, relay_process

from agent_sdk.client import RelayClient
from agent_sdk.identity import Identity
from agent_sdk.ledger import Claim, Ledger, LedgerRefusal

NS = "queue@local"
PG_DSN = os.environ.get(
    "FORMICARY_BENCH_PG", "host=127.0.0.1 port=54339 user=formicary dbname=postgres"
)
REDIS_URL = os.environ.get("FORMICARY_BENCH_REDIS", "redis://127.0.0.1:63799/0")
TABLE = "formicary_bench_jobs"
PREFIX = "formicary-bench:"
PAUSE_LEASES = 3
IDLE_S = 0.05
"""How long a worker that found nothing waits before asking again (only while a
stalled holder's lease runs out)."""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return redis.call('SREM', KEYS[2], ARGV[2])
"""


def log(message: str) -> None:
    print(f"[compare_claims] {message}", file=sys.stderr, flush=True)


@dataclass
class Sink:
    """Where processed items' results land. ``fenced``: a write carries a token, and
    one below the largest seen for its item is refused."""

    fenced: bool
    writes: Counter[int] = field(default_factory=Counter)
    highest: dict[int, int] = field(default_factory=dict)
    refused: int = 0

    def write(self, item: int, token: int) -> None:
        if self.fenced:
            if token < self.highest.get(item, 0):
                self.refused += 1
                return
            self.highest[item] = token
        self.writes[item] += 1

    @property
    def double_processed(self) -> int:
        return sum(1 for n in self.writes.values() if n > 1)


@dataclass
class Run:
    """What one system's workers did: items finished, claim latencies (ns), the sink."""

    items: int
    sink: Sink
    latencies: list[int] = field(default_factory=list)
    done: int = 0
    began: float = 0.0
    ended: float = 0.0

    def finished(self, count: int) -> None:
        self.done += count
        if self.done >= self.items and not self.ended:
            self.ended = time.perf_counter()  # the last finish stops the clock

    @property
    def over(self) -> bool:
        return self.done >= self.items

    def figures(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        seconds = (self.ended or time.perf_counter()) - self.began
        return {
            "items_done": self.done,
            "seconds": round(seconds, 3),
            "claims_per_s": round(self.done / seconds, 1) if seconds > 0 else 0.0,
            "claim_latency_ms": {"p50": percentile(ordered, 50), "p99": percentile(ordered, 99)},
        }


def pauses_of(agents: int, pausers: int) -> set[int]:
    """The workers that stall on their first item (spread over the pool)."""
    return {n * agents // pausers for n in range(pausers)} if pausers else set()


# ----------------------------------------------------------------------- Formicary


def formicary(agents: int, items: int, ttl_ms: int, pausers: int, fenced: bool) -> Run:
    """A run on a relay of its own (started and stopped outside the clock)."""
    with (
        tempfile.TemporaryDirectory(prefix="formicary-compare-") as tmp,
        relay_process(Path(tmp), None) as relay,
    ):
        relay.wait_ready(30)
        return trio.run(formicary_run, relay.url, agents, items, ttl_ms, pausers)


async def formicary_run(url: str, agents: int, items: int, ttl_ms: int, pausers: int) -> Run:
    run = Run(items, Sink(fenced=True))
    async with RelayClient.connect(url, Identity.generate()) as setup:
        ledger = Ledger(setup, NS)

        async def create(first: int) -> None:
            for n in range(first, items, 32):
                await ledger.create(f"item {n}")

        async with trio.open_nursery() as nursery:
            for first in range(min(32, items)):
                nursery.start_soon(create, first)
    stalled = pauses_of(agents, pausers)
    ready, go = [0], trio.Event()

    async def worker(n: int) -> None:
        async with RelayClient.connect(url, Identity.from_seed(os.urandom(32))) as client:
            ledger = Ledger(client, NS)
            ready[0] += 1
            if ready[0] == agents:
                run.began = time.perf_counter()
                go.set()
            await go.wait()
            first = True
            while not run.over:
                began = time.perf_counter_ns()
                try:
                    claim: Claim = await ledger.next(ttl_ms=ttl_ms)
                except LedgerRefusal as refusal:
                    if refusal.problem != "nothing_open":
                        raise
                    await trio.sleep(IDLE_S)  # a stalled claim is still running out
                    continue
                run.latencies.append(time.perf_counter_ns() - began)
                if first and n in stalled:
                    await trio.sleep(PAUSE_LEASES * ttl_ms / 1000)
                first = False
                run.sink.write(int(claim.order[3:]), claim.token)
                try:
                    await ledger.update(claim, "done")
                    run.finished(1)
                except LedgerRefusal:
                    pass  # the lease moved on while it stalled: the relay refuses it too

    async with trio.open_nursery() as nursery:
        for n in range(agents):
            nursery.start_soon(worker, n)
    return run


# ----------------------------------------------------------------------- PostgreSQL


def postgres(agents: int, items: int, ttl_ms: int, pausers: int, fenced: bool) -> Run:
    return asyncio.run(postgres_run(agents, items, ttl_ms, pausers, fenced))


async def postgres_run(agents: int, items: int, ttl_ms: int, pausers: int, fenced: bool) -> Run:
    import psycopg

    run = Run(items, Sink(fenced=fenced))
    async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as setup:
        await setup.execute(f"DROP TABLE IF EXISTS {TABLE}")
        await setup.execute(
            f"CREATE TABLE {TABLE} (id int PRIMARY KEY, done bool NOT NULL DEFAULT false,"
            " owner int, attempt int NOT NULL DEFAULT 0, lease_until timestamptz)"
        )
        # What people build: finding open work must not walk past the finished rows.
        await setup.execute(f"CREATE INDEX ON {TABLE} (id) WHERE NOT done")
        await setup.execute(f"INSERT INTO {TABLE} (id) SELECT generate_series(1, %s)", (items,))
    claim_sql = (
        f"UPDATE {TABLE} SET owner = %(me)s, attempt = attempt + 1,"
        " lease_until = now() + %(ttl)s * interval '1 ms'"
        f" WHERE id = (SELECT id FROM {TABLE} WHERE NOT done AND (lease_until IS NULL OR"
        " lease_until < now()) ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)"
        " RETURNING id, attempt"
    )
    done_sql = f"UPDATE {TABLE} SET done = true WHERE id = %s AND owner = %s AND NOT done"
    stalled = pauses_of(agents, pausers)
    connections = [
        await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) for _ in range(agents)
    ]

    async def worker(n: int, conn: Any) -> None:
        first = True
        while not run.over:
            began = time.perf_counter_ns()
            row = await (await conn.execute(claim_sql, {"me": n, "ttl": ttl_ms})).fetchone()
            if row is None:
                await asyncio.sleep(IDLE_S)  # a stalled lease is still running out
                continue
            run.latencies.append(time.perf_counter_ns() - began)
            if first and n in stalled:
                await asyncio.sleep(PAUSE_LEASES * ttl_ms / 1000)
            first = False
            run.sink.write(row[0], row[1])
            run.finished((await conn.execute(done_sql, (row[0], n))).rowcount)

    run.began = time.perf_counter()
    try:
        await asyncio.gather(*(worker(n, c) for n, c in enumerate(connections)))
    finally:
        for conn in connections:
            await conn.close()
    return run


# ----------------------------------------------------------------------- Redis


def redis_locks(agents: int, items: int, ttl_ms: int, pausers: int, fenced: bool) -> Run:
    return asyncio.run(redis_run(agents, items, ttl_ms, pausers, fenced))


async def redis_run(agents: int, items: int, ttl_ms: int, pausers: int, fenced: bool) -> Run:
    import redis.asyncio as aioredis

    run = Run(items, Sink(fenced=fenced))
    base = f"{PREFIX}{os.getpid()}:{time.monotonic_ns()}:"  # this run's keys alone
    open_key = base + "open"
    clients = [aioredis.from_url(REDIS_URL, single_connection_client=True) for _ in range(agents)]
    await clients[0].sadd(open_key, *range(1, items + 1))
    for client in clients:
        await client.ping()  # connected before the clock starts
    release = clients[0].register_script(RELEASE)
    stalled = pauses_of(agents, pausers)

    async def worker(n: int, r: Any) -> None:
        first = True
        while not run.over:
            began = time.perf_counter_ns()  # once per claim: retries are its latency
            while True:
                candidate = await r.srandmember(open_key)
                if candidate is None:
                    break
                item = int(candidate)
                if not await r.set(f"{base}lock:{item}", n, nx=True, px=ttl_ms):
                    continue  # another worker holds it: pick again
                if await r.sismember(open_key, item):
                    break
                await r.delete(f"{base}lock:{item}")  # finished between pick and lock
            if candidate is None:
                await asyncio.sleep(IDLE_S)  # a stalled holder's lock is still running out
                continue
            token = await r.incr(f"{base}attempt:{item}")
            run.latencies.append(time.perf_counter_ns() - began)
            if first and n in stalled:
                await asyncio.sleep(PAUSE_LEASES * ttl_ms / 1000)
            first = False
            run.sink.write(item, token)
            removed = await release(keys=[f"{base}lock:{item}", open_key], args=[n, item], client=r)
            run.finished(int(removed))

    run.began = time.perf_counter()
    try:
        await asyncio.gather(*(worker(n, c) for n, c in enumerate(clients)))
    finally:
        await clients[0].delete(open_key)
        for client in clients:
            await client.aclose()
    return run


# ----------------------------------------------------------------------- the run


System = Callable[[int, int, int, int, bool], Run]
SYSTEMS: dict[str, System] = {"formicary": formicary, "postgresql": postgres, "redis": redis_locks}


def compare(args: argparse.Namespace) -> dict[str, Any]:
    throughput: dict[str, Any] = {}
    for agents in args.agents:
        runs: dict[str, list[Run]] = {name: [] for name in SYSTEMS}
        for round_ in range(args.rounds):
            for name, system in SYSTEMS.items():  # alternating, within one run
                log(f"{agents} agents, {name}, round {round_ + 1}: {args.items} items")
                runs[name].append(system(agents, args.items, args.ttl_ms, 0, False))
        median = {name: _median_run(found) for name, found in runs.items()}
        ours = median["formicary"]["claims_per_s"]
        throughput[str(agents)] = {
            **median,
            "formicary_over_postgresql": _ratio(ours, median["postgresql"]),
            "formicary_over_redis": _ratio(ours, median["redis"]),
        }
    pauses: dict[str, Any] = {}
    for name, system in SYSTEMS.items():
        for fenced in (False, True) if name != "formicary" else (True,):
            label = name if name == "formicary" else f"{name}_{'fenced' if fenced else 'plain'}"
            log(f"pauses, {label}: {args.pause_items} items, {args.pausers} stall")
            run = system(args.pause_agents, args.pause_items, args.ttl_ms, args.pausers, fenced)
            pauses[label] = {
                "double_processed": run.sink.double_processed,
                "stale_writes_refused": run.sink.refused,
                "items_done": run.done,
            }
    return {"throughput": throughput, "pauses": pauses, "versions": versions()}


def _median_run(runs: Sequence[Run]) -> dict[str, Any]:
    figures = sorted((run.figures() for run in runs), key=lambda f: f["claims_per_s"])
    return {
        **figures[len(figures) // 2],
        "rounds_claims_per_s": [f["claims_per_s"] for f in figures],
    }


def _ratio(ours: float, theirs: dict[str, Any]) -> float | None:
    return round(ours / theirs["claims_per_s"], 3) if theirs["claims_per_s"] else None


def versions() -> dict[str, Any]:
    """The servers' and clients' versions, asked of the servers themselves."""

    async def ask() -> dict[str, Any]:
        import psycopg
        import redis.asyncio as aioredis

        async with await psycopg.AsyncConnection.connect(PG_DSN) as conn:
            row = await (await conn.execute("SHOW server_version")).fetchone()
        r = aioredis.from_url(REDIS_URL)
        info = await r.info("server")
        await r.aclose()
        return {"postgresql": row[0] if row else None, "redis": info.get("redis_version"),
                "psycopg": psycopg.__version__, "python": platform.python_version()}  # fmt: skip

    return asyncio.run(ask())


def counts(text: str) -> list[int]:
    values = [int(part) for part in text.split(",")]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("comma-separated agent counts, each at least 1")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=counts, default=[20, 200])
    parser.add_argument("--items", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ttl-ms", type=int, default=1000)
    parser.add_argument("--pause-agents", type=int, default=20)
    parser.add_argument("--pause-items", type=int, default=400)
    parser.add_argument("--pausers", type=int, default=4)
    args = parser.parse_args(argv)
    if args.ttl_ms < 1000:
        parser.error("--ttl-ms is at least 1000 (the relay's shortest lease)")
    if max([*args.agents, args.pause_agents]) > 450:
        parser.error("at most 450 agents: bench/peers.sh gives PostgreSQL 500 connections")
    try:
        found = versions()  # fails fast when a peer is not running (sh bench/peers.sh)
        log(f"peers: {found}")
        result = compare(args)
    except Exception as exc:  # one JSON object either way, saying what went wrong
        error = f"{type(exc).__name__}: {exc}"
        print(json.dumps({"bench": "compare_claims", "error": error}))
        return 1
    print(
        json.dumps(
            {
                "bench": "compare_claims",
                "agents": args.agents,
                "items": args.items,
                "rounds": args.rounds,
                "ttl_ms": args.ttl_ms,
                "pause_agents": args.pause_agents,
                "pause_items": args.pause_items,
                "pausers": args.pausers,
                **result,
                "cpus": len(os.sched_getaffinity(0)),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
