"""Messages between agents: ``client.send(to, payload)`` and ``client.messages()``.

Every message is sealed end to end (agent_sdk/sealing.py): the relay stores and
routes bytes it cannot read. A message travels one of three paths —

- **relayed**: through the recipient's relay, which keeps it in the recipient's
  inbox until the recipient acknowledges it (it may be offline meanwhile);
- **federated**: ``agent@relay``, passed across relay links to the recipient's relay,
  then as relayed;
- **direct**: to an endpoint the recipient listens on (agent_sdk/direct.py).

Ordering and exactly-once: each client sends on its own *stream* (random id) and
numbers its messages to each recipient 1, 2, 3, ... in the order ``send`` is called.
A recipient hands a message to the application only if its number is above the last
one handed out from that stream; anything else is a copy (a resend after a lost
answer, or the same message over another path) and is only acknowledged again.
Messages that arrive are therefore handed out in order and at most once; a message
the relay refused (``inbox_full``) leaves a gap the stream moves past. A message whose
sender chose its id (:func:`chosen`) is a stream of its own, the same in every process
that sends it: sent again from another process, it is still a copy.

The recipient acknowledges a message when the application takes it from
``messages()``, with a signed receipt that reaches the sender (``Sent.delivered``).
A message taken but not yet acknowledged when the recipient's process dies comes
again to its next process (the relay still holds it): across a crash of the
recipient, delivery is at least once — by the same id, for an application that
keeps what it has seen.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from agent_sdk import frames as f
from agent_sdk.direct import Direct, DirectUnreachable
from agent_sdk.errors import ErrorCode, ProtocolError, client_stopped, notify
from agent_sdk.sealing import (
    ID_SIZE,
    STREAM_SIZE,
    Header,
    Receipt,
    Sealed,
    Unsealable,
    seal,
    unseal,
)

if TYPE_CHECKING:
    from agent_sdk.client import Asked, RelayClient

log = logging.getLogger("formicary.messaging")

AGENT_ID = re.compile(r"[0-9a-f]{64}")


def is_name(to: str | bytes) -> bool:
    """Whether a recipient is a name, to look up in a directory: neither an agent id
    (raw, hex) nor ``AGENT_ID@relay``."""
    return isinstance(to, str) and "@" not in to and not AGENT_ID.fullmatch(to)


def chosen(sender: bytes, recipient: bytes, id: str) -> tuple[bytes, bytes]:
    """The message id and stream of a message whose sender chose its id as text
    (``send(..., id=...)``, ``formicary msg send --id``): the same text from the same
    sender to the same recipient is the same message, whichever process sends it, so a
    run again after a lost answer is deduplicated as a resend is (protocol 15.4). It is
    a stream of its own, numbered 1: a recipient that handed it out once takes any
    later copy for one."""
    if not id:
        raise ValueError("a message's chosen id is text, not empty")
    text = id.encode("utf-8", "surrogateescape")  # (argv's undecodable bytes, as given)
    digest = hashlib.sha256(CHOSEN_DOMAIN + sender + recipient + text).digest()
    return digest[:ID_SIZE], digest[ID_SIZE : ID_SIZE + STREAM_SIZE]


CHOSEN_DOMAIN = b"formicary/v1/msg-id\x00"
REMEMBERED = 65_536
"""Message ids a recipient remembers handing out, and sends awaiting a receipt."""
PATHS = ("auto", "direct", "relay")
AMBIGUOUS = (ErrorCode.HOME_UNREACHABLE, ErrorCode.INTERNAL)
"""Failures after which a message may be stored all the same: its receipt may still
come, so later messages to that agent stay on the relay path until it does."""


@dataclass(frozen=True, slots=True)
class Message:
    """A message as the application gets it."""

    id: bytes
    sender: bytes
    body: Any
    ts: int
    """The sender's clock when it sent the message (ms)."""
    path: str
    """How it came: ``relay`` (relayed or federated) or ``direct``."""
    stream: bytes
    seq: int


