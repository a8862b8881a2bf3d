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
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.wire import container_heads, nests_over

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


@dataclass(frozen=True, slots=True)
class DocOpen:
    """Open document ``doc`` of ``ns`` as subscription ``sub`` (y-sync step 1).

    ``sv`` is the agent's state vector (empty for a new replica); ``epoch`` the
    document incarnation the replica was built from, when it has one.
    """

    t: ClassVar[str] = "doc.open"
    sub: int
    ns: str
    doc: str
    sv: bytes = b""
    epoch: int | None = None
    agent: bytes | None = None
    """Set only by a relay passing the request on: the agent it asks for (the home
    checks that agent's read access too; from an agent connection it is ignored)."""


@dataclass(frozen=True, slots=True)
class DocAwareness:
    """An awareness update (y-protocols awareness encoding) for open document ``sub``;
    the relay forwards it to the document's other replicas, never stores it."""

    t: ClassVar[str] = "doc.awareness"
    sub: int
    update: bytes


@dataclass(frozen=True, slots=True)
class Query:
    """Ask about a namespace's coordination state (``wo.list``, ``context.pull``, ...).

    ``rid`` shares its numbering with publishes: the answer is a ``result`` or an
    ``error`` with the same ``rid``.
    """

    t: ClassVar[str] = "query"
    rid: int
    ns: str
    q: str
    args: dict[str, Any] = dataclasses.field(default_factory=dict)
    agent: bytes | None = None
    """Set only by a relay passing the query on: the agent it asks for."""


@dataclass(frozen=True, slots=True)
class MsgSend:
    """Deliver sealed message ``msg`` (agent_sdk/sealing.py) to its recipient, an agent
    of relay ``relay`` ("" for this one). Answered with a ``result`` whose body is
    ``{"id": message id, "status": "stored" | "delivered"}``, or an ``error``."""

    t: ClassVar[str] = "msg.send"
    rid: int
    msg: bytes
    relay: str = ""
    origin: str = ""
    """Set by a relay passing the message on: the sender's relay, where the receipt
    goes back to. Ignored from agents."""


@dataclass(frozen=True, slots=True)
class MsgReceipt:
    """Between relays only: put ``receipt`` (a recipient's signed receipt) in the
    inbox of the message's sender, an agent of relay ``relay``. Answered with an
    empty ``result``."""

    t: ClassVar[str] = "msg.receipt"
    rid: int
    receipt: bytes
    relay: str


@dataclass(frozen=True, slots=True)
class MsgInbox:
    """Open this agent's inbox as subscription ``sub``: every item not acknowledged,
    oldest first, then new ones as they come (``msg`` frames). One stream per agent:
    opening it again elsewhere ends the older one."""

    t: ClassVar[str] = "msg.inbox"
    sub: int


@dataclass(frozen=True, slots=True)
class MsgAck:
    """Inbox item ``seq`` of stream ``sub`` has reached the agent: delete it. For a
    message, ``receipt`` is the agent's signed receipt, passed on to the sender."""

    t: ClassVar[str] = "msg.ack"
    sub: int
    seq: int
    receipt: bytes | None = None


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
    says the event had been sequenced before (the receipt is the original one). For a
    coordination request (``wo.claim``, ...) the relay's outcome event comes along:
    ``outcome`` (its bytes), ``outcome_sig`` and ``outcome_receipt``; on a peer
    connection also ``outcome_seal``, the home's seal of that receipt (14.4).
    """

    t: ClassVar[str] = "ack"
    rid: int
    receipt: bytes
    seal: bytes | None = None
    duplicate: bool = False
    outcome: bytes | None = None
    outcome_sig: bytes | None = None
    outcome_receipt: bytes | None = None
    outcome_seal: bytes | None = None


@dataclass(frozen=True, slots=True)
class Queued:
    """The publish ``rid`` is for a namespace homed on another relay that this relay
    cannot reach now: it is stored in this relay's outbox and will be forwarded in
    order. Its ``ack`` (or error) follows once the home relay has answered."""

    t: ClassVar[str] = "queued"
    rid: int


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
    mark: bytes | None = None
    """To a peer relay, with a record compaction pruned: the home's pruned mark."""


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


@dataclass(frozen=True, slots=True)
class DocSync:
    """The answer to ``doc.open`` (y-sync step 2): ``update`` holds what the replica's
    state vector lacks, as of log position ``seq``; ``sv`` is the relay's state vector,
    so the replica can send what the relay lacks. ``event`` frames of later
    ``doc.update`` events follow, in log order. ``reset`` says the replica's epoch is
    not the document's: drop the replica and open the document again from nothing.
    """

    t: ClassVar[str] = "doc.sync"
    sub: int
    update: bytes
    sv: bytes
    seq: int
    epoch: int
    reset: bool = False


@dataclass(frozen=True, slots=True)
class Result:
    """The answer to query ``rid``: a msgpack value whose shape the query defines."""

    t: ClassVar[str] = "result"
    rid: int
    body: Any


