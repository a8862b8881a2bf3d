"""Inboxes on their own: bounds, resends, deliveries, expiry, and a restart from disk."""

from __future__ import annotations

from pathlib import Path

from agent_sdk.errors import ErrorCode, ProtocolError
from relay.inbox import Arriving, Inboxes, InboxStore, MemoryInboxStore, SQLiteInboxStore

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
    taken = await boxes.acknowledge(BOB, [1, 1, 9])
    assert taken[0] is not None and taken[1] is None and taken[2] is None  # twice, never
    assert await boxes.put_messages([message(b"1")]) == ["delivered"]  # a late resend
    assert boxes.counts["delivered"] == 1 and boxes.size(BOB) == 1


async def test_receipts_are_bounded_apart_from_messages() -> None:
    boxes = inboxes()
    for agent in (ALICE, BOB):
        await boxes.remember(agent)
    receipts = [Arriving(ALICE, BOB, bytes([n]) * 16, b"receipt") for n in range(5)]
    await boxes.put_receipts(receipts)
    assert [i.kind for i in boxes.after(ALICE, 0, 10)] == ["receipt", "receipt"]  # bounded
    answers = await boxes.put_messages([message(b"1", to=ALICE, sender=BOB)])
    assert answers == ["stored"]  # receipts piling up do not close Alice to messages


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
    await boxes.acknowledge(BOB, [1])
    store.close()
    again = inboxes(SQLiteInboxStore(path))
    assert again.known == {ALICE, BOB}
    assert [(i.seq, i.data) for i in again.after(BOB, 0, 10)] == [(2, b"sealed 2")]
    assert await again.put_messages([message(b"2")]) == ["stored"]  # still known as stored
    assert await again.put_messages([message(b"3")]) == ["stored"]
    assert again.after(BOB, 2, 10)[0].seq == 3  # numbering goes on where it was
