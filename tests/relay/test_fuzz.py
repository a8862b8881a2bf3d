"""Frame fuzzing against a live relay (real loopback sockets, one relay per example).

Hypothesis sends random bytes, mutations of valid frames, and random sequences of
valid frames from several keys. Whatever comes, the relay must stay up, answer each
bad frame with an error (never close the connection for one), answer every request
exactly once, and leave another agent's state as it was: its log, its claim, its
ability to publish. Derandomized: the same examples every run.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from tempfile import TemporaryDirectory

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.trio.client import ClientConnection, connect

from agent_sdk import frames as f
from agent_sdk.client import RelayClient
from agent_sdk.identity import Identity
from agent_sdk.ledger import Ledger
from agent_sdk.wire import Event, sign_event
from relay.node import RelayConfig
from relay.sequencer import Limits
from tests.conftest import identity, start_relay

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
WITNESS, FUZZER = identity(1), identity(2)
WITNESS_NS = "witness@local"
TIMEOUT = 20


async def raw_agent(stack: AsyncExitStack, url: str, who: Identity) -> ClientConnection:
    """A connection that has done the handshake and nothing else (``stack`` closes it)."""
    ws = await stack.enter_async_context(connect(url, compression=None, max_size=None, proxy=None))
    hello = f.decode_frame(await ws.recv())  # type: ignore[arg-type]
    assert isinstance(hello, f.Hello)
    sig = who.sign(f.agent_auth_message(hello.relay, hello.challenge))
    await ws.send(f.encode_frame(f.Auth(key=who.public_key, sig=sig, challenge=b"c" * 32)))
    assert isinstance(f.decode_frame(await ws.recv()), f.Welcome)  # type: ignore[arg-type]
    return ws


def valid_frames(who: Identity, rng: random.Random) -> list[bytes]:
    """A few well-formed frames of every kind an agent sends, to mutate."""
    event = Event(ns="fuzz@local", kind="app.note", author=who.public_key, ts=1, nonce=b"n" * 16)
    signed = sign_event(event, who.sign)
    frames: list[f.AgentFrame] = [
        f.Publish(rid=1, event=signed.raw, sig=signed.sig),
        f.Subscribe(sub=2, ns=("fuzz@local",), start={"fuzz@local": 1}),
        f.Unsubscribe(sub=2),
        f.Query(rid=3, ns="fuzz@local", q="wo.list", args={}),
        f.DocOpen(sub=4, ns="fuzz@local", doc="d", sv=b""),
        f.MsgInbox(sub=5),
        f.MsgSend(rid=6, msg=rng.randbytes(200)),
        f.MsgAck(sub=5, seq=1),
    ]
    return [f.encode_frame(frame) for frame in frames]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """Flip, drop, insert or duplicate a few bytes."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        what = rng.randrange(4)
        at = rng.randrange(len(out) + 1)
        if what == 0 and out:
            out[min(at, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif what == 1 and out:
            del out[min(at, len(out) - 1)]
        elif what == 2:
            out.insert(at, rng.randrange(256))
        else:
            out[at:at] = out[max(0, at - 8) : at]
    return bytes(out)


async def witnessed(nursery: trio.Nursery, tmp: Path) -> tuple[str, RelayClient, Ledger, str, int]:
    """A relay with a witness agent that has published, and holds a claim."""
    config = RelayConfig(name="local", sequencer=Limits(park_timeout_ms=500))
    relay = await start_relay(nursery, tmp / "relay", config)
    witness = await nursery.start(_client, relay.url, WITNESS)
    ledger = Ledger(witness, WITNESS_NS)
    order = await ledger.create("keep me")
    await ledger.claim(order)
    head = (await witness.publish(WITNESS_NS, "app.note", "before")).receipt.seq
    return relay.url, witness, ledger, order, head


async def _client(url: str, who: Identity, *, task_status: trio.TaskStatus[RelayClient]) -> None:
    async with RelayClient.connect(url, who) as client:
        task_status.started(client)
        await trio.sleep_forever()


async def check_witness(witness: RelayClient, ledger: Ledger, order: str, head: int) -> None:
    """The witness's state is as it left it, and the relay still serves it."""
    shown = await ledger.show(order)
    assert shown["holder"] == WITNESS.public_key and shown["status"] == "claimed"
    after = await witness.publish(WITNESS_NS, "app.note", "after")
    assert after.receipt.seq == head + 1  # nothing slipped into the witness's log


async def answers_to(ws: ClientConnection, sent: int) -> list[f.Frame]:
    """Read until ``sent`` messages have each been answered (a fuzzed frame may be
    answered by one error, or by several for a bundle): one error at least per
    message, the connection still open. Returns the frames."""
    got: list[f.Frame] = []
    errors = 0
    while errors < sent:
        message = await ws.recv()
        assert isinstance(message, bytes)
        for frame in f.decode_message(message):
            assert not isinstance(frame, Exception), frame  # the relay speaks its protocol
            got.append(frame)
            errors += isinstance(frame, f.Error)
    return got


@FUZZ
@given(st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=12))
def test_random_bytes_get_errors_and_hurt_nobody(messages: Sequence[bytes]) -> None:
    async def main() -> None:
        with TemporaryDirectory() as tmp, trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
                url, witness, ledger, order, head = await witnessed(nursery, Path(tmp))
                ws = await raw_agent(stack, url, FUZZER)
                for data in messages:
                    await ws.send(data)
                await ws.send(b"")  # and an empty one: one more error, the last
                # Each message (a frame, or a bundle) gets an error at least: none of
                # these random bytes is a frame the relay could act on.
                frames = await answers_to(ws, len(messages) + 1)
                assert all(isinstance(fr, (f.Error, f.Result, f.Ack)) for fr in frames)
                await check_witness(witness, ledger, order, head)
                nursery.cancel_scope.cancel()

    trio.run(main)


@FUZZ
@given(st.integers(min_value=0, max_value=2**32), st.integers(min_value=1, max_value=10))
def test_mutated_frames_get_errors_and_hurt_nobody(seed: int, count: int) -> None:
    rng = random.Random(seed)

    async def main() -> None:
        with TemporaryDirectory() as tmp, trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
                url, witness, ledger, order, head = await witnessed(nursery, Path(tmp))
                ws = await raw_agent(stack, url, FUZZER)
                templates = valid_frames(FUZZER, rng)
                for _ in range(count):
                    await ws.send(mutate(rng.choice(templates), rng))
                # The connection is still open and still answers a valid request.
                await ws.send(f.encode_frame(f.Query(rid=999, ns="nope", q="wo.list")))
                while True:
                    message = await ws.recv()
                    assert isinstance(message, bytes)
                    frames = f.decode_message(message)
                    if any(getattr(fr, "rid", None) == 999 for fr in frames):
                        break
                await check_witness(witness, ledger, order, head)
                nursery.cancel_scope.cancel()

    trio.run(main)


OPERATIONS = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=2),  # which key
        st.sampled_from(["publish", "dep", "query", "subscribe", "unsubscribe", "claim", "policy"]),
        st.integers(min_value=0, max_value=3),  # a small argument
    ),
    min_size=1,
    max_size=25,
)


