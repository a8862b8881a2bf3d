"""The SDK's work ledger over a real relay: the workledger loop, refusals, hold()."""

from __future__ import annotations

import pytest
import trio

from agent_sdk.client import RelayClient
from agent_sdk.ledger import Claim, LeaseLost, Ledger, LedgerRefusal
from tests.conftest import RunningRelay, identity

NS = "work@local"


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


async def test_hold_stops_the_body_when_the_lease_is_lost(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        ledger = Ledger(client, NS)
        order = await ledger.create("fragile")
        reached_end = False
        with pytest.raises(LeaseLost):
            async with ledger.hold(order, ttl_ms=1_000) as claim:
                # Someone else ends our lease behind hold()'s back (here: with our key
                # and token through another ledger object), as a takeover would.
                await Ledger(client, NS).release(claim)
                await trio.sleep_forever()  # the next renewal fails and stops us here
                reached_end = True
        assert not reached_end


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
