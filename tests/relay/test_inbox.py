"""Inboxes on their own: bounds, resends, deliveries, expiry, and a restart from disk."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from agent_sdk.errors import ErrorCode, ProtocolError
from relay.inbox import (
    Arriving,
    Inboxes,
    InboxStore,
    Item,
    MemoryInboxStore,
    SQLiteInboxStore,
)

BOB, ALICE, CAROL = b"b" * 32, b"a" * 32, b"c" * 32


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000

    def __call__(self) -> int:
        return self.ms


def inboxes(store: InboxStore | None = None, clock: Clock | None = None) -> Inboxes:
    return Inboxes(
        store or MemoryInboxStore(), max_items=2, ttl_ms=10_000, wall_ms=clock or Clock()
    )


def message(mid: bytes, to: bytes = BOB, sender: bytes = ALICE) -> Arriving:
    return Arriving(to, sender, mid * 16, b"sealed " + mid)


async def test_messages_are_bounded_and_resends_are_not_stored_twice() -> None:
    boxes = inboxes()
    for agent in (ALICE, BOB):
        await boxes.remember(agent)
    answers = await boxes.put_messages([message(b"1"), message(b"1"), message(b"2")])
    assert answers == ["stored", "stored", "stored"]  # the second is the first, again
    assert boxes.size(BOB) == 2
    [full] = await boxes.put_messages([message(b"3")])
    assert isinstance(full, ProtocolError) and full.code is ErrorCode.INBOX_FULL
    [unknown] = await boxes.put_messages([message(b"4", to=CAROL)])
    assert isinstance(unknown, ProtocolError) and unknown.code is ErrorCode.UNKNOWN_RECIPIENT
    items = boxes.after(BOB, 0, 10)
    assert [i.data for i in items] == [b"sealed 1", b"sealed 2"] and items[0].seq == 1
    taken = boxes.take(BOB, [1, 1, 9])
    assert taken[0] is not None and taken[1] is None and taken[2] is None  # twice, never
    await boxes.acknowledge([taken[0]], [])
    assert await boxes.put_messages([message(b"1")]) == ["delivered"]  # a late resend
    assert boxes.counts["delivered"] == 1 and boxes.size(BOB) == 1


async def test_receipts_are_bounded_apart_from_messages() -> None:
    boxes = inboxes()
    for agent in (ALICE, BOB):
        await boxes.remember(agent)
    receipts = [Arriving(ALICE, BOB, bytes([n]) * 16, b"receipt") for n in range(5)]
    await boxes.put_receipts(receipts[:3])
    await boxes.put_receipts(receipts[3:])
    held = boxes.after(ALICE, 0, 10)
    assert [i.kind for i in held] == ["receipt", "receipt"]  # bounded...
    # ...by the newest: old ones nobody read must not keep Alice from her next one.
    assert [i.mid for i in held] == [r.mid for r in receipts[3:]]
    answers = await boxes.put_messages([message(b"1", to=ALICE, sender=BOB)])
    assert answers == ["stored"]  # receipts piling up do not close Alice to messages


async def test_notices_expiring_with_a_message_make_room_for_its_notice() -> None:
    """The notices deleted in the same write free their places: a newer one, which a
    sender may still wait for, is not evicted for the expiry notice."""
    clock = Clock()
    boxes = inboxes(clock=clock)
    for agent in (ALICE, BOB):
        await boxes.remember(agent)
    await boxes.put_receipts([Arriving(ALICE, BOB, b"r" * 16, b"receipt")])  # expires first
    await boxes.put_messages([message(b"1")])
    clock.ms += 5_000
    await boxes.put_receipts([Arriving(ALICE, BOB, b"s" * 16, b"receipt")])  # newer
    clock.ms += 5_000  # the first receipt and the message expire; the newer one not
    await boxes.expire()
    held = boxes.after(ALICE, 0, 10)
    assert [(i.kind, i.mid) for i in held] == [("receipt", b"s" * 16), ("expired", b"1" * 16)]


async def test_an_expired_message_becomes_a_notice_for_its_sender() -> None:
    clock = Clock()
    boxes = inboxes(clock=clock)
    for agent in (ALICE, BOB):
        await boxes.remember(agent)
    await boxes.put_messages([message(b"1")])
    assert await boxes.expire() == []
    clock.ms += 10_000
    [gone] = await boxes.expire()
    assert gone.kind == "message" and boxes.size(BOB) == 0
    [notice] = boxes.after(ALICE, 0, 10)
    assert notice.kind == "expired" and notice.data == b"1" * 16 and boxes.counts["expired"] == 1


async def test_a_restart_finds_every_item_and_agent_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "inbox.sqlite3"
    store = SQLiteInboxStore(path)
    boxes = inboxes(store)
    for agent in (ALICE, BOB):
        await boxes.remember(agent)
    await boxes.put_messages([message(b"1"), message(b"2")])
    [first, _] = boxes.take(BOB, [1, 2])
    assert first is not None
    await boxes.acknowledge([first], [Arriving(ALICE, BOB, first.mid, b"receipt")])
    store.close()
    again = inboxes(SQLiteInboxStore(path))
    assert again.known == {ALICE, BOB}
    assert [(i.seq, i.data) for i in again.after(BOB, 0, 10)] == [(2, b"sealed 2")]
    assert [i.kind for i in again.after(ALICE, 0, 10)] == ["receipt"]  # one transaction
    assert await again.put_messages([message(b"2")]) == ["stored"]  # still known as stored
    assert await again.put_messages([message(b"3")]) == ["stored"]
    assert again.after(BOB, 2, 10)[0].seq == 3  # numbering goes on where it was


async def test_concurrent_writers_show_items_in_seq_order_and_a_reader_misses_none(
    tmp_path: Path,
) -> None:
    store = SQLiteInboxStore(tmp_path / "inbox.sqlite3")
    boxes = Inboxes(store, max_items=1000, ttl_ms=10_000, wall_ms=Clock())
    senders = [bytes([n]) * 32 for n in range(1, 11)]
    for agent in (BOB, *senders):
        await boxes.remember(agent)
    seen: list[int] = []

    async def reader() -> None:  # as a stream does: a cursor, then what comes after it
        cursor = 0
        while len(seen) < 100:
            items = boxes.after(BOB, cursor, 256)
            if not items:
                await boxes.wait_after(BOB, cursor)
                continue
            seen.extend(item.seq for item in items)
            cursor = items[-1].seq

    async def sender(who: bytes) -> None:  # one write at a time, as a connection's
        for n in range(10):
            mid = who[:8] + n.to_bytes(8, "big")
            assert await boxes.put_messages([Arriving(BOB, who, mid, b"x")]) == ["stored"]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        for who in senders:
            nursery.start_soon(sender, who)
    assert seen == list(range(1, 101))  # every item, each once, in seq order
    assert list(boxes.boxes[BOB]) == seen
    store.close()


class Gated(MemoryInboxStore):
    """A store whose writes wait for the test."""

    blocking = True

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.go = threading.Event()

    def apply(self, put: Sequence[Item], drop: Sequence[Item]) -> None:
        self.entered.set()
        self.go.wait(10)
        super().apply(put, drop)


class Stalling(Gated):
    """A store whose next write waits for the test, then fails."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    def apply(self, put: Sequence[Item], drop: Sequence[Item]) -> None:
        if not self.fail:
            return super(Gated, self).apply(put, drop)  # (writes after it: no waiting)
        self.fail = False
        self.entered.set()
        self.go.wait(10)
        raise OSError("disk full")


