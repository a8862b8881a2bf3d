"""``formicary sim run|sweep``: simulations from the command line.

Every setting is checked before anything starts; a bad one is a usage error (exit 2)
that names the valid choices. Results go to ``--out``: ``results.json``,
``timeseries.csv``, plots and ``report.md`` for a run; ``sweep.json`` and
``scaling.png`` for a sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from simulations import report
from simulations.model import (
    FAULTS,
    POLICIES,
    Faults,
    Meter,
    Settings,
    Summary,
    UsageError,
    parse_faults,
)
from simulations.scenarios import SCENARIOS

PLANNED: tuple[str, ...] = ()
"""Scenarios the issue lists that are not built yet: named in errors, refused."""


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help (a researcher reads them off before a run),
    except the empty ones: a flag's False, no faults, no --out."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == "":
            return action.help
        return super()._get_help_string(action)


def add_parser(sub: Any, duration: Callable[[str, str], int]) -> None:
    sim = sub.add_parser("sim", help="N-agent simulations (docs/simulations.md)")
    verbs = sim.add_subparsers(dest="sim", required=True)
    defaults = _ShowDefaults
    run = verbs.add_parser(
        "run",
        help="run one scenario; writes OUT/results.json and a report",
        formatter_class=defaults,
    )
    run.add_argument("--agents", type=int, default=100, help="agents, one connection each")
    run.add_argument("--seed", type=int, default=1, help="seeds every random choice of the run")
    _common(run)
    run.set_defaults(func=lambda args: cmd_run(args, duration))
    replay = verbs.add_parser("replay", help="re-fold a run's log offline; list anomalies")
    replay.add_argument("logdir", help="a run's --out directory (or its log/ folder)")
    replay.set_defaults(func=cmd_replay)
    sweep = verbs.add_parser(
        "sweep", help="run a grid of sizes and seeds; JSON and a plot", formatter_class=defaults
    )
    sweep.add_argument("--agents", default="10,100", help="comma-separated agent counts")
    sweep.add_argument("--seeds", default="1-3", help="a range A-B or a list A,B,C")
    _common(sweep)
    sweep.set_defaults(func=lambda args: cmd_sweep(args, duration))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", help=f"one of {', '.join(sorted(SCENARIOS))}")
    p.add_argument("--orders", type=int, default=500, help="work orders in the backlog")
    p.add_argument("--crash-rate", type=float, default=0.0, help="chance of a crash per task")
    p.add_argument("--policy", default="uniform", help=f"one of {', '.join(POLICIES)}")
    p.add_argument("--work", default="1s-5s", help="task duration range, e.g. 1s-5s")
    p.add_argument("--ttl", default="30s", help="claim lease")
    p.add_argument("--restart", default="5s", help="how long a crashed agent stays down")
    p.add_argument(
        "--snapshot", default="10s", help="staleness of no_coordination's and --take claim's view"
    )
    p.add_argument("--duration", default="24h", help="stop after this much virtual time")
    p.add_argument("--relays", type=int, default=1, help="relays of a `federated` run")
    p.add_argument("--variant", default="flat", help="work_queue: flat, fanout or pipeline")
    p.add_argument(
        "--take",
        default="next",
        help="work_queue: next (the relay hands out the best open order) or claim"
        " (each agent claims one it picked from its own --snapshot-old list)",
    )
    p.add_argument("--workers", type=int, default=1, help="real mode, work_queue: agent processes")
    p.add_argument(
        "--no-handoff",
        action="store_true",
        help="work_queue: no half-way checkpoint in the order's context",
    )
    p.add_argument(
        "--faults", default="", help=f"comma-separated: {', '.join(FAULTS)} (docs/simulations.md)"
    )
    p.add_argument(
        "--virtual-time", action="store_true", help="in-process, MockClock (else: real time)"
    )
    p.add_argument("--out", required=True, help="directory for the results")


def settings_of(
    args: argparse.Namespace, agents: int, seed: int, duration: Callable[[str, str], int]
) -> Settings:
    """The settings of one run; raises :class:`UsageError` for anything that cannot run."""
    try:
        return _settings_of(args, agents, seed, duration)
    except UsageError:
        raise
    except Exception as exc:  # the duration parser's own usage error, a bad int, ...
        raise UsageError(str(exc)) from None


def _settings_of(
    args: argparse.Namespace, agents: int, seed: int, duration: Callable[[str, str], int]
) -> Settings:
    low, dash, high = args.work.partition("-")
    if not dash:
        raise UsageError(f"--work {args.work!r}: a range like 1s-5s")
    if args.scenario in PLANNED:
        raise UsageError(
            f"scenario {args.scenario!r} is not built yet; choose from "
            f"{', '.join(sorted(SCENARIOS))}"
        )
    faults = parse_faults(args.faults, duration)
    if args.virtual_time and faults.relay_kill is not None:
        raise UsageError("--faults relay_kill kills a relay process: drop --virtual-time")
    if not args.virtual_time and faults != replace(Faults(), relay_kill=faults.relay_kill):
        raise UsageError("--faults slow, delay, loss, partition: add --virtual-time")
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if args.workers > 1 and (args.virtual_time or args.scenario != "work_queue"):
        raise UsageError("--workers: real mode, work_queue, so far")
    if args.workers > 1 and args.variant != "flat":
        raise UsageError("--workers: with --variant flat, so far")
    settings = Settings(
        scenario=args.scenario,
        agents=agents,
        orders=args.orders,
        seed=seed,
        crash_rate=args.crash_rate,
        policy=args.policy,
        work_ms=(duration(low, "--work"), duration(high, "--work")),
        ttl_ms=duration(args.ttl, "--ttl"),
        restart_ms=duration(args.restart, "--restart"),
        snapshot_ms=duration(args.snapshot, "--snapshot"),
        relays=args.relays,
        variant=args.variant,
        take=args.take,
        handoff=not args.no_handoff,
        faults=faults,
        duration_s=duration(args.duration, "--duration") / 1000,
    )
    settings.check(sorted(SCENARIOS))
    return settings


def cmd_run(args: argparse.Namespace, duration: Callable[[str, str], int]) -> int:
    from simulations.run import run_real, run_virtual

    try:
        settings = settings_of(args, args.agents, args.seed, duration)
        out = _out_dir(args.out)
        if (out / "log").exists():
            raise UsageError(
                f"--out {out} holds a run already (log/): give another directory, or remove it"
            )
    except (UsageError, ValueError) as exc:
        print(f"formicary sim: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    relays = "relay processes" if settings.relays > 1 else "a relay process"
    mode = "virtual time" if args.virtual_time else f"real time, {relays} on loopback"
    _progress(
        f"{settings.scenario}: {settings.agents} agents, {settings.orders} orders, "
        f"seed {settings.seed}, {mode}"
    )
    # Written in a hidden directory of OUT (one file system), moved in once whole: an
    # interrupted run leaves nothing there.
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    try:
        with progress_bar(settings.scenario) as meter:
            if args.virtual_time:  # the log is kept in OUT/log for `formicary sim replay`
                summary = run_virtual(settings, save=staging, meter=meter)
            else:
                summary = run_real(settings, workers=args.workers, save=staging, meter=meter)
        document = report.write(staging, summary, summary.series)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    names = sorted(os.listdir(staging), key=lambda name: name == "results.json")
    try:
        for name in names:  # results.json last: there, the run is all there
            os.replace(staging / name, out / name)
    except OSError as exc:  # the run is kept where it was written, not thrown away
        print(f"formicary sim: the run is in {staging}: moving it in: {exc}", file=sys.stderr)
        return 1
    staging.rmdir()
    print(json.dumps(document))
    return 0


def cmd_sweep(args: argparse.Namespace, duration: Callable[[str, str], int]) -> int:
    from relay.app import write_durably
    from simulations.run import run_real, run_virtual

    try:
        sizes = _numbers(args.agents, "--agents")
        seeds = _seeds(args.seeds)
        grid = [settings_of(args, n, seed, duration) for n in sizes for seed in seeds]
        out = _out_dir(args.out)
        if (out / "sweep.json").exists():
            raise UsageError(f"--out {out} holds a sweep already: give another directory")
    except (UsageError, ValueError) as exc:
        print(f"formicary sim: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    runs: list[Summary] = []
    for i, settings in enumerate(grid, 1):
        label = f"[{i}/{len(grid)}] {settings.agents} agents, seed {settings.seed}"
        with progress_bar(label) as meter:
            if args.virtual_time:
                runs.append(run_virtual(settings, meter=meter))
                # The runs share this process: its peak is not any one run's.
                runs[-1].extra["process_peak_rss_mb"] = None
            else:
                runs.append(run_real(settings, workers=args.workers, meter=meter))
        points = _points(sizes, runs)
        document = {
            "scenario": args.scenario,
            "complete": i == len(grid),  # (written after every run: a stop keeps them)
            "points": points,
            "runs": [report.results(r) for r in runs],
        }
        write_durably(out / "sweep.json", json.dumps(document, indent=2) + "\n")
    report.scaling_plot(
        out,
        f"{args.scenario}: throughput by agent count (mean of {len(seeds)} seeds)",
        [(p["agents"], p["orders_per_virtual_s"]) for p in points],
    )
    print(json.dumps({"scenario": args.scenario, "points": points}))
    return 0


def _points(sizes: list[int], runs: list[Summary]) -> list[dict[str, Any]]:
    """Per agent count with finished runs, the mean over its seeds."""
    points = []
    for n in sizes:
        mine = [r for r in runs if r.agents == n]
        if not mine:
            continue
        points.append(
            {
                "agents": n,
                "orders_per_virtual_s": statistics.mean(r.orders_per_virtual_s for r in mine),
                "duplicate_work": statistics.mean(r.duplicate_work for r in mine),
                "zombie_orders": statistics.mean(r.zombies for r in mine),
                "wall_seconds": statistics.mean(r.wall_seconds for r in mine),
            }
        )
    return points


def cmd_replay(args: argparse.Namespace) -> int:
    from simulations.replay import replay

    if (
        not (Path(args.logdir) / "log" / "events.sqlite3").exists()
        and not (Path(args.logdir) / "events.sqlite3").exists()
    ):
        print(f"formicary sim: no run log in {args.logdir}", file=sys.stderr)
        return 2
    report = replay(Path(args.logdir))
    print(json.dumps(report))
    return 0 if report["ok"] else 1


def _seeds(spec: str) -> list[int]:
    try:
        if "-" in spec:
            first, _, last = spec.partition("-")
            seeds = list(range(int(first), int(last) + 1))
        else:
            seeds = [int(s) for s in spec.split(",")]
    except ValueError:
        raise UsageError(
            f"--seeds {spec!r}: seeds as FIRST-LAST or a comma-separated list (0 and up)"
        ) from None
    if not seeds:
        raise UsageError(f"--seeds {spec!r}: no seed in it")
    return seeds


def _numbers(spec: str, flag: str) -> list[int]:
    try:
        return [int(n) for n in spec.split(",")]
    except ValueError:
        raise UsageError(f"{flag} {spec!r}: whole numbers, comma-separated") from None


def _out_dir(spec: str) -> Path:
    out = Path(spec)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: give a directory")
    return out


@contextmanager
def progress_bar(label: str) -> Iterator[Meter]:
    """A live bar on stderr (rich) for the run measuring into the yielded meter:
    units done of the total, elapsed time and an estimate of what is left. Off a
    terminal it prints the final state once."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), refresh_per_second=4) as bar:
        task = bar.add_task(label, total=None, unit="")

        def draw(meter: Meter) -> None:
            bar.update(task, total=meter.total, completed=meter.done, unit=meter.unit)

        yield Meter(draw)


def _progress(message: str) -> None:
    print(f"[sim] {message}", file=sys.stderr, flush=True)
