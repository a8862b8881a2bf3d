"""Lease safety of work-order claims through the real relay node, in virtual time.

Theory of the test
------------------
A driver plays a few agents against one in-process :class:`RelayNode` under trio's
``MockClock``. The agents claim, renew, release and annotate two work orders, race for
one, crash (a crashed agent just stops: it never renews or releases again), let virtual
time pass, and the relay restarts on the same store with some downtime. Like real
clients, agents learn only what the relay's outcome events tell them and keep the token
they were granted for their renewals and releases, stale or not; an old process of an
agent may also wake and renew with a token the agent held before. The relay's timer
may also lag (a ``Late`` step holds it back): requests then land between an expiry and
the ``lease.expired`` record that announces it, and the relay's own check of the
lease's validity at the request's instant decides them, not the timer's record.

The driver keeps a reference built from those outcomes alone, in log order: per order,
token ``t`` is valid on ``[granted_ms, end_ms)``, where ``end_ms`` is the expiry of its
last granted renewal or the instant of its release (an instant is a request's HLC in
ms: the relay decides each request at its own HLC). A renewal keeps the holder and the
token and is only granted while the lease is valid, so a token's interval is one
unbroken span. After every step the driver checks:

* safety: per order, tokens rise strictly from grant to grant (across restarts) and
  their intervals are disjoint, so no instant has two valid holders; every verdict
  agrees with the reference (a claim is granted exactly when nobody validly holds the
  order, a renewal or release exactly when its author validly holds it with that
  token), and the relay's ledger holds what the reference says;
* liveness: a claimed order whose lease ran out is open again at most
  :data:`TIMER_TICK_MS` after its expiry, or after the relay (or its held-back timer)
  came back if it was down then; the ``lease.expired`` record that says so never
  comes before the expiry;
* restart: folding the stored log gives exactly the coordination state the relay had
  before the restart (statuses, leases, tokens, notes and history).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_sdk.identity import Identity
from agent_sdk.wire import Event, decode, sign_event
from relay.coordination.host import Host
from relay.coordination.ledger import Ledger, Status
from relay.coordination.requests import EXPIRED, Coordinator
from relay.node import RelayConfig, RelayNode
from relay.sequencer import HLC_SHIFT
from relay.store.memory import MemoryStore
from tests.conftest import identity
from tests.relay.test_node import virtual_wall
from tests.relay.test_sequencer import NOW

NS = "work@local"
CONFIG = RelayConfig()
RELAY = identity(2)
CREATOR = identity(1)
AGENTS = tuple(identity(10 + n) for n in range(4))
ORDERS = ("wo-1", "wo-2")
TTLS_MS = (1_000, 2_000, 3_000)
"""Short TTLs (1 s is TtlBounds.min_ms) so that expiries happen within a run."""

TIMER_TICK_MS = 1
"""How late the relay's timer may announce a lapsed claim.

``RelayNode._expiry_loop`` sleeps until the earliest expiry exactly, so in virtual
time it wakes on the very millisecond. The virtual wall clock (``virtual_wall``)
truncates a float to whole ms, so at that instant it can read one ms short; the loop
then finds nothing due and sleeps one more ms.
"""

RENEW_PROBLEMS = frozenset({"not_holder", "stale_token", "bad_transition"})
"""Refusals of a renewal, release or fenced note by someone not validly holding the
order (``bad_transition``: the lease had lapsed, so the order is open, not claimed)."""


def at(ms: int) -> str:
    """A wall-clock ms as an offset from the start of the run, for failure messages."""
    return f"+{ms - NOW}"


def who(key: bytes) -> str:
    """A short name for a key in failure messages."""
    names = {CREATOR.public_key: "creator", RELAY.public_key: "relay"}
    names.update({agent.public_key: f"agent {n}" for n, agent in enumerate(AGENTS)})
    return names.get(key, key.hex()[:8])


# -- the steps ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    agent: int
    order: str
    ttl_ms: int


@dataclass(frozen=True)
class Race:
    """Every live agent claims ``order`` at once: the requests share commit batches."""

    order: str
    ttl_ms: int


@dataclass(frozen=True)
class Renew:
    """The ``pick``-th lease a live agent believes it holds is renewed (steps that pick
    among holders keep renewals and crashes frequent; a random agent rarely holds)."""

    pick: int
    ttl_ms: int


@dataclass(frozen=True)
class Release:
    pick: int


@dataclass(frozen=True)
class Zombie:
    """An old process of a live agent wakes and renews with a token the agent held
    before (one it released, or one superseded by a later grant): fencing must hold."""

    pick: int


@dataclass(frozen=True)
class Note:
    """A note, fenced with the agent's token when it has one."""

    agent: int
    order: str


