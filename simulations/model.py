"""What a simulation is asked to do (:class:`Settings`), how its agents behave
(:class:`Policy`), and what it measured (:class:`Summary`)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

LONGEST_TTL_MS = 24 * 3600 * 1000
"""The longest claim lease a simulated relay grants (its ``TtlBounds.max_ms``)."""


class UsageError(ValueError):
    """Settings that cannot run; the message names what is wrong and what would do."""


class Policy:
    """How one agent works: how long a task takes, and whether it crashes during it.

    Subclass and register in :data:`POLICIES` to study another behaviour; a policy
    draws only from the ``rng`` it is given, so runs stay reproducible.
    """

    name = "uniform"

    def __init__(self, work_ms: tuple[int, int], crash_rate: float) -> None:
        self.work_ms = work_ms
        self.crash_rate = crash_rate

    def task_ms(self, rng: random.Random) -> int:
        """How long the next task takes to do."""
        low, high = self.work_ms
        return rng.randint(low, high)

    def order_ms(self, seed: int, order: str) -> int:
        """How long ``order`` takes this agent: drawn from the order alone, not from
        the agent's stream, so every agent and every scenario that does it
        (``work_queue``, ``no_coordination``) has the same work to do."""
        return self.task_ms(random.Random(f"{seed}/task/{order}"))

    def crashes(self, rng: random.Random) -> bool:
        """Whether the agent dies in the middle of its next task."""
        return rng.random() < self.crash_rate


class HeavyTail(Policy):
    """Most tasks are quick, a few take very long (lognormal around the range's
    geometric middle): the stragglers that make leases expire."""

    name = "heavy_tail"

    def task_ms(self, rng: random.Random) -> int:
        low, high = self.work_ms
        middle = math.sqrt(max(low, 1) * high)
        return max(low, int(rng.lognormvariate(math.log(middle), 0.8)))


POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (Policy, HeavyTail)}


@dataclass(frozen=True)
class Faults:
    """What goes wrong besides crashes (``--faults``, docs/simulations.md)."""

    slow: float = 0.0
    """Share of agents that are slow: their tasks take ``SLOWER`` times as long."""
    delay_ms: int = 0
    """Latency of every message on the in-memory network, each way (virtual time)."""
    loss: float = 0.0
    """Chance that a message is lost on an agent's connection or a relay link; the
    connection breaks with it, as TCP's does, and is dialled again (virtual time)."""
    relay_kill: int | None = None
    """When (ms after the start) the relay process gets SIGKILL and is restarted on
    the same data (real mode)."""
    partition: tuple[int, int] | None = None
    """From when to when (ms after the start) relays ``r0`` and ``r1`` cannot reach
    each other (``federated``)."""


SLOWER = 5
"""How many times as long a slow agent's tasks take (``--faults slow``)."""

FAULTS = ("slow=SHARE", "delay=DURATION", "loss=CHANCE", "partition=FROM-TO", "relay_kill=AT")
VARIANTS = ("flat", "fanout", "pipeline")
TAKES = ("next", "claim")
"""How ``work_queue`` agents take work (``--take``): ``next`` asks the relay for the
best open order (``wo.next``); ``claim`` picks one from the agent's own stale list and
claims it (``wo.claim``), so agents contend for the same orders."""
FANOUT = 3
"""Sub-orders each order of the ``fanout`` variant spawns."""
STAGES = ("observe", "diagnose", "fix")
"""The ``pipeline`` variant's stages, in order."""
ORDERS_PER_ROOT = {"flat": 1, "fanout": 1 + FANOUT, "pipeline": len(STAGES)}
"""Orders a root order makes in all, itself included (its sub-orders or stages)."""


def parse_faults(spec: str, duration: Callable[[str, str], int]) -> Faults:
    """``slow=0.2,delay=50ms,partition=10s-30s``; raises :class:`UsageError`."""
    faults = Faults()
    for item in filter(None, spec.split(",")):
        name, equals, value = item.partition("=")
        if not equals:
            raise UsageError(f"--faults {item!r}: write NAME=VALUE, one of {', '.join(FAULTS)}")
        if name == "slow":
            try:
                share = float(value)
            except ValueError:
                share = -1.0
            if not 0 <= share <= 1:
                raise UsageError(f"--faults slow={value}: a share of agents from 0 to 1")
            faults = replace(faults, slow=share)
        elif name == "loss":
            try:
                chance = float(value)
            except ValueError:
                chance = -1.0
            if not 0 <= chance < 1:
                raise UsageError(f"--faults loss={value}: a chance per message, 0 <= p < 1")
            faults = replace(faults, loss=chance)
        elif name == "delay":
            faults = replace(faults, delay_ms=duration(value, "--faults delay"))
        elif name == "relay_kill":
            faults = replace(faults, relay_kill=duration(value, "--faults relay_kill"))
        elif name == "partition":
            start, dash, end = value.partition("-")
            if not dash:
                raise UsageError(f"--faults partition={value}: write FROM-TO, e.g. 10s-30s")
            window = (duration(start, "--faults partition"), duration(end, "--faults partition"))
            if not window[0] < window[1]:
                raise UsageError(f"--faults partition={value}: FROM must come before TO")
            faults = replace(faults, partition=window)
        else:
            raise UsageError(f"--faults: unknown fault {name!r}; choose from {', '.join(FAULTS)}")
    return faults


