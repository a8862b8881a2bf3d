"""Ledger requests as log events: validation, outcomes, contention and replay."""

from __future__ import annotations

from typing import Any

import pytest

from agent_sdk.errors import ErrorCode, ProtocolError
from relay.coordination.requests import (
    EXPIRED,
    RELAY_KINDS,
    REQUEST_KINDS,
    Coordinator,
    Outcome,
)

A, B = b"a" * 32, b"b" * 32
MIN = 60_000


class Log:
    """Requests in log order, each with its id and time, as the relay would feed them."""

    def __init__(self) -> None:
        self.coordinator = Coordinator()
        self.entries: list[tuple[str, Any, bytes, bytes, int]] = []
        self.outcomes: list[Outcome | None] = []

    def request(self, kind: str, body: Any, author: bytes = A, now: int = 0) -> Outcome:
        request_id = len(self.entries).to_bytes(32, "big")
        self.entries.append((kind, body, author, request_id, now))
        outcome = self.coordinator.decide(kind, body, author, request_id, now)
        self.outcomes.append(outcome)
        assert outcome is not None
        assert outcome.body["req"] == request_id
        return outcome

    def expire(self, now: int) -> Outcome | None:
        due = self.coordinator.due(now)
        outcome = due[0] if due else None
        if outcome is not None:
            self.entries.append((EXPIRED, outcome.body, b"", b"", now))
            self.outcomes.append(outcome)
        return outcome

    def replay(self) -> tuple[Coordinator, list[Outcome | None]]:
        fresh, outcomes = Coordinator(), []
        for kind, body, author, request_id, now in self.entries:
            if kind == EXPIRED:
                fresh.replay_expired(body)
                outcomes.append(Outcome(EXPIRED, body))
            else:
                outcomes.append(fresh.decide(kind, body, author, request_id, now))
        return fresh, outcomes


def test_the_loop_in_requests_and_outcomes() -> None:
    log = Log()
    created = log.request("wo.create", {"title": "fix the parser", "priority": 2})
    assert created.kind == "wo.created" and created.body["wo"] == "wo-1"
    claim = log.request("wo.claim", {"wo": "wo-1", "ttl_ms": MIN}, now=10)
    assert claim.kind == "wo.claimed"
    assert (claim.body["holder"], claim.body["token"], claim.body["expires_ms"]) == (A, 1, 10 + MIN)
    token = claim.body["token"]
    assert log.request("wo.note", {"wo": "wo-1", "text": "halfway", "token": token}).kind == (
        "wo.noted"
    )
    done = log.request("wo.update", {"wo": "wo-1", "status": "done", "token": token}, now=20)
    assert done.kind == "wo.updated" and done.body["status"] == "done"


def test_one_of_a_hundred_simultaneous_claims_wins() -> None:
    log = Log()
    log.request("wo.create", {"title": "hot"})
    agents = [bytes([n]) * 32 for n in range(1, 101)]
    outcomes = [log.request("wo.claim", {"wo": "wo-1"}, author=agent, now=5) for agent in agents]
    winners = [o for o in outcomes if o.kind == "wo.claimed"]
    losers = [o for o in outcomes if o.kind == "wo.rejected"]
    assert len(winners) == 1 and len(losers) == 99
    holder = winners[0].body["holder"]
    assert all(o.body["problem"] == "held" and o.body["holder"]["holder"] == holder for o in losers)
    assert all(holder.hex() in o.body["reason"] for o in losers)


@pytest.mark.parametrize(
    ("kind", "body", "problem"),
    [
        ("wo.create", {"title": ""}, "bad_request"),
        ("wo.create", {"title": "x", "owner": "me"}, "bad_request"),  # ownership is not a field
        ("wo.create", {"title": "x", "files": "a.py"}, "bad_request"),
        ("wo.create", "just a string", "bad_request"),
        ("wo.claim", {"wo": 1}, "bad_request"),
        ("wo.claim", {"wo": "wo-7"}, "not_found"),
        ("wo.claim", {"wo": "wo-1", "ttl_ms": 10}, "bad_ttl"),
        ("wo.renew", {"wo": "wo-1", "token": "1"}, "bad_request"),
        ("wo.update", {"wo": "wo-1", "status": "flying"}, "bad_request"),
        ("wo.update", {"wo": "wo-1", "status": "claimed"}, "bad_transition"),  # claim does that
        ("wo.release", {"wo": "wo-1", "token": 1}, "bad_transition"),  # it is open
        ("wo.note", {"wo": "wo-1", "text": "x" * 20_000}, "bad_request"),
    ],
)
def test_bad_requests_are_rejected_with_a_problem(kind: str, body: Any, problem: str) -> None:
    log = Log()
    log.request("wo.create", {"title": "t"})
    before = log.coordinator.ledger.orders["wo-1"].history[:]
    outcome = log.request(kind, body)
    assert outcome.kind == "wo.rejected" and outcome.body["problem"] == problem
    assert outcome.body["reason"]
    assert log.coordinator.ledger.orders["wo-1"].history == before


