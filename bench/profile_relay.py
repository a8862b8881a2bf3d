"""Run ``formicary`` (normally ``relay serve``) under cProfile and save the statistics.

cProfile sees the main thread only: for the relay that is the trio event loop, where
the per-event work is; SQLite commits run in worker threads and are not in the profile.
The relay stops cleanly on SIGTERM, so the statistics are written when it is stopped.

Usage::

    .venv/bin/python bench/profile_relay.py --out relay.prof -- relay serve --port 7700
    .venv/bin/python bench/profile_relay.py --show relay.prof [--limit 40]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from collections.abc import Sequence

from agent_sdk.cli import main as formicary


def show(path: str, limit: int) -> None:
    """Print the hottest functions by own time, then by cumulative time."""
    stats = pstats.Stats(path, stream=sys.stdout)
    stats.strip_dirs()
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where to write the cProfile statistics")
    parser.add_argument("--show", help="print a statistics file instead of running")
    parser.add_argument("--limit", type=int, default=40, help="rows to print with --show")
    parser.add_argument("formicary", nargs=argparse.REMAINDER, help="-- formicary arguments")
    args = parser.parse_args(argv)
    if args.show:
        show(args.show, args.limit)
        return 0
    command = list(args.formicary)
    if command[:1] == ["--"]:
        del command[0]
    if not args.out or not command:
        parser.error("give --out FILE -- formicary arguments, or --show FILE")
    profiler = cProfile.Profile()
    try:
        status: int = profiler.runcall(formicary, command)
    finally:
        profiler.dump_stats(args.out)
    return status


if __name__ == "__main__":
    sys.exit(main())
