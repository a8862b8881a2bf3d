"""RelayClient: an agent's connection to its relay, with reconnect and exact resume.

Theory of operation
-------------------
One background task owns the WebSocket. It connects, proves the agent's key (and
checks the relay's), then replays the client's intent onto the fresh connection:
every open subscription is re-sent with ``from`` = one past the last seq delivered
for each namespace, and every publish not yet acknowledged is re-sent with the same
bytes. Publishing is idempotent at the relay (same bytes, same id, same receipt), so a
re-sent publish whose first ack was lost costs nothing; and a cursor resumes exactly
after the last delivered event, so a subscriber sees every event once, in order,
across any number of reconnects.

Usage::

    async with RelayClient.connect("ws://127.0.0.1:7700", identity) as client:
        receipt = await client.publish("tasks@local", "app.note", {"text": "hi"})
        async with client.subscribe("tasks@local", start=1) as sub:
            async for item in sub:
                ...
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    asynccontextmanager,
    contextmanager,
    suppress,
)
from dataclasses import dataclass
from typing import Any

import trio
from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedOK,
    InvalidHandshake,
    InvalidURI,
)
from websockets.trio.client import ClientConnection, connect

from agent_sdk import frames as f
from agent_sdk.direct import listening
from agent_sdk.docs import FLUSH_TIMEOUT as FLUSH_TIMEOUT_DOC
from agent_sdk.docs import SharedDoc, open_doc
from agent_sdk.errors import (
    ErrorCode,
    ProtocolError,
    client_stopped,
    failed,
    notify,
    unwrap_single,
)
from agent_sdk.identity import Identity
from agent_sdk.messaging import PATHS, Address, Mailbox, Messages, Sent, is_name
from agent_sdk.wire import (
    PROTOCOL_VERSION,
    Event,
    Receipt,
    SignedEvent,
    decode_event,
    decode_receipt,
    sign_event,
    verify_signature,
)

log = logging.getLogger("formicary.client")

DEFAULT_RELAY = "ws://127.0.0.1:7700"
HANDSHAKE_TIMEOUT = 10.0  # seconds for hello, auth and welcome
FLUSH_TIMEOUT = 5.0  # seconds a closing client waits for its queued frames to go out
STOPPING_GRACE = 30.0
"""Seconds a reconnecting client waits, after a 5002 ``shutting_down``, for the relay to
close the connection (the reference relay does within 10 s) before closing it itself,
to send what was refused again on a new one."""


class RelayMismatch(Exception):
    """The relay's key is not the pinned one, or it failed to prove its key."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event from a subscription, with its receipt."""

    event: SignedEvent
    receipt: Receipt
    seal: bytes | None


@dataclass(frozen=True, slots=True)
class Published:
    """The answer to a publish: the receipt, its seal if any, and whether it was new.

    ``outcome`` is the relay's verdict on a coordination request (``wo.claimed``,
    ``wo.rejected``, ...), an event the relay signed and sequenced right behind it.
    """

    receipt: Receipt
    seal: bytes | None
    duplicate: bool
    outcome: Delivery | None = None


@dataclass(frozen=True, slots=True)
class Live:
    """The subscription has replayed ``ns`` up to ``seq``; what follows is live."""

    ns: str
    seq: int


class _Pending:
    __slots__ = ("done", "error", "event", "on_queued", "result")

    def __init__(self, event: SignedEvent, on_queued: Callable[[], None] | None = None) -> None:
        self.event = event
        self.done = trio.Event()
        self.result: Published | None = None
        self.error: ProtocolError | None = None
        self.on_queued = on_queued

    async def wait(self) -> Published:
        """The relay's answer: its :class:`Published`, or the error it sent."""
        await self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


PendingPublish = _Pending
"""A publish sent with :meth:`RelayClient.publish_later`; await ``.wait()``."""


class Asked:
    """A request waiting for its result; re-sent as is after a reconnect (only requests
    safe to repeat are asked: queries, and messages deduplicated by id). ``done`` is set
    with ``result`` (the body) or ``error``."""

    __slots__ = ("done", "error", "frame", "result")

    def __init__(self, frame: bytes) -> None:
        self.frame = frame
        self.done = trio.Event()
        self.result: Any = None
        self.error: ProtocolError | None = None


async def _run_hook(hook: Callable[[], Awaitable[None]]) -> None:
    """A reconnect hook's failure is its own: the connection goes on."""
    try:
        await hook()
    except Exception:
        failed(log, "a reconnect hook failed")


