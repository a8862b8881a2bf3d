"""Namespace access control over real loopback sockets: owners, policies, creation rules.

Each refusal is checked for its exact code, and for leaving everyone else's state as
it was: the log's head does not move, and an allowed agent goes on being served.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from websockets.exceptions import ConnectionClosed
from websockets.trio.client import connect

from agent_sdk import doctoken
from agent_sdk.access import get_policy, set_policy
from agent_sdk.client import Delivery, Live, RelayClient
from agent_sdk.directory import Directory
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.ledger import Ledger
from agent_sdk.wire import Event, sign_event
from federation import network
from relay.access import Creation, check_invite, mint_invite
from relay.node import RelayConfig
from relay.verify import verify_log
from tests.conftest import RunningRelay, identity, start_relay
from tests.federation.fixtures import federation_of, plan, start
from tests.refusals import refused

NS = "team@local"
TIMEOUT = 30
OWNER, WRITER, READER, STRANGER = identity(1), identity(2), identity(3), identity(4)


async def test_a_listed_namespace_takes_writes_from_its_writers_only(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, OWNER) as owner,
        RelayClient.connect(relay.url, WRITER) as writer,
        RelayClient.connect(relay.url, STRANGER) as stranger,
    ):
        await owner.publish(NS, "app.note", "created")  # the first event: owner is its author
        await set_policy(owner, NS, "listed", writers=[WRITER.public_key])
        head = relay.node.head(NS)
        error = await refused(ErrorCode.FORBIDDEN, stranger.publish(NS, "app.note", "mine"))
        assert "may not write" in error.reason
        # Coordination requests and documents are writes like any other.
        await refused(ErrorCode.FORBIDDEN, Ledger(stranger, NS).create("take over"))
        await refused(ErrorCode.FORBIDDEN, stranger.publish(NS, "doc.create", {"doc": "d"}))
        assert relay.node.head(NS) == head  # nothing of the refused was sequenced
        await writer.publish(NS, "app.note", "allowed")
        await Ledger(writer, NS).create("a listed writer's order")
        await owner.publish(NS, "app.note", "the owner always writes")
        # Anyone may still read a listed namespace.
        assert len(await Ledger(stranger, NS).list()) == 1
        async with stranger.subscribe(NS, start=1) as feed:
            first = await feed.__anext__()
            assert isinstance(first, Delivery) and first.event.event.body == "created"
        # The stranger's connection is fine: it writes where it may.
        await stranger.publish("open@local", "app.note", "elsewhere")


async def test_only_the_owner_changes_the_policy_and_can_hand_it_over(
    relay: RunningRelay,
) -> None:
    async with (
        RelayClient.connect(relay.url, OWNER) as owner,
        RelayClient.connect(relay.url, WRITER) as heir,
        RelayClient.connect(relay.url, STRANGER) as stranger,
    ):
        await owner.publish(NS, "app.note", "created")
        head = relay.node.head(NS)
        error = await refused(ErrorCode.FORBIDDEN, set_policy(stranger, NS, "public"))
        assert "only the owner" in error.reason
        # A bad body is bad_event, named; state untouched.
        bad = owner.publish(NS, "ns.policy", {"mode": "secret"})
        assert "mode" in (await refused(ErrorCode.BAD_EVENT, bad)).reason
        bad = owner.publish(NS, "ns.policy", {"mode": "listed", "writers": [b"short"]})
        assert "writers" in (await refused(ErrorCode.BAD_EVENT, bad)).reason
        assert relay.node.head(NS) == head
        assert (await get_policy(stranger, NS)).mode == "public"

        await set_policy(owner, NS, "listed", owner=heir.identity.public_key)
        policy = await get_policy(stranger, NS)
        assert policy.owner == heir.identity.public_key and policy.mode == "listed"
        await refused(ErrorCode.FORBIDDEN, set_policy(owner, NS, "public"))  # not any more
        await refused(ErrorCode.FORBIDDEN, owner.publish(NS, "app.note", "no longer mine"))
        await set_policy(heir, NS, "public")
        await owner.publish(NS, "app.note", "public again")
        await refused(ErrorCode.NOT_FOUND, get_policy(owner, "nothing-yet@local"))


async def test_a_private_namespace_is_closed_to_non_readers(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, OWNER) as owner,
        RelayClient.connect(relay.url, READER) as reader,
        RelayClient.connect(relay.url, STRANGER) as stranger,
    ):
        await owner.publish(NS, "doc.create", {"doc": "plan"})
        await Ledger(owner, NS).create("secret order")
        await Directory(owner, NS).join("owner")
        await set_policy(owner, NS, "private", readers=[READER.public_key])

        async with stranger.subscribe(NS, start=1) as feed:
            await refused(ErrorCode.FORBIDDEN, feed.__anext__())
        await refused(ErrorCode.FORBIDDEN, Ledger(stranger, NS).list())
        await refused(ErrorCode.FORBIDDEN, Directory(stranger, NS).list())
        await refused(ErrorCode.FORBIDDEN, get_policy(stranger, NS))
        with pytest.raises(ProtocolError) as info:
            async with stranger.doc(NS, "plan", create=False):
                pass
        assert info.value.code is ErrorCode.FORBIDDEN
        await refused(ErrorCode.FORBIDDEN, stranger.publish(NS, "app.note", "in"))

        # A listed reader reads all of it, and may not write.
        assert [o["title"] for o in await Ledger(reader, NS).list()] == ["secret order"]
        async with reader.subscribe(NS, start=1) as feed:
            first = await feed.__anext__()
            assert isinstance(first, Delivery) and first.event.event.kind == "doc.create"
        async with reader.doc(NS, "plan", create=False) as shared:
            assert shared.to_json()["text"] == ""
        await refused(ErrorCode.FORBIDDEN, reader.publish(NS, "app.note", "in"))


async def test_a_listed_writer_reads_a_private_namespace_it_is_not_a_reader_of(
    relay: RunningRelay,
) -> None:
    """Private: the owner, ``readers`` and ``writers`` read (16.2); a writer need not
    be listed twice."""
    async with (
        RelayClient.connect(relay.url, OWNER) as owner,
        RelayClient.connect(relay.url, WRITER) as writer,
    ):
        await owner.publish(NS, "app.note", "created")
        await set_policy(owner, NS, "private", writers=[WRITER.public_key])
        await writer.publish(NS, "app.note", "written")
        assert (await get_policy(writer, NS)).writers == (WRITER.public_key,)  # a query
        async with writer.subscribe(NS, start=1) as feed:
            first = await feed.__anext__()
            assert isinstance(first, Delivery) and first.event.event.body == "created"


async def test_a_plain_yjs_client_needs_a_readers_token_for_a_private_document(
    relay: RunningRelay,
) -> None:
    async with RelayClient.connect(relay.url, OWNER) as owner:
        await owner.publish(NS, "doc.create", {"doc": "plan"})
        await set_policy(owner, NS, "private", readers=[READER.public_key])
    exp = time.time_ns() // 1_000_000 + 60_000
    for token in ("", f"?{doctoken.query(*doctoken.mint_bound(STRANGER, NS, 'plan', exp))}"):
        async with connect(f"{relay.url}/yjs/{NS}/plan{token}") as ws:
            with pytest.raises(ConnectionClosed) as info, trio.fail_after(TIMEOUT):
                await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1008
        assert info.value.rcvd.reason.startswith("2013 forbidden:")
    async with connect(
        f"{relay.url}/yjs/{NS}/plan?{doctoken.query(*doctoken.mint_bound(READER, NS, 'plan', exp))}"
    ) as ws:
        with trio.fail_after(TIMEOUT):
            assert isinstance(await ws.recv(), bytes)  # sync step 1: it is served


async def test_a_reader_taken_off_the_list_loses_its_open_subscription(
    relay: RunningRelay,
) -> None:
    async with (
        RelayClient.connect(relay.url, OWNER) as owner,
        RelayClient.connect(relay.url, READER) as reader,
    ):
        await set_policy(owner, NS, "private", readers=[READER.public_key])
        with trio.fail_after(TIMEOUT):
            async with reader.subscribe(NS, start=1) as feed:
                async for item in feed:
                    if isinstance(item, Live):
                        break
                await owner.publish(NS, "app.note", "still readable")
                await set_policy(owner, NS, "private")  # the reader is gone
                seen = []
                with pytest.raises(ProtocolError) as info:
                    async for item in feed:
                        assert isinstance(item, Delivery)
                        seen.append(item.event.event.kind)
                assert info.value.code is ErrorCode.FORBIDDEN
                assert seen[:1] == ["app.note"]


async def test_a_reader_taken_off_the_list_cannot_announce_presence_in_a_document(
    relay: RunningRelay,
) -> None:
    """Its document subscription ends at the next item it would get; until then, its
    awareness updates are refused, not applied nor shared with the readers."""
    async with (
        RelayClient.connect(relay.url, OWNER) as owner,
        RelayClient.connect(relay.url, READER) as reader,
    ):
        await set_policy(owner, NS, "private", readers=[READER.public_key])
        await owner.publish(NS, "doc.create", {"doc": "plan"})
        with trio.fail_after(TIMEOUT), pytest.raises(ProtocolError) as info:
            async with (
                owner.doc(NS, "plan", create=False) as mine,
                reader.doc(NS, "plan", create=False) as theirs,
            ):
                await set_policy(owner, NS, "private")  # the reader is gone
                theirs.set_presence({"name": "shut out"})
                # Frames of a connection are acted on in order: once this is
                # answered, the relay has shared or refused the presence.
                await reader.publish("elsewhere@local", "app.note", "after")
                live = relay.node.docs.live[(NS, "plan")]
                assert theirs.doc.client_id not in live.awareness.states  # nor shared
                assert isinstance(theirs.error, ProtocolError)  # (answered before)
                assert mine.error is None
        assert info.value.code is ErrorCode.FORBIDDEN


async def test_a_policy_change_is_sealed_even_in_the_middle_of_a_commit(
    relay: RunningRelay,
) -> None:
    """A reader shut out by a policy gets the log up to it and no further (16.3); a
    mirroring relay stores only what a seal covers, so the cut must be sealed."""
    async with RelayClient.connect(relay.url, OWNER) as owner:
        await owner.publish(NS, "app.note", "created")
        change = Event(
            NS, "ns.policy", OWNER.public_key, {"mode": "private"}, ts=time.time_ns() // 1_000_000
        )
        policy = sign_event(change, OWNER.sign)
        async with trio.open_nursery() as nursery:  # one bundle, one step: one commit
            nursery.start_soon(owner.publish_signed, policy)
            nursery.start_soon(partial(owner.publish, deps=[policy.id]), NS, "app.note", "next")
    records = list(relay.node.store.scan(NS))
    assert [r.kind for r in records] == ["app.note", "ns.policy", "app.note"]
    assert records[1].seal is not None and records[2].seal is not None
    store = relay.node.store
    assert verify_log(NS, records, lambda dep: store.find([dep]).get(dep)).ok


async def test_policies_survive_a_restart(nursery: trio.Nursery, tmp_path: Path) -> None:
    data = tmp_path / "relay"
    running = await start_relay(nursery, data)
    async with RelayClient.connect(running.url, OWNER) as owner:
        await owner.publish(NS, "app.note", "created")
        await set_policy(owner, NS, "listed", writers=[WRITER.public_key])
    running.scope.cancel()
    running = await start_relay(nursery, data)
    async with RelayClient.connect(running.url, STRANGER) as stranger:
        await refused(ErrorCode.FORBIDDEN, stranger.publish(NS, "app.note", "after restart"))
        policy = await get_policy(stranger, NS)
        assert policy.owner == OWNER.public_key and policy.writers == (WRITER.public_key,)
    running.scope.cancel()


async def test_an_allow_list_relay_creates_namespaces_for_its_creators_only(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    config = RelayConfig(create=Creation.ALLOW, creators=frozenset({OWNER.public_key}))
    relay = await start_relay(nursery, tmp_path / "relay", config)
    async with (
        RelayClient.connect(relay.url, OWNER) as creator,
        RelayClient.connect(relay.url, STRANGER) as stranger,
    ):
        await refused(ErrorCode.FORBIDDEN, stranger.publish(NS, "app.note", "mine now"))
        await refused(ErrorCode.FORBIDDEN, set_policy(stranger, NS, "public"))
        # A creator creates by ns.policy: the namespace never exists without a policy.
        error = await refused(ErrorCode.FORBIDDEN, creator.publish(NS, "app.note", "first"))
        assert "by ns.policy only" in error.reason
        assert relay.node.head(NS) == 0
        await set_policy(creator, NS, "public")
        await stranger.publish(NS, "app.note", "a public namespace takes anyone's writes")
    relay.scope.cancel()


async def test_an_invite_relay_takes_a_token_for_that_namespace_only(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relay = await start_relay(nursery, tmp_path / "relay", RelayConfig(create=Creation.INVITE))
    key = relay.node.identity
    now = time.time_ns() // 1_000_000
    async with RelayClient.connect(relay.url, STRANGER) as agent:
        await refused(ErrorCode.FORBIDDEN, set_policy(agent, NS, "private"))
        for invite, why in (
            (mint_invite(key, "other@local", now + 60_000), "is for 'other@local'"),
            (mint_invite(key, NS, now - 1), "expired"),
            (mint_invite(identity(9), NS, now + 60_000), "not signed by this relay"),
            (b"\x80", "not an invite token"),
        ):
            error = await refused(
                ErrorCode.FORBIDDEN, set_policy(agent, NS, "private", invite=invite)
            )
            assert why in error.reason
        assert relay.node.head(NS) == 0
        # Expired at exp itself: the relay's clock is at or past it (16.4).
        assert check_invite(mint_invite(key, NS, now), NS, key.public_key, now) == (
            "the invite has expired"
        )
        assert check_invite(mint_invite(key, NS, now + 1), NS, key.public_key, now) is None
        good = mint_invite(key, NS, now + 60_000)
        await set_policy(agent, NS, "private", invite=good)
        assert (await get_policy(agent, NS)).owner == STRANGER.public_key
        # An invite only creates: a later policy carrying one is refused.
        await refused(ErrorCode.BAD_EVENT, set_policy(agent, NS, "public", invite=good))
    relay.scope.cancel()


async def test_a_relay_the_owner_does_not_list_cannot_mirror_a_private_namespace(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relay a follows b's ``x@b`` for its agents. Private and not listing a's key:
    a gets nothing, so its agents cannot read it there. Listing a's key lets a mirror
    it, and a then enforces the policy for its own agents."""
    monkeypatch.setattr(network, "FORBIDDEN_RETRY", 0.05)  # ask again soon after a refusal
    relays = plan(tmp_path, "a", "b")
    a = await start(nursery, relays["a"], (relays["b"].peer(),))
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    await federation_of(a).links["b"].wait_up()
    ns = "x@b"
    with trio.fail_after(TIMEOUT):
        async with (
            RelayClient.connect(b.url, OWNER) as owner,
            RelayClient.connect(a.url, READER) as reader,
            RelayClient.connect(a.url, STRANGER) as stranger,
        ):
            await owner.publish(ns, "app.note", "private from the start")
            await set_policy(owner, ns, "private", readers=[READER.public_key])
            async with reader.subscribe(ns, start=1) as feed:
                await refused(ErrorCode.FORBIDDEN, feed.__anext__())
            await refused(ErrorCode.FORBIDDEN, Ledger(reader, ns).list())  # b asks a's key
            assert a.node.head(ns) == 0  # nothing of it was mirrored

            async with federation_of(a).hold(ns, None):  # keep a's mirror asking
                await set_policy(owner, ns, "private", readers=[READER.public_key, relays["a"].key])
                await a.node.wait_beyond(ns, 2)  # both policies are in a's mirror now
            async with reader.subscribe(ns, start=1) as feed:
                item = await feed.__anext__()
                assert (
                    isinstance(item, Delivery) and item.event.event.body == "private from the start"
                )
            assert await Ledger(reader, ns).list() == []
            # a folded the same policy from its mirror: a stranger on a is refused by a.
            assert not a.node.access.may_read(ns, STRANGER.public_key)
            async with stranger.subscribe(ns, start=1) as feed:
                await refused(ErrorCode.FORBIDDEN, feed.__anext__())
            await refused(ErrorCode.FORBIDDEN, Ledger(stranger, ns).list())

            # The owner takes a off the list: a still gets the change that does it,
            # and from then on refuses even the reader its copy.
            async with federation_of(a).hold(ns, None):
                removed = await set_policy(owner, ns, "private", readers=[READER.public_key])
                await a.node.wait_beyond(ns, removed.receipt.seq - 1)
            assert not a.node.access.may_read(ns, READER.public_key)
            async with reader.subscribe(ns, start=1) as feed:
                await refused(ErrorCode.FORBIDDEN, feed.__anext__())


