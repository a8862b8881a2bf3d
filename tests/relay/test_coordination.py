"""Coordination through the relay: outcomes in the log, contention, expiry, restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from agent_sdk.client import Published, RelayClient
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.wire import Event, decode, sign_event
from relay.node import RelayConfig, RelayNode
from relay.store.memory import MemoryStore
from tests.backends import open_test_store
from tests.conftest import RunningRelay, identity
from tests.relay.test_node import virtual_wall
from tests.relay.test_sequencer import NOW

NS = "work@local"
RELAY = identity(2)


def outcome(published: Published) -> tuple[str, dict[str, Any]]:
    assert published.outcome is not None, "a request is answered with its outcome"
    delivered = published.outcome
    assert delivered.event.event.author == published.receipt.relay  # the relay wrote it
    assert delivered.event.event.deps == (published.receipt.id,)
    assert delivered.receipt.seq > published.receipt.seq
    return delivered.event.event.kind, delivered.event.event.body


async def test_a_hundred_agents_claim_one_order_and_one_wins(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as creator:
        _, created = outcome(await creator.publish(NS, "wo.create", {"title": "hot"}))
    order = created["wo"]
    results: list[tuple[str, dict[str, Any]]] = []

    async def agent(n: int) -> None:
        async with RelayClient.connect(relay.url, identity(10 + n)) as client:
            results.append(outcome(await client.publish(NS, "wo.claim", {"wo": order})))

    async with trio.open_nursery() as nursery:
        for n in range(100):
            nursery.start_soon(agent, n)
    winners = [body for kind, body in results if kind == "wo.claimed"]
    losers = [body for kind, body in results if kind == "wo.rejected"]
    assert len(winners) == 1 and len(losers) == 99
    holder = winners[0]["holder"]
    assert all(body["problem"] == "held" and holder.hex() in body["reason"] for body in losers)


async def test_agents_cannot_write_the_relays_verdicts(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        with pytest.raises(ProtocolError) as info:
            await client.publish(NS, "wo.claimed", {"wo": "wo-1", "token": 99})
        assert info.value.code is ErrorCode.RESERVED_KIND
        plain = await client.publish(NS, "app.note", "not a request")
        assert plain.outcome is None


async def test_a_lapsed_claim_is_announced_and_reopened(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    node = RelayNode(RELAY, MemoryStore(), RelayConfig(), wall_ms=virtual_wall())
    await nursery.start(node.run)
    author = identity(1)

    def request(kind: str, body: Any, n: int) -> Any:
        wall = node.wall_ms() + n  # distinct events even within one virtual millisecond
        return sign_event(
            Event(ns=NS, kind=kind, author=author.public_key, body=body, ts=wall), author.sign
        )

    await node.publish(request("wo.create", {"title": "t"}, 1))
    claim = await node.publish(request("wo.claim", {"wo": "wo-1", "ttl_ms": 5_000}, 2))
    assert node.coordination.coordinators[NS].ledger.orders["wo-1"].status.value == "claimed"
    await trio.sleep(6)  # virtual time: past the lease
    await trio.testing.wait_all_tasks_blocked()
    kinds = [record.kind for record in node.store.scan(NS)]
    assert kinds[-1] == "lease.expired"
    body = decode(list(node.store.scan(NS))[-1].event)["body"]
    assert body == {"leases": [["wo-1", 1]]}
    assert node.coordination.coordinators[NS].ledger.orders["wo-1"].status.value == "open"
    assert claim.seq == 3


async def test_leases_in_many_namespaces_each_lapse_at_their_own_time(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # The timer keeps each namespace's next expiry in a heap rather than asking every
    # namespace after each outcome (relay/coordination/host.py): every lease must still
    # lapse when it runs out, including one shorter than all those already waiting.
    node = RelayNode(RELAY, MemoryStore(), RelayConfig(), wall_ms=virtual_wall())
    await nursery.start(node.run)
    author = identity(1)
    namespaces = [f"crew{n}@local" for n in range(30)]
    sent = 0

    async def ask(ns: str, kind: str, body: Any) -> None:
        nonlocal sent
        sent += 1  # distinct events even within one virtual millisecond
        event = Event(ns, kind, author.public_key, body, ts=node.wall_ms(), nonce=sent.to_bytes(4))
        await node.publish(sign_event(event, author.sign))

    def last_kind(ns: str) -> str:
        return list(node.store.scan(ns))[-1].kind

    for n, ns in enumerate(namespaces):  # leases of 10 s, 12 s, ... 68 s
        await ask(ns, "wo.create", {"title": "t"})
        await ask(ns, "wo.claim", {"wo": "wo-1", "ttl_ms": 10_000 + 2_000 * n})
    began = trio.current_time()
    await ask(namespaces[-1], "wo.create", {"title": "soon"})
    await ask(namespaces[-1], "wo.claim", {"wo": "wo-2", "ttl_ms": 5_000})  # first to lapse
    await trio.sleep_until(began + 5.5)
    await trio.testing.wait_all_tasks_blocked()
    assert last_kind(namespaces[-1]) == "lease.expired"
    assert all(last_kind(ns) == "wo.claimed" for ns in namespaces[:-1])
    for n, ns in enumerate(namespaces[:-1]):
        await trio.sleep_until(began + 10 + 2 * n - 0.5)
        await trio.testing.wait_all_tasks_blocked()
        assert last_kind(ns) == "wo.claimed"  # not yet
        await trio.sleep_until(began + 10 + 2 * n + 0.5)
        await trio.testing.wait_all_tasks_blocked()
        assert last_kind(ns) == "lease.expired"
        assert all(last_kind(later) == "wo.claimed" for later in namespaces[n + 1 : -1])


async def test_a_restarted_relay_folds_the_same_ledger(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    author = identity(1)

    def request(kind: str, body: Any, ts: int) -> Any:
        return sign_event(
            Event(ns=NS, kind=kind, author=author.public_key, body=body, ts=ts), author.sign
        )

    store = open_test_store(path)
    first = RelayNode(RELAY, store, RelayConfig(), wall_ms=lambda: NOW)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        await first.publish(request("wo.create", {"title": "a", "priority": 1}, NOW))
        await first.publish(request("wo.create", {"title": "b"}, NOW + 1))
        await first.publish(request("wo.next", {"ttl_ms": 600_000}, NOW + 2))
        nursery.cancel_scope.cancel()
    store.close()
    before = first.coordination.coordinators[NS].ledger

    store = open_test_store(path)
    second = RelayNode(RELAY, store, RelayConfig(), wall_ms=lambda: NOW + 10)
    after = second.coordination.coordinators[NS].ledger
    assert after.orders == before.orders and after.leases == before.leases
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run)
        again = await second.publish(request("wo.claim", {"wo": "wo-1"}, NOW + 10))
        nursery.cancel_scope.cancel()
    store.close()
    reopened = open_test_store(path, readonly=True)
    verdict = next(r for r in reopened.scan(NS) if r.seq > again.seq)
    reopened.close()
    # Still held by the first claim (token 1; the relay decided it at its clock, NOW),
    # across the restart.
    refusal = decode(verdict.event)["body"]
    assert (verdict.kind, refusal["req"], refusal["problem"]) == ("wo.rejected", again.id, "held")
    holder = refusal.get("holder")
    assert holder is not None, refusal  # the lease that holds it, as the refusal names it
    assert (holder["token"], holder["holder"], holder["expires_ms"]) == (
        1,
        author.public_key,
        NOW + 600_000,
    )


def _request(kind: str, body: Any, ts: int, deps: tuple[bytes, ...] = ()) -> Any:
    author = identity(1)
    event = Event(ns=NS, kind=kind, author=author.public_key, body=body, ts=ts, deps=deps)
    return sign_event(event, author.sign)


async def test_a_query_is_answered_only_once_what_it_reflects_is_committed(
    nursery: trio.Nursery,
) -> None:
    """A query reads the state as sequenced, so an agent reads its own writes, and is
    answered only once that state is committed: a crash must not take back what an
    agent was told (RelayNode.query). The commit is held back by taking the node's
    writer lock, which every append takes first."""
    node = RelayNode(RELAY, MemoryStore(), RelayConfig(), wall_ms=lambda: NOW)
    await nursery.start(node.run)
    answers: list[tuple[int, Any]] = []  # (committed head when answered, the answer)

    async def ask() -> None:
        listed = await node.query(NS, "wo.list", {})
        answers.append((node.head(NS), listed))

    with trio.fail_after(30):
        async with trio.open_nursery() as asking, node._write_lock:
            ticket = await node.admit(_request("wo.create", {"title": "t"}, NOW))
            await trio.testing.wait_all_tasks_blocked()
            assert node.sequencer.heads[NS].seq == 2  # the request and its outcome
            assert node.head(NS) == 0  # ... neither committed
            asking.start_soon(ask)
            await trio.testing.wait_all_tasks_blocked()
            assert answers == []  # it sees the order, and waits for its commit
        await node.answer(ticket)
    [(head, listed)] = answers
    assert head == 2
    assert [order["title"] for order in listed["orders"]] == ["t"]


async def test_an_outcome_follows_events_its_request_released(nursery: trio.Nursery) -> None:
    node = RelayNode(RELAY, MemoryStore(), RelayConfig(), wall_ms=lambda: NOW)
    await nursery.start(node.run)
    create = _request("wo.create", {"title": "t"}, NOW)
    follower = _request("app.after", "waits for the create", NOW, deps=(create.id,))
    parked = await node.admit(follower)
    await trio.testing.wait_all_tasks_blocked()
    await node.publish(create)
    await node.answer(parked)
    kinds = [(r.seq, r.kind) for r in node.store.scan(NS)]
    assert kinds == [(1, "wo.create"), (2, "app.after"), (3, "wo.created")]


async def test_a_request_stored_without_its_outcome_is_answered_at_start(
    tmp_path: Path,
) -> None:
    from dataclasses import replace

    from agent_sdk.wire import decode_receipt, seal
    from relay.sequencer import Sequenced, Sequencer

    path = tmp_path / "events.sqlite3"
    store = open_test_store(path)
    # A crash after the request's commit and before its outcome's: only the request.
    create = _request("wo.create", {"title": "t"}, NOW)
    placed = Sequencer(RELAY.public_key).offer(create, NOW)
    assert isinstance(placed, Sequenced)
    [record] = placed.records
    store.append([replace(record, seal=seal(decode_receipt(record.receipt), RELAY.sign))])

    node = RelayNode(RELAY, store, RelayConfig(), wall_ms=lambda: NOW + 5)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        with trio.fail_after(30):  # a start that answers nothing fails here, not hangs
            await node.wait_beyond(NS, 1)
        nursery.cancel_scope.cancel()
    answer = list(store.scan(NS))[1]
    assert answer.kind == "wo.created" and answer.author == RELAY.public_key
    assert decode(answer.event)["body"]["req"] == create.id
    assert node.outcome_of(create.id) is not None
    store.close()


async def test_requests_released_by_an_outcome_are_decided_in_log_order(
    nursery: trio.Nursery,
) -> None:
    from relay.coordination.host import Host

    node = RelayNode(RELAY, MemoryStore(), RelayConfig(), wall_ms=lambda: NOW)
    await nursery.start(node.run)
    create = _request("wo.create", {"title": "t"}, NOW)
    # The relay's outcome of `create` is predictable (its clock is fixed here), so an
    # agent can make a request wait on it: it is released by that outcome.
    predicted = sign_event(
        Event(
            ns=NS,
            kind="wo.created",
            author=RELAY.public_key,
            body={"req": create.id, "wo": "wo-1", "status": "open"},
            deps=(create.id,),
            ts=NOW,
        ),
        RELAY.sign,
    )
    first = _request("wo.claim", {"wo": "wo-1"}, NOW + 1, deps=(create.id,))
    second = _request("wo.claim", {"wo": "wo-1"}, NOW + 2, deps=(predicted.id,))
    tickets = [await node.admit(first), await node.admit(second)]
    await trio.testing.wait_all_tasks_blocked()
    await node.publish(create)
    for ticket in tickets:
        await node.answer(ticket)

    records = list(node.store.scan(NS))
    assert predicted.id in {r.id for r in records}
    replayed = Host(RELAY.public_key)
    replayed.rebuild(records)
    live = node.coordination.coordinators[NS].ledger
    assert replayed.coordinators[NS].ledger.leases == live.leases
    verdicts = {
        decode(r.event)["body"]["req"]: r.kind for r in records if r.author == RELAY.public_key
    }
    holder = live.leases.leases["wo-1"].holder
    assert holder == identity(1).public_key
    # The claim earlier in the log won, and the log's own outcomes say so.
    claims = sorted((r.seq, r.id) for r in records if r.kind == "wo.claim")
    assert [verdicts[request_id] for _, request_id in claims] == ["wo.claimed", "wo.rejected"]


class ExternalStore:
    """A resource outside the relay (a file, a database row) that agents write to.

    With ``fenced``, it remembers the highest fencing token it has seen and refuses
    writes that carry a lower one: the storage-side half of fencing.
    """

    def __init__(self, fenced: bool) -> None:
        self.fenced = fenced
        self.highest = 0
        self.value: str | None = None

    def write(self, value: str, token: int) -> bool:
        if self.fenced and token < self.highest:
            return False
        self.highest = max(self.highest, token)
        self.value = value
        return True


@pytest.mark.parametrize("fenced", [True, False], ids=["fenced", "control-without-fencing"])
async def test_a_holder_paused_past_its_lease_cannot_clobber_the_next(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, fenced: bool
) -> None:
    node = RelayNode(RELAY, MemoryStore(), RelayConfig(), wall_ms=virtual_wall())
    await nursery.start(node.run)
    slow, fast = identity(1), identity(3)

    async def ask(who: Any, kind: str, body: Any, nonce: int) -> dict[str, Any]:
        event = Event(
            ns=NS,
            kind=kind,
            author=who.public_key,
            body=body,
            ts=node.wall_ms(),
            nonce=bytes([nonce]),
        )
        request = await node.publish(sign_event(event, who.sign))
        located = node.outcome_of(request.id)
        assert located is not None
        answer = await node.committed_record(located.ns, located.seq)
        fields: dict[str, Any] = decode(answer.event)
        return {"kind": fields["kind"], **fields["body"]}

    await ask(slow, "wo.create", {"title": "update the config"}, 1)
    first = await ask(slow, "wo.claim", {"wo": "wo-1", "ttl_ms": 5_000}, 2)
    store = ExternalStore(fenced)
    await trio.sleep(6)  # the slow holder stalls (a GC pause, a laptop lid) past its TTL
    second = await ask(fast, "wo.claim", {"wo": "wo-1", "ttl_ms": 5_000}, 3)
    assert second["kind"] == "wo.claimed" and second["token"] > first["token"]
    assert store.write("fast's config", second["token"])

    # The slow holder wakes up and acts on its old claim.
    late_note = await ask(slow, "wo.note", {"wo": "wo-1", "text": "done!", "token": 1}, 4)
    assert late_note["kind"] == "wo.rejected" and late_note["problem"] == "not_holder"
    accepted = store.write("slow's stale config", first["token"])
    if fenced:
        assert not accepted and store.value == "fast's config"
    else:  # the control run: without fencing the stale holder's write wins
        assert accepted and store.value == "slow's stale config"


async def test_locks_through_the_relay(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, identity(1)) as first,
        RelayClient.connect(relay.url, identity(2)) as second,
    ):
        kind, body = outcome(await first.publish(NS, "lock.acquire", {"name": "path:src/"}))
        assert kind == "lock.acquired"
        kind, refused = outcome(await second.publish(NS, "lock.acquire", {"name": "path:src/"}))
        assert kind == "lock.rejected" and refused["problem"] == "held"
        release = {"name": "path:src/", "token": body["token"]}
        assert outcome(await first.publish(NS, "lock.release", release))[0] == "lock.released"
        assert outcome(await second.publish(NS, "lock.acquire", {"name": "path:src/"}))[0] == (
            "lock.acquired"
        )


async def test_a_request_resent_after_a_restart_gets_its_outcome(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The client re-sends what was not acked; if that was a claim the relay granted
    before it went down, the agent must learn it holds the order, not get a bare ack."""
    from tests.conftest import start_relay

    data = tmp_path / "relay"
    author = identity(1)
    first = await start_relay(nursery, data)
    async with RelayClient.connect(first.url, author) as client:
        await client.publish(NS, "wo.create", {"title": "t"})
        claim = sign_event(
            Event(NS, "wo.claim", author.public_key, {"wo": "wo-1"}, ts=client_now()),
            author.sign,
        )
        granted = await client.publish_signed(claim)
    first.scope.cancel()
    await trio.testing.wait_all_tasks_blocked()

    second = await start_relay(nursery, data)
    async with RelayClient.connect(second.url, author) as client:
        again = await client.publish_signed(claim)
    assert again.duplicate and again.outcome is not None and granted.outcome is not None
    assert again.outcome.event.id == granted.outcome.event.id
    assert again.outcome.event.event.kind == "wo.claimed"
    second.scope.cancel()


