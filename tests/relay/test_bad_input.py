"""Bad input over real loopback sockets: every refusal is exact, and nobody else suffers.

Each test speaks raw frames to a real relay (so it can send bytes no SDK would), and
checks three things about every piece of bad input (STYLE.md, habit 5):

* the answer is the exact ``error`` frame — its code, name and ``rid``/``sub``;
* the misbehaving connection lives on: a valid publish on it still gets an ack;
* another agent, connected the whole time through :class:`RelayClient`, keeps being
  served: it publishes, gets receipts and receives its own events by subscription.

Leaving :func:`scene` checks the last two and that the store holds exactly the
events that were acknowledged, in order — nothing refused was ever sequenced.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from websockets.exceptions import ConnectionClosed
from websockets.trio.client import ClientConnection, connect

from agent_sdk import frames as f
from agent_sdk.client import Delivery, RelayClient, Subscription
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.identity import Identity
from agent_sdk.wire import (
    EVENT_DOMAIN,
    MAX_DEPTH,
    Event,
    SignedEvent,
    canonical,
    decode_receipt,
    digest,
    sign_event,
    verify_signature,
)
from relay import server
from relay.node import RelayConfig
from relay.sequencer import Limits
from tests.conftest import RunningRelay, identity, start_relay

NS = "bad@local"
CALM_NS = "calm@local"
TIMEOUT = 10  # seconds: generous bounds on real sockets, never a sleep
DAY_MS = 24 * 3600 * 1000

AGENT = identity(2)
BYSTANDER = identity(7)
STRANGER = identity(9)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


_counter = 0


def event_map(author: Identity = AGENT, **changes: Any) -> dict[str, Any]:
    """A fresh, valid event map (unique body), with ``changes`` applied."""
    global _counter
    _counter += 1
    event = Event(ns=NS, kind="app.note", author=author.public_key, body={"n": _counter})
    fields = event.to_map()
    fields["ts"] = now_ms()
    fields.update(changes)
    return fields


def signed_raw(raw: bytes, signer: Identity = AGENT) -> SignedEvent:
    """Sign arbitrary event bytes as an author would: over the id of exactly these bytes."""
    event_id = digest(raw)
    # ``event`` is only a label here; the relay sees ``raw`` and ``sig``.
    label = Event(ns=NS, kind="app.note", author=signer.public_key)
    return SignedEvent(raw=raw, sig=signer.sign(EVENT_DOMAIN + event_id), id=event_id, event=label)


def valid_event(author: Identity = AGENT, **changes: Any) -> SignedEvent:
    fields = event_map(author, **changes)
    event = Event(**fields)
    return sign_event(event, author.sign)


def publish_bytes(rid: int, event: SignedEvent) -> bytes:
    return f.encode_frame(f.Publish(rid=rid, event=event.raw, sig=event.sig))


# --------------------------------------------------------------------------- raw agent


class RawAgent:
    """One agent speaking raw frames over a real WebSocket."""

    def __init__(self, ws: ClientConnection, who: Identity, hello: f.Hello) -> None:
        self.ws = ws
        self.who = who
        self.hello = hello
        self.next_rid = 100
        self.acked: list[bytes] = []  # ids of events acknowledged on NS, in order
        self.refused: list[bytes] = []  # ids of events the relay refused

    async def send(self, data: bytes | str | dict[str, Any]) -> None:
        if isinstance(data, dict):
            data = msgpack.packb(data, use_bin_type=True)
        await self.ws.send(data)

    async def recv(self) -> f.Frame:
        with trio.fail_after(TIMEOUT):
            message = await self.ws.recv()
        assert isinstance(message, bytes), "the relay sends binary frames only"
        return f.decode_frame(message)

    async def expect_error(
        self, code: ErrorCode, *, rid: int | None = None, sub: int | None = None
    ) -> f.Error:
        frame = await self.recv()
        assert isinstance(frame, f.Error), frame
        assert (ErrorCode(frame.code), frame.name) == (code, code.slug), frame
        assert (frame.rid, frame.sub) == (rid, sub), frame
        return frame

    async def refused_publish(self, event: SignedEvent, code: ErrorCode) -> None:
        """Publish ``event``; the relay must refuse it with ``code`` for this rid."""
        rid = self.take_rid()
        await self.send(publish_bytes(rid, event))
        await self.expect_error(code, rid=rid)
        self.refused.append(event.id)

    def auth_frame(self, *, signer: Identity | None = None) -> f.Auth:
        message = f.agent_auth_message(self.hello.relay, self.hello.challenge)
        sig = (signer or self.who).sign(message)
        return f.Auth(key=self.who.public_key, sig=sig, challenge=secrets.token_bytes(32))

    async def auth(self) -> None:
        auth = self.auth_frame()
        await self.send(f.encode_frame(auth))
        welcome = await self.recv()
        assert isinstance(welcome, f.Welcome), welcome
        assert welcome.agent == self.who.public_key
        proof = f.relay_auth_message(self.who.public_key, auth.challenge)
        assert verify_signature(self.hello.relay, welcome.sig, proof)

    def take_rid(self) -> int:
        self.next_rid += 1
        return self.next_rid

    async def publish_ok(self, event: SignedEvent | None = None) -> f.Ack:
        """Publish a valid event on NS and require its ack (the connection works)."""
        event = event or valid_event(self.who)
        rid = self.take_rid()
        await self.send(publish_bytes(rid, event))
        ack = await self.recv()
        assert isinstance(ack, f.Ack), ack
        assert ack.rid == rid and not ack.duplicate
        receipt = decode_receipt(ack.receipt)
        assert (receipt.id, receipt.ns, receipt.seq) == (event.id, NS, len(self.acked) + 1)
        self.acked.append(event.id)
        return ack


@asynccontextmanager
async def raw_agent(
    url: str, who: Identity = AGENT, *, authenticate: bool = True
) -> AsyncIterator[RawAgent]:
    async with connect(url, compression=None, max_size=1 << 22, proxy=None) as ws:
        with trio.fail_after(TIMEOUT):
            message = await ws.recv()
        assert isinstance(message, bytes)
        hello = f.decode_frame(message)
        assert isinstance(hello, f.Hello)
        agent = RawAgent(ws, who, hello)
        if authenticate:
            await agent.auth()
        yield agent


# --------------------------------------------------------------------------- bystander


class Bystander:
    """A well-behaved agent on the same relay: publishes and reads its own events back."""

    def __init__(self, client: RelayClient, subscription: Subscription) -> None:
        self.client = client
        self.subscription = subscription
        self.acked: list[bytes] = []

    async def round_trip(self) -> None:
        with trio.fail_after(TIMEOUT):
            published = await self.client.publish(CALM_NS, "app.tick", {"n": len(self.acked)})
            assert not published.duplicate
            assert published.receipt.seq == len(self.acked) + 1
            self.acked.append(published.receipt.id)
            async for item in self.subscription:
                if isinstance(item, Delivery):
                    assert item.event.id == published.receipt.id
                    assert item.receipt == published.receipt
                    return
        raise AssertionError("the bystander's subscription ended")


@asynccontextmanager
async def bystander(url: str) -> AsyncIterator[Bystander]:
    async with (
        RelayClient.connect(url, BYSTANDER, reconnect=False) as client,
        client.subscribe(CALM_NS, start=1) as subscription,
    ):
        yield Bystander(client, subscription)


# --------------------------------------------------------------------------- the scene


async def assert_store_holds(relay: RunningRelay, expected: dict[str, list[bytes]]) -> None:
    """The node and its store hold exactly ``expected`` (ids per namespace, in seq order)."""
    expected = {ns: ids for ns, ids in expected.items() if ids}
    node, store = relay.node, relay.node.store
    assert node.namespaces() == sorted(expected)
    assert store.namespaces() == sorted(expected)
    for ns, ids in expected.items():
        assert node.head(ns) == len(ids)
        from_node = await node.read(ns, 1, len(ids) + 10)
        from_store = store.read(ns, 1, len(ids) + 10)
        assert [r.id for r in from_node] == ids
        assert from_store == from_node
        assert [r.seq for r in from_store] == list(range(1, len(ids) + 1))


@asynccontextmanager
async def scene(
    relay: RunningRelay, *, authenticate: bool = True, agent_survives: bool = True
) -> AsyncIterator[tuple[RawAgent, Bystander]]:
    """A misbehaving raw agent and a calm bystander, connected at the same time.

    On a normal exit: the raw agent's connection still gets an ack for a valid publish
    (unless ``agent_survives`` is false: the test closed it on purpose), the bystander
    still round-trips, and the store holds exactly the acknowledged events.
    """
    async with bystander(relay.url) as calm, raw_agent(relay.url, authenticate=authenticate) as bad:
        await calm.round_trip()
        yield bad, calm
        if agent_survives:
            await bad.publish_ok()
        await calm.round_trip()
    await assert_store_holds(relay, {NS: bad.acked, CALM_NS: calm.acked})
    for event_id in bad.refused:
        assert relay.node.store.record(event_id) is None


@pytest.fixture
async def small_relay(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[RunningRelay]:
    """A relay with a 4 KiB frame limit (the WebSocket layer accepts up to 8 KiB)."""
    running = await start_relay(nursery, tmp_path / "small", RelayConfig(max_frame=4096))
    yield running
    running.scope.cancel()


@pytest.fixture
async def impatient_relay(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[RunningRelay]:
    """A relay that waits only 200 ms (real time) for missing dependencies."""
    config = RelayConfig(sequencer=Limits(park_timeout_ms=200))
    running = await start_relay(nursery, tmp_path / "impatient", config)
    yield running
    running.scope.cancel()


# --------------------------------------------------------------------------- frames


def _truncated_publish() -> bytes:
    data = publish_bytes(1, valid_event())
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(_truncated_publish(), id="truncated-publish"),
        pytest.param(b"\x81\xa1t", id="truncated-map"),
        pytest.param(b"", id="empty"),
        pytest.param(publish_bytes(1, valid_event()) + b"\x00", id="trailing-byte"),
        pytest.param("\x81\xa1t\xa7publish", id="text-frame"),
    ],
)
async def test_malformed_msgpack_is_refused(relay: RunningRelay, data: bytes | str) -> None:
    async with scene(relay) as (bad, _):
        await bad.send(data)
        await bad.expect_error(ErrorCode.MALFORMED)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param([[1, 2]], id="bundle-of-array"),
        pytest.param("publish", id="string"),
        pytest.param(42, id="int"),
        pytest.param(None, id="nil"),
        pytest.param({}, id="empty-map"),
        pytest.param({"rid": 1, "event": b"x", "sig": b"y"}, id="no-t"),
        pytest.param({"t": 1}, id="int-t"),
        pytest.param({"t": None}, id="nil-t"),
        pytest.param({b"t": b"publish"}, id="bytes-t"),
    ],
)
async def test_msgpack_that_is_not_a_frame_is_refused(relay: RunningRelay, value: Any) -> None:
    async with scene(relay) as (bad, _):
        await bad.send(msgpack.packb(value, use_bin_type=True))
        await bad.expect_error(ErrorCode.MALFORMED)


@pytest.mark.parametrize("frame_type", ["bogus", "", "PUBLISH", "publish ", "claim"])
async def test_unknown_frame_type_is_refused(relay: RunningRelay, frame_type: str) -> None:
    async with scene(relay) as (bad, _):
        await bad.send({"t": frame_type, "rid": 5})
        await bad.expect_error(ErrorCode.UNKNOWN_FRAME)


RELAY_FRAMES: list[f.RelayFrame] = [
    f.Hello(v=1, relay=bytes(32), name="x", challenge=bytes(32), max_frame=1, max_deps=1),
    f.Welcome(agent=bytes(32), sig=bytes(64)),
    f.Ack(rid=5, receipt=b"receipt"),
    f.Error(code=1001, name="malformed", reason="no", rid=5),
    f.EventFrame(sub=1, event=b"e", sig=b"s", receipt=b"r"),
    f.Live(sub=1, ns=NS, seq=0),
    f.Unsubscribed(sub=1),
]


@pytest.mark.parametrize("frame", RELAY_FRAMES, ids=[frame.t for frame in RELAY_FRAMES])
async def test_relay_only_frame_from_an_agent_is_refused(
    relay: RunningRelay, frame: f.RelayFrame
) -> None:
    async with scene(relay) as (bad, _):
        await bad.send(f.encode_frame(frame))
        # Only a publish's rid is echoed: these frames are not requests.
        await bad.expect_error(ErrorCode.UNKNOWN_FRAME)


def _publish_fields(**changes: Any) -> dict[str, Any]:
    event = valid_event()
    fields: dict[str, Any] = {"t": "publish", "rid": 5, "event": event.raw, "sig": event.sig}
    fields.update(changes)
    return {key: value for key, value in fields.items() if value is not _DROP}


_DROP = object()


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(_publish_fields(rid="5"), id="publish-rid-str"),
        pytest.param(_publish_fields(rid=True), id="publish-rid-bool"),
        pytest.param(_publish_fields(rid=1.5), id="publish-rid-float"),
        pytest.param(_publish_fields(rid=None), id="publish-rid-nil"),
        pytest.param(_publish_fields(event="text"), id="publish-event-str"),
        pytest.param(_publish_fields(sig=[1, 2]), id="publish-sig-array"),
        pytest.param(_publish_fields(sig=_DROP), id="publish-sig-missing"),
        pytest.param({"t": "subscribe", "sub": 1, "ns": NS}, id="subscribe-ns-str"),
        pytest.param({"t": "subscribe", "sub": 1, "ns": [NS], "from": {NS: "1"}}, id="from-str"),
        pytest.param({"t": "subscribe", "sub": 1, "ns": [NS], "from": [1]}, id="from-array"),
        pytest.param({"t": "subscribe", "sub": 1, "ns": [NS], "authors": ["a"]}, id="authors"),
        pytest.param({"t": "subscribe", "sub": False, "ns": [NS]}, id="subscribe-sub-bool"),
        pytest.param({"t": "unsubscribe", "sub": 1.0}, id="unsubscribe-sub-float"),
        pytest.param({"t": "auth", "key": "k", "sig": b"s", "challenge": b"c"}, id="auth-key-str"),
        pytest.param({"t": "doc.open", "sub": 1, "ns": NS, "doc": 5}, id="doc-open-doc-int"),
        pytest.param({"t": "doc.open", "sub": 1, "ns": NS, "doc": "d", "sv": "x"}, id="sv-str"),
        pytest.param({"t": "doc.open", "sub": 1, "ns": NS}, id="doc-open-doc-missing"),
        pytest.param({"t": "doc.awareness", "sub": 1, "update": [1]}, id="awareness-array"),
        pytest.param({"t": "query", "rid": 1, "ns": NS, "q": "wo.list", "args": [1]}, id="args"),
    ],
)
async def test_frame_with_a_wrong_field_type_is_refused(
    relay: RunningRelay, fields: dict[str, Any]
) -> None:
    async with scene(relay) as (bad, _):
        await bad.send(fields)
        # The frame did not decode, so there is no rid or sub to echo.
        await bad.expect_error(ErrorCode.MALFORMED)


# --------------------------------------------------------------------------- frame size


def publish_of_size(size: int) -> tuple[bytes, SignedEvent]:
    """A valid publish frame of exactly ``size`` bytes (for sizes of a few KiB)."""

    def build(padding: int) -> tuple[bytes, SignedEvent]:
        event = valid_event(body={"pad": b"x" * padding, "n": secrets.token_hex(4)})
        return publish_bytes(1, event), event

    base, _ = build(1000)
    data, event = build(1000 + size - len(base))
    assert len(data) == size
    return data, event


async def test_frame_at_the_limit_is_accepted(small_relay: RunningRelay) -> None:
    async with scene(small_relay) as (bad, _):
        data, event = publish_of_size(4096)
        await bad.send(data)
        ack = await bad.recv()
        assert isinstance(ack, f.Ack) and ack.rid == 1
        assert decode_receipt(ack.receipt).id == event.id
        bad.acked.append(event.id)


@pytest.mark.parametrize("size", [4097, 5000, 8192])
async def test_oversized_frame_is_discarded_and_the_connection_lives(
    small_relay: RunningRelay, size: int
) -> None:
    async with scene(small_relay) as (bad, _):
        data, event = publish_of_size(size)
        await bad.send(data)
        # Discarded unread: not even the rid is looked at.
        await bad.expect_error(ErrorCode.FRAME_TOO_LARGE)
        bad.refused.append(event.id)


async def test_frame_over_twice_the_limit_closes_only_that_connection(
    small_relay: RunningRelay,
) -> None:
    async with scene(small_relay, agent_survives=False) as (bad, calm):
        data, event = publish_of_size(8193)
        await bad.send(data)
        with pytest.raises(ConnectionClosed) as closed:
            await bad.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009  # message too big
        bad.refused.append(event.id)
        await calm.round_trip()
        # The same agent can come straight back on a new connection.
        async with raw_agent(small_relay.url) as again:
            again.acked = bad.acked
            await again.publish_ok()


# --------------------------------------------------------------------------- signatures


def _flip_bit(index: int, mask: int) -> Callable[[SignedEvent], SignedEvent]:
    def mutate(event: SignedEvent) -> SignedEvent:
        sig = bytearray(event.sig)
        sig[index] ^= mask
        return SignedEvent(raw=event.raw, sig=bytes(sig), id=event.id, event=event.event)

    return mutate


def _other_events_sig(event: SignedEvent) -> SignedEvent:
    other = valid_event()
    return SignedEvent(raw=event.raw, sig=other.sig, id=event.id, event=event.event)


def _tampered_body(event: SignedEvent) -> SignedEvent:
    # Still canonical, still the right shape: only the signature can tell.
    raw = event.raw.replace(b"\xa1n", b"\xa1m")
    assert raw != event.raw and raw == canonical(msgpack.unpackb(raw))
    return SignedEvent(raw=raw, sig=event.sig, id=digest(raw), event=event.event)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(_flip_bit(0, 0x01), id="first-bit"),
        pytest.param(_flip_bit(40, 0x10), id="middle-bit"),
        pytest.param(_flip_bit(63, 0x80), id="last-bit"),
        pytest.param(_other_events_sig, id="another-events-sig"),
        pytest.param(_tampered_body, id="tampered-bytes"),
    ],
)
async def test_bad_signature_is_refused(
    relay: RunningRelay, mutate: Callable[[SignedEvent], SignedEvent]
) -> None:
    async with scene(relay) as (bad, _):
        await bad.refused_publish(mutate(valid_event()), ErrorCode.BAD_SIGNATURE)


@pytest.mark.parametrize("workers", [0, 1], ids=["on-the-loop", "checking-process"])
async def test_bad_signatures_inside_a_bundle_are_refused_one_by_one(
    nursery: trio.Nursery, tmp_path: Path, workers: int
) -> None:
    """Signatures of one message are checked together (relay/signatures.py), in runs
    of up to 64: each bad one still gets its own error, every good one its ack, in
    the order sent, and a query in the middle sees the publishes before it."""
    relay = await start_relay(nursery, tmp_path / "r", RelayConfig(verify_workers=workers))
    if workers:
        with trio.fail_after(TIMEOUT):
            await relay.node.signatures.started()  # else the first run is checked inline
    bad_at = {0, 5, 63, 64, 100, 149}
    async with scene(relay) as (bad, _):
        events = [valid_event(body={"n": n}) for n in range(150)]
        frames = []
        for n, event in enumerate(events):
            frames.append(
                publish_bytes(1000 + n, _flip_bit(7, 0x04)(event) if n in bad_at else event)
            )
        await bad.send(f.bundle(frames))
        answers: list[f.Frame] = []
        while len(answers) < 150:  # the relay bundles its answers too
            with trio.fail_after(TIMEOUT):
                message = await bad.ws.recv()
            assert isinstance(message, bytes)
            for item in f.decode_message(message):
                assert not isinstance(item, ProtocolError), item
                answers.append(item)
        refused = [a.rid for a in answers if isinstance(a, f.Error)]
        acked = [a.rid for a in answers if isinstance(a, f.Ack)]
        assert refused == [1000 + n for n in sorted(bad_at)]
        assert all(
            a.code == int(ErrorCode.BAD_SIGNATURE) for a in answers if isinstance(a, f.Error)
        )
        good = [n for n in range(150) if n not in bad_at]
        assert acked == [1000 + n for n in good]
        seqs = [decode_receipt(a.receipt).seq for a in answers if isinstance(a, f.Ack)]
        assert seqs == list(range(1, len(good) + 1))
        bad.acked += [events[n].id for n in good]
        bad.refused += [events[n].id for n in sorted(bad_at)]
    assert relay.node.signatures.offloaded == (0 if workers == 0 else 150)
    relay.scope.cancel()


@pytest.mark.parametrize("length", [0, 32, 63, 65, 128])
async def test_signature_of_the_wrong_length_is_refused(relay: RunningRelay, length: int) -> None:
    async with scene(relay) as (bad, _):
        event = valid_event()
        sig = (event.sig * 2)[:length]
        odd = SignedEvent(raw=event.raw, sig=sig, id=event.id, event=event.event)
        await bad.refused_publish(odd, ErrorCode.BAD_SIGNATURE)


async def test_event_by_another_author_is_refused(relay: RunningRelay) -> None:
    async with scene(relay) as (bad, _):
        # Validly signed, by its own author; but this connection proved another key.
        await bad.refused_publish(valid_event(STRANGER), ErrorCode.WRONG_AUTHOR)
        # Claiming the stranger's key while signing with ours fails the same way.
        raw = canonical(event_map(STRANGER))
        await bad.refused_publish(signed_raw(raw, AGENT), ErrorCode.WRONG_AUTHOR)


# --------------------------------------------------------------------------- event bytes


def _unsorted_keys() -> bytes:
    fields = event_map()
    raw = msgpack.packb(fields, use_bin_type=True)  # insertion order: v, ns, kind, ...
    assert list(fields) != sorted(fields) and raw != canonical(fields)
    return bytes(raw)


def _replace_once(old: bytes, new: bytes) -> Callable[[], bytes]:
    def build() -> bytes:
        raw = canonical(event_map())
        assert raw.count(old) == 1
        return raw.replace(old, new)

    return build


def _long_map_header() -> bytes:
    raw = canonical(event_map())
    assert raw[0] == 0x87  # fixmap of 7
    return b"\xde\x00\x07" + raw[1:]


def _float32_body() -> bytes:
    fields = event_map(body=0.5)
    raw = canonical(fields)
    float64 = b"\xcb" + b"\x3f\xe0" + bytes(6)
    assert raw.count(float64) == 1
    return raw.replace(float64, b"\xca\x3f\x00\x00\x00")


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(_unsorted_keys, id="unsorted-keys"),
        pytest.param(_replace_once(b"\xa1v\x01", b"\xa1v\xcc\x01"), id="uint8-for-fixint"),
        pytest.param(_replace_once(b"\xa4body", b"\xd9\x04body"), id="str8-for-fixstr"),
        pytest.param(_replace_once(b"\xa9bad@local", b"\xd9\x09bad@local"), id="str8-value"),
        pytest.param(_long_map_header, id="map16-for-fixmap"),
        pytest.param(_float32_body, id="float32"),
    ],
)
async def test_non_canonical_event_bytes_are_refused(
    relay: RunningRelay, build: Callable[[], bytes]
) -> None:
    raw = build()
    assert msgpack.unpackb(raw) == msgpack.unpackb(canonical(msgpack.unpackb(raw)))
    async with scene(relay) as (bad, _):
        # Properly signed over these very bytes: only their encoding is wrong.
        await bad.refused_publish(signed_raw(raw), ErrorCode.NON_CANONICAL)


def _without(key: str) -> dict[str, Any]:
    fields = event_map()
    del fields[key]
    return fields


@pytest.mark.parametrize(
    ("value", "code"),
    [
        pytest.param(_without("body"), ErrorCode.BAD_EVENT, id="missing-body"),
        pytest.param(_without("ts"), ErrorCode.BAD_EVENT, id="missing-ts"),
        pytest.param(_without("author"), ErrorCode.BAD_EVENT, id="missing-author"),
        pytest.param(event_map(extra=1), ErrorCode.BAD_EVENT, id="extra-field"),
        pytest.param(event_map(v=2), ErrorCode.BAD_EVENT, id="version-2"),
        pytest.param(event_map(ns="no-home"), ErrorCode.BAD_EVENT, id="ns-without-home"),
        pytest.param(event_map(kind="App.Note"), ErrorCode.BAD_EVENT, id="kind-uppercase"),
        pytest.param(event_map(ts=-1), ErrorCode.BAD_EVENT, id="ts-negative"),
        pytest.param(event_map(ts="now"), ErrorCode.BAD_EVENT, id="ts-str"),
        pytest.param(event_map(deps=[b"x" * 31]), ErrorCode.BAD_EVENT, id="dep-31-bytes"),
        pytest.param(event_map(deps=[b"d" * 32] * 2), ErrorCode.BAD_EVENT, id="dep-repeated"),
        pytest.param(event_map(nonce=b"n" * 33), ErrorCode.BAD_EVENT, id="nonce-too-long"),
        pytest.param([1, 2, 3], ErrorCode.BAD_EVENT, id="event-array"),
    ],
)
async def test_event_with_a_bad_field_is_refused(
    relay: RunningRelay, value: Any, code: ErrorCode
) -> None:
    raw = canonical(value)
    async with scene(relay) as (bad, _):
        await bad.refused_publish(signed_raw(raw), code)


async def test_event_bytes_that_are_not_msgpack_are_refused(relay: RunningRelay) -> None:
    async with scene(relay) as (bad, _):
        raw = canonical(event_map())[:-3]
        await bad.refused_publish(signed_raw(raw), ErrorCode.MALFORMED)


async def test_too_many_deps_are_refused(relay: RunningRelay) -> None:
    assert relay.node.config.max_deps == 32
    async with scene(relay) as (bad, _):
        deps = [secrets.token_bytes(32) for _ in range(33)]
        await bad.refused_publish(valid_event(deps=deps), ErrorCode.TOO_MANY_DEPS)


# --------------------------------------------------------------------------- connection state


@pytest.mark.parametrize(
    ("frame", "rid", "sub"),
    [
        pytest.param(f.Publish(rid=5, event=b"e", sig=b"s"), 5, None, id="publish"),
        pytest.param(f.Subscribe(sub=3, ns=(NS,)), None, 3, id="subscribe"),
        pytest.param(f.Unsubscribe(sub=4), None, 4, id="unsubscribe"),
        pytest.param(f.DocOpen(sub=5, ns=NS, doc="d"), None, 5, id="doc-open"),
        pytest.param(f.DocAwareness(sub=6, update=b"\x00"), None, 6, id="doc-awareness"),
        pytest.param(f.Query(rid=7, ns=NS, q="wo.list"), 7, None, id="query"),
    ],
)
async def test_request_before_auth_is_refused(
    relay: RunningRelay, frame: f.AgentFrame, rid: int | None, sub: int | None
) -> None:
    async with scene(relay, authenticate=False) as (bad, _):
        await bad.send(f.encode_frame(frame))
        await bad.expect_error(ErrorCode.NOT_AUTHENTICATED, rid=rid, sub=sub)
        await bad.send(publish_bytes(6, valid_event()))
        await bad.expect_error(ErrorCode.NOT_AUTHENTICATED, rid=6)
        await bad.auth()


async def test_second_auth_is_refused(relay: RunningRelay) -> None:
    async with scene(relay) as (bad, _):
        await bad.send(f.encode_frame(bad.auth_frame()))
        await bad.expect_error(ErrorCode.ALREADY_AUTHENTICATED)


def _auth_by_another_key(bad: RawAgent) -> f.Auth:
    return bad.auth_frame(signer=STRANGER)


def _auth_flipped(bad: RawAgent) -> f.Auth:
    auth = bad.auth_frame()
    return f.Auth(
        key=auth.key, sig=bytes([auth.sig[0] ^ 1]) + auth.sig[1:], challenge=auth.challenge
    )


def _auth_other_challenge(bad: RawAgent) -> f.Auth:
    sig = bad.who.sign(f.agent_auth_message(bad.hello.relay, secrets.token_bytes(32)))
    return f.Auth(key=bad.who.public_key, sig=sig, challenge=secrets.token_bytes(32))


def _auth_other_relay(bad: RawAgent) -> f.Auth:
    sig = bad.who.sign(f.agent_auth_message(bytes(32), bad.hello.challenge))
    return f.Auth(key=bad.who.public_key, sig=sig, challenge=secrets.token_bytes(32))


def _auth_short_sig(bad: RawAgent) -> f.Auth:
    auth = bad.auth_frame()
    return f.Auth(key=auth.key, sig=auth.sig[:63], challenge=auth.challenge)


def _auth_short_key(bad: RawAgent) -> f.Auth:
    auth = bad.auth_frame()
    return f.Auth(key=auth.key[:31], sig=auth.sig, challenge=auth.challenge)


def _auth_short_challenge(bad: RawAgent) -> f.Auth:
    auth = bad.auth_frame()
    return f.Auth(key=auth.key, sig=auth.sig, challenge=auth.challenge[:16])


@pytest.mark.parametrize(
    ("build", "code"),
    [
        pytest.param(_auth_by_another_key, ErrorCode.AUTH_FAILED, id="another-key"),
        pytest.param(_auth_flipped, ErrorCode.AUTH_FAILED, id="flipped-bit"),
        pytest.param(_auth_other_challenge, ErrorCode.AUTH_FAILED, id="other-challenge"),
        pytest.param(_auth_other_relay, ErrorCode.AUTH_FAILED, id="other-relay"),
        pytest.param(_auth_short_sig, ErrorCode.AUTH_FAILED, id="short-sig"),
        pytest.param(_auth_short_key, ErrorCode.AUTH_FAILED, id="short-key"),
        pytest.param(_auth_short_challenge, ErrorCode.MALFORMED, id="short-challenge"),
    ],
)
async def test_bad_auth_is_refused_and_a_good_one_still_works(
    relay: RunningRelay, build: Callable[[RawAgent], f.Auth], code: ErrorCode
) -> None:
    async with scene(relay, authenticate=False) as (bad, _):
        await bad.send(f.encode_frame(build(bad)))
        await bad.expect_error(code)
        # Still unauthenticated: nothing was granted by the failed attempt.
        await bad.send(publish_bytes(6, valid_event()))
        await bad.expect_error(ErrorCode.NOT_AUTHENTICATED, rid=6)
        await bad.auth()


# --------------------------------------------------------------------------- routing, cursors


async def test_namespace_homed_elsewhere_is_refused(relay: RunningRelay) -> None:
    async with scene(relay) as (bad, _):
        await bad.refused_publish(valid_event(ns="x@other"), ErrorCode.NOT_HOME)
        await bad.send(f.encode_frame(f.Subscribe(sub=8, ns=(CALM_NS, "x@other"))))
        await bad.expect_error(ErrorCode.NOT_HOME, sub=8)


@pytest.mark.parametrize("start", [0, 3, 1000])
async def test_subscribe_past_the_head_is_refused(relay: RunningRelay, start: int) -> None:
    async with scene(relay) as (bad, _):
        await bad.publish_ok()  # head is 1: from may be 1 or 2
        await bad.send(f.encode_frame(f.Subscribe(sub=4, ns=(NS,), start={NS: start})))
        await bad.expect_error(ErrorCode.BAD_CURSOR, sub=4)
        # head + 1 is allowed: live straight away. The refused sub id is free to reuse.
        await bad.send(f.encode_frame(f.Subscribe(sub=4, ns=(NS,), start={NS: 2})))
        assert await bad.recv() == f.Live(sub=4, ns=NS, seq=1)
        await bad.send(f.encode_frame(f.Unsubscribe(sub=4)))
        assert await bad.recv() == f.Unsubscribed(sub=4)


def _subscribe(**changes: Any) -> f.Subscribe:
    return f.Subscribe(**{"sub": 5, "ns": (CALM_NS,), **changes})


@pytest.mark.parametrize(
    "subscribe",
    [
        pytest.param(_subscribe(ns=()), id="no-namespace"),
        pytest.param(_subscribe(ns=("not a namespace",)), id="bad-namespace"),
        pytest.param(_subscribe(start={NS: 1}), id="from-of-a-namespace-not-subscribed"),
        pytest.param(_subscribe(kinds=("app.",)), id="kind-ending-in-a-dot"),
        pytest.param(_subscribe(kinds=("*",)), id="bare-star"),
        pytest.param(_subscribe(kinds=("app.**",)), id="double-star"),
        pytest.param(_subscribe(kinds=("app*",)), id="star-without-dot"),
        pytest.param(_subscribe(kinds=("App.note",)), id="not-a-kind"),
        pytest.param(_subscribe(authors=(b"k" * 31,)), id="short-author"),
        pytest.param(_subscribe(kinds=("app.note",) * 257), id="257-kinds"),
        pytest.param(_subscribe(authors=(b"k" * 32,) * 257), id="257-authors"),
    ],
)
async def test_an_invalid_subscribe_is_malformed(
    relay: RunningRelay, subscribe: f.Subscribe
) -> None:
    """Each rule of 7.1's malformed row, answered with 1001 and the sub; the id is
    free again (nothing opened), and 256 items of each are allowed. (257 namespaces
    would follow more than max_follows: 3003, checked first.)"""
    async with scene(relay) as (bad, _):
        await bad.send(f.encode_frame(subscribe))
        await bad.expect_error(ErrorCode.MALFORMED, sub=5)
        at_limit = _subscribe(
            kinds=("app.note",) * 256, authors=(b"k" * 32,) * 256, ns=(CALM_NS,) * 256
        )
        await bad.send(f.encode_frame(at_limit))
        live = await bad.recv()
        assert isinstance(live, f.Live) and live.sub == 5, live
        await bad.send(f.encode_frame(f.Unsubscribe(sub=5)))
        while not isinstance(frame := await bad.recv(), f.Unsubscribed):
            assert isinstance(frame, f.Live) and frame.sub == 5, frame


async def test_unsubscribe_of_an_unknown_subscription_is_refused(relay: RunningRelay) -> None:
    async with scene(relay) as (bad, _):
        await bad.send(f.encode_frame(f.Unsubscribe(sub=77)))
        await bad.expect_error(ErrorCode.UNKNOWN_SUBSCRIPTION, sub=77)
        # Unsubscribing twice: the second time the subscription is unknown.
        await bad.send(f.encode_frame(f.Subscribe(sub=78, ns=(CALM_NS,))))
        assert await bad.recv() == f.Live(sub=78, ns=CALM_NS, seq=1)
        await bad.send(f.encode_frame(f.Unsubscribe(sub=78)))
        assert await bad.recv() == f.Unsubscribed(sub=78)
        await bad.send(f.encode_frame(f.Unsubscribe(sub=78)))
        await bad.expect_error(ErrorCode.UNKNOWN_SUBSCRIPTION, sub=78)


async def test_document_subscription_misuse_is_refused(relay: RunningRelay) -> None:
    async with scene(relay) as (bad, _):
        await bad.send(f.encode_frame(f.DocOpen(sub=20, ns=NS, doc="nowhere")))
        await bad.expect_error(ErrorCode.UNKNOWN_DOC, sub=20)
        await bad.send(f.encode_frame(f.DocAwareness(sub=21, update=b"\x00")))
        await bad.expect_error(ErrorCode.UNKNOWN_SUBSCRIPTION, sub=21)
        await bad.send(f.encode_frame(f.DocOpen(sub=22, ns="doc@elsewhere", doc="d")))
        await bad.expect_error(ErrorCode.NOT_HOME, sub=22)
        # A subscription id in use is refused for a document too.
        await bad.send(f.encode_frame(f.Subscribe(sub=23, ns=(CALM_NS,))))
        assert await bad.recv() == f.Live(sub=23, ns=CALM_NS, seq=1)
        await bad.send(f.encode_frame(f.DocOpen(sub=23, ns=NS, doc="d")))
        await bad.expect_error(ErrorCode.DUPLICATE_SUBSCRIPTION, sub=23)
        await bad.send(f.encode_frame(f.Unsubscribe(sub=23)))
        assert await bad.recv() == f.Unsubscribed(sub=23)


async def test_an_inbox_stream_and_a_subscription_cannot_share_an_id(
    relay: RunningRelay,
) -> None:
    """``msg.inbox`` takes its id from the same space as ``subscribe`` (protocol §1)."""
    async with scene(relay) as (bad, _):
        await bad.send(f.encode_frame(f.MsgInbox(sub=30)))
        assert await bad.recv() == f.Live(sub=30, ns="", seq=0)  # an empty inbox
        await bad.send(f.encode_frame(f.Subscribe(sub=30, ns=(CALM_NS,))))
        await bad.expect_error(ErrorCode.DUPLICATE_SUBSCRIPTION, sub=30)
        await bad.send(f.encode_frame(f.Unsubscribe(sub=30)))
        assert await bad.recv() == f.Unsubscribed(sub=30)
        await bad.send(f.encode_frame(f.Subscribe(sub=31, ns=(CALM_NS,))))
        assert await bad.recv() == f.Live(sub=31, ns=CALM_NS, seq=1)
        await bad.send(f.encode_frame(f.MsgInbox(sub=31)))
        await bad.expect_error(ErrorCode.DUPLICATE_SUBSCRIPTION, sub=31)
        await bad.send(f.encode_frame(f.Unsubscribe(sub=31)))
        assert await bad.recv() == f.Unsubscribed(sub=31)  # the subscription, still open


async def test_an_inbox_closed_and_opened_again_in_one_bundle_is_one_stream(
    relay: RunningRelay,
) -> None:
    """The old stream ends before its ``unsubscribed``, and its end is not taken for
    another connection's opening (which would orphan the new stream: acks refused)."""
    from agent_sdk.sealing import Header, seal

    async def frames_until(done: Callable[[list[f.Frame]], bool]) -> list[f.Frame]:
        got: list[f.Frame] = []
        while not got or not done(got):
            with trio.fail_after(TIMEOUT):
                message = await bad.ws.recv()
            assert isinstance(message, bytes)
            got += f.decode_message(message)
        return got

    async with scene(relay) as (bad, _):
        again = [f.MsgInbox(sub=30), f.Unsubscribe(sub=30), f.MsgInbox(sub=30)]
        await bad.send(f.bundle([f.encode_frame(frame) for frame in again]))
        closed, live = f.Unsubscribed(sub=30), f.Live(sub=30, ns="", seq=0)
        got = await frames_until(lambda got: closed in got and got[-1] == live)
        assert got == [closed, live]  # the new stream's live; nothing of the old one
        header = Header(
            id=secrets.token_bytes(16), sender=STRANGER.public_key,
            recipient=AGENT.public_key, stream=b"s" * 8, seq=1, ts=now_ms(),
        )  # fmt: skip
        async with raw_agent(relay.url, STRANGER) as sender:
            sealed = seal(STRANGER, header, {"n": 1}).encode()
            await sender.send(f.encode_frame(f.MsgSend(rid=1, msg=sealed)))
            assert isinstance(await sender.recv(), f.Result)
        [item] = await frames_until(lambda got: True)
        assert isinstance(item, f.MsgItem) and item.sub == 30
        await bad.send(f.encode_frame(f.MsgAck(sub=30, seq=item.seq)))
        await bad.send(f.encode_frame(f.MsgConfirm(rid=7)))
        assert await frames_until(lambda got: True) == [f.Result(rid=7, body={})]
        assert relay.node.inboxes.size(AGENT.public_key) == 0  # the ack was taken
        await bad.send(f.encode_frame(f.Unsubscribe(sub=30)))
        assert await frames_until(lambda got: True) == [f.Unsubscribed(sub=30)]