async def test_a_policy_body_of_any_shape_is_refused_and_the_relay_lives_on(
    relay: RunningRelay,
) -> None:
    async with RelayClient.connect(relay.url, OWNER) as owner:
        await owner.publish(NS, "app.note", "created")
        for body in ({"mode": []}, {"mode": {}}, {"mode": 1}, [], "private", None,
                     {"mode": "listed", "writers": {}}, {"mode": "listed", "owner": []},
                     {"mode": "listed", "invite": 5}, {"mode": "listed", "x": 1}):  # fmt: skip
            await refused(ErrorCode.BAD_EVENT, owner.publish(NS, "ns.policy", body))
        assert relay.node.head(NS) == 1
        await owner.publish(NS, "app.note", "the relay is still here")


async def test_a_parked_write_is_checked_again_when_it_is_released(relay: RunningRelay) -> None:
    """A stranger parks a write on a dep it holds back, the namespace closes, then
    it sends the dep: the parked write is refused, not slipped in."""
    async with (
        RelayClient.connect(relay.url, OWNER) as owner,
        RelayClient.connect(relay.url, STRANGER) as stranger,
    ):
        await owner.publish(NS, "app.note", "created")
        held_back = sign_event(
            Event("open@local", "app.note", STRANGER.public_key, "the dep", ts=stranger.clock_ms()),
            STRANGER.sign,
        )
        parked = sign_event(
            Event(NS, "app.note", STRANGER.public_key, "sneaky", deps=(held_back.id,),
                  ts=stranger.clock_ms()),
            STRANGER.sign,
        )  # fmt: skip
        waiting = trio.Event()
        relay.node.on_parked = lambda missing: waiting.set()
        pending = stranger.publish_later(parked)
        with trio.fail_after(TIMEOUT):
            await waiting.wait()  # it waits for its dep
            await set_policy(owner, NS, "listed")
            await stranger.publish_signed(held_back)
            await refused(ErrorCode.FORBIDDEN, pending.wait())
        assert [r.kind for r in await relay.node.read(NS, 1, 10)] == ["app.note", "ns.policy"]