@dataclass(frozen=True)
class Crash:
    """The ``pick``-th live agent that holds something (or any live one) dies."""

    pick: int


@dataclass(frozen=True)
class Advance:
    ms: int


@dataclass(frozen=True)
class Restart:
    downtime_ms: int


Request = Claim | Race | Renew | Release | Zombie | Note


@dataclass(frozen=True)
class Late:
    """The relay's timer lags: time passes by ``ms`` and ``request`` lands before the
    timer has written what lapsed meanwhile (``lease.expired``), so the relay's own
    check of a lease's validity at the request's instant decides it."""

    ms: int
    request: Request


Step = Request | Crash | Advance | Restart | Late


# -- the reference -----------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """A request as the log holds it, and the relay's outcome of it."""

    seq: int
    at_ms: int
    """The request's HLC in ms: the instant the relay decided it at."""
    kind: str
    body: dict[str, Any]

    def __repr__(self) -> str:
        body = {k: who(v) if isinstance(v, bytes) else v for k, v in self.body.items()}
        return f"<seq {self.seq} at {at(self.at_ms)}: {self.kind} {body}>"


@dataclass
class Hold:
    """One grant (one token) of one order, as the log's outcomes describe it."""

    order: str
    holder: bytes
    token: int
    granted_seq: int
    granted_ms: int
    end_ms: int
    """Exclusive: the expiry of the last renewal granted, or the instant of release."""
    released: bool = False
    expired_seq: int | None = None
    """The seq of the ``lease.expired`` that named this lease, if one did."""

    def __repr__(self) -> str:
        ended = "released" if self.released else "expires"
        return (
            f"<{self.order} token {self.token} of {who(self.holder)}: granted at "
            f"{at(self.granted_ms)} (seq {self.granted_seq}), {ended} at {at(self.end_ms)}>"
        )


