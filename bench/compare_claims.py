"""Contended work claiming: Formicary's ledger against the queues people build on
PostgreSQL (``FOR UPDATE SKIP LOCKED`` with a lease) and on Redis (``SET NX PX``
locks), in one run, and what each does when a holder pauses past its lease.

Theory of operation
-------------------
Each system runs the same worker loop with ``--agents`` workers, one connection
each, all in this process (asyncio for the peers' clients, trio for the SDK), on
the same loopback machine as the servers:

    claim the next open item (leased for ``--ttl-ms``) -> process it -> mark it done

* **Formicary**: a relay process (SQLite store, ``synchronous=FULL``); ``wo.next``
  with a lease, ``wo.update done`` with the claim's fencing token (the SDK's
  ``Ledger``, as an agent uses it).
* **PostgreSQL**: ``UPDATE jobs SET owner, lease_until = now() + ttl WHERE id =
  (SELECT id FROM jobs WHERE NOT done AND (lease_until IS NULL OR lease_until <
  now()) ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id``, then ``UPDATE
  jobs SET done WHERE id AND owner`` (autocommit; the server's default durability).
* **Redis**: ``SRANDMEMBER open`` for a candidate, ``SET lock:<id> <me> NX PX ttl``
  to take it, ``SISMEMBER open`` to see it was not finished in between, then
  ``SREM open``, ``DEL lock`` (one transaction) to finish.

**Throughput** (``claims_per_s``): ``--items`` items, worked off as fast as the
workers go with no work per item; claim+finish cycles per second, and the claim
latency (from asking to holding) p50/p99. The systems alternate within the run.

**Pauses** (``double_processed``): ``--pause-items`` items, ``--pausers`` of the
workers each stall after claiming their first item for three leases (a GC pause, a
suspended VM), then write their result to the sink, as the worker loop does after
processing. The sink counts the items written more than once. Formicary's workers
pass their fencing token and the sink keeps the largest per item and refuses a
smaller one (the demo's Workbench); the peers have no token to pass, so their sink
takes every write. That is the difference measured: whether a stale holder can still
act, not how fast anyone is.

Usage::

    sh bench/peers.sh                      # PostgreSQL and Redis on loopback
    .venv/bin/pip install -e '.[bench]'    # their Python clients
    .venv/bin/python bench/compare_claims.py [--agents 20,200] [--items 4000]

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

NS = "queue-{}@local"
"""A namespace per run: each starts with an empty ledger."""
RUNS = iter(range(1, 1_000_000))
PG_DSN = os.environ.get(
    "FORMICARY_BENCH_PG", "host=127.0.0.1 port=54339 user=formicary dbname=postgres"
)
REDIS_URL = os.environ.get("FORMICARY_BENCH_REDIS", "redis://127.0.0.1:63799/0")
PAUSE_LEASES = 3


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

    def write(self, item: int, token: int | None) -> None:
        if self.fenced:
            assert token is not None
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
    """What one system's workers did: cycles, claim latencies (ns), the sink."""

    sink: Sink
    latencies: list[int] = field(default_factory=list)
    done: int = 0
    seconds: float = 0.0

    def figures(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        return {
            "items_done": self.done,
            "seconds": round(self.seconds, 3),
            "claims_per_s": round(self.done / self.seconds, 1) if self.seconds else 0.0,
            "claim_latency_ms": {"p50": percentile(ordered, 50), "p99": percentile(ordered, 99)},
        }


def pauses_of(agents: int, pausers: int) -> set[int]:
    """The workers that stall on their first item (spread over the pool)."""
    return {n * agents // pausers for n in range(pausers)} if pausers else set()


# ----------------------------------------------------------------------- Formicary


async def formicary(url: str, agents: int, items: int, ttl_ms: int, pausers: int) -> Run:
    run = Run(Sink(fenced=True))
    ns = NS.format(next(RUNS))
    async with RelayClient.connect(url, Identity.generate()) as setup:
        ledger = Ledger(setup, ns)

        async def create(first: int) -> None:
            for n in range(first, items, 32):
                await ledger.create(f"item {n}", labels=[str(n)])

        async with trio.open_nursery() as nursery:
            for first in range(min(32, items)):
                nursery.start_soon(create, first)
    ids = {}  # wo id -> item number, read back from the ledger
    async with RelayClient.connect(url, Identity.generate()) as reader:
        for order in await Ledger(reader, ns).list("open"):
            ids[order["id"]] = int(order["id"][3:])
    stalled = pauses_of(agents, pausers)
    ready, go = [0], trio.Event()

    async def worker(n: int) -> None:
        async with RelayClient.connect(url, Identity.from_seed(os.urandom(32))) as client:
            ledger = Ledger(client, ns)
            ready[0] += 1
            if ready[0] == agents:
                go.set()
            await go.wait()
            first = True
            while True:
                began = time.perf_counter_ns()
                try:
                    claim: Claim = await ledger.next(ttl_ms=ttl_ms)
                except LedgerRefusal as refusal:
                    if refusal.problem == "nothing_open":
                        if not await ledger.list("claimed"):
                            return  # all done
                        await trio.sleep(ttl_ms / 4000)  # a stalled claim lapses: wait a bit
                        continue
                    raise
                run.latencies.append(time.perf_counter_ns() - began)
                if first and n in stalled:
                    await trio.sleep(PAUSE_LEASES * ttl_ms / 1000)
                first = False
                run.sink.write(ids[claim.order], claim.token)
                try:
                    await ledger.update(claim, "done")
                    run.done += 1
                except LedgerRefusal:
                    pass  # the lease moved on while it stalled: the relay refuses it too

    async with trio.open_nursery() as nursery:
        for n in range(agents):
            nursery.start_soon(worker, n)
        await go.wait()
        began = trio.current_time()
    run.seconds = trio.current_time() - began
    return run


# ----------------------------------------------------------------------- PostgreSQL


async def postgres(agents: int, items: int, ttl_ms: int, pausers: int) -> Run:
    import psycopg

    run = Run(Sink(fenced=False))
    async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as setup:
        await setup.execute("DROP TABLE IF EXISTS jobs")
        await setup.execute(
            "CREATE TABLE jobs (id int PRIMARY KEY, done bool NOT NULL DEFAULT false,"
            " owner int, lease_until timestamptz)"
        )
        await setup.execute("INSERT INTO jobs (id) SELECT generate_series(1, %s)", (items,))
    claim_sql = (
        "UPDATE jobs SET owner = %(me)s, lease_until = now() + %(ttl)s * interval '1 ms'"
        " WHERE id = (SELECT id FROM jobs WHERE NOT done AND (lease_until IS NULL OR"
        " lease_until < now()) ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id"
    )
    done_sql = "UPDATE jobs SET done = true WHERE id = %s AND owner = %s AND NOT done"
    left_sql = "SELECT count(*) FROM jobs WHERE NOT done"
    stalled = pauses_of(agents, pausers)
    connections = [
        await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) for _ in range(agents)
    ]

    async def worker(n: int, conn: Any) -> None:
        first = True
        while True:
            began = time.perf_counter_ns()
            row = await (await conn.execute(claim_sql, {"me": n, "ttl": ttl_ms})).fetchone()
            if row is None:
                left = (await (await conn.execute(left_sql)).fetchone())[0]
                if left == 0:
                    return
                await asyncio.sleep(ttl_ms / 4000)
                continue
            run.latencies.append(time.perf_counter_ns() - began)
            if first and n in stalled:
                await asyncio.sleep(PAUSE_LEASES * ttl_ms / 1000)
            first = False
            run.sink.write(row[0], None)
            finished = await conn.execute(done_sql, (row[0], n))
            run.done += finished.rowcount

    began = time.perf_counter()
    try:
        await asyncio.gather(*(worker(n, c) for n, c in enumerate(connections)))
    finally:
        for conn in connections:
            await conn.close()
    run.seconds = time.perf_counter() - began
    return run


# ----------------------------------------------------------------------- Redis


async def redis_locks(agents: int, items: int, ttl_ms: int, pausers: int) -> Run:
    import redis.asyncio as aioredis

    run = Run(Sink(fenced=False))
    setup = aioredis.from_url(REDIS_URL)
    await setup.flushdb()
    await setup.sadd("open", *range(1, items + 1))
    await setup.aclose()
    stalled = pauses_of(agents, pausers)
    clients = [aioredis.from_url(REDIS_URL, single_connection_client=True) for _ in range(agents)]

    async def worker(n: int, r: Any) -> None:
        first = True
        while True:
            began = time.perf_counter_ns()
            candidate = await r.srandmember("open")
            if candidate is None:
                return
            item = int(candidate)
            if not await r.set(f"lock:{item}", n, nx=True, px=ttl_ms):
                continue  # another worker holds it: pick again
            if not await r.sismember("open", item):  # finished between the pick and the lock
                await r.delete(f"lock:{item}")
                continue
            run.latencies.append(time.perf_counter_ns() - began)
            if first and n in stalled:
                await asyncio.sleep(PAUSE_LEASES * ttl_ms / 1000)
            first = False
            run.sink.write(item, None)
            removed, _ = (
                await r.pipeline(transaction=True)
                .srem("open", item)
                .delete(f"lock:{item}")
                .execute()
            )
            run.done += removed

    began = time.perf_counter()
    try:
        await asyncio.gather(*(worker(n, c) for n, c in enumerate(clients)))
    finally:
        for client in clients:
            await client.aclose()
    run.seconds = time.perf_counter() - began
    return run


# ----------------------------------------------------------------------- the run


def compare(args: argparse.Namespace, url: str) -> dict[str, Any]:
    systems: dict[str, Callable[[int, int, int, int], Any]] = {
        "formicary": lambda a, i, t, p: trio.run(formicary, url, a, i, t, p),
        "postgresql": lambda a, i, t, p: asyncio.run(postgres(a, i, t, p)),
        "redis": lambda a, i, t, p: asyncio.run(redis_locks(a, i, t, p)),
    }
    throughput: dict[str, Any] = {}
    for agents in args.agents:
        rates: dict[str, list[Run]] = {name: [] for name in systems}
        for round_ in range(args.rounds):
            for name, system in systems.items():  # alternating, within one run
                log(f"{agents} agents, {name}, round {round_ + 1}: {args.items} items")
                rates[name].append(system(agents, args.items, args.ttl_ms, 0))
        best = {name: _median_run(runs) for name, runs in rates.items()}
        ours = best["formicary"].figures()["claims_per_s"]
        throughput[str(agents)] = {
            **{name: run.figures() for name, run in best.items()},
            "formicary_over_postgresql": _ratio(ours, best["postgresql"]),
            "formicary_over_redis": _ratio(ours, best["redis"]),
        }
    pauses: dict[str, Any] = {}
    for name, system in systems.items():
        log(f"pauses, {name}: {args.pause_items} items, {args.pausers} stall past the lease")
        run = system(args.pause_agents, args.pause_items, args.ttl_ms, args.pausers)
        pauses[name] = {
            "double_processed": run.sink.double_processed,
            "stale_writes_refused": run.sink.refused,
            "items_done": run.done,
        }
    return {"throughput": throughput, "pauses": pauses}


def _median_run(runs: Sequence[Run]) -> Run:
    return sorted(runs, key=lambda r: r.figures()["claims_per_s"])[len(runs) // 2]


def _ratio(ours: float, theirs: Run) -> float | None:
    rate = theirs.figures()["claims_per_s"]
    return round(ours / rate, 3) if rate else None


def counts(text: str) -> list[int]:
    values = [int(part) for part in text.split(",")]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("comma-separated agent counts, each at least 1")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=counts, default=[20, 200])
    parser.add_argument("--items", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--ttl-ms", type=int, default=1000)
    parser.add_argument("--pause-agents", type=int, default=20)
    parser.add_argument("--pause-items", type=int, default=400)
    parser.add_argument("--pausers", type=int, default=4)
    args = parser.parse_args(argv)
    if args.ttl_ms < 1000:
        parser.error("--ttl-ms is at least 1000 (the relay's shortest lease)")
    with tempfile.TemporaryDirectory(prefix="formicary-compare-") as tmp:
        try:
            with relay_process(Path(tmp), None) as relay:
                relay.wait_ready(30)
                result = compare(args, relay.url)
        except Exception as exc:  # one JSON object either way, saying what went wrong
            print(json.dumps({"bench": "compare_claims", "error": f"{type(exc).__name__}: {exc}"}))
            return 1
    print(
        json.dumps(
            {
                "bench": "compare_claims",
                "agents": args.agents,
                "items": args.items,
                "ttl_ms": args.ttl_ms,
                **result,
                "python": platform.python_version(),
                "cpus": len(os.sched_getaffinity(0)),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
