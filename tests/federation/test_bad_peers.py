"""Peers that do not belong, or lie, are refused with a reason and write nothing.

* a relay that presents another key than the one pinned for its name: the link is
  refused (and retried with backoff), writes wait in the outbox;
* a relay that is not a listed peer: it is only an agent, so the events of others it
  tries to forward are refused (``wrong_author``);
* a peer forwarding a write back to its own home, or to a relay nobody knows;
* a peer whose log does not check out — a skipped seq, receipts re-signed with
  another key, a tampered receipt, a swapped event, another namespace's receipt —
  is caught by the mirror: the link is dropped, the forgery logged, nothing of the
  bad run stored or served;
* an oversized bundle from a peer, and a peer that floods without reading.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from websockets.exceptions import ConnectionClosed
from websockets.trio.client import connect
from websockets.trio.server import ServerConnection

from agent_sdk import frames as f
from agent_sdk.client import Delivery, Live, RelayClient
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.identity import Identity
from agent_sdk.wire import Event, decode_receipt, make_receipt, seal, sign_event
from federation.network import TAP_BYTES, Mirror
from federation.peers import Peer
from relay.node import RelayConfig
from relay.sequencer import Limits
from relay.store import MAX_UNSEALED_BYTES
from tests.conftest import RunningRelay, identity
from tests.federation.fixtures import (
    LyingRelay,
    Tamper,
    TamperAck,
    federation_of,
    plan,
    start,
)

NS = "x@b"
TIMEOUT = 30


async def test_a_peer_with_another_key_is_refused_and_writes_wait(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relays = plan(tmp_path, "a", "b")
    impostor = Identity.generate().public_key
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    a = await start(nursery, relays["a"], (relays["b"].peer(key=impostor),))
    link = federation_of(a).links["b"]
    with trio.fail_after(TIMEOUT):
        await link.wait_for(lambda: link.refusals > 0)
        assert link.last_error is not None and "pinned" in link.last_error
        async with RelayClient.connect(a.url, identity(1)) as agent:
            queued = trio.Event()
            async with trio.open_nursery() as waiting:
                waiting.start_soon(partial(agent.publish, on_queued=queued.set), NS, "app.note", 1)
                await queued.wait()  # promised, not delivered: the link is not trusted
                waiting.cancel_scope.cancel()
    assert b.node.head(NS) == 0 and not link.up


async def test_an_unlisted_relay_cannot_forward_others_events(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relays = plan(tmp_path, "a", "b")
    b = await start(nursery, relays["b"], ())  # federated, but a is not its peer
    a = await start(nursery, relays["a"], (relays["b"].peer(),))
    with trio.fail_after(TIMEOUT):
        await federation_of(a).links["b"].wait_up()
        async with RelayClient.connect(a.url, identity(1)) as agent:
            with pytest.raises(ProtocolError) as refused:
                await agent.publish(NS, "app.note", {"n": 1})
    assert refused.value.code is ErrorCode.WRONG_AUTHOR and "peer" in refused.value.reason
    assert b.node.head(NS) == 0


async def test_a_peer_cannot_route_a_write_back_or_nowhere(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relays = plan(tmp_path, "a", "b", "d")  # (d is never started)
    via_d = Peer("c", Identity.generate().public_key, via="d")  # b reaches c through d
    b = await start(nursery, relays["b"], (relays["a"].peer(), relays["d"].peer(), via_d))
    peer_a = relays["a"].identity
    assert peer_a is not None
    author = identity(7)
    with trio.fail_after(TIMEOUT):
        # Relay a's own key, dialling b as its link would, sends writes b must not
        # forward: one for a's own namespace (back where it came from), one for a
        # relay b reaches only through a third (a peer's write is forwarded once, to
        # its home: 14.3 rule 2), one for a relay b has no route to.
        async with RelayClient.connect(b.url, peer_a) as link:
            for ns, why in (("y@a", "back"), ("z@c", "twice"), ("z@e", "no route")):
                event = Event(
                    ns=ns, kind="app.note", author=author.public_key, body=1, deps=(), ts=now_ms()
                )
                with pytest.raises(ProtocolError) as refused:
                    await link.publish_signed(sign_event(event, author.sign))
                assert refused.value.code is ErrorCode.NOT_HOME and why in refused.value.reason
            # The same link may carry another author's event for b's own namespace.
            event = Event(
                ns=NS, kind="app.note", author=author.public_key, body=2, deps=(), ts=now_ms()
            )
            published = await link.publish_signed(sign_event(event, author.sign))
            assert published.receipt.seq == 1
    assert b.node.namespaces() == [NS]


def now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------- lying peers

LIAR = Identity.from_seed(b"L" * 32)


def skip_seq_2(frame: f.EventFrame) -> f.EventFrame | None:
    return None if decode_receipt(frame.receipt).seq == 2 else frame


def resign(frame: f.EventFrame) -> f.EventFrame:
    """The same events, sequenced again under the liar's key: a valid chain and valid
    seals, of the wrong relay."""
    receipt = decode_receipt(frame.receipt)
    prev = RESIGNED.get(receipt.seq - 1, bytes(32))
    forged = make_receipt(
        id=receipt.id,
        ns=receipt.ns,
        seq=receipt.seq,
        hlc=receipt.hlc,
        prev=prev,
        relay=LIAR.public_key,
    )
    RESIGNED[receipt.seq] = forged.hash
    return replace(frame, receipt=forged.raw, seal=seal(forged, LIAR.sign))


RESIGNED: dict[int, bytes] = {}


def bump_hlc_of_3(frame: f.EventFrame) -> f.EventFrame:
    receipt = decode_receipt(frame.receipt)
    if receipt.seq != 3:
        return frame
    forged = make_receipt(
        id=receipt.id,
        ns=receipt.ns,
        seq=3,
        hlc=receipt.hlc + 1,
        prev=receipt.prev,
        relay=receipt.relay,
    )
    return replace(frame, receipt=forged.raw)


def swap_event_of_3(frame: f.EventFrame) -> f.EventFrame:
    """Another event (validly signed by its author) under seq 3's receipt."""
    if decode_receipt(frame.receipt).seq != 3:
        return frame
    other = identity(9)
    event = Event(ns=NS, kind="app.note", author=other.public_key, body="forged", deps=(), ts=1)
    signed = sign_event(event, other.sign)
    return replace(frame, event=signed.raw, sig=signed.sig)


