"""Task auctions: closing at the deadline, award rules, stakes, failure and replay."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
import trio
import trio.testing

from agent_sdk.auctions import Auctions
from agent_sdk.client import RelayClient
from agent_sdk.directory import Directory
from agent_sdk.identity import Identity
from agent_sdk.ledger import Ledger
from agent_sdk.wire import decode
from relay.coordination.auctions import Phase
from relay.coordination.host import Host
from relay.node import RelayConfig, RelayNode
from relay.store.memory import MemoryStore
from tests.conftest import RunningRelay, identity
from tests.refusals import declined
from tests.relay import scene
from tests.relay.test_node import virtual_wall

NS = "market@local"
RELAY = identity(2)
REQUESTER = identity(1)


def bidder(n: int) -> Identity:
    return Identity.from_seed((20_000 + n).to_bytes(32, "big"))


class Scene(scene.Scene):
    """The auction tests' scene: their namespace, the relay's events, conservation."""

    def __init__(self, node: RelayNode) -> None:
        super().__init__(node, NS)

    def events(self, kind: str) -> list[tuple[int, dict[str, Any]]]:
        """(hlc ms, body) of the relay's ``kind`` events, in log order."""
        return [
            (r.hlc >> 16, decode(r.event)["body"])
            for r in self.node.store.scan(NS)
            if r.kind == kind and r.author == RELAY.public_key
        ]

    def conserved(self) -> bool:
        return self.node.coordination.coordinators[NS].stakes.conserved()


@pytest.fixture
async def scene(nursery: trio.Nursery) -> Scene:
    node = RelayNode(RELAY, MemoryStore(), RelayConfig(), wall_ms=virtual_wall())
    await nursery.start(node.run)
    return Scene(node)


async def join(scene: Scene, who: Identity, *capabilities: str) -> None:
    kind, _ = await scene.ask(who, "dir.join", {"name": "a", "capabilities": list(capabilities)})
    assert kind == "dir.joined"


async def test_an_auction_closes_at_its_deadline_and_awards_by_its_rule(
    scene: Scene, autojump_clock: trio.testing.MockClock
) -> None:
    await join(scene, REQUESTER)
    for n in range(5):
        await join(scene, bidder(n), "python")
    kind, opened = await scene.ask(
        REQUESTER,
        "auction.open",
        {"title": "port it", "duration_ms": 10_000, "rule": "lowest_price"},
    )
    assert kind == "auction.opened"
    prices = [40, 25, 25, 60, 30]
    for n, price in enumerate(prices):
        kind, _ = await scene.ask(
            bidder(n), "auction.bid", {"auction": opened["auction"], "stake": 10, "price": price}
        )
        assert kind == "auction.bid_placed"
    await trio.sleep(11)
    await trio.testing.wait_all_tasks_blocked()
    [(at, closed)] = scene.events("auction.closed")
    assert closed["at_ms"] == opened["deadline_ms"] and at >= opened["deadline_ms"]
    # Lowest price wins; the tie at 25 goes to the higher stake, then the earlier bid.
    assert closed["ranking"][:3] == [
        bidder(1).public_key,
        bidder(2).public_key,
        bidder(4).public_key,
    ]
    award = closed["award"]
    assert award["agent"] == bidder(1).public_key and award["price"] == 25
    show = await scene.node.query(NS, "wo.show", {"wo": opened["wo"]})
    assert show["status"] == "claimed" and show["holder"] == bidder(1).public_key
    for n in range(5):  # losers' stakes are back; the winner's stays locked
        stake = await scene.node.query(NS, "stake.show", {"agent": bidder(n).public_key})
        assert (stake["balance"], stake["locked"]) == ((90, 10) if n == 1 else (100, 0))
    assert scene.conserved()


async def test_a_winner_that_dies_is_slashed_and_the_runner_up_finishes(
    scene: Scene, autojump_clock: trio.testing.MockClock
) -> None:
    await join(scene, REQUESTER)
    for n in range(3):
        await join(scene, bidder(n), "python")
    terms = {"title": "t", "duration_ms": 5_000, "lease_ms": 20_000, "slash_ppm": 500_000}
    _, opened = await scene.ask(REQUESTER, "auction.open", terms)
    auction = opened["auction"]
    for n, stake in enumerate((30, 50, 20)):
        await scene.ask(bidder(n), "auction.bid", {"auction": auction, "stake": stake, "price": 1})
    await trio.sleep(6)  # closed: bidder 1 (the highest stake) wins
    kind, _ = await scene.ask(bidder(1), "auction.confirm", {"auction": auction})
    assert kind == "auction.confirmed"
    await trio.sleep(21)  # the winner crashed: it never renews; its lease runs out
    await trio.testing.wait_all_tasks_blocked()
    [(_, failed)] = scene.events("auction.failed")
    assert failed["agent"] == bidder(1).public_key and failed["reason"] == "expired"
    assert failed["slashed"] == 25  # half of its 50
    runner_up = failed["award"]
    assert runner_up["agent"] == bidder(0).public_key
    # The runner-up confirms, does the work, and marks the order done with its token.
    await scene.ask(bidder(0), "auction.confirm", {"auction": auction})
    body = {"wo": runner_up["wo"], "token": runner_up["token"], "status": "done"}
    kind, _ = await scene.ask(bidder(0), "wo.update", body)
    assert kind == "wo.updated"
    await trio.testing.wait_all_tasks_blocked()
    [(_, completed)] = scene.events("auction.completed")
    assert completed["agent"] == bidder(0).public_key
    stakes = {
        n: await scene.node.query(NS, "stake.show", {"agent": bidder(n).public_key})
        for n in range(3)
    }
    assert stakes[1]["balance"] == 75 and stakes[0]["balance"] == 100
    assert stakes[0]["reputation"] > 0 > stakes[1]["reputation"]
    assert stakes[0]["slashed_total"] == 25 and scene.conserved()
    # Folding the log again gives the same auctions, stakes and reputations.
    replayed = Host(RELAY.public_key)
    replayed.rebuild(scene.node.store.scan(NS))
    live, again = scene.node.coordination.coordinators[NS], replayed.coordinators[NS]
    assert again.auctions == live.auctions and again.stakes == live.stakes
    assert again.reputation == live.reputation and again.ledger.orders == live.ledger.orders


