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
from collections.abc import Iterator
from dataclasses import dataclass

from agent_sdk import frames as f
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.wire import PROTOCOL_VERSION, SignedEvent, Signer, decode_event, verify_signature


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
    """A verified event to sequence; answer request ``rid`` with its outcome."""

    rid: int
    event: SignedEvent


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


Action = Reply | Admit | Open | Close | Ask | OpenDoc | Aware


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
        forwarders: frozenset[bytes] = frozenset(),
    ) -> None:
        self.relay_key = relay_key
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
        return (self._act(item) for item in f.decode_message(data))

    def _act(self, frame: f.Frame | ProtocolError) -> Action:
        if isinstance(frame, ProtocolError):
            return _error(frame)
        rid = frame.rid if isinstance(frame, (f.Publish, f.Query)) else None
        subscribing = (f.Subscribe, f.Unsubscribe, f.DocOpen, f.DocAwareness)
        sub = frame.sub if isinstance(frame, subscribing) else None
        try:
            return self._handle(frame)
        except ProtocolError as exc:
            return _error(exc, rid=rid, sub=sub)

    def _handle(self, frame: f.Frame) -> Action:
        new_state = TRANSITIONS.get((self.state, type(frame)))  # type: ignore[arg-type]
        if new_state is None:
            if not isinstance(frame, f.AgentFrame):
                raise ProtocolError(ErrorCode.UNKNOWN_FRAME, f"{frame.t} is sent by relays")
            code, reason = _REFUSALS[self.state]
            raise ProtocolError(code, f"{frame.t} not allowed: {reason}")
        if isinstance(frame, f.Auth):
            action: Action = self._auth(frame)
        elif isinstance(frame, f.Publish):
            action = Admit(frame.rid, self._verified(frame))
        elif isinstance(frame, f.Subscribe):
            action = Open(frame)
        elif isinstance(frame, f.Query):
            action = Ask(frame)
        elif isinstance(frame, f.DocOpen):
            action = OpenDoc(frame)
        elif isinstance(frame, f.DocAwareness):
            action = Aware(frame)
        else:
            assert isinstance(frame, f.Unsubscribe)
            action = Close(frame.sub)
        self.state = new_state
        return action

    def _auth(self, frame: f.Auth) -> Reply:
        message = f.agent_auth_message(self.relay_key, self.challenge)
        if not verify_signature(frame.key, frame.sig, message):
            raise ProtocolError(ErrorCode.AUTH_FAILED, "signature does not verify for this key")
        if len(frame.challenge) != f.CHALLENGE_SIZE:
            raise ProtocolError(ErrorCode.MALFORMED, f"challenge must be {f.CHALLENGE_SIZE} bytes")
        self.agent = frame.key
        sig = self.signer(f.relay_auth_message(frame.key, frame.challenge))
        return Reply(f.Welcome(agent=frame.key, sig=sig))

    def _verified(self, frame: f.Publish) -> SignedEvent:
        signed = decode_event(frame.event, frame.sig, max_deps=self.max_deps)
        if signed.event.author != self.agent and self.agent not in self.forwarders:
            raise ProtocolError(
                ErrorCode.WRONG_AUTHOR,
                "event author is not the key this connection proved"
                " (a relay forwarding others' events must be a listed peer here)",
            )
        if not signed.verify():
            raise ProtocolError(ErrorCode.BAD_SIGNATURE, "signature does not verify for author")
        return signed


def _error(exc: ProtocolError, *, rid: int | None = None, sub: int | None = None) -> Reply:
    return Reply(f.Error.of(exc, rid=rid, sub=sub))
