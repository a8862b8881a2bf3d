"""Store-and-forward inboxes for sealed messages between agents (protocol.md §15).

Theory of operation
-------------------
A message to an agent of this relay is stored in the recipient's inbox *before* the
sender hears ``accepted``: from that answer on the relay has promised delivery, and
a restart keeps it. Items get a per-recipient ``seq`` in arrival order and leave in
that order. The recipient's open inbox stream is sent every item it has not
acknowledged, oldest first; an acknowledgement deletes the item, and the recipient's
signed receipt goes into the *sender's* inbox as an item of its own, so a sender
that was offline still learns its message arrived.

The relay never sees a message's content: an item is the sealed bytes as they came
(agent_sdk/sealing.py). What it reads is the header: sender, recipient, message id.

Bounds: an inbox holds at most ``max_items`` items (a sender gets ``inbox_full``
beyond), and an item lives ``ttl_ms``; an expired message becomes an ``expired``
item in its sender's inbox. A message sent again with the same id while the first is
still stored is not stored twice; one sent again after its receipt is answered
``delivered`` from a bounded memory of recent deliveries.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from agent_sdk.errors import ErrorCode, ProtocolError

A = TypeVar("A")
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
    def put(self, items: Sequence[Item]) -> None: ...
    def drop(self, items: Sequence[Item]) -> None: ...
    def know(self, agents: Sequence[bytes]) -> None: ...
    def close(self) -> None: ...


class MemoryInboxStore:
    blocking = False

    def __init__(self) -> None:
        self.items: dict[tuple[bytes, int], Item] = {}
        self.agents: set[bytes] = set()

    def load(self) -> tuple[list[Item], list[bytes]]:
        return sorted(self.items.values(), key=lambda i: (i.recipient, i.seq)), list(self.agents)

    def put(self, items: Sequence[Item]) -> None:
        for item in items:
            self.items[(item.recipient, item.seq)] = item

    def drop(self, items: Sequence[Item]) -> None:
        for item in items:
            self.items.pop((item.recipient, item.seq), None)

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

    def put(self, items: Sequence[Item]) -> None:
        rows = [
            (i.recipient, i.seq, i.kind, i.mid, i.sender, i.data, i.expires_ms, i.origin)
            for i in items
        ]
        self._write("INSERT OR REPLACE INTO inbox VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def drop(self, items: Sequence[Item]) -> None:
        rows = [(i.recipient, i.seq) for i in items]
        self._write("DELETE FROM inbox WHERE recipient = ? AND seq = ?", rows)

    def know(self, agents: Sequence[bytes]) -> None:
        self._write("INSERT OR IGNORE INTO agents VALUES (?)", [(a,) for a in agents])

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


class Inboxes:
    """Every recipient's inbox on this relay (see the module docstring)."""

    def __init__(
        self,
        store: InboxStore,
        *,
        max_items: int,
        ttl_ms: int,
        wall_ms: Callable[[], int],
    ) -> None:
        self.store = store
        self.max_items = max_items
        self.ttl_ms = ttl_ms
        self.wall_ms = wall_ms
        self.boxes: dict[bytes, OrderedDict[int, Item]] = {}
        self.known: set[bytes] = set()
        self._next: dict[bytes, int] = {}
        self._stored: dict[tuple[bytes, bytes], int] = {}  # (recipient, mid) -> seq
        self._delivered: OrderedDict[tuple[bytes, bytes], None] = OrderedDict()
        self._changed: dict[bytes, trio.Event] = {}
        self._adding: dict[bytes, int] = {}  # items being written, per recipient
        self._change = trio.Event()
        self._kinds: dict[tuple[bytes, str], int] = {}  # see _held
        self._unsaved: list[bytes] = []  # agents known, not written yet (remember)
        self._saving = False
        self.streams: dict[bytes, trio.CancelScope] = {}
        """The open inbox stream of each agent (one at a time: relay/messaging.py)."""
        self.counts = {"stored": 0, "delivered": 0, "expired": 0, "refused": 0}
        items, agents = store.load()
        self.known.update(agents)
        for item in items:
            self._index(item)

    # -- what changes them ------------------------------------------------------------

    async def remember(self, agent: bytes) -> None:
        """``agent`` authenticated here: from now on it can be sent messages. Agents
        new here are written in batches: the first caller writes, and keeps writing
        what others added meanwhile, while they go on (an agent whose write a crash
        lost is written again when it next connects)."""
        if agent in self.known:
            return
        self.known.add(agent)
        self._unsaved.append(agent)
        if self._saving:
            return
        self._saving = True
        try:
            while self._unsaved:
                batch, self._unsaved = self._unsaved, []
                await self._call(self.store.know, batch)
        finally:
            self._saving = False

    async def put_messages(self, messages: Sequence[Arriving]) -> list[str | ProtocolError]:
        """Store sealed messages, in one write: each answer is ``stored``, ``delivered``
        (a resend of one delivered before) or the error that refused it
        (``unknown_recipient``, ``inbox_full``)."""
        answers: list[str | ProtocolError] = []
        new: list[Item] = []
        for m in messages:
            key = (m.recipient, m.mid)
            if m.recipient not in self.known:
                self.counts["refused"] += 1
                reason = f"no agent {m.recipient.hex()[:16]}... has ever connected to this relay"
                answers.append(ProtocolError(ErrorCode.UNKNOWN_RECIPIENT, reason))
            elif key in self._delivered:
                answers.append("delivered")
            elif key in self._stored:
                answers.append("stored")
            elif self._held(m.recipient, "message") + self._adding.get(m.recipient, 0) >= (
                self.max_items
            ):
                self.counts["refused"] += 1
                reason = f"the recipient's inbox holds {self.max_items} items, the limit"
                answers.append(ProtocolError(ErrorCode.INBOX_FULL, reason))
            else:
                item = self._item(m.recipient, "message", m.mid, m.sender, m.data, m.origin)
                self._stored[key] = item.seq  # a resend while we write is not stored twice
                self._adding[m.recipient] = self._adding.get(m.recipient, 0) + 1
                new.append(item)
                answers.append("stored")
        try:
            await self._store_new(new)
        except BaseException:
            for item in new:
                self._stored.pop((item.recipient, item.mid), None)
            raise
        finally:
            for item in new:
                self._adding[item.recipient] -= 1
                if not self._adding[item.recipient]:
                    del self._adding[item.recipient]
        self.counts["stored"] += len(new)
        return answers

    async def acknowledge(self, recipient: bytes, seqs: Sequence[int]) -> list[Item | None]:
        """The recipient has items ``seqs``: delete them, in one write. Each answer is
        the item, or ``None`` for one not there (acknowledged before, or never)."""
        box: OrderedDict[int, Item] = self.boxes.get(recipient, OrderedDict())
        found: list[Item | None] = []
        seen: set[int] = set()
        for seq in seqs:
            found.append(box.get(seq) if seq not in seen else None)
            seen.add(seq)
        items = [item for item in found if item is not None]
        if items:
            await self._call(self.store.drop, items)
        for item in items:
            self._unindex(item)
            if item.kind == "message":
                self._delivered[(recipient, item.mid)] = None
                if len(self._delivered) > REMEMBERED_DELIVERIES:
                    self._delivered.popitem(last=False)
                self.counts["delivered"] += 1
        self._note_change()
        return found

    async def put_receipts(self, receipts: Sequence[Arriving]) -> None:
        """Hand recipients' signed receipts to the messages' senders, in one write
        (each ``Arriving`` names the message's sender as ``recipient``, the receipt's
        signer as ``sender``). A receipt for a sender whose inbox is full, or who is
        not an agent of this relay, is dropped: the message itself was delivered."""
        room = {r.recipient: self.max_items - self._held(r.recipient, "receipt") for r in receipts}
        new = []
        for r in receipts:
            if r.recipient in self.known and room[r.recipient] > 0:
                room[r.recipient] -= 1
                new.append(self._item(r.recipient, "receipt", r.mid, r.sender, r.data))
        await self._store_new(new)

    async def expire(self) -> list[Item]:
        """Drop items past their time; a sender is told of its expired messages."""
        now = self.wall_ms()
        gone = [
            item for box in self.boxes.values() for item in box.values() if item.expires_ms <= now
        ]
        if not gone:
            return []
        await self._call(self.store.drop, gone)
        for item in gone:
            self._unindex(item)
        self._note_change()
        for item in gone:
            if item.kind == "message":
                self.counts["expired"] += 1
                if item.sender in self.known and self._held(item.sender, "notice") < self.max_items:
                    await self._put(item.sender, "expired", item.mid, item.recipient, item.mid)
        return gone

    # -- what reads them --------------------------------------------------------------

    def after(self, recipient: bytes, seq: int, limit: int) -> list[Item]:
        """Up to ``limit`` items of ``recipient`` after ``seq``, in order."""
        items = []
        for item in self.boxes.get(recipient, {}).values():
            if item.seq > seq:
                items.append(item)
                if len(items) == limit:
                    break
        return items

    async def wait_change(self) -> None:
        """Return at the next change of any inbox (an item stored or deleted)."""
        await self._change.wait()

    def _note_change(self) -> None:
        self._change.set()
        self._change = trio.Event()

    async def wait_after(self, recipient: bytes, seq: int) -> None:
        """Return once ``recipient`` has an item after ``seq``."""
        while not self.after(recipient, seq, 1):
            event = self._changed.setdefault(recipient, trio.Event())
            await event.wait()

    def _held(self, recipient: bytes, kind: str) -> int:
        """Items of ``kind`` (``notice``: receipts and expiries) waiting for
        ``recipient``: messages and notices are bounded apart, so that receipts
        piling up for an agent that never reads them do not close it to messages."""
        return self._kinds.get((recipient, "notice" if kind != "message" else kind), 0)

    def size(self, recipient: bytes) -> int:
        return len(self.boxes.get(recipient, ()))

    # -- inside -----------------------------------------------------------------------

    async def _put(
        self, recipient: bytes, kind: str, mid: bytes, sender: bytes, data: bytes
    ) -> None:
        await self._store_new([self._item(recipient, kind, mid, sender, data)])

    def _item(
        self, recipient: bytes, kind: str, mid: bytes, sender: bytes, data: bytes, origin: str = ""
    ) -> Item:
        """A new item with the recipient's next seq (taken now: concurrent puts differ)."""
        seq = self._next.get(recipient, 1)
        self._next[recipient] = seq + 1
        expires_ms = self.wall_ms() + self.ttl_ms
        return Item(recipient, seq, kind, mid, sender, data, expires_ms, origin)

    async def _store_new(self, items: list[Item]) -> None:
        if not items:
            return
        await self._call(self.store.put, items)
        for item in items:
            self._index(item)
            event = self._changed.pop(item.recipient, None)
            if event is not None:
                event.set()
        self._note_change()

    def _index(self, item: Item) -> None:
        key = (item.recipient, "message" if item.kind == "message" else "notice")
        self._kinds[key] = self._kinds.get(key, 0) + 1
        box = self.boxes.setdefault(item.recipient, OrderedDict())
        box[item.seq] = item
        if len(box) > 1 and next(reversed(box)) != item.seq:  # loaded out of order
            self.boxes[item.recipient] = OrderedDict(sorted(box.items()))
        self._next[item.recipient] = max(self._next.get(item.recipient, 1), item.seq + 1)
        if item.kind == "message":
            self._stored[(item.recipient, item.mid)] = item.seq

    def _unindex(self, item: Item) -> None:
        box = self.boxes.get(item.recipient)
        if box is not None and box.pop(item.seq, None) is not None:
            key = (item.recipient, "message" if item.kind == "message" else "notice")
            self._kinds[key] -= 1
            if not self._kinds[key]:
                del self._kinds[key]
            if not box:
                del self.boxes[item.recipient]
        if item.kind == "message":
            self._stored.pop((item.recipient, item.mid), None)

    async def _call(self, fn: Callable[[A], None], arg: A) -> None:
        if self.store.blocking:
            await trio.to_thread.run_sync(fn, arg)
        else:
            fn(arg)
