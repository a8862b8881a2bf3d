"""Context, bulletin, decisions, checkpoints and queries through a real relay."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from agent_sdk.client import RelayClient
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.ledger import Ledger, LedgerRefusal
from agent_sdk.wire import Event, sign_event
from relay.coordination.requests import MAX_CONTEXT
from relay.node import RelayConfig, RelayNode
from relay.store.memory import MemoryStore
from tests.backends import open_test_store
from tests.conftest import RunningRelay, identity
from tests.relay.test_node import virtual_wall
from tests.relay.test_sequencer import NOW

NS = "work@local"
RELAY = identity(2)


async def test_context_handoff_between_two_agents(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, identity(1)) as one,
        RelayClient.connect(relay.url, identity(3)) as two,
    ):
        first, second = Ledger(one, NS), Ledger(two, NS)
        assert await second.pull_context() is None  # nothing put yet: no error
        order = await first.create("port the lexer")
        claim = await first.claim(order)
        assert await first.put_context({"plan": ["read", "port"]}, claim) == 1
        assert await first.put_context({"plan": ["port"], "found": "lexer.py:120"}, claim) == 2
        await first.put_context("namespace-wide: the build needs python 3.11")
        await first.update(claim, "done")

        latest = await second.pull_context(order)
        assert latest is not None
        assert latest["body"] == {"plan": ["port"], "found": "lexer.py:120"}
        assert (latest["version"], latest["versions"]) == (2, 2)
        assert latest["author"] == identity(1).public_key and latest["age_ms"] >= 0
        older = await second.pull_context(order, version=1)
        assert older is not None and older["body"] == {"plan": ["read", "port"]}
        shared = await second.pull_context()
        assert shared is not None and shared["body"].startswith("namespace-wide")
        with pytest.raises(ProtocolError) as info:
            await second.pull_context(order, version=3)
        assert info.value.code is ErrorCode.NOT_FOUND


async def test_only_the_holder_writes_a_claimed_orders_context(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, identity(1)) as one,
        RelayClient.connect(relay.url, identity(3)) as two,
    ):
        holder, other = Ledger(one, NS), Ledger(two, NS)
        order = await holder.create("t")
        claim = await holder.claim(order)
        with pytest.raises(LedgerRefusal) as info:
            await other.put_context("mine now", order)
        assert info.value.problem == "not_holder"
        await holder.release(claim)
        with pytest.raises(LedgerRefusal) as info:
            await holder.put_context("I still think I hold it", claim)  # a stale fence
        assert info.value.problem == "not_holder"
        assert await other.put_context("handoff notes", order) == 1  # open: anyone may
        assert await holder.pull_context(order) is not None


async def test_a_paused_holder_cannot_overwrite_the_next_holders_context(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    node = RelayNode(RELAY, MemoryStore(), RelayConfig(), wall_ms=virtual_wall())
    await nursery.start(node.run)
    slow, fast = identity(1), identity(3)
    nonce = 0

    async def ask(who: Any, kind: str, body: Any) -> tuple[str, dict[str, Any]]:
        nonlocal nonce
        nonce += 1
        event = Event(NS, kind, who.public_key, body, ts=node.wall_ms(), nonce=bytes([nonce]))
        request = await node.publish(sign_event(event, who.sign))
        located = node.outcome_of(request.id)
        assert located is not None
        answer = await node.committed_record(located.ns, located.seq)
        from agent_sdk.wire import decode

        fields = decode(answer.event)
        return fields["kind"], fields["body"]

    await ask(slow, "wo.create", {"title": "t"})
    _, first = await ask(slow, "wo.claim", {"wo": "wo-1", "ttl_ms": 5_000})
    await trio.sleep(6)  # the holder stalls past its lease
    _, second = await ask(fast, "wo.claim", {"wo": "wo-1", "ttl_ms": 5_000})
    kind, _ = await ask(fast, "context.put", {"wo": "wo-1", "token": second["token"], "body": "B"})
    assert kind == "context.stored"
    late = {"wo": "wo-1", "token": first["token"], "body": "stale A"}
    kind, refused = await ask(slow, "context.put", late)
    assert kind == "context.rejected" and refused["problem"] == "not_holder"
    answer = await node.query(NS, "context.pull", {"wo": "wo-1"})
    assert answer["body"] == "B" and answer["versions"] == 1


async def test_bulletin_and_decisions(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        ledger = Ledger(client, NS)
        for n in range(5):
            assert await ledger.post(f"did {n}") == n + 1
        assert [p["text"] for p in await ledger.bulletin(limit=2)] == ["did 3", "did 4"]
        assert [p["n"] for p in await ledger.bulletin(after=3)] == [4, 5]
        first = await ledger.decide("storage", "sqlite", rationale="embedded, no server")
        second = await ledger.decide("storage", "sqlite in WAL mode", supersedes=first)
        with pytest.raises(LedgerRefusal) as info:
            await ledger.decide("storage", "postgres", supersedes=first)
        assert info.value.problem == "superseded"
        with pytest.raises(LedgerRefusal) as info:
            await ledger.decide("x", "y", supersedes="adr-99")
        assert info.value.problem == "not_found"
        accepted = await ledger.decisions("accepted")
        assert [d["id"] for d in accepted] == [second]
        [old] = await ledger.decisions("superseded")
        assert old["superseded_by"] == second and old["rationale"] == "embedded, no server"


async def test_checkpoints_resume_a_consumer_group(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, identity(1)) as one,
        RelayClient.connect(relay.url, identity(3)) as two,
    ):
        a, b = Ledger(one, NS), Ledger(two, NS)
        assert await a.get_checkpoint("indexer") == 0
        await a.checkpoint("indexer", 10, expect=0)
        with pytest.raises(LedgerRefusal) as info:
            await b.checkpoint("indexer", 7, expect=0)  # b lags: it would go back
        assert info.value.problem == "changed"
        await b.checkpoint("indexer", 12, expect=10)
        assert await a.get_checkpoint("indexer") == 12


async def test_lists_come_in_pages(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        ledger = Ledger(client, NS)
        for n in range(7):
            await ledger.create(f"order {n}")
        page = await client.query(NS, "wo.list", {"limit": 3})
        assert [o["id"] for o in page["orders"]] == ["wo-1", "wo-2", "wo-3"] and page["more"]
        page = await client.query(NS, "wo.list", {"limit": 3, "after": 6})
        assert [o["id"] for o in page["orders"]] == ["wo-7"] and not page["more"]
        assert len(await ledger.list()) == 7  # the SDK follows the pages


async def test_a_big_list_is_cut_to_fit_a_frame(tmp_path: Path, nursery: trio.Nursery) -> None:
    from tests.conftest import start_relay

    relay = await start_relay(nursery, tmp_path / "r", RelayConfig(max_frame=64 * 1024))
    async with RelayClient.connect(relay.url, identity(1)) as client:
        ledger = Ledger(client, NS)
        await ledger.create("much discussed")
        for n in range(30):  # 30 posts of 4 KB and 30 notes of 16 KB: over 64 KiB each
            await ledger.post(f"{n} " + "p" * 3990)
            await ledger.note("wo-1", f"{n} " + "n" * 16_000)
        page = await client.query(NS, "bulletin.list", {"after": 0, "limit": 1000})
        assert page["more"] and 1 <= len(page["posts"]) < 30
        assert page["posts"][0]["n"] == 1
        shown = await ledger.show("wo-1")
        assert shown["notes_total"] == 30 and 1 <= len(shown["notes"]) < 30
        assert shown["notes"][-1]["text"].startswith("29 ")  # the latest are kept
    relay.scope.cancel()


async def test_a_query_sees_the_writes_published_before_it(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        ledger = Ledger(client, NS)
        async with trio.open_nursery() as nursery:
            # Pipelined: the publishes are not acked when the query is sent.
            for n in range(20):
                nursery.start_soon(ledger.post, f"post {n}")
            await trio.testing.wait_all_tasks_blocked()
            posts = await ledger.bulletin(limit=100)
        assert len(posts) == 20


@pytest.mark.parametrize(
    ("q", "args", "code"),
    [
        ("wo.fly", {}, ErrorCode.UNKNOWN_QUERY),
        ("wo.show", {}, ErrorCode.BAD_QUERY),
        ("wo.show", {"wo": 7}, ErrorCode.BAD_QUERY),
        ("wo.show", {"wo": "wo-1", "extra": 1}, ErrorCode.BAD_QUERY),
        ("wo.show", {"wo": "wo-404"}, ErrorCode.NOT_FOUND),
        ("wo.list", {"status": "flying"}, ErrorCode.BAD_QUERY),
        ("wo.list", {"limit": 0}, ErrorCode.BAD_QUERY),
        ("wo.list", {"limit": 10**6}, ErrorCode.BAD_QUERY),
        ("context.pull", {"wo": "wo-404"}, ErrorCode.NOT_FOUND),
        ("context.pull", {"version": "2"}, ErrorCode.BAD_QUERY),
        ("ckpt.get", {"name": ["x"]}, ErrorCode.BAD_QUERY),
    ],
)
async def test_bad_queries_get_a_code_and_the_connection_lives(
    relay: RunningRelay, q: str, args: dict[str, Any], code: ErrorCode
) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        await Ledger(client, NS).create("t")
        with pytest.raises(ProtocolError) as info:
            await client.query(NS, q, args)
        assert info.value.code is code
        assert (await client.query(NS, "wo.show", {"wo": "wo-1"}))["title"] == "t"


async def test_queries_on_other_homes_or_non_namespaces_are_refused(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        with pytest.raises(ProtocolError) as info:
            await client.query("work@elsewhere", "wo.list")
        assert info.value.code is ErrorCode.NOT_HOME
        with pytest.raises(ProtocolError) as info:
            await client.query("NOT A NAMESPACE", "wo.list")
        assert info.value.code is ErrorCode.BAD_QUERY
        assert (await client.query(NS, "wo.list"))["orders"] == []  # an empty namespace


@pytest.mark.parametrize(
    ("kind", "body", "problem"),
    [
        ("context.put", {"body": "x" * (MAX_CONTEXT + 1)}, "bad_request"),
        ("context.put", {"body": b"bytes are not JSON"}, "bad_request"),
        ("context.put", {"body": {"1": [{"deep": None}] * 2}, "extra": 1}, "bad_request"),
        ("context.put", {"body": "x", "wo": "wo-404"}, "not_found"),
        ("context.put", {"body": "x", "token": 1}, "bad_request"),  # a token needs its wo
        ("context.put", "not a map", "bad_request"),
        ("bulletin.post", {"text": "x" * 5000}, "bad_request"),
        ("bulletin.post", {"text": 5}, "bad_request"),
        ("decision.add", {"title": " ", "decision": "d"}, "bad_request"),
        ("decision.add", {"title": "t"}, "bad_request"),
        ("ckpt.set", {"name": "c", "seq": -1}, "bad_request"),
        ("ckpt.set", {"name": "", "seq": 1}, "bad_request"),
        ("ckpt.set", {"name": "c", "seq": 1, "expect": 9}, "changed"),
        ("wo.note", {"wo": "wo-1", "text": "x" * 20_000}, "bad_request"),
    ],
)
async def test_bad_record_requests_are_refused_and_change_nothing(
    relay: RunningRelay, kind: str, body: Any, problem: str
) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        ledger = Ledger(client, NS)
        await ledger.create("t")
        before = await client.query(NS, "wo.show", {"wo": "wo-1"})
        published = await client.publish(NS, kind, body)
        assert published.outcome is not None
        verdict = published.outcome.event.event
        assert verdict.kind == kind.partition(".")[0] + ".rejected"
        assert verdict.body["problem"] == problem
        assert await ledger.pull_context() is None
        assert await ledger.bulletin() == [] and await ledger.decisions() == []
        assert await ledger.get_checkpoint("c") == 0
        after = await client.query(NS, "wo.show", {"wo": "wo-1"})
        assert {**after, "age": None} == {**before, "age": None}


async def test_records_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    author = identity(1)

    def request(kind: str, body: Any, ts: int) -> Any:
        return sign_event(Event(NS, kind, author.public_key, body, ts=ts), author.sign)

    store = open_test_store(path)
    first = RelayNode(RELAY, store, RelayConfig(), wall_ms=lambda: NOW)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        await first.publish(request("context.put", {"body": {"k": 1}}, NOW))
        await first.publish(request("bulletin.post", {"text": "did it"}, NOW + 1))
        await first.publish(request("decision.add", {"title": "t", "decision": "d"}, NOW + 2))
        await first.publish(request("ckpt.set", {"name": "c", "seq": 3}, NOW + 3))
        before = [await first.query(NS, q, a) for q, a in QUERIES_OF_RECORDS]
        nursery.cancel_scope.cancel()
    store.close()

    store = open_test_store(path)
    second = RelayNode(RELAY, store, RelayConfig(), wall_ms=lambda: NOW)
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run)
        with trio.fail_after(30):  # a restart that lost its committed heads fails here
            after = [await second.query(NS, q, a) for q, a in QUERIES_OF_RECORDS]
        assert second.head(NS) == first.head(NS)
        nursery.cancel_scope.cancel()
    store.close()
    assert after == before
    assert before[0]["body"] == {"k": 1} and before[3]["seq"] == 3


QUERIES_OF_RECORDS: list[tuple[str, dict[str, Any]]] = [
    ("context.pull", {}),
    ("bulletin.list", {}),
    ("decision.list", {}),
    ("ckpt.get", {"name": "c"}),
]
