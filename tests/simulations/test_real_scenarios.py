"""``shared_doc`` and ``federated`` for real: relay processes on loopback, agents
over real WebSockets, the same scenario code as in virtual time.

Small sizes and short tasks: a few seconds each.
"""

from __future__ import annotations

from pathlib import Path

import trio

from relay.node import RelayConfig
from simulations.model import Settings
from simulations.realworld import RealWorld
from simulations.run import run_real


def test_replicas_editing_through_crashes_converge_on_a_relay_process() -> None:
    settings = Settings(
        scenario="shared_doc",
        agents=6,
        orders=8,
        seed=2,
        crash_rate=0.1,
        work_ms=(20, 60),
        ttl_ms=1_000,
        restart_ms=100,
    )
    summary = run_real(settings)
    assert summary.extra["mode"] == "real"
    assert summary.extra["converged"] and summary.extra["convergence_ms"] is not None
    assert summary.done == 6 * 8 and summary.zombies == 0
    # (Not one update per edit: an SDK replica merges the edits made while a publish is
    # in flight into the next update, and on a loaded machine it does, 41 for 48 once.)
    assert summary.events > summary.extra["docs"]  # the documents' creations and updates


def test_work_sharded_over_two_relay_processes_is_done_once_across_links() -> None:
    settings = Settings(
        scenario="federated",
        relays=2,
        agents=10,
        orders=40,
        seed=3,
        crash_rate=0.1,
        work_ms=(20, 60),
        ttl_ms=1_000,
        restart_ms=100,
    )
    summary = run_real(settings)
    assert summary.extra["mode"] == "real"
    assert summary.done == 40 and summary.duplicate_work == 0 and summary.zombies == 0
    assert summary.extra["relays"] == 2
    assert all(n > 0 for n in summary.extra["forwarded"].values())  # both ways over links


async def test_a_relay_killed_and_restarted_counts_both_processes_cpu(tmp_path: Path) -> None:
    world = RealWorld(1, tmp_path)
    async with trio.open_nursery() as nursery:
        relay = await world.start_relay(nursery, RelayConfig(name="local"))
        await world.kill_and_restart("local")
        nursery.cancel_scope.cancel()
    # Each process started Python and a relay: neither spent nothing.
    first, second = relay.cpu_by_process
    assert first > 0 and second > 0
    assert relay.cpu_seconds == round(first + second, 3)
