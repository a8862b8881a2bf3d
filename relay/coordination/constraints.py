"""Shared constraints: counters and budgets that N agents draw on together (pure).

A constraint has a ``limit``; agents ``reserve`` amounts from it, then ``commit`` what
they used (up to what they reserved; the rest goes back) or ``release`` it. The
invariant, checked at every reservation, is ``used + reserved <= limit``: agents that
each respect their share can never together exceed the whole, because a reservation
is decided against every other one, in log order.

A reservation is a lease: it has a holder, an expiry and an id that is never reused
(``res-<n>``, numbered per namespace). One not committed or released by its expiry
stops counting at any later ``now`` (the log's time), and its holder can no longer
commit it: work done past that point must reserve again. Its holder may ``renew`` it
before then. Like the ledger, every call
takes ``now_ms`` from the log, so the state is a fold: the same requests give the
same budgets anywhere.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from relay.coordination.fields import Conflict

MAX_AMOUNT = 2**53 - 1
MAX_RESERVATIONS = 10_000
"""Open reservations per constraint: past this, ``reserve`` is refused (``crowded``)."""


@dataclass(slots=True)
class Reservation:
    id: str
    holder: bytes
    amount: int
    expires_ms: int


@dataclass(slots=True)
class Constraint:
    name: str
    owner: bytes
    limit: int
    used: int = 0
    reservations: dict[str, Reservation] = field(default_factory=dict)
    """Open reservations by id (some may have lapsed since the last :meth:`lapse`).
    Changed by :meth:`hold`, :meth:`extend`, :meth:`drop` and :meth:`lapse` only,
    which keep the two derived fields below right."""
    _expiries: list[tuple[int, str]] = field(default_factory=list, compare=False, repr=False)
    """A heap of (expires_ms, id): one current entry for every reservation held; may hold
    stale entries (of reservations renewed, committed or released since)."""
    _amounts: int = field(default=0, compare=False, repr=False)
    """The sum of the amounts of every reservation in :attr:`reservations`."""

    def __post_init__(self) -> None:
        self._rebuild()

    def reserved(self, now_ms: int) -> int:
        """What the reservations open at ``now_ms`` hold (those with ``expires_ms >
        now_ms``, lapsed or not). The running sum, less what the heap's entries up to
        ``now_ms`` still hold: none right after a :meth:`lapse` at this ``now_ms``."""
        heap, held = self._expiries, self._amounts
        if not heap or heap[0][0] > now_ms:
            return held
        # Visit the heap's entries up to now_ms (children never come before their
        # parent) without changing it: a reader at any now_ms, not only the latest.
        seen: set[str] = set()
        todo = [0]
        while todo:
            i = todo.pop()
            expires_ms, rid = heap[i]
            r = self.reservations.get(rid)
            if r is not None and r.expires_ms == expires_ms and rid not in seen:
                seen.add(rid)  # (renewed back to an earlier expiry: two equal entries)
                held -= r.amount
            todo.extend(c for c in (2 * i + 1, 2 * i + 2) if c < len(heap) and heap[c][0] <= now_ms)
        return held

    def lapse(self, now_ms: int) -> None:
        """Drop the reservations whose lease ran out by ``now_ms``."""
        heap, reservations = self._expiries, self.reservations
        while heap and heap[0][0] <= now_ms:
            expires_ms, rid = heapq.heappop(heap)
            r = reservations.get(rid)
            if r is not None and r.expires_ms == expires_ms:
                del reservations[rid]
                self._amounts -= r.amount
            # else: stale (renewed, committed, released or dropped already)

    def hold(self, reservation: Reservation) -> None:
        """Add a new reservation."""
        self.reservations[reservation.id] = reservation
        self._amounts += reservation.amount
        self._timed(reservation)

    def extend(self, reservation: Reservation, expires_ms: int) -> None:
        """Move a held reservation's expiry (a renewal)."""
        if expires_ms != reservation.expires_ms:
            reservation.expires_ms = expires_ms
            self._timed(reservation)

    def drop(self, rid: str) -> Reservation:
        """Remove a held reservation (committed or released); its heap entry goes stale."""
        reservation = self.reservations.pop(rid)
        self._amounts -= reservation.amount
        return reservation

    def _timed(self, reservation: Reservation) -> None:
        heapq.heappush(self._expiries, (reservation.expires_ms, reservation.id))
        # Commits, releases and renewals leave stale entries that surface only when
        # their time comes: rebuild before they pile up (amortised, O(reservations)).
        if len(self._expiries) > 2 * len(self.reservations) + 64:
            self._rebuild()

    def _rebuild(self) -> None:
        self._expiries = [(r.expires_ms, rid) for rid, r in self.reservations.items()]
        heapq.heapify(self._expiries)
        self._amounts = sum(r.amount for r in self.reservations.values())


