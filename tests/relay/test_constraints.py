"""Shared constraints: the budget invariant as a property of the pure fold, then 100
agents drawing on one budget over real sockets, then every bad request."""

from __future__ import annotations

import copy
import random

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_sdk.client import RelayClient
from agent_sdk.constraints import Constraints
from agent_sdk.ledger import LedgerRefusal
from relay.coordination.constraints import Constraints as Fold
from relay.coordination.fields import Conflict
from tests.conftest import RunningRelay, identity

NS = "shop@local"
AGENTS = [bytes([n]) * 32 for n in range(5)]

OPS = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "commit", "release", "renew", "wait", "define"]),
        st.integers(min_value=0, max_value=4),  # which agent
        st.integers(min_value=0, max_value=60),  # an amount, or ms to wait
    ),
    max_size=80,
)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(OPS)
def test_used_and_reserved_never_exceed_the_limit(ops: list[tuple[str, int, int]]) -> None:
    """Whatever is asked, used plus reserved stays within the limit; and a refused
    request changes nothing (beyond dropping reservations that had lapsed by then,
    which hold nothing any more)."""
    fold, now, taken = Fold(), 0, []
    fold.define("budget", 100, AGENTS[0], now)
    for op, who, n in ops:
        agent = AGENTS[who]
        before = copy.deepcopy(fold)
        try:
            if op == "reserve":
                taken.append(fold.reserve("budget", n, agent, now, ttl_ms=50).id)
            elif op in ("commit", "release", "renew") and taken:
                rid = taken[n % len(taken)]  # often someone else's: not_holder
                if op == "commit":
                    fold.commit("budget", rid, agent, now, n % 3 or None)
                elif op == "renew":
                    fold.renew("budget", rid, agent, now, ttl_ms=n + 1)  # even shorter
                else:
                    fold.release("budget", rid, agent, now)
            elif op == "wait":
                now += n  # reservations lapse as the log's time passes
            elif op == "define":
                fold.define("budget", 50 + n, agent, now)
        except Conflict:  # refused: nothing changed, lapsed reservations aside
            after = copy.deepcopy(fold)
            for state in (before, after):
                for constraint in state.by_name.values():
                    constraint.lapse(now)
            assert after == before, (op, who, n)
        budget = fold.by_name["budget"]
        assert budget.used + budget.reserved(now) <= budget.limit


async def test_a_hundred_agents_never_overdraw_one_budget(relay: RunningRelay) -> None:
    rng = random.Random(7)
    limit = 1_000
    async with RelayClient.connect(relay.url, identity(200)) as owner:
        await Constraints(owner, NS).define("discounts", limit)
    outcomes = {"reserved": 0, "exceeded": 0, "committed": 0}
    committed_total = [0]

    async def agent(n: int, amounts: list[int]) -> None:
        async with RelayClient.connect(relay.url, identity(n)) as client:
            budget = Constraints(client, NS)
            for amount in amounts:
                try:
                    held = await budget.reserve("discounts", amount, ttl_ms=60_000)
                except LedgerRefusal as refusal:
                    assert refusal.problem == "exceeded", refusal
                    outcomes["exceeded"] += 1
                    continue
                outcomes["reserved"] += 1
                assert held["used"] + held["reserved"] <= limit
                if amount % 2:
                    await budget.commit("discounts", held["reservation"], amount - 1)
                    committed_total[0] += amount - 1
                    outcomes["committed"] += 1
                else:
                    await budget.release("discounts", held["reservation"])

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for n in range(100):
                nursery.start_soon(agent, n, [rng.randint(1, 40) for _ in range(5)])
    async with RelayClient.connect(relay.url, identity(200)) as owner:
        shown = await Constraints(owner, NS).show("discounts")
    assert shown["used"] == committed_total[0] <= limit
    assert shown["reserved"] == 0 and shown["available"] == limit - shown["used"]
    assert outcomes["exceeded"] > 0 and outcomes["committed"] > 0  # the limit was reached