async def test_a_resend_during_a_write_waits_for_it_and_a_failed_write_is_no_promise() -> None:
    store = Stalling()
    boxes = inboxes(store)
    for agent in (ALICE, BOB):
        await boxes.remember(agent)
    answers: dict[str, list[object]] = {}

    async def put(name: str) -> None:
        answers[name] = list(await boxes.put_messages([message(b"1")]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(put, "first")
        await trio.to_thread.run_sync(store.entered.wait)  # the first write is on disk's way
        nursery.start_soon(put, "resend")
        await trio.testing.wait_all_tasks_blocked()
        assert "resend" not in answers  # not "stored" before the first write is
        store.go.set()
    for name in ("first", "resend"):
        [answer] = answers[name]
        assert isinstance(answer, ProtocolError) and answer.code is ErrorCode.INTERNAL, name
    assert boxes.size(BOB) == 0
    assert await boxes.put_messages([message(b"1")]) == ["stored"]  # sending again works


async def test_one_sender_cannot_fill_an_inbox_for_everyone() -> None:
    boxes = Inboxes(MemoryInboxStore(), max_items=10, ttl_ms=10_000, wall_ms=Clock(), per_sender=2)
    for agent in (ALICE, BOB, CAROL):
        await boxes.remember(agent)
    answers = await boxes.put_messages([message(bytes([48 + n])) for n in range(3)])
    assert answers[:2] == ["stored", "stored"]
    refused = answers[2]
    assert isinstance(refused, ProtocolError) and refused.code is ErrorCode.INBOX_FULL
    assert "you have 2 messages waiting" in refused.reason
    assert await boxes.put_messages([message(b"z", sender=CAROL)]) == ["stored"]  # others can


async def test_a_senders_limit_counts_what_its_other_connections_are_writing() -> None:
    """Two connections of one sender: the messages one is still writing count against
    the limit of the other's batch."""
    store = Gated()
    boxes = Inboxes(store, max_items=10, ttl_ms=10_000, wall_ms=Clock(), per_sender=2)
    for agent in (ALICE, BOB):
        await boxes.remember(agent)
    answers: dict[str, list[object]] = {}

    async def put(name: str, *mids: bytes) -> None:
        answers[name] = list(await boxes.put_messages([message(mid) for mid in mids]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(put, "one", b"1", b"2")
        await trio.to_thread.run_sync(store.entered.wait)  # on disk's way, not held yet
        await put("other", b"3")
        store.go.set()
    assert answers["one"] == ["stored", "stored"]
    [refused] = answers["other"]
    assert isinstance(refused, ProtocolError) and refused.code is ErrorCode.INBOX_FULL
    assert boxes.size(BOB) == 2


async def test_acks_of_a_connection_cancelled_while_answering_are_still_applied() -> None:
    """A connection can end while its acks are being answered (its writer is stuck, it
    is closed as slow): the items it acknowledged are deleted all the same, and none
    stays taken, which would refuse a later ack of it and hide it from expiry."""
    from types import SimpleNamespace
    from typing import cast

    from agent_sdk import frames as f
    from relay.messaging import Messaging
    from relay.node import RelayNode
    from relay.session import AckItem

    boxes = inboxes()
    for agent in (ALICE, BOB):
        await boxes.remember(agent)
    assert await boxes.put_messages([message(b"1"), message(b"2")]) == ["stored", "stored"]
    node = cast(RelayNode, SimpleNamespace(inboxes=boxes, federation=None))
    sent: list[f.RelayFrame] = []
    first_out, second_out = trio.Event(), trio.Event()
    release = trio.Event()

    async def stuck_writer(frame: f.RelayFrame) -> None:
        sent.append(frame)
        if len(sent) == 1:
            first_out.set()
            await release.wait()  # holds the ack loop while more acks queue up
        else:
            second_out.set()
            await trio.sleep_forever()  # the peer stopped reading

    async with trio.open_nursery() as nursery:
        messaging = Messaging(node, BOB, stuck_writer, nursery, None)
        messaging.sub = 7
        await messaging.acknowledge(AckItem(sub=7, seq=9, receipt=None))  # not there
        await first_out.wait()
        # One batch: an item to delete, then another that is not there (an error).
        await messaging.acknowledge(AckItem(sub=7, seq=1, receipt=None))
        await messaging.acknowledge(AckItem(sub=7, seq=8, receipt=None))
        release.set()
        await second_out.wait()
        nursery.cancel_scope.cancel()  # the connection ends mid-answer
    assert [item.seq for item in boxes.after(BOB, 0, 10)] == [2]  # 1 was deleted
    assert all(isinstance(frame, f.Error) for frame in sent) and len(sent) == 2
    [again] = boxes.take(BOB, [2])
    assert again is not None  # the other item is still there to be acknowledged


async def test_a_confirm_is_answered_once_the_acks_before_it_are_written() -> None:
    """``msg.confirm`` promises every ack sent before it is applied: a client closing
    after its answer may start another reader, which must not be sent them again.
    Here the ack and the confirm come in one batch, whose delete waits on the disk."""
    from types import SimpleNamespace
    from typing import cast

    from agent_sdk import frames as f
    from relay.messaging import Messaging
    from relay.node import RelayNode
    from relay.session import AckItem, Confirm

    store = Gated()
    store.go.set()  # the set-up writes at once
    boxes = inboxes(store)
    for agent in (ALICE, BOB):
        await boxes.remember(agent)
    assert await boxes.put_messages([message(b"1")]) == ["stored"]
    node = cast(RelayNode, SimpleNamespace(inboxes=boxes, federation=None))
    sent: list[f.RelayFrame] = []
    release, confirmed = trio.Event(), trio.Event()

    async def writer(frame: f.RelayFrame) -> None:
        sent.append(frame)
        if isinstance(frame, f.Result):
            confirmed.set()
        elif len(sent) == 1:
            await release.wait()  # holds the ack loop while the next batch queues up

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            messaging = Messaging(node, BOB, writer, nursery, None)
            messaging.sub = 7
            await messaging.acknowledge(AckItem(sub=7, seq=9, receipt=None))  # not there
            while not sent:
                await trio.testing.wait_all_tasks_blocked()
            store.go.clear()
            store.entered.clear()
            await messaging.acknowledge(AckItem(sub=7, seq=1, receipt=None))
            await messaging.acknowledge(Confirm(rid=5))
            release.set()
            await trio.to_thread.run_sync(store.entered.wait)  # the delete is on its way
            await trio.testing.wait_all_tasks_blocked()
            assert not confirmed.is_set() and boxes.size(BOB) == 1
            store.go.set()
            await confirmed.wait()
            assert boxes.size(BOB) == 0  # written before the answer
            nursery.cancel_scope.cancel()
    assert sent[1:] == [f.Result(rid=5, body={})]


@pytest.mark.parametrize("cancel", [False, True])
async def test_notice_batches_queued_for_one_write_keep_the_bound(cancel: bool) -> None:
    """Two notice batches queued behind another task's write: the second counts the
    first's notices as held (it found room beside them, and the box ended over its
    bound), and the one it evicts is not the first's. With the first's caller cancelled
    meanwhile (a peer relay's connection closing while its receipt is stored), what
    the first evicts stays claimed until its write lands (released at the cancel, the
    second batch evicted it again)."""
    store = Gated()
    store.go.set()  # the set-up writes at once
    boxes = inboxes(store)
    for agent in (ALICE, BOB):
        await boxes.remember(agent)
    await boxes.put_receipts([receipt(b"1"), receipt(b"2")])  # Alice's bound: 2
    store.go.clear()
    store.entered.clear()
    cancelled = trio.CancelScope()

    async def queued_then_cancelled() -> None:
        with cancelled:
            await boxes.put_receipts([receipt(b"3")])  # evicts 1, waits for the writer

    async with trio.open_nursery() as nursery:
        nursery.start_soon(boxes.put_receipts, [receipt(b"w", to=BOB)])  # the writer
        await trio.to_thread.run_sync(store.entered.wait)
        nursery.start_soon(queued_then_cancelled)
        await trio.testing.wait_all_tasks_blocked()
        if cancel:
            cancelled.cancel()
            await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(boxes.put_receipts, [receipt(b"4")])  # must evict 2, not 1 again
        await trio.testing.wait_all_tasks_blocked()
        store.go.set()
    held = [item.mid for item in boxes.after(ALICE, 0, 10)]
    assert held == [b"3" * 16, b"4" * 16]


def receipt(mid: bytes, to: bytes = ALICE) -> Arriving:
    """A receipt for ``to`` (the sender of message ``mid``), from Bob or Alice."""
    return Arriving(to, BOB if to == ALICE else ALICE, mid * 16, b"receipt " + mid)


class FailingKnow(Gated):
    """A store whose first write of agents waits for the test, then fails."""

    def know(self, agents: Sequence[bytes]) -> None:
        if not self.entered.is_set():
            self.entered.set()
            self.go.wait(10)
            raise OSError("disk full")
        super().know(agents)


async def test_agents_whose_write_failed_are_not_known_and_those_after_them_are_written() -> None:
    """The first agent's write fails (a full disk) while a second waits for the next
    batch: the first is told so and is not taken for known (its next authentication
    writes it), and the second's batch is still written, not left waiting for a third
    agent to come."""
    store = FailingKnow()
    boxes = inboxes(store)
    outcomes: dict[bytes, object] = {}

    async def remember(agent: bytes) -> None:
        try:
            await boxes.remember(agent)
            outcomes[agent] = "known"
        except ProtocolError as exc:
            outcomes[agent] = exc.code

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(remember, ALICE)
            await trio.to_thread.run_sync(store.entered.wait)  # Alice's write has begun
            nursery.start_soon(remember, BOB)
            await trio.testing.wait_all_tasks_blocked()
            store.go.set()
    assert outcomes == {ALICE: ErrorCode.INTERNAL, BOB: "known"}
    assert ALICE not in boxes.known and store.agents == {BOB}
    await boxes.remember(ALICE)  # authenticating again writes it
    assert store.agents == {ALICE, BOB}


async def test_all_inboxes_together_are_bounded_in_bytes() -> None:
    """``max_bytes`` bounds what every inbox holds together, the message being stored
    and those of the same batch included (each fits alone, not with the others)."""
    boxes = Inboxes(MemoryInboxStore(), max_items=10, ttl_ms=10_000, wall_ms=Clock(), max_bytes=20)
    for agent in (ALICE, BOB, CAROL):
        await boxes.remember(agent)
    # 8 bytes each ("sealed N"): two fit in 20, a third in the same batch does not.
    answers = await boxes.put_messages([message(b"1"), message(b"2"), message(b"3", to=CAROL)])
    assert answers[:2] == ["stored", "stored"]
    refused = answers[2]
    assert isinstance(refused, ProtocolError) and refused.code is ErrorCode.INBOX_FULL
    assert "20 bytes" in refused.reason  # another recipient: the bound is the relay's
    [alone] = await boxes.put_messages([message(b"4", to=CAROL)])  # 16 held + 8 > 20
    assert isinstance(alone, ProtocolError) and alone.code is ErrorCode.INBOX_FULL
    [taken, _] = boxes.take(BOB, [1, 2])
    assert taken is not None
    await boxes.acknowledge([taken], [])  # a delivery frees its bytes
    assert await boxes.put_messages([message(b"4", to=CAROL)]) == ["stored"]
    assert boxes.bytes == 16


async def test_a_resend_is_answered_delivered_for_the_latest_deliveries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The relay remembers its last deliveries (a bounded memory): the oldest is
    forgotten first, and the latest ones are still answered ``delivered``."""
    import relay.inbox

    monkeypatch.setattr(relay.inbox, "REMEMBERED_DELIVERIES", 2)
    boxes = Inboxes(MemoryInboxStore(), max_items=10, ttl_ms=10_000, wall_ms=Clock())
    for agent in (ALICE, BOB):
        await boxes.remember(agent)
    for n, mid in enumerate((b"1", b"2", b"3"), start=1):
        assert await boxes.put_messages([message(mid)]) == ["stored"]
        [item] = boxes.take(BOB, [n])
        assert item is not None
        await boxes.acknowledge([item], [])
    assert await boxes.put_messages([message(b"3"), message(b"2")]) == ["delivered"] * 2
    # The oldest delivery is forgotten: a copy of it is a new message (15.4).
    assert await boxes.put_messages([message(b"1")]) == ["stored"]