async def test_an_unconfirmed_award_passes_on_without_a_slash(
    scene: Scene, autojump_clock: trio.testing.MockClock
) -> None:
    await join(scene, REQUESTER)
    for n in range(2):
        await join(scene, bidder(n))
    _, opened = await scene.ask(
        REQUESTER, "auction.open", {"title": "t", "duration_ms": 1_000, "confirm_ms": 2_000}
    )
    for n, stake in enumerate((10, 20)):
        await scene.ask(
            bidder(n), "auction.bid", {"auction": opened["auction"], "stake": stake, "price": 0}
        )
    await trio.sleep(4)  # closed at 1 s, unconfirmed by 3 s
    await trio.testing.wait_all_tasks_blocked()
    [(_, failed)] = scene.events("auction.failed")
    assert failed["reason"] == "unconfirmed" and failed["slashed"] == 0
    assert failed["award"]["agent"] == bidder(0).public_key
    assert scene.conserved()


@pytest.mark.parametrize(
    ("who", "body", "problem"),
    [
        ("late", {"stake": 10, "price": 1}, "closed"),
        ("rich", {"stake": 101, "price": 1}, "insufficient_stake"),
        ("stranger", {"stake": 10, "price": 1}, "ineligible"),
        ("unskilled", {"stake": 10, "price": 1}, "ineligible"),
        ("requester", {"stake": 10, "price": 1}, "own_auction"),
        ("greedy", {"stake": 10, "price": 1_000}, "over_reserve"),
        ("rich", {"stake": 0, "price": 1}, "bad_request"),
        ("rich", {"stake": "10", "price": 1}, "bad_request"),
    ],
)
async def test_bad_bids_are_refused_and_change_nothing(
    scene: Scene,
    autojump_clock: trio.testing.MockClock,
    who: str,
    body: dict[str, Any],
    problem: str,
) -> None:
    await join(scene, REQUESTER, "rust")
    agents = {
        "late": bidder(1),
        "rich": bidder(2),
        "unskilled": bidder(3),
        "greedy": bidder(4),
        "stranger": bidder(5),
        "requester": REQUESTER,
    }
    for name in ("late", "rich", "greedy"):
        await join(scene, agents[name], "rust")
    await join(scene, agents["unskilled"], "python")
    terms = {"title": "t", "duration_ms": 5_000, "capabilities": ["rust"], "reserve": 100}
    _, opened = await scene.ask(REQUESTER, "auction.open", terms)
    if who == "late":
        await trio.sleep(6)
    before = await scene.node.query(NS, "stake.show", {"agent": agents[who].public_key})
    kind, refused = await scene.ask(
        agents[who], "auction.bid", {"auction": opened["auction"], **body}
    )
    assert kind == "auction.rejected" and refused["problem"] == problem, refused
    after = await scene.node.query(NS, "stake.show", {"agent": agents[who].public_key})
    assert (after["balance"], after["locked"]) == (before["balance"], before["locked"])
    assert scene.conserved()


@pytest.mark.parametrize(
    "terms",
    [
        {"title": "t", "duration_ms": 1_000, "rule": "highest_bribe"},
        {"title": "t"},
        {"title": "t", "duration_ms": -5},
        {"duration_ms": 1_000},
        {"title": "t", "duration_ms": 1_000, "slash_ppm": 2_000_000},
        {"title": "t", "duration_ms": 1_000, "min_reputation": float("nan")},
    ],
)
async def test_bad_auctions_are_refused(
    scene: Scene, autojump_clock: trio.testing.MockClock, terms: dict[str, Any]
) -> None:
    kind, refused = await scene.ask(REQUESTER, "auction.open", terms)
    assert kind == "auction.rejected" and refused["problem"] == "bad_request"
    assert (await scene.node.query(NS, "auction.list", {}))["auctions"] == []


async def test_fifty_bidders_over_real_sockets(relay: RunningRelay) -> None:
    rng = random.Random(7)
    stakes = {n: rng.randrange(1, 100) for n in range(50)}
    async with RelayClient.connect(relay.url, REQUESTER) as requester_client:
        await Directory(requester_client, NS).join("requester")
        market = Auctions(requester_client, NS)
        opened = await market.open(
            title="index the repo", duration_ms=3_000, capabilities=["search"]
        )
        ready = trio.Event()
        placed: list[int] = []

        async def bid(n: int) -> None:
            async with RelayClient.connect(relay.url, bidder(n)) as client:
                await Directory(client, NS).join(f"bidder-{n}", capabilities=["search"])
                await Auctions(client, NS).bid(
                    opened["auction"], stakes[n], price=rng.randrange(100)
                )
                placed.append(n)
                if len(placed) == 50:
                    ready.set()
                await finished.wait()  # stay online (connection presence) until the end

        finished = trio.Event()
        async with trio.open_nursery() as nursery:
            for n in range(50):
                nursery.start_soon(bid, n)
            await ready.wait()
            award = await market.wait_award(opened["auction"])
            assert award is not None
            best = max(range(50), key=lambda n: (stakes[n], -n))
            assert award["agent"] in {
                bidder(n).public_key for n in range(50) if stakes[n] == stakes[best]
            }
            shown = await Ledger(requester_client, NS).show(opened["wo"])
            assert shown["status"] == "claimed" and shown["holder"] == award["agent"]
            totals = [await market.stake(bidder(n).public_key) for n in range(50)]
            held = sum(t["balance"] + t["locked"] for t in totals)
            requester_stake = await market.stake()
            assert (
                held + requester_stake["balance"] + totals[0]["slashed_total"]
                == totals[0]["granted_total"]
            )
            finished.set()


# -- replay, as a property -------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

