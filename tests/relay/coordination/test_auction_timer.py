"""The auctions' timer against the plain definition: a pass over every active auction.

The relay asks for the next deadline and for what is due after every outcome it appends
in a namespace, so the auctions keep closing times, confirmation windows and the leases
of awards in heaps, and settle only the awards whose order moved (the ledger tells
them) or whose time came (relay/coordination/auctions.py); these tests check that they
decide what the pass decided, in the same order, live and after a replay.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent_sdk.auctions import commitment
from relay.coordination import auctions as auctions_module
from relay.coordination.auctions import Auction, Auctions, Phase
from relay.coordination.ledger import Ledger
from relay.coordination.requests import EXPIRED, Coordinator, Outcome
from relay.coordination.stakes import Reputation, Stakes

REQUESTER = b"R" * 32
BIDDERS = [bytes([n + 1]) * 32 for n in range(4)]


def due_by_scan(
    auctions: Auctions, now_ms: int, ledger: Ledger, stakes: Stakes, reputation: Reputation
) -> list[dict[str, Any]]:
    """The timer as it was: every active auction, in opening order."""
    out = []
    for auction in [auctions.auctions[a] for a in auctions.active]:
        if auction.phase is Phase.OPEN and now_ms >= auction.closes_ms:
            out.append(auctions.close(auction.id, now_ms, ledger, stakes, reputation))
        elif auction.phase in (Phase.AWARDED, Phase.CONFIRMED):
            settled = auctions.settle(auction.id, now_ms, ledger, stakes, reputation)
            if settled is not None:
                out.append(settled)
    return out


def next_by_scan(auctions: Auctions) -> int | None:
    times = []
    for auction in (auctions.auctions[a] for a in auctions.active):
        if auction.phase is Phase.OPEN:
            times.append(auction.closes_ms)
        elif auction.phase is Phase.AWARDED:
            times.append(auction.confirm_by)
    return min(times, default=None)


class ScanningAuctions(Auctions):
    """Auctions whose timer is the plain pass: the reference a coordinator runs beside."""

    def due(
        self, now_ms: int, ledger: Ledger, stakes: Stakes, reputation: Reputation
    ) -> list[dict[str, Any]]:
        return due_by_scan(self, now_ms, ledger, stakes, reputation)

    def next_deadline_ms(self) -> int | None:
        return next_by_scan(self)


def joined(coordinator: Coordinator) -> Coordinator:
    for n, agent in enumerate((REQUESTER, *BIDDERS)):
        coordinator.decide("dir.join", {"name": "n"}, agent, b"j%d" % n, 0)
    return coordinator


def same_state(one: Coordinator, other: Coordinator) -> None:
    assert one.auctions.auctions == other.auctions.auctions
    assert list(one.auctions.active) == list(other.auctions.active)
    assert one.ledger == other.ledger
    assert one.stakes == other.stakes and one.stakes.conserved()
    assert one.reputation == other.reputation


class Market:
    """A coordinator with the heaps beside one with the scan, driven alike, with the log
    of what both decided (requests and the timer's events) for a replay."""

    def __init__(self) -> None:
        self.live, self.reference = joined(Coordinator()), joined(Coordinator())
        self.reference.auctions = ScanningAuctions()
        self.now, self.requests = 1_000, 0
        self.log: list[tuple[Any, ...]] = []
        self.sealed: dict[tuple[str, bytes], tuple[int, bytes]] = {}

    def ask(self, kind: str, body: dict[str, Any], author: bytes) -> Outcome | None:
        self.requests += 1
        req = b"r%d" % self.requests
        outcome = self.live.decide(kind, dict(body), author, req, self.now)
        assert self.reference.decide(kind, dict(body), author, req, self.now) == outcome
        self.log.append(("request", kind, dict(body), author, req, self.now, outcome))
        return outcome

    def tick(self) -> list[Outcome]:
        """What the relay's timer does when it wakes: both must decide the same."""
        expected = self.reference.due(self.now)
        outcomes = self.live.due(self.now)
        assert outcomes == expected
        self.log += [("timer", o.kind, o.body) for o in outcomes]
        self.check()
        return outcomes

    def tick_ledger(self) -> None:
        """The ledger's timer alone: the expiries it writes reach the auctions at their
        next wake, as moves of the orders."""
        expected = self.reference.ledger.expire(self.now)
        assert self.live.ledger.expire(self.now) == expected
        if expected:
            self.log.append(("timer", EXPIRED, {"leases": [list(e) for e in expected]}))
        self.check()

    def tick_auctions(self) -> None:
        """The auctions' timer alone, the ledger's not run: an award's lease may have
        run out with its order still claimed (settle expires it itself)."""
        live, reference = self.live, self.reference
        expected = reference.auctions.due(
            self.now, reference.ledger, reference.stakes, reference.reputation
        )
        outcomes = live.auctions.due(self.now, live.ledger, live.stakes, live.reputation)
        assert outcomes == expected
        self.log += [
            ("timer", o["kind"], {k: v for k, v in o.items() if k != "kind"}) for o in outcomes
        ]
        self.check()

    def restart(self) -> None:
        """The relay restarts: the live coordinator is folded again from the log (what
        its timer keeps beside the state is rebuilt by the replay), the scan goes on."""
        self.live = replayed(self.log)
        self.check()

    def check(self) -> None:
        same_state(self.live, self.reference)
        assert self.live.auctions.next_deadline_ms() == next_by_scan(self.live.auctions)
        assert self.live.next_expiry_ms() == self.reference.next_expiry_ms()

    def auction(self, which: int) -> Auction | None:
        ids = list(self.live.auctions.auctions)[-3:]
        return self.live.auctions.auctions[ids[which % len(ids)]] if ids else None


def replayed(log: list[tuple[Any, ...]]) -> Coordinator:
    """A coordinator folded from the log, as the host rebuilds one: requests decided
    again at their time, the timer's events applied as they were."""
    coordinator = joined(Coordinator())
    for kind, *rest in log:
        if kind == "request":
            what, body, author, req, now, outcome = rest
            assert coordinator.decide(what, dict(body), author, req, now) == outcome
        else:
            what, body = rest
            if what == "lease.expired":
                coordinator.replay_expired(body)
            elif what == "dir.left":
                coordinator.replay_left(body)
            elif what in ("auction.closed", "auction.completed", "auction.failed"):
                coordinator.replay_auction(what, body)
    return coordinator


ACTIONS = (
    "open", "bid", "bid", "bid", "reveal", "reveal", "withdraw", "confirm", "confirm",
    "confirm", "done", "done", "release", "block", "renew", "renew", "reject", "wait",
    "wait", "wait",
)  # fmt: skip
WAKES = (None, None, "timer", "timer", "auctions", "ledger")
"""After a step: no wake (the timer runs late, at a later one), the relay's timer, or
the auctions' timer or the ledger's alone (either may come first: an award's lease may
run out before the ledger reopens its order, and the auctions learn of an expiry the
ledger wrote only at their next wake)."""
step = st.tuples(
    st.sampled_from(ACTIONS),
    st.integers(0, len(BIDDERS) - 1),  # who bids (or reveals, withdraws)
    st.integers(0, 3),  # on which auction (of the last three opened)
    st.integers(0, 60),  # sizes the step: a deadline, a stake, a wait
    st.sampled_from(WAKES),
)


def play(market: Market, what: str, bidder: bytes, which: int, n: int) -> None:
    auction = market.auction(which)
    if what == "open":
        body = {
            "title": "t",
            "duration_ms": 500 + 100 * n,
            "rule": ["stake_x_reputation", "lowest_price", "first_eligible"][n % 3],
            "confirm_ms": 1_000 + 500 * (n % 3),
            "lease_ms": 1_000 + 1_000 * (n % 4),
            "slash_ppm": 500_000,
            "sealed": n % 5 == 0,
            "reveal_ms": 2_000 + 1_000 * (n % 3),
        }
        market.ask("auction.open", body, REQUESTER)
    elif what == "wait":
        market.now += 50 * n
    elif auction is None:
        return
    elif what == "bid" and auction.sealed:
        price, salt = n % 7, bytes([n]) * 16
        body = {
            "auction": auction.id,
            "stake": n + 1,
            "commitment": commitment(auction.id, bidder, price, salt),
        }
        market.sealed[(auction.id, bidder)] = (price, salt)
        market.ask("auction.commit", body, bidder)
    elif what == "bid":
        market.ask("auction.bid", {"auction": auction.id, "stake": n + 1, "price": n % 7}, bidder)
    elif what == "reveal":  # the first sealed bid not opened yet, if any
        hidden = [b for b in auction.bids.values() if not b.revealed]
        bidder = hidden[0].bidder if hidden else bidder
        price, salt = market.sealed.get((auction.id, bidder), (0, bytes(16)))
        market.ask("auction.reveal", {"auction": auction.id, "price": price, "salt": salt}, bidder)
    elif what == "withdraw":
        market.ask("auction.withdraw", {"auction": auction.id}, bidder)
    elif what == "reject":
        body = {"auction": auction.id, "reason": "no", "agent": auction.awardee}
        market.ask("auction.reject", body, REQUESTER)
    elif auction.awardee is None:
        return
    elif what == "confirm":
        market.ask("auction.confirm", {"auction": auction.id}, auction.awardee)
    elif what == "renew":
        body = {"wo": auction.wo, "token": auction.token, "ttl_ms": 1_000 + 500 * (n % 4)}
        market.ask("wo.renew", body, auction.awardee)
    elif what == "release":
        market.ask("wo.release", {"wo": auction.wo, "token": auction.token}, auction.awardee)
    else:  # the awardee finishes the work, or blocks on it
        status = "done" if what == "done" else "blocked"
        body = {"wo": auction.wo, "token": auction.token, "status": status}
        market.ask("wo.update", body, auction.awardee)


def wake(market: Market, which: str | None) -> None:
    if which == "timer":
        market.tick()
    elif which == "auctions":
        market.tick_auctions()
    elif which == "ledger":
        market.tick_ledger()
    elif which == "restart":
        market.restart()
    else:
        market.check()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(step, min_size=20, max_size=80))
