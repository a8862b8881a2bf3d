"""Formicary against two Nostr relays: ingest, fan-out and idle memory, one load generator.

Theory of operation
-------------------
Three relays do the same work: check each event's signature, store it, fan it out to
subscribers.

* **formicary**: ``formicary relay serve`` (one process, embedded SQLite, no rate
  limits), Ed25519 events of the Formicary protocol (docs/protocol.md).
* **nostr_sdk**: the relay built into the ``nostr-sdk`` package (Rust, one worker
  thread, in-memory store), run by this script in a process of its own
  (``--serve-nostr-sdk PORT``) with its write limit raised. It drops a connection that
  sends about 6,000 messages a minute, so every publisher reconnects after
  ``--reconnect-every`` messages (all three relays get the same treatment).
* **nostr_relay**: the Python ``nostr-relay`` package (gunicorn + uvicorn, one
  worker, SQLite in a file under the run's temporary folder), signature validator on.

Each run starts a fresh relay process and a fresh workload; the relays alternate
(the order rotates every round) and the median of ``--rounds`` is reported. The load
generator is this process: one WebSocket per publisher and per subscriber, with the
same counts, window and event body size for every relay. Events are signed before the
timed phases (Nostr events with nostr-sdk's own Schnorr signer), so the generator's
crypto does not compete with the relay.

* **ingest**: ``--publishers`` connections publish ``--events`` events, up to
  ``--window`` unanswered each; events per second from the first send to the last
  answer (Formicary's ack, Nostr's ``OK``). Formicary's client sends whatever the
  window has room for as one bundle, as its SDK does (protocol §1); a Nostr message
  carries one event.
* **fan-out**: ``--subscribers`` connections subscribe to everything the publishers
  send (Formicary: the namespace; Nostr: ``kinds: [1]``, ``limit: 0``), then
  ``--fanout-events`` are published. Deliveries per second from the first publish to
  the last delivery. The Rust relay's broadcast channel drops events for a subscriber
  that falls behind, silently: ``missed`` counts what never arrived (the run ends
  after ``--quiet`` seconds without a delivery).
* **idle**: ``--idle`` connections opened and left idle (a Formicary agent is
  authenticated; a Nostr client has nothing to authenticate); the relay's resident
  memory (its whole process tree) over one connection's, divided by their number.

Every phase also reports the relay's CPU per event (or per delivery): the generator
is one Python process on the same 2 cores, and where it, not the relay, is the
bottleneck (a relay that stays well under one core), CPU per item is the fairer
figure of the relay's own cost.

Usage::

    .venv/bin/python bench/compare_nostr.py [--events 20000] [--subscribers 100] [--rounds 3]

Progress goes to stderr; exactly one JSON object goes to stdout: per phase, each
relay's figure and Formicary's ratio to each peer (above 1 means Formicary is ahead;
for memory, below 1). Exit status 0 on a measurement, 1 when a run failed, 2 on a
usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

# This folder holds benchmarks with package names (federation.py once): keep it off the
# path while the relay's packages import.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import federation.network  # noqa: E402, F401

sys.path.append(str(_HERE))

import msgpack  # noqa: E402
import trio  # noqa: E402
from idle import rss_bytes, steady_rss  # noqa: E402
from ingest import (  # noqa: E402
    BenchError,
    authenticate,
    build_workload,
    describe,
    free_port,
    relay_process,
    tree,
    tree_cpu,
)
from websockets.exceptions import ConnectionClosed, InvalidHandshake  # noqa: E402
from websockets.trio.client import ClientConnection, connect  # noqa: E402

from agent_sdk import frames as f  # noqa: E402

RELAYS = ("formicary", "nostr_sdk", "nostr_relay")
PEERS = ("nostr_sdk", "nostr_relay")
FANOUT_NS = "bench0@local"  # build_workload's first namespace
READY_TIMEOUT = 30.0


def log(message: str) -> None:
    print(f"[compare_nostr] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- relays


@dataclass
class Running:
    name: str
    url: str
    pid: int


def wait_ready(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    """Until a Nostr round trip (REQ -> EOSE) works: gunicorn binds the port before its
    worker has opened the store, and that start-up must not count as ingest time."""
    from websockets.sync.client import connect as sync_connect

    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if process.poll() is not None:
            raise BenchError(f"{what} exited with {process.returncode}")
        try:
            with sync_connect(f"ws://127.0.0.1:{port}", open_timeout=2, proxy=None) as ws:
                ws.send(json.dumps(["REQ", "ready", {"limit": 0}]))
                while not str(ws.recv(timeout=2)).startswith('["EOSE"'):
                    pass
                return
        except (OSError, TimeoutError, ConnectionError, InvalidHandshake, ConnectionClosed):
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{what} not answering after {READY_TIMEOUT}s")
        time.sleep(0.05)  # between polls, bounded by the deadline above


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the peer's whole process group (gunicorn's worker with its master)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextmanager
def started(name: str, tmp: Path) -> Iterator[Running]:
    """A fresh relay process of ``name``; always stopped on the way out."""
    if name == "formicary":
        with relay_process(tmp, None) as relay:
            relay.wait_ready(READY_TIMEOUT)
            yield Running(name, relay.url, relay.process.pid)
        return
    port = free_port()
    if name == "nostr_sdk":
        command = [sys.executable, __file__, "--serve-nostr-sdk", str(port)]
    else:
        config = tmp / "nostr-relay.yaml"
        config.write_text(nostr_relay_config(tmp / "nostr.sqlite3", port))
        command = [str(Path(sys.executable).with_name("nostr-relay")), "-c", str(config), "serve"]
    with (tmp / f"{name}.log").open("wb") as out:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp,
            start_new_session=True,  # its own process group: stopped as one
        )
    try:
        wait_ready(port, process, name)
        yield Running(name, f"ws://127.0.0.1:{port}", process.pid)
    finally:
        stop(process)


def nostr_relay_config(database: Path, port: int) -> str:
    # Only the signature validator: the other default ones (recent, size, hellthread)
    # are policy, not the work being compared. Its per-event INFO log goes too.
    return f"""\
