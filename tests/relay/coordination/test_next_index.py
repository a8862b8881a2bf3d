"""``wo.next`` reads an index, not every order: it must pick exactly what a scan would.

A relay decides requests again when it replays its log, so the pick is part of the
protocol: the property below drives a ledger through random claims, renewals,
releases, completions, blocks, reservations, timer runs and clock jumps, and at
every ``next`` compares its choice with the scan of the definition (the open order
of highest priority, oldest first, counting lapsed claims as open and skipping
reserved orders).
"""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.coordination.ledger import Contract, Done, Ledger, Rejection, Status, WorkOrder

AGENTS = [bytes([n]) * 32 for n in range(1, 4)]

step = st.one_of(
    st.tuples(st.just("create"), st.integers(0, 3)),
    st.tuples(st.just("next"), st.integers(0, 2)),
    st.tuples(st.just("renew"), st.integers(0, 2)),
    st.tuples(st.just("release"), st.integers(0, 2)),
    st.tuples(st.just("done"), st.integers(0, 2)),
    st.tuples(st.just("block"), st.integers(0, 2)),
    st.tuples(st.just("reopen"), st.integers(0, 30)),
    st.tuples(st.just("reserve"), st.integers(0, 6)),
    st.tuples(st.just("unreserve"), st.integers(0, 6)),
    st.tuples(st.just("timer"), st.just(0)),
    st.tuples(st.just("wait"), st.integers(0, 40_000)),
)


def scan(ledger: Ledger, now: int) -> str | None:
    """The definition of ``next``'s pick, by brute force."""
    candidates: list[WorkOrder] = [
        order
        for order in ledger.orders.values()
        if ledger.status(order.id, now) is Status.OPEN and order.id not in ledger.reserved
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda o: (o.contract.priority, -int(o.id[3:]))).id


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(step, max_size=60))
# An order met under auction leaves the index; once its auction ends it is back.
@example([("create", 1), ("reserve", 1), ("create", 0), ("next", 0), ("unreserve", 1), ("next", 1)])
# A claim that lapsed is open before the timer says so: next gives it out again, ahead
# of an open order of lower priority.
@example([("create", 0), ("create", 1), ("next", 0), ("wait", 10_000), ("next", 1)])
def test_next_picks_what_a_scan_of_every_order_would(steps: list[tuple[str, int]]) -> None:
    ledger = Ledger()
    now = 0
    held: dict[bytes, tuple[str, int]] = {}
    for op, arg in steps:
        if op == "create":
            ledger.create(Contract(title="t", priority=arg), AGENTS[0], now)
        elif op == "next":
            expected = scan(ledger, now)
            outcome = ledger.next(AGENTS[arg], now, ttl_ms=10_000)
            if expected is None:
                assert isinstance(outcome, Rejection)
            else:
                assert isinstance(outcome, Done) and outcome.order == expected
                assert outcome.lease is not None
                held[AGENTS[arg]] = (outcome.order, outcome.lease.token)
        elif op in ("renew", "release", "done", "block") and AGENTS[arg] in held:
            order, token = held[AGENTS[arg]]
            if op == "renew":
                ledger.renew(order, AGENTS[arg], token, now, ttl_ms=10_000)
            elif op == "release":
                ledger.release(order, AGENTS[arg], token, now)
            else:
                status = Status.DONE if op == "done" else Status.BLOCKED
                ledger.update(order, AGENTS[arg], token, status, now)
        elif op == "reopen" and f"wo-{arg}" in ledger.orders:
            ledger.update(f"wo-{arg}", AGENTS[0], None, Status.OPEN, now)  # blocked: anyone
        elif op == "reserve" and f"wo-{arg}" in ledger.orders:
            ledger.reserve(f"wo-{arg}", "auction-1")
        elif op == "unreserve":
            ledger.unreserve(f"wo-{arg}")
        elif op == "timer":
            ledger.expire(now)
        elif op == "wait":
            now += arg
    assert (scan(ledger, now) is None) == isinstance(ledger.next(AGENTS[0], now), Rejection)


class _Reads(dict[str, WorkOrder]):
    """The ledger's orders, counting the lookups ``next`` makes."""

    reads = 0

    def __getitem__(self, key: str) -> WorkOrder:
        self.reads += 1
        return super().__getitem__(key)


def test_orders_under_auction_are_not_read_again_by_every_next() -> None:
    """1,000 open orders under auction rank first: the first ``next`` steps over them,
    later ones do not read them again (the old index popped and pushed back every one
    on every call: about 7 ms a claim with 10,000 auctions open). An order whose
    auction ends unawarded is given out again, in its place."""
    ledger = Ledger()
    for n in range(1, 1001):
        ledger.create(Contract(title="auctioned", priority=5), AGENTS[0], 0)
        ledger.reserve(f"wo-{n}", f"auc-{n}")
    for _ in range(3):
        ledger.create(Contract(title="plain"), AGENTS[0], 0)
    orders = ledger.orders = _Reads(ledger.orders)
    first = ledger.next(AGENTS[1], 0)
    assert isinstance(first, Done) and first.order == "wo-1001"
    orders.reads = 0
    second = ledger.next(AGENTS[1], 0)
    assert isinstance(second, Done) and second.order == "wo-1002"
    assert orders.reads < 10, orders.reads
    ledger.unreserve("wo-500")  # its auction ended with nobody to award
    again = ledger.next(AGENTS[2], 0)
    assert isinstance(again, Done) and again.order == "wo-500"
    assert scan(ledger, 0) == "wo-1003"
