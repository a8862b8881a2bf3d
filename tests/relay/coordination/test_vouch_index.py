"""Scores read the vouches of one agent from an index, not every vouch of the namespace:
they must add exactly what the scan of every vouch would, in the same order.

A score decides bids (``min_reputation``), award rankings (``stake_x_reputation``)
and a vouch's logged ``value``, so it is part of what a replay decides again: the
property drives vouches, re-vouches, revocations and outcomes among four agents, and
after every step compares the vouchers of each agent and each score (as floats, with
``==``) with the definition, and a reputation rebuilt from its vouches alone.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.coordination.stakes import Reputation, Vouch

AGENTS = [bytes([n]) * 32 for n in range(1, 5)]

step = st.one_of(
    st.tuples(st.just("vouch"), st.integers(0, 3), st.integers(0, 3), st.integers(1, 300)),
    st.tuples(st.just("revoke"), st.integers(0, 3), st.integers(0, 3), st.just(0)),
    st.tuples(st.just("outcome"), st.integers(0, 3), st.sampled_from([1, -1]), st.just(0)),
    st.tuples(st.just("wait"), st.integers(0, 10**9), st.just(0), st.just(0)),
)


def vouchers_by_scan(reputation: Reputation, vouchee: bytes) -> list[Vouch]:
    """The definition: every vouch in force for ``vouchee``, by voucher."""
    found = [v for (_, to), v in reputation.vouches.items() if to == vouchee]
    return sorted(found, key=lambda v: v.voucher)


def score_by_scan(reputation: Reputation, agent: bytes, now_ms: int) -> float:
    """The score as the scan computed it (the same terms, in the same order)."""
    total = 0.0
    for at, value in reputation.outcomes.get(agent, ()):
        total += value * 2.0 ** (-(now_ms - at) / reputation.half_life_ms)
    for vouch in vouchers_by_scan(reputation, agent):
        total += vouch.value * 2.0 ** (-(now_ms - vouch.at_ms) / reputation.half_life_ms)
    return total


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(step, max_size=40))
def test_scores_add_what_a_scan_of_every_vouch_would(
    steps: list[tuple[str, int, int, int]],
) -> None:
    reputation = Reputation(half_life_ms=10**9)
    now = 0
    for op, a, b, weight in steps:
        if op == "vouch" and a != b:
            reputation.vouch(AGENTS[a], AGENTS[b], weight, "", now)
        elif op == "revoke":
            had = (AGENTS[a], AGENTS[b]) in reputation.vouches
            assert (reputation.revoke(AGENTS[a], AGENTS[b]) is not None) == had
        elif op == "outcome":
            reputation.record(AGENTS[a], now, float(b))
        elif op == "wait":
            now += a
        rebuilt = Reputation(reputation.half_life_ms, dict(reputation.outcomes),
                             dict(reputation.vouches))  # fmt: skip
        for agent in AGENTS:
            expected = vouchers_by_scan(reputation, agent)
            assert reputation.vouchers_of(agent) == expected
            assert rebuilt.vouchers_of(agent) == expected
            assert reputation.score(agent, now) == score_by_scan(reputation, agent, now)
        assert rebuilt == reputation


def test_a_score_does_not_read_every_vouch_of_the_namespace() -> None:
    """10,000 vouches among other agents: a score reads the agent's own (the scan read
    all of them: 240 us a bid; now under a microsecond)."""
    others = [n.to_bytes(32, "big") for n in range(10, 10_010)]
    pairs = itertools.pairwise(others)
    reputation = Reputation(vouches={(a, b): Vouch(a, b, 1, "", 0, 0.0) for a, b in pairs})
    reputation.vouch(AGENTS[0], AGENTS[1], 100, "", 0)
    assert len(reputation.vouchers_of(others[5])) == 1

    class Untouchable(dict[tuple[bytes, bytes], Vouch]):
        def items(self):  # type: ignore[no-untyped-def]
            raise AssertionError("a score scanned every vouch")

    reputation.vouches = Untouchable(reputation.vouches)
    assert [v.voucher for v in reputation.vouchers_of(AGENTS[1])] == [AGENTS[0]]
    assert reputation.score(AGENTS[1], 0) == 0.0  # (the voucher had no score to lend)
