"""The direct path: agents exchange sealed messages without a relay on the way.

An agent listens (``client.listen(host, port)``) on a WebSocket endpoint and may
advertise it in a directory profile (``endpoint``). A sender dials it and both sides
prove their keys before any message moves (docs/protocol.md §15.6)::

    dialer   -> hello {key, challenge}
    listener -> hello {key, challenge, sig}   sig over DIRECT_DOMAIN "listener" + the
                                              dialer's challenge + the dialer's key
    dialer   -> auth {sig}                    sig over DIRECT_DOMAIN "dialer" + the
                                              listener's challenge + the listener's key

The dialer checks the listener is the agent it meant to reach (its id is its key);
the listener learns who dialled. Then the dialer sends ``msg {msg}`` frames (the
same sealed bytes as relayed messages) and the listener answers each with
``got {id}`` once the message is queued for its application (or recognised as a
copy), and later ``receipt {receipt}`` when the application takes it. Frames are
msgpack maps with a ``t`` field, one per binary WebSocket message.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import msgpack
import trio
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.trio.client import ClientConnection, connect
from websockets.trio.server import ServerConnection, serve

from agent_sdk.errors import unwrap_single
from agent_sdk.identity import Identity
from agent_sdk.sealing import Header, Receipt, Sealed, Unsealable
from agent_sdk.wire import verify_signature

if TYPE_CHECKING:
    from agent_sdk.messaging import Mailbox

log = logging.getLogger("formicary.direct")

DIRECT_DOMAIN = b"formicary/v1/direct-auth\x00"
GOT_DOMAIN = b"formicary/v1/direct-got\x00"
HANDSHAKE_TIMEOUT = 10.0
MAX_UNTAKEN = 1024
"""Messages the application has not taken yet beyond which the endpoint refuses new
ones: any key may dial it, and a sender refused here goes through the relay, whose
inbox is bounded."""
MAX_DIRECT_MESSAGE = 1 << 20


class DirectUnreachable(Exception):
    """The recipient's endpoint could not be dialled, or did not prove its key."""


def _proof(role: bytes, challenge: bytes, key: bytes) -> bytes:
    return DIRECT_DOMAIN + role + b"\x00" + challenge + key


