"""A notice batch finds its room and its evictions through per-recipient indexes, not
by reading every item leaving and the recipient's whole box: they must decide what the
scans did.

``Inboxes._notices`` counted the notices leaving a recipient by reading the set of
every item being deleted now (all recipients'), and for each eviction walked the
recipient's box from its start, over its messages and the notices it had just evicted.
``ScanInboxes`` below is that code, kept as the reference: one set of (recipient, seq)
whose claims outlive their items until the claimant releases them, as they did. The
property drives sends, notices, takes, give-backs, acknowledgements, expiries and
failed writes through the public methods of both, and after every step compares the
answers, the rows written, and the boxes; and checks the indexes against the boxes.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_sdk.errors import ProtocolError
from relay.inbox import Arriving, Inboxes, Item, MemoryInboxStore, _Draft, _Job

AGENTS = [bytes([n]) * 32 for n in range(1, 4)]
STRANGER = b"\xee" * 32  # never connected: its notices are dropped
MAX_ITEMS = 3


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000

    def __call__(self) -> int:
        return self.ms


class Recording(MemoryInboxStore):
    """A store that keeps every write it is asked for, and fails one when told to."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[str, tuple[Item, ...], tuple[Item, ...]]] = []
        self.fail = False

    def apply(self, put: Sequence[Item], drop: Sequence[Item]) -> None:
        failing, self.fail = self.fail, False
        self.writes.append(("failed" if failing else "written", tuple(put), tuple(drop)))
        if failing:
            raise OSError("disk full")
        super().apply(put, drop)


