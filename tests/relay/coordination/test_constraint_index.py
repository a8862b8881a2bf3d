"""A constraint's reserved total is a running sum and its lapses come off a heap of
expiries, not a pass over every open reservation: they must decide what the scan did.

``constraint.reserve`` lapsed the constraint (a pass over its open reservations),
summed what they hold (a second pass), and its answer summed them again. The property
drives define, reserve, commit, renew, release and waits against ``ScanConstraints``,
the scan kept here as the reference, and after every step compares the outcome (the
value or the refusal's code), ``reserved`` at now and later, the open reservations, and
a constraint rebuilt from its reservations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.coordination.constraints import (
    MAX_RESERVATIONS,
    Constraint,
    Constraints,
    Reservation,
    _amount,
)
from relay.coordination.fields import Conflict

AGENTS = [bytes([n]) * 32 for n in range(1, 4)]


@dataclass
class ScanConstraint:
    name: str
    owner: bytes
    limit: int
    used: int = 0
    reservations: dict[str, Reservation] = field(default_factory=dict)

    def reserved(self, now_ms: int) -> int:
        return sum(r.amount for r in self.reservations.values() if r.expires_ms > now_ms)

    def lapse(self, now_ms: int) -> None:
        gone = [rid for rid, r in self.reservations.items() if r.expires_ms <= now_ms]
        for rid in gone:
            del self.reservations[rid]


@dataclass
class ScanConstraints:
    """The code before the index: every lapse and every total a pass."""

    by_name: dict[str, ScanConstraint] = field(default_factory=dict)
    issued: int = 0

    def define(self, name: str, wanted: object, author: bytes, now_ms: int) -> ScanConstraint:
        limit = _amount(wanted, "limit")
        current = self.by_name.get(name)
        if current is None:
            current = self.by_name[name] = ScanConstraint(name, author, limit)
            return current
        if author != current.owner:
            raise Conflict("not_owner", "")
        current.lapse(now_ms)
        if limit < current.used + current.reserved(now_ms):
            raise Conflict("below_use", "")
        current.limit = limit
        return current

    def reserve(
        self, name: str, wanted: object, author: bytes, now_ms: int, ttl_ms: int
    ) -> Reservation:
        constraint = self._get(name)
        amount = _amount(wanted, "amount")
        if amount == 0:
            raise Conflict("bad_request", "")
        constraint.lapse(now_ms)
        if len(constraint.reservations) >= MAX_RESERVATIONS:
            raise Conflict("crowded", "")
        if amount > constraint.limit - constraint.used - constraint.reserved(now_ms):
            raise Conflict("exceeded", "")
        self.issued += 1
        reservation = Reservation(f"res-{self.issued}", author, amount, now_ms + ttl_ms)
        constraint.reservations[reservation.id] = reservation
        return reservation

    def commit(
        self, name: str, rid: str, author: bytes, now_ms: int, amount: int | None
    ) -> ScanConstraint:
        constraint = self._get(name)
        reservation = self._held(constraint, rid, author, now_ms)
        used = reservation.amount if amount is None else _amount(amount, "amount")
        if used > reservation.amount:
            raise Conflict("exceeded", "")
        del constraint.reservations[rid]
        constraint.used += used
        return constraint

    def renew(self, name: str, rid: str, author: bytes, now_ms: int, ttl_ms: int) -> Reservation:
        reservation = self._held(self._get(name), rid, author, now_ms)
        reservation.expires_ms = now_ms + ttl_ms
        return reservation

    def release(self, name: str, rid: str, author: bytes, now_ms: int) -> ScanConstraint:
        constraint = self._get(name)
        self._held(constraint, rid, author, now_ms)
        del constraint.reservations[rid]
        return constraint

    def _get(self, name: str) -> ScanConstraint:
        constraint = self.by_name.get(name)
        if constraint is None:
            raise Conflict("not_found", "")
        return constraint

    def _held(
        self, constraint: ScanConstraint, rid: str, author: bytes, now_ms: int
    ) -> Reservation:
        reservation = constraint.reservations.get(rid)
        if reservation is None or reservation.expires_ms <= now_ms:
            constraint.lapse(now_ms)
            raise Conflict("expired", "")
        if reservation.holder != author:
            raise Conflict("not_holder", "")
        return reservation


NAMES = ["a", "b"]
NAME, WHO, RID = st.sampled_from(NAMES), st.integers(0, 1), st.integers(1, 10)
reserve = st.tuples(st.just("reserve"), NAME, WHO, st.integers(0, 12), st.integers(1, 40))
step = st.one_of(
    st.tuples(st.just("define"), NAME, st.integers(0, 2), st.integers(0, 60)),
    reserve,
    reserve,
    st.tuples(st.just("commit"), NAME, WHO, RID, st.one_of(st.none(), st.integers(0, 12))),
    st.tuples(st.just("renew"), NAME, WHO, RID, st.integers(1, 40)),
    st.tuples(st.just("release"), NAME, WHO, RID),
    st.tuples(st.just("wait"), st.integers(0, 25)),
)


def outcome(cs: Constraints | ScanConstraints, *step: Any) -> tuple[object, ...]:
    """What a step answered: the value it returned, or the code it was refused with."""
    try:
        got = apply(cs, *step)
    except Conflict as refused:
        return ("refused", refused.problem)
    if isinstance(got, Reservation):
        return ("reservation", got.id, got.holder, got.amount, got.expires_ms)
    return ("constraint", got.name, got.limit, got.used)


def apply(
    cs: Constraints | ScanConstraints, op: str, name: str, author: bytes, now: int, rest: list
) -> object:  # type: ignore[type-arg]
    if op == "define":
        return cs.define(name, rest[0], author, now)
    if op == "reserve":
        return cs.reserve(name, rest[0], author, now, rest[1])
    rid = f"res-{rest[0]}"
    if op == "commit":
        return cs.commit(name, rid, author, now, rest[1])
    if op == "renew":
        return cs.renew(name, rid, author, now, rest[1])
    return cs.release(name, rid, author, now)


def snapshot(constraint: Constraint | ScanConstraint, now: int) -> object:
    """What any reader at ``now`` or later sees: the limits, the use, the open
    reservations and their total (at now and at each later expiry)."""
    open_ = {rid: r for rid, r in constraint.reservations.items() if r.expires_ms > now}
    later = sorted({now, *(r.expires_ms for r in open_.values()), now + 1000})
    return (constraint.limit, constraint.used, open_, [constraint.reserved(t) for t in later])


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.lists(step, min_size=10, max_size=60))
def test_constraints_decide_what_the_scan_decided(steps: list[tuple]) -> None:  # type: ignore[type-arg]
    indexed, scan = Constraints(), ScanConstraints()
    for cs in (indexed, scan):
        for name in NAMES:
            cs.define(name, 40, AGENTS[0], 0)
    now = 0
    for op, *args in steps:
        if op == "wait":
            now += args[0]
            continue
        name, who, *rest = args
        author = AGENTS[who]
        got = [outcome(cs, op, name, author, now, rest) for cs in (indexed, scan)]
        assert got[0] == got[1]
        assert indexed.issued == scan.issued
        assert indexed.by_name.keys() == scan.by_name.keys()
        for key, constraint in indexed.by_name.items():
            reference = scan.by_name[key]
            assert snapshot(constraint, now) == snapshot(reference, now)
            # Lapsed ones may have gone sooner than the scan dropped them, never others.
            assert constraint.reservations.items() <= reference.reservations.items()
            rebuilt = Constraint(constraint.name, constraint.owner, constraint.limit,
                                 constraint.used, dict(constraint.reservations))  # fmt: skip
            assert rebuilt == constraint
            assert snapshot(rebuilt, now) == snapshot(constraint, now)
            assert constraint._amounts == sum(r.amount for r in constraint.reservations.values())


class Counted(Reservation):
    """A reservation that counts the reads of its expiry."""

    __slots__ = ()
    reads = 0

    def __getattribute__(self, attr: str) -> object:
        if attr == "expires_ms":
            Counted.reads += 1
        return object.__getattribute__(self, attr)


def test_a_reserve_does_not_read_every_open_reservation() -> None:
    """10,000 open reservations (the cap): a reserve and its answer's total read a few
    of them (the scan read each one three times: 0.6 ms a request)."""
    old = [Counted(f"old-{n}", AGENTS[1], 1, 1_000 + n) for n in range(MAX_RESERVATIONS - 1)]
    constraint = Constraint("c", AGENTS[0], 10**9, 0, {r.id: r for r in old})
    constraints = Constraints({"c": constraint})
    Counted.reads = 0
    made = constraints.reserve("c", 5, AGENTS[0], 500, 10_000)
    assert constraint.reserved(500) == MAX_RESERVATIONS - 1 + 5
    constraints.release("c", made.id, AGENTS[0], 600)
    assert constraint.reserved(600) == MAX_RESERVATIONS - 1
    assert Counted.reads < 20
    # Half of them lapse: each is dropped once, and the total is right again.
    assert constraint.reserved(6_000) == MAX_RESERVATIONS - 1 - 5_001
    constraints.reserve("c", 1, AGENTS[0], 6_000, 10)
    assert len(constraint.reservations) == MAX_RESERVATIONS - 1 - 5_001 + 1
    Counted.reads = 0
    constraints.reserve("c", 1, AGENTS[0], 6_000, 10)
    assert constraint.reserved(6_000) == MAX_RESERVATIONS - 1 - 5_001 + 2
    assert Counted.reads < 20


def test_a_reservation_renewed_back_to_an_earlier_expiry_counts_once() -> None:
    """Renewed to 100, then 200, then 100 again: two equal heap entries are current; a
    total read at 100 (before anything lapses there) takes the reservation off once."""
    constraints = Constraints()
    constraint = constraints.define("c", 50, AGENTS[0], 0)
    made = constraints.reserve("c", 7, AGENTS[0], 0, 50)
    kept = constraints.reserve("c", 3, AGENTS[1], 0, 1_000)
    for now, ttl in ((10, 90), (20, 180), (30, 70)):
        constraints.renew("c", made.id, AGENTS[0], now, ttl)
    assert made.expires_ms == 100
    assert [constraint.reserved(t) for t in (99, 100, 999, 1_000)] == [10, 3, 3, 0]
    constraint.lapse(100)
    assert constraint.reservations == {kept.id: kept}
    assert constraint.reserved(100) == 3
