"""Store-and-forward inboxes for sealed messages between agents (protocol.md §15).

Theory of operation
-------------------
A message to an agent of this relay is stored in the recipient's inbox *before* the
sender hears ``stored``: from that answer on the relay has promised delivery, and a
restart keeps it. Items get a per-recipient ``seq`` in the order they are written
and leave in that order. The recipient's open inbox stream is sent every item it has
not acknowledged, oldest first; an acknowledgement deletes the item, and the
recipient's signed receipt goes into the *sender's* inbox as an item of its own, in
the same transaction, so a sender that was offline still learns its message arrived.

The relay never sees a message's content: an item is the sealed bytes as they came
(agent_sdk/sealing.py). What it reads is the header: sender, recipient, message id.

Bounds: an inbox holds at most ``max_items`` messages (a sender gets
``inbox_full`` beyond) and, counted apart, as many receipts and expiry notices (a
new one takes the place of the oldest: one nobody reads must not keep the next
from its sender, who waits for it);
all inboxes together hold at most ``max_bytes``. An item lives ``ttl_ms``; an
expired message becomes an ``expired`` item in its sender's inbox. A message sent
again (same recipient, sender and id) while the first is stored, or being written,
is not stored twice; one sent again after its receipt is answered ``delivered``
from a bounded memory of recent deliveries.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from bisect import bisect_right
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from heapq import heapify, heappop, heappush
from itertools import count
from pathlib import Path
from typing import Protocol

import trio

from agent_sdk.errors import ErrorCode, ProtocolError

log = logging.getLogger("formicary.relay")
KINDS = ("message", "receipt", "expired")
REMEMBERED_DELIVERIES = 65_536
"""Message ids of recent deliveries kept to answer a late resend ``delivered``."""


@dataclass(frozen=True, slots=True)
class Arriving:
    """A sealed message to store, as its header names it."""

    recipient: bytes
    sender: bytes
    mid: bytes
    data: bytes
    origin: str = ""


@dataclass(frozen=True, slots=True)
class Item:
    """One thing waiting for ``recipient``: a sealed message, a receipt for a message
    it sent, or the id of a message of its that expired undelivered."""

    recipient: bytes
    seq: int
    kind: str
    mid: bytes
    """The message id (of the message itself, or the one the receipt is about)."""
    sender: bytes
    """Who the item is from: a message's sender, a receipt's signer."""
    data: bytes
    expires_ms: int
    origin: str = ""
    """The sender's relay, for a message passed on by a peer relay ("" for ours)."""


class InboxStore(Protocol):
    """Where inbox items and known agents live between restarts."""

    blocking: bool
    """Whether calls touch a disk (and so run in a worker thread)."""

    def load(self) -> tuple[list[Item], list[bytes]]: ...
    def apply(self, put: Sequence[Item], drop: Sequence[Item]) -> None:
        """Store ``put`` and delete ``drop``, all or nothing."""

    def know(self, agents: Sequence[bytes]) -> None: ...
    def close(self) -> None: ...


class MemoryInboxStore:
    blocking = False

    def __init__(self) -> None:
        self.items: dict[tuple[bytes, int], Item] = {}
        self.agents: set[bytes] = set()

    def load(self) -> tuple[list[Item], list[bytes]]:
        return sorted(self.items.values(), key=lambda i: (i.recipient, i.seq)), list(self.agents)

    def apply(self, put: Sequence[Item], drop: Sequence[Item]) -> None:
        for item in drop:
            self.items.pop((item.recipient, item.seq), None)
        for item in put:
            self.items[(item.recipient, item.seq)] = item

    def know(self, agents: Sequence[bytes]) -> None:
        self.agents.update(agents)

    def close(self) -> None:
        pass


