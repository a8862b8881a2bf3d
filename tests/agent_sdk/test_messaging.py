"""Messages between agents over a real relay on loopback: relayed, online and offline,
in order and exactly once, sealed end to end."""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from websockets.trio.server import ServerConnection, serve

from agent_sdk import frames as f
from agent_sdk.client import RelayClient
from agent_sdk.direct import DirectUnreachable
from agent_sdk.directory import Directory
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.identity import Identity
from agent_sdk.messaging import Address, Sent
from agent_sdk.sealing import Header, Receipt, Sealed, seal
from relay.node import RelayConfig
from tests.agent_sdk.test_client import BrokenHook, hook_failures
from tests.conftest import RunningRelay, identity, start_relay
from tests.federation.cluster import Cuttable
from tests.federation.fixtures import federation_of, plan, start
from tests.relay.test_bad_input import RawAgent, raw_agent

ALICE, BOB, CAROL = identity(1), identity(2), identity(3)
TIMEOUT = 30


async def test_a_message_to_an_online_agent_arrives_sealed_with_a_receipt(
    relay: RunningRelay,
) -> None:
    async with (
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, BOB) as bob,
    ):
        bob.mailbox.open()
        await bob.mailbox.live.wait()
        sent = await alice.send(BOB.id, {"text": "hello", "n": 1})
        assert sent.status == "stored"
        message = await bob.mailbox.next()
        assert message.body == {"text": "hello", "n": 1} and message.sender == ALICE.public_key
        assert message.id == sent.id and message.path == "relay"
        receipt = await sent.delivered()
        receipt.verify()  # signed by Bob: no relay could have made it up
        assert receipt.recipient == BOB.public_key and sent.status == "delivered"


async def test_an_offline_agent_gets_its_messages_once_in_order_when_it_comes_back(
    relay: RunningRelay,
) -> None:
    async with RelayClient.connect(relay.url, BOB):
        pass  # Bob has been here once: he can be sent messages
    async with RelayClient.connect(relay.url, ALICE) as alice:
        sent = [await alice.send(BOB.id, f"note {n}") for n in range(20)]
        assert {s.status for s in sent} == {"stored"}
        async with RelayClient.connect(relay.url, BOB) as bob:
            got = [(await bob.mailbox.next()).body for _ in range(20)]
            assert got == [f"note {n}" for n in range(20)]
            for s in sent:
                await s.delivered()
        async with RelayClient.connect(relay.url, BOB) as bob:  # nothing comes twice
            bob.mailbox.open()
            await bob.mailbox.live.wait()
            assert bob.mailbox._queue_rx.statistics().current_buffer_used == 0
    await drained(relay, BOB)


async def test_messages_survive_a_relay_restart(nursery: trio.Nursery, tmp_path: Path) -> None:
    data = tmp_path / "relay"
    first = await start_relay(nursery, data)
    async with RelayClient.connect(first.url, BOB):
        pass
    async with RelayClient.connect(first.url, ALICE) as alice:
        await alice.send(BOB.id, "kept on disk")
    first.scope.cancel()
    second = await start_relay(nursery, data)
    async with RelayClient.connect(second.url, BOB) as bob:
        assert (await bob.mailbox.next()).body == "kept on disk"
    second.scope.cancel()


async def test_a_resent_message_is_stored_and_handed_out_once(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, BOB) as bob,
    ):
        bob.mailbox.open()
        await bob.mailbox.live.wait()
        sealed = alice.mailbox.seal_next(Address(BOB.public_key), "once")
        first = await alice.mailbox.send_sealed(Address(BOB.public_key), sealed)
        again = await alice.mailbox.send_sealed(Address(BOB.public_key), sealed)
        assert first.status == "stored" and again.status in ("stored", "delivered")
        assert (await bob.mailbox.next()).body == "once"
        await first.delivered()
        late = await alice.mailbox.send_sealed(Address(BOB.public_key), sealed)
        assert late.status == "delivered"  # the relay remembers it was delivered
        after = await alice.send(BOB.id, "next")
        assert (await bob.mailbox.next()).body == "next"  # not "once" again
        await after.delivered()


async def test_the_relay_store_never_holds_a_message_in_plaintext(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    data = tmp_path / "relay"
    running = await start_relay(nursery, data)
    secret = "the launch code is 7-4-1-9-plaintext-canary"
    async with RelayClient.connect(running.url, BOB):
        pass
    async with RelayClient.connect(running.url, ALICE) as alice:
        await alice.send(BOB.id, secret)
        await alice.send(BOB.id, secret.encode())
    stored = b"".join(path.read_bytes() for path in data.iterdir() if path.is_file())
    assert running.node.inboxes.size(BOB.public_key) == 2  # stored, yet unreadable:
    assert secret.encode() not in stored and b"launch code" not in stored
    running.scope.cancel()


async def test_a_tampered_or_forged_message_is_refused(relay: RunningRelay) -> None:
    header = Header(b"\x01" * 16, ALICE.public_key, BOB.public_key, b"s" * 8, 1, 0)
    sealed = seal(ALICE, header, "real")
    flipped = bytearray(sealed.ciphertext)
    flipped[0] ^= 1
    tampered = Sealed(sealed.header, sealed.ephemeral, bytes(flipped), sealed.sig)
    forged = seal(CAROL, Header(b"\x02" * 16, CAROL.public_key, BOB.public_key, b"s" * 8, 2, 0), 1)
    as_alice = Sealed(  # Carol's message, claiming to be Alice's
        Header(b"\x02" * 16, ALICE.public_key, BOB.public_key, b"s" * 8, 2, 0),
        forged.ephemeral,
        forged.ciphertext,
        forged.sig,
    )
    async with RelayClient.connect(relay.url, BOB) as bob:
        for bad in (tampered, as_alice):
            assert not bob.mailbox.arrive(bad, "direct")  # the recipient refuses it
        assert bob.mailbox.arrive(sealed, "direct")
        assert (await bob.mailbox.next()).body == "real"
    async with RelayClient.connect(relay.url, ALICE) as alice:  # and the relay does too
        for bad in (tampered, as_alice):
            with pytest.raises(ProtocolError) as refused:
                await alice.mailbox.send_sealed(Address(BOB.public_key), bad)
            assert refused.value.code is ErrorCode.BAD_MESSAGE


async def test_bad_sends_get_clear_errors(nursery: trio.Nursery, tmp_path: Path) -> None:
    config = RelayConfig(name="local", inbox_max_items=3, max_message=4096)
    running = await start_relay(nursery, tmp_path / "relay", config)
    async with RelayClient.connect(running.url, ALICE) as alice:
        with pytest.raises(ProtocolError) as unknown:
            await alice.send(CAROL.id, "nobody home")
        assert unknown.value.code is ErrorCode.UNKNOWN_RECIPIENT
        async with RelayClient.connect(running.url, BOB):
            pass
        with pytest.raises(ProtocolError) as large:
            await alice.send(BOB.id, b"x" * 5000)
        assert large.value.code is ErrorCode.MESSAGE_TOO_LARGE
        for n in range(3):
            await alice.send(BOB.id, n)
        with pytest.raises(ProtocolError) as full:
            await alice.send(BOB.id, "one too many")
        assert full.value.code is ErrorCode.INBOX_FULL
        with pytest.raises(ValueError, match="name a directory"):
            await alice.send("bob", "who?")
        assert (await alice.query("x@local", "dir.count", {"online": True}))["count"] == 0
    async with RelayClient.connect(running.url, BOB) as bob:  # what was stored arrives
        assert [(await bob.mailbox.next()).body for _ in range(3)] == [0, 1, 2]
    running.scope.cancel()


async def test_a_receipt_for_another_message_or_signed_by_another_is_refused(
    relay: RunningRelay,
) -> None:
    async with RelayClient.connect(relay.url, ALICE) as alice:
        header = Header(b"\x03" * 16, ALICE.public_key, BOB.public_key, b"s" * 8, 1, 0)
        by_carol = Receipt.make(CAROL, header)  # Carol acknowledging for Bob
        alice.mailbox.open()
        await alice.mailbox.live.wait()
        refused = alice.mailbox.refused
        alice.send_frame(_ack(alice.mailbox.sub, by_carol.encode()))
        await refused.wait()
        assert alice.mailbox.refusal is not None
        assert alice.mailbox.refusal.code is ErrorCode.BAD_MESSAGE
        assert alice.mailbox.error is None  # the inbox stream goes on


async def test_a_receipt_that_comes_twice_is_taken_off_the_relay_both_times(
    relay: RunningRelay,
) -> None:
    """A recipient's relay may store a receipt twice (its acknowledgement failed after
    the receipt was kept): the sender takes the copy off its inbox too, not leaving it
    there until the TTL as another instance's."""
    from relay.inbox import Arriving

    async with (
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, BOB) as bob,
    ):
        bob.mailbox.open()
        await bob.mailbox.live.wait()
        sent = await alice.send(BOB.id, "once")
        await bob.mailbox.next()
        receipt = await sent.delivered()
        copy = Arriving(ALICE.public_key, BOB.public_key, sent.id, receipt.encode())
        await relay.node.inboxes.put_receipts([copy])
        await drained(relay, ALICE)


