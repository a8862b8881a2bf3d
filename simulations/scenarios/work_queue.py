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
from simulations.model import Policy, Settings, Summary
from simulations.scenarios.common import NS, RELAY, plan, relay_config, tally
from simulations.world import World, identity_of

IDLE_MS = (500, 3_000)
"""How long an agent that found nothing open first waits before it asks again; each
further miss doubles the wait, up to :data:`IDLE_MAX_MS` (agents back off, as real
ones do, instead of hammering the relay while every order is taken)."""
IDLE_MAX_MS = 30_000


class Progress:
    def __init__(self, orders: int) -> None:
        self.left = orders
        self.finished = trio.Event()
        self.crashes = 0
        self.wasted = 0

    def finish_one(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.finished.set()


async def run(world: World, settings: Settings) -> Summary:
    summary = Summary(settings.scenario, settings.agents, settings.orders, settings.seed)
    async with trio.open_nursery() as nursery:
        relay = await world.start_relay(nursery, relay_config(settings))
        await plan(world, settings)
        progress = Progress(settings.orders)
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
    return summary


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
        if policy.crashes(rng):
            await trio.sleep(rng.randint(0, task_ms) / 1000)
            return True  # gone mid-task: no release, no goodbye
        await trio.sleep(task_ms / 1000)
        value = rng.choice(("approve", "reject"))
        try:
            await ledger.update(claim, "done")
        except LedgerRefusal:
            progress.wasted += 1  # the lease moved on: this result must not count
            continue
        await ledger.client.publish(
            ledger.ns,
            "app.result",
            {"wo": claim.order, "value": value},
            nonce=ledger.client.nonce(),
        )
        progress.finish_one()
    return False
