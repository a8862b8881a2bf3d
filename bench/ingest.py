"""Ingest benchmark: signed events per second through a real relay, against Ed25519 verify.

Theory of operation
-------------------
The relay runs as its own process (``formicary relay serve`` from this interpreter) on
a free loopback port and a temporary data directory; this process is the load
generator. Every event is signed and every publish frame encoded *before* the timed
phase, so the generator's own crypto does not compete with the relay for the CPU.

Each of ``--agents`` identities opens one WebSocket, authenticates (hello -> auth ->
welcome) and publishes its share of the events with up to ``--window`` publishes
outstanding, waiting for every ack. A short untimed warm-up goes first; the timed
phase starts when every agent has finished it and ends at the last ack. Latency is
send-to-ack per event.

The relay must verify one Ed25519 signature per event, so the single-core verify rate
is the physical ceiling of ingest on one relay process. It is measured in this process,
with the relay idle, before and after the ingest phase (the machine is noisy; the mean
is used), over the very events the relay verified, the way the relay verifies them
(:meth:`agent_sdk.wire.SignedEvent.verify`). ``ingest_over_verify`` is the fraction of
that ceiling the relay reaches end to end: the relay-core issue asked for at least 0.5
(``meets_target``), with 0.8 as the goal. The relay verifies with libsodium, and the
performance issue asks for ingest at least libsodium's one-core verify rate
(``ingest_over_libsodium_verify`` >= 1.0, ``meets_libsodium_target``).

Usage::

    .venv/bin/python bench/ingest.py [--agents 8] [--events 40000] [--window 64]

Besides the figures the issue asks for, the JSON says where the relay's time went:
its CPU during the timed phase (its signature-checking process included), its
event-loop thread's CPU per event, and ``relay_overhead_us_per_event``, the relay's
CPU per event in all its threads and processes minus one signature check — the
number to drive down. ``--relay-profile FILE`` runs the relay under cProfile, or
with ``FILE.json`` counts its event loop's CPU per trio task
(``bench/profile_relay.py --show FILE`` prints either).

Progress goes to stderr; exactly one JSON object goes to stdout. The exit status is 0
when the measurement succeeded (1 with ``--check`` when the ratio is below 0.5), 1 when
the run failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from websockets.trio.client import ClientConnection, connect

from agent_sdk import frames as f
from agent_sdk.identity import Identity
from agent_sdk.wire import EVENT_DOMAIN, Event, SignedEvent, sign_event, verify_signature
from relay.limits import UNLIMITED, as_toml
from simulations.ports import free_port

RELAY_NAME = "local"
TARGET_MIN = 0.5
GOAL = 0.8
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
VERIFY_SAMPLES = 512


def log(message: str) -> None:
    print(f"[ingest] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """The benchmark could not produce a measurement."""


# --------------------------------------------------------------------------- workload


@dataclass
class Agent:
    """One identity's pre-signed share: publish frame ``i`` carries ``rid == i``."""

    identity: Identity
    events: list[SignedEvent]
    frames: list[bytes]
    warmup: int
    latencies_ns: list[int] = field(default_factory=list)