@dataclass(frozen=True, slots=True)
class MsgItem:
    """An inbox item of stream ``sub``: ``kind`` ``message`` (``data``: the sealed
    message), ``receipt`` (``data``: the recipient's signed receipt for a message this
    agent sent) or ``expired`` (``data``: the id of a message of this agent's that
    expired undelivered)."""

    t: ClassVar[str] = "msg"
    sub: int
    seq: int
    kind: str
    data: bytes


@dataclass(frozen=True, slots=True)
class MsgConfirm:
    """Answer ``result`` (an empty body) once every ``msg.ack`` sent before this frame
    on this connection is applied: what a client waits for before it closes, so that
    a reader it starts next is not sent those items again."""

    t: ClassVar[str] = "msg.confirm"
    rid: int


AgentFrame = (
    Auth
    | Publish
    | Subscribe
    | Unsubscribe
    | Query
    | DocOpen
    | DocAwareness
    | MsgSend
    | MsgReceipt
    | MsgInbox
    | MsgAck
    | MsgConfirm
)
RelayFrame = (
    Hello
    | Welcome
    | Ack
    | Queued
    | Error
    | EventFrame
    | Live
    | Unsubscribed
    | Result
    | DocSync
    | DocAwareness
    | MsgItem
)
Frame = AgentFrame | RelayFrame

_TYPES: dict[str, type[Any]] = {
    cls.t: cls
    for cls in (
        Auth,
        Publish,
        Subscribe,
        Unsubscribe,
        Query,
        DocOpen,
        DocAwareness,
        DocSync,
        Hello,
        Welcome,
        Ack,
        Queued,
        Error,
        EventFrame,
        Live,
        Unsubscribed,
        Result,
        MsgSend,
        MsgReceipt,
        MsgInbox,
        MsgAck,
        MsgConfirm,
        MsgItem,
    )
}

# Wire names that differ from attribute names ("from" is a Python keyword).
_WIRE_NAME = {"start": "from"}


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int subclass, and not an integer here


def _checker(annotation: str) -> Callable[[Any], bool]:
    """What a wire value must satisfy for a field annotated ``annotation``."""
    rules: dict[str, Callable[[Any], bool]] = {
        "bytes": lambda v: type(v) is bytes,
        "bytes | None": lambda v: v is None or type(v) is bytes,
        "int": _is_int,
        "int | None": lambda v: v is None or _is_int(v),
        "str": lambda v: type(v) is str,
        "bool": lambda v: type(v) is bool,
        "tuple[str, ...]": lambda v: type(v) is list and all(type(i) is str for i in v),
        "tuple[bytes, ...]": lambda v: type(v) is list and all(type(i) is bytes for i in v),
        "Any": lambda v: True,
        "dict[str, Any]": lambda v: type(v) is dict and all(type(k) is str for k in v),
        "dict[str, int]": lambda v: (
            type(v) is dict and all(type(k) is str and _is_int(i) for k, i in v.items())
        ),
    }
    return rules[annotation]  # a KeyError here is our bug: a field type with no rule


@dataclass(frozen=True, slots=True)
class _Field:
    attr: str
    wire: str
    annotation: str
    check: Callable[[Any], bool]
    required: bool
    to_tuple: bool


# Per frame type, its fields' wire rules: computed once, not per frame.
_SPECS: dict[type[Any], tuple[_Field, ...]] = {
    cls: tuple(
        _Field(
            attr=field.name,
            wire=_WIRE_NAME.get(field.name, field.name),
            annotation=str(field.type),
            check=_checker(str(field.type)),
            required=field.default is dataclasses.MISSING
            and field.default_factory is dataclasses.MISSING,
            to_tuple=str(field.type).startswith("tuple["),
        )
        for field in dataclasses.fields(cls)
    )
    for cls in _TYPES.values()
}


def encode_frame(frame: Frame) -> bytes:
    """Encode a frame as a msgpack map; ``None`` fields are left out."""
    fields: dict[str, Any] = {"t": frame.t}
    for spec in _SPECS[type(frame)]:
        value = getattr(frame, spec.attr)
        if value is not None:
            fields[spec.wire] = value
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


def encode_event_frame(
    sub: int, event: bytes, sig: bytes, receipt: bytes, seal: bytes | None = None
) -> bytes:
    """The bytes of ``encode_frame(EventFrame(sub, event, sig, receipt, seal))``.

    A relay fans one record out to many subscribers: everything after ``sub`` (its
    field order is ``t``, ``sub``, then the rest) is encoded once and cached, and only
    the subscription id is encoded per subscriber.
    """
    header = b"\x86" if seal is not None else b"\x85"  # a map of 6 (5) fields
    sub_bytes: bytes = msgpack.packb(sub)
    # Large events are not cached: the cache holds each twice (key and value), and
    # 4096 of max_frame bytes would be gigabytes kept after their subscribers left.
    rest = _event_frame_rest if len(event) <= CACHED_EVENT_MAX else _event_frame_rest.__wrapped__
    return header + _EVENT_T_SUB + sub_bytes + rest(event, sig, receipt, seal)


