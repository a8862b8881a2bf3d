"""The relay's coordination host: one coordinator per namespace, fed in log order (pure).

The node calls :meth:`Host.on_sequenced` for every record the moment the sequencer
places it — before commit, so a request's outcome joins the same commit batch, right
behind it — and appends the outcome the host returns as a relay-signed event with the
request in its ``deps``. Time is the record's own HLC, so deciding is a fold: at
start-up :meth:`Host.rebuild` feeds the stored logs through the same path and reaches
the same state, and the outcomes it computes equal the ones in the log.

The node's timer asks the host what is due, and when next, after every outcome it
appends. A relay may home thousands of namespaces, so neither question is a pass over
them: the host remembers which namespaces saw a record since the timer last looked
(what is due there may come from the record itself: an auction settles when its order
is done) and keeps every namespace's next expiry in a heap; stale entries are checked
against the namespace as they surface.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from agent_sdk.wire import canonical, decode
from relay.coordination.decisions import TIMER_KINDS as DECISION_EVENTS
from relay.coordination.leases import TtlBounds
from relay.coordination.requests import (
    AUCTION_EVENTS,
    CLAIM_TTL,
    EXPIRED,
    LEFT,
    LOCK_TTL,
    RELAY_KINDS,
    REQUEST_KINDS,
    Coordinator,
    Outcome,
)
from relay.sequencer import HLC_SHIFT
from relay.store import Record

ANSWER_KINDS = RELAY_KINDS - {EXPIRED}
"""The relay's answers to requests: each names its request in ``req``."""


class Diverged(Exception):
    """Folding a log decided a request differently from the outcome the log holds.

    The lease bounds (or the code) differ from those the log was decided with:
    serving on would give agents a state that contradicts what they were told.
    """

    def __init__(self, ns: str, seq: int, logged: str, decided: str) -> None:
        super().__init__(
            f"{ns} seq {seq}: the log says {logged}, this relay now decides {decided}; "
            "start it with the settings the log was written with (lease bounds, "
            "initial stake)"
        )
        self.ns, self.seq = ns, seq