class ScanInboxes(Inboxes):
    """The code before the indexes: every item leaving in one set, and a notice batch's
    room and evictions found by reading it and the recipient's box."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.leaving: set[tuple[bytes, int]] = set()
        super().__init__(*args, **kwargs)

    def _is_leaving(self, item: Item) -> bool:
        return (item.recipient, item.seq) in self.leaving

    def _claim(self, item: Item) -> None:
        self.leaving.add((item.recipient, item.seq))

    def _release(self, item: Item) -> None:
        self.leaving.discard((item.recipient, item.seq))

    def _unindex(self, item: Item) -> None:
        claimed = (item.recipient, item.seq) in self.leaving
        super()._unindex(item)
        if claimed:  # its claimant releases it, later
            self.leaving.add((item.recipient, item.seq))

    def _held(self, recipient: bytes, kind: str) -> int:
        notice = kind != "message"
        box = self.boxes.get(recipient, {})
        return sum(1 for item in box.values() if (item.kind != "message") == notice)

    def _notices(self, notices: Sequence[Arriving], kind: str) -> tuple[list[_Draft], list[Item]]:
        room = {
            recipient: self.max_items
            - self._held(recipient, kind)
            + self._notices_leaving(recipient)
            for recipient in {n.recipient for n in notices}
        }
        drafts: list[_Draft] = []
        evicted: list[Item] = []
        for n in notices:
            if n.recipient not in self.known:
                continue
            if room[n.recipient] <= 0:
                oldest = self._oldest_notice(n.recipient)
                if oldest is None:
                    continue
                self.leaving.add((oldest.recipient, oldest.seq))
                evicted.append(oldest)
            else:
                room[n.recipient] -= 1
            drafts.append(_Draft(n.recipient, kind, n.mid, n.sender, n.data))
        return drafts, evicted

    def _notices_leaving(self, recipient: bytes) -> int:
        box: Mapping[int, Item] = self.boxes.get(recipient, {})
        return sum(
            1
            for who, seq in self.leaving
            if who == recipient and seq in box and box[seq].kind != "message"
        )

    def _oldest_notice(self, recipient: bytes) -> Item | None:
        for item in self.boxes.get(recipient, {}).values():
            if item.kind != "message" and (recipient, item.seq) not in self.leaving:
                return item
        return None

    async def expire(self) -> list[Item]:
        now = self.wall_ms()
        gone = [
            item
            for box in self.boxes.values()
            for item in box.values()
            if item.expires_ms <= now and not self._is_leaving(item)
        ]
        if not gone:
            return []
        for item in gone:
            self._claim(item)
        told = [Arriving(i.sender, i.recipient, i.mid, i.mid) for i in gone if i.kind == "message"]
        drafts, evicted = self._notices(told, "expired")
        job = _Job(drafts, [*gone, *evicted])
        try:
            await self._write(job)
        finally:
            for item in [*gone, *evicted]:
                self._release(item)
        self.counts["expired"] += sum(1 for i in gone if i.kind == "message")
        return gone

    def after(self, recipient: bytes, seq: int, limit: int) -> list[Item]:
        items = []
        for item in self.boxes.get(recipient, {}).values():
            if item.seq > seq:
                items.append(item)
                if len(items) == limit:
                    break
        return items


WHO = st.integers(0, len(AGENTS) - 1)
STEPS = {
    "send": st.tuples(WHO, WHO, st.lists(st.integers(0, 5), min_size=1, max_size=3)),
    "notify": st.tuples(st.integers(0, len(AGENTS)), WHO, st.integers(1, 5)),
    "take": st.tuples(WHO, st.lists(st.integers(0, 8), min_size=1, max_size=4)),
    "untake": st.tuples(WHO, st.integers(1, 3)),
    "ack": st.tuples(WHO, st.integers(1, 3), st.booleans()),
    "wait": st.tuples(st.integers(0, 9_000)),  # (items live 10,000 ms)
    "expire": st.tuples(st.booleans()),  # (its write, if any, fails)
    "fail": st.tuples(),  # the next write
    "restart": st.tuples(),  # from the store (what the test took is given up)
    # From the nth item held (past them, from seq n), moved by -1, 0 or 1.
    "read": st.tuples(WHO, st.integers(0, 8), st.integers(-1, 1), st.integers(1, 4)),
}
# Mostly what fills boxes and claims their notices; a failed write now and then.
WEIGHTS = {"send": 3, "notify": 4, "take": 4, "untake": 2, "ack": 2, "wait": 3, "expire": 3,
           "fail": 1, "restart": 1, "read": 3}  # fmt: skip
step = st.sampled_from([op for op, n in WEIGHTS.items() for _ in range(n)]).flatmap(
    lambda op: STEPS[op].map(lambda args: (op, *args))
)


class Run:
    """One relay's inboxes and what the test holds taken from them."""

    def __init__(self, kind: type[Inboxes], clock: Clock) -> None:
        self.kind, self.clock = kind, clock
        self.store = Recording()
        self.restart()
        self.notes = 0

    def restart(self) -> None:
        """The relay starts (again) from its store."""
        self.inboxes = self.kind(self.store, max_items=MAX_ITEMS, ttl_ms=10_000, wall_ms=self.clock)
        self.taken: dict[bytes, list[Item]] = {agent: [] for agent in AGENTS}

    async def step(self, op: str, *args: Any) -> object:
        """Apply one step; what it answered (refusals as their codes)."""
        inboxes = self.inboxes
        try:
            match op, args:
                case "send", (to, sender, mids):
                    batch = [Arriving(AGENTS[to], AGENTS[sender], bytes([m]) * 16, b"sealed")
                             for m in mids]  # fmt: skip
                    answers = await inboxes.put_messages(batch)
                    return [a.code if isinstance(a, ProtocolError) else a for a in answers]
                case "notify", (to, sender, count):
                    mids = [(self.notes + n).to_bytes(16, "big") for n in range(1, count + 1)]
                    self.notes += count
                    recipient = (*AGENTS, STRANGER)[to]
                    await inboxes.put_receipts(
                        [Arriving(recipient, AGENTS[sender], mid, b"receipt") for mid in mids]
                    )
                    return None
                case "take", (who, picks):  # the nth item held, or (past them) one not there
                    held = list(inboxes.boxes.get(AGENTS[who], {}))
                    seqs = [held[n] if n < len(held) else 1_000 + n for n in picks]
                    got = inboxes.take(AGENTS[who], seqs)
                    self.taken[AGENTS[who]].extend(item for item in got if item is not None)
                    return [None if item is None else item.seq for item in got]
                case "untake", (who, count):
                    back = self._give_up(AGENTS[who], count)
                    inboxes.untake(back)
                    return [item.seq for item in back]
                case "ack", (who, count, with_receipts):
                    items = self._give_up(AGENTS[who], count)
                    receipts = [Arriving(i.sender, AGENTS[who], i.mid, b"r") for i in items]
                    await inboxes.acknowledge(items, receipts if with_receipts else [])
                    return [item.seq for item in items]
                case "expire", (failing,):
                    self.store.fail |= failing
                    return [(i.recipient, i.seq, i.kind) for i in await inboxes.expire()]
                case "fail", ():
                    self.store.fail = True
                    return None
                case "restart", ():
                    self.restart()
                    return None
                case "read", (who, n, step, limit):
                    held = list(inboxes.boxes.get(AGENTS[who], {}))
                    cursor = (held[n] if n < len(held) else n) + step
                    return inboxes.after(AGENTS[who], cursor, limit)
        except ProtocolError as refused:  # a failed write
            return refused.code
        raise AssertionError(f"no step {op} {args}")

    def _give_up(self, who: bytes, count: int) -> list[Item]:
        """The first ``count`` items the test holds taken of ``who``'s, no longer held."""
        items, self.taken[who] = self.taken[who][:count], self.taken[who][count:]
        return items