# --------------------------------------------------------------------------- sequencing


async def test_event_whose_deps_never_arrive_is_refused(impatient_relay: RunningRelay) -> None:
    async with scene(impatient_relay) as (bad, _):
        orphan = valid_event(deps=[secrets.token_bytes(32)])
        await bad.send(publish_bytes(5, orphan))
        # While it waits, the connection carries on: a later publish is acked, in
        # whichever order the two answers come.
        follower = valid_event()
        await bad.send(publish_bytes(6, follower))
        answers: dict[int, f.Frame] = {}
        while len(answers) < 2:
            frame = await bad.recv()
            assert isinstance(frame, (f.Ack, f.Error)) and frame.rid is not None, frame
            answers[frame.rid] = frame
        error, ack = answers[5], answers[6]
        assert isinstance(error, f.Error)
        assert (ErrorCode(error.code), error.name) == (ErrorCode.MISSING_DEPS, "missing_deps")
        assert isinstance(ack, f.Ack)
        assert decode_receipt(ack.receipt).id == follower.id
        bad.acked.append(follower.id)
        bad.refused.append(orphan.id)
        assert impatient_relay.node.sequencer.parked_count == 0


@pytest.mark.parametrize(
    "offset_ms",
    [
        pytest.param(-2 * DAY_MS, id="two-days-ago"),
        pytest.param(2 * DAY_MS, id="in-two-days"),
        pytest.param(None, id="epoch"),
    ],
)
async def test_event_far_from_the_relay_clock_is_refused(
    relay: RunningRelay, offset_ms: int | None
) -> None:
    async with scene(relay) as (bad, _):
        ts = 0 if offset_ms is None else now_ms() + offset_ms
        await bad.refused_publish(valid_event(ts=ts), ErrorCode.BAD_TIMESTAMP)


