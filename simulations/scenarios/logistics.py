"""``logistics``: inventory, pricing and fulfilment agents sharing stock, a discount
budget and the plans for each product, run twice on one relay: once without the
coordination primitives and once with them.

The same seeded workload drives both arms. ``orders`` customer orders each want a
quantity of one SKU and ask for a discount; demand exceeds stock by half and the
discounts asked for exceed the budget, so the limits bind. Agent ``n`` is a
fulfilment agent (``n mod 3 == 0``), a pricing agent (1) or an inventory agent (2).

* **Fulfilment** ships its share of the orders from a SKU's stock.
* **Pricing** grants its share of the discounts from one budget.
* **Inventory and pricing** both decide plans for SKUs (``promote`` or
  ``discontinue``) and act on them: two agents acting on different plans for one
  SKU within ``WINDOW_MS`` is an *incoherent decision*.

**Without** (namespace ``logistics-free@sim``): each agent works from a snapshot of
the stock, the budget and the latest plan per SKU, fresh every ``--snapshot`` (a
dashboard, a cache), plus what it did itself since: it ships or grants when its view
says there is enough, and follows another agent's recent plan when its view shows
one. The same agents, the same information policy, only stale and unenforced.

**With** (namespace ``logistics@sim``): stock per SKU and the budget are shared
constraints (``constraint.reserve`` then ``commit``: refused with ``exceeded`` when
the rest is short, so the order is back-ordered or the discount refused); plans are
decisions naming the SKU, routed to both roles (``route.notice``): an agent that
heard of a recent plan on a SKU follows it, and a conflict that happens anyway is
settled by the automatic rule (the first plan stands) before anyone acts; an agent
acts only on a plan that was kept.

Read off the log per arm: ``violations`` (shipments beyond a SKU's stock plus grants
beyond the budget), ``oversold_units``, ``overdrawn``, ``incoherent_decisions``
(pairs of actions on different plans), ``contradictions`` (actions contradicting an
earlier one), ``aligned`` (plans that followed another agent's), ``backordered``
and ``refused``, and for the guarded arm ``conflicts`` and ``overruled``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import trio

from agent_sdk.client import RelayClient
from agent_sdk.constraints import Constraints
from agent_sdk.decisions import Decisions, route
from agent_sdk.ledger import LedgerRefusal
from agent_sdk.wire import decode
from simulations.model import Settings, Summary
from simulations.scenarios.common import RELAY, relay_config
from simulations.world import HostsLogs, World, identity_of

FREE, GUARDED = "logistics-free@sim", "logistics@sim"
ROLES = ("fulfilment", "pricing", "inventory")
PLANS = ("promote", "discontinue")
WINDOW_MS = 60_000
"""Two actions on different plans for one SKU within this window are incoherent."""
BUDGET_SHARE = 0.4
"""The discount budget, as a share of all the discounts asked for."""


@dataclass(frozen=True)
class CustomerOrder:
    n: int
    sku: str
    qty: int
    discount: int


@dataclass
class Workload:
    stock: dict[str, int]
    budget: int
    orders: list[CustomerOrder]
    plans: list[tuple[str, str]]
    """(SKU, preferred plan) per planning step, drawn once for both arms."""


def workload(world: World, settings: Settings) -> Workload:
    rng = world.rng("logistics/workload")
    skus = [f"sku-{k}" for k in range(max(3, settings.orders // 20))]
    orders = [
        CustomerOrder(n, rng.choice(skus), rng.randint(1, 5), rng.randint(0, 20))
        for n in range(settings.orders)
    ]
    demand: dict[str, int] = defaultdict(int)
    for order in orders:
        demand[order.sku] += order.qty
    stock = {sku: max(1, demand[sku] * 2 // 3) for sku in skus}  # demand is 1.5x stock
    budget = int(sum(o.discount for o in orders) * BUDGET_SHARE)
    plans = [(rng.choice(skus), rng.choice(PLANS)) for _ in range(max(6, settings.orders // 2))]
    return Workload(stock, budget, orders, plans)


@dataclass
class Shelf:
    """The true state the unguarded agents change, and what their snapshots copy."""

    stock: dict[str, int]
    budget: int
    spent: int = 0
    shipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    plans: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    """SKU -> (when, which agent, plan) of the latest action on it."""

    def copy(self) -> Shelf:
        return Shelf(dict(self.stock), self.budget, self.spent, defaultdict(int, self.shipped),
                     dict(self.plans))  # fmt: skip


class View:
    """One unguarded agent's view: a snapshot taken every ``snapshot_ms`` (each agent
    on its own schedule), with the agent's own writes since added to it."""

    def __init__(self, shelf: Shelf, snapshot_ms: int) -> None:
        self.shelf = shelf
        self.every_s = snapshot_ms / 1000
        self.taken_at = -float("inf")
        self.seen = shelf.copy()

    def now(self) -> Shelf:
        if trio.current_time() - self.taken_at >= self.every_s:
            self.seen, self.taken_at = self.shelf.copy(), trio.current_time()
        return self.seen

    # Its own writes go to the truth and to what it sees.

    def ship(self, sku: str, qty: int) -> None:
        for shelf in (self.shelf, self.seen):
            shelf.shipped[sku] += qty

    def spend(self, amount: int) -> None:
        for shelf in (self.shelf, self.seen):
            shelf.spent += amount

    def plan(self, sku: str, entry: tuple[int, int, str]) -> None:
        for shelf in (self.shelf, self.seen):
            shelf.plans[sku] = entry