def build_workload(
    *, agents: int, events: int, warmup: int, namespaces: int, body_size: int, seed: int
) -> list[Agent]:
    """Sign every event and encode every publish frame (warm-up ones first)."""
    rng = random.Random(seed)
    ts = time.time_ns() // 1_000_000
    workload = []
    for a in range(agents):
        identity = Identity.from_seed(rng.randbytes(32))
        # Spread the remainders so the total is exact.
        timed = events // agents + (1 if a < events % agents else 0)
        warm = warmup // agents + (1 if a < warmup % agents else 0)
        signed, frames = [], []
        for i in range(warm + timed):
            pad = rng.randbytes(body_size // 2 + 1).hex()[:body_size]
            event = Event(
                # Agent a alone in namespace a when there is one per agent; all agents
                # in one namespace when there is one; round robin over them otherwise.
                ns=f"bench{(a + i * agents) % namespaces}@{RELAY_NAME}",
                kind="bench.ingest",
                author=identity.public_key,
                body={"i": i, "pad": pad},
                ts=ts,
            )
            one = sign_event(event, identity.sign)
            signed.append(one)
            frames.append(f.encode_frame(f.Publish(rid=i, event=one.raw, sig=one.sig)))
        workload.append(Agent(identity, signed, frames, warm))
    return workload


# --------------------------------------------------------------------------- verify rate


def verify_rate(samples: Sequence[SignedEvent], seconds: float) -> float:
    """Signature checks per second on one core, exactly as the relay checks events."""
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for signed in samples:
            if not signed.verify():
                raise BenchError("a pre-signed event failed to verify")
        count += len(samples)
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def raw_verify_rate(samples: Sequence[SignedEvent], seconds: float) -> float:
    """The same checks with key objects built beforehand: Ed25519 alone, no wrapper."""
    prepared = [
        (Ed25519PublicKey.from_public_bytes(s.event.author), s.sig, EVENT_DOMAIN + s.id)
        for s in samples
    ]
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for key, sig, message in prepared:
            key.verify(sig, message)
        count += len(prepared)
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def sodium_verify_rate(samples: Sequence[SignedEvent], seconds: float) -> float | None:
    """The same checks through libsodium (PyNaCl), measured like :func:`verify_rate`
    (before and after the ingest phase, averaged): the floor issue 12 sets ingest
    against. Key objects are built beforehand, as the relay caches its keys
    (bench/floor.py compares the two libraries alone)."""
    try:
        from nacl.signing import VerifyKey
    except ImportError:
        return None
    prepared = [(VerifyKey(s.event.author), s.sig, EVENT_DOMAIN + s.id) for s in samples]
    count = 0
    start = time.perf_counter()
    while True:
        for key, sig, message in prepared:
            key.verify(message, sig)
        count += len(prepared)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count / elapsed


# --------------------------------------------------------------------------- relay process


def _http_get(port: int, path: str, timeout: float) -> bytes:
    # No proxies: an http_proxy in the environment must not see loopback traffic.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
        body: bytes = response.read()
        return body


@dataclass
class RelayProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float) -> None:
        """Poll ``GET /health`` until it answers; raise if the relay dies or is too slow."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise BenchError(f"relay exited with {self.process.returncode}: {self.tail()}")
            try:
                if _http_get(self.port, "/health", timeout=1.0).strip() == b"ok":
                    return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"relay not listening after {timeout}s: {self.tail()}")
            time.sleep(0.05)  # between polls, bounded by the deadline above

    def info(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(_http_get(self.port, "/info", timeout=5.0))
        return document

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no relay log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log("relay ignored SIGTERM; killing it")
                self.process.kill()
                self.process.wait()


@contextmanager
def relay_process(
    data: Path, profile: Path | None, extra: Sequence[str] = ()
) -> Iterator[RelayProcess]:
    """Start ``formicary relay serve`` on a free port; always stop it on the way out."""
    port = free_port()
    argv = ["relay", "serve", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--data", str(data / "relay"), "--name", RELAY_NAME, *extra]
    if "--config" not in extra:
        argv += unlimited(data)
    if profile is None:
        command = [sys.executable, "-m", "agent_sdk.cli", *argv]
    else:
        wrapper = Path(__file__).with_name("profile_relay.py")
        tasks = ["--tasks"] if profile.suffix == ".json" else []  # (per task, not cProfile)
        command = [sys.executable, str(wrapper), *tasks, "--out", str(profile), "--", *argv]
    log_path = data / "relay.log"
    with log_path.open("wb") as relay_log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=relay_log, stderr=subprocess.STDOUT
        )
    relay = RelayProcess(process, port, log_path)
    try:
        yield relay
    finally:
        relay.stop()


def cpu_seconds(pid: int, tid: int | None = None) -> float | None:
    """User + system CPU time of a process (or one of its threads), Linux only."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path) as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return None
    # After the command name: state is field 3, utime field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """``pid`` and its living descendants (gunicorn's worker is a child)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        if not Path(f"/proc/{p}").exists():
            continue  # gone meanwhile
        found.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # gone meanwhile, or a kernel without the children files
            continue
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants."""
    return sum(cpu_seconds(p) or 0.0 for p in tree(pid))


# --------------------------------------------------------------------------- load


async def authenticate(ws: ClientConnection, identity: Identity) -> None:
    """hello -> auth -> welcome, checking the relay's proof of its key."""
    hello = f.decode_frame(_as_bytes(await ws.recv()))
    if not isinstance(hello, f.Hello):
        raise BenchError(f"expected hello, got {hello.t}")
    challenge = os.urandom(f.CHALLENGE_SIZE)
    sig = identity.sign(f.agent_auth_message(hello.relay, hello.challenge))
    await ws.send(f.encode_frame(f.Auth(key=identity.public_key, sig=sig, challenge=challenge)))
    welcome = f.decode_frame(_as_bytes(await ws.recv()))
    if not isinstance(welcome, f.Welcome):
        raise BenchError(f"expected welcome, got {welcome}")
    proof = f.relay_auth_message(identity.public_key, challenge)
    if not verify_signature(hello.relay, welcome.sig, proof):
        raise BenchError("the relay failed to prove its key")