# --------------------------------------------------------------------------- all at once


async def test_one_connection_survives_a_stream_of_bad_input(relay: RunningRelay) -> None:
    """Bad input of every kind in turn, valid publishes in between, on one connection."""
    async with scene(relay) as (bad, calm):
        for data, code in [
            (b"\xc1", ErrorCode.MALFORMED),
            (msgpack.packb([1]), ErrorCode.MALFORMED),
            (msgpack.packb({"t": "bogus"}), ErrorCode.UNKNOWN_FRAME),
            (f.encode_frame(RELAY_FRAMES[2]), ErrorCode.UNKNOWN_FRAME),
            (msgpack.packb({"t": "publish", "rid": "1"}), ErrorCode.MALFORMED),
            (f.encode_frame(bad.auth_frame()), ErrorCode.ALREADY_AUTHENTICATED),
        ]:
            await bad.send(data)
            await bad.expect_error(code)
            await bad.publish_ok()
        for event, code in [
            (_flip_bit(0, 1)(valid_event()), ErrorCode.BAD_SIGNATURE),
            (signed_raw(_unsorted_keys()), ErrorCode.NON_CANONICAL),
            (signed_raw(canonical(event_map(extra=1))), ErrorCode.BAD_EVENT),
            (valid_event(STRANGER), ErrorCode.WRONG_AUTHOR),
            (
                valid_event(deps=[secrets.token_bytes(32) for _ in range(33)]),
                ErrorCode.TOO_MANY_DEPS,
            ),
            (valid_event(ns="x@other"), ErrorCode.NOT_HOME),
            (valid_event(ts=now_ms() - 2 * DAY_MS), ErrorCode.BAD_TIMESTAMP),
        ]:
            await bad.refused_publish(event, code)
            await bad.publish_ok()
            await calm.round_trip()


