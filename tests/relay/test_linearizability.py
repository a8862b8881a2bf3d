"""Claims, renewals and releases through a real relay are linearizable.

Each work order's lease must behave like one register updated atomically at some
instant between a request's publish and its outcome, whatever the interleaving of
many agents. The checker (tests/relay/linearizability.py) is tested first on small
hand-written histories, both ways, so that a passing run means something; then it
judges histories recorded from concurrent agents on a real loopback relay.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import trio

from agent_sdk.client import Published, RelayClient
from relay.coordination.ledger import Contract, Done, Ledger, Rejection
from tests.conftest import RunningRelay, identity
from tests.relay.linearizability import Model, Operation, check

NS = "work@local"

# -- the sequential specification of one work order's lease ---------------------------


@dataclass(frozen=True, slots=True)
class Request:
    kind: str
    """``claim``, ``renew`` or ``release``."""
    order: str
    agent: int
    token: int | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    problem: str | None
    """``None`` when granted (claim, renew) or done (release)."""
    lease: tuple[int, int] | None = None
    """``(holder, token)``: the lease granted or renewed, or the valid one in the way."""


LeaseState = tuple[int | None, int]
"""``(holder or None, the last token granted)``; without expiry the holder's lease
always carries the last token."""


def lease_step(state: LeaseState, request: Request, answer: Answer) -> tuple[bool, LeaseState]:
    """One order's lease, as relay/coordination/ledger.py decides it with no expiry.

    A claim of a free order is granted with a token above every earlier one (the
    fencing guarantee of leases.py); a claim of a held order, the holder's included,
    is refused ``held`` naming the lease. Renew and release pass the fence only for
    the holder with the current token; a release of an open order is a
    ``bad_transition`` (the status table is checked before the fence).
    """
    holder, last = state
    current = None if holder is None else (holder, last)
    if request.kind == "claim":
        if current is not None:
            return answer == Answer("held", current), state
        granted = answer.lease
        if answer.problem is None and granted and granted[0] == request.agent and granted[1] > last:
            return True, granted
        return False, state
    if current is None and request.kind == "release":
        expected = Answer("bad_transition")
    elif holder != request.agent:
        expected = Answer("not_holder", current)
    elif request.token != last:
        expected = Answer("stale_token", current)
    elif request.kind == "renew":
        expected = Answer(None, current)
    else:
        return answer == Answer(None), (None, last)
    return answer == expected, state


def by_order(history: Sequence[Operation]) -> list[list[Operation]]:
    """Leases on different orders never interact: check each order on its own."""
    parts: dict[str, list[Operation]] = {}
    for op in history:
        parts.setdefault(op.input.order, []).append(op)
    return list(parts.values())


def describe(op: Operation) -> str:
    request, answer = op.input, op.output
    token = "" if request.token is None else f"({request.token})"
    said = "ok" if answer.problem is None else answer.problem
    lease = "" if answer.lease is None else f" {answer.lease}"
    times = f"[{op.call:.6f}, {op.ret:.6f}]"
    return f"{times} agent {request.agent} {request.kind}{token} {request.order} -> {said}{lease}"


LEASE: Model[LeaseState] = Model(lambda: (None, 0), lease_step, by_order, describe)


# -- the checker can say no -----------------------------------------------------------


def op(
    agent: int,
    call: float,
    ret: float,
    kind: str,
    answer: Answer,
    token: int | None = None,
    order: str = "wo-1",
) -> Operation:
    return Operation(agent, call, ret, Request(kind, order, agent, token), answer)


def granted(agent: int, token: int) -> Answer:
    return Answer(None, (agent, token))


RELEASED = Answer(None)


def test_a_sequential_history_of_the_model_is_linearizable() -> None:
    history = [
        op(1, 0, 1, "claim", granted(1, 1)),
        op(1, 2, 3, "renew", granted(1, 1), token=1),
        op(2, 4, 5, "claim", Answer("held", (1, 1))),
        op(2, 6, 7, "release", Answer("not_holder", (1, 1)), token=1),
        op(1, 8, 9, "release", RELEASED, token=1),
        op(1, 10, 11, "release", Answer("bad_transition"), token=1),
        op(2, 12, 13, "renew", Answer("not_holder"), token=1),
        op(2, 14, 15, "claim", granted(2, 2)),
        op(2, 16, 17, "renew", Answer("stale_token", (2, 2)), token=1),
    ]
    verdict = check(LEASE, history)
    assert verdict.ok, verdict.explain()
    assert list(verdict.order) == history


def test_overlapping_calls_may_take_effect_in_either_order() -> None:
    # Agent 2 is refused by agent 1's claim, which returned later: fine, since agent
    # 1's call began first and may have taken effect first. A checker that ordered
    # by return time would wrongly fail this.
    history = [
        op(1, 0, 10, "claim", granted(1, 1)),
        op(2, 1, 5, "claim", Answer("held", (1, 1))),
        op(1, 11, 20, "release", RELEASED, token=1),
        op(3, 12, 13, "claim", granted(3, 2)),  # took effect after the release did
    ]
    verdict = check(LEASE, history)
    assert verdict.ok, verdict.explain()
    assert [o.client for o in verdict.order] == [1, 2, 1, 3]


def test_two_claims_granted_without_a_release_between_are_not() -> None:
    history = [
        op(1, 0, 1, "claim", granted(1, 1)),
        op(2, 2, 3, "claim", granted(2, 2)),
    ]
    verdict = check(LEASE, history)
    assert not verdict.ok
    assert verdict.order == (history[0],) and verdict.stuck == (history[1],)
    assert "agent 2 claim wo-1 -> ok (2, 2)" in verdict.explain()


def test_two_concurrent_claims_cannot_both_be_granted() -> None:
    history = [
        op(1, 0, 5, "claim", granted(1, 1)),
        op(2, 1, 6, "claim", granted(2, 2)),
    ]
    assert not check(LEASE, history).ok


def test_a_renewal_after_the_release_returned_is_not() -> None:
    history = [
        op(1, 0, 1, "claim", granted(1, 1)),
        op(1, 2, 3, "release", RELEASED, token=1),
        op(1, 4, 5, "renew", granted(1, 1), token=1),
    ]
    assert not check(LEASE, history).ok
    # The same answers are fine while the release is still under way.
    history[1] = op(1, 2, 6, "release", RELEASED, token=1)
    history[2] = op(2, 3, 5, "renew", Answer("not_holder", (1, 1)), token=1)
    assert check(LEASE, history).ok


def test_tokens_going_down_are_not() -> None:
    history = [
        op(1, 0, 1, "claim", granted(1, 2)),
        op(1, 2, 3, "release", RELEASED, token=2),
        op(2, 4, 5, "claim", granted(2, 1)),
    ]
    assert not check(LEASE, history).ok
    history[2] = op(2, 4, 5, "claim", granted(2, 7))  # a gap is allowed; going back is not
    assert check(LEASE, history).ok


def test_a_claim_granted_before_the_release_was_called_is_not() -> None:
    history = [
        op(1, 0, 1, "claim", granted(1, 1)),
        op(2, 2, 3, "claim", granted(2, 2)),
        op(1, 4, 5, "release", RELEASED, token=1),
    ]
    assert not check(LEASE, history).ok
    history[2] = op(1, 2.5, 5, "release", RELEASED, token=1)  # now it overlaps the claim
    assert check(LEASE, history).ok


def test_orders_are_checked_apart() -> None:
    # Each order on its own is fine, interleaved in time with the other.
    history = [
        op(1, 0, 1, "claim", granted(1, 1), order="wo-1"),
        op(2, 0, 1, "claim", granted(2, 1), order="wo-2"),
        op(2, 2, 3, "claim", Answer("held", (1, 1)), order="wo-1"),
        op(1, 2, 3, "claim", Answer("held", (2, 1)), order="wo-2"),
    ]
    assert check(LEASE, history).ok
    # The same refusal on the wrong order is caught there.
    history[3] = op(1, 2, 3, "claim", Answer("held", (1, 1)), order="wo-2")
    verdict = check(LEASE, history)
    assert not verdict.ok and verdict.stuck == (history[3],)


def test_the_model_agrees_with_the_pure_ledger() -> None:
    """Drive relay/coordination/ledger.py one request at a time, then blur every
    call's interval: the true order is still a linearization, so the model must
    accept it. A model that disagreed with the ledger on any refusal would not."""
    rng = random.Random(7)
    ledger = Ledger()
    orders = [ledger.create(Contract(f"t{n}"), bytes(32), 0).order for n in range(2)]
    history = []
    for i in range(300):
        agent, order = rng.randrange(4), rng.choice(orders)
        kind, token = rng.choice(("claim", "renew", "release")), rng.randint(0, 4)
        key = bytes([agent]) * 32
        if kind == "claim":
            outcome = ledger.claim(order, key, 1000 + i)
            request = Request(kind, order, agent)
        elif kind == "renew":
            outcome = ledger.renew(order, key, token, 1000 + i)
            request = Request(kind, order, agent, token)
        else:
            outcome = ledger.release(order, key, token, 1000 + i)
            request = Request(kind, order, agent, token)
        if isinstance(outcome, Rejection):
            held = outcome.holder
            lease = None if held is None else (held.holder[0], held.token)
            answer = Answer(outcome.problem.value, lease)
        else:
            assert isinstance(outcome, Done)
            answer = Answer(None, None if outcome.lease is None else (agent, outcome.lease.token))
        call, ret = i - rng.uniform(0, 4), i + rng.uniform(0, 4)
        history.append(Operation(agent, call, ret, request, answer))
    verdict = check(LEASE, history)
    assert verdict.ok, verdict.explain()
    seen = Counter((o.input.kind, o.output.problem) for o in history)
    assert {("claim", None), ("claim", "held"), ("renew", None), ("release", None)} <= set(seen)
    assert {("renew", "stale_token"), ("release", "bad_transition")} <= set(seen)


# -- the real thing -------------------------------------------------------------------

AGENTS = 16
STEPS = 40
ORDERS = 3
SEED = 20240611
OUTCOME_KINDS = {"claim": "wo.claimed", "renew": "wo.renewed", "release": "wo.released"}


def answer_of(request: Request, published: Published, agents: dict[bytes, int]) -> Answer:
    """The relay's outcome event, in the model's terms."""
    assert published.outcome is not None, "a request is answered with its outcome"
    event = published.outcome.event.event
    assert event.deps == (published.receipt.id,)
    body: dict[str, Any] = event.body
    if event.kind == "wo.rejected":
        held = body.get("holder")
        lease = None if held is None else (agents[held["holder"]], held["token"])
        return Answer(body["problem"], lease)
    assert event.kind == OUTCOME_KINDS[request.kind], (request, event.kind, body)
    if request.kind == "release":
        return RELEASED
    return Answer(None, (agents[body["holder"]], body["token"]))


async def run_agent(
    url: str,
    n: int,
    orders: list[str],
    agents: dict[bytes, int],
    go: trio.Event,
    history: list[Operation],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A seeded-random run of claims, renewals and releases, each call recorded.

    Mostly sensible (claim what is not held, renew or release what is), sometimes
    not (claim again, a wrong or stale token, renew or release what is not held), so
    every refusal the model knows is exercised. No TTL is given: the default (30 min)
    outlives the test, and the model has no expiry.
    """
    rng = random.Random(SEED * 1000 + n)
    held: dict[str, int] = {}  # orders this agent holds, with their tokens
    last: dict[str, int] = {}  # the last token this agent was granted per order
    async with RelayClient.connect(url, identity(n)) as client:
        task_status.started()
        await go.wait()
        for step in range(STEPS):
            order, roll = rng.choice(orders), rng.random()
            token: int | None
            if order in held:
                token = held[order]
                if roll < 0.1:
                    kind, token = "claim", None
                elif roll < 0.2:
                    kind, token = rng.choice(("renew", "release")), token + rng.choice((-1, 1))
                else:
                    kind = "renew" if roll < 0.6 else "release"
            elif roll < 0.7:
                kind, token = "claim", None
            else:
                kind, token = rng.choice(("renew", "release")), last.get(order, rng.randint(1, 3))
            request = Request(kind, order, n, token)
            body = {"wo": order} if token is None else {"wo": order, "token": token}
            # A distinct nonce per call: two equal requests in one millisecond would
            # otherwise be one event, answered twice with the first one's outcome.
            nonce = f"{n}.{step}".encode()
            call = trio.current_time()
            published = await client.publish(NS, f"wo.{kind}", body, nonce=nonce)
            ret = trio.current_time()
            assert not published.duplicate
            answer = answer_of(request, published, agents)
            history.append(Operation(n, call, ret, request, answer))
            if answer.problem is None and kind == "claim":
                assert answer.lease is not None
                held[order] = last[order] = answer.lease[1]
            elif answer.problem is None and kind == "release":
                held.pop(order, None)  # not del: the checker judges odd answers, not a KeyError


