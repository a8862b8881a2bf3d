"""Routing across relays: causal dependencies on foreign events, forwarded queries and
directory look-ups, two-hop routes, and what ``GET /info`` says about it all.

Real relays on loopback sockets, in one process (the process tests in this folder
cover kills and partitions).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import trio
import trio.testing

from agent_sdk.client import Delivery, Live, Published, RelayClient
from agent_sdk.directory import Directory
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.ledger import Ledger
from agent_sdk.wire import ZERO_HASH, Event, make_receipt, sign_event
from federation.network import Federation, FederationConfig, Mirror
from federation.outbox import Entry, MemoryOutboxStore
from federation.peers import Peer
from relay.node import RelayConfig, RelayNode
from relay.sequencer import Limits
from relay.store.memory import MemoryStore
from tests.conftest import RunningRelay, identity
from tests.federation.fixtures import federation_of, plan, start

TIMEOUT = 30


async def pair(
    nursery: trio.Nursery, tmp_path: Path, park_timeout_ms: int = 10_000
) -> tuple[RunningRelay, RunningRelay]:
    relays = plan(tmp_path, "a", "b")
    limits = Limits(park_timeout_ms=park_timeout_ms)
    a = await start(
        nursery, relays["a"], (relays["b"].peer(),), RelayConfig(name="a", sequencer=limits)
    )
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    await federation_of(a).links["b"].wait_up()
    await federation_of(b).links["a"].wait_up()
    return a, b


async def test_an_event_depending_on_a_foreign_one_waits_for_it_in_a_mirror(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    a, b = await pair(nursery, tmp_path)
    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(a.url, identity(1)) as agent:
            first = await agent.publish("x@b", "app.note", "on b")  # forwarded
            second = await agent.publish("y@a", "app.note", "on a", deps=[first.receipt.id])
    # a sequenced it only once it held the dependency: its mirror of x@b has it...
    assert a.node.head("x@b") >= first.receipt.seq
    assert a.node.sequencer.locate(first.receipt.id) is not None
    # ...and the receipt's hlc is past the dependency's, across relays (protocol §4.3).
    assert second.receipt.hlc > first.receipt.hlc
    assert second.receipt.relay == a.node.identity.public_key
    assert first.receipt.relay == b.node.identity.public_key


async def test_a_dependency_this_relay_never_saw_is_located_at_a_peer(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    a, b = await pair(nursery, tmp_path, park_timeout_ms=2_000)
    with trio.fail_after(TIMEOUT):
        async with (
            RelayClient.connect(b.url, identity(2)) as on_b,
            RelayClient.connect(a.url, identity(3)) as on_a,
        ):
            unseen = await on_b.publish("x@b", "app.note", "published on b directly")
            after = await on_a.publish("y@a", "app.note", "needs it", deps=[unseen.receipt.id])
            assert after.receipt.hlc > unseen.receipt.hlc
            assert a.node.head("x@b") >= unseen.receipt.seq  # a asked b, then mirrored
            with pytest.raises(ProtocolError) as nowhere:  # an id nobody knows
                await on_a.publish("y@a", "app.note", "needs a ghost", deps=[bytes(32)])
            assert nowhere.value.code is ErrorCode.MISSING_DEPS


async def test_queries_and_directory_lookups_are_answered_by_the_home(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    a, b = await pair(nursery, tmp_path)
    with trio.fail_after(TIMEOUT):
        async with (
            RelayClient.connect(b.url, identity(4)) as on_b,
            RelayClient.connect(a.url, identity(5)) as on_a,
        ):
            await Directory(on_b, "team@b").join("builder", capabilities=["rust@1.80"])
            found = await Directory(on_a, "team@b").find("rust")
            assert [p["agent"] for p in found] == [on_b.identity.public_key]
            member = await Directory(on_a, "team@b").get(on_b.identity.public_key)
            assert member["name"] == "builder" and member["online"]
            order = await Ledger(on_a, "team@b").create("ported")
            assert (await Ledger(on_b, "team@b").show(order))["title"] == "ported"
            with pytest.raises(ProtocolError) as missing:
                await Ledger(on_a, "team@b").show("no-such-order")
            assert missing.value.code is ErrorCode.NOT_FOUND  # the home's own answer
            with pytest.raises(ProtocolError) as nowhere:
                await on_a.query("team@z", "wo.list", {})
            assert nowhere.value.code is ErrorCode.NOT_HOME


async def test_a_relay_reaches_another_through_a_peer_and_checks_its_key(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relays = plan(tmp_path, "a", "b", "c")
    a_, b_, c_ = relays["a"], relays["b"], relays["c"]
    via_b = Peer("c", c_.key, via="b")
    a = await start(nursery, a_, (b_.peer(), via_b))
    b = await start(nursery, b_, (a_.peer(), c_.peer()))
    c = await start(nursery, c_, (b_.peer(),))
    with trio.fail_after(TIMEOUT):
        await federation_of(a).links["b"].wait_up()
        await federation_of(b).links["c"].wait_up()
        async with RelayClient.connect(a.url, identity(6)) as agent:
            sent = [await agent.publish("z@c", "app.note", n) for n in range(3)]
            assert {p.receipt.relay for p in sent} == {c.node.identity.public_key}
            seen = []
            async with agent.subscribe("z@c", start=1) as feed:  # a's mirror, fed by b's
                async for item in feed:
                    if isinstance(item, Live):
                        break
                    assert isinstance(item, Delivery)
                    seen.append(item.receipt.raw)
    assert seen == [p.receipt.raw for p in sent]
    assert a.node.head("z@c") == b.node.head("z@c") == 3  # both mirror it
    assert "z@c" not in a.node.namespaces()  # mirrored, not homed


async def test_info_reports_links_outboxes_and_mirrors(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    a, b = await pair(nursery, tmp_path)
    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(a.url, identity(7)) as agent:
            await agent.publish("x@b", "app.note", 1)
            async with agent.subscribe("x@b", start=1) as feed:
                async for item in feed:
                    if isinstance(item, Live):
                        break
                url = a.url.replace("ws://", "http://") + "/info"
                info = json.loads(
                    await trio.to_thread.run_sync(lambda: urllib.request.urlopen(url).read())
                )
    fed = info["federation"]
    [peer] = fed["peers"]
    assert peer["name"] == "b" and peer["up"] and peer["delivered"] == 1 and peer["outbox"] == 0
    assert peer["key"] == b.node.identity.public_key.hex()
    assert fed["mirrors"]["x@b"]["head"] == 1 and fed["mirrors"]["x@b"]["lag"] == 0
    assert fed["forgeries"] == 0 and info["namespaces"] == []


async def test_info_leaves_out_the_mirrors_of_private_namespaces(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """/info is anonymous, and lists no private namespace of this relay: nor of the
    ones it mirrors (their names and heads)."""
    from agent_sdk.access import set_policy

    a, b = await pair(nursery, tmp_path)
    reader = identity(7)
    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(b.url, reader) as owner:
            await owner.publish("team@b", "app.note", 1)
            readers = [reader.public_key, a.node.identity.public_key]
            await set_policy(owner, "team@b", "private", readers=readers)
        async with RelayClient.connect(a.url, reader) as agent:
            await agent.publish("x@b", "app.note", 1)  # a public one, mirrored too
            for ns in ("team@b", "x@b"):
                async with agent.subscribe(ns, start=1) as feed:
                    async for item in feed:
                        if isinstance(item, Live):
                            break
        url = a.url.replace("ws://", "http://") + "/info"
        info = json.loads(await trio.to_thread.run_sync(lambda: urllib.request.urlopen(url).read()))
    assert a.node.head("team@b") == 2  # mirrored here
    assert set(info["federation"]["mirrors"]) == {"x@b"}


async def test_a_peer_is_not_told_where_events_of_namespaces_it_may_not_read_are(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    from agent_sdk.access import set_policy
    from federation.network import LOCATE

    a, b = await pair(nursery, tmp_path, park_timeout_ms=2_000)
    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(b.url, identity(2)) as owner:
            await owner.publish("secret@b", "app.note", "created")
            await set_policy(owner, "secret@b", "private")  # a is not a reader
            hidden = await owner.publish("secret@b", "app.note", "hidden")
            shown = await owner.publish("open@b", "app.note", "shown")
        link = await federation_of(a).links["b"].wait_up()
        ids = [hidden.receipt.id, shown.receipt.id]
        found = await link.query("fed@b", LOCATE, {"ids": ids})
        assert found == [[shown.receipt.id, "open@b", 1]]
        async with RelayClient.connect(a.url, identity(3)) as on_a:
            with pytest.raises(ProtocolError) as refused:
                await on_a.publish("y@a", "app.note", "x", deps=[hidden.receipt.id])
            assert refused.value.code is ErrorCode.MISSING_DEPS


async def test_a_relay_does_not_pass_on_a_hint_of_a_namespace_whose_policy_it_lacks(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """a forwarded a write to b's private namespace and keeps where it landed (a
    hint), but cannot know the namespace is private: it tells c nothing of it."""
    from agent_sdk.access import set_policy
    from federation.network import LOCATE

    relays = plan(tmp_path, "a", "b", "c")
    peers = {name: tuple(r.peer() for n, r in relays.items() if n != name) for name in relays}
    running = {name: await start(nursery, relays[name], peers[name]) for name in relays}
    a, c = running["a"], running["c"]
    owner = identity(2)
    with trio.fail_after(TIMEOUT):
        await federation_of(a).links["b"].wait_up()
        async with RelayClient.connect(running["b"].url, owner) as on_b:
            await on_b.publish("secret@b", "app.note", "created")
            await set_policy(on_b, "secret@b", "private")  # neither a nor c reads it
        async with RelayClient.connect(a.url, owner) as on_a:
            hidden = await on_a.publish("secret@b", "app.note", "hidden")  # forwarded
            shown = await on_a.publish("open@b", "app.note", "shown")
        assert hidden.receipt.id in federation_of(a).hints
        link = await federation_of(c).links["a"].wait_up()
        ids = [hidden.receipt.id, shown.receipt.id]
        assert await link.query("fed@a", LOCATE, {"ids": ids}) == []  # a mirrors neither


async def test_a_peer_is_told_where_events_a_mirror_holds_are_up_to_its_head(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """14.11: a relay answers ``fed.locate`` for events in a mirror "up to that seq":
    the record at the mirror's head included."""
    from federation.network import LOCATE

    relays = plan(tmp_path, "a", "b", "c")
    peers = {name: tuple(r.peer() for n, r in relays.items() if n != name) for name in relays}
    running = {name: await start(nursery, relays[name], peers[name]) for name in relays}
    a, c = running["a"], running["c"]
    with trio.fail_after(TIMEOUT):
        await federation_of(a).links["b"].wait_up()
        async with RelayClient.connect(a.url, identity(2)) as on_a:
            written = [await on_a.publish("open@b", "app.note", n) for n in range(2)]
            async with on_a.subscribe("open@b", start=1) as feed:  # a's mirror: seq 1, 2
                async for item in feed:
                    if isinstance(item, Live):
                        break
        assert a.node.head("open@b") == 2
        link = await federation_of(c).links["a"].wait_up()
        ids = [published.receipt.id for published in written]
        found = await link.query("fed@a", LOCATE, {"ids": ids})
    assert sorted(found, key=lambda item: item[2]) == [[ids[0], "open@b", 1], [ids[1], "open@b", 2]]


