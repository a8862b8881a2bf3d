"""Events, receipts and the canonical msgpack codec (pure: no I/O).

Theory of operation
-------------------
Every fact in Formicary is an *event*: a msgpack map signed by its author. An event
travels as two byte strings — its canonical encoding and a 64-byte Ed25519 signature —
and is never re-encoded on the way. Its id is ``BLAKE2b-256(canonical bytes)``; the
author signs ``EVENT_DOMAIN + id``. A receiver hashes the bytes it received and checks
the signature over that hash, so what is verified is exactly what was sent (Secure
Scuttlebutt verified a re-serialisation of parsed JSON, and every implementation that
serialised slightly differently broke).

Canonical means: decoding the bytes and encoding the result with :func:`canonical`
gives the same bytes back. Bytes that are not canonical are refused, so one event has
one encoding and therefore one id; nobody can malleate an id by re-encoding.

A *receipt* is the relay's answer: the event's place (namespace, ``seq``) in the
namespace log, the relay's hybrid logical clock, and ``prev``, the hash of the previous
receipt of the namespace, so the log is a hash chain. Receipts are canonical maps too.
The relay signs chain heads (a *seal*), not every receipt: a seal over a receipt's hash
vouches for every receipt before it in the chain (docs/protocol.md, "Seals").
"""

from __future__ import annotations

import hashlib
import re
import reprlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from nacl.bindings import crypto_sign_open
from nacl.exceptions import CryptoError

from agent_sdk.errors import ErrorCode, ProtocolError

PROTOCOL_VERSION = 1

# Signature domains: a signature made for one purpose can never be replayed as another.
EVENT_DOMAIN = b"formicary/v1/event\x00"
SEAL_DOMAIN = b"formicary/v1/seal\x00"
PRUNED_DOMAIN = b"formicary/v1/pruned\x00"

KEY_SIZE = 32
SIG_SIZE = 64
ID_SIZE = 32
ZERO_HASH = bytes(ID_SIZE)
"""``prev`` of the first receipt of every namespace."""

MAX_TS = 2**53 - 1
MAX_NONCE = 32

_NAME = r"[a-z0-9][a-z0-9._-]{0,62}"
# Always applied with ``fullmatch``: ``$`` would also match before a final newline.
NS_RE = re.compile(rf"(?P<name>{_NAME})@(?P<home>{_NAME})")
KIND_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}(\.[a-z0-9_-]{1,32}){0,7}")
KIND_MAX = 64

_EVENT_REQUIRED = frozenset({"v", "ns", "kind", "author", "deps", "ts", "body"})
_EVENT_ALLOWED = _EVENT_REQUIRED | {"nonce"}
_RECEIPT_FIELDS = frozenset({"id", "ns", "seq", "hlc", "prev", "relay"})


# --------------------------------------------------------------------------- codec


def _normalise(value: Any) -> Any:
    """Return ``value`` with every map's keys in canonical (UTF-8 byte) order.

    Python sorts ``str`` by code point, which is the UTF-8 byte order, so ``sorted``
    is exact. Raises :class:`TypeError` for anything the canonical form cannot hold.
    """
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"map keys must be str, not {type(key).__name__}")
        return {key: _normalise(value[key]) for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_normalise(item) for item in value]
    raise TypeError(f"{type(value).__name__} has no canonical encoding")


def canonical(value: Any) -> bytes:
    """Encode ``value`` canonically (docs/protocol.md, "Canonical encoding").

    Maps have ``str`` keys in UTF-8 byte order; integers take their shortest form;
    text is msgpack str, bytes are msgpack bin; floats are float64; tuples encode as
    arrays. Raises :class:`TypeError` for values with no canonical form (non-str map
    keys, sets, objects) and :class:`OverflowError` for integers outside int64/uint64.
    """
    packed: bytes = msgpack.packb(_normalise(value), use_bin_type=True)
    return packed