async def test_a_receipt_signed_by_another_than_the_recipient_does_not_settle_a_send(
    relay: RunningRelay,
) -> None:
    """A receipt in Alice's inbox that checks but is Carol's (a peer relay may pass
    on any receipt that checks) does not say Bob has the message: Alice's send
    waits on for Bob's own."""
    from relay.inbox import Arriving

    async with (
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, BOB) as bob,
    ):
        with trio.fail_after(TIMEOUT):
            sent = await alice.send(BOB.id, "for Bob")
            alice.mailbox.open()
            await alice.mailbox.live.wait()
            header = Header(sent.id, ALICE.public_key, CAROL.public_key, b"s" * 8, 1, 0)
            carols = Receipt.make(CAROL, header)
            carols.verify()  # it checks: only its signer is not the recipient
            alice_inbox = [Arriving(ALICE.public_key, CAROL.public_key, sent.id, carols.encode())]
            await relay.node.inboxes.put_receipts(alice_inbox)
            await drained(relay, ALICE)  # Alice read it (and took it off the relay)
            assert sent.receipt is None and sent.status == "stored"
            assert (await bob.mailbox.next()).body == "for Bob"
            assert (await sent.delivered()).recipient == BOB.public_key


async def test_a_receipt_for_another_instance_of_the_agent_is_left_for_it(
    relay: RunningRelay,
) -> None:
    """Two processes of Alice: the one reading her inbox gets a receipt for a message
    the other sent. It leaves it on the relay (no ack), and the sender, opening the
    inbox to wait for its receipt, finds it there."""
    async with (
        RelayClient.connect(relay.url, ALICE) as sender,
        RelayClient.connect(relay.url, ALICE) as reader,
        RelayClient.connect(relay.url, BOB) as bob,
    ):
        with trio.fail_after(TIMEOUT):
            reader.mailbox.open()
            await reader.mailbox.live.wait()
            sent = await sender.send(BOB.id, "from the sender")
            assert (await bob.mailbox.next()).body == "from the sender"
            await bob.mailbox.confirm()  # the receipt is in Alice's inbox
            while not reader.mailbox.unconfirmed:  # the reader was sent it
                await trio.testing.wait_all_tasks_blocked()
            await reader.mailbox.confirm()  # whatever it acknowledged is applied
            assert relay.node.inboxes.size(ALICE.public_key) == 1  # left for the sender
            (await sent.delivered()).verify()


async def drained(relay: RunningRelay, agent: Identity) -> None:
    """Wait until ``agent``'s inbox on ``relay`` is empty (acks are applied in batches)."""
    inboxes = relay.node.inboxes
    with trio.fail_after(10):
        while inboxes.size(agent.public_key):
            await inboxes.wait_change()


def _ack(sub: int | None, receipt: bytes):  # type: ignore[no-untyped-def]
    from agent_sdk import frames as f

    assert sub is not None
    return f.MsgAck(sub=sub, seq=1, receipt=receipt)


async def test_a_direct_message_skips_the_relay_and_its_receipt_comes_back_directly(
    relay: RunningRelay,
) -> None:
    async with (
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, BOB) as bob,
        bob.listen() as endpoint,
    ):
        with trio.fail_after(TIMEOUT):  # (not a timing check: a receipt never sent fails)
            sent = await alice.send(BOB.id, "psst", via="direct", endpoint=endpoint)
            assert sent.path == "direct" and sent.status == "received"
            message = await bob.mailbox.next()
            assert message.body == "psst" and message.path == "direct"
            (await sent.delivered()).verify()
        assert relay.node.inboxes.counts["stored"] == 0  # the relay never had it


async def test_an_endpoint_on_an_ipv6_address_has_a_url_senders_can_use(
    relay: RunningRelay,
) -> None:
    """``listen("::1")`` gave ``ws://::1:PORT``, which is no URL (an IPv6 literal goes
    in brackets): a sender given it, or finding it in the directory, could not
    connect (``hostname isn't provided``)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    async with (
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, BOB) as bob,
        bob.listen("::1") as endpoint,
    ):
        assert endpoint.startswith("ws://[::1]:"), endpoint
        sent = await alice.send(BOB.id, "over IPv6", via="direct", endpoint=endpoint)
        assert sent.path == "direct" and sent.status == "received"
        assert (await bob.mailbox.next()).body == "over IPv6"


async def test_auto_finds_the_endpoint_in_the_directory_and_falls_back_when_it_is_dead(
    relay: RunningRelay,
) -> None:
    team = "team@local"
    async with (
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, BOB) as bob,
    ):
        async with bob.listen() as endpoint:
            await Directory(bob, team).join("bob", endpoint=endpoint)
            first = await alice.send("bob", "by name, directly", ns=team)
            assert first.path == "direct"
            assert (await bob.mailbox.next()).path == "direct"
        # Bob stopped listening; his profile still names the endpoint.
        second = await alice.send("bob", "then through the relay", ns=team)
        assert second.path == "relay" and second.status == "stored"
        message = await bob.mailbox.next()
        assert message.body == "then through the relay" and message.path == "relay"
        await second.delivered()


async def test_an_endpoint_holding_too_many_untaken_messages_sends_senders_to_the_relay(
    relay: RunningRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any key may dial an endpoint: what it holds for the application is bounded, and
    past the bound a sender goes through the relay, whose inbox is bounded too."""
    import agent_sdk.direct

    monkeypatch.setattr(agent_sdk.direct, "MAX_UNTAKEN", 2)
    async with (
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, BOB) as bob,
        bob.listen() as endpoint,
    ):
        paths = [(await alice.send(BOB.id, n, endpoint=endpoint)).path for n in range(2)]
        assert paths == ["direct", "direct"]
        with pytest.raises(DirectUnreachable, match="not taken yet"):
            await alice.send(BOB.id, "refused", via="direct", endpoint=endpoint)
        third = await alice.send(BOB.id, 2, endpoint=endpoint)  # auto: on to the relay
        assert third.path == "relay" and third.status == "stored"
        assert bob.mailbox.waiting == 2  # the bound held
        assert [(await bob.mailbox.next()).body for _ in range(3)] == [0, 1, 2]
        await third.delivered()