class Reference:
    """Every grant of every order, built from outcomes in log order (no relay code)."""

    def __init__(self) -> None:
        self.holds: dict[str, list[Hold]] = {order: [] for order in ORDERS}

    def valid_at(self, order: str, at_ms: int) -> Hold | None:
        valid = [h for h in self.holds[order] if h.granted_ms <= at_ms < h.end_ms]
        assert len(valid) <= 1, f"two valid holders of {order} at {at(at_ms)}: {valid}"
        return valid[0] if valid else None

    def hold(self, order: str, token: int) -> Hold:
        [found] = [h for h in self.holds[order] if h.token == token]
        return found

    def on_claim(self, agent: bytes, order: str, ttl_ms: int, answer: Answer) -> int | None:
        """Check a claim's verdict; returns the token granted, if one was."""
        current = self.valid_at(order, answer.at_ms)
        body = answer.body
        if answer.kind == "wo.claimed":
            assert current is None, f"{order} granted at {at(answer.at_ms)} while {current} holds"
            previous = max((h.token for h in self.holds[order]), default=0)
            assert body["token"] > previous, f"token {body['token']} after {previous}"
            assert body["wo"] == order and body["holder"] == agent
            assert body["expires_ms"] == answer.at_ms + ttl_ms
            hold = Hold(order, agent, body["token"], answer.seq, answer.at_ms, body["expires_ms"])
            self.holds[order].append(hold)
            return hold.token
        assert answer.kind == "wo.rejected" and body["problem"] == "held", answer
        assert current is not None, f"claim of free {order} refused: {answer}"
        assert body["holder"]["token"] == current.token
        assert body["holder"]["holder"] == current.holder
        return None

    def on_renew(
        self, agent: bytes, order: str, token: int, ttl_ms: int | None, answer: Answer
    ) -> None:
        """Check a renewal (``ttl_ms``) or a release (``None``) and apply it."""
        current = self.valid_at(order, answer.at_ms)
        entitled = current is not None and current.holder == agent and current.token == token
        granted = "wo.renewed" if ttl_ms is not None else "wo.released"
        if answer.kind != granted:
            assert answer.kind == "wo.rejected", answer
            assert answer.body["problem"] in RENEW_PROBLEMS, answer
            assert not entitled, f"{who(agent)} holds {order} with {token}: {answer}"
            return
        assert current is not None and entitled, f"{answer} for a lease not held: {current}"
        if ttl_ms is None:
            current.end_ms = answer.at_ms
            current.released = True
        else:
            assert answer.body["token"] == token, "a renewal keeps the token"
            assert answer.body["holder"] == agent
            assert answer.body["expires_ms"] == answer.at_ms + ttl_ms
            current.end_ms = answer.at_ms + ttl_ms

    def on_note(self, agent: bytes, order: str, token: int | None, answer: Answer) -> None:
        current = self.valid_at(order, answer.at_ms)
        entitled = token is None or (
            current is not None and current.holder == agent and current.token == token
        )
        assert (answer.kind == "wo.noted") == entitled, (token, current, answer)
        if not entitled:
            assert answer.body["problem"] in RENEW_PROBLEMS, answer

    def on_expired(self, seq: int, at_ms: int, order: str, token: int, up_since_ms: int) -> None:
        """Check one lease a ``lease.expired`` record names."""
        hold = self.hold(order, token)
        assert not hold.released and hold.expired_seq is None, hold
        assert at_ms >= hold.end_ms, f"{hold} announced expired early, at {at(at_ms)}"
        due = max(hold.end_ms, up_since_ms) + TIMER_TICK_MS
        assert at_ms <= due, f"{hold} announced expired at {at(at_ms)}, due by {at(due)}"
        later = [h for h in self.holds[order] if h.token > token]
        assert all(h.granted_seq > seq for h in later), "expired after it was superseded"
        hold.expired_seq = seq

    def check_disjoint(self) -> None:
        """Tokens rise and validity never overlaps: one valid holder at any instant."""
        for holds in self.holds.values():
            for earlier, later in itertools.pairwise(holds):
                assert earlier.token < later.token, (earlier, later)
                assert earlier.end_ms <= later.granted_ms, (earlier, later)


# -- the driver --------------------------------------------------------------------------


