"""Rate limits and connection caps: the buckets alone, then a relay in virtual time
(in-memory streams, trio's MockClock) where one key floods and another does not."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from websockets.exceptions import ConnectionClosed
from websockets.trio.client import connect as connect_ws

from agent_sdk.client import RelayClient
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.identity import Identity
from relay.limits import ErrorBudget, Limiter, RateLimits, TokenBucket, publish_cost
from relay.node import RelayConfig, RelayNode
from relay.server import serve_relay
from relay.store.memory import MemoryStore
from simulations.memnet import MemoryListener
from tests.conftest import identity, start_relay

FLOODER, CALM = identity(1), identity(2)


def test_a_bucket_spends_its_burst_then_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=3.0, tokens=3.0, stamp=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.1)  # one token comes every 0.1 s
    assert bucket.take(0.05) == pytest.approx(0.05)  # half of one came: not yet
    assert bucket.take(0.1) == 0.0
    assert bucket.take(5.0) == 0.0 and bucket.tokens == pytest.approx(2.0)  # capped at burst


def test_an_error_budget_is_earned_by_bytes_and_by_time_up_to_its_allowance() -> None:
    budget = ErrorBudget.full(allowance=100, refill=10, now=0.0)
    assert budget.spend(60, 0.0) and budget.spend(40, 0.0)  # the allowance, all of it
    assert not budget.spend(1, 0.0) and budget.overdrawn  # one byte more: over
    budget = ErrorBudget.full(allowance=100, refill=10, now=0.0)
    assert budget.spend(100, 0.0)
    assert budget.spend(50, 5.0)  # five seconds earned 50
    assert budget.spend(100, 100.0) and not budget.spend(1, 100.0)  # time: up to 100 only
    budget.earn(500, 100.0)  # bytes the connection sent earn without a cap
    assert budget.spend(499, 100.0) and budget.credit == 0
    budget.earn(300, 100.0)
    assert budget.spend(0, 200.0) and budget.credit == 300  # time never takes any away
    # What time earned while the budget was low is not lost to bytes that come after.
    budget = ErrorBudget.full(allowance=100, refill=10, now=0.0)
    assert budget.spend(100, 0.0)
    budget.earn(101, 10.0)  # 100 earned by time by then, and 101 by bytes
    assert budget.spend(201, 10.0) and not budget.spend(1, 10.0)


def test_connections_are_capped_per_key_and_per_address() -> None:
    limiter = Limiter(RateLimits(connections_per_key=2, connections_per_address=3))
    a = b"a" * 32
    assert limiter.connect(a) is None and limiter.connect(a) is None
    refused = limiter.connect(a)
    assert refused is not None and refused.code is ErrorCode.TOO_MANY_CONNECTIONS
    assert "key" in refused.reason
    limiter.disconnect(a)
    assert limiter.connect(a) is None  # room again
    assert all(limiter.open("10.0.0.1") is None for _ in range(3))
    over = limiter.open("10.0.0.1")
    assert over is not None and "address" in over.reason
    assert limiter.open("10.0.0.2") is None  # another address has its own count
    limiter.close("10.0.0.1")
    assert limiter.open("10.0.0.1") is None


def test_behind_a_trusted_proxy_the_client_is_the_last_untrusted_hop() -> None:
    limiter = Limiter(RateLimits(trusted_proxies=frozenset({"10.9.0.1", "10.9.0.2"})))
    assert limiter.client_address("203.0.113.5", ["6.6.6.6"]) == "203.0.113.5"  # not a proxy
    assert limiter.client_address("10.9.0.1", ["198.51.100.7"]) == "198.51.100.7"
    # A client's own claim sits further left: the proxies' view of it is right-most.
    spoofed = ["1.2.3.4, 198.51.100.7, 10.9.0.2"]
    assert limiter.client_address("10.9.0.1", spoofed) == "198.51.100.7"
    assert limiter.client_address("10.9.0.1", []) == "10.9.0.1"  # says nothing: the proxy


@asynccontextmanager
async def virtual_node(limits: RateLimits) -> AsyncIterator[tuple[RelayNode, MemoryListener]]:
    node = RelayNode(identity(9), MemoryStore(), RelayConfig(rate_limits=limits))
    listener = MemoryListener("limits")
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        await nursery.start(
            lambda task_status: serve_relay(node, listeners=[listener], task_status=task_status)
        )
        yield node, listener
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def virtual_relay(limits: RateLimits) -> AsyncIterator[MemoryListener]:
    async with virtual_node(limits) as (_, listener):
        yield listener


def connect(listener: MemoryListener, who: Identity) -> RelayClient:
    return RelayClient.connect(  # type: ignore[return-value]
        "ws://limits.sim/", who, dial=listener.dial, reconnect=False
    )


def test_a_large_event_costs_a_token_per_started_16_kib() -> None:
    """A document update pycrdt must decode costs milliseconds per 256 KiB: a large
    publish must not cost what a small one does."""
    assert [publish_cost(n) for n in (0, 1, 16384, 16385, 262144)] == [1, 1, 1, 2, 16]
    bucket = TokenBucket(rate=10.0, burst=20.0, tokens=20.0, stamp=0.0)
    assert bucket.take(0.0, 16) == 0.0 and bucket.take(0.0, 16) == 0.0  # 4 left: one is enough
    assert bucket.tokens == pytest.approx(-12.0)  # in debt: what follows waits for it
    assert bucket.take(0.0) == pytest.approx(1.3) and bucket.tokens == pytest.approx(-12.0)
    assert bucket.take(1.3) == 0.0  # the average rate is kept
    # A costly publish is not starved by cheap ones keeping the bucket from filling.
    cheap = TokenBucket(rate=10.0, burst=20.0, tokens=0.0, stamp=0.0)
    assert cheap.take(0.1) == 0.0 and cheap.take(0.2, 16) == 0.0
    limiter = Limiter(RateLimits(publish_rate=10.0, publish_burst=5))
    assert limiter.take(b"k" * 32, "publish", 0.0, 16) == 0.0  # at most a burst in debt
    assert limiter.take(b"k" * 32, "publish", 0.0, 1) == pytest.approx(0.1)


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
            # Told to try again in N ms, the flooder gets through once it has waited N.
            with pytest.raises(ProtocolError) as told:
                await flooder.publish("x@local", "app.note", "not yet")
            wait_ms = int(told.value.reason.rpartition("try again in ")[2].removesuffix(" ms"))
            await trio.sleep(wait_ms / 1000)  # virtual
            await flooder.publish("x@local", "app.note", "as told")
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


async def test_a_flood_that_slips_in_a_frame_now_and_then_is_still_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = RateLimits(publish_rate=10.0, publish_burst=1)
    cycles = 0
    async with virtual_relay(limits) as listener:
        with pytest.raises(ConnectionClosed) as closed:
            async with connect(listener, FLOODER) as flooder:

                async def one(n: int) -> None:
                    with contextlib.suppress(ProtocolError):  # 5004: the flood goes on
                        await flooder.publish("x@local", "app.note", n)

                for cycle in range(8):
                    await trio.sleep(0.1)  # virtual: a token comes back...
                    await flooder.publish("x@local", "app.note", f"let through {cycle}")
                    cycles += 1
                    async with trio.open_nursery() as nursery:
                        for n in range(199):  # ...and then 199 are refused
                            nursery.start_soon(one, 200 * cycle + n)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.reason.startswith("5004 rate_limited: too many refusals")
        assert cycles == 2  # 199 refused, one off, then 58 more: over 256


async def test_every_request_takes_a_token_from_the_request_bucket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """query, subscribe, doc.open and msg.send share one bucket per key (protocol 9,
    5004): once the burst is spent each is refused with 5004 and the wait, and
    publishing, with its own bucket, goes on."""
    limits = RateLimits(request_rate=1.0, request_burst=1)
    async with (
        virtual_relay(limits) as listener,
        connect(listener, FLOODER) as asker,
        connect(listener, CALM) as calm,
    ):
        await calm.publish("x@local", "doc.create", {"doc": "d"})
        await asker.query("x@local", "dir.count", {})  # the one request of the burst

        async def subscribe() -> None:
            async with asker.subscribe("x@local") as feed:
                await feed.__anext__()

        async def open_doc() -> None:
            async with asker.doc("x@local", "d", create=False):
                pass

        requests = {
            "subscribe": subscribe,
            "doc.open": open_doc,
            "msg.send": partial(asker.send, calm.identity.id, "hi", via="relay"),
            "query": partial(asker.query, "x@local", "dir.count", {}),
        }
        for name, request in requests.items():
            with pytest.raises(ProtocolError) as limited, trio.fail_after(0.5):  # virtual
                await request()
            assert limited.value.code is ErrorCode.RATE_LIMITED, (name, limited.value)
            assert "try again in" in limited.value.reason
        await asker.publish("x@local", "app.note", "publishes have their own bucket")
        await trio.sleep(1)  # virtual: one request token back
        await subscribe()


async def test_256_refusals_are_answered_and_the_next_one_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """More than 256 refusals close the connection (protocol 9): 256 do not."""
    limits = RateLimits(publish_rate=10.0, publish_burst=1)
    served = False
    async with virtual_relay(limits) as listener:
        with pytest.raises(ConnectionClosed) as closed:
            async with connect(listener, FLOODER) as flooder:
                refusals = 0

                async def refused_one(n: int) -> None:
                    nonlocal refusals
                    with pytest.raises(ProtocolError) as limited:
                        await flooder.publish("x@local", "app.note", n)
                    assert limited.value.code is ErrorCode.RATE_LIMITED
                    refusals += 1

                await flooder.publish("x@local", "app.note", "the burst")
                async with trio.open_nursery() as nursery:
                    for n in range(256):
                        nursery.start_soon(refused_one, n)
                assert refusals == 256
                await trio.sleep(0.1)  # virtual: a token is back, and the connection open
                await flooder.publish("x@local", "app.note", "still served")  # one off: 255
                served = True

                async def over(n: int) -> None:
                    with contextlib.suppress(ProtocolError):  # 5004, then the close
                        await flooder.publish("x@local", "app.note", f"over {n}")

                async with trio.open_nursery() as nursery:
                    for n in range(2):  # 256, then 257: over
                        nursery.start_soon(over, n)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.reason.startswith("5004 rate_limited: too many refusals")
        assert served  # (closed after the 257th refusal, not before)


async def test_opening_the_inbox_waits_for_a_request_token(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Each opening of the inbox replays all of it, so it costs a request; it waits
    for one rather than being refused (a client knows only 3005 on its inbox)."""
    limits = RateLimits(request_rate=1.0, request_burst=1)
    async with (
        virtual_relay(limits) as listener,
        connect(listener, FLOODER) as reader,
        connect(listener, CALM) as sender,
    ):
        await reader.query("x@local", "dir.count", {})  # the one request of the burst
        await sender.send(reader.identity.id, "waits in the inbox", via="relay")
        began = trio.current_time()
        message = await reader.mailbox.next()
        assert message.body == "waits in the inbox"
        assert trio.current_time() - began >= 0.9  # virtual: the token came back first


