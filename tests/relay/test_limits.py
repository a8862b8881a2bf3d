"""Rate limits and connection caps: the buckets alone, then a relay in virtual time
(in-memory streams, trio's MockClock) where one key floods and another does not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from websockets.exceptions import ConnectionClosed

from agent_sdk.client import RelayClient
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.identity import Identity
from relay.limits import Limiter, RateLimits, TokenBucket
from relay.node import RelayConfig, RelayNode
from relay.server import serve_relay
from relay.store.memory import MemoryStore
from simulations.memnet import MemoryListener
from tests.conftest import identity

FLOODER, CALM = identity(1), identity(2)


def test_a_bucket_spends_its_burst_then_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=3.0, tokens=3.0, stamp=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.1)  # one token comes every 0.1 s
    assert bucket.take(0.1) == 0.0
    assert bucket.take(5.0) == 0.0 and bucket.tokens == pytest.approx(2.0)  # capped at burst


def test_connections_are_capped_per_key_and_per_address() -> None:
    limiter = Limiter(RateLimits(connections_per_key=2, connections_per_address=3))
    a, b = b"a" * 32, b"b" * 32
    assert limiter.connect(a, "10.0.0.1") is None and limiter.connect(a, "10.0.0.1") is None
    refused = limiter.connect(a, "10.0.0.2")
    assert refused is not None and refused.code is ErrorCode.TOO_MANY_CONNECTIONS
    assert limiter.connect(b, "10.0.0.1") is None
    over = limiter.connect(b, "10.0.0.1")  # b has one; the address has three
    assert over is not None and "address" in over.reason
    limiter.disconnect(a, "10.0.0.1")
    assert limiter.connect(b, "10.0.0.1") is None  # room again


@asynccontextmanager
async def virtual_relay(limits: RateLimits) -> AsyncIterator[MemoryListener]:
    node = RelayNode(identity(9), MemoryStore(), RelayConfig(rate_limits=limits))
    listener = MemoryListener("limits")
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        await nursery.start(
            lambda task_status: serve_relay(node, listeners=[listener], task_status=task_status)
        )
        yield listener
        nursery.cancel_scope.cancel()


def connect(listener: MemoryListener, who: Identity) -> RelayClient:
    return RelayClient.connect(  # type: ignore[return-value]
        "ws://limits.sim/", who, dial=listener.dial, reconnect=False
    )


async def test_a_flood_is_refused_while_another_key_goes_on_and_it_recovers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = RateLimits(publish_rate=10.0, publish_burst=5)
    async with virtual_relay(limits) as listener:
        flooder_client, calm_client = connect(listener, FLOODER), connect(listener, CALM)
        async with flooder_client as flooder, calm_client as calm:
            outcomes: list[str] = []

            async def one(n: int) -> None:
                try:
                    await flooder.publish("x@local", "app.note", n)
                    outcomes.append("ok")
                except ProtocolError as exc:
                    assert exc.code is ErrorCode.RATE_LIMITED and "try again in" in exc.reason
                    outcomes.append("limited")

            async with trio.open_nursery() as nursery:
                for n in range(20):  # all at one instant: the burst, then refusals
                    nursery.start_soon(one, n)
            assert outcomes.count("ok") == 5 and outcomes.count("limited") == 15
            for n in range(5):  # another key has its own bucket
                await calm.publish("x@local", "app.note", f"calm {n}")
            await trio.sleep(0.5)  # virtual: five tokens come back
            for n in range(5):
                await flooder.publish("x@local", "app.note", f"again {n}")
            with pytest.raises(ProtocolError) as again:
                await flooder.publish("x@local", "app.note", "one too many")
            assert again.value.code is ErrorCode.RATE_LIMITED
            count = await calm.query("x@local", "dir.count", {"online": False})
            assert count == {"count": 0}  # queries have their own bucket


async def test_a_connection_over_the_per_key_cap_is_closed_with_its_reason(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with virtual_relay(RateLimits(connections_per_key=2)) as listener:
        async with connect(listener, FLOODER), connect(listener, FLOODER):
            with pytest.raises(ConnectionClosed) as closed:
                async with connect(listener, FLOODER):
                    pass
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.reason.startswith("5005 too_many_connections")
        async with connect(listener, FLOODER) as third:  # the first two are gone: room
            await third.publish("x@local", "app.note", "fits now")