def check_indexes(run: Run) -> None:
    """The indexes say what the boxes and the test's takes say."""
    inboxes = run.inboxes
    for recipient, box in inboxes.boxes.items():
        notices = [(seq, item) for seq, item in box.items() if item.kind != "message"]
        assert list(inboxes._notice_boxes.get(recipient, {}).items()) == notices
    assert inboxes._notice_boxes.keys() <= inboxes.boxes.keys()
    taken = {who: {item.seq for item in items} for who, items in run.taken.items() if items}
    assert inboxes._leaving == taken
    leaving_notices = Counter(i.recipient for items in run.taken.values() for i in items
                              if i.kind != "message")  # fmt: skip
    assert inboxes._leaving_notices == leaving_notices
    assert all(inboxes._leaving_notices.values())  # no zeros kept
    # The running total is what adding up the boxes said (GET /metrics, status).
    assert inboxes.waiting == sum(len(box) for box in inboxes.boxes.values())
    check_seqs(inboxes)
    # Every held item has its entry in the expiry heap; the boxes are in their opening order.
    entries = {(recipient, seq): expires for expires, recipient, seq in inboxes._expiring}
    for recipient, box in inboxes.boxes.items():
        assert all(entries.get((recipient, seq)) == item.expires_ms for seq, item in box.items())
    assert sorted(inboxes.boxes, key=inboxes._opened.__getitem__) == list(inboxes.boxes)
    assert inboxes._opened.keys() == inboxes.boxes.keys()


def check_seqs(inboxes: Inboxes) -> None:
    """Each box's seqs: in order, every held one among them, deleted ones at most as many."""
    assert inboxes._seqs.keys() == inboxes.boxes.keys()
    for recipient, seqs in inboxes._seqs.items():
        box = inboxes.boxes[recipient]
        assert seqs == sorted(set(seqs)) and set(box) <= set(seqs) and len(seqs) <= 2 * len(box)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(step, min_size=20, max_size=80))
def test_notices_evict_what_the_scan_evicted(steps: list[tuple]) -> None:  # type: ignore[type-arg]
    async def main() -> None:
        clock = Clock()
        indexed, scan = Run(Inboxes, clock), Run(ScanInboxes, clock)
        for run in (indexed, scan):
            for agent in AGENTS:
                await run.inboxes.remember(agent)
        for op, *args in steps:
            if op == "wait":
                clock.ms += args[0]
                continue
            got = [await run.step(op, *args) for run in (indexed, scan)]
            assert got[0] == got[1]
            assert indexed.store.writes == scan.store.writes
            assert indexed.inboxes.boxes == scan.inboxes.boxes
            assert indexed.inboxes.counts == scan.inboxes.counts
            assert scan.inboxes.leaving == {
                (who, item.seq) for who, items in scan.taken.items() for item in items
            }
            check_indexes(indexed)

    trio.run(main)