def other_namespace_at_3(frame: f.EventFrame) -> f.EventFrame:
    receipt = decode_receipt(frame.receipt)
    if receipt.seq != 3:
        return frame
    forged = make_receipt(
        id=receipt.id, ns="other@b", seq=3, hlc=receipt.hlc, prev=receipt.prev, relay=receipt.relay
    )
    return replace(frame, receipt=forged.raw)


@pytest.mark.parametrize(
    ("tamper", "first_bad", "reason"),
    [
        (skip_seq_2, 2, "does not follow"),
        (resign, 1, "another relay"),
        (bump_hlc_of_3, 3, "seal does not verify"),
        (swap_event_of_3, 3, "not the one its receipt names"),
        (other_namespace_at_3, 3, "a receipt of other@b"),
    ],
)
async def test_a_lying_peer_is_caught_by_the_mirror(
    nursery: trio.Nursery,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    tamper: Tamper,
    first_bad: int,
    reason: str,
) -> None:
    RESIGNED.clear()
    relays = plan(tmp_path, "a", "b")
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    liar = LyingRelay(b.url, tamper)
    await nursery.start(liar.run)
    a = await start(nursery, relays["a"], (relays["b"].peer(url=liar.url),))
    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(b.url, identity(1)) as writer:
            genuine = []
            for n in range(5):  # one commit each: every receipt is sealed
                genuine.append((await writer.publish(NS, "app.note", {"n": n})).receipt.raw)
        fed = federation_of(a)
        async with RelayClient.connect(a.url, identity(2)) as reader:
            async with reader.subscribe(NS, start=1):  # makes a follow b's log
                await fed.links["b"].wait_for(lambda: fed.forgeries > 0)
            seen = await read_until_live(reader)  # what a serves of it now
    assert seen == genuine[: first_bad - 1]  # the good prefix; nothing forged served
    assert a.node.head(NS) == first_bad - 1  # ...and nothing forged stored
    refused = [r for r in caplog.records if r.levelno >= logging.ERROR and "refused" in r.message]
    assert refused and reason in refused[0].message


def resign_ack(ack: f.Ack) -> f.Ack:
    """A receipt for the forwarded event, made up and sealed by the liar."""
    receipt = decode_receipt(ack.receipt)
    forged = make_receipt(
        id=receipt.id, ns=receipt.ns, seq=receipt.seq, hlc=receipt.hlc, prev=receipt.prev,
        relay=LIAR.public_key,
    )  # fmt: skip
    return replace(ack, receipt=forged.raw, seal=seal(forged, LIAR.sign))


def another_seq(raw: bytes) -> bytes:
    """The home's receipt ``raw``, at another seq (a receipt is not signed by itself)."""
    receipt = decode_receipt(raw)
    return make_receipt(
        id=receipt.id, ns=receipt.ns, seq=receipt.seq + 998, hlc=receipt.hlc,
        prev=receipt.prev, relay=receipt.relay,
    ).raw  # fmt: skip