async def test_a_message_that_went_direct_and_then_through_the_relay_is_handed_out_once(
    relay: RunningRelay,
) -> None:
    async with (
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, BOB) as bob,
        bob.listen() as endpoint,
    ):
        to = Address(BOB.public_key)
        sealed = alice.mailbox.seal_next(to, "both ways")
        await alice.mailbox._direct(to, sealed, endpoint)
        await alice.mailbox.send_sealed(to, sealed)  # as if its answer had been lost
        after = await alice.send(BOB.id, "after", via="relay")
        assert [(await bob.mailbox.next()).body for _ in range(2)] == ["both ways", "after"]
        await after.delivered()
        await drained(relay, BOB)  # the copy was acknowledged too


async def test_a_message_sent_again_by_another_client_with_its_chosen_id_is_a_copy(
    relay: RunningRelay,
) -> None:
    """A process that sends a message and dies before its answer cannot make the next
    process send the same message: each sealed a new id on a new stream. With a chosen
    id the next one does, and here the copy goes by a path (the relay) that never saw
    the first (sent directly): only the recipient can tell, by its id and stream."""
    async with (
        RelayClient.connect(relay.url, BOB) as bob,
        bob.listen() as endpoint,
    ):
        async with RelayClient.connect(relay.url, ALICE) as first_run:
            sent = await first_run.send(BOB.id, "report", via="direct", endpoint=endpoint, id="r7")
            assert (await bob.mailbox.next()).body == "report"
        async with RelayClient.connect(relay.url, ALICE) as next_run:
            copy = await next_run.send(BOB.id, "report", via="relay", id="r7")
            assert copy.id == sent.id and copy.status == "stored"
            after = await next_run.send(BOB.id, "after", via="relay")
            assert (await bob.mailbox.next()).body == "after"  # not "report" again
            await copy.delivered()  # the copy was acknowledged, its receipt sent again
            await after.delivered()
        await drained(relay, BOB)
    with pytest.raises(ValueError, match="not empty"):
        async with RelayClient.connect(relay.url, ALICE) as alice:
            await alice.send(BOB.id, "x", id="")


def test_a_recipient_remembers_the_streams_it_handed_out_from_last() -> None:
    """The streams a recipient remembers are the latest it handed a message out from
    (15.4): a stream in use stays, and a copy of its last message is still old."""
    from agent_sdk.messaging import Inflow

    def header(stream: bytes, seq: int) -> Header:
        return Header(stream * 2 + bytes([seq]) * 8, ALICE.public_key, BOB.public_key,
                      stream, seq, 0)  # fmt: skip

    inflow = Inflow(memory=2)
    a, b, c = b"a" * 4, b"b" * 4, b"c" * 4
    for stream, seq in ((a, 1), (b, 1), (a, 2), (c, 1)):  # c's makes one stream go: b's
        assert inflow.admit(header(stream, seq)) == "new"
        inflow.taken(header(stream, seq).id)
    assert inflow.admit(header(a, 2)) == "old"  # a copy of a's last
    assert inflow.admit(header(b, 1)) == "new"  # b was forgotten (15.4: a new message)


async def test_a_message_whose_direct_answer_was_lost_goes_by_the_relay_as_a_copy(
    nursery: trio.Nursery, relay: RunningRelay
) -> None:
    """Bob's endpoint queued the message but its `got` was lost with the connection:
    the sender falls back to the relay with the same id and number, and Bob, who has
    it already, takes the relayed one for a copy and hands the message out once
    (acknowledging the copy as it does)."""
    from websockets.exceptions import ConnectionClosed
    from websockets.trio.client import connect
    from websockets.trio.server import serve

    from agent_sdk.direct import _unpack

    async with (
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, BOB) as bob,
        bob.listen() as endpoint,
    ):

        async def losing_got(ws: ServerConnection) -> None:  # Alice <-> Bob, no `got`
            async with connect(endpoint, compression=None) as to_bob:

                async def up() -> None:
                    with contextlib.suppress(ConnectionClosed):
                        while True:
                            await to_bob.send(await ws.recv())

                async with trio.open_nursery() as pumps:
                    pumps.start_soon(up)
                    while _unpack(answer := await to_bob.recv())["t"] != "got":
                        await ws.send(answer)
                    pumps.cancel_scope.cancel()

        server = await nursery.start(partial(serve, losing_got, 0, host="127.0.0.1"))
        lossy = f"ws://127.0.0.1:{server.listeners[0].socket.getsockname()[1]}"
        with trio.fail_after(TIMEOUT):
            bob.mailbox.open()
            await bob.mailbox.live.wait()
            sent = await alice.send(BOB.id, "once", endpoint=lossy)
            assert sent.path == "relay" and sent.status == "stored"
            while not bob.mailbox._copies:  # the relayed one came: a copy of one queued
                await trio.testing.wait_all_tasks_blocked()
            assert (await bob.mailbox.next()).body == "once"
            await drained(relay, BOB)  # the copy was acknowledged with it, off the relay
            after = await alice.send(BOB.id, "after", via="relay")
            assert (await bob.mailbox.next()).body == "after"  # not "once" again
            await after.delivered()
            await sent.delivered()  # the copy was acknowledged with a receipt


async def test_a_chosen_id_is_derived_as_the_protocol_says(relay: RunningRelay) -> None:
    """Another implementation sending the same chosen id must seal the same message
    (15.4): id and stream are SHA-256 of the domain, sender, recipient and text,
    and seq is 1. The derivation is checked here from the protocol's text."""
    import hashlib

    d = hashlib.sha256(b"formicary/v1/msg-id\x00" + ALICE.public_key + BOB.public_key
                       + "r\u00e9port-7".encode()).digest()  # fmt: skip
    async with RelayClient.connect(relay.url, ALICE) as alice:
        sealed = alice.mailbox.seal_next(Address(BOB.public_key), "x", id="r\u00e9port-7")
        other = alice.mailbox.seal_next(Address(CAROL.public_key), "x", id="r\u00e9port-7")
    header = sealed.header
    assert (header.id, header.stream, header.seq) == (d[:16], d[16:24], 1)
    assert other.header.id != header.id  # the recipient is part of it


