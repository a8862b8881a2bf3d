"""Writes on their way to another relay: in order, durable once promised, never twice.

Theory of operation
-------------------
Every event an agent publishes to a namespace homed elsewhere becomes an
:class:`Entry` of the outbox of the link it travels on. Entries leave in the order
they arrived, one link connection at a time. While the link is up an entry goes out
at once and lives only in memory: the agent's connection is still waiting for its
ack, and if this relay died the agent would re-publish the same bytes. When an entry
cannot go now — the link is down as it arrives, or the link drops before the home
answered — it is written to the outbox store *before* the agent is told ``queued``:
from that answer on, the relay has promised delivery, and a restart keeps it.

When the link comes back every unanswered entry is sent again, oldest first. Events
are idempotent by id at their home (same bytes, same receipt), so an entry that was
sequenced before the link dropped is answered ``duplicate`` with its original
receipt: resending never duplicates. A re-publish of an entry still waiting (an agent
that reconnected) joins the same entry. An entry older than the deadline is dropped
with ``home_unreachable``: the agent may publish the same bytes again later.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

import trio

from agent_sdk.client import PendingPublish, Published, RelayClient
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.wire import SignedEvent, decode_event

log = logging.getLogger("formicary.federation")

STORE_ERRORS = (OSError, sqlite3.Error)
"""A failing disk: logged, not the end of the relay (see Outbox._store, Outbox._drop)."""

MAX_IN_FLIGHT = 1024
"""Entries sent on a link and not yet answered: the link's window."""
FRAME_SLACK = 256
"""Bytes a publish frame adds to its event (signature, rid, keys)."""
RETRY_CODES = frozenset({ErrorCode.SHUTTING_DOWN, ErrorCode.RATE_LIMITED})
"""Answers that say "not now" (the home is stopping, or wants the link slower): the
entry is kept, stored, and sent again, not answered with them. (Not 5001: the client
files codes it does not know under it, and a newer home's refusal is an answer.)"""


class Entry:
    """One forwarded event. ``decided`` is set once it is sent, queued or answered;
    ``queued_now`` when it waits in an outbox (ours, or a relay's on the way)."""

    __slots__ = (
        "decided",
        "done",
        "error",
        "event",
        "n",
        "queued",
        "queued_now",
        "result",
        "since_ms",
        "stored",
    )

    def __init__(self, n: int, event: SignedEvent, since_ms: int, *, stored: bool = False) -> None:
        self.n = n
        self.event = event
        self.since_ms = since_ms
        self.stored = stored
        self.queued = stored
        self.decided = trio.Event()
        self.queued_now = trio.Event()
        self.done = trio.Event()
        self.result: Published | None = None
        self.error: ProtocolError | None = None
        if stored:  # restored at start: a re-publish is told it is queued
            self.decided.set()
            self.queued_now.set()

    def _queue(self) -> None:
        self.queued = True
        self.decided.set()
        self.queued_now.set()

    def _resolve(self, result: Published | None, error: ProtocolError | None) -> None:
        self.result, self.error = result, error
        self.decided.set()
        self.done.set()


class OutboxStore(Protocol):
    """Where promised entries wait: loaded at start, removed once answered."""

    blocking: bool

    def load(self) -> list[tuple[str, int, bytes, bytes, int]]:
        """Every stored entry as ``(link, n, event, sig, since_ms)``, by ``n``."""
        ...

    def put(self, link: str, entries: Sequence[tuple[int, bytes, bytes, int]]) -> None: ...

    def drop(self, link: str, ns: Iterable[int]) -> None: ...

    def load_receipts(self) -> list[tuple[str, int, bytes]]:
        """Every stored message receipt on its way, as ``(relay, n, receipt)``, by ``n``."""
        ...

    def put_receipts(self, rows: Sequence[tuple[str, int, bytes]]) -> None: ...

    def drop_receipts(self, relay: str, ns: Sequence[int]) -> None: ...


class MemoryOutboxStore:
    """For tests and virtual-time simulations: the same contract, without the disk."""

    blocking = False

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], tuple[bytes, bytes, int]] = {}
        self.receipts: dict[tuple[str, int], bytes] = {}

    def load(self) -> list[tuple[str, int, bytes, bytes, int]]:
        return [(link, n, *row) for (link, n), row in sorted(self.rows.items())]

    def put(self, link: str, entries: Sequence[tuple[int, bytes, bytes, int]]) -> None:
        for n, event, sig, since in entries:
            self.rows[(link, n)] = (event, sig, since)

    def drop(self, link: str, ns: Iterable[int]) -> None:
        for n in ns:
            self.rows.pop((link, n), None)

    def load_receipts(self) -> list[tuple[str, int, bytes]]:
        return sorted(((relay, n, r) for (relay, n), r in self.receipts.items()), key=_by_n)

    def put_receipts(self, rows: Sequence[tuple[str, int, bytes]]) -> None:
        for relay, n, receipt in rows:
            self.receipts[(relay, n)] = receipt

    def drop_receipts(self, relay: str, ns: Sequence[int]) -> None:
        for n in ns:
            self.receipts.pop((relay, n), None)


