"""``federated``: the work queue sharded over ``--relays`` relays, worked across them.

Relay ``r<i>`` homes the namespace ``work-<i>@r<i>`` and gets an equal share of the
backlog. The relays peer with each other (full mesh, each pinning the others' keys)
over the in-memory network, or loopback TCP in real mode. Agent ``n`` connects to
relay ``r<n mod R>`` but works the namespace of the *next* relay,
``r<(n+1) mod R>``: every claim, renewal, completion and result crosses a link, is
sequenced at the namespace's home, and comes back with the home's receipt. Crashes
and lease expiry work as in ``work_queue``; the tally reads each namespace at its
home, and ``forwarded`` (writes each relay delivered over its links) its ``GET /info``.
"""

from __future__ import annotations

from typing import Any

import trio

from simulations.model import STAGES, Settings, Summary
from simulations.scenarios.common import plan, relay_config, tally_logs
from simulations.scenarios.work_queue import Progress, agent, extra_of
from simulations.world import VirtualWorld, World


async def plan_into(
    world: World, settings: Settings, name: str, i: int, count: int, roots: list[str]
) -> None:
    roots += [f"{namespace(i)}/{o}" for o in await plan(world, settings, name, namespace(i), count)]


async def partition(world: VirtualWorld, window: tuple[int, int]) -> None:
    """Cut the links between ``r0`` and ``r1`` for ``window`` (ms from the start)."""
    start_ms, end_ms = window
    await trio.sleep(start_ms / 1000)
    await world.partition("r0", "r1")
    await trio.sleep((end_ms - start_ms) / 1000)
    world.heal("r0", "r1")


def forwarded(info: dict[str, Any]) -> int:
    """Writes a relay delivered to other relays (from its ``GET /info``)."""
    return sum(peer["delivered"] for peer in info["federation"]["peers"])


def namespace(i: int) -> str:
    return f"work-{i}@r{i}"


async def run(world: World, settings: Settings) -> Summary:
    summary = Summary(settings.scenario, settings.agents, settings.orders, settings.seed)
    names = [f"r{i}" for i in range(settings.relays)]
    async with trio.open_nursery() as nursery:
        for name in names:
            peers = tuple(other for other in names if other != name)
            await world.start_relay(nursery, relay_config(settings, name), peers)
        await world.federation_up(names)  # before the clock starts
        roots: list[str] = []
        shares = [settings.orders // len(names)] * len(names)
        shares[0] += settings.orders - sum(shares)
        async with trio.open_nursery() as planners:
            for i, name in enumerate(names):
                planners.start_soon(plan_into, world, settings, name, i, shares[i], roots)
        progress = Progress(settings, world.meter)
        root = {"flat": "task", "fanout": "parent", "pipeline": STAGES[0]}[settings.variant]
        for order in roots:
            progress.stage[order] = root
        began = trio.current_time()
        if settings.faults.partition is not None:
            assert isinstance(world, VirtualWorld), "partition: virtual time (checked before)"
            nursery.start_soon(partition, world, settings.faults.partition)
        with trio.move_on_after(settings.duration_s):
            async with trio.open_nursery() as agents:
                for n in range(settings.agents):
                    home = n % len(names)
                    works_on = (home + 1) % len(names)
                    agents.start_soon(
                        agent,
                        world,
                        settings,
                        settings.policy_of(n),
                        n,
                        progress,
                        names[home],
                        namespace(works_on),
                    )
                await progress.finished.wait()
                agents.cancel_scope.cancel()
        summary.virtual_seconds = round(trio.current_time() - began, 3)
        infos = {name: await world.info(name) for name in names}  # while they run
        nursery.cancel_scope.cancel()
    logs = [(world.relays[name], namespace(i)) for i, name in enumerate(names)]
    tally_logs(logs, summary)
    summary.zombies = progress.left
    summary.crashes = progress.crashes
    summary.wasted_work = progress.wasted
    summary.states = progress.states.samples
    summary.extra = {
        **extra_of(progress),
        "relays": len(names),
        "events_per_relay": {
            name: sum(1 for _ in world.relays[name].store.scan(namespace(i)))
            for i, name in enumerate(names)
        },
        "forwarded": {name: forwarded(infos[name]) for name in names},
    }
    return summary