async def test_a_reader_shut_out_cannot_announce_presence_through_a_peer(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The home checks a proxied document's awareness for the agent the peer names."""
    from agent_sdk.access import set_policy

    a, b = await pair(nursery, tmp_path)
    owner_id, reader_id, ns = identity(2), identity(7), "team@b"
    with trio.fail_after(TIMEOUT):
        async with (
            RelayClient.connect(b.url, owner_id) as owner,
            RelayClient.connect(a.url, reader_id) as reader,
        ):
            await owner.publish(ns, "app.note", 1)
            readers = [reader_id.public_key, a.node.identity.public_key]
            await set_policy(owner, ns, "private", readers=readers)
            await owner.publish(ns, "doc.create", {"doc": "plan"})
            with pytest.raises(ProtocolError) as info:
                async with (
                    owner.doc(ns, "plan", create=False),
                    reader.doc(ns, "plan", create=False) as theirs,
                ):
                    await set_policy(owner, ns, "private", readers=readers[1:])  # reader gone
                    theirs.set_presence({"name": "shut out"})
                    while theirs.error is None:  # the home's answer to it
                        await theirs._advanced.wait()
                    assert (
                        theirs.doc.client_id not in b.node.docs.live[(ns, "plan")].awareness.states
                    )
            assert info.value.code is ErrorCode.FORBIDDEN


async def test_a_home_finds_a_dependency_on_the_forwarding_relays_own_log(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    a, b = await pair(nursery, tmp_path)
    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(a.url, identity(8)) as agent:
            local = await agent.publish("x@a", "app.note", "on a")
            # b has never seen x@a: it asks its peers where the dependency is, then
            # mirrors x@a up to it before it sequences the event.
            remote = await agent.publish("y@b", "app.note", "on b", deps=[local.receipt.id])
    assert remote.receipt.hlc > local.receipt.hlc
    assert b.node.head("x@a") >= local.receipt.seq


async def test_bad_requests_for_other_relays_get_clear_errors(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relays = plan(tmp_path, "a", "b")
    a = await start(nursery, relays["a"], (relays["b"].peer(),))
    await start(nursery, relays["b"], (relays["a"].peer(),), RelayConfig(name="b", max_frame=4096))
    await federation_of(a).links["b"].wait_up()
    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(a.url, identity(9)) as agent:
            with pytest.raises(ProtocolError) as join:  # presence by connection cannot cross
                await Directory(agent, "team@b").join("me")
            assert join.value.code is ErrorCode.BAD_EVENT and "heartbeat" in join.value.reason
            with pytest.raises(ProtocolError) as big:  # fits a's max_frame, not b's
                await agent.publish("x@b", "app.note", "y" * 8000)
            assert big.value.code is ErrorCode.FRAME_TOO_LARGE
            with pytest.raises(ProtocolError) as bad:  # not a namespace: a's own checks
                await agent.query("Not A Namespace", "wo.list", {})
            assert bad.value.code is ErrorCode.BAD_QUERY
            await agent.publish("x@b", "app.note", "and the connection goes on")


async def test_a_mirror_lingering_after_its_last_reader_follows_again_at_once(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import federation.network

    monkeypatch.setattr(federation.network, "MIRROR_LINGER", 0.2)
    a, b = await pair(nursery, tmp_path)
    network = federation_of(a)
    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(b.url, identity(2)) as on_b:
            await on_b.publish("x@b", "app.note", "first")
        async with network.hold("x@b", None) as mirror:
            await mirror.caught_up()
        while mirror.following:  # no holder: it stops following, then lingers
            await mirror._changed.wait()
        lingering = mirror._changed
        async with network.hold("x@b", None) as again:
            assert again is mirror
            # Its linger wakes now; it used to sleep it out while readers waited.
            assert lingering.is_set()


async def test_a_from_now_foreign_namespace_beside_a_local_backlog_is_entered(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Entering a subscription waits for each from-now namespace's live; the foreign
    one's comes after catching up, by when a local backlog has filled the buffer:
    it paused, its live was dropped, and nothing ever resumed it."""
    relays = plan(tmp_path, "a", "b")
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    a = await start(nursery, relays["a"], (relays["b"].peer(),))
    async with RelayClient.connect(a.url, identity(1)) as agent:
        for n in range(20):
            await agent.publish("x@a", "app.n", n)
        with trio.fail_after(TIMEOUT):
            await federation_of(a).links["b"].wait_up()
            async with agent.subscribe(["x@a", "y@b"], start={"x@a": 1}, buffer=2) as feed:
                seen = []
                async for item in feed:
                    if isinstance(item, Delivery):
                        seen.append(item.event.event.body)
                        if len(seen) == 20:
                            break
    assert seen == list(range(20)) and b.node.head("y@b") == 0


async def test_a_new_reader_waits_for_the_writes_its_relay_passed_on() -> None:
    """14.7, catching up: a subscription to a foreign namespace is served once the
    mirror holds every receipt this relay passed on for the writes it forwarded, not
    only the home's head as last heard. The home's ack and the event frame of the
    mirror's own subscription race on the link: when the ack wins, an agent that got
    it here and then subscribed would otherwise be served ``live`` before its event."""
    home, author = identity(9), identity(1)
    node = RelayNode(identity(8), MemoryStore(), RelayConfig(name="a"), mirror_store=MemoryStore())
    peers = (Peer("b", home.public_key, url="ws://b"),)
    fed = Federation(node, FederationConfig(peers), MemoryOutboxStore())
    event = sign_event(Event("x@b", "app.note", author.public_key, 1, (), 1), author.sign)
    entry = Entry(1, event, 0)
    receipt = make_receipt(
        id=event.id, ns="x@b", seq=3, hlc=3, prev=ZERO_HASH, relay=home.public_key
    )
    entry.result = Published(receipt, None, False)
    fed.remember(entry)  # the home's answer, passed on to the agent
    link = fed.links["b"]
    link.client = object()  # type: ignore[assignment]  # (up: nothing is sent here)
    mirror = Mirror(fed, "x@b", link, home.public_key)
    mirror.settled.set()  # it has what the home's head was as last heard: nothing
    served = trio.Event()

    async def subscribe() -> None:
        await mirror.caught_up()
        served.set()

    async with trio.open_nursery() as waiting:
        waiting.start_soon(subscribe)
        await trio.testing.wait_all_tasks_blocked()
        assert not served.is_set()  # it waits for seq 3 ...
        assert mirror.wanted == 3  # ... and the mirror follows until it has it
        waiting.cancel_scope.cancel()