Step = tuple[str, int, int, int]
ACTIONS = [
    "open", "open", "bid", "bid", "bid", "commit", "commit", "reveal", "reveal", "withdraw",
    "confirm", "confirm", "done", "done", "reject", "vouch", "revoke", "wait", "wait",
]  # fmt: skip
steps = st.lists(
    st.tuples(
        st.sampled_from(ACTIONS),
        st.integers(0, 5),  # who
        st.integers(0, 3),  # which auction
        st.integers(0, 120),  # amount (stake, price or tenths of a second)
    ),
    min_size=10,
    max_size=40,
)


def folded_against_live(plan: list[Step]) -> Counter[str]:
    """Run ``plan`` against a relay (in virtual time), checking that stakes stay
    conserved after every step, and that a fold of the log from nothing gives the
    relay's auctions, stakes, reputation and orders. Returns the kinds of the
    relay's own events: the outcomes, refusals and timer events the plan caused.

    An open and a sealed auction are there from the start. Each step acts on the
    ``which``-th auction that can take it, when there is one (else on any, and is
    refused): ``bid`` on an open one taking plain bids, ``commit`` on an open sealed
    one; ``confirm`` and ``done`` are its awardee's (time moves to the close of an
    open auction with bids first; without an awardee, ``confirm`` is ``who``'s and
    refused, and ``done`` does nothing); ``reveal`` opens a commitment not yet
    opened, by its bidder, in the reveal window (time moves to it); ``withdraw`` takes back a bid on
    an open auction, by its bidder; ``reject`` is the auction's requester's;
    ``revoke`` undoes a vouch made, by its voucher."""
    from agent_sdk.auctions import commitment

    written: Counter[str] = Counter()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            node = RelayNode(RELAY, MemoryStore(), RelayConfig(), wall_ms=virtual_wall())
            await nursery.start(node.run)
            scene = Scene(node)
            agents = [REQUESTER, *(bidder(n) for n in range(5))]
            by_key = {a.public_key: a for a in agents}
            for agent in agents:
                await join(scene, agent, "python")
            opened: list[str] = []
            # An open auction and a sealed one (closing later) from the start.
            for hidden, duration_ms in ((False, 2_000), (True, 8_000)):
                terms = {"title": "first", "duration_ms": duration_ms, "lease_ms": 5_000}
                terms |= {"confirm_ms": 3_000, "sealed": hidden, "reveal_ms": 4_000}
                kind, body = await scene.ask(REQUESTER, "auction.open", terms)
                assert kind == "auction.opened"
                opened.append(body["auction"])
            sealed: dict[tuple[str, int], tuple[int, bytes]] = {}  # (auction, who): price, salt
            vouches: list[tuple[Identity, bytes]] = []  # (voucher, vouchee)
            auctions = node.coordination.coordinators[NS].auctions.auctions

            async def past(at_ms: int) -> None:
                """Move (virtual) time just past ``at_ms``; the timer acts on it."""
                ahead = at_ms + 1 - node.wall_ms()
                if ahead > 0:
                    await trio.sleep(ahead / 1000)
                await trio.testing.wait_all_tasks_blocked()

            for action, who, which, amount in plan:
                agent = agents[who]
                auction = opened[which % len(opened)]

                def pick(among: list[Any], otherwise: Any, which: int = which) -> Any:
                    return among[which % len(among)] if among else otherwise

                if action == "bid":
                    plain = [a for a in opened if not auctions[a].sealed]
                    auction = pick([a for a in plain if auctions[a].phase is Phase.OPEN], auction)
                elif action == "commit":
                    hidden = [a for a in opened if auctions[a].sealed]
                    auction = pick([a for a in hidden if auctions[a].phase is Phase.OPEN], auction)
                elif action in ("confirm", "done"):
                    bid_on = [
                        a for a in opened if auctions[a].phase is Phase.OPEN and auctions[a].bids
                    ]
                    auction = pick([a for a in opened if auctions[a].awardee] + bid_on, auction)
                    if auction in bid_on:
                        await past(auctions[auction].closes_ms)  # awarded by now
                elif action == "reveal":
                    hidden_bids = [
                        (a, w)
                        for a, w in sealed
                        if auctions[a].phase is Phase.OPEN
                        and agents[w].public_key in auctions[a].bids
                        and not auctions[a].bids[agents[w].public_key].revealed
                    ]
                    if hidden_bids:
                        auction, who = pick(hidden_bids, None)
                        agent = agents[who]
                        await past(auctions[auction].deadline_ms)  # the reveal window
                elif action == "withdraw":
                    open_bids = [
                        (a, bidder)
                        for a in opened
                        if auctions[a].phase is Phase.OPEN
                        for bidder in auctions[a].bids
                    ]
                    if open_bids:
                        auction, key = pick(open_bids, None)
                        agent = by_key[key]
                state = auctions[auction]
                awardee = by_key.get(state.awardee) if state.awardee else None
                if action == "open":
                    kind, body = await scene.ask(
                        agent,
                        "auction.open",
                        {
                            "title": "t",
                            "duration_ms": 1_000 + amount * 100,
                            "rule": ["stake_x_reputation", "lowest_price", "first_eligible"][
                                which % 3
                            ],
                            "lease_ms": 5_000,
                            "confirm_ms": 3_000,
                            "sealed": amount % 2 == 1,
                            "reveal_ms": 2_000,
                        },
                    )
                    if kind == "auction.opened":
                        opened.append(body["auction"])
                elif action == "bid":
                    await scene.ask(
                        agent,
                        "auction.bid",
                        {"auction": auction, "stake": amount % 40 + 1, "price": amount % 7},
                    )
                elif action == "commit":
                    price, salt = amount % 7, bytes([who + 1, amount]) * 8
                    body = {
                        "auction": auction,
                        "stake": amount % 40 + 1,
                        "commitment": commitment(auction, agent.public_key, price, salt),
                    }
                    if (await scene.ask(agent, "auction.commit", body))[0] == "auction.committed":
                        sealed[(auction, who)] = (price, salt)
                elif action == "reveal":
                    price, salt = sealed.get((auction, who), (amount % 7, bytes(16)))
                    body = {"auction": auction, "price": price, "salt": salt}
                    await scene.ask(agent, "auction.reveal", body)
                elif action == "withdraw":
                    await scene.ask(agent, "auction.withdraw", {"auction": auction})
                elif action == "confirm":
                    await scene.ask(awardee or agent, "auction.confirm", {"auction": auction})
                elif action == "reject":
                    body = {"auction": auction, "reason": "no"}
                    await scene.ask(by_key[state.requester], "auction.reject", body)
                elif action == "vouch":
                    other = agents[(who + 1 + which) % len(agents)].public_key
                    body = {"for": other, "weight": amount % 30 + 1}
                    if (await scene.ask(agent, "rep.vouch", body))[0] == "rep.vouched":
                        vouches.append((agent, other))
                elif action == "revoke":  # the which-th vouch made, by its voucher
                    other = agents[(who + 1 + which) % len(agents)].public_key
                    if vouches:
                        agent, other = vouches.pop(which % len(vouches))
                    await scene.ask(agent, "rep.revoke", {"for": other})
                elif action == "done":  # the current awardee (if any) finishes the work
                    if awardee is not None:
                        body = {"wo": state.wo, "token": state.token, "status": "done"}
                        await scene.ask(awardee, "wo.update", body)
                else:
                    await trio.sleep(amount / 10)
                await trio.testing.wait_all_tasks_blocked()
                assert scene.conserved()
            await trio.sleep(30)  # let every deadline and lease run out
            await trio.testing.wait_all_tasks_blocked()
            live = node.coordination.coordinators[NS]
            replayed = Host(RELAY.public_key)
            replayed.rebuild(node.store.scan(NS))
            again = replayed.coordinators[NS]
            assert again.auctions == live.auctions
            assert again.stakes == live.stakes and again.stakes.conserved()
            assert again.reputation == live.reputation
            assert again.ledger.orders == live.ledger.orders
            for record in node.store.scan(NS):
                if record.author == RELAY.public_key:
                    written[record.kind] += 1
            nursery.cancel_scope.cancel()

    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
    return written


