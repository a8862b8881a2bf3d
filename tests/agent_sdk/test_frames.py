"""Connection frames: exact round trips and refusals of malformed frames."""

from __future__ import annotations

import msgpack
import pytest

from agent_sdk import frames as f
from agent_sdk.errors import ErrorCode, ProtocolError

EXAMPLES: list[f.Frame] = [
    f.Auth(key=b"k" * 32, sig=b"s" * 64, challenge=b"c" * 32),
    f.Publish(rid=7, event=b"\x80", sig=b"s" * 64),
    f.Subscribe(sub=1, ns=("a@r",), start={"a@r": 3}, kinds=("wo.*",), authors=(b"a" * 32,)),
    f.Subscribe(sub=2, ns=("a@r", "b@r")),
    f.Unsubscribe(sub=1),
    f.Hello(v=1, relay=b"r" * 32, name="local", challenge=b"c" * 32, max_frame=1, max_deps=2),
    f.Welcome(agent=b"a" * 32, sig=b"s" * 64),
    f.Ack(rid=7, receipt=b"\x80", seal=b"s" * 64, duplicate=True),
    f.Ack(rid=8, receipt=b"\x80"),
    f.Error(code=1001, name="malformed", reason="x", rid=3),
    f.EventFrame(sub=1, event=b"\x80", sig=b"s" * 64, receipt=b"\x80"),
    f.Live(sub=1, ns="a@r", seq=0),
    f.Unsubscribed(sub=1),
]


@pytest.mark.parametrize("frame", EXAMPLES, ids=lambda frame: frame.t)
def test_frames_round_trip(frame: f.Frame) -> None:
    assert f.decode_frame(f.encode_frame(frame)) == frame


def test_subscribe_cursor_is_called_from_on_the_wire() -> None:
    wire = msgpack.unpackb(f.encode_frame(f.Subscribe(sub=1, ns=("a@r",), start={"a@r": 2})))
    assert wire["from"] == {"a@r": 2} and "start" not in wire


def test_optional_fields_are_left_out_and_unknown_fields_ignored() -> None:
    wire = msgpack.unpackb(f.encode_frame(f.Ack(rid=1, receipt=b"r")))
    assert "seal" not in wire
    extra = msgpack.packb({"t": "unsubscribe", "sub": 4, "future": True})
    assert f.decode_frame(extra) == f.Unsubscribe(sub=4)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ([1, 2], ErrorCode.MALFORMED),
        ({"sub": 1}, ErrorCode.MALFORMED),
        ({"t": 5}, ErrorCode.MALFORMED),
        ({"t": "teleport"}, ErrorCode.UNKNOWN_FRAME),
        ({"t": "publish", "rid": "1", "event": b"", "sig": b""}, ErrorCode.MALFORMED),
        ({"t": "publish", "rid": True, "event": b"", "sig": b""}, ErrorCode.MALFORMED),
        ({"t": "publish", "rid": 1, "sig": b""}, ErrorCode.MALFORMED),
        ({"t": "publish", "rid": 1, "event": "text, not bin", "sig": b""}, ErrorCode.MALFORMED),
        ({"t": "ack", "rid": 1, "receipt": b"", "duplicate": 1}, ErrorCode.MALFORMED),
        ({"t": "subscribe", "sub": 1, "ns": "a@r"}, ErrorCode.MALFORMED),
        ({"t": "subscribe", "sub": 1, "ns": ["a@r"], "from": {"a@r": "1"}}, ErrorCode.MALFORMED),
        ({"t": "subscribe", "sub": 1, "ns": ["a@r"], "authors": ["x"]}, ErrorCode.MALFORMED),
    ],
)
def test_malformed_frames_are_refused_with_a_code(fields: object, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        f.decode_frame(msgpack.packb(fields, use_bin_type=True))
    assert info.value.code is code


@pytest.mark.parametrize("sub", [0, 1, 127, 128, 255, 65_536, 2**40])
@pytest.mark.parametrize("seal", [None, b"", bytes(range(64))])
def test_a_pre_encoded_event_frame_is_the_frame_encode_frame_makes(
    sub: int, seal: bytes | None
) -> None:
    """Fan-out encodes the part after ``sub`` once per record (relay/server.py)."""
    event, sig, receipt = bytes(range(200)), bytes(64), b"\x81\xa1r\x01"
    frame = f.EventFrame(sub=sub, event=event, sig=sig, receipt=receipt, seal=seal)
    assert f.encode_event_frame(sub, event, sig, receipt, seal) == f.encode_frame(frame)
    assert f.decode_frame(f.encode_event_frame(sub, event, sig, receipt, seal)) == frame


def test_large_events_are_not_kept_in_the_fan_out_cache() -> None:
    """4096 cached frames of max_frame bytes each would be gigabytes, kept after
    their subscribers left; a large event is encoded per subscriber instead."""
    sig, receipt = bytes(64), b"\x81\xa1r\x01"
    large = b"x" * (f.CACHED_EVENT_MAX + 1)
    frame = f.EventFrame(sub=3, event=large, sig=sig, receipt=receipt, seal=None)
    before = f._event_frame_rest.cache_info().currsize
    assert f.encode_event_frame(3, large, sig, receipt, None) == f.encode_frame(frame)
    assert f._event_frame_rest.cache_info().currsize == before
    f.encode_event_frame(3, large[: f.CACHED_EVENT_MAX], sig, receipt, None)
    assert f._event_frame_rest.cache_info().currsize == before + 1


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 65_535, 65_536])
def test_a_bundle_of_any_size_decodes_to_its_frames(n: int) -> None:
    """The bundle header changes form at 16 and 65536 frames (protocol 1)."""
    frames = [f.Unsubscribe(sub=i) for i in range(n)]
    assert f.decode_message(f.bundle([f.encode_frame(frame) for frame in frames])) == frames


def test_a_bundle_of_max_bundle_frames_is_read_and_a_longer_one_refused_whole() -> None:
    encoded = [f.encode_frame(f.Unsubscribe(sub=i)) for i in range(f.MAX_BUNDLE + 1)]
    frames = f.decode_message(f.bundle(encoded[:-1]), max_frames=f.MAX_BUNDLE)
    assert frames == [f.Unsubscribe(sub=i) for i in range(f.MAX_BUNDLE)]
    [refused] = f.decode_message(f.bundle(encoded), max_frames=f.MAX_BUNDLE)
    assert isinstance(refused, ProtocolError) and refused.code is ErrorCode.MALFORMED


def test_a_bad_frame_of_a_bundle_fails_alone() -> None:
    """Each frame of a bundle stands alone: a bad one yields its error in its place,
    and the frames after it are still decoded (protocol 1)."""
    message = f.bundle(
        [
            f.encode_frame(f.Unsubscribe(sub=1)),
            msgpack.packb({"t": "unsubscribe"}),  # sub missing
            msgpack.packb(None),  # not a frame map
            msgpack.packb({"t": "teleport"}),
            f.encode_frame(f.Unsubscribed(sub=2)),
        ]
    )
    first, missing, nil, unknown, last = f.decode_message(message)
    assert first == f.Unsubscribe(sub=1) and last == f.Unsubscribed(sub=2)
    assert isinstance(missing, ProtocolError) and missing.code is ErrorCode.MALFORMED
    assert isinstance(nil, ProtocolError) and nil.code is ErrorCode.MALFORMED
    assert isinstance(unknown, ProtocolError) and unknown.code is ErrorCode.UNKNOWN_FRAME
    [empty] = f.decode_message(msgpack.packb([]))
    assert isinstance(empty, ProtocolError) and empty.code is ErrorCode.MALFORMED
