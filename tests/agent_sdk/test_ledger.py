"""The SDK's work ledger over a real relay: the workledger loop, refusals, hold()."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from agent_sdk.client import Delivery, RelayClient
from agent_sdk.errors import ErrorCode, ProtocolError, as_told
from agent_sdk.ledger import Claim, LeaseLost, Ledger, LedgerRefusal
from agent_sdk.wire import SignedEvent
from relay.limits import RateLimits
from relay.node import RelayConfig
from relay.sequencer import Limits
from tests.agent_sdk.cuttable import Wire, dialer
from tests.conftest import RunningRelay, identity, start_relay

NS = "work@local"
TIMEOUT = 10.0  # seconds: a test that waits on something that never comes fails


async def test_the_workledger_loop_through_the_sdk(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, identity(1)) as alice_client,
        RelayClient.connect(relay.url, identity(2)) as bob_client,
    ):
        alice, bob = Ledger(alice_client, NS), Ledger(bob_client, NS)
        low = await alice.create("tidy", priority=1)
        high = await alice.create("fix the parser", acceptance=["tests pass"], priority=5)
        claim = await bob.next(ttl_ms=60_000)
        assert claim.order == high and claim.token == 1
        with pytest.raises(LedgerRefusal) as info:
            await alice.claim(high)
        assert info.value.problem == "held"
        assert info.value.holder is not None
        assert info.value.holder["holder"] == bob_client.identity.public_key
        await bob.note(claim, "found it")
        claim = await bob.renew(claim, ttl_ms=60_000)
        await bob.update(claim, "done")
        with pytest.raises(LedgerRefusal) as info:
            await bob.update(claim, "done")  # done is final
        assert info.value.problem == "bad_transition"
        assert (await alice.next()).order == low


async def test_hold_renews_exposes_the_token_and_releases(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        ledger = Ledger(client, NS)
        order = await ledger.create("held work")
        async with ledger.hold(order, ttl_ms=60_000) as claim:
            assert isinstance(claim, Claim) and claim.token == 1
            with pytest.raises(LedgerRefusal):
                await Ledger(client, NS).claim(order)  # held, even by the same agent
        again = await ledger.claim(order)  # released on exit
        assert again.token == 2


async def test_hold_releases_on_exit_even_when_rate_limited(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The key spent its publishes in the body: the release is refused rate_limited,
    and is sent again after the wait the relay names, not given up on (which left
    the order held by nobody until its lease ran out)."""
    limits = RateLimits(publish_rate=5.0, publish_burst=3)
    relay = await start_relay(nursery, tmp_path / "relay", RelayConfig(rate_limits=limits))
    async with RelayClient.connect(relay.url, identity(1)) as client:
        ledger = Ledger(client, NS)
        order = await ledger.create("held work")
        async with ledger.hold(order, ttl_ms=600_000):
            with pytest.raises(ProtocolError) as spent:
                while True:
                    await client.publish(NS, "app.note", "busy")
            assert spent.value.code is ErrorCode.RATE_LIMITED  # the release will be too
        assert (await ledger.show(order))["status"] == "open"  # released on exit


async def test_a_rate_limited_send_waits_as_told_but_never_past_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sent: list[float] = []

    async def refused_once() -> str:
        sent.append(trio.current_time())
        if len(sent) == 1:
            raise ProtocolError(ErrorCode.RATE_LIMITED, "over 1 ...; try again in 500 ms")
        return "released"

    with trio.move_on_after(30):
        assert await as_told(refused_once) == "released"
    assert sent[1] - sent[0] >= 0.5  # after the wait named

    async def refused_for_a_minute() -> str:
        sent.append(trio.current_time())
        raise ProtocolError(ErrorCode.RATE_LIMITED, "over 1 ...; try again in 60000 ms")

    sent.clear()
    with trio.move_on_after(30), pytest.raises(ProtocolError):
        await as_told(refused_for_a_minute)  # no use waiting past the deadline: at once
    assert len(sent) == 1 and trio.current_time() == sent[0]


