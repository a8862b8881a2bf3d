"""Messaging benchmark: the direct, relayed and federated paths in one run.

Theory of operation
-------------------
Two relay processes, ``a`` and ``b``, peer on loopback. ``--pairs`` senders each
send to their own recipient, keeping ``--window`` messages in flight, for
``--seconds`` per phase; every recipient reads its messages as they come. One
message is a sealed 128-byte payload, so every path pays for sealing and unsealing
(X25519, ChaCha20-Poly1305, two Ed25519 signatures). Latency is one-way, from the
sender's ``send`` call to the recipient's ``next()`` handing the message out (both
ends run in this process, on one clock). Paths, alternating for ``--rounds``:

* **direct**: the recipient listens on a loopback endpoint; the sender dials it, both
  prove their keys, and messages go straight there (no relay on the way). A sender
  waits for ``got`` before its next message to the same recipient, so the window is
  one per pair on this path: order is kept by the recipient's turn;
* **relayed**: sender and recipient both connect to ``b``; each message is stored
  (fsynced) in the recipient's inbox on ``b``, streamed to the recipient, and
  acknowledged with a receipt that goes back to the sender's inbox;
* **federated**: the sender connects to ``a``, the recipient to ``b``: ``a`` passes
  each message over the link to ``b``, which stores it as above, and the receipt
  comes back across the link. A sender holds its turn until ``b`` has the message
  (a later one must not overtake it if the link drops), so a pair's window is one.

The round with the median throughput is reported for each path. Under load, latency
is mostly the window's queue (Little's law: a pair's messages in flight over its
throughput); each round therefore also runs one pair sending one message at a time,
and ``unloaded_latency_ms`` is the median of those rounds' percentiles: what one
message costs on each path.

Usage::

    .venv/bin/python bench/messaging.py [--pairs 10] [--window 16] [--seconds 3]
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
from ingest import BenchError, RelayProcess, percentile, two_relays  # noqa: E402

from agent_sdk.client import RelayClient  # noqa: E402
from agent_sdk.errors import ErrorCode, ProtocolError  # noqa: E402
from agent_sdk.identity import Identity  # noqa: E402

PAYLOAD = "x" * 100


def log(message: str) -> None:
    print(f"[messaging] {message}", file=sys.stderr, flush=True)


async def phase(
    path: str, relays: dict[str, RelayProcess], pairs: int, window: int, seconds: float
) -> dict[str, Any]:
    senders = [Identity.generate() for _ in range(pairs)]
    recipients = [Identity.generate() for _ in range(pairs)]
    sender_url = relays["a" if path == "federated" else "b"].url
    latencies: list[int] = []
    full = 0  # sends refused with inbox_full, and tried again
    ready = trio.Event()
    deadline = float("inf")

    async def pair(sender: Identity, recipient: Identity, task_status: Any) -> None:
        async with (
            RelayClient.connect(relays["b"].url, recipient) as inbox,
            RelayClient.connect(sender_url, sender) as outbox,
            inbox.listen() as endpoint,
        ):
            inbox.mailbox.open()
            await inbox.mailbox.live.wait()  # the recipient is known to b
            to = recipient.id + ("@b" if path == "federated" else "")
            via = "direct" if path == "direct" else "relay"
            task_status.started()
            await ready.wait()
            sent = 0
            received = 0
            target: int | None = None
            caught_up = trio.Event()

            async def lane() -> None:
                nonlocal sent, full
                while trio.current_time() < deadline:
                    try:
                        await outbox.send(
                            to,
                            {"t": time.perf_counter_ns(), "pad": PAYLOAD},
                            via=via,
                            endpoint=endpoint if via == "direct" else None,
                        )
                    except ProtocolError as exc:
                        # The reader is behind by the per-sender cap (a busy machine):
                        # the sender backs off, as a real one would, and counts it.
                        if exc.code is not ErrorCode.INBOX_FULL:
                            raise
                        full += 1
                        await trio.sleep(0.01)
                        continue
                    sent += 1

            async def read() -> None:
                nonlocal received
                while True:
                    message = await inbox.mailbox.next()
                    latencies.append(time.perf_counter_ns() - message.body["t"])
                    received += 1
                    if target is not None and received >= target:
                        caught_up.set()

            async with trio.open_nursery() as reading:
                reading.start_soon(read)
                async with trio.open_nursery() as sending:
                    for _ in range(window):
                        sending.start_soon(lane)
                target = sent  # every send has returned: wait for what is on its way
                if received >= target:
                    caught_up.set()
                with trio.move_on_after(30):
                    await caught_up.wait()
                reading.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for sender, recipient in zip(senders, recipients, strict=True):
            await nursery.start(pair, sender, recipient)
        began = trio.current_time()
        deadline = began + seconds
        ready.set()
    elapsed = trio.current_time() - began
    ordered = sorted(latencies)
    return {
        "messages": len(ordered),
        "messages_per_s": round(len(ordered) / elapsed, 1),
        "inbox_full_retries": full,
        "latency_ms": {
            "p50": percentile(ordered, 50) if ordered else None,
            "p99": percentile(ordered, 99) if ordered else None,
        },
    }


async def run(args: argparse.Namespace, relays: dict[str, RelayProcess]) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, Any]]] = {"direct": [], "relayed": [], "federated": []}
    alone: dict[str, list[dict[str, Any]]] = {path: [] for path in rounds}
    for n in range(args.rounds):
        for path in rounds:
            log(f"round {n + 1}: {path}, {args.pairs} pairs, window {args.window}")
            rounds[path].append(await phase(path, relays, args.pairs, args.window, args.seconds))
            log(f"round {n + 1}: {path}, one pair, one message at a time")
            alone[path].append(await phase(path, relays, 1, 1, min(1.0, args.seconds)))
    result: dict[str, Any] = {}
    for path, runs in rounds.items():
        middle = statistics.median_low(r["messages_per_s"] for r in runs)
        chosen = next(r for r in runs if r["messages_per_s"] == middle)
        result[path] = {**chosen, "rounds_messages_per_s": [r["messages_per_s"] for r in runs]}
        p50s = sorted(r["latency_ms"]["p50"] for r in alone[path])
        p99s = sorted(r["latency_ms"]["p99"] for r in alone[path])
        result[path]["unloaded_latency_ms"] = {
            "p50": statistics.median_low(p50s),
            "p99": statistics.median_low(p99s),
        }
    relayed = result["relayed"]["messages_per_s"]
    result["ratios_to_relayed"] = {
        path: round(result[path]["messages_per_s"] / relayed, 3) if relayed else None
        for path in ("direct", "federated")
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--window", type=int, default=16, help="messages in flight per pair")
    parser.add_argument("--seconds", type=float, default=3.0, help="per phase")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per path")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="formicary-messaging-") as tmp:
        try:
            with two_relays(Path(tmp)) as relays:
                result = trio.run(run, args, relays)
        except (BenchError, OSError) as exc:
            print(f"messaging: {exc}", file=sys.stderr)
            return 1
    print(
        json.dumps(
            {
                "bench": "messaging",
                "pairs": args.pairs,
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