@FUZZ
@given(OPERATIONS)
def test_valid_frames_in_random_order_from_several_keys_are_each_answered_once(
    operations: Sequence[tuple[int, str, int]],
) -> None:
    keys = [identity(10 + n) for n in range(3)]

    async def main() -> None:
        with TemporaryDirectory() as tmp, trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
                url, witness, ledger, order, head = await witnessed(nursery, Path(tmp))
                sockets = [await raw_agent(stack, url, key) for key in keys]
                expected: list[set[int]] = [set() for _ in keys]
                for i, (who, op, arg) in enumerate(operations):
                    frame = _operation(keys[who], op, arg, rid=i + 1)
                    rid = getattr(frame, "rid", None)
                    if rid is not None:
                        expected[who].add(rid)
                    await sockets[who].send(f.encode_frame(frame))
                for who, ws in enumerate(sockets):
                    answered: list[int] = []
                    while len(answered) < len(expected[who]):
                        message = await ws.recv()
                        assert isinstance(message, bytes)
                        for frame in f.decode_message(message):
                            assert not isinstance(frame, Exception), frame
                            rid = getattr(frame, "rid", None)
                            if rid is not None and not isinstance(frame, f.Queued):
                                answered.append(rid)
                    assert sorted(answered) == sorted(expected[who])  # each exactly once
                await check_witness(witness, ledger, order, head)
                nursery.cancel_scope.cancel()

    trio.run(main)


