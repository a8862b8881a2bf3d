"""Documents benchmark: N clients each make M edits; time until every replica has all.

Theory of operation
-------------------
Every server runs as its own process; this process runs the clients. Each client
opens one shared document, waits until all are connected, then appends M items to
the document's ``log`` array, one edit (one Yjs update) at a time. A client has
converged when its array holds all N x M items; the run's time is from the first
edit to the last client converging. ``updates_per_s`` is N x M over that time, and
``deliveries_per_s`` counts each update once per replica (N x M x N).

Three rows, one run:

* ``relay_sdk``: Formicary relay (``formicary relay serve``: SQLite, fsync per commit
  batch, every update signed and hash-chained), clients are SDK agents
  (``client.doc``), which merge edits made while one is in flight.
* ``relay_yjs``: the same relay, clients are plain y-sync peers on its
  ``/yjs/<ns>/<doc>`` endpoint (pycrdt messages only, one message per edit).
* ``pycrdt_websocket``: pycrdt-websocket's own ``WebsocketServer`` (in memory, no
  persistence) behind a ``websockets`` asyncio server, the same plain peers.

``ratio_*`` is pycrdt-websocket's time over ours: above 1 means we converge faster.
The relay does more per update (a signature check, a durable commit) than
pycrdt-websocket, which keeps rooms in memory only.

Usage::

    .venv/bin/python bench/docs.py [--clients 20] [--edits 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pycrdt
import trio
from ingest import BenchError, RelayProcess, free_port, relay_process
from pycrdt import YMessageType, create_sync_message, create_update_message, handle_sync_message
from websockets.trio.client import connect

from agent_sdk import doctoken
from agent_sdk.client import RelayClient
from agent_sdk.identity import Identity

NS = "bench@local"
DOC = "bench"
TIMEOUT = 300.0


def log(message: str) -> None:
    print(f"[docs] {message}", file=sys.stderr, flush=True)


class Barrier:
    """Everyone connected before anyone edits; the clock starts at the release.

    Clients join one at a time (``joined``): pycrdt-websocket's server hangs a client
    that connects to a new room while another one is still starting it.
    """

    def __init__(self, parties: int) -> None:
        self.parties, self.arrived = parties, 0
        self.go = trio.Event()
        self.joined = trio.Event()
        self.started = 0.0

    async def wait(self) -> None:
        self.joined.set()
        self.arrived += 1
        if self.arrived == self.parties:
            self.started = time.perf_counter()
            self.go.set()
        await self.go.wait()


async def sdk_client(url: str, n: int, edits: int, total: int, barrier: Barrier) -> float:
    async with (
        RelayClient.connect(url, Identity.generate()) as client,
        client.doc(NS, DOC) as shared,
    ):
        items = shared.array()
        await barrier.wait()
        for i in range(edits):
            items.append(n * edits + i)
            await trio.lowlevel.checkpoint()
        while len(items) < total:
            await shared._advanced.wait()
        done = time.perf_counter()
        await shared.flush()
        return done


async def plain_client(url: str, n: int, edits: int, total: int, barrier: Barrier) -> float:
    """A y-sync peer speaking only pycrdt's standard messages."""
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    items = doc.get("log", type=pycrdt.Array)
    outbox: list[bytes] = []
    changed = trio.Event()
    remote = False

    def on_change(event: Any) -> None:
        nonlocal changed
        if not remote:
            outbox.append(create_update_message(event.update))
        changed.set()
        changed = trio.Event()

    doc.observe(on_change)
    async with connect(url, max_size=None) as ws:

        async def receive() -> None:
            nonlocal remote
            while True:
                message = await ws.recv()
                assert isinstance(message, bytes)
                if message[0] == YMessageType.SYNC:
                    remote = True
                    try:
                        reply = handle_sync_message(message[1:], doc)
                    finally:
                        remote = False
                    if reply is not None:
                        await ws.send(reply)

        async with trio.open_nursery() as nursery:
            await ws.send(create_sync_message(doc))
            await ws.recv()  # the server's step 1: the room is up
            nursery.start_soon(receive)
            await barrier.wait()
            for i in range(edits):
                items.append(n * edits + i)
                while outbox:
                    await ws.send(outbox.pop(0))
            while len(items) < total:
                await changed.wait()
            done = time.perf_counter()
            nursery.cancel_scope.cancel()
    return done


Client = Callable[[str, int, int, int, Barrier], Any]