# --------------------------------------------------------------------------- found by review


async def test_a_bundle_of_too_many_frames_is_refused_whole(relay: RunningRelay) -> None:
    """A million nils would cost a million errors; past 4096 frames it costs one."""
    async with scene(relay, authenticate=False) as (bad, _):
        await bad.send(
            b"\xdd" + (f.MAX_BUNDLE + 1).to_bytes(4, "big") + b"\xc0" * (f.MAX_BUNDLE + 1)
        )
        error = await bad.expect_error(ErrorCode.MALFORMED)
        assert f"at most {f.MAX_BUNDLE}" in error.reason
        await bad.auth()  # nothing of it was acted on, one error said so


async def test_a_bad_challenge_is_refused_before_any_signature_check(
    relay: RunningRelay,
) -> None:
    """A 1001 does not count toward the 3 failed auths: it must not cost a check."""
    async with scene(relay, authenticate=False) as (bad, _):
        for _ in range(5):  # a wrong signature and a short challenge: 1001, not 1005
            auth = bad.auth_frame(signer=STRANGER)
            await bad.send(f.encode_frame(f.Auth(key=auth.key, sig=auth.sig, challenge=b"x")))
            await bad.expect_error(ErrorCode.MALFORMED)
        await bad.auth()


async def test_two_messages_with_one_rid_get_their_own_answers(relay: RunningRelay) -> None:
    """Nothing makes rids unique (6.4): answers follow the frames, not the rid."""
    from agent_sdk.sealing import Header, seal

    def message(n: int) -> bytes:
        header = Header(
            id=secrets.token_bytes(16),
            sender=AGENT.public_key,
            recipient=BYSTANDER.public_key,
            stream=b"s" * 8,
            seq=n,
            ts=now_ms(),
        )
        return seal(AGENT, header, {"n": n}).encode()

    async with scene(relay) as (bad, _):
        here, elsewhere = message(1), message(2)
        frames = [
            f.encode_frame(f.MsgSend(rid=5, msg=here)),
            f.encode_frame(f.MsgSend(rid=5, msg=elsewhere, relay="elsewhere")),
            f.encode_frame(f.MsgSend(rid=5, msg=message(3))),
        ]
        await bad.send(f.bundle(frames))
        answers: list[f.Frame | ProtocolError] = []
        while len(answers) < 3:
            with trio.fail_after(TIMEOUT):
                message = await bad.ws.recv()
            assert isinstance(message, bytes)
            answers += f.decode_message(message)
        stored, nowhere, third = answers
        assert isinstance(stored, f.Result) and stored.rid == 5
        assert stored.body["status"] == "stored"
        assert isinstance(nowhere, f.Error) and nowhere.rid == 5  # no such relay
        assert ErrorCode(nowhere.code) is ErrorCode.UNKNOWN_RECIPIENT, nowhere
        assert isinstance(third, f.Result) and third.body["id"] != stored.body["id"]


