"""The y-websocket endpoint with a bare pycrdt peer: only the standard y-sync messages."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pycrdt
import pytest
import trio
from pycrdt import (
    YMessageType,
    YSyncMessageType,
    create_awareness_message,
    create_sync_message,
    create_update_message,
    handle_sync_message,
    write_message,
)
from websockets.exceptions import ConnectionClosed
from websockets.trio.client import ClientConnection, connect

from agent_sdk import doctoken
from agent_sdk.client import RelayClient
from agent_sdk.wire import decode
from relay.limits import RateLimits
from relay.node import RelayConfig
from tests.conftest import RunningRelay, identity, start_relay
from tests.relay.test_documents import _awareness

NS = "docs@local"


class Peer:
    """A plain Yjs replica: a pycrdt document, a socket, and the y-sync messages."""

    def __init__(self, ws: ClientConnection, state: bytes = b"") -> None:
        self.ws = ws
        self.doc: pycrdt.Doc[Any] = pycrdt.Doc()
        if state:  # a client that reconnects with what it had
            self.doc.apply_update(state)
        self.changed = trio.Event()
        self._remote = False
        self.doc.observe(self._on_change)
        self.outbox: list[bytes] = []
        self.closed: ConnectionClosed | None = None
        self.answered = trio.Event()
        """Set once it has answered the relay's sync step 1 (with its step 2)."""

    def _on_change(self, event: Any) -> None:
        if not self._remote:
            self.outbox.append(create_update_message(event.update))
        self.changed.set()
        self.changed = trio.Event()

    async def run(self) -> None:
        try:
            await self._run()
        except ConnectionClosed as exc:
            self.closed = exc
            self.changed.set()

    async def _run(self) -> None:
        await self.ws.send(create_sync_message(self.doc))
        while True:
            message = await self.ws.recv()
            assert isinstance(message, bytes)
            if message[0] == YMessageType.SYNC:
                self._remote = True
                try:
                    reply = handle_sync_message(message[1:], self.doc)
                finally:
                    self._remote = False
                if reply is not None:
                    await self.ws.send(reply)
                    self.answered.set()
            await self.flush()

    async def flush(self) -> None:
        while self.outbox:
            await self.ws.send(self.outbox.pop(0))

    async def wait_for(self, done: Callable[[], bool]) -> None:
        while not done():
            await self.changed.wait()


@asynccontextmanager
async def peer(
    relay: RunningRelay, name: str, query: str | None, state: bytes = b""
) -> AsyncIterator[Peer]:
    """A plain Yjs client on ``name``, with ``query`` (``token=...&secret=...``) or none."""
    async with connect(f"{relay.url}/yjs/{NS}/{name}{f'?{query}' if query else ''}") as ws:
        plain = Peer(ws, state)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(plain.run)
            yield plain
            nursery.cancel_scope.cancel()


def token_for(n: int, name: str = "shared", ttl_ms: int = 60_000) -> str:
    """A bound token of agent ``n`` for ``name`` and its secret, as a query string."""
    exp = time.time_ns() // 1_000_000 + ttl_ms
    return doctoken.query(*doctoken.mint_bound(identity(n), NS, name, exp))


async def test_an_sdk_agent_and_a_plain_yjs_peer_edit_one_document(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, identity(1)) as client,
        client.doc(NS, "shared") as shared,
    ):
        shared.text().insert(0, "from the sdk")
        await shared.flush()
        async with peer(relay, "shared", token_for(1)) as plain:
            text = plain.doc.get("text", type=pycrdt.Text)
            await plain.wait_for(lambda: str(text) == "from the sdk")
            text.insert(len(text), ", and from yjs")
            await plain.flush()
            while str(shared.text()) != "from the sdk, and from yjs":
                await shared._advanced.wait()
            shared.map()["status"] = "reviewed"
            fields = plain.doc.get("fields", type=pycrdt.Map)
            await plain.wait_for(lambda: fields.get("status") == "reviewed")

    # The log says who allowed the plain client's change: the token's agent.
    written = [
        decode(r.event)["body"]
        for r in relay.node.store.scan(NS)
        if r.kind == "doc.update" and r.author == relay.node.identity.public_key
    ]
    assert written, "the plain peer's edit is in the log"
    assert all(decode(body["token"])["agent"] == identity(1).public_key for body in written)