def test_folding_the_log_reproduces_auctions_stakes_and_reputation() -> None:
    """Random bids (open and sealed), withdrawals, confirmations, completions,
    rejections, vouches and waits: the stakes stay conserved throughout, and a fold of
    the log from nothing gives the same auctions, balances and reputations as the
    relay that decided them live. The run (derandomized: the same examples each
    time) must have taken every path it claims to check."""
    seen: Counter[str] = Counter()

    @settings(
        max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(steps)
    def check(plan: list[Step]) -> None:
        seen.update(folded_against_live(plan))

    check()
    for kind in (
        "auction.opened",
        "auction.bid_placed",
        "auction.committed",
        "auction.revealed",
        "auction.withdrawn",
        "auction.closed",
        "auction.confirmed",
        "auction.completed",
        "auction.failed",
        "rep.vouched",
        "rep.revoked",
    ):
        assert seen[kind] > 0, (kind, seen)


def test_folding_reproduces_a_confirmed_and_completed_auction() -> None:
    """One fixed plan: two bids on the first auction, its close, the awardee's
    confirmation and completion, a vouch and its revocation."""
    plan: list[Step] = [
        ("bid", 1, 0, 9),  # stake 10, price 2
        ("bid", 2, 0, 4),  # stake 5, price 4
        ("wait", 0, 0, 25),  # past the deadline: bidder 0 (who 1) is awarded
        ("confirm", 0, 0, 0),  # by the awardee
        ("done", 0, 0, 0),
        ("wait", 0, 0, 1),  # the timer completes it
        ("vouch", 1, 0, 9),  # bidder 0 vouches for bidder 1 (who 2)
        ("revoke", 1, 0, 0),
    ]
    seen = folded_against_live(plan)
    assert seen["auction.closed"] == 2  # (the sealed one without a bid)
    assert seen["auction.confirmed"] == 1
    assert seen["auction.completed"] == 1
    assert seen["rep.vouched"] == 1 and seen["rep.revoked"] == 1
    assert seen["auction.failed"] == 0 and seen["auction.rejected"] == 0


async def test_vouches_are_bounded_staked_and_slashed_with_the_vouchee(
    scene: Scene, autojump_clock: trio.testing.MockClock
) -> None:
    trusted, newcomer, vouchee = bidder(0), bidder(1), bidder(2)
    await join(scene, REQUESTER)
    for agent in (trusted, newcomer, vouchee):
        await join(scene, agent)
    # `trusted` earns a reputation: it wins an auction and finishes the work.
    _, opened = await scene.ask(REQUESTER, "auction.open", {"title": "t", "duration_ms": 1_000})
    await scene.ask(trusted, "auction.bid", {"auction": opened["auction"], "stake": 10, "price": 1})
    await trio.sleep(2)
    won = scene.node.coordination.coordinators[NS].auctions.auctions[opened["auction"]]
    await scene.ask(trusted, "wo.update", {"wo": won.wo, "token": won.token, "status": "done"})
    await trio.testing.wait_all_tasks_blocked()
    kind, vouched = await scene.ask(trusted, "rep.vouch", {"for": vouchee.public_key, "weight": 40})
    assert kind == "rep.vouched" and 0 < vouched["value"] <= 0.4
    kind, worthless = await scene.ask(
        newcomer, "rep.vouch", {"for": vouchee.public_key, "weight": 40}
    )
    assert kind == "rep.vouched" and worthless["value"] == 0  # nobody trusts the voucher yet
    rep = await scene.node.query(NS, "rep.show", {"agent": vouchee.public_key})
    assert rep["score"] == pytest.approx(vouched["value"], rel=1e-3)
    assert len(rep["vouched_by"]) == 2

    # The vouchee wins, then lets its lease lapse: it and its vouchers are slashed.
    terms = {"title": "t2", "duration_ms": 1_000, "lease_ms": 5_000, "slash_ppm": 250_000}
    _, second = await scene.ask(REQUESTER, "auction.open", terms)
    await scene.ask(vouchee, "auction.bid", {"auction": second["auction"], "stake": 20, "price": 1})
    await trio.sleep(2)
    await scene.ask(vouchee, "auction.confirm", {"auction": second["auction"]})
    await trio.sleep(6)
    await trio.testing.wait_all_tasks_blocked()
    stake = await scene.node.query(NS, "stake.show", {"agent": trusted.public_key})
    assert stake["locked"] == 30  # 40 vouched, a quarter slashed
    assert scene.conserved()
    kind, revoked = await scene.ask(trusted, "rep.revoke", {"for": vouchee.public_key})
    assert kind == "rep.revoked" and revoked["unlocked"] == 30
    replayed = Host(RELAY.public_key)
    replayed.rebuild(scene.node.store.scan(NS))
    live = scene.node.coordination.coordinators[NS]
    assert replayed.coordinators[NS].reputation == live.reputation
    assert replayed.coordinators[NS].stakes == live.stakes


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"weight": 10, "for": "self"}, "self_vouch"),
        ({"weight": 1_000}, "insufficient_stake"),
        ({"weight": 0}, "bad_request"),
        ({"weight": 5, "for": b"\x01" * 32}, "not_found"),
        ({"weight": 5, "for": b"short"}, "bad_request"),
    ],
)
async def test_bad_vouches_are_refused(
    scene: Scene, autojump_clock: trio.testing.MockClock, body: dict[str, Any], problem: str
) -> None:
    await join(scene, bidder(0))
    await join(scene, bidder(1))
    request = {"for": bidder(1).public_key, **body}
    if request["for"] == "self":
        request["for"] = bidder(0).public_key
    kind, refused = await scene.ask(bidder(0), "rep.vouch", request)
    assert kind == "rep.rejected" and refused["problem"] == problem
    assert scene.node.coordination.coordinators[NS].stakes.locked_by(bidder(0).public_key) == 0


