"""``no_coordination``: the same backlog, the same agents, no claims.

The baseline that shows what the ledger prevents. Each agent picks a random order
from a *snapshot* of what is still undone — refreshed every ``snapshot_ms``, as a
dashboard or a cached list would be — does the work and reports a result. Nothing
stops two agents from picking the same order between snapshots: that is duplicate
work, and when their results differ, a conflicting decision.
"""

from __future__ import annotations

import trio

from simulations.model import AgentStates, Meter, Policy, Settings, Summary
from simulations.scenarios.common import NS, RELAY, plan, relay_config, tally
from simulations.world import World, identity_of


class Board:
    """The shared view of what is done, as fresh as the last snapshot each agent took."""

    def __init__(self, orders: list[str], meter: Meter) -> None:
        self.undone = set(orders)
        self.finished = trio.Event()
        self.meter = meter
        meter.start(len(orders), "orders")
        self.states = AgentStates()
        self.crashes = 0

    def report(self, order: str) -> None:
        if order in self.undone:
            self.undone.discard(order)
            self.meter.advance()
        if not self.undone:
            self.finished.set()


async def run(world: World, settings: Settings) -> Summary:
    summary = Summary(settings.scenario, settings.agents, settings.orders, settings.seed)
    async with trio.open_nursery() as nursery:
        relay = await world.start_relay(nursery, relay_config(settings))
        board = Board(await plan(world, settings), world.meter)
        began = trio.current_time()
        with trio.move_on_after(settings.duration_s):
            async with trio.open_nursery() as agents:
                for n in range(settings.agents):
                    agents.start_soon(agent, world, settings, settings.policy_of(n), n, board)
                await board.finished.wait()
                agents.cancel_scope.cancel()
        summary.virtual_seconds = round(trio.current_time() - began, 3)
        nursery.cancel_scope.cancel()
    tally(relay, summary)
    summary.crashes = board.crashes
    summary.states = board.states.samples
    return summary


async def agent(world: World, settings: Settings, policy: Policy, n: int, board: Board) -> None:
    rng = world.rng(f"agent/{n}")
    identity = identity_of(settings.seed, "agent", n)
    board.states.set(n, "idle", world.now_ms())
    async with world.client(RELAY, identity, f"agent/{n}") as client:
        snapshot: list[str] = []
        taken_at = -float("inf")
        while not board.finished.is_set():
            if trio.current_time() - taken_at >= settings.snapshot_ms / 1000:
                snapshot, taken_at = sorted(board.undone), trio.current_time()
            if not snapshot:
                await trio.sleep(settings.snapshot_ms / 1000)
                continue
            order = snapshot.pop(rng.randrange(len(snapshot)))
            board.states.set(n, "working", world.now_ms())
            task_ms = policy.order_ms(settings.seed, order)
            if settings.crash_rate and policy.crashes(rng):  # (no draw at 0: runs as before)
                await trio.sleep(rng.randint(0, task_ms) / 1000)  # dies mid-task: no result
                board.crashes += 1
                board.states.set(n, "down", world.now_ms())
                await trio.sleep(settings.restart_ms / 1000)
                board.states.set(n, "idle", world.now_ms())
                snapshot, taken_at = [], -float("inf")  # a new life: a fresh snapshot
                continue
            await trio.sleep(task_ms / 1000)
            value = rng.choice(("approve", "reject"))
            await client.publish(
                NS, "app.result", {"wo": order, "value": value}, nonce=client.nonce()
            )
            board.report(order)
            board.states.set(n, "idle", world.now_ms())
