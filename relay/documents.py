"""Shared CRDT documents hosted by the relay: the log is the history, pycrdt the state.

Theory of operation
-------------------
A namespace hosts named documents. ``doc.create`` (body ``{"doc": name}``) starts
one; ``doc.update`` (body ``{"doc": name, "update": bin}``, and ``"epoch"``)
carries one Yjs update, signed by the agent that made it, so the log says who changed
what. Both are ordinary events: sequenced, committed, acknowledged after commit. The
document's *epoch* is taken from the id of its ``doc.create`` (:func:`epoch_of`): it
names the incarnation, so a replica built from another one — a document created again
under the same name, say on a relay whose data was lost and started afresh — is told
to start over instead of merging into it and duplicating content, and an update that
names another epoch (one re-sent after a reconnect) is refused.

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

import json
import logging
import math
import re
from array import array
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pycrdt
import trio

from agent_sdk.docs import MAX_UPDATE, yjs
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.wire import Event, decode
from agent_sdk.yupdate import check_shape, delete_set, varuint
from relay.limits import TokenBucket
from relay.store import Record

DOC_KINDS = frozenset({"doc.create", "doc.update"})
COMPACTED = "doc.compacted"
"""The relay's snapshot of a document: written by relays only."""
DOC_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_AWARENESS = 32 * 1024
MAX_AWARENESS_CLIENTS = 16
"""Awareness client ids one replica may announce (a y-websocket client announces one)."""
ABSENT_CLOCKS = 1024
"""Clocks of departed awareness clients a document keeps (against stale echoes)."""
MAX_WAITING = 4 * MAX_UPDATE
"""Bytes of held-back updates a document keeps for its snapshots and syncs."""
AWARENESS_RATE = 20.0
"""Awareness updates per second per agent and document, on average (bursts of twice
that)."""
MAX_AWARENESS_BUCKETS = 4096
"""Awareness allowances a loaded document keeps of agents with no replica open (the
most recently opened); those of agents with one open are always kept."""

Key = tuple[str, str]

log = logging.getLogger("formicary.relay")


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
    if event.kind == "doc.update" and isinstance(body, dict) and "epoch" in body:
        # Optional (clients before it send none): the incarnation the update was made
        # against, so one re-sent after the document was created again is refused
        # (DocHost.refuse) rather than merged into the new one (protocol 13.2).
        expected = expected | {"epoch"}
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
    epoch = body.get("epoch", 0)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < 1 << 63:
        raise ProtocolError(ErrorCode.BAD_EVENT, "epoch: an int from 0 to 2**63 - 1")
    if event.kind == "doc.update":
        check_update(body["update"])


def check_update(update: Any) -> None:
    if not isinstance(update, bytes):
        raise ProtocolError(ErrorCode.BAD_UPDATE, "update must be bytes")
    if len(update) > MAX_UPDATE:
        reason = f"update of {len(update)} bytes; the limit is {MAX_UPDATE}"
        raise ProtocolError(ErrorCode.BAD_UPDATE, reason)
    try:
        check_shape(update)  # (a value nested too deep would crash pycrdt's decoder)
        yjs(pycrdt.Doc().apply_update, update)  # decodes it fully; a scratch doc
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
    agent: bytes | None = None
    """The agent it is open for (an agent connection's, or the one a peer relay
    names); ``None`` for a plain Yjs client."""
    clients: set[int] = field(default_factory=set)
    """Awareness client ids this replica announced (removed when it closes)."""
    awareness: TokenBucket = field(
        default_factory=lambda: TokenBucket.full(AWARENESS_RATE, 2 * AWARENESS_RATE)
    )
    """Its awareness allowance; the replicas of one agent on a document share one
    (:meth:`LiveDoc.sync`), so opening it many times does not multiply the rate."""

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
        """``AWARENESS_RATE`` per second, bursts of twice that."""
        return self.awareness.take(now) == 0.0