DEBUG: false
storage:
  sqlalchemy.url: sqlite+aiosqlite:///{database}
  validators:
    - nostr_relay.validators.is_signed
gunicorn:
  bind: 127.0.0.1:{port}
  workers: 1
  loglevel: warning
logging:
  version: 1
  handlers:
    console: {{class: logging.StreamHandler, level: WARNING, stream: ext://sys.stderr}}
  loggers:
    nostr_relay: {{level: WARNING, handlers: [console], propagate: false}}
  root: {{level: WARNING, handlers: [console]}}
"""


def serve_nostr_sdk(port: int) -> None:
    """Run nostr-sdk's relay until killed (this script as the peer's own process)."""
    import asyncio

    import nostr_sdk as n

    async def main() -> None:
        # Writes are limited to 60 a minute by default; raise it out of the way.
        limit = n.RateLimit(max_reqs=10_000, notes_per_minute=4_000_000_000)
        builder = n.LocalRelayBuilder().addr("127.0.0.1").port(port).rate_limit(limit)
        relay = builder.build()
        await relay.run()  # returns at once; the relay lives while `relay` does
        await asyncio.Event().wait()

    asyncio.run(main())


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):  # gone meanwhile
            total += rss_bytes(p)
    return total


# --------------------------------------------------------------------------- workloads


@dataclass
class Publisher:
    """One publisher's pre-encoded messages, in order, and what it authenticates as."""

    messages: list[bytes | str]
    identity: Any = None  # a Formicary Identity, or None for Nostr


def formicary_publishers(
    count: int, events: int, body: int, namespaces: int, seed: int
) -> list[Publisher]:
    """Publishers in ``bench{k}@local``: one namespace each for ingest (the relay's unit
    of order), all in ``bench0@local`` for fan-out (what the subscribers follow)."""
    agents = build_workload(
        agents=count, events=events, warmup=0, namespaces=namespaces, body_size=body, seed=seed
    )
    return [Publisher(list(agent.frames), agent.identity) for agent in agents]


def nostr_publishers(count: int, events: int, body: int) -> list[Publisher]:
    import nostr_sdk as n

    out = []
    for p in range(count):
        keys = n.Keys.generate()
        share = events // count + (1 if p < events % count else 0)
        messages: list[bytes | str] = []
        for i in range(share):
            content = (f"{p}.{i}." + "x" * body)[:body]
            event = n.EventBuilder(n.Kind(1), content).finalize(keys)
            messages.append('["EVENT",' + event.as_json() + "]")
        out.append(Publisher(messages))
    return out


# --------------------------------------------------------------------------- protocol


def _answers(message: bytes | str) -> tuple[int, int]:
    """(accepted, refused) publishes answered by one message from the relay."""
    if isinstance(message, str):  # Nostr: ["OK", id, true|false, reason]
        if message.startswith('["OK"'):
            return (1, 0) if json.loads(message)[2] else (0, 1)
        return 0, 0
    frames = msgpack.unpackb(message, raw=False)
    if isinstance(frames, dict):
        frames = [frames]
    ok = sum(1 for frame in frames if frame.get("t") == "ack")
    bad = sum(1 for frame in frames if frame.get("t") == "error")
    return ok, bad


def _deliveries(message: bytes | str) -> int:
    if isinstance(message, str):
        return 1 if message.startswith('["EVENT"') else 0
    frames = msgpack.unpackb(message, raw=False)
    if isinstance(frames, dict):
        frames = [frames]
    return sum(1 for frame in frames if frame.get("t") == "event")


@asynccontextmanager
async def open_ws(url: str, identity: Any = None) -> AsyncIterator[ClientConnection]:
    """A connection (websockets' trio client must be entered with ``async with``: it
    runs a task of its own); authenticated when ``identity`` is a Formicary one."""
    async with connect(url, max_size=2**22, compression=None) as ws:
        if identity is not None:
            await authenticate(ws, identity)
        yield ws


async def publish(url: str, publisher: Publisher, window: int, reconnect_every: int) -> list[int]:
    """Send every message with ``window`` unanswered; [accepted, refused]."""
    counts = [0, 0]
    messages = publisher.messages
    for start in range(0, len(messages), reconnect_every):
        chunk = messages[start : start + reconnect_every]
        async with open_ws(url, publisher.identity) as ws:
            await _publish_chunk(ws, chunk, window, counts)
    return counts


async def _publish_chunk(
    ws: ClientConnection, chunk: list[bytes | str], window: int, counts: list[int]
) -> None:
    answered = 0
    sent = 0
    room = trio.Event()

    async def receive() -> None:
        nonlocal answered, room
        while answered < len(chunk):
            ok, bad = _answers(await ws.recv())
            counts[0] += ok
            counts[1] += bad
            if ok or bad:
                answered += ok + bad
                room.set()
                room = trio.Event()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        while sent < len(chunk):
            free = window - (sent - answered)
            if free <= 0:
                await room.wait()
                continue
            batch = chunk[sent : sent + free]
            sent += len(batch)
            if isinstance(batch[0], bytes):  # Formicary: one bundle, as its SDK sends
                await ws.send(f.bundle(batch))  # type: ignore[arg-type]
            else:
                for message in batch:
                    await ws.send(message)


# --------------------------------------------------------------------------- phases


async def ingest(
    run: Running, publishers: list[Publisher], args: argparse.Namespace
) -> dict[str, Any]:
    cpu0 = tree_cpu(run.pid)
    began = time.perf_counter()
    results: list[list[int]] = []

    async def one(p: Publisher) -> None:
        results.append(await publish(run.url, p, args.window, args.reconnect_every))

    with trio.fail_after(args.timeout):
        async with trio.open_nursery() as nursery:
            for p in publishers:
                nursery.start_soon(one, p)
    seconds = time.perf_counter() - began
    cpu = tree_cpu(run.pid) - cpu0
    accepted = sum(r[0] for r in results)
    return {
        "events_per_s": round(accepted / seconds, 1),
        "accepted": accepted,
        "refused": sum(r[1] for r in results),
        "seconds": round(seconds, 3),
        "relay_cpu_s": round(cpu, 2),
        # The relay's own cost, whoever was the bottleneck (the generator shares the cores).
        "relay_cpu_us_per_event": round(cpu / max(accepted, 1) * 1e6, 1),
    }


async def fanout(
    run: Running, publishers: list[Publisher], args: argparse.Namespace
) -> dict[str, Any]:
    nostr = publishers[0].identity is None
    total = sum(len(p.messages) for p in publishers)
    expected = total * args.subscribers
    delivered = [0]
    last = [0.0]
    everyone = trio.Event()
    from agent_sdk.identity import Identity

    async def subscriber(n: int, task_status: trio.TaskStatus[None]) -> None:
        identity = None if nostr else Identity.from_seed((10_000 + n).to_bytes(32, "big"))
        async with open_ws(run.url, identity) as ws:
            if nostr:
                await ws.send(json.dumps(["REQ", "f", {"kinds": [1], "limit": 0}]))
                while not (await ws.recv()).startswith('["EOSE"'):
                    pass
            else:
                await ws.send(f.encode_frame(f.Subscribe(sub=1, ns=(FANOUT_NS,))))
                while not isinstance(f.decode_frame(await ws.recv()), f.Live):  # type: ignore[arg-type]
                    pass
            task_status.started()
            mine = 0
            while mine < total:
                got = _deliveries(await ws.recv())
                if got:
                    mine += got
                    delivered[0] += got
                    last[0] = time.perf_counter()
                    if delivered[0] >= expected:
                        everyone.set()

    cpu0 = 0.0
    async with trio.open_nursery() as nursery:
        with trio.fail_after(args.timeout):
            for n in range(args.subscribers):
                await nursery.start(subscriber, n)
        cpu0 = tree_cpu(run.pid)
        began = time.perf_counter()
        last[0] = began
        acks: list[list[int]] = []

        async def one(p: Publisher) -> None:
            acks.append(await publish(run.url, p, args.window, args.reconnect_every))

        with trio.move_on_after(args.timeout) as publishing:
            async with trio.open_nursery() as pubs:
                for p in publishers:
                    pubs.start_soon(one, p)
        if publishing.cancelled_caught:
            raise BenchError(f"{run.name}: fan-out publishes not answered in {args.timeout}s")
        with trio.move_on_after(args.timeout):
            # Every delivery, or quiet for --quiet seconds (a peer that drops events).
            while not everyone.is_set():
                seen = delivered[0]
                with trio.move_on_after(args.quiet):
                    await everyone.wait()
                if delivered[0] == seen:
                    break
        nursery.cancel_scope.cancel()
    seconds = max(last[0] - began, 1e-9)
    cpu = tree_cpu(run.pid) - cpu0
    return {
        "deliveries_per_s": round(delivered[0] / seconds, 1),
        "delivered": delivered[0],
        "missed": expected - delivered[0],
        "published": sum(a[0] for a in acks),
        "seconds": round(seconds, 3),
        "relay_cpu_s": round(cpu, 2),
        "relay_cpu_us_per_delivery": round(cpu / max(delivered[0], 1) * 1e6, 2),
    }


async def idle(run: Running, args: argparse.Namespace) -> dict[str, Any]:
    from agent_sdk.identity import Identity

    nostr = run.name != "formicary"
    limit = trio.Semaphore(100)
    opened = [0]

    async def hold(n: int, task_status: trio.TaskStatus[None]) -> None:
        identity = None if nostr else Identity.from_seed((50_000 + n).to_bytes(32, "big"))
        await limit.acquire()
        async with open_ws(run.url, identity):
            limit.release()
            opened[0] += 1
            task_status.started()
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        with trio.fail_after(args.timeout):
            await nursery.start(hold, 0)
            one = await steady_rss(run.pid, tree_rss)
            async with trio.open_nursery() as opening:
                for n in range(1, args.idle):
                    opening.start_soon(nursery.start, hold, n)
            full = await steady_rss(run.pid, tree_rss)
        nursery.cancel_scope.cancel()
    return {
        "connections": opened[0],
        "bytes_per_idle_connection": round((full - one) / max(args.idle - 1, 1)),
        "rss_one_mb": round(one / 2**20, 1),
        "rss_all_mb": round(full / 2**20, 1),
    }


# --------------------------------------------------------------------------- driver


PhaseRun = Callable[[Running], Awaitable[dict[str, Any]]]


def one_run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Ingest, then fan-out, on one fresh relay process of ``name``."""
    with tempfile.TemporaryDirectory(prefix="compare-nostr-") as tmp:
        if name == "formicary":
            pubs = formicary_publishers(args.publishers, args.events, args.body, args.publishers, 7)
            # Another seed: other keys, so no fan-out event is a duplicate of an ingest one.
            fans = formicary_publishers(args.publishers, args.fanout_events, args.body, 1, 8)
        else:
            pubs = nostr_publishers(args.publishers, args.events, args.body)
            fans = nostr_publishers(args.publishers, args.fanout_events, args.body)
        with started(name, Path(tmp)) as run:
            result = {
                "ingest": trio.run(ingest, run, pubs, args),
                "fanout": trio.run(fanout, run, fans, args),
            }
        log(
            f"{name}: ingest {result['ingest']['events_per_s']:,.0f}/s,"
            f" fan-out {result['fanout']['deliveries_per_s']:,.0f}/s"
            f" ({result['fanout']['missed']} missed)"
        )
        return result


def idle_run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="compare-nostr-") as tmp,
        started(name, Path(tmp)) as run,
    ):
        result = trio.run(idle, run, args)
    log(f"{name}: {result['bytes_per_idle_connection'] / 1024:.1f} KB per idle connection")
    return result


def _median_run(runs: list[dict[str, Any]], phase: str, key: str) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r[phase][key])
    chosen: dict[str, Any] = ordered[len(ordered) // 2][phase]
    return {**chosen, "rounds": [r[phase][key] for r in runs]}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in RELAYS}
    for r in range(args.rounds):
        order = RELAYS[r % 3 :] + RELAYS[: r % 3]
        log(f"round {r + 1}/{args.rounds}: {', '.join(order)}")
        for name in order:
            runs[name].append(one_run(name, args))
    ingest_fig = {name: _median_run(runs[name], "ingest", "events_per_s") for name in RELAYS}
    fan_fig = {name: _median_run(runs[name], "fanout", "deliveries_per_s") for name in RELAYS}
    idle_fig = {name: idle_run(name, args) for name in RELAYS} if args.idle > 1 else {}

    def ratios(table: dict[str, Any], key: str, inverse: bool = False) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for peer in PEERS:
            ours, theirs = table["formicary"][key], table[peer][key]
            if inverse:
                ours, theirs = theirs, ours
            out[f"formicary_over_{peer}"] = round(ours / theirs, 3) if theirs else None
        return out

    result: dict[str, Any] = {
        "bench": "compare_nostr",
        "publishers": args.publishers,
        "window": args.window,
        "events": args.events,
        "subscribers": args.subscribers,
        "fanout_events": args.fanout_events,
        "body_size": args.body,
        "rounds": args.rounds,
        "ingest": {**ingest_fig, **ratios(ingest_fig, "events_per_s")},
        "fanout": {**fan_fig, **ratios(fan_fig, "deliveries_per_s")},
    }
    if idle_fig:
        # Memory: the ratio is the peer's bytes over ours, so above 1 is ahead here too.
        result["idle"] = {**idle_fig, **ratios(idle_fig, "bytes_per_idle_connection", True)}
    result["versions"] = {
        "nostr-sdk": version("nostr-sdk"),
        "nostr-relay": version("nostr-relay"),
        "python": platform.python_version(),
    }
    result["cpus"] = os.cpu_count()
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--publishers", type=int, default=8)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--events", type=int, default=20_000, help="ingest events per run")
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--fanout-events", type=int, default=1_000)
    parser.add_argument("--body", type=int, default=100, help="event body/content bytes")
    parser.add_argument("--idle", type=int, default=1_000, help="idle connections (0: skip)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reconnect-every", type=int, default=5_000)
    parser.add_argument("--quiet", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="per phase, seconds")
    parser.add_argument("--serve-nostr-sdk", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.serve_nostr_sdk:
        serve_nostr_sdk(args.serve_nostr_sdk)
        return 0
    for name in ("publishers", "window", "events", "subscribers", "fanout_events", "rounds"):
        if getattr(args, name) < 1:
            print(f"--{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    try:
        result = measure(args)
    except Exception as exc:  # any failure, in an exception group too: say why, exit 1
        print(json.dumps({"bench": "compare_nostr", "error": describe(exc)}))
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