def test_nil_means_absent_only_where_8_3_says() -> None:
    """Logs hold requests with these nils, answered as absent: a relay that refused
    them now would not rebuild from its own log."""
    coordinator = Coordinator()
    body = {"title": "t", "decision": "d"}
    for n, (kind, nil) in enumerate(
        [
            ("decision.add", {**body, "entity": None, "supersedes": None}),
            ("wo.create", {"title": "t", "parent": None}),
        ]
    ):
        outcome = coordinator.decide(kind, nil, A, bytes([n]) * 32, 0)
        assert outcome is not None and outcome.kind in ("decision.added", "wo.created"), outcome
    refused = coordinator.decide("decision.add", {**body, "rationale": None}, A, b"r" * 32, 0)
    assert refused is not None and refused.body["problem"] == "bad_request"


def test_other_kinds_are_not_requests_and_outcomes_are_the_relays() -> None:
    assert Coordinator().decide("app.note", {}, A, bytes(32), 0) is None
    assert not REQUEST_KINDS & RELAY_KINDS
    assert {"wo.claimed", "wo.rejected", "lease.expired"} <= RELAY_KINDS


def test_replaying_the_log_rebuilds_the_same_ledger_and_outcomes() -> None:
    log = Log()
    for n in range(4):
        log.request("wo.create", {"title": f"t{n}", "priority": n % 2}, now=n)
    first = log.request("wo.next", {"ttl_ms": MIN}, author=A, now=10)
    log.request("wo.next", {"ttl_ms": MIN}, author=B, now=11)
    log.request("wo.note", {"wo": first.body["wo"], "text": "seen"}, author=B, now=12)
    expired = log.expire(now=10 + MIN + 5)  # the timer, a little late
    assert expired is not None and [first.body["wo"], 1] in expired.body["leases"]
    log.request("wo.next", {"ttl_ms": MIN}, author=B, now=20 + MIN)
    replayed, outcomes = log.replay()
    assert outcomes == log.outcomes
    assert replayed.ledger.orders == log.coordinator.ledger.orders
    assert replayed.ledger.leases == log.coordinator.ledger.leases


def test_a_rejection_is_never_bigger_than_its_request() -> None:
    body = {"title": "t", **{f"{'x' * 200}{n}": n for n in range(100)}}
    outcome = Log().request("wo.create", body)
    assert outcome.kind == "wo.rejected"
    assert len(outcome.body["reason"]) < 300


def test_advisory_locks_are_exclusive_fenced_leases() -> None:
    log = Log()
    got = log.request("lock.acquire", {"name": "branch:main", "ttl_ms": MIN}, author=A, now=0)
    assert (
        got.kind == "lock.acquired" and got.body["token"] == 1 and got.body["lock"] == "branch:main"
    )
    held = log.request("lock.acquire", {"name": "branch:main"}, author=B, now=1)
    assert held.kind == "lock.rejected" and held.body["problem"] == "held"
    assert held.body["holder"]["holder"] == A
    renewed = log.request("lock.renew", {"name": "branch:main", "token": 1}, author=A, now=2)
    assert renewed.kind == "lock.renewed"
    stale = log.request("lock.release", {"name": "branch:main", "token": 7}, author=A, now=3)
    assert stale.kind == "lock.rejected" and stale.body["problem"] == "stale_token"
    later = 3 + 5 * MIN  # the renewal's default TTL (5 min) has run out: it lapsed
    taken = log.request("lock.acquire", {"name": "branch:main"}, author=B, now=later)
    assert taken.kind == "lock.acquired" and taken.body["token"] == 2
    released = log.request("lock.release", {"name": "branch:main", "token": 2}, author=B, now=later)
    assert released.kind == "lock.released"
    for body in ({"name": ""}, {"name": "x", "extra": 1}, {"name": "x", "ttl_ms": 10}):
        refused = log.request("lock.acquire", body)
        assert refused.kind == "lock.rejected"
    replayed, outcomes = log.replay()
    assert outcomes == log.outcomes and replayed.locks == log.coordinator.locks


def test_a_sub_orders_lapsed_claim_reads_open_in_its_parent_too() -> None:
    from relay.coordination import queries

    log = Log()
    log.request("wo.create", {"title": "parent"})
    log.request("wo.create", {"title": "child", "parent": "wo-1"})
    log.request("wo.claim", {"wo": "wo-2", "ttl_ms": MIN}, author=B, now=10)
    later = 10 + MIN  # the child's lease ran out; no timer has written it yet
    parent = queries.answer(log.coordinator, "wo.show", {"wo": "wo-1"}, later, 1 << 20)
    child = queries.answer(log.coordinator, "wo.show", {"wo": "wo-2"}, later, 1 << 20)
    assert child["status"] == "open"
    assert [c["status"] for c in parent["children"]] == ["open"]