@dataclass(frozen=True, slots=True)
class Address:
    """Where a message goes: an agent, and its relay ("" for the sender's own)."""

    agent: bytes
    relay: str = ""

    @classmethod
    def parse(cls, to: str | bytes, own_relay: str | None) -> Address:
        """``AGENT_ID`` or ``AGENT_ID@relay`` (64 hex digits), or 32 raw bytes."""
        if isinstance(to, bytes):
            if len(to) != 32:
                raise ValueError("an agent id is 32 bytes")
            return cls(to)
        agent, _, relay = to.partition("@")
        if not AGENT_ID.fullmatch(agent):
            raise ValueError(f"{to!r}: an agent id is 64 lowercase hex digits")
        return cls(bytes.fromhex(agent), "" if relay == own_relay else relay)


class Sent:
    """A message the relay (or the recipient, directly) has taken. ``status`` is
    ``stored`` (waiting in the recipient's inbox) or ``delivered``."""

    def __init__(self, id: bytes, recipient: bytes, path: str, mailbox: Mailbox) -> None:
        self.mailbox = mailbox
        self.id = id
        self.recipient = recipient
        self.path = path
        self.status = "sending"
        self.receipt: Receipt | None = None
        self.expired = False
        self.on_settle: Callable[[], None] | None = None
        self.error: ProtocolError | None = None  # why no receipt can come any more
        self.delivered_before = False
        """The relay answered that it had delivered this message before (a chosen id
        sent again, protocol 15.4): its receipt went to that earlier send, not here."""
        self._settled = trio.Event()

    def __repr__(self) -> str:
        return (
            f"Sent(id={self.id.hex()}, to={self.recipient.hex()[:16]}..., path={self.path!r},"
            f" status={self.status!r}{', expired' if self.expired else ''})"
        )

    async def delivered(self) -> Receipt | None:
        """Wait for the recipient's signed receipt; raises ``ProtocolError`` when the
        message expired in the recipient's inbox instead. Receipts of relayed
        messages come through this agent's own inbox: waiting opens its stream (and
        ends a stream the same agent has open elsewhere, 15.3).

        Returns None when the message had been delivered before this send (only a
        chosen id sent again, ``send(..., id=...)``, can be): the relay says so
        (``delivered_before``), and the receipt went to the earlier send."""
        self.mailbox.open()
        await self._settled.wait()
        if self.receipt is None and self.delivered_before:
            return None
        if self.receipt is None and self.error is not None:
            raise self.error
        if self.receipt is None and not self.expired:
            reason = f"no longer waited for: over {REMEMBERED} later sends wait for receipts"
            raise ProtocolError(ErrorCode.NOT_FOUND, reason)
        if self.receipt is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, "the message expired undelivered")
        return self.receipt

    def _forget(self) -> None:
        """Stop waiting for the receipt (too many sends wait): ``delivered()`` raises.
        It still counts as relayed and not delivered (``on_settle`` is not called):
        a later message sent directly could overtake it, and the recipient would take
        it for a copy."""
        self._settled.set()

    def _settle(self, receipt: Receipt | None, before: bool = False) -> None:
        """Settle with the receipt; with none, the message expired, or, ``before``,
        it had been delivered before this send (no receipt comes to it)."""
        if self._settled.is_set():
            return
        if self.on_settle is not None:
            self.on_settle()
        if receipt is not None:
            self.receipt, self.status = receipt, "delivered"
        elif before:
            self.delivered_before, self.status = True, "delivered"
        else:
            self.expired = True
        self._settled.set()


def _settle_without_receipt(sent: Sent, asked: Asked, fresh: bool) -> None:
    """Settle ``sent`` when its answer says no receipt will come to it:

    - the relay refused it for good;
    - or, a ``fresh`` handle (no earlier send of this id in this process waits for
      its receipt), the relay answered ``delivered``: the receipt went to an earlier
      send (another process's run with the same chosen id, or one of this process
      settled already) and will not come again. Unsettled, it never returned from
      ``delivered()``, and counted as relayed and undelivered for good (no later
      message to that agent went direct). A handle shared with an earlier send still
      waiting here is left to that send's receipt, which is on its way."""
    if asked.error is not None:
        if asked.error.code not in AMBIGUOUS:
            sent._settle(None)
    elif fresh and asked.result.get("status") == "delivered":
        sent.mailbox._delivered_before(sent)


