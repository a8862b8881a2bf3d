"""Event signatures checked off the event loop, a run of publishes at a time.

One Ed25519 check per event is the relay's largest single cost (bench/ingest.py
reports it), and it needs no shared state: libsodium releases the GIL while it
checks, so a worker thread can check one connection's run of publishes while the
event loop serves the others. A thread hop costs about as much as one check, so a
lone event is always checked on the loop; only a run of ``min_batch`` or more
publishes from one message goes to a worker. ``workers`` bounds the threads (0:
every check on the loop). Checks never reorder anything: a connection waits for its
run's verdicts before it acts on those frames, in their order (relay/server.py).

Measured (bench/ingest.py, CPython 3.11, 2 cores), one worker made ingest about 11 %
slower, not faster: each check returns to Python between two libsodium calls, so the
worker and the loop take turns holding the GIL and hand it over twice per event.
Hence ``limits.verify_workers`` defaults to 0, kept as a knob to measure again on
other machines and on free-threaded Python. Several relay processes, each the home of a
group of namespaces, use more cores today (docs/operations.md, "Sharding namespaces
over cores").

Under a virtual clock (``trio.testing.MockClock``: the virtual-time simulations and
tests) every check stays on the loop: an autojumping clock moves on while a task
waits for a thread, so a lease or a rate limit could expire mid-check and a seeded
run would stop being reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio
import trio.testing

from agent_sdk.wire import SignedEvent

MIN_BATCH = 2


def verify_all(events: Sequence[SignedEvent]) -> list[bool]:
    """Each event's signature verdict, in order (runs on a worker thread)."""
    return [event.verify() for event in events]


class SignatureChecker:
    def __init__(self, workers: int = 0, min_batch: int = MIN_BATCH) -> None:
        if workers < 0:
            raise ValueError("verify_workers must be 0 or more")
        self.workers = workers
        self.min_batch = min_batch
        self._limiter = trio.CapacityLimiter(workers) if workers else None
        self.offloaded = 0
        """Events checked on a worker thread so far (the rest were checked inline)."""

    async def check(self, events: Sequence[SignedEvent]) -> list[bool]:
        """Whether each event's author signed it, in order."""
        if (
            self._limiter is None
            or len(events) < self.min_batch
            or isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)
        ):
            return verify_all(events)
        self.offloaded += len(events)
        return await trio.to_thread.run_sync(verify_all, events, limiter=self._limiter)
