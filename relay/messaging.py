"""The relay's side of messages between agents, for one connection (protocol.md §15).

:class:`relay.session.Session` has already checked what it can alone: the sealed
message's size, shape, sender and signature, a receipt's signer. This module does
what needs the relay's state: store a message in its recipient's inbox (or send it
on towards the recipient's relay), stream an agent's inbox to it, and turn an
acknowledgement into a deleted item and a receipt in the sender's inbox.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from agent_sdk import frames as f
from agent_sdk.client import Asked
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.sealing import Unsealable
from relay.inbox import Arriving, Item
from relay.session import AckItem, Confirm, Mail, PassReceipt

_Answer = tuple[Mail, "str | ProtocolError | Asked"]

if TYPE_CHECKING:
    from federation.network import Federation
    from federation.peers import Peer
    from relay.node import RelayNode

MAIL_QUEUE = 256
"""Messages of one connection on their way (stored or sent on) before it waits."""
STREAM_BATCH = 256
"""Inbox items read per pass of a stream (sent as fast as the connection takes them)."""


class Messaging:
    """One connection's messages: its sends, its agent's inbox stream and acks."""

    def __init__(
        self,
        node: RelayNode,
        agent: bytes,
        send: Callable[[f.RelayFrame], Awaitable[None]],
        nursery: trio.Nursery,
        from_peer: Peer | None,
    ) -> None:
        self.node = node
        self.agent = agent
        self.send = send
        self.nursery = nursery
        self.from_peer = from_peer
        self._running = False  # the mail task starts with the first message (most
        # connections never send one: no task, no channel to keep for them)
        self._acks: trio.MemorySendChannel[AckItem | Confirm] | None = None  # so for acks
        self._acks_done = trio.Event()
        self.sub: int | None = None
        """The sub id of this connection's open inbox stream."""
        self.scope: trio.CancelScope | None = None
        self._stream_done = trio.Event()
        self._stream_done.set()  # no stream yet

    async def mail(self, action: Mail) -> None:
        """Take a sealed message to store or pass on; answered in order by
        :meth:`run` (waits only while this connection has too many on their way)."""
        if not self._running:
            self._running = True
            self._mail_tx, self._mail_rx = trio.open_memory_channel[Mail](MAIL_QUEUE)
            self.nursery.start_soon(self.run, self.from_peer)
        await self._mail_tx.send(action)

    async def run(self, from_peer: Peer | None) -> None:
        """Store this connection's messages as they come, a whole batch per write (one
        fsync for everything that arrived meanwhile), and pass on those for other
        relays; answers go back in the order the messages came."""
        async with trio.open_nursery() as nursery:
            answers_tx, answers_rx = trio.open_memory_channel[_Answer](MAIL_QUEUE)
            nursery.start_soon(self._answer_loop, answers_rx)
            async for first in self._mail_rx:
                batch = [first]
                while len(batch) < MAIL_QUEUE:
                    try:
                        batch.append(self._mail_rx.receive_nowait())
                    except trio.WouldBlock:
                        break
                here = self.node.config.name
                ours = [i for i, a in enumerate(batch) if not a.relay or a.relay == here]
                arriving = [
                    Arriving(h.recipient, h.sender, h.id, a.msg, a.origin)
                    for a in (batch[i] for i in ours)
                    for h in (a.sealed.header,)
                ]
                # By place in the batch, not by rid: nothing makes an agent's rids unique.
                stored = await self.node.inboxes.put_messages(arriving)
                answers: dict[int, ProtocolError | Asked | str] = dict(
                    zip(ours, stored, strict=True)
                )
                for i, action in enumerate(batch):
                    if i not in answers:  # for another relay: sent on in order
                        answers[i] = self._pass_on(action, from_peer)
                    await answers_tx.send((action, answers[i]))

    def _pass_on(self, action: Mail, from_peer: Peer | None) -> Asked | ProtocolError:
        try:
            federation = self._federation(action.relay)
            origin = action.origin or self.node.config.name
            return federation.send_message(action.relay, action.msg, origin, from_peer)
        except ProtocolError as exc:
            return exc

    async def _answer_loop(self, answers: trio.MemoryReceiveChannel[_Answer]) -> None:
        async for action, answer in answers:
            if isinstance(answer, Asked):
                await answer.done.wait()
                answer = _status_of(answer)
            if isinstance(answer, ProtocolError):
                await self.send(f.Error.of(answer, rid=action.rid))
            else:
                body = {"id": action.sealed.header.id, "status": answer}
                await self.send(f.Result(rid=action.rid, body=body))

    async def pass_receipt(self, action: PassReceipt, from_peer: Peer | None) -> None:
        """A peer relay's receipt for one of our agents (or one further on)."""
        receipt = action.receipt
        try:
            if action.relay and action.relay != self.node.config.name:
                # Stored before it is answered (the peer then forgets it), and
                # passed on in the background: a link on the way must not hold up
                # this peer connection's reader.
                federation = self._federation(action.relay)
                federation.check_route(action.relay, from_peer)
                await federation.keep_receipts([(action.relay, receipt.encode())])
            else:
                arriving = Arriving(receipt.sender, receipt.recipient, receipt.id, receipt.encode())
                await self.node.inboxes.put_receipts([arriving])
        except ProtocolError as exc:
            await self.send(f.Error.of(exc, rid=action.rid))
            return
        await self.send(f.Result(rid=action.rid, body={}))

    def _federation(self, relay: str) -> Federation:
        if self.node.federation is None:
            reason = f"this relay has no peer relays: no way to relay {relay!r}"
            raise ProtocolError(ErrorCode.UNKNOWN_RECIPIENT, reason)
        return self.node.federation

    async def open_inbox(self, sub: int, nursery: trio.Nursery) -> None:
        """Start streaming this agent's inbox as ``sub``; an older stream of the same
        agent (another connection) ends: one reader, so nothing is handed out twice."""
        streams = self.node.inboxes.streams
        if self.sub is not None:
            error = ProtocolError(
                ErrorCode.DUPLICATE_SUBSCRIPTION, f"the inbox is open as subscription {self.sub}"
            )
            await self.send(f.Error.of(error, sub=sub))
            return
        older = streams.pop(self.agent, None)
        if older is not None:
            older.cancel()
        self.sub, self.scope = sub, trio.CancelScope()
        streams[self.agent] = self.scope
        self._stream_done = trio.Event()
        nursery.start_soon(self._stream, sub, self.scope, self._stream_done)

    async def _stream(self, sub: int, scope: trio.CancelScope, done: trio.Event) -> None:
        try:
            await self._stream_items(sub, scope)
        finally:
            done.set()

    async def _stream_items(self, sub: int, scope: trio.CancelScope) -> None:
        inboxes = self.node.inboxes
        cursor = 0
        live = False
        with scope:
            await trio.lowlevel.checkpoint()  # closed at once (msg.inbox, unsubscribe)
            # Each opening replays the whole inbox: it costs a request, and waits for
            # one rather than being refused (a refusal would read as an open stream
            # to a client that knows only 3005 here).
            limiter, now = self.node.limiter, trio.current_time
            wait = limiter.take(self.agent, "request", now())
            while wait:
                await trio.sleep(wait)
                wait = limiter.take(self.agent, "request", now())
            while True:
                items = inboxes.after(self.agent, cursor, STREAM_BATCH)
                if not items:
                    if not live:  # the backlog is out: say so (an inbox reader may stop)
                        live = True
                        await self.send(f.Live(sub=sub, ns="", seq=cursor))
                    await inboxes.wait_after(self.agent, cursor)
                    continue
                for item in items:
                    await self.send(
                        f.MsgItem(sub=sub, seq=item.seq, kind=item.kind, data=item.data)
                    )
                    cursor = item.seq
        # Ended by another connection's opening, not by this one's unsubscribe (which
        # forgets the scope first): only then is the agent told. A stream of the same
        # sub id opened again on this connection is another scope.
        displaced = self.node.inboxes.streams.get(self.agent) is not scope
        if scope.cancelled_caught and self.scope is scope and displaced:
            reason = "this agent's inbox was opened by another connection"
            error = ProtocolError(ErrorCode.DUPLICATE_SUBSCRIPTION, reason)
            self.sub = self.scope = None
            await self.send(f.Error.of(error, sub=sub))

    async def acknowledge(self, action: AckItem | Confirm) -> None:
        """Take an acknowledgement (or a confirm, answered once those before it are
        applied). Acknowledgements that arrive meanwhile are applied together: one
        transaction deletes their items and stores their receipts."""
        if isinstance(action, AckItem) and action.sub != self.sub:
            # Checked as it arrives: a stream displaced later does not void it.
            reason = f"no inbox stream {action.sub} here"
            error = ProtocolError(ErrorCode.UNKNOWN_SUBSCRIPTION, reason)
            await self.send(f.Error.of(error, sub=action.sub))
            return
        if self._acks is None:
            self._acks, acks = trio.open_memory_channel[AckItem | Confirm](MAIL_QUEUE)
            self.nursery.start_soon(self._ack_loop, acks)
        await self._acks.send(action)

    async def finish(self) -> None:
        """The connection is closing: apply the acknowledgements it sent."""
        if self._acks is not None:
            self._acks.close()
            await self._acks_done.wait()

    async def _ack_loop(self, acks: trio.MemoryReceiveChannel[AckItem | Confirm]) -> None:
        try:
            await self._apply_acks(acks)
        finally:
            self._acks_done.set()

    async def _apply_acks(self, acks: trio.MemoryReceiveChannel[AckItem | Confirm]) -> None:
        inboxes = self.node.inboxes
        async for first in acks:
            batch = [first]
            while len(batch) < MAIL_QUEUE:
                try:
                    batch.append(acks.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):  # (closed: finish() drains it)
                    break
            ours = [a for a in batch if isinstance(a, AckItem)]
            # Nothing may wait between taking the items and writing their delete: a
            # connection cancelled there would leave them taken (acks of them refused,
            # expiry skipping them) until the relay restarts. Errors go out after.
            errors: list[f.Error] = []
            items = inboxes.take(self.agent, [a.seq for a in ours])
            receipts = []
            passing: list[tuple[str, bytes]] = []  # receipts for senders on other relays
            kept: list[Item] = []
            for action, item in zip(ours, items, strict=True):
                if item is None:
                    error = ProtocolError(ErrorCode.NOT_FOUND, f"no item {action.seq} here")
                    errors.append(f.Error.of(error, sub=action.sub))
                    continue
                receipt = action.receipt
                if item.kind != "message" or receipt is None:
                    continue
                if receipt.id != item.mid or receipt.sender != item.sender:
                    # The agent took this seq for another message (its numbering is
                    # stale): this one may never have reached it, so it stays.
                    reason = f"the receipt is for another message than item {action.seq}"
                    error = ProtocolError(ErrorCode.BAD_MESSAGE, f"{reason}: it stays")
                    errors.append(f.Error.of(error, sub=action.sub))
                    kept.append(item)
                    continue
                try:
                    receipt.verify()
                except Unsealable as exc:  # the item is delivered all the same
                    error = ProtocolError(ErrorCode.BAD_MESSAGE, str(exc))
                    errors.append(f.Error.of(error, sub=action.sub))
                    continue
                if item.origin and self.node.federation is not None:
                    passing.append((item.origin, receipt.encode()))
                else:
                    receipts.append(Arriving(item.sender, self.agent, item.mid, receipt.encode()))
            inboxes.untake(kept)
            taken = [item for item in items if item is not None and item not in kept]
            try:
                # Shielded: a connection closing mid-write must not leave it half done.
                with trio.CancelScope(shield=True):
                    if passing:  # stored before the items go: a crash loses neither
                        assert self.node.federation is not None
                        try:
                            await self.node.federation.keep_receipts(passing)
                        except BaseException:
                            inboxes.untake(taken)  # (acknowledge would have)
                            raise
                    await inboxes.acknowledge(taken, receipts)
            except ProtocolError as exc:  # the store failed: the items stay, sent again
                errors.extend(f.Error.of(exc, sub=action.sub) for action in ours)
            for error_frame in errors:
                await self.send(error_frame)
            for confirm in batch:
                if isinstance(confirm, Confirm):  # everything before it is applied
                    await self.send(f.Result(rid=confirm.rid, body={}))

    async def stop(self) -> None:
        """The agent closed its inbox stream (``unsubscribe``); returns once the stream
        has ended, so nothing of it follows the ``unsubscribed``."""
        self.close()
        if self.scope is not None:
            self.scope.cancel()
        self.sub = self.scope = None
        await self._stream_done.wait()

    def close(self) -> None:
        """The connection ended: its stream no longer holds the agent's inbox."""
        if self.scope is not None and self.node.inboxes.streams.get(self.agent) is self.scope:
            del self.node.inboxes.streams[self.agent]


def _status_of(asked: Asked) -> str | ProtocolError:
    """The next relay's answer to a message passed on; a link that dropped before it
    answered is ``home_unreachable`` (sending the same message again is safe)."""
    if asked.error is None:
        status = asked.result.get("status") if isinstance(asked.result, dict) else None
        if status not in ("stored", "delivered"):
            return ProtocolError(ErrorCode.INTERNAL, "the next relay gave a bad answer")
        return str(status)
    if asked.error.code is ErrorCode.INTERNAL:  # the link's client stopped under it
        return ProtocolError(ErrorCode.HOME_UNREACHABLE, "the link dropped; send again")
    return asked.error
