"""The y-websocket endpoint: plain Yjs clients on ``/yjs/<ns>/<doc>``, same port.

An unmodified y-websocket (or pycrdt) client speaks the standard messages here: sync
(step 1 with a state vector, step 2 with the missing update, updates) and awareness,
each a binary WebSocket message. The relay sends its step 1 on connect and answers
the client's with step 2; from then on every committed update of the document
reaches the client in log order, exactly as for SDK replicas (relay/documents.py).

Without ``?token=`` the client reads: an update that adds an item closes the
connection (1008, ``2004 wrong_author: read-only: ...``). (One that only deletes
cannot be told from the delete set every step 2 carries, and is dropped.) A token's
expiry ends the connection too. With a document token (agent_sdk/doctoken.py; a bound
one with its ``&secret=``) its updates are checked like any other and written by the
relay as ``doc.update`` events that carry the token, never the secret; they are
pipelined (the next message is read while one commits), and a refused one closes the
connection.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from functools import partial
from urllib.parse import parse_qs, unquote, urlsplit

import trio
from pycrdt import (
    YMessageType,
    YSyncMessageType,
    create_awareness_message,
    create_sync_message,
    create_update_message,
    get_state,
    merge_updates,
    write_message,
)
from websockets.exceptions import ConnectionClosed
from websockets.trio.server import ServerConnection

from agent_sdk import doctoken
from agent_sdk.docs import EMPTY_UPDATE, MAX_UPDATE, state_vector, yjs
from agent_sdk.errors import ErrorCode, ProtocolError, unwrap_single
from agent_sdk.wire import Event, sign_event
from agent_sdk.yupdate import check_shape, varuint
from relay.documents import MAX_AWARENESS, LiveDoc, Overflow, Replica, changes_nothing
from relay.limits import TokenBucket, publish_cost
from relay.node import RelayNode, Ticket
from relay.store import Record

PREFIX = "/yjs/"
YJS_KEY = b"yjs:"
"""Prefixes a token's agent key in the per-key connection count: its plain Yjs
clients are capped apart from the agent's own connections."""
POLICY_CLOSE = 1008
TRY_AGAIN_CLOSE = 1013
SYNC_RATE = 10.0
"""Sync messages per second a client may send that are not written (step 1s, a
reader's replies, a writer's step 2 with no edit): each costs the relay a decode
of the document or of the message, so they are bounded per connection. A client
sends one or two of them per (re)connect."""
SYNC_BURST = 40.0


def is_yjs(path: str) -> bool:
    return path.startswith(PREFIX)


async def serve_yjs(node: RelayNode, ws: ServerConnection) -> None:
    """Serve one y-websocket client until it leaves (or breaks the rules)."""
    counted: bytes | None = None  # the token's key, counted in the per-key cap
    try:
        ns, name, token = _route(ws.request.path if ws.request else "", node)
        node.access.check_read(ns, token.agent if token else None)
        if token is not None:
            # A writer: capped per key like an agent, but apart from the agent's own
            # connections, so whoever holds a token cannot lock the agent out.
            counted = YJS_KEY + token.agent
            refusal = node.limiter.connect(counted)
            if refusal is not None:
                node.metrics.rate_limited["connections"] += 1
                counted = None
                raise refusal
        live = await node.open_doc(ns, name)
        node.access.check_read(ns, token.agent if token else None)  # (changed meanwhile?)
    except BaseException as exc:
        if counted is not None:
            node.limiter.disconnect(counted)
        if not isinstance(exc, ProtocolError):
            raise
        await ws.aclose(POLICY_CLOSE, _reason(exc))
        return
    reader = token.agent if token else None

    def may_read() -> None:
        node.access.check_read(ns, reader)

    replica = Replica(capacity=4 * node.config.send_queue)
    live.sync(b"", replica)  # registers it: every later commit is queued for it
    written_tx, written_rx = trio.open_memory_channel[Ticket](node.config.max_inflight)
    try:
        with unwrap_single():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send, ws, live, replica, may_read)
                nursery.start_soon(_confirm, node, written_rx)
                if token is not None:
                    nursery.start_soon(_expire, node, token)
                await _receive(node, ws, live, replica, ns, name, token, written_tx, may_read)
                nursery.cancel_scope.cancel()
    except ProtocolError as exc:
        await ws.aclose(POLICY_CLOSE, _reason(exc))
    except Overflow:
        await ws.aclose(TRY_AGAIN_CLOSE, f"{int(ErrorCode.DOC_RESYNC)} doc_resync")
    except ConnectionClosed:
        pass
    finally:
        live.leave(replica)
        if counted is not None:
            node.limiter.disconnect(counted)