def test_the_timer_decides_what_a_pass_over_every_auction_decides(
    steps: list[tuple[str, int, int, int, str | None]],
) -> None:
    market = Market()
    for what, bidder, which, n, wakes in steps:
        play(market, what, BIDDERS[bidder], which, n)
        wake(market, wakes)
    market.now += 60_000  # every deadline, window and lease runs out
    market.tick()
    market.tick()
    # A replay of the log leaves the timer where the live one is.
    again = replayed(market.log)
    same_state(again, market.live)
    assert again.auctions.next_deadline_ms() == next_by_scan(again.auctions)
    market.now += 60_000
    assert again.due(market.now) == market.tick()
    assert again.auctions.next_deadline_ms() == next_by_scan(again.auctions)


def test_the_timer_decides_what_the_pass_decides_in_long_random_runs() -> None:
    """The same, over longer runs drawn evenly (a seeded loop): hypothesis draws few
    confirmed awards whose lease then runs out with the auctions' timer first, where
    only the heap of the awards' leases finds them. Some steps restart the relay: its
    first wakes after the replay must find what the live timer would have."""
    for seed in range(150):
        rng = random.Random(seed)
        market = Market()
        for _ in range(100):
            what, bidder, n = rng.choice(ACTIONS), rng.choice(BIDDERS), rng.randrange(61)
            play(market, what, bidder, rng.randrange(4), n)
            wake(market, rng.choice((*WAKES, "restart")))
        market.now += 60_000
        market.tick()
        same_state(replayed(market.log), market.live)