@dataclass(frozen=True)
class Settings:
    scenario: str = "work_queue"
    agents: int = 100
    orders: int = 500
    seed: int = 1
    crash_rate: float = 0.0
    """Chance that an agent dies in the middle of a task (then restarts)."""
    policy: str = "uniform"
    work_ms: tuple[int, int] = (1_000, 5_000)
    ttl_ms: int = 30_000
    """Lease of a claim: how long a crashed agent's order stays stuck."""
    restart_ms: int = 5_000
    """How long a crashed agent stays down before it comes back."""
    snapshot_ms: int = 10_000
    """How stale the backlog an agent picks from is (no_coordination, ``take="claim"``)."""
    relays: int = 1
    """Relays of a ``federated`` run (1 for every other scenario)."""
    variant: str = "flat"
    """``work_queue``: ``flat`` orders, ``fanout`` (each order spawns 3 sub-orders when
    done) or ``pipeline`` (observe -> diagnose -> fix: each stage's completion
    creates the next stage's order, handing its finding over in its description)."""
    take: str = "next"
    """``work_queue``: how agents take work, one of :data:`TAKES`."""
    handoff: bool = True
    """``work_queue``: agents checkpoint half-done work in the order's context, and a
    successor resumes from it; without, a crashed task restarts from scratch."""
    faults: Faults = field(default_factory=Faults)
    duration_s: float = 24 * 3600.0
    """Virtual seconds after which a run stops, finished or not."""

    def check(self, scenarios: list[str]) -> None:
        """Refuse what cannot run, before anything starts."""
        if self.scenario not in scenarios:
            raise UsageError(
                f"unknown scenario {self.scenario!r}; choose from {', '.join(scenarios)}"
            )
        if self.policy not in POLICIES:
            raise UsageError(f"unknown policy {self.policy!r}; choose from {', '.join(POLICIES)}")
        if self.agents < 1 or self.orders < 1:
            raise UsageError("--agents and --orders must be at least 1")
        if not 0 <= self.crash_rate < 1:
            raise UsageError("--crash-rate is a probability per task: 0 <= p < 1")
        low, high = self.work_ms
        if not 0 < low <= high:
            raise UsageError("work time: 0 < low <= high (ms)")
        if round(self.faults.slow * self.agents):  # some agents are slow (policy_of)
            high *= SLOWER
        if self.ttl_ms <= high:
            raise UsageError(f"--ttl ({self.ttl_ms} ms) must outlast the longest task ({high} ms)")
        if self.ttl_ms > LONGEST_TTL_MS:
            raise UsageError("--ttl: at most 24h (the relay's longest lease)")
        federated = self.scenario == "federated"
        if federated and not 2 <= self.relays <= 16:
            raise UsageError("federated: --relays from 2 to 16")
        if federated and self.agents < self.relays:
            raise UsageError("federated: at least one agent per relay (--agents >= --relays)")
        if not federated and self.relays != 1:
            raise UsageError(f"{self.scenario}: one relay (--relays is for `federated`)")
        if self.faults.relay_kill is not None and (
            self.scenario != "work_queue" or self.variant != "flat"
        ):
            raise UsageError("--faults relay_kill: work_queue with --variant flat only, so far")
        if self.faults.loss and self.scenario not in ("work_queue", "federated"):
            raise UsageError("--faults loss: work_queue and federated (agents that reconnect)")
        if self.faults.partition is not None and not federated:
            raise UsageError("--faults partition: cuts links between relays (`federated` only)")
        if self.variant not in VARIANTS:
            raise UsageError(f"unknown variant {self.variant!r}; choose from {', '.join(VARIANTS)}")
        if self.variant != "flat" and self.scenario not in ("work_queue", "federated"):
            raise UsageError("--variant is for work_queue (and federated)")
        if self.take not in TAKES:
            raise UsageError(f"unknown --take {self.take!r}; choose from {', '.join(TAKES)}")
        if self.take != "next" and self.scenario not in ("work_queue", "federated"):
            raise UsageError("--take is for work_queue (and federated)")
        if self.scenario == "logistics" and self.crash_rate:
            raise UsageError("logistics: no crashes (--crash-rate) so far; it measures limits")
        if self.scenario == "logistics" and self.agents < 3:
            raise UsageError("logistics: --agents at least 3 (fulfilment, pricing, inventory)")
        if self.duration_s <= 0:
            raise UsageError("--duration must be positive")
        if self.policy != "uniform" and self.scenario in ("work_queue", "federated"):
            self._check_stragglers()

    def _check_stragglers(self) -> None:
        """A policy that draws past ``--work`` (``heavy_tail``) may give an order more
        work than a lease covers. Its time is the order's, whoever claims it, and
        nobody renews: it would lapse and be claimed again until ``--duration`` ends
        the run. Without handoff the whole task must fit in one lease; with it, each
        half of what is left (the checkpoint is at the half), so less than two."""
        policy = self.policy_of(0)  # (agent 0 is a slow one if any is)
        # Each namespace numbers its orders from 1; federated's first homes the most.
        largest = self.orders // self.relays + self.orders % self.relays
        roots = largest * ORDERS_PER_ROOT[self.variant]
        longest, order = max(
            (policy.order_ms(self.seed, f"wo-{n}"), f"wo-{n}") for n in range(1, roots + 1)
        )
        covered = self.ttl_ms * (2 if self.handoff else 1)
        if longest >= covered:
            what = "twice --ttl" if self.handoff else "--ttl (and there is no handoff)"
            raise UsageError(
                f"--policy {self.policy}: {order} takes {longest} ms with seed {self.seed},"
                f" not less than {what}, {covered} ms: it could never be finished;"
                " raise --ttl, or use another seed"
            )

    def make_policy(self) -> Policy:
        return POLICIES[self.policy](self.work_ms, self.crash_rate)

    def policy_of(self, n: int) -> Policy:
        """Agent ``n``'s policy: the run's, ``SLOWER`` times slower for the slow share."""
        slow = n < round(self.faults.slow * self.agents)
        if not slow:
            return self.make_policy()
        low, high = self.work_ms
        return POLICIES[self.policy]((low * SLOWER, high * SLOWER), self.crash_rate)


