"""``auction_market``: repeated task auctions among agents that are not all reliable.

A requester opens ``orders`` auctions, a few at a time, each for ``duration`` of
bidding under the ``stake_x_reputation`` rule. Every agent joins the namespace's
directory (and so gets the relay's initial stake) and is *reliable* (fails a task
with chance 5%) or, one in five, *flaky* (fails half its tasks). Agents look for
open auctions every few seconds and bid 10 of their stake at a random price. An
awardee confirms, works (the policy's task time) and then either marks the order
done — its stake comes back and its reputation rises — or fails and gives the order
back: it is slashed, and the relay passes the order to the next bidder.

What researchers read off the summary (``extra``): how the awards split between
reliable and flaky agents over time, what slashing took from each group, and
where their reputations ended — whether stakes and reputation steer work to the
agents that deliver. A crash (``--crash-rate``) kills an awardee mid-task: its
lease lapses, it is slashed like a failure, and it comes back ``restart_ms`` later.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable

import trio

from agent_sdk.auctions import Auctions, as_claim
from agent_sdk.directory import Directory
from agent_sdk.ledger import Ledger, LedgerRefusal
from simulations.model import AgentStates, Policy, Settings, Summary
from simulations.scenarios.common import RELAY, expired_leases, relay_config
from simulations.world import World, identity_of

NS = "market@sim"
STAKE = 10
OPEN_AT_ONCE = 4
BIDDING_MS = 5_000
CONFIRM_MS = 10_000
LOOK_MS = (1_000, 4_000)
FAIL = {"reliable": 0.05, "flaky": 0.5}


class Market:
    def __init__(self) -> None:
        self.finished = trio.Event()
        self.completed: dict[str, int] = {"reliable": 0, "flaky": 0}
        self.failed: dict[str, int] = {"reliable": 0, "flaky": 0}
        self.crashes = 0
        self.unawarded = 0
        self.wasted = 0
        self.states = AgentStates()


async def run(world: World, settings: Settings) -> Summary:
    summary = Summary(settings.scenario, settings.agents, settings.orders, settings.seed)
    market = Market()
    kinds = ["flaky" if n % 5 == 4 else "reliable" for n in range(settings.agents)]  # one in five
    async with trio.open_nursery() as nursery:
        relay = await world.start_relay(nursery, relay_config(settings))
        began = trio.current_time()
        world.meter.start(settings.orders, "auctions")
        with trio.move_on_after(settings.duration_s):
            async with trio.open_nursery() as everyone:
                for n in range(settings.agents):
                    everyone.start_soon(
                        bidder, world, settings, settings.policy_of(n), n, kinds[n], market
                    )
                everyone.start_soon(requester, world, settings, market)
                await market.finished.wait()
                everyone.cancel_scope.cancel()
        summary.virtual_seconds = round(trio.current_time() - began, 3)
        standing = await standings(world, settings, kinds)
        nursery.cancel_scope.cancel()
    summary.done = sum(market.completed.values())
    summary.zombies = settings.orders - summary.done - market.unawarded
    summary.crashes = market.crashes
    summary.wasted_work = market.wasted
    records = list(relay.store.scan(NS))
    summary.events = len(records)
    summary.expiries = sum(expired_leases(r) for r in records if r.kind == "lease.expired")
    summary.states = market.states.samples
    summary.extra = {
        "completed": market.completed,
        "failed": market.failed,
        "unawarded": market.unawarded,
        **standing,
    }
    return summary


async def requester(world: World, settings: Settings, market: Market) -> None:
    identity = identity_of(settings.seed, "requester", 0)
    async with world.client(RELAY, identity, "requester") as client:
        auctions = Auctions(client, NS)
        slots = trio.Semaphore(OPEN_AT_ONCE)

        async def one(n: int) -> None:
            async with slots:
                opened = await auctions.open(
                    title=f"task {n}",
                    duration_ms=BIDDING_MS,
                    lease_ms=settings.ttl_ms,  # how long a dead awardee holds the task
                    confirm_ms=CONFIRM_MS,
                )
                while True:  # follow it to its end: completed, or nobody left
                    shown = await auctions.show(opened["auction"])
                    if shown["phase"] in ("completed", "unawarded"):
                        market.unawarded += shown["phase"] == "unawarded"
                        world.meter.advance()
                        return
                    await trio.sleep(2)

        async with trio.open_nursery() as nursery:
            for n in range(settings.orders):
                nursery.start_soon(one, n)
        market.finished.set()


async def bidder(
    world: World,
    settings: Settings,
    policy: Policy,
    n: int,
    kind: str,
    market: Market,
) -> None:
    rng = world.rng(f"agent/{n}")
    identity = identity_of(settings.seed, "agent", n)
    life = 0

    def mark(state: str) -> None:
        market.states.set(n, state, world.now_ms())

    while True:
        life += 1
        mark("idle")
        async with world.client(RELAY, identity, f"agent/{n}/{life}") as client:
            if life == 1:
                await Directory(client, NS).join(f"agent-{n}", heartbeat_ms=24 * 3600 * 1000)
            crashed = await trade(client, rng, policy, kind, market, mark)
        if not crashed:
            return
        mark("down")
        market.crashes += 1
        await trio.sleep(settings.restart_ms / 1000)


async def trade(  # type: ignore[no-untyped-def]
    client,
    rng: random.Random,
    policy: Policy,
    kind: str,
    market: Market,
    mark: Callable[[str], None],
) -> bool:
    """Bid and work until the market closes (False) or this life crashes (True)."""
    auctions, ledger = Auctions(client, NS), Ledger(client, NS)
    me = client.identity.public_key
    bid_on: set[str] = set()
    while not market.finished.is_set():
        for shown in await auctions.list():
            auction = shown["auction"]
            if shown["phase"] == "open" and auction not in bid_on:
                balance = (await auctions.stake())["balance"]
                if balance >= STAKE:
                    try:
                        await auctions.bid(auction, stake=STAKE, price=rng.randint(10, 100))
                        bid_on.add(auction)
                    except LedgerRefusal:
                        pass  # closed meanwhile, or not enough stake left
            elif shown["phase"] == "awarded" and shown["awardee"] == me:
                try:
                    await auctions.confirm(auction)
                except LedgerRefusal:
                    continue  # too late: it passed on
                mark("working")
                if policy.crashes(rng):
                    await trio.sleep(rng.randint(0, policy.task_ms(rng)) / 1000)
                    market.failed[kind] += 1
                    return True  # its lease lapses; the relay slashes and passes on
                await trio.sleep(policy.task_ms(rng) / 1000)
                claim = as_claim(await auctions.show(auction) | {"expires_ms": None})
                if rng.random() < FAIL[kind]:
                    market.failed[kind] += 1
                    try:
                        await ledger.release(claim)  # gives up: slashed, passed on
                    except LedgerRefusal:
                        pass
                else:
                    try:
                        await ledger.update(claim, "done")
                        market.completed[kind] += 1
                    except LedgerRefusal:
                        market.failed[kind] += 1
                        market.wasted += 1  # done, but the lease had moved on
                mark("idle")
        await trio.sleep(rng.randint(*LOOK_MS) / 1000)
    return False


async def standings(world: World, settings: Settings, kinds: list[str]) -> dict[str, object]:
    """Mean balance and reputation per kind of agent at the end."""
    async with world.client(RELAY, identity_of(settings.seed, "observer", 0), "observer") as c:
        auctions = Auctions(c, NS)
        rows: dict[str, list[tuple[float, float]]] = {"reliable": [], "flaky": []}
        totals: dict[str, int] = {}
        for n, kind in enumerate(kinds):
            stake = await auctions.stake(identity_of(settings.seed, "agent", n).public_key)
            rows[kind].append((stake["balance"] + stake["locked"], stake["reputation"]))
            totals = {k: stake[k] for k in ("granted_total", "slashed_total")}
    means = {
        f"{kind}_{what}": round(statistics.mean(r[i] for r in values), 3) if values else None
        for kind, values in rows.items()
        for i, what in ((0, "mean_stake"), (1, "mean_reputation"))
    }
    held = sum(r[0] for values in rows.values() for r in values)
    return {**means, **totals, "stake_held": held}
