"""RelayClient over real sockets: reconnect, exact resume, safe re-publish."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from agent_sdk import frames as f
from agent_sdk.client import (
    Delivery,
    Live,
    PendingPublish,
    Published,
    RelayClient,
    RelayMismatch,
)
from agent_sdk.errors import ErrorCode, ProtocolError, notify
from agent_sdk.wire import Event, decode_receipt, make_receipt, sign_event, verify_seal
from tests.agent_sdk.cuttable import Wire, dialer
from tests.conftest import RunningRelay, identity
from tests.federation.fixtures import LyingRelay, federation_of, plan, start

NS = "t@local"
TOTAL = 300
TIMEOUT = 30


async def drop_every_connection(relay: RunningRelay) -> int:
    """Cut every client's TCP connection at the relay, as a network failure would."""
    connections = list(relay.server.connections)
    for connection in connections:
        await connection.stream.aclose()
    return len(connections)


async def test_subscriber_resumes_exactly_once_in_order_across_drops(relay: RunningRelay) -> None:
    received: list[Delivery] = []
    published: list[Published] = []
    progress = trio.Event()
    drop_at = {60, 150, 240}

    # (A bound: events not delivered after a drop fail the test instead of hanging it.)
    with trio.fail_after(TIMEOUT):
        async with (
            RelayClient.connect(relay.url, identity(1)) as subscriber,
            RelayClient.connect(relay.url, identity(2)) as publisher,
            subscriber.subscribe(NS, start=1) as feed,
            trio.open_nursery() as nursery,
        ):

            async def publish_all() -> None:
                for n in range(TOTAL):
                    published.append(await publisher.publish(NS, "app.n", n))

            async def dropper() -> None:
                nonlocal progress
                for _ in drop_at:
                    await progress.wait()
                    progress = trio.Event()
                    await drop_every_connection(relay)

            nursery.start_soon(publish_all)
            nursery.start_soon(dropper)
            async for item in feed:
                if isinstance(item, Delivery):
                    received.append(item)
                    if len(received) in drop_at:
                        progress.set()
                    if len(received) == TOTAL:
                        break
            assert subscriber.connections >= 2
            assert publisher.connections >= 2

    assert [d.receipt.seq for d in received] == list(range(1, TOTAL + 1))
    assert [d.event.event.body for d in received] == list(range(TOTAL))
    assert sorted(p.receipt.seq for p in published) == list(range(1, TOTAL + 1))
    assert relay.node.head(NS) == TOTAL  # re-sent publishes were not sequenced twice