class Harness:
    """The agents, the relay (restartable on one store) and the checks between steps."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.store = MemoryStore()
        self.wall = virtual_wall()  # one clock across node incarnations: downtime counts
        self.reference = Reference()
        self.alive = [True] * len(AGENTS)
        self.tokens: list[dict[str, int]] = [{} for _ in AGENTS]
        """The token each agent would renew or release each order with."""
        self.granted: list[list[tuple[str, int]]] = [[] for _ in AGENTS]
        """Every (order, token) each agent was ever granted."""
        self.crashed: list[Hold] = []
        self.up_since: list[int] = []
        """The wall ms from which the relay's timer runs: each node incarnation's start,
        and the end of each :class:`Late` step's lag."""
        self.seen_seq = 0
        self.nonce = 0
        self.node = self._build()
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()

    def _build(self) -> RelayNode:
        return RelayNode(RELAY, self.store, CONFIG, wall_ms=self.wall)

    async def _run(self, node: RelayNode) -> None:
        scope, stopped = trio.CancelScope(), trio.Event()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            try:
                with scope:
                    await node.run(task_status=task_status)
            finally:
                stopped.set()

        self.node, self._scope, self._stopped = node, scope, stopped
        self.up_since.append(self.wall())
        await self.nursery.start(run)

    async def start(self) -> None:
        await self._run(self.node)
        for order in ORDERS:
            answer = await self.ask(CREATOR, "wo.create", {"title": f"task {order}"})
            assert answer.kind == "wo.created" and answer.body["wo"] == order
        await self.check()

    def stop(self) -> None:
        self._scope.cancel()

    # -- requests ------------------------------------------------------------------------

    async def ask(self, author: Identity, kind: str, body: dict[str, Any]) -> Answer:
        """Publish one request and return it with its outcome, as a client sees them."""
        self.nonce += 1  # events must differ, or the relay takes them for duplicates
        event = Event(
            ns=NS,
            kind=kind,
            author=author.public_key,
            body=body,
            ts=self.node.wall_ms(),
            nonce=self.nonce.to_bytes(4, "big"),
        )
        request = await self.node.publish(sign_event(event, author.sign))
        located = self.node.outcome_of(request.id)
        assert located is not None, f"{kind} got no outcome"
        outcome = await self.node.committed_record(located.ns, located.seq)
        fields = decode(outcome.event)
        assert outcome.author == RELAY.public_key and fields["deps"] == [request.id]
        assert fields["body"]["req"] == request.id
        return Answer(request.seq, request.hlc >> HLC_SHIFT, fields["kind"], fields["body"])

    async def claim(self, agent: int, order: str, ttl_ms: int) -> Answer:
        answer = await self.ask(AGENTS[agent], "wo.claim", {"wo": order, "ttl_ms": ttl_ms})
        self._claimed(agent, order, ttl_ms, answer)
        return answer

    def _claimed(self, agent: int, order: str, ttl_ms: int, answer: Answer) -> None:
        token = self.reference.on_claim(AGENTS[agent].public_key, order, ttl_ms, answer)
        if token is not None:
            self.tokens[agent][order] = token
            self.granted[agent].append((order, token))

    async def race(self, order: str, ttl_ms: int) -> list[Answer]:
        live = [n for n, alive in enumerate(self.alive) if alive]
        answers: dict[int, Answer] = {}

        async def claim(n: int) -> None:
            body = {"wo": order, "ttl_ms": ttl_ms}
            answers[n] = await self.ask(AGENTS[n], "wo.claim", body)

        async with trio.open_nursery() as nursery:
            for n in live:
                nursery.start_soon(claim, n)
        # The reference takes them in the order the relay decided them: log order.
        for n, answer in sorted(answers.items(), key=lambda item: item[1].seq):
            self._claimed(n, order, ttl_ms, answer)
        return list(answers.values())

    async def renew(self, agent: int, order: str, ttl_ms: int | None) -> Answer | None:
        """Renew (``ttl_ms``) or release (``None``) with the agent's token, if it has one."""
        token = self.tokens[agent].get(order)
        if token is None:
            return None  # a client renews only what it was granted
        if ttl_ms is None:
            answer = await self.ask(AGENTS[agent], "wo.release", {"wo": order, "token": token})
        else:
            body = {"wo": order, "token": token, "ttl_ms": ttl_ms}
            answer = await self.ask(AGENTS[agent], "wo.renew", body)
        self.reference.on_renew(AGENTS[agent].public_key, order, token, ttl_ms, answer)
        if answer.kind == "wo.released":
            del self.tokens[agent][order]
        return answer

    async def zombie(self, agent: int, order: str, token: int) -> Answer:
        body = {"wo": order, "token": token, "ttl_ms": TTLS_MS[0]}
        answer = await self.ask(AGENTS[agent], "wo.renew", body)
        self.reference.on_renew(AGENTS[agent].public_key, order, token, TTLS_MS[0], answer)
        return answer

    async def note(self, agent: int, order: str) -> Answer:
        token = self.tokens[agent].get(order)
        body: dict[str, Any] = {"wo": order, "text": f"note {self.nonce}"}
        if token is not None:
            body["token"] = token
        answer = await self.ask(AGENTS[agent], "wo.note", body)
        self.reference.on_note(AGENTS[agent].public_key, order, token, answer)
        return answer

    def crash(self, agent: int) -> None:
        """The agent stops for good, holding whatever it holds."""
        self.alive[agent] = False
        for order, token in self.tokens[agent].items():
            hold = self.reference.hold(order, token)
            if not hold.released:
                self.crashed.append(hold)

    async def restart(self, downtime_ms: int) -> None:
        """Stop the relay, stay down for ``downtime_ms``, start a new node on the store."""
        await trio.testing.wait_all_tasks_blocked()  # all committed: nothing in flight
        before = copy.deepcopy(self.node.coordination.coordinators)
        self.stop()
        await self._stopped.wait()
        await trio.sleep(downtime_ms / 1000)
        self.check_fold(before)
        node = self._build()  # it rebuilds its state from the store, before serving
        assert node.coordination.coordinators == before, "the restart changed the state"
        await self._run(node)

    def held(self) -> list[tuple[int, str]]:
        """(agent, order) for every token a live agent keeps, whether still valid or not."""
        return [
            (agent, order)
            for agent, tokens in enumerate(self.tokens)
            if self.alive[agent]
            for order in sorted(tokens)
        ]

    def zombies(self) -> list[tuple[int, str, int]]:
        """(agent, order, token) for old tokens of live agents: released or superseded."""
        return [
            (agent, order, token)
            for agent, granted in enumerate(self.granted)
            if self.alive[agent]
            for order, token in granted
            if self.tokens[agent].get(order) != token
        ]

    @contextmanager
    def timer_held(self) -> Iterator[None]:
        """Keep the relay's timer from writing anything until the block ends (it finds
        nothing due and waits to be woken); then wake it: it runs from now on."""
        host = self.node.coordination
        host.due = lambda now_ms: []  # type: ignore[method-assign]
        host.next_expiry_ms = lambda: None  # type: ignore[method-assign]
        try:
            yield
        finally:
            del host.due, host.next_expiry_ms
            self.up_since.append(self.wall())
            self.node._timers_changed.set()

    async def play(self, step: Step) -> None:
        if isinstance(step, Late):
            with self.timer_held():
                await trio.sleep(step.ms / 1000)
                await self._act(step.request)
        else:
            await self._act(step)
        await self.check()

    async def _act(self, step: Step) -> None:
        held = self.held()
        match step:
            case Claim(agent, order, ttl_ms) if self.alive[agent]:
                await self.claim(agent, order, ttl_ms)
            case Race(order, ttl_ms):
                await self.race(order, ttl_ms)
            case Renew(pick, ttl_ms) if held:
                await self.renew(*held[pick % len(held)], ttl_ms)
            case Release(pick) if held:
                await self.renew(*held[pick % len(held)], None)
            case Zombie(pick) if zombies := self.zombies():
                await self.zombie(*zombies[pick % len(zombies)])
            case Note(agent, order) if self.alive[agent]:
                await self.note(agent, order)
            case Crash(pick):
                live = [n for n, alive in enumerate(self.alive) if alive]
                holders = sorted({agent for agent, _ in held}) or live
                if holders:
                    self.crash(holders[pick % len(holders)])
            case Advance(ms):
                await trio.sleep(ms / 1000)
            case Restart(downtime_ms):
                await self.restart(downtime_ms)

    async def wind_down(self) -> None:
        """Let every lease lapse, then check each order can be claimed again."""
        await trio.sleep((max(TTLS_MS) + TIMER_TICK_MS) / 1000)
        await self.check()
        ledger = self.ledger()
        assert not ledger.leases.leases, "a lease outlived every TTL"
        assert all(o.status is Status.OPEN for o in ledger.orders.values())
        for order in ORDERS:
            answer = await self.ask(CREATOR, "wo.claim", {"wo": order, "ttl_ms": TTLS_MS[0]})
            assert self.reference.on_claim(CREATOR.public_key, order, TTLS_MS[0], answer)
        await self.check()
        self.check_fold(self.node.coordination.coordinators)

    # -- checks --------------------------------------------------------------------------

    def ledger(self) -> Ledger:
        return self.node.coordination.coordinators[NS].ledger

    def check_fold(self, state: dict[str, Coordinator]) -> None:
        """Folding the whole stored log gives ``state``, and leaves nothing unanswered."""
        replayed = Host(RELAY.public_key, CONFIG.claim_ttl, CONFIG.lock_ttl)
        assert replayed.rebuild(self.store.scan(NS)) == [], "a request without its outcome"
        assert replayed.coordinators == state, f"fold(log) differs: {_difference(state, replayed)}"

    async def check(self) -> None:
        """Check the invariants (module docstring) once the relay is idle at ``now``."""
        await trio.testing.wait_all_tasks_blocked()  # the relay is idle: commits are done
        now = self.wall()
        self._check_expiry_records()
        self.reference.check_disjoint()
        ledger = self.ledger()
        for order in ORDERS:
            holds = self.reference.holds[order]
            assert ledger.leases.tokens.get(order, 0) == (holds[-1].token if holds else 0)
            valid = self.reference.valid_at(order, now)
            holder = ledger.leases.holder(order, now)
            assert (holder.token if holder else None) == (valid.token if valid else None)
            lease = ledger.leases.leases.get(order)
            status = ledger.orders[order].status
            if lease is None:
                assert status is Status.OPEN, f"{order} is {status} without a lease"
                continue
            last = holds[-1]
            assert status is Status.CLAIMED and not last.released
            assert (lease.holder, lease.token, lease.expires_ms) == (
                last.holder,
                last.token,
                last.end_ms,
            )
            due = max(lease.expires_ms, self.up_since[-1]) + TIMER_TICK_MS
            assert now < due, (
                f"{order} still claimed at {at(now)} by {lease}, due open by {at(due)}"
            )
        for hold in self.crashed:  # the case: the holder died
            if now < max(hold.end_ms, self.up_since[-1]) + TIMER_TICK_MS:
                continue
            lease = ledger.leases.leases.get(hold.order)
            assert lease is None or lease.token > hold.token, f"dead {hold} still holds"
            history = [(ms, moved) for ms, moved, _ in ledger.orders[hold.order].history]
            assert (hold.end_ms, Status.OPEN) in history, "reopened, stamped at its expiry"

    def _check_expiry_records(self) -> None:
        """Check the timer's ``lease.expired`` records committed since the last check."""
        records = self.store.read(NS, self.seen_seq + 1, 1 << 20)
        for record in records:
            if record.kind != EXPIRED:
                continue
            at_ms = record.hlc >> HLC_SHIFT
            up_since = max(t for t in self.up_since if t <= at_ms)
            assert record.author == RELAY.public_key
            for order, token in decode(record.event)["body"]["leases"]:
                self.reference.on_expired(record.seq, at_ms, order, token, up_since)
        if records:
            self.seen_seq = records[-1].seq


