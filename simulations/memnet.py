"""An in-memory network for virtual-time simulations: relays listen, agents dial.

The streams are trio's in-memory stream pairs, so the relay and the SDK run
unchanged — the same WebSocket handshake and frames as over TCP — but no byte
touches a socket and no thread is involved. Under trio's ``MockClock`` with
autojump, time only moves when every task waits: a run's duration costs nothing,
and with the scheduler seeded (:func:`seed_scheduler`) the same run happens again.
"""

from __future__ import annotations

import math
import random
import socket

import trio
import trio.testing


class _Name:
    """What the WebSocket server logs as the address it listens on."""

    family = socket.AF_UNIX

    def __init__(self, name: str) -> None:
        self.name = name

    def getsockname(self) -> str:
        return self.name


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """What a relay listens on: each :meth:`dial` hands it one end of a new pair."""

    def __init__(self, name: str = "memory") -> None:
        self._tx, self._rx = trio.open_memory_channel[trio.abc.Stream](math.inf)
        self.socket = _Name(name)

    async def accept(self) -> trio.abc.Stream:
        return await self._rx.receive()

    async def aclose(self) -> None:
        await self._rx.aclose()

    async def dial(self) -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        self._tx.send_nowait(theirs)
        await trio.lowlevel.checkpoint()
        return ours


def seed_scheduler(seed: int) -> None:
    """Make trio's run loop deterministic for this process's next runs.

    trio reverses each batch of runnable tasks at random (to shake out order bugs);
    that randomness comes from a module-level ``random.Random`` which its Hypothesis
    integration seeds the same way. Seeding it makes a run with the same inputs pick
    the same order every time: a virtual-time simulation repeats byte for byte.
    """
    from trio._core import _run  # private: there is no public switch for this

    generator: random.Random = _run._r
    generator.seed(seed)