@dataclass
class Host:
    relay_key: bytes
    claim_ttl: TtlBounds = CLAIM_TTL
    lock_ttl: TtlBounds = LOCK_TTL
    coordinators: dict[str, Coordinator] = field(default_factory=dict)
    initial_stake: int = 100
    half_life_ms: int = 7 * 24 * 3600 * 1000
    routed: bool = False
    """Set when a record was queued for routing: the node's timer has work now."""
    _touched: set[str] = field(default_factory=set, repr=False, compare=False)
    """Namespaces with a record since the timer last ran there."""
    _timers: list[tuple[int, str]] = field(default_factory=list, repr=False, compare=False)
    """A heap of (next expiry, namespace); may hold stale entries."""
    _scheduled: dict[str, int | None] = field(default_factory=dict, repr=False, compare=False)
    """Each namespace's next expiry as last put on the heap."""
    _order: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    """Namespaces in the order their coordinators began: the timer's order across them."""

    def __post_init__(self) -> None:
        for ns in self.coordinators:  # given coordinators: the timer looks at each once
            self._order[ns] = len(self._order)
            self._touched.add(ns)

    def coordinator(self, ns: str) -> Coordinator:
        coordinator = self.coordinators.get(ns)
        if coordinator is None:
            coordinator = Coordinator.with_bounds(self.claim_ttl, self.lock_ttl)
            coordinator.stakes.initial = self.initial_stake
            coordinator.reputation.half_life_ms = self.half_life_ms
            self.coordinators[ns] = coordinator
            self._order[ns] = len(self._order)
        self._touched.add(ns)  # (a new coordinator, or one about to decide)
        return coordinator

    def on_sequenced(self, record: Record, *, replaying: bool = False) -> Outcome | None:
        """The outcome to append after ``record``, if it is a coordination request.

        With ``replaying`` (a rebuild), the events the relay's timer wrote — a
        ``lease.expired``, an auction closed or settled, a ``dir.left`` — are applied
        again as they were, not decided again. Live, the timer applied them already.
        """
        coordinator = self.coordinators.get(record.ns)
        if coordinator is not None:
            self._touched.add(record.ns)
        if coordinator and record.event and coordinator.decisions.routes_of(record.kind):
            now_ms = record.hlc >> HLC_SHIFT
            self.routed |= coordinator.route(record.id, record.kind, _body(record), now_ms)
        if record.kind in REQUEST_KINDS:
            body = _body(record)
            coordinator = self.coordinator(record.ns)
            now_ms = record.hlc >> HLC_SHIFT
            return coordinator.decide(record.kind, body, record.author, record.id, now_ms)
        if not replaying or record.author != self.relay_key:
            return None
        if record.kind == EXPIRED:
            coordinator = self.coordinator(record.ns)
            coordinator.replay_expired(_body(record))
        elif record.kind in AUCTION_EVENTS:
            body = _body(record)
            if "req" not in body:  # the timer's: a close, a completion, a failure
                self.coordinator(record.ns).replay_auction(record.kind, body)
        elif record.kind in DECISION_EVENTS:
            body = _body(record)
            if "req" not in body:  # the timer's: a notice, a digest, a conflict's step
                self.coordinator(record.ns).replay_decisions(record.kind, body)
        elif record.kind == LEFT:
            body = _body(record)
            if "req" not in body:  # the relay's own: a disconnect, a timeout, a restart
                self.coordinator(record.ns).replay_left(body)
        return None

    def rebuild(
        self, records: Iterable[Record], answered: Callable[[bytes, Record], None] | None = None
    ) -> list[tuple[str, bytes, Outcome]]:
        """Fold stored records (one namespace, in seq order).

        Returns ``(ns, request id, outcome)`` for each request the log holds without
        its outcome: a crash can fall between the commit of a request and the commit
        of its outcome, and the relay appends those outcomes before serving again.
        Raises :class:`Diverged` when a logged outcome is not the one decided now.
        ``answered(request id, outcome record)`` is told where each answer is, so a
        request re-sent after the restart gets its outcome with its ack.
        """
        decided: dict[bytes, tuple[str, Outcome]] = {}
        for record in records:
            outcome = self.on_sequenced(record, replaying=True)
            if outcome is not None:
                decided[record.id] = (record.ns, outcome)
            elif record.kind in ANSWER_KINDS and record.author == self.relay_key:
                body = _body(record)
                request = body.get("req") if isinstance(body, dict) else None
                if request in decided:
                    if answered is not None:
                        answered(request, record)
                    _, mine = decided.pop(request)
                    if _decision(mine.kind, mine.body) != _decision(record.kind, body):
                        raise Diverged(record.ns, record.seq, *_difference(record, body, mine))
        return [(ns, req, out) for req, (ns, out) in decided.items()]

    def due(self, now_ms: int) -> list[tuple[str, Outcome]]:
        """The timer's outcomes (``lease.expired``, ``dir.left``, auction and decision
        steps) in the namespaces that saw a record since it last ran there, or whose
        next expiry has come."""
        namespaces, self._touched = self._touched, set()
        timers = self._timers
        while timers and timers[0][0] <= now_ms:
            at, ns = heapq.heappop(timers)
            namespaces.add(ns)
            if self._scheduled.get(ns) == at:
                del self._scheduled[ns]  # off the heap: _schedule puts it back if due still
        out = []
        for ns in sorted(namespaces, key=self._order.__getitem__):
            out += [(ns, outcome) for outcome in self.coordinators[ns].due(now_ms)]
            self._schedule(ns)
        return out

    def restarted(self, now_ms: int) -> list[tuple[str, Outcome]]:
        """``dir.left`` for every member present by connection: a relay that starts
        has no connections."""
        return [
            (ns, outcome)
            for ns, coordinator in self.coordinators.items()
            for member in coordinator.directory.on_connection()
            if (outcome := coordinator.disconnected(member.agent, now_ms, "relay restarted"))
        ]

    def next_expiry_ms(self) -> int | None:
        """When :meth:`due` next has work by the clock, if ever."""
        for ns in self._touched:
            self._schedule(ns)
        timers = self._timers
        while timers:
            at, ns = timers[0]
            if self._scheduled.get(ns) == at:
                return at
            heapq.heappop(timers)  # the namespace's next expiry moved since: stale
        return None

    def _schedule(self, ns: str) -> None:
        """Put the namespace's next expiry on the heap, if it moved."""
        at = self.coordinators[ns].next_expiry_ms()
        if at == self._scheduled.get(ns):
            return
        self._scheduled[ns] = at
        if at is None:
            return
        heapq.heappush(self._timers, (at, ns))
        # An expiry that moved leaves a stale entry that surfaces only when its time
        # comes: rebuild before they pile up (amortised, the heap stays O(namespaces)).
        if len(self._timers) > 2 * len(self._scheduled) + 64:
            self._timers = [(t, n) for n, t in self._scheduled.items() if t is not None]
            heapq.heapify(self._timers)


def _decision(kind: str, body: dict[str, Any]) -> tuple[str, bytes]:
    """What a replay must decide alike: the outcome, less a refusal's ``reason``. The
    reason is prose for people; a relay may word it differently (or name other lease
    bounds in it) and still have decided the same. Compared as canonical bytes: an
    agent's NaN echoed in an outcome (a member's ``meta``) is not equal to itself."""
    if kind.endswith(".rejected"):
        body = {k: v for k, v in body.items() if k != "reason"}
    return kind, canonical(body)


def _difference(record: Record, logged: dict[str, Any], decided: Outcome) -> tuple[str, str]:
    """The logged and the decided outcome, worded by what differs between them."""
    if record.kind != decided.kind:
        return (
            f"{record.kind} {logged.get('problem', '')}".strip(),
            f"{decided.kind} {decided.body.get('problem', '')}".strip(),
        )
    fields = sorted(k for k in {*logged, *decided.body} if logged.get(k) != decided.body.get(k))
    shown = ", ".join(fields)
    return (
        f"{record.kind} with {shown} = {[logged.get(k) for k in fields]}",
        f"{[decided.body.get(k) for k in fields]}",
    )


def answers(record: Record, request: bytes, relay_key: bytes) -> bool:
    """Whether ``record`` is the answer of the relay ``relay_key`` to ``request`` (8.2)."""
    if record.kind not in ANSWER_KINDS or record.author != relay_key:
        return False
    body = _body(record)
    return isinstance(body, dict) and body.get("req") == request


def _body(record: Record) -> Any:
    fields = decode(record.event)
    return fields.get("body") if isinstance(fields, dict) else None