def _difference(state: dict[str, Coordinator], replayed: Host) -> str:
    """Where the fold of the log differs from the relay's state (ledger of NS)."""
    live, folded = state[NS].ledger, replayed.coordinators[NS].ledger
    for order in sorted({*live.orders, *folded.orders}):
        if live.orders.get(order) != folded.orders.get(order):
            return f"{order}: relay {live.orders.get(order)} != fold {folded.orders.get(order)}"
    if live.leases != folded.leases:
        return f"leases: relay {live.leases} != fold {folded.leases}"
    return "outside the work ledger (locks or records)"


def play(steps: list[Step]) -> None:
    """Run ``steps`` against a fresh relay in virtual time, checking after each."""

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            harness = Harness(nursery)
            await harness.start()
            for step in steps:
                await harness.play(step)
            await harness.wind_down()
            harness.stop()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


# -- the tests ---------------------------------------------------------------------------

agents = st.integers(0, len(AGENTS) - 1)
orders = st.sampled_from(ORDERS)
ttls = st.sampled_from(TTLS_MS)
picks = st.integers(0, 7)
# Whole TTLs and one ms short of them land requests on, or just before, an expiry.
edges = st.sampled_from([1, 999, 1_000, 1_999, 2_000, 2_999, 3_000])
durations = st.one_of(edges, st.integers(0, 4_000))
requests = st.one_of(
    st.builds(Claim, agents, orders, ttls),
    st.builds(Renew, picks, ttls),
    st.builds(Release, picks),
    st.builds(Zombie, picks),
    st.builds(Note, agents, orders),
    st.builds(Race, orders, ttls),
)
steps = st.one_of(
    # Repeated branches weigh the draw: mostly claims, renewals and time passing.
    st.builds(Claim, agents, orders, ttls),
    st.builds(Claim, agents, orders, ttls),
    st.builds(Renew, picks, ttls),
    st.builds(Renew, picks, ttls),
    st.builds(Release, picks),
    st.builds(Zombie, picks),
    st.builds(Note, agents, orders),
    st.builds(Race, orders, ttls),
    # A request between an expiry and its lease.expired: the relay's check decides.
    st.builds(Late, durations, requests),
    st.builds(Late, durations, requests),
    st.builds(Advance, durations),
    st.builds(Advance, durations),
    st.builds(Advance, durations),
    st.builds(Crash, picks),
    st.builds(Restart, st.one_of(st.just(0), durations)),
)