def test_what_is_due_comes_in_opening_order_whatever_came_due_first() -> None:
    """auc-1 closes late; auc-2 closed early and its award lapses at the same wake:
    the timer closes auc-1 before it settles auc-2, as the pass over both did."""
    market = Market()
    first, second = BIDDERS[:2]
    market.ask("auction.open", {"title": "a", "duration_ms": 5_000}, REQUESTER)
    market.ask("auction.open", {"title": "b", "duration_ms": 1_000, "confirm_ms": 4_000}, REQUESTER)
    market.ask("auction.bid", {"auction": "auc-1", "stake": 5, "price": 1}, first)
    market.ask("auction.bid", {"auction": "auc-2", "stake": 5, "price": 1}, second)
    market.now = 2_000
    assert [o.body["auction"] for o in market.tick()] == ["auc-2"]  # closed, to `second`
    assert market.live.auctions.next_deadline_ms() == 6_000  # both at once
    market.now = 6_000
    outcomes = market.tick()
    assert [(o.kind, o.body["auction"]) for o in outcomes] == [
        ("auction.closed", "auc-1"),
        ("auction.failed", "auc-2"),
    ]


def test_the_timer_reads_no_open_auction_that_is_not_due(monkeypatch: Any) -> None:
    """With 1,000 auctions open, a wake that finds nothing due costs a few heap looks,
    not a look at every auction (the cost the relay paid after every outcome)."""
    coordinator = joined(Coordinator())
    for n in range(1_000):
        body = {"title": "t", "duration_ms": 10_000 + n}
        opened = coordinator.decide("auction.open", body, REQUESTER, b"o%d" % n, 1_000)
        assert opened is not None and opened.kind == "auction.opened"
    reads = 0
    closes_ms = Auction.closes_ms

    def counted(auction: Auction) -> int:
        nonlocal reads
        reads += 1
        return closes_ms.fget(auction)  # type: ignore[attr-defined, no-any-return]

    monkeypatch.setattr(auctions_module.Auction, "closes_ms", property(counted))
    assert coordinator.auctions.next_deadline_ms() == 11_000
    assert coordinator.due(5_000) == []
    assert reads <= 4
    assert [o.body["auction"] for o in coordinator.due(11_001)] == ["auc-1", "auc-2"]


