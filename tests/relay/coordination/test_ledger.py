"""The work-order machine: the workledger loop, refusals, expiry, and fold determinism."""

from __future__ import annotations

from typing import Any

import pytest

from relay.coordination.ledger import (
    TRANSITIONS,
    Contract,
    Done,
    Gate,
    Ledger,
    Problem,
    Rejection,
    Status,
)

A, B = b"a" * 32, b"b" * 32
MIN = 60_000


def created(ledger: Ledger, title: str = "fix", priority: int = 0, now: int = 0) -> str:
    return ledger.create(Contract(title=title, priority=priority), A, now).order


def claimed(outcome: Any) -> int:
    assert isinstance(outcome, Done) and outcome.lease is not None, outcome
    return outcome.lease.token


def rejected(outcome: Any, problem: Problem) -> Rejection:
    assert isinstance(outcome, Rejection) and outcome.problem is problem, outcome
    return outcome


def test_the_workledger_loop() -> None:
    ledger = Ledger()
    order = created(ledger)
    assert order == "wo-1"
    token = claimed(ledger.claim(order, A, now_ms=10, ttl_ms=MIN))
    assert ledger.status(order, 11) is Status.CLAIMED
    assert isinstance(ledger.renew(order, A, token, now_ms=20, ttl_ms=MIN), Done)
    assert isinstance(ledger.note(order, A, "halfway", now_ms=30, token=token), Done)
    assert isinstance(ledger.update(order, A, token, Status.DONE, now_ms=40), Done)
    wo = ledger.orders[order]
    assert wo.status is Status.DONE and [n.text for n in wo.notes] == ["halfway"]
    assert [status for _, status, _ in wo.history] == [Status.OPEN, Status.CLAIMED, Status.DONE]


def test_a_second_claim_names_the_holder_and_expiry() -> None:
    ledger = Ledger()
    order = created(ledger)
    claimed(ledger.claim(order, A, now_ms=0, ttl_ms=MIN))
    refusal = rejected(ledger.claim(order, B, now_ms=1, ttl_ms=MIN), Problem.HELD)
    assert A.hex() in refusal.reason and str(MIN) in refusal.reason


def test_a_dead_holders_order_is_open_again_with_its_notes() -> None:
    ledger = Ledger()
    order = created(ledger)
    old = claimed(ledger.claim(order, A, now_ms=0, ttl_ms=MIN))
    ledger.note(order, A, "found the bug in parser.py", now_ms=5, token=old)
    assert ledger.status(order, MIN) is Status.OPEN  # before any timer ran
    new = claimed(ledger.claim(order, B, now_ms=MIN, ttl_ms=MIN))
    assert new > old
    rejected(ledger.update(order, A, old, Status.DONE, now_ms=MIN + 1), Problem.NOT_HOLDER)
    rejected(ledger.note(order, A, "late", now_ms=MIN + 2, token=old), Problem.NOT_HOLDER)
    assert [n.text for n in ledger.orders[order].notes] == ["found the bug in parser.py"]
    whys = [why for _, _, why in ledger.orders[order].history]
    assert "lease expired" in whys


@pytest.mark.parametrize("status", [Status.DONE, Status.BLOCKED])
def test_a_holder_paused_past_its_lease_cannot_end_the_order(status: Status) -> None:
    """Before anyone claims it again too: its token says it believes it holds the
    order, and it does not (8.4). Without a token anyone may close an open order."""
    ledger = Ledger()
    order = created(ledger)
    token = claimed(ledger.claim(order, A, now_ms=0, ttl_ms=MIN))
    rejected(ledger.update(order, A, token, status, now_ms=MIN + 1), Problem.NOT_HOLDER)
    assert ledger.orders[order].status is Status.OPEN
    assert isinstance(ledger.update(order, A, None, Status.DONE, now_ms=MIN + 2), Done)


def test_the_timer_reopens_lapsed_claims() -> None:
    ledger = Ledger()
    first, second = created(ledger), created(ledger)
    claimed(ledger.claim(first, A, now_ms=0, ttl_ms=MIN))
    claimed(ledger.claim(second, B, now_ms=0, ttl_ms=2 * MIN))
    assert ledger.expire(MIN) == [(first, 1)]
    assert ledger.orders[first].status is Status.OPEN
    assert ledger.orders[second].status is Status.CLAIMED