def _route(path: str, node: RelayNode) -> tuple[str, str, doctoken.DocToken | None]:
    parts = urlsplit(path)
    segments = parts.path[len(PREFIX) :].split("/")
    if len(segments) != 2:
        raise ProtocolError(ErrorCode.MALFORMED, "the path is /yjs/<namespace>/<document>")
    ns, name = (unquote(segment) for segment in segments)
    params = parse_qs(parts.query)
    tokens, secret = params.get("token", []), params.get("secret", [None])[0]
    token = None
    if tokens:
        token = doctoken.check(tokens[0], ns, name, node.wall_ms(), secret)  # its clock
        if not token.bound and not node.config.doc_bearer_tokens:
            reason = (
                "bearer document tokens are refused here (the log shows them to every"
                " reader): mint a bound one with formicary doc token"
            )
            raise ProtocolError(ErrorCode.AUTH_FAILED, reason)
    return ns, name, token


async def _send(
    ws: ServerConnection, live: LiveDoc, replica: Replica, may_read: Callable[[], None]
) -> None:
    """The document to the client; ``may_read`` raises once it may read no more."""
    await ws.send(create_sync_message(live.doc))
    states = live.awareness_states()
    if states is not None:
        await ws.send(create_awareness_message(states))
    item: Record | bytes | None = await replica.next()
    while True:
        may_read()  # a policy may have taken the reader off the list meanwhile
        if isinstance(item, bytes):
            await ws.send(create_awareness_message(item))
            item = await replica.next()
            continue
        # Updates queued together go as one merged update: one message, not many,
        # and not past about one update's bound (256 of them could make 64 MiB).
        assert item is not None
        updates = [_update_of(item.event)]
        size = len(updates[0])
        item = replica.next_nowait()
        while (
            item is not None
            and not isinstance(item, bytes)
            and size < MAX_UPDATE
            and len(updates) < 256
        ):
            updates.append(_update_of(item.event))
            size += len(updates[-1])
            item = replica.next_nowait()
        merged = updates[0] if len(updates) == 1 else merge_updates(*updates)
        await ws.send(create_update_message(merged))
        if item is None:
            item = await replica.next()


async def _receive(
    node: RelayNode,
    ws: ServerConnection,
    live: LiveDoc,
    replica: Replica,
    ns: str,
    name: str,
    token: doctoken.DocToken | None,
    written: trio.MemorySendChannel[Ticket],
    may_read: Callable[[], None],
) -> None:
    """The client's messages. What it asks for (its missing updates, awareness) is
    answered only while it may still read: a policy may have taken it off the list
    since :func:`_send` last looked."""
    syncs = TokenBucket.full(SYNC_RATE, SYNC_BURST)

    def charge_sync() -> None:
        if syncs.take(trio.current_time()):
            reason = f"over {SYNC_RATE:g} sync messages a second that write nothing"
            raise ProtocolError(ErrorCode.RATE_LIMITED, reason)

    while True:
        # recv(), not `async for`: an error raised out of the loop must not leave a
        # half-finished async generator behind.
        message = await ws.recv()
        if isinstance(message, str) or not message:
            raise ProtocolError(ErrorCode.MALFORMED, "y-websocket messages are binary")
        kind, payload = message[0], message[1:]
        if kind == YMessageType.SYNC and payload:
            step, data = payload[0], _read(payload[1:])
            if step == YSyncMessageType.SYNC_STEP1:
                charge_sync()
                may_read()
                missing = live.missing(data)
                step2 = bytes([YMessageType.SYNC, YSyncMessageType.SYNC_STEP2])
                await ws.send(step2 + write_message(missing))
            elif data != EMPTY_UPDATE:
                if token is None:
                    charge_sync()
                    # Over MAX_UPDATE it could not be written anyway: not decoded.
                    if len(data) > MAX_UPDATE or _adds_nothing(data, live):
                        continue  # a reader's step 2: its delete set, nothing new
                    raise ProtocolError(ErrorCode.WRONG_AUTHOR, "read-only: connect with ?token=")
                if step == YSyncMessageType.SYNC_STEP2 and changes_nothing(data, live):
                    charge_sync()
                    continue  # a writer's step 2 with no edit: not written
                # Charged to the token's agent, as its own publishes are.
                try:
                    cost = publish_cost(len(data) + 256)  # (the event around it)
                    node.limiter.check(token.agent, "publish", trio.current_time(), cost)
                except ProtocolError:
                    node.metrics.rate_limited["publish"] += 1
                    raise
                await written.send(await _write(node, ns, name, data, token))
        elif kind == YMessageType.AWARENESS:
            update = _read(payload)
            may_read()
            if len(update) <= MAX_AWARENESS:
                # Charged once it is known to be this client's own presence: y-websocket
                # sends back every state it is sent, and those echoes (refused) must not
                # use up the allowance its own updates need.
                charge = partial(replica.take_awareness_token, trio.current_time())
                try:
                    live.share_awareness(update, replica, charge)
                except ProtocolError:
                    pass  # a bad presence update is dropped; y-websocket has no error reply
        elif kind == 3:  # query awareness
            charge_sync()  # one byte asks for every state: ~30,000x uncharged
            may_read()
            states = live.awareness_states()
            if states is not None:
                await ws.send(create_awareness_message(states))