async def _settle_when_answered(sent: Sent, asked: Asked, fresh: bool) -> None:
    """For a send whose caller stopped waiting: settle it once it is answered."""
    await asked.done.wait()
    _settle_without_receipt(sent, asked, fresh)


class Inflow:
    """What a recipient has handed out, per sender stream (pure: see the module
    docstring for the rule)."""

    def __init__(self, memory: int = REMEMBERED) -> None:
        self.memory = memory
        self.last: OrderedDict[tuple[bytes, bytes], int] = OrderedDict()
        self.pending: set[bytes] = set()
        """Ids handed to the application's queue and not taken yet."""

    def admit(self, header: Header) -> str:
        """``new`` (hand it out), ``pending`` (a copy of one still queued) or ``old``."""
        key = (header.sender, header.stream)
        if header.id in self.pending:
            return "pending"
        if header.seq <= self.last.get(key, 0):
            return "old"
        self.last[key] = header.seq
        self.last.move_to_end(key)
        if len(self.last) > self.memory:
            self.last.popitem(last=False)
        self.pending.add(header.id)
        return "new"

    def taken(self, mid: bytes) -> None:
        self.pending.discard(mid)

    def forget(self, header: Header) -> None:
        """Un-admit a message not taken: a copy that comes later is ``new`` again."""
        self.pending.discard(header.id)
        key = (header.sender, header.stream)
        if key in self.last:
            self.last[key] = min(self.last[key], header.seq - 1)


@dataclass(frozen=True, slots=True)
class _Arrived:
    message: Message
    seq: int  # the relay's inbox item (0 for direct)
    header: Header