class Subscription:
    """Async iterator of :class:`Delivery` and :class:`Live` items for one subscribe.

    Its buffer never blocks the connection: when it is full the subscription pauses
    (the relay is told to unsubscribe, and frames already on the way are dropped),
    and once the consumer has drained half of it, it resumes from its cursor under a
    new subscription id. So a consumer that lags costs a re-read, not the acks of
    every other request on the connection, and still sees every event once, in order.
    Before it is placed (no consumer yet) it holds no more than its buffer either:
    what does not fit is dropped and read again after it pauses, once placed.
    """

    def __init__(self, client: RelayClient, request: f.Subscribe, buffer: int) -> None:
        self.client = client
        self.request = request
        self.sub = request.sub
        self.next: dict[str, int] = dict(request.start)  # ns -> first seq still wanted
        self.live: set[str] = set()
        self.placed = trio.Event()
        """Set once every namespace has a cursor: one subscribed from now has none until
        its ``live`` (or a delivery) says where now was."""
        self.overflowed = False
        """Items were dropped before it was placed: it pauses as soon as it is placed."""
        self.error: ProtocolError | None = None
        self.paused = False
        self.buffer = buffer
        # Bounded by hand (_offer), before it is placed as after: a foreign namespace's
        # live can come seconds after a local backlog (protocol 14.7), and whatever a
        # relay sends meanwhile must not all be held.
        self._tx, self._rx = trio.open_memory_channel[Delivery | Live](math.inf)
        self._place()

    def resume_request(self) -> f.Subscribe:
        return f.Subscribe(
            sub=self.sub,
            ns=self.request.ns,
            start=dict(self.next),
            kinds=self.request.kinds,
            authors=self.request.authors,
        )

    def _place(self) -> None:
        if self.placed.is_set() or not all(ns in self.next for ns in self.request.ns):
            return
        self.placed.set()
        if self.overflowed:  # what it dropped is read again from its cursors
            self.overflowed = False
            self.client._pause(self)

    def end(self, error: ProtocolError) -> None:
        """The subscription is over: its iterator raises ``error`` once it has what
        came before (the buffer may be full, so the error is kept apart)."""
        self.error = error
        self._tx.close()
        self.placed.set()

    def _offer(self, item: Delivery | Live) -> bool:
        """Hand an item to the consumer without waiting; when the buffer is full, pause,
        or before it is placed, drop the item (its cursor stays before it)."""
        if self._rx.statistics().current_buffer_used >= self.buffer:
            if self.placed.is_set():
                self.client._pause(self)
            else:
                # Nobody reads it yet (the caller enters once it is placed), and a pause
                # now would lose where now is for a namespace whose live has not come:
                # it runs on to learn that, keeping nothing more, and pauses once placed.
                self.overflowed = True
            return False
        try:
            self._tx.send_nowait(item)
        except trio.BrokenResourceError:
            return False  # the subscriber has left; its unsubscribe is on the way
        return True

    def _deliver(self, frame: f.EventFrame) -> None:
        receipt = decode_receipt(frame.receipt)
        if receipt.seq < self.next.get(receipt.ns, 0):
            return  # already delivered before a reconnect
        event = decode_event(frame.event, frame.sig)
        if event.id != receipt.id:
            raise RelayMismatch("relay sent an event with another event's receipt")
        if self._offer(Delivery(event, receipt, frame.seal)):
            self.next[receipt.ns] = receipt.seq + 1
        elif receipt.ns not in self.next:  # (a relay sends a from-now namespace's live first)
            self.next[receipt.ns] = receipt.seq  # dropped: the resume starts at it
        self._place()

    def _mark_live(self, frame: f.Live) -> None:
        # Everything of ``ns`` up to ``seq`` was offered (a frame that does not fit
        # pauses the subscription, and nothing after it arrives), and with a filter
        # the last delivered seq may lag the head: resume past both. Even when this
        # marker does not fit: a namespace subscribed from now would be subscribed
        # from now again, and what came in between never delivered. Not after items
        # were dropped before it was placed: events of ``ns`` may be among them (the
        # subscription ran on), and its cursor stays at the first of those.
        if frame.ns not in self.next or not self.overflowed:
            self.next[frame.ns] = max(self.next.get(frame.ns, 0), frame.seq + 1)
        self._place()
        if frame.ns not in self.live and self._offer(Live(frame.ns, frame.seq)):
            self.live.add(frame.ns)  # (else offered after the resume: live comes again)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Delivery | Live:
        try:
            item = await self._rx.receive()
        except trio.EndOfChannel:
            if self.error is not None:
                raise self.error from None
            raise StopAsyncIteration from None
        if self.paused and self._rx.statistics().current_buffer_used <= self.buffer // 2:
            self.client._resume(self)
        return item


