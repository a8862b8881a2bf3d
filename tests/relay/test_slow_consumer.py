"""A subscriber that stops reading is disconnected with a reason, not buffered."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close
from websockets.trio.client import ClientConnection, connect

from agent_sdk import frames as f
from agent_sdk.client import RelayClient
from relay import server
from relay.node import RelayConfig
from relay.server import Connection
from tests.conftest import RunningRelay, identity, start_relay

NS = "t@local"
BODY = "x" * 60_000
EVENTS = 300  # 18 MB: far more than the loopback socket buffers hold


async def subscribe_lazily(
    relay: RunningRelay, lazy: ClientConnection, start: int | None = None
) -> Connection:
    """Authenticate ``lazy`` and subscribe it to ``NS``; returns its connection at the
    relay. The caller decides what it reads from then on."""
    agent = identity(1)
    hello = f.decode_frame(await lazy.recv())
    assert isinstance(hello, f.Hello)
    sig = agent.sign(f.agent_auth_message(hello.relay, hello.challenge))
    await lazy.send(f.encode_frame(f.Auth(key=agent.public_key, sig=sig, challenge=bytes(32))))
    assert isinstance(f.decode_frame(await lazy.recv()), f.Welcome)
    starts = {} if start is None else {NS: start}
    await lazy.send(f.encode_frame(f.Subscribe(sub=1, ns=(NS,), start=starts)))
    (cut,) = [c for c in relay.node.connections if c.session.agent == agent.public_key]
    return cut


async def read_to_the_close(lazy: ClientConnection) -> Close:
    """Read what ``lazy`` left unread, up to the relay's close frame: that frame."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await lazy.recv()
    assert info.value.rcvd is not None
    return info.value.rcvd