async def test_without_a_token_a_plain_peer_reads_but_cannot_write(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, identity(1)) as client,
        client.doc(NS, "shared") as shared,
    ):
        shared.array().append("visible")
        await shared.flush()
        shared.text().insert(0, "abc")
        del shared.text()[0:1]  # a delete set, which every step 2 carries along
        await shared.flush()
        async with peer(relay, "shared", None) as plain:
            log = plain.doc.get("log", type=pycrdt.Array)
            await plain.wait_for(lambda: list(log) == ["visible"])
            assert str(plain.doc.get("text", type=pycrdt.Text)) == "bc"
            assert plain.closed is None  # reading, and replying to step 1, is fine
            log.append("refused")
            await plain.flush()
            await plain.wait_for(lambda: plain.closed is not None)
            assert plain.closed is not None and plain.closed.rcvd is not None
            assert plain.closed.rcvd.code == 1008 and "read-only" in plain.closed.rcvd.reason
        assert shared.array().to_py() == ["visible"]


@pytest.mark.parametrize(
    ("name", "query", "reason"),
    [
        ("missing", None, "2010 unknown_doc"),
        ("shared", "token=not-a-token", "1005 auth_failed"),
        ("shared", token_for(1, "other"), "1005 auth_failed"),
        ("shared", token_for(1, ttl_ms=-1_000), "1005 auth_failed: the token has expired"),
        (
            "shared",
            doctoken.query(doctoken.mint(identity(1), NS, "shared", 2**50)),  # no secret
            "1005 auth_failed: bearer document tokens are refused here",
        ),
    ],
)
async def test_plain_peers_with_bad_routes_or_tokens_are_closed_with_a_reason(
    relay: RunningRelay, name: str, query: str | None, reason: str
) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        await client.publish(NS, "doc.create", {"doc": "shared"})
    url = f"{relay.url}/yjs/{NS}/{name}{f'?{query}' if query else ''}"
    assert (await close_reason(url)).startswith(reason)