def test_next_takes_the_highest_priority_then_the_oldest() -> None:
    ledger = Ledger()
    low = created(ledger, "low", priority=1)
    high = created(ledger, "high", priority=5)
    high_later = created(ledger, "high too", priority=5)
    assert ledger.next(A, now_ms=0).order == high  # type: ignore[union-attr]
    assert ledger.next(B, now_ms=0).order == high_later  # type: ignore[union-attr]
    assert ledger.next(B, now_ms=0).order == low  # type: ignore[union-attr]
    rejected(ledger.next(B, now_ms=0), Problem.NOTHING_OPEN)


def test_a_released_order_can_be_marked_done_the_workledger_way() -> None:
    """The seed workflow releases, then sets the status: an open order may be closed
    (or blocked) by anyone; a claimed one only by its holder, with the token."""
    ledger = Ledger()
    order = created(ledger)
    token = claimed(ledger.claim(order, A, now_ms=0, ttl_ms=MIN))
    assert isinstance(ledger.release(order, A, token, now_ms=1), Done)
    assert isinstance(ledger.update(order, A, None, Status.DONE, now_ms=2), Done)
    assert ledger.orders[order].status is Status.DONE


@pytest.mark.parametrize(
    ("setup", "request_", "problem"),
    [
        ("none", ("claim", "wo-9"), Problem.NOT_FOUND),
        ("done", ("claim", None), Problem.BAD_TRANSITION),  # done -> claimed makes no sense
        ("done", ("reopen", None), Problem.BAD_TRANSITION),
        ("done", ("done", None), Problem.BAD_TRANSITION),
        ("done", ("release", None), Problem.BAD_TRANSITION),
        ("open", ("release", None), Problem.BAD_TRANSITION),
        ("claimed", ("done-without-token", None), Problem.NOT_HOLDER),
        ("claimed", ("renew-by-other", None), Problem.NOT_HOLDER),
        ("claimed", ("stale-token", None), Problem.STALE_TOKEN),
        ("open", ("claim-ttl", 10), Problem.BAD_TTL),
    ],
)
def test_refusals_leave_the_state_untouched(
    setup: str, request_: tuple[str, Any], problem: Problem
) -> None:
    ledger = Ledger()
    order = created(ledger)
    token = 0
    if setup in ("claimed", "done"):
        token = claimed(ledger.claim(order, A, now_ms=0, ttl_ms=MIN))
    if setup == "done":
        ledger.update(order, A, token, Status.DONE, now_ms=1)
    before = (ledger.orders[order].status, list(ledger.orders[order].history))
    kind, arg = request_
    outcome = {
        "claim": lambda: ledger.claim(arg or order, B, now_ms=2, ttl_ms=MIN),
        "reopen": lambda: ledger.update(order, A, None, Status.OPEN, now_ms=2),
        "done": lambda: ledger.update(order, A, None, Status.DONE, now_ms=2),
        "release": lambda: ledger.release(order, A, token, now_ms=2),
        "done-without-token": lambda: ledger.update(order, A, None, Status.DONE, now_ms=2),
        "renew-by-other": lambda: ledger.renew(order, B, token, now_ms=2, ttl_ms=MIN),
        "stale-token": lambda: ledger.renew(order, A, token + 1, now_ms=2, ttl_ms=MIN),
        "claim-ttl": lambda: ledger.claim(order, B, now_ms=2, ttl_ms=arg),
    }[kind]()
    rejected(outcome, problem)
    assert (ledger.orders[order].status, ledger.orders[order].history) == before


def test_blocked_orders_are_reopened_by_anyone() -> None:
    ledger = Ledger()
    order = created(ledger)
    token = claimed(ledger.claim(order, A, now_ms=0, ttl_ms=MIN))
    assert isinstance(ledger.update(order, A, token, Status.BLOCKED, 1, "needs creds"), Done)
    assert ledger.orders[order].reason == "needs creds"
    rejected(ledger.claim(order, B, now_ms=2, ttl_ms=MIN), Problem.BAD_TRANSITION)
    assert isinstance(ledger.update(order, B, None, Status.OPEN, now_ms=3), Done)
    claimed(ledger.claim(order, B, now_ms=4, ttl_ms=MIN))


def test_every_transition_in_the_table_is_reachable_and_nothing_else() -> None:
    statuses = {new for new in TRANSITIONS.values()} | {old for old, _ in TRANSITIONS}
    assert statuses == set(Status)
    assert not [op for (old, op) in TRANSITIONS if old is Status.DONE]  # done is final