CACHED_EVENT_MAX = 16 << 10


@functools.lru_cache(maxsize=4096)
def _event_frame_rest(event: bytes, sig: bytes, receipt: bytes, seal: bytes | None) -> bytes:
    # Keyed by the bytes themselves: a bytes object keeps its hash, so the second and
    # later subscribers of a record pay a dict lookup.
    pack = msgpack.Packer(use_bin_type=True).pack
    rest: bytes = pack("event") + pack(event) + pack("sig") + pack(sig)
    rest += pack("receipt") + pack(receipt)
    if seal is not None:
        rest += pack("seal") + pack(seal)
    return rest


_EVENT_T_SUB: bytes = msgpack.packb("t") + msgpack.packb("event") + msgpack.packb("sub")


def frame_from_map(fields: Any) -> Frame:
    """Build a frame from one decoded msgpack value; raises :class:`ProtocolError`."""
    if type(fields) is not dict or type(fields.get("t")) is not str:
        raise ProtocolError(ErrorCode.MALFORMED, "a frame is a map with a string field t")
    frame_type = fields["t"]
    cls = _TYPES.get(frame_type)
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_FRAME, f"unknown frame type {frame_type!r}")
    kwargs: dict[str, Any] = {}
    for spec in _SPECS[cls]:
        if spec.wire not in fields:
            if spec.required:
                raise ProtocolError(ErrorCode.MALFORMED, f"{frame_type}: missing {spec.wire}")
            continue
        value = fields[spec.wire]
        if not spec.check(value):
            reason = f"{frame_type}.{spec.wire}: expected {spec.annotation}"
            raise ProtocolError(ErrorCode.MALFORMED, reason)
        kwargs[spec.attr] = tuple(value) if spec.to_tuple else value
    frame: Frame = cls(**kwargs)
    return frame


def decode_frame(data: bytes) -> Frame:
    """Decode one frame; raise :class:`ProtocolError` (``MALFORMED``, ``UNKNOWN_FRAME``)."""
    return frame_from_map(_decode_message(data))


def _decode_message(data: bytes) -> Any:
    """msgpack, with map keys of any type: a key that is not text fails the field or
    frame it is in (an unknown field is ignored), not every frame of the message."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except msgpack.StackError:  # (says nothing itself)
        reason = "values nest over 1024 levels deep: the whole message is refused"
        raise ProtocolError(ErrorCode.MALFORMED, reason) from None
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(ErrorCode.MALFORMED, f"not msgpack: {exc}") from None


MAX_BUNDLE = 4096
"""Frames in one bundle, at most (protocol 1): each bad one costs its receiver an
error, so a bundle of a million nils must not cost a million."""


def decode_message(
    data: bytes, max_frames: int | None = None, max_depth: int | None = None
) -> list[Frame | ProtocolError]:
    """Decode one WebSocket message: a frame, or a bundle (an array) of frames.

    Each frame of a bundle stands alone: a bad one yields its :class:`ProtocolError`
    in its place and the others are still decoded. A message that is not msgpack at
    all, or a bundle of more than ``max_frames`` (a relay: :data:`MAX_BUNDLE`), yields
    one error. A frame whose values nest over ``max_depth`` deep (a relay:
    :data:`~agent_sdk.wire.MAX_DEPTH`) yields its error too.
    """
    try:
        value = _decode_message(data)
    except ProtocolError as exc:
        return [exc]
    items = value if type(value) is list else [value]
    if not items:
        return [ProtocolError(ErrorCode.MALFORMED, "an empty bundle holds no frame")]
    if max_frames is not None and len(items) > max_frames:
        reason = f"a bundle of {len(items)} frames; at most {max_frames}"
        return [ProtocolError(ErrorCode.MALFORMED, reason)]
    if max_depth is not None and container_heads(data) > max_depth:
        # (a rare message: each frame is walked, once, and only the deep ones refused)
        deep = ProtocolError(ErrorCode.MALFORMED, f"values nest over {max_depth} levels deep")
        items = [deep if nests_over(item, max_depth) else item for item in items]
    out: list[Frame | ProtocolError] = []
    for item in items:
        if isinstance(item, ProtocolError):
            out.append(item)
            continue
        try:
            out.append(frame_from_map(item))
        except ProtocolError as exc:
            out.append(exc)
    return out


def bundle(encoded: Sequence[bytes]) -> bytes:
    """Join encoded frames into one message: a msgpack array header, then the frames.

    Sending many small frames as one WebSocket message saves the per-message cost on
    both ends; the frames are not re-encoded.
    """
    n = len(encoded)
    if n == 1:
        return encoded[0]
    if n < 16:
        header = bytes([0x90 | n])
    elif n < 1 << 16:
        header = b"\xdc" + n.to_bytes(2, "big")
    else:
        header = b"\xdd" + n.to_bytes(4, "big")
    return header + b"".join(encoded)