async def test_an_old_duplicate_request_is_acked_with_its_outcome_from_the_log(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The relay no longer remembers where the outcome of a request sent again is (it
    keeps the last ``known_capacity``): it finds it in the log, right behind the
    request, and the ack carries it. (It came without one: the agent had to read the
    log, which an agent that may write the namespace but not read it, through its own
    relay, cannot.)"""
    from relay.sequencer import Limits
    from tests.conftest import start_relay

    forgetful = RelayConfig(sequencer=Limits(known_capacity=2))
    relay = await start_relay(nursery, tmp_path / "relay", forgetful)
    author = identity(1)
    async with RelayClient.connect(relay.url, author) as client:
        await client.publish(NS, "wo.create", {"title": "t"})
        claim = sign_event(
            Event(NS, "wo.claim", author.public_key, {"wo": "wo-1"}, ts=client_now()),
            author.sign,
        )
        granted = await client.publish_signed(claim)
        for n in range(3):  # three outcomes since: the claim's is forgotten
            await client.publish(NS, "wo.create", {"title": f"other {n}"})
        assert relay.node.outcome_of(claim.id) is None
        again = await client.publish_signed(claim)
        note = sign_event(
            Event(NS, "app.note", author.public_key, "hi", ts=client_now()), author.sign
        )
        await client.publish_signed(note)
        assert (await client.publish_signed(note)).outcome is None  # not a request
    assert again.duplicate and again.outcome is not None and granted.outcome is not None
    assert again.outcome.event.id == granted.outcome.event.id
    assert outcome(again) == outcome(granted)


async def test_a_request_asked_again_days_later_is_a_duplicate_one_never_sequenced_is_refused(
    nursery: trio.Nursery,
) -> None:
    """What a CLI rerun asking again for a lease request relies on (agent_sdk/
    cli_pending.py): an id sequenced is found in the store before the ts is checked,
    so a request asked again past ``max_clock_skew`` (and past ``known_capacity``:
    the id and its outcome forgotten) is a duplicate, its outcome right behind it;
    one never sequenced is refused ``bad_timestamp``, and nothing is decided."""
    from relay.sequencer import Limits

    wall = [NOW]
    forgetful = RelayConfig(sequencer=Limits(known_capacity=2))
    node = RelayNode(RELAY, MemoryStore(), forgetful, wall_ms=lambda: wall[0])
    await nursery.start(node.run)
    author = identity(1)

    def request(kind: str, body: Any, nonce: int) -> Any:
        made = Event(NS, kind, author.public_key, body, ts=NOW, nonce=bytes([nonce]))
        return sign_event(made, author.sign)

    await node.publish(request("wo.create", {"title": "t"}, 1))
    claim, never = request("wo.claim", {"wo": "wo-1"}, 2), request("wo.claim", {"wo": "wo-1"}, 3)
    first = await node.publish(claim)
    for n in range(3):  # three outcomes since: the claim's is forgotten, and its id
        await node.publish(request("wo.create", {"title": f"other {n}"}, 10 + n))
    assert node.outcome_of(claim.id) is None and node.sequencer.locate(claim.id) is None
    wall[0] = NOW + 2 * 24 * 3600 * 1000  # two days on: past the 24 h skew limit
    head = node.head(NS)
    again = await node.publish(claim)
    assert again.seq == first.seq and node.head(NS) == head  # the same record, nothing new
    answer = await node.outcome_behind(again)
    assert answer is not None and decode(answer.event)["kind"] == "wo.claimed"
    with pytest.raises(ProtocolError) as refused:
        await node.publish(never)
    assert refused.value.code is ErrorCode.BAD_TIMESTAMP and node.head(NS) == head


def client_now() -> int:
    import time

    return time.time_ns() // 1_000_000


async def test_clock_jumps_never_make_two_valid_holders(nursery: trio.Nursery) -> None:
    """The relay's wall clock steps back (NTP) and then leaps forward: the log's time
    (the HLC) never goes back, so a step back cannot end a lease early, and after a
    leap the old holder is fenced off rather than left holding alongside the new."""
    wall = [NOW]
    node = RelayNode(RELAY, MemoryStore(), RelayConfig(), wall_ms=lambda: wall[0])
    await nursery.start(node.run)
    a, b = identity(1), identity(3)
    nonce = 0

    async def ask(who: Any, kind: str, body: Any) -> tuple[str, dict[str, Any]]:
        nonlocal nonce
        nonce += 1
        event = Event(NS, kind, who.public_key, body, ts=NOW, nonce=bytes([nonce]))
        request = await node.publish(sign_event(event, who.sign))
        located = node.outcome_of(request.id)
        assert located is not None
        fields = decode((await node.committed_record(located.ns, located.seq)).event)
        return fields["kind"], fields["body"]

    await ask(a, "wo.create", {"title": "t"})
    kind, first = await ask(a, "wo.claim", {"wo": "wo-1", "ttl_ms": 60_000})
    assert kind == "wo.claimed"
    wall[0] = NOW - 3_600_000  # an hour back
    kind, refused = await ask(b, "wo.claim", {"wo": "wo-1"})
    assert kind == "wo.rejected" and refused["problem"] == "held"
    wall[0] = NOW + 3_600_000  # and two hours forward: the lease is over by the log's time
    kind, second = await ask(b, "wo.claim", {"wo": "wo-1", "ttl_ms": 60_000})
    assert kind == "wo.claimed" and second["token"] > first["token"]
    for request in ("wo.renew", "wo.release"):
        kind, fenced = await ask(a, request, {"wo": "wo-1", "token": first["token"]})
        assert kind == "wo.rejected" and fenced["problem"] == "not_holder"
    leases = node.coordination.coordinators[NS].ledger.leases
    holder = leases.holder("wo-1", wall[0])
    assert holder is not None and holder.holder == b.public_key


async def test_an_old_duplicates_outcome_is_found_a_few_records_behind_it() -> None:
    """Usually the very next record; behind other events (released from parking with
    the request, 8.2) it is found too, within OUTCOME_LOOKAHEAD records, and a record
    that answers another request is never taken for it."""
    from types import SimpleNamespace

    from relay.node import OUTCOME_LOOKAHEAD
    from relay.sequencer import Sequenced, Sequencer

    relay, agent = identity(2), identity(1)

    def log_with(notes: int) -> list[Any]:
        """Two requests; the second's answer, ``notes`` other events, the first's."""
        sequencer = Sequencer(relay.public_key)

        def logged(author: Any, kind: str, body: Any) -> Any:
            made = Event(ns="t@local", kind=kind, author=author.public_key, body=body, ts=NOW)
            outcome = sequencer.offer(sign_event(made, author.sign), NOW)
            assert isinstance(outcome, Sequenced)
            return outcome.records[0]

        def answer(request: Any) -> Any:
            return logged(relay, "wo.claimed", {"req": request.id, "wo": "wo-1", "token": 1})

        mine, other = logged(agent, "wo.claim", {"wo": "wo-1"}), logged(agent, "wo.claim", {})
        records = [mine, other, answer(other)]
        records += [logged(agent, "app.note", n) for n in range(notes)]
        return [*records, answer(mine)]

    async def behind(records: list[Any], request: Any) -> Any:
        async def read(ns: str, seq: int, count: int) -> list[Any]:
            return [r for r in records if seq <= r.seq < seq + count]

        node = SimpleNamespace(read=read, identity=relay)
        return await RelayNode.outcome_behind(node, request)  # type: ignore[arg-type]

    records = log_with(OUTCOME_LOOKAHEAD - 3)  # the first's answer: 16 records behind it
    assert await behind(records, records[0]) is records[-1]
    assert await behind(records, records[1]) is records[2]  # the very next one
    assert await behind(records, records[3]) is None  # not a request
    records = log_with(OUTCOME_LOOKAHEAD - 2)  # 17 behind: not looked for so far
    assert await behind(records, records[0]) is None