async def test_a_relay_told_to_takes_bearer_tokens(nursery: trio.Nursery, tmp_path: Path) -> None:
    """``documents.bearer_tokens``: tokens minted before bound ones keep working."""
    config = RelayConfig(doc_bearer_tokens=True)
    relay = await start_relay(nursery, tmp_path / "relay", config)
    bearer = doctoken.mint(identity(1), NS, "shared", time.time_ns() // 1_000_000 + 60_000)
    async with (
        RelayClient.connect(relay.url, identity(1)) as client,
        client.doc(NS, "shared") as shared,
        peer(relay, "shared", doctoken.query(bearer)) as plain,
    ):
        plain.doc.get("text", type=pycrdt.Text).insert(0, "old token")
        await plain.flush()
        while str(shared.text()) != "old token":
            await shared._advanced.wait()


async def close_reason(url: str) -> str:
    """Why a plain peer that connects to ``url`` is closed at once (with 1008)."""
    async with connect(url) as ws:
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    return info.value.rcvd.reason


async def test_a_bound_token_writes_only_with_its_secret_which_the_log_does_not_hold(
    relay: RunningRelay,
) -> None:
    async with (
        RelayClient.connect(relay.url, identity(1)) as client,
        client.doc(NS, "shared") as shared,
    ):
        exp = time.time_ns() // 1_000_000 + 60_000
        token, secret = doctoken.mint_bound(identity(1), NS, "shared", exp)
        async with peer(relay, "shared", doctoken.query(token, secret)) as plain:
            plain.doc.get("text", type=pycrdt.Text).insert(0, "bound")
            await plain.flush()
            while str(shared.text()) != "bound":
                await shared._advanced.wait()
    logged = {
        decode(r.event)["body"]["token"]
        for r in relay.node.store.scan(NS)
        if r.kind == "doc.update" and r.author == relay.node.identity.public_key
    }
    assert len(logged) == 1
    from_the_log = base64.urlsafe_b64encode(logged.pop()).rstrip(b"=").decode()
    assert from_the_log == token  # what a reader of the log has: the token, no secret
    other = doctoken.mint_bound(identity(1), NS, "shared", exp)[1]
    for query, reason in [
        (doctoken.query(from_the_log), "1005 auth_failed: the token is bound"),
        (doctoken.query(from_the_log, other), "1005 auth_failed: the secret is not the token's"),
        (doctoken.query(from_the_log, "!" * 43), "1005 auth_failed: the secret is not the token's"),
    ]:
        assert (await close_reason(f"{relay.url}/yjs/{NS}/shared?{query}")).startswith(reason)


async def test_a_writers_reconnect_writes_nothing_when_it_brings_nothing_new(
    relay: RunningRelay,
) -> None:
    """A Yjs client answers the relay's step 1 with its whole delete set: from a writer
    that reconnects with nothing new, that is no edit. Written, it would grow the log
    on every reconnect, and a delete set over 256 KiB would be refused each time."""

    def written() -> int:
        me = relay.node.identity.public_key
        return sum(r.kind == "doc.update" and r.author == me for r in relay.node.store.scan(NS))

    async with (
        RelayClient.connect(relay.url, identity(1)) as client,
        client.doc(NS, "shared") as shared,
    ):

        async def seen(text: str) -> None:
            while str(shared.text()) != text:
                await shared._advanced.wait()

        async with peer(relay, "shared", token_for(1)) as first:
            await first.answered.wait()
            text = first.doc.get("text", type=pycrdt.Text)
            text.insert(0, "abcdef")
            del text[0:2]  # a delete set to carry
            await first.flush()
            await seen("cdef")
            state = first.doc.get_update()
        before = written()
        async with peer(relay, "shared", token_for(1), state=state) as again:
            await again.answered.wait()  # its step 2 first, then an edit
            again.doc.get("text", type=pycrdt.Text).insert(4, "!")
            await again.flush()
            await seen("cdef!")
        assert written() == before + 1  # the edit, not the step 2 before it


async def test_garbage_from_a_plain_peer_closes_only_that_peer(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, identity(1)) as client,
        client.doc(NS, "shared") as shared,
    ):
        async with connect(f"{relay.url}/yjs/{NS}/shared?{token_for(1)}") as ws:
            await ws.send(bytes([YMessageType.SYNC, 2, 7]) + b"garbage")
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await ws.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1008
        shared.text().insert(0, "unaffected")
        await shared.flush()
        assert str(shared.text()) == "unaffected"


def test_a_readers_step_2_with_only_known_items_is_not_an_edit() -> None:
    """A Yjs client answers step 1 with its whole delete set: from a reader that has
    nothing new, that is no edit (and must not close it); a new item is one."""
    from relay.documents import LiveDoc
    from relay.yws import _adds_nothing

    live = LiveDoc(NS, "d", epoch=1)
    text = live.doc.get("text", type=pycrdt.Text)
    text += "abc"
    del text[0:1]
    reader: pycrdt.Doc[Any] = pycrdt.Doc()
    reader.apply_update(live.doc.get_update())
    reply = reader.get_update(live.doc.get_state())
    assert reply != b"\x00\x00"  # the delete set rides along
    assert _adds_nothing(reply, live)
    reader.get("text", type=pycrdt.Text).insert(0, "new")
    assert not _adds_nothing(reader.get_update(live.doc.get_state()), live)
    assert not _adds_nothing(b"garbage", live)


