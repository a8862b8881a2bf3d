"""Shared CRDT documents hosted by the relay: the log is the history, pycrdt the state.

Theory of operation
-------------------
A namespace hosts named documents. ``doc.create`` (body ``{"doc": name}``) starts
one; ``doc.update`` (body ``{"doc": name, "update": bin}``) carries one Yjs update,
signed by the agent that made it, so the log says who changed what. Both are ordinary
events: sequenced, committed, acknowledged after commit. The document's *epoch* is
taken from the id of its ``doc.create`` (:func:`epoch_of`): it names the incarnation,
so a replica built from another one — a document created again under the same name,
say on a relay whose data was lost and started afresh — is told to start over
instead of merging into it and duplicating content.

The relay keeps a :class:`LiveDoc` (a ``pycrdt.Doc``) for each document in use,
loaded on demand by folding the namespace's log, and applies every committed update
to it in log order (:meth:`DocHost.on_committed`, a node fold). Replicas open a
document with their state vector; the relay answers with what they lack as of one log
position, then streams every later update in log order, from the same commit step
that applies it — so no replica is ever handed an update before the ones it depends
on, and one that missed some (a disconnect, a lag) opens again with its state vector
and gets exactly the difference.

Checks happen before an update enters the log: its shape and size, that it decodes
(:func:`check_event`), and that its document exists at that point of the log
(:meth:`DocHost.refuse`, in sequencing order).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import pycrdt
import trio

from agent_sdk.docs import MAX_UPDATE
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.wire import Event, decode
from relay.store import Record

DOC_KINDS = frozenset({"doc.create", "doc.update"})
COMPACTED = "doc.compacted"
"""The relay's snapshot of a document: written by relays only."""
DOC_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_AWARENESS = 32 * 1024
AWARENESS_RATE = 20.0
"""Awareness updates per second per replica, on average (bursts of twice that)."""

Key = tuple[str, str]


def epoch_of(create_id: bytes) -> int:
    """A document's epoch: the first 63 bits of its ``doc.create`` event id.

    Not its seq: a relay that lost its data and starts again would give the document
    made anew the same seq, and an old replica would merge into it.
    """
    return int.from_bytes(create_id[:8], "big") >> 1


class Log(Protocol):
    """What loading needs from the node: its committed logs."""

    def head(self, ns: str) -> int: ...

    async def wait_beyond(self, ns: str, seq: int) -> None: ...

    async def read(self, ns: str, start: int, limit: int) -> list[Record]: ...


def check_event(event: Event, relay_key: bytes) -> None:
    """Refuse a malformed ``doc.*`` event before it is sequenced (pure).

    The relay itself writes the updates of plain Yjs clients, with the document token
    that allowed them in ``token`` (agent_sdk/doctoken.py).
    """
    body = event.body
    if event.deps:
        raise ProtocolError(ErrorCode.BAD_EVENT, f"{event.kind} takes no deps")
    expected = {"doc"} if event.kind == "doc.create" else {"doc", "update"}
    if event.author == relay_key and isinstance(body, dict) and "token" in body:
        expected = expected | {"token"}
    if not isinstance(body, dict) or set(body) != expected:
        raise ProtocolError(
            ErrorCode.BAD_EVENT, f"{event.kind} body is a map of {sorted(expected)}"
        )
    name = body["doc"]
    if not isinstance(name, str) or not DOC_NAME_RE.fullmatch(name):
        reason = "doc name: 1 to 128 letters, digits, . _ -, starting with a letter or digit"
        raise ProtocolError(ErrorCode.BAD_EVENT, reason)
    if event.kind == "doc.update":
        check_update(body["update"])


def check_update(update: Any) -> None:
    if not isinstance(update, bytes):
        raise ProtocolError(ErrorCode.BAD_UPDATE, "update must be bytes")
    if len(update) > MAX_UPDATE:
        reason = f"update of {len(update)} bytes; the limit is {MAX_UPDATE}"
        raise ProtocolError(ErrorCode.BAD_UPDATE, reason)
    try:
        pycrdt.Doc().apply_update(update)  # decodes it fully; a scratch doc, thrown away
    except Exception as exc:  # pycrdt raises ValueError, or worse, on garbage
        raise ProtocolError(ErrorCode.BAD_UPDATE, f"not a Yjs update: {exc}") from None


class Overflow(Exception):
    """A replica fell behind by more than its buffer."""