def _by_n(row: tuple[str, int, bytes]) -> int:
    return row[1]


class SQLiteOutboxStore:
    """The embedded outbox: one small SQLite file next to the relay's logs. Calls come
    from worker threads and may overlap; one lock makes each a whole transaction."""

    blocking = True

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (link TEXT NOT NULL, n INTEGER NOT NULL,"
            " event BLOB NOT NULL, sig BLOB NOT NULL, since_ms INTEGER NOT NULL,"
            " PRIMARY KEY (link, n)) WITHOUT ROWID"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS receipts (relay TEXT NOT NULL, n INTEGER NOT NULL,"
            " receipt BLOB NOT NULL, PRIMARY KEY (relay, n)) WITHOUT ROWID"
        )

    def load(self) -> list[tuple[str, int, bytes, bytes, int]]:
        with self._lock:
            query = "SELECT link, n, event, sig, since_ms FROM outbox ORDER BY n"
            return list(self._db.execute(query))

    def put(self, link: str, entries: Sequence[tuple[int, bytes, bytes, int]]) -> None:
        rows = [(link, *entry) for entry in entries]
        self._write("INSERT OR REPLACE INTO outbox VALUES (?, ?, ?, ?, ?)", rows)

    def drop(self, link: str, ns: Iterable[int]) -> None:
        rows = [(link, n) for n in ns]
        self._write("DELETE FROM outbox WHERE link = ? AND n = ?", rows)

    def load_receipts(self) -> list[tuple[str, int, bytes]]:
        with self._lock:
            return list(self._db.execute("SELECT relay, n, receipt FROM receipts ORDER BY n"))

    def put_receipts(self, rows: Sequence[tuple[str, int, bytes]]) -> None:
        self._write("INSERT OR REPLACE INTO receipts VALUES (?, ?, ?)", rows)

    def drop_receipts(self, relay: str, ns: Sequence[int]) -> None:
        self._write("DELETE FROM receipts WHERE relay = ? AND n = ?", [(relay, n) for n in ns])

    def _write(self, statement: str, rows: Sequence[tuple[object, ...]]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(statement, rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Outbox:
    """The ordered entries of one link (see the module docstring)."""

    def __init__(
        self,
        link: str,
        store: OutboxStore,
        *,
        deadline_ms: int,
        wall_ms: Callable[[], int],
        on_answer: Callable[[Entry], None] = lambda entry: None,
        check: Callable[[Entry], str | None] = lambda entry: None,
        first_n: int = 1,
    ) -> None:
        self.link = link
        self.store = store
        self.deadline_ms = deadline_ms
        self.wall_ms = wall_ms
        self.on_answer = on_answer
        self.check = check
        self.entries: dict[bytes, Entry] = {}  # by event id, in arrival order
        self._next_n = first_n
        self._unsent: list[Entry] = []  # of the current link connection, in order
        self._more = trio.Event()
        self.up = False
        self.delivered = 0
        self.expired = 0

    def restore(self, n: int, raw: bytes, sig: bytes, since_ms: int) -> None:
        """An entry the store kept across a restart (a promise still to keep)."""
        event = decode_event(raw, sig)
        self.entries[event.id] = Entry(n, event, since_ms, stored=True)
        self._next_n = max(self._next_n, n + 1)

    @property
    def stored(self) -> int:
        return sum(1 for entry in self.entries.values() if entry.stored)

    async def submit(self, event: SignedEvent) -> Entry:
        """Take an event for the link's far side; store it first if it cannot go now."""
        entry = self.entries.get(event.id)
        if entry is not None:
            return entry  # a re-publish: it waits for the same answer
        entry = Entry(self._next_n, event, self.wall_ms())
        self._next_n += 1
        self.entries[event.id] = entry
        if self.up:
            self._unsent.append(entry)
            self._more.set()
        else:
            # Shielded: the entry is in ``entries`` already, and a re-publish joins it.
            # A caller cancelled before its write began (its connection closing) left
            # it neither stored nor decided: the re-publish was never told ``queued``,
            # and every answer behind it on its connection waited for the link or the
            # deadline. The write is one store call, as the link's own are.
            with trio.CancelScope(shield=True):
                await self._store([entry])
        return entry

    async def _store(self, entries: list[Entry]) -> None:
        fresh = [entry for entry in entries if not entry.stored and not entry.done.is_set()]
        if fresh:
            rows = [(e.n, e.event.raw, e.event.sig, e.since_ms) for e in fresh]
            try:
                await store_call(self.store, self.store.put, self.link, rows)
            except STORE_ERRORS as exc:
                # No promise made (no `queued`): they wait in memory, answered by
                # the home when it is reached, or HOME_UNREACHABLE at the deadline.
                log.error("outbox %s: cannot store %d entries: %s", self.link, len(rows), exc)
                for entry in fresh:  # (the answers behind them on their connections
                    entry.decided.set()  # need not wait for theirs)
                return
        for entry in fresh:
            entry.stored = True
            entry._queue()
        finished = [entry.n for entry in fresh if entry.done.is_set()]
        if finished:  # answered or expired while being written: no promise left to keep
            await self._drop(finished)

    async def _drop(self, ns: list[int]) -> None:
        """Delete answered entries' rows. A failure leaves them: a restart sends them
        again, and the home answers those as duplicates."""
        try:
            await store_call(self.store, self.store.drop, self.link, ns)
        except STORE_ERRORS as exc:
            log.error("outbox %s: cannot delete %d answered entries: %s", self.link, len(ns), exc)

    async def send(self, client: RelayClient) -> None:
        """Deliver entries over one link connection until it ends."""
        self.up = True
        self._unsent = sorted(
            (entry for entry in self.entries.values() if not entry.done.is_set()),
            key=lambda entry: entry.n,
        )
        self._more.set()
        window = trio.Semaphore(MAX_IN_FLIGHT)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_with, client, nursery.cancel_scope)
                while True:
                    await self._more.wait()
                    self._more = trio.Event()
                    while self._unsent:
                        entry = self._unsent.pop(0)
                        if entry.done.is_set():
                            continue  # expired meanwhile
                        if len(entry.event.raw) + FRAME_SLACK > client.relay_max_frame:
                            await self._refuse_too_large(entry, client.relay_max_frame)
                            continue
                        await window.acquire()
                        pending = client.publish_later(entry.event, on_queued=entry._queue)
                        entry.decided.set()  # on its way: later answers need not wait
                        nursery.start_soon(self._await_answer, client, entry, pending, window)
        finally:
            self.up = False
            with trio.CancelScope(shield=True):
                # Whatever the home has not answered becomes a stored promise.
                await self._store(list(self.entries.values()))

    async def _await_answer(
        self, client: RelayClient, entry: Entry, pending: PendingPublish, window: trio.Semaphore
    ) -> None:
        try:
            result = await pending.wait()
            error = None
        except ProtocolError as exc:
            if client.stopped.is_set():
                return  # the link dropped, not the home's answer: it goes again
            result, error = None, exc
        finally:
            window.release()
        if entry.done.is_set():
            return  # expired while in flight: the agent was told already
        if error is not None and error.code in RETRY_CODES:
            # Not an answer. Sent again on the next connection, oldest first (14.5):
            # resent on this one, it would land behind the entries sent after it.
            log.info("outbox %s: the home said %s; reconnecting to send again", self.link, error)
            await self._store([entry])
            if client.ws is not None:
                await client.ws.aclose(1013, f"{int(error.code)} {error.code.slug}: try again")
            return
        entry.result = result
        lie = self.check(entry)
        if lie is not None:  # not the home's answer: keep the entry, drop the link
            entry.result = None
            log.error("outbox %s: refused an answer: %s", self.link, lie)
            if client.ws is not None:
                await client.ws.aclose(1008, f"forged answer: {lie}"[:120])
            return
        self.entries.pop(entry.event.id, None)
        entry._resolve(result, error)
        self.on_answer(entry)
        self.delivered += 1
        if entry.stored:
            await self._drop([entry.n])

    async def _refuse_too_large(self, entry: Entry, limit: int) -> None:
        # The home would answer 1003 without a rid: nothing would ever answer this.
        self.entries.pop(entry.event.id, None)
        reason = f"event of {len(entry.event.raw)} bytes; the home relay's max_frame is {limit}"
        entry._resolve(None, ProtocolError(ErrorCode.FRAME_TOO_LARGE, reason))
        self.on_answer(entry)
        if entry.stored:  # nothing will answer it: no promise is left to keep
            await self._drop([entry.n])

    def next_deadline_ms(self) -> int | None:
        oldest = next(iter(self.entries.values()), None)
        return None if oldest is None else oldest.since_ms + self.deadline_ms

    async def expire(self, now_ms: int) -> int:
        """Fail entries that waited past the deadline; returns how many."""
        late = [e for e in self.entries.values() if e.since_ms + self.deadline_ms <= now_ms]
        for entry in late:
            del self.entries[entry.event.id]
            waited = (now_ms - entry.since_ms) / 1000
            reason = f"home relay not reached in {waited:.0f} s; publishing again is safe"
            entry._resolve(None, ProtocolError(ErrorCode.HOME_UNREACHABLE, reason))
        stored = [entry.n for entry in late if entry.stored]
        if stored:
            await self._drop(stored)
        if late:
            self.expired += len(late)
            log.warning("outbox %s: %d entries dropped past the deadline", self.link, len(late))
        return len(late)


async def _stop_with(client: RelayClient, scope: trio.CancelScope) -> None:
    await client.stopped.wait()
    scope.cancel()


async def store_call(store: OutboxStore, method: Callable[..., object], *args: object) -> None:
    """Run a store method: in a worker thread when it may block on the disk."""
    if store.blocking:
        await trio.to_thread.run_sync(method, *args)
    else:
        await trio.lowlevel.checkpoint()
        method(*args)