async def test_a_chosen_id_sent_again_after_its_receipt_is_delivered_and_keeps_direct_open(
    relay: RunningRelay,
) -> None:
    """The relay answers a chosen id sent again after its receipt `delivered`: that
    receipt went to the first send and none comes to this one. Its handle never
    settled: ``delivered()`` never returned, and it counted as relayed and undelivered
    for good, so no later message to Bob went direct (via="direct" refused)."""
    async with (
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, BOB) as bob,
        bob.listen() as endpoint,
    ):
        with trio.fail_after(TIMEOUT):  # (not a timing check: only that it ends)
            first = await alice.send(BOB.id, "report", via="relay", id="r7")
            assert (await bob.mailbox.next()).body == "report"
            (await first.delivered()).verify()
            again = await alice.send(BOB.id, "report", via="relay", id="r7")
            assert again is not first and again.status == "delivered"
            assert await again.delivered() is None and again.delivered_before
            sent = await alice.send(BOB.id, "psst", via="direct", endpoint=endpoint)
            assert sent.path == "direct" and (await bob.mailbox.next()).body == "psst"


async def test_a_chosen_id_sent_again_while_stored_counts_once_against_the_direct_path(
    relay: RunningRelay,
) -> None:
    """Sent again while the first copy waits in the relay, a chosen id shares the first
    send's handle, which settles once, with the receipt: it was counted as relayed and
    undelivered twice and uncounted once, so later messages to Bob stayed off the direct
    path (via="direct" refused) for as long as Alice's client ran."""
    async with RelayClient.connect(relay.url, BOB):
        pass  # Bob has been here once: he can be sent messages
    async with RelayClient.connect(relay.url, ALICE) as alice:
        with trio.fail_after(TIMEOUT):  # (not a timing check: only that it ends)
            first = await alice.send(BOB.id, "report", via="relay", id="r7")
            again = await alice.send(BOB.id, "report", via="relay", id="r7")
            assert again is first and again.status == "stored"
            async with RelayClient.connect(relay.url, BOB) as bob, bob.listen() as endpoint:
                assert (await bob.mailbox.next()).body == "report"
                (await first.delivered()).verify()
                sent = await alice.send(BOB.id, "psst", via="direct", endpoint=endpoint)
                assert sent.path == "direct" and (await bob.mailbox.next()).body == "psst"


async def test_a_direct_endpoint_must_prove_it_is_the_recipient(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, CAROL) as carol,
        carol.listen() as carols,
    ):
        with pytest.raises(DirectUnreachable, match="another agent's"):
            await alice.send(BOB.id, "for Bob", via="direct", endpoint=carols)
        with pytest.raises(DirectUnreachable):
            await alice.send(BOB.id, "nobody there", via="direct", endpoint="ws://127.0.0.1:9")


async def listening_as_bob(
    nursery: trio.Nursery, signer: Identity, then: Callable[[ServerConnection], Awaitable[None]]
) -> str:
    """A direct endpoint that answers a dialler's hello with Bob's key, signed by
    ``signer`` (Bob, or an impostor), then hands the connection to ``then``: its URL."""
    from agent_sdk.direct import _pack, _proof, _unpack

    async def handler(ws: ServerConnection) -> None:
        hello = _unpack(await ws.recv())
        sig = signer.sign(_proof(b"listener", hello["challenge"], hello["key"]))
        mine = secrets.token_bytes(32)
        await ws.send(_pack({"t": "hello", "key": BOB.public_key, "challenge": mine, "sig": sig}))
        await then(ws)

    server = await nursery.start(partial(serve, handler, 0, host="127.0.0.1"))
    return f"ws://127.0.0.1:{server.listeners[0].socket.getsockname()[1]}"


async def test_a_direct_endpoint_showing_the_recipients_key_must_sign_with_it(
    nursery: trio.Nursery, relay: RunningRelay
) -> None:
    """An endpoint that shows Bob's key in its hello but cannot sign with it is not
    Bob: the dialler gives up before sending anything (auto: through the relay)."""
    from agent_sdk.direct import _unpack

    got: list[dict[str, object]] = []

    async def impostor(ws: ServerConnection) -> None:  # Bob's key, Carol's signature
        got.extend([_unpack(await ws.recv()), _unpack(await ws.recv())])  # auth, msg
        await ws.aclose()

    endpoint = await listening_as_bob(nursery, CAROL, impostor)
    async with RelayClient.connect(relay.url, BOB):
        pass  # the relay knows Bob: it keeps his messages
    async with RelayClient.connect(relay.url, ALICE) as alice:
        with trio.fail_after(TIMEOUT):
            with pytest.raises(DirectUnreachable, match="did not prove"):
                await alice.send(BOB.id, "for Bob", via="direct", endpoint=endpoint)
            sent = await alice.send(BOB.id, "for Bob", endpoint=endpoint)
        assert sent.path == "relay" and got == []  # the impostor was sent nothing


async def test_a_direct_listener_takes_messages_only_from_the_key_its_dialler_proved(
    relay: RunningRelay,
) -> None:
    """The dialler proves its key by signing the listener's challenge, and sends only
    its own messages: a dialler that cannot sign for the key it claims is closed
    (1008), and one that sends another agent's sealed message (a copy it got hold
    of) is refused. Neither reaches Bob's application."""
    from websockets.exceptions import ConnectionClosed
    from websockets.trio.client import connect

    from agent_sdk.direct import _pack, _proof, _prove, _unpack

    from_alice = seal(ALICE, Header(b"\x07" * 16, ALICE.public_key, BOB.public_key,
                                    b"s" * 8, 1, 0), "replayed")  # fmt: skip
    async with RelayClient.connect(relay.url, BOB) as bob, bob.listen() as endpoint:
        with trio.fail_after(TIMEOUT):
            async with connect(endpoint, compression=None) as ws:  # Carol, as herself
                await _prove(ws, CAROL, BOB.public_key)
                await ws.send(_pack({"t": "msg", "msg": from_alice.encode()}))
                answer = _unpack(await ws.recv())
                assert answer["t"] == "refused" and "sender" in answer["reason"]
            async with connect(endpoint, compression=None) as ws:  # Carol, as Alice
                challenge = b"\x01" * 32
                await ws.send(
                    _pack({"t": "hello", "key": ALICE.public_key, "challenge": challenge})
                )
                hello = _unpack(await ws.recv())
                sig = CAROL.sign(_proof(b"dialer", hello["challenge"], BOB.public_key))
                await ws.send(_pack({"t": "auth", "sig": sig}))
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.send(_pack({"t": "msg", "msg": from_alice.encode()}))
                    await ws.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert bob.mailbox.waiting == 0


