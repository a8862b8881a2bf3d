"""One agent connection as the relay sees it (pure: bytes in, actions out).

The connection's life is the table :data:`TRANSITIONS`: a new connection awaits
``auth``; once authenticated it may publish, subscribe, unsubscribe, query and open
documents. A frame not allowed in the current state is answered with an ``error``
frame and changes nothing — remote input never raises into the I/O loop (STYLE.md, habit 5).

Everything the relay can decide without its shared state happens here, cheapest
first: frame size, msgpack, frame shape, event shape and canonical bytes, author,
and last the Ed25519 signature — so bad input costs as little as it can.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from agent_sdk import frames as f
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.sealing import Receipt, Sealed, Unsealable
from agent_sdk.wire import (
    MAX_DEPTH,
    PROTOCOL_VERSION,
    SignedEvent,
    Signer,
    decode_event,
    verify_signature,
)
from relay.limits import publish_cost

log = logging.getLogger("formicary.relay")

CHARGED = (f.Publish, f.Query, f.MsgSend, f.MsgConfirm, f.Subscribe, f.DocOpen)
"""Frames charged to the agent's rate limits: a publish, or a request (all the others:
each costs the relay a check, a replay or a write). ``msg.inbox`` is charged as its
stream starts, which waits for a token rather than refusing (relay/messaging.py).
``msg.ack`` is not: acks follow from messages received, and a receipt is only checked
for an item that exists."""


class State(enum.Enum):
    AWAITING_AUTH = "awaiting_auth"
    OPEN = "open"


TRANSITIONS: dict[tuple[State, type[f.AgentFrame]], State] = {
    (State.AWAITING_AUTH, f.Auth): State.OPEN,
    (State.OPEN, f.Publish): State.OPEN,
    (State.OPEN, f.Subscribe): State.OPEN,
    (State.OPEN, f.Unsubscribe): State.OPEN,
    (State.OPEN, f.Query): State.OPEN,
    (State.OPEN, f.DocOpen): State.OPEN,
    (State.OPEN, f.DocAwareness): State.OPEN,
    (State.OPEN, f.MsgSend): State.OPEN,
    (State.OPEN, f.MsgReceipt): State.OPEN,
    (State.OPEN, f.MsgInbox): State.OPEN,
    (State.OPEN, f.MsgAck): State.OPEN,
    (State.OPEN, f.MsgConfirm): State.OPEN,
}

_REFUSALS: dict[State, tuple[ErrorCode, str]] = {
    State.AWAITING_AUTH: (ErrorCode.NOT_AUTHENTICATED, "send auth first"),
    State.OPEN: (ErrorCode.ALREADY_AUTHENTICATED, "this connection is authenticated"),
}


@dataclass(frozen=True, slots=True)
class Reply:
    """Send this frame back to the agent."""

    frame: f.RelayFrame


@dataclass(frozen=True, slots=True)
class Admit:
    """An event to sequence; answer request ``rid`` with its outcome.

    ``verified`` is false only from a session made with ``verify_events=False``: the
    caller must check the signature before it acts (relay/signatures.py), and answer
    a bad one with ``bad_signature``.
    """

    rid: int
    event: SignedEvent
    verified: bool = True


@dataclass(frozen=True, slots=True)
class Open:
    """Start subscription ``request``."""

    request: f.Subscribe


@dataclass(frozen=True, slots=True)
class Close:
    """Stop subscription ``sub``."""

    sub: int


@dataclass(frozen=True, slots=True)
class Ask:
    """Answer a query."""

    query: f.Query


@dataclass(frozen=True, slots=True)
class OpenDoc:
    """Open a document subscription."""

    request: f.DocOpen


@dataclass(frozen=True, slots=True)
class Aware:
    """Share an awareness update on an open document."""

    frame: f.DocAwareness


@dataclass(frozen=True, slots=True)
class Mail:
    """A sealed message whose sender is this connection's agent (or, from a peer
    relay, anyone) and whose signature checks: deliver it."""

    rid: int
    sealed: Sealed
    relay: str
    """The recipient's relay ("" for this one)."""
    origin: str
    """The sender's relay when a peer relay passed the message on, else ""."""
    msg: bytes


@dataclass(frozen=True, slots=True)
class PassReceipt:
    """From a peer relay: a checked receipt for the sender, an agent of ``relay``."""

    rid: int
    receipt: Receipt
    relay: str


