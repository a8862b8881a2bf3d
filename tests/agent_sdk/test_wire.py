"""The canonical codec, events, receipts and seals: plain function calls, no sockets."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.identity import Identity
from agent_sdk.wire import (
    EVENT_DOMAIN,
    ZERO_HASH,
    Event,
    canonical,
    check_chain,
    decode,
    decode_canonical,
    decode_event,
    decode_receipt,
    digest,
    make_receipt,
    seal,
    sign_event,
    too_deep,
    verify_seal,
    verify_signature,
    weak_key,
)
from tests.conftest import identity

AUTHOR = identity(1)
RELAY = identity(2)


def make_event(**changes: Any) -> Event:
    fields: dict[str, Any] = {
        "ns": "demo@local",
        "kind": "app.note",
        "author": AUTHOR.public_key,
        "body": {"text": "hello", "n": 1},
        "ts": 1_700_000_000_000,
    }
    fields.update(changes)
    return Event(**fields)


# Values any msgpack map may hold; keys are text, as the canonical form requires.
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)


@given(values)
def test_canonical_round_trips(value: Any) -> None:
    data = canonical(value)
    assert decode_canonical(data) == value
    assert canonical(decode(data)) == data


@given(
    st.dictionaries(st.text(max_size=8), st.integers(-(2**63), 2**64 - 1), min_size=2, max_size=8)
)
def test_canonical_ignores_insertion_order(mapping: dict[str, int]) -> None:
    reversed_mapping = dict(reversed(list(mapping.items())))
    assert canonical(mapping) == canonical(reversed_mapping)


def test_canonical_map_keys_sort_by_utf8_bytes() -> None:
    data = canonical({"b": 1, "a": 2, "é": 3, "Z": 4})
    assert list(msgpack.unpackb(data)) == ["Z", "a", "b", "é"]


def test_canonical_bytes_are_exact() -> None:
    # fixmap of 2: "a" -> positive fixint 1, "b" -> bin8 of 2 bytes
    assert canonical({"b": b"\x00\xff", "a": 1}) == bytes.fromhex("82a16101a162c40200ff")
    assert canonical(255) == b"\xcc\xff"  # uint8, the shortest form
    assert canonical(-33) == b"\xd0\xdf"  # int8
    assert canonical(1.5) == bytes.fromhex("cb3ff8000000000000")  # always float64


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb({"b": 1, "a": 2}),  # keys out of order
        b"\xcd\x00\x01",  # uint16 holding a value that fits a fixint
        b"\xca\x3f\xc0\x00\x00",  # float32: only float64 is canonical
        b"\x82\xa1a\x01\xa1a\x02",  # duplicate key
        b"\xc7\x01\x05\x00",  # ext type in a longer form than needed
        b"\xd4\x05\x00",  # ext type in its shortest form
        b"\xd6\xff\x00\x00\x00\x01",  # the timestamp ext type
        b"\x81\xc4\x01k\x01",  # a bin map key
        msgpack.packb({1: 2}),  # non-string key
    ],
)
def test_non_canonical_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_canonical(data)
    assert info.value.code in (ErrorCode.NON_CANONICAL, ErrorCode.MALFORMED)


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x92\x01", msgpack.packb(1) + b"\x00"])
def test_malformed_msgpack_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(data)
    assert info.value.code is ErrorCode.MALFORMED


def test_canonical_refuses_values_without_a_form() -> None:
    with pytest.raises(TypeError):
        canonical({1: "non-string key"})
    with pytest.raises(TypeError):
        canonical({"set": {1, 2}})
    with pytest.raises(OverflowError):
        canonical(2**64)


def test_event_id_is_stable_and_covers_every_field() -> None:
    event = make_event()
    first = sign_event(event, AUTHOR.sign)
    again = sign_event(make_event(), AUTHOR.sign)
    assert first.id == again.id == digest(first.raw)
    assert first.sig == again.sig  # Ed25519 is deterministic
    for change in (
        {"ts": 1},
        {"kind": "app.other"},
        {"body": {"text": "hellO", "n": 1}},
        {"deps": (bytes(32),)},
        {"nonce": b"\x01"},
        {"ns": "other@local"},
    ):
        assert sign_event(make_event(**change), AUTHOR.sign).id != first.id


def test_decoded_event_verifies_over_the_received_bytes() -> None:
    signed = sign_event(make_event(deps=(bytes(32),), nonce=b"n"), AUTHOR.sign)
    received = decode_event(signed.raw, signed.sig)
    assert received == signed
    assert received.verify()


def test_signature_failures() -> None:
    signed = sign_event(make_event(), AUTHOR.sign)
    flipped = bytes([signed.sig[0] ^ 1]) + signed.sig[1:]
    assert not decode_event(signed.raw, flipped).verify()
    other = identity(9).sign(EVENT_DOMAIN + signed.id)
    assert not decode_event(signed.raw, other).verify()  # right bytes, wrong signer
    with pytest.raises(ProtocolError) as info:
        decode_event(signed.raw, signed.sig[:63])
    assert info.value.code is ErrorCode.BAD_SIGNATURE


def test_a_signature_does_not_carry_over_to_other_bytes() -> None:
    signed = sign_event(make_event(), AUTHOR.sign)
    tampered = sign_event(make_event(body="tampered"), identity(5).sign)
    assert not decode_event(tampered.raw, signed.sig).verify()


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"v": 2}, ErrorCode.BAD_EVENT),
        ({"ns": "no-home"}, ErrorCode.BAD_EVENT),
        ({"ns": "Upper@local"}, ErrorCode.BAD_EVENT),
        ({"kind": "Bad Kind"}, ErrorCode.BAD_EVENT),
        ({"author": b"short"}, ErrorCode.BAD_EVENT),
        ({"ts": -1}, ErrorCode.BAD_EVENT),
        ({"ts": True}, ErrorCode.BAD_EVENT),
        ({"deps": [b"x"]}, ErrorCode.BAD_EVENT),
        ({"deps": [bytes(32), bytes(32)]}, ErrorCode.BAD_EVENT),
        ({"deps": [bytes([i]) * 32 for i in range(40)]}, ErrorCode.TOO_MANY_DEPS),
        ({"nonce": b"x" * 33}, ErrorCode.BAD_EVENT),
        ({"extra": 1}, ErrorCode.BAD_EVENT),
        ({"body": None, "kind": None}, ErrorCode.BAD_EVENT),
    ],
)
def test_event_shape_errors(fields: dict[str, Any], code: ErrorCode) -> None:
    mapping = make_event().to_map()
    mapping.update(fields)
    raw = canonical(mapping)
    with pytest.raises(ProtocolError) as info:
        decode_event(raw, bytes(64), max_deps=32)
    assert info.value.code is code


def test_missing_field_is_bad_event() -> None:
    mapping = make_event().to_map()
    del mapping["body"]
    with pytest.raises(ProtocolError) as info:
        decode_event(canonical(mapping), bytes(64))
    assert info.value.code is ErrorCode.BAD_EVENT


def test_receipts_chain_and_seal() -> None:
    key = RELAY.public_key
    first = make_receipt(id=bytes([1]) * 32, ns="t@local", seq=1, hlc=10, prev=ZERO_HASH, relay=key)
    second = make_receipt(
        id=bytes([2]) * 32, ns="t@local", seq=2, hlc=11, prev=first.hash, relay=key
    )
    assert decode_receipt(second.raw) == second
    assert check_chain([first, second]) is None
    signature = seal(second, RELAY.sign)
    assert verify_seal(second, signature)
    assert not verify_seal(first, signature)

    forged = make_receipt(
        id=bytes([3]) * 32, ns="t@local", seq=2, hlc=11, prev=bytes(32), relay=key
    )
    assert check_chain([first, forged]) == 2
    gap = make_receipt(id=bytes([3]) * 32, ns="t@local", seq=3, hlc=12, prev=first.hash, relay=key)
    assert check_chain([first, gap]) == 3
    stale = make_receipt(
        id=bytes([3]) * 32, ns="t@local", seq=2, hlc=10, prev=first.hash, relay=key
    )
    assert check_chain([first, stale]) == 2
    assert check_chain([second]) == 2  # a log starts at seq 1


@settings(max_examples=50, derandomize=True)
@given(st.binary(max_size=64))
def test_decode_receipt_never_crashes(data: bytes) -> None:
    try:
        decode_receipt(data)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.MALFORMED


@settings(max_examples=200, derandomize=True)
@given(st.binary(max_size=200))
def test_decode_event_only_raises_protocol_errors(data: bytes) -> None:
    try:
        decode_event(data, bytes(64))
    except ProtocolError:
        pass


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "app.note\n"},  # "$" would match before a final newline
        {"ns": "demo@local\n"},
        {"v": 1.0},
        {"nonce": None},  # a second encoding of "no nonce"
        {"nonce": b""},
    ],
)
def test_near_misses_are_bad_events(fields: dict[str, Any]) -> None:
    mapping = make_event().to_map()
    mapping.update(fields)
    with pytest.raises(ProtocolError) as info:
        decode_event(canonical(mapping), bytes(64))
    assert info.value.code is ErrorCode.BAD_EVENT


def test_a_kind_is_at_most_64_characters() -> None:
    """KIND_RE alone allows 263 (eight segments); KIND_MAX bounds the whole kind."""
    longest = "a" * 32 + "." + "b" * 31
    assert decode_event(canonical(make_event(kind=longest).to_map()), bytes(64))
    with pytest.raises(ProtocolError) as info:
        decode_event(canonical(make_event(kind=longest + "b").to_map()), bytes(64))
    assert info.value.code is ErrorCode.BAD_EVENT


def test_receipts_with_ill_typed_fields_are_refused() -> None:
    fields = {
        "id": bytes(32),
        "ns": "t@local",
        "seq": 1,
        "hlc": 1,
        "prev": bytes(32),
        "relay": bytes(32),
    }
    changes: list[dict[str, Any]] = [
        {"seq": True},
        {"hlc": False},
        {"ns": "no-home"},
        {"seq": 0},
        {"hlc": -1},
        {"id": bytes(31)},
        {"prev": bytes(33)},
        {"relay": bytes(31)},
        {"relay": "k" * 32},
    ]
    assert decode_receipt(canonical(fields)).seq == 1
    for change in changes:
        with pytest.raises(ProtocolError):
            decode_receipt(canonical({**fields, **change}))


@pytest.mark.parametrize(
    "key",
    [
        "0100000000000000000000000000000000000000000000000000000000000000",  # identity
        "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
        "0000000000000000000000000000000000000000000000000000000000000080",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # y = p
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",  # y = p + 1
    ],
)
def test_small_order_and_non_canonical_keys_never_verify(key: str) -> None:
    """With these keys "signatures" need no private key: the identity point verifies
    R = identity, S = 0 for every message (OpenSSL accepts it). Nobody owns them."""
    weak = bytes.fromhex(key)
    assert weak_key(weak)
    forged = bytes([1]) + bytes(63)  # R = the identity point, S = 0
    for n in range(64):
        message = EVENT_DOMAIN + bytes([n]) * 32
        assert not verify_signature(weak, forged, message)
        assert not verify_signature(weak, bytes(64), message)


def test_real_keys_are_not_weak() -> None:
    assert not any(weak_key(Identity.from_seed(bytes([n]) * 32).public_key) for n in range(256))


def test_a_signature_with_a_small_order_r_is_refused() -> None:
    """The one rule where libsodium is stricter than OpenSSL (protocol.md 3.3): with
    R = the identity point and S = k*a, a real key's owner can make a "signature"
    that satisfies the signing equation for any message but is no RFC 8032 signature
    (R is not r*B). OpenSSL accepts it; Formicary refuses it everywhere."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    order = 2**252 + 27742317777372353535851937790883648493
    seed = bytes(range(32))
    owner = Identity.from_seed(seed)
    h = bytearray(hashlib.sha512(seed).digest()[:32])
    h[0] &= 248
    h[31] &= 127
    h[31] |= 64
    scalar = int.from_bytes(h, "little")
    r = bytes([1]) + bytes(31)  # the identity point
    message = EVENT_DOMAIN + bytes(32)
    k = int.from_bytes(hashlib.sha512(r + owner.public_key + message).digest(), "little")
    crafted = r + ((k * scalar) % order).to_bytes(32, "little")

    Ed25519PublicKey.from_public_bytes(owner.public_key).verify(crafted, message)  # OpenSSL: ok
    assert not verify_signature(owner.public_key, crafted, message)
    assert verify_signature(owner.public_key, owner.sign(message), message)


@pytest.mark.parametrize("odd", [None, "sig", 7, ["a"]])
def test_a_signature_or_key_that_is_not_bytes_never_verifies(odd: Any) -> None:
    owner = Identity.from_seed(bytes(32))
    message = EVENT_DOMAIN + bytes(32)
    sig = owner.sign(message)
    assert not verify_signature(owner.public_key, odd, message)
    assert not verify_signature(odd, sig, message)
    assert verify_signature(owner.public_key, sig, bytearray(message))


@pytest.mark.parametrize("container", ["list", "map"])
def test_too_deep_counts_levels_exactly(container: str) -> None:
    def nested(depth: int) -> Any:
        value: Any = 0
        for _ in range(depth):
            value = [value] if container == "list" else {"k": value}
        return value

    for depth in (1, 63, 64, 65, 200):
        value = nested(depth)
        data = canonical(value)
        assert too_deep(value, data, 64) == (depth > 64), depth
    assert not too_deep([[0], [[0]]], canonical([[0], [[0]]]), 3)
    assert too_deep([[0], [[[0]]]], canonical([[0], [[[0]]]]), 3)
