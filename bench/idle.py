"""Idle agents: the relay's memory per open connection and per subscription, with
``--connections`` (10,000 by default) authenticated WebSockets on one relay process.

Theory of operation
-------------------
The relay runs as its own process (as in bench/ingest.py: SQLite store, no limits).
This process opens ``--connections`` WebSockets to it, ``--concurrency`` at a time,
and authenticates each (hello -> auth -> welcome), then leaves them idle: no
publishes, no subscriptions. The relay's resident memory (``VmRSS`` of its process)
is read once it counts every connection open (``GET /metrics``), after one
connection for the baseline, and again after each connection subscribed to one
namespace (and got its ``live``). Per connection = (RSS with all of them - baseline)
/ connections; per subscription the same over the subscriptions. The clients' own
memory is this process's and is not counted.

Usage::

    .venv/bin/python bench/idle.py [--connections 10000] [--concurrency 200]

Progress on stderr; one JSON object on stdout (exit 0), or one with ``error`` (exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio
from ingest import BenchError, _as_bytes, _http_get, authenticate, relay_process
from websockets.trio.client import ClientConnection, connect

from agent_sdk import frames as f
from agent_sdk.identity import Identity

NS = "idle@local"


def log(message: str) -> None:
    print(f"[idle] {message}", file=sys.stderr, flush=True)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError("no VmRSS for the relay process")


def open_connections(port: int) -> int:
    for line in _http_get(port, "/metrics", timeout=5.0).decode().splitlines():
        if line.startswith("formicary_connections_open "):
            return int(float(line.split()[1]))
    raise BenchError("the relay's /metrics has no formicary_connections_open")


async def settle(port: int, wanted: int) -> None:
    """Wait until the relay counts ``wanted`` connections open (it counts on accept)."""
    with trio.fail_after(120):
        while True:  # another process's count: polled, bounded by fail_after
            if await trio.to_thread.run_sync(open_connections, port) == wanted:
                return
            await trio.sleep(0.2)


async def steady_rss(pid: int, rss: Callable[[int], int] = rss_bytes) -> int:
    """The relay's RSS once it stops moving (two reads 0.5 s apart within 1 %, at most
    10 s): right after a burst of handshakes, their buffers are still being freed.
    ``rss`` reads it (another reader counts a process tree: bench/compare_nostr.py)."""
    last = rss(pid)
    for _ in range(20):
        await trio.sleep(0.5)
        now = rss(pid)
        if abs(now - last) <= last / 100:
            return now
        last = now
    return last


async def measure(args: argparse.Namespace, url: str, port: int, pid: int) -> dict[str, Any]:
    with trio.fail_after(args.timeout):
        return await _measure(args, url, port, pid)


async def _measure(args: argparse.Namespace, url: str, port: int, pid: int) -> dict[str, Any]:
    sockets: list[ClientConnection] = []
    identities = [Identity.from_seed(n.to_bytes(32, "big")) for n in range(1, args.connections + 1)]
    limit = trio.Semaphore(args.concurrency)

    async def one(identity: Identity, opened: trio.Nursery) -> None:
        async with limit:
            ws = await opened.start(hold, identity)
            sockets.append(ws)

    async def hold(identity: Identity, task_status: trio.TaskStatus[ClientConnection]) -> None:
        async with connect(url, max_size=2**20) as ws:
            await authenticate(ws, identity)
            task_status.started(ws)
            await trio.sleep_forever()

    async with trio.open_nursery() as opened:
        await opened.start(hold, identities[0])
        await settle(port, 1)
        baseline = await steady_rss(pid)
        log(f"baseline RSS {baseline / 2**20:.1f} MiB with 1 connection")
        began = time.perf_counter()
        async with trio.open_nursery() as connecting:
            for n, identity in enumerate(identities[1:], 2):
                connecting.start_soon(one, identity, opened)
                if n % 1000 == 0:
                    log(f"{n} connections asked for")
        await settle(port, args.connections)
        connect_s = time.perf_counter() - began
        connected = await steady_rss(pid)
        log(f"{args.connections} connected in {connect_s:.1f}s; RSS {connected / 2**20:.1f} MiB")

        async def subscribe(ws: ClientConnection, sub: int) -> None:
            async with limit:
                await ws.send(f.encode_frame(f.Subscribe(sub=sub, ns=(NS,))))
                while not isinstance(f.decode_frame(_as_bytes(await ws.recv())), f.Live):
                    pass

        async with trio.open_nursery() as subscribing:
            for n, ws in enumerate(sockets, 1):
                subscribing.start_soon(subscribe, ws, n)
        subscribed = await steady_rss(pid)
        log(f"{len(sockets)} subscribed; RSS {subscribed / 2**20:.1f} MiB")
        opened.cancel_scope.cancel()
    others = args.connections - 1
    return {
        "relay_rss_baseline_mb": round(baseline / 2**20, 1),
        "relay_rss_connected_mb": round(connected / 2**20, 1),
        "relay_rss_subscribed_mb": round(subscribed / 2**20, 1),
        "bytes_per_idle_connection": round((connected - baseline) / others),
        "bytes_per_subscription": round((subscribed - connected) / len(sockets)),
        "connect_seconds": round(connect_s, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=600.0, help="the whole run, s")
    args = parser.parse_args(argv)
    if args.connections < 2:
        parser.error("--connections is at least 2")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.connections + 256
    if hard != resource.RLIM_INFINITY and hard < wanted:
        parser.error(
            f"--connections {args.connections} needs {wanted} open files; the limit is {hard}"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))  # the relay inherits it
    with tempfile.TemporaryDirectory(prefix="formicary-idle-") as tmp:
        try:
            with relay_process(Path(tmp), None) as relay:
                relay.wait_ready(30)
                result = trio.run(measure, args, relay.url, relay.port, relay.process.pid)
        except Exception as exc:  # (trio groups a nursery's errors) one JSON object anyway
            print(json.dumps({"bench": "idle", "error": f"{type(exc).__name__}: {exc}"}))
            return 1
    print(
        json.dumps(
            {
                "bench": "idle",
                "connections": args.connections,
                **result,
                "python": platform.python_version(),
                "cpus": len(os.sched_getaffinity(0)),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
