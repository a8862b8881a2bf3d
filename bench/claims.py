"""Claims benchmark: claim+release round trips through a real relay, contended and not.

Theory of operation
-------------------
The relay runs as its own process (the same set-up as ``bench/ingest.py``). This
process runs ``--agents`` SDK clients, one WebSocket and one identity each, using
:class:`agent_sdk.ledger.Ledger` exactly as an agent would (so each request is signed
here, as it would be by a real agent).

* **uncontended**: every agent owns a work order and loops claim -> release on it.
* **contended**: every agent loops claim -> (if granted) release on one shared order.
  Refused claims are counted too: under contention, most attempts lose.

Each phase runs for ``--seconds``; a cycle is one claim and, when it was granted, one
release, each awaited to its outcome. Prints one JSON object with cycles per second and
claim latency (p50/p99) per phase.

With ``--members N``, N other agents first join the namespace's directory with
heartbeat presence (an hour, so none times out during the run) and disconnect; with
``--namespaces K``, K other namespaces of the relay first get a claimed work order
each (leased for an hour); with ``--routes R``, the namespace's owner first routes
every ``wo.claim`` to R roles in digests (a day's ``digest_ms``: each role's waits for
its 256th claim) and the members hold the roles in turn. A request's cost should grow
with none of these, so the phases should run as fast as with none.

Usage::

    .venv/bin/python bench/claims.py [--agents 200] [--seconds 5] [--members 0] \
        [--namespaces 0] [--routes 0] [--relay-profile FILE]

``--relay-profile FILE`` runs the relay under cProfile (``FILE.json``: counts per trio
task instead), as ``bench/ingest.py`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio
from ingest import BenchError, percentile, relay_process

from agent_sdk.client import RelayClient
from agent_sdk.decisions import Decisions, route
from agent_sdk.directory import Directory
from agent_sdk.identity import Identity
from agent_sdk.ledger import Ledger, LedgerRefusal

NS = "claims@local"
JOINING = 50  # members joining at once (each its own connection)
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def log(message: str) -> None:
    print(f"[claims] {message}", file=sys.stderr, flush=True)


async def phase(
    url: str, identities: Sequence[Identity], orders: Sequence[str], seconds: float
) -> dict[str, Any]:
    """Every agent loops claim (+ release when granted) on its order until time is up."""
    latencies: list[int] = []
    granted = refused = 0

    async def agent(identity: Identity, order: str, start: trio.Event) -> None:
        nonlocal granted, refused
        async with RelayClient.connect(url, identity) as client:
            ledger = Ledger(client, NS)
            ready.append(None)
            if len(ready) == len(identities):
                start.set()
            await start.wait()
            while trio.current_time() < deadline:
                began = time.perf_counter_ns()
                try:
                    claim = await ledger.claim(order, ttl_ms=60_000)
                except LedgerRefusal:
                    refused += 1
                    latencies.append(time.perf_counter_ns() - began)
                    continue
                latencies.append(time.perf_counter_ns() - began)
                await ledger.release(claim)
                granted += 1

    ready: list[None] = []
    start = trio.Event()
    deadline = float("inf")
    async with trio.open_nursery() as nursery:
        for identity, order in zip(identities, orders, strict=True):
            nursery.start_soon(agent, identity, order, start)
        await start.wait()
        began = trio.current_time()
        deadline = began + seconds
    elapsed = trio.current_time() - began
    ordered = sorted(latencies)
    return {
        "seconds": round(elapsed, 3),
        "granted_cycles": granted,
        "refused_claims": refused,
        "claim_release_round_trips_per_s": round(granted / elapsed, 1),
        "claim_attempts_per_s": round((granted + refused) / elapsed, 1),
        "claim_latency_ms": {"p50": percentile(ordered, 50), "p99": percentile(ordered, 99)},
    }


async def at_once(count: int, one: Callable[[int], Awaitable[None]]) -> None:
    """``one(n)`` for each n below ``count``, ``JOINING`` at a time."""
    numbers = iter(range(count))

    async def worker() -> None:
        for n in numbers:
            await one(n)

    async with trio.open_nursery() as nursery:
        for _ in range(min(JOINING, count)):
            nursery.start_soon(worker)


async def join_members(url: str, count: int, first_seed: int, roles: int) -> None:
    """``count`` agents join with heartbeat presence and leave their connections (the
    presence outlives them); with ``roles``, each holds one of them in turn."""

    async def one(n: int) -> None:
        identity = Identity.from_seed((first_seed + n).to_bytes(32, "big"))
        role = f"role-{n % roles}" if roles else ""
        async with RelayClient.connect(url, identity) as client:
            name = f"member {first_seed + n}"
            await Directory(client, NS).join(name, role=role, heartbeat_ms=HOUR_MS)
        if (n + 1) % 1000 == 0:
            log(f"{n + 1} of {count} members joined")

    await at_once(count, one)


async def claim_elsewhere(url: str, count: int) -> None:
    """One claimed work order in each of ``count`` other namespaces."""
    async with RelayClient.connect(url, Identity.generate()) as client:

        async def one(n: int) -> None:
            ledger = Ledger(client, f"elsewhere-{n}@local")
            await ledger.claim(await ledger.create("elsewhere"), ttl_ms=HOUR_MS)
            if (n + 1) % 1000 == 0:
                log(f"{n + 1} of {count} namespaces hold a claim")

        await at_once(count, one)


async def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    identities = [Identity.from_seed(n.to_bytes(32, "big")) for n in range(1, args.agents + 1)]
    if args.routes:  # first: the namespace's first event makes its author the owner
        log(f"every claim routed to {args.routes} roles in digests")
        async with RelayClient.connect(url, Identity.generate()) as owner:
            routes = [route(["wo.claim"], f"role-{n}", "digest") for n in range(args.routes)]
            await Decisions(owner, NS).set_policy(routes, digest_ms=DAY_MS)
    if args.members:
        log(f"{args.members} members join the directory")
        await join_members(url, args.members, args.agents + 1, args.routes)
    if args.namespaces:
        log(f"{args.namespaces} other namespaces get a claimed work order")
        await claim_elsewhere(url, args.namespaces)
    async with RelayClient.connect(url, Identity.generate()) as setup:
        ledger = Ledger(setup, NS)
        log(f"creating {args.agents + 1} work orders")
        own = [await ledger.create(f"order {n}") for n in range(args.agents)]
        shared = await ledger.create("the hot order")
    log(f"uncontended: {args.agents} agents, one order each, {args.seconds}s")
    uncontended = await phase(url, identities, own, args.seconds)
    log(f"contended: {args.agents} agents, one shared order, {args.seconds}s")
    contended = await phase(url, identities, [shared] * args.agents, args.seconds)
    return {"uncontended": uncontended, "contended": contended}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--members", type=int, default=0, help="directory members first")
    parser.add_argument("--namespaces", type=int, default=0, help="other namespaces first")
    parser.add_argument("--routes", type=int, default=0, help="roles every claim goes to")
    parser.add_argument(
        "--relay-profile", help="run the relay under cProfile (bench/profile_relay.py) to here"
    )
    args = parser.parse_args(argv)
    profile = Path(args.relay_profile).resolve() if args.relay_profile else None
    with tempfile.TemporaryDirectory(prefix="formicary-claims-") as tmp:
        try:
            with relay_process(Path(tmp), profile) as relay:
                relay.wait_ready(30)
                result = trio.run(run, args, relay.url)
        except (BenchError, OSError) as exc:
            print(f"claims: {exc}", file=sys.stderr)
            return 1
    print(
        json.dumps(
            {
                "bench": "claims",
                "agents": args.agents,
                "members": args.members,
                "namespaces": args.namespaces,
                "routes": args.routes,
                **result,
                "python": platform.python_version(),
                "cpus": len(os.sched_getaffinity(0)),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