async def test_a_sealed_auction_hides_prices_until_the_reveal_and_forfeits_the_silent(
    scene: Scene, autojump_clock: trio.testing.MockClock
) -> None:
    from agent_sdk.auctions import commitment

    await join(scene, REQUESTER)
    for n in range(3):
        await join(scene, bidder(n))
    terms = {
        "title": "t",
        "duration_ms": 5_000,
        "sealed": True,
        "reveal_ms": 5_000,
        "rule": "lowest_price",
    }
    _, opened = await scene.ask(REQUESTER, "auction.open", terms)
    auction = opened["auction"]
    assert opened["closes_ms"] == opened["deadline_ms"] + 5_000
    kind, refused = await scene.ask(
        bidder(0), "auction.bid", {"auction": auction, "stake": 5, "price": 1}
    )
    assert kind == "auction.rejected" and refused["problem"] == "bad_request"  # sealed: commit
    prices, salts = {0: 30, 1: 20, 2: 10}, {n: bytes([n]) * 16 for n in range(3)}
    for n in range(3):
        sealed = commitment(auction, bidder(n).public_key, prices[n], salts[n])
        kind, _ = await scene.ask(
            bidder(n), "auction.commit", {"auction": auction, "stake": 40, "commitment": sealed}
        )
        assert kind == "auction.committed"
    shown = await scene.node.query(NS, "auction.show", {"auction": auction})
    assert {b["price"] for b in shown["bids"]} == {None}  # nobody sees a price yet
    early = {"auction": auction, "price": 30, "salt": salts[0]}
    kind, refused = await scene.ask(bidder(0), "auction.reveal", early)
    assert kind == "auction.rejected" and refused["problem"] == "closed"  # not before the deadline
    await trio.sleep(5)
    kind, refused = await scene.ask(
        bidder(1), "auction.reveal", {"auction": auction, "price": 19, "salt": salts[1]}
    )
    assert kind == "auction.rejected" and refused["problem"] == "bad_reveal"
    for n in (0, 1):  # bidder 2, the cheapest, never reveals
        kind, _ = await scene.ask(
            bidder(n), "auction.reveal", {"auction": auction, "price": prices[n], "salt": salts[n]}
        )
        assert kind == "auction.revealed"
    await trio.sleep(6)
    await trio.testing.wait_all_tasks_blocked()
    [(_, closed)] = scene.events("auction.closed")
    assert closed["forfeited"] == [[bidder(2).public_key, 4]]  # 10% of 40
    assert closed["ranking"] == [bidder(1).public_key, bidder(0).public_key]
    assert closed["award"]["agent"] == bidder(1).public_key
    assert scene.conserved()


async def awarded_to_the_second_of_two(scene: Scene) -> tuple[dict[str, Any], Any]:
    """Two bidders (stakes 10 and 20) on an auction that closed: the answer to its
    opening, and the auction, awarded to bidder(1)."""
    await join(scene, REQUESTER)
    for n in range(2):
        await join(scene, bidder(n))
    _, opened = await scene.ask(REQUESTER, "auction.open", {"title": "t", "duration_ms": 1_000})
    for n, stake in enumerate((10, 20)):
        await scene.ask(
            bidder(n), "auction.bid", {"auction": opened["auction"], "stake": stake, "price": 0}
        )
    await trio.sleep(2)
    return opened, scene.node.coordination.coordinators[NS].auctions.auctions[opened["auction"]]


async def test_an_awardee_that_blocks_the_order_fails_and_the_next_bidder_gets_it(
    scene: Scene, autojump_clock: trio.testing.MockClock
) -> None:
    opened, won = await awarded_to_the_second_of_two(scene)
    body = {"wo": won.wo, "token": won.token, "status": "blocked", "reason": "stuck"}
    kind, _ = await scene.ask(bidder(1), "wo.update", body)
    assert kind == "wo.updated"
    await trio.testing.wait_all_tasks_blocked()
    [(_, failed)] = scene.events("auction.failed")
    assert failed["reason"] == "released" and failed["award"]["agent"] == bidder(0).public_key
    shown = await scene.node.query(NS, "wo.show", {"wo": won.wo})
    assert shown["status"] == "claimed" and shown["holder"] == bidder(0).public_key
    # Done, then a late rejection: refused, and the auction completes.
    await scene.ask(
        bidder(0), "wo.update", {"wo": won.wo, "token": failed["award"]["token"], "status": "done"}
    )
    kind, refused = await scene.ask(REQUESTER, "auction.reject", {"auction": opened["auction"]})
    assert (kind, refused["problem"]) == ("auction.rejected", "bad_transition")
    await trio.testing.wait_all_tasks_blocked()
    assert scene.events("auction.completed") and scene.conserved()


