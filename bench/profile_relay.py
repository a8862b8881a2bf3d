"""Run ``formicary`` (normally ``relay serve``) under cProfile and save the statistics.

cProfile sees the main thread only: for the relay that is the trio event loop, where
the per-event work is; SQLite commits run in worker threads and are not in the profile.
The relay stops cleanly on SIGTERM, so the statistics are written when it is stopped.

With ``--tasks`` it counts instead, per trio task (by name), the event loop thread's
CPU time and the steps the task ran, and saves them as JSON: where the loop's time
goes between the tasks a request passes through, at the cost of two clock reads per
step rather than a profiler's per call. ``--show`` prints either kind of file (a
``--tasks`` one by its ``.json`` name; the benchmarks' ``--relay-profile FILE.json``
counts per task).

Usage::

    .venv/bin/python bench/profile_relay.py [--tasks] --out FILE -- relay serve --port 7700
    .venv/bin/python bench/profile_relay.py --show FILE [--limit 40] [--per N]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from agent_sdk.cli import main as formicary


class TaskTimes(trio.abc.Instrument):
    """The event loop thread's CPU time and steps per task name; the scheduler's own
    waits for I/O are ``<io wait>``."""

    def __init__(self) -> None:
        self.cpu: Counter[str] = Counter()
        self.steps: Counter[str] = Counter()
        self.began = time.thread_time()
        self._step = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._step = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.cpu[task.name] += time.thread_time() - self._step
        self.steps[task.name] += 1

    def before_io_wait(self, timeout: float) -> None:
        self._step = time.thread_time()

    def after_io_wait(self, timeout: float) -> None:
        self.cpu["<io wait>"] += time.thread_time() - self._step
        self.steps["<io wait>"] += 1

    def figures(self) -> dict[str, Any]:
        return {"thread_cpu_s": time.thread_time() - self.began, "tasks": {
            name: {"cpu_s": self.cpu[name], "steps": self.steps[name]} for name in self.cpu
        }}  # fmt: skip


def run_counting_tasks(command: list[str], out: Path) -> int:
    """Run the command with :class:`TaskTimes` in every ``trio.run`` it makes."""
    counting, plain_run = TaskTimes(), trio.run

    def run(*args: Any, **options: Any) -> Any:
        options["instruments"] = [*options.get("instruments", ()), counting]
        return plain_run(*args, **options)

    trio.run = run  # type: ignore[assignment]  # (the CLI calls trio.run itself)
    try:
        status: int = formicary(command)
    finally:
        trio.run = plain_run
        out.write_text(json.dumps(counting.figures()))
    return status


def show_tasks(path: str, limit: int, per: int) -> None:
    """Print a ``--tasks`` file: CPU and steps per task, per ``per`` units of work."""
    figures = json.loads(Path(path).read_text())
    tasks = sorted(figures["tasks"].items(), key=lambda item: -item[1]["cpu_s"])
    print(f"event loop thread: {figures['thread_cpu_s']:.2f} s of CPU; per {per} unit(s):")
    for name, task in tasks[:limit]:
        cpu_us = task["cpu_s"] / per * 1e6
        print(f"{cpu_us:10.1f} us {task['steps'] / per:8.2f} steps  {name}")


def show(path: str, limit: int) -> None:
    """Print the hottest functions by own time, then by cumulative time."""
    stats = pstats.Stats(path, stream=sys.stdout)
    stats.strip_dirs()
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where to write the cProfile statistics")
    parser.add_argument("--tasks", action="store_true", help="count CPU per trio task instead")
    parser.add_argument("--show", help="print a statistics file instead of running")
    parser.add_argument("--limit", type=int, default=40, help="rows to print with --show")
    parser.add_argument("--per", type=int, default=1, help="--tasks figures per N units")
    parser.add_argument("formicary", nargs=argparse.REMAINDER, help="-- formicary arguments")
    args = parser.parse_args(argv)
    if args.show:
        if args.show.endswith(".json"):
            show_tasks(args.show, args.limit, args.per)
        else:
            show(args.show, args.limit)
        return 0
    command = list(args.formicary)
    if command[:1] == ["--"]:
        del command[0]
    if not args.out or not command:
        parser.error("give --out FILE -- formicary arguments, or --show FILE")
    if args.tasks:
        return run_counting_tasks(command, Path(args.out))
    profiler = cProfile.Profile()
    try:
        status: int = profiler.runcall(formicary, command)
    finally:
        profiler.dump_stats(args.out)
    return status


if __name__ == "__main__":
    sys.exit(main())
