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

    def reserved(self, now_ms: int) -> int:
        return sum(r.amount for r in self.reservations.values() if r.expires_ms > now_ms)

    def lapse(self, now_ms: int) -> None:
        """Drop the reservations whose lease ran out by ``now_ms``."""
        gone = [rid for rid, r in self.reservations.items() if r.expires_ms <= now_ms]
        for rid in gone:
            del self.reservations[rid]


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
        constraint.reservations[reservation.id] = reservation
        return reservation

    def commit(
        self, name: str, rid: str, author: bytes, now_ms: int, amount: int | None
    ) -> Constraint:
        """Count ``amount`` (default: all of it) of a reservation as used; the rest
        goes back. Only its holder, before its expiry."""
        constraint = self._get(name)
        reservation = self._held(constraint, rid, author, now_ms)
        used = reservation.amount if amount is None else _amount(amount, "amount")
        if used > reservation.amount:
            raise Conflict("exceeded", f"{rid} reserved {reservation.amount}, not {used}")
        del constraint.reservations[rid]
        constraint.used += used
        return constraint

    def renew(self, name: str, rid: str, author: bytes, now_ms: int, ttl_ms: int) -> Reservation:
        """Extend an open reservation to ``now + ttl_ms``: an action that takes longer
        than it thought keeps its share, as a lease holder renews. Only its holder,
        before its expiry: a lapsed one must be reserved again."""
        reservation = self._held(self._get(name), rid, author, now_ms)
        reservation.expires_ms = now_ms + ttl_ms
        return reservation

    def release(self, name: str, rid: str, author: bytes, now_ms: int) -> Constraint:
        constraint = self._get(name)
        self._held(constraint, rid, author, now_ms)
        del constraint.reservations[rid]
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
