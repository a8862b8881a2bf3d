"""Auctions benchmark: many auctions with 20 bidders each through a real relay.

Theory of operation
-------------------
The relay runs as its own process (as in ``bench/ingest.py``). One requester and
``--bidders`` SDK agents join the directory; the requester opens ``--auctions``
auctions at once, each closing ``--window`` ms later, and every bidder bids on every
one as fast as the relay answers. A subscriber notes when each ``auction.closed``
event arrives. Printed, as one JSON object:

* ``auctions_closed_per_s``: auctions over the closing phase, from the first
  deadline to the last close event (``end_to_end_s`` is from the first open, so it
  includes the bidding window);
* ``bids_per_s``: bids acknowledged over the bidding phase;
* ``deadline_to_award_ms``: p50/p99 of (arrival of the close event, carrying the
  award) minus the auction's deadline, wall clock.

With ``--in-flight N`` the namespace first holds N awards in flight: N auctions
(confirmation and lease an hour) get one bid each, and the run waits until the relay
has closed and awarded all of them before it opens the measured ones. An award in
flight is settled when its order moves or its time comes, so the measured phases
should run as fast as with none.

Usage::

    .venv/bin/python bench/auctions.py [--auctions 200] [--bidders 20] [--in-flight 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from ingest import BenchError, percentile, relay_process

from agent_sdk.auctions import Auctions
from agent_sdk.client import Delivery, Live, RelayClient
from agent_sdk.directory import Directory
from agent_sdk.identity import Identity

NS = "bench-market@local"
HOUR_MS = 3_600_000
IN_FLIGHT = {"confirm_ms": HOUR_MS, "lease_ms": HOUR_MS}
"""The terms of the awards held in flight: neither passes on nor lapses in a run."""


def log(message: str) -> None:
    print(f"[auctions] {message}", file=sys.stderr, flush=True)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def measure(
    url: str, auctions: int, bidders: int, window_ms: int, in_flight: int
) -> dict[str, Any]:
    identities = [Identity.generate() for _ in range(bidders)]
    closed_at: dict[str, int] = {}
    deadlines: dict[str, int] = {}
    a_close = trio.Event()  # set (and replaced) at each close event that arrives
    bids_done = 0

    async with (
        RelayClient.connect(url, Identity.generate()) as requester,
        RelayClient.connect(url, Identity.generate()) as watcher,
        watcher.subscribe(NS, kinds=["auction.closed"]) as feed,
        trio.open_nursery() as nursery,
    ):
        await Directory(requester, NS).join("requester")

        async def watch() -> None:
            nonlocal a_close
            async for item in feed:
                if isinstance(item, Live):
                    continue
                assert isinstance(item, Delivery)
                closed_at[item.event.event.body["auction"]] = now_ms()
                a_close.set()
                a_close = trio.Event()

        async def all_closed(ids: list[str]) -> None:
            waiting = set(ids)
            while waiting := {a for a in waiting if a not in closed_at}:
                await a_close.wait()

        async def open_many(count: int, duration_ms: int, **terms: int) -> list[str]:
            opened: list[str] = []

            async def open_one() -> None:
                answer = await market.open(
                    title="task", duration_ms=duration_ms, rule="lowest_price", **terms
                )
                opened.append(answer["auction"])
                deadlines[answer["auction"]] = answer["deadline_ms"]

            async with trio.open_nursery() as opening:
                for _ in range(count):
                    opening.start_soon(open_one)
            return opened

        nursery.start_soon(watch)
        clients = []
        for identity in identities:
            client = await nursery.start(_bidder_client, url, identity)
            clients.append(client)
        market = Auctions(requester, NS)
        if in_flight:
            log(f"putting {in_flight} awards in flight")
            # Long enough to open and bid on all of them at about 1,000 requests/s.
            held = await open_many(in_flight, window_ms + 2 * in_flight, **IN_FLIGHT)

            async def bid_once(client: RelayClient, mine: list[str]) -> None:
                for auction in mine:
                    await Auctions(client, NS).bid(auction, stake=1, price=1)

            async with trio.open_nursery() as bidding:
                for n, client in enumerate(clients):
                    bidding.start_soon(bid_once, client, held[n::bidders])
            with trio.fail_after(120 + (window_ms + 2 * in_flight) / 1000):
                await all_closed(held)
            log(f"{in_flight} awards in flight; measuring")
        started = time.perf_counter()
        opened = await open_many(auctions, window_ms)
        bidding_started = time.perf_counter()

        async def bid_all(client: RelayClient, n: int) -> None:
            nonlocal bids_done
            mine = Auctions(client, NS)
            for i, auction in enumerate(opened):
                await mine.bid(auction, stake=1, price=(n * 7 + i) % 50)
                bids_done += 1

        async with trio.open_nursery() as bidding:
            for n, client in enumerate(clients):
                bidding.start_soon(bid_all, client, n)
        bidding_s = time.perf_counter() - bidding_started
        with trio.fail_after(120):
            await all_closed(opened)
        total_s = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    lags = sorted(max(0, closed_at[a] - deadlines[a]) * 1_000_000 for a in opened)
    closing_s = max(1, max(closed_at[a] for a in opened) - min(deadlines[a] for a in opened)) / 1000
    return {
        "auctions": auctions,
        "in_flight": in_flight,
        "bidders": bidders,
        "window_ms": window_ms,
        "auctions_closed_per_s": round(auctions / closing_s, 1),
        "end_to_end_s": round(total_s, 3),
        "bids": bids_done,
        "bids_per_s": round(bids_done / bidding_s, 1),
        "deadline_to_award_ms": {"p50": percentile(lags, 50), "p99": percentile(lags, 99)},
    }


async def _bidder_client(
    url: str, identity: Identity, *, task_status: trio.TaskStatus[RelayClient]
) -> None:
    async with RelayClient.connect(url, identity) as client:
        await Directory(client, NS).join("bidder")
        task_status.started(client)
        await trio.sleep_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--auctions", type=int, default=200)
    parser.add_argument("--bidders", type=int, default=20)
    parser.add_argument("--window", type=int, default=5_000, help="ms from open to deadline")
    parser.add_argument("--in-flight", type=int, default=0, help="awards in flight first")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="formicary-bench-auctions-") as tmp:
        try:
            # Every bidder stakes 1 on every auction: give each enough for all of them.
            extra = ["--initial-stake", str(10 * (args.auctions + args.in_flight))]
            with relay_process(Path(tmp), None, extra) as relay:
                relay.wait_ready(30)
                result = trio.run(
                    measure, relay.url, args.auctions, args.bidders, args.window, args.in_flight
                )
        except (BenchError, trio.TooSlowError) as exc:
            log(f"failed: {exc}")
            return 1
    result = {
        "bench": "auctions",
        **result,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