async def test_concurrent_agents_on_a_real_relay_are_linearizable(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as creator:
        orders = []
        for n in range(ORDERS):
            published = await creator.publish(NS, "wo.create", {"title": f"order {n}"})
            assert published.outcome is not None
            orders.append(published.outcome.event.event.body["wo"])
    assert orders == ["wo-1", "wo-2", "wo-3"]
    numbers = range(10, 10 + AGENTS)
    agents = {identity(n).public_key: n for n in numbers}
    history: list[Operation] = []
    go = trio.Event()
    async with trio.open_nursery() as nursery:
        for n in numbers:
            await nursery.start(run_agent, relay.url, n, orders, agents, go, history)
        go.set()  # all connected: start together, for as much overlap as possible
    assert len(history) == AGENTS * STEPS

    verdict = check(LEASE, history)
    assert verdict.ok, verdict.explain()

    # Not vacuous: there was contention, and grants, renewals and releases happened.
    seen = Counter((o.input.kind, o.output.problem) for o in history)
    for wanted in [("claim", None), ("claim", "held"), ("renew", None), ("release", None)]:
        assert seen[wanted] > 0, (wanted, seen)
    # And the verdict depends on the answers: two grants of one order that share a
    # token contradict the model whatever the interleaving.
    grants: dict[str, list[int]] = {}
    for i, o in enumerate(history):
        if o.input.kind == "claim" and o.output.problem is None:
            grants.setdefault(o.input.order, []).append(i)
    most = max(grants.values(), key=len)
    assert len(most) >= 2, grants
    first, second = most[:2]
    forged = Answer(None, (history[second].client, history[first].output.lease[1]))
    history[second] = replace(history[second], output=forged)
    assert not check(LEASE, history).ok