class Mailbox:
    """One client's messages (``client.mailbox``). The inbox stream opens when
    messages are read (:meth:`next`, ``client.messages()``) or a receipt is waited for
    (``Sent.delivered()``), and again after every reconnect; sending alone does not
    open it, since that would take the stream from another reader of the same agent.
    Receipts of relayed messages come through it, so an agent that only sends, and
    never waits for a receipt, keeps sending to a recipient through the relay once
    one of its messages went that way (``auto`` keeps them in order)."""

    def __init__(self, client: RelayClient) -> None:
        self.client = client
        self.stream = client.nonce(STREAM_SIZE)
        self._next_seq: dict[bytes, int] = {}
        self._turns: dict[bytes, trio.Lock] = {}  # per recipient: see send()
        self.patience = 60.0
        """Seconds a message to another relay's agent is sent again while the way
        there is down (``home_unreachable``) before ``send`` gives up."""
        self._relayed_pending: dict[bytes, int] = {}  # relayed, no receipt yet
        self._inflow = Inflow()
        self._copies: dict[bytes, list[_Arrived]] = {}  # of messages not taken yet
        self._queued: dict[bytes, _Arrived] = {}  # handed to the queue, not taken yet
        self._sent: OrderedDict[bytes, Sent] = OrderedDict()
        self._settled_ids: OrderedDict[bytes, None] = OrderedDict()  # ids whose receipt or
        # expiry came: a copy of one (its ack lost with a connection) is ours, not left
        self._queue_tx, self._queue_rx = trio.open_memory_channel[_Arrived](math.inf)
        self.sub: int | None = None
        self._sub_on = 0  # the client connection the stream was opened on
        self.live = trio.Event()
        """Set once the relay has sent the inbox's backlog (``live``)."""
        self._live_on = 0  # the client connection whose stream sent it
        self._reopened = trio.Event()  # set (and replaced) as each reconnect reopens
        self.error: ProtocolError | None = None
        """Why the inbox stream ended (opened by another connection of this agent)."""
        self.unconfirmed = False
        """Acknowledgements were sent that the relay has not confirmed applying."""
        self.refusal: ProtocolError | None = None
        self.refused = trio.Event()
        """Set (then replaced) each time the relay refuses an acknowledgement."""
        self.direct: Direct | None = None
        """The direct path's dialer and listener (agent_sdk/direct.py), once used."""

    # -- sending ------------------------------------------------------------------------

    def seal_next(self, to: Address, body: Any, id: str | None = None) -> Sealed:
        """Seal ``body`` for ``to`` as this stream's next message to it (call right
        before it is queued: the numbering is the order of sending), or, with ``id``,
        as the message of that chosen id (:func:`chosen`)."""
        client = self.client
        if id is None:
            mid, stream = client.nonce(ID_SIZE), self.stream
            seq = self._next_seq.get(to.agent, 0) + 1
            self._next_seq[to.agent] = seq
        else:
            (mid, stream), seq = chosen(client.identity.public_key, to.agent, id), 1
        header = Header(mid, client.identity.public_key, to.agent, stream, seq, client.clock_ms())
        return seal(client.identity, header, body)

    async def send(
        self, to: Address, body: Any, via: str, endpoint: str = "", id: str | None = None
    ) -> Sent:
        """Send ``body`` to ``to`` by path ``via`` (``auto`` tries ``endpoint``
        directly, then the relay), as the message of chosen id ``id`` if given.
        Messages to one agent leave in call order: each takes the recipient's turn to
        be numbered and queued, and a direct send holds it until the recipient has the
        message. A message that went through the relay and has no receipt yet keeps
        later ones on the relay too: were one to go direct it could overtake it, and
        the recipient would take the earlier one for a copy."""
        turn = self._turns.setdefault(to.agent, trio.Lock())
        async with turn:
            if via == "relay" or not endpoint or to.relay:
                if via == "direct":
                    raise DirectUnreachable("the recipient advertises no direct endpoint")
                sealed = self.seal_next(to, body, id)
            elif self._relayed_pending.get(to.agent):
                if via == "direct":
                    raise ValueError(
                        "messages to this agent through the relay are not delivered yet: "
                        "send via 'auto' or 'relay' to keep them in order"
                    )
                sealed = self.seal_next(to, body, id)
            else:
                sealed = self.seal_next(to, body, id)
                try:
                    return await self._direct(to, sealed, endpoint)
                except DirectUnreachable as exc:
                    if via == "direct":
                        raise
                    log.info("direct path failed (%s): through the relay instead", exc)
                # The same id and number: if it did arrive directly, this is a copy.
            sent, asked, fresh = self._queue_relayed(to, sealed)
            if fresh:
                # A handle shared with an earlier send of the same chosen id counts
                # once: it settles once, and counting it again kept the count above
                # zero (and later messages off the direct path) for good.
                self._relayed_pending[to.agent] = self._relayed_pending.get(to.agent, 0) + 1
                sent.on_settle = lambda: self._relayed_done(to.agent)
            if to.relay:
                # Across relays a link may be down (home_unreachable): the message is
                # sent again until its relay has it, and the turn is held meanwhile —
                # a later message must not get there first.
                return await self._until_taken(to, sealed, sent, asked, fresh)
        # Queued under the turn; answered outside it, so that the next message to
        # this agent is numbered and queued meanwhile: relayed ones pipeline.
        return await self._answered(sent, asked, fresh=fresh)

    async def _until_taken(
        self, to: Address, sealed: Sealed, sent: Sent, asked: Asked, fresh: bool
    ) -> Sent:
        delay, waited = 0.1, 0.0
        while True:
            try:
                return await self._answered(sent, asked, settle=False, fresh=fresh)
            except ProtocolError as exc:
                if exc.code is not ErrorCode.HOME_UNREACHABLE or waited >= self.patience:
                    if exc.code not in AMBIGUOUS:
                        sent._settle(None)
                    raise
                for hook in self.client.on_resending:
                    notify(log, "on_resending", hook, to.relay, exc)
            await trio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 5.0)
            asked = self._queue_relayed(to, sealed)[1]

    def _relayed_done(self, agent: bytes) -> None:
        self._relayed_pending[agent] -= 1
        if not self._relayed_pending[agent]:
            del self._relayed_pending[agent]

    async def _direct(self, to: Address, sealed: Sealed, endpoint: str) -> Sent:
        dialed = await self.direct_path().connection(to.agent, endpoint)
        # Tracked before sending: its receipt can come right behind the `got`.
        sent = self._track(Sent(sealed.header.id, to.agent, "direct", self))
        try:
            await dialed.send(sealed)
        except DirectUnreachable:
            if sent.path == "direct" and self._sent.get(sent.id) is sent:
                del self._sent[sent.id]  # what goes through the relay is tracked anew
            raise
        if sent.receipt is None:  # (a copy's receipt can come before the `got`)
            sent.status = "received"
        return sent

    def direct_path(self) -> Direct:
        """The direct path's listener and connections (agent_sdk/direct.py)."""
        if self.direct is None:
            self.direct = Direct(self)
        return self.direct

    async def send_sealed(self, to: Address, sealed: Sealed) -> Sent:
        """Send sealed bytes through the relay (again, for a resend: same handle)."""
        sent, asked, fresh = self._queue_relayed(to, sealed)
        return await self._answered(sent, asked, fresh=fresh)

    def _queue_relayed(self, to: Address, sealed: Sealed) -> tuple[Sent, Asked, bool]:
        """Queue ``sealed`` for the relay: its handle, the request, and whether the
        handle is fresh (no earlier send of this id here still waits for a receipt)."""
        data = sealed.encode()
        fresh = sealed.header.id not in self._sent
        sent = self._track(Sent(sealed.header.id, to.agent, "relay", self))
        asked = self.client.ask_later(lambda rid: f.MsgSend(rid=rid, msg=data, relay=to.relay))
        return sent, asked, fresh

    def _delivered_before(self, sent: Sent) -> None:
        """The relay says ``sent`` was delivered before: no receipt comes to it."""
        if self._sent.get(sent.id) is sent:
            del self._sent[sent.id]
        # Remembered as settled: a receipt for it that still comes (the earlier send's,
        # left in this agent's inbox by a process that ended) is acknowledged as ours,
        # not left there as another running instance's.
        self._remember_settled(sent.id)
        sent._settle(None, before=True)

    @staticmethod
    async def _answered(sent: Sent, asked: Asked, settle: bool = True, fresh: bool = True) -> Sent:
        try:
            await asked.done.wait()
        except trio.Cancelled:
            # The message is on its way all the same. Its answer must still settle it
            # when it is a refusal (or `delivered` before): unsettled, it counted as
            # relayed and undelivered for good, so no later message to that agent went
            # direct (and via="direct" was refused) for as long as the client ran.
            if asked.done.is_set():
                _settle_without_receipt(sent, asked, fresh)
            else:  # (not answered: the client's tasks still run, _fail_all is to come)
                with contextlib.suppress(RuntimeError):  # (its nursery closed: it stopped)
                    sent.mailbox.client.nursery.start_soon(
                        _settle_when_answered, sent, asked, fresh
                    )
            raise
        if asked.error is not None:
            if settle:
                _settle_without_receipt(sent, asked, fresh)
            raise asked.error
        sent.status = str(asked.result["status"])
        _settle_without_receipt(sent, asked, fresh)
        return sent

    def _track(self, sent: Sent) -> Sent:
        """Wait for ``sent``'s receipt (a message sent again shares one handle)."""
        if sent.id in self._sent:
            return self._sent[sent.id]
        self._sent[sent.id] = sent
        if len(self._sent) > REMEMBERED:  # receipts that never came: forget the oldest
            self._sent.popitem(last=False)[1]._forget()
        return sent

    # -- receiving ----------------------------------------------------------------------

    def open(self) -> None:
        """Open the inbox stream (once; again after each reconnect). After the relay
        ended it (3005: this agent opened its inbox elsewhere), calling this takes it
        back; :meth:`next` does not, it raises that error."""
        if self.sub is not None:
            return
        if self.client.stopped.is_set():  # nothing would ever come
            self.end(client_stopped())
            return
        if self.error is not None:
            self.error = None
            self.live = trio.Event()
        self.sub = self.client.tap(lambda sub: f.MsgInbox(sub=sub), self._on_frame)
        self._sub_on = self.client.connections
        if self._reopen not in self.client.on_reconnect:
            self.client.on_reconnect.append(self._reopen)

    async def _reopen(self) -> None:
        self._reopened.set()
        self._reopened = trio.Event()
        if self.error is not None:
            return  # the stream was given up to another connection: not taken back
        if self.sub is not None and self._sub_on == self.client.connections:
            return  # opened on this connection already (taken back, say)
        if self.sub is not None:
            self.client.untap(self.sub, gone=True)  # it ended with its connection
            self.sub = None
            self.live = trio.Event()  # set again once the new stream has replayed
        self.open()

    @property
    def waiting(self) -> int:
        """Messages that arrived and wait to be taken (:meth:`next` returns at once)."""
        return len(self._inflow.pending)

    async def next(self) -> Message:
        """The next message, in order per sender; acknowledged (with a receipt) as it
        is handed out. Raises the relay's error if the inbox stream ended."""
        if self.error is None:
            self.open()
        while True:
            if self.error is not None and self._queue_rx.statistics().current_buffer_used == 0:
                raise self.error
            arrived = await self._queue_rx.receive()
            if arrived.message.id not in self._inflow.pending:
                continue  # a wake-up, or handed out already by another path
            # (the copy admitted last: one queued before a hand-over is stale)
            arrived = self._queued.pop(arrived.message.id)
            self._inflow.taken(arrived.message.id)
            self.acknowledge(arrived)
            acknowledged = {arrived.seq}
            for copy in self._copies.pop(arrived.message.id, ()):
                if copy.seq not in acknowledged:  # the same item sent again is acked once
                    acknowledged.add(copy.seq)
                    self.acknowledge(copy)  # the same message by another way: off the relay
            return arrived.message

    def acknowledge(self, arrived: _Arrived) -> None:
        if arrived.seq and self.sub is not None:
            receipt = Receipt.make(self.client.identity, arrived.header).encode()
            self.client.send_frame(f.MsgAck(sub=self.sub, seq=arrived.seq, receipt=receipt))
            self.unconfirmed = True
        elif self.direct is not None and not arrived.seq:
            self.direct.acknowledge(arrived.header)

    def arrive(self, sealed: Sealed, path: str, seq: int = 0) -> bool:
        """A sealed message came (relay item ``seq``, or directly): check, decrypt,
        deduplicate, queue. Returns whether it was taken (not refused as bad)."""
        try:
            body = unseal(self.client.identity, sealed)
        except Unsealable as exc:
            log.warning("dropped a message that does not unseal: %s", exc)
            return False
        h = sealed.header
        verdict = self._inflow.admit(h)
        arrived = _Arrived(Message(h.id, h.sender, body, h.ts, path, h.stream, h.seq), seq, h)
        if verdict == "new":
            self._queued[h.id] = arrived
            self._queue_tx.send_nowait(arrived)
        elif verdict == "old":
            self.acknowledge(arrived)  # a copy: its receipt again, and off the relay
        else:  # a copy of one not taken yet: acknowledged when that one is
            copies = self._copies.setdefault(h.id, [])
            if all(copy.seq != seq for copy in copies):  # one per relay item, one direct
                copies.append(arrived)
        return True

    def _on_frame(self, frame: f.Frame) -> None:
        if isinstance(frame, f.MsgItem):
            self._on_item(frame)
        elif isinstance(frame, f.Live):
            self._live_on = self.client.connections
            self.live.set()
        elif isinstance(frame, f.Error):
            error = ProtocolError(_code(frame.code), frame.reason)
            if error.code is not ErrorCode.DUPLICATE_SUBSCRIPTION:
                # An acknowledgement the relay refused: the stream goes on.
                log.warning("the relay refused an inbox acknowledgement: %s", error)
                self.refusal = error
                self.refused.set()
                self.refused = trio.Event()
                return
            self._hand_over()
            self.end(error)  # the inbox was opened by another connection of ours

    def _hand_over(self) -> None:
        """The relay gave the inbox stream to another reader of this agent, and sends
        it every item not acknowledged: what came only through the stream and was not
        taken is that reader's now (handed out here as well, it would be twice)."""
        for mid, arrived in list(self._queued.items()):
            copies = (arrived, *self._copies.get(mid, ()))
            if all(copy.seq == 0 for copy in copies):
                continue  # it came directly only: this reader's to hand out
            del self._queued[mid]
            self._copies.pop(mid, None)
            self._inflow.forget(arrived.header)

    def stop(self, error: ProtocolError) -> None:
        """The client's relay connection is gone for good: no receipt of a relayed
        message can come any more (a direct one's comes on its own connection)."""
        for sent in self._sent.values():
            if sent.path == "relay" and not sent._settled.is_set():
                sent.error = error
                sent._settled.set()
        if self.sub is not None:
            self.end(error)

    def end(self, error: ProtocolError) -> None:
        """The inbox stream ended: a reader gets what came, then ``error``."""
        self.error = error
        self.sub = None
        self.live.set()
        self._queue_tx.send_nowait(_Arrived(_WAKE, 0, _WAKE_HEADER))  # wake a reader

    async def confirm(self) -> None:
        """Return once the relay has applied every acknowledgement sent so far (the
        client does this as it closes: a reader started next is not sent them again).

        An ack sent on a connection that is then lost may never have reached the
        relay, while the confirm is sent again on the next connection: so after a
        reconnect it waits for the new stream's replay (whose copies of what was
        taken are acknowledged again) and confirms once more."""
        if not self.unconfirmed:
            return
        while True:
            await self.live.wait()
            if self.error is None and self._live_on != self.client.connections:
                await self._reopened.wait()  # a reconnect whose stream is not open yet
                continue
            self.unconfirmed = False
            connection = self.client.connections
            await self.client.ask(lambda rid: f.MsgConfirm(rid=rid))
            if self.client.connections == connection:
                return

    def _on_item(self, item: f.MsgItem) -> None:
        ack = f.MsgAck(sub=item.sub, seq=item.seq)
        self.unconfirmed = True
        if item.kind == "message":
            try:
                sealed = Sealed.decode(item.data)
            except Unsealable as exc:
                log.warning("dropped an inbox item that is not a message: %s", exc)
                self.client.send_frame(ack)
                return
            if not self.arrive(sealed, "relay", item.seq):
                self.client.send_frame(ack)  # undecryptable: dropped, off the relay
            return
        if item.kind == "receipt":
            try:
                receipt = Receipt.decode(item.data)
                receipt.verify()
            except Unsealable as exc:
                log.warning("dropped a receipt that does not check: %s", exc)
            else:
                sent = self._sent.get(receipt.id)
                if sent is None and receipt.id not in self._settled_ids:
                    return  # another instance's (same agent, other stream): left for it
                if sent is not None and receipt.recipient == sent.recipient:
                    self._settle(sent, receipt)
                # (else a copy of one that came: a relay may store a receipt twice)
        elif item.kind == "expired":
            sent = self._sent.pop(item.data, None)
            if sent is None and item.data not in self._settled_ids:
                return  # another instance's notice: left for it (it expires in time)
            self._remember_settled(item.data)
            if sent is not None:
                sent._settle(None)
        self.client.send_frame(ack)

    def settle_direct(self, receipt: Receipt) -> None:
        """A receipt that came back over a direct connection."""
        sent = self._sent.get(receipt.id)
        if sent is not None and receipt.recipient == sent.recipient:
            self._settle(sent, receipt)

    def _settle(self, sent: Sent, receipt: Receipt) -> None:
        del self._sent[receipt.id]
        self._remember_settled(receipt.id)
        sent._settle(receipt)

    def _remember_settled(self, mid: bytes) -> None:
        self._settled_ids[mid] = None
        if len(self._settled_ids) > REMEMBERED:
            self._settled_ids.popitem(last=False)


class Messages:
    """``client.messages()``: an endless async iterator over :meth:`Mailbox.next` (a
    plain iterator, not a generator: breaking out of the loop leaves nothing open)."""

    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox

    def __aiter__(self) -> Messages:
        return self

    async def __anext__(self) -> Message:
        return await self.mailbox.next()


_WAKE = Message(b"", b"", None, 0, "", b"", 0)
_WAKE_HEADER = Header(b"", b"", b"", b"", 0, 0)


def _code(code: int) -> ErrorCode:
    try:
        return ErrorCode(code)
    except ValueError:
        return ErrorCode.INTERNAL