def test_the_same_requests_fold_to_the_same_ledger() -> None:
    def run() -> Ledger:
        ledger = Ledger()
        for n in range(5):
            created(ledger, f"t{n}", priority=n % 2, now=n)
        for now, agent in enumerate([A, B, A, B], start=10):
            ledger.next(agent, now_ms=now, ttl_ms=MIN)
        ledger.expire(10 + MIN)
        ledger.next(A, now_ms=11 + MIN, ttl_ms=MIN)
        return ledger

    first, second = run(), run()
    assert first.orders == second.orders
    assert first.leases == second.leases


def test_a_lapse_noticed_by_a_request_leaves_no_timer_behind() -> None:
    ledger = Ledger()
    order = created(ledger)
    claimed(ledger.claim(order, A, now_ms=0, ttl_ms=MIN))
    ledger.note(order, B, "poke", now_ms=MIN + 1)  # the request sees the lapse first
    assert ledger.orders[order].status is Status.OPEN
    assert ledger.leases.next_expiry_ms() is None  # else the relay's timer would spin


def test_orders_under_auction_report_each_move_and_renewal_once() -> None:
    """What the auctions' timer reads instead of every award in flight: the reserved
    orders that moved (a lapse a request noticed included) or were renewed, once."""
    ledger = Ledger()
    auctioned, free = created(ledger), created(ledger)
    ledger.reserve(auctioned, "auc-1")
    token = claimed(ledger.claim(auctioned, A, now_ms=0, ttl_ms=MIN, auction="auc-1"))
    claimed(ledger.claim(free, B, now_ms=0, ttl_ms=MIN))
    assert ledger.take_moved() == {auctioned} and ledger.take_moved() == set()
    assert isinstance(ledger.note(auctioned, A, "halfway", now_ms=1, token=token), Done)
    assert ledger.take_moved() == set()  # a note ends no award
    assert isinstance(ledger.renew(auctioned, A, token, now_ms=2, ttl_ms=MIN), Done)
    assert ledger.take_moved() == {auctioned}
    ledger.note(auctioned, B, "poke", now_ms=2 + MIN)  # the lease ran out: open again
    ledger.update(free, B, None, Status.BLOCKED, now_ms=2 + MIN)
    assert ledger.take_moved() == {auctioned}
    ledger.unreserve(auctioned)
    claimed(ledger.claim(auctioned, B, now_ms=3 + MIN, ttl_ms=MIN))
    assert ledger.take_moved() == set()


# The status table of protocol 8.4, written out here rather than read from TRANSITIONS:
# a row missing from (or added to) the code's table fails against it. Each cell is what
# one move does to an order in one status: the new status, or the problem refusing it.
MOVES = ("claim", "release", "done", "blocked", "open", "dropped", "ask", "approve", "reject")
BT, HELD = Problem.BAD_TRANSITION, Problem.HELD
TABLE: dict[Status, tuple[Status | Problem, ...]] = {
    Status.OPEN: (Status.CLAIMED, BT, Status.DONE, Status.BLOCKED, BT, Status.DROPPED, BT, BT, BT),
    Status.CLAIMED: (
        HELD, Status.OPEN, Status.DONE, Status.BLOCKED, Status.OPEN, Status.DROPPED,
        Status.AWAITING_APPROVAL, BT, BT,
    ),
    Status.BLOCKED: (BT, BT, BT, BT, Status.OPEN, Status.DROPPED, BT, BT, BT),
    Status.DONE: (BT,) * 9,
    Status.DROPPED: (BT,) * 9,
    Status.AWAITING_APPROVAL: (BT,) * 7 + (Status.OPEN, Status.BLOCKED),
}  # fmt: skip
C = b"c" * 32


def listed(gate: Gate, key: bytes) -> bool:
    """The approver check of a gate that names keys only."""
    return key in gate.approvers


def gated_order_in(status: Status) -> tuple[Ledger, str, int | None]:
    """An approved gated order (so that done is a matter of the table alone) in
    ``status``, B holding it with the returned token when claimed."""
    ledger = Ledger()
    gate = Gate("a person signs it off", approvers=(A,))
    order = ledger.create(Contract(title="deploy", approval=gate), A, 0).order
    ask = claimed(ledger.claim(order, B, now_ms=1, ttl_ms=MIN))
    assert isinstance(ledger.ask_approval(order, B, ask, 2, "ready"), Done)
    if status is not Status.AWAITING_APPROVAL:
        assert isinstance(ledger.decide(order, A, True, "", 3, listed), Done)
    token = None
    if status is Status.CLAIMED:
        token = claimed(ledger.claim(order, B, now_ms=4, ttl_ms=MIN))
    elif status in (Status.BLOCKED, Status.DONE, Status.DROPPED):
        assert isinstance(ledger.update(order, A, None, status, now_ms=4), Done)
    assert ledger.orders[order].status is status
    return ledger, order, token