def unsealed_ack(ack: f.Ack) -> f.Ack:
    """The home's receipt, given another seq: receipts are not signed, so only the
    seal a home puts on every answer to a relay shows this one is made up."""
    return replace(ack, receipt=another_seq(ack.receipt), seal=None)


def moved_outcome(ack: f.Ack) -> f.Ack:
    """The ack of a request, its outcome's receipt given another seq: the outcome is
    signed by the home, its receipt is not; the home seals it on answers to relays."""
    assert ack.outcome_receipt is not None, "the write is a request: it has an outcome"
    return replace(ack, outcome_receipt=another_seq(ack.outcome_receipt), outcome_seal=None)


def resealed_outcome(ack: f.Ack) -> f.Ack:
    """The outcome's receipt given another seq, and a seal of it by the liar."""
    moved = moved_outcome(ack)
    assert moved.outcome_receipt is not None
    return replace(moved, outcome_seal=seal(decode_receipt(moved.outcome_receipt), LIAR.sign))


def resigned_outcome(ack: f.Ack) -> f.Ack:
    """The outcome's receipt made again by the liar's key, and sealed by it: the seal
    verifies, with the key the receipt names, which is not the home's."""
    assert ack.outcome_receipt is not None, "the write is a request: it has an outcome"
    receipt = decode_receipt(ack.outcome_receipt)
    forged = make_receipt(
        id=receipt.id, ns=receipt.ns, seq=receipt.seq, hlc=receipt.hlc, prev=receipt.prev,
        relay=LIAR.public_key,
    )  # fmt: skip
    return replace(ack, outcome_receipt=forged.raw, outcome_seal=seal(forged, LIAR.sign))


def request_receipt_as_outcomes(ack: f.Ack) -> f.Ack:
    """The outcome given the request's own receipt and seal, both the home's: of the
    namespace, by the home's key, sealed, but not the outcome's."""
    return replace(ack, outcome_receipt=ack.receipt, outcome_seal=ack.seal)


OUTCOME_LIES = (moved_outcome, resealed_outcome, resigned_outcome, request_receipt_as_outcomes)


@pytest.mark.parametrize("lie", [resign_ack, unsealed_ack, *OUTCOME_LIES], ids=lambda f: f.__name__)
async def test_an_answer_to_a_forwarded_write_that_is_not_the_homes_is_refused(
    nursery: trio.Nursery,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    lie: Callable[[f.Ack], f.Ack],
) -> None:
    relays = plan(tmp_path, "a", "b")
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    liar = LyingRelay(b.url, lambda frame: frame, tamper_ack=lie)
    await nursery.start(liar.run)
    a = await start(nursery, relays["a"], (relays["b"].peer(url=liar.url),))
    link = federation_of(a).links["b"]
    answered: list[object] = []
    with trio.fail_after(TIMEOUT):
        await link.wait_up()
        async with RelayClient.connect(a.url, identity(6)) as agent, trio.open_nursery() as waiting:

            async def publish() -> None:
                if lie in OUTCOME_LIES:  # a request: it has an outcome
                    body = {"title": "to b"}
                    answered.append(await agent.publish(NS, "wo.create", body, nonce=b"1"))
                else:
                    answered.append(await agent.publish(NS, "app.note", "to b"))

            waiting.start_soon(publish)
            await link.wait_for(lambda: link.connections >= 2)  # dropped after the lie
            waiting.cancel_scope.cancel()
    assert answered == []  # the agent never got the made-up receipt
    assert b.node.head(NS) >= 1  # b did sequence it (its real receipt will do)
    assert any("refused an answer" in r.message for r in caplog.records)


async def read_until_live(reader: RelayClient) -> list[bytes]:
    seen = []
    async with reader.subscribe(NS, start=1) as feed:
        async for item in feed:
            if isinstance(item, Live):
                return seen
            assert isinstance(item, Delivery)
            seen.append(item.receipt.raw)
    raise AssertionError("the subscription ended")


# --------------------------------------------------------------------------- floods