class SQLiteInboxStore:
    """The embedded inbox store: one SQLite file next to the relay's logs, fsynced on
    every commit. Calls come from worker threads; one lock makes each a transaction."""

    blocking = True

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS inbox (recipient BLOB NOT NULL, seq INTEGER NOT NULL,"
            " kind TEXT NOT NULL, mid BLOB NOT NULL, sender BLOB NOT NULL, data BLOB NOT NULL,"
            " expires_ms INTEGER NOT NULL, origin TEXT NOT NULL,"
            " PRIMARY KEY (recipient, seq)) WITHOUT ROWID"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS agents (agent BLOB PRIMARY KEY)")

    def load(self) -> tuple[list[Item], list[bytes]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT recipient, seq, kind, mid, sender, data, expires_ms, origin FROM inbox"
                " ORDER BY recipient, seq"
            )
            items = [Item(*row) for row in rows]
            agents = [row[0] for row in self._db.execute("SELECT agent FROM agents")]
        return items, agents

    def apply(self, put: Sequence[Item], drop: Sequence[Item]) -> None:
        rows = [(i.recipient, i.seq, i.kind, i.mid, i.sender, i.data, i.expires_ms, i.origin)
                for i in put]  # fmt: skip
        gone = [(i.recipient, i.seq) for i in drop]
        self._write(
            ("DELETE FROM inbox WHERE recipient = ? AND seq = ?", gone),
            ("INSERT INTO inbox VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows),
        )

    def know(self, agents: Sequence[bytes]) -> None:
        self._write(("INSERT OR IGNORE INTO agents VALUES (?)", [(a,) for a in agents]))

    def _write(self, *statements: tuple[str, Sequence[tuple[object, ...]]]) -> None:
        """Run ``statements`` (each over its rows) as one transaction."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for statement, rows in statements:
                    self._db.executemany(statement, rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass(frozen=True, slots=True)
class _Draft:
    """An item to number and write."""

    recipient: bytes
    kind: str
    mid: bytes
    sender: bytes
    data: bytes
    origin: str = ""


class _Job:
    """A write of the one writer: items to store and items to delete, together."""

    __slots__ = ("done", "drafts", "drops", "error")

    def __init__(self, drafts: Sequence[_Draft], drops: Sequence[Item]) -> None:
        self.drafts = drafts
        self.drops = drops
        self.done = trio.Event()
        self.error: BaseException | None = None


class Inboxes:
    """Every recipient's inbox on this relay (see the module docstring).

    One writer: whoever has something to write while no write runs becomes the
    writer, and writes everything queued meanwhile in one transaction (one fsync for
    all connections), until the queue is empty; the others wait for their part. An
    item is numbered when its transaction is built and shown (to streams, to
    :meth:`after`) once it is durable, so items appear in ``seq`` order and a stream
    that has sent ``seq`` never misses a lower one.
    """

    def __init__(
        self,
        store: InboxStore,
        *,
        max_items: int,
        ttl_ms: int,
        wall_ms: Callable[[], int],
        max_bytes: int = 256 << 20,
        per_sender: int = 0,
    ) -> None:
        self.store = store
        self.max_items = max_items
        self.ttl_ms = ttl_ms
        self.wall_ms = wall_ms
        self.max_bytes = max_bytes
        self.per_sender = per_sender
        """Messages one sender may have waiting in one inbox (0: no cap of its own)."""
        self.boxes: dict[bytes, OrderedDict[int, Item]] = {}
        self.known: set[bytes] = set()
        self.bytes = 0
        """Bytes of every item held (all inboxes): bounded by ``max_bytes``."""
        self.waiting = 0
        """Items held in all inboxes (GET /metrics, the status answer): counted as boxes
        change, since adding up every box at each read grew with the agents."""
        self.streams: dict[bytes, trio.CancelScope] = {}
        """The open inbox stream of each agent (one at a time: relay/messaging.py)."""
        self.counts = {"stored": 0, "delivered": 0, "expired": 0, "refused": 0}
        self._next: dict[bytes, int] = {}
        self._stored: set[tuple[bytes, bytes, bytes]] = set()  # (to, from, id), durable
        self._writing: dict[tuple[bytes, bytes, bytes], _Job] = {}  # ... being written
        self._delivered: OrderedDict[tuple[bytes, bytes, bytes], None] = OrderedDict()
        # Each box's receipts and expiry notices, in seq order (items are indexed in
        # that order), so that finding the oldest to evict skips the box's messages.
        self._notice_boxes: dict[bytes, dict[int, Item]] = {}
        # Each box's seqs in order, so that after() finds where to start by bisection
        # rather than by walking the items sent and not acknowledged. A deleted item's
        # seq stays until a read passes it or the deleted outnumber the held (_unindex).
        self._seqs: dict[bytes, list[int]] = {}
        # Every held item's (expires_ms, recipient, seq) in a heap, so that an expiry
        # reads what is due rather than every item. A deleted item's entry stays until
        # it comes due or the entries outnumber twice the items held (_unindex rebuilds
        # the heap). And the order the boxes were opened in (that of ``boxes``): the
        # expiry takes its items in it, as its read of every box did.
        self._expiring: list[tuple[int, bytes, int]] = []
        self._opened: dict[bytes, int] = {}
        self._openings = count()
        self._reserved: dict[bytes, int] = {}  # messages being written, per recipient
        self._from: dict[tuple[bytes, bytes], int] = {}  # (to, from) -> messages held
        self._reserved_from: Counter[tuple[bytes, bytes]] = Counter()  # ... being written
        self._reserved_bytes = 0
        # Per recipient, the seqs of its items taken (or evicted, or expiring) whose
        # delete is not written yet, and how many of them are notices: a notice batch
        # asks about its own recipients, not about every item leaving now. Only held
        # items are in them (deleting an item releases it: see _unindex).
        self._leaving: dict[bytes, set[int]] = {}
        self._leaving_notices: Counter[bytes] = Counter()
        # Per recipient, notices drafted and not yet written (or failed): they count
        # against its bound as held ones do, or two batches in one write both found room.
        self._writing_notices: Counter[bytes] = Counter()
        self._jobs: list[_Job] = []
        self._writer_busy = False
        self._unsaved: list[bytes] = []  # agents known, not written yet (remember)
        self._saving = False
        self._saved = _Job((), ())  # done once the batch being gathered is written
        self._changed: dict[bytes, trio.Event] = {}
        self._change = trio.Event()
        items, agents = store.load()
        self.known.update(agents)
        for item in items:
            self._index(item)
            self._next[item.recipient] = max(self._next.get(item.recipient, 1), item.seq + 1)

    # -- what changes them ------------------------------------------------------------

    async def remember(self, agent: bytes) -> None:
        """``agent`` authenticated here: from now on it can be sent messages. Returns
        once that is on disk. Agents new here are written in batches: the first caller
        writes, and goes on writing what others added meanwhile, while they wait.

        Raises ``internal`` when its batch could not be written: then no agent of the
        batch is known here (each is written when it authenticates again), and the
        batches gathered meanwhile are still written."""
        if agent in self.known:
            return
        self.known.add(agent)
        self._unsaved.append(agent)
        saved = self._saved
        if not self._saving:
            self._saving = True
            try:
                with trio.CancelScope(shield=True):  # the batch holds others' agents too
                    while self._unsaved:
                        batch, self._unsaved = self._unsaved, []
                        job, self._saved = self._saved, _Job((), ())
                        try:
                            await self._call(self.store.know, batch)
                        except Exception as exc:  # a disk failure: the batch is not known
                            log.exception("could not write %d agents", len(batch))
                            self.known.difference_update(batch)
                            job.error = exc
                        finally:
                            job.done.set()
            finally:
                self._saving = False
        await saved.done.wait()
        if saved.error is not None:
            raise ProtocolError(ErrorCode.INTERNAL, "the relay could not record this agent")

    async def put_messages(self, messages: Sequence[Arriving]) -> list[str | ProtocolError]:
        """Store sealed messages: each answer is ``stored`` (durable: a resend waits
        for the first copy's write), ``delivered`` (a resend of one delivered
        before) or the error that refused it (``unknown_recipient``,
        ``inbox_full``; ``internal`` if the store failed)."""
        answers: list[str | ProtocolError | None] = [None] * len(messages)
        drafts: list[_Draft] = []
        job = _Job(drafts, ())
        mine: list[int] = []
        others: list[tuple[int, _Job]] = []
        for i, m in enumerate(messages):
            key = (m.recipient, m.sender, m.mid)
            if m.recipient not in self.known:
                self.counts["refused"] += 1
                reason = f"no agent {m.recipient.hex()[:16]}... has ever connected to this relay"
                answers[i] = ProtocolError(ErrorCode.UNKNOWN_RECIPIENT, reason)
            elif key in self._delivered:
                answers[i] = "delivered"
            elif key in self._stored:
                answers[i] = "stored"
            elif key in self._writing:
                others.append((i, self._writing[key]))
            elif self._held(m.recipient, "message") + self._reserved.get(m.recipient, 0) >= (
                self.max_items
            ):
                self.counts["refused"] += 1
                reason = f"the recipient's inbox holds {self.max_items} messages, the limit"
                answers[i] = ProtocolError(ErrorCode.INBOX_FULL, reason)
            elif (
                self.per_sender
                and self._from.get((m.recipient, m.sender), 0)
                + self._reserved_from[(m.recipient, m.sender)]  # (any connection's batch)
                >= self.per_sender
            ):
                self.counts["refused"] += 1
                reason = f"you have {self.per_sender} messages waiting in this inbox, the limit"
                answers[i] = ProtocolError(ErrorCode.INBOX_FULL, reason)
            elif self.bytes + self._reserved_bytes + len(m.data) > self.max_bytes:
                self.counts["refused"] += 1
                reason = f"this relay's inboxes hold {self.max_bytes} bytes, the limit"
                answers[i] = ProtocolError(ErrorCode.INBOX_FULL, reason)
            else:
                drafts.append(_Draft(m.recipient, "message", m.mid, m.sender, m.data, m.origin))
                self._reserved_from[(m.recipient, m.sender)] += 1
                self._writing[key] = job  # a copy (in this batch or another) waits for it
                mine.append(i)
                self._reserved[m.recipient] = self._reserved.get(m.recipient, 0) + 1
                self._reserved_bytes += len(m.data)
        try:
            if drafts:
                await self._write(job)
        finally:
            for draft in drafts:
                del self._writing[(draft.recipient, draft.sender, draft.mid)]
                self._reserved[draft.recipient] -= 1
                if not self._reserved[draft.recipient]:
                    del self._reserved[draft.recipient]
                self._reserved_bytes -= len(draft.data)
                pair = (draft.recipient, draft.sender)
                self._reserved_from[pair] -= 1
                if not self._reserved_from[pair]:
                    del self._reserved_from[pair]
        for i in mine:
            answers[i] = _outcome(job)
        self.counts["stored"] += len(mine) if job.error is None else 0
        for i, other in others:
            await other.done.wait()
            answers[i] = _outcome(other)
        return [a for a in answers if a is not None]

    def take(self, recipient: bytes, seqs: Sequence[int]) -> list[Item | None]:
        """The items ``seqs`` of ``recipient``, claimed for :meth:`acknowledge`: each
        is the item, or ``None`` for one not there (or already being acknowledged)."""
        box: OrderedDict[int, Item] = self.boxes.get(recipient, OrderedDict())
        taken: list[Item | None] = []
        for seq in seqs:
            item = box.get(seq)
            if item is None or self._is_leaving(item):
                taken.append(None)
                continue
            self._claim(item)
            taken.append(item)
        return taken

    def untake(self, items: Sequence[Item]) -> None:
        """Give back items from :meth:`take` that are not acknowledged after all."""
        for item in items:
            self._release(item)

    async def acknowledge(self, items: Sequence[Item], receipts: Sequence[Arriving]) -> None:
        """Delete ``items`` (from :meth:`take`) and store ``receipts`` for the messages'
        senders, in one transaction: a receipt is never lost between the two.
        ``receipts`` name the message's sender as ``recipient`` and the signer as
        ``sender``; one for a sender who is not an agent of this relay is dropped (the
        message itself was delivered)."""
        drafts, evicted = self._notices(receipts, "receipt")
        job = _Job(drafts, [*items, *evicted])
        try:
            await self._write(job)
        finally:
            for item in [*items, *evicted]:
                self._release(item)
        if job.error is not None:
            raise ProtocolError(ErrorCode.INTERNAL, "the inbox could not be written")
        for item in items:
            if item.kind == "message":
                self.delivered(item)

    async def put_receipts(self, receipts: Sequence[Arriving]) -> None:
        """Store receipts for the messages' senders (as :meth:`acknowledge` does)."""
        await self.acknowledge((), receipts)

    async def expire(self) -> list[Item]:
        """Drop items past their time; a sender is told of its expired messages."""
        gone = self._due(self.wall_ms())
        if not gone:
            return []
        for item in gone:
            self._claim(item)
        told = [Arriving(i.sender, i.recipient, i.mid, i.mid) for i in gone if i.kind == "message"]
        drafts, evicted = self._notices(told, "expired")
        job = _Job(drafts, [*gone, *evicted])
        try:
            await self._write(job)
        finally:
            for item in [*gone, *evicted]:
                self._release(item)
            for item in gone:  # still held (the write failed): due at the next expiry
                if self._holding(item.recipient, item.seq) is item:
                    heappush(self._expiring, (item.expires_ms, item.recipient, item.seq))
        self.counts["expired"] += sum(1 for i in gone if i.kind == "message")
        return gone

    def _due(self, now: int) -> list[Item]:
        """The items held past their time and not leaving, taken off the heap (the
        caller puts back those it does not delete), in the order of their boxes in
        ``boxes`` and then of seq: the order a read of every box found them in."""
        due: dict[tuple[bytes, int], Item] = {}
        others: list[tuple[int, bytes, int]] = []
        while self._expiring and self._expiring[0][0] <= now:
            entry = heappop(self._expiring)
            item = self._holding(entry[1], entry[2])
            if item is None:
                continue  # deleted: its entry goes now
            if self._is_leaving(item):
                others.append(entry)  # claimed by another task, which may give it back
            else:
                # Once, though the heap may hold it twice: put back after a failed
                # write, when a rebuild meanwhile had put it in again.
                due[entry[1], entry[2]] = item
        for entry in others:
            heappush(self._expiring, entry)
        return sorted(due.values(), key=lambda item: (self._opened[item.recipient], item.seq))

    def _notices(self, notices: Sequence[Arriving], kind: str) -> tuple[list[_Draft], list[Item]]:
        """The notices to store, and the oldest ones to delete to make room for them
        (claimed for the write like taken items)."""
        room = {
            recipient: self.max_items
            - self._held(recipient, kind)
            - self._writing_notices[recipient]
            + self._leaving_notices[recipient]  # deleted anyway: they make room
            for recipient in {n.recipient for n in notices}
        }
        # One walk of a full box's notices for the whole batch: the loop does not wait
        # and claims only what it evicts, so the next oldest not leaving comes after the
        # one it evicted last. (Asking from the box's start for each eviction read every
        # message, and the batch's earlier evictions, again each time.)
        oldest: dict[bytes, Iterator[Item]] = {}
        drafts: list[_Draft] = []
        evicted: list[Item] = []
        for n in notices:
            if n.recipient not in self.known:
                continue
            if room[n.recipient] <= 0:
                if n.recipient not in oldest:
                    oldest[n.recipient] = self._evictable(n.recipient)
                item = next(oldest[n.recipient], None)
                if item is None:
                    continue  # every one is being written or deleted now
                self._claim(item)
                evicted.append(item)
            else:
                room[n.recipient] -= 1
            drafts.append(_Draft(n.recipient, kind, n.mid, n.sender, n.data))
            self._writing_notices[n.recipient] += 1  # (the caller writes them at once)
        return drafts, evicted

    def _holding(self, recipient: bytes, seq: int) -> Item | None:
        box = self.boxes.get(recipient)
        return None if box is None else box.get(seq)

    def _evictable(self, recipient: bytes) -> Iterator[Item]:
        """The notices of ``recipient`` that are not leaving, oldest first, read as the
        caller goes: it must not index or unindex items before it is done."""
        for item in self._notice_boxes.get(recipient, {}).values():  # in seq order
            if not self._is_leaving(item):
                yield item

    def _is_leaving(self, item: Item) -> bool:
        return item.seq in self._leaving.get(item.recipient, ())

    def _claim(self, item: Item) -> None:
        """Mark ``item`` (held, not leaving) as leaving: its delete is on the way."""
        self._leaving.setdefault(item.recipient, set()).add(item.seq)
        if item.kind != "message":
            self._leaving_notices[item.recipient] += 1

    def _release(self, item: Item) -> None:
        """``item`` is no longer leaving: given back, its write failed, or it is gone
        (:meth:`_unindex` releases it; the claimant's own release then does nothing)."""
        seqs = self._leaving.get(item.recipient)
        if seqs is None or item.seq not in seqs:
            return
        seqs.remove(item.seq)
        if not seqs:
            del self._leaving[item.recipient]
        if item.kind != "message":
            self._leaving_notices[item.recipient] -= 1
            if not self._leaving_notices[item.recipient]:
                del self._leaving_notices[item.recipient]

    # -- the writer -------------------------------------------------------------------

    async def _write(self, job: _Job) -> None:
        """Have ``job`` written (by this task, if no write runs now); sets its error
        rather than raise it, so that every job of a failed transaction hears."""
        self._jobs.append(job)
        if not self._writer_busy:
            self._writer_busy = True
            try:
                # Shielded: the jobs of other tasks are in this transaction too.
                with trio.CancelScope(shield=True):
                    while self._jobs:
                        jobs, self._jobs = self._jobs, []
                        await self._commit(jobs)
            finally:
                self._writer_busy = False
        # Shielded too when another task writes it: the job is queued and is written
        # anyway, and its caller must not give up what it claimed for it (items
        # leaving, messages being written) before that write lands.
        with trio.CancelScope(shield=True):
            await job.done.wait()

    async def _commit(self, jobs: list[_Job]) -> None:
        expires_ms = self.wall_ms() + self.ttl_ms
        put = [self._number(d, expires_ms) for job in jobs for d in job.drafts]
        drop = [item for job in jobs for item in job.drops]
        try:
            await self._call(self.store.apply, put, drop)
        except Exception as exc:  # a disk failure: every job in it hears, none is applied
            self._notices_written(put)
            log.exception("inbox write failed")
            for job in jobs:
                job.error = exc
                job.done.set()
            return
        for item in drop:
            self._unindex(item)
            if item.kind == "message":
                self._stored.discard((item.recipient, item.sender, item.mid))
        self._notices_written(put)
        for item in put:
            self._index(item)
            event = self._changed.pop(item.recipient, None)
            if event is not None:
                event.set()
        self._change.set()
        self._change = trio.Event()
        for job in jobs:
            job.done.set()

    def _notices_written(self, put: Sequence[Item]) -> None:
        """The notices of a write that ended are no longer being written: held now, or
        not at all (it failed)."""
        for item in put:
            if item.kind != "message":
                self._writing_notices[item.recipient] -= 1
                if not self._writing_notices[item.recipient]:
                    del self._writing_notices[item.recipient]

    def _number(self, draft: _Draft, expires_ms: int) -> Item:
        seq = self._next.get(draft.recipient, 1)
        self._next[draft.recipient] = seq + 1
        d = draft
        return Item(d.recipient, seq, d.kind, d.mid, d.sender, d.data, expires_ms, d.origin)

    def delivered(self, item: Item) -> None:
        """Remember ``item`` (a message) was acknowledged: a late resend of it is
        answered ``delivered``."""
        self._delivered[(item.recipient, item.sender, item.mid)] = None
        if len(self._delivered) > REMEMBERED_DELIVERIES:
            self._delivered.popitem(last=False)
        self.counts["delivered"] += 1

    # -- what reads them --------------------------------------------------------------

    def after(self, recipient: bytes, seq: int, limit: int) -> list[Item]:
        """Up to ``limit`` (at least 1) items of ``recipient`` after ``seq``, in order."""
        box = self.boxes.get(recipient)
        if box is None:
            return []
        seqs = self._seqs[recipient]
        start = end = bisect_right(seqs, seq)
        items: list[Item] = []
        while len(items) < limit and end < len(seqs):  # as many seqs as items missing
            read = seqs[end : end + limit - len(items)]
            end += len(read)
            items.extend(filter(None, map(box.get, read)))  # (deleted ones: None)
        if end - start > len(items):  # deleted ones read: the next read skips them
            seqs[start:end] = [item.seq for item in items]
        return items

    async def wait_after(self, recipient: bytes, seq: int) -> None:
        """Return once ``recipient`` has an item after ``seq``."""
        while not self.after(recipient, seq, 1):
            event = self._changed.setdefault(recipient, trio.Event())
            try:
                await event.wait()
            finally:
                # A stream that ends waiting (its connection closed) leaves no event
                # behind: one per agent that ever read an empty inbox would be kept
                # for ever, since only an item for it removes its event.
                if self._changed.get(recipient) is event and not event.statistics().tasks_waiting:
                    del self._changed[recipient]

    async def wait_change(self) -> None:
        """Return at the next change of any inbox (an item stored or deleted)."""
        await self._change.wait()

    def size(self, recipient: bytes) -> int:
        return len(self.boxes.get(recipient, ()))

    # -- inside -----------------------------------------------------------------------

    def _held(self, recipient: bytes, kind: str) -> int:
        """Items of ``kind`` (``notice``: receipts and expiries) waiting for
        ``recipient``: messages and notices are bounded apart, so that receipts
        piling up for an agent that never reads them do not close it to messages."""
        notices = len(self._notice_boxes.get(recipient, ()))
        return notices if kind != "message" else self.size(recipient) - notices

    def _index(self, item: Item) -> None:
        box = self.boxes.get(item.recipient)
        if box is None:
            box = self.boxes[item.recipient] = OrderedDict()
            self._seqs[item.recipient] = []
            self._opened[item.recipient] = next(self._openings)
        box[item.seq] = item
        self._seqs[item.recipient].append(item.seq)  # (in seq order)
        heappush(self._expiring, (item.expires_ms, item.recipient, item.seq))
        self.bytes += len(item.data)
        self.waiting += 1
        if item.kind != "message":
            self._notice_boxes.setdefault(item.recipient, {})[item.seq] = item
        else:
            self._stored.add((item.recipient, item.sender, item.mid))
            pair = (item.recipient, item.sender)
            self._from[pair] = self._from.get(pair, 0) + 1

    def _unindex(self, item: Item) -> None:
        box = self.boxes.get(item.recipient)
        if box is None or box.pop(item.seq, None) is None:
            return
        # Its claim ends with it: a deleted notice must make no room for others (it is
        # no longer held). Its claimant's release, once that task runs again, finds
        # nothing, and no later item has its seq.
        self._release(item)
        self.bytes -= len(item.data)
        self.waiting -= 1
        if item.kind != "message":
            notices = self._notice_boxes[item.recipient]
            del notices[item.seq]
            if not notices:
                del self._notice_boxes[item.recipient]
        else:
            pair = (item.recipient, item.sender)
            self._from[pair] -= 1
            if not self._from[pair]:
                del self._from[pair]
        seqs = self._seqs[item.recipient]
        if not box:
            del self.boxes[item.recipient]
            del self._seqs[item.recipient]
            del self._opened[item.recipient]
        elif len(seqs) > 2 * len(box):  # more deleted than held: each pays one copy
            seqs[:] = box
        if len(self._expiring) > 2 * self.waiting:  # (as for the seqs)
            self._expiring = [(i.expires_ms, i.recipient, i.seq)
                              for box in self.boxes.values() for i in box.values()]  # fmt: skip
            heapify(self._expiring)

    async def _call(self, fn: Callable[..., None], *args: object) -> None:
        if self.store.blocking:
            await trio.to_thread.run_sync(fn, *args)
        else:
            fn(*args)


def _outcome(job: _Job) -> str | ProtocolError:
    if job.error is None:
        return "stored"
    return ProtocolError(ErrorCode.INTERNAL, "the inbox could not be written; send again")