async def measure(client: Client, url_of: Callable[[int], str], clients: int, edits: int) -> float:
    total = clients * edits
    barrier = Barrier(clients)
    finished: list[float] = []

    async def one(n: int) -> None:
        finished.append(await client(url_of(n), n, edits, total, barrier))

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for n in range(clients):
                nursery.start_soon(one, n)
                await barrier.joined.wait()
                barrier.joined = trio.Event()
    return max(finished) - barrier.started


def row(seconds: float, clients: int, edits: int) -> dict[str, Any]:
    updates = clients * edits
    return {
        "convergence_s": round(seconds, 3),
        "updates_per_s": round(updates / seconds, 1),
        "deliveries_per_s": round(updates * clients / seconds, 1),
    }


# ------------------------------------------------------------------ pycrdt-websocket


def serve_pycrdt_websocket(port: int) -> None:
    """The peer server: pycrdt-websocket's WebsocketServer on asyncio (a subprocess)."""
    from pycrdt.websocket import WebsocketServer
    from websockets.asyncio.server import serve
    from websockets.exceptions import ConnectionClosed

    class Channel:
        def __init__(self, ws: Any) -> None:
            self.ws = ws
            self._path = ws.request.path

        @property
        def path(self) -> str:
            return str(self._path)

        def __aiter__(self) -> Channel:
            return self

        async def __anext__(self) -> bytes:
            try:
                return await self.recv()
            except ConnectionClosed:
                raise StopAsyncIteration() from None

        async def send(self, message: bytes) -> None:
            await self.ws.send(message)

        async def recv(self) -> bytes:
            message = await self.ws.recv()
            return bytes(message)

    async def main() -> None:
        async with (
            WebsocketServer() as server,
            serve(lambda ws: server.serve(Channel(ws)), "127.0.0.1", port, max_size=None),
        ):
            print("ready", flush=True)
            await asyncio.Future()

    asyncio.run(main())


def start_pycrdt_websocket() -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [sys.executable, __file__, "--serve-pycrdt-websocket", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert process.stdout is not None
    if process.stdout.readline().strip() != b"ready":
        process.kill()
        raise BenchError("pycrdt-websocket server did not start")
    return process, port


# ------------------------------------------------------------------------ main


def run(clients: int, edits: int) -> dict[str, Any]:
    result: dict[str, Any] = {"bench": "docs", "clients": clients, "edits_per_client": edits}
    with (
        tempfile.TemporaryDirectory(prefix="formicary-bench-docs-") as tmp,
        relay_process(Path(tmp), None) as relay,
    ):
        relay.wait_ready(30)
        result["relay_sdk"] = row(trio.run(_relay_sdk, relay, clients, edits), clients, edits)
        log(f"relay, SDK clients: {result['relay_sdk']}")
        seconds = trio.run(_relay_yjs, relay, clients, edits)
        result["relay_yjs"] = row(seconds, clients, edits)
        log(f"relay, plain y-sync clients: {result['relay_yjs']}")
    process, port = start_pycrdt_websocket()
    try:
        seconds = trio.run(
            measure, plain_client, lambda n: f"ws://127.0.0.1:{port}/{DOC}", clients, edits
        )
    finally:
        process.kill()
        process.wait()
    result["pycrdt_websocket"] = row(seconds, clients, edits)
    log(f"pycrdt-websocket: {result['pycrdt_websocket']}")
    peer = result["pycrdt_websocket"]["convergence_s"]
    result["ratio_sdk"] = round(peer / result["relay_sdk"]["convergence_s"], 3)
    result["ratio_yjs"] = round(peer / result["relay_yjs"]["convergence_s"], 3)
    result["python"] = platform.python_version()
    result["cpus"] = os.cpu_count()
    return result


async def _relay_sdk(relay: RelayProcess, clients: int, edits: int) -> float:
    return await measure(sdk_client, lambda n: relay.url, clients, edits)


async def _relay_yjs(relay: RelayProcess, clients: int, edits: int) -> float:
    writer = Identity.generate()
    async with RelayClient.connect(relay.url, writer) as client:
        await client.publish(NS, "doc.create", {"doc": "plain"})
    exp = time.time_ns() // 1_000_000 + 3_600_000
    token, secret = doctoken.mint_bound(writer, NS, "plain", exp)
    url = f"{relay.url}/yjs/{NS}/plain?{doctoken.query(token, secret)}"
    return await measure(plain_client, lambda n: url, clients, edits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--edits", type=int, default=50, help="edits per client")
    parser.add_argument("--serve-pycrdt-websocket", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_pycrdt_websocket:
        serve_pycrdt_websocket(args.serve_pycrdt_websocket)
        return 0
    try:
        print(json.dumps(run(args.clients, args.edits)), flush=True)
    except (BenchError, trio.TooSlowError) as exc:
        log(f"failed: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
