"""What the work-queue scenarios share: the backlog, the planner, and the tally of
what the log says happened."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import trio

from agent_sdk.ledger import Ledger
from agent_sdk.wire import decode
from relay.coordination.leases import TtlBounds
from relay.limits import UNLIMITED
from relay.node import RelayConfig
from relay.store import Record
from simulations.model import LONGEST_TTL_MS, Settings, Summary
from simulations.world import HostsLogs, World, identity_of

NS = "work@sim"
RELAY = "sim"
PLANNER_LANES = 32
"""Orders created concurrently by the planner (one connection, pipelined)."""


def relay_config(settings: Settings, name: str = RELAY) -> RelayConfig:
    # The relay's shortest lease is 1 s; a run may ask for a shorter --ttl.
    shortest = min(1_000, settings.ttl_ms)
    claims = TtlBounds(min_ms=shortest, max_ms=LONGEST_TTL_MS, default_ms=settings.ttl_ms)
    # A simulation measures coordination, not the relay's defence against floods: its
    # planner creates a whole backlog at one instant of virtual time.
    return RelayConfig(name=name, claim_ttl=claims, lock_ttl=claims, rate_limits=UNLIMITED)


async def plan(
    world: World,
    settings: Settings,
    relay: str = RELAY,
    ns: str = NS,
    count: int | None = None,
) -> list[str]:
    """Create a backlog in ``ns`` (``count`` orders, default all): random priorities."""
    count = settings.orders if count is None else count
    rng = world.rng(f"planner/{ns}")
    priorities = [rng.randint(0, 4) for _ in range(count)]
    orders: list[str | None] = [None] * count
    planner = identity_of(settings.seed, "planner", 0)
    async with world.client(relay, planner, f"planner/{ns}") as c:
        ledger = Ledger(c, ns)

        async def lane(first: int) -> None:
            for n in range(first, count, PLANNER_LANES):
                orders[n] = await ledger.create(f"task {n}", priority=priorities[n])

        async with trio.open_nursery() as nursery:
            for first in range(min(PLANNER_LANES, count)):
                nursery.start_soon(lane, first)
    return [order for order in orders if order is not None]


def expired_leases(record: Record) -> int:
    """Leases a ``lease.expired`` record ends (one event may end many)."""
    return len(decode(record.event)["body"]["leases"])


def tally(relay: HostsLogs, summary: Summary, namespaces: tuple[str, ...] = (NS,)) -> None:
    """Read the outcome off the log: results per order, expiries, events."""
    tally_logs([(relay, ns) for ns in namespaces], summary)


def tally_logs(logs: Sequence[tuple[HostsLogs, str]], summary: Summary) -> None:
    """:func:`tally` over namespaces homed on several relays."""
    results: dict[tuple[str, str], list[str]] = defaultdict(list)
    kinds: Counter[str] = Counter()
    expiries = held = 0
    for relay, ns in logs:
        for record in relay.store.scan(ns):
            kinds[record.kind] += 1
            if record.kind == "app.result":
                body = decode(record.event)["body"]
                results[(ns, body["wo"])].append(body["value"])
            elif record.kind == "lease.expired":
                expiries += expired_leases(record)
            elif record.kind == "wo.rejected":  # (only a claim is refused as held)
                held += decode(record.event)["body"]["problem"] == "held"
    summary.events = sum(kinds.values())
    summary.expiries = expiries
    summary.refused_held = held
    summary.done = len(results)
    summary.duplicate_work = sum(1 for values in results.values() if len(values) > 1)
    summary.conflicting_results = sum(1 for values in results.values() if len(set(values)) > 1)
    summary.zombies = summary.orders - summary.done
