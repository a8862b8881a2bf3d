"""The relay's WebSocket server: a thin trio shell around the session and the node.

Per connection there is one reader (receive, feed :class:`~relay.session.Session`,
act), one writer draining a bounded queue of encoded frames to the socket, one
acknowledger answering publishes in order, and one task per subscribed namespace
following the log by cursor. Every producer waits at most
``slow_consumer_timeout`` for room in the writer's queue; past that the consumer is
too slow and the connection is closed with code 1008 and reason ``3002 slow_consumer``
rather than buffered without bound. A send the peer leaves blocked that long counts
the same, queue or no queue (:func:`watch_writers`); one still blocked
``slow_consumer_timeout`` and ``ABORT_GRACE`` later has the connection cut without a
close frame, which could only have gone out behind the data the peer is not
reading. While a slow consumer's close handshake runs, the reader keeps reading what
the peer still sends (answering nothing), so that it sees the peer's answering close
frame and the connection ends as soon as the peer has read everything up to ours;
every other task of the connection stops sending and waits to be cancelled.
One connection's trouble never blocks another's: the only shared things are the
node's queues, which are bounded and never wait on a socket.

``GET /health`` and ``GET /info`` are answered on the same port.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from http import HTTPStatus
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import trio
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK
from websockets.http11 import Request, Response
from websockets.trio.server import Server, ServerConnection, serve

from agent_sdk import frames as f
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.wire import NS_RE, PROTOCOL_VERSION, Event, SignedEvent, digest, seal_digest
from federation.network import LOCATE, ProxiedDoc
from federation.outbox import Entry
from federation.peers import Peer
from relay.board import static_file
from relay.coordination.directory import joins_by_connection
from relay.documents import MAX_AWARENESS, LiveDoc, Overflow, Replica
from relay.limits import ErrorBudget
from relay.logs import CONNECTION, about
from relay.messaging import Messaging
from relay.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from relay.metrics import count_kind
from relay.node import STOPPING_REASON, RelayNode, Ticket
from relay.session import (
    AckItem,
    Action,
    Admit,
    Ask,
    Aware,
    Close,
    Confirm,
    Mail,
    Open,
    OpenDoc,
    OpenInbox,
    PassReceipt,
    Reply,
    Session,
    bad_signature,
)
from relay.store import Record
from relay.subscriptions import Filter, check_cursor

SEND_QUEUE_FRAMES_OF_MAX = 4
"""A connection's send queue holds at most this many ``max_frame``s of bytes (and at
most ``send_queue`` frames); past it, senders wait as for a full queue."""

FIRST_REPLAY_BATCH = SEND_QUEUE_FRAMES_OF_MAX
"""Records a replay reads first: within its byte budget however large they are."""

log = logging.getLogger("formicary.relay")
ACK_DRAIN = 10.0
"""Seconds a closing connection may take to apply the inbox acknowledgements it sent."""

SLOW_CONSUMER_CLOSE = 1008  # policy violation: the closest standard code
JOIN_WAIT = 10.0  # seconds a closing connection waits for its joins to be decided
STOPPING_WAIT = 1.0  # ... either of those, once the relay is stopping
AUTH_TIMEOUT_CLOSE = 1008
TOO_MANY_CLOSE = 1008  # a connection over the per-key or per-address cap
INTERNAL_CLOSE = 1011  # the relay failed at something (a write that must precede welcome)
FLOOD_CLOSE = 1008
MAX_AUTH_FAILURES = 3
"""Failed ``auth`` attempts after which a connection is closed (each costs a check)."""
ABORT_GRACE = 10.0
"""Seconds a slow consumer's close handshake may wait, beyond ``slow_consumer_timeout``,
for a peer that reads nothing before the connection is cut."""
REFUSALS_BEFORE_CLOSE = 256
"""Rate-limited frames after which a connection is closed, each frame let through
working one off: an agent that honours ``try again in`` (its retries get through)
never gets near it, and one refused more often than let through reaches it, however
it mixes the two."""
ADMIT_RUN = 64  # publishes of one message whose signatures are checked in one go
MAX_REFUSED_IN_MESSAGE = 64
"""Frames of one message refused with an error naming no request or subscription
(or any, before authentication) after which the rest of the message is not read: a
bundle of 4096 nils must not buy 4096 error frames (protocol 1). An error with a
``rid`` or ``sub`` is not counted: its client waits for it, and the frames after it
for theirs."""
ERROR_ALLOWANCE = 64 * 1024
"""Bytes of ``error`` frames a connection may be sent beyond those it has earned:
past it the connection is closed (5004 ``too many errors``). Answering bad input
must not amplify it: an error frame is often larger than the frame it answers (a
nil of one byte gets about 60), so a client sending nothing but bad frames would
get several times its bytes back. Every byte received earns a byte of errors, and
time earns ERROR_REFILL a second (:class:`relay.limits.ErrorBudget`), so an agent
whose mistakes are occasional is always answered."""
ERROR_REFILL = 16 * 1024
"""Bytes of ``error`` frames a second that time earns a connection, up to the
allowance: errors it did not cause with its input (resyncs, dropped presence
updates, ended subscriptions) are paid for by time, not held against it for good."""
T = TypeVar("T")


Answerable = Ticket | f.Query | Entry
"""What a connection answers in the order it came: local publishes, queries, and
publishes forwarded to another relay."""


class SlowConsumer(Exception):
    """The writer queue stayed full for ``slow_consumer_timeout`` seconds."""


@dataclass(slots=True)
class _Running:
    """An open subscription: what cancels it, when it has stopped, what it follows."""

    scope: trio.CancelScope
    done: trio.Event
    follows: int


class Connection:
    """The I/O side of one agent connection."""

    def __init__(self, node: RelayNode, ws: ServerConnection) -> None:
        self.node = node
        self.ws = ws
        config = node.config
        self.session = Session(
            relay_key=node.identity.public_key,
            relay_name=config.name,
            signer=node.identity.sign,
            challenge=secrets.token_bytes(f.CHALLENGE_SIZE),
            max_frame=config.max_frame,
            max_deps=config.max_deps,
            max_message=config.max_message,
            forwarders=frozenset(node.federation.peer_keys) if node.federation else frozenset(),
            charge=self._charge,
            # Signatures are checked here, a run of publishes at a time, off the event
            # loop (relay/signatures.py).
            verify_events=False,
        )
        self.fed = node.federation
        self._out_tx, self._out_rx = trio.open_memory_channel[bytes](config.send_queue)
        # The queue is bounded in bytes too: send_queue frames of max_frame bytes each
        # would be 256 MiB for one subscriber that reads nothing.
        self._queued_bytes = 0
        self._byte_budget = SEND_QUEUE_FRAMES_OF_MAX * config.max_frame
        self._taken = trio.Event()  # set (and replaced) as the writer takes frames
        # Publishes and queries, answered in the order they came: a query waits for
        # the publishes before it to be sequenced, so an agent reads its own writes.
        self._acks_tx, self._acks_rx = trio.open_memory_channel[tuple[int, Answerable]](
            config.max_inflight
        )
        self._proxied: dict[int, ProxiedDoc] = {}  # documents of foreign namespaces, by sub
        self._subscriptions: dict[int, _Running] = {}
        # Open documents by sub (each replica names whose read access it is open for).
        self._docs: dict[int, tuple[LiveDoc, Replica]] = {}
        self._follows = 0  # namespaces followed, over all subscriptions
        self._closing = False  # closing a slow consumer: nothing more is sent
        self._waits: set[trio.CancelScope] = set()  # tasks waiting for room in a queue
        self._reading_task: trio.lowlevel.Task | None = None
        self._present: set[str] = set()  # namespaces this connection is a member in
        self._joins: list[Ticket] = []  # its dir.join publishes not decided yet
        self._messaging: Messaging | None = None  # once authenticated
        self._counted = False  # in the limiter's connections per key
        self._refusals = 0  # rate-limited frames not worked off (REFUSALS_BEFORE_CLOSE)
        self._auth_failures = 0
        # Bytes of errors this connection may still be sent: what it sends and time
        # earn, each error frame spends; overdrawn, it is closed.
        self._errors = ErrorBudget.full(ERROR_ALLOWANCE, ERROR_REFILL, trio.current_time())
        self._flood_closing = False
        self._answering = False  # the acknowledger is answering a batch
        self._writing = False  # the writer is in a send
        self._send_began: float | None = None  # ... since then (trio.current_time())
        self._close_began: float | None = None  # a slow consumer's close, since then
        self._quiet = trio.Event()  # set (and replaced) as either finishes
        self._address = client_address(node, ws)

    async def run(self) -> None:
        self.node.count("connections")
        self.node.metrics.open_connections += 1
        self.node.connections.add(self)
        # The correlation id of this connection's log lines (its tasks inherit it).
        CONNECTION.set(secrets.token_hex(6))
        log.debug("connection opened", extra={"remote": self._address})
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                nursery.start_soon(self._acknowledger)
                await self._send(self.session.hello)
                try:
                    await self._reader()
                finally:
                    if self._messaging is not None:  # acks it sent are applied, not lost
                        with (
                            trio.CancelScope(shield=True),
                            trio.move_on_after(self._wait(ACK_DRAIN)),
                        ):
                            await self._messaging.finish()
                nursery.cancel_scope.cancel()
        except* (SlowConsumer, ConnectionClosed):
            pass
        finally:
            self.node.metrics.open_connections -= 1
            self.node.connections.discard(self)
            agent = self.session.agent
            if self._counted and agent is not None:
                self.node.limiter.disconnect(agent)
            log.debug("connection closed", extra={"agent": agent.hex() if agent else ""})
            if self._messaging is not None:
                self._messaging.close()
            if self._present:
                assert agent is not None
                # Let joins still on their way be decided first: a join decided after
                # the leave would leave a member online with no connection. A parked
                # join (its deps not here yet) is decided up to park_timeout_ms after it
                # was sent: waited for too, or one released after JOIN_WAIT alone made
                # such a member once park_timeout was set above it.
                parked = self.node.config.sequencer.park_timeout_ms / 1000
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(self._wait(parked + JOIN_WAIT)),
                ):
                    for ticket in self._joins:
                        await ticket.done.wait()
                for ns in self._present:  # presence by connection ends with it
                    self.node.detach(ns, agent)

    async def _send(self, frame: f.RelayFrame) -> None:
        data = f.encode_frame(frame)
        # Whatever task answers with an error, it is counted (a link carries many
        # agents' answers: it is not limited, as with rate limits). Overdrawn, the
        # error is not sent: the connection is closed instead.
        charged = isinstance(frame, f.Error) and self.peer is None
        if charged and not self._errors.spend(len(data), trio.current_time()):
            if trio.lowlevel.current_task() is self._reading_task:
                await self._close_flooded()
            elif not self._flood_closing:
                # Marked now, not when the close task runs: the reader must act on no
                # frame in between, though bytes or time may refill the budget meanwhile.
                self._flood_closing = True
                self._nursery.start_soon(self._close_flooded)
            await trio.sleep_forever()  # until the close cancels every task
        await self._send_encoded(data)

    async def _send_encoded(self, data: bytes) -> None:
        """Queue an encoded frame for the writer (see :meth:`_send`)."""
        if self._closing:
            await self._stop_sending()
        size = len(data)
        if not self._queued_bytes or self._queued_bytes + size <= self._byte_budget:
            try:
                self._out_tx.send_nowait(data)
                self._queued_bytes += size
                return
            except trio.WouldBlock:
                pass
        timeout = self.node.config.slow_consumer_timeout
        if await self._wait_for_room(self._out_tx, data, timeout, size=size):
            return
        if not self._closing:  # (else another task began the close while we waited)
            self._begin_slow_close("its send queue stayed full")
            if trio.lowlevel.current_task() is self._reading_task:
                self._nursery.start_soon(self._close_slow_consumer)  # we go on reading
            else:
                await self._close_slow_consumer()
        await self._stop_sending()

    async def _wait_for_room(
        self, queue: trio.MemorySendChannel[T], item: T, seconds: float = math.inf, size: int = 0
    ) -> bool:
        """Put ``item`` in a full ``queue`` once it has room (for ``size`` more bytes,
        the send queue): False if ``seconds`` ran out first, or a slow consumer's close
        began (it cancels every such wait)."""
        with trio.move_on_after(seconds) as waiting:
            self._waits.add(waiting)
            try:
                while size and self._queued_bytes and self._queued_bytes + size > self._byte_budget:
                    await self._taken.wait()
                await queue.send(item)
                self._queued_bytes += size
                return True
            finally:
                self._waits.discard(waiting)
        return False

    def _begin_slow_close(self, why: str) -> None:
        self._closing = True
        self._close_began = trio.current_time()
        self.node.count("slow_consumers")
        log.warning("closing a slow consumer: %s", why)
        for other in self._waits:  # they stop waiting: nothing more is sent
            other.cancel()
        self._note_quiet()  # (a clean stop waits for nothing more here)

    def check_writer(self, now: float) -> None:
        """Close the connection if its writer has been stuck in one send too long
        (see :func:`watch_writers`); cut it if the close is stuck too."""
        timeout = self.node.config.slow_consumer_timeout
        began = self._send_began
        if began is None or now - began < timeout:
            return
        try:
            if not self._closing:
                self._begin_slow_close("a send to it stayed blocked")
                self._nursery.start_soon(self._close_slow_consumer)
            elif self._close_began is not None and now - self._close_began >= timeout + ABORT_GRACE:
                self._close_began = None  # once
                self._nursery.start_soon(self._cut)
        except RuntimeError:  # its tasks have all ended; it is leaving node.connections
            pass

    async def _close_slow_consumer(self) -> None:
        # Close while the writer is still blocked in its send: cancelling a send midway
        # would break the stream, and the close frame with it. The close frame goes out
        # after what is already written, if the peer ever reads.
        reason = f"{int(ErrorCode.SLOW_CONSUMER)} slow_consumer"
        await self.ws.aclose(SLOW_CONSUMER_CLOSE, reason)
        # Closed: end every task of the connection, those parked in _stop_sending and
        # any waiting on a queue that one of them would have drained.
        self._nursery.cancel_scope.cancel()

    async def _cut(self) -> None:
        log.warning("cutting a slow consumer that read nothing of its close")
        await trio.aclose_forcefully(self.ws.stream)
        self._nursery.cancel_scope.cancel()

    async def _stop_sending(self) -> NoReturn:
        """What a task that would send on a connection being closed does: the reader
        stops acting on messages and drains them (see :meth:`_reader`); any other
        task waits to be cancelled as the connection ends."""
        if trio.lowlevel.current_task() is self._reading_task:
            raise SlowConsumer()
        await trio.sleep_forever()

    async def _writer(self) -> None:
        """Send queued frames, bundling what has piled up into one message (protocol §1)."""
        limit = self.node.config.max_frame
        queued = self._out_rx
        async for data in queued:
            frames, size = [data], len(data)
            while size < limit and len(frames) < f.MAX_BUNDLE:
                try:
                    data = queued.receive_nowait()
                except trio.WouldBlock:
                    break
                frames.append(data)
                size += len(data)
            self._queued_bytes -= size
            self._taken.set()
            self._taken = trio.Event()
            self._writing = True
            self._send_began = trio.current_time()
            try:
                await self.ws.send(f.bundle(frames))
            finally:
                self._send_began = None
                self._writing = False
            self._note_quiet()

    def _note_quiet(self) -> None:
        self._quiet.set()
        self._quiet = trio.Event()

    async def quiet(self) -> None:
        """Return once every answer decided so far has been written to the socket (a
        clean stop waits for this before it closes the connection), or the connection
        is being closed as a slow consumer (its answers will not be written)."""
        while not self._closing and (
            self._acks_rx.statistics().current_buffer_used
            or self._answering
            or self._out_rx.statistics().current_buffer_used
            or self._writing
        ):
            await self._quiet.wait()

    async def _reader(self) -> None:
        self._reading_task = trio.lowlevel.current_task()
        try:
            await self._read_and_act()
        except SlowConsumer:
            # The connection is being closed as a slow consumer. Its close handshake
            # needs the peer's answering close frame, which comes after whatever the
            # peer still sends: read and drop it all until the connection is closed.
            while True:
                try:
                    await self.ws.recv()
                except ConnectionClosedOK:
                    return

    async def _read_and_act(self) -> None:
        # An agent that connects and never authenticates holds resources for nothing.
        # The deadline bounds the waits for messages, not the handling of one.
        deadline = trio.current_time() + self.node.config.auth_timeout
        while self.session.agent is None:
            with trio.move_on_at(deadline):
                message = await self.ws.recv()
            if trio.current_time() >= deadline and self.session.agent is None:
                reason = f"{int(ErrorCode.NOT_AUTHENTICATED)} not_authenticated: auth timeout"
                await self.ws.aclose(AUTH_TIMEOUT_CLOSE, reason)
                return
            await self._receive_one(message)
        while True:  # recv(), not `async for`: a cancelled loop leaves no generator behind
            try:
                message = await self.ws.recv()
            except ConnectionClosedOK:
                return
            await self._receive_one(message)

    async def _receive_one(self, message: str | bytes) -> None:
        # (A text message's length is in characters: at most its bytes.)
        self._errors.earn(len(message), trio.current_time())
        if self._flood_closing or self._errors.overdrawn:  # (another task's error overdrew it)
            await self._close_flooded()
            return
        if isinstance(message, str):
            error = ProtocolError(ErrorCode.MALFORMED, "frames are binary messages, not text")
            await self._send(f.Error.of(error))
            return
        admits: list[Admit] = []  # a run of publishes, their signatures checked together
        refused = 0
        for i, action in enumerate(self.session.receive(message), 1):
            if i % 64 == 0:  # a big bundle must not hold the event loop for its whole length
                await trio.lowlevel.checkpoint()
            if _refusal(action, self.session.agent is None):
                refused += 1
                if refused > MAX_REFUSED_IN_MESSAGE:
                    if admits and not await self._admit_checked(admits):
                        return
                    reason = f"the rest of this message is not read: {refused - 1} of its frames"
                    reason += " were refused"
                    await self._send(f.Error.of(ProtocolError(ErrorCode.MALFORMED, reason)))
                    return
            if isinstance(action, Admit) and not action.verified:
                admits.append(action)
                if len(admits) >= ADMIT_RUN:
                    if not await self._admit_checked(admits):
                        return
                    admits = []
                continue
            if admits:  # the frames before this one go first
                if not await self._admit_checked(admits):
                    return
                admits = []
            if not await self._act(action):
                return
        if admits:
            await self._admit_checked(admits)

    async def _admit_checked(self, admits: list[Admit]) -> bool:
        """Check a run of publishes' signatures (off the loop when it pays), then admit
        each in order; False once the connection is being closed."""
        verdicts = await self.node.signatures.check([admit.event for admit in admits])
        for admit, good in zip(admits, verdicts, strict=True):
            if not good:
                await self._send(f.Error.of(bad_signature(), rid=admit.rid))
            elif not await self._act(admit):
                return False
        return True

    async def _act(self, action: Action) -> bool:
        """Carry out one of the session's decisions; False once the connection is being
        closed (nothing more of this message is acted on)."""
        if (
            self._flood_closing or self._errors.overdrawn
        ):  # (checked inline: this is on every frame's path)
            await self._close_flooded()
            return False
        if self._refusals > REFUSALS_BEFORE_CLOSE:
            # An agent that does not back off is flooding: stop reading it at all.
            log.warning("closing a connection that ignored rate limiting")
            reason = f"{int(ErrorCode.RATE_LIMITED)} rate_limited: too many refusals"
            await self.ws.aclose(FLOOD_CLOSE, reason)
            return False
        if isinstance(action, Admit):
            if self._foreign(action.event.event.ns):
                await self._forward(action.rid, action.event)
                return True
            ticket = await self.node.admit(action.event)
            self._note_presence(action.event.event, ticket)
            await self._answer_later(action.rid, ticket)
        elif isinstance(action, Ask):
            await self._answer_later(action.query.rid, action.query)
        elif isinstance(action, Reply):
            if isinstance(action.frame, f.Welcome) and self.peer is None:
                refusal = self.node.limiter.connect(action.frame.agent)
                if refusal is not None:
                    self.node.metrics.rate_limited["connections"] += 1
                    reason = f"{int(refusal.code)} {refusal.code.slug}: {refusal.reason}"
                    log.info("connection refused: %s", refusal.reason)
                    await self.ws.aclose(TOO_MANY_CLOSE, reason[:120])
                    return False
                self._counted = True
                # An agent: from now on it can be sent messages. Written before it
                # hears welcome, so that a relay crash cannot forget an agent that
                # saw itself connected; not written (a disk failure), it hears none.
                try:
                    await self.node.inboxes.remember(action.frame.agent)
                except ProtocolError as exc:
                    reason = f"{int(exc.code)} {exc.code.slug}: {exc.reason}"
                    await self.ws.aclose(INTERNAL_CLOSE, reason[:120])
                    return False
            if isinstance(action.frame, f.Welcome):  # the frames after it may be msg.*
                agent = action.frame.agent
                self._messaging = Messaging(self.node, agent, self._send, self._nursery, self.peer)
            elif isinstance(action.frame, f.Error) and action.frame.code == int(
                ErrorCode.AUTH_FAILED
            ):
                self._auth_failures += 1
                if self._auth_failures >= MAX_AUTH_FAILURES:
                    await self._send(action.frame)
                    reason = f"{int(ErrorCode.AUTH_FAILED)} auth_failed: too many attempts"
                    await self.ws.aclose(AUTH_TIMEOUT_CLOSE, reason)
                    return False
            await self._send(action.frame)
        elif isinstance(action, Open):
            await self._open(action.request)
        elif isinstance(action, OpenDoc):
            await self._open_doc(action.request)
        elif isinstance(action, Aware):
            await self._aware(action.frame)
        elif isinstance(action, Mail):
            assert self._messaging is not None  # only after auth (the session's table)
            await self._messaging.mail(action)
        elif isinstance(action, PassReceipt):
            assert self._messaging is not None
            await self._messaging.pass_receipt(action, self.peer)
        elif isinstance(action, OpenInbox):
            assert self._messaging is not None
            if action.sub in self._subscriptions:  # one space of ids (protocol §1)
                error = ProtocolError(
                    ErrorCode.DUPLICATE_SUBSCRIPTION, f"subscription {action.sub} is open"
                )
                await self._send(f.Error.of(error, sub=action.sub))
            else:
                await self._messaging.open_inbox(action.sub, self._nursery)
        elif isinstance(action, (AckItem, Confirm)):
            assert self._messaging is not None
            await self._messaging.acknowledge(action)
        else:
            assert isinstance(action, Close)
            await self._close(action.sub)
        return True

    async def _close_flooded(self) -> None:
        """Close a connection whose error budget is overdrawn, with the reason (whichever task
        found it over: the reader may be waiting for a message that never comes)."""
        self._flood_closing = True
        log.warning("closing a connection that overdrew its error budget")
        reason = f"{int(ErrorCode.RATE_LIMITED)} rate_limited: too many errors"
        await self.ws.aclose(FLOOD_CLOSE, reason)
        self._nursery.cancel_scope.cancel()  # tasks parked on an error not sent, too

    def _wait(self, seconds: float) -> float:
        """How long a closing connection may wait for its own work: less once the relay
        is stopping, so that a clean stop stays within its bound."""
        return min(seconds, STOPPING_WAIT) if self.node.stopping else seconds

    def _charge(self, what: str, cost: int) -> None:
        """The session's rate check: this agent's bucket for ``what`` (peer relays'
        links are not limited: they carry many agents, each limited at its own relay)."""
        agent = self.session.agent
        if agent is None or self.peer is not None:
            return
        try:
            self.node.limiter.check(agent, what, trio.current_time(), cost)
        except ProtocolError:
            self.node.metrics.rate_limited[what] += 1
            self._refusals += 1
            raise
        self._refusals = max(0, self._refusals - 1)

    # -- federation -------------------------------------------------------------------

    @property
    def peer(self) -> Peer | None:
        """The peer relay this connection is a link from, if it is one."""
        return self.fed.peer_of(self.session.agent) if self.fed else None

    def _check_read(self, ns: str, asker: bytes | None) -> None:
        """``asker`` may read ``ns``, and so may the peer relay passing its request."""
        self.node.access.check_read(ns, asker)
        if self.peer is not None:
            self.node.access.check_read(ns, self.session.agent)

    def _asker(self, on_behalf_of: bytes | None) -> bytes | None:
        """Whose read access a request is checked against: the agent's own, or for a
        request a peer relay passes on, the agent it names (the peer is trusted to
        say: the owner lists it as a reader only if it enforces the policy)."""
        if self.peer is not None and on_behalf_of is not None:
            return on_behalf_of
        return self.session.agent

    def _foreign(self, ns: str) -> bool:
        """True for a namespace homed elsewhere that federation may route to (an
        invalid one is not: the relay's own checks refuse it with their code)."""
        return (
            self.fed is not None and NS_RE.fullmatch(ns) is not None and not self.node.is_home(ns)
        )

    async def _forward(self, rid: int, event: SignedEvent) -> None:
        assert self.fed is not None
        try:
            if self.node.stopping:  # 6.1 step 9: for every namespace, ours or not
                raise ProtocolError(ErrorCode.SHUTTING_DOWN, STOPPING_REASON)
            entry = await self.fed.forward(event, self.peer)
        except ProtocolError as exc:
            await self._send(f.Error.of(exc, rid=rid))
            return
        await self._answer_later(rid, entry)

    async def _acknowledge_forwarded(self, rid: int, entry: Entry) -> None:
        async with trio.open_nursery() as waiting:
            waiting.start_soon(self._tell_queued, rid, entry)
            await entry.done.wait()
            waiting.cancel_scope.cancel()
        if entry.error is not None:
            await self._send(f.Error.of(entry.error, rid=rid))
            return
        published = entry.result
        assert published is not None
        outcome = published.outcome
        ack = f.Ack(
            rid=rid,
            receipt=published.receipt.raw,
            seal=published.seal,
            duplicate=published.duplicate,
            outcome=outcome.event.raw if outcome else None,
            outcome_sig=outcome.event.sig if outcome else None,
            outcome_receipt=outcome.receipt.raw if outcome else None,
            outcome_seal=outcome.seal if outcome else None,
        )
        await self._send(ack)

    async def _tell_queued(self, rid: int, entry: Entry) -> None:
        """Say ``queued`` once, if the entry waits in an outbox before its answer."""
        await entry.queued_now.wait()
        if not entry.done.is_set():
            await self._send(f.Queued(rid=rid))

    # -- publishing -------------------------------------------------------------------

    def _note_presence(self, event: Event, ticket: Ticket) -> None:
        """A ``dir.join`` by connection makes this connection hold the membership from
        the moment it is sent, so that closing before the answer still ends it."""
        if not joins_by_connection(event.kind, event.body):
            return
        if self.peer is not None:
            return  # a peer's link carries many agents: it holds no one's presence
        self._joins = [t for t in self._joins if not t.done.is_set()]  # decided: done with
        self._joins.append(ticket)
        if event.ns not in self._present:
            self._present.add(event.ns)  # online while this connection is open
            self.node.attach(event.ns, event.author)

    async def _answer_later(self, rid: int, request: Answerable) -> None:
        try:
            self._acks_tx.send_nowait((rid, request))
            return
        except trio.WouldBlock:
            pass
        if self._closing or not await self._wait_for_room(self._acks_tx, (rid, request)):
            await self._stop_sending()

    async def _acknowledger(self) -> None:
        async with trio.open_nursery() as parked:
            async for first in self._acks_rx:
                # Take everything queued before answering: a commit makes many answers
                # ready at once, and answering them without yielding in between lets
                # the writer send them as one bundle.
                queued = [first]
                while True:
                    try:
                        queued.append(self._acks_rx.receive_nowait())
                    except trio.WouldBlock:
                        break
                self._answering = True
                for rid, ticket in queued:
                    if isinstance(ticket, f.Query):
                        await self._answer_query(ticket)
                        continue
                    if isinstance(ticket, Entry):
                        # Sent on (or queued): answered when its home answers, without
                        # holding up later answers, like a parked publish.
                        await ticket.decided.wait()
                        parked.start_soon(self._acknowledge_forwarded, rid, ticket)
                        continue
                    if not ticket.decided.is_set():
                        await ticket.decided.wait()
                    if ticket.parked:
                        # Answer it when its deps arrive, without holding up later acks.
                        parked.start_soon(self._acknowledge, rid, ticket)
                    else:
                        await self._acknowledge(rid, ticket)
                self._answering = False
                self._note_quiet()

    async def _acknowledge(self, rid: int, ticket: Ticket) -> None:
        try:
            # Most answers are ready by the time we look: skip the awaits then.
            record = self.node.answer_nowait(ticket) or await self.node.answer(ticket)
        except ProtocolError as exc:
            log.info("publish refused: %s", exc, extra=about(ticket.event.id))
            await self._send(f.Error.of(exc, rid=rid))
            return
        seal = self._answer_seal(record)
        ack = f.Ack(rid=rid, receipt=record.receipt, seal=seal, duplicate=ticket.duplicate)
        decided = self.node.outcome_of(ticket.event.id)
        if decided is not None:
            outcome: Record | None = await self.node.committed_record(decided.ns, decided.seq)
        elif ticket.duplicate:  # (forgotten: an old duplicate's, 6.4)
            outcome = await self.node.outcome_behind(record)
        else:
            outcome = None
        if outcome is not None:
            ack = replace(
                ack,
                outcome=outcome.event,
                outcome_sig=outcome.sig,
                outcome_receipt=outcome.receipt,
                outcome_seal=self._answer_seal(outcome) if self.peer is not None else None,
            )
        await self._send(ack)
        self.node.metrics.publish_seconds.observe(time.perf_counter() - ticket.began)

    def _answer_seal(self, record: Record) -> bytes | None:
        """The seal an answer carries: the record's own when the log has one; on a peer
        connection always one. A relay forwards the answer to an agent, maybe through
        others, and a receipt is not signed by itself: sealed, no relay on the way can
        give it another seq (14.4). The log keeps its own seals."""
        if record.seal is None and self.peer is not None:
            return seal_digest(digest(record.receipt), self.node.identity.sign)
        return record.seal

    async def _answer_query(self, query: f.Query) -> None:
        try:
            if query.q == LOCATE:
                # A relay's own question (14.11): not an agent's, nor one a relay
                # passes on for an agent (it would be answered with the relay's reads).
                if self.fed is None or self.peer is None or query.agent is not None:
                    raise ProtocolError(ErrorCode.UNKNOWN_QUERY, f"{LOCATE} is for relays")
                assert self.session.agent is not None  # (a peer: authenticated)
                located = await self.fed.locate(query.args, self.session.agent)
                await self._send(f.Result(rid=query.rid, body=located))
                return
            asker = self._asker(query.agent)
            self._check_read(query.ns, asker)
            if self._foreign(query.ns):
                assert self.fed is not None
                body = await self.fed.ask(replace(query, agent=asker), self.peer)
            else:
                body = await self.node.query(query.ns, query.q, query.args)
        except ProtocolError as exc:
            await self._send(f.Error.of(exc, rid=query.rid))
            return
        except Exception:  # our bug on crafted args: answer it, keep the connection
            log.exception("query %s failed", query.q)
            failed = ProtocolError(ErrorCode.INTERNAL, f"the relay could not answer {query.q}")
            await self._send(f.Error.of(failed, rid=query.rid))
            return
        await self._send(f.Result(rid=query.rid, body=body))

    # -- subscriptions -----------------------------------------------------------------

    def _check_room(self, sub: int, follows: int) -> None:
        inbox = self._messaging.sub if self._messaging is not None else None
        if sub in self._subscriptions or sub == inbox:
            raise ProtocolError(ErrorCode.DUPLICATE_SUBSCRIPTION, f"subscription {sub} is open")
        config = self.node.config
        if self.peer is not None:
            return  # a link carries every mirror and document of a relay: no caps here
        if len(self._subscriptions) >= config.max_subscriptions:
            limit = config.max_subscriptions
            raise ProtocolError(ErrorCode.TOO_MANY_SUBSCRIPTIONS, f"limit is {limit}")
        if self._follows + follows > config.max_follows:
            reason = f"over {config.max_follows} namespaces followed on this connection"
            raise ProtocolError(ErrorCode.TOO_MANY_SUBSCRIPTIONS, reason)

    async def _open(self, request: f.Subscribe) -> None:
        try:
            self._check_room(request.sub, len(request.ns))
            match = Filter.of(request)
            starts = {}
            for ns in request.ns:
                self.node.access.check_read(ns, self.session.agent)
                head = self.node.head(ns)
                if self._foreign(ns):
                    assert self.fed is not None
                    self.fed.route(ns, self.peer)  # raises not_home without a route
                    # The mirror may be behind its home: a cursor past it waits.
                    starts[ns] = request.start.get(ns, -1)  # -1: the home's head, once known
                    if starts[ns] < 1 and ns in request.start:
                        check_cursor(ns, starts[ns], head)
                    continue
                refusal = self.node.router.refuse(ns)
                if refusal is not None:
                    raise refusal
                starts[ns] = request.start.get(ns, head + 1)
                check_cursor(ns, starts[ns], head)
        except ProtocolError as exc:
            await self._send(f.Error.of(exc, sub=request.sub))
            return
        running = _Running(trio.CancelScope(), trio.Event(), len(starts))
        self._subscriptions[request.sub] = running
        self._follows += running.follows
        # Namespaces of this relay followed from now are live at once: say so before
        # any frame of the others' replays, so that a client whose buffer those fill
        # knows where each from-now namespace starts when it resumes (protocol 7.3).
        now = {ns for ns in starts if ns not in request.start and not self._foreign(ns)}
        for ns in sorted(now):
            await self._send(f.Live(sub=request.sub, ns=ns, seq=starts[ns] - 1))
        self._nursery.start_soon(self._subscription, request.sub, running, starts, match, now)

    # -- documents ---------------------------------------------------------------------

    async def _open_doc(self, request: f.DocOpen) -> None:
        try:
            self._check_room(request.sub, 1)
            request = replace(request, agent=self._asker(request.agent))
            self._check_read(request.ns, request.agent)
            if self._foreign(request.ns):
                assert self.fed is not None
                self.fed.route(request.ns, self.peer)
        except ProtocolError as exc:
            await self._send(f.Error.of(exc, sub=request.sub))
            return
        running = _Running(trio.CancelScope(), trio.Event(), 1)
        self._subscriptions[request.sub] = running
        self._follows += 1
        if self._foreign(request.ns):
            self._nursery.start_soon(self._doc_proxy, request, running)
        else:
            self._nursery.start_soon(self._doc_subscription, request, running)

    async def _doc_proxy(self, request: f.DocOpen, running: _Running) -> None:
        """A document of a foreign namespace: its home serves it, through the link."""
        assert self.fed is not None
        sub = request.sub

        mine: list[ProxiedDoc] = []

        def opened(proxied: ProxiedDoc | None) -> None:
            if proxied is not None:
                mine.append(proxied)
                self._proxied[sub] = proxied
            elif mine and self._proxied.get(sub) is mine[-1]:
                del self._proxied[sub]  # not a newer document that reused the sub id

        ended = False

        async def send(frame: f.RelayFrame) -> None:
            nonlocal ended
            if isinstance(frame, f.Error):
                ended = True  # the subscription is over: free its place first
                if self._subscriptions.get(sub) is running:
                    del self._subscriptions[sub]
                    self._follows -= running.follows
            await self._send(frame)

        try:
            with running.scope:
                await self.fed.proxy_doc(request, self.peer, send, opened)
        except ProtocolError as exc:
            if not ended:
                await send(f.Error.of(exc, sub=sub))
        finally:
            running.done.set()

    async def _doc_subscription(self, request: f.DocOpen, running: _Running) -> None:
        """Sync step 2, then every later update of the document, in log order."""
        sub = request.sub
        error: ProtocolError | None = None
        try:
            with running.scope:
                live = await self.node.open_doc(request.ns, request.doc)
                self._check_read(request.ns, request.agent)  # (a change while it loaded)
                capacity = 4 * self.node.config.send_queue
                replica = Replica(capacity=capacity, agent=request.agent)
                missing, sv, seq = live.sync(request.sv, replica)  # registers it
                self._docs[sub] = (live, replica)
                try:
                    await self._doc_stream(request, live, replica, missing, sv, seq)
                finally:
                    del self._docs[sub]
                    live.leave(replica)
        except ProtocolError as exc:
            error = exc
        except Overflow:
            self.node.count("resyncs")
            reason = "this replica fell behind; open the document again with its state vector"
            error = ProtocolError(ErrorCode.DOC_RESYNC, reason)
        finally:
            running.done.set()
        if error is not None and self._subscriptions.pop(sub, None) is running:
            self._follows -= running.follows
            await self._send(f.Error.of(error, sub=sub))

    async def _doc_stream(
        self,
        request: f.DocOpen,
        live: LiveDoc,
        replica: Replica,
        missing: bytes,
        sv: bytes,
        seq: int,
    ) -> None:
        sub = request.sub
        reset = request.epoch is not None and request.epoch != live.epoch
        sync = f.DocSync(sub=sub, update=missing, sv=sv, seq=seq, epoch=live.epoch, reset=reset)
        await self._send(sync)
        states = live.awareness_states()
        if states is not None:
            await self._send(f.DocAwareness(sub=sub, update=states))
        while True:
            item = await replica.next()
            self._check_read(request.ns, request.agent)  # the policy may change
            if isinstance(item, bytes):
                await self._send(f.DocAwareness(sub=sub, update=item))
            else:
                frame = f.EventFrame(
                    sub=sub, event=item.event, sig=item.sig, receipt=item.receipt, seal=item.seal
                )
                await self._send(frame)

    async def _aware(self, frame: f.DocAwareness) -> None:
        proxied = self._proxied.get(frame.sub)
        if proxied is not None:
            proxied.awareness(frame.update)  # the home checks it and answers errors
            return
        try:
            opened = self._docs.get(frame.sub)
            if opened is None:
                reason = f"no open document {frame.sub}"
                raise ProtocolError(ErrorCode.UNKNOWN_SUBSCRIPTION, reason)
            live, replica = opened
            # The policy may have changed since the last item this replica got (which
            # is when its subscription would have ended): the agent, and a peer relay
            # passing it on, must still be readers.
            self._check_read(live.ns, replica.agent)
            if len(frame.update) > MAX_AWARENESS:
                reason = f"awareness update of {len(frame.update)} bytes; limit {MAX_AWARENESS}"
                raise ProtocolError(ErrorCode.AWARENESS_REFUSED, reason)
            if not replica.take_awareness_token(trio.current_time()):
                raise ProtocolError(ErrorCode.AWARENESS_REFUSED, "too many awareness updates")
            live.share_awareness(frame.update, replica)
        except ProtocolError as exc:
            if exc.code is ErrorCode.BAD_UPDATE:  # not an awareness update: refused alike
                exc = ProtocolError(ErrorCode.AWARENESS_REFUSED, exc.reason)
            await self._send(f.Error.of(exc, sub=frame.sub))

    async def _close(self, sub: int) -> None:
        if self._messaging is not None and self._messaging.sub == sub:
            await self._messaging.stop()
            await self._send(f.Unsubscribed(sub=sub))
            return
        running = self._subscriptions.pop(sub, None)
        if running is None:
            error = ProtocolError(ErrorCode.UNKNOWN_SUBSCRIPTION, f"no subscription {sub}")
            await self._send(f.Error.of(error, sub=sub))
            return
        running.scope.cancel()
        await running.done.wait()  # nothing of it may follow its `unsubscribed`
        self._follows -= running.follows
        await self._send(f.Unsubscribed(sub=sub))

    async def _subscription(
        self,
        sub: int,
        running: _Running,
        starts: dict[str, int],
        match: Filter,
        live: set[str],
    ) -> None:
        error: ProtocolError | None = None
        try:
            with running.scope:
                async with trio.open_nursery() as nursery:
                    for ns, start in starts.items():
                        nursery.start_soon(self._follow, sub, ns, start, match, ns in live)
        except* ProtocolError as group:  # forbidden: a policy change took the agent's access
            first = group.exceptions[0]  # (several namespaces may end at once: one error)
            assert isinstance(first, ProtocolError)
            error = first
        finally:
            running.done.set()
        if error is not None and self._subscriptions.pop(sub, None) is running:
            self._follows -= running.follows
            await self._send(f.Error.of(error, sub=sub))

    async def _follow(self, sub: int, ns: str, cursor: int, match: Filter, live: bool) -> None:
        if self._foreign(ns):
            assert self.fed is not None
            try:
                async with self.fed.hold(ns, self.peer) as mirror:
                    await mirror.caught_up()
                    if mirror.refused is not None:
                        raise mirror.refused
                    if cursor < 0:  # "from now": past what the mirror holds, checked (the
                        cursor = self.node.head(ns) + 1  # head a peer claims is not)
                    await self._follow_log(sub, ns, cursor, match)
            except CannotPassOn:
                raise  # ours, not the route's: the subscriber is told
            except ProtocolError as exc:
                if exc.code is ErrorCode.FORBIDDEN or self.peer is None:
                    raise  # an agent is told (and one from now is waiting for its live)
                return  # the route went away; the peer's mirror follows it no more
        else:
            await self._follow_log(sub, ns, cursor, match, live)

    def _pruned_frame(self, sub: int, record: Record) -> bytes:
        """A pruned record for a peer: its receipt and the home's pruned mark (4.5)."""
        mark = self.node.pruned_mark_of(record)
        if mark is None:  # a peer would take it for a forgery and drop the whole link
            raise CannotPassOn(
                ErrorCode.INTERNAL,
                f"{record.ns} seq {record.seq} has no bytes and no pruned mark here: this "
                "relay cannot pass it on (docs/operations.md, Mirrors)",
            )
        frame = f.EventFrame(sub, b"", b"", record.receipt, record.seal, mark=mark)
        return f.encode_frame(frame)

    async def _follow_log(
        self, sub: int, ns: str, cursor: int, match: Filter, live: bool = False
    ) -> None:
        """Replay ``ns`` from ``cursor``, mark live, then stream as the log grows.

        A peer relay's mirror is sent the receipts of compacted ``doc.update``
        records too (with empty event bytes and the home's pruned mark): it needs
        every link of the chain.
        ``live``: its ``live`` frame was sent already (a namespace followed from now)."""
        chain_too = self.peer is not None
        most = self.node.config.replay_batch
        budget = self._byte_budget
        batch = min(most, FIRST_REPLAY_BATCH)  # then sized to hold about `budget` bytes
        access = self.node.access
        while True:
            read: list[Record] = await self.node.read(ns, cursor, batch)
            held = sum(len(r.event) for r in read)
            batch = max(1, batch * budget // held) if held > budget else min(most, 2 * batch)
            # Checked as it goes, not only at subscribe: a policy can change under it.
            # A reader shut out still gets the log up to the change that did it (a
            # mirroring relay must fold it), then the error; and an agent reads each
            # record under the policy in force before it, so one let back in does not
            # get what was written while it was out (a mirror takes every record: the
            # chain has no gaps, and it applies this rule to its own agents).
            agent = self.session.agent
            through = access.readable_through(ns, agent)
            if through is not None and cursor > through:
                access.check_read(ns, agent)  # raises forbidden
            records = read
            if ns in access.changes and not chain_too:
                records = [r for r in read if access.readable(ns, agent, r.seq)]
            for record in records:
                # Sending may not block, so look for an unsubscribe before each frame.
                await trio.lowlevel.checkpoint_if_cancelled()
                if not match.matches(record):
                    continue
                if record.event:
                    # Encoded once for all subscribers but the sub id (frames.py).
                    event = f.encode_event_frame(
                        sub, record.event, record.sig, record.receipt, record.seal
                    )
                elif chain_too:  # pruned by compaction (13.7): still a link of the chain
                    event = self._pruned_frame(sub, record)
                else:
                    continue  # (agents are not sent it)
                count_kind(self.node.metrics.events_out, record.kind)
                await self._send_encoded(event)
            if read:
                cursor = read[-1].seq + 1
                # A filter may match nothing in a long log read from memory: without a
                # turn here, the whole replay would hold the event loop (a review saw
                # other agents wait 90 ms).
                await trio.lowlevel.checkpoint()
                continue
            if not live:
                live = True
                await trio.lowlevel.checkpoint_if_cancelled()
                await self._send(f.Live(sub=sub, ns=ns, seq=cursor - 1))
            await self.node.wait_beyond(ns, cursor - 1)


class CannotPassOn(ProtocolError):
    """A record this relay holds without what a peer needs to check it (a pruned one
    without its mark): the subscription ends with this error, the link stays up."""


def _refusal(action: Action, anonymous: bool) -> bool:
    """An error the session answers a frame with that counts toward the message's
    cap: one that names no request or subscription (nobody waits for it), or any
    before authentication, where nothing is charged; never a rate limit's."""
    if not isinstance(action, Reply) or not isinstance(action.frame, f.Error):
        return False
    error = action.frame
    if error.code == int(ErrorCode.RATE_LIMITED):
        return False
    return anonymous or (error.rid is None and error.sub is None)


async def watch_writers(node: RelayNode) -> None:
    """Look at every connection's writer twice per ``slow_consumer_timeout``: a peer
    that stops reading blocks the send in progress, and while websockets waits to
    write it also stops reading that peer (its reading takes turns with sends), so a
    connection with nothing more queued would otherwise wait forever."""
    every = node.config.slow_consumer_timeout / 2
    while True:
        await trio.sleep(every)
        now = trio.current_time()
        for connection in list(node.connections):
            connection.check_writer(now)


def client_address(node: RelayNode, ws: ServerConnection) -> str:
    """The address a connection comes from, without its port ("" in memory); behind
    a trusted proxy, the client's, from ``X-Forwarded-For``."""
    try:
        remote = ws.remote_address
    except (OSError, AttributeError, NotImplementedError):  # in memory: no address
        return ""
    peer = str(remote[0]) if isinstance(remote, tuple) else ""
    forwarded = ws.request.headers.get_all("X-Forwarded-For") if ws.request else []
    return node.limiter.client_address(peer, forwarded)


# --------------------------------------------------------------------------- HTTP


def info_document(node: RelayNode) -> dict[str, Any]:
    """The relay info document served at ``GET /info``."""
    config = node.config
    return {
        "name": config.name,
        "key": node.identity.id,
        "protocol": PROTOCOL_VERSION,
        # As the anonymous board: a private namespace's name is not public either.
        "namespaces": [ns for ns in node.namespaces() if node.access.may_read(ns, None)],
        "limits": {
            "max_frame": config.max_frame,
            "max_deps": config.max_deps,
            "max_subscriptions": config.max_subscriptions,
            "max_inflight": config.max_inflight,
            "slow_consumer_timeout": config.slow_consumer_timeout,
            "auth_timeout": config.auth_timeout,
            "sequencer": asdict(config.sequencer),
            "max_message": config.max_message,
            "inbox_max_items": config.inbox_max_items,
            "inbox_ttl_ms": config.inbox_ttl_ms,
        },
        "messages": {
            **node.inboxes.counts,
            "waiting": node.inboxes.waiting,
            "inboxes": len(node.inboxes.boxes),
            "streams": len(node.inboxes.streams),
        },
        "access": {
            "create": str(config.create),
            "creators": len(config.creators),  # how many; who they are is not public
        },
        "stats": dict(node.stats),
        "federation": node.federation.info() if node.federation else None,
    }


def http_handler(node: RelayNode) -> Callable[[ServerConnection, Request], Response | None]:
    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        # A header may come on several lines (HTTP/1.1): all of them, as tokens.
        tokens = ",".join(request.headers.get_all("Connection")).lower().split(",")
        if "upgrade" in (token.strip() for token in tokens):
            return None  # a WebSocket handshake: let it through
        path = urlsplit(request.path).path  # (a query string, a cache-buster, is no other page)
        if path == "/health":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path == "/metrics":
            response = connection.respond(HTTPStatus.OK, node.metrics.render().decode())
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = METRICS_CONTENT_TYPE
            return response
        page = static_file(path)
        if page is not None:  # the oversight board (relay/board.py)
            body, content_type = page
            response = connection.respond(HTTPStatus.OK, "")
            response.body = body
            del response.headers["Content-Type"]
            del response.headers["Content-Length"]
            response.headers["Content-Type"] = content_type
            response.headers["Content-Length"] = str(len(body))
            response.headers["Cache-Control"] = "no-cache"
            return response
        if path == "/info":
            response = connection.respond(HTTPStatus.OK, json.dumps(info_document(node)) + "\n")
            del response.headers["Content-Type"]  # respond() set text/plain; replace it
            response.headers["Content-Type"] = "application/json"
            return response
        return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")

    return process_request


async def serve_relay(
    node: RelayNode,
    host: str = "127.0.0.1",
    port: int = 7700,
    *,
    listeners: list[trio.abc.Listener[trio.abc.Stream]] | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``node`` on ``host:port`` until cancelled; reports the ``Server`` started.

    The WebSocket layer accepts messages up to twice ``max_frame`` so that a frame
    over the limit gets a ``frame_too_large`` error and the connection lives on;
    beyond that the WebSocket layer itself closes with 1009 (message too big).
    """

    from relay.board import SOCKET as BOARD_SOCKET
    from relay.board import serve_board
    from relay.yws import is_yjs, serve_yjs  # it imports this module's neighbours

    async def handler(ws: ServerConnection) -> None:
        # Counted from the start: unauthenticated connections and plain Yjs clients
        # hold sockets too, and one address must not take them all.
        address = client_address(node, ws)
        refusal = node.limiter.open(address)
        if refusal is not None:
            node.metrics.rate_limited["connections"] += 1
            log.info("connection refused: %s", refusal.reason)
            reason = f"{int(refusal.code)} {refusal.code.slug}: {refusal.reason}"
            await ws.aclose(TOO_MANY_CLOSE, reason[:120])
            return
        try:
            if ws.request is not None and is_yjs(ws.request.path):
                await serve_yjs(node, ws)  # a plain Yjs client (relay/yws.py)
            elif ws.request is not None and ws.request.path == BOARD_SOCKET:
                await serve_board(node, ws)  # the oversight board's page (relay/board.py)
            else:
                await Connection(node, ws).run()
        finally:
            node.limiter.close(address)

    where: dict[str, Any] = {"port": port, "host": host}
    if listeners is not None:  # an in-memory network (virtual-time simulations)
        where = {"listeners": listeners, "ping_interval": None}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_writers, node)
        await serve(
            handler,
            compression=None,  # events are small and signed: deflate costs more than it saves
            max_size=2 * node.config.max_frame,
            process_request=http_handler(node),
            task_status=task_status,
            **where,
        )
