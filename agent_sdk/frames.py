"""Connection frames: the messages an agent and a relay exchange (pure: no I/O).

Each frame is one binary WebSocket message holding a msgpack map whose ``t`` field
names the frame type. Frames are frozen dataclasses behind the :data:`Frame` alias;
:func:`encode_frame` and :func:`decode_frame` are the only way between bytes and
frames. Events and receipts ride inside frames as canonical *bytes* (``bin``), never
as nested maps, so a signature is always checked over the bytes that were signed.

Connection shape (docs/protocol.md, "Connection")::

    relay -> hello(challenge)      agent -> auth(key, sig, challenge)
    relay -> welcome(sig)          ...then publish/ack, subscribe/event/live, unsubscribe
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.wire import decode

AGENT_AUTH_DOMAIN = b"formicary/v1/agent-auth\x00"
RELAY_AUTH_DOMAIN = b"formicary/v1/relay-auth\x00"
CHALLENGE_SIZE = 32


def agent_auth_message(relay_key: bytes, challenge: bytes) -> bytes:
    """What an agent signs to prove its key: bound to this relay and this challenge."""
    return AGENT_AUTH_DOMAIN + relay_key + challenge


def relay_auth_message(agent_key: bytes, challenge: bytes) -> bytes:
    """What a relay signs to prove its key to the agent that sent ``challenge``."""
    return RELAY_AUTH_DOMAIN + agent_key + challenge


# --------------------------------------------------------------------------- agent -> relay


@dataclass(frozen=True, slots=True)
class Auth:
    """Proof of the agent's key, and a challenge of its own for the relay to sign."""

    t: ClassVar[str] = "auth"
    key: bytes
    sig: bytes
    challenge: bytes


@dataclass(frozen=True, slots=True)
class Publish:
    """Sequence this event. ``rid`` is the agent's request id, echoed in the answer."""

    t: ClassVar[str] = "publish"
    rid: int
    event: bytes
    sig: bytes


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Stream the namespaces ``ns``, from ``start[ns]`` (a seq) or from now when absent.

    ``kinds`` and ``authors`` filter (an empty tuple means all); a kind ending in
    ``.*`` matches its whole family. On the wire ``start`` is the field ``from``.
    """

    t: ClassVar[str] = "subscribe"
    sub: int
    ns: tuple[str, ...]
    start: dict[str, int] = dataclasses.field(default_factory=dict)
    kinds: tuple[str, ...] = ()
    authors: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    t: ClassVar[str] = "unsubscribe"
    sub: int


# --------------------------------------------------------------------------- relay -> agent


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame of every connection: who the relay is, its limits, a challenge."""

    t: ClassVar[str] = "hello"
    v: int
    relay: bytes
    name: str
    challenge: bytes
    max_frame: int
    max_deps: int


@dataclass(frozen=True, slots=True)
class Welcome:
    """Authentication succeeded; ``sig`` proves the relay's key to the agent."""

    t: ClassVar[str] = "welcome"
    agent: bytes
    sig: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    """The event of request ``rid`` is durably sequenced: here is its receipt.

    ``seal`` is set when the receipt is a chain head the relay signed. ``duplicate``
    says the event had been sequenced before (the receipt is the original one).
    """

    t: ClassVar[str] = "ack"
    rid: int
    receipt: bytes
    seal: bytes | None = None
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Error:
    """A request failed (``rid``), a subscription ended (``sub``), or the connection did."""

    t: ClassVar[str] = "error"
    code: int
    name: str
    reason: str
    rid: int | None = None
    sub: int | None = None

    @classmethod
    def of(cls, exc: ProtocolError, *, rid: int | None = None, sub: int | None = None) -> Error:
        return cls(code=int(exc.code), name=exc.code.slug, reason=exc.reason, rid=rid, sub=sub)


@dataclass(frozen=True, slots=True)
class EventFrame:
    """One sequenced event for subscription ``sub``, with its receipt (and seal)."""

    t: ClassVar[str] = "event"
    sub: int
    event: bytes
    sig: bytes
    receipt: bytes
    seal: bytes | None = None


@dataclass(frozen=True, slots=True)
class Live:
    """Subscription ``sub`` has replayed namespace ``ns`` up to ``seq``; live from here."""

    t: ClassVar[str] = "live"
    sub: int
    ns: str
    seq: int


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    t: ClassVar[str] = "unsubscribed"
    sub: int


AgentFrame = Auth | Publish | Subscribe | Unsubscribe
RelayFrame = Hello | Welcome | Ack | Error | EventFrame | Live | Unsubscribed
Frame = AgentFrame | RelayFrame

_TYPES: dict[str, type[Any]] = {
    cls.t: cls
    for cls in (
        Auth,
        Publish,
        Subscribe,
        Unsubscribe,
        Hello,
        Welcome,
        Ack,
        Error,
        EventFrame,
        Live,
        Unsubscribed,
    )
}

# Wire names that differ from attribute names ("from" is a Python keyword).
_WIRE_NAME = {"start": "from"}

# What each field may hold on the wire; ``None`` is allowed only for optional fields.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "bytes": (bytes,),
    "bytes | None": (bytes, type(None)),
    "int": (int,),
    "int | None": (int, type(None)),
    "str": (str,),
    "bool": (bool,),
}


def encode_frame(frame: Frame) -> bytes:
    """Encode a frame as a msgpack map; ``None`` fields are left out."""
    fields: dict[str, Any] = {"t": frame.t}
    for field in dataclasses.fields(frame):
        value = getattr(frame, field.name)
        if value is not None:
            fields[_WIRE_NAME.get(field.name, field.name)] = value
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


def _convert(frame_type: str, name: str, annotation: str, value: Any) -> Any:
    """Check one wire field against its annotation; tuples arrive as lists."""
    bad = ProtocolError(ErrorCode.MALFORMED, f"{frame_type}.{name}: expected {annotation}")
    simple = _FIELD_TYPES.get(annotation)
    if simple is not None:
        is_bool = isinstance(value, bool)
        if not isinstance(value, simple) or (is_bool and annotation.startswith("int")):
            raise bad
        return value
    if annotation.startswith("tuple["):
        item_type = str if "str" in annotation else bytes
        if not isinstance(value, list) or not all(isinstance(i, item_type) for i in value):
            raise bad
        return tuple(value)
    if annotation == "dict[str, int]":
        ok = isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in value.items()
        )
        if not ok:
            raise bad
        return value
    raise AssertionError(f"no wire rule for {annotation}")  # our bug, not their input


def decode_frame(data: bytes) -> Frame:
    """Decode one frame; raise :class:`ProtocolError` (``MALFORMED``, ``UNKNOWN_FRAME``)."""
    fields = decode(data)
    if not isinstance(fields, dict) or not isinstance(fields.get("t"), str):
        raise ProtocolError(ErrorCode.MALFORMED, "a frame is a map with a string field t")
    frame_type = fields["t"]
    cls = _TYPES.get(frame_type)
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_FRAME, f"unknown frame type {frame_type!r}")
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        wire_name = _WIRE_NAME.get(field.name, field.name)
        if wire_name not in fields:
            no_default = (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            )
            if no_default:
                raise ProtocolError(ErrorCode.MALFORMED, f"{frame_type}: missing {wire_name}")
            continue
        kwargs[field.name] = _convert(frame_type, wire_name, str(field.type), fields[wire_name])
    frame: Frame = cls(**kwargs)
    return frame
