"""The lease engine: exclusivity, fencing and determinism, by example and by property."""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from relay.coordination.leases import (
    Granted,
    LeaseEngine,
    Refusal,
    Refused,
    Released,
    TtlBounds,
)

A, B = b"a" * 32, b"b" * 32
MIN = 60_000


def test_one_holder_at_a_time_and_the_loser_is_told_who() -> None:
    engine = LeaseEngine()
    won = engine.acquire("wo-1", A, now_ms=0, ttl_ms=MIN)
    assert isinstance(won, Granted) and won.lease.token == 1
    lost = engine.acquire("wo-1", B, now_ms=10, ttl_ms=MIN)
    assert isinstance(lost, Refused) and lost.refusal is Refusal.HELD
    assert lost.holder == won.lease and A.hex() in lost.reason


def test_an_expired_lease_goes_to_the_next_claimant_with_a_higher_token() -> None:
    engine = LeaseEngine()
    first = engine.acquire("wo-1", A, now_ms=0, ttl_ms=MIN)
    assert isinstance(first, Granted)
    second = engine.acquire("wo-1", B, now_ms=MIN, ttl_ms=MIN)  # expiry is exclusive
    assert isinstance(second, Granted)
    assert second.lease.token == 2 and second.expired == first.lease


def test_fencing_refuses_a_paused_holder_after_a_new_grant() -> None:
    engine = LeaseEngine()
    paused = engine.acquire("wo-1", A, now_ms=0, ttl_ms=MIN)
    assert isinstance(paused, Granted)
    assert isinstance(engine.acquire("wo-1", B, now_ms=MIN + 1, ttl_ms=MIN), Granted)
    late = engine.renew("wo-1", A, paused.lease.token, now_ms=MIN + 2, ttl_ms=MIN)
    assert isinstance(late, Refused) and late.refusal is Refusal.NOT_HOLDER
    # The same key holding again does not make the old token good either.
    engine2 = LeaseEngine()
    old = engine2.acquire("wo-1", A, now_ms=0, ttl_ms=MIN)
    assert isinstance(old, Granted)
    assert isinstance(engine2.acquire("wo-1", A, now_ms=MIN, ttl_ms=MIN), Granted)
    stale = engine2.check("wo-1", A, old.lease.token, now_ms=MIN + 1)
    assert stale is not None and stale.refusal is Refusal.STALE_TOKEN


def test_renew_release_and_ttl_bounds() -> None:
    engine = LeaseEngine(bounds=TtlBounds(min_ms=1_000, max_ms=MIN, default_ms=MIN))
    granted = engine.acquire("lock:main", A, now_ms=0)
    assert isinstance(granted, Granted) and granted.lease.expires_ms == MIN
    renewed = engine.renew("lock:main", A, 1, now_ms=50_000)
    assert isinstance(renewed, Granted) and renewed.lease.expires_ms == 50_000 + MIN
    assert renewed.lease.token == 1
    wrong = engine.release("lock:main", B, 1, now_ms=50_001)
    assert isinstance(wrong, Refused) and wrong.refusal is Refusal.NOT_HOLDER
    assert isinstance(engine.release("lock:main", A, 1, now_ms=50_002), Released)
    assert engine.holder("lock:main", 50_003) is None
    for ttl in (999, MIN + 1):
        refused = engine.acquire("x", A, now_ms=0, ttl_ms=ttl)
        assert isinstance(refused, Refused) and refused.refusal is Refusal.BAD_TTL
    assert isinstance(engine.acquire("lock:main", B, now_ms=50_003), Granted)
    assert engine.tokens["lock:main"] == 2  # never reused after a release


def test_the_timer_retires_expired_leases() -> None:
    engine = LeaseEngine()
    engine.acquire("a", A, now_ms=0, ttl_ms=MIN)
    engine.acquire("b", B, now_ms=0, ttl_ms=2 * MIN)
    assert engine.next_expiry_ms() == MIN
    assert [lease.resource for lease in engine.expire(MIN)] == ["a"]
    assert engine.next_expiry_ms() == 2 * MIN


RESOURCES = ["wo-1", "wo-2"]
AGENTS = [bytes([n]) * 32 for n in range(1, 4)]


