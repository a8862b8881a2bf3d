"""The participant directory through real relays: joins, presence, leaves, queries."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from agent_sdk.client import Delivery, Live, RelayClient
from agent_sdk.directory import Directory
from agent_sdk.identity import Identity
from agent_sdk.ledger import LedgerRefusal
from agent_sdk.wire import Event, decode, sign_event
from relay.coordination.host import Host
from relay.node import RelayConfig, RelayNode
from relay.sequencer import Limits
from relay.store.memory import MemoryStore
from tests.conftest import RunningRelay, identity, start_relay
from tests.relay.test_node import virtual_wall

NS = "crew@local"
RELAY = identity(2)


def member(n: int) -> Identity:
    """Identities for crowds (``identity`` covers 0 to 255)."""
    return Identity.from_seed((10_000 + n).to_bytes(32, "big"))


async def test_two_hundred_join_fifty_drop_and_a_hundred_fifty_stay_online(
    relay: RunningRelay,
) -> None:
    total, dropped = 200, 50
    joined_all, leaves_seen, release = trio.Event(), trio.Event(), trio.Event()
    joined: list[bytes] = []
    left: list[dict[str, Any]] = []
    clients: dict[bytes, RelayClient] = {}

    async def watch(task_status: trio.TaskStatus[None]) -> None:
        async with (
            RelayClient.connect(relay.url, identity(1)) as watcher,
            watcher.subscribe(NS, kinds=["dir.*"]) as feed,
        ):
            task_status.started()
            async for item in feed:
                if isinstance(item, Live):
                    continue
                assert isinstance(item, Delivery)
                if item.event.event.kind == "dir.left":
                    left.append(item.event.event.body)
                    if len(left) == dropped:
                        leaves_seen.set()

    async def agent(n: int) -> None:
        me = member(n)
        try:
            async with RelayClient.connect(relay.url, me, reconnect=False) as client:
                clients[me.public_key] = client
                await Directory(client, NS).join(f"agent-{n}", capabilities=["worker"])
                joined.append(me.public_key)
                if len(joined) == total:
                    joined_all.set()
                await release.wait()
        except Exception:
            if n >= dropped:
                raise  # only the dropped ones may lose their connection

    async with trio.open_nursery() as nursery:
        await nursery.start(watch)
        for n in range(total):
            nursery.start_soon(agent, n)
        await joined_all.wait()
        gone = {member(n).public_key for n in range(dropped)}
        for key in gone:  # abruptly: the TCP stream, no WebSocket close
            ws = clients[key].ws
            assert ws is not None
            await ws.stream.aclose()
        await leaves_seen.wait()
        async with RelayClient.connect(relay.url, identity(3)) as reader:
            directory = Directory(reader, NS)
            online = await directory.list()
            assert len(online) == total - dropped == await directory.count()
            assert not gone & {p["agent"] for p in online}
            assert await directory.count(online=False) == total
        assert {body["agent"] for body in left} == gone
        assert {body["reason"] for body in left} == {"disconnected"}
        release.set()
        nursery.cancel_scope.cancel()  # the watcher follows the log for ever


async def test_profiles_queries_and_a_leave(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, identity(1)) as one,
        RelayClient.connect(relay.url, identity(3)) as two,
    ):
        first, second = Directory(one, NS), Directory(two, NS)
        profile = await first.join(
            "indexer", capabilities=["python@3.11", "search"], role="worker", meta={"cpu": 4}
        )
        assert profile["first"] and profile["presence"] == "connection"
        await second.join("planner", capabilities=["python@3.12"], role="coordinator")
        assert [p["name"] for p in await first.find("python")] == ["indexer", "planner"]
        assert [p["name"] for p in await first.find("python@3.11")] == ["indexer"]
        assert [p["name"] for p in await first.find("python", role="coordinator")] == ["planner"]
        got = await second.get(identity(1).public_key)
        assert got["meta"] == {"cpu": 4} and got["online"]
        again = await first.join("indexer-2", capabilities=["search"])
        assert not again["first"]  # a new profile, the same member
        await second.leave()
        assert [p["name"] for p in await first.list()] == ["indexer-2"]
        everyone = await first.list(online=False)
        assert [(p["name"], p["online"], p["reason"]) for p in everyone] == [
            ("indexer-2", True, ""),
            ("planner", False, "left"),
        ]
        with pytest.raises(LedgerRefusal) as info:
            await second.leave()
        assert info.value.problem == "not_joined"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"name": ""}, "bad_request"),
        ({"name": "x", "capabilities": ["Has Spaces"]}, "bad_request"),
        ({"name": "x", "capabilities": "python"}, "bad_request"),
        ({"name": "x", "heartbeat_ms": 10}, "bad_request"),
        ({"name": "x", "heartbeat_ms": 86_400_001}, "bad_request"),  # past 24 h
        ({"name": "x", "meta": b"bytes"}, "bad_request"),
        ({"name": "x", "unknown": 1}, "bad_request"),
    ],
)
async def test_bad_joins_are_refused(
    relay: RunningRelay, body: dict[str, Any], problem: str
) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        published = await client.publish(NS, "dir.join", body)
        assert published.outcome is not None
        verdict = published.outcome.event.event
        assert verdict.kind == "dir.rejected" and verdict.body["problem"] == problem
        assert await Directory(client, NS).count(online=False) == 0
        with pytest.raises(LedgerRefusal) as info:
            await Directory(client, NS).heartbeat()  # not a heartbeat member
        assert info.value.problem == "not_joined"


async def test_heartbeat_presence_times_out_at_its_expiry(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    node = RelayNode(RELAY, MemoryStore(), RelayConfig(), wall_ms=virtual_wall())
    await nursery.start(node.run)
    agent = identity(1)
    nonce = 0

    async def ask(kind: str, body: Any) -> dict[str, Any]:
        nonlocal nonce
        nonce += 1
        event = Event(NS, kind, agent.public_key, body, ts=node.wall_ms(), nonce=bytes([nonce]))
        request = await node.publish(sign_event(event, agent.sign))
        located = node.outcome_of(request.id)
        assert located is not None
        return dict(decode((await node.committed_record(located.ns, located.seq)).event)["body"])

    joined = await ask("dir.join", {"name": "cron-agent", "heartbeat_ms": 5_000})
    assert joined["presence"] == "heartbeat"
    await trio.sleep(3)
    alive = await ask("dir.heartbeat", {})
    assert (
        alive["expires_ms"] == node.wall_ms() + 5_000 or alive["expires_ms"] > joined["expires_ms"]
    )
    await trio.sleep(4.9)
    assert (await node.query(NS, "dir.count", {}))["count"] == 1
    await trio.sleep(0.2)  # past the expiry: the timer writes the leave
    await trio.testing.wait_all_tasks_blocked()
    assert (await node.query(NS, "dir.count", {}))["count"] == 0
    records = list(node.store.scan(NS))
    last = decode(records[-1].event)
    assert last["kind"] == "dir.left" and last["body"]["reason"] == "timeout"
    assert last["body"]["at_ms"] == alive["expires_ms"]  # stamped with the expiry itself
    replayed = Host(RELAY.public_key)
    replayed.rebuild(records)
    assert replayed.coordinators[NS].directory == node.coordination.coordinators[NS].directory


async def test_a_restarted_relay_says_its_connection_members_left(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    data = tmp_path / "relay"
    first = await start_relay(nursery, data)
    async with RelayClient.connect(first.url, identity(1)) as client:
        await Directory(client, NS).join("short-lived")
    first.scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    second = await start_relay(nursery, data)
    async with RelayClient.connect(second.url, identity(3)) as client:
        directory = Directory(client, NS)
        assert await directory.count() == 0
        [member] = await directory.list(online=False)
        assert member["reason"] in ("disconnected", "relay restarted")
    second.scope.cancel()


async def test_listing_pages_past_a_member_who_went_offline(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as reader:
        for n in range(3):
            async with RelayClient.connect(relay.url, member(n)) as client:
                await Directory(client, NS).join(f"m{n}", heartbeat_ms=3_600_000)
        first = await reader.query(NS, "dir.list", {"limit": 1})
        [one] = first["participants"]
        assert first["more"]
        async with RelayClient.connect(relay.url, member(0)) as client:
            await Directory(client, NS).leave()  # the page's last member goes away
        rest = await reader.query(NS, "dir.list", {"limit": 10, "after": one["agent"]})
        assert [p["name"] for p in rest["participants"]] == ["m1", "m2"]
        assert (await reader.query(NS, "dir.count", {"online": None}))["count"] == 2


async def test_a_member_by_connection_joins_again_after_a_reconnect(relay: RunningRelay) -> None:
    from tests.agent_sdk.test_client import drop_every_connection

    async with (
        RelayClient.connect(relay.url, identity(1)) as watcher,
        watcher.subscribe(NS, kinds=["dir.joined", "dir.left"]) as feed,
        RelayClient.connect(relay.url, identity(3)) as client,
    ):
        await Directory(client, NS).join("steady")
        await drop_every_connection(relay)  # the network blips; both clients reconnect
        joins = 0
        async for item in feed:
            if isinstance(item, Delivery) and item.event.event.kind == "dir.joined":
                joins += 1
                if joins == 2:  # the first join, and the one after the reconnect
                    break
        assert await Directory(client, NS).count() == 1


async def test_find_pages_and_refuses_a_malformed_capability(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as reader:
        for n in range(3):
            async with RelayClient.connect(relay.url, member(n)) as client:
                await Directory(client, NS).join(
                    f"m{n}", capabilities=["rust"], heartbeat_ms=60_000
                )
        page = await reader.query(NS, "dir.find", {"capability": "rust", "limit": 2})
        assert [p["name"] for p in page["participants"]] == ["m0", "m1"] and page["more"]
        last = page["participants"][-1]["agent"]
        rest = await reader.query(NS, "dir.find", {"capability": "rust", "after": last})
        assert [p["name"] for p in rest["participants"]] == ["m2"] and not rest["more"]
        assert len(await Directory(reader, NS).find("rust")) == 3
        from agent_sdk.errors import ErrorCode, ProtocolError

        with pytest.raises(ProtocolError) as info:
            await reader.query(NS, "dir.find", {"capability": "Not A Tag"})
        assert info.value.code is ErrorCode.BAD_QUERY


async def test_a_connection_closed_before_its_join_is_answered_leaves_no_ghost(
    relay: RunningRelay,
) -> None:
    import time

    from agent_sdk.client import _publish_frame

    ghost = identity(5)
    async with (
        RelayClient.connect(relay.url, identity(1)) as watcher,
        watcher.subscribe(NS, kinds=["dir.joined", "dir.left"]) as feed,
    ):
        from websockets.exceptions import ConnectionClosed

        with pytest.raises(ConnectionClosed):  # the client notices its connection is gone
            async with RelayClient.connect(relay.url, ghost, reconnect=False) as client:
                ts = time.time_ns() // 10**6
                event = Event(NS, "dir.join", ghost.public_key, {"name": "ghost"}, ts=ts)
                assert client.ws is not None
                await client.ws.send(_publish_frame(1, sign_event(event, ghost.sign)))
                await client.ws.stream.aclose()  # gone before the answer could come back
                await trio.sleep_forever()
        with trio.fail_after(10):
            await joined_then_left(feed, ghost)
        assert await Directory(watcher, NS).count() == 0


def test_a_member_past_its_heartbeat_may_leave_until_it_is_timed_out() -> None:
    """protocol 8.11: a heartbeat member past ``expires_ms`` whose ``timeout`` is not
    written yet may still leave (and then the timer writes nothing for it)."""
    from relay.coordination.requests import Coordinator

    agent = b"A" * 32
    coordinator = Coordinator()
    coordinator.decide("dir.join", {"name": "a", "heartbeat_ms": 1_000}, agent, b"j", 1_000)
    left = coordinator.decide("dir.leave", {}, agent, b"l", 2_500)
    assert (left.kind, left.body["reason"]) == ("dir.left", "left")
    assert coordinator.due(3_000) == []
    again = coordinator.decide("dir.leave", {}, agent, b"m", 3_000)
    assert (again.kind, again.body["problem"]) == ("dir.rejected", "not_joined")


def test_heartbeat_presence_ends_at_its_expires_ms_itself() -> None:
    """protocol 8.11: online until ``expires_ms``, offline from it on: a heartbeat at
    that very ms is refused, the queries no longer count the member, and the timer's
    ``dir.left`` at that ms is stamped with it."""
    from relay.coordination.queries import answer
    from relay.coordination.requests import Coordinator

    agent = b"A" * 32
    coordinator = Coordinator()
    coordinator.decide("dir.join", {"name": "a", "heartbeat_ms": 1_000}, agent, b"j", 1_000)
    alive = coordinator.decide("dir.heartbeat", {}, agent, b"h", 1_999)
    assert alive is not None and alive.body["expires_ms"] == 2_999
    count = lambda now: answer(coordinator, "dir.count", {}, now, 1 << 20)["count"]  # noqa: E731
    assert (count(2_998), count(2_999)) == (1, 0)
    late = coordinator.decide("dir.heartbeat", {}, agent, b"l", 2_999)
    assert late is not None and (late.kind, late.body["problem"]) == ("dir.rejected", "not_joined")
    [left] = coordinator.due(2_999)
    assert (left.kind, left.body) == (
        "dir.left",
        {"agent": agent, "reason": "timeout", "at_ms": 2_999},
    )


def test_only_the_first_join_is_first_and_grants_the_initial_stake() -> None:
    """protocol 8.11: ``first`` and ``granted`` (the relay's initial stake, 100 by
    default) on a member's first join only; joining again, after a leave too, grants
    nothing more."""
    from relay.coordination.queries import answer
    from relay.coordination.requests import Coordinator

    agent, other = b"A" * 32, b"B" * 32
    coordinator = Coordinator()
    said = []
    for n, (who, kind) in enumerate(
        [(agent, "dir.join"), (agent, "dir.join"), (agent, "dir.leave"), (agent, "dir.join"),
         (other, "dir.join")]
    ):  # fmt: skip
        body = {"name": "a"} if kind == "dir.join" else {}
        outcome = coordinator.decide(kind, body, who, bytes([n]), 1_000 + n)
        assert outcome is not None
        said.append((outcome.body.get("first"), outcome.body.get("granted")))
    assert said == [(True, 100), (False, 0), (None, None), (False, 0), (True, 100)]
    shown = answer(coordinator, "stake.show", {"agent": agent}, 2_000, 1 << 20)
    assert (shown["balance"], shown["granted_total"]) == (100, 200)


async def test_joining_again_after_a_reconnect_is_once_per_namespace(
    relay: RunningRelay,
) -> None:
    """Each Directory object added a reconnect hook of its own, which a leave through
    another object did not stop: the agent was online again after a drop."""
    async with RelayClient.connect(relay.url, identity(1)) as client:
        for n in range(3):
            await Directory(client, NS).join("worker", meta={"n": n})
        [rejoin] = client.on_reconnect
        await Directory(client, NS).leave()
        head = relay.node.head(NS)
        await rejoin()  # left, through another object: nothing is joined again
        assert relay.node.head(NS) == head


async def test_a_refused_rejoin_does_not_stop_the_client(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A rejoin refused with anything but a ledger refusal (rate_limited, say) escaped
    into the connection and stopped the whole client."""
    from agent_sdk.client import _run_hook
    from relay.limits import RateLimits

    limits = RateLimits(publish_rate=0.01, publish_burst=1)
    relay = await start_relay(nursery, tmp_path / "relay", RelayConfig(rate_limits=limits))
    async with RelayClient.connect(relay.url, identity(1)) as client:
        await Directory(client, NS).join("worker")  # the only token
        [rejoin] = client.on_reconnect
        await rejoin()  # rate_limited: logged, not raised

    async def failing() -> None:
        raise ValueError("a hook's own bug")

    await _run_hook(failing)  # the connection it runs in goes on


