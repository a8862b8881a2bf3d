"""``work_queue``: agents share a backlog through the work ledger.

Each agent loops: claim the best open order (``wo.next``, leased), do the work,
mark it done (fenced by the claim's token) and, once the relay accepted that,
report the result (an ``app.result`` event). An agent may crash in the middle of a
task (the policy's crash rate): it drops its connection without a word and comes
back ``restart_ms`` later; its lease runs out and another agent takes the order.
The run ends when every order has a result, or at ``duration_s``.
"""

from __future__ import annotations

import trio

from agent_sdk.ledger import Ledger, LedgerRefusal
from simulations.model import FANOUT, STAGES, Policy, Settings, Summary
from simulations.scenarios.common import NS, RELAY, plan, relay_config, tally
from simulations.world import World, identity_of

IDLE_MS = (500, 3_000)
"""How long an agent that found nothing open first waits before it asks again; each
further miss doubles the wait, up to :data:`IDLE_MAX_MS` (agents back off, as real
ones do, instead of hammering the relay while every order is taken)."""
IDLE_MAX_MS = 30_000


class Progress:
    """What the agents share about the run (the scenario's bookkeeping, not state the
    agents coordinate through: that is the relay's)."""

    def __init__(self, settings: Settings) -> None:
        per_root = {"flat": 1, "fanout": 1 + FANOUT, "pipeline": len(STAGES)}
        self.left = self.total = settings.orders * per_root[settings.variant]
        self.settings = settings
        self.finished = trio.Event()
        self.crashes = 0
        self.wasted = 0
        self.resumed = 0
        self.handoffs = 0
        self.stage: dict[str, str] = {}
        """Order id -> its stage (``pipeline``) or ``parent``/``child`` (``fanout``)."""

    def finish_one(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.finished.set()


async def run(world: World, settings: Settings) -> Summary:
    summary = Summary(settings.scenario, settings.agents, settings.orders, settings.seed)
    async with trio.open_nursery() as nursery:
        relay = await world.start_relay(nursery, relay_config(settings))
        orders = await plan(world, settings)
        progress = Progress(settings)
        root = {"flat": "task", "fanout": "parent", "pipeline": STAGES[0]}[settings.variant]
        for order in orders:
            progress.stage[f"{NS}/{order}"] = root
        began = trio.current_time()
        with trio.move_on_after(settings.duration_s):
            async with trio.open_nursery() as agents:
                for n in range(settings.agents):
                    agents.start_soon(agent, world, settings, settings.policy_of(n), n, progress)
                await progress.finished.wait()
                agents.cancel_scope.cancel()
        summary.virtual_seconds = round(trio.current_time() - began, 3)
        nursery.cancel_scope.cancel()
    tally(relay, summary)
    summary.crashes = progress.crashes
    summary.wasted_work = progress.wasted
    summary.zombies = progress.left  # orders (sub-orders and stages too) never finished
    summary.extra = extra_of(progress)
    return summary


def extra_of(progress: Progress) -> dict[str, object]:
    return {
        "variant": progress.settings.variant,
        "handoff": progress.settings.handoff,
        "orders_total": progress.total,
        "resumed": progress.resumed,
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
    while not progress.finished.is_set():
        life += 1
        async with world.client(relay, identity, f"agent/{n}/{life}") as client:
            ledger = Ledger(client, ns)
            crashed = await work(ledger, rng, policy, progress)
        if not crashed:
            return
        progress.crashes += 1
        await trio.sleep(settings.restart_ms / 1000)


async def follow_up(ledger: Ledger, order: str, value: str, progress: Progress) -> None:
    """What finishing ``order`` starts: the next pipeline stage or the fan-out's
    sub-orders, each handed this order's finding as its context."""
    stage = progress.stage.get(f"{ledger.ns}/{order}", "task")
    if stage in STAGES[:-1]:
        nexts = [STAGES[STAGES.index(stage) + 1]]
    elif stage == "parent":
        nexts = ["child"] * FANOUT
    else:
        nexts = []
    for kind in nexts:
        created = await ledger.create(f"{kind} after {order}")
        progress.stage[f"{ledger.ns}/{created}"] = kind
        await ledger.put_context({"from": order, "finding": value}, created)
        progress.handoffs += 1


async def work(ledger: Ledger, rng, policy: Policy, progress: Progress) -> bool:  # type: ignore[no-untyped-def]
    """Work until the backlog is done (False) or until this life crashes (True)."""
    misses = 0
    while not progress.finished.is_set():
        try:
            claim = await ledger.next()
        except LedgerRefusal as refusal:
            if refusal.problem != "nothing_open":
                raise
            wait_ms = min(IDLE_MAX_MS, rng.randint(*IDLE_MS) << min(misses, 8))
            misses += 1
            await trio.sleep(wait_ms / 1000)
            continue
        misses = 0
        task_ms = policy.task_ms(rng)
        crash_at = rng.randint(0, task_ms) if policy.crashes(rng) else None
        handoff = progress.settings.handoff
        done_part = 0.0
        if handoff:  # what a predecessor that died on this order left behind
            context = await ledger.pull_context(claim.order)
            if context is not None and "progress" in context["body"]:
                done_part = context["body"]["progress"]
                progress.resumed += 1
        todo = [int(task_ms * (1 - done_part) / 2)] * 2  # two halves, a checkpoint between
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
            await ledger.update(claim, "done")
        except LedgerRefusal:
            progress.wasted += 1  # the lease moved on: this result must not count
            continue
        await follow_up(ledger, claim.order, value, progress)
        await ledger.client.publish(
            ledger.ns,
            "app.result",
            {"wo": claim.order, "value": value},
            nonce=ledger.client.nonce(),
        )
        progress.finish_one()
    return False