async def test_a_duplicate_is_answered_with_its_receipt_whatever_the_policy_is_now(
    relay: RunningRelay,
) -> None:
    """16.3: the same bytes published again after the namespace closed to their
    author are answered as a duplicate, with the receipt they got (safe retries)."""
    async with (
        RelayClient.connect(relay.url, OWNER) as owner,
        RelayClient.connect(relay.url, STRANGER) as stranger,
    ):
        await owner.publish(NS, "app.note", "created")
        note = sign_event(
            Event(NS, "app.note", STRANGER.public_key, "in time", ts=stranger.clock_ms()),
            STRANGER.sign,
        )
        first = await stranger.publish_signed(note)
        await set_policy(owner, NS, "listed")
        with trio.fail_after(TIMEOUT):
            again = await stranger.publish_signed(note)
        assert again.duplicate and again.receipt == first.receipt
        await refused(ErrorCode.FORBIDDEN, stranger.publish(NS, "app.note", "too late"))


async def test_a_subscription_losing_two_namespaces_at_once_ends_once(
    relay: RunningRelay,
) -> None:
    ns2 = "team2@local"
    async with (
        RelayClient.connect(relay.url, OWNER) as owner,
        RelayClient.connect(relay.url, READER) as reader,
    ):
        for ns in (NS, ns2):
            await owner.publish(ns, "app.note", "created")
        with trio.fail_after(TIMEOUT):
            async with reader.subscribe([NS, ns2], start={NS: 1, ns2: 1}) as feed:
                lives = 0
                async for item in feed:
                    lives += isinstance(item, Live)
                    if lives == 2:
                        break
                async with trio.open_nursery() as both:  # two policies, one batch if it may
                    for ns in (NS, ns2):
                        both.start_soon(set_policy, owner, ns, "private")
                with pytest.raises(ProtocolError) as info:
                    async for _ in feed:
                        pass
                assert info.value.code is ErrorCode.FORBIDDEN
            await reader.publish("open@local", "app.note", "the connection lives on")