def _as_bytes(message: str | bytes) -> bytes:
    return message.encode() if isinstance(message, str) else message


async def publish_range(
    ws: ClientConnection, agent: Agent, start: int, stop: int, window: int, *, timed: bool
) -> None:
    """Publish frames ``start..stop-1`` with ``window`` outstanding; wait for every ack.

    Like the SDK's writer, whatever is ready to go when the socket is free goes as one
    bundle (protocol §1): here, every frame the window has room for.
    """
    sent_at = [0] * (stop - start)
    outstanding = 0
    room = trio.Event()

    async def receive_acks() -> None:
        nonlocal outstanding, room
        answered = 0
        while answered < stop - start:
            message = msgpack.unpackb(await ws.recv(), raw=False)
            received = time.perf_counter_ns()
            for answer in message if isinstance(message, list) else [message]:
                # Acks are checked lightly (type, rid, receipt id) to keep the generator cheap.
                if answer.get("t") != "ack":
                    reason = f"{answer.get('name')}: {answer.get('reason')}"
                    raise BenchError(f"publish refused: {reason}")
                rid = answer["rid"]
                if not start <= rid < stop or not sent_at[rid - start]:
                    raise BenchError(f"ack for rid {rid}, which is not outstanding")
                if msgpack.unpackb(answer["receipt"])["id"] != agent.events[rid].id:
                    raise BenchError(f"ack for rid {rid} names another event")
                if timed:
                    agent.latencies_ns.append(received - sent_at[rid - start])
                sent_at[rid - start] = 0  # answered
                answered += 1
                outstanding -= 1
            room.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive_acks)
        rid = start
        while rid < stop:
            if outstanding >= window:
                room = trio.Event()
                await room.wait()
            take = min(window - outstanding, stop - rid)
            now = time.perf_counter_ns()
            for i in range(rid, rid + take):
                sent_at[i - start] = now
            outstanding += take
            await ws.send(f.bundle(agent.frames[rid : rid + take]))
            rid += take


@dataclass(frozen=True)
class Snapshot:
    """A moment of the run: wall clock, and CPU used so far by the relay and by us."""

    ns: int
    relay_cpu: float | None
    relay_main_cpu: float | None
    own_cpu: float

    @classmethod
    def take(cls, relay_pid: int) -> Snapshot:
        return cls(
            ns=time.perf_counter_ns(),
            relay_cpu=tree_cpu(relay_pid),  # its signature-checking process too
            relay_main_cpu=cpu_seconds(relay_pid, relay_pid),
            own_cpu=time.process_time(),
        )