async def test_hold_stops_the_body_when_the_lease_is_lost(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        ledger = Ledger(client, NS)
        order = await ledger.create("fragile")
        # (A bound: a body not stopped would sleep for ever, and fail the test here.)
        with trio.fail_after(TIMEOUT), pytest.raises(LeaseLost):
            async with ledger.hold(order, ttl_ms=1_000) as claim:
                # Someone else ends our lease behind hold()'s back (here: with our key
                # and token through another ledger object), as a takeover would.
                await Ledger(client, NS).release(claim)
                await trio.sleep_forever()  # the next renewal fails and stops us here


async def test_hold_lets_the_body_finish_the_order_and_raises_its_errors(
    relay: RunningRelay,
) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        ledger = Ledger(client, NS)
        order = await ledger.create("finish me")
        async with ledger.hold(order, ttl_ms=1_000) as claim:
            await ledger.update(claim, "done")
            with trio.fail_after(5):  # a bound; the renewals stop on their own
                await ledger.note(order, "wrapping up after done")
        assert not ledger._ended  # kept while its hold ran, not for the agent's life
        with pytest.raises(ValueError, match="plain"):
            async with ledger.hold(await ledger.create("raises"), ttl_ms=60_000):
                raise ValueError("plain errors come out as themselves")


async def test_the_same_request_twice_in_one_millisecond_is_two_requests(
    relay: RunningRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a nonce, claim, release, claim within one clock tick would re-send the
    first claim's bytes, and the relay would answer with the first grant again."""
    import agent_sdk.client

    frozen = agent_sdk.client._now_ms()
    monkeypatch.setattr(agent_sdk.client, "_now_ms", lambda: frozen)
    async with (
        RelayClient.connect(relay.url, identity(1)) as one,
        RelayClient.connect(relay.url, identity(3)) as two,
    ):
        first, other = Ledger(one, NS), Ledger(two, NS)
        order = await first.create("t")
        claim = await first.claim(order)
        await first.release(claim)
        again = await first.claim(order)
        assert again.token == claim.token + 1  # a new grant, not the old answer
        with pytest.raises(LedgerRefusal) as info:
            await other.claim(order)
        assert info.value.problem == "held"


FORGETFUL = RelayConfig(sequencer=Limits(known_capacity=2))
"""A relay that sends with an ack only the outcomes of its last two requests."""


async def test_a_claim_granted_before_the_connection_was_lost_is_held(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The relay grants the claim; its ack is lost with the connection; by the time the
    client sends the claim again, later requests have pushed its outcome out of those
    the relay remembers. The duplicate's ack came without it, and that was taken for a
    refusal ("no_outcome"): hold raised, and the order stayed claimed by an agent that
    had given it up, until its lease ran out."""
    relay = await start_relay(nursery, tmp_path / "relay", FORGETFUL)
    wires: list[Wire] = []
    async with (
        RelayClient.connect(relay.url, identity(1), dial=dialer(relay, wires)) as client,
        RelayClient.connect(relay.url, identity(2)) as other_client,
        other_client.subscribe(NS, kinds=["wo.claimed"]) as granted,
        trio.open_nursery() as background,
    ):
        ledger, other = Ledger(client, NS), Ledger(other_client, NS)
        order = await ledger.create("t")

        async def lose_the_grant() -> None:
            async for item in granted:
                if isinstance(item, Delivery):
                    break
            for n in range(3):  # three outcomes since: the claim's is forgotten
                await other.create(f"other {n}")
            await wires[0].cut()

        wires[0].held = True  # the claim's ack never reaches the client
        background.start_soon(lose_the_grant)
        with trio.fail_after(TIMEOUT):
            async with ledger.hold(order, ttl_ms=600_000) as claim:
                assert client.connections == 2  # answered after the reconnect
                assert claim.token == 1  # the grant, as the relay decided it
                assert (await other.show(order))["holder"] == client.identity.public_key
            assert (await other.show(order))["status"] == "open"  # released on exit


async def test_the_same_request_asked_again_long_after_gets_its_first_outcome(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Asked again with the same nonce and ts (Ledger.request) after the relay forgot
    where its outcome is: the answer is the outcome decided the first time, a grant or
    a refusal, found in the log."""
    relay = await start_relay(nursery, tmp_path / "relay", FORGETFUL)
    async with (
        RelayClient.connect(relay.url, identity(1)) as client,
        RelayClient.connect(relay.url, identity(2)) as other_client,
    ):
        ledger, other = Ledger(client, NS), Ledger(other_client, NS)
        order = await ledger.create("t")
        mine = (client.nonce(), client.clock_ms())
        theirs = (other_client.nonce(), other_client.clock_ms())

        async def ask(ledger: Ledger, nonce_ts: tuple[bytes, int]) -> dict[str, Any]:
            nonce, ts = nonce_ts
            return await ledger.request("wo.claim", {"wo": order}, nonce=nonce, ts=ts)

        granted = await ask(ledger, mine)
        with pytest.raises(LedgerRefusal, match="held"):
            await ask(other, theirs)
        for n in range(3):  # three outcomes since: the relay forgets those two
            await other.create(f"other {n}")
        assert await ask(ledger, mine) == granted
        with pytest.raises(LedgerRefusal) as refused:
            await ask(other, theirs)
        assert refused.value.problem == "held"
        assert relay.node.head(NS) == 2 * 6  # six requests, each once, with its outcome


class _BundlingLink:
    """A relay link that decides with the real coordination core and answers in
    bundles (several acks in one message, as a busy relay sends them), optionally
    holding its first ``late`` answers back for ``delay`` seconds. The same request
    asked again (the same nonce and ts) gets the outcome it was given the first time,
    as from a relay (idempotence)."""

    def __init__(self, late: int = 0, delay: float = 0.0) -> None:
        from relay.coordination.requests import Coordinator

        self.core = Coordinator()
        self.identity = identity(1)
        self.late, self.delay = late, delay
        self.asked = 0
        self.decided: dict[tuple[str, bytes | None, int | None], Any] = {}
        self.waiting: list[trio.Event] = []
        self.stopped = trio.Event()
        self.room = trio.Event()
        self.room.set()
        self.forgetful = False
        """Ack without the outcome, as a relay acks an old duplicate (a request sent
        again after the connection was lost), and never deliver it from the log, as
        when the relay that sequenced it is out of reach."""
        self.unreadable = False
        """Refuse to read the log (``forbidden``), as to a key that may not read it."""
        self.forgets = 0
        """Acks still to come without the outcome, as ``forgetful``; after them, the
        same request asked again is acked with it (as by a relay that found it)."""
        self.overtaken: str | None = None
        """The kind of the next request to be overtaken on its way out: it is decided
        only after the request sent next is (both waited for room among the publishes
        in flight, and the later one was let out first)."""
        self._overtaking: trio.Event | None = None
        self.refused: list[str] = []
        """The kinds of the requests refused, in the order decided."""

    @asynccontextmanager
    async def subscribe(self, ns: str, **filters: Any) -> AsyncIterator[Any]:
        class Nothing:
            def __aiter__(self) -> Nothing:
                return self

            async def __anext__(self) -> Any:
                await trio.sleep_forever()

        if self.unreadable:
            raise ProtocolError(ErrorCode.FORBIDDEN, f"this key may not read {ns}")
        yield Nothing()

    def nonce(self) -> bytes:
        self.asked += 1
        return self.asked.to_bytes(16, "big")

    def clock_ms(self) -> int:
        return 1_000_000 + int(trio.current_time() * 1000)

    async def publish(
        self,
        ns: str,
        kind: str,
        body: Any,
        *,
        nonce: bytes | None = None,
        ts: int | None = None,
        on_sent: Callable[[Any], None] | None = None,
    ) -> Any:
        await self.room.wait()  # (as a client waits for room among publishes in flight)
        if kind == self.overtaken:
            self.overtaken, self._overtaking = None, trio.Event()
            await self._overtaking.wait()
        key = (kind, nonce, ts)
        if key not in self.decided:
            request = len(self.decided).to_bytes(32, "big")
            author = self.identity.public_key
            outcome = self.core.decide(kind, body, author, request, self.clock_ms())
            self.decided[key] = outcome
            if outcome is not None and outcome.kind.endswith(".rejected"):
                self.refused.append(kind)
        if self._overtaking is not None:  # the request it waited for is decided
            self._overtaking.set()
            self._overtaking = None
        outcome = None if self.forgetful or self.forgets > 0 else self.decided[key]
        self.forgets = max(self.forgets - 1, 0)
        answer = _Answer(outcome, trio.current_time(), nonce, ts)
        self.waiting.append(answer.answered)
        if self.late > 0:
            self.late -= 1
            answer.not_before += self.delay
        if on_sent is not None:
            on_sent(answer)
        return await answer.wait()

    def publish_later(self, signed: SignedEvent) -> None:
        """Sent, its answer not waited for: decided now, in the order of the calls."""
        event = signed.event
        self.core.decide(event.kind, event.body, event.author, signed.id, self.clock_ms())

    async def answer_in_bundles(self) -> None:
        while True:
            await trio.sleep(0.3)
            bundle, self.waiting = self.waiting, []
            for answered in bundle:
                answered.set()  # one message: no checkpoint between its acks


class _Answer:
    """A publish's handle on a :class:`_BundlingLink`: its answer comes with the next
    bundle, and not before ``not_before``, whether anyone waits for it or not."""

    def __init__(self, outcome: Any, not_before: float, nonce: bytes | None, ts: int) -> None:
        self.outcome = outcome  # None: acked without it
        self.not_before = not_before
        self.answered = trio.Event()
        self.event = SimpleNamespace(event=SimpleNamespace(nonce=nonce, ts=ts))

    async def wait(self) -> Any:
        await trio.sleep_until(self.not_before)
        await self.answered.wait()
        receipt = SimpleNamespace(ns=NS, seq=1, relay=b"relay", id=b"request")
        if self.outcome is None:
            return SimpleNamespace(outcome=None, receipt=receipt, duplicate=True)
        event = SimpleNamespace(kind=self.outcome.kind, body=self.outcome.body)
        outcome = SimpleNamespace(event=SimpleNamespace(event=event))
        return SimpleNamespace(outcome=outcome, receipt=receipt, duplicate=False)


@asynccontextmanager
async def bundled() -> AsyncIterator[tuple[_BundlingLink, Ledger]]:
    """A Ledger on a :class:`_BundlingLink` that answers while the block runs."""
    link = _BundlingLink()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.answer_in_bundles)
        yield link, Ledger(link, NS)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("seed", range(12))
async def test_a_renewal_refused_because_the_body_finished_is_no_lost_lease(
    seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    """A renewal on its way is overtaken by the body's `done`: the relay decides the
    done first, and refuses the renewal (the order is done); both are answered in one
    bundle. Whichever task trio wakes first, the body finished the order: hold must
    not cancel it and raise LeaseLost."""
    trio._core._run._r.seed(seed)  # trio shuffles wake-ups: each seed is one order
    async with bundled() as (link, ledger):
        order = await ledger.create("t")
        async with ledger.hold(order, ttl_ms=3_000) as claim:
            link.overtaken = "wo.renew"  # due 1 s after the claim was asked; it waits
            await trio.sleep(1.65)  # (until the done below is decided)
            await ledger.update(claim, "done")
            await trio.sleep(0.01)  # (the renewal's refusal is read by now)
    assert link.refused == ["wo.renew"]  # the refusal the hold had to take for no loss
    assert link.core.ledger.orders[order].status.value == "done"


async def test_a_done_whose_caller_was_cancelled_is_no_lost_lease(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The body's `done` is sent, then its caller is cancelled before the answer; the
    relay applies it, and the next renewal is refused (the order is done). The body
    finished the order: hold must not cancel it and raise LeaseLost."""
    async with bundled() as (link, ledger):
        order = await ledger.create("t")
        async with ledger.hold(order, ttl_ms=3_000) as claim:
            with trio.move_on_after(0.1):  # sent and decided; answered with the next bundle
                await ledger.update(claim, "done")
            await trio.sleep(2)  # the renewal, due at 1 s, is refused: the order is done
        assert not ledger._unread  # nothing kept past the hold
    assert link.core.ledger.orders[order].status.value == "done"


async def test_a_done_cancelled_before_it_was_sent_ended_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cancelled while it waited to be sent, the `done` never reached the relay: the
    claim is still held, renewed, and released on exit."""
    async with bundled() as (link, ledger):
        order = await ledger.create("t")
        async with ledger.hold(order, ttl_ms=3_000) as claim:
            link.room = trio.Event()  # no room to send it
            with trio.move_on_after(0.1):
                await ledger.update(claim, "done")
            link.room.set()
            await trio.sleep(10)  # several renewals, each granted
            assert link.core.ledger.orders[order].status.value == "claimed"
    assert link.core.ledger.orders[order].status.value == "open"  # released on exit


async def test_a_refused_end_whose_caller_was_cancelled_leaves_the_claim_held(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The body's end is refused, and answered long after its caller was cancelled.
    The renewals sent meanwhile are granted (the end ended nothing): the claim stays
    held and renewed, not given up while that answer is awaited."""
    async with bundled() as (link, ledger):
        order = await ledger.create("t")
        async with ledger.hold(order, ttl_ms=3_000) as claim:
            link.late, link.delay = 1, 30.0  # refused (no such status), answered at 30 s
            with trio.move_on_after(0.1):
                await ledger.update(claim, "finished")
            await trio.sleep(10)  # several renewals, each granted
            assert link.core.ledger.orders[order].status.value == "claimed"
    assert link.core.ledger.orders[order].status.value == "open"  # released on exit


async def test_an_end_answered_too_late_does_not_keep_the_body_past_its_lease(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One task of the body ends the claim, and the answer is slow to come (it is
    refused in the end); another task works on. The renewal waited for that answer
    before it renewed, with no deadline: the lease lapsed with the body still running.
    It is stopped before the lease can lapse, with the margin hold keeps (a tenth of
    the TTL, keep_renewed), by the relay's own clock."""
    ttl_ms = 3_000
    async with bundled() as (link, ledger):
        order = await ledger.create("t")
        stopped_ms = None
        with pytest.raises(LeaseLost, match="lease was lost"):
            async with ledger.hold(order, ttl_ms=ttl_ms) as claim:
                link.late, link.delay = 1, 30.0  # refused (no such status), answered at 30 s

                async def finish() -> None:
                    with suppress(LedgerRefusal):
                        await ledger.update(claim, "finished")

                async with trio.open_nursery() as body:
                    body.start_soon(finish)
                    try:
                        await trio.sleep_forever()  # working on
                    finally:
                        stopped_ms = link.clock_ms()  # the relay's time
        # The lease the relay granted (never renewed: the renewal waited for the end's
        # answer) lapses at claim.expires_ms; the body was stopped a margin before it
        # (1 ms: the relay's clock counts whole milliseconds).
        assert stopped_ms is not None
        assert stopped_ms <= claim.expires_ms - ttl_ms // 10 + 1
        assert "wo.renew" not in {kind for kind, _, _ in link.decided}


async def test_a_claim_whose_outcome_cannot_be_read_is_unknown_not_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The relay grants the claim, but acks it without its outcome (an old duplicate)
    and the log never delivers it: claim() waited for ever. It gives up after
    CLAIM_TIMEOUT with OutcomeUnknown (not a refusal: the claim is granted), naming the
    nonce and ts that ask for the same request again."""
    from agent_sdk.ledger import CLAIM_TIMEOUT, OutcomeUnknown

    async with bundled() as (link, ledger):
        order = await ledger.create("t")
        link.forgetful = True
        with trio.fail_after(CLAIM_TIMEOUT + 5), pytest.raises(OutcomeUnknown) as unknown:
            await ledger.claim(order)
        assert link.core.ledger.orders[order].status.value == "claimed"
        link.forgetful = False
        nonce, ts = unknown.value.nonce, unknown.value.ts
        again = await ledger.request("wo.claim", {"wo": order}, nonce=nonce, ts=ts)
        assert again["token"] == 1  # the same request: its grant


async def test_a_claim_whose_outcome_this_key_may_not_read_is_unknown_not_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Acked without its outcome, and the log may not be read: not the ``forbidden``
    of the log read (a ProtocolError, as for a publish refused), but OutcomeUnknown."""
    from agent_sdk.ledger import OutcomeUnknown

    async with bundled() as (link, ledger):
        order = await ledger.create("t")
        link.forgetful = link.unreadable = True
        with pytest.raises(OutcomeUnknown, match="may not read"):
            await ledger.claim(order)


async def test_a_hold_whose_claim_outcome_cannot_be_read_does_not_run_its_body(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with bundled() as (link, ledger):
        order = await ledger.create("t")
        link.forgetful = True
        with pytest.raises(LeaseLost, match="no answer to the claim"):
            async with ledger.hold(order, ttl_ms=60_000):
                raise AssertionError("the body ran without a known claim")


async def test_a_claim_answered_too_late_is_given_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from agent_sdk.ledger import CLAIM_TIMEOUT

    async with bundled() as (link, ledger):
        order = await ledger.create("t")
        link.late, link.delay = 1, CLAIM_TIMEOUT + 1  # the relay grants it, then stalls
        with pytest.raises(LeaseLost, match="no answer to the claim"):
            async with ledger.hold(order, ttl_ms=3_600_000):
                raise AssertionError("the body ran without a claim")
    assert link.core.ledger.orders[order].status.value == "open"  # released, not held


async def test_a_renewal_given_up_on_is_followed_by_a_release(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The relay renews the lease but its answer comes too late: hold gives up (the
    lease might have lapsed), and must not leave the order held, for a whole TTL, by
    an agent that stopped working on it."""
    async with bundled() as (link, ledger):
        order = await ledger.create("t")
        with pytest.raises(LeaseLost, match="lease was lost"):
            async with ledger.hold(order, ttl_ms=3_000):
                link.late, link.delay = 1, 10.0  # the renewal: decided, answered late
                await trio.sleep_forever()
        assert link.core.ledger.orders[order].status.value == "open"  # given back


async def test_the_release_follows_also_when_the_body_ends_with_its_own_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with bundled() as (link, ledger):
        order = await ledger.create("t")
        with pytest.raises(RuntimeError, match="clean-up"):
            async with ledger.hold(order, ttl_ms=3_000):
                link.late, link.delay = 1, 10.0
                try:
                    await trio.sleep_forever()
                finally:  # cancelled by the lost lease, the body's clean-up fails
                    raise RuntimeError("clean-up failed")
        assert link.core.ledger.orders[order].status.value == "open"


async def test_a_lock_renewal_given_up_on_is_followed_by_a_release(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from agent_sdk.election import hold_lock

    async with bundled() as (link, ledger):
        with pytest.raises(LeaseLost, match="lease was lost"):
            async with hold_lock(ledger, "leader:sched", 3_000, wait=False):
                link.late, link.delay = 1, 10.0  # the renewal: decided, answered late
                await trio.sleep_forever()
        assert "leader:sched" not in link.core.locks.leases  # given back to the others


async def test_many_claims_ended_during_a_hold_leave_its_own_end_known(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The body finishes its order, then other claims of the same Ledger end. When the
    renewal is then refused (the order is done), hold must still know its body ended
    it: not a lost lease. (An earlier Ledger kept the latest 4,096 ends: more than
    that during one hold evicted its own.)"""
    import agent_sdk.ledger

    monkeypatch.setattr(agent_sdk.ledger, "ENDED_KEPT", 4, raising=False)  # (the old bound)
    async with bundled() as (_, ledger):
        order = await ledger.create("t")
        others = [await ledger.create(f"other {n}") for n in range(6)]
        async with ledger.hold(order, ttl_ms=30_000) as claim:
            await ledger.update(claim, "done")
            for other in others:
                await ledger.update(await ledger.claim(other), "done")
            await trio.sleep(12)  # the renewal, due at 10 s, is refused: the order is done
        assert not ledger._ended  # nothing kept past the hold


async def test_a_lock_granted_too_late_is_given_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from agent_sdk.election import CONFIRM_TIMEOUT, hold_lock

    async with bundled() as (link, ledger):
        link.late, link.delay = 1, CONFIRM_TIMEOUT + 1  # the relay grants it, then stalls
        with pytest.raises(LeaseLost, match="no answer to the acquire"):
            async with hold_lock(ledger, "leader:sched", 60_000, wait=False):
                raise AssertionError("the body ran without the lock")
        assert "leader:sched" not in link.core.locks.leases  # released, not held


async def test_a_hold_whose_claim_outcome_may_not_be_read_gives_back_the_grant(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The claim is granted, acked without its outcome, and the log may not be read:
    OutcomeUnknown came out of hold as it was, and the order stayed claimed by an
    agent that had given it up. As for a claim answered too late: the body does not
    run, the claim is asked for once more, its grant given back, and LeaseLost
    raised."""
    async with bundled() as (link, ledger):
        order = await ledger.create("t")
        link.forgets, link.unreadable = 1, True  # the claim's ack only
        with pytest.raises(LeaseLost, match=r"no answer to the claim.*may not be read"):
            async with ledger.hold(order, ttl_ms=3_600_000):
                raise AssertionError("the body ran without a known claim")
    assert link.core.ledger.orders[order].status.value == "open"  # released, not held


async def test_a_hold_whose_claim_outcome_stays_unknown_raises_lease_lost(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Asked again, the claim's outcome is still unknown: no token to release it
    with. LeaseLost all the same (the OutcomeUnknown of the second ask came out of
    hold before), and the order held until its lease runs out is logged."""
    async with bundled() as (link, ledger):
        order = await ledger.create("t")
        link.forgetful = link.unreadable = True
        with pytest.raises(LeaseLost, match="no answer to the claim"):
            async with ledger.hold(order, ttl_ms=60_000):
                raise AssertionError("the body ran without a known claim")
        assert link.core.ledger.orders[order].status.value == "claimed"  # until its TTL
        assert f"{order} may stay claimed until its lease runs out" in caplog.text


async def test_a_lock_whose_outcome_may_not_be_read_is_given_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from agent_sdk.election import hold_lock

    async with bundled() as (link, ledger):
        link.forgets, link.unreadable = 1, True  # the acquire's ack only
        with pytest.raises(LeaseLost, match=r"no answer to the acquire.*may not be read"):
            async with hold_lock(ledger, "leader:sched", 60_000, wait=False):
                raise AssertionError("the body ran without the lock")
        assert "leader:sched" not in link.core.locks.leases  # released, not held


async def test_a_renewal_whose_outcome_may_not_be_read_is_a_lost_lease(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A renewal acked without its outcome, the log unreadable, is not confirmed: the
    body is stopped with LeaseLost (not OutcomeUnknown), and the order given back."""
    async with bundled() as (link, ledger):
        order = await ledger.create("t")
        with pytest.raises(LeaseLost, match="lease was lost"):
            async with ledger.hold(order, ttl_ms=3_000):
                link.forgets, link.unreadable = 1, True  # the renewal's ack
                await trio.sleep_forever()
        assert link.core.ledger.orders[order].status.value == "open"  # given back


async def test_a_release_on_exit_whose_outcome_may_not_be_read_keeps_the_body_result(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The release on exit is acked without its outcome and the log may not be read:
    its OutcomeUnknown came out of hold in place of the body's own result or error."""
    async with bundled() as (link, ledger):
        order = await ledger.create("t")
        async with ledger.hold(order, ttl_ms=60_000):
            link.forgetful = link.unreadable = True
        assert link.core.ledger.orders[order].status.value == "open"  # released all the same
        link.forgetful = link.unreadable = False
        order = await ledger.create("t")
        with pytest.raises(ValueError, match="the body's own"):
            async with ledger.hold(order, ttl_ms=60_000):
                link.forgetful = link.unreadable = True
                raise ValueError("the body's own error")


async def test_a_lock_wait_with_a_bound_gives_up_with_the_last_refusal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``wait_at_most``: the lock is held past it, so hold_lock raises the `held`
    refusal of an ask made at the bound (not earlier, nor a TTL later), and the body
    never runs; released before the bound, the lock is taken."""
    from agent_sdk.election import hold_lock

    async with bundled() as (link, ledger):
        held = await ledger.lock("L", 600_000)  # held (by this agent: refused all the same)
        began = trio.current_time()
        with trio.fail_after(100), pytest.raises(LedgerRefusal) as refused:
            async with hold_lock(ledger, "L", 30_000, wait_at_most=25):
                raise AssertionError("the body ran without the lock")
        assert refused.value.problem == "held"
        assert trio.current_time() - began == pytest.approx(25, abs=0.5)  # virtual time
        assert link.core.locks.leases["L"].token == held.token  # untouched

        async def release_later() -> None:
            await trio.sleep(12)
            await ledger.unlock(held)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(release_later)
            began = trio.current_time()
            async with hold_lock(ledger, "L", 30_000, wait_at_most=25) as lock:
                assert lock.token > held.token
                taken = trio.current_time() - began
        assert 12 <= taken < 25