@given(st.lists(steps, min_size=10, max_size=60))
@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
def test_leases_stay_safe_through_crashes_and_restarts(steps: list[Step]) -> None:
    play(steps)


def test_a_dead_holders_claim_survives_a_restart_and_then_lapses() -> None:
    """One interleaving spelled out: a restart while a lease is held, a crashed holder,
    and a lease that lapsed while the relay was down."""

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            h = Harness(nursery)
            await h.start()
            first = await h.claim(0, "wo-1", 3_000)
            assert first.kind == "wo.claimed" and first.body["token"] == 1
            assert first.body["expires_ms"] == NOW + 3_000
            other = await h.claim(1, "wo-2", 2_000)
            assert other.body["expires_ms"] == NOW + 2_000
            await h.play(Advance(1_000))
            renewed = await h.renew(0, "wo-1", 3_000)
            assert renewed is not None and renewed.body["expires_ms"] == NOW + 4_000
            h.crash(0)  # agent 0 dies holding wo-1 until NOW + 4000
            await h.check()

            # Down from +1000 to +2500: wo-2's lease (to +2000) lapses meanwhile, and
            # the relay announces it the moment it is back.
            await h.play(Restart(1_500))
            expired = [r for r in h.store.scan(NS) if r.kind == EXPIRED]
            assert [decode(r.event)["body"]["leases"] for r in expired] == [[["wo-2", 1]]]
            assert expired[0].hlc >> HLC_SHIFT == NOW + 2_500
            # wo-1's lease survived the restart.
            held = await h.claim(2, "wo-1", 1_000)
            assert held.kind == "wo.rejected" and held.body["holder"]["token"] == 1

            await h.play(Advance(1_500))  # to +4000: the dead holder's lease runs out
            expired = [r for r in h.store.scan(NS) if r.kind == EXPIRED]
            assert decode(expired[-1].event)["body"]["leases"] == [["wo-1", 1]]
            assert NOW + 4_000 <= expired[-1].hlc >> HLC_SHIFT <= NOW + 4_000 + TIMER_TICK_MS
            assert h.ledger().orders["wo-1"].status is Status.OPEN

            taken = await h.claim(2, "wo-1", 1_000)
            assert taken.kind == "wo.claimed" and taken.body["token"] == 2  # fenced above 1
            late = await h.renew(1, "wo-2", 1_000)  # agent 1 slept through its lease
            assert late is not None and late.kind == "wo.rejected"
            await h.check()
            await h.play(Restart(0))
            await h.wind_down()
            h.stop()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