async def test_http_with_a_header_on_two_lines_and_info_of_private_namespaces(
    relay: RunningRelay,
) -> None:
    import json

    async with RelayClient.connect(relay.url, AGENT) as client:
        policy = {"mode": "private", "owner": AGENT.public_key}
        await client.publish("secret@local", "ns.policy", policy)
        await client.publish(CALM_NS, "app.note", "public")
    host, port = relay.url.removeprefix("ws://").rsplit(":", 1)
    request = "GET /info HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n"
    answer = b""
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(request.encode())
        with trio.fail_after(TIMEOUT):
            while chunk := await stream.receive_some():
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head  # was 500: two Connection lines
    assert json.loads(body)["namespaces"] == [CALM_NS]  # the private one is not listed


def nested(depth: int) -> Any:
    """``depth`` lists, one inside the other, around a 0."""
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


async def test_values_nested_too_deep_are_refused_and_the_relay_lives_on(
    relay: RunningRelay,
) -> None:
    """Code that walks a value recursively (a reason quoting it, a schema check, JSON
    output) ran out of stack on a 1000-deep one: in a schema check that stopped the
    whole relay, in a reason the sender's connection, in `formicary tail` every reader."""
    deep = b"\x91" * 1000 + b"\x00"
    async with scene(relay) as (bad, calm):
        register = {"kind": "app.x", "version": 1, "schema": {"type": "object"}}
        await bad.publish_ok(valid_event(kind="schema.register", body=register))
        # The event's map is level 1: a body of MAX_DEPTH - 1 more levels is within.
        await bad.publish_ok(valid_event(kind="app.x", body={"a": nested(MAX_DEPTH - 2)}))
        too_deep = valid_event(kind="app.x", body={"$schema": nested(MAX_DEPTH)})
        await bad.refused_publish(too_deep, ErrorCode.BAD_EVENT)
        deeper = b"\x91" * 1100 + b"\x00"  # past msgpack's own limit (1024): not decodable
        for key, value, levels in (
            (b"\xa1v", b"\x01", deep),
            (b"\xa4kind", b"\xa8app.note", deep),
            (b"\xa4body", canonical({}), deeper),
        ):  # quoted, or not decodable at all: the event is too deep either way
            raw = canonical(event_map(body={}))
            assert raw.count(key + value) == 1
            raw = raw.replace(key + value, key + levels)
            await bad.refused_publish(signed_raw(raw), ErrorCode.BAD_EVENT)
            await calm.round_trip()
        # A frame, too: only that one is refused, the others of its bundle are answered.
        rid = bad.take_rid()
        deep_query = msgpack.packb(
            {"t": "query", "rid": rid + 1, "ns": NS, "q": "wo.list", "args": {"x": nested(200)}}
        )
        event = valid_event()
        await bad.send(f.bundle([publish_bytes(rid, event), deep_query]))
        answers = [await bad.recv(), await bad.recv()]  # the error comes before the commit
        [ack] = [a for a in answers if isinstance(a, f.Ack)]
        [error] = [a for a in answers if isinstance(a, f.Error)]
        assert ack.rid == rid and (error.code, error.rid) == (ErrorCode.MALFORMED, None)
        assert f"over {MAX_DEPTH} levels" in error.reason
        bad.acked.append(event.id)
        # Past 1024 levels msgpack cannot tell where the frame ends: the whole message
        # is refused, once, saying why (none of it acted on).
        deeper_query = deep_query.replace(b"\x91\x91", b"\x91" * 1100, 1)
        refused = valid_event()
        await bad.send(f.bundle([publish_bytes(rid + 2, refused), deeper_query]))
        error = await bad.expect_error(ErrorCode.MALFORMED)
        assert error.reason == "values nest over 1024 levels deep: the whole message is refused"
        bad.refused.append(refused.id)
        await bad.publish_ok()
        await calm.round_trip()