async def test_a_connection_over_the_per_key_cap_is_closed_with_its_reason(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with virtual_node(RateLimits(connections_per_key=2)) as (node, listener):
        async with connect(listener, FLOODER), connect(listener, FLOODER):
            with pytest.raises(ConnectionClosed) as closed:
                async with connect(listener, FLOODER):
                    pass
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.reason.startswith("5005 too_many_connections")
            assert node.metrics.rate_limited["connections"] == 1  # GET /metrics counts it
        async with connect(listener, FLOODER) as third:  # the first two are gone: room
            await third.publish("x@local", "app.note", "fits now")


async def test_unauthenticated_connections_count_against_their_address(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Sockets that never authenticate (or a plain Yjs client) hold a slot of their
    address: a fourth is closed at once, and a slot freed is usable again."""
    relay = await start_relay(
        nursery, tmp_path / "relay", RelayConfig(rate_limits=RateLimits(connections_per_address=3))
    )
    async with RelayClient.connect(relay.url, CALM) as client:
        await client.publish("docs@local", "doc.create", {"doc": "d"})
    await trio.testing.wait_all_tasks_blocked()  # its slot is given back
    async with AsyncExitStack() as held:
        for _ in range(2):
            await held.enter_async_context(connect_ws(relay.url))  # hello, no auth
        plain = await held.enter_async_context(connect_ws(f"{relay.url}/yjs/docs@local/d"))
        assert isinstance(await plain.recv(), bytes)  # served: sync step 1
        with trio.fail_after(10):
            async with connect_ws(relay.url) as fourth:
                with pytest.raises(ConnectionClosed) as closed:
                    await fourth.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert closed.value.rcvd.reason.startswith("5005 too_many_connections: this address")
    with trio.fail_after(10):
        async with RelayClient.connect(relay.url, CALM) as client:  # all three gone: room
            await client.publish("x@local", "app.note", "in")
    relay.scope.cancel()


async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_cap(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    limits = RateLimits(connections_per_address=1, trusted_proxies=frozenset({"127.0.0.1"}))
    relay = await start_relay(nursery, tmp_path / "relay", RelayConfig(rate_limits=limits))
    one = {"X-Forwarded-For": "198.51.100.7"}
    with trio.fail_after(10):
        async with connect_ws(relay.url, additional_headers=one):
            async with connect_ws(relay.url, additional_headers=one) as again:
                with pytest.raises(ConnectionClosed) as closed:
                    await again.recv()
            assert closed.value.rcvd is not None and "5005" in closed.value.rcvd.reason
            other = {"X-Forwarded-For": "198.51.100.8"}
            async with connect_ws(relay.url, additional_headers=other) as fine:
                assert isinstance(await fine.recv(), bytes)  # its hello
    relay.scope.cancel()


async def test_a_relay_that_says_it_stops_but_never_closes_is_left(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After a 5002 a reconnecting client waits for the relay to close the connection,
    then sends the request again on a new one. An embedder's relay that stops
    admitting and never closes must not leave the request waiting for good."""
    from agent_sdk.client import STOPPING_GRACE

    node = RelayNode(identity(9), MemoryStore(), RelayConfig())
    listener = MemoryListener("stopping")
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        await nursery.start(
            lambda task_status: serve_relay(node, listeners=[listener], task_status=task_status)
        )
        async with RelayClient.connect("ws://stopping.sim/", CALM, dial=listener.dial) as client:
            node.stop_admitting()
            published: list[int] = []
            done = trio.Event()

            async def publish() -> None:
                published.append((await client.publish("x@local", "app.note", 1)).receipt.seq)
                done.set()

            nursery.start_soon(publish)
            await trio.testing.wait_all_tasks_blocked()  # 5002 came, and was set aside
            assert not published and client.connections == 1
            node.stopping = False  # admitting again, on this connection too
            with trio.fail_after(STOPPING_GRACE + 10):
                await done.wait()  # sent again, on a new connection
            assert published == [1] and client.connections == 2
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- kept per key


async def test_buckets_are_forgotten_once_full_again_and_a_debt_is_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Every key that ever published kept its buckets until 100,000 others had come
    after it: a stream of throwaway keys grew the relay by two buckets each. A full
    bucket is what a new key gets anyway, so it is forgotten; one in debt is kept,
    connected or not, and reconnecting does not reset it."""
    limits = RateLimits(publish_rate=1.0, publish_burst=5, request_rate=1.0, request_burst=5)
    async with virtual_node(limits) as (node, listener):
        for n in range(20):  # throwaway keys: one publish each, then gone
            async with connect(listener, identity(100 + n)) as throwaway:
                await throwaway.publish("x@local", "app.note", n)
        async with connect(listener, FLOODER) as flooder:
            for n in range(4):
                await flooder.publish("x@local", "app.note", n)
            # One token left, and this costs 5 (64 KiB): taken, 4 tokens in debt.
            await flooder.publish("x@local", "app.note", "x" * (64 << 10))
        await trio.sleep(1.5)  # virtual: the throwaway buckets are full, the debt is not paid
        async with connect(listener, CALM) as calm:
            await calm.publish("x@local", "app.note", "after them")
        kept = {key for key, _ in node.limiter._buckets}
        assert kept == {FLOODER.public_key, CALM.public_key}
        async with connect(listener, FLOODER) as flooder:  # back: the debt is still there
            with pytest.raises(ProtocolError) as limited:
                await flooder.publish("x@local", "app.note", "again")
            assert limited.value.code is ErrorCode.RATE_LIMITED


async def test_an_inbox_stream_that_ends_waiting_leaves_nothing_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A stream waiting on an empty inbox left its wake-up event behind when its
    connection closed, and only an item for that agent removed it: one per key that
    ever opened its inbox, for ever."""
    async with virtual_node(RateLimits()) as (node, listener):
        for n in range(10):
            async with connect(listener, identity(100 + n)) as throwaway:
                with trio.move_on_after(1):  # its stream opens, finds nothing, waits
                    await throwaway.mailbox.next()
        await trio.testing.wait_all_tasks_blocked()  # every connection has ended
        assert not node.connections
        assert node.inboxes.streams == {} and node.inboxes._changed == {}
        # And a stream that waits is still woken by an item (its event is in place).
        async with connect(listener, CALM) as reader, connect(listener, FLOODER) as sender:
            got: list[object] = []

            async def read() -> None:
                got.append((await reader.mailbox.next()).body)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()  # its stream waits, empty
                assert reader.identity.public_key in node.inboxes._changed
                await sender.send(reader.identity.id, "wakes it", via="relay")
            assert got == ["wakes it"]