def test_the_timer_settles_only_the_awards_whose_order_moved(monkeypatch: Any) -> None:
    """With 1,000 awards in flight, a wake settles the one whose order was done, not
    every award (each wake did, after every outcome in the namespace); a wake after a
    renewal looks at that award alone, and one after nothing moved at none."""
    coordinator = Coordinator(stakes=Stakes(initial=10_000))
    joined(coordinator)
    for n in range(1, 1_001):
        body = {"title": "t", "duration_ms": 1_000, "confirm_ms": 600_000}
        coordinator.decide("auction.open", body, REQUESTER, b"o%d" % n, 0)
        bid = {"auction": f"auc-{n}", "stake": 1, "price": 1}
        coordinator.decide("auction.bid", bid, BIDDERS[n % 4], b"b%d" % n, 10)
    assert len(coordinator.due(1_000)) == 1_000  # all closed, each awarded
    settled: list[str] = []
    settle = Auctions.settle

    def counted(self: Auctions, auction_id: str, *args: Any) -> dict[str, Any] | None:
        settled.append(auction_id)
        return settle(self, auction_id, *args)

    monkeypatch.setattr(Auctions, "settle", counted)
    # Each award's claim is a move of its order: looked at once, its lease goes on the
    # heap of leases.
    assert coordinator.due(1_001) == [] and len(settled) == 1_000
    settled.clear()
    assert coordinator.due(1_002) == [] and settled == []
    awarded = coordinator.auctions.auctions["auc-500"]
    renew = {"wo": awarded.wo, "token": awarded.token, "ttl_ms": 60_000}
    renewed = coordinator.decide("wo.renew", renew, BIDDERS[0], b"renew", 1_003)
    assert renewed is not None and renewed.kind == "wo.renewed"
    assert coordinator.due(1_003) == [] and settled == ["auc-500"]
    settled.clear()
    done = {"wo": awarded.wo, "token": awarded.token, "status": "done"}
    updated = coordinator.decide("wo.update", done, BIDDERS[0], b"done", 1_004)
    assert updated is not None and updated.kind == "wo.updated"
    [completed] = coordinator.due(1_004)
    assert completed.kind == "auction.completed" and settled == ["auc-500"]


def test_awards_and_replays_do_not_grow_the_timer() -> None:
    """Each award puts its confirmation window on the timer and a confirmation leaves
    that entry stale; a replay closes auctions without the timer, leaving their closing
    entries stale. Rebuilds keep both heaps within a bound of the active auctions, and
    keep what is current: two auctions opened first, still open, close on time."""
    market = Market()
    for _ in range(2):
        market.ask("auction.open", {"title": "t", "duration_ms": 3_600_000}, REQUESTER)
    for n in range(3, 303):
        bidder = BIDDERS[n % len(BIDDERS)]
        market.ask("auction.open", {"title": "t", "duration_ms": 1_000}, REQUESTER)
        market.ask("auction.bid", {"auction": f"auc-{n}", "stake": 1, "price": 1}, bidder)
        market.now += 1_000
        [closed] = market.tick()
        assert closed.kind == "auction.closed" and closed.body["award"]["agent"] == bidder
        market.ask("auction.confirm", {"auction": f"auc-{n}"}, bidder)
        award = closed.body["award"]
        body = {"wo": award["wo"], "token": award["token"], "status": "done"}
        market.ask("wo.update", body, bidder)
        [completed] = market.tick()
        assert completed.kind == "auction.completed"
    again = replayed(market.log)
    for coordinator in (market.live, again):
        auctions = coordinator.auctions
        assert list(auctions.active) == ["auc-1", "auc-2"]
        assert len(auctions._confirming) <= 2 * 2 + 64 + 1
        assert len(auctions._closing) <= 2 * 2 + 64 + 1
        assert auctions.next_deadline_ms() == next_by_scan(auctions) == 1_000 + 3_600_000
    market.now = 1_000 + 3_600_000
    closes = again.due(market.now)
    assert closes == market.tick() and [o.body["auction"] for o in closes] == ["auc-1", "auc-2"]
    assert again.auctions.next_deadline_ms() is market.live.auctions.next_deadline_ms() is None