async def test_a_query_past_every_conflict_is_answered(relay: RunningRelay) -> None:
    """An ``after`` past what islice takes raised a ValueError that closed the
    connection (1011), its queued answers lost."""
    async with scene(relay) as (bad, calm):
        for after in (2**63, 2**64 - 1):
            await bad.send({"t": "query", "rid": 7, "ns": NS, "q": "conflict.list",
                            "args": {"after": after}})  # fmt: skip
            answer = await bad.recv()
            assert isinstance(answer, f.Result) and answer.rid == 7, answer
            assert answer.body["conflicts"] == []
        await bad.publish_ok()
        await calm.round_trip()


async def test_a_bundle_of_bad_frames_buys_a_bounded_number_of_errors(
    relay: RunningRelay,
) -> None:
    """4 KB of nils bought 4096 error frames (80x as many bytes back), before auth
    too, where nothing is charged; past 64 refused frames the rest is not read."""
    async with scene(relay, authenticate=False) as (bad, calm):
        await bad.send(b"\xdc" + f.MAX_BUNDLE.to_bytes(2, "big") + b"\xc0" * f.MAX_BUNDLE)
        errors: list[f.Frame | ProtocolError] = []
        while len(errors) < server.MAX_REFUSED_IN_MESSAGE + 1:  # (they come in bundles)
            with trio.fail_after(TIMEOUT):
                errors += f.decode_message(await bad.ws.recv())  # type: ignore[arg-type]
        assert all(isinstance(e, f.Error) and e.code == ErrorCode.MALFORMED for e in errors)
        *each, last = errors
        assert not any("the rest" in e.reason for e in each)  # type: ignore[union-attr]
        assert isinstance(last, f.Error) and "the rest of this message is not read" in last.reason
        await bad.auth()  # the next message is read as ever
        await bad.publish_ok()
        await calm.round_trip()