@dataclass(eq=False)
class LiveDoc:
    ns: str
    name: str
    epoch: int
    doc: pycrdt.Doc[Any] = field(default_factory=pycrdt.Doc)
    seq: int = 0
    """The last log position applied."""
    replicas: dict[Replica, None] = field(default_factory=dict)
    """A set in the order they opened: updates go out in that order, the same in every
    run (a set of objects iterates by address: simulations did not repeat)."""
    awareness: pycrdt.Awareness = field(init=False)
    uncompacted: list[int] = field(default_factory=list)
    """Seqs of the updates applied since the last snapshot: what compaction prunes."""

    waiting: bytes = b""
    """What pycrdt holds back of the updates applied (their items wait for ones not
    yet applied), merged into one update; its ``get_update`` leaves it out, so
    snapshots and syncs add it. Empty when nothing waits."""
    owners: dict[int, Replica] = field(default_factory=dict)
    """The replica that owns each client id it announced (its ``clients`` hold it),
    until it closes: no other agent's replica may name that id (:meth:`share_awareness`)."""
    awareness_buckets: OrderedDict[bytes, TokenBucket] = field(default_factory=OrderedDict)
    """The awareness allowance of each agent that opened the document, kept after it
    leaves (closing and opening again must not refill it), the latest
    :data:`MAX_AWARENESS_BUCKETS` of them."""
    absent: OrderedDict[int, None] = field(default_factory=OrderedDict)
    """Clients whose state is gone, oldest first: their clocks are kept (an echo of an
    old state must not bring them back) up to :data:`ABSENT_CLOCKS` of them."""
    reserved: OrderedDict[int, bytes] = field(default_factory=OrderedDict)
    """The client ids of agents' replicas that left, and whose they were, oldest first
    (the latest :data:`ABSENT_CLOCKS`): kept for that agent until it announces them
    again. The farewell tells every reader the id is free, and a replica reopening
    after a ``doc_resync`` or a reconnect announces again only a moment later."""

    def __post_init__(self) -> None:
        self.awareness = pycrdt.Awareness(self.doc)
        self.awareness.set_local_state(None)  # the relay itself is not present

    def apply(self, record: Record, update: bytes) -> None:
        self.seq = record.seq
        if self.merge(record.seq, update):
            # Compaction prunes only what a snapshot holds: an update that did not
            # wholly apply keeps its bytes in the log for good.
            self.uncompacted.append(record.seq)

    def merge(self, seq: int, update: bytes) -> bool:
        """Apply an update (or a snapshot) of log position ``seq``; whether all of it
        is held (integrated, or kept waiting for what it needs)."""
        try:
            yjs(self.doc.apply_update, update)
        except Exception as exc:
            # It decoded alone (check_update) but conflicts with this document: a crafted
            # update treating an item of one type as another. pycrdt keeps what it had
            # integrated; every fold of the log does the same, so replicas still agree.
            log.warning("%s/%s: update at seq %d does not apply: %s", self.ns, self.name, seq, exc)
            return False
        state = self.doc.get_state()
        have = _clocks(state)
        try:
            held = yjs(pycrdt.merge_updates, self.waiting, update) if self.waiting else update
            waits = _waiting_part(held, state, have) or b""
        except Exception as exc:  # applied, but its parts do not read back: not kept
            log.warning("%s/%s: update at seq %d: %s", self.ns, self.name, seq, exc)
            return False
        if len(waits) > MAX_WAITING:
            # Only updates whose items never come (crafted) get here; past the bound
            # the newest is not kept for snapshots and syncs (it is still in the log).
            log.warning("%s/%s: held-back updates over %d bytes; seq %d is not kept",
                        self.ns, self.name, MAX_WAITING, seq)  # fmt: skip
            kept = _waiting_part(self.waiting, state, have) if self.waiting else None
            self.waiting = kept or b""
            return False
        self.waiting = waits
        return True

    def state(self) -> bytes:
        """Everything applied, with the updates still waiting: what a snapshot holds."""
        update = self.doc.get_update()
        return yjs(pycrdt.merge_updates, update, self.waiting) if self.waiting else update

    def missing(self, sv: bytes) -> bytes:
        """What a replica with state vector ``sv`` (b"": nothing) lacks."""
        try:
            missing = yjs(self.doc.get_update, sv) if sv else self.doc.get_update()
        except Exception as exc:
            raise ProtocolError(ErrorCode.BAD_UPDATE, f"not a state vector: {exc}") from None
        if self.waiting:  # the replica holds them back too, until what they need comes
            missing = yjs(pycrdt.merge_updates, missing, self.waiting)
        return missing

    def sync(self, sv: bytes, replica: Replica) -> tuple[bytes, bytes, int]:
        """Register ``replica`` and return (what ``sv`` lacks, our state vector, seq),
        all as of one log position: everything after it reaches the replica's queue."""
        missing = self.missing(sv)
        agent = replica.agent
        if agent is not None:
            buckets = self.awareness_buckets
            if agent in buckets:
                replica.awareness = buckets[agent]
                buckets.move_to_end(agent)
            else:
                buckets[agent] = replica.awareness
                if len(buckets) > MAX_AWARENESS_BUCKETS:
                    self._forget_buckets()
        self.replicas[replica] = None
        return missing, self.doc.get_state(), self.seq

    def _forget_buckets(self) -> None:
        """Drop the oldest allowances of agents with no replica open, down to the cap
        (an agent with one open must keep its own: opening again shares it)."""
        open_ = {replica.agent for replica in self.replicas}
        buckets = self.awareness_buckets
        for agent in [a for a in buckets if a not in open_]:
            if len(buckets) <= MAX_AWARENESS_BUCKETS:
                break
            del buckets[agent]

    def awareness_states(self) -> bytes | None:
        clients = list(self.awareness.states)
        return self.awareness.encode_awareness_update(clients) if clients else None

    def share_awareness(
        self, update: bytes, source: Replica, charge: Callable[[], bool] | None = None
    ) -> None:
        """Apply an awareness update and forward it to the other replicas.

        The whole update is decoded and checked first: applied entry by entry, a bad
        entry late in it would leave the earlier ones applied but owned by no replica,
        present for as long as the document is loaded. An update naming a client id
        that another replica owns is refused whole (``awareness_refused``). ``charge``,
        when given, is asked after those checks whether the replica's allowance has
        room (``awareness_refused`` if not): a plain Yjs client sends back every state
        it is sent, and those echoes, refused, must not use up its allowance."""
        try:
            entries = _awareness_entries(update)
        except (ValueError, IndexError, RecursionError) as exc:
            raise ProtocolError(ErrorCode.BAD_UPDATE, f"not an awareness update: {exc}") from None
        for client, _state in entries:
            # A client id belongs to the replica that announced it, for as long as that
            # replica is open: another may neither change nor erase (null) its state,
            # or any reader could rewrite anyone's presence. The same agent may take it
            # over (signed in, it is the same principal: after a reconnect its new
            # subscription announces before the relay notices the old one is gone); a
            # plain Yjs client (no agent) owns its ids on its own connection only. An
            # id whose agent's replica left stays that agent's until it comes back.
            owner = self.owners.get(client)
            if owner is not None:
                mine = owner is source or (owner.agent is not None and owner.agent == source.agent)
            else:
                mine = self.reserved.get(client, source.agent) == source.agent
            if not mine:
                reason = f"client id {client} is another replica's presence on this document"
                raise ProtocolError(ErrorCode.AWARENESS_REFUSED, reason)
        if charge is not None and not charge():
            raise ProtocolError(ErrorCode.AWARENESS_REFUSED, "too many awareness updates")
        announced = {client for client, state in entries if state is not None}
        if len(source.clients | announced) > MAX_AWARENESS_CLIENTS:
            reason = f"a replica may announce at most {MAX_AWARENESS_CLIENTS} client ids"
            raise ProtocolError(ErrorCode.BAD_UPDATE, reason)
        meta = self.awareness.meta
        clocks = {client: meta.get(client, {}).get("clock") for client in announced}
        self.awareness.apply_awareness_update(update, source)
        for client in announced:
            if client in self.awareness.states and meta[client]["clock"] != clocks[client]:
                # The agent's latest replica to announce a client owns it: an agent
                # that reconnected announces again on its new subscription, and the
                # old one's close (maybe noticed only later) must not erase that.
                owner = self.owners.get(client)
                if owner is not None and owner is not source:
                    owner.clients.discard(client)
                self.owners[client] = source
                source.clients.add(client)
                self.reserved.pop(client, None)
        self._forget_absent(client for client, state in entries if state is None)
        for replica in self.replicas:
            if replica is not source:
                replica.push(update)

    def leave(self, replica: Replica) -> None:
        """A replica closed: forget it, and tell the others its awareness is gone."""
        self.replicas.pop(replica, None)
        for client in replica.clients:
            del self.owners[client]
            if replica.agent is not None:  # (a plain client's ids are its connection's)
                self.reserved[client] = replica.agent
                self.reserved.move_to_end(client)
        while len(self.reserved) > ABSENT_CLOCKS:
            self.reserved.popitem(last=False)
        gone = [c for c in replica.clients if c in self.awareness.states]
        if gone:
            farewell = _disconnect_update(self.awareness, gone)
            self.awareness.remove_awareness_states(gone, "relay")
            for client in gone:  # the clock the farewell told the others
                self.awareness.meta[client]["clock"] += 1
            for other in self.replicas:
                other.push(farewell)
        self._forget_absent(replica.clients)

    def _forget_absent(self, clients: Iterable[int]) -> None:
        """Keep the clocks of the latest :data:`ABSENT_CLOCKS` clients with no state,
        and forget older ones: a replica could name any number of them."""
        meta, states, absent = self.awareness.meta, self.awareness.states, self.absent
        for client in clients:
            if client not in states:
                absent[client] = None
                absent.move_to_end(client)
        while len(absent) > ABSENT_CLOCKS:
            client, _ = absent.popitem(last=False)
            if client not in states:
                meta.pop(client, None)