def _operation(who: Identity, op: str, arg: int, rid: int) -> f.AgentFrame:
    ns = f"fuzz-{arg % 2}@local"
    if op in ("publish", "dep"):
        deps = (bytes([arg]) * 32,) if op == "dep" else ()  # a dep nobody has: parks, then fails
        event = Event(
            ns=ns, kind="app.note", author=who.public_key, ts=1, nonce=rid.to_bytes(16, "big"),
            deps=deps, body=arg,
        )  # fmt: skip
        signed = sign_event(event, who.sign)
        return f.Publish(rid=rid, event=signed.raw, sig=signed.sig)
    if op == "claim":
        event = Event(
            ns=WITNESS_NS, kind="wo.claim", author=who.public_key, ts=1,
            nonce=rid.to_bytes(16, "big"), body={"wo": "wo-1"},
        )  # fmt: skip
        signed = sign_event(event, who.sign)  # someone else's order: refused, not taken
        return f.Publish(rid=rid, event=signed.raw, sig=signed.sig)
    if op == "policy":  # the owner's closes the namespace to the others; the rest refused
        body = [{"mode": "private"}, {"mode": "public"}, {"mode": []}, {"mode": "listed"}][arg]
        event = Event(
            ns=ns, kind="ns.policy", author=who.public_key, ts=1,
            nonce=rid.to_bytes(16, "big"), body=body,
        )  # fmt: skip
        signed = sign_event(event, who.sign)
        return f.Publish(rid=rid, event=signed.raw, sig=signed.sig)
    if op == "query":
        q = ["wo.list", "dir.count", "no.such", "wo.show"][arg]
        return f.Query(rid=rid, ns=ns, q=q, args={"online": True} if q == "dir.count" else {})
    if op == "subscribe":
        return f.Subscribe(sub=arg, ns=(ns,), start={ns: 1})
    return f.Unsubscribe(sub=arg)


async def test_frames_bundled_with_auth_and_repeated_bad_auth_are_handled(tmp_path: Path) -> None:
    """``auth`` and ``msg.*`` frames in one message are served in order; a connection
    that fails ``auth`` three times is closed (each attempt costs a check)."""
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        relay = await start_relay(nursery, tmp_path / "relay")
        ws = await stack.enter_async_context(
            connect(relay.url, compression=None, max_size=None, proxy=None)
        )
        hello = f.decode_frame(await ws.recv())  # type: ignore[arg-type]
        assert isinstance(hello, f.Hello)
        sig = FUZZER.sign(f.agent_auth_message(hello.relay, hello.challenge))
        auth = f.Auth(key=FUZZER.public_key, sig=sig, challenge=b"c" * 32)
        await ws.send(f.bundle([f.encode_frame(auth), f.encode_frame(f.MsgInbox(sub=1))]))
        seen: list[object] = []
        while not any(isinstance(x, f.Live) for x in seen):
            seen += f.decode_message(await ws.recv())  # type: ignore[arg-type]
        assert isinstance(seen[0], f.Welcome)  # then the inbox stream went live
        bad = f.Auth(key=WITNESS.public_key, sig=b"s" * 64, challenge=b"c" * 32)
        other = await stack.enter_async_context(
            connect(relay.url, compression=None, max_size=None, proxy=None)
        )
        await other.recv()  # hello
        await other.send(f.bundle([f.encode_frame(bad)] * 5))
        codes = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                for frame in f.decode_message(await other.recv()):  # type: ignore[arg-type]
                    codes.append(getattr(frame, "code", None))
        assert set(codes) <= {1005} and len(codes) <= 3  # (errors may not beat the close)
        assert closed.value.rcvd is not None and "too many attempts" in closed.value.rcvd.reason
        nursery.cancel_scope.cancel()