async def test_a_map_key_that_is_not_text_fails_only_its_frame(relay: RunningRelay) -> None:
    """Decoded strictly, one integer key anywhere failed the whole message with one
    error and no rid: the other frames of its bundle were never answered."""
    async with scene(relay) as (bad, calm):
        rid = bad.take_rid()
        event = valid_event()
        await bad.send(f.bundle([publish_bytes(rid, event), msgpack.packb({1: 2})]))
        answers = [await bad.recv(), await bad.recv()]  # (the error comes first)
        [ack] = [a for a in answers if isinstance(a, f.Ack)]
        [error] = [a for a in answers if isinstance(a, f.Error)]
        assert ack.rid == rid and (error.code, error.rid) == (ErrorCode.MALFORMED, None)
        bad.acked.append(event.id)
        # An unknown field is ignored, whatever its key.
        event = valid_event()
        publish = {"t": "publish", "rid": bad.take_rid(), "event": event.raw, "sig": event.sig}
        await bad.send(msgpack.packb({**publish, 5: 1}))
        ack = await bad.recv()
        assert isinstance(ack, f.Ack) and ack.rid == publish["rid"]
        bad.acked.append(event.id)
        # In a field, it fails that frame, answered by its rid.
        query = {"t": "query", "rid": 9, "ns": NS, "q": "wo.list", "args": {"status": {1: "x"}}}
        await bad.send(msgpack.packb(query))
        answer = await bad.recv()
        assert isinstance(answer, f.Error) and answer.rid == 9, answer
        await bad.publish_ok()
        await calm.round_trip()