async def test_an_awardee_cannot_drop_the_order_from_under_the_auction(
    scene: Scene, autojump_clock: trio.testing.MockClock
) -> None:
    """Dropped is final: the next bidder would never get the order, nor the requester."""
    _, won = await awarded_to_the_second_of_two(scene)
    body = {"wo": won.wo, "token": won.token, "status": "dropped"}
    kind, refused = await scene.ask(bidder(1), "wo.update", body)
    assert (kind, refused["problem"]) == ("wo.rejected", "reserved")
    shown = await scene.node.query(NS, "wo.show", {"wo": won.wo})
    assert shown["status"] == "claimed" and shown["holder"] == bidder(1).public_key
    await scene.ask(bidder(1), "wo.release", {"wo": won.wo, "token": won.token})
    await trio.testing.wait_all_tasks_blocked()
    shown = await scene.node.query(NS, "wo.show", {"wo": won.wo})
    assert shown["status"] == "claimed" and shown["holder"] == bidder(0).public_key
    assert scene.conserved()


async def test_auctions_of_orders_not_yours_or_with_bad_leases_are_refused(
    scene: Scene, autojump_clock: trio.testing.MockClock
) -> None:
    _, created = await scene.ask(bidder(0), "wo.create", {"title": "theirs"})
    kind, refused = await scene.ask(
        REQUESTER, "auction.open", {"wo": created["wo"], "duration_ms": 1_000}
    )
    assert (kind, refused["problem"]) == ("auction.rejected", "not_holder")
    kind, refused = await scene.ask(
        REQUESTER, "auction.open", {"wo": "wo-99", "duration_ms": 1_000}
    )
    assert (kind, refused["problem"]) == ("auction.rejected", "not_found")
    terms = {"title": "t", "duration_ms": 1_000, "lease_ms": 25 * 3600 * 1000}
    kind, refused = await scene.ask(REQUESTER, "auction.open", terms)
    assert (kind, refused["problem"]) == ("auction.rejected", "bad_ttl")  # the relay's bounds


async def test_auction_lists_come_in_pages(
    scene: Scene, autojump_clock: trio.testing.MockClock
) -> None:
    for _ in range(3):
        await scene.ask(REQUESTER, "auction.open", {"title": "t", "duration_ms": 60_000})
    page = await scene.node.query(NS, "auction.list", {"limit": 2})
    assert [a["auction"] for a in page["auctions"]] == ["auc-1", "auc-2"] and page["more"]
    rest = await scene.node.query(NS, "auction.list", {"after": 2})
    assert [a["auction"] for a in rest["auctions"]] == ["auc-3"] and not rest["more"]