async def test_a_direct_got_not_signed_by_the_recipient_does_not_count(
    nursery: trio.Nursery, relay: RunningRelay
) -> None:
    """On a plain ws:// path anyone on the way can answer `got`: the dialler counts
    only one the recipient signed. Here the endpoint (standing for whoever forwarded
    Bob's handshake) answers an unsigned `got` and drops the connection, and the
    message goes on through the relay rather than being taken for delivered."""
    from agent_sdk.direct import _pack, _unpack

    async def forger(ws: ServerConnection) -> None:
        await ws.recv()  # auth
        mid = Sealed.decode(_unpack(await ws.recv())["msg"]).header.id
        await ws.send(_pack({"t": "got", "id": mid, "sig": b"\x00" * 64}))
        await ws.aclose()

    endpoint = await listening_as_bob(nursery, BOB, forger)
    async with RelayClient.connect(relay.url, BOB):
        pass  # the relay knows Bob: it keeps his messages
    async with RelayClient.connect(relay.url, ALICE) as alice:
        with trio.fail_after(TIMEOUT):
            sent = await alice.send(BOB.id, "hi", endpoint=endpoint)
        assert sent.path == "relay" and sent.status == "stored"
    async with RelayClient.connect(relay.url, BOB) as bob:
        assert (await bob.mailbox.next()).body == "hi"


async def test_a_direct_message_that_does_not_unseal_is_refused(relay: RunningRelay) -> None:
    """The listener answers `got` only for a message its application can have: one
    it cannot open is refused, so the sender does not take it for delivered."""
    sealed = seal(ALICE, Header(b"\x05" * 16, ALICE.public_key, BOB.public_key,
                                b"s" * 8, 1, 0), "real")  # fmt: skip
    flipped = bytearray(sealed.ciphertext)
    flipped[0] ^= 1
    tampered = Sealed(sealed.header, sealed.ephemeral, bytes(flipped), sealed.sig)
    async with (
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, BOB) as bob,
        bob.listen() as endpoint,
    ):
        with trio.fail_after(TIMEOUT), pytest.raises(DirectUnreachable, match="does not unseal"):
            await alice.mailbox._direct(Address(BOB.public_key), tampered, endpoint)
        assert bob.mailbox.waiting == 0


async def test_an_undelivered_message_expires_and_its_sender_is_told(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, BOB):
        pass
    async with RelayClient.connect(relay.url, ALICE) as alice:
        sent = await alice.send(BOB.id, "too late")
        inboxes = relay.node.inboxes
        now = inboxes.wall_ms()
        inboxes.wall_ms = lambda: now + relay.node.config.inbox_ttl_ms  # a week on
        gone = await inboxes.expire()
        assert [item.kind for item in gone] == ["message"]
        with pytest.raises(ProtocolError, match="expired"):
            await sent.delivered()  # Alice's inbox got an `expired` item for it
        assert sent.expired
        # The notice again (its ack was lost with a connection, say): acknowledged,
        # not left on the relay as another instance's.
        acks: list[f.AgentFrame] = []
        alice.send_frame = acks.append  # type: ignore[method-assign]
        sub = alice.mailbox.sub
        assert sub is not None
        alice.mailbox._on_frame(f.MsgItem(sub=sub, seq=99, kind="expired", data=sent.id))
        assert acks == [f.MsgAck(sub=sub, seq=99)]
    async with RelayClient.connect(relay.url, BOB) as bob:
        bob.mailbox.open()
        await bob.mailbox.live.wait()
        assert bob.mailbox.waiting == 0  # nothing left for Bob


async def test_messages_iterates_and_an_unsealable_item_is_dropped_off_the_relay(
    relay: RunningRelay,
) -> None:
    secret = "plaintext-canary-42"
    async with RelayClient.connect(relay.url, BOB):
        pass
    async with RelayClient.connect(relay.url, ALICE) as alice:
        # For Bob by its header, but sealed to Carol's key: Bob cannot open it.
        header = Header(b"\x05" * 16, ALICE.public_key, CAROL.public_key, b"s" * 8, 1, 0)
        wrong = seal(ALICE, header, "for Carol")
        misaddressed = Sealed(
            Header(b"\x05" * 16, ALICE.public_key, BOB.public_key, b"s" * 8, 1, 0),
            wrong.ephemeral,
            wrong.ciphertext,
            ALICE.sign(
                Sealed(
                    Header(b"\x05" * 16, ALICE.public_key, BOB.public_key, b"s" * 8, 1, 0),
                    wrong.ephemeral,
                    wrong.ciphertext,
                    b"",
                ).signed_part()
            ),
        )
        await alice.mailbox.send_sealed(Address(BOB.public_key), misaddressed)
        await alice.send(BOB.id, secret)
    async with RelayClient.connect(relay.url, BOB) as bob:
        async for message in bob.messages():
            assert message.body == secret  # the unsealable one never reaches the app
            break
    await drained(relay, BOB)  # both acknowledged (the unsealable one without a receipt)


async def test_a_second_reader_of_the_same_agent_ends_the_first_until_it_takes_it_back(
    relay: RunningRelay,
) -> None:
    async with (
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, BOB) as first,
        RelayClient.connect(relay.url, BOB) as second,
    ):
        first.mailbox.open()
        await first.mailbox.live.wait()
        second.mailbox.open()
        await second.mailbox.live.wait()
        # (not a timing check: a first stream the relay never ends fails, not hangs)
        with trio.fail_after(TIMEOUT), pytest.raises(ProtocolError) as ended:
            await first.mailbox.next()
        assert ended.value.code is ErrorCode.DUPLICATE_SUBSCRIPTION
        with pytest.raises(ProtocolError):
            await first.mailbox.next()  # still ended: next() does not take it back
        await alice.send(BOB.id, "to whoever reads")
        assert (await second.mailbox.next()).body == "to whoever reads"
        await second.mailbox.confirm()  # its acknowledgement is applied: not sent again
        first.mailbox.open()  # taken back, on purpose
        await first.mailbox.live.wait()
        await alice.send(BOB.id, "now the first")
        assert (await first.mailbox.next()).body == "now the first"


async def test_after_a_relayed_message_auto_stays_on_the_relay_until_its_receipt(
    relay: RunningRelay,
) -> None:
    async with (
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, BOB) as bob,
        bob.listen() as endpoint,
    ):
        first = await alice.send(BOB.id, 1, via="relay")
        second = await alice.send(BOB.id, 2, endpoint=endpoint)  # auto, but 1 is pending
        assert second.path == "relay"
        assert [(await bob.mailbox.next()).body for _ in range(2)] == [1, 2]
        await first.delivered()
        await second.delivered()
        third = await alice.send(BOB.id, 3, endpoint=endpoint)
        assert third.path == "direct"  # nothing on the relay left to overtake
        assert (await bob.mailbox.next()).body == 3
        with pytest.raises(ValueError, match="not delivered yet"):
            await alice.send(BOB.id, 4, via="relay")
            await alice.send(BOB.id, 5, via="direct", endpoint=endpoint)