async def test_reads_answer_what_the_walk_of_the_box_answered() -> None:
    """Reads from random cursors between random sends, acknowledgements and expiries, in
    a box of up to 40 items (seeded): each answers what the walk over the box did, on
    the same inboxes, and some pass deleted seqs and sweep them."""
    rng = random.Random(20_000)
    clock = Clock()
    inboxes = Inboxes(MemoryInboxStore(), max_items=40, ttl_ms=10_000, wall_ms=clock)
    alice, bob = AGENTS[:2]
    for agent in (alice, bob):
        await inboxes.remember(agent)
    sent = swept = 0
    for _ in range(3_000):
        held = list(inboxes.boxes.get(alice, {}))
        op = rng.random()
        if op < 0.3:
            mids = [(sent + k).to_bytes(16, "big") for k in range(rng.randint(1, 5))]
            sent += len(mids)
            await inboxes.put_messages([Arriving(alice, bob, mid, b"m") for mid in mids])
        elif op < 0.55 and held:
            taken = inboxes.take(alice, rng.sample(held, rng.randint(1, min(5, len(held)))))
            await inboxes.acknowledge([item for item in taken if item is not None], [])
        elif op < 0.6:
            clock.ms += rng.randint(0, 3_000)
            await inboxes.expire()
        else:
            cursor, limit = rng.randint(0, (held[-1] if held else 0) + 1), rng.randint(1, 8)
            before = len(inboxes._seqs.get(alice, ()))
            got = inboxes.after(alice, cursor, limit)
            assert got == ScanInboxes.after(inboxes, alice, cursor, limit)
            swept += len(inboxes._seqs.get(alice, ())) < before
        check_seqs(inboxes)
    assert swept > 50


class Gated(Recording):
    """A store whose writes, once gated, each wait for the test."""

    blocking = True

    def __init__(self) -> None:
        super().__init__()
        self.gated = False
        self.entered = threading.Semaphore(0)
        self.go = threading.Semaphore(0)

    def apply(self, put: Sequence[Item], drop: Sequence[Item]) -> None:
        if self.gated:
            self.entered.release()
            assert self.go.acquire(timeout=10)
        super().apply(put, drop)

    async def entering(self) -> None:
        """Wait for the next write to reach the store."""
        assert await trio.to_thread.run_sync(self.entered.acquire, True, 10)


async def notices_after_a_delete_before_its_release(kind: type[Inboxes]) -> Gated:
    """Alice acknowledges her two receipts (the bound). The writer writes their delete,
    then, before Alice's task runs again, a message for Bob; meanwhile three notices for
    Alice arrive."""
    store = Gated()
    inboxes = kind(store, max_items=2, ttl_ms=10_000, wall_ms=Clock())
    alice, bob = AGENTS[:2]
    for agent in (alice, bob):
        await inboxes.remember(agent)
    await inboxes.put_receipts([Arriving(alice, bob, bytes([n]) * 16, b"r") for n in (1, 2)])
    taken = [item for item in inboxes.take(alice, [1, 2]) if item is not None]
    store.gated = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(inboxes.acknowledge, taken, [])
        await store.entering()  # her delete, on its way
        nursery.start_soon(inboxes.put_messages, [Arriving(bob, alice, b"m" * 16, b"x")])
        await trio.testing.wait_all_tasks_blocked()  # queued behind it
        store.go.release()
        await store.entering()  # Bob's message: her delete is written
        assert inboxes.size(alice) == 0 and taken
        notices = [Arriving(alice, bob, bytes([n]) * 16, b"r") for n in (3, 4, 5)]
        nursery.start_soon(inboxes.put_receipts, notices)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(2):  # Bob's message, and the notices
            store.go.release()
    # Deleted, her receipts made no room beyond the bound: the third notice finds none
    # to evict (the first two are being written with it) and is dropped.
    assert [item.mid[0] for item in inboxes.after(alice, 0, 10)] == [3, 4]
    return store


async def test_items_already_deleted_make_no_room_for_notices() -> None:
    """A deleted item's claim ends with it, before its claimant runs again: the scan
    counted only items still held."""
    indexed = await notices_after_a_delete_before_its_release(Inboxes)
    scan = await notices_after_a_delete_before_its_release(ScanInboxes)
    assert indexed.writes == scan.writes