@dataclass(eq=False)
class Replica:
    """One open subscription to a document: a bounded, ordered queue of what to send.

    Items are committed ``Record``\\ s of updates and awareness updates (bytes). When
    the queue is full the replica is cut off (:class:`Overflow`): it reopens with its
    state vector rather than make the relay buffer without bound.
    """

    capacity: int
    _tx: trio.MemorySendChannel[Record | bytes] = field(init=False)
    _rx: trio.MemoryReceiveChannel[Record | bytes] = field(init=False)
    overflowed: bool = False
    clients: set[int] = field(default_factory=set)
    """Awareness client ids this replica announced (removed when it closes)."""
    allowance: float = 2 * AWARENESS_RATE
    checked: float = 0.0

    def __post_init__(self) -> None:
        self._tx, self._rx = trio.open_memory_channel(self.capacity)

    def push(self, item: Record | bytes) -> None:
        if self.overflowed:
            return
        try:
            self._tx.send_nowait(item)
        except trio.WouldBlock:
            self.overflowed = True
            self._tx.close()

    def next_nowait(self) -> Record | bytes | None:
        """The next queued item if one is there (raises :class:`Overflow` as next())."""
        try:
            return self._rx.receive_nowait()
        except trio.WouldBlock:
            return None
        except trio.EndOfChannel:
            raise Overflow() from None

    async def next(self) -> Record | bytes:
        try:
            return await self._rx.receive()
        except trio.EndOfChannel:
            raise Overflow() from None

    def take_awareness_token(self, now: float) -> bool:
        """A token bucket: ``AWARENESS_RATE`` per second, bursts of twice that."""
        self.allowance = min(
            2 * AWARENESS_RATE, self.allowance + (now - self.checked) * AWARENESS_RATE
        )
        self.checked = now
        if self.allowance < 1:
            return False
        self.allowance -= 1
        return True


@dataclass(eq=False)
class LiveDoc:
    ns: str
    name: str
    epoch: int
    doc: pycrdt.Doc[Any] = field(default_factory=pycrdt.Doc)
    seq: int = 0
    """The last log position applied."""
    replicas: set[Replica] = field(default_factory=set)
    awareness: pycrdt.Awareness = field(init=False)
    uncompacted: list[int] = field(default_factory=list)
    """Seqs of the updates applied since the last snapshot: what compaction prunes."""

    def __post_init__(self) -> None:
        self.awareness = pycrdt.Awareness(self.doc)

    def apply(self, record: Record, update: bytes) -> None:
        self.doc.apply_update(update)
        self.seq = record.seq
        self.uncompacted.append(record.seq)

    def sync(self, sv: bytes, replica: Replica) -> tuple[bytes, bytes, int]:
        """Register ``replica`` and return (what ``sv`` lacks, our state vector, seq),
        all as of one log position: everything after it reaches the replica's queue."""
        try:
            missing = self.doc.get_update(sv) if sv else self.doc.get_update()
        except Exception as exc:
            raise ProtocolError(ErrorCode.BAD_UPDATE, f"not a state vector: {exc}") from None
        self.replicas.add(replica)
        return missing, self.doc.get_state(), self.seq

    def awareness_states(self) -> bytes | None:
        clients = list(self.awareness.states)
        return self.awareness.encode_awareness_update(clients) if clients else None

    def share_awareness(self, update: bytes, source: Replica) -> None:
        """Apply an awareness update and forward it to the other replicas."""
        try:
            before = set(self.awareness.states)
            self.awareness.apply_awareness_update(update, source)
        except Exception as exc:
            raise ProtocolError(ErrorCode.BAD_UPDATE, f"not an awareness update: {exc}") from None
        source.clients |= set(self.awareness.states) - before
        for replica in self.replicas:
            if replica is not source:
                replica.push(update)

    def leave(self, replica: Replica) -> None:
        """A replica closed: forget it, and tell the others its awareness is gone."""
        self.replicas.discard(replica)
        gone = [c for c in replica.clients if c in self.awareness.states]
        if gone:
            farewell = _disconnect_update(self.awareness, gone)
            self.awareness.remove_awareness_states(gone, "relay")
            for other in self.replicas:
                other.push(farewell)


def _disconnect_update(awareness: pycrdt.Awareness, clients: list[int]) -> bytes:
    """The y-protocols message saying ``clients`` left: clock + 1, state null."""
    from pycrdt import Encoder

    encoder = Encoder()
    encoder.write_var_uint(len(clients))
    for client in clients:
        clock = awareness.meta.get(client, {}).get("clock", 0) + 1
        encoder.write_var_uint(client)
        encoder.write_var_uint(clock)
        encoder.write_var_string("null")
    return encoder.to_bytes()