@dataclass
class Tally:
    backordered: int = 0
    refused: int = 0
    lapsed: int = 0
    """Reservations that ran out before their commit: the action was not taken (also
    counted as back-ordered or refused)."""
    aligned: int = 0
    overruled: int = 0


async def run(world: World, settings: Settings) -> Summary:
    summary = Summary(settings.scenario, settings.agents, settings.orders, settings.seed)
    work = workload(world, settings)
    arms: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        relay = await world.start_relay(nursery, relay_config(settings))
        world.meter.start(2 * (2 * settings.orders + len(work.plans)), "steps")
        began = trio.current_time()
        for ns, guarded in ((FREE, False), (GUARDED, True)):
            tally = Tally()
            if guarded:
                await setup(world, settings, work)
            with trio.move_on_after(settings.duration_s):  # (each arm gets --duration)
                async with trio.open_nursery() as agents:
                    shelf = Shelf(dict(work.stock), work.budget)
                    for n in range(settings.agents):
                        agents.start_soon(
                            agent, world, settings, work, n, ns, guarded, shelf, tally
                        )
            arms["with" if guarded else "without"] = read(relay, ns, work, tally, guarded)
        summary.virtual_seconds = round(trio.current_time() - began, 3)
        nursery.cancel_scope.cancel()
    summary.done = arms["with"]["handled"]
    summary.zombies = settings.orders - summary.done
    summary.events = sum(1 for ns in (FREE, GUARDED) for _ in relay.store.scan(ns))
    summary.extra = {
        "violations": {arm: found["violations"] for arm, found in arms.items()},
        "incoherent_decisions": {arm: found["incoherent_decisions"] for arm, found in arms.items()},
        **arms,
        "skus": len(work.stock),
        "budget": work.budget,
    }
    return summary


async def setup(world: World, settings: Settings, work: Workload) -> None:
    """The guarded namespace's owner: constraints for stock and budget, and the
    decision policy (plans routed to both roles; conflicts settled by rule)."""
    owner = identity_of(settings.seed, "logistics-owner", 0)
    async with world.client(RELAY, owner, "logistics/owner") as client:
        decisions = Decisions(client, GUARDED)
        ladder = {"rule": "first", "window_ms": WINDOW_MS, "approvers": [owner.public_key]}
        await decisions.set_policy(
            [route(["decision.added"], "pricing"), route(["decision.added"], "inventory")],
            conflicts=ladder,
        )
        constraints = Constraints(client, GUARDED)
        for sku, units in work.stock.items():
            await constraints.define(f"stock:{sku}", units)
        await constraints.define("discounts", work.budget)