async def run_load(
    url: str, workload: list[Agent], window: int, relay_pid: int
) -> tuple[Snapshot, Snapshot]:
    """Connect every agent, warm up, then publish the timed events.

    Returns snapshots taken when the timed phase starts (every agent warmed up) and
    when its last ack arrived.
    """
    started: list[Snapshot] = []
    all_warm = trio.Event()
    last_ack_ns = 0

    async def run_agent(agent: Agent) -> None:
        nonlocal last_ack_ns
        async with connect(url, compression=None, proxy=None, open_timeout=10) as ws:
            await authenticate(ws, agent.identity)
            await publish_range(ws, agent, 0, agent.warmup, window, timed=False)
            started.append(Snapshot.take(relay_pid))
            if len(started) == len(workload):
                all_warm.set()
            await all_warm.wait()
            await publish_range(ws, agent, agent.warmup, len(agent.frames), window, timed=True)
            last_ack_ns = max(last_ack_ns, time.perf_counter_ns())

    async with trio.open_nursery() as nursery:
        for agent in workload:
            nursery.start_soon(run_agent, agent)
    end = Snapshot.take(relay_pid)
    return started[-1], dataclasses.replace(end, ns=last_ack_ns)


# --------------------------------------------------------------------------- report


def percentile(ordered: Sequence[int], q: float) -> float:
    """Nearest-rank percentile of sorted nanosecond values, in milliseconds."""
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return round(ordered[index] / 1e6, 3)


@dataclass
class Measurement:
    workload: list[Agent]
    presign_seconds: float
    verify_before: float
    verify_after: float
    verify_raw: float
    verify_sodium: float | None
    """libsodium's rate on the same samples (None without PyNaCl)."""
    start: Snapshot
    end: Snapshot
    info: dict[str, Any]


