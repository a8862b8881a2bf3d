"""Run one simulation in virtual time: seeded, deterministic, as fast as the CPU goes."""

from __future__ import annotations

import random
import resource
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import trio
import trio.testing

from relay.store import Store
from simulations.memnet import seed_scheduler
from simulations.model import Meter, Settings, Summary
from simulations.realworld import RealWorld
from simulations.replay import save_log
from simulations.report import measure
from simulations.scenarios import SCENARIOS
from simulations.world import HostsLogs, VirtualWorld


def run_real(
    settings: Settings, workers: int = 1, save: Path | None = None, meter: Meter | None = None
) -> Summary:
    """Run ``settings`` against a relay process on loopback, in real time; with
    ``workers`` > 1 the agents are spread over that many processes (work_queue).
    ``meter`` follows the run's progress (the CLI's live bar)."""
    settings.check(sorted(SCENARIOS))
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="formicary-sim-") as tmp:
        world = RealWorld(settings.seed, Path(tmp), workers=workers, meter=meter or Meter())
        summary = trio.run(SCENARIOS[settings.scenario], world, settings)
        summary.log_hash = world.log_hash()
        summary.series = measure(_homed(world.relays), summary)
        if save is not None:
            save_log(_homed(world.relays), save)
        summary.extra["relay_kills"] = sum(relay.kills for relay in world.relays.values())
        summary.extra["workers"] = workers
        cpu = [relay.cpu_seconds for relay in world.relays.values() if relay.cpu_seconds]
        rss = [relay.peak_rss_mb for relay in world.relays.values() if relay.peak_rss_mb]
        summary.extra["relay_cpu_seconds"] = round(sum(cpu), 3) if cpu else None
        summary.extra["relay_peak_rss_mb"] = max(rss) if rss else None
        for relay in world.relays.values():
            if relay._store is not None:
                relay._store.close()
    summary.wall_seconds = round(time.perf_counter() - began, 3)
    summary.extra["mode"] = "real"
    return summary


def run_virtual(
    settings: Settings, save: Path | None = None, meter: Meter | None = None
) -> Summary:
    """Run ``settings`` under trio's autojump ``MockClock``; returns its summary.
    ``meter`` follows the run's progress (the CLI's live bar)."""
    settings.check(sorted(SCENARIOS))
    seed_scheduler(settings.seed)
    random.seed(settings.seed)  # reconnect backoff jitter (links, clients) draws from it
    world = VirtualWorld(
        settings.seed,
        delay_ms=settings.faults.delay_ms,
        loss=settings.faults.loss,
        meter=meter or Meter(),
    )
    began = time.perf_counter()
    clock = trio.testing.MockClock(autojump_threshold=0)
    cpu_before = _cpu_seconds()
    summary = trio.run(SCENARIOS[settings.scenario], world, settings, clock=clock)
    # The relays and the agents share this process: these figures are for both.
    summary.extra["process_cpu_seconds"] = round(_cpu_seconds() - cpu_before, 3)
    summary.extra["process_peak_rss_mb"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
    )
    summary.wall_seconds = round(time.perf_counter() - began, 3)
    summary.log_hash = world.log_hash()
    summary.series = measure(_homed(world.relays), summary)
    if save is not None:
        save_log(_homed(world.relays), save)
    return summary


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _homed(relays: Mapping[str, HostsLogs]) -> list[tuple[Store, str]]:
    """Every relay's homed logs (mirrors are copies), for :func:`measure`."""
    return [(relay.store, ns) for relay in relays.values() for ns in relay.store.namespaces()]
