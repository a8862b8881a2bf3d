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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from agent_sdk.client import RelayClient
from agent_sdk.identity import Identity
from relay.node import RelayConfig, RelayNode
from relay.server import serve_relay
from relay.store.memory import MemoryStore
from simulations.memnet import MemoryListener

EPOCH_MS = 1_800_000_000_000
"""Virtual time 0 as wall-clock ms (a fixed date: timestamps repeat across runs)."""


def identity_of(seed: int, role: str, n: int) -> Identity:
    """A deterministic key per (run seed, role, number)."""
    material = hashlib.blake2b(f"{seed}/{role}/{n}".encode(), digest_size=32).digest()
    return Identity.from_seed(material)


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

    def now_ms(self) -> int:
        return EPOCH_MS + int(trio.current_time() * 1000)

    def rng(self, purpose: str) -> random.Random:
        return random.Random(f"{self.seed}/{purpose}")

    async def start_relay(self, nursery: trio.Nursery, config: RelayConfig) -> VirtualRelay:
        store = MemoryStore()
        identity = identity_of(self.seed, "relay", len(self.relays))
        node = RelayNode(identity, store, config, wall_ms=self.now_ms)
        listener = MemoryListener()
        await nursery.start(node.run)
        await nursery.start(
            lambda task_status: serve_relay(node, listeners=[listener], task_status=task_status)
        )
        relay = self.relays[config.name] = VirtualRelay(node, listener, store)
        return relay

    @asynccontextmanager
    async def client(
        self, relay: str, identity: Identity, purpose: str
    ) -> AsyncIterator[RelayClient]:
        """An agent's connection: its own nonce stream, the shared virtual clock."""
        listener = self.relays[relay].listener
        async with RelayClient.connect(
            f"ws://{relay}.sim/",
            identity,
            dial=listener.dial,
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
            store = self.relays[name].store
            for ns in store.namespaces():
                for record in store.scan(ns):
                    digest.update(record.receipt)
                    digest.update(record.event)
                    digest.update(record.sig)
        return digest.hexdigest()