async def test_a_plain_yjs_reader_taken_off_the_list_is_closed(relay: RunningRelay) -> None:
    exp = time.time_ns() // 1_000_000 + 60_000
    async with RelayClient.connect(relay.url, OWNER) as owner:
        await owner.publish(NS, "doc.create", {"doc": "plan"})
        await set_policy(owner, NS, "private", readers=[READER.public_key])
        query = doctoken.query(*doctoken.mint_bound(READER, NS, "plan", exp))
        async with connect(f"{relay.url}/yjs/{NS}/plan?{query}") as ws:
            with trio.fail_after(TIMEOUT):
                assert isinstance(await ws.recv(), bytes)  # served
                await set_policy(owner, NS, "private")  # the reader is gone
                async with owner.doc(NS, "plan", create=False) as shared:
                    shared.text().insert(0, "after the change")
                with pytest.raises(ConnectionClosed) as info:
                    while True:
                        await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1008
        assert info.value.rcvd.reason.startswith("2013 forbidden")


async def test_a_forwarded_query_is_checked_for_the_agent_who_asked(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Relay a is a listed reader of private ``y@b`` but holds no mirror of it: b
    checks both a's key and the agent's a names, so a stranger on a is refused."""
    relays = plan(tmp_path, "a", "b")
    a = await start(nursery, relays["a"], (relays["b"].peer(),))
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    await federation_of(a).links["b"].wait_up()
    ns = "y@b"
    with trio.fail_after(TIMEOUT):
        async with (
            RelayClient.connect(b.url, OWNER) as owner,
            RelayClient.connect(a.url, READER) as reader,
            RelayClient.connect(a.url, STRANGER) as stranger,
        ):
            await owner.publish(ns, "doc.create", {"doc": "plan"})
            await Ledger(owner, ns).create("private work")
            await set_policy(owner, ns, "private", readers=[READER.public_key, relays["a"].key])
            assert a.node.head(ns) == 0  # no mirror: a cannot judge by itself
            await refused(ErrorCode.FORBIDDEN, Ledger(stranger, ns).list())
            with pytest.raises(ProtocolError) as info:
                async with stranger.doc(ns, "plan", create=False):
                    pass
            assert info.value.code is ErrorCode.FORBIDDEN
            assert [o["title"] for o in await Ledger(reader, ns).list()] == ["private work"]
            async with reader.doc(ns, "plan", create=False) as shared:
                assert shared.to_json()["text"] == ""


def owners(kind: str, body: object, n: int) -> Any:
    event = Event(
        NS, kind, OWNER.public_key, body, ts=time.time_ns() // 1_000_000, nonce=bytes([n]) * 8
    )
    return sign_event(event, OWNER.sign)


async def test_a_reader_shut_out_gets_nothing_past_the_change_that_did_it(
    relay: RunningRelay,
) -> None:
    """The change that shuts a reader out, the writes after it and a later change that
    leaves it out commit together: the reader gets the first change, then forbidden;
    the later change must not open the writes in between to it (a review)."""
    async with (
        RelayClient.connect(relay.url, OWNER) as owner,
        RelayClient.connect(relay.url, READER) as reader,
    ):
        await set_policy(owner, NS, "private", readers=[READER.public_key])
        with trio.fail_after(TIMEOUT):
            async with reader.subscribe(NS, start=1) as feed:
                async for item in feed:
                    if isinstance(item, Live):
                        break
                events = [  # admitted at once: one commit
                    owners("ns.policy", {"mode": "private"}, 1),
                    owners("app.note", "secret 1", 2),
                    owners("app.note", "secret 2", 3),
                    owners("ns.policy", {"mode": "private", "readers": [WRITER.public_key]}, 4),
                ]
                tickets = [await relay.node.admit(event) for event in events]
                for ticket in tickets:
                    await relay.node.answer(ticket)
                seen = []
                with pytest.raises(ProtocolError) as shut:
                    async for item in feed:
                        if isinstance(item, Delivery):
                            seen.append(item.event.event.body)
                assert shut.value.code is ErrorCode.FORBIDDEN
                assert seen == [{"mode": "private"}]  # the change that shut it out, alone


async def test_a_reader_let_back_in_does_not_get_what_was_written_while_it_was_out(
    relay: RunningRelay,
) -> None:
    async with (
        RelayClient.connect(relay.url, OWNER) as owner,
        RelayClient.connect(relay.url, READER) as reader,
    ):
        await set_policy(owner, NS, "private", readers=[READER.public_key])
        await owner.publish(NS, "app.note", "before")
        await set_policy(owner, NS, "private")
        await owner.publish(NS, "app.note", "while it was out")
        await set_policy(owner, NS, "private", readers=[READER.public_key])
        await owner.publish(NS, "app.note", "after")
        seen = []
        with trio.fail_after(TIMEOUT):
            async with reader.subscribe(NS, start=1, kinds=["app.note"]) as feed:
                async for item in feed:
                    if isinstance(item, Live):
                        break
                    assert isinstance(item, Delivery)
                    seen.append(item.event.event.body)
        assert seen == ["before", "after"]


async def test_a_relay_taken_off_the_list_gets_no_more_of_a_document_it_passes_on(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """b streams y@b's document to relay a for its reader; once the owner takes a off
    the readers, b ends that stream (it checked only the reader a named)."""
    relays = plan(tmp_path, "a", "b")
    a = await start(nursery, relays["a"], (relays["b"].peer(),))
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    await federation_of(a).links["b"].wait_up()
    ns = "y@b"
    with trio.fail_after(TIMEOUT):
        async with (
            RelayClient.connect(b.url, OWNER) as owner,
            RelayClient.connect(a.url, READER) as reader,
        ):
            await owner.publish(ns, "doc.create", {"doc": "plan"})
            await set_policy(owner, ns, "private", readers=[READER.public_key, relays["a"].key])
            with pytest.raises(ProtocolError) as ended:
                async with reader.doc(ns, "plan", create=False) as shared:
                    await set_policy(owner, ns, "private", readers=[READER.public_key])
                    async with owner.doc(ns, "plan", create=False) as mine:
                        mine.text().insert(0, "after a was taken off")
                        await mine.flush()
                    await shared.wait_seq(b.node.head(ns))  # (or its subscription ends)
                    assert str(shared.text()) == ""
            assert ended.value.code is ErrorCode.FORBIDDEN


async def test_a_yjs_reader_shut_out_is_not_answered_its_sync_request(
    relay: RunningRelay,
) -> None:
    """A plain Yjs reader asks for what it lacks (sync step 1) after the owner took it
    off the list: the relay closes the connection instead of answering, even with no
    update in between to make it look (it answered with the document)."""
    from pycrdt import YMessageType, YSyncMessageType, write_message

    step1 = bytes([YMessageType.SYNC, YSyncMessageType.SYNC_STEP1]) + write_message(b"\x00")
    expires = time.time_ns() // 1_000_000 + 60_000
    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(relay.url, OWNER) as owner:
            await owner.publish(NS, "doc.create", {"doc": "plan"})
            await set_policy(owner, NS, "private", readers=[READER.public_key])
            query = doctoken.query(*doctoken.mint_bound(READER, NS, "plan", expires))
            async with connect(f"{relay.url}/yjs/{NS}/plan?{query}") as ws:
                await ws.recv()  # the relay's own step 1
                await set_policy(owner, NS, "private")  # committed: the reader is out
                await ws.send(step1)
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        message = await ws.recv()
                        assert message[:2] != bytes([0, 1]), "answered with sync step 2"
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_info_does_not_name_a_private_namespace_the_home_refused_to_mirror(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    from relay.server import info_document

    relays = plan(tmp_path, "a", "b")
    a = await start(nursery, relays["a"], (relays["b"].peer(),))
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    await federation_of(a).links["b"].wait_up()
    ns = "secret-merger@b"
    with trio.fail_after(TIMEOUT):
        async with (
            RelayClient.connect(b.url, OWNER) as owner,
            RelayClient.connect(a.url, READER) as reader,
        ):
            await set_policy(owner, ns, "private", readers=[READER.public_key])
            async with reader.subscribe(ns, start=1) as feed:
                await refused(ErrorCode.FORBIDDEN, feed.__anext__())
            assert ns in federation_of(a).mirrors  # asked for, refused, lingering
            assert ns not in info_document(a.node)["federation"]["mirrors"]
