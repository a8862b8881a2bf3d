"""The relay's connection state machine, driven with plain calls and exact frames."""

from __future__ import annotations

import dataclasses

import pytest

from agent_sdk import frames as f
from agent_sdk.errors import ErrorCode
from agent_sdk.wire import verify_signature
from relay.session import Action, Admit, Close, Open, Reply, Session, State
from tests.conftest import identity
from tests.relay.test_sequencer import event

AGENT = identity(1)
RELAY = identity(2)
CHALLENGE = bytes(range(32))


def receive(session: Session, data: bytes) -> Action:
    [action] = session.receive(data)
    return action


def new_session(max_frame: int = 4096) -> Session:
    return Session(
        relay_key=RELAY.public_key,
        relay_name="local",
        signer=RELAY.sign,
        challenge=CHALLENGE,
        max_frame=max_frame,
        max_deps=4,
    )


def auth_frame(who: object = AGENT, challenge: bytes = b"a" * 32) -> bytes:
    sig = AGENT.sign(f.agent_auth_message(RELAY.public_key, CHALLENGE))
    return f.encode_frame(f.Auth(key=who.public_key, sig=sig, challenge=challenge))  # type: ignore[attr-defined]


def error_code(action: object) -> ErrorCode:
    assert isinstance(action, Reply) and isinstance(action.frame, f.Error), action
    return ErrorCode(action.frame.code)


def authenticated() -> Session:
    session = new_session()
    action = receive(session, auth_frame())
    assert isinstance(action, Reply) and isinstance(action.frame, f.Welcome)
    return session


def publish(signed: object, rid: int = 1) -> bytes:
    return f.encode_frame(f.Publish(rid=rid, event=signed.raw, sig=signed.sig))  # type: ignore[attr-defined]


def test_auth_proves_both_keys() -> None:
    session = new_session()
    assert session.hello.challenge == CHALLENGE and session.state is State.AWAITING_AUTH
    action = receive(session, auth_frame())
    assert isinstance(action, Reply) and isinstance(action.frame, f.Welcome)
    proof = f.relay_auth_message(AGENT.public_key, b"a" * 32)
    assert verify_signature(RELAY.public_key, action.frame.sig, proof)
    assert session.state is State.OPEN and session.agent == AGENT.public_key


def test_auth_for_another_key_fails() -> None:
    session = new_session()
    assert error_code(receive(session, auth_frame(who=identity(3)))) is ErrorCode.AUTH_FAILED
    assert session.state is State.AWAITING_AUTH


@pytest.mark.parametrize(
    "frame",
    [
        f.Publish(rid=1, event=b"", sig=b""),
        f.Subscribe(sub=1, ns=("t@local",)),
        f.Unsubscribe(sub=1),
    ],
)
def test_nothing_before_auth(frame: f.AgentFrame) -> None:
    session = new_session()
    assert error_code(receive(session, f.encode_frame(frame))) is ErrorCode.NOT_AUTHENTICATED


def test_second_auth_and_relay_frames_are_refused() -> None:
    session = authenticated()
    assert error_code(receive(session, auth_frame())) is ErrorCode.ALREADY_AUTHENTICATED
    live = f.encode_frame(f.Live(sub=1, ns="t@local", seq=1))
    assert error_code(receive(session, live)) is ErrorCode.UNKNOWN_FRAME
    assert session.state is State.OPEN


def test_verified_publish_is_admitted_with_its_rid() -> None:
    session = authenticated()
    signed = event(1)
    assert receive(session, publish(signed, rid=9)) == Admit(9, signed)


def test_publish_checks_author_then_signature() -> None:
    session = authenticated()
    other = identity(3)
    from agent_sdk.wire import Event, sign_event

    foreign = sign_event(Event(ns="t@local", kind="app.x", author=other.public_key), other.sign)
    action = receive(session, publish(foreign, rid=4))
    assert error_code(action) is ErrorCode.WRONG_AUTHOR
    assert isinstance(action, Reply) and action.frame.rid == 4  # type: ignore[union-attr]
    # Both checks fail here: the author (step 7 of 6.1) is checked before the signature
    # (step 8), so a foreign event with a signature that verifies for nobody is
    # refused as wrong_author, not bad_signature.
    unsigned = f.encode_frame(f.Publish(rid=6, event=foreign.raw, sig=bytes(64)))
    action = receive(session, unsigned)
    assert error_code(action) is ErrorCode.WRONG_AUTHOR
    assert isinstance(action, Reply) and action.frame.rid == 6  # type: ignore[union-attr]
    signed = event(1)
    forged = f.encode_frame(f.Publish(rid=5, event=signed.raw, sig=bytes(64)))
    assert error_code(receive(session, forged)) is ErrorCode.BAD_SIGNATURE
    too_many = event(2, deps=tuple(bytes([i]) * 32 for i in range(5)))
    assert error_code(receive(session, publish(too_many))) is ErrorCode.TOO_MANY_DEPS


def test_oversized_and_malformed_frames() -> None:
    session = authenticated()
    assert error_code(receive(session, b"\x00" * 4097)) is ErrorCode.FRAME_TOO_LARGE
    assert error_code(receive(session, b"\xc1")) is ErrorCode.MALFORMED


def test_subscribe_and_unsubscribe_are_passed_on() -> None:
    session = authenticated()
    request = f.Subscribe(sub=3, ns=("t@local",), start={"t@local": 1})
    assert receive(session, f.encode_frame(request)) == Open(request)
    assert receive(session, f.encode_frame(f.Unsubscribe(sub=3))) == Close(3)


