"""``formicary demo``: twenty agents share a work ledger through one relay on loopback.

What it shows
-------------
A relay starts on embedded storage; a planner creates work orders and puts the plan
in the namespace's context. Then every agent loops the workledger way::

    context pull -> next (claim) -> work, a note and a renewal per step
        -> write the result (fenced) -> done -> context put (the handoff)

Meanwhile the demo kills a few agents in the middle of a task (their connection just
drops: no release) and freezes one past its lease, as a long GC pause would. Nobody
cleans up after them: the relay's timer appends ``lease.expired``, the orders open
again with their notes and context, and other agents finish them. The frozen agent
wakes up still believing it holds its order; its next write is refused.

The summary counts what coordination is for: orders done, **duplicate work** (orders
whose result two agents both got accepted) and **zombie orders** (never finished —
stuck with a dead holder); both must be 0. Results go to a :class:`Workbench`, the
stand-in for anything outside the relay (a file, a repository), which keeps the
highest fencing token per order and refuses lower ones. The log is verified offline
at the end.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from agent_sdk.client import Delivery, RelayClient, Subscription
from agent_sdk.identity import Identity
from agent_sdk.ledger import Claim, Ledger, LedgerRefusal
from relay.app import STORE_FILE, open_store, run_relay
from relay.node import RelayConfig
from relay.verify import verify_log

NS = "work@local"


class DemoError(Exception):
    """The demo cannot run as asked."""


@dataclass(frozen=True)
class Settings:
    agents: int = 20
    orders: int = 60
    kills: int = 3
    """Agents killed while they hold an order."""
    pauses: int = 1
    """Agents frozen past their lease while they hold an order."""
    ttl_ms: int = 3_000
    steps: int = 3
    step_s: tuple[float, float] = (0.05, 0.3)
    seed: int = 1
    deadline_s: float = 120.0
    """Give up (and count what is left as zombies) after this long."""


@dataclass
class Summary:
    orders: int
    done: int = 0
    duplicate_work: int = 0
    zombies: int = 0
    expiries_recovered: int = 0
    late_writes_refused: int = 0
    killed: int = 0
    paused: int = 0
    events: int = 0
    log_ok: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        clean = self.duplicate_work == 0 and self.zombies == 0
        return clean and self.done == self.orders and self.log_ok


class Workbench:
    """Where agents put their results: outside the relay, fenced by token per order."""

    def __init__(self) -> None:
        self.highest: dict[str, int] = {}
        self.accepted: dict[str, list[str]] = {}

    def write(self, order: str, agent: str, token: int) -> bool:
        if token < self.highest.get(order, 0):
            return False
        self.highest[order] = token
        self.accepted.setdefault(order, []).append(agent)
        return True


@dataclass
class _Run:
    settings: Settings
    url: str
    say: Callable[[str], None]
    rng: random.Random
    bench: Workbench = field(default_factory=Workbench)
    done: set[str] = field(default_factory=set)
    expired: set[str] = field(default_factory=set)
    holding: dict[int, Claim] = field(default_factory=dict)
    killed: set[int] = field(default_factory=set)
    late_writes_refused: int = 0
    events: int = 0
    finished: trio.Event = field(default_factory=trio.Event)
    reopened: trio.Event = field(default_factory=trio.Event)
    mid_task: dict[int, trio.Event] = field(default_factory=dict)
    freeze: set[int] = field(default_factory=set)
    frozen: set[int] = field(default_factory=set)
    """Agents frozen and not awake yet."""
    froze: int = 0
    """Agents that did freeze: one picked to but never holding an order at its second
    step does not."""


def _identity(seed: int, n: int) -> Identity:
    return Identity.from_seed(random.Random(seed * 1_000 + n).randbytes(32))


async def run_demo(
    settings: Settings | None = None,
    data: Path | None = None,
    say: Callable[[str], None] | None = None,
) -> Summary:
    settings = settings or Settings()
    say = say or (lambda text: print(text, flush=True))
    started = time.monotonic()
    if data is not None and (data / STORE_FILE).exists():
        # Its log would be replayed into the counts: a summary of two runs at once.
        raise DemoError(f"{data} holds an earlier run; give an empty or new directory")
    with tempfile.TemporaryDirectory(prefix="formicary-demo-") as tmp:
        data = data or Path(tmp)
        config = RelayConfig(name="local")
        async with trio.open_nursery() as nursery:
            node, server = await nursery.start(run_relay, data, config, "127.0.0.1", 0)
            port = server.listeners[0].socket.getsockname()[1]
            url = f"ws://127.0.0.1:{port}"
            say(f"relay 'local' ({node.identity.id[:16]}...) on {url}, data in {data}")
            run = _Run(settings, url, say, random.Random(settings.seed))
            summary = await _simulate(run)
            nursery.cancel_scope.cancel()
        summary.log_ok, summary.events = _verify(data)
    summary.seconds = time.monotonic() - started
    _report(summary, say)
    return summary


async def _simulate(run: _Run) -> Summary:
    settings = run.settings
    summary = Summary(orders=settings.orders)
    async with (
        RelayClient.connect(run.url, _identity(settings.seed, 0)) as planner_client,
        planner_client.subscribe(NS, start=1) as feed,
    ):
        planner = Ledger(planner_client, NS)
        await planner.put_context({"plan": "port the parser", "orders": settings.orders})
        for n in range(settings.orders):
            await planner.create(f"task {n + 1}", priority=run.rng.randrange(5))
        say = run.say
        say(
            f"{settings.orders} work orders; {settings.agents} agents, lease {settings.ttl_ms} ms;"
            f" killing {settings.kills} and freezing {settings.pauses} mid-task"
        )
        chosen = run.rng.sample(range(1, settings.agents + 1), settings.kills + settings.pauses)
        victims, run.freeze = chosen[: settings.kills], set(chosen[settings.kills :])
        run.frozen = set()
        with trio.move_on_after(settings.deadline_s):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch, run, feed)
                nursery.start_soon(_progress, run)
                scopes = {}
                for n in range(1, settings.agents + 1):
                    scopes[n] = trio.CancelScope()
                    run.mid_task[n] = trio.Event()
                    nursery.start_soon(_agent, run, n, scopes[n])
                for n in victims:
                    nursery.start_soon(_kill, run, n, scopes[n])
                await run.finished.wait()
                nursery.cancel_scope.cancel()
        final = await planner.list()
    summary.done = sum(order["status"] == "done" for order in final)
    summary.zombies = settings.orders - summary.done
    summary.duplicate_work = sum(len(agents) > 1 for agents in run.bench.accepted.values())
    summary.expiries_recovered = len(run.expired & run.done)
    summary.late_writes_refused = run.late_writes_refused
    summary.killed, summary.paused = len(run.killed), run.froze
    return summary


async def _agent(run: _Run, n: int, scope: trio.CancelScope) -> None:
    settings = run.settings
    rng = random.Random(settings.seed * 7_919 + n)
    name = f"agent-{n}"
    with scope:
        async with RelayClient.connect(run.url, _identity(settings.seed, n)) as client:
            ledger = Ledger(client, NS)
            while not run.finished.is_set():
                await ledger.pull_context()  # the plan, and what others handed over
                try:
                    claim = await ledger.next(settings.ttl_ms)
                except LedgerRefusal as exc:
                    if exc.problem != "nothing_open":
                        raise
                    reopened = run.reopened
                    with trio.move_on_after(0.5):  # nothing open: wait for a reopening
                        await reopened.wait()
                    continue
                run.holding[n] = claim
                await ledger.pull_context(claim.order)  # a predecessor's notes, if any
                try:
                    await _work(run, n, ledger, claim, rng)
                except LedgerRefusal as exc:
                    # Our lease ran out while we were frozen: the order is someone
                    # else's now (or open again). Drop it; do not write anything.
                    run.late_writes_refused += 1
                    run.say(f"  {name}: woke up and was refused: {exc.problem}; dropping it")
                    run.frozen.discard(n)
                    _maybe_finished(run)
                finally:
                    run.holding.pop(n, None)


def _maybe_finished(run: _Run) -> None:
    """Every order done, and every frozen agent awake again (to show its refusal)."""
    if len(run.done) == run.settings.orders and not run.frozen:
        run.finished.set()


async def _work(run: _Run, n: int, ledger: Ledger, claim: Claim, rng: random.Random) -> None:
    settings = run.settings
    for step in range(settings.steps):
        run.mid_task[n].set()
        await trio.sleep(rng.uniform(*settings.step_s))
        if n in run.freeze and step == 1:
            run.freeze.discard(n)  # once
            run.frozen.add(n)
            run.froze += 1
            run.say(f"  agent-{n}: frozen holding {claim.order} (past its lease)")
            await trio.sleep(settings.ttl_ms / 1000 + 1.0)
        await ledger.note(claim, f"step {step + 1}/{settings.steps}")
        claim = await ledger.renew(claim, settings.ttl_ms)
    if not run.bench.write(claim.order, f"agent-{n}", claim.token):
        raise LedgerRefusal("stale_token", "the workbench has a newer token", None)
    await ledger.update(claim, "done")
    await ledger.put_context(f"agent-{n} finished {claim.order}", claim.order)


async def _kill(run: _Run, n: int, scope: trio.CancelScope) -> None:
    """Kill agent ``n`` in the middle of a task: it holds an order and is working."""
    await run.mid_task[n].wait()
    await trio.sleep(0.01)  # inside its step's work, not between requests
    held = run.holding.get(n)
    scope.cancel()
    run.killed.add(n)
    run.say(f"  agent-{n}: killed holding {held.order if held else 'nothing'}")


async def _watch(run: _Run, feed: Subscription) -> None:
    """Follow the log: what is done, what expired, when orders open again."""
    async for item in feed:
        if not isinstance(item, Delivery):
            continue
        run.events += 1
        event = item.event.event
        if event.kind == "lease.expired":
            for order, _token in event.body["leases"]:
                run.expired.add(order)
                run.say(f"  relay: lease on {order} expired; open again")
        elif event.kind == "wo.updated" and event.body["status"] == "done":
            run.done.add(event.body["wo"])
            _maybe_finished(run)
        if event.kind in ("lease.expired", "wo.released", "wo.updated"):
            run.reopened.set()
            run.reopened = trio.Event()


async def _progress(run: _Run) -> None:
    started = trio.current_time()
    while True:
        await trio.sleep(1.0)
        alive = run.settings.agents - len(run.killed)
        working = len(run.holding)
        run.say(
            f"{trio.current_time() - started:5.1f}s  done {len(run.done):3}/{run.settings.orders}"
            f"  working {working:2}  agents alive {alive:2}  expired {len(run.expired)}"
            f"  log {run.events} events"
        )


def _verify(data: Path) -> tuple[bool, int]:
    store = open_store(data)
    try:
        verdict = verify_log(NS, store.scan(NS), lambda dep: store.find([dep]).get(dep))
    finally:
        store.close()
    return verdict.ok, verdict.records


def _report(summary: Summary, say: Callable[[str], None]) -> None:
    lines = [
        ("orders done", f"{summary.done}/{summary.orders}"),
        ("duplicate work", f"{summary.duplicate_work}  (orders two agents both completed)"),
        ("zombie orders", f"{summary.zombies}  (never finished: stuck with a dead holder)"),
        (
            "lease expiries",
            f"{summary.expiries_recovered} recovered  (reopened by the relay, finished by others)",
        ),
        (
            "late writes",
            f"{summary.late_writes_refused} refused  (a frozen holder woke after its lease)",
        ),
        ("agents", f"{summary.killed} killed and {summary.paused} frozen mid-task"),
        (
            "log",
            f"{summary.events} events, offline verification {'ok' if summary.log_ok else 'FAILED'}",
        ),
    ]
    say(f"summary after {summary.seconds:.1f}s:")
    for label, value in lines:
        say(f"  {label:15} {value}")
    say("ok" if summary.ok else "FAILED")


def main(settings: Settings | None = None, data: Path | None = None) -> int:
    try:
        summary = trio.run(run_demo, settings, data)
    except DemoError as exc:
        print(f"formicary demo: {exc}", file=sys.stderr)
        return 2
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