def test_an_update_changes_nothing_only_when_its_items_and_deletions_are_all_there() -> None:
    from relay.documents import LiveDoc, changes_nothing

    live = LiveDoc(NS, "d", epoch=1)
    writer: pycrdt.Doc[Any] = pycrdt.Doc()
    text = writer.get("text", type=pycrdt.Text)
    text.insert(0, "abcdef")
    del text[1:2]
    text.insert(0, "xyz")
    del text[6:8]
    live.doc.apply_update(writer.get_update())
    step2 = writer.get_update(live.doc.get_state())
    assert step2 != b"\x00\x00" and changes_nothing(step2, live)  # its delete set only
    assert changes_nothing(writer.get_update(), live)  # everything, all of it there
    del text[0:1]  # a deletion the relay has not seen
    assert not changes_nothing(writer.get_update(live.doc.get_state()), live)
    text.insert(0, "new")  # and an item
    assert not changes_nothing(writer.get_update(live.doc.get_state()), live)
    assert not changes_nothing(b"garbage", live)


async def test_a_plain_peer_is_closed_when_its_token_expires(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        await client.publish(NS, "doc.create", {"doc": "shared"})
    async with connect(f"{relay.url}/yjs/{NS}/shared?{token_for(1, ttl_ms=300)}") as ws:
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(10):
            while True:
                await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    assert info.value.rcvd.reason == "1005 auth_failed: the token has expired"


async def test_a_message_cut_short_closes_the_peer(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        await client.publish(NS, "doc.create", {"doc": "shared"})
    async with connect(f"{relay.url}/yjs/{NS}/shared?{token_for(1)}") as ws:
        await ws.send(bytes([YMessageType.SYNC, 0, 40]) + b"short")  # says 40, holds 5
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.reason.startswith("1001 malformed")


async def test_a_length_of_a_million_bytes_is_refused_at_once(relay: RunningRelay) -> None:
    """A message's length is a lib0 varuint of at most 64 bits. pycrdt's Decoder read
    any number of continuation bytes into one growing int: 1 MB of ``ff`` held the
    relay's loop (every connection, and this test with it) for over a minute, and the
    2 MiB a message may be for several (quadratic)."""
    async with RelayClient.connect(relay.url, identity(1)) as client:
        await client.publish(NS, "doc.create", {"doc": "shared"})
    with trio.fail_after(10):
        async with connect(f"{relay.url}/yjs/{NS}/shared", max_size=None) as ws:
            await ws.recv()  # the relay's sync step 1
            await ws.send(bytes([YMessageType.AWARENESS]) + b"\xff" * 1_000_000 + b"\x01")
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await ws.recv()
        assert info.value.rcvd is not None
        assert info.value.rcvd.reason == "1001 malformed: a y-websocket message ends early"
        async with peer(relay, "shared", None) as plain:  # the others are served
            await plain.answered.wait()


def test_a_length_over_64_bits_is_malformed_even_when_it_is_zero() -> None:
    from agent_sdk.errors import ProtocolError
    from relay.yws import _read

    assert _read(b"\x85\x00abcde") == b"abcde"  # 5, in two bytes: lib0 reads it
    with pytest.raises(ProtocolError, match="ends early"):
        _read(b"\x80" * 10 + b"\x00")  # 0, in 71 bits


def test_document_tokens_are_strict() -> None:
    from agent_sdk.errors import ProtocolError

    good = doctoken.mint(identity(1), NS, "shared", 2**50)  # (the same bytes every run)
    assert doctoken.check(good, NS, "shared", 0).agent == identity(1).public_key
    standard = good.replace("-", "+").replace("_", "/")  # base64, not base64url
    assert standard != good
    for bad in (good + "!", good[:-4], "A" * 600, standard):
        with pytest.raises(ProtocolError):
            doctoken.check(bad, NS, "shared", 0)
    bound, secret = doctoken.mint_bound(identity(1), NS, "shared", 2**50)
    assert doctoken.check(bound, NS, "shared", 0, secret + "=").doc == "shared"  # padded
    other = doctoken.mint_bound(identity(1), NS, "shared", 2**50)[1]
    for bad_secret in (None, "", other, secret[:-1], secret + "A", "+" + secret[1:], "A" * 999):
        with pytest.raises(ProtocolError):
            doctoken.check(bound, NS, "shared", 0, bad_secret)
    with pytest.raises(ValueError):
        doctoken.mint(identity(1), NS, "shared", 2**50, b"short")


async def test_a_plain_peer_writing_too_fast_is_closed_with_rate_limited(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Its updates are charged to its token's agent, like the agent's own publishes."""
    limits = RateLimits(publish_rate=0.01, publish_burst=3)  # no token comes back in time
    relay = await start_relay(nursery, tmp_path / "relay", RelayConfig(rate_limits=limits))
    async with RelayClient.connect(relay.url, identity(2)) as client:
        await client.publish(NS, "doc.create", {"doc": "shared"})
    async with connect(f"{relay.url}/yjs/{NS}/shared?{token_for(1)}") as ws:
        doc: pycrdt.Doc[Any] = pycrdt.Doc()
        text = doc.get("text", type=pycrdt.Text)
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(10):
            for n in range(10):  # far over a burst of 3, at once
                before = doc.get_state()
                text += f"<{n}>"
                await ws.send(create_update_message(doc.get_update(before)))
            while True:
                await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    assert info.value.rcvd.reason.startswith("5004 rate_limited")
    with trio.fail_after(10):
        await relay.node.wait_beyond(NS, 3)  # the burst was admitted: it commits
    await trio.testing.wait_all_tasks_blocked()
    assert relay.node.head(NS) == 1 + 3  # doc.create, the burst, and nothing past it
    relay.scope.cancel()


async def test_a_writer_over_its_keys_cap_is_closed_and_counted(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Writers with one agent's tokens are capped per key, apart from its own
    connections; a refused one is closed with 5005 and counted in GET /metrics."""
    limits = RateLimits(connections_per_key=1)
    relay = await start_relay(nursery, tmp_path / "relay", RelayConfig(rate_limits=limits))
    async with RelayClient.connect(relay.url, identity(1)) as client:  # its own: apart
        await client.publish(NS, "doc.create", {"doc": "shared"})
        async with connect(f"{relay.url}/yjs/{NS}/shared?{token_for(1)}") as first:
            assert isinstance(await first.recv(), bytes)  # served: sync step 1
            async with connect(f"{relay.url}/yjs/{NS}/shared?{token_for(1)}") as second:
                with pytest.raises(ConnectionClosed) as info, trio.fail_after(10):
                    await second.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    assert info.value.rcvd.reason.startswith("5005 too_many_connections")
    assert relay.node.metrics.rate_limited["connections"] == 1
    relay.scope.cancel()


async def test_a_reader_is_bounded_in_sync_messages_that_write_nothing(
    relay: RunningRelay,
) -> None:
    """Each step 1 costs a diff of the document and each reply a decode, and a reader
    has no key to charge: past a burst it is closed. A reply too big to be written
    is not decoded at all (it could hold anything, and a reader writes nothing)."""
    from agent_sdk.docs import MAX_UPDATE
    from relay.yws import SYNC_BURST

    async with RelayClient.connect(relay.url, identity(1)) as client:
        await client.publish(NS, "doc.create", {"doc": "shared"})
    offline = pycrdt.Doc()
    offline.get("text", type=pycrdt.Text).insert(0, "x" * (MAX_UPDATE + 1000))
    big = offline.get_update()  # items the relay lacks: decoded, it would be read-only
    step1 = bytes([YMessageType.SYNC, YSyncMessageType.SYNC_STEP1]) + write_message(b"\x00")
    async with connect(f"{relay.url}/yjs/{NS}/shared", max_size=None) as ws:
        with trio.fail_after(30):
            assert (await ws.recv())[:2] == step1[:2]  # the relay's step 1
            await ws.send(
                bytes([YMessageType.SYNC, YSyncMessageType.SYNC_STEP2]) + write_message(big)
            )
            await ws.send(step1)
            answer = await ws.recv()  # still open: answered with its step 2
            assert answer[:2] == bytes([YMessageType.SYNC, YSyncMessageType.SYNC_STEP2])
            with pytest.raises(ConnectionClosed) as info:
                for _ in range(int(SYNC_BURST) * 10):  # one at a time: none left unread
                    await ws.send(step1)
                    await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    assert info.value.rcvd.reason.startswith("5004 rate_limited: over 10 sync messages a second")


async def test_a_reader_is_bounded_in_awareness_queries(relay: RunningRelay) -> None:
    """One byte asks for every present state (up to 32 KiB each): uncharged, a
    reader with no key got about 30,000 times what it sent, for as long as it asked."""
    from relay.yws import SYNC_BURST

    async with (
        RelayClient.connect(relay.url, identity(1)) as client,
        client.doc(NS, "shared") as shared,
        connect(f"{relay.url}/yjs/{NS}/shared", max_size=None) as ws,
    ):
        shared.set_presence({"name": "x" * 1000})
        with trio.fail_after(30):
            while (await ws.recv())[:1] != bytes([YMessageType.AWARENESS]):
                pass  # the relay's step 1, then the agent's presence
            with pytest.raises(ConnectionClosed) as info:
                for _ in range(int(SYNC_BURST) * 10):  # one at a time: none left unread
                    await ws.send(b"\x03")
                    assert (await ws.recv())[:1] == bytes([YMessageType.AWARENESS])
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    assert info.value.rcvd.reason.startswith("5004 rate_limited: over 10 sync messages a second")


@asynccontextmanager
async def a_present_agent_and_a_plain_peer(
    relay: RunningRelay,
) -> AsyncIterator[tuple[int, Any, Peer]]:
    """Agent 1 present on ``shared`` (its client id), agent 3's replica, which sees
    it, and a plain y-websocket peer of the same document."""
    async with (
        RelayClient.connect(relay.url, identity(1)) as one,
        RelayClient.connect(relay.url, identity(3)) as two,
        one.doc(NS, "shared") as first,
        two.doc(NS, "shared") as second,
        peer(relay, "shared", None) as plain,
    ):
        me = first.doc.client_id
        first.set_presence({"name": "agent-1"})
        with trio.fail_after(30):
            while me not in second.presence():
                await second.presence_changed()
        yield me, second, plain


async def _announce_and_wait(plain: Peer, second: Any) -> int:
    """The plain peer's own presence, sent after whatever it sent before on the same
    connection: once the agent has it, it has whatever the relay passed on of those."""
    own = pycrdt.Awareness(pycrdt.Doc())
    own.set_local_state({"name": "plain"})
    await plain.ws.send(create_awareness_message(own.encode_awareness_update([own.client_id])))
    with trio.fail_after(30):
        while own.client_id not in second.presence():
            await second.presence_changed()
    return own.client_id


async def test_a_plain_peer_cannot_change_another_replicas_presence(relay: RunningRelay) -> None:
    """y-websocket has no error reply: a plain client's update naming an agent's
    client id is dropped whole, and nobody sees it (13.5)."""
    async with a_present_agent_and_a_plain_peer(relay) as (me, second, plain):
        for state in ('{"name": "spoofed"}', "null"):  # far above the real clock
            await plain.ws.send(create_awareness_message(_awareness((me, state), clock=1000)))
        await _announce_and_wait(plain, second)
        assert second.presence()[me] == {"name": "agent-1"}
        assert relay.node.docs.live[(NS, "shared")].awareness.states[me] == {"name": "agent-1"}
        assert plain.closed is None


async def test_a_plain_peers_echoes_do_not_use_up_its_presence_allowance(
    relay: RunningRelay,
) -> None:
    """y-websocket sends back every awareness change it applies. Those echoes of
    other replicas' states are refused (13.5), and were charged to the client's
    allowance first (20 a second, bursts of 40): an agent moving its cursor kept a
    plain client's own presence from ever getting through. Only its own is charged."""
    async with a_present_agent_and_a_plain_peer(relay) as (me, second, plain):
        clock = relay.node.docs.live[(NS, "shared")].awareness.meta[me]["clock"]
        echo = create_awareness_message(_awareness((me, '{"name": "agent-1"}'), clock=clock))
        for _ in range(100):  # well past a burst of the allowance
            await plain.ws.send(echo)
        own = await _announce_and_wait(plain, second)
        assert second.presence()[own] == {"name": "plain"}