@dataclass
class Constraints:
    by_name: dict[str, Constraint] = field(default_factory=dict)
    issued: int = 0
    """Reservations ever made in this namespace (their ids)."""

    def define(self, name: str, wanted: object, author: bytes, now_ms: int) -> Constraint:
        """Create ``name``, or change its limit (its definer only). A limit below
        what is used and reserved now is refused: it would be broken at once."""
        limit = _amount(wanted, "limit")
        current = self.by_name.get(name)
        if current is None:
            current = self.by_name[name] = Constraint(name, author, limit)
            return current
        if author != current.owner:
            raise Conflict("not_owner", f"only the definer of {name} changes its limit")
        current.lapse(now_ms)
        in_use = current.used + current.reserved(now_ms)
        if limit < in_use:
            raise Conflict("below_use", f"{name} has {in_use} used and reserved; limit {limit}")
        current.limit = limit
        return current

    def reserve(
        self, name: str, wanted: object, author: bytes, now_ms: int, ttl_ms: int
    ) -> Reservation:
        constraint = self._get(name)
        amount = _amount(wanted, "amount")
        if amount == 0:
            raise Conflict("bad_request", "reserve at least 1")
        constraint.lapse(now_ms)
        if len(constraint.reservations) >= MAX_RESERVATIONS:
            raise Conflict("crowded", f"{name} has {MAX_RESERVATIONS} open reservations")
        available = constraint.limit - constraint.used - constraint.reserved(now_ms)
        if amount > available:
            raise Conflict("exceeded", f"{name}: {available} available, {amount} asked")
        self.issued += 1
        reservation = Reservation(f"res-{self.issued}", author, amount, now_ms + ttl_ms)
        constraint.hold(reservation)
        return reservation

    def commit(
        self, name: str, rid: str, author: bytes, now_ms: int, amount: int | None
    ) -> Constraint:
        """Count ``amount`` (default: all of it) of a reservation as used; the rest
        goes back. Only its holder, before its expiry."""
        constraint = self._get(name)
        constraint.lapse(now_ms)  # (so the answer's reserved(now) is the running sum)
        reservation = self._held(constraint, rid, author, now_ms)
        used = reservation.amount if amount is None else _amount(amount, "amount")
        if used > reservation.amount:
            raise Conflict("exceeded", f"{rid} reserved {reservation.amount}, not {used}")
        constraint.drop(rid)
        constraint.used += used
        return constraint

    def renew(self, name: str, rid: str, author: bytes, now_ms: int, ttl_ms: int) -> Reservation:
        """Extend an open reservation to ``now + ttl_ms``: an action that takes longer
        than it thought keeps its share, as a lease holder renews. Only its holder,
        before its expiry: a lapsed one must be reserved again."""
        constraint = self._get(name)
        constraint.lapse(now_ms)
        reservation = self._held(constraint, rid, author, now_ms)
        constraint.extend(reservation, now_ms + ttl_ms)
        return reservation

    def release(self, name: str, rid: str, author: bytes, now_ms: int) -> Constraint:
        constraint = self._get(name)
        constraint.lapse(now_ms)
        self._held(constraint, rid, author, now_ms)
        constraint.drop(rid)
        return constraint

    def _get(self, name: str) -> Constraint:
        constraint = self.by_name.get(name)
        if constraint is None:
            raise Conflict("not_found", f"no constraint {name}")
        return constraint

    def _held(self, constraint: Constraint, rid: str, author: bytes, now_ms: int) -> Reservation:
        reservation = constraint.reservations.get(rid)
        if reservation is None or reservation.expires_ms <= now_ms:
            constraint.lapse(now_ms)
            raise Conflict("expired", f"{rid} is not an open reservation of {constraint.name}")
        if reservation.holder != author:
            raise Conflict("not_holder", f"{rid} is not yours")
        return reservation


def _amount(value: object, name: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_AMOUNT:
        raise Conflict("bad_request", f"{name} is a whole number from 0 to {MAX_AMOUNT}")
    return value