def decode(data: bytes) -> Any:
    """Decode one msgpack value; raise ``ProtocolError(MALFORMED)`` on any defect.

    msgpack bounds every container and string by the input length before allocating,
    so a hostile length prefix cannot make us allocate more than we received.
    """
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(ErrorCode.MALFORMED, f"not msgpack: {exc}") from None


MAX_DEPTH = 64
"""How deep containers may nest in a value a relay receives: an event (its map is
level 1) or a frame (protocol 3.1). Code that walks a value recursively (a reason
quoting it, a schema check, JSON output) must not run out of stack on a crafted one."""

_CONTAINER_HEADS = frozenset([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])
_NOT_A_CONTAINER_HEAD = bytes(b for b in range(256) if b not in _CONTAINER_HEADS)


def too_deep(value: Any, data: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value`` (decoded from ``data``) nests containers over ``limit`` deep.

    Every container starts with one of a few head bytes, so when ``data`` holds no
    more of them than ``limit`` (nearly always) no walk is needed."""
    return container_heads(data) > limit and nests_over(value, limit)


def container_heads(data: bytes) -> int:
    """How many bytes of ``data`` could start a container: at least its depth."""
    return len(data.translate(None, _NOT_A_CONTAINER_HEAD))


def nests_over(value: Any, limit: int) -> bool:
    """Whether ``value`` nests containers over ``limit`` deep (a walk of them all)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


class _UnsortedMap(Exception):
    pass


def _canonical_map(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    """msgpack's hook for each decoded map: keys must be str in strictly rising order."""
    previous = ""
    for i, (key, _) in enumerate(pairs):
        if type(key) is not str or (i and key <= previous):
            raise _UnsortedMap()
        previous = key
    return dict(pairs)


def _no_ext(code: int, data: bytes) -> Any:
    raise _UnsortedMap()  # not a map, but the same verdict: no canonical form


class NestsTooDeep(ProtocolError):
    """msgpack's reader stops at 1024 levels: deeper bytes cannot even be decoded."""


def decode_canonical(data: bytes, code: ErrorCode = ErrorCode.NON_CANONICAL) -> Any:
    """Decode ``data`` and require that it is the canonical encoding of its value.

    Equivalent to ``canonical(decode(data)) == data``, but on the hot path: map order
    is checked as msgpack decodes each map, so the value can be re-packed as it is
    (dicts keep their order) instead of being normalised; the byte comparison then
    catches every other deviation (integer widths, float32, str/bin headers).
    """
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            object_pairs_hook=_canonical_map,
            ext_hook=_no_ext,
            timestamp=3,  # ext -1 bypasses ext_hook; as a datetime it cannot be re-packed
        )
    except _UnsortedMap:
        reason = "map keys are not text in canonical order, or an ext type"
        raise ProtocolError(code, reason) from None
    except msgpack.StackError:
        raise NestsTooDeep(ErrorCode.MALFORMED, "values nest over 1024 levels deep") from None
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(ErrorCode.MALFORMED, f"not msgpack: {exc}") from None
    try:
        again: bytes = msgpack.packb(value, use_bin_type=True)
    except (TypeError, OverflowError, ValueError) as exc:
        raise ProtocolError(code, f"no canonical form: {exc}") from None
    if again != data:
        raise ProtocolError(code, "bytes are not the canonical encoding of their value")
    return value


def digest(data: bytes) -> bytes:
    """BLAKE2b-256: event ids and receipt hashes."""
    return hashlib.blake2b(data, digest_size=ID_SIZE).digest()


_P = 2**255 - 19
_SMALL_ORDER_Y = frozenset(
    {
        0,  # order 4
        1,  # the identity
        _P - 1,  # order 2
        # the order-8 points
        0x7A03AC9277FDC74EC6CC392CFA53202A0F67100D760B3CBA4FD84D3D706A17C7,
        0x05FC536D880238B13933C6D305ACDFD5F098EFF289F4C345B027B2C28F95E826,
    }
)


def weak_key(key: bytes) -> bool:
    """Is ``key`` a point of small order, or not the canonical encoding of a point?

    For such keys "signatures" can be made without any private key (the identity
    point verifies an all-zero-scalar signature of every message), so they are
    nobody's identity: refused everywhere a key signs (libsodium refuses them too).
    """
    y = int.from_bytes(key, "little") & ((1 << 255) - 1)
    return y >= _P or y in _SMALL_ORDER_Y


def verify_signature(key: bytes, sig: bytes, message: bytes) -> bool:
    """True when ``sig`` is ``key``'s Ed25519 signature of ``message`` (never for a
    :func:`weak_key`).

    libsodium checks, not OpenSSL: it verifies twice as fast (bench/floor.py), and
    verifying is the relay's largest cost per event. It is also the stricter of the
    two: it refuses a signature whose ``R`` has small order, which only a signer
    crafting it on purpose produces (docs/protocol.md, 3.3). Signing is libsodium's
    too (:class:`agent_sdk.identity.Identity`).
    """
    if not isinstance(key, bytes) or not isinstance(sig, bytes):  # e.g. unchecked msgpack
        return False
    if len(key) != KEY_SIZE or len(sig) != SIG_SIZE or weak_key(key):
        return False
    try:
        # libsodium's combined form (signature, then message): PyNaCl has no detached
        # verify; joining 64 + 51 bytes costs far less than the check.
        crypto_sign_open(sig + bytes(message), key)
    except (CryptoError, ValueError):
        return False
    return True


Signer = Callable[[bytes], bytes]
"""Ed25519 signing with one key: message in, 64-byte signature out."""


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Event:
    """The content of an event; what its author signs (through its id)."""

    ns: str
    kind: str
    author: bytes
    body: Any = None
    deps: tuple[bytes, ...] = ()
    ts: int = 0
    nonce: bytes | None = None
    v: int = PROTOCOL_VERSION

    @property
    def home(self) -> str:
        """The relay name that homes this event's namespace."""
        return self.ns.rpartition("@")[2]

    def to_map(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "v": self.v,
            "ns": self.ns,
            "kind": self.kind,
            "author": self.author,
            "deps": list(self.deps),
            "ts": self.ts,
            "body": self.body,
        }
        if self.nonce is not None:
            fields["nonce"] = self.nonce
        return fields


@dataclass(frozen=True, slots=True)
class SignedEvent:
    """An event as it travels: canonical bytes, signature, and what they mean."""

    raw: bytes
    sig: bytes
    id: bytes
    event: Event

    def verify(self) -> bool:
        """Check the author's signature over the id of the exact bytes held."""
        return verify_signature(self.event.author, self.sig, EVENT_DOMAIN + self.id)


def sign_event(event: Event, signer: Signer) -> SignedEvent:
    """Encode ``event`` canonically, derive its id and sign it.

    ``signer`` must sign with the key whose public half is ``event.author``; the
    result is validated as any receiver would validate it, so a malformed event raises
    :class:`ProtocolError` here rather than at the relay.
    """
    raw = canonical(event.to_map())
    event_id = digest(raw)
    signed = SignedEvent(raw=raw, sig=signer(EVENT_DOMAIN + event_id), id=event_id, event=event)
    check_event_fields(decode(raw))
    return signed


def _shown(value: Any) -> str:
    """A received value in a reason: short, and safe however deep it nests."""
    return reprlib.repr(value)


def check_event_fields(fields: Any, *, max_deps: int | None = None) -> Event:
    """Validate a decoded event map and build the :class:`Event` it describes."""
    if not isinstance(fields, dict):
        raise ProtocolError(ErrorCode.BAD_EVENT, "an event is a map")
    keys = fields.keys()
    if not keys >= _EVENT_REQUIRED or not keys <= _EVENT_ALLOWED:
        missing = sorted(_EVENT_REQUIRED - keys)
        extra = sorted(keys - _EVENT_ALLOWED)
        raise ProtocolError(ErrorCode.BAD_EVENT, f"fields: missing {missing}, unknown {extra}")
    v, ns, kind = fields["v"], fields["ns"], fields["kind"]
    author, deps, ts = fields["author"], fields["deps"], fields["ts"]
    nonce = fields.get("nonce")
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.BAD_EVENT, f"unsupported event version {_shown(v)}")
    if not isinstance(ns, str) or not NS_RE.fullmatch(ns):
        reason = (
            f"bad namespace {_shown(ns)}: want name@relay, each part 1 to 63 of a-z, 0-9, '.', '_',"
            " '-', starting with a letter or digit"
        )
        raise ProtocolError(ErrorCode.BAD_EVENT, reason)
    if not isinstance(kind, str) or len(kind) > KIND_MAX or not KIND_RE.fullmatch(kind):
        raise ProtocolError(ErrorCode.BAD_EVENT, f"bad kind {_shown(kind)}: want dotted lowercase")
    if not isinstance(author, bytes) or len(author) != KEY_SIZE:
        raise ProtocolError(ErrorCode.BAD_EVENT, "author must be a 32-byte Ed25519 key")
    if not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts <= MAX_TS:
        raise ProtocolError(ErrorCode.BAD_EVENT, "ts must be an integer of ms since the epoch")
    # Absent is fine; present means 1 to 32 bytes, never nil (nil would be a second
    # encoding, and so a second id, of the same event).
    nonce_ok = isinstance(nonce, bytes) and 0 < len(nonce) <= MAX_NONCE
    if "nonce" in fields and not nonce_ok:
        raise ProtocolError(ErrorCode.BAD_EVENT, f"nonce must be 1 to {MAX_NONCE} bytes")
    if not isinstance(deps, list):
        raise ProtocolError(ErrorCode.BAD_EVENT, "deps must be a list of event ids")
    if max_deps is not None and len(deps) > max_deps:
        raise ProtocolError(ErrorCode.TOO_MANY_DEPS, f"{len(deps)} deps; limit is {max_deps}")
    for dep in deps:
        if not isinstance(dep, bytes) or len(dep) != ID_SIZE:
            raise ProtocolError(ErrorCode.BAD_EVENT, "each dep must be a 32-byte event id")
    if len(set(deps)) != len(deps):
        raise ProtocolError(ErrorCode.BAD_EVENT, "deps must not repeat an id")
    return Event(
        ns=ns,
        kind=kind,
        author=author,
        body=fields["body"],
        deps=tuple(deps),
        ts=ts,
        nonce=nonce if "nonce" in fields else None,
        v=v,
    )