@pytest.mark.parametrize("status", list(TABLE))
@pytest.mark.parametrize("move", MOVES)
def test_each_move_from_each_status_is_the_protocols_table(status: Status, move: str) -> None:
    """8.4's table, cell by cell: the holder ends a claim with its token (open too, not
    only by a release), anyone moves an unclaimed order, A approves; every move the
    table lacks is refused with bad_transition (held for a claim of a held order),
    and a refused move leaves the order as it was."""
    ledger, order, token = gated_order_in(status)
    now = 5
    # The holder with its token; unclaimed, a stranger (anyone closes, blocks and
    # reopens), but the creator for a drop.
    mover = B if token is not None else A if move == "dropped" else C
    outcome = {
        "claim": lambda: ledger.claim(order, C, now_ms=now, ttl_ms=MIN),
        "release": lambda: ledger.release(order, B, token or 1, now_ms=now),
        "ask": lambda: ledger.ask_approval(order, B, token, now, "ready"),
        "approve": lambda: ledger.decide(order, A, True, "ok", now, listed),
        "reject": lambda: ledger.decide(order, A, False, "no", now, listed),
    }.get(move, lambda: ledger.update(order, mover, token, Status(move), now_ms=now))()
    expected = TABLE[status][MOVES.index(move)]
    if isinstance(expected, Problem):
        rejected(outcome, expected)
        assert ledger.orders[order].status is status
    else:
        assert isinstance(outcome, Done), outcome
        assert outcome.status is expected and ledger.orders[order].status is expected


def test_a_dropped_order_takes_no_sub_orders() -> None:
    """Dropped is final like done (8.4.2): its creator cannot split it any more."""
    ledger = Ledger()
    parent = created(ledger)
    assert isinstance(ledger.update(parent, A, None, Status.DROPPED, now_ms=1), Done)
    refusal = rejected(
        ledger.create(Contract(title="late part"), A, 2, parent=parent), Problem.BAD_TRANSITION
    )
    assert "dropped" in refusal.reason
    assert list(ledger.orders) == [parent] and ledger.orders[parent].children == []


def test_the_last_decision_counts_for_an_order_to_be_done() -> None:
    """A rejected gated order, reopened, still needs approval; approved, it may be done;
    approved then asked again and rejected, it needs approval again (8.4.1)."""
    ledger = Ledger()
    order = ledger.create(Contract(title="deploy", approval=Gate("prod", (A,))), A, 0).order

    def decided(approved: bool, now: int) -> None:
        token = claimed(ledger.claim(order, B, now_ms=now, ttl_ms=MIN))
        assert isinstance(ledger.ask_approval(order, B, token, now + 1, "ready"), Done)
        assert isinstance(ledger.decide(order, A, approved, "", now + 2, listed), Done)
        if not approved:
            assert isinstance(ledger.update(order, C, None, Status.OPEN, now_ms=now + 3), Done)

    decided(False, 10)
    rejected(ledger.update(order, C, None, Status.DONE, now_ms=20), Problem.NEEDS_APPROVAL)
    decided(True, 30)
    decided(False, 40)
    rejected(ledger.update(order, C, None, Status.DONE, now_ms=50), Problem.NEEDS_APPROVAL)
    decided(True, 60)
    assert isinstance(ledger.update(order, C, None, Status.DONE, now_ms=70), Done)


def test_a_logged_expiry_reopens_only_the_claims_it_names() -> None:
    """8.6: a pair applies only while the order's current lease has its token; a pair
    of an earlier claim (the order claimed again since) or of no order changes nothing."""
    ledger = Ledger()
    first, second = created(ledger), created(ledger)
    claimed(ledger.claim(first, A, now_ms=0, ttl_ms=MIN))
    assert claimed(ledger.claim(first, B, now_ms=MIN, ttl_ms=MIN)) == 2  # the lapse, noticed
    claimed(ledger.claim(second, A, now_ms=0, ttl_ms=MIN))
    ledger.expire_leases([(first, 1), ("wo-9", 1), (second, 1)])
    assert ledger.orders[first].status is Status.CLAIMED
    lease = ledger.leases.holder(first, MIN + 1)
    assert lease is not None and (lease.holder, lease.token) == (B, 2)
    assert ledger.orders[second].status is Status.OPEN
    assert ledger.orders[second].history[-1][:2] == (MIN, Status.OPEN)  # dated at its expiry
