"""Where a simulation runs: relays and agents, in virtual time or for real.

A :class:`World` gives a scenario what it needs without saying how it runs:
``client(identity)`` connects an agent to a relay, ``now_ms()`` is the clock agents
and relays share, ``rng(name)`` a random stream of its own per named purpose (so
adding an agent does not shift every other agent's draws). :class:`VirtualWorld`
runs relays in this process over :mod:`simulations.memnet`, on the in-memory store,
under trio's autojump ``MockClock``: deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import trio

from agent_sdk.client import RelayClient
from agent_sdk.identity import Identity
from federation.network import Federation, FederationConfig
from federation.outbox import MemoryOutboxStore
from federation.peers import Peer
from relay.node import RelayConfig, RelayNode
from relay.server import info_document, serve_relay
from relay.store import Store
from relay.store.memory import MemoryStore
from simulations.memnet import MemoryListener
from simulations.model import Meter

if TYPE_CHECKING:
    from simulations.realworld import RealWorld

EPOCH_MS = 1_800_000_000_000
"""Virtual time 0 as wall-clock ms (a fixed date: timestamps repeat across runs)."""


def identity_of(seed: int, role: str, n: int) -> Identity:
    """A deterministic key per (run seed, role, number)."""
    material = hashlib.blake2b(f"{seed}/{role}/{n}".encode(), digest_size=32).digest()
    return Identity.from_seed(material)


class HostsLogs(Protocol):
    """A relay as a scenario's tally reads it: its store of homed logs."""

    @property
    def store(self) -> Store: ...


@dataclass
class VirtualRelay:
    node: RelayNode
    listener: MemoryListener
    store: MemoryStore


@dataclass
class VirtualWorld:
    """Relays in this process, agents over in-memory streams, virtual time."""

    seed: int
    relays: dict[str, VirtualRelay] = field(default_factory=dict)
    listeners: dict[str, MemoryListener] = field(default_factory=dict)
    delay_ms: int = 0
    """Latency of every message on the network, each way (``--faults delay``)."""
    loss: float = 0.0
    """Chance that a message on an agent's connection or a relay link is lost, and
    the connection with it (``--faults loss``; :class:`~simulations.memnet.Wire`)."""
    cut: set[frozenset[str]] = field(default_factory=set)
    links: dict[frozenset[str], list[trio.abc.Stream]] = field(default_factory=dict)
    meter: Meter = field(default_factory=Meter)
    """How far the run is (the CLI's progress bar)."""
    _losses: random.Random | None = None

    def now_ms(self) -> int:
        return EPOCH_MS + int(trio.current_time() * 1000)

    def rng(self, purpose: str) -> random.Random:
        return random.Random(f"{self.seed}/{purpose}")

    def relay_identity(self, name: str) -> Identity:
        return identity_of(self.seed, "relay", int.from_bytes(name.encode(), "big"))

    async def start_relay(
        self, nursery: trio.Nursery, config: RelayConfig, peers: tuple[str, ...] = ()
    ) -> VirtualRelay:
        """Start relay ``config.name``; with ``peers``, federated with those relays
        (each listed as a direct peer: links dial over the in-memory network)."""
        store = MemoryStore()
        identity = self.relay_identity(config.name)
        mirrors = MemoryStore() if peers else None
        node = RelayNode(identity, store, config, wall_ms=self.now_ms, mirror_store=mirrors)
        listener = self.listener(config.name)
        self.relays[config.name] = VirtualRelay(node, listener, store)
        await nursery.start(node.run)
        if peers:
            listed = tuple(
                Peer(name, self.relay_identity(name).public_key, url=f"ws://{name}.sim/")
                for name in peers
            )
            network = Federation(
                node,
                FederationConfig(listed),
                MemoryOutboxStore(),
                dialer=partial(self._dialer_of, config.name),
            )
            await nursery.start(network.run)
        await nursery.start(
            lambda task_status: serve_relay(node, listeners=[listener], task_status=task_status)
        )
        return self.relays[config.name]

    def listener(self, name: str) -> MemoryListener:
        """Where relay ``name`` listens (made on first use: a peer may dial a relay
        that has not started yet; the stream waits to be accepted)."""
        if name not in self.listeners:
            self.listeners[name] = MemoryListener(name)
        return self.listeners[name]

    def _dialer_of(self, me: str, peer: Peer) -> Callable[[], Awaitable[trio.abc.Stream]]:
        return self._dial_link(me, peer.name)

    def _dial_link(self, me: str, peer: str) -> Callable[[], Awaitable[trio.abc.Stream]]:
        """How relay ``me`` dials ``peer``: refused while they are partitioned."""
        pair = frozenset((me, peer))

        async def dial() -> trio.abc.Stream:
            if pair in self.cut:
                await trio.lowlevel.checkpoint()
                raise OSError(f"{me} cannot reach {peer}: partitioned")
            stream = await self._dial_wire(peer, lossy=True)
            self.links.setdefault(pair, []).append(stream)
            return stream

        return dial

    async def _dial_wire(self, name: str, lossy: bool) -> trio.abc.Stream:
        if self._losses is None:  # one stream of draws: dial order is deterministic
            self._losses = self.rng("loss")
        loss = self.loss if lossy else 0.0
        return await self.listener(name).dial(self.delay_ms, loss, self._losses)

    async def partition(self, a: str, b: str) -> None:
        """Cut every link between relays ``a`` and ``b`` and refuse new ones."""
        pair = frozenset((a, b))
        self.cut.add(pair)
        for stream in self.links.pop(pair, []):
            await stream.aclose()

    def heal(self, a: str, b: str) -> None:
        self.cut.discard(frozenset((a, b)))

    async def federation_up(self, names: list[str]) -> None:
        """Return once every link of relays ``names`` to their peers is up."""
        for name in names:
            federation = self.relays[name].node.federation
            assert federation is not None
            for link in federation.links.values():
                await link.wait_up()

    async def info(self, name: str) -> dict[str, Any]:
        """What relay ``name`` would serve at ``GET /info``."""
        await trio.lowlevel.checkpoint()
        return info_document(self.relays[name].node)

    @asynccontextmanager
    async def client(
        self, relay: str, identity: Identity, purpose: str, lossy: bool = False
    ) -> AsyncIterator[RelayClient]:
        """An agent's connection: its own nonce stream, the shared virtual clock.
        ``lossy`` connections suffer ``--faults loss``: agents that reconnect; the
        harness's own (planners, observers) do not."""
        async with RelayClient.connect(
            f"ws://{relay}.sim/",
            identity,
            dial=lambda: self._dial_wire(relay, lossy),
            clock_ms=self.now_ms,
            rng=self.rng(f"nonce/{purpose}"),
            reconnect=False,
        ) as client:
            yield client

    def log_hash(self) -> str:
        """BLAKE2b of every record of every relay, in namespace then seq order: two
        runs made the same log exactly when these are equal."""
        digest = hashlib.blake2b(digest_size=32)
        for name in sorted(self.relays):
            store = self.relays[name].store  # homed logs only: mirrors are copies
            for ns in store.namespaces():
                for record in store.scan(ns):
                    digest.update(record.receipt)
                    digest.update(record.event)
                    digest.update(record.sig)
        return digest.hexdigest()


World: TypeAlias = "VirtualWorld | RealWorld"
"""Where a scenario runs: in virtual time, or for real (:mod:`simulations.realworld`)."""