@dataclass
class DocHost:
    """Every document of the relay: which exist (as sequenced), and the live ones."""

    created: dict[Key, tuple[int, int]] = field(default_factory=dict)
    """Document -> (seq of its ``doc.create``, epoch), as of the sequencer."""
    live: dict[Key, LiveDoc] = field(default_factory=dict)
    snapshots: dict[Key, tuple[int, int]] = field(default_factory=dict)
    """Document -> (seq of its latest ``doc.compacted``, the seq it covers up to)."""
    max_live: int = 1024
    """Documents kept in memory; past it, ones nobody has open are evicted (those
    with replicas stay, so this is a target, not a hard bound)."""
    compact_every: int = 1000
    """Updates after which a live document is compacted into a snapshot."""
    due: set[Key] = field(default_factory=set)
    """Documents to compact; ``due_changed`` is set when one is added."""
    due_changed: trio.Event = field(default_factory=trio.Event)
    _loading: dict[Key, trio.Event] = field(default_factory=dict)

    # -- in sequencing order ----------------------------------------------------------

    def refuse(self, event: Event) -> ProtocolError | None:
        """Whether the log may take this ``doc.*`` event at this point."""
        key = (event.ns, event.body["doc"])
        if event.kind == "doc.create":
            if key in self.created:
                return ProtocolError(ErrorCode.DOC_EXISTS, f"document {key[1]} exists in {key[0]}")
            return None
        if key not in self.created:
            return ProtocolError(ErrorCode.UNKNOWN_DOC, f"no document {key[1]} in {key[0]}")
        return None

    def on_sequenced(self, record: Record) -> None:
        if record.kind == "doc.create":
            key = (record.ns, _body(record)["doc"])
            self.created[key] = (record.seq, epoch_of(record.id))
        elif record.kind == COMPACTED:
            body = _body(record)
            self.snapshots[(record.ns, body["doc"])] = (record.seq, body["upto"])

    def rebuild(self, records: Iterable[Record]) -> Iterator[Record]:
        """Pass stored records through, noting the documents and snapshots they hold."""
        for record in records:
            if record.kind in ("doc.create", COMPACTED):
                self.on_sequenced(record)
            yield record

    # -- in commit order --------------------------------------------------------------

    def on_committed(self, record: Record) -> None:
        """The node fold: apply a committed update to its live document, if loaded,
        and queue it for that document's replicas."""
        if record.kind != "doc.update":
            return
        body = _body(record)
        live = self.live.get((record.ns, body["doc"]))
        if live is None:
            return  # not loaded: it is in the log, and loading folds it
        live.apply(record, body["update"])
        for replica in live.replicas:
            replica.push(record)
        self._maybe_due(live)

    def _maybe_due(self, live: LiveDoc) -> None:
        if len(live.uncompacted) >= self.compact_every:
            self.due.add((live.ns, live.name))
            self.due_changed.set()

    # -- loading ----------------------------------------------------------------------

    async def open(self, ns: str, name: str, log: Log) -> LiveDoc:
        """The live document, folded from the committed log if not in memory."""
        key = (ns, name)
        while True:
            live = self.live.get(key)
            if live is not None:
                return live
            loading = self._loading.get(key)
            if loading is None:
                break
            await loading.wait()
        created = self.created.get(key)
        if created is None:
            raise ProtocolError(ErrorCode.UNKNOWN_DOC, f"no document {name} in {ns}")
        self._loading[key] = done = trio.Event()
        try:
            live = await self._load(ns, name, *created, log)
        finally:
            del self._loading[key]
            done.set()
        self._evict_idle()
        self.live[key] = live
        return live

    async def _load(self, ns: str, name: str, created: int, epoch: int, log: Log) -> LiveDoc:
        """Fold the document: its latest snapshot, then the updates after it."""
        live = LiveDoc(ns, name, epoch)
        await log.wait_beyond(ns, created - 1)  # its doc.create may not be committed yet
        cursor = created  # nothing of this incarnation comes before its doc.create
        snapshot = self.snapshots.get((ns, name))
        if snapshot is not None and snapshot[0] > created:
            at, upto = snapshot
            await log.wait_beyond(ns, at - 1)
            [record] = await log.read(ns, at, 1)
            live.doc.apply_update(_body(record)["state"])
            live.seq, cursor = upto, upto + 1
        while cursor <= log.head(ns):
            records = await log.read(ns, cursor, 512)
            for record in records:
                if record.kind == "doc.update" and record.event:  # b"": compacted away
                    body = _body(record)
                    if body["doc"] == name:
                        live.apply(record, body["update"])
            cursor = records[-1].seq + 1
        # No await between the last check and the caller registering the document:
        # every later commit reaches it through on_committed.
        self._maybe_due(live)
        return live

    def _evict_idle(self) -> None:
        """Keep at most ``max_live`` documents in memory: drop ones nobody has open."""
        if len(self.live) < self.max_live:
            return
        for key, live in list(self.live.items()):
            if not live.replicas:
                del self.live[key]
                if len(self.live) < self.max_live:
                    return


def _body(record: Record) -> Any:
    return decode(record.event)["body"]