class RelayClient:
    """A connection to one relay on behalf of one identity. Use :meth:`connect`."""

    def __init__(
        self,
        url: str,
        identity: Identity,
        *,
        relay_key: bytes | None = None,
        reconnect: bool = True,
        max_inflight: int = 1024,
        max_message: int = 64 << 20,
        dial: Callable[[], Awaitable[trio.abc.Stream]] | None = None,
        clock_ms: Callable[[], int] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.url = url
        self.dial = dial
        """Opens the byte stream under the WebSocket instead of TCP to ``url`` (the
        in-memory network of virtual-time simulations)."""
        self.clock_ms = clock_ms or _now_ms
        """The ``ts`` of events this client signs (virtual time in simulations)."""
        self.rng = rng
        """Where nonces come from when given (seeded runs repeat byte for byte)."""
        self.identity = identity
        self.relay_key = relay_key
        self.reconnect = reconnect
        self.max_message = max_message
        self.relay_name: str | None = None
        self.connections = 0
        self._outbox: trio.MemorySendChannel[bytes] | None = None
        self.relay_max_frame = 1 << 20
        self._connected = trio.Event()
        self._next_rid = 0
        self._next_sub = 0
        self._pending: dict[int, _Pending] = {}
        self._asked: dict[int, Asked] = {}
        self._docs: dict[int, SharedDoc] = {}
        self.ws: ClientConnection | None = None
        self._reading = trio.CancelScope()  # the current connection's reads
        self.on_reconnect: list[Callable[[], Awaitable[None]]] = []
        """Run after each reconnect (the directory joins again: presence is per connection)."""
        # The notification hooks below only tell: one that raises is logged and the
        # client goes on as if it had returned (errors.notify).
        self.on_lost: list[Callable[[BaseException | None], None]] = []
        """Called once per connection lost while reconnecting is on, with why (``None``
        for a clean close), before the attempts to reconnect."""
        self.on_queued: list[Callable[[SignedEvent], None]] = []
        """Called with each publish the relay answers ``queued`` (its namespace's home
        is out of reach: the relay keeps it and delivers it later), after the
        publish's own ``on_queued``: a shell command says so while it waits."""
        self.on_resending: list[Callable[[str, ProtocolError], None]] = []
        """Called with the relay's name and the error each time a message to an agent
        of another relay is answered ``home_unreachable`` and is to be sent again.
        Unlike a queued publish, no relay keeps such a message: this client holds it
        (for up to ``mailbox.patience`` seconds), so a shell command says so."""
        self._inflight = trio.Semaphore(max_inflight)
        self._subscriptions: dict[int, Subscription] = {}
        self._taps: dict[int, Callable[[f.Frame], None]] = {}
        self.stopped = trio.Event()
        """Set when the client has given up its connection (``reconnect=False``)."""
        self._mailbox: Mailbox | None = None
        self._flushed = trio.Event()
        self._flushed.set()
        self.nursery: trio.Nursery
        """Where the client's own tasks run (set by :meth:`connect`): direct links."""

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, url: str, identity: Identity, **options: Any
    ) -> AsyncIterator[RelayClient]:
        """Connect and authenticate; raises if the first connection attempt fails."""
        client = cls(url, identity, **options)
        with unwrap_single():
            async with trio.open_nursery() as nursery:
                client.nursery = nursery
                await nursery.start(client._run)
                try:
                    yield client
                    # Frames that need no answer (inbox acknowledgements) are still
                    # queued perhaps: let them out before the connection goes.
                    with trio.move_on_after(FLUSH_TIMEOUT):
                        await client.flush()
                        if client._mailbox is not None:
                            with suppress(ProtocolError):  # gone: the relay sends again
                                await client._mailbox.confirm()  # what it did not apply
                finally:
                    nursery.cancel_scope.cancel()

    # -- the connection ------------------------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._connect_loop(task_status)
        finally:
            # However it ended, nothing is answered any more: no request waits forever.
            self._fail_all(client_stopped())
            self.stopped.set()

    async def _connect_loop(self, task_status: trio.TaskStatus[None]) -> None:
        delay = 0.05
        started = False
        while True:
            up, lost = False, None  # this attempt's connection was served; why it ended
            try:
                stream = None if self.dial is None else await self.dial()
                async with connect(
                    self.url,
                    stream=stream,
                    compression=None,
                    max_size=self.max_message,
                    open_timeout=10,
                    proxy=None,
                    # Over an in-memory stream there is no peer to lose: no keepalive.
                    ping_interval=None if stream is not None else 20,
                ) as ws:
                    with trio.move_on_after(HANDSHAKE_TIMEOUT) as handshake:
                        await self._handshake(ws)
                    if handshake.cancelled_caught:
                        seconds = f"{HANDSHAKE_TIMEOUT:g} s"
                        raise trio.TooSlowError(f"no handshake from the relay in {seconds}")
                    self.connections += 1
                    up = True
                    delay = 0.05
                    if not started:
                        started = True
                        task_status.started()
                    self.ws = ws  # the current connection (tests cut it to simulate a crash)
                    await self._serve(ws)
                if not self.reconnect:  # the relay closed cleanly; without reconnect, stop
                    self._fail_all(ProtocolError(ErrorCode.INTERNAL, "the relay closed"))
                    return
            except (
                OSError,
                ConnectionClosed,
                InvalidHandshake,
                TimeoutError,
                trio.TooSlowError,
                InvalidURI,
            ) as exc:
                if not started or not self.reconnect:
                    self._fail_all(ProtocolError(ErrorCode.INTERNAL, f"connection lost: {exc}"))
                    raise
                log.info("relay connection lost (%s); reconnecting in %.2fs", exc, delay)
                lost = exc
            finally:
                self._outbox = None
                self._flushed.set()  # nothing more goes out on that connection
                self._connected = trio.Event()
            if up:  # once per connection lost, not per attempt to get it back
                for hook in self.on_lost:
                    notify(log, "on_lost", hook, lost)
            await trio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)

    async def _handshake(self, ws: ClientConnection) -> None:
        hello = f.decode_frame(await _recv_bytes(ws))
        if not isinstance(hello, f.Hello):
            raise RelayMismatch(f"expected hello, got {hello.t}")
        if hello.v != PROTOCOL_VERSION:
            raise RelayMismatch(
                f"relay speaks protocol {hello.v}; this client speaks {PROTOCOL_VERSION}"
            )
        if self.relay_key is not None and hello.relay != self.relay_key:
            raise RelayMismatch(f"relay key {hello.relay.hex()} is not the pinned key")
        challenge = secrets.token_bytes(f.CHALLENGE_SIZE)
        message = f.agent_auth_message(hello.relay, hello.challenge)
        auth = f.Auth(
            key=self.identity.public_key, sig=self.identity.sign(message), challenge=challenge
        )
        await ws.send(f.encode_frame(auth))
        answer = f.decode_frame(await _recv_bytes(ws))
        if isinstance(answer, f.Error):
            raise _error_of(answer)
        if not isinstance(answer, f.Welcome):
            raise RelayMismatch(f"expected welcome, got {answer.t}")
        proof = f.relay_auth_message(self.identity.public_key, challenge)
        if not verify_signature(hello.relay, answer.sig, proof):
            raise RelayMismatch("relay failed to prove its key")
        self.relay_key = hello.relay  # pin it for reconnects
        self.relay_name = hello.name
        self.relay_max_frame = hello.max_frame

    async def _serve(self, ws: ClientConnection) -> None:
        """Replay intent onto a fresh connection, then dispatch what arrives."""
        outbox, queued = trio.open_memory_channel[bytes](math.inf)
        # Open the outbox and snapshot the intent in one step (no await between): what
        # registers later queues itself, what registered earlier is in the snapshot.
        self._outbox = outbox
        for subscription in self._subscriptions.values():
            outbox.send_nowait(f.encode_frame(subscription.resume_request()))
        for shared in self._docs.values():
            outbox.send_nowait(f.encode_frame(shared.open_request()))
        replay: list[tuple[int, bytes, _Pending | Asked]] = [
            (rid, _publish_frame(rid, p.event), p) for rid, p in self._pending.items()
        ]
        replay += [(rid, asked.frame, asked) for rid, asked in self._asked.items()]
        for rid, data, request in sorted(replay, key=lambda r: r[0]):
            # The relay may have come back with a smaller max_frame.
            what = "publish" if isinstance(request, _Pending) else "request"
            if self._answered_here(data, what, request):
                self._pending.pop(rid, None)
                self._asked.pop(rid, None)
                continue
            outbox.send_nowait(data)
        self._connected.set()
        with connection_ends(), trio.CancelScope() as self._reading:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, ws, queued)
                if self.connections > 1:  # a reconnect: what lives only as long as a
                    for hook in self.on_reconnect:  # connection (presence) is redone
                        nursery.start_soon(_run_hook, hook)
                while True:  # recv(), not `async for`: cancelling leaves no generator
                    try:
                        message = await ws.recv()
                    except ConnectionClosedOK:
                        break
                    if isinstance(message, str):
                        raise RelayMismatch("relay sent a text message")
                    for frame in f.decode_message(message):
                        if isinstance(frame, ProtocolError):
                            if frame.code is ErrorCode.UNKNOWN_FRAME:
                                continue  # a newer relay's frame: ignoring it keeps us compatible
                            raise RelayMismatch(f"relay sent a bad frame: {frame}")
                        await self._dispatch(frame)
                nursery.cancel_scope.cancel()
        if self._reading.cancelled_caught:
            raise trio.TooSlowError(f"the relay did not close {STOPPING_GRACE:.0f} s after 5002")

    async def _writer(self, ws: ClientConnection, queued: trio.MemoryReceiveChannel[bytes]) -> None:
        """Send queued frames, bundling what has piled up into one message.

        Pipelined publishes then cost the relay one WebSocket message per bundle, not
        per event. A bundle stays within the relay's ``max_frame``.
        """
        limit = self.relay_max_frame - 5  # room for the bundle's array header
        try:
            async for data in queued:
                frames, size = [data], len(data)
                while len(frames) < f.MAX_BUNDLE:
                    try:
                        data = queued.receive_nowait()
                    except trio.WouldBlock:
                        break
                    if size + len(data) > limit:
                        await ws.send(f.bundle(frames))
                        frames, size = [], 0
                    frames.append(data)
                    size += len(data)
                await ws.send(f.bundle(frames))
                if queued.statistics().current_buffer_used == 0:
                    self._flushed.set()
        except ConnectionClosed:
            pass  # the reader sees it too, and the intent is replayed on reconnect

    async def _dispatch(self, frame: f.Frame) -> None:
        sub = getattr(frame, "sub", None)
        if sub is not None and sub in self._taps:
            self._taps[sub](frame)
            return
        if isinstance(frame, f.Queued):
            queued = self._pending.get(frame.rid)
            if queued is not None:
                if queued.on_queued is not None:
                    notify(log, "publish's on_queued", queued.on_queued)
                for hook in self.on_queued:
                    notify(log, "on_queued", hook, queued.event)
        elif isinstance(frame, f.Ack):
            pending = self._pending.pop(frame.rid, None)
            if pending is not None:
                receipt = decode_receipt(frame.receipt)
                if receipt.id != pending.event.id:
                    raise RelayMismatch("relay acked a publish with another event's receipt")
                outcome = None
                if frame.outcome and frame.outcome_sig and frame.outcome_receipt:
                    event = decode_event(frame.outcome, frame.outcome_sig)
                    outcome_receipt = decode_receipt(frame.outcome_receipt)
                    outcome = Delivery(event, outcome_receipt, frame.outcome_seal)
                pending.result = Published(receipt, frame.seal, frame.duplicate, outcome)
                pending.done.set()
        elif isinstance(frame, f.EventFrame):
            subscription = self._subscriptions.get(frame.sub)
            if subscription is not None:
                subscription._deliver(frame)
            elif frame.sub in self._docs:
                self._docs[frame.sub]._on_event(frame)
        elif isinstance(frame, f.DocSync):
            if frame.sub in self._docs:
                self._docs[frame.sub]._on_sync(frame)
        elif isinstance(frame, f.DocAwareness):
            if frame.sub in self._docs:
                self._docs[frame.sub]._on_awareness(frame)
        elif isinstance(frame, f.Live):
            subscription = self._subscriptions.get(frame.sub)
            if subscription is not None:
                subscription._mark_live(frame)
        elif isinstance(frame, f.Result):
            asked = self._asked.pop(frame.rid, None)
            if asked is not None:
                asked.result = frame.body
                asked.done.set()
        elif isinstance(frame, f.Error):
            self._on_error(frame)

    def _on_error(self, frame: f.Error) -> None:
        error = _error_of(frame)
        if (
            error.code is ErrorCode.SHUTTING_DOWN
            and self.reconnect
            and (frame.rid in self._pending or frame.rid in self._asked)
        ):
            # Not an answer: the relay is stopping, and closes this connection once it
            # has answered what it admitted. The request is sent again on the next
            # connection. (Without reconnect it is one: the caller retries, as a
            # relay's outbox does, or gives up.) A relay that never closes it would
            # leave the request waiting for good: after a grace, we close it.
            if self._reading.deadline == math.inf:
                self._reading.deadline = trio.current_time() + STOPPING_GRACE
            return
        if frame.rid is not None and frame.rid in self._pending:
            pending = self._pending.pop(frame.rid)
            pending.error = error
            pending.done.set()
        elif frame.rid is not None and frame.rid in self._asked:
            asked = self._asked.pop(frame.rid)
            asked.error = error
            asked.done.set()
        elif frame.sub is not None and frame.sub in self._docs:
            shared = self._docs[frame.sub]
            if shared._on_error(error):
                self._queue(f.encode_frame(shared.open_request()))
        elif frame.sub is not None and frame.sub in self._subscriptions:
            self._subscriptions.pop(frame.sub).end(error)  # the relay ended it
        else:
            log.warning("relay error: %s", error)

    def _fail_all(self, error: ProtocolError) -> None:
        waiting: list[_Pending | Asked] = [*self._pending.values(), *self._asked.values()]
        for request in waiting:
            request.error = error
            request.done.set()
        self._pending.clear()
        self._asked.clear()
        # Called only as the client stops. Nothing more will come: a subscriber
        # (Ledger.wait_decision, say) would wait for ever. Its iterator raises the
        # error once it has what came before.
        for subscription in self._subscriptions.values():
            subscription.end(error)
        self._subscriptions.clear()
        for shared in self._docs.values():
            shared._fail(error)
        if self._mailbox is not None:
            self._mailbox.stop(error)

    # -- publishing -------------------------------------------------------------------

    async def publish(
        self,
        ns: str,
        kind: str,
        body: Any = None,
        *,
        deps: Sequence[bytes] = (),
        nonce: bytes | None = None,
        ts: int | None = None,
        on_queued: Callable[[], None] | None = None,
        on_sent: Callable[[PendingPublish], None] | None = None,
    ) -> Published:
        """Sign and publish an event; returns once the relay has durably sequenced it.

        Raises :class:`ProtocolError` when the relay rejects the event. Survives
        reconnects: an unacknowledged event is re-sent, and idempotence makes that exact.
        ``on_sent``: see :meth:`publish_signed`.
        """
        event = Event(
            ns=ns,
            kind=kind,
            author=self.identity.public_key,
            body=body,
            deps=tuple(deps),
            ts=self.clock_ms() if ts is None else ts,
            nonce=nonce,
        )
        signed = sign_event(event, self.identity.sign)
        return await self.publish_signed(signed, on_queued=on_queued, on_sent=on_sent)

    async def publish_signed(
        self,
        event: SignedEvent,
        *,
        on_queued: Callable[[], None] | None = None,
        on_sent: Callable[[PendingPublish], None] | None = None,
    ) -> Published:
        """Publish an already signed event (re-publishing the same bytes is safe).

        ``on_queued`` is called if the relay answers ``queued``: the namespace's home
        relay is unreachable and the event waits in the relay's outbox (the call
        still returns only with the home relay's receipt).

        ``on_sent`` is called with the publish's handle once it is on its way (it may
        first wait for room among the publishes in flight). From then on it is sent
        until it is answered, also if this call is cancelled: a caller cancelled
        after ``on_sent`` learns the answer from the handle's ``.wait()``, one
        cancelled before it sent nothing.
        """
        async with self._inflight:
            pending = self.publish_later(event, on_queued=on_queued)
            if on_sent is not None:
                on_sent(pending)
            await pending.done.wait()
        return await pending.wait()

    def publish_later(
        self, event: SignedEvent, *, on_queued: Callable[[], None] | None = None
    ) -> PendingPublish:
        """Send a publish now, without waiting for room or for its answer: publishes
        leave in the order of these calls. The caller bounds how many are in flight
        and awaits ``.wait()`` on the handle (a relay forwarding writes does)."""
        self._next_rid += 1
        rid = self._next_rid
        data = _publish_frame(rid, event)
        pending = _Pending(event, on_queued)
        if self._answered_here(data, "publish", pending):
            return pending
        self._pending[rid] = pending
        self._queue(data)
        return pending

    # -- querying ---------------------------------------------------------------------

    async def query(self, ns: str, q: str, args: dict[str, Any] | None = None) -> Any:
        """Ask the relay about the coordination state of ``ns`` (docs/protocol.md §8).

        Answered after every publish sent before it is sequenced, so an agent reads
        its own writes. Raises :class:`ProtocolError` (``unknown_query``,
        ``bad_query``, ``not_found``, ...) when the relay refuses.
        """
        return await self.ask(lambda rid: f.Query(rid=rid, ns=ns, q=q, args=args or {}))

    def _answered_here(self, data: bytes, what: str, request: _Pending | Asked) -> bool:
        """Answer here a request nothing would ever answer: on a stopped client, or
        over the relay's ``max_frame`` (with the error the relay would send: the
        relay's comes without a ``rid``, as it discards the message unread)."""
        if self.stopped.is_set():
            request.error = client_stopped()
        elif len(data) > self.relay_max_frame:
            limit = self.relay_max_frame
            reason = f"a {what} of {len(data)} bytes; the relay's max_frame is {limit}"
            request.error = ProtocolError(ErrorCode.FRAME_TOO_LARGE, reason)
        else:
            return False
        request.done.set()
        return True

    async def ask(self, frame: Callable[[int], f.AgentFrame]) -> Any:
        """Send the request ``frame(rid)`` and return its ``result`` body; raises the
        relay's error. Re-sent as is after a reconnect: only for requests that are
        safe to repeat (queries; ``msg.send``, deduplicated by message id)."""
        async with self._inflight:
            asked = self.ask_later(frame)
            await asked.done.wait()
        if asked.error is not None:
            raise asked.error
        return asked.result

    def ask_later(self, frame: Callable[[int], f.AgentFrame]) -> Asked:
        """Queue the request ``frame(rid)`` now, in call order, and return the handle
        its answer will set (the caller bounds how many are on their way)."""
        self._next_rid += 1
        rid = self._next_rid
        data = f.encode_frame(frame(rid))
        asked = Asked(data)
        if self._answered_here(data, "request", asked):
            return asked
        self._asked[rid] = asked
        self._queue(data)
        return asked

    async def query_all(
        self,
        ns: str,
        q: str,
        key: str,
        args: dict[str, Any],
        after_of: Callable[[dict[str, Any]], Any],
    ) -> list[dict[str, Any]]:
        """Every item of a paged list query: the items under ``key`` of each page, the
        next page asked ``after`` what ``after_of`` says of the last item."""
        items: list[dict[str, Any]] = []
        while True:
            page = await self.query(ns, q, args)
            items += [dict(item) for item in page[key]]
            if not page["more"] or not page[key]:
                return items
            args = {**args, "after": after_of(page[key][-1])}

    # -- documents ----------------------------------------------------------------------

    def doc(
        self, ns: str, name: str, *, create: bool = True, flush_timeout: float = FLUSH_TIMEOUT_DOC
    ) -> AbstractAsyncContextManager[SharedDoc]:
        """Open shared document ``name`` of ``ns`` as a live pycrdt document (see
        agent_sdk/docs.py); it is created first when ``create`` and missing. Leaving
        the block waits up to ``flush_timeout`` seconds for the edits' commit, then
        raises :class:`TimeoutError`."""
        return open_doc(self, ns, name, create=create, flush_timeout=flush_timeout)

    # -- messages -------------------------------------------------------------------------

    @property
    def mailbox(self) -> Mailbox:
        """This client's messages (agent_sdk/messaging.py)."""
        if self._mailbox is None:
            self._mailbox = Mailbox(self)
        return self._mailbox

    async def send(
        self,
        to: str | bytes,
        payload: Any,
        *,
        via: str = "auto",
        ns: str | None = None,
        endpoint: str | None = None,
        id: str | None = None,
    ) -> Sent:
        """Send ``payload`` (any msgpack value: text, bytes, maps) to agent ``to``,
        sealed end to end. ``to`` is an agent id, ``AGENT_ID@relay`` for an agent of
        another relay, or the name an agent joined directory ``ns`` under. Returns
        once the relay has stored it or the recipient has it; await ``.delivered()``
        on the result for the recipient's signed receipt.

        ``via``: ``relay`` sends through the relay; ``direct`` to the recipient's
        endpoint (``endpoint``, or the one its profile in directory ``ns``
        advertises); ``auto`` tries direct when there is an endpoint and falls back
        to the relay (docs/protocol.md §15).

        ``id``: text naming the message, for a sender that may send it again from
        another process (a command run again after a lost connection): the same
        ``id`` to the same recipient is the same message, stored and handed out once
        while a copy is recognised: while the relay remembers the delivery (its last
        65,536, over all its inboxes, not across its restart) or the recipient's
        process remembers the stream (its last 65,536 sender streams, each chosen id
        being one); past both, a copy is handed out again (docs/protocol.md §15.4).
        Use an ``id`` again only for the same payload: with another, which one the
        recipient gets depends on the path. A send the relay answers ``delivered``
        (a copy it delivered before) is settled: ``delivered()`` returns None, the
        receipt having gone to the earlier send. It is a stream of its
        own: the recipient does not order it with this client's other messages."""
        if via not in PATHS:
            raise ValueError(f"via={via!r}: one of {', '.join(PATHS)}")
        if id == "":
            raise ValueError("id: a message's chosen id is text, not empty")
        address, advertised = await self._resolve(to, ns)
        where = endpoint if endpoint is not None else advertised
        return await self.mailbox.send(address, payload, via, where, id)

    async def _resolve(self, to: str | bytes, ns: str | None) -> tuple[Address, str]:
        """The recipient's address and the endpoint it advertises in ``ns`` ("")."""
        from agent_sdk.directory import Directory  # it is built on this module

        if isinstance(to, str) and is_name(to):
            if ns is None:
                raise ValueError(f"{to!r} is not an agent id: name a directory (ns=...)")
            profiles = await Directory(self, ns).list(online=False)
            found = [p for p in profiles if p.get("name") == to]
            if len(found) != 1:
                # Names are not unique: rather refuse than seal for whoever joined last.
                why = "no" if not found else f"{len(found)} agents named"
                reason = f"{why} {to!r} in {ns}'s directory; send to an agent id"
                raise ProtocolError(ErrorCode.UNKNOWN_RECIPIENT, reason)
            profile = found[0]
            return Address(profile["agent"], _relay_of(ns, self.relay_name)), profile["endpoint"]
        address = Address.parse(to, self.relay_name)
        if ns is None:
            return address, ""
        try:
            profile = await Directory(self, ns).get(address.agent)
        except ProtocolError as exc:
            if exc.code is not ErrorCode.NOT_FOUND:
                raise
            return address, ""
        return address, str(profile.get("endpoint") or "")

    def listen(self, host: str = "127.0.0.1", port: int = 0) -> AbstractAsyncContextManager[str]:
        """Accept direct messages on a WebSocket endpoint at ``host:port`` (0: any free
        port); yields its URL, to advertise as ``endpoint`` in a directory profile."""
        return listening(self.mailbox, host, port)

    def messages(self) -> Messages:
        """Messages sent to this agent, as they come: those waiting in its inbox first
        (``async for message in client.messages()``). Each is acknowledged, with a
        signed receipt to its sender, as it is handed out."""
        return Messages(self.mailbox)

    # -- subscribing ------------------------------------------------------------------

    @asynccontextmanager
    async def subscribe(
        self,
        ns: str | Sequence[str],
        *,
        start: int | dict[str, int] | None = None,
        kinds: Sequence[str] = (),
        authors: Sequence[bytes] = (),
        buffer: int = 1024,
    ) -> AsyncIterator[Subscription]:
        """Subscribe to one or more namespaces.

        ``start`` is the first seq wanted (1 replays the whole log), per namespace when
        a dict; ``None`` streams from now on: entering waits until the relay has said
        where now is (its ``live``), so that nothing published after the body starts
        can be missed. Iterating yields a :class:`Live` per namespace once its backlog
        is replayed, and :class:`Delivery` items.
        """
        if buffer < 1:  # a full buffer pauses it: one of 0 would never be read
            raise ValueError(f"buffer={buffer}: a subscription buffers at least 1 item")
        namespaces = (ns,) if isinstance(ns, str) else tuple(ns)
        if start is None:
            starts: dict[str, int] = {}
        elif isinstance(start, int):
            starts = dict.fromkeys(namespaces, start)
        else:
            starts = dict(start)
        self._next_sub += 1
        request = f.Subscribe(
            sub=self._next_sub,
            ns=namespaces,
            start=starts,
            kinds=tuple(kinds),
            authors=tuple(authors),
        )
        subscription = Subscription(self, request, buffer)
        if self.stopped.is_set():  # nothing would ever come: its iterator raises
            subscription.end(client_stopped())
        else:
            self._subscriptions[request.sub] = subscription
            self._queue(f.encode_frame(request))
        try:
            # "Now" is where the relay's live says it was. Until then a reconnect
            # subscribes from a later now, and what came in between (a reply to a
            # request the body is about to send, say) would never be delivered.
            await subscription.placed.wait()
            yield subscription
        finally:
            subscription._rx.close()
            if self._subscriptions.pop(subscription.sub, None) is not None:
                self._queue(f.encode_frame(f.Unsubscribe(sub=subscription.sub)))

    def tap(
        self,
        frame: Callable[[int], f.Subscribe | f.DocOpen | f.MsgInbox],
        on_frame: Callable[[f.Frame], None],
    ) -> int:
        """Open a raw subscription: every frame the relay sends under its id (``event``,
        ``live``, ``doc.sync``, ``error``, ...) goes to ``on_frame`` undecoded, on the
        current connection only (a relay following another relay's log uses this: it
        checks and stores the bytes as they are). ``frame`` builds the request from
        the sub id; ``on_frame`` must not block. Returns the sub id."""
        self._next_sub += 1
        sub = self._next_sub
        self._taps[sub] = on_frame
        self._queue(f.encode_frame(frame(sub)))
        return sub

    def untap(self, sub: int, *, gone: bool = False) -> None:
        """Stop a raw subscription; frames of it still on the way are dropped.
        ``gone``: its connection has ended, and the relay with it: nothing to send."""
        if self._taps.pop(sub, None) is not None and not gone:
            self._queue(f.encode_frame(f.Unsubscribe(sub=sub)))

    def send_frame(self, frame: f.AgentFrame) -> None:
        """Queue one frame as is (``doc.awareness`` on a tapped document)."""
        self._queue(f.encode_frame(frame))

    def _pause(self, subscription: Subscription) -> None:
        """Stop a subscription whose consumer lags; frames still coming are dropped."""
        if not subscription.paused:
            subscription.paused = True
            self._subscriptions.pop(subscription.sub, None)
            self._queue(f.encode_frame(f.Unsubscribe(sub=subscription.sub)))

    def _resume(self, subscription: Subscription) -> None:
        """Subscribe again from the cursor, under a new id (the old one's frames are void)."""
        subscription.paused = False
        if self.stopped.is_set():  # paused as the client stopped: it ends here instead
            subscription.end(client_stopped())
            return
        self._next_sub += 1
        subscription.sub = self._next_sub
        self._subscriptions[subscription.sub] = subscription
        self._queue(f.encode_frame(subscription.resume_request()))

    def _queue(self, data: bytes) -> None:
        """Queue a frame on the current connection; without one, _serve replays intent."""
        if self._outbox is not None:
            self._outbox.send_nowait(data)
            if self._flushed.is_set():
                self._flushed = trio.Event()

    async def flush(self) -> None:
        """Return once every frame queued so far is written to the connection (or the
        connection is gone: what it replays on a reconnect is sent then)."""
        while self._outbox is not None and not self._flushed.is_set():
            await self._flushed.wait()

    def nonce(self, size: int = 16) -> bytes:
        """Fresh random bytes for a nonce: from ``rng`` when the client has one."""
        if self.rng is None:
            return secrets.token_bytes(size)
        return self.rng.randbytes(size)

    async def wait_connected(self) -> None:
        """Return once the client is connected and its intent replayed."""
        await self._connected.wait()