async def test_requests_refused_in_one_bundle_are_each_answered(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The cap on refusals per message must not count errors a client waits for: an
    SDK client's 200 pipelined publishes, all refused, were answered 64 times and the
    other 136 waited for ever."""
    relay = await start_relay(nursery, tmp_path / "relay", RelayConfig(name="local", max_deps=1))
    async with RelayClient.connect(relay.url, AGENT) as client:
        refused: list[ErrorCode] = []

        async def publish(n: int) -> None:
            deps = [secrets.token_bytes(32) for _ in range(2)]
            with pytest.raises(ProtocolError) as info:
                await client.publish(NS, "app.note", n, deps=deps)
            refused.append(info.value.code)

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as publishing:
                for n in range(200):
                    publishing.start_soon(publish, n)
    assert refused == [ErrorCode.TOO_MANY_DEPS] * 200


# --------------------------------------------------------------------------- amplification

FLOODS: dict[str, tuple[bool, bytes, int]] = {
    # name: (authenticated first, one message of bad input, the errors it gets back)
    "nils-before-auth": (False, b"\xc0", 1),
    "bundles-of-nils": (True, b"\xdc\x00\x40" + b"\xc0" * 64, 64),
    "unknown-frames": (True, f.bundle([msgpack.packb({"t": "x"})] * 16), 16),
    "text": (True, b"", 1),  # (sent as a text message)
    "unknown-queries": (
        True,
        f.bundle([f.encode_frame(f.Query(rid=1, ns=NS, q="x", args={}))] * 16),
        16,
    ),
}


@pytest.mark.parametrize("flood", list(FLOODS))
async def test_a_flood_of_bad_input_gets_no_more_bytes_out_than_it_put_in(
    relay: RunningRelay, flood: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every bad frame got an error frame free of charge, up to 60 bytes for a nil of
    one: a client sending only bad input got its bytes back several times over, for as
    long as it liked (before auth, until the auth timeout; after, without end). The
    bytes of errors a connection is sent now stay within the bytes it sent plus
    ERROR_ALLOWANCE, and a connection past that is closed with its reason. (What time
    earns, ERROR_REFILL a second, is set to nothing here: the bound is then exact on
    any machine; ErrorBudget's own tests cover the refill.)"""
    monkeypatch.setattr(server, "ERROR_REFILL", 0)
    authenticate, message, answers = FLOODS[flood]
    sent = received = 0
    async with scene(relay, authenticate=authenticate, agent_survives=False) as (bad, _):
        data: bytes | str = message or "bad " * 4
        with pytest.raises(ConnectionClosed) as closed:
            # Enough to get four allowances back at the old rate: it must end first.
            while received < 4 * server.ERROR_ALLOWANCE:
                await bad.send(data)
                sent += len(data)
                errors = 0
                while errors < answers:  # one at a time, so nothing waits unread
                    with trio.fail_after(TIMEOUT):
                        reply = await bad.ws.recv()
                    assert isinstance(reply, bytes)
                    received += len(reply)
                    for error in f.decode_message(reply):
                        assert isinstance(error, f.Error), error
                        errors += 1
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert closed.value.rcvd.reason == "5004 rate_limited: too many errors"
        # The property: what came back is bounded by what went in (one error frame
        # of slack: the one that went over is still sent).
        assert received <= sent + server.ERROR_ALLOWANCE + 256, (received, sent)
        assert received >= server.ERROR_ALLOWANCE  # (the allowance was used, then closed)


async def test_an_agent_that_errs_now_and_then_always_gets_its_errors(
    relay: RunningRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The allowance is earned by the bytes an agent sends: over a long connection an
    agent whose mistakes are occasional gets many times the allowance in errors,
    each with its code, and is never closed."""
    monkeypatch.setattr(server, "ERROR_ALLOWANCE", 1024)  # a few errors' worth
    async with scene(relay) as (bad, calm):
        received = 0
        for n in range(48):
            await bad.publish_ok()
            await bad.send({"t": "bogus"})
            error = await bad.expect_error(ErrorCode.UNKNOWN_FRAME)
            received += len(f.encode_frame(error))
            if n % 8 == 0:  # an unknown query's error lists the known ones: 313 bytes
                rid = bad.take_rid()
                await bad.send(f.encode_frame(f.Query(rid=rid, ns=NS, q="nothing", args={})))
                error = await bad.expect_error(ErrorCode.UNKNOWN_QUERY, rid=rid)
                received += len(f.encode_frame(error))
                await calm.round_trip()
        assert received > 4 * server.ERROR_ALLOWANCE  # well past it, never closed