def _too_deep(max_depth: int) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_EVENT, f"values nest over {max_depth} levels deep")


def decode_event(
    raw: bytes, sig: bytes, *, max_deps: int | None = None, max_depth: int | None = None
) -> SignedEvent:
    """Parse received event bytes; the signature is *not* checked here (see ``verify``).

    Raises :class:`ProtocolError` with ``MALFORMED``, ``NON_CANONICAL``, ``BAD_EVENT``
    or ``TOO_MANY_DEPS``. Splitting the cheap checks from the signature lets a relay
    refuse bad shapes before paying for Ed25519. ``max_deps`` and ``max_depth`` are
    for new events only: a stored one is read as it was accepted.
    """
    if not isinstance(sig, bytes) or len(sig) != SIG_SIZE:
        raise ProtocolError(ErrorCode.BAD_SIGNATURE, "a signature is 64 bytes")
    try:
        fields = decode_canonical(raw)
    except NestsTooDeep:
        if max_depth is None:
            raise
        raise _too_deep(max_depth) from None  # past any limit a relay sets
    if max_depth is not None and too_deep(fields, raw, max_depth):
        raise _too_deep(max_depth)
    event = check_event_fields(fields, max_deps=max_deps)
    return SignedEvent(raw=raw, sig=sig, id=digest(raw), event=event)


