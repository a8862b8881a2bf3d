"""The sequencer: decides each event's place in its namespace log (pure: no I/O).

Theory of operation
-------------------
The relay hands the sequencer events whose shape and signature it already checked.
For each one the sequencer answers, without waiting on anything:

* :class:`Duplicate` — this id is sequenced already; the answer is its first receipt,
  so a client that retries after a lost ack gets the same receipt (idempotence).
* :class:`Parked` — a dependency is not sequenced yet. The event waits in a bounded
  parking area; when its last missing dependency is sequenced it is sequenced too,
  and if that does not happen within ``park_timeout_ms`` :meth:`Sequencer.expire`
  rejects it with ``missing_deps``. So a namespace's order is always a linear
  extension of causal order (DESIGN.md, "The event").
* :class:`Sequenced` — the event (and any parked events it released, in the order
  they became ready) got the next gapless ``seq`` of its namespace, a receipt chained
  to the previous one, and a hybrid-logical-clock value larger than the relay's last
  and larger than every dependency's, so ``hlc`` order also extends causal order
  across namespaces.
* :class:`Rejected` — with a protocol error code.

The sequencer knows which ids are sequenced through two maps: ids it sequenced that
are not committed yet (never evicted: the store cannot answer for them), and a bounded
cache of committed ids (the caller moves ids there with :meth:`Sequencer.committed`).
Ids it does not know may still be in the store from before a restart, so the caller
first asks :meth:`Sequencer.unknown`, looks those ids up in the store and feeds what it
found to :meth:`Sequencer.learn`, then offers — with no await in between, so the answer
is consistent. A parked event remembers its dependencies' largest hlc as they become
known, so releasing it never depends on the cache still holding them.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from agent_sdk.errors import ErrorCode
from agent_sdk.wire import ZERO_HASH, SignedEvent, make_receipt
from relay.store import Head, Located, Record

HLC_SHIFT = 16
"""An HLC value is ``(wall-clock ms << 16) | counter``: one int that sorts correctly."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_parked: int = 10_000
    park_timeout_ms: int = 10_000
    max_clock_skew_ms: int | None = 24 * 3600 * 1000
    max_dep_ahead_ms: int | None = 60_000
    """How far past the relay's clock a dependency's hlc may be, when it is past the
    relay's own last hlc too: only another relay's event can be, and every hlc after
    it would follow it ahead of the wall clock, so that leases and auctions, timed by
    the wall clock, would run late by as much (protocol 4.3)."""
    known_capacity: int = 1_000_000


@dataclass(frozen=True, slots=True)
class Sequenced:
    records: tuple[Record, ...]


@dataclass(frozen=True, slots=True)
class Duplicate:
    located: Located


@dataclass(frozen=True, slots=True)
class Parked:
    missing: frozenset[bytes]


@dataclass(frozen=True, slots=True)
class Rejected:
    code: ErrorCode
    reason: str


Outcome = Sequenced | Duplicate | Parked | Rejected


@dataclass(slots=True)
class _Parking:
    event: SignedEvent
    deadline_ms: int
    missing: set[bytes] = field(default_factory=set)
    dep_hlc: int = 0  # the largest hlc among its deps known so far


class Gate(Protocol):
    """Checks an event parked earlier again as it is released: the state its check
    read may have changed while it waited (a namespace's policy, relay/access.py)."""

    def refuse(self, signed: SignedEvent, now_ms: int) -> Rejected | None: ...

    def sequenced(self, record: Record) -> None:
        """Told each record as it is sequenced, before the next one is checked."""