async def test_a_receipt_for_another_message_is_not_passed_on_and_the_item_stays(
    relay: RunningRelay,
) -> None:
    """An ack whose receipt is for another message comes from an agent that took the
    item's seq for another one: the message may never have reached it."""
    from agent_sdk import frames as f

    async with (
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, BOB) as bob,
    ):
        with trio.fail_after(10):
            bob.mailbox.open()
            await bob.mailbox.live.wait()
            sent = await alice.send(BOB.id, "real")
            other = Header(b"\x09" * 16, ALICE.public_key, BOB.public_key, b"s" * 8, 9, 0)
            wrong = Receipt.make(BOB, other)  # Bob's signature, another message's id
            while not relay.node.inboxes.size(BOB.public_key):
                await relay.node.inboxes.wait_change()
            [item] = relay.node.inboxes.after(BOB.public_key, 0, 1)
            refused = bob.mailbox.refused
            bob.send_frame(f.MsgAck(sub=bob.mailbox.sub or 0, seq=item.seq, receipt=wrong.encode()))
            await refused.wait()
            assert bob.mailbox.refusal is not None
            assert bob.mailbox.refusal.code is ErrorCode.BAD_MESSAGE
            assert relay.node.inboxes.size(BOB.public_key) == 1  # it stays
            assert relay.node.inboxes.size(ALICE.public_key) == 0  # no receipt for Alice
            assert sent.status == "stored" and sent.receipt is None
            assert (await bob.mailbox.next()).body == "real"  # ...and is delivered
            await sent.delivered()


async def test_a_receipt_for_the_message_that_does_not_check_is_dropped_and_the_item_goes(
    relay: RunningRelay,
) -> None:
    """An ack whose receipt is for the item's message but whose signature does not
    check: the agent has the message, so the item is deleted, but the receipt is not
    passed on (the sender gets none), the answer is 6004, and acking again is 4003."""
    async with (
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, BOB) as bob,
    ):
        with trio.fail_after(10):
            bob.mailbox.open()
            await bob.mailbox.live.wait()
            sent = await alice.send(BOB.id, "real")
            [item] = relay.node.inboxes.after(BOB.public_key, 0, 1)  # stored: answered
            unsigned = Receipt(sent.id, ALICE.public_key, BOB.public_key, b"\x00" * 64)
            for code in (ErrorCode.BAD_MESSAGE, ErrorCode.NOT_FOUND):
                refused = bob.mailbox.refused
                ack = f.MsgAck(sub=bob.mailbox.sub or 0, seq=item.seq, receipt=unsigned.encode())
                bob.send_frame(ack)
                await refused.wait()
                assert bob.mailbox.refusal is not None and bob.mailbox.refusal.code is code
                assert relay.node.inboxes.size(BOB.public_key) == 0  # delivered all the same
                assert relay.node.inboxes.size(ALICE.public_key) == 0  # no receipt for Alice
            assert sent.receipt is None and bob.mailbox.error is None  # the stream goes on


async def frames(agent: RawAgent, n: int) -> list[f.Frame]:
    """The next ``n`` frames the relay sends ``agent`` (singly or bundled)."""
    got: list[f.Frame] = []
    while len(got) < n:
        with trio.fail_after(TIMEOUT):
            message = await agent.ws.recv()
        assert isinstance(message, bytes)
        got += f.decode_message(message)
    assert len(got) == n, got
    return got


def gate(apply: Any) -> tuple[Any, threading.Event, threading.Event]:
    """An inbox store's ``apply`` (run in a worker thread) held at its start: (the
    gated ``apply``, set once a write has started, set to let the writes go on)."""
    entered, go = threading.Event(), threading.Event()

    def gated(put: object, drop: object) -> None:
        entered.set()
        go.wait(TIMEOUT)
        apply(put, drop)

    return gated, entered, go


async def test_acks_queued_when_the_connection_closes_are_still_applied(
    relay: RunningRelay,
) -> None:
    """The relay applies the acks a closing connection sent before it lets it go
    (15.3): here the second waits behind the first's write when the agent hangs up,
    without a confirm. Dropped, its item would be sent to the next reader again."""
    for body in ("one", "two"):
        await a_message_waits(relay, body)
    store = relay.node.inboxes.store
    gated, entered, go = gate(store.apply)

    try:
        async with raw_agent(relay.url, BOB) as bob:
            await bob.send(f.encode_frame(f.MsgInbox(sub=5)))
            first, second, _ = await frames(bob, 3)
            assert isinstance(first, f.MsgItem) and isinstance(second, f.MsgItem)
            store.apply = gated  # type: ignore[method-assign]
            await bob.send(f.encode_frame(f.MsgAck(sub=5, seq=first.seq)))
            await trio.to_thread.run_sync(entered.wait, TIMEOUT)  # its delete is on its way
            await bob.send(f.encode_frame(f.MsgAck(sub=5, seq=second.seq)))
            await bob.ws.aclose()
        await trio.testing.wait_all_tasks_blocked()  # the relay saw the close
        go.set()
        await drained(relay, BOB)
    finally:
        go.set()


async def test_an_inbox_stream_says_where_its_backlog_ends_and_takes_acks_on_it_only(
    relay: RunningRelay,
) -> None:
    """``live`` carries the seq of the last item waiting when the stream opened; a
    second ``msg.inbox`` on the connection is 3005; an ack on a sub that is not this
    connection's open stream is 3004 and deletes nothing. The stream goes on."""
    for body in ("one", "two"):
        await a_message_waits(relay, body)
    async with raw_agent(relay.url, BOB) as bob:
        await bob.send(f.encode_frame(f.MsgInbox(sub=5)))
        *items, live = await frames(bob, 3)
        assert [(i.sub, i.kind) for i in items if isinstance(i, f.MsgItem)] == [(5, "message")] * 2
        last = items[-1]
        assert isinstance(last, f.MsgItem) and live == f.Live(sub=5, ns="", seq=last.seq)
        await bob.send(f.encode_frame(f.MsgInbox(sub=6)))  # one stream per connection
        await bob.expect_error(ErrorCode.DUPLICATE_SUBSCRIPTION, sub=6)
        await bob.send(f.encode_frame(f.MsgAck(sub=6, seq=last.seq)))
        await bob.expect_error(ErrorCode.UNKNOWN_SUBSCRIPTION, sub=6)
        await bob.send(f.encode_frame(f.MsgConfirm(rid=7)))
        assert await frames(bob, 1) == [f.Result(rid=7, body={})]
        assert relay.node.inboxes.size(BOB.public_key) == 2  # nothing was deleted
        await bob.send(f.encode_frame(f.MsgAck(sub=5, seq=last.seq)))
        await bob.send(f.encode_frame(f.MsgConfirm(rid=8)))
        assert await frames(bob, 1) == [f.Result(rid=8, body={})]
        assert relay.node.inboxes.size(BOB.public_key) == 1  # the stream took it


