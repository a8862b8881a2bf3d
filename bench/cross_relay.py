"""Federation benchmark: publishing across relays against publishing at home, and how
fast a mirror catches up.

Theory of operation
-------------------
Two relay processes, ``a`` and ``b``, peer with each other on loopback (each pins the
other's key). Namespaces ``*@b`` are homed on ``b``. In one run, alternating:

* **same relay**: ``--agents`` SDK clients connected to ``b`` publish to ``same@b``;
* **cross relay**: the same number of clients connected to ``a`` publish to
  ``cross@b``: each event is verified by ``a``, forwarded over the link, sequenced
  and committed by ``b``, and ``b``'s receipt travels back through ``a``.

Each client keeps ``--window`` publishes in flight for ``--seconds`` per phase;
latency is publish-to-receipt as the agent sees it. The ratio cross/same is the
price of the extra hop (two more verifications, two more socket hops). Each path
runs ``--rounds`` times, alternating, and the round with the median throughput is
reported, so a noisy neighbour on this shared machine skews both paths alike.

Then **mirror catch-up**: a reader connected to ``a`` subscribes from seq 1 to
``same@b``, which ``a`` has never followed. ``a`` fetches ``b``'s log over the
link, checks every signature, receipt and seal, stores it, and serves it: events
per second until the reader has all of them.

Usage::

    .venv/bin/python bench/cross_relay.py [--agents 20] [--window 8] [--seconds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from ingest import BenchError, RelayProcess, percentile, two_relays

from agent_sdk.client import Delivery, Live, RelayClient
from agent_sdk.identity import Identity


def log(message: str) -> None:
    print(f"[federation] {message}", file=sys.stderr, flush=True)


async def publish_phase(
    url: str, ns: str, identities: list[Identity], window: int, seconds: float
) -> dict[str, Any]:
    latencies: list[int] = []
    connected: list[RelayClient] = []
    start = trio.Event()
    deadline = float("inf")

    async def agent(identity: Identity) -> None:
        async with RelayClient.connect(url, identity) as client:
            connected.append(client)
            if len(connected) == len(identities):
                start.set()
            await start.wait()
            async with trio.open_nursery() as lanes:
                for lane in range(window):
                    lanes.start_soon(publish_lane, client, lane)

    async def publish_lane(client: RelayClient, lane: int) -> None:
        n = 0
        while trio.current_time() < deadline:
            began = time.perf_counter_ns()
            await client.publish(ns, "app.note", {"lane": lane, "n": n, "pad": "x" * 64})
            latencies.append(time.perf_counter_ns() - began)
            n += 1

    async with trio.open_nursery() as nursery:
        for identity in identities:
            nursery.start_soon(agent, identity)
        await start.wait()
        began = trio.current_time()
        deadline = began + seconds
    elapsed = trio.current_time() - began
    ordered = sorted(latencies)
    return {
        "events": len(ordered),
        "events_per_s": round(len(ordered) / elapsed, 1),
        "latency_ms": {"p50": percentile(ordered, 50), "p99": percentile(ordered, 99)},
    }


async def catch_up(url: str, ns: str, expected: int) -> dict[str, Any]:
    """A reader on ``a`` reads ``ns@b`` from seq 1: ``a`` mirrors it as it goes."""
    async with RelayClient.connect(url, Identity.generate()) as reader:
        began = time.perf_counter()
        received = 0
        live = False
        async with reader.subscribe(ns, start=1, buffer=8192) as feed:
            async for item in feed:
                if isinstance(item, Delivery):
                    received += 1
                else:
                    # A foreign namespace's live says the mirror holds what its home
                    # was last heard to have (protocol 14.7): it may come before the
                    # rest of the backlog, which then follows as the mirror stores it.
                    live = live or isinstance(item, Live)
                if live and received >= expected:
                    break
        elapsed = time.perf_counter() - began
    return {
        "events": received,
        "seconds": round(elapsed, 3),
        "events_per_s": round(received / elapsed, 1),
    }


async def run(args: argparse.Namespace, relays: dict[str, RelayProcess]) -> dict[str, Any]:
    identities = [Identity.from_seed(n.to_bytes(32, "big")) for n in range(1, args.agents + 1)]
    rounds: dict[str, list[dict[str, Any]]] = {"same_relay": [], "cross_relay": []}
    for n in range(args.rounds):
        log(f"round {n + 1}: same relay ({args.agents} agents on b, ns on b)")
        rounds["same_relay"].append(
            await publish_phase(relays["b"].url, "same@b", identities, args.window, args.seconds)
        )
        log(f"round {n + 1}: cross relay ({args.agents} agents on a, ns on b)")
        rounds["cross_relay"].append(
            await publish_phase(relays["a"].url, "cross@b", identities, args.window, args.seconds)
        )
    result = {path: median_round(runs) for path, runs in rounds.items()}
    published = sum(r["events"] for r in rounds["same_relay"])
    log(f"mirror catch-up: a reads same@b ({published} events) from seq 1")
    result["mirror_catch_up"] = await catch_up(relays["a"].url, "same@b", published)
    same, cross = result["same_relay"], result["cross_relay"]
    result["cross_over_same"] = {
        "throughput": round(cross["events_per_s"] / same["events_per_s"], 3),
        "p50_latency": round(cross["latency_ms"]["p50"] / same["latency_ms"]["p50"], 3),
        "p99_latency": round(cross["latency_ms"]["p99"] / same["latency_ms"]["p99"], 3),
    }
    return result


def median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    middle = statistics.median_low(r["events_per_s"] for r in runs)
    chosen = next(r for r in runs if r["events_per_s"] == middle)
    return {**chosen, "rounds_events_per_s": [r["events_per_s"] for r in runs]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--window", type=int, default=8, help="publishes in flight per agent")
    parser.add_argument("--seconds", type=float, default=4.0, help="per phase")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per path")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="formicary-federation-") as tmp:
        try:
            with two_relays(Path(tmp)) as relays:
                result = trio.run(run, args, relays)
        except (BenchError, OSError) as exc:
            print(f"federation: {exc}", file=sys.stderr)
            return 1
    print(
        json.dumps(
            {
                "bench": "federation",
                "agents": args.agents,
                "window": args.window,
                "seconds_per_phase": args.seconds,
                **result,
                "python": platform.python_version(),
                "cpus": len(os.sched_getaffinity(0)),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