async def agent(
    world: World,
    settings: Settings,
    work: Workload,
    n: int,
    ns: str,
    guarded: bool,
    shelf: Shelf,
    tally: Tally,
) -> None:
    role = ROLES[n % 3]
    peers = [m for m in range(settings.agents) if ROLES[m % 3] == role]
    rng = world.rng(f"logistics/{n}")  # (not by arm: both arms draw the same task times)
    policy = settings.policy_of(n)
    identity = identity_of(settings.seed, f"logistics-{role}", n)
    view = View(shelf, settings.snapshot_ms)
    ttl_ms = settings.ttl_ms
    async with world.client(RELAY, identity, f"{ns}/{n}") as client, trio.open_nursery() as tasks:
        heard: set[str] = set()
        if guarded:
            await client.publish(ns, "dir.join", {"name": f"{role}-{n}", "role": role})
            if role != "fulfilment":
                tasks.start_soon(listen, client, ns, heard)
        if role != "inventory":
            for order in work.orders[peers.index(n) :: len(peers)]:
                await trio.sleep(policy.task_ms(rng) / 1000)
                if role == "fulfilment":
                    take = Draw(f"stock:{order.sku}", order.qty, "app.shipped",
                                {"order": order.n, "sku": order.sku, "qty": order.qty})  # fmt: skip
                else:
                    take = Draw("discounts", order.discount, "app.discount",
                                {"order": order.n, "amount": order.discount})  # fmt: skip
                if take.amount:
                    await draw(client, ns, take, guarded, view, tally, ttl_ms)
                world.meter.advance()
        if role != "fulfilment":
            planners = [m for m in range(settings.agents) if ROLES[m % 3] != "fulfilment"]
            for sku, wanted in work.plans[planners.index(n) :: len(planners)]:
                await trio.sleep(policy.task_ms(rng) / 1000)
                if guarded:
                    await plan(client, ns, sku, wanted, heard, tally, world)
                else:
                    await plan_unguarded(client, ns, sku, wanted, n, view, tally, world)
                world.meter.advance()
        tasks.cancel_scope.cancel()


@dataclass(frozen=True)
class Draw:
    """Taking ``amount`` from a limit (a SKU's stock, the discount budget), then
    publishing what was done."""

    limit: str
    amount: int
    kind: str
    body: dict[str, Any]


async def draw(
    client: RelayClient, ns: str, take: Draw, guarded: bool, view: View, tally: Tally, ttl_ms: int
) -> None:
    if not guarded:
        seen = view.now()
        if take.limit == "discounts":
            if seen.budget - seen.spent < take.amount:
                return short(take, tally)
            view.spend(take.amount)
        else:
            sku = take.body["sku"]
            if seen.stock[sku] - seen.shipped[sku] < take.amount:
                return short(take, tally)
            view.ship(sku, take.amount)
        await client.publish(ns, take.kind, take.body, nonce=client.nonce())
        return None
    constraints = Constraints(client, ns)
    try:  # reserve, commit, and only then act: what is published was within the limit
        held = await constraints.reserve(take.limit, take.amount, ttl_ms)
        await constraints.commit(take.limit, held["reservation"])
    except LedgerRefusal as refusal:
        if refusal.problem not in ("exceeded", "expired"):
            raise
        tally.lapsed += refusal.problem == "expired"  # the commit came after the lease
        return short(take, tally)
    await client.publish(ns, take.kind, take.body, nonce=client.nonce())
    return None


def short(take: Draw, tally: Tally) -> None:
    """The limit had not enough left: a back-order, or a refused discount."""
    if take.limit == "discounts":
        tally.refused += 1
    else:
        tally.backordered += 1


async def listen(client: RelayClient, ns: str, heard: set[str]) -> None:
    """Routed decisions: which SKUs someone decided on (from the start of the log)."""
    async with Decisions(client, ns).notices() as notices:
        async for notice in notices:
            if "entity" in notice:
                heard.add(notice["entity"])