AGENT_STATES = ("idle", "working", "down")


class AgentStates:
    """How many agents are idle, working or down over a run, for the agent-states
    plot: the counts after the last change in each second of the run's clock."""

    def __init__(self) -> None:
        self.of: dict[int, str] = {}
        self.counts = dict.fromkeys(AGENT_STATES, 0)
        self.samples: dict[int, dict[str, int]] = {}
        """Second (of the run's ms clock) -> counts at its end; quiet seconds missing."""

    def set(self, agent: int, state: str, now_ms: int) -> None:
        old = self.of.get(agent)
        if old == state:
            return
        if old is not None:
            self.counts[old] -= 1
        self.counts[state] += 1
        self.of[agent] = state
        self.samples[now_ms // 1000] = dict(self.counts)


def merge_states(parts: list[dict[int, dict[str, int]]]) -> dict[int, dict[str, int]]:
    """The samples of agents counted apart (worker processes) as one set: each part's
    counts carried over the seconds it did not change, then added up."""
    merged: dict[int, dict[str, int]] = {}
    current = [dict.fromkeys(AGENT_STATES, 0) for _ in parts]
    for second in sorted({second for part in parts for second in part}):
        for i, part in enumerate(parts):
            current[i] = part.get(second, current[i])
        merged[second] = {state: sum(c[state] for c in current) for state in AGENT_STATES}
    return merged


class Meter:
    """How far a run is, for the live progress bar: ``done`` of ``total`` units
    (orders, edits, auctions). ``on_change`` is called on every step; it must be
    cheap and must not touch the run (the CLI draws a bar from it)."""

    def __init__(self, on_change: Callable[[Meter], None] | None = None) -> None:
        self.on_change = on_change
        self.total = 0
        self.done = 0
        self.unit = "orders"

    def start(self, total: int, unit: str) -> None:
        self.total, self.done, self.unit = total, 0, unit
        if self.on_change is not None:
            self.on_change(self)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.on_change is not None:
            self.on_change(self)


@dataclass
class Summary:
    """What a run measured; docs/simulations.md explains each field."""

    scenario: str
    agents: int
    orders: int
    seed: int
    done: int = 0
    duplicate_work: int = 0
    """Orders whose work more than one agent finished and reported."""
    conflicting_results: int = 0
    """Orders with two reported results that differ."""
    zombies: int = 0
    """Orders not finished when the run ended."""
    crashes: int = 0
    expiries: int = 0
    """Leases the relay's timer ended: their holder crashed, or (``heavy_tail``) its
    task outlasted the lease."""
    wasted_work: int = 0
    """Tasks finished whose result was refused (the lease had moved on)."""
    refused_held: int = 0
    """Claims the relay refused because another agent validly held the order
    (``held``): contention the leases settled. Only ``--take claim`` makes them;
    ``wo.next`` never offers a held order."""
    events: int = 0
    virtual_seconds: float = 0.0
    wall_seconds: float = 0.0
    log_hash: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    series: list[dict[str, int]] = field(default_factory=list, repr=False)
    """Per second of the run: results, orders done so far, claims, expiries."""
    latencies: list[int] = field(default_factory=list, repr=False)
    """Claim to result per order, ms, sorted (the latency CDF's points)."""
    states: dict[int, dict[str, int]] = field(default_factory=dict, repr=False)
    """:attr:`AgentStates.samples` of the run (the agent-states plot's points)."""

    @property
    def orders_per_virtual_s(self) -> float:
        return round(self.done / self.virtual_seconds, 3) if self.virtual_seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        del document["series"], document["latencies"], document["states"]
        return {**document, "orders_per_virtual_s": self.orders_per_virtual_s}