class LeaseSafety(RuleBasedStateMachine):
    """Random interleavings of claims, renewals, releases, crashes, clock advances and
    restarts (a fresh engine folding the same requests), checked against the rules."""

    def __init__(self) -> None:
        super().__init__()
        self.engine = LeaseEngine(bounds=TtlBounds(min_ms=1_000, max_ms=10_000))
        self.now = 0
        self.log: list[tuple[str, tuple[Any, ...]]] = []
        self.held: dict[bytes, dict[str, int]] = {agent: {} for agent in AGENTS}  # tokens
        self.crashed: set[bytes] = set()
        self.last_token: dict[str, int] = {}
        self.valid_until: dict[str, int] = {}  # when the last granted lease stops counting

    def _apply(self, op: str, *args: Any) -> Any:
        self.log.append((op, args))
        return getattr(self.engine, op)(*args)

    @rule(
        resource=st.sampled_from(RESOURCES),
        agent=st.sampled_from(AGENTS),
        ttl=st.integers(500, 12_000),
    )
    def claim(self, resource: str, agent: bytes, ttl: int) -> None:
        if agent in self.crashed:
            return
        outcome = self._apply("acquire", resource, agent, self.now, ttl)
        if isinstance(outcome, Granted):
            # Exclusivity: the previous lease no longer counted when this one began.
            assert self.valid_until.get(resource, 0) <= self.now
            token = outcome.lease.token
            assert token > self.last_token.get(resource, 0)  # tokens strictly increase
            self.last_token[resource] = token
            self.valid_until[resource] = outcome.lease.expires_ms
            for tokens in self.held.values():
                tokens.pop(resource, None)
            self.held[agent][resource] = token
        else:
            assert isinstance(outcome, Refused)
            if outcome.refusal is Refusal.HELD:
                assert outcome.holder is not None and outcome.holder.valid_at(self.now)

    @rule(resource=st.sampled_from(RESOURCES), agent=st.sampled_from(AGENTS))
    def renew(self, resource: str, agent: bytes) -> None:
        token = self.held[agent].get(resource)
        if token is None or agent in self.crashed:
            return
        outcome = self._apply("renew", resource, agent, token, self.now, 5_000)
        if isinstance(outcome, Granted):
            assert self.now < self.valid_until[resource]  # only a valid lease renews
            self.valid_until[resource] = outcome.lease.expires_ms

    @rule(resource=st.sampled_from(RESOURCES), agent=st.sampled_from(AGENTS))
    def release(self, resource: str, agent: bytes) -> None:
        token = self.held[agent].get(resource)
        if token is None or agent in self.crashed:
            return
        outcome = self._apply("release", resource, agent, token, self.now)
        if isinstance(outcome, Released):
            self.valid_until[resource] = self.now
            del self.held[agent][resource]

    @rule(agent=st.sampled_from(AGENTS))
    def crash(self, agent: bytes) -> None:
        self.crashed.add(agent)  # it stops renewing; its leases must run out

    @rule(ms=st.integers(0, 6_000))
    def advance(self, ms: int) -> None:
        self.now += ms
        for lease in self._apply("expire", self.now):
            assert lease.expires_ms <= self.now

    @rule()
    def restart(self) -> None:
        replayed = LeaseEngine(bounds=self.engine.bounds)
        for op, args in self.log:
            getattr(replayed, op)(*args)
        assert replayed.leases == self.engine.leases  # fold(log) after restart
        assert replayed.tokens == self.engine.tokens
        self.engine = replayed

    @invariant()
    def at_most_one_valid_holder_and_dead_holders_lapse(self) -> None:
        for resource in RESOURCES:
            lease = self.engine.holder(resource, self.now)
            if lease is not None:
                assert lease.expires_ms == self.valid_until[resource]
                # A crashed holder's lease lapses within one TTL bound of its last renewal.
                assert lease.expires_ms - self.now <= self.engine.bounds.max_ms
            stale_holders = [
                agent
                for agent, tokens in self.held.items()
                if resource in tokens
                and self.engine.check(resource, agent, tokens[resource], self.now) is None
            ]
            assert len(stale_holders) <= 1


TestLeaseSafety = LeaseSafety.TestCase
TestLeaseSafety.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None, derandomize=True
)