class Sequencer:
    """Sequences the events of the namespaces homed on one relay.

    ``heads`` and ``hlc`` restore the state after a restart (from the store).
    """

    def __init__(
        self,
        relay_key: bytes,
        heads: Mapping[str, Head] | None = None,
        hlc: int = 0,
        limits: Limits | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.relay_key = relay_key
        self.gate = gate
        self.refused: list[tuple[SignedEvent, Rejected]] = []
        """Released events refused (by the gate, or for a dependency too far ahead,
        Limits.max_dep_ahead_ms): the caller answers them and clears it.
        (What waits on one stays parked until its deadline: its dep never came.)"""
        self.limits = limits or Limits()
        self.heads: dict[str, Head] = dict(heads or {})
        self.hlc = max([hlc, *(head.hlc for head in self.heads.values())])
        self._known: dict[bytes, Located] = {}  # committed: a bounded cache
        self._uncommitted: dict[bytes, Located] = {}  # sequenced, not yet committed
        self._parked: dict[bytes, _Parking] = {}
        self._waiting: dict[bytes, list[bytes]] = {}  # missing dep -> parked ids
        self._deadlines: list[tuple[int, bytes]] = []  # a heap; may hold stale entries

    # -- knowledge of what is sequenced -------------------------------------------

    def unknown(self, events: Iterable[SignedEvent]) -> set[bytes]:
        """Ids among these events and their deps that the store must be asked about."""
        ids: set[bytes] = set()
        for signed in events:
            for event_id in (signed.id, *signed.event.deps):
                if self._locate(event_id) is None and event_id not in self._parked:
                    ids.add(event_id)
        return ids

    def committed(self, ids: Iterable[bytes]) -> None:
        """These sequenced ids are committed: the store answers for them from now on."""
        for event_id in ids:
            located = self._uncommitted.pop(event_id, None)
            if located is not None:
                self._remember(event_id, located)

    def learn(self, found: Mapping[bytes, Located]) -> None:
        """Record ids the store reported as committed."""
        for event_id, located in found.items():
            self._remember(event_id, located)

    def locate(self, event_id: bytes) -> Located | None:
        """Where an id is sequenced, if the sequencer knows (committed or not)."""
        return self._locate(event_id)

    def _locate(self, event_id: bytes) -> Located | None:
        located = self._uncommitted.get(event_id)
        return located if located is not None else self._known.get(event_id)

    @property
    def parked_count(self) -> int:
        return len(self._parked)

    def _remember(self, event_id: bytes, located: Located) -> None:
        known = self._known
        known.pop(event_id, None)
        known[event_id] = located
        if len(known) > self.limits.known_capacity:
            # Oldest first (dicts keep insertion order); all committed, so the store
            # answers for them.
            del known[next(iter(known))]

    # -- offering events -----------------------------------------------------------

    def offer(self, signed: SignedEvent, now_ms: int) -> Outcome:
        """Decide what happens to one verified event (see the module docstring)."""
        located = self._locate(signed.id)
        if located is not None:
            return Duplicate(located)
        parking = self._parked.get(signed.id)
        if parking is not None:
            return Parked(frozenset(parking.missing))
        skew = self.limits.max_clock_skew_ms
        if skew is not None and abs(signed.event.ts - now_ms) > skew:
            return Rejected(
                ErrorCode.BAD_TIMESTAMP,
                f"ts is {signed.event.ts - now_ms} ms from the relay clock; limit {skew}",
            )
        dep_hlc, missing = 0, set()
        for dep in signed.event.deps:
            known = self._locate(dep)
            if known is None:
                missing.add(dep)
            else:
                dep_hlc = max(dep_hlc, known.hlc)
        if missing:
            if len(self._parked) >= self.limits.max_parked:
                return Rejected(ErrorCode.MISSING_DEPS, "deps not sequenced and parking is full")
            deadline_ms = now_ms + self.limits.park_timeout_ms
            self._parked[signed.id] = _Parking(signed, deadline_ms, missing, dep_hlc)
            heapq.heappush(self._deadlines, (deadline_ms, signed.id))
            for dep in missing:
                self._waiting.setdefault(dep, []).append(signed.id)
            return Parked(frozenset(missing))
        ahead = self._ahead(dep_hlc, now_ms)
        if ahead is not None:
            return ahead
        return Sequenced(self._sequence_with_released(signed, dep_hlc, now_ms))

    def _ahead(self, dep_hlc: int, now_ms: int) -> Rejected | None:
        """Refuse an event whose dependency's hlc is too far ahead (Limits)."""
        bound = self.limits.max_dep_ahead_ms
        if bound is None or dep_hlc <= self.hlc:  # its own records never are past it
            return None
        ahead_ms = (dep_hlc >> HLC_SHIFT) - now_ms  # from the clock: step by step, too
        if ahead_ms <= bound:
            return None
        return Rejected(
            ErrorCode.BAD_TIMESTAMP,
            f"a dependency's hlc is {ahead_ms} ms ahead of this relay's clock; limit "
            f"{bound}: the clock of the relay that sequenced it is off",
        )

    def arrived(self, found: Mapping[bytes, Located], now_ms: int) -> tuple[Record, ...]:
        """Events of other relays' namespaces, now stored in a mirror: remember them,
        and sequence the parked events that waited for them (federation)."""
        records: list[Record] = []
        for event_id, located in found.items():
            self._remember(event_id, located)
            for waiter_id in self._waiting.pop(event_id, ()):
                parking = self._parked[waiter_id]
                parking.missing.discard(event_id)
                parking.dep_hlc = max(parking.dep_hlc, located.hlc)
                if not parking.missing:
                    del self._parked[waiter_id]
                    event, dep_hlc = parking.event, parking.dep_hlc
                    records += self._sequence_with_released(
                        event, dep_hlc, now_ms, first_checked=False
                    )
        return tuple(records)

    def expire(self, now_ms: int) -> list[tuple[SignedEvent, Rejected]]:
        """Reject every parked event whose deadline has passed."""
        out = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now_ms:
            deadline_ms, event_id = heapq.heappop(deadlines)
            parking = self._parked.get(event_id)
            if parking is None or parking.deadline_ms != deadline_ms:
                continue  # released meanwhile (or parked again later): a stale entry
            del self._parked[event_id]
            for dep in parking.missing:
                waiters = self._waiting.get(dep)
                if waiters is not None:
                    waiters.remove(event_id)
                    if not waiters:
                        del self._waiting[dep]
            missing = ", ".join(sorted(dep.hex()[:16] for dep in parking.missing))
            reason = f"deps not sequenced within {self.limits.park_timeout_ms} ms: {missing}"
            out.append((parking.event, Rejected(ErrorCode.MISSING_DEPS, reason)))
        return out

    def next_deadline_ms(self) -> int | None:
        """When :meth:`expire` next has work, for the caller's timer."""
        deadlines = self._deadlines
        while deadlines:  # drop entries of events released since they parked
            deadline_ms, event_id = deadlines[0]
            parking = self._parked.get(event_id)
            if parking is not None and parking.deadline_ms == deadline_ms:
                return deadline_ms
            heapq.heappop(deadlines)
        return None

    # -- sequencing ------------------------------------------------------------------

    def _sequence_with_released(
        self, first: SignedEvent, dep_hlc: int, now_ms: int, *, first_checked: bool = True
    ) -> tuple[Record, ...]:
        records = []
        ready = deque([(first, dep_hlc)])
        checked = first_checked  # the caller checked an event offered now; not a released one
        while ready:
            signed, dep_hlc = ready.popleft()
            if not checked:
                rejected = self._ahead(dep_hlc, now_ms)
                if rejected is None and self.gate is not None:
                    rejected = self.gate.refuse(signed, now_ms)
                if rejected is not None:
                    self.refused.append((signed, rejected))
                    continue
            checked = False
            record = self._sequence(signed, dep_hlc, now_ms)
            if self.gate is not None:
                self.gate.sequenced(record)
            records.append(record)
            for waiter_id in self._waiting.pop(signed.id, ()):
                parking = self._parked[waiter_id]
                parking.missing.discard(signed.id)
                parking.dep_hlc = max(parking.dep_hlc, record.hlc)
                if not parking.missing:
                    del self._parked[waiter_id]
                    ready.append((parking.event, parking.dep_hlc))
        return tuple(records)

    def _sequence(self, signed: SignedEvent, dep_hlc: int, now_ms: int) -> Record:
        event = signed.event
        hlc = max(self.hlc + 1, now_ms << HLC_SHIFT, dep_hlc + 1)
        self.hlc = hlc
        head = self.heads.get(event.ns)
        seq = 1 if head is None else head.seq + 1
        receipt = make_receipt(
            id=signed.id,
            ns=event.ns,
            seq=seq,
            hlc=hlc,
            prev=ZERO_HASH if head is None else head.hash,
            relay=self.relay_key,
        )
        self.heads[event.ns] = Head(event.ns, seq, receipt.hash, hlc)
        self._uncommitted[signed.id] = Located(event.ns, seq, hlc)
        return Record(
            ns=event.ns,
            seq=seq,
            id=signed.id,
            kind=event.kind,
            author=event.author,
            hlc=hlc,
            event=signed.raw,
            sig=signed.sig,
            receipt=receipt.raw,
        )