async def plan(
    client: RelayClient,
    ns: str,
    sku: str,
    wanted: str,
    heard: set[str],
    tally: Tally,
    world: World,
) -> None:
    """Guarded: follow a recent plan of another agent that routing told of; decide;
    act only on a decision the conflict rule kept."""
    decisions, me = Decisions(client, ns), client.identity.public_key
    if sku in heard:
        recent = [
            d
            for d in await decisions.on(sku)
            if d["status"] == "accepted"
            and d["author"] != me
            and world.now_ms() - d["at_ms"] < WINDOW_MS
        ]
        if recent and recent[-1]["decision"] != wanted:
            wanted = recent[-1]["decision"]
            tally.aligned += 1
    made = await decisions.decide(sku, "plan", wanted)
    if "conflict" in made:
        settled = await decisions.wait_resolved(made["conflict"])
        if settled["kept"] != made["id"]:
            tally.overruled += 1
            return
    await act(client, ns, sku, wanted)


async def plan_unguarded(
    client: RelayClient,
    ns: str,
    sku: str,
    wanted: str,
    n: int,
    view: View,
    tally: Tally,
    world: World,
) -> None:
    """Unguarded: follow a recent plan of another agent that the snapshot shows; act."""
    seen = view.now().plans.get(sku)
    recent = seen is not None and seen[1] != n and world.now_ms() - seen[0] < WINDOW_MS
    if recent and seen is not None and seen[2] != wanted:
        wanted = seen[2]
        tally.aligned += 1
    view.plan(sku, (world.now_ms(), n, wanted))
    await act(client, ns, sku, wanted)


async def act(client: RelayClient, ns: str, sku: str, plan_: str) -> None:
    await client.publish(ns, "app.act", {"entity": sku, "plan": plan_}, nonce=client.nonce())


def read(relay: HostsLogs, ns: str, work: Workload, tally: Tally, guarded: bool) -> dict[str, Any]:
    """What the log of one arm says happened."""
    shipped: dict[str, int] = defaultdict(int)
    oversold_units = overdrawn = violations = spent = shipments = grants = conflicts = 0
    acts: dict[str, list[tuple[int, bytes, str]]] = defaultdict(list)
    for record in relay.store.scan(ns):
        if record.kind == "conflict.raised":
            conflicts += 1
        if not record.kind.startswith("app."):
            continue
        body = decode(record.event)["body"]
        if record.kind == "app.shipped":
            shipments += 1
            shipped[body["sku"]] += body["qty"]
            over = shipped[body["sku"]] - work.stock[body["sku"]]
            if over > 0:
                violations += 1
                oversold_units += min(over, body["qty"])
        elif record.kind == "app.discount":
            grants += 1
            spent += body["amount"]
            if spent > work.budget:
                violations += 1
                overdrawn += min(spent - work.budget, body["amount"])
        elif record.kind == "app.act":
            acts[body["entity"]].append((record.hlc >> 16, record.author, body["plan"]))
    clashes = [
        (i, j)
        for actions in acts.values()
        for i, (at, who, what) in enumerate(actions)
        for j, (at2, who2, what2) in enumerate(actions[i + 1 :], i + 1)
        if who2 != who and what2 != what and at2 - at < WINDOW_MS
    ]
    contradicting = {(sku, j) for sku, actions in acts.items() for j, (at, who, what) in
                     enumerate(actions) if any(w != who and p != what and at - a < WINDOW_MS
                                               for a, w, p in actions[:j])}  # fmt: skip
    found: dict[str, Any] = {
        "violations": violations,
        "oversold_units": oversold_units,
        "overdrawn": overdrawn,
        "incoherent_decisions": len(clashes),
        "contradictions": len(contradicting),
        "shipments": shipments,
        "discounts": grants,
        "backordered": tally.backordered,
        "refused": tally.refused,
        "handled": shipments + tally.backordered,
        "aligned": tally.aligned,
    }
    if guarded:
        found.update(conflicts=conflicts, overruled=tally.overruled, lapsed=tally.lapsed)
    return found
