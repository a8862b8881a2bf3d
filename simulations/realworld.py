"""Real mode: a relay process on loopback, agents over real WebSockets.

The same scenario code as virtual time (:mod:`simulations.world`), with the relay as
``formicary relay serve`` in a child process on embedded SQLite storage and real
time: what a run measures includes the real costs — sockets, the kernel, fsync.
Agents run as trio tasks in this process. A federated run starts one such process
per relay, each given the others as ``--peer``s (port and key fixed before any of
them starts). Not deterministic: the same seed gives the same workload, not the
same interleaving.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from agent_sdk.client import Delivery, RelayClient
from agent_sdk.identity import Identity, load_or_create
from relay.app import KEY_FILE, STORE_FILE
from relay.limits import as_toml
from relay.node import RelayConfig
from relay.store import Store
from relay.store.sqlite import SQLiteStore
from simulations.model import Meter, Settings, merge_states
from simulations.ports import free_port

if TYPE_CHECKING:
    from simulations.scenarios.work_queue import Progress

STARTUP_TIMEOUT = 30.0


@dataclass
class RealRelay:
    """A relay process; its store is read (read-only) once the run is over."""

    process: trio.Process
    url: str
    data: Path
    command: list[str]
    log: Path
    _store: SQLiteStore | None = None
    kills: int = 0
    cpu_by_process: list[float] = field(default_factory=list)
    """User + system CPU (Linux) of each process that ran this relay, read as it stops
    or just before it is killed: a restarted relay's figure counts them all."""
    peak_rss_mb: float | None = None

    @property
    def cpu_seconds(self) -> float | None:
        return round(sum(self.cpu_by_process), 3) if self.cpu_by_process else None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = SQLiteStore(self.data / STORE_FILE, readonly=True)
        return self._store

    def _read_usage(self) -> None:
        try:
            with open(f"/proc/{self.process.pid}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
            ticks = os.sysconf("SC_CLK_TCK")
            self.cpu_by_process.append((int(fields[11]) + int(fields[12])) / ticks)
            with open(f"/proc/{self.process.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        peak = round(int(line.split()[1]) / 1024, 1)
                        self.peak_rss_mb = max(self.peak_rss_mb or 0.0, peak)
        except (OSError, ValueError, IndexError):
            pass  # not Linux, or already gone: the figures stay unknown

    async def stop(self) -> None:
        if self.process.returncode is None:
            self._read_usage()
            self.process.terminate()
            with trio.move_on_after(10):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()


@dataclass
class RealWorld:
    """Relay processes under ``root``; agents connect over loopback TCP."""

    seed: int
    root: Path
    relays: dict[str, RealRelay] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    """Relays this process did not start (a worker's view of its parent's relay)."""
    workers: int = 1
    """Processes the agents are spread over (``--workers``); 1 runs them here."""
    meter: Meter = field(default_factory=Meter)
    """How far the run is (the CLI's progress bar)."""
    ports: dict[str, int] = field(default_factory=dict)
    """Relay name -> its loopback port (:meth:`port_of`)."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def rng(self, purpose: str) -> random.Random:
        return random.Random(f"{self.seed}/{purpose}")

    async def start_relay(
        self, nursery: trio.Nursery, config: RelayConfig, peers: tuple[str, ...] = ()
    ) -> RealRelay:
        """Start relay ``config.name``; with ``peers``, federated with those relays
        (each listed as a direct peer at its port, its key pinned)."""
        data = self.root / config.name
        claim = config.claim_ttl
        command = [
            sys.executable, "-m", "agent_sdk.cli", "relay", "serve",
            "--host", "127.0.0.1", "--port", str(self.port_of(config.name)), "--data", str(data),
            "--name", config.name, "--claim-ttl", f"{claim.default_ms}ms",
            "--lease-min", f"{claim.min_ms}ms", "--lease-max", f"{claim.max_ms}ms",
        ]  # fmt: skip
        for peer in peers:
            url = f"ws://127.0.0.1:{self.port_of(peer)}"
            command += ["--peer", f"{peer}={url}#{self.relay_key(peer)}"]
        settings = self.root / f"{config.name}.toml"  # what flags do not set
        settings.write_text(as_toml(config.rate_limits))
        command += ["--config", str(settings)]
        log = self.root / f"{config.name}.log"
        process, url = await _spawn(command, log)
        relay = self.relays[config.name] = RealRelay(process, url, data, command, log)
        nursery.start_soon(_stop_on_cancel, relay)
        return relay

    def port_of(self, name: str) -> int:
        """Relay ``name``'s port, fixed on first use: its peers are told it before it
        starts, and a restarted relay comes back on it."""
        if name not in self.ports:
            self.ports[name] = free_port()
        return self.ports[name]

    def relay_key(self, name: str) -> str:
        """Relay ``name``'s public key (hex), made in its data directory on first use
        (as ``formicary relay key`` does): its peers pin it before it starts."""
        return load_or_create(self.root / name / KEY_FILE).public_key.hex()

    async def info(self, name: str) -> dict[str, Any]:
        """What relay ``name`` serves at ``GET /info``."""
        url = f"http://127.0.0.1:{self.port_of(name)}/info"
        body = await trio.to_thread.run_sync(_http_get, url)
        document: dict[str, Any] = json.loads(body)
        return document

    async def federation_up(self, names: list[str]) -> None:
        """Return once every link of relays ``names`` to their peers is up."""
        with trio.fail_after(STARTUP_TIMEOUT):
            for name in names:
                while True:
                    peers = (await self.info(name))["federation"]["peers"]
                    if all(peer["up"] for peer in peers):
                        break
                    await trio.sleep(0.05)  # a child's state: polling is how to read it

    async def kill_and_restart(self, name: str) -> None:
        """SIGKILL the relay (no chance to flush or say goodbye), then start it again on
        the same data and port: what it acknowledged must all be there."""
        relay = self.relays[name]
        relay._read_usage()  # what the killed process spent counts too
        relay.process.kill()
        await relay.process.wait()
        relay.kills += 1
        relay.process, _ = await _spawn(relay.command, relay.log)

    @asynccontextmanager
    async def client(
        self, relay: str, identity: Identity, purpose: str, lossy: bool = False
    ) -> AsyncIterator[RelayClient]:
        """An agent's connection over loopback TCP (``lossy`` is for the in-memory
        network's ``--faults loss``; real sockets lose what they lose)."""
        url = self.relays[relay].url if relay in self.relays else self.urls[relay]
        async with RelayClient.connect(
            url,
            identity,
            rng=self.rng(f"nonce/{purpose}"),
            reconnect=False,
        ) as client:
            yield client

    def log_hash(self) -> str:
        digest = hashlib.blake2b(digest_size=32)
        for name in sorted(self.relays):
            store = self.relays[name].store
            for ns in store.namespaces():
                for record in store.scan(ns):  # as the virtual world's (world.py)
                    digest.update(record.receipt)
                    digest.update(record.event)
                    digest.update(record.sig)
        return digest.hexdigest()


async def run_agents(world: RealWorld, settings: Settings, progress: Progress) -> None:
    """Run ``work_queue``'s agents in ``world.workers`` processes; return once the
    relay's log holds a result for every order, the workers stopped and their counts
    are added to ``progress``."""
    from simulations.scenarios.common import NS, RELAY
    from simulations.worker import settings_to_json

    url = world.relays[RELAY].url
    share, extra = divmod(settings.agents, world.workers)
    slices, first = [], 0
    for w in range(world.workers):
        count = share + (1 if w < extra else 0)
        slices.append((first, count))
        first += count
    processes = []
    states: list[dict[int, dict[str, int]]] = []
    for first, count in slices:
        command = [
            sys.executable, "-m", "simulations.worker", "--url", url, "--first", str(first),
            "--count", str(count), "--settings", settings_to_json(settings),
        ]  # fmt: skip
        processes.append(
            await trio.lowlevel.open_process(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
            )
        )
    try:
        watcher = Identity.generate()
        async with (
            RelayClient.connect(url, watcher) as client,
            client.subscribe(NS, start=1, kinds=["app.result"]) as feed,
        ):
            async for item in feed:
                if isinstance(item, Delivery):  # (a second result finishes nothing)
                    progress.finish_one(f"{NS}/{item.event.event.body['wo']}")
                    if progress.finished.is_set():
                        break
    finally:
        with trio.CancelScope(shield=True):
            for process in processes:
                process.terminate()
            for process in processes:
                assert process.stdout is not None
                output = b""
                while chunk := await process.stdout.receive_some():
                    output += chunk
                await process.wait()
                if output.strip():
                    counts = json.loads(output.decode().strip().splitlines()[-1])
                    progress.crashes += counts["crashes"]
                    progress.wasted += counts["wasted"]
                    progress.resumed += counts["resumed"]
                    progress.disconnected += counts["disconnected"]
                    states.append({int(k): v for k, v in counts["states"].items()})
            progress.states.samples = merge_states(states)


async def _spawn(command: list[str], log: Path) -> tuple[trio.Process, str]:
    path = trio.Path(log)
    start = (await path.stat()).st_size if await path.exists() else 0
    with log.open("ab") as out:
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out
        )
    return process, await _listening(log, process, start)


async def _listening(log: Path, process: trio.Process, start: int = 0) -> str:
    """Wait for this run's "listening on" line in the relay's log."""
    with trio.fail_after(STARTUP_TIMEOUT):
        while True:
            text = (await trio.Path(log).read_bytes())[start:].decode(errors="replace")
            if " listening on " in text:
                line = next(x for x in text.splitlines() if " listening on " in x)
                return line.split(" listening on ", 1)[1].split(",", 1)[0]
            if process.poll() is not None:
                raise RuntimeError(f"relay exited {process.returncode}: {text[-2000:]}")
            await trio.sleep(0.05)  # a child's log file: polling is how to read it


def _http_get(url: str) -> bytes:
    # No proxies: an http_proxy in the environment must not see loopback traffic.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        body: bytes = response.read()
        return body


async def _stop_on_cancel(relay: RealRelay) -> None:
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await relay.stop()