async def test_a_reader_that_stops_reading_is_closed_with_slow_consumer(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    config = RelayConfig(name="local", send_queue=4, slow_consumer_timeout=0.5)
    relay = await start_relay(nursery, tmp_path / "relay", config)
    async with connect(relay.url, compression=None, max_size=None) as lazy:
        await subscribe_lazily(relay, lazy)
        # ...and from here on this client reads nothing while the log grows.

        async with RelayClient.connect(relay.url, identity(2)) as publisher:
            for n in range(EVENTS):
                if relay.node.stats["slow_consumers"]:
                    break
                await publisher.publish(NS, "app.big", {"n": n, "pad": BODY})
            with trio.fail_after(60):  # a bound, not a timing: the condition must come
                await relay.node.wait_stat("slow_consumers", 1)
            # The relay kept serving the publisher, and still does.
            assert (await publisher.publish(NS, "app.small", 1)).receipt.seq > 1

        # Draining now reaches the close frame and its reason.
        closing = await read_to_the_close(lazy)
        assert closing.code == 1008
        assert closing.reason == "3002 slow_consumer"


async def test_a_slow_consumer_blocking_the_reader_still_completes_the_close_handshake(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A client that stops reading and then sends more requests leaves the relay's
    reader waiting for room among the unanswered ones. When the relay closes it as a
    slow consumer, the reader drains what the client sent, so that once the client
    reads again the relay sees its answering close frame and the connection ends
    there (rather than after websockets' close timeout, with no answer seen)."""
    config = RelayConfig(name="local", send_queue=4, max_inflight=4, slow_consumer_timeout=5)
    relay = await start_relay(nursery, tmp_path / "relay", config)
    async with connect(relay.url, compression=None, max_size=None) as lazy:
        cut = await subscribe_lazily(relay, lazy)

        async with RelayClient.connect(relay.url, identity(2)) as publisher:
            # Far more than the loopback socket buffers hold: the relay's writer is
            # stuck from some point on, and its wait for room runs out 5 s later.
            for n in range(EVENTS):
                await publisher.publish(NS, "app.big", {"n": n, "pad": BODY})
            # Then requests it cannot answer, more than max_inflight: its reader ends
            # up waiting for room among them when the close begins.
            for rid in range(1, 41):
                await lazy.send(f.encode_frame(f.Query(rid=rid, ns=NS, q="wo.list", args={})))
            with trio.fail_after(60):  # a bound, not a timing: the condition must come
                await relay.node.wait_stat("slow_consumers", 1)

        assert (await read_to_the_close(lazy)).reason == "3002 slow_consumer"
        with trio.fail_after(60):
            await cut.ws.wait_closed()
        assert cut.ws.protocol.close_rcvd is not None  # the client's answer was read


async def stuck_subscriber(relay: RunningRelay, lazy: ClientConnection) -> Connection:
    """Subscribe ``lazy`` and publish far more than the socket buffers hold while it
    reads nothing: the relay's writer ends up blocked in a send with the rest of the
    log still queued, so no queue ever stays full."""
    cut = await subscribe_lazily(relay, lazy)
    async with RelayClient.connect(relay.url, identity(2)) as publisher:
        for n in range(EVENTS):
            await publisher.publish(NS, "app.big", {"n": n, "pad": BODY})
    return cut


# Room for every frame of the log: the writer's send is the only thing left waiting.
ROOMY = RelayConfig(name="local", send_queue=4 * EVENTS, slow_consumer_timeout=1.0)


async def test_a_send_blocked_too_long_closes_the_connection_with_no_queue_full(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Nothing waits for room in a queue, yet the peer reads nothing: the blocked send
    itself makes it a slow consumer (websockets stops reading a peer while a send to
    it is blocked, so without this the connection would wait forever)."""
    relay = await start_relay(nursery, tmp_path / "relay", ROOMY)
    async with connect(relay.url, compression=None, max_size=None) as lazy:
        cut = await stuck_subscriber(relay, lazy)
        with trio.fail_after(60):  # a bound: the condition must come
            await relay.node.wait_stat("slow_consumers", 1)
        # Reading again, it gets the close.
        assert (await read_to_the_close(lazy)).reason == "3002 slow_consumer"
        with trio.fail_after(60):
            await cut.ws.wait_closed()


async def test_a_send_under_way_is_closed_only_once_blocked_the_whole_timeout(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The writers' watch closes a connection whose one send stayed blocked for
    ``slow_consumer_timeout``, not one whose send is only under way. (The watch's
    times are passed here: at 600 s, the relay's own watch never looks meanwhile.)"""
    config = RelayConfig(name="local", send_queue=4 * EVENTS, slow_consumer_timeout=600)
    relay = await start_relay(nursery, tmp_path / "relay", config)
    async with connect(relay.url, compression=None, max_size=None) as lazy:
        cut = await stuck_subscriber(relay, lazy)
        await trio.testing.wait_all_tasks_blocked(cushion=0.2)  # the writer is stuck
        began = cut._send_began
        assert began is not None
        cut.check_writer(began + 599.5)
        assert relay.node.stats["slow_consumers"] == 0 and not cut._closing
        cut.check_writer(began + 600)
        assert relay.node.stats["slow_consumers"] == 1
        with trio.fail_after(60):  # a bound: the close must come
            assert (await read_to_the_close(lazy)).reason == "3002 slow_consumer"


async def test_a_peer_that_never_reads_its_close_is_cut(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "ABORT_GRACE", 0.5)
    relay = await start_relay(nursery, tmp_path / "relay", ROOMY)
    async with connect(relay.url, compression=None, max_size=None) as lazy:
        cut = await stuck_subscriber(relay, lazy)
        with trio.fail_after(60):  # a bound: the relay lets go of it without its help
            await cut.ws.wait_closed()
        assert cut.ws.protocol.close_rcvd is None  # it never answered: cut, not closed
        assert relay.node.stats["slow_consumers"] == 1
        # Reading at last, it finds the connection ended with no close frame. (This
        # also lets the client's own websockets wind up: with its reading paused by a
        # full buffer, it would otherwise wait on the closed connection for ever.)
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await lazy.recv()
        assert info.value.rcvd is None


async def test_a_reader_that_stops_reading_holds_a_bounded_number_of_bytes(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The send queue was bounded in frames only: 256 of them, each up to max_frame,
    is 256 MiB for one subscriber that reads nothing (and each of its subscriptions
    held a replay batch of 512 records besides)."""
    config = RelayConfig(name="local", max_frame=64 << 10, slow_consumer_timeout=600)
    relay = await start_relay(nursery, tmp_path / "relay", config)
    async with RelayClient.connect(relay.url, identity(2)) as publisher:
        for n in range(EVENTS):
            await publisher.publish(NS, "app.big", {"n": n, "pad": BODY})
    async with connect(relay.url, compression=None, max_size=None, max_queue=4) as lazy:
        cut = await subscribe_lazily(relay, lazy, start=1)  # a replay it never reads
        await trio.testing.wait_all_tasks_blocked(cushion=0.2)  # the writer is stuck
        assert cut._writing and cut._out_rx.statistics().current_buffer_used < 256
        assert 0 < cut._queued_bytes <= server.SEND_QUEUE_FRAMES_OF_MAX * config.max_frame
        await cut._cut()  # and read what came, up to the cut (websockets' client waits
        with pytest.raises(ConnectionClosed):  # for ever to close with reading paused)
            while True:
                await lazy.recv()