async def test_a_send_forgotten_for_too_many_later_ones_says_so(
    relay: RunningRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receipts waited for are bounded: the oldest send is given up on, and its
    delivered() says so instead of waiting for ever."""
    import agent_sdk.messaging

    monkeypatch.setattr(agent_sdk.messaging, "REMEMBERED", 2)
    async with RelayClient.connect(relay.url, BOB):
        pass  # Bob is known to the relay, and reads nothing
    async with RelayClient.connect(relay.url, ALICE) as alice:
        sent = [await alice.send(BOB.id, n, via="relay") for n in range(3)]
        with trio.fail_after(10), pytest.raises(ProtocolError) as forgotten:
            await sent[0].delivered()
        assert forgotten.value.code is ErrorCode.NOT_FOUND
        assert "no longer waited for" in forgotten.value.reason
        assert not sent[1]._settled.is_set()  # the later ones are still waited for


async def test_a_direct_peer_sending_garbage_ends_its_connection_not_the_client(
    nursery: trio.Nursery, relay: RunningRelay
) -> None:
    """A refusal whose reason nests 1,000 deep decoded fine, and str() of it raised a
    RecursionError that killed the sender's whole client; an endpoint a peer chose,
    such as ws://peer:99999, raised a ValueError instead of falling back."""
    import msgpack

    from agent_sdk.direct import _pack, _proof, _unpack

    async def hostile(ws: ServerConnection) -> None:  # proves BOB's key, then lies
        hello = _unpack(await ws.recv())
        sig = BOB.sign(_proof(b"listener", hello["challenge"], hello["key"]))
        mine = secrets.token_bytes(32)
        await ws.send(_pack({"t": "hello", "key": BOB.public_key, "challenge": mine, "sig": sig}))
        await ws.recv()  # auth
        mid = Sealed.decode(_unpack(await ws.recv())["msg"]).header.id
        pack = msgpack.packb
        deep = b"\x91" * 1000 + b"\xc0"  # decodes; str() of it runs out of stack
        await ws.send(b"\x83" + pack("t") + pack("refused") + pack("id") + pack(mid)
                      + pack("reason") + deep)  # fmt: skip
        await trio.sleep_forever()

    server = await nursery.start(partial(serve, hostile, 0, host="127.0.0.1"))
    port = server.listeners[0].socket.getsockname()[1]
    async with RelayClient.connect(relay.url, BOB):
        pass  # the relay knows Bob: it keeps his messages
    async with RelayClient.connect(relay.url, ALICE) as alice:
        sent = await alice.send(BOB.id, "hi", endpoint=f"ws://127.0.0.1:{port}")
        assert sent.path == "relay"  # refused directly, then relayed
    async with RelayClient.connect(relay.url, CAROL) as carol:
        with pytest.raises(DirectUnreachable):
            await carol.send(BOB.id, "hi", via="direct", endpoint="ws://127.0.0.1:99999")
        assert (await carol.send(BOB.id, "on", endpoint="ws://127.0.0.1:99999")).path == "relay"


async def test_a_direct_receipt_still_comes_after_the_senders_relay_connection_stops(
    relay: RunningRelay,
) -> None:
    """A stopping client ends the waits for relayed receipts, not for direct ones:
    those come on the direct connection, which outlives the relay's."""
    async with (
        RelayClient.connect(relay.url, BOB) as bob,
        bob.listen() as endpoint,
        RelayClient.connect(relay.url, ALICE, reconnect=False) as alice,
    ):
        sent = await alice.send(BOB.id, "hi", via="direct", endpoint=endpoint)
        assert sent.path == "direct"
        for connection in list(relay.node.connections):  # a relay restart, for Alice
            if connection.session.agent == ALICE.public_key:
                await connection.ws.aclose(1001, "going away")
        with trio.fail_after(10):
            await alice.stopped.wait()
            assert (await bob.mailbox.next()).body == "hi"  # its receipt goes directly
            receipt = await sent.delivered()
        assert receipt.id == sent.id


async def a_message_waits(relay: RunningRelay, body: object) -> None:
    """Alice's message to Bob, in Bob's inbox on the relay."""
    async with RelayClient.connect(relay.url, BOB):
        pass  # the relay knows Bob
    async with RelayClient.connect(relay.url, ALICE) as alice:
        await alice.send(BOB.id, body)


async def test_confirm_after_a_reconnect_waits_for_the_acks_to_be_applied(
    relay: RunningRelay, caplog: pytest.LogCaptureFixture
) -> None:
    """An ack sent on a connection that was then lost never reached the relay, while
    the confirm was sent again on the next connection and answered at once: the
    item stayed, and the agent's next process would get the message again."""
    from tests.agent_sdk.cuttable import Wire, dialer

    await a_message_waits(relay, "once")
    wires: list[Wire] = []
    async with RelayClient.connect(relay.url, BOB, dial=dialer(relay, wires)) as bob:
        bob.mailbox.open()
        await bob.mailbox.live.wait()
        await wires[0].cut()
        with trio.fail_after(10):
            assert (await bob.mailbox.next()).body == "once"  # its ack goes nowhere
            await bob.mailbox.confirm()
        assert relay.node.inboxes.size(BOB.public_key) == 0
    assert "unknown_subscription" not in caplog.text  # the old stream is not unsubscribed


async def test_a_dial_that_hangs_holds_up_only_its_own_recipient(relay: RunningRelay) -> None:
    """Dials shared one lock: an endpoint that accepts and never answers held up every
    direct send, to agents already connected too, until its dial timed out."""
    silent = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = silent.socket.getsockname()[1]
    async with (
        RelayClient.connect(relay.url, BOB) as bob,
        bob.listen() as endpoint,
        RelayClient.connect(relay.url, ALICE) as alice,
        trio.open_nursery() as nursery,
    ):
        await alice.send(BOB.id, "first", via="direct", endpoint=endpoint)  # connected
        carol = f"ws://127.0.0.1:{port}"
        nursery.start_soon(lambda: alice.send(CAROL.id, "x", via="direct", endpoint=carol))
        await trio.testing.wait_all_tasks_blocked()  # dialling Carol, who says nothing
        with trio.fail_after(5):  # (her dial gives up after 10 s)
            sent = await alice.send(BOB.id, "second", via="direct", endpoint=endpoint)
        assert sent.path == "direct"
        nursery.cancel_scope.cancel()
    await silent.aclose()


async def test_a_displaced_reader_leaves_what_it_has_not_taken_to_the_new_one(
    relay: RunningRelay,
) -> None:
    """Another process of the agent opened the inbox: the relay sends it every item
    not acknowledged, and the old reader went on handing out what it had queued, so
    both handed out the same message."""
    await a_message_waits(relay, "one")
    async with RelayClient.connect(relay.url, BOB) as first:
        first.mailbox.open()
        await first.mailbox.live.wait()
        assert first.mailbox.waiting == 1  # queued, not taken
        async with RelayClient.connect(relay.url, BOB) as second:
            second.mailbox.open()
            with trio.fail_after(10):
                assert (await second.mailbox.next()).body == "one"
                while first.mailbox.error is None:
                    await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(ProtocolError) as displaced:
                await first.mailbox.next()
            assert displaced.value.code is ErrorCode.DUPLICATE_SUBSCRIPTION
            assert first.mailbox.waiting == 0
            first.mailbox.open()  # taken back: the item came to the other reader
            await first.mailbox.live.wait()
        assert relay.node.inboxes.size(BOB.public_key) == 0


async def test_a_reader_that_takes_its_inbox_back_gets_what_it_handed_over(
    relay: RunningRelay,
) -> None:
    """What a displaced reader handed over and the other reader never took comes to
    it again when it takes the inbox back: handed out, not dropped as a copy."""
    await a_message_waits(relay, "one")
    async with RelayClient.connect(relay.url, BOB) as first:
        first.mailbox.open()
        await first.mailbox.live.wait()
        async with RelayClient.connect(relay.url, BOB) as second:
            second.mailbox.open()
            with trio.fail_after(10):
                await second.mailbox.live.wait()  # sent "one", which it does not take
                while first.mailbox.error is None:
                    await trio.testing.wait_all_tasks_blocked()
        first.mailbox.open()
        with trio.fail_after(10):
            assert (await first.mailbox.next()).body == "one"
            await first.mailbox.confirm()
        assert relay.node.inboxes.size(BOB.public_key) == 0


async def test_confirm_returns_while_messages_keep_coming(relay: RunningRelay) -> None:
    """Every item arriving during a confirm's round trip made it confirm again."""
    async with RelayClient.connect(relay.url, BOB):
        pass
    async with (
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, BOB) as bob,
        trio.open_nursery() as nursery,
    ):

        async def keep_sending() -> None:
            n = 0
            while True:
                await alice.send(BOB.id, n)
                n += 1

        async def keep_reading() -> None:
            while True:
                await bob.mailbox.next()

        nursery.start_soon(keep_sending)
        nursery.start_soon(keep_reading)
        await bob.mailbox.live.wait()
        while not bob.mailbox.unconfirmed:
            await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(10):
            await bob.mailbox.confirm()
        nursery.cancel_scope.cancel()