def _error_of(frame: f.Error) -> ProtocolError:
    """The exception for a relay's error frame (a code this client does not know is kept
    in the reason, under ``internal``)."""
    try:
        return ProtocolError(ErrorCode(frame.code), frame.reason)
    except ValueError:
        return ProtocolError(ErrorCode.INTERNAL, f"{frame.code} {frame.name}: {frame.reason}")


LOST = (ConnectionClosed, OSError)
"""What a connection ends with when it is lost: the connect loop reconnects on them."""


@contextmanager
def connection_ends() -> Iterator[None]:
    """One way out of a connection's nursery. Its tasks can end together: the reader
    with the relay's close while the client is being cancelled, say. Then the
    cancellation is what goes on (the loss does not matter any more; in a group it
    would escape the cancel scope as an error); otherwise as :func:`unwrap_single`."""
    try:
        yield
    except BaseExceptionGroup as group:
        cancelled, rest = group.split(trio.Cancelled)
        if cancelled is not None and (rest is None or rest.split(LOST)[1] is None):
            raise cancelled.exceptions[0] from None
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def _publish_frame(rid: int, event: SignedEvent) -> bytes:
    return f.encode_frame(f.Publish(rid=rid, event=event.raw, sig=event.sig))


async def _recv_bytes(ws: ClientConnection) -> bytes:
    message = await ws.recv()
    return message.encode() if isinstance(message, str) else message


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _relay_of(ns: str, own: str | None) -> str:
    """The relay an agent found in ``ns``'s directory is reached at: the namespace's
    home ("" when that is the relay this client is connected to)."""
    home = ns.rpartition("@")[2]
    return "" if home == own else home