async def test_bad_constraint_requests_are_refused_and_change_nothing(
    relay: RunningRelay,
) -> None:
    async with (
        RelayClient.connect(relay.url, identity(1)) as owner_client,
        RelayClient.connect(relay.url, identity(2)) as other_client,
    ):
        owner, other = Constraints(owner_client, NS), Constraints(other_client, NS)
        await owner.define("slots", 10)
        held = await owner.reserve("slots", 6)
        for call, problem in (
            (owner.define("slots", 5), "below_use"),  # 6 reserved: a limit of 5 breaks
            (other.define("slots", 20), "not_owner"),
            (owner.define("slots", -1), "bad_request"),
            (owner.reserve("slots", 5), "exceeded"),
            (owner.reserve("slots", 0), "bad_request"),
            (owner.reserve("nothing", 1), "not_found"),
            (owner.reserve("slots", 1, ttl_ms=1), "bad_ttl"),
            (owner.reserve("slots", 1, ttl_ms=86_400_001), "bad_ttl"),  # past a day: the bound
            (other.commit("slots", held["reservation"]), "not_holder"),
            (owner.commit("slots", held["reservation"], 7), "exceeded"),
            (owner.commit("slots", "res-99"), "expired"),
            (other.renew("slots", held["reservation"]), "not_holder"),
            (owner.renew("slots", "res-99"), "expired"),
            (owner.renew("slots", held["reservation"], ttl_ms=1), "bad_ttl"),
            (owner.renew("slots", held["reservation"], ttl_ms=86_400_001), "bad_ttl"),
            (owner._requests.request("constraint.define", {"name": ""}), "bad_request"),
        ):
            with pytest.raises(LedgerRefusal) as info:
                await call
            assert info.value.problem == problem, info.value
        shown = await owner.show("slots")
        assert (shown["limit"], shown["used"], shown["reserved"]) == (10, 0, 6)
        renewed = await owner.renew("slots", held["reservation"], ttl_ms=86_400_000)  # included
        assert renewed["expires_ms"] > held["expires_ms"] and renewed["amount"] == 6
        await owner.commit("slots", held["reservation"], 4)
        await owner.define("slots", 4)  # down to what is used: allowed
        assert (await owner.show("slots"))["available"] == 0


def test_a_renewed_reservation_outlives_its_first_expiry_and_a_lapsed_one_cannot_renew() -> None:
    fold, holder = Fold(), AGENTS[0]
    fold.define("budget", 10, holder, 0)
    held = fold.reserve("budget", 6, holder, 0, ttl_ms=100)
    fold.renew("budget", held.id, holder, 90, ttl_ms=100)
    assert fold.by_name["budget"].reserved(150) == 6  # past the first expiry, still held
    with pytest.raises(Conflict) as info:
        fold.reserve("budget", 5, AGENTS[1], 150, ttl_ms=100)
    assert info.value.problem == "exceeded"
    fold.commit("budget", held.id, holder, 180, 6)
    late = fold.reserve("budget", 4, holder, 200, ttl_ms=100)
    with pytest.raises(Conflict) as info:
        fold.renew("budget", late.id, holder, 300, ttl_ms=100)  # lapsed at 300
    assert info.value.problem == "expired"


def test_the_show_query_lists_only_open_reservations() -> None:
    """``constraint.show`` at a ``now`` past a reservation's expiry, before any request
    lapsed it: no longer listed, nor counted (8.13: a lapsed reservation stops counting
    at any ``now >= expires_ms``)."""
    from relay.coordination.queries import answer
    from relay.coordination.requests import Coordinator

    coordinator, holder = Coordinator(), AGENTS[0]
    coordinator.constraints.define("budget", 10, holder, 0)
    short = coordinator.constraints.reserve("budget", 3, holder, 0, ttl_ms=1_000)
    long = coordinator.constraints.reserve("budget", 4, AGENTS[1], 0, ttl_ms=5_000)
    shown = answer(coordinator, "constraint.show", {"name": "budget"}, 999, 1 << 20)
    assert [r["reservation"] for r in shown["reservations"]] == [short.id, long.id]
    assert (shown["reserved"], shown["available"]) == (7, 3)
    shown = answer(coordinator, "constraint.show", {"name": "budget"}, 1_000, 1 << 20)
    assert [r["reservation"] for r in shown["reservations"]] == [long.id]
    assert (shown["used"], shown["reserved"], shown["available"]) == (0, 4, 6)
