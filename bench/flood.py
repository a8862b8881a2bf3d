"""Flood benchmark: does one key flooding the relay slow another agent down?

Theory of operation
-------------------
One relay process with its default limits. A *calm* agent publishes one event at a
time, ``--calm-rate`` a second, and books each publish-to-ack latency. Phases,
alternating for ``--rounds``:

* **quiet**: the calm agent alone;
* **flood**: meanwhile a *flooder* key, in a process of its own, opens
  ``--flood-connections`` connections and publishes from each as fast as the relay
  answers, ``--window`` in flight per connection, ignoring every refusal. Its key's
  bucket (``limits.publish_rate``, ``publish_burst``) empties at once; from then on
  it is refused with 5004 ``rate_limited`` before its signatures are checked, and a
  connection refused over 256 times (each frame let through takes one off the
  count) is closed (the client reconnects).

The figure is the calm agent's p99 latency under flood over its p99 when quiet (the
issue asks for at most 2x), with the flooder's accepted and refused counts. The
median round is reported.

Usage::

    .venv/bin/python bench/flood.py [--seconds 4] [--rounds 3]
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

# This folder holds a federation.py (a benchmark): keep it off the path while the
# relay's packages import, so `import federation` finds the package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import federation.network  # noqa: E402, F401

sys.path.append(str(_HERE))

import trio  # noqa: E402
from ingest import BenchError, percentile, relay_process  # noqa: E402

from agent_sdk.client import RelayClient  # noqa: E402
from agent_sdk.errors import ErrorCode, ProtocolError  # noqa: E402
from agent_sdk.identity import Identity  # noqa: E402


def log(message: str) -> None:
    print(f"[flood] {message}", file=sys.stderr, flush=True)


async def phase(url: str, args: argparse.Namespace, flood: bool) -> dict[str, Any]:
    """The calm agent for ``--seconds``; with ``flood``, the flooder meanwhile, in a
    process of its own (in this one, its signing would slow the calm agent here)."""
    latencies: list[int] = []
    counts = {"accepted": 0, "refused": 0, "closed": 0}
    stop = trio.Event()

    async def calm_agent() -> None:
        async with RelayClient.connect(url, Identity.generate()) as client:
            gap = 1 / args.calm_rate
            next_at = trio.current_time()
            while not stop.is_set():
                began = time.perf_counter_ns()
                await client.publish("calm@local", "app.note", {"pad": "x" * 64})
                latencies.append(time.perf_counter_ns() - began)
                next_at += gap
                await trio.sleep_until(next_at)

    async def flooder() -> None:
        command = [sys.executable, __file__, "--flood", url, "--seconds", str(args.seconds)]
        command += ["--flood-connections", str(args.flood_connections)]
        command += ["--window", str(args.window)]
        done = await trio.run_process(command, capture_stdout=True, check=True)
        counts.update(json.loads(done.stdout))

    async with trio.open_nursery() as nursery:
        if flood:
            nursery.start_soon(flooder)
        nursery.start_soon(calm_agent)
        await trio.sleep(args.seconds)  # the phase's length: a measurement window
        stop.set()
    ordered = sorted(latencies)
    return {
        "calm_publishes": len(ordered),
        "calm_latency_ms": {"p50": percentile(ordered, 50), "p99": percentile(ordered, 99)},
        "flooder": counts,
    }


async def flood(url: str, args: argparse.Namespace) -> dict[str, int]:
    """The flooder: one key, many connections, as fast as the relay answers."""
    key = Identity.generate()
    counts = {"accepted": 0, "refused": 0, "closed": 0}

    async def lane(client: RelayClient) -> None:
        n = 0
        while True:
            n += 1
            try:
                await client.publish("flood@local", "app.note", {"n": n, "pad": "x" * 64})
                counts["accepted"] += 1
            except ProtocolError as exc:
                if exc.code is ErrorCode.RATE_LIMITED:
                    counts["refused"] += 1
                else:
                    counts["closed"] += 1  # the relay closed us; the client reconnects

    async def connection() -> None:
        async with RelayClient.connect(url, key) as client, trio.open_nursery() as lanes:
            for _ in range(args.window):
                lanes.start_soon(lane, client)

    with trio.move_on_after(args.seconds):
        async with trio.open_nursery() as nursery:
            for _ in range(args.flood_connections):
                nursery.start_soon(connection)
    return counts


async def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, Any]]] = {"quiet": [], "flood": []}
    for n in range(args.rounds):
        for name in rounds:
            log(f"round {n + 1}: {name}")
            rounds[name].append(await phase(url, args, flood=name == "flood"))
    ratios = [
        f["calm_latency_ms"]["p99"] / q["calm_latency_ms"]["p99"]
        for q, f in zip(rounds["quiet"], rounds["flood"], strict=True)
    ]
    middle = statistics.median_low(ratios)
    i = ratios.index(middle)
    return {
        "quiet": rounds["quiet"][i],
        "flood": rounds["flood"][i],
        "p99_flood_over_quiet": round(middle, 3),
        "rounds_p99_ratio": [round(r, 3) for r in ratios],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calm-rate", type=float, default=50.0, help="calm publishes/s")
    parser.add_argument("--flood-connections", type=int, default=8)
    parser.add_argument("--window", type=int, default=32, help="flood publishes in flight")
    parser.add_argument("--publish-rate", type=int, help="the relay's limits.publish_rate")
    parser.add_argument("--flood", metavar="URL", help=argparse.SUPPRESS)  # the flooder's process
    args = parser.parse_args(argv)
    if args.flood:
        print(json.dumps(trio.run(flood, args.flood, args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="formicary-flood-") as tmp:
        try:
            settings = Path(tmp) / "relay.toml"  # the relay's own limits (empty: defaults)
            settings.write_text(
                ""
                if args.publish_rate is None
                else f"[limits]\npublish_rate = {args.publish_rate}\n"
                f"publish_burst = {2 * args.publish_rate}\n"
            )
            extra = ["--config", str(settings)]
            with relay_process(Path(tmp), None, extra) as relay:
                relay.wait_ready(30.0)
                result = trio.run(run, args, relay.url)
        except (BenchError, OSError) as exc:
            print(f"flood: {exc}", file=sys.stderr)
            return 1
    print(
        json.dumps(
            {
                "bench": "flood",
                "seconds_per_phase": args.seconds,
                "calm_rate": args.calm_rate,
                "publish_rate": args.publish_rate,
                "flood_connections": args.flood_connections,
                "window": args.window,
                **result,
                "python": platform.python_version(),
                "cpus": len(os.sched_getaffinity(0)),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