def test_requests_between_an_expiry_and_its_record_are_decided_at_their_instant() -> None:
    """The relay's timer lags behind an expiry (held back here): until it writes
    ``lease.expired``, the ledger still has the lapsed lease, and the relay must
    judge each request by the lease's validity at the request's own instant."""

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            h = Harness(nursery)
            await h.start()
            await h.claim(0, "wo-1", 1_000)  # valid on [+0, +1000)
            await h.claim(1, "wo-2", 2_000)  # valid on [+0, +2000)
            seen = h.store.heads()[NS].seq
            with h.timer_held():
                await trio.sleep(1)  # +1000: wo-1's lease has just lapsed
                assert h.ledger().leases.leases["wo-1"].token == 1  # not yet announced
                lapsed = await h.renew(0, "wo-1", 1_000)
                assert lapsed is not None and lapsed.kind == "wo.rejected"
                taken = await h.claim(2, "wo-1", 1_000)
                assert taken.kind == "wo.claimed" and taken.body["token"] == 2
                await trio.sleep(0.999)  # +1999: wo-2's lease is still valid
                kept = await h.renew(1, "wo-2", 1_000)
                assert kept is not None and kept.kind == "wo.renewed"
                held = await h.claim(3, "wo-2", 1_000)
                assert held.kind == "wo.rejected" and held.body["problem"] == "held"
                await trio.sleep(0.001)  # +2000: agent 2 keeps wo-1 until +2000
                gone = await h.claim(3, "wo-1", 1_000)
                assert gone.kind == "wo.claimed" and gone.body["token"] == 3
                late = await h.renew(2, "wo-1", 1_000)
                assert late is not None and late.kind == "wo.rejected"
                timed = h.store.read(NS, seen + 1, 1 << 20)
                assert not [r for r in timed if r.kind == EXPIRED]  # the timer was held
            await h.check()
            await h.wind_down()
            h.stop()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