async def test_a_connection_closed_while_its_join_is_parked_leaves_no_ghost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A join parked for a dependency, its connection closed meanwhile: the connection
    waited JOIN_WAIT (10 s) for it, then said its agent had left (nothing to end: not
    joined yet). The dependency came within park_timeout, the join was released and the
    agent was online for good with no connection. The close waits for the park too now.
    (Virtual time, over the in-memory network.)"""
    from agent_sdk.client import _publish_frame
    from relay.server import JOIN_WAIT, serve_relay
    from simulations.memnet import MemoryListener

    parked_ms = 30_000  # set above JOIN_WAIT
    config = RelayConfig(sequencer=Limits(park_timeout_ms=parked_ms))
    node = RelayNode(RELAY, MemoryStore(), config, wall_ms=virtual_wall())
    listener = MemoryListener("directory")
    ghost, writer = identity(5), identity(1)

    def connect(who: Identity) -> RelayClient:
        return RelayClient.connect(  # type: ignore[return-value]
            "ws://directory.sim/", who, dial=listener.dial, reconnect=False
        )

    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        await nursery.start(
            lambda task_status: serve_relay(node, listeners=[listener], task_status=task_status)
        )
        ts = node.wall_ms()
        dep = sign_event(Event(NS, "app.note", writer.public_key, "first", ts=ts), writer.sign)
        join = Event(NS, "dir.join", ghost.public_key, {"name": "ghost"}, deps=(dep.id,), ts=ts)
        async with (
            connect(writer) as watcher,
            watcher.subscribe(NS, kinds=["dir.joined", "dir.left"]) as feed,
        ):
            from websockets.exceptions import ConnectionClosed

            with pytest.raises(ConnectionClosed):
                async with connect(ghost) as client:
                    assert client.ws is not None
                    await client.ws.send(_publish_frame(1, sign_event(join, ghost.sign)))
                    await client.ws.stream.aclose()  # gone before its join could be decided
                    await trio.sleep_forever()
            await trio.sleep(JOIN_WAIT + 5)  # past JOIN_WAIT, within the park
            assert node.sequencer.parked_count == 1
            await watcher.publish_signed(dep)  # the join's dependency: it is released
            with trio.fail_after(parked_ms / 1000):
                await joined_then_left(feed, ghost)
            assert await Directory(watcher, NS).count() == 0
        nursery.cancel_scope.cancel()


async def joined_then_left(feed: AsyncIterator[Any], agent: Identity) -> None:
    """Read ``feed`` until ``agent``'s ``dir.joined`` and then its ``dir.left``."""
    kinds: list[str] = []
    async for item in feed:
        if isinstance(item, Delivery) and item.event.event.body["agent"] == agent.public_key:
            kinds.append(item.event.event.kind)
            if kinds == ["dir.joined", "dir.left"]:
                return
    raise AssertionError(f"the feed ended after {kinds}")
