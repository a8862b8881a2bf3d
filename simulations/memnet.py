"""An in-memory network for virtual-time simulations: relays listen, agents dial.

The streams are trio's in-memory stream pairs, so the relay and the SDK run
unchanged — the same WebSocket handshake and frames as over TCP — but no byte
touches a socket and no thread is involved. Under trio's ``MockClock`` with
autojump, time only moves when every task waits: a run's duration costs nothing,
and with the scheduler seeded (:func:`seed_scheduler`) the same run happens again.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import socket
from typing import Any

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

    async def dial(
        self, delay_ms: int = 0, loss: float = 0.0, rng: random.Random | None = None
    ) -> trio.abc.Stream:
        """A new connection; with ``delay_ms``, every message takes that long each way;
        with ``loss``, each message is lost with that chance, and the connection with it
        (see :class:`Wire`), drawn from ``rng``."""
        ours: trio.abc.Stream
        theirs: trio.abc.Stream
        ours, theirs = trio.testing.memory_stream_pair()
        if delay_ms or loss:
            line = Line(loss, rng or random.Random(0))
            ours, theirs = Wire(ours, delay_ms, line), Wire(theirs, delay_ms, line)
        self._tx.send_nowait(theirs)
        await trio.lowlevel.checkpoint()
        return ours


class Line:
    """What both ends of one connection share: its loss rate and whether a loss cut it."""

    def __init__(self, loss: float, rng: random.Random) -> None:
        self.loss = loss
        self.rng = rng
        self.cut = False


class Wire(trio.abc.Stream):
    """One end of a connection with latency and loss.

    Bytes arrive ``delay_ms`` after they are sent, in order (each direction has its
    own queue and carrier task). A message (one ``send_all``: the WebSocket writes a
    frame at a time) is lost with the line's ``loss`` chance. The stream is reliable
    like TCP, so a loss is not a gap the reader could skip: the connection breaks, as
    a TCP connection does when retransmission gives up. Both ends then read end of
    file and cannot send; the sender is not told about the message it lost.
    """

    def __init__(self, inner: trio.abc.Stream, delay_ms: int, line: Line) -> None:
        self.inner = inner
        self.delay = delay_ms / 1000
        self.line = line
        self._tx, self._rx = trio.open_memory_channel[tuple[float, bytes]](math.inf)
        self._carrier: trio.lowlevel.Task | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.line.cut:
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError("connection lost (--faults loss)")
        if self.line.loss and self.line.rng.random() < self.line.loss:
            self.line.cut = True
            self._tx.close()  # nothing more leaves this end: the peer reads end of file
            await self.inner.aclose()
            return
        if not self.delay:
            await self.inner.send_all(data)
            return
        if self._carrier is None:
            self._carrier = trio.lowlevel.spawn_system_task(self._carry)
        self._tx.send_nowait((trio.current_time() + self.delay, bytes(data)))
        await trio.lowlevel.checkpoint()

    async def _carry(self) -> None:
        try:
            async for due, data in self._rx:
                await trio.sleep_until(due)
                await self.inner.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            return await self.inner.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if self.line.cut:
                return b""  # the loss closed our own end under this read
            raise

    async def aclose(self) -> None:
        self._tx.close()
        await self.inner.aclose()


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
    # pytest-trio (and Hypothesis) turn on trio's other order: each batch sorted by
    # task creation, then shuffled. Without it here, a seed gave one log under the
    # test suite and another from `formicary sim run`.
    _run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    # Timers that fall due at one time expire in the order of their cancel scopes'
    # memory addresses (the heap's tie-break is id()): tasks sleeping until the same
    # virtual time (messages on two wires, agents on one cadence) woke in an order
    # that changed from run to run. Registration order is the same in every run.
    registered = itertools.count()

    def add(self: Any, deadline: float, cancel_scope: trio.CancelScope) -> None:
        heapq.heappush(self._heap, (deadline, next(registered), cancel_scope))
        self._active += 1

    _run.Deadlines.add = add  # type: ignore[method-assign]