# --------------------------------------------------------------------------- receipts


@dataclass(frozen=True, slots=True)
class Receipt:
    """A relay's record of where an event sits in its namespace log."""

    id: bytes
    ns: str
    seq: int
    hlc: int
    prev: bytes
    relay: bytes
    raw: bytes
    hash: bytes


def make_receipt(*, id: bytes, ns: str, seq: int, hlc: int, prev: bytes, relay: bytes) -> Receipt:
    # The keys are written in canonical order already (hlc, id, ns, prev, relay, seq)
    # and every value is a plain scalar, so packing directly is canonical: this is on
    # every event's path, and skipping the generic normalisation halves its cost.
    fields = {"hlc": hlc, "id": id, "ns": ns, "prev": prev, "relay": relay, "seq": seq}
    raw: bytes = msgpack.packb(fields, use_bin_type=True)
    return Receipt(
        id=id, ns=ns, seq=seq, hlc=hlc, prev=prev, relay=relay, raw=raw, hash=digest(raw)
    )


def decode_receipt(raw: bytes) -> Receipt:
    """Parse canonical receipt bytes; raises :class:`ProtocolError(MALFORMED)`."""
    fields = decode_canonical(raw, ErrorCode.MALFORMED)
    if not isinstance(fields, dict) or fields.keys() != _RECEIPT_FIELDS:
        raise ProtocolError(ErrorCode.MALFORMED, "a receipt has id, ns, seq, hlc, prev, relay")
    rid, ns, seq, hlc = fields["id"], fields["ns"], fields["seq"], fields["hlc"]
    prev, relay = fields["prev"], fields["relay"]
    if not (
        isinstance(rid, bytes)
        and len(rid) == ID_SIZE
        and isinstance(ns, str)
        and NS_RE.fullmatch(ns)
        and type(seq) is int
        and seq >= 1
        and type(hlc) is int
        and hlc >= 0
        and isinstance(prev, bytes)
        and len(prev) == ID_SIZE
        and isinstance(relay, bytes)
        and len(relay) == KEY_SIZE
    ):
        raise ProtocolError(ErrorCode.MALFORMED, "receipt field of the wrong type or size")
    return Receipt(
        id=rid, ns=ns, seq=seq, hlc=hlc, prev=prev, relay=relay, raw=raw, hash=digest(raw)
    )