def _clocks(state_vector: bytes) -> dict[int, int]:
    """A state vector (13.1), decoded: client id -> clock."""
    count, at = varuint(state_vector, 0)
    clocks = {}
    for _ in range(count):
        client, at = varuint(state_vector, at)
        clocks[client], at = varuint(state_vector, at)
    return clocks


def _waiting_part(update: bytes, state: bytes, have: dict[int, int]) -> bytes | None:
    """The part of an applied update that pycrdt holds back (None: all of it is in).

    What the document's state vector does not cover is its items that wait; an update
    without such items still waits if it deletes items the document does not have."""
    part = yjs(pycrdt.get_update, update, state)  # its items past `state`, its deletions
    clients, at = varuint(part, 0)
    if clients:
        return part
    for client, clock, length in delete_set(part, at):
        if have.get(client, 0) < clock + length:
            return part
    return None


def changes_nothing(update: bytes, live: LiveDoc) -> bool:
    """Whether applying ``update`` would change nothing: every item it holds is in the
    document, and everything it deletes is deleted there. (A Yjs client's sync step 2
    carries its whole delete set, so a client that reconnects with no edit sends one.)"""
    state = live.doc.get_state()
    try:
        check_shape(update)
        part = yjs(pycrdt.get_update, update, state)
        clients, at = varuint(part, 0)
        if clients:
            return False
        theirs = delete_set(part, at)
    except (ValueError, IndexError):
        return False
    if not theirs:
        return True
    ours = live.doc.get_update(state)  # no items: the document's own delete set
    deleted: dict[int, list[tuple[int, int]]] = {}
    for client, clock, length in sorted(delete_set(ours, varuint(ours, 0)[1])):
        spans = deleted.setdefault(client, [])
        if spans and clock <= spans[-1][1]:  # touching or overlapping: one span
            spans[-1] = (spans[-1][0], max(spans[-1][1], clock + length))
        else:
            spans.append((clock, clock + length))
    for client, clock, length in theirs:
        spans = deleted.get(client, [])
        i = bisect_right(spans, (clock, math.inf)) - 1  # the last span starting at or before
        if i < 0 or spans[i][1] < clock + length:
            return False
    return True