async def test_unacknowledged_publishes_are_resent_after_a_drop(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        results: list[Published] = []
        # (A bound: publishes not sent again would wait for ever, and fail the test here.)
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                for n in range(100):
                    nursery.start_soon(lambda n=n: _append(results, client.publish(NS, "app.n", n)))
                await trio.testing.wait_all_tasks_blocked()
                await drop_every_connection(relay)
        assert sorted(r.receipt.seq for r in results) == list(range(1, 101))
        assert relay.node.head(NS) == 100


async def _append(results: list[Published], publish: object) -> None:
    results.append(await publish)  # type: ignore[misc]


async def test_republishing_the_same_event_returns_its_receipt(relay: RunningRelay) -> None:
    ts = time.time_ns() // 1_000_000
    async with RelayClient.connect(relay.url, identity(1)) as client:
        first = await client.publish(NS, "app.n", 1, ts=ts)
        # A second connection with the same key, as a second shell process would have.
        async with RelayClient.connect(relay.url, identity(1)) as twin:
            again = await twin.publish(NS, "app.n", 1, ts=ts)
        assert again.duplicate and again.receipt == first.receipt
        nonce = await client.publish(NS, "app.n", 1, ts=ts, nonce=b"\x01")
        assert not nonce.duplicate and nonce.receipt.seq == 2


async def test_rejections_raise_with_their_code(relay: RunningRelay) -> None:
    # (A bound: a refusal that does not reach its publish or subscription hung it.)
    with trio.fail_after(TIMEOUT):
        await _rejections_raise_with_their_code(relay)


async def _rejections_raise_with_their_code(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        with pytest.raises(ProtocolError) as info:
            await client.publish("t@elsewhere", "app.n", 1)
        assert info.value.code is ErrorCode.NOT_HOME
        async with client.subscribe(NS, start=5) as feed:
            with pytest.raises(ProtocolError) as info:
                await feed.__anext__()
        assert info.value.code is ErrorCode.BAD_CURSOR
        assert (await client.publish(NS, "app.n", 1)).receipt.seq == 1  # still connected


async def test_a_pinned_relay_key_is_checked(relay: RunningRelay) -> None:
    with pytest.raises(RelayMismatch):
        async with RelayClient.connect(relay.url, identity(1), relay_key=bytes(32)):
            pass  # pragma: no cover
    pinned = relay.node.identity.public_key
    async with RelayClient.connect(relay.url, identity(1), relay_key=pinned) as client:
        assert client.relay_name == "local"


async def test_connecting_to_nothing_fails_clearly() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    with pytest.raises(OSError):
        async with RelayClient.connect(f"ws://127.0.0.1:{port}", identity(1)):
            pass  # pragma: no cover


async def test_a_lagging_subscription_pauses_instead_of_blocking_acks(
    relay: RunningRelay,
) -> None:
    async with (
        RelayClient.connect(relay.url, identity(1)) as client,
        client.subscribe(NS, start=1, buffer=4) as feed,
    ):
        with trio.fail_after(TIMEOUT):
            # Nobody reads the feed while publishing: acks must still arrive.
            for n in range(50):
                await client.publish(NS, "app.n", n)
            assert feed.paused
            seqs = []
            for _ in range(2):  # half of the buffer drained: it resumes
                item = await feed.__anext__()
                if isinstance(item, Delivery):  # (the first is the empty log's live)
                    seqs.append(item.receipt.seq)
            assert not feed.paused
            async for item in feed:
                if isinstance(item, Delivery):
                    seqs.append(item.receipt.seq)
                    if len(seqs) == 50:
                        break
        assert seqs == list(range(1, 51))  # every event once, in order, across pauses
        assert feed.sub > 1  # it paused and resumed under new ids


async def test_a_request_over_the_relays_max_frame_fails_at_once(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The relay discards such a message unread and its error names no request: the
    client answers it itself, instead of waiting for ever."""
    from relay.node import RelayConfig
    from tests.conftest import start_relay

    relay = await start_relay(nursery, tmp_path / "relay", RelayConfig(max_frame=64 * 1024))
    async with RelayClient.connect(relay.url, identity(1)) as client:
        with trio.fail_after(10):
            with pytest.raises(ProtocolError) as publish:
                await client.publish("big@local", "app.note", "x" * 100_000)
            assert publish.value.code is ErrorCode.FRAME_TOO_LARGE
            with pytest.raises(ProtocolError) as message:
                await client.send(identity(2).id, b"y" * 100_000, via="relay")
            assert message.value.code is ErrorCode.FRAME_TOO_LARGE
            await client.publish("big@local", "app.note", "and the client goes on")


async def test_a_client_that_stops_ends_everything_waiting_on_it(relay: RunningRelay) -> None:
    """Without reconnect, a relay closing cleanly (a restart, 1001) stops the client:
    its subscriptions, inbox and later publishes end with an error instead of
    waiting for ever (`formicary wo wait` hung through a routine relay restart)."""
    from agent_sdk.ledger import Ledger

    async with RelayClient.connect(relay.url, identity(2)):
        pass  # a recipient the relay knows
    async with RelayClient.connect(relay.url, identity(1), reconnect=False) as client:
        ledger = Ledger(client, NS)
        order = await ledger.create("t")
        sent = await client.send(identity(2).id, "no receipt before the stop", via="relay")
        messages = client.messages()
        async with client.subscribe(NS, start=1) as events:
            with trio.fail_after(10):
                seen = [item async for item in _until_live(events)]
                assert seen  # the order's events, then live
                for connection in list(relay.server.connections):
                    await connection.aclose(1001, "going away")
                await client.stopped.wait()
                with pytest.raises(ProtocolError, match=r"stopped|closed"):
                    await events.__anext__()
                with pytest.raises(ProtocolError, match=r"stopped|closed"):
                    await messages.__anext__()
                with pytest.raises(ProtocolError, match=r"stopped"):
                    await ledger.claim(order)
                async with client.subscribe(NS) as later:  # opened once stopped
                    with pytest.raises(ProtocolError, match=r"stopped"):
                        await later.__anext__()
                with pytest.raises(ProtocolError, match=r"stopped|closed"):
                    await sent.delivered()
                with pytest.raises(ProtocolError, match=r"stopped"):
                    async with client.doc(NS, "notes", create=False):
                        pass


async def _until_live(events: Any) -> Any:
    async for item in events:
        yield item
        if not isinstance(item, Delivery):
            return


async def test_a_connection_lost_while_the_client_is_cancelled_ends_as_the_cancellation() -> None:
    """The relay closes (a flood close, say) just as the client leaves its block: the
    reader's loss and a task's cancellation end the connection's nursery together.
    The loss must not escape the cancelled scope as an error."""
    from websockets.exceptions import ConnectionClosedError
    from websockets.frames import Close

    from agent_sdk.client import connection_ends

    with trio.CancelScope() as leaving, connection_ends():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)  # the writer, say
            await trio.lowlevel.checkpoint()
            leaving.cancel()
            raise ConnectionClosedError(Close(1008, "5004 rate_limited: too many refusals"), None)
    assert leaving.cancelled_caught
    # Without a cancellation: the loss, bare, for the connect loop to reconnect on.
    with pytest.raises(ConnectionClosedError), connection_ends():
        async with trio.open_nursery():
            raise ConnectionClosedError(Close(1011, "gone"), None)


async def test_a_subscription_paused_as_the_client_stops_ends_too(relay: RunningRelay) -> None:
    """A lagging subscription is paused (out of the client's table): the stop did not
    end it, and once drained it subscribed again on a client that had stopped."""
    async with RelayClient.connect(relay.url, identity(1), reconnect=False) as client:
        for n in range(40):
            await client.publish(NS, "app.note", n)
        async with client.subscribe(NS, start=1, buffer=8) as events:
            with trio.fail_after(10):
                while not events.paused:  # the relay sends 40; 8 fit
                    await trio.testing.wait_all_tasks_blocked()
                for connection in list(relay.server.connections):
                    await connection.aclose(1001, "going away")
                await client.stopped.wait()
                seen = 0
                with pytest.raises(ProtocolError, match="stopped"):
                    async for _ in events:
                        seen += 1
                assert 0 < seen <= 8


async def test_publishes_over_a_clean_relay_restart_all_succeed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The relay answers what it has not admitted with 5002 shutting_down as it stops
    cleanly: that is not an answer, the SDK sends it again to the next relay process
    (operations.md). The error reached the application instead."""
    from relay.app import stop_gracefully
    from tests.conftest import start_relay

    data = tmp_path / "relay"
    relay = await start_relay(nursery, data)
    port = int(relay.url.rsplit(":", 1)[1])
    acked, enough = [0], trio.Event()
    async with RelayClient.connect(relay.url, identity(1)) as client:

        async def publisher(k: int) -> None:
            for i in range(50):
                await client.publish(NS, "app.n", [k, i])
                acked[0] += 1
                if acked[0] >= 100:
                    enough.set()

        with trio.fail_after(60):
            async with trio.open_nursery() as publishers:
                for k in range(8):
                    publishers.start_soon(publisher, k)
                await enough.wait()
                relay.node.stop_admitting()  # each publisher's next publish: 5002
                await trio.testing.wait_all_tasks_blocked(cushion=0.1)
                await stop_gracefully(relay.node, relay.server)
                relay.scope.cancel()
                relay = await start_relay(nursery, data, port=port)
    assert acked[0] == 400 and relay.node.head(NS) == 400  # each once
    relay.scope.cancel()


async def test_nothing_published_after_a_from_now_body_starts_is_missed(
    relay: RunningRelay,
) -> None:
    """A subscription from now whose ``live`` was lost with its connection was
    subscribed from a later now: an event published in between (a reply to what the
    body had sent, say) never came. Entering it now waits for the relay's ``live``."""
    wires: list[Wire] = []
    entered, seen = trio.Event(), []
    async with (
        RelayClient.connect(relay.url, identity(1), dial=dialer(relay, wires)) as client,
        RelayClient.connect(relay.url, identity(2)) as other,
        trio.open_nursery() as nursery,
    ):

        async def subscriber() -> None:
            async with client.subscribe(NS) as feed:
                entered.set()
                async for item in feed:
                    if isinstance(item, Delivery):
                        seen.append(item.event.event.body)
                        if item.event.event.body == "after":
                            return

        wires[0].held = True  # the relay's live (and all else) never reaches the client
        nursery.start_soon(subscriber)
        with trio.fail_after(TIMEOUT):
            while not any(c._subscriptions for c in relay.node.connections):
                await trio.testing.wait_all_tasks_blocked()  # the relay has it: "now"
            [first] = [c for c in relay.node.connections if c._subscriptions]
            await other.publish(NS, "app.n", "gap")  # after now, sent to the subscriber
            body_started_before_gap = entered.is_set()
            await wires[0].cut()
            await entered.wait()
            while not any(c._subscriptions for c in relay.node.connections - {first}):
                await trio.testing.wait_all_tasks_blocked()  # subscribed again
            await other.publish(NS, "app.n", "after")
    assert client.connections == 2 and seen[-1] == "after"
    assert "gap" in seen or not body_started_before_gap


async def test_a_pause_on_a_live_marker_resumes_past_it(relay: RunningRelay) -> None:
    """A namespace subscribed from now whose ``live`` did not fit the buffer kept no
    cursor: after the pause it was subscribed from now again, and what was published
    in between never came. And a buffer of 0 paused at once, for ever."""
    async with RelayClient.connect(relay.url, identity(1)) as client:
        with pytest.raises(ValueError, match="at least 1"):
            async with client.subscribe(NS, buffer=0):
                pass
        for n in range(5):
            await client.publish("a@local", "app.n", n)
        await client.publish("c@local", "app.n", "old")
        # a's replay, b and c from now, one item of room: the relay sends b's and c's
        # live first, and the second pauses the subscription (whichever comes second).
        async with client.subscribe(
            ["a@local", "b@local", "c@local"], start={"a@local": 1}, buffer=1
        ) as sub:
            with trio.fail_after(10):
                while not sub.paused:
                    await trio.testing.wait_all_tasks_blocked()
                assert set(sub.next) >= {"b@local", "c@local"}, sub.next  # cursors kept
                for ns in ("b@local", "c@local"):
                    await client.publish(ns, "app.n", "meanwhile")
                seen = set()
                async for item in sub:
                    if isinstance(item, Delivery) and item.event.event.body == "meanwhile":
                        seen.add(item.receipt.ns)
                        if len(seen) == 2:
                            break


class LateLive(LyingRelay):
    """A WebSocket man in the middle between a client and a relay that holds back the
    ``live`` of namespace ``late`` until the ``live`` of ``after`` has gone by, as
    a foreign namespace's comes once its mirror has caught up (protocol 14.7)."""

    def __init__(self, target: str, late: str, after: str) -> None:
        super().__init__(target, lambda frame: frame)
        self.late, self.after = late, after
        self.held: list[bytes] = []
        self.released = False

    def _rewrite(self, message: bytes) -> bytes | None:
        passed = self._pass(message)
        return f.bundle(passed) if passed else None

    def _pass(self, message: bytes) -> list[bytes]:
        out = []
        for frame in f.decode_message(message):
            assert not isinstance(frame, Exception)
            encoded = f.encode_frame(frame)
            if isinstance(frame, f.Live) and frame.ns == self.late and not self.released:
                self.held.append(encoded)
                continue
            out.append(encoded)
            if isinstance(frame, f.Live) and frame.ns == self.after and not self.released:
                self.released = True
                out += self.held
        return out


async def test_a_subscription_holds_no_more_than_its_buffer_before_it_is_placed(
    relay: RunningRelay, nursery: trio.Nursery
) -> None:
    """Until the live of a namespace subscribed from now comes, nobody reads the
    subscription, and it held everything else that came meanwhile: a backlog replayed
    while a foreign namespace's mirror caught up, all of it. It holds its buffer, drops
    the rest without moving its cursors, and once placed pauses and resumes from them."""
    backlog, buffer = 50, 4
    async with RelayClient.connect(relay.url, identity(2)) as writer:
        for n in range(backlog):
            await writer.publish("a@local", "app.n", n)
    proxy = LateLive(relay.url, late="b@local", after="a@local")
    await nursery.start(proxy.run)
    seen: dict[str, list[Any]] = {"a@local": [], "b@local": []}
    async with RelayClient.connect(proxy.url, identity(1)) as client:
        with trio.fail_after(TIMEOUT):
            async with client.subscribe(
                ["a@local", "b@local"], start={"a@local": 1}, buffer=buffer
            ) as feed:
                assert proxy.released  # placed by b's live, after a's whole backlog
                assert feed._rx.statistics().current_buffer_used <= buffer
                # What was dropped comes again with nothing else sent meanwhile: the
                # pause is taken once placed, not at the next frame that does not fit.
                async for item in feed:
                    if isinstance(item, Delivery):
                        seen[item.receipt.ns].append(item.event.event.body)
                        if len(seen["a@local"]) == backlog:
                            break
                await client.publish("b@local", "app.n", "after")
                async for item in feed:
                    if isinstance(item, Delivery):
                        seen[item.receipt.ns].append(item.event.event.body)
                        break
    # Nothing dropped was lost, nothing came twice.
    assert seen == {"a@local": list(range(backlog)), "b@local": ["after"]}


class BrokenHook:
    """A notification hook that fails, after noting that it was called: by default
    as a print to a closed stderr does (a shell command's hooks print there)."""

    def __init__(self, error: type[Exception] = BrokenPipeError) -> None:
        self.error = error
        self.called = trio.Event()

    def __call__(self, *args: object) -> None:
        self.called.set()
        raise self.error("the hook failed")


def hook_failures(
    caplog: pytest.LogCaptureFixture, name: str, hook: BrokenHook
) -> list[logging.LogRecord]:
    """The records of hook ``name`` failing, each with the error ``hook`` raised."""
    return [
        record
        for record in caplog.records
        if f"the {name} hook failed" in record.message
        and record.exc_info is not None
        and isinstance(record.exc_info[1], hook.error)
    ]


@pytest.mark.parametrize("error", [BrokenPipeError, RuntimeError])
async def test_a_queued_hook_that_fails_ends_neither_the_publish_nor_the_client(
    error: type[Exception],
    nursery: trio.Nursery,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Both ``on_queued`` hooks run in the client's reader. A BrokenPipeError there
    (an OSError) was taken for a lost connection: the client reconnected, the
    publish was queued again and the hook failed again, for as long as the home was
    away; any other error ended the client. It is logged, the client-wide hooks
    still run, and the publish is answered by its home on the same connection."""
    relays = plan(tmp_path, "a", "b")
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    a = await start(nursery, relays["a"], (relays["b"].peer(),))
    with trio.fail_after(TIMEOUT):
        await federation_of(a).links["b"].wait_up()
        b.node.stop_admitting()  # b answers 5002: a keeps the write and says `queued`
        async with RelayClient.connect(a.url, identity(1)) as agent:
            own, every = BrokenHook(error), BrokenHook(error)
            agent.on_queued.append(every)
            published: list[Published] = []

            async def publish() -> None:
                published.append(await agent.publish("x@b", "app.note", "kept", on_queued=own))

            async with trio.open_nursery() as waiting:
                waiting.start_soon(publish)
                await own.called.wait()
                b.node.stopping = False  # b admits again
            [result] = published
            assert result.receipt.seq == 1
            assert agent.connections == 1  # not taken for a lost connection
            assert every.called.is_set()  # the client-wide hooks ran all the same
    assert len(hook_failures(caplog, "publish's on_queued", own)) == 1
    assert len(hook_failures(caplog, "on_queued", every)) == 1


async def test_a_lost_hook_that_fails_does_not_end_the_client(
    relay: RunningRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``on_lost`` runs in the task that reconnects: a failure there ended the client
    instead of reconnecting. It is logged, and the client reconnects."""
    async with RelayClient.connect(relay.url, identity(1)) as client:
        lost = BrokenHook()
        client.on_lost.append(lost)
        with trio.fail_after(TIMEOUT):
            assert (await client.publish(NS, "app.n", 1)).receipt.seq == 1
            await drop_every_connection(relay)
            await lost.called.wait()
            assert (await client.publish(NS, "app.n", 2)).receipt.seq == 2
        assert client.connections == 2
    assert len(hook_failures(caplog, "on_lost", lost)) == 1


def test_a_hook_whose_failure_cannot_be_logged_is_still_contained() -> None:
    """Logging's last resort writes to stderr: when that is what the hook found closed,
    logging the failure raised too, out of notify and into the SDK's task."""

    class Closed(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise ValueError("I/O operation on closed file")

    log = logging.getLogger("tests.closed_stderr")
    log.addHandler(Closed())
    log.propagate = False

    def hook() -> None:
        raise ValueError("I/O operation on closed file")

    notify(log, "on_lost", hook)  # returns, as if the hook had


class Rewriter(LyingRelay):
    """A WebSocket man in the middle that passes every frame the relay sends, the
    handshake's included, through ``rewrite``: it returns the encoded frames to send
    in its place (bytes that do not decode as a frame too)."""

    def __init__(self, target: str, rewrite: Callable[[f.Frame], list[bytes]]) -> None:
        super().__init__(target, lambda frame: frame)
        self.rewrite = rewrite

    def _rewrite(self, message: bytes) -> bytes | None:
        out = []
        for frame in f.decode_message(message):
            assert not isinstance(frame, Exception)
            out += self.rewrite(frame)
        return f.bundle(out) if out else None


def rewriting(
    kind: type[Any], change: Callable[[Any], list[bytes]]
) -> Callable[[f.Frame], list[bytes]]:
    """A ``rewrite`` that applies ``change`` to frames of type ``kind`` only."""

    def rewrite(frame: f.Frame) -> list[bytes]:
        return change(frame) if isinstance(frame, kind) else [f.encode_frame(frame)]

    return rewrite


def another_events_receipt(raw: bytes) -> bytes:
    """Receipt bytes at the same place as ``raw``'s, for another event id."""
    receipt = decode_receipt(raw)
    fields = {k: getattr(receipt, k) for k in ("ns", "seq", "hlc", "prev", "relay")}
    return make_receipt(id=bytes([7]) * 32, **fields).raw


@pytest.mark.parametrize(
    "lie",
    [
        rewriting(f.Hello, lambda hello: [f.encode_frame(replace(hello, v=2))]),
        rewriting(f.Welcome, lambda welcome: [f.encode_frame(replace(welcome, sig=bytes(64)))]),
    ],
    ids=["another_version", "no_proof_of_key"],
)
async def test_a_relay_of_another_version_or_without_proof_of_its_key_is_refused(
    relay: RunningRelay, nursery: trio.Nursery, lie: Callable[[f.Frame], list[bytes]]
) -> None:
    """Protocol 5.1: the client refuses a ``hello.v`` that is not 1, and verifies the
    relay's ``welcome`` signature over its own challenge with the key of ``hello``."""
    proxy = Rewriter(relay.url, lie)
    await nursery.start(proxy.run)
    with trio.fail_after(TIMEOUT), pytest.raises(RelayMismatch):
        async with RelayClient.connect(proxy.url, identity(1)):
            pass  # pragma: no cover


async def test_a_reconnect_to_a_relay_with_another_key_is_refused(
    relay: RunningRelay, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The key seen on the first connection is pinned: a relay of another key at the
    same address after a reconnect ends the client instead of being trusted."""
    from tests.conftest import start_relay

    other = await start_relay(nursery, tmp_path / "other")
    assert other.node.identity.public_key != relay.node.identity.public_key
    wires: list[Wire] = []
    reconnected = trio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    with trio.fail_after(TIMEOUT), pytest.raises(RelayMismatch, match="pinned"):
        dial = dialer(relay, wires, later=other)
        async with RelayClient.connect(relay.url, identity(1), dial=dial) as client:
            client.on_reconnect.append(on_reconnect)
            await client.publish(NS, "app.n", 1)
            await wires[0].cut()
            await reconnected.wait()
            pytest.fail("the client reconnected to a relay of another key")
    other.scope.cancel()


async def test_an_ack_naming_another_event_ends_the_client(
    relay: RunningRelay, nursery: trio.Nursery
) -> None:
    def lie(ack: f.Ack) -> list[bytes]:
        return [f.encode_frame(replace(ack, receipt=another_events_receipt(ack.receipt)))]

    proxy = Rewriter(relay.url, rewriting(f.Ack, lie))
    await nursery.start(proxy.run)
    with trio.fail_after(TIMEOUT), pytest.raises(RelayMismatch, match="another event"):
        async with RelayClient.connect(proxy.url, identity(1)) as client:
            await client.publish(NS, "app.n", 1)
            pytest.fail("the publish returned another event's receipt")


async def test_an_event_frame_with_another_events_receipt_ends_the_client(
    relay: RunningRelay, nursery: trio.Nursery
) -> None:
    async with RelayClient.connect(relay.url, identity(2)) as writer:
        await writer.publish(NS, "app.n", 1)

    def lie(event: f.EventFrame) -> list[bytes]:
        return [f.encode_frame(replace(event, receipt=another_events_receipt(event.receipt)))]

    proxy = Rewriter(relay.url, rewriting(f.EventFrame, lie))
    await nursery.start(proxy.run)
    with trio.fail_after(TIMEOUT), pytest.raises(RelayMismatch, match="another event"):
        async with (
            RelayClient.connect(proxy.url, identity(1)) as client,
            client.subscribe(NS, start=1) as feed,
        ):
            with suppress(ProtocolError):  # (the client stopped: the cause comes next)
                async for item in feed:
                    assert not isinstance(item, Delivery), "delivered under another's receipt"
            await trio.sleep_forever()


async def test_a_frame_that_does_not_decode_ends_the_client(
    relay: RunningRelay, nursery: trio.Nursery
) -> None:
    """Protocol 5.1: after the handshake a relay frame that does not decode (here an
    ``ack`` whose ``rid`` is text) ends the client with RelayMismatch, rather than
    being skipped (and its publish left waiting)."""
    bad = msgpack.packb({"t": "ack", "rid": "1", "receipt": b""})
    proxy = Rewriter(relay.url, rewriting(f.Ack, lambda ack: [bad]))
    await nursery.start(proxy.run)
    with trio.fail_after(TIMEOUT), pytest.raises(RelayMismatch, match="bad frame"):
        async with RelayClient.connect(proxy.url, identity(1)) as client:
            await client.publish(NS, "app.n", 1)


async def test_a_frame_of_an_unknown_type_is_ignored(
    relay: RunningRelay, nursery: trio.Nursery
) -> None:
    """Protocol 1: an agent ignores a frame whose ``t`` it does not know (a newer
    relay's), whole, and carries on on the same connection."""
    unknown = msgpack.packb({"t": "teleport", "rid": 1, "sub": 1})
    proxy = Rewriter(relay.url, rewriting(f.Ack, lambda ack: [unknown, f.encode_frame(ack)]))
    await nursery.start(proxy.run)
    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(proxy.url, identity(1)) as client:
            for n in range(3):
                assert (await client.publish(NS, "app.n", n)).receipt.seq == n + 1
            assert client.connections == 1


async def test_an_event_frame_below_the_cursor_is_dropped(
    relay: RunningRelay, nursery: trio.Nursery
) -> None:
    """Protocol 7.6: the client drops any event frame with a seq below its cursor, so
    a relay that sends one twice does not deliver it twice."""
    async with RelayClient.connect(relay.url, identity(2)) as writer:
        for n in range(3):
            await writer.publish(NS, "app.n", n)
    proxy = Rewriter(relay.url, rewriting(f.EventFrame, lambda e: [f.encode_frame(e)] * 2))
    await nursery.start(proxy.run)
    seqs = []
    with trio.fail_after(TIMEOUT):
        async with (
            RelayClient.connect(proxy.url, identity(1)) as client,
            client.subscribe(NS, start=1) as feed,
        ):
            await client.publish(NS, "app.n", "live")
            async for item in feed:
                if isinstance(item, Delivery):
                    seqs.append(item.receipt.seq)
                    if item.receipt.seq == 4:
                        break
    assert seqs == [1, 2, 3, 4]


async def test_acks_and_deliveries_carry_the_relays_seals(relay: RunningRelay) -> None:
    """A sealed receipt comes with its seal (protocol 4.4), in the ack as in the
    event frame, and the head of a log is always sealed."""
    async with RelayClient.connect(relay.url, identity(1)) as client:
        published = [await client.publish(NS, "app.n", n) for n in range(3)]
        async with client.subscribe(NS, start=1) as feed:
            with trio.fail_after(TIMEOUT):
                delivered = [item async for item in _until_live(feed)][:-1]
    assert [d.receipt for d in delivered] == [p.receipt for p in published]
    assert [d.seal for d in delivered] == [p.seal for p in published]
    assert delivered[-1].seal is not None
    for item in delivered:
        assert item.seal is None or verify_seal(item.receipt, item.seal)


async def test_queued_frames_are_bundled_within_the_relays_limits(relay: RunningRelay) -> None:
    """Protocol 1: the client starts a new bundle before a frame would take one over
    the relay's ``max_frame`` (1 MiB here), and puts at most 4096 frames in one. The
    relay drops a larger message unanswered (its error names no request): the
    publishes in it would wait for ever. Every publish here is queued before the
    writer runs."""
    async with RelayClient.connect(relay.url, identity(1)) as client:

        def later(n: int, body: Any) -> PendingPublish:
            event = Event(NS, "app.n", client.identity.public_key, body, ts=client.clock_ms())
            return client.publish_later(sign_event(event, client.identity.sign))

        with trio.fail_after(TIMEOUT):
            large = [later(n, [n, "x" * 200_000]) for n in range(8)]  # 1.6 MB in all
            for pending in large:
                await pending.wait()
            small = [later(n, n) for n in range(f.MAX_BUNDLE + 10)]  # ~190 bytes each
            for pending in small:
                await pending.wait()
    assert relay.node.head(NS) == len(large) + len(small)


async def test_a_publish_of_exactly_the_relays_max_frame_is_sent(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The relay refuses a message *longer* than ``max_frame``: a publish frame of
    exactly ``max_frame`` bytes is sent, and one byte more fails at once."""
    from relay.node import RelayConfig
    from tests.conftest import start_relay

    limit = 64 * 1024
    relay = await start_relay(nursery, tmp_path / "relay", RelayConfig(max_frame=limit))
    async with RelayClient.connect(relay.url, identity(1)) as client:
        ts = client.clock_ms()

        def frame_size(body: str) -> int:
            event = Event(NS, "app.n", client.identity.public_key, body, ts=ts)
            signed = sign_event(event, client.identity.sign)
            rid = client._next_rid + 1  # (one byte, as the next rids here)
            return len(f.encode_frame(f.Publish(rid=rid, event=signed.raw, sig=signed.sig)))

        length = limit - (frame_size("") - 0)
        while frame_size("x" * length) > limit:
            length -= 1
        assert frame_size("x" * length) == limit
        with trio.fail_after(TIMEOUT):
            with pytest.raises(ProtocolError) as over:
                await client.publish(NS, "app.n", "x" * (length + 1), ts=ts)
            assert over.value.code is ErrorCode.FRAME_TOO_LARGE
            assert (await client.publish(NS, "app.n", "x" * length, ts=ts)).receipt.seq == 1


async def test_publishes_queued_while_disconnected_go_out_in_call_order(
    relay: RunningRelay,
) -> None:
    """Publishes leave in the order of the calls (``publish_later``), also when they
    are replayed on a new connection: they are sequenced in that order. And what was
    answered is not kept to be sent again."""
    wires: list[Wire] = []
    handles: list[PendingPublish] = []
    lost = trio.Event()
    async with RelayClient.connect(relay.url, identity(1), dial=dialer(relay, wires)) as client:

        def publish_while_lost(_: BaseException | None) -> None:
            for n in range(10):  # no connection: each waits for the next one
                event = Event(NS, "app.n", client.identity.public_key, n, ts=client.clock_ms())
                handles.append(client.publish_later(sign_event(event, client.identity.sign)))
            lost.set()

        with trio.fail_after(TIMEOUT):
            await client.publish(NS, "app.n", "first")
            client.on_lost.append(publish_while_lost)
            await wires[0].cut()
            await lost.wait()
            results = [await handle.wait() for handle in handles]
        assert client.connections == 2
        assert [r.receipt.seq for r in results] == list(range(2, 12))
        assert not client._pending  # nothing answered is sent again on a reconnect


async def test_a_subscription_resumes_with_its_filters_and_one_live(relay: RunningRelay) -> None:
    """After a reconnect a subscription is the same one: its ``kinds`` and ``authors``
    filters still apply, and the relay's second ``live`` is not handed out again."""
    keeper, other = identity(2), identity(3)
    items: list[Any] = []
    async with (
        RelayClient.connect(relay.url, identity(1)) as client,
        RelayClient.connect(relay.url, keeper) as mine,
        RelayClient.connect(relay.url, other) as theirs,
    ):

        async def publish_round(n: int) -> None:
            await theirs.publish(NS, "app.keep", ["theirs", n])
            await mine.publish(NS, "app.skip", ["skip", n])
            await mine.publish(NS, "app.keep", ["keep", n])

        with trio.fail_after(TIMEOUT):
            await publish_round(0)
            async with client.subscribe(
                NS, start=1, kinds=["app.keep"], authors=[keeper.public_key]
            ) as feed:
                async for item in feed:
                    items.append(item)
                    if isinstance(item, Live):
                        break
                await drop_every_connection(relay)
                await publish_round(1)
                async for item in feed:
                    items.append(item)
                    if isinstance(item, Delivery) and item.event.event.body == ["keep", 1]:
                        break
            assert client.connections >= 2
    delivered = [item.event.event.body for item in items if isinstance(item, Delivery)]
    assert delivered == [["keep", 0], ["keep", 1]]
    assert [item for item in items if isinstance(item, Live)] == [Live(NS, 3)]


async def test_a_start_seq_applies_to_every_namespace(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        for ns in ("a@local", "b@local"):
            await client.publish(ns, "app.n", ns)
        seen = set()
        with trio.fail_after(TIMEOUT):
            async with client.subscribe(["a@local", "b@local"], start=1) as feed:
                async for item in feed:
                    if isinstance(item, Delivery):
                        seen.add(item.event.event.body)
                    elif isinstance(item, Live) and item.seq == 0:
                        pytest.fail(f"{item.ns} was subscribed from now")
                    if len(seen) == 2:
                        break


async def test_leaving_a_subscription_unsubscribes_it_at_the_relay(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        with trio.fail_after(TIMEOUT):
            async with client.subscribe(NS, start=1) as feed:
                await feed.__anext__()  # the empty log's live
                assert any(c._subscriptions for c in relay.node.connections)
            while any(c._subscriptions for c in relay.node.connections):
                await trio.testing.wait_all_tasks_blocked()


async def test_an_unanswered_query_is_asked_again_after_a_reconnect(relay: RunningRelay) -> None:
    wires: list[Wire] = []
    async with RelayClient.connect(relay.url, identity(1), dial=dialer(relay, wires)) as client:
        await client.publish(NS, "app.n", 1)
        asked = client.ask_later(lambda rid: f.Query(rid=rid, ns=NS, q="wo.list", args={}))
        wires[0].held = True  # its answer never reaches the client
        with trio.fail_after(TIMEOUT):
            await trio.testing.wait_all_tasks_blocked()
            await wires[0].cut()
            await asked.done.wait()
        assert asked.error is None and asked.result["orders"] == []
        assert client.connections == 2


async def test_the_publish_window_holds_max_inflight_publishes(relay: RunningRelay) -> None:
    """At most ``max_inflight`` publishes are on their way unanswered; the others wait
    for room (``on_sent`` tells when one leaves), and go as answers come."""
    wires: list[Wire] = []
    sent: list[PendingPublish] = []
    results: list[Published] = []
    async with (
        RelayClient.connect(
            relay.url, identity(1), max_inflight=3, dial=dialer(relay, wires)
        ) as client,
        trio.open_nursery() as nursery,
    ):
        wires[0].held = True  # no answer comes on this connection
        for n in range(5):
            publish = client.publish(NS, "app.n", n, on_sent=sent.append)
            nursery.start_soon(_append, results, publish)
        with trio.fail_after(TIMEOUT):
            await trio.testing.wait_all_tasks_blocked()
            assert len(sent) == 3
            await wires[0].cut()  # answered on the next connection: room for the rest
            while len(results) < 5:
                await trio.testing.wait_all_tasks_blocked()
    assert len(sent) == 5
    assert sorted(r.receipt.seq for r in results) == [1, 2, 3, 4, 5]


async def test_an_error_code_the_client_does_not_know_is_internal(
    relay: RunningRelay, nursery: trio.Nursery
) -> None:
    """Protocol 9: a newer relay's error code reaches the caller as ``internal``, with
    the code and name in the reason; the client goes on."""

    def refuse(ack: f.Ack) -> list[bytes]:
        return [f.encode_frame(f.Error(code=9999, name="future", reason="why", rid=ack.rid))]

    proxy = Rewriter(relay.url, rewriting(f.Ack, refuse))
    await nursery.start(proxy.run)
    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(proxy.url, identity(1)) as client:
            for n in range(2):
                with pytest.raises(ProtocolError) as info:
                    await client.publish(NS, "app.n", n)
                assert info.value.code is ErrorCode.INTERNAL
                assert "9999 future" in info.value.reason
            assert client.connections == 1


async def test_a_subscription_placed_by_an_event_it_dropped_reads_it_again(
    relay: RunningRelay, nursery: trio.Nursery
) -> None:
    """A from-now namespace whose ``live`` has not come (a foreign one's can be late,
    protocol 14.7) gets its cursor from its first event. When that event does not fit
    (the buffer is full of another namespace's backlog, unread as it is not placed)
    the cursor stays at it, and the subscription pauses at once to read it again:
    no later frame would make it pause."""
    backlog, buffer = 20, 4
    async with RelayClient.connect(relay.url, identity(2)) as writer:
        for n in range(backlog):
            await writer.publish("a@local", "app.n", n)
        proxy = LateLive(relay.url, late="b@local", after="never@local")  # b's never comes
        await nursery.start(proxy.run)
        seen: dict[str, list[Any]] = {"a@local": [], "b@local": []}
        async with RelayClient.connect(proxy.url, identity(1)) as client:

            async def subscriber() -> None:
                async with client.subscribe(
                    ["a@local", "b@local"], start={"a@local": 1}, buffer=buffer
                ) as feed:
                    async for item in feed:
                        if isinstance(item, Delivery):
                            seen[item.receipt.ns].append(item.event.event.body)
                            if len(seen["a@local"]) == backlog and seen["b@local"]:
                                return

            with trio.fail_after(TIMEOUT):
                async with trio.open_nursery() as waiting:
                    waiting.start_soon(subscriber)
                    while not any(s.overflowed for s in client._subscriptions.values()):
                        await trio.testing.wait_all_tasks_blocked()
                    await writer.publish("b@local", "app.n", "first")
    assert seen == {"a@local": list(range(backlog)), "b@local": ["first"]}


async def test_on_lost_is_called_once_per_connection_lost_not_per_attempt(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """While the relay is down each attempt to reconnect fails; ``on_lost`` tells of
    the connection lost once (a shell command would say so at every attempt)."""
    from tests.conftest import start_relay

    relay = await start_relay(nursery, tmp_path / "relay")
    port = int(relay.url.rsplit(":", 1)[1])
    wires: list[Wire] = []
    reach, attempts, retried = dialer(relay, wires), [0], trio.Event()

    async def dial() -> trio.abc.Stream:
        attempts[0] += 1
        if attempts[0] == 3:  # the first connection, then two attempts at least
            retried.set()
        return await reach()

    lost: list[BaseException | None] = []
    async with RelayClient.connect(relay.url, identity(1), dial=dial) as client:
        client.on_lost.append(lost.append)
        with trio.fail_after(TIMEOUT):
            relay.scope.cancel()
            await retried.wait()
            relay = await start_relay(nursery, tmp_path / "relay", port=port)
            assert (await client.publish(NS, "app.n", 1)).receipt.seq == 1
        assert client.connections == 2
    assert len(lost) == 1
    relay.scope.cancel()