def seal(receipt: Receipt, signer: Signer) -> bytes:
    """The relay's signature over a chain head: vouches for it and every receipt before."""
    return seal_digest(receipt.hash, signer)


def seal_digest(receipt_hash: bytes, signer: Signer) -> bytes:
    """:func:`seal` from the receipt's hash alone."""
    return signer(SEAL_DOMAIN + receipt_hash)


def verify_seal(receipt: Receipt, sig: bytes) -> bool:
    return verify_signature(receipt.relay, sig, SEAL_DOMAIN + receipt.hash)


def pruned_mark(event_id: bytes, signer: Signer) -> bytes:
    """The home relay's word that it pruned this event's bytes (compaction, protocol
    13.7): sent in place of the author's signature with a record that has no bytes,
    so that nobody between the home and a mirror can empty a record of its own."""
    return signer(PRUNED_DOMAIN + event_id)


def verify_pruned_mark(receipt: Receipt, sig: bytes) -> bool:
    return verify_signature(receipt.relay, sig, PRUNED_DOMAIN + receipt.id)


def check_chain(receipts: Sequence[Receipt], previous: Receipt | None = None) -> int | None:
    """Return the seq of the first receipt that breaks the chain, or ``None``.

    Each receipt must follow ``previous`` (or start the log at seq 1 with
    ``prev == ZERO_HASH``): same namespace and relay, seq one more, ``prev`` equal to
    the previous receipt's hash, hlc strictly larger.
    """
    for receipt in receipts:
        if previous is None:
            ok = receipt.seq == 1 and receipt.prev == ZERO_HASH
        else:
            ok = (
                receipt.seq == previous.seq + 1
                and receipt.prev == previous.hash
                and receipt.ns == previous.ns
                and receipt.relay == previous.relay
                and receipt.hlc > previous.hlc
            )
        if not ok:
            return receipt.seq
        previous = receipt
    return None


def to_json_safe(value: Any) -> Any:
    """Render a decoded msgpack value as JSON-compatible data (bytes become hex; so
    does a bytearray, as pycrdt gives a document's binary values)."""
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, Mapping):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v) for v in value]
    return value