def test_a_bundle_is_answered_frame_by_frame() -> None:
    session = new_session()
    signed = event(1)
    frames = [
        auth_frame(),
        publish(signed, rid=1),
        b"\x81\xa1t\xa4nope",  # {"t": "nope"}
        publish(signed, rid=2),
    ]
    actions = list(session.receive(f.bundle(frames)))
    assert isinstance(actions[0], Reply) and isinstance(actions[0].frame, f.Welcome)
    assert actions[1] == Admit(1, signed)
    assert error_code(actions[2]) is ErrorCode.UNKNOWN_FRAME
    assert actions[3] == Admit(2, signed)
    assert error_code(receive(session, b"\x90")) is ErrorCode.MALFORMED  # empty bundle


def test_message_frames_are_checked_before_anything_is_stored() -> None:
    from agent_sdk.sealing import Header, Receipt, seal
    from relay.session import AckItem, Mail

    other = identity(3)
    header = Header(b"\x01" * 16, AGENT.public_key, other.public_key, b"s" * 8, 1, 0)
    good = seal(AGENT, header, "hi").encode()
    unauthenticated = new_session()
    action = receive(unauthenticated, f.encode_frame(f.MsgSend(rid=1, msg=good)))
    assert error_code(action) is ErrorCode.NOT_AUTHENTICATED
    session = authenticated()
    mail = receive(session, f.encode_frame(f.MsgSend(rid=2, msg=good, origin="forged")))
    assert isinstance(mail, Mail) and mail.origin == ""  # only relays set an origin
    theirs = seal(
        other, Header(b"\x02" * 16, other.public_key, AGENT.public_key, b"s" * 8, 1, 0), 1
    )
    bad = {
        "garbage": b"\x93not a message",
        "another sender": theirs.encode(),  # well signed, but not by this connection
        "forged signature": good[:-1] + bytes([good[-1] ^ 1]),
        # signed as it is, but a bool is not the int seq 15.2 says
        "seq true": seal(AGENT, dataclasses.replace(header, seq=True), "hi").encode(),
        # well signed (the signature covers a header encoded again), but not the
        # canonical bytes: its array's length in 3 bytes instead of 1 (15.2)
        "not canonical": b"\xdc\x00\x09" + good[1:],
    }
    for name, data in bad.items():
        action = receive(session, f.encode_frame(f.MsgSend(rid=3, msg=data)))
        assert error_code(action) is ErrorCode.BAD_MESSAGE, name
        assert action.frame.rid == 3  # type: ignore[union-attr]
    session.max_message = 1000  # under max_frame: the message limit is what refuses
    too_big = seal(AGENT, header, "x" * 1500).encode()
    action = receive(session, f.encode_frame(f.MsgSend(rid=4, msg=too_big)))
    assert error_code(action) is ErrorCode.MESSAGE_TOO_LARGE
    by_other = Receipt.make(other, header).encode()
    action = receive(session, f.encode_frame(f.MsgAck(sub=5, seq=1, receipt=by_other)))
    assert error_code(action) is ErrorCode.BAD_MESSAGE and action.frame.sub == 5  # type: ignore[union-attr]
    mine_header = Header(b"\x03" * 16, other.public_key, AGENT.public_key, b"s" * 8, 1, 0)
    mine = Receipt.make(AGENT, mine_header)
    ack = receive(session, f.encode_frame(f.MsgAck(sub=5, seq=1, receipt=mine.encode())))
    assert isinstance(ack, AckItem) and ack.receipt == mine
    short = Receipt.make(AGENT, dataclasses.replace(mine_header, id=b"\x03" * 8))
    action = receive(session, f.encode_frame(f.MsgAck(sub=5, seq=1, receipt=short.encode())))
    assert error_code(action) is ErrorCode.BAD_MESSAGE  # well signed, but a short id
    wide = b"\xdc\x00\x04" + mine.encode()[1:]  # the same receipt, not canonical
    action = receive(session, f.encode_frame(f.MsgAck(sub=5, seq=1, receipt=wide)))
    assert error_code(action) is ErrorCode.BAD_MESSAGE
    passed = f.MsgReceipt(rid=6, receipt=mine.encode(), relay="b")
    assert error_code(receive(session, f.encode_frame(passed))) is ErrorCode.BAD_MESSAGE


def test_a_publish_is_charged_before_its_signature_is_checked() -> None:
    from agent_sdk.errors import ProtocolError

    charged: list[tuple[str, int]] = []

    def charge(what: str, cost: int) -> None:
        charged.append((what, cost))
        if len(charged) > 2:
            raise ProtocolError(ErrorCode.RATE_LIMITED, "try again in 100 ms")

    session = new_session(max_frame=1 << 20)
    session.charge = charge
    assert isinstance(receive(session, auth_frame()).frame, f.Welcome)  # type: ignore[union-attr]
    bogus = f.encode_frame(f.Publish(rid=1, event=b"\x80", sig=b"s" * 64))
    first = receive(session, bogus)
    assert error_code(first) is ErrorCode.BAD_EVENT  # charged, then checked
    big = f.encode_frame(f.Publish(rid=1, event=b"\x80" * 40_000, sig=b"s" * 64))
    assert error_code(receive(session, big)) is ErrorCode.MALFORMED  # charged by its size
    second = receive(session, bogus)
    assert error_code(second) is ErrorCode.RATE_LIMITED  # refused before any check
    query = f.encode_frame(f.Query(rid=2, ns="x@local", q="wo.list"))
    assert error_code(receive(session, query)) is ErrorCode.RATE_LIMITED
    assert charged == [("publish", 1), ("publish", 3), ("publish", 1), ("request", 1)]
