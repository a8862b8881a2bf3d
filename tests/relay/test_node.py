"""The node's loops in virtual time: group commit, parking timeouts, restarts, seams.

Tests that use the ``node`` fixture also take ``autojump_clock``: pytest-trio picks the
clock from the test's own arguments, and the node reads its wall clock from trio's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing

from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.wire import (
    Event,
    SignedEvent,
    decode_receipt,
    pruned_mark,
    sign_event,
    verify_seal,
)
from relay.node import MAX_WAITING_PER_PARKED, RelayConfig, RelayNode, Ticket
from relay.sequencer import Limits
from relay.store import Located, Record
from relay.store.memory import MemoryStore
from relay.verify import verify_log
from tests.backends import open_test_store
from tests.conftest import identity
from tests.relay.test_sequencer import NOW, event

RELAY = identity(2)


def virtual_wall() -> Callable[[], int]:
    """The relay's wall clock, driven by trio's (virtual) clock from NOW on."""
    origin = trio.current_time()
    return lambda: NOW + int((trio.current_time() - origin) * 1000)


@pytest.fixture
async def node(nursery: trio.Nursery) -> AsyncIterator[RelayNode]:
    config = RelayConfig(sequencer=Limits(park_timeout_ms=5_000))
    running = RelayNode(RELAY, MemoryStore(), config, wall_ms=virtual_wall())
    await nursery.start(running.run)
    yield running


async def test_publish_is_acked_after_commit_with_a_seal(
    node: RelayNode, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(60):  # virtual time: a publish never answered fails here
        record = await node.publish(event(1))
    assert node.store.record(record.id) == record
    assert record.seal is not None  # alone in its batch, so it is the sealed head
    assert verify_seal(decode_receipt(record.receipt), record.seal)
    assert node.head("t@local") == 1


async def test_concurrent_publishes_share_batches_and_seals(
    node: RelayNode, autojump_clock: trio.testing.MockClock
) -> None:
    results: list[Record] = []

    async def publish(n: int) -> None:
        results.append(await node.publish(event(n)))

    async with trio.open_nursery() as nursery:
        for n in range(50):
            nursery.start_soon(publish, n)
    assert sorted(r.seq for r in results) == list(range(1, 51))
    assert node.stats["batches"] < 50  # group commit: fewer commits than events
    stored = list(node.store.scan("t@local"))
    assert stored[-1].seal is not None
    assert sum(r.seal is not None for r in stored) == node.stats["batches"]
    # Each seal is the relay's signature over its own receipt: the log verifies.
    where = {r.id: Located(r.ns, r.seq, r.hlc) for r in stored}
    assert verify_log("t@local", stored, where.get, RELAY.public_key).ok


async def test_parked_event_is_answered_when_its_cause_arrives(
    node: RelayNode, autojump_clock: trio.testing.MockClock
) -> None:
    cause, effect = event(1), event(2, deps=(event(1).id,))
    answers: dict[str, Record] = {}

    async def publish(name: str, signed: object) -> None:
        answers[name] = await node.publish(signed)  # type: ignore[arg-type]

    with trio.fail_after(60):  # virtual time: a parked publish never answered fails here
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish, "effect", effect)
            await trio.testing.wait_all_tasks_blocked()
            assert node.sequencer.parked_count == 1
            await trio.sleep(4)  # virtual time, inside the 5 s parking timeout
            nursery.start_soon(publish, "cause", cause)
    assert answers["cause"].seq == 1
    assert answers["effect"].seq == 2


async def test_parked_event_times_out_with_missing_deps(
    node: RelayNode, autojump_clock: trio.testing.MockClock
) -> None:
    effect = event(2, deps=(event(1).id,))
    start = trio.current_time()
    with pytest.raises(ProtocolError) as info, trio.fail_after(60):  # virtual time
        await node.publish(effect)
    assert info.value.code is ErrorCode.MISSING_DEPS
    assert trio.current_time() - start == pytest.approx(5.0, abs=0.01)
    assert node.head("t@local") == 0


async def test_duplicate_publish_returns_the_original_receipt(
    node: RelayNode, autojump_clock: trio.testing.MockClock
) -> None:
    first = await node.publish(event(1))
    ticket = await node.admit(event(1))
    again = await node.answer(ticket)
    assert ticket.duplicate
    assert again.receipt == first.receipt
    assert node.head("t@local") == 1


async def test_namespaces_homed_elsewhere_are_refused(
    node: RelayNode, autojump_clock: trio.testing.MockClock
) -> None:
    with pytest.raises(ProtocolError) as info:
        await node.publish(event(1, ns="t@elsewhere"))
    assert info.value.code is ErrorCode.NOT_HOME


async def test_folds_see_every_committed_record_in_order(
    node: RelayNode, autojump_clock: trio.testing.MockClock
) -> None:
    seen: list[tuple[str, int]] = []
    node.folds.append(lambda record: seen.append((record.ns, record.seq)))
    for n in range(3):
        await node.publish(event(n))
    await node.publish(event(9, ns="u@local"))
    assert seen == [("t@local", 1), ("t@local", 2), ("t@local", 3), ("u@local", 1)]


async def test_reads_come_from_memory_then_from_the_store(nursery: trio.Nursery) -> None:
    config = RelayConfig(recent_bytes=3000, commit_batch=1, sequencer=Limits(known_capacity=10))
    node = RelayNode(RELAY, MemoryStore(), config, wall_ms=lambda: NOW)
    await nursery.start(node.run)
    records = [await node.publish(event(n)) for n in range(10)]
    await node.publish(event(0, ns="u@local"))
    cached = sorted(node._recent["t@local"])
    assert cached[0] > 1 and cached == list(range(cached[0], 11))  # a contiguous tail
    assert node._recent_size <= 3000
    assert await node.read("t@local", 1, 100) == records  # older ones from the store
    assert await node.read("t@local", 9, 2) == records[8:10]  # recent ones from memory
    assert await node.read("t@local", 11, 5) == []


async def test_a_restarted_node_continues_each_log(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    for round_ in range(2):
        store = open_test_store(path)
        node = RelayNode(RELAY, store, RelayConfig(), wall_ms=lambda r=round_: NOW + r)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            first = await node.publish(event(round_ * 10))
            duplicate = await node.answer(await node.admit(event(0)))  # from the store
            nursery.cancel_scope.cancel()
        store.close()
        assert first.seq == round_ + 1
        assert duplicate.seq == 1


def test_a_batch_longer_than_one_insert_is_stored_whole(tmp_path: Path) -> None:
    # The SQLite store writes a batch as INSERTs of up to 64 rows each.
    store = open_test_store(tmp_path / "events.sqlite3")
    batch = [
        Record(
            ns="t@local",
            seq=seq,
            id=seq.to_bytes(32, "big"),
            kind="note",
            author=bytes(32),
            hlc=seq,
            event=b"event %d" % seq,
            sig=bytes(64),
            receipt=b"receipt %d" % seq,
            seal=b"seal" if seq == 150 else None,
        )
        for seq in range(1, 151)
    ]
    store.append(batch)
    assert list(store.scan("t@local")) == batch
    assert store.find([batch[99].id])[batch[99].id].seq == 100
    store.close()


async def test_republishing_a_parked_event_is_bounded(
    node: RelayNode, autojump_clock: trio.testing.MockClock
) -> None:
    effect = event(2, deps=(event(1).id,))
    tickets = [await node.admit(effect) for _ in range(20)]
    await trio.testing.wait_all_tasks_blocked()
    refused = [t for t in tickets if t.done.is_set()]
    assert len(refused) == 20 - MAX_WAITING_PER_PARKED
    assert all(t.error is not None and t.error.code is ErrorCode.MISSING_DEPS for t in refused)
    with trio.fail_after(60):  # virtual time
        await node.publish(event(1))
        for ticket in tickets[:MAX_WAITING_PER_PARKED]:
            assert (await node.answer(ticket)).seq == 2
    assert [t.duplicate for t in tickets[:3]] == [False, True, True]


async def test_a_parked_event_is_bounded_by_its_waiting_publishers_only(
    node: RelayNode, autojump_clock: trio.testing.MockClock
) -> None:
    """A link that drops while a write is parked at the home sends it again on the
    next connection; the waits of closed connections must not use up the places."""
    effect = event(2, deps=(event(1).id,))
    abandoned = []
    for _ in range(2 * MAX_WAITING_PER_PARKED):  # each publish's connection closes
        ticket = await node.admit(effect)
        with trio.move_on_after(0.1):  # well within park_timeout_ms in all
            await node.answer(ticket)
        assert not ticket.done.is_set()  # parked, not refused
        abandoned.append(ticket)
    last = await node.admit(effect)
    await node.publish(event(1))
    assert (await node.answer(last)).seq == 2
    assert all(t.done.is_set() and t.error is None for t in abandoned)  # still answered


async def test_wait_stat_wakes_for_every_increment(
    node: RelayNode, autojump_clock: trio.testing.MockClock
) -> None:
    """Each waiter returns at the increment that reaches its count, not before and not
    later: one waiting for 3 is woken (and waits again) at 1 and 2."""
    returned: dict[int, int] = {}  # at_least -> the counter when its waiter returned

    async def wait_for(at_least: int) -> None:
        await node.wait_stat("published", at_least)
        returned[at_least] = node.stats["published"]

    with trio.fail_after(60):  # virtual time: a waiter never woken fails here, not hangs
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for, 3)
            nursery.start_soon(wait_for, 1)
            await trio.testing.wait_all_tasks_blocked()
            assert returned == {}
            expected = [{1: 1}, {1: 1}, {1: 1, 3: 3}]
            for n in range(3):
                await node.publish(event(n))
                await trio.testing.wait_all_tasks_blocked()
                assert returned == expected[n]


async def test_idle_namespace_waits_leave_nothing_behind(
    node: RelayNode, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.move_on_after(1):
        await node.wait_beyond("idle@local", 0)
    assert "idle@local" not in node._changed


def test_only_a_record_compaction_pruned_is_vouched_for() -> None:
    """A home's pruned mark (protocol 4.5) says its compaction emptied the record: it
    is made for a doc.update or doc.compacted without bytes, never for another kind
    (a damaged store must not become a signed word); a mirror gives what it holds."""
    relay = identity(9)
    node = RelayNode(relay, MemoryStore(), RelayConfig(name="local"))
    pruned = Record("t@local", 2, b"\x01" * 32, "doc.update", b"", 5, b"", b"", b"")
    assert node.pruned_mark_of(pruned) == pruned_mark(pruned.id, relay.sign)
    assert node.pruned_mark_of(replace(pruned, kind="wo.claim")) is None
    foreign = replace(pruned, ns="t@other")
    assert node.pruned_mark_of(foreign) is None  # taken before marks existed
    assert node.pruned_mark_of(replace(foreign, sig=b"m" * 64)) == b"m" * 64


class WatchedStore(MemoryStore):
    """A memory store that calls ``appending`` with each batch before it stores it."""

    def __init__(self, appending: Callable[[Sequence[Record]], None]) -> None:
        super().__init__()
        self.appending = appending

    def append(self, records: Sequence[Record]) -> None:
        self.appending(records)
        super().append(records)


async def test_nothing_is_answered_or_visible_before_its_batch_is_committed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """An ack only after the commit of the batch that holds the event, and for a
    duplicate only after the original's (protocol 6.4): as each batch reaches the
    store, no publish of it is answered, no ticket of it is done and the committed
    head has not moved past it. Several batches (commit_batch=3), and a duplicate
    decided in the same batch as its original, while that is not committed."""
    answered: dict[bytes, Record] = {}  # by event id, as each answer returns
    tickets: list[Ticket] = []
    batches: list[list[int]] = []

    def appending(records: Sequence[Record]) -> None:
        batches.append([r.seq for r in records])
        for record in records:
            assert record.id not in answered, f"seq {record.seq} answered before its commit"
            assert node.head(record.ns) < record.seq, f"seq {record.seq} visible before it"
            mine = [t for t in tickets if t.event.id == record.id and not t.duplicate]
            assert not any(t.done.is_set() for t in mine), f"seq {record.seq} done early"

    config = RelayConfig(commit_batch=3)
    node = RelayNode(RELAY, WatchedStore(appending), config, wall_ms=virtual_wall())
    await nursery.start(node.run)
    signed = [event(n) for n in range(10)]
    for one in [signed[0], signed[0], *signed[1:]]:  # no checkpoint: one run of the loop
        tickets.append(await node.admit(one))

    records: list[Record | None] = [None] * len(tickets)

    async def answer(index: int) -> None:
        records[index] = answered[tickets[index].event.id] = await node.answer(tickets[index])

    with trio.fail_after(60):  # virtual time: a relay that never answers fails here
        async with trio.open_nursery() as waiting:
            for index in range(len(tickets)):
                waiting.start_soon(answer, index)
    assert [t.duplicate for t in tickets[:3]] == [False, True, False]
    assert records[1] == records[0]  # the original receipt (and seal)
    assert sorted(r.seq for r in answered.values()) == list(range(1, 11))
    assert len(batches) > 1 and sum(map(len, batches)) == 10


async def test_a_duplicate_is_answered_even_once_its_author_may_no_longer_write(
    node: RelayNode, autojump_clock: trio.testing.MockClock
) -> None:
    """The duplicate check comes before the write rules (protocol 6.1, steps 11 and
    11a): after the owner shuts a writer out, the writer re-publishing an event it
    wrote before gets its original receipt, while a new event is refused."""
    owner = identity(5)

    def by_owner(kind: str, body: object) -> SignedEvent:
        return sign_event(
            Event(ns="p@local", kind=kind, author=owner.public_key, body=body, ts=NOW), owner.sign
        )

    with trio.fail_after(60):
        await node.publish(by_owner("app.x", "created"))
        first = await node.publish(event(1, ns="p@local"))
        await node.publish(by_owner("ns.policy", {"mode": "listed"}))
        ticket = await node.admit(event(1, ns="p@local"))
        again = await node.answer(ticket)
        with pytest.raises(ProtocolError) as info:
            await node.publish(event(2, ns="p@local"))
    assert ticket.duplicate and again.receipt == first.receipt
    assert info.value.code is ErrorCode.FORBIDDEN


async def test_ids_the_cache_drops_while_the_store_is_asked_are_still_known(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The sequencer forgets the oldest committed ids past known_capacity, and the
    store answers for them: the sequencing loop asks it about every id the sequencer
    does not know. A commit that lands while the loop waits for that answer pushes
    more ids out: ids the loop did not ask about, as it knew them. An event
    depending on one must still follow it, and one published again must still be a
    duplicate (protocol 6.2), not be sequenced a second time.

    The node's locks pin the interleaving: the writer lock holds a commit back, the
    finder lock holds the sequencing loop between its question and its answer."""
    config = RelayConfig(sequencer=Limits(known_capacity=2, park_timeout_ms=5_000))
    node = RelayNode(RELAY, MemoryStore(), config, wall_ms=virtual_wall())
    await nursery.start(node.run)
    with trio.fail_after(60):  # virtual time
        cause = await node.publish(event(1))  # the oldest id the sequencer knows
        await node.publish(event(2))
        await node._write_lock.acquire()
        later = [await node.admit(event(n)) for n in (3, 4)]
        await trio.testing.wait_all_tasks_blocked()  # sequenced; their commit waits
        async with node._find_lock:
            again = await node.admit(event(1))
            effect = await node.admit(event(5, deps=(cause.id,)))
            new = await node.admit(event(6))  # one the loop must ask the store about
            await trio.testing.wait_all_tasks_blocked()  # the loop waits to ask
            assert node.sequencer.locate(cause.id) is not None
            node._write_lock.release()  # the commit of 3 and 4 pushes event 1 out
            await trio.testing.wait_all_tasks_blocked()
            assert node.sequencer.locate(cause.id) is None
        for ticket in later:
            await node.answer(ticket)
        duplicate = await node.answer(again)
        followed = await node.answer(effect)
        await node.answer(new)
    assert again.duplicate and duplicate.receipt == cause.receipt
    assert followed.seq > cause.seq and followed.hlc > cause.hlc
    assert [r.seq for r in node.store.scan("t@local")] == list(range(1, 7))  # 1 once