async def test_a_crowded_auction_is_shown_within_a_frame(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    config = RelayConfig(max_frame=8192)
    node = RelayNode(RELAY, MemoryStore(), config, wall_ms=virtual_wall())
    await nursery.start(node.run)
    scene = Scene(node)
    await join(scene, REQUESTER)
    _, opened = await scene.ask(REQUESTER, "auction.open", {"title": "t", "duration_ms": 60_000})
    for n in range(60):
        await join(scene, bidder(n))
        body = {"auction": opened["auction"], "stake": 1, "price": n, "note": "n" * 100}
        await scene.ask(bidder(n), "auction.bid", body)
    shown = await node.query(NS, "auction.show", {"auction": opened["auction"]})
    assert shown["bids_total"] == 60 and 1 <= len(shown["bids"]) < 60
    assert [b["price"] for b in shown["bids"]] == list(range(len(shown["bids"])))  # the first
    from agent_sdk.frames import Result, encode_frame

    assert len(encode_frame(Result(rid=1, body=shown))) <= config.max_frame


async def test_an_auction_whose_deadline_passed_while_the_relay_was_down_closes_at_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store, wall = MemoryStore(), virtual_wall()
    async with trio.open_nursery() as nursery:
        first = RelayNode(RELAY, store, RelayConfig(), wall_ms=wall)
        await nursery.start(first.run)
        scene = Scene(first)
        await join(scene, REQUESTER)
        await join(scene, bidder(0))
        _, opened = await scene.ask(REQUESTER, "auction.open", {"title": "t", "duration_ms": 2_000})
        await scene.ask(
            bidder(0), "auction.bid", {"auction": opened["auction"], "stake": 5, "price": 1}
        )
        nursery.cancel_scope.cancel()
    await trio.sleep(60)  # the relay is down past the deadline
    async with trio.open_nursery() as nursery:
        second = RelayNode(RELAY, store, RelayConfig(), wall_ms=wall)
        await nursery.start(second.run)
        await trio.testing.wait_all_tasks_blocked()
        [(_, closed)] = Scene(second).events("auction.closed")
        assert closed["award"]["agent"] == bidder(0).public_key
        # Dated when the relay came back (about a minute after the 2 s deadline), so
        # the winner gets its whole confirmation window.
        assert closed["at_ms"] >= opened["deadline_ms"] + 55_000
        assert closed["award"]["confirm_by"] == closed["at_ms"] + 60_000
        nursery.cancel_scope.cancel()


async def test_an_award_whose_order_was_done_before_a_crash_completes_at_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The crash came after the awardee's wo.update was committed and before the timer
    wrote auction.completed: no deadline is left to wake the timer, and the stake stays
    locked until some unrelated request comes, unless the start runs a timer pass."""
    store, wall = MemoryStore(), virtual_wall()
    async with trio.open_nursery() as nursery:
        first = RelayNode(RELAY, store, RelayConfig(), wall_ms=wall)
        await nursery.start(first.run)
        scene = Scene(first)
        await join(scene, REQUESTER)
        await join(scene, bidder(0))
        _, opened = await scene.ask(REQUESTER, "auction.open", {"title": "t", "duration_ms": 1_000})
        auction = opened["auction"]
        await scene.ask(bidder(0), "auction.bid", {"auction": auction, "stake": 5, "price": 1})
        await trio.sleep(2)
        await scene.ask(bidder(0), "auction.confirm", {"auction": auction})
        won = first.coordination.coordinators[NS].auctions.auctions[auction]
        body = {"wo": won.wo, "token": won.token, "status": "done"}
        assert (await scene.ask(bidder(0), "wo.update", body))[0] == "wo.updated"
        nursery.cancel_scope.cancel()
    log = list(store.scan(NS))
    updated = max(r.seq for r in log if decode(r.event)["kind"] == "wo.updated")
    crashed = MemoryStore()  # what was durable at the crash
    crashed.append([r for r in log if r.seq <= updated])
    await trio.sleep(60)
    async with trio.open_nursery() as nursery:
        second = RelayNode(RELAY, crashed, RelayConfig(), wall_ms=wall)
        await nursery.start(second.run)
        await trio.testing.wait_all_tasks_blocked()
        assert Scene(second).events("auction.completed")
        assert Scene(second).conserved()
        nursery.cancel_scope.cancel()


def test_a_rejection_after_the_confirmation_window_does_not_slash_a_lapsed_award() -> None:
    """At ``confirm_by`` an unconfirmed award lapses unslashed (the timer's outcome);
    a rejection decided in that same millisecond, before the timer, must not turn it
    into a slash."""
    from relay.coordination.requests import Coordinator

    requester, awardee = b"R" * 32, b"B" * 32
    coordinator = Coordinator()
    for agent in (requester, awardee):
        coordinator.decide("dir.join", {"name": "n"}, agent, b"j", 1_000)
    body = {"title": "t", "duration_ms": 1_000, "confirm_ms": 1_000}
    coordinator.decide("auction.open", body, requester, b"o", 1_000)
    bid = {"auction": "auc-1", "stake": 50, "price": 1}
    assert coordinator.decide("auction.bid", bid, awardee, b"b", 1_500).kind == "auction.bid_placed"
    assert [o.kind for o in coordinator.due(2_000)] == ["auction.closed"]
    balance = coordinator.stakes.available(awardee)

    late = coordinator.decide("auction.reject", {"auction": "auc-1"}, requester, b"x", 3_000)
    assert (late.kind, late.body["problem"]) == ("auction.rejected", "closed")
    [lapsed] = coordinator.due(3_000)
    assert (lapsed.kind, lapsed.body["reason"], lapsed.body["slashed"]) == (
        "auction.failed",
        "unconfirmed",
        0,
    )
    assert coordinator.stakes.available(awardee) == balance + 50
    assert coordinator.reputation.score(awardee, 3_000) == 0.0


def awarded_at_2_s() -> tuple[Any, bytes]:
    """An auction closed at 2 s: its award is to be confirmed by 3 s, leased to 4 s."""
    from relay.coordination.requests import Coordinator

    requester, awardee = b"R" * 32, b"B" * 32
    coordinator = Coordinator()
    for agent in (requester, awardee):
        coordinator.decide("dir.join", {"name": "n"}, agent, b"j", 1_000)
    body = {"title": "t", "duration_ms": 1_000, "confirm_ms": 1_000, "lease_ms": 2_000}
    coordinator.decide("auction.open", body, requester, b"o", 1_000)
    bid = {"auction": "auc-1", "stake": 50, "price": 1}
    assert coordinator.decide("auction.bid", bid, awardee, b"b", 1_500).kind == "auction.bid_placed"
    assert [o.kind for o in coordinator.due(2_000)] == ["auction.closed"]
    return coordinator, awardee


@pytest.mark.parametrize(
    ("blocked_ms", "timer_ms"),
    [(None, 3_000), (None, 3_500), (None, 4_000), (None, 9_000), (3_500, 4_000)],
)
def test_an_unconfirmed_award_is_not_slashed_because_the_timer_ran_late(
    blocked_ms: int | None, timer_ms: int
) -> None:
    """Whenever the timer runs (on time, late past the lease's end, after downtime)
    the same log decides the same thing: the award outlived its confirmation window,
    so it passes on unslashed; also when the awardee blocked the order after it."""
    coordinator, awardee = awarded_at_2_s()
    balance = coordinator.stakes.available(awardee)
    if blocked_ms is not None:
        token = coordinator.auctions.auctions["auc-1"].token
        update = {"wo": "wo-1", "token": token, "status": "blocked", "reason": "stuck"}
        blocked = coordinator.decide("wo.update", update, awardee, b"u", blocked_ms)
        assert blocked is not None and blocked.kind == "wo.updated", blocked
    failed = [o for o in coordinator.due(timer_ms) if o.kind == "auction.failed"]
    assert [(o.body["reason"], o.body["slashed"]) for o in failed] == [("unconfirmed", 0)]
    assert coordinator.stakes.available(awardee) == balance + 50
    assert coordinator.reputation.score(awardee, timer_ms) == 0.0


def test_a_logged_failure_folds_to_what_the_log_says() -> None:
    """Timer events are replayed by deciding them again at their time; a log written
    when a late timer slashed this award as expired must still fold to that."""
    coordinator, awardee = awarded_at_2_s()
    balance = coordinator.stakes.available(awardee)
    token = coordinator.auctions.auctions["auc-1"].token
    coordinator.replay_expired({"leases": [["wo-1", token]]})
    logged = {"auction": "auc-1", "agent": awardee, "at_ms": 9_000, "reason": "expired"}
    coordinator.replay_auction("auction.failed", logged)
    assert coordinator.stakes.available(awardee) < balance + 50  # slashed, as logged
    assert coordinator.reputation.score(awardee, 9_000) < 0


def test_a_rejection_naming_an_awardee_no_longer_awarded_is_refused() -> None:
    """A rejection sent again, or decided after the award passed on, must not slash
    the next awardee, which did nothing yet: naming the judged awardee refuses it."""
    from relay.coordination.requests import Coordinator

    requester, first, second = b"R" * 32, b"A" * 32, b"B" * 32
    coordinator = Coordinator()
    for agent in (requester, first, second):
        coordinator.decide("dir.join", {"name": "n"}, agent, b"j" + agent, 1_000)
    body = {"title": "t", "duration_ms": 1_000}
    coordinator.decide("auction.open", body, requester, b"o", 1_000)
    for agent, stake in ((first, 20), (second, 10)):
        bid = {"auction": "auc-1", "stake": stake, "price": 1}
        placed = coordinator.decide("auction.bid", bid, agent, b"b" + agent, 1_500)
        assert placed.kind == "auction.bid_placed"
    coordinator.due(2_000)
    auction = coordinator.auctions.auctions["auc-1"]
    assert auction.awardee == first
    reject = {"auction": "auc-1", "agent": first}
    failed = coordinator.decide("auction.reject", reject, requester, b"x", 2_100)
    assert (failed.kind, failed.body["agent"]) == ("auction.failed", first)
    assert auction.awardee == second
    balance = coordinator.stakes.available(second)
    again = coordinator.decide("auction.reject", reject, requester, b"y", 2_200)
    assert (again.kind, again.body["problem"]) == ("auction.rejected", "changed")
    assert auction.awardee == second and coordinator.stakes.available(second) == balance
    bad = coordinator.decide(
        "auction.reject", {**reject, "agent": b"short"}, requester, b"z", 2_300
    )
    assert (bad.kind, bad.body["problem"]) == ("auction.rejected", "bad_request")


async def test_waiting_past_an_award_never_returns_one_that_failed_meanwhile(
    relay: RunningRelay,
) -> None:
    """wait_award(after=B) subscribes, then reads the auction. When the award to A,
    its failure and the pass-on to B are sequenced in between, the feed still brings
    `auction.closed` (to A) afterwards: A must not be returned, as B's award ends too."""
    async with (
        RelayClient.connect(relay.url, REQUESTER) as requester_client,
        RelayClient.connect(relay.url, bidder(0)) as a_client,
        RelayClient.connect(relay.url, bidder(1)) as b_client,
    ):
        market = Auctions(requester_client, NS)
        await Directory(requester_client, NS).join("requester")
        opened = await market.open(title="t", duration_ms=500, confirm_ms=60_000)
        for client, stake in ((a_client, 20), (b_client, 10)):
            await Directory(client, NS).join("bidder")
            await Auctions(client, NS).bid(opened["auction"], stake, price=1)
        b_waits = Auctions(b_client, NS)
        read = b_waits.show
        moved_on = trio.Event()

        async def show_after_a_passed_on(auction: str) -> dict[str, Any]:
            if not moved_on.is_set():  # between the subscribe and the first read
                first = await market.wait_award(auction)
                assert first is not None and first["agent"] == bidder(0).public_key
                await market.reject(auction, "not A", agent=first["agent"])  # B gets it
                await declined("changed", market.reject(auction, "not A", first["agent"]))
                moved_on.set()
            return await read(auction)

        b_waits.show = show_after_a_passed_on  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:

            async def end_bs_award_too() -> None:
                await moved_on.wait()
                await market.reject(opened["auction"], "not B either")

            nursery.start_soon(end_bs_award_too)
            award = await b_waits.wait_award(opened["auction"], after=bidder(1).public_key)
        assert award is None  # nobody is left; A's award failed before B waited past


async def test_a_sealed_bid_at_a_price_no_reveal_could_open_is_refused_at_once(
    relay: RunningRelay,
) -> None:
    """The relay refuses a negative price only at the reveal: the commitment went
    through, and at the close part of its stake was forfeited."""
    from agent_sdk.ledger import LedgerRefusal
    from tests.processes import cli

    async with RelayClient.connect(relay.url, bidder(0)) as client:
        with pytest.raises(LedgerRefusal) as refused:
            await Auctions(client, NS).commit("auc-1", stake=5, price=-1)
        assert refused.value.problem == "bad_request"
    done = await trio.run_process(
        cli("auction", "commit", "auc-1", "--stake", "5", "--price", "-1", "--relay", relay.url),
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 2 and b"a price is a whole number, 0 or more" in done.stderr


async def test_a_sealed_bid_with_a_salt_no_reveal_could_take_is_refused_at_once(
    relay: RunningRelay,
) -> None:
    """A salt the caller gives (to hold it before the commit is sent) must be one the
    reveal takes, 16 to 64 bytes: the commitment would go through, and its stake be
    forfeited in part at the close."""
    from agent_sdk.ledger import LedgerRefusal

    async with RelayClient.connect(relay.url, bidder(0)) as client:
        for salt in (b"s" * 15, b"s" * 65):
            with pytest.raises(LedgerRefusal) as refused:
                await Auctions(client, NS).commit("auc-1", stake=5, price=1, salt=salt)
            assert refused.value.problem == "bad_request"


async def test_an_award_read_after_the_close_is_the_award_the_event_carried(
    relay: RunningRelay,
) -> None:
    """An awardee that asks after the close (a worker that starts late) read the award
    from auction.show, which had no lease expiry: `expires_ms` None, and no stake
    or price, where the event has them."""
    from agent_sdk.auctions import as_claim
    from agent_sdk.client import Delivery

    async with (
        RelayClient.connect(relay.url, REQUESTER) as requester_client,
        RelayClient.connect(relay.url, bidder(2)) as client,
    ):
        await Directory(client, NS).join("bidder")
        opened = await Auctions(requester_client, NS).open(title="job", duration_ms=1_000)
        await Auctions(client, NS).bid(opened["auction"], 10, price=3)
        async with client.subscribe(NS, kinds=["auction.closed"]) as feed:
            async for item in feed:
                if isinstance(item, Delivery):
                    carried = dict(item.event.event.body["award"])
                    break
        award = await Auctions(client, NS).wait_award(opened["auction"])
    assert award == carried and carried["expires_ms"] > 0
    assert (carried["stake"], carried["price"]) == (10, 3)
    assert as_claim(award).expires_ms == carried["expires_ms"]
