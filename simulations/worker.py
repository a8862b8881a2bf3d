"""A worker process of a real-mode run: a slice of the agents, on its own core.

``python -m simulations.worker --url URL --first N --count C --settings JSON`` runs
agents ``N .. N+C-1`` of ``work_queue`` against the relay at ``URL`` until it gets
SIGTERM, then prints its counts (crashes, wasted work, resumed tasks, lost
connections) as one JSON line. The parent (:meth:`RealWorld.run_agents`) watches the
relay's log for results and ends the workers when the backlog is done.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import trio

from simulations.model import Faults, Settings


def settings_to_json(settings: Settings) -> str:
    return json.dumps(asdict(settings))


def settings_from_json(text: str) -> Settings:
    fields: dict[str, Any] = json.loads(text)
    faults = fields.pop("faults")
    partition = faults.get("partition")
    faults["partition"] = None if partition is None else tuple(partition)
    fields["work_ms"] = tuple(fields["work_ms"])
    return Settings(**fields, faults=Faults(**faults))


async def run_slice(url: str, settings: Settings, first: int, count: int) -> dict[str, Any]:
    from simulations.realworld import RealWorld
    from simulations.scenarios.common import RELAY
    from simulations.scenarios.work_queue import Progress, agent

    with tempfile.TemporaryDirectory(prefix="formicary-worker-") as tmp:
        world = RealWorld(settings.seed, Path(tmp), urls={RELAY: url})
        progress = Progress(settings)  # never finishes here: the parent decides
        with trio.open_signal_receiver(signal.SIGTERM) as stop:
            async with trio.open_nursery() as nursery:
                for n in range(first, first + count):
                    nursery.start_soon(agent, world, settings, settings.policy_of(n), n, progress)
                async for _ in stop:
                    nursery.cancel_scope.cancel()
                    break
    return {
        "crashes": progress.crashes,
        "wasted": progress.wasted,
        "resumed": progress.resumed,
        "disconnected": progress.disconnected,
        "states": progress.states.samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--settings", required=True)
    args = parser.parse_args(argv)
    settings = settings_from_json(args.settings)
    counts = trio.run(run_slice, args.url, settings, args.first, args.count)
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