async def an_expiry_fails_while_the_heap_is_rebuilt(
    kind: type[Inboxes],
) -> tuple[Gated, list[Item]]:
    """Bob's message is due; its expiry's write fails, and the acknowledgement queued
    behind it (written next, by the same writer) deletes Alice's receipt, leaving more
    entries in the heap than twice the items held: it is rebuilt, with the message
    being expired in it, and the failed expiry puts the message back too. What the next
    expiry does."""
    store, clock = Gated(), Clock()
    inboxes = kind(store, max_items=5, ttl_ms=10_000, wall_ms=clock)
    alice, bob, carol = AGENTS
    for agent in AGENTS:
        await inboxes.remember(agent)
    await inboxes.put_messages([Arriving(bob, alice, b"m" * 16, b"x")])
    clock.ms += 5_000
    await inboxes.put_receipts([Arriving(who, bob, bytes([n]) * 16, b"r")
                                for n, who in enumerate((alice, carol, carol))])  # fmt: skip
    for seq in (1, 2):  # Carol's: two entries of deleted items, not due
        await inboxes.acknowledge([item for item in inboxes.take(carol, [seq]) if item], [])
    clock.ms += 5_000
    store.gated = store.fail = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(inboxes.expire)
        await store.entering()
        taken = [item for item in inboxes.take(alice, [1]) if item]
        nursery.start_soon(inboxes.acknowledge, taken, [])
        await trio.testing.wait_all_tasks_blocked()
        store.go.release()  # the expiry's write: it fails
        await store.entering()  # the acknowledgement's
        store.go.release()
    store.gated = False
    return store, await inboxes.expire()


async def test_an_item_put_back_into_a_rebuilt_heap_expires_once() -> None:
    """The heap holds the message twice; the expiry takes it once, as the scan did."""
    indexed, gone = await an_expiry_fails_while_the_heap_is_rebuilt(Inboxes)
    scan, scan_gone = await an_expiry_fails_while_the_heap_is_rebuilt(ScanInboxes)
    assert [write[0] for write in indexed.writes].count("failed") == 1
    assert gone == scan_gone and len(gone) == 1 and indexed.writes == scan.writes


class Counted(Item):
    """An item that counts the reads of its fields."""

    __slots__ = ()
    reads: Counter[str] = Counter()

    def __getattribute__(self, attr: str) -> object:
        Counted.reads[attr] += 1
        return object.__getattribute__(self, attr)


async def test_a_notice_evicts_without_reading_the_messages_before_it() -> None:
    """A box of 10,000 messages, then its 10,000 notices (the bound): a batch of 100
    notices evicts the 100 oldest, reading a few items each (the scan read every
    message for each, and each notice the batch had evicted before it)."""
    alice, bob = AGENTS[:2]
    store = MemoryInboxStore()
    n = 10_000
    for seq in range(1, 2 * n + 1):
        kind = "message" if seq <= n else "receipt"
        store.items[(alice, seq)] = Counted(alice, seq, kind, seq.to_bytes(16, "big"), bob,
                                            b"x", 10**12)  # fmt: skip
    store.agents.update((alice, bob))
    inboxes = Inboxes(store, max_items=n, ttl_ms=10_000, wall_ms=Clock())
    Counted.reads.clear()
    await inboxes.put_receipts([Arriving(alice, bob, bytes([k]) * 16, b"r") for k in range(100)])
    assert Counted.reads["kind"] < 1_000
    held = inboxes.after(alice, 0, 2 * n)
    assert [i.seq for i in held[n - 1 : n + 1]] == [n, n + 101]  # the 100 oldest notices left
    assert len(held) == 2 * n and inboxes._held(alice, "receipt") == n


async def test_a_read_starts_at_its_cursor_and_passes_deleted_items_once() -> None:
    """A box of 20,000 messages, the first 10,000 sent and not acknowledged: a read from
    there reads its batch, not the items before it (the walk read each of them). Then
    the next 5,000 are acknowledged: the next read passes their seqs, and the one after
    it does not meet them again."""
    alice, bob = AGENTS[:2]
    store = MemoryInboxStore()
    n = 20_000
    for seq in range(1, n + 1):
        store.items[(alice, seq)] = Counted(alice, seq, "message", seq.to_bytes(16, "big"), bob,
                                            b"x", 10**12)  # fmt: skip
    store.agents.update((alice, bob))
    inboxes = Inboxes(store, max_items=n, ttl_ms=10_000, wall_ms=Clock())
    Counted.reads.clear()
    assert [item.seq for item in inboxes.after(alice, 10_000, 100)] == [*range(10_001, 10_101)]
    assert Counted.reads["seq"] < 1_000
    taken = inboxes.take(alice, range(10_001, 15_001))
    await inboxes.acknowledge([item for item in taken if item is not None], [])
    assert [item.seq for item in inboxes.after(alice, 10_000, 2)] == [15_001, 15_002]
    assert len(inboxes._seqs[alice]) == 15_000  # those passed are gone from the seqs