def _pack(frame: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb(frame)
    return data


def _unpack(data: str | bytes) -> dict[str, Any]:
    if isinstance(data, str):
        raise ValueError("frames are binary messages")
    frame = msgpack.unpackb(data)
    if not isinstance(frame, dict) or not isinstance(frame.get("t"), str):
        raise ValueError("a frame is a map with a type")
    return frame


class Listener:
    """This agent's endpoint: accepts authenticated dialers and their messages."""

    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox
        self.identity: Identity = mailbox.client.identity
        self._by_message: dict[bytes, ServerConnection] = {}  # for the receipt, later
        self.connections = 0

    async def handle(self, ws: ServerConnection) -> None:
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                peer = await self._handshake(ws)
            self.connections += 1
            await self._serve(ws, peer)
        except (ConnectionClosed, ValueError, KeyError, TypeError, trio.TooSlowError) as exc:
            log.info("direct connection ended: %s", exc)
            await ws.aclose(1008, "bad frame or handshake")
        finally:
            for mid in [m for m, c in self._by_message.items() if c is ws]:
                del self._by_message[mid]

    async def _handshake(self, ws: ServerConnection) -> bytes:
        hello = _unpack(await ws.recv())
        peer, challenge = hello["key"], hello["challenge"]
        if hello["t"] != "hello" or len(peer) != 32 or len(challenge) != 32:
            raise ValueError("expected hello with a 32-byte key and challenge")
        mine = secrets.token_bytes(32)
        sig = self.identity.sign(_proof(b"listener", challenge, peer))
        await ws.send(
            _pack({"t": "hello", "key": self.identity.public_key, "challenge": mine, "sig": sig})
        )
        auth = _unpack(await ws.recv())
        if auth["t"] != "auth" or not verify_signature(
            peer, auth["sig"], _proof(b"dialer", mine, self.identity.public_key)
        ):
            raise ValueError("the dialer did not prove its key")
        return bytes(peer)

    async def _serve(self, ws: ServerConnection, peer: bytes) -> None:
        while True:
            frame = _unpack(await ws.recv())
            if frame["t"] != "msg":
                raise ValueError(f"unexpected frame {frame['t']!r}")
            try:
                sealed = Sealed.decode(frame["msg"])
                if sealed.header.sender != peer:
                    raise Unsealable("a direct message's sender is the peer that dialled")
            except Unsealable as exc:
                await ws.send(_pack({"t": "refused", "reason": str(exc)}))
                continue
            mid = sealed.header.id
            if self.mailbox.waiting >= MAX_UNTAKEN:
                reason = f"{self.mailbox.waiting} messages not taken yet: send through the relay"
                await ws.send(_pack({"t": "refused", "id": mid, "reason": reason}))
                continue
            self._by_message[mid] = ws
            if self.mailbox.arrive(sealed, "direct"):
                # Signed: on a plain ws:// path, nobody else can say we have it.
                sig = self.identity.sign(GOT_DOMAIN + mid + peer)
                await ws.send(_pack({"t": "got", "id": mid, "sig": sig}))
            else:
                self._by_message.pop(mid, None)  # no receipt will be sent for it
                await ws.send(_pack({"t": "refused", "id": mid, "reason": "does not unseal"}))

    def acknowledge(self, header: Header) -> None:
        """The application took a message that came directly: send its receipt back on
        the connection it came on, if that is still open."""
        ws = self._by_message.pop(header.id, None)
        if ws is None:
            return
        receipt = Receipt.make(self.identity, header).encode()
        nursery = self.mailbox.client.nursery
        nursery.start_soon(_send_quietly, ws, _pack({"t": "receipt", "receipt": receipt}))


async def _send_quietly(ws: ServerConnection | ClientConnection, data: bytes) -> None:
    try:
        await ws.send(data)
    except ConnectionClosed:
        pass  # the dialer left: its message is taken all the same


class Dialed:
    """An authenticated connection to one agent's endpoint."""

    def __init__(self, ws: ClientConnection, agent: bytes, mailbox: Mailbox) -> None:
        self.ws = ws
        self.agent = agent
        self.mailbox = mailbox
        self._answers: dict[bytes, trio.Event] = {}
        self._got: set[bytes] = set()
        self._refused: dict[bytes, str] = {}  # why the listener refused a message
        self.closed = trio.Event()

    async def send(self, sealed: Sealed) -> None:
        """Send and wait for the recipient's signed ``got``; raises
        :class:`DirectUnreachable` if it refuses the message, or if the connection
        drops or goes quiet first (the message may or may not have arrived)."""
        mid = sealed.header.id
        answered = self._answers[mid] = trio.Event()
        try:
            await self.ws.send(_pack({"t": "msg", "msg": sealed.encode()}))
        except ConnectionClosed as exc:
            raise DirectUnreachable(f"the direct connection dropped: {exc}") from None
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            async with trio.open_nursery() as racing:
                racing.start_soon(_set_when, self.closed, answered)
                await answered.wait()
                racing.cancel_scope.cancel()
        self._answers.pop(mid, None)
        refusal = self._refused.pop(mid, None)
        if mid in self._got:
            self._got.discard(mid)
            return
        if refusal is not None:
            raise DirectUnreachable(f"the recipient refused the message: {refusal}")
        if self.closed.is_set() or not answered.is_set():
            raise DirectUnreachable("no answer from the direct endpoint")
        raise DirectUnreachable("the recipient refused the message")

    async def read(self) -> None:
        """Answers from the listener: ``got`` and ``receipt``."""
        try:
            while True:
                frame = _unpack(await self.ws.recv())
                answered = self._answers.get(frame.get("id", b""))
                if frame["t"] == "got" and answered is not None:
                    me = self.mailbox.client.identity.public_key
                    proof = GOT_DOMAIN + frame["id"] + me
                    if verify_signature(self.agent, frame.get("sig", b""), proof):
                        self._got.add(frame["id"])
                        answered.set()
                    else:
                        log.warning("a direct `got` not signed by the recipient: ignored")
                elif frame["t"] == "refused" and answered is not None:
                    reason = frame.get("reason")  # (a peer's: text only, and short)
                    self._refused[frame["id"]] = reason[:200] if isinstance(reason, str) else ""
                    answered.set()  # not in _got: send() raises
                elif frame["t"] == "receipt":
                    try:
                        receipt = Receipt.decode(frame["receipt"])
                        receipt.verify()
                    except Unsealable as exc:
                        log.warning("a direct receipt that does not check: %s", exc)
                        continue
                    self.mailbox.settle_direct(receipt)
        except ConnectionClosed:
            pass
        except Exception as exc:  # whatever a peer sends ends this connection, not the client
            log.info("a direct connection sent what cannot be read: %s", type(exc).__name__)
        finally:
            self.closed.set()


async def _set_when(source: trio.Event, target: trio.Event) -> None:
    await source.wait()
    target.set()


async def run_dialed(
    endpoint: str,
    mailbox: Mailbox,
    agent: bytes,
    *,
    task_status: trio.TaskStatus[Dialed] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Dial ``agent`` at ``endpoint``, authenticate both ways, report the connection
    and read its answers until it closes; raises :class:`DirectUnreachable` before it
    reports when the endpoint cannot be reached or is not that agent's."""
    identity = mailbox.client.identity
    started = False
    unreachable = (OSError, InvalidHandshake, InvalidURI, ConnectionClosed, TimeoutError)
    try:
        async with connect(
            endpoint,
            compression=None,
            max_size=MAX_DIRECT_MESSAGE,
            proxy=None,
            open_timeout=HANDSHAKE_TIMEOUT,
        ) as ws:
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    await _prove(ws, identity, agent)
            except (ConnectionClosed, trio.TooSlowError, ValueError, KeyError, TypeError) as exc:
                raise DirectUnreachable(f"{endpoint}: a bad handshake: {exc}") from None
            dialed = Dialed(ws, agent, mailbox)
            task_status.started(dialed)
            started = True
            await dialed.read()
    except unreachable as exc:
        if not started:
            raise DirectUnreachable(f"{endpoint}: {exc}") from None
        log.info("direct connection to %s ended: %s", endpoint, exc)  # read() saw it
    except Exception as exc:  # an endpoint a peer chose: "ws://x:99999" is a ValueError
        if started:
            raise
        raise DirectUnreachable(f"{endpoint}: {type(exc).__name__}: {exc}") from None


async def _prove(ws: ClientConnection, identity: Identity, agent: bytes) -> None:
    mine = secrets.token_bytes(32)
    await ws.send(_pack({"t": "hello", "key": identity.public_key, "challenge": mine}))
    hello = _unpack(await ws.recv())
    if hello["t"] != "hello" or hello["key"] != agent:
        raise ValueError("the endpoint is another agent's")
    if not verify_signature(agent, hello["sig"], _proof(b"listener", mine, identity.public_key)):
        raise ValueError("the endpoint did not prove the agent's key")
    proof = identity.sign(_proof(b"dialer", hello["challenge"], agent))
    await ws.send(_pack({"t": "auth", "sig": proof}))


class Direct:
    """A mailbox's direct path: its listener and its dialled connections."""

    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox
        self.listener: Listener | None = None
        self.dialed: dict[bytes, Dialed] = {}
        self._dialing: dict[bytes, trio.Lock] = {}  # per recipient: a slow dial holds up
        # only the sends to its own recipient

    async def connection(self, agent: bytes, endpoint: str) -> Dialed:
        lock = self._dialing.setdefault(agent, trio.Lock())
        try:
            async with lock:  # one connection per recipient
                known = self.dialed.get(agent)
                if known is not None and not known.closed.is_set():
                    return known
                nursery = self.mailbox.client.nursery
                dialed: Dialed = await nursery.start(run_dialed, endpoint, self.mailbox, agent)
                self.dialed[agent] = dialed
                return dialed
        finally:
            if not lock.locked():  # (a waiter would own it by now)
                self._dialing.pop(agent, None)

    def acknowledge(self, header: Header) -> None:
        if self.listener is not None:
            self.listener.acknowledge(header)


@asynccontextmanager
async def listening(mailbox: Mailbox, host: str, port: int) -> AsyncIterator[str]:
    """Serve ``mailbox``'s direct endpoint on ``host:port``; yields its URL."""
    direct = mailbox.direct_path()
    listener = direct.listener = Listener(mailbox)
    with unwrap_single():  # the block's own error comes out as is
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: serve(
                    listener.handle,
                    port,
                    host=host,
                    compression=None,
                    max_size=MAX_DIRECT_MESSAGE,
                    task_status=task_status,
                )
            )
            bound = server.listeners[0].socket.getsockname()
            try:
                address = f"[{bound[0]}]" if ":" in bound[0] else bound[0]  # (IPv6)
                yield f"ws://{address}:{bound[1]}"
            finally:
                direct.listener = None
                await server.aclose()
                nursery.cancel_scope.cancel()
