"""The relay over real loopback sockets: publish, subscribe, replay, live, HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from websockets.exceptions import ConnectionClosed
from websockets.trio.client import connect

from agent_sdk import frames as f
from agent_sdk.client import Delivery, Live, RelayClient
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.wire import check_chain
from relay.node import RelayConfig
from relay.store import Record
from tests.conftest import RunningRelay, identity, start_relay

NS = "t@local"


async def test_two_agents_publish_and_subscribe(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, identity(1)) as alice,
        RelayClient.connect(relay.url, identity(2)) as bob,
        bob.subscribe(NS, start=1) as feed,
    ):
        first = await alice.publish(NS, "app.note", {"from": "alice"})
        second = await bob.publish(NS, "app.note", {"from": "bob"}, deps=[first.receipt.id])
        assert (first.receipt.seq, second.receipt.seq) == (1, 2)
        assert first.receipt.relay == relay.node.identity.public_key

        items = [await feed.__anext__() for _ in range(3)]
        live, *deliveries = items
        assert live == Live(NS, 0)  # subscribed before anything was published
        assert all(isinstance(d, Delivery) for d in deliveries)
        bodies = [d.event.event.body for d in deliveries]  # type: ignore[union-attr]
        assert bodies == [{"from": "alice"}, {"from": "bob"}]
        receipts = [d.receipt for d in deliveries]  # type: ignore[union-attr]
        assert receipts == [first.receipt, second.receipt]
        assert check_chain(receipts) is None
        assert all(d.event.verify() for d in deliveries)  # type: ignore[union-attr]


async def test_replay_then_live_marker_then_live_events(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        for n in range(5):
            await client.publish(NS, "app.note", n)
        async with client.subscribe(NS, start=3) as feed:
            got = [await feed.__anext__() for _ in range(3)]
            assert [d.receipt.seq for d in got] == [3, 4, 5]  # type: ignore[union-attr]
            assert await feed.__anext__() == Live(NS, 5)
            await client.publish(NS, "app.note", "live")
            live = await feed.__anext__()
            assert isinstance(live, Delivery) and live.receipt.seq == 6


async def test_filters_by_kind_family_and_author(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, identity(1)) as alice,
        RelayClient.connect(relay.url, identity(2)) as bob,
    ):
        await alice.publish(NS, "job.start", 1)
        await alice.publish(NS, "app.note", 2)
        await bob.publish(NS, "job.done", 3)
        await bob.publish(NS, "app.note", 4)
        await alice.publish(NS, "job", 5)  # not of the family job.*
        await alice.publish(NS, "jobs.start", 6)  # nor this: the family is "job."
        await alice.publish(NS, "job.start.retry", 7)  # this is

        async def bodies(**filters: object) -> list[object]:
            async with alice.subscribe(NS, start=1, **filters) as feed:  # type: ignore[arg-type]
                out = []
                async for item in feed:
                    if isinstance(item, Live):
                        return out
                    out.append(item.event.event.body)
            raise AssertionError("no live marker")

        assert await bodies(kinds=["job.*"]) == [1, 3, 7]
        assert await bodies(kinds=["app.note"]) == [2, 4]
        assert await bodies(kinds=["job"]) == [5]  # an exact kind is only itself
        assert await bodies(kinds=["job", "app.note"]) == [2, 4, 5]
        assert await bodies(authors=[bob.identity.public_key]) == [3, 4]
        assert await bodies(kinds=["job.*"], authors=[alice.identity.public_key]) == [1, 7]


async def test_one_subscription_over_several_namespaces(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        await client.publish("a@local", "app.x", "a1")
        await client.publish("b@local", "app.x", "b1")
        async with client.subscribe(["a@local", "b@local"], start=1) as feed:
            seen: dict[str, list[object]] = {"a@local": [], "b@local": []}
            lives = set()
            async for item in feed:
                if isinstance(item, Live):
                    lives.add(item.ns)
                    if len(lives) == 2:
                        break
                else:
                    seen[item.receipt.ns].append(item.event.event.body)
        assert seen == {"a@local": ["a1"], "b@local": ["b1"]}


async def test_health_and_info_on_the_same_port(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        await client.publish(NS, "app.x")
    port = int(relay.url.rsplit(":", 1)[1])

    async def get(path: str) -> tuple[str, str]:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data or not data.endswith(b"\n"):
                chunk = await stream.receive_some()
                if not chunk:
                    break
                data += chunk
        head, _, body = data.decode().partition("\r\n\r\n")
        headers[path] = head.lower()
        return head.split("\r\n")[0], body

    headers: dict[str, str] = {}
    status, body = await get("/health")
    assert status == "HTTP/1.1 200 OK" and body == "ok\n"
    status, body = await get("/info")
    info = json.loads(body)
    assert headers["/info"].count("content-type") == 1
    assert "content-type: application/json" in headers["/info"]
    assert info["name"] == "local"
    assert info["key"] == relay.node.identity.id
    assert info["namespaces"] == [NS]
    assert info["limits"]["max_frame"] == 1 << 20
    status, _ = await get("/nope")
    assert status == "HTTP/1.1 404 Not Found"
    status, body = await get("/info?fresh=1")  # a query string is the same page
    assert status == "HTTP/1.1 200 OK" and json.loads(body)["name"] == "local"


async def test_a_connection_that_never_authenticates_is_closed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    config = RelayConfig(name="local", auth_timeout=0.2)
    relay = await start_relay(nursery, tmp_path / "relay", config)
    async with connect(relay.url, compression=None) as ws:
        assert isinstance(f.decode_frame(await ws.recv()), f.Hello)
        await ws.send("text is not a frame")
        error = f.decode_frame(await ws.recv())
        assert isinstance(error, f.Error) and error.code == ErrorCode.MALFORMED
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()  # nothing more is sent: the relay gives up waiting for auth
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (
        1008,
        "1004 not_authenticated: auth timeout",
    )


async def test_nothing_of_a_subscription_follows_its_unsubscribed(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        for n in range(20):
            await client.publish(NS, "app.n", n)
    agent = identity(2)
    async with connect(relay.url, compression=None) as ws:
        hello = f.decode_frame(await ws.recv())
        assert isinstance(hello, f.Hello)
        sig = agent.sign(f.agent_auth_message(hello.relay, hello.challenge))
        auth = f.Auth(key=agent.public_key, sig=sig, challenge=bytes(32))
        subscribe = f.Subscribe(sub=1, ns=(NS,), start={NS: 1})
        frames = [auth, subscribe, f.Unsubscribe(sub=1), f.Subscribe(sub=2, ns=(NS,))]
        await ws.send(f.bundle([f.encode_frame(frame) for frame in frames]))
        seen: list[f.Frame] = []

        async def read_until(done: object) -> None:
            while not any(done(frame) for frame in seen):  # type: ignore[operator]
                for frame in f.decode_message(await ws.recv()):
                    assert not isinstance(frame, ProtocolError)
                    seen.append(frame)

        await read_until(lambda frame: isinstance(frame, f.Live) and frame.sub == 2)
        # A frame of sub 1 sent late could still be on its way: a query sent now is
        # answered after whatever the relay had queued, so read up to its result.
        await ws.send(f.encode_frame(f.Query(rid=9, ns=NS, q="wo.list")))
        await read_until(lambda frame: isinstance(frame, f.Result) and frame.rid == 9)
    unsubscribed = next(i for i, frame in enumerate(seen) if isinstance(frame, f.Unsubscribed))
    late = [frame for frame in seen[unsubscribed + 1 :] if getattr(frame, "sub", None) == 1]
    assert not late, [type(frame).__name__ for frame in seen]


async def test_a_replay_that_matches_nothing_gives_the_loop_up_after_each_batch(
    relay: RunningRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read from memory, a replay whose filter matches nothing never sends, so never
    waits: without a turn after each batch it would hold the relay's loop for the
    whole log, and every other agent with it."""
    async with RelayClient.connect(relay.url, identity(1)) as client:
        for n in range(300):
            await client.publish(NS, "app.note", n)
    timeline: list[str] = []
    read = relay.node.read

    async def recorded(ns: str, start: int, limit: int) -> list[Record]:
        records = await read(ns, start, limit)
        timeline.append("read")
        return records

    async def other_work() -> None:  # stands for every other connection's task
        while True:
            timeline.append("other")
            await trio.lowlevel.checkpoint()

    monkeypatch.setattr(relay.node, "read", recorded)
    async with (
        trio.open_nursery() as nursery,
        RelayClient.connect(relay.url, identity(2)) as reader,
        reader.subscribe(NS, start=1, kinds=("app.other",)) as feed,
    ):
        nursery.start_soon(other_work)
        assert await feed.__anext__() == Live(NS, 300)
        nursery.cancel_scope.cancel()
    reads = [i for i, what in enumerate(timeline) if what == "read"]
    assert len(reads) >= 5  # batches of 4, 8, 16, ... over 300 records in memory
    # Each scheduler pass runs every ready task once, in an order trio varies: the
    # other task runs about once per batch, and never if the replay holds the loop.
    between = timeline[reads[0] : reads[-1]].count("other")
    assert between >= len(reads) // 2, " ".join(timeline[reads[0] : reads[-1] + 1])


async def test_an_agent_the_relay_cannot_record_hears_no_welcome_and_may_connect_again(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """An agent is written to the inbox store before it hears ``welcome`` (a crash must
    not forget an agent that saw itself connected). When that write fails (a full
    disk), the connection is closed with 1011 and the reason, the relay goes on, and
    the agent's next connection writes it."""
    running = await start_relay(nursery, tmp_path / "relay")
    store = running.node.inboxes.store
    know, failed = store.know, []

    def full_once(agents: list[bytes]) -> None:
        if not failed:
            failed.append(agents)
            raise OSError("No space left on device")
        know(agents)

    store.know = full_once  # type: ignore[method-assign]
    agent = identity(7)
    with pytest.raises(ConnectionClosed) as closed:
        async with RelayClient.connect(running.url, agent, reconnect=False):
            pass
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    assert closed.value.rcvd.reason.startswith("5001 internal")
    assert agent.public_key not in running.node.inboxes.known
    async with RelayClient.connect(running.url, agent) as client:
        await client.publish("x@local", "app.note", "connected")
    assert failed and agent.public_key in running.node.inboxes.known
