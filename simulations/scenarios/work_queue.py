"""``work_queue``: agents share a backlog through the work ledger.

Each agent loops: claim the best open order (``wo.next``, leased), do the work,
mark it done (fenced by the claim's token) and, once the relay accepted that,
report the result (an ``app.result`` event). With ``take="claim"`` an agent picks
the order itself, at random from the open orders it last listed (a :class:`View`,
up to ``snapshot_ms`` old), and claims that one (``wo.claim``): agents then aim at
orders others hold, and only the relay's refusal (``held``) keeps them apart, where
``wo.next`` never offers a held order at all. An agent may crash in the middle of a
task (the policy's crash rate): it drops its connection without a word and comes
back ``restart_ms`` later; its lease runs out and another agent takes the order.
The run ends when every order has a result, or at ``duration_s``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import trio
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from agent_sdk.errors import ProtocolError
from agent_sdk.ledger import Claim, Ledger, LedgerRefusal
from simulations.model import (
    FANOUT,
    ORDERS_PER_ROOT,
    STAGES,
    AgentStates,
    Meter,
    Policy,
    Settings,
    Summary,
)
from simulations.scenarios.common import NS, RELAY, plan, relay_config, tally
from simulations.world import World, identity_of

IDLE_MS = (500, 3_000)
"""How long an agent that found nothing open first waits before it asks again; each
further miss doubles the wait, up to :data:`IDLE_MAX_MS` (agents back off, as real
ones do, instead of hammering the relay while every order is taken)."""
IDLE_MAX_MS = 30_000
LOST = (ProtocolError, OSError, ConnectionClosed, InvalidHandshake, trio.TooSlowError)
"""How an agent notices its relay went away (a killed relay, real mode)."""


class Progress:
    """What the agents share about the run (the scenario's bookkeeping, not state the
    agents coordinate through: that is the relay's)."""

    def __init__(self, settings: Settings, meter: Meter | None = None) -> None:
        self.left = self.total = settings.orders * ORDERS_PER_ROOT[settings.variant]
        self.meter = meter or Meter()
        self.meter.start(self.total, "orders")
        self.states = AgentStates()
        self.settings = settings
        self.finished = trio.Event()
        self.crashes = 0
        self.wasted = 0
        self.resumed = 0
        self.disconnected = 0
        self.handoffs = 0
        self.reported: set[str] = set()
        """Orders (``ns/order``) with a result: a second result for one (a duplicate,
        which only a broken relay lets through) finishes nothing more."""
        self.stage: dict[str, str] = {}
        """Order id -> its stage (``pipeline``) or ``parent``/``child`` (``fanout``)."""

    def finish_one(self, order: str) -> None:
        """``order`` (``ns/order``) has a result."""
        if order in self.reported:
            return
        self.reported.add(order)
        self.left -= 1
        self.meter.advance()
        if self.left == 0:
            self.finished.set()


async def run(world: World, settings: Settings) -> Summary:
    summary = Summary(settings.scenario, settings.agents, settings.orders, settings.seed)
    async with trio.open_nursery() as nursery:
        relay = await world.start_relay(nursery, relay_config(settings))
        orders = await plan(world, settings)
        progress = Progress(settings, world.meter)
        root = {"flat": "task", "fanout": "parent", "pipeline": STAGES[0]}[settings.variant]
        for order in orders:
            progress.stage[f"{NS}/{order}"] = root
        began = trio.current_time()
        if settings.faults.relay_kill is not None:
            nursery.start_soon(kill_relay, world, settings.faults.relay_kill)
        with trio.move_on_after(settings.duration_s):
            if getattr(world, "workers", 1) > 1:  # real mode, agents in worker processes
                from simulations.realworld import RealWorld, run_agents

                assert isinstance(world, RealWorld)
                await run_agents(world, settings, progress)
            else:
                async with trio.open_nursery() as agents:
                    for n in range(settings.agents):
                        agents.start_soon(
                            agent, world, settings, settings.policy_of(n), n, progress
                        )
                    await progress.finished.wait()
                    agents.cancel_scope.cancel()
        summary.virtual_seconds = round(trio.current_time() - began, 3)
        nursery.cancel_scope.cancel()
    tally(relay, summary)
    summary.crashes = progress.crashes
    summary.wasted_work = progress.wasted
    summary.zombies = progress.left  # orders (sub-orders and stages too) never finished
    summary.extra = extra_of(progress)
    summary.states = progress.states.samples
    return summary


async def kill_relay(world: World, at_ms: int) -> None:
    """The ``relay_kill`` fault: SIGKILL the relay process, then restart it."""
    from simulations.realworld import RealWorld

    assert isinstance(world, RealWorld), "relay_kill is checked to be real mode"
    await trio.sleep(at_ms / 1000)
    await world.kill_and_restart(RELAY)


def extra_of(progress: Progress) -> dict[str, object]:
    return {
        "variant": progress.settings.variant,
        "take": progress.settings.take,
        "handoff": progress.settings.handoff,
        "orders_total": progress.total,
        "resumed": progress.resumed,
        "disconnected": progress.disconnected,
        "handoffs": progress.handoffs,
    }


async def agent(
    world: World,
    settings: Settings,
    policy: Policy,
    n: int,
    progress: Progress,
    relay: str = RELAY,
    ns: str = NS,
) -> None:
    """One agent's life: it works until the backlog is done, crashing and coming back.
    It connects to ``relay`` and works on ``ns`` (homed there, or elsewhere)."""
    rng = world.rng(f"agent/{n}")
    identity = identity_of(settings.seed, "agent", n)
    life = 0
    reporting: list[Report] = []  # a result being reported when the relay went away

    def mark(state: str) -> None:
        progress.states.set(n, state, world.now_ms())

    while not progress.finished.is_set():
        life += 1
        mark("idle")
        connected = False
        try:
            async with world.client(relay, identity, f"agent/{n}/{life}", lossy=True) as client:
                connected = True
                ledger = Ledger(client, ns)
                if reporting:
                    await report(ledger, reporting, progress)
                crashed = await work(ledger, rng, policy, progress, reporting, mark)
        except* LOST:  # (the client's own task may fail alongside: a group)
            # The relay went away (killed, or a lost message); a dial that failed (the
            # relay not back yet) lost no connection: it is not counted again.
            progress.disconnected += connected
        else:
            if not crashed:
                mark("idle")
                return
            progress.crashes += 1  # died mid-task (a disconnect is counted apart)
        mark("down")
        await trio.sleep(settings.restart_ms / 1000)


async def follow_up(ledger: Ledger, order: str, value: str, progress: Progress) -> None:
    """What finishing ``order`` starts: the next pipeline stage or the fan-out's
    sub-orders, each handed this order's finding in its description. (Not as its
    context, put after creating it: another agent can claim it in between, and a
    context put without the holder's token is then refused.)"""
    stage = progress.stage.get(f"{ledger.ns}/{order}", "task")
    if stage in STAGES[:-1]:
        nexts = [STAGES[STAGES.index(stage) + 1]]
    elif stage == "parent":
        nexts = ["child"] * FANOUT
    else:
        nexts = []
    for kind in nexts:
        created = await ledger.create(f"{kind} after {order}", description=f"finding: {value}")
        progress.stage[f"{ledger.ns}/{created}"] = kind
        progress.handoffs += 1


@dataclass(frozen=True)
class Report:
    """A finished order's completion and result, with the exact bytes to publish: sent
    again after a lost connection, each is the same event (idempotent), never a second
    completion or a second result."""

    claim: Claim
    value: str
    ts: int
    nonce: bytes
    """Of the result; the completion's is ``done_nonce``."""
    done_nonce: bytes

    @property
    def order(self) -> str:
        return self.claim.order


async def complete(ledger: Ledger, result: Report) -> None:
    """Mark the order done under the claim, with the same bytes on every try: the relay
    answers a repeat with the first decision (done, or refused because the lease had
    moved on), so only the agent whose completion the relay took reports a result. (A
    fresh request after a lost answer could not tell: the order may show done by the
    agent that took it over.)"""
    claim = result.claim
    body = {"status": "done", "reason": "", "wo": claim.order, "token": claim.token}
    await ledger.request("wo.update", body, nonce=result.done_nonce, ts=result.ts)


async def report(ledger: Ledger, reporting: list[Report], progress: Progress) -> None:
    """Finish reporting an order whose completion's answer was lost with the
    connection: complete it again (the same request), then publish its result."""
    result = reporting[0]
    try:
        await complete(ledger, result)
    except LedgerRefusal:
        progress.wasted += 1  # the lease had moved on: this result must not count
    else:
        await publish_result(ledger, result, progress)
    reporting.clear()


async def publish_result(ledger: Ledger, result: Report, progress: Progress) -> None:
    await ledger.client.publish(
        ledger.ns,
        "app.result",
        {"wo": result.order, "value": result.value},
        nonce=result.nonce,
        ts=result.ts,
    )
    progress.finish_one(f"{ledger.ns}/{result.order}")


class View:
    """The open orders an agent last listed (``wo.list``), as it believes them to be:
    listed again once ``snapshot_ms`` old, or used up. Others claim and finish orders
    meanwhile, so many of its picks are held or done by the time it claims them."""

    def __init__(self, snapshot_ms: int) -> None:
        self.snapshot_ms = snapshot_ms
        self.orders: list[str] = []
        self.listed_ms: int | None = None

    async def pick(self, ledger: Ledger, rng: random.Random) -> str | None:
        """An order drawn from the view (listed again first if stale or empty), taken
        out of it; None when the relay lists none open."""
        now = ledger.client.clock_ms()
        if not self.orders or self.listed_ms is None or now - self.listed_ms >= self.snapshot_ms:
            self.orders = [order["id"] for order in await ledger.list("open")]
            self.listed_ms = now
        return self.orders.pop(rng.randrange(len(self.orders))) if self.orders else None


async def take(ledger: Ledger, rng: random.Random, view: View | None) -> Claim | None:
    """The agent's next claim, or None when it finds nothing open (it waits). Without a
    view, ``wo.next``: the relay hands it the best open order. With one, the agent
    claims orders drawn from its view until one is granted; an order held by another
    agent (``held``) or no longer open (``bad_transition``: done since it was listed)
    is refused, and the agent draws again."""
    if view is None:
        try:
            return await ledger.next()
        except LedgerRefusal as refusal:
            if refusal.problem != "nothing_open":
                raise
            return None
    while (order := await view.pick(ledger, rng)) is not None:
        try:
            return await ledger.claim(order)
        except LedgerRefusal as refusal:
            if refusal.problem not in ("held", "bad_transition"):
                raise
        if not view.orders:
            return None  # every order it listed is taken: wait before listing again
    return None


async def work(
    ledger: Ledger,
    rng: random.Random,
    policy: Policy,
    progress: Progress,
    reporting: list[Report],
    mark: Callable[[str], None],
) -> bool:
    """Work until the backlog is done (False) or until this life crashes (True);
    ``mark`` records the agent's state (idle or working) as it changes."""
    misses = 0
    settings = progress.settings
    view = View(settings.snapshot_ms) if settings.take == "claim" else None  # (per life)
    while not progress.finished.is_set():
        claim = await take(ledger, rng, view)
        if claim is None:
            wait_ms = min(IDLE_MAX_MS, rng.randint(*IDLE_MS) << min(misses, 8))
            misses += 1
            await trio.sleep(wait_ms / 1000)
            continue
        misses = 0
        mark("working")
        task_ms = policy.order_ms(progress.settings.seed, claim.order)
        handoff = progress.settings.handoff
        done_part = 0.0
        if handoff:  # what a predecessor that died on this order left behind
            context = await ledger.pull_context(claim.order)
            if context is not None and "progress" in context["body"]:
                done_part = context["body"]["progress"]
                progress.resumed += 1
        todo = [int(task_ms * (1 - done_part) / 2)] * 2  # two halves, a checkpoint between
        # Within the work left: drawn over the whole task, a resumed one crashed less
        # often than --crash-rate, which flattered the handoff.
        crash_at = rng.randint(0, sum(todo)) if policy.crashes(rng) else None
        try:
            for half, ms in enumerate(todo):
                if crash_at is not None and crash_at < ms:
                    await trio.sleep(crash_at / 1000)
                    return True  # gone mid-task: no release, no goodbye
                crash_at = None if crash_at is None else crash_at - ms
                await trio.sleep(ms / 1000)
                if half == 0 and handoff:
                    await ledger.put_context({"progress": done_part + (1 - done_part) / 2}, claim)
            value = rng.choice(("approve", "reject"))
            clock, client = ledger.client.clock_ms(), ledger.client
            reporting.append(Report(claim, value, clock, client.nonce(), client.nonce()))
            await complete(ledger, reporting[0])
        except LedgerRefusal:
            reporting.clear()
            progress.wasted += 1  # the lease moved on: this result must not count
            mark("idle")
            continue
        await follow_up(ledger, claim.order, value, progress)
        await publish_result(ledger, reporting[0], progress)
        reporting.clear()
        mark("idle")
    return False