def test_the_order_list_filters_by_the_status_at_the_querys_now() -> None:
    """``wo.list {status}`` lists the orders in that status at the query's ``now``: a
    lapsed claim is open there before any timer wrote it (8.4, 8.10)."""
    from relay.coordination import queries

    log = Log()
    for title in ("claimed", "blocked", "open"):
        log.request("wo.create", {"title": title})
    log.request("wo.claim", {"wo": "wo-1", "ttl_ms": MIN}, author=B, now=10)
    log.request("wo.update", {"wo": "wo-2", "status": "blocked"}, now=10)

    def listed(status: str, now: int) -> list[str]:
        answer = queries.answer(log.coordinator, "wo.list", {"status": status}, now, 1 << 20)
        return [order["id"] for order in answer["orders"]]

    before, after = 9 + MIN, 10 + MIN  # the claim lapses at 10 + MIN
    assert [listed(s, before) for s in ("open", "claimed", "blocked")] == [
        ["wo-3"], ["wo-1"], ["wo-2"],
    ]  # fmt: skip
    assert (listed("open", after), listed("claimed", after)) == (["wo-1", "wo-3"], [])
    assert listed("done", after) == []


def test_what_the_protocol_says_of_nil_tokens_checks_order_and_defaults() -> None:
    from relay.coordination import queries

    log = Log()
    # A nil optional field is an absent one (8.3): no wo, no token to fence.
    assert log.request("context.put", {"body": 1, "token": None}).kind == "context.stored"
    # decision.add: the body is checked whole before the state (8.9).
    log.request("decision.add", {"title": "a", "decision": "d", "entity": "E"})
    bad = log.request("decision.add", {"title": "b", "supersedes": "adr-1", "context": 5}, B)
    assert bad.body["problem"] == "bad_request"
    # decision.list refuses a status over 16 characters.
    with pytest.raises(ProtocolError, match="over 16 characters") as too_long:
        queries.answer(log.coordinator, "decision.list", {"status": "x" * 20}, 0, 1 << 20)
    assert too_long.value.code is ErrorCode.BAD_QUERY
    # Asking for approval without a reason leaves the status as the reason (8.4.1).
    gate = {"title": "ship", "requires_approval": True, "approvers": [A]}
    log.request("wo.create", gate)
    token = log.request("wo.claim", {"wo": "wo-1"}, author=B).body["token"]
    asked = {"wo": "wo-1", "token": token, "status": "awaiting_approval"}
    assert log.request("wo.update", asked, author=B).kind == "wo.updated"
    shown = queries.answer(log.coordinator, "wo.show", {"wo": "wo-1"}, 0, 1 << 20)
    assert shown["reason"] == "awaiting_approval"


def test_a_mass_expiry_is_several_events_each_within_a_frame() -> None:
    from relay.coordination.requests import EXPIRED_PER_EVENT

    log = Log()
    claims = EXPIRED_PER_EVENT * 2 + 5
    for n in range(claims):
        log.request("wo.create", {"title": f"t{n}"})
        log.request("wo.claim", {"wo": f"wo-{n + 1}", "ttl_ms": MIN})
    expired = log.coordinator.due(MIN)
    assert [len(o.body["leases"]) for o in expired] == [EXPIRED_PER_EVENT] * 2 + [5]
    fresh = Coordinator()  # replayed one by one, they reopen every order
    for kind, body, author, request_id, now in log.entries:
        fresh.decide(kind, body, author, request_id, now)
    for outcome in expired:
        fresh.replay_expired(outcome.body)
    assert all(order.status.value == "open" for order in fresh.ledger.orders.values())


def test_the_lock_list_comes_in_pages_by_name() -> None:
    """It had no ``after``: past one page (at most 1000), Ledger.locks() stopped."""
    from relay.coordination.queries import answer
    from relay.coordination.requests import Coordinator

    coordinator = Coordinator()
    names = sorted(f"path:{n:04}" for n in range(25))
    for n, name in enumerate(names):
        acquired = coordinator.decide("lock.acquire", {"name": name}, b"A" * 32, b"%d" % n, 1_000)
        assert acquired.kind == "lock.acquired"
    seen: list[str] = []
    args: dict[str, object] = {"limit": 10}
    while True:
        page = answer(coordinator, "lock.list", args, 2_000, 1 << 20)
        seen += [lock["lock"] for lock in page["locks"]]
        if not page["more"]:
            break
        args = {"limit": 10, "after": seen[-1]}
    assert seen == names


def test_lapsed_locks_do_not_stay_in_memory() -> None:
    """Locks lapse silently (no timer retires them): every `once:KEY` and crashed
    leader's lock stayed in memory, and each `lock.list` sorted them all."""
    log = Log()
    for n in range(1_000):
        got = log.request("lock.acquire", {"name": f"once:{n}", "ttl_ms": MIN}, author=A, now=n)
        assert got.kind == "lock.acquired"
    later = 1_000 + MIN  # every one has lapsed
    # (A scan each time the count doubles: at most twice the locks held at the last.)
    for n in range(30):
        log.request("lock.acquire", {"name": f"live:{n}", "ttl_ms": MIN}, author=B, now=later)
    assert len(log.coordinator.locks.leases) < 100
    assert len(log.coordinator.locks.tokens) == 1_030  # fencing tokens still only rise
    again = log.request("lock.acquire", {"name": "once:7"}, author=B, now=later)
    assert again.kind == "lock.acquired" and again.body["token"] == 2
    replayed, outcomes = log.replay()
    assert outcomes == log.outcomes and replayed.locks == log.coordinator.locks