@dataclass(frozen=True, slots=True)
class OpenInbox:
    sub: int


@dataclass(frozen=True, slots=True)
class AckItem:
    """Inbox item ``seq`` arrived; ``receipt`` is the agent's own, checked."""

    sub: int
    seq: int
    receipt: Receipt | None


@dataclass(frozen=True, slots=True)
class Confirm:
    """Answer ``rid`` once the acknowledgements before it are applied."""

    rid: int


Action = (
    Reply
    | Admit
    | Open
    | Close
    | Ask
    | OpenDoc
    | Aware
    | Mail
    | PassReceipt
    | OpenInbox
    | AckItem
    | Confirm
)


class Session:
    """The relay side of one connection, before any shared state is touched."""

    def __init__(
        self,
        *,
        relay_key: bytes,
        relay_name: str,
        signer: Signer,
        challenge: bytes,
        max_frame: int,
        max_deps: int,
        max_message: int = 256 << 10,
        forwarders: frozenset[bytes] = frozenset(),
        charge: Callable[[str, int], None] = lambda what, cost: None,
        verify_events: bool = True,
    ) -> None:
        self.relay_key = relay_key
        self.verify_events = verify_events
        """False: publishes come out unverified (``Admit.verified``), for the caller to
        check off the event loop in batches."""
        self.max_message = max_message
        self.charge = charge
        """Charges a ``publish`` or a ``request`` to this agent; raises ``rate_limited``
        (relay/limits.py; the caller knows the agent and the clock)."""
        self.forwarders = forwarders
        """Keys of peer relays: their connections carry other authors' events."""
        self.signer = signer
        self.challenge = challenge
        self.max_frame = max_frame
        self.max_deps = max_deps
        self.state = State.AWAITING_AUTH
        self.agent: bytes | None = None
        self.hello = f.Hello(
            v=PROTOCOL_VERSION,
            relay=relay_key,
            name=relay_name,
            challenge=challenge,
            max_frame=max_frame,
            max_deps=max_deps,
        )

    def receive(self, data: bytes) -> Iterator[Action]:
        """Decide what one received message (a frame or a bundle) means, frame by frame.

        Lazily: the caller may pause between frames of a big bundle. Never raises for
        remote input: each bad frame becomes an error reply.
        """
        if len(data) > self.max_frame:
            reason = f"message of {len(data)} bytes; limit is {self.max_frame}"
            return iter([_error(ProtocolError(ErrorCode.FRAME_TOO_LARGE, reason))])
        frames = f.decode_message(data, f.MAX_BUNDLE, MAX_DEPTH)
        return (self._act(item) for item in frames)

    def _act(self, frame: f.Frame | ProtocolError) -> Action:
        if isinstance(frame, ProtocolError):
            return _error(frame)
        requests = (f.Publish, f.Query, f.MsgSend, f.MsgReceipt, f.MsgConfirm)
        rid = frame.rid if isinstance(frame, requests) else None
        subscribing = (
            f.Subscribe, f.Unsubscribe, f.DocOpen, f.DocAwareness, f.MsgInbox, f.MsgAck,
        )  # fmt: skip
        sub = frame.sub if isinstance(frame, subscribing) else None
        try:
            return self._handle(frame)
        except ProtocolError as exc:
            return _error(exc, rid=rid, sub=sub)
        except Exception:  # our bug on a crafted frame: answer it, keep the connection
            log.exception("a %s frame could not be handled", frame.t)
            failed = ProtocolError(ErrorCode.INTERNAL, f"the relay could not handle this {frame.t}")
            return _error(failed, rid=rid, sub=sub)

    def _handle(self, frame: f.Frame) -> Action:
        new_state = TRANSITIONS.get((self.state, type(frame)))  # type: ignore[arg-type]
        if new_state is None:
            if not isinstance(frame, f.AgentFrame):
                raise ProtocolError(ErrorCode.UNKNOWN_FRAME, f"{frame.t} is sent by relays")
            code, reason = _REFUSALS[self.state]
            raise ProtocolError(code, f"{frame.t} not allowed: {reason}")
        if isinstance(frame, CHARGED):
            # Charged before anything costly (a signature check, a replay): a flood
            # costs little.
            if isinstance(frame, f.Publish):
                self.charge("publish", publish_cost(len(frame.event)))
            else:
                self.charge("request", 1)
        if isinstance(frame, f.Auth):
            action: Action = self._auth(frame)
        elif isinstance(frame, f.Publish):
            action = Admit(frame.rid, self._verified(frame), self.verify_events)
        elif isinstance(frame, f.Subscribe):
            action = Open(frame)
        elif isinstance(frame, f.Query):
            action = Ask(frame)
        elif isinstance(frame, f.DocOpen):
            action = OpenDoc(frame)
        elif isinstance(frame, f.DocAwareness):
            action = Aware(frame)
        elif isinstance(frame, f.MsgSend):
            from_relay = self.agent in self.forwarders
            origin = frame.origin if from_relay else ""
            action = Mail(frame.rid, self._sealed(frame), frame.relay, origin, frame.msg)
        elif isinstance(frame, f.MsgReceipt):
            action = PassReceipt(frame.rid, self._passed_receipt(frame), frame.relay)
        elif isinstance(frame, f.MsgInbox):
            action = OpenInbox(frame.sub)
        elif isinstance(frame, f.MsgAck):
            action = AckItem(frame.sub, frame.seq, self._receipt(frame))
        elif isinstance(frame, f.MsgConfirm):
            action = Confirm(frame.rid)
        else:
            assert isinstance(frame, f.Unsubscribe)
            action = Close(frame.sub)
        self.state = new_state
        return action

    def _auth(self, frame: f.Auth) -> Reply:
        # The free check first: a bad challenge must not buy a signature check, which
        # refusals that are not auth_failed would let a client repeat without end.
        if len(frame.challenge) != f.CHALLENGE_SIZE:
            raise ProtocolError(ErrorCode.MALFORMED, f"challenge must be {f.CHALLENGE_SIZE} bytes")
        message = f.agent_auth_message(self.relay_key, self.challenge)
        if not verify_signature(frame.key, frame.sig, message):
            raise ProtocolError(ErrorCode.AUTH_FAILED, "signature does not verify for this key")
        self.agent = frame.key
        sig = self.signer(f.relay_auth_message(frame.key, frame.challenge))
        return Reply(f.Welcome(agent=frame.key, sig=sig))

    def _verified(self, frame: f.Publish) -> SignedEvent:
        signed = decode_event(frame.event, frame.sig, max_deps=self.max_deps, max_depth=MAX_DEPTH)
        if signed.event.author != self.agent and self.agent not in self.forwarders:
            raise ProtocolError(
                ErrorCode.WRONG_AUTHOR,
                "event author is not the key this connection proved"
                " (a relay forwarding others' events must be a listed peer here)",
            )
        if self.verify_events and not signed.verify():
            raise bad_signature()
        return signed

    def _sealed(self, frame: f.MsgSend) -> Sealed:
        if len(frame.msg) > self.max_message:
            reason = f"sealed message of {len(frame.msg)} bytes; limit is {self.max_message}"
            raise ProtocolError(ErrorCode.MESSAGE_TOO_LARGE, reason)
        try:
            sealed = Sealed.decode(frame.msg)
            if sealed.header.sender != self.agent and self.agent not in self.forwarders:
                raise Unsealable("the message's sender is not the key this connection proved")
            sealed.verify()
        except Unsealable as exc:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, str(exc)) from None
        return sealed

    def _receipt(self, frame: f.MsgAck) -> Receipt | None:
        if frame.receipt is None:
            return None
        try:
            receipt = Receipt.decode(frame.receipt)
            if receipt.recipient != self.agent:
                raise Unsealable("a receipt is signed by the recipient: this connection's agent")
            # Its signature is checked with the item it acknowledges (relay/messaging.py):
            # an ack of nothing costs no check.
        except Unsealable as exc:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, str(exc)) from None
        return receipt

    def _passed_receipt(self, frame: f.MsgReceipt) -> Receipt:
        if self.agent not in self.forwarders:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "msg.receipt is sent by peer relays only")
        try:
            receipt = Receipt.decode(frame.receipt)
            receipt.verify()
        except Unsealable as exc:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, str(exc)) from None
        return receipt


def bad_signature() -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_SIGNATURE, "signature does not verify for author")


def _error(exc: ProtocolError, *, rid: int | None = None, sub: int | None = None) -> Reply:
    return Reply(f.Error.of(exc, rid=rid, sub=sub))