async def test_an_oversized_bundle_from_a_peer_is_refused_whole(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relays = plan(tmp_path, "a", "b")
    config = RelayConfig(name="b", max_frame=64 * 1024)
    b = await start(nursery, relays["b"], (relays["a"].peer(),), config)
    peer_a = relays["a"].identity
    assert peer_a is not None
    author = identity(3)
    publishes = [
        f.encode_frame(f.Publish(rid=n, event=s.raw, sig=s.sig))
        for n in range(250)
        for s in [
            sign_event(
                Event(
                    ns=NS,
                    kind="app.note",
                    author=author.public_key,
                    body="y" * 200,
                    deps=(),
                    ts=now_ms(),
                    nonce=bytes([n % 256, n // 256 + 1]),
                ),
                author.sign,
            )
        ]
    ]
    with trio.fail_after(TIMEOUT):
        async with connect(b.url, compression=None, max_size=None) as ws:
            hello = f.decode_frame(await ws.recv())
            assert isinstance(hello, f.Hello)
            sig = peer_a.sign(f.agent_auth_message(hello.relay, hello.challenge))
            await ws.send(
                f.encode_frame(f.Auth(key=peer_a.public_key, sig=sig, challenge=bytes(32)))
            )
            assert isinstance(f.decode_frame(await ws.recv()), f.Welcome)
            await ws.send(f.bundle(publishes))  # ~100 KB: over max_frame, under twice it
            error = f.decode_frame(await ws.recv())
            assert isinstance(error, f.Error) and error.code == ErrorCode.FRAME_TOO_LARGE
    assert b.node.head(NS) == 0


class _SealStripper(LyingRelay):
    """Passes the home's log on without its seals, on its first connection only."""

    def __init__(self, target: str) -> None:
        super().__init__(target, self._strip)
        self.connections = 0

    async def _handle(self, inbound: ServerConnection) -> None:
        self.connections += 1
        await super()._handle(inbound)

    def _strip(self, frame: f.EventFrame) -> f.EventFrame:
        return replace(frame, seal=None) if self.connections == 1 else frame


async def test_an_unsealed_run_is_bounded_in_bytes_and_fetched_again(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """14.8: a mirror holds an unsealed run in memory. Bounded only in records (16384),
    a peer sending large records without seals made it hold 16384 of them, up to a
    link message each: gigabytes. A home seals every MAX_UNSEALED_BYTES (4.4), so a
    run that reaches it unsealed is refused as forged, the link dropped, and the log
    fetched again from the stored head: all of it arrives once the peer behaves."""
    relays = plan(tmp_path, "a", "b")
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    liar = _SealStripper(b.url)
    await nursery.start(liar.run)
    a = await start(nursery, relays["a"], (relays["b"].peer(url=liar.url),))
    body = "y" * 1_000_000  # each event under b's max_frame (1 MiB)
    count = MAX_UNSEALED_BYTES // len(body) + 1  # together, over the bound
    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(b.url, identity(1)) as writer:
            for n in range(count):  # one commit each: b seals every one
                await writer.publish(NS, "app.note", [n, body])
        fed = federation_of(a)
        async with (
            RelayClient.connect(a.url, identity(2)) as reader,
            reader.subscribe(NS, start=1),  # makes a follow b's log
        ):
            await a.node.wait_beyond(NS, count - 1)
    assert a.node.head(NS) == count and fed.forgeries == 1 and liar.connections == 2
    refused = [r for r in caplog.records if r.levelno >= logging.ERROR and "refused" in r.message]
    assert refused and "bytes or more without a seal" in refused[0].message


async def test_a_mirror_takes_no_more_bytes_from_its_link_than_its_tap_holds(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames wait between a link's reader and the mirror's checks in a tap bounded
    only in frames (8192), each up to a link message (4 max_frame): a peer sending
    faster than the mirror checks made it hold 8192 x 4 MiB. It is bounded in bytes
    too (TAP_BYTES). A full tap is what it was: the frames past the bound are dropped,
    those held are checked and stored, and the mirror subscribes again from its
    stored head, so nothing is lost."""
    relays = plan(tmp_path, "a", "b")
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    a = await start(nursery, relays["a"], (relays["b"].peer(),))
    body = "y" * 1_000_000  # each event under b's max_frame (1 MiB)
    count = TAP_BYTES // len(body) + 2  # together, over the bound
    release = trio.Event()
    consume = Mirror._consume

    async def stalled(mirror: Mirror, *args: Any) -> None:
        await release.wait()  # a mirror slower than its link: it checks nothing yet
        await consume(mirror, *args)

    monkeypatch.setattr(Mirror, "_consume", stalled)
    fed = federation_of(a)
    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(b.url, identity(1)) as writer:
            for n in range(count):
                await writer.publish(NS, "app.note", [n, body])
        link = await fed.links["b"].wait_up()
        subscribed: list[int] = []  # the mirror's subscriptions on the link
        tap, dispatch = link.tap, link._dispatch
        replayed = trio.Event()

        def counted(frame: Callable[[int], Any], on_frame: Callable[[f.Frame], None]) -> int:
            sub = tap(frame, on_frame)
            subscribed.append(sub)
            return sub

        async def watched(frame: f.Frame) -> None:
            await dispatch(frame)
            if isinstance(frame, f.Live) and frame.sub == subscribed[0]:
                replayed.set()

        monkeypatch.setattr(link, "tap", counted)
        monkeypatch.setattr(link, "_dispatch", watched)
        async with (
            RelayClient.connect(a.url, identity(2)) as reader,
            reader.subscribe(NS, start=1),  # makes a follow b's log
        ):
            await replayed.wait()  # b's whole log has come over the link, unchecked
            release.set()
            await a.node.wait_beyond(NS, count - 1)
    assert a.node.head(NS) == count and fed.forgeries == 0
    assert len(subscribed) >= 2, "the mirror took the whole log into its tap"


async def test_a_peer_flooding_without_reading_does_not_stall_others(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relays = plan(tmp_path, "a", "b")
    config = RelayConfig(name="b", max_inflight=64, send_queue=8, slow_consumer_timeout=1.0)
    b = await start(nursery, relays["b"], (relays["a"].peer(),), config)
    peer_a = relays["a"].identity
    assert peer_a is not None
    author = identity(4)
    with trio.fail_after(TIMEOUT):
        async with connect(b.url, compression=None, max_size=None, close_timeout=1) as flood:
            hello = f.decode_frame(await flood.recv())
            assert isinstance(hello, f.Hello)
            sig = peer_a.sign(f.agent_auth_message(hello.relay, hello.challenge))
            await flood.send(
                f.encode_frame(f.Auth(key=peer_a.public_key, sig=sig, challenge=bytes(32)))
            )
            assert isinstance(f.decode_frame(await flood.recv()), f.Welcome)
            sent = 0
            pouring = True

            async def pour() -> None:
                # Stopped between sends, not cancelled in one: a send cut in half would
                # break the flooder's own stream, and it could not answer the close.
                nonlocal sent
                while pouring:  # as fast as the relay lets us; we never read an answer
                    event = Event(
                        ns=NS,
                        kind="app.note",
                        author=author.public_key,
                        body=sent,
                        deps=(),
                        ts=now_ms(),
                    )
                    signed = sign_event(event, author.sign)
                    frame = f.encode_frame(f.Publish(rid=sent, event=signed.raw, sig=signed.sig))
                    try:
                        await flood.send(frame)
                    except ConnectionClosed:
                        return  # the close finished first (the reading below sees how)
                    sent += 1

            async with trio.open_nursery() as flooding:
                flooding.start_soon(pour)
                async with RelayClient.connect(b.url, identity(5)) as other:
                    for n in range(20):  # another agent is served all along
                        published = await other.publish("calm@b", "app.note", n)
                        assert published.receipt.seq == n + 1
                    # The flooder never reads its acks: it is cut off as a slow consumer.
                    await b.node.wait_stat("slow_consumers", 1)
                    published = await other.publish("calm@b", "app.note", 20)
                    assert published.receipt.seq == 21
                pouring = False  # its last send ends as the closing relay reads it
                # Read what it left unread: the relay's close frame is queued behind it.
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await flood.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
            assert closed.value.rcvd.reason == "3002 slow_consumer"
    assert sent > 20 and b.node.head(NS) >= 1


class _LocateLiar(LyingRelay):
    """Answers ``fed.locate`` with ``answer`` while it is set: every time, or with
    ``once`` the first time only, then tells the truth. Sets ``lied`` once it has."""

    def __init__(self, target: str, answer: list[Any] | None = None, *, once: bool = False) -> None:
        super().__init__(target, lambda frame: frame)
        self.answer, self.once = answer, once
        self.lied = trio.Event()

    def _rewrite(self, message: bytes) -> bytes | None:
        out = []
        for frame in f.decode_message(message):
            assert not isinstance(frame, Exception)
            lie = self.answer is not None and not (self.once and self.lied.is_set())
            if lie and isinstance(frame, f.Result) and isinstance(frame.body, list):
                frame = replace(frame, body=self.answer)
                self.lied.set()
            out.append(f.encode_frame(frame))
        return f.bundle(out) if out else None


GARBLED_LOCATE = [[[1], NS, 1], [b"x" * 32, 7, 1], [bytes(32), NS, -1], "x", [1]]
"""An answer to ``fed.locate`` of the wrong shapes (an id that is a list does not
even hash)."""


async def test_a_garbled_answer_to_where_an_event_is_changes_nothing(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relays = plan(tmp_path, "a", "b")
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    liar = _LocateLiar(b.url, GARBLED_LOCATE)
    await nursery.start(liar.run)
    config = RelayConfig(name="a", sequencer=Limits(park_timeout_ms=1_000))
    a = await start(nursery, relays["a"], (relays["b"].peer(url=liar.url),), config)
    network = federation_of(a)
    with trio.fail_after(TIMEOUT):
        await network.links["b"].wait_up()
        async with RelayClient.connect(a.url, identity(1)) as agent:
            with pytest.raises(ProtocolError) as ghost:  # a asks b where its dep is
                await agent.publish("y@a", "app.note", "needs a ghost", deps=[bytes(32)])
            assert ghost.value.code is ErrorCode.MISSING_DEPS
            assert liar.lied.is_set() and not network.hints
            after = await agent.publish("y@a", "app.note", "a carries on")
    assert after.receipt.seq == 1


@pytest.mark.parametrize(
    "seq", [2**63, 2**64 - 1, 0, -(2**63)], ids=["2^63", "2^64-1", "0", "-2^63"]
)
async def test_a_locate_answer_with_a_seq_no_relay_can_hold_is_refused(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, seq: int
) -> None:
    """14.11: a seq is from 1 to 2^63 - 1 (every store keeps it in 64 signed bits). A
    peer that places an event outside that lies: nothing of its answer is kept (no
    hint, no mirror following for ever towards it), the link to it is closed with
    1008 and the reason, and the relay carries on."""
    relays = plan(tmp_path, "a", "b")
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    liar = _LocateLiar(b.url, [[bytes(32), NS, seq]])  # the ghost id, far out
    await nursery.start(liar.run)
    config = RelayConfig(name="a", sequencer=Limits(park_timeout_ms=1_000))
    a = await start(nursery, relays["a"], (relays["b"].peer(url=liar.url),), config)
    network = federation_of(a)
    link = network.links["b"]
    with trio.fail_after(TIMEOUT):
        await link.wait_up()
        async with RelayClient.connect(a.url, identity(1)) as agent:
            with pytest.raises(ProtocolError) as ghost:  # a asks b where its dep is
                await agent.publish("y@a", "app.note", "needs a ghost", deps=[bytes(32)])
            assert ghost.value.code is ErrorCode.MISSING_DEPS and liar.lied.is_set()
            assert not network.hints and NS not in network.mirrors
            await link.wait_for(lambda: link.connections >= 2)  # dropped, dialled again
            after = await agent.publish("y@a", "app.note", "a carries on")
            forwarded = await agent.publish(NS, "app.note", "and so does the link")
    assert after.receipt.seq == 1 and forwarded.receipt.seq == 1 and b.node.head(NS) == 1
    assert any("refused an answer" in r.message for r in caplog.records)
    assert any("dropping the connection: forged answer" in r.message for r in caplog.records)


async def _lied_to(
    nursery: trio.Nursery, tmp_path: Path
) -> tuple[_LocateLiar, RunningRelay, RunningRelay, Identity]:
    """Relays a and b, a's link to b through a liar, and the key of a peer c that
    dials a."""
    relays = plan(tmp_path, "a", "b", "c")
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    liar = _LocateLiar(b.url, once=True)
    await nursery.start(liar.run)
    config = RelayConfig(name="a", sequencer=Limits(park_timeout_ms=1_000))
    peer_c = Peer("c", relays["c"].key)
    a = await start(nursery, relays["a"], (relays["b"].peer(url=liar.url), peer_c), config)
    await federation_of(a).links["b"].wait_up()
    c = relays["c"].identity
    assert c is not None
    return liar, a, b, c


async def test_a_peers_word_on_where_our_own_events_are_does_no_harm(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """14.11: of a namespace it homes, a relay's log is the truth. It kept a peer's
    answer placing an id in one of its own namespaces (at a seq it has) as a hint:
    passed it on to other peers as its own word (their mirrors then follow towards
    it), and, a hinted id being never asked about again, an event depending on that
    id parked until its timeout every time, although its real place was one question
    away. Such an answer is not kept."""
    with trio.fail_after(TIMEOUT):
        liar, a, b, c = await _lied_to(nursery, tmp_path)
        async with RelayClient.connect(b.url, identity(1)) as writer:
            dep = (await writer.publish(NS, "app.note", "on b")).receipt.id
        liar.answer = [[dep, "y@a", 1]]
        async with RelayClient.connect(a.url, identity(2)) as agent:
            mine = await agent.publish("y@a", "app.note", "seq 1 of y@a is real")
            with pytest.raises(ProtocolError) as lied_to:  # a asks b where dep is
                await agent.publish("y@a", "app.note", "needs dep", deps=[dep])
            assert lied_to.value.code is ErrorCode.MISSING_DEPS and liar.lied.is_set()
            async with RelayClient.connect(a.url, c) as asker:  # c, asking as a peer
                told = await asker.query("fed@a", "fed.locate", {"ids": [dep, mine.receipt.id]})
            # The liar answers truly now: asked again, a finds dep and sequences it.
            after = await agent.publish("y@a", "app.note", "needs dep", deps=[dep])
    assert told == [[mine.receipt.id, "y@a", 1]], "a passed on a peer's word on y@a"
    assert after.receipt.seq == 2 and a.node.head(NS) == 1


async def test_a_hint_is_not_passed_on_in_a_locate_answer(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """14.11: an id a relay knows only by a hint is left out of its fed.locate answers.
    It passed one on once its mirror of the namespace was past the hinted seq, without
    looking whether the id is there: a peer's lie became its own word."""
    ghost = bytes(32)
    with trio.fail_after(TIMEOUT):
        liar, a, b, c = await _lied_to(nursery, tmp_path)
        liar.answer = [[ghost, NS, 1]]  # believable: b writes seq 1 of it below
        async with RelayClient.connect(b.url, identity(1)) as writer:
            await writer.publish(NS, "app.note", "seq 1 of x@b is real")
        async with RelayClient.connect(a.url, identity(2)) as agent:
            with pytest.raises(ProtocolError) as lied_to:  # a asks b where ghost is
                await agent.publish("y@a", "app.note", "needs a ghost", deps=[ghost])
            assert lied_to.value.code is ErrorCode.MISSING_DEPS and liar.lied.is_set()
        await a.node.wait_beyond(NS, 0)  # a mirrored x@b past the hinted seq
        async with RelayClient.connect(a.url, c) as asker:
            told = await asker.query("fed@a", "fed.locate", {"ids": [ghost]})
    assert told == [], "a passed on a peer's word as its own"


class _Locator:
    """A link client whose peer answers fed.locate with many namespaces for one id."""

    def __init__(self, answer: list[list[object]]) -> None:
        self.answer = answer

    async def query(self, ns: str, q: str, args: dict[str, object]) -> object:
        return self.answer


async def test_one_locate_answer_opens_one_mirror_per_id(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A peer's fed.locate answer is 'only a pointer' (14.11): one id has one place.
    A peer that names the same id in 200 namespaces, at a seq no home will reach,
    makes this relay open 200 mirrors that follow for ever."""
    relays = plan(tmp_path, "a", "b")
    await start(nursery, relays["b"], (relays["a"].peer(),))
    a = await start(nursery, relays["a"], (relays["b"].peer(),))
    fed = federation_of(a)
    event_id = bytes(32)
    lie = [[event_id, f"n{i}@b", 2**62] for i in range(200)]
    with trio.fail_after(TIMEOUT):
        await fed.links["b"].wait_up()
        await fed._ask_where(fed.links["b"], _Locator(lie), [event_id])  # type: ignore[arg-type]
    assert len(fed.mirrors) <= 1, f"{len(fed.mirrors)} mirrors from one answer"


class _LiveLiar(LyingRelay):
    """Passes everything through but claims a far larger head in every ``live``."""

    def _rewrite(self, message: bytes) -> bytes | None:
        out = []
        for frame in f.decode_message(message):
            assert not isinstance(frame, Exception)
            if isinstance(frame, f.Live):
                frame = f.Live(sub=frame.sub, ns=frame.ns, seq=frame.seq + 1_000_000)
            out.append(f.encode_frame(frame))
        return f.bundle(out)


async def test_a_claimed_head_does_not_blind_a_subscription_from_now(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The head a peer claims in live is not checked (14.7): a via peer (here a man in
    the middle) that inflates it moves the cursor of every subscription 'from now' past
    anything the home will write, so the subscriber never sees the next event."""
    relays = plan(tmp_path, "a", "b")
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    liar = _LiveLiar(b.url, lambda frame: frame)
    await nursery.start(liar.run)
    a = await start(nursery, relays["a"], (relays["b"].peer(url=liar.url),))
    with trio.fail_after(TIMEOUT):
        await federation_of(a).links["b"].wait_up()
        async with (
            RelayClient.connect(a.url, identity(2)) as reader,
            RelayClient.connect(b.url, identity(1)) as writer,
            reader.subscribe(NS) as feed,
        ):  # from now
            await writer.publish(NS, "app.note", {"n": 1})
            await a.node.wait_beyond(NS, 0)  # a's mirror has it
            with trio.move_on_after(5):
                async for item in feed:
                    if isinstance(item, Delivery):
                        break
                else:
                    raise AssertionError("subscription ended")
                return
    raise AssertionError("the event a's mirror holds never reached the subscriber")


def second_from_first(lie: Callable[[f.Ack, f.Ack], f.Ack]) -> TamperAck:
    """A relay on the way that keeps the first ack it passes and answers the second
    with parts of it, ``lie(second, first)``: genuine, sealed by the home, but another
    write's. It lies once: caught, the link is dropped, and the resend gets the truth."""
    kept: list[f.Ack] = []

    def tamper(ack: f.Ack) -> f.Ack:
        kept.append(ack)
        return lie(ack, kept[0]) if len(kept) == 2 else ack

    return tamper


async def test_a_receipt_of_another_event_is_not_passed_on(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """14.4: the receipt of an answer must be of the forwarded event. A relay on the
    way that answers a write with the home's genuine sealed receipt of an earlier one
    is refused, and the link dropped: the agent gets its own event's receipt, from the
    resend. (The link's client refuses such an ack before the outbox's check_answer
    sees it; the agent's SDK would too, so this agent does not reconnect: what it is
    handed is what its relay passed on.)"""
    relays = plan(tmp_path, "a", "b")
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    earlier = second_from_first(
        lambda ack, first: replace(ack, receipt=first.receipt, seal=first.seal)
    )
    liar = LyingRelay(b.url, lambda frame: frame, tamper_ack=earlier)
    await nursery.start(liar.run)
    a = await start(nursery, relays["a"], (relays["b"].peer(url=liar.url),))
    author = identity(6)
    one, two = (
        sign_event(Event(NS, "app.note", author.public_key, n, (), now_ms()), author.sign)
        for n in (1, 2)
    )
    with trio.fail_after(TIMEOUT):
        await federation_of(a).links["b"].wait_up()
        async with RelayClient.connect(a.url, author, reconnect=False) as agent:
            assert (await agent.publish_signed(one)).receipt.id == one.id
            answer = await agent.publish_signed(two)
    assert answer.receipt.id == two.id and b.node.head(NS) == 2
    assert federation_of(a).links["b"].connections >= 2  # the liar's connection dropped


async def test_an_outcome_of_another_request_is_not_passed_on(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """check_answer (14.4) checks that the outcome is the home's, not that it is the
    outcome *of this request*: a relay on the way keeps one genuine sealed outcome and
    answers a later request with it. The agent is told its second wo.create made the
    first work order."""

    def swap(ack: f.Ack, first: f.Ack) -> f.Ack:
        return f.Ack(
            rid=ack.rid, receipt=ack.receipt, seal=ack.seal, duplicate=ack.duplicate,
            outcome=first.outcome, outcome_sig=first.outcome_sig,
            outcome_receipt=first.outcome_receipt, outcome_seal=first.outcome_seal,
        )  # fmt: skip

    relays = plan(tmp_path, "a", "b")
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    liar = LyingRelay(b.url, lambda frame: frame, tamper_ack=second_from_first(swap))
    await nursery.start(liar.run)
    a = await start(nursery, relays["a"], (relays["b"].peer(url=liar.url),))
    with trio.fail_after(TIMEOUT):
        await federation_of(a).links["b"].wait_up()
        async with RelayClient.connect(a.url, identity(6)) as agent:
            one = await agent.publish(NS, "wo.create", {"title": "one"}, nonce=b"1")
            two = await agent.publish(NS, "wo.create", {"title": "two"}, nonce=b"2")
    assert one.outcome is not None and two.outcome is not None
    assert one.receipt.id in one.outcome.event.event.deps  # an outcome names its request
    assert two.receipt.id in two.outcome.event.event.deps, (
        "the agent was handed the outcome of another request"
    )


async def test_an_agent_cannot_ask_fed_locate_through_its_relay(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """14.11: only a peer connection may ask fed.locate; an agent gets 4001. An agent
    of a asks it of fed@b through a: a forwards the query over its link, where b
    takes it for a's own question and answers with what a (not the agent) may read."""
    relays = plan(tmp_path, "a", "b")
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    a = await start(nursery, relays["a"], (relays["b"].peer(),))
    with trio.fail_after(TIMEOUT):
        await federation_of(a).links["b"].wait_up()
        async with RelayClient.connect(b.url, identity(1)) as writer:
            written = await writer.publish(NS, "app.note", {"n": 1})
        async with RelayClient.connect(a.url, identity(2)) as agent:
            with pytest.raises(ProtocolError) as refused:
                found = await agent.query("fed@b", "fed.locate", {"ids": [written.receipt.id]})
                raise AssertionError(f"answered an agent: {found!r}")
    assert refused.value.code is ErrorCode.UNKNOWN_QUERY