async def _write(
    node: RelayNode, ns: str, name: str, update: bytes, token: doctoken.DocToken
) -> Ticket:
    """Write a plain client's update as the relay's event, carrying its token.

    Not awaited here: the client's next message is read while this one commits
    (:func:`_confirm` follows the answers, in order).
    """
    body = {"doc": name, "update": update, "token": token.raw}
    event = Event(
        ns=ns,
        kind="doc.update",
        author=node.identity.public_key,
        body=body,
        ts=node.wall_ms(),
        nonce=secrets.token_bytes(8),  # the same update twice is two writes, not one
    )
    return await node.admit(sign_event(event, node.identity.sign))


async def _expire(node: RelayNode, token: doctoken.DocToken) -> None:
    """End the connection when its token expires: a token allows until ``exp``."""
    await trio.sleep(max(0, token.exp - node.wall_ms()) / 1000)
    raise ProtocolError(ErrorCode.AUTH_FAILED, "the token has expired")


async def _confirm(node: RelayNode, written: trio.MemoryReceiveChannel[Ticket]) -> None:
    """Wait for each write's commit in order; a refused one ends the connection."""
    async for ticket in written:
        await node.answer(ticket)  # raises ProtocolError: the connection is closed with it


def _adds_nothing(update: bytes, live: LiveDoc) -> bool:
    """Whether ``update`` holds no item the document lacks (a Yjs step 2 always carries
    the sender's whole delete set, so a reader's reply is rarely empty)."""
    try:
        check_shape(update)  # before pycrdt decodes it
        theirs = state_vector(yjs(get_state, update))
    except Exception:
        return False
    ours = state_vector(live.doc.get_state())
    return all(clock <= ours.get(client, 0) for client, clock in theirs.items())


def _read(data: bytes) -> bytes:
    """The length-prefixed payload of a message; refused when it is cut short.

    Its length is read as a lib0 varuint of at most 64 bits: pycrdt's ``Decoder``
    reads any number of continuation bytes into one growing int, so a message of
    2 MiB of ``ff`` bytes held the relay's loop for minutes (quadratic)."""
    try:
        length, at = varuint(data, 0)
    except (IndexError, ValueError):
        raise ProtocolError(ErrorCode.MALFORMED, "a y-websocket message ends early") from None
    message = data[at : at + length]
    if len(message) != length:
        raise ProtocolError(ErrorCode.MALFORMED, "a y-websocket message ends early")
    return message


def _update_of(event: bytes) -> bytes:
    from agent_sdk.wire import decode

    update: bytes = decode(event)["body"]["update"]
    return update


def _reason(exc: ProtocolError) -> str:
    """A close reason: the code, its name and the reason, within 123 bytes."""
    text = f"{int(exc.code)} {exc.code.slug}: {exc.reason}"
    return text.encode()[:123].decode(errors="ignore")