def measure(args: argparse.Namespace) -> Measurement:
    """Start the relay, sign, measure verify, ingest, measure verify again; stop the relay."""
    with tempfile.TemporaryDirectory(prefix="formicary-bench-") as tmp:
        data = Path(tmp)
        profile = Path(args.relay_profile).resolve() if args.relay_profile else None
        extra = ["--store", args.store] if args.store else []
        with relay_process(data, profile, extra) as relay:
            log(f"relay pid {relay.process.pid} on {relay.url}; pre-signing {args.events} events")
            began = time.perf_counter()
            workload = build_workload(
                agents=args.agents,
                events=args.events,
                warmup=args.warmup,
                namespaces=args.namespaces or args.agents,
                body_size=args.body_size,
                seed=args.seed,
            )
            presign = time.perf_counter() - began
            relay.wait_ready(READY_TIMEOUT)
            # Interleave the agents so that the samples use many keys, as the relay does.
            samples = [e for row in zip(*(a.events for a in workload), strict=False) for e in row]
            samples = samples[:VERIFY_SAMPLES] or workload[0].events
            log(f"signed in {presign:.1f}s; measuring verify for {args.verify_seconds}s")
            verify_before = verify_rate(samples, args.verify_seconds)
            sodium_before = sodium_verify_rate(samples, args.verify_seconds)
            log(f"verify before: {verify_before:,.0f}/s; ingest starts")

            async def bounded_load() -> tuple[Snapshot, Snapshot]:
                with trio.fail_after(args.timeout):
                    return await run_load(relay.url, workload, args.window, relay.process.pid)

            try:
                start, end = trio.run(bounded_load)
            except BaseException as exc:
                exc.add_note(f"relay exit status {relay.process.poll()}; log tail:\n{relay.tail()}")
                raise
            seconds = (end.ns - start.ns) / 1e9
            log(f"ingest: {args.events} events in {seconds:.2f}s = {args.events / seconds:,.0f}/s")
            verify_after = verify_rate(samples, args.verify_seconds)
            sodium_after = sodium_verify_rate(samples, args.verify_seconds)
            verify_raw = raw_verify_rate(samples, args.verify_seconds / 2)
            sodium = (
                None if sodium_before is None or sodium_after is None
                else (sodium_before + sodium_after) / 2
            )  # fmt: skip
            log(f"verify after: {verify_after:,.0f}/s")
            info = relay.info()
    return Measurement(
        workload, presign, verify_before, verify_after, verify_raw, sodium, start, end, info
    )


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def report(args: argparse.Namespace, m: Measurement) -> dict[str, Any]:
    """The JSON object the benchmark prints."""
    latencies = sorted(ns for agent in m.workload for ns in agent.latencies_ns)
    if len(latencies) != args.events:
        raise BenchError(f"{len(latencies)} acks for {args.events} events")
    seconds = (m.end.ns - m.start.ns) / 1e9
    rate = args.events / seconds
    verify = (m.verify_before + m.verify_after) / 2
    ratio = rate / verify
    stats = m.info.get("stats", {})
    batches = stats.get("batches") or 0
    # CPU the relay used during the timed phase: its whole process tree, and its main
    # thread (the trio event loop); the rest is the signature-checking process (which
    # checks bundled publishes: relay/signatures.py), SQLite and other worker threads.
    relay_cpu = _delta(m.start.relay_cpu, m.end.relay_cpu)
    main_cpu = _delta(m.start.relay_main_cpu, m.end.relay_main_cpu)
    main_us = None if main_cpu is None else main_cpu / args.events * 1e6
    return {
        "bench": "ingest",
        "events": args.events,
        "agents": args.agents,
        "window": args.window,
        "namespaces": args.namespaces or args.agents,
        "body_size": args.body_size,
        "event_bytes": len(m.workload[0].events[-1].raw),
        "warmup": args.warmup,
        "seed": args.seed,
        "seconds": round(seconds, 3),
        "ingest_events_per_s": round(rate, 1),
        "publish_latency_ms": {
            "p50": percentile(latencies, 50),
            "p90": percentile(latencies, 90),
            "p99": percentile(latencies, 99),
            "max": percentile(latencies, 100),
        },
        "verify_per_s": round(verify, 1),
        "verify_per_s_before": round(m.verify_before, 1),
        "verify_per_s_after": round(m.verify_after, 1),
        "verify_raw_per_s": round(m.verify_raw, 1),
        "ingest_over_verify": round(ratio, 3),
        "libsodium_verify_per_s": _round(m.verify_sodium, 1),
        "ingest_over_libsodium_verify": _round(
            None if not m.verify_sodium else rate / m.verify_sodium, 3
        ),
        # Issue 12's target: ingest at least libsodium's single-core verify rate.
        "meets_libsodium_target": None if not m.verify_sodium else rate >= m.verify_sodium,
        "target_min": TARGET_MIN,
        "goal": GOAL,
        "meets_target": ratio >= TARGET_MIN,
        "relay_stats": stats,  # counts include the warm-up events
        "events_per_batch": round(stats.get("published", 0) / batches, 1) if batches else None,
        "relay_cpu_seconds": _round(relay_cpu, 3),
        "relay_main_thread_cpu_seconds": _round(main_cpu, 3),
        "relay_main_thread_busy": _round(None if main_cpu is None else main_cpu / seconds, 3),
        "relay_main_thread_us_per_event": _round(main_us, 1),
        "verify_us_per_event": round(1e6 / verify, 1),
        # What the relay spends per event beyond the signature check, wherever the
        # check runs: the target.
        "relay_overhead_us_per_event": _round(
            None if relay_cpu is None else relay_cpu / args.events * 1e6 - 1e6 / verify, 1
        ),
        "generator_cpu_seconds": round(m.end.own_cpu - m.start.own_cpu, 3),
        "presign_seconds": round(m.presign_seconds, 3),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


def describe(exc: BaseException) -> str:
    """One line per distinct failure, looking inside exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(sorted({describe(inner) for inner in exc.exceptions}))
    return f"{type(exc).__name__}: {exc}"


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=positive, default=8, help="identities, one socket each")
    parser.add_argument("--events", type=positive, default=40_000, help="timed events in total")
    parser.add_argument("--window", type=positive, default=64, help="outstanding per agent")
    parser.add_argument("--body-size", type=non_negative, default=100, help="body padding, bytes")
    parser.add_argument(
        "--namespaces",
        type=positive,
        default=None,
        help="spread events over bench0..N-1@local (default: one namespace per agent)",
    )
    parser.add_argument("--warmup", type=non_negative, default=1000, help="untimed events first")
    parser.add_argument("--seed", type=int, default=1, help="seeds identities and bodies")
    parser.add_argument("--verify-seconds", type=float, default=2.0, help="each verify measurement")
    parser.add_argument("--timeout", type=float, default=300.0, help="ingest phase limit, s")
    parser.add_argument(
        "--relay-profile", help="run the relay under cProfile (bench/profile_relay.py) to here"
    )
    parser.add_argument(
        "--check", action="store_true", help=f"exit 1 when the ratio is below {TARGET_MIN}"
    )
    parser.add_argument("--store", default="", help="a PostgreSQL DSN for the relay's logs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = report(args, measure(args))
    except Exception as exc:  # any failure: say why on stderr, exit 1 (the relay is stopped)
        if not isinstance(exc, BenchError):
            traceback.print_exc()
        log(f"failed: {describe(exc)}")
        return 1
    print(json.dumps(result), flush=True)
    if args.check and not result["meets_target"]:
        log(f"ingest_over_verify {result['ingest_over_verify']} is below {TARGET_MIN}")
        return 1
    return 0


@contextmanager
def two_relays(tmp: Path) -> Iterator[dict[str, RelayProcess]]:
    """Relays ``a`` and ``b``, each listing the other as a peer."""
    names = ("a", "b")
    ports = {name: free_port() for name in names}
    keys = {name: relay_key(tmp / name) for name in names}
    relays: dict[str, RelayProcess] = {}
    try:
        for name in names:
            (other,) = (n for n in names if n != name)
            peer = f"{other}=ws://127.0.0.1:{ports[other]}#{keys[other]}"
            argv = ["relay", "serve", "--host", "127.0.0.1", "--port", str(ports[name])]
            argv += ["--data", str(tmp / name), "--name", name, "--peer", peer, *unlimited(tmp)]
            log_path = tmp / f"{name}.log"
            with log_path.open("wb") as relay_log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "agent_sdk.cli", *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=relay_log,
                    stderr=subprocess.STDOUT,
                    cwd=tmp,  # not this folder: its federation.py would shadow the package
                )
            relays[name] = RelayProcess(process, ports[name], log_path)
        for relay in relays.values():
            relay.wait_ready(READY_TIMEOUT)
        wait_linked(relays)
        yield relays
    finally:
        for relay in relays.values():
            relay.stop()


def wait_linked(relays: dict[str, RelayProcess]) -> None:
    """Poll ``/info`` until both links are up (a bench set-up step, bounded)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        states = [peer["up"] for r in relays.values() for peer in r.info()["federation"]["peers"]]
        if all(states):
            return
        if time.monotonic() > deadline:
            raise BenchError("the relays did not link up")
        time.sleep(0.05)


def relay_key(data: Path) -> str:
    """The key of the relay with data directory ``data`` (made now if it has none), as
    an operator gets it for ``--peer``: ``formicary relay key``."""
    command = [sys.executable, "-m", "agent_sdk.cli", "relay", "key", "--data", str(data)]
    # Run from the data's parent, not this folder: its federation.py would shadow the package.
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=data.parent)
    return done.stdout.strip()


VERIFY_WORKERS = os.environ.get("FORMICARY_BENCH_VERIFY_WORKERS", "")
"""``limits.verify_workers`` for every benchmark's relay when set: one knob to compare
checking signatures on the loop (0) and in checking processes."""


def unlimited(where: Path) -> list[str]:
    """Flags for a relay without rate limits or connection caps: a benchmark measures
    what the relay can do, and its load generator is one key per agent at full speed
    (bench/flood.py measures the limits themselves)."""
    settings = where / "unlimited.toml"
    text = as_toml(UNLIMITED)
    if VERIFY_WORKERS:
        text += f"verify_workers = {int(VERIFY_WORKERS)}\n"
    settings.write_text(text)
    return ["--config", str(settings)]


if __name__ == "__main__":
    sys.exit(main())
