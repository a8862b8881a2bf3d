"""Event signatures checked on another core, a run of publishes at a time.

One Ed25519 check per event is the relay's largest single cost (bench/ingest.py
reports it), and it needs no shared state. With ``workers`` above 0 the relay keeps
that many checking processes (relay/verifier.py) and sends them runs of publishes
over pipes, while its event loop serves everyone else. Processes, not threads:
with a worker thread ingest got about 11 % *slower* (bench/ingest.py, CPython 3.11,
2 cores), because each check returns to Python between libsodium calls, so the
worker and the loop hand the GIL to each other twice per event; a process shares no
GIL. A pipe round trip costs about one check, so a lone event is checked on the
loop: only a run of ``min_batch`` or more publishes from one message goes out, and
the processes start with the first such run (a relay that never sees one never
starts them). Checks never reorder anything: a connection waits for its run's
verdicts before it acts on those frames, in their order (relay/server.py).

A checking process that dies (or is killed) loses nothing: the runs it had not
answered are checked on the loop, and another process takes its place.

Under a virtual clock (``trio.testing.MockClock``: the virtual-time simulations and
tests) every check stays on the loop: an autojumping clock moves on while a task
waits for another process, so a lease or a rate limit could expire mid-check and a
seeded run would stop being reproducible.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections import deque
from collections.abc import Sequence

import trio
import trio.testing

from agent_sdk.wire import KEY_SIZE, SIG_SIZE, SignedEvent
from relay.verifier import HEADER

MIN_BATCH = 2
RESTART_DELAY = 1.0
"""Seconds before a checking process that died is replaced (a crash loop must not spin)."""

log = logging.getLogger("formicary.relay")


def verify_all(events: Sequence[SignedEvent]) -> list[bool]:
    """Each event's signature verdict, in order, checked on the loop."""
    return [event.verify() for event in events]


def _virtual_time() -> bool:
    return isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)


class _Run:
    """A run of checks sent to a process; ``verdicts`` stays None if it died first."""

    __slots__ = ("count", "done", "verdicts")

    def __init__(self, count: int) -> None:
        self.count = count
        self.done = trio.Event()
        self.verdicts: bytes | None = None


class _Worker:
    """One checking process and the runs it owes verdicts for, oldest first."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.owed: deque[_Run] = deque()
        self.sending = trio.Lock()

    def give_up(self) -> None:
        """Release every waiter: their runs are checked on the loop instead."""
        while self.owed:
            self.owed.popleft().done.set()


class SignatureChecker:
    def __init__(
        self, workers: int = 0, min_batch: int = MIN_BATCH, restart_delay: float = RESTART_DELAY
    ) -> None:
        if workers < 0:
            raise ValueError("verify_workers must be 0 or more")
        self.workers = workers
        self.min_batch = min_batch
        self.restart_delay = restart_delay
        self.running: list[_Worker] = []
        """The checking processes up now."""
        self._wanted = trio.Event()  # set by the first run worth sending out
        self._changed = trio.Event()  # set (and replaced) as processes come and go
        self.offloaded = 0
        """Events a checking process gave the verdict on (the rest: on the loop)."""
        self.rechecked = 0
        """Events re-checked on the loop because their process died first."""

    async def run(self) -> None:
        """Keep ``workers`` checking processes once one is wanted, until cancelled."""
        if not self.workers or _virtual_time():
            return
        await self._wanted.wait()
        async with trio.open_nursery() as nursery:
            for _ in range(self.workers):
                nursery.start_soon(self._keep_one)

    async def started(self) -> None:
        """Start the processes now (not at the first run) and return once all are up."""
        self._wanted.set()
        while len(self.running) < self.workers:
            await self._changed.wait()

    def _note_change(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _keep_one(self) -> None:
        while True:
            try:
                process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "relay.verifier"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            except OSError as exc:  # out of file descriptors, memory, processes...
                log.warning("cannot start a signature-checking process: %s", exc)
                await trio.sleep(max(self.restart_delay, 0.1))  # the loop checks meanwhile
                continue
            worker = _Worker(process)
            self.running.append(worker)
            self._note_change()
            try:
                await self._read_verdicts(worker)
            finally:
                self.running.remove(worker)
                self._note_change()
                worker.give_up()
                with trio.CancelScope(shield=True):
                    process.kill()
                    await process.wait()
            log.warning(
                "a signature-checking process ended (exit status %s); starting another",
                process.returncode,
            )
            await trio.sleep(self.restart_delay)

    async def _read_verdicts(self, worker: _Worker) -> None:
        stdout = worker.process.stdout
        assert stdout is not None
        buffer = bytearray()
        while True:
            try:
                data = await stdout.receive_some()
            except trio.BrokenResourceError:
                return
            if not data:
                return  # it exited
            buffer += data
            while worker.owed and len(buffer) >= worker.owed[0].count:
                run = worker.owed.popleft()
                run.verdicts = bytes(buffer[: run.count])
                del buffer[: run.count]
                run.done.set()

    async def check(self, events: Sequence[SignedEvent]) -> list[bool]:
        """Whether each event's author signed it, in order."""
        if len(events) < self.min_batch or not self.workers or _virtual_time():
            return verify_all(events)
        if not self.running:
            self._wanted.set()  # the processes start; until they are up, the loop checks
            return verify_all(events)
        if any(len(s.sig) != SIG_SIZE or len(s.event.author) != KEY_SIZE for s in events):
            return verify_all(events)  # (the session refuses these first: never seen here)
        request = bytearray(len(events).to_bytes(HEADER, "big"))
        for signed in events:
            request += signed.event.author
            request += signed.sig
            request += signed.id
        worker = min(self.running, key=lambda w: len(w.owed))
        run = _Run(len(events))
        worker.owed.append(run)
        stdin = worker.process.stdin
        assert stdin is not None
        try:
            # A half-written request would garble every later one: finish it.
            with trio.CancelScope(shield=True):
                async with worker.sending:
                    await stdin.send_all(request)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # it died: its reader gives its runs back
        await run.done.wait()
        if run.verdicts is None:
            self.rechecked += len(events)
            return verify_all(events)
        self.offloaded += len(events)
        return [verdict == 1 for verdict in run.verdicts]
