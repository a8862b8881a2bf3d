"""The scenarios a researcher can run, one module each (see docs/simulations.md for how
to add one: a module with ``async def run(world, settings) -> Summary`` and a line
here)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from simulations.model import Settings, Summary
from simulations.scenarios import (
    auction_market,
    federated,
    logistics,
    no_coordination,
    shared_doc,
    work_queue,
)
from simulations.world import World

Scenario = Callable[[World, Settings], Awaitable[Summary]]

SCENARIOS: dict[str, Scenario] = {
    "work_queue": work_queue.run,
    "no_coordination": no_coordination.run,
    "shared_doc": shared_doc.run,
    "auction_market": auction_market.run,
    "federated": federated.run,
    "logistics": logistics.run,
}