async def test_a_reopen_on_the_connection_the_inbox_is_open_on_keeps_it(
    relay: RunningRelay,
) -> None:
    """A reader that took its inbox back on a new connection before the reconnect's
    hook ran had the hook open it a second time there: 3005, and the mailbox ended."""
    async with RelayClient.connect(relay.url, BOB):
        pass
    async with (
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, BOB) as bob,
    ):
        bob.mailbox.open()
        await bob.mailbox.live.wait()
        await bob.mailbox._reopen()  # as the hook would, on this same connection
        await alice.send(BOB.id, "still here")
        with trio.fail_after(10):
            assert (await bob.mailbox.next()).body == "still here"
        assert bob.mailbox.error is None


async def bob_on_b_behind_a_way(
    nursery: trio.Nursery, tmp_path: Path
) -> tuple[RunningRelay, RunningRelay, Cuttable]:
    """Relays a and b, a's link to b through a way that can be cut, and Bob known to
    b (an agent of b): (a, b, the way), the link up."""
    relays = plan(tmp_path, "a", "b")
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    way = Cuttable(relays["b"].port)
    await nursery.start(way.run)
    a = await start(nursery, relays["a"], (relays["b"].peer(url=way.url),))
    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(b.url, BOB):
            pass
        await federation_of(a).links["b"].wait_up()
    return a, b, way


async def test_a_resending_hook_that_fails_does_not_end_the_send(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``on_resending`` runs in the sending task, between tries: a failure there ended
    the send, and the message, which no relay keeps while the way to its relay is
    down, was never sent again. It is logged, and the message reaches Bob once the
    way is back."""
    a, b, way = await bob_on_b_behind_a_way(nursery, tmp_path)
    link = federation_of(a).links["b"]
    with trio.fail_after(TIMEOUT):
        way.cut()
        await link.wait_for(lambda: link.client is None)
        async with RelayClient.connect(a.url, ALICE) as alice:
            resending = BrokenHook()
            alice.on_resending.append(resending)
            sent: list[Sent] = []

            async def send() -> None:
                sent.append(await alice.send(f"{BOB.id}@b", "held, then sent"))

            async with trio.open_nursery() as sending:
                sending.start_soon(send)
                await resending.called.wait()  # answered home_unreachable, to be sent again
                way.heal()
            assert sent[0].status == "stored"
        async with RelayClient.connect(b.url, BOB) as bob:
            assert (await bob.mailbox.next()).body == "held, then sent"
    assert hook_failures(caplog, "on_resending", resending)


async def test_a_send_to_another_relay_gives_up_after_its_patience(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """While the way to the recipient's relay is down a message is sent again, for
    ``patience`` seconds: then ``send`` gives up with ``home_unreachable`` (no relay
    keeps the message: it is the sender's to send again, 15.5). With no patience
    it gives up at the first answer, and the message was stored nowhere."""
    a, b, way = await bob_on_b_behind_a_way(nursery, tmp_path)
    link = federation_of(a).links["b"]
    with trio.fail_after(TIMEOUT):
        way.cut()
        await link.wait_for(lambda: link.client is None)
        async with RelayClient.connect(a.url, ALICE) as alice:
            alice.mailbox.patience = 0
            with pytest.raises(ProtocolError) as unreachable:
                await alice.send(f"{BOB.id}@b", "not kept")
            assert unreachable.value.code is ErrorCode.HOME_UNREACHABLE
    assert b.node.inboxes.size(BOB.public_key) == 0


async def test_a_link_that_drops_before_the_answer_is_home_unreachable(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The message is on its way to b (b is writing it) when the link drops: the
    sender hears 5003 ``home_unreachable``, which says sending again is safe, not
    5001 ``internal``."""
    a, b, way = await bob_on_b_behind_a_way(nursery, tmp_path)
    store = b.node.inboxes.store
    gated, entered, go = gate(store.apply)

    try:
        with trio.fail_after(TIMEOUT):
            async with RelayClient.connect(a.url, ALICE) as alice:
                alice.mailbox.patience = 0
                store.apply = gated  # type: ignore[method-assign]
                errors: list[ProtocolError] = []

                async def send() -> None:
                    with pytest.raises(ProtocolError) as raised:
                        await alice.send(f"{BOB.id}@b", "on its way")
                    errors.append(raised.value)

                async with trio.open_nursery() as sending:
                    sending.start_soon(send)
                    await trio.to_thread.run_sync(entered.wait, TIMEOUT)  # b is writing it
                    way.cut()
                assert [e.code for e in errors] == [ErrorCode.HOME_UNREACHABLE]
    finally:
        go.set()


async def test_a_send_given_up_on_and_then_refused_does_not_keep_later_ones_off_direct(
    relay: RunningRelay,
) -> None:
    """A send through the relay counts as relayed and undelivered until it settles (a
    later one sent directly could overtake it). A caller that stopped waiting for its
    answer (cancelled) left a refusal unread: it never settled, and every later message
    to that agent stayed off the direct path (via="direct" refused) for good."""
    async with RelayClient.connect(relay.url, ALICE) as alice:
        gave_up = trio.CancelScope()

        async def sending() -> None:
            with gave_up:
                await alice.send(CAROL.id, "nobody home yet", via="relay")

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sending)
                while not alice.mailbox._relayed_pending:  # queued, its answer to come
                    await trio.lowlevel.checkpoint()
                [asked] = alice._asked.values()
                gave_up.cancel()
            await asked.done.wait()  # the relay's answer: unknown_recipient
            await trio.testing.wait_all_tasks_blocked()
            assert not alice.mailbox._relayed_pending
            async with RelayClient.connect(relay.url, CAROL) as carol, carol.listen() as endpoint:
                sent = await alice.send(CAROL.id, "psst", via="direct", endpoint=endpoint)
                assert sent.path == "direct" and (await carol.mailbox.next()).body == "psst"