def _awareness_entries(update: bytes) -> list[tuple[int, Any]]:
    """An awareness update (13.1), decoded: (client id, state or None) per entry."""
    count, at = varuint(update, 0)
    entries = []
    for _ in range(count):
        client, at = varuint(update, at)
        _clock, at = varuint(update, at)
        size, at = varuint(update, at)
        if at + size > len(update):
            raise ValueError("state runs past the end")
        text = update[at : at + size].decode()  # UnicodeDecodeError is a ValueError
        at += size
        if not text:  # (pycrdt takes it for null; y-protocols' JSON.parse throws on it)
            raise ValueError("a state is JSON text: null for a client that left, not empty")
        state = json.loads(text)
        if state is not None and not isinstance(state, dict):
            raise ValueError("a state is a JSON object or null")
        entries.append((client, state))
    if at != len(update):
        raise ValueError("bytes after the last entry")
    return entries


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
    stored_snapshots: dict[Key, list[int]] = field(default_factory=dict)
    """Document -> seqs of its ``doc.compacted`` records that still hold their bytes,
    oldest first: each later snapshot supersedes them (see :meth:`superseded`)."""
    max_live: int = 1024
    """Documents kept in memory; past it, ones nobody has open are evicted (those
    with replicas stay, so this is a target, not a hard bound)."""
    compact_every: int = 1000
    """Updates after which a live document is compacted into a snapshot."""
    updates: dict[Key, array[int]] = field(default_factory=dict)
    """Document -> seqs of its committed ``doc.update`` records since its
    ``doc.create``, but those a committed snapshot holds, in order: loading reads
    those, not every record of the namespace since (many documents share a log)."""
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
        created = self.created.get(key)
        if created is None:
            return ProtocolError(ErrorCode.UNKNOWN_DOC, f"no document {key[1]} in {key[0]}")
        epoch = event.body.get("epoch")
        if epoch is not None and epoch != created[1]:
            # Made against another incarnation: a client re-sending it after a reconnect
            # (the same bytes, 7.6) has not yet seen the reset its doc.open will report.
            reason = (
                f"document {key[1]} in {key[0]} was created again: the update is of epoch"
                f" {epoch}, the document's is {created[1]}"
            )
            return ProtocolError(ErrorCode.STALE_DOC, reason)
        return None

    def on_sequenced(self, record: Record) -> None:
        if record.kind == "doc.create":
            key = (record.ns, _body(record)["doc"])
            self.created[key] = (record.seq, epoch_of(record.id))
        elif record.kind == COMPACTED:
            body = _body(record)
            key = (record.ns, body["doc"])
            self.snapshots[key] = (record.seq, body["upto"])
            self.stored_snapshots.setdefault(key, []).append(record.seq)

    def rebuild(self, records: Iterable[Record]) -> Iterator[Record]:
        """Pass stored records through, noting the documents and snapshots they hold
        (a pruned snapshot, bytes gone, was superseded by a later one)."""
        for record in records:
            if record.kind in ("doc.create", COMPACTED) and record.event:
                self.on_sequenced(record)
            if record.kind in ("doc.create", "doc.update") and record.event:
                self._index(record, _body(record)["doc"])
            yield record

    def superseded(self, ns: str, name: str, upto: int) -> list[int]:
        """Forget and return the seqs of the document's snapshots that its latest one,
        covering up to ``upto``, makes redundant: every earlier one at a seq <= ``upto``.

        Each snapshot is the whole document, so without this the log would grow by
        one full copy per ``compact_every`` updates. The bound on the seq keeps the
        rule of offline checking (a pruned record is covered by a later snapshot
        whose ``upto`` reaches it, protocol 10.2); a snapshot it leaves is pruned
        by a later one."""
        key = (ns, name)
        stored = self.stored_snapshots.get(key, [])
        latest = stored[-1:]
        gone = [seq for seq in stored[:-1] if seq <= upto]
        self.stored_snapshots[key] = [seq for seq in stored[:-1] if seq > upto] + latest
        return gone

    # -- in commit order --------------------------------------------------------------

    def on_committed(self, record: Record) -> None:
        """The node fold: apply a committed update to its live document, if loaded,
        and queue it for that document's replicas."""
        if record.kind == "doc.create":
            self._index(record, _body(record)["doc"])
        if record.kind != "doc.update":
            return
        body = _body(record)
        self._index(record, body["doc"])
        live = self.live.get((record.ns, body["doc"]))
        if live is None:
            return  # not loaded: it is in the log, and loading folds it
        live.apply(record, body["update"])
        for replica in live.replicas:
            replica.push(record)
        self._maybe_due(live)

    def _index(self, record: Record, name: str) -> None:
        """Note a committed ``doc.update`` under its document (a ``doc.create`` starts a
        new incarnation: the old one's updates are never read again)."""
        key = (record.ns, name)
        if record.kind == "doc.create":
            self.updates[key] = array("q")
        else:
            self.updates.setdefault(key, array("q")).append(record.seq)

    def folded(self, ns: str, name: str, upto: int) -> None:
        """A snapshot up to ``upto`` is committed: loading never reads the updates it
        holds, so the index forgets them (a document that stays loaded is compacted
        again and again without being loaded)."""
        seqs = self.updates.get((ns, name))
        if seqs is not None:
            del seqs[: bisect_right(seqs, upto)]

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
            live.merge(upto, _body(record)["state"])
            live.seq, cursor = upto, upto + 1
        # Its updates, as the index has them: read in runs (ones close together share a
        # read), until no update committed meanwhile is left; each later commit reaches
        # the document through on_committed once it is registered.
        seqs = self.updates.get((ns, name), array("q"))
        del seqs[: bisect_left(seqs, cursor)]  # folded into the snapshot: never read again
        while wanted := seqs[bisect_left(seqs, cursor) :]:  # (each one committed)
            for start, end in _runs(wanted):
                while start <= end:
                    records = await log.read(ns, start, min(512, end - start + 1))
                    for record in records:
                        # (b"": compacted away; other documents' in a run's gaps)
                        if record.kind == "doc.update" and record.event:
                            body = _body(record)
                            if body["doc"] == name:
                                live.apply(record, body["update"])
                    start = records[-1].seq + 1
            cursor = wanted[-1] + 1
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


RUN_GAP = 64
"""Records between two of a document's updates that loading reads through rather
than start another read."""


def _runs(seqs: Sequence[int]) -> Iterator[tuple[int, int]]:
    """``(first, last)`` ranges covering ``seqs`` (sorted), joining ones closer than
    :data:`RUN_GAP`."""
    start = end = seqs[0]
    for seq in seqs[1:]:
        if seq - end > RUN_GAP:
            yield start, end
            start = seq
        end = seq
    yield start, end


def _body(record: Record) -> Any:
    return decode(record.event)["body"]
