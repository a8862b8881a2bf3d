"""Scale benchmark: how many real agents one relay serves with p99 publish under 100 ms.

Theory of operation
-------------------
One relay process (``formicary relay serve``, embedded SQLite, no rate limits); this
process is the load generator. For each step of ``--steps`` it opens that many
authenticated WebSocket agents, and every agent publishes ``--rate`` events a second
for ``--seconds``, each at a fixed time (open loop, a random phase per agent): an
agent does not wait for one ack before its next publish, so a slow relay cannot slow
the offered load down and hide its own delay (coordinated omission). Latency is from
the time a publish was due to its ack. Events are signed before the step starts; the
agents share ``--namespaces`` namespaces.

``max_agents_p99_under_ms`` is the largest step whose p99 stayed under ``--limit-ms``
(100). Steps stop after the first one over ``--stop-ms`` (1 s): beyond it the relay is
only queueing. ``--plot FILE`` draws p50 and p99 against the number of agents.

Usage::

    .venv/bin/python bench/scale.py [--steps 250,500,1000,2000,3000] [--rate 1] [--seconds 10]

Progress goes to stderr; exactly one JSON object goes to stdout. Exit status 0 on a
measurement, 1 when a run failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

# This folder holds benchmarks with package names: keep it off the path while the
# relay's packages import.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import federation.network  # noqa: E402, F401

sys.path.append(str(_HERE))

import msgpack  # noqa: E402
import trio  # noqa: E402
from ingest import (  # noqa: E402
    Agent,
    BenchError,
    authenticate,
    build_workload,
    cpu_seconds,
    describe,
    percentile,
    relay_process,
)
from websockets.trio.client import connect  # noqa: E402


def log(message: str) -> None:
    print(f"[scale] {message}", file=sys.stderr, flush=True)


async def step(url: str, agents: list[Agent], args: argparse.Namespace, pid: int) -> dict[str, Any]:
    """Connect every agent, then publish on schedule for ``--seconds``; the figures."""
    latencies: list[int] = []
    errors = [0]
    connected = trio.Event()
    ready = [0]
    limit = trio.Semaphore(args.concurrency)  # handshakes at a time
    rng = random.Random(args.seed)
    phases = [rng.random() / args.rate for _ in agents]
    start = [0.0]
    last = [0.0]
    expected = sum(len(agent.frames) for agent in agents)
    answered_all = [0]
    cpu = {"relay0": 0.0, "own0": 0.0, "relay1": 0.0, "own1": 0.0}

    async def one(agent: Agent, phase: float) -> None:
        await limit.acquire()
        async with connect(url, max_size=2**22, compression=None) as ws:
            await authenticate(ws, agent.identity)
            limit.release()
            ready[0] += 1
            if ready[0] == len(agents):
                start[0] = trio.current_time() + 0.5
                connected.set()
                nursery_of_step.start_soon(meter_from, start[0])
            await connected.wait()
            due = [start[0] + phase + k / args.rate for k in range(len(agent.frames))]
            answered = 0

            async def receive() -> None:
                nonlocal answered
                while answered < len(due):
                    message = await ws.recv()
                    now = last[0] = trio.current_time()
                    frames = msgpack.unpackb(message, raw=False)
                    for frame in frames if isinstance(frames, list) else [frames]:
                        if frame.get("t") == "ack":
                            latencies.append(int((now - due[frame["rid"]]) * 1e9))
                        elif frame.get("t") == "error":
                            errors[0] += 1
                        else:
                            continue
                        answered += 1
                        answered_all[0] += 1
                        if answered_all[0] == expected:  # the last answer: CPU up to here
                            cpu["relay1"], cpu["own1"] = cpu_seconds(pid) or 0.0, _own_cpu()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                for k, frame in enumerate(agent.frames):
                    await trio.sleep_until(due[k])
                    await ws.send(frame)

    async def meter_from(when: float) -> None:
        await trio.sleep_until(when)
        cpu["relay0"], cpu["own0"] = cpu_seconds(pid) or 0.0, _own_cpu()

    with trio.fail_after(args.seconds * 4 + 120):
        async with trio.open_nursery() as nursery_of_step:
            for agent, phase in zip(agents, phases, strict=True):
                nursery_of_step.start_soon(one, agent, phase)
    seconds = max(last[0] - start[0], 1e-9)
    ordered = sorted(latencies)
    if not ordered:
        raise BenchError("no publish was acknowledged")
    return {
        "agents": len(agents),
        "events": len(ordered),
        "errors": errors[0],
        "events_per_s": round(len(ordered) / seconds, 1),
        "p50_ms": percentile(ordered, 50),
        "p99_ms": percentile(ordered, 99),
        "max_ms": percentile(ordered, 100),
        # From the first publish due to the last ack. The generator shares the 2
        # cores: its share says how much was left for the relay.
        "relay_cpu_share": round((cpu["relay1"] - cpu["relay0"]) / seconds, 3),
        "generator_cpu_share": round((cpu["own1"] - cpu["own0"]) / seconds, 3),
    }


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def plot(steps: list[dict[str, Any]], limit_ms: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = [s["agents"] for s in steps]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    ax.plot(agents, [s["p99_ms"] for s in steps], marker="o", label="p99")
    ax.plot(agents, [s["p50_ms"] for s in steps], marker="o", label="p50")
    ax.axhline(limit_ms, color="grey", linestyle="--", linewidth=1, label=f"{limit_ms:g} ms")
    ax.set_xlabel("agents, each publishing once a second")
    ax.set_ylabel("publish latency, ms")
    ax.set_yscale("log")
    ax.set_title("One Formicary relay process, 2 cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    for n in args.steps:
        # A fresh relay per step: no step inherits the stored events of the last.
        with (
            tempfile.TemporaryDirectory(prefix="scale-") as tmp,
            relay_process(Path(tmp), None) as relay,
        ):
            relay.wait_ready(30.0)
            events = int(n * args.rate * args.seconds)
            agents = build_workload(
                agents=n,
                events=events,
                warmup=0,
                namespaces=args.namespaces,
                body_size=args.body,
                seed=args.seed + n,
            )
            result = trio.run(step, relay.url, agents, args, relay.process.pid)
        results.append(result)
        log(
            f"{n} agents: {result['events_per_s']:,.0f} events/s,"
            f" p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms"
        )
        if result["p99_ms"] > args.stop_ms:
            break
    under = 0  # the last step before the first one over the limit
    for result in results:
        if result["p99_ms"] >= args.limit_ms:
            break
        under = result["agents"]
    if args.plot:
        plot(results, args.limit_ms, args.plot)
    return {
        "bench": "scale",
        "rate_per_agent": args.rate,
        "seconds": args.seconds,
        "namespaces": args.namespaces,
        "body_size": args.body,
        "limit_ms": args.limit_ms,
        "max_agents_p99_under_ms": under,
        "steps": results,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def steps(text: str) -> list[int]:
    values = [int(x) for x in text.split(",")]
    if not values or min(values) < 1 or values != sorted(values):
        raise argparse.ArgumentTypeError("increasing agent counts, comma separated")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=steps, default=steps("250,500,1000,2000,3000"))
    parser.add_argument("--rate", type=float, default=1.0, help="events per agent per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="per step")
    parser.add_argument("--namespaces", type=int, default=16)
    parser.add_argument("--body", type=int, default=100)
    parser.add_argument("--limit-ms", type=float, default=100.0)
    parser.add_argument("--stop-ms", type=float, default=1000.0)
    parser.add_argument("--concurrency", type=int, default=100, help="handshakes at a time")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--plot", type=Path, help="write a PNG of latency against agents")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0:
        print("--rate and --seconds must be positive", file=sys.stderr)
        return 2
    try:
        result = measure(args)
    except Exception as exc:  # any failure, in an exception group too: say why, exit 1
        print(json.dumps({"bench": "scale", "error": describe(exc)}))
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
