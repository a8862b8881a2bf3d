"""The outbox keeps every promise: "not now" answers are retried, and entries nothing
will answer leave no row behind.

* a home in its clean-stop window answers 5002 ``shutting_down``: that is not the
  home's answer to the write, so the entry is stored, ``queued`` is told, and it is
  delivered once the home admits again;
* an entry restored at start-up is ``queued`` for whoever publishes it again;
* a stored entry too large for the home's frames is refused, and its row dropped;
* so is a stored entry expired past the outbox deadline, or while its row was written;
* an entry in flight when the link drops is stored, not answered, and sent again first;
* entries taken after a restart are numbered after the restored ones;
* an answer that comes after the deadline is dropped;
* a forwarded write the home has not answered holds up no later answer;
* the disk store keeps each link's rows apart.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from agent_sdk import frames as f
from agent_sdk.client import PendingPublish, Published, RelayClient
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.wire import ZERO_HASH, Event, SignedEvent, decode_event, make_receipt, sign_event
from federation.outbox import Entry, MemoryOutboxStore, Outbox, SQLiteOutboxStore
from tests.conftest import identity
from tests.federation.fixtures import LyingRelay, federation_of, plan, start

NS = "x@b"
TIMEOUT = 30


async def test_a_home_that_is_stopping_does_not_end_a_forwarded_write(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relays = plan(tmp_path, "a", "b")
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    a = await start(nursery, relays["a"], (relays["b"].peer(),))
    outbox = federation_of(a).outboxes["b"]
    dropped, loop = trio.Event(), trio.lowlevel.current_trio_token()
    drop = outbox.store.drop

    def drop_and_tell(link: str, ns: Iterable[int]) -> None:  # (in a worker thread)
        drop(link, ns)
        loop.run_sync_soon(dropped.set)

    outbox.store.drop = drop_and_tell  # type: ignore[method-assign]
    with trio.fail_after(TIMEOUT):
        await federation_of(a).links["b"].wait_up()
        b.node.stop_admitting()  # b is in its clean-stop window: every publish gets 5002
        async with RelayClient.connect(a.url, identity(1)) as agent:
            queued = trio.Event()
            published = []

            async def publish() -> None:
                result = await agent.publish(NS, "app.note", "kept", on_queued=queued.set)
                published.append(result)

            async with trio.open_nursery() as waiting:
                waiting.start_soon(publish)
                await queued.wait()  # 5002 is "not now": stored, promised
                assert len(outbox.store.load()) == 1
                b.node.stopping = False  # b admits again (a restart would do the same)
            [result] = published
        assert result.receipt.seq == 1 and b.node.head(NS) == 1
        await dropped.wait()  # answered: its row goes (written after the answer)
    assert outbox.store.load() == [] and outbox.delivered == 1


async def test_a_stopping_relay_forwards_nothing(nursery: trio.Nursery, tmp_path: Path) -> None:
    """In its clean-stop window a relay answers 5002 for every namespace (6.1 step
    9): a publish to another relay's namespace is refused too, not taken into the
    outbox on the way out."""
    relays = plan(tmp_path, "a", "b")
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    a = await start(nursery, relays["a"], (relays["b"].peer(),))
    outbox = federation_of(a).outboxes["b"]
    with trio.fail_after(TIMEOUT):
        await federation_of(a).links["b"].wait_up()
        async with RelayClient.connect(a.url, identity(1), reconnect=False) as agent:
            a.node.stop_admitting()
            for ns in ("x@a", NS):
                with pytest.raises(ProtocolError) as refused:
                    await agent.publish(ns, "app.note", "late")
                assert refused.value.code is ErrorCode.SHUTTING_DOWN, ns
    assert outbox.store.load() == [] and b.node.head(NS) == 0


class _Unsent:
    """A link client that must not be asked to send anything."""

    relay_max_frame = 1000
    ws = None

    def __init__(self) -> None:
        self.stopped = trio.Event()

    def publish_later(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("an entry too large for the home was sent")


async def test_a_restored_entry_is_queued_and_one_too_large_leaves_no_row() -> None:
    me = identity(1)
    store = MemoryOutboxStore()
    first = Outbox("b", store, deadline_ms=600_000, wall_ms=lambda: 0)
    large = sign_event(Event(NS, "app.note", me.public_key, "y" * 5000, (), 1), me.sign)
    entry = await first.submit(large)  # the link is down: stored, `queued`
    assert entry.queued_now.is_set() and len(store.load()) == 1

    again = Outbox("b", store, deadline_ms=600_000, wall_ms=lambda: 0)  # a restart
    for _, n, raw, sig, since in store.load():
        again.restore(n, raw, sig, since)
    restored = again.entries[large.id]
    assert restored.queued_now.is_set()  # a re-publish is told `queued` at once

    client = _Unsent()  # its welcome said 1000 bytes at most
    async with trio.open_nursery() as running:
        running.start_soon(again.send, client)  # type: ignore[arg-type]
        await restored.done.wait()
        client.stopped.set()
    assert isinstance(restored.error, ProtocolError)
    assert restored.error.code is ErrorCode.FRAME_TOO_LARGE
    assert store.load() == []  # nothing will ever answer it: no promise left


class _FullDisk(MemoryOutboxStore):
    def put(self, link: str, entries: Sequence[tuple[int, bytes, bytes, int]]) -> None:
        raise OSError(28, "No space left on device")

    def drop(self, link: str, ns: Iterable[int]) -> None:
        raise OSError(28, "No space left on device")


async def test_a_store_that_fails_promises_nothing_and_stops_nothing() -> None:
    """A failing disk under the outbox raised out of the link's tasks and took the
    relay down. Now an entry it could not store is not ``queued`` (no promise), it
    waits in memory, and it expires at its deadline as any other."""
    me, now = identity(1), [0]
    outbox = Outbox("b", _FullDisk(), deadline_ms=1000, wall_ms=lambda: now[0])
    event = sign_event(Event(NS, "app.note", me.public_key, "x", (), 1), me.sign)
    entry = await outbox.submit(event)  # the link is down: it would be stored
    assert not entry.queued_now.is_set() and not entry.stored
    assert entry.decided.is_set()  # what is answered after it on its connection goes on
    now[0] = 1000
    assert await outbox.expire(now[0]) == 1
    assert isinstance(entry.error, ProtocolError)
    assert entry.error.code is ErrorCode.HOME_UNREACHABLE
    await outbox._drop([entry.n])  # a row that cannot be deleted is logged, not raised


async def test_an_entry_expired_past_its_deadline_leaves_no_row() -> None:
    """A stored entry (the link down: ``queued`` was told) that waits past the
    deadline is answered ``home_unreachable``, and its row goes with it: a restart
    would otherwise send a write its agent was told had failed."""
    me, now = identity(1), [0]
    store = MemoryOutboxStore()
    outbox = Outbox("b", store, deadline_ms=1000, wall_ms=lambda: now[0])
    event = sign_event(Event(NS, "app.note", me.public_key, "x", (), 1), me.sign)
    entry = await outbox.submit(event)
    assert entry.stored and [row[1] for row in store.load()] == [entry.n]
    now[0] = 999
    assert await outbox.expire(now[0]) == 0 and len(store.load()) == 1  # not yet
    now[0] = 1000
    assert await outbox.expire(now[0]) == 1
    assert isinstance(entry.error, ProtocolError)
    assert entry.error.code is ErrorCode.HOME_UNREACHABLE
    assert store.load() == [] and outbox.entries == {}


@pytest.mark.parametrize(
    "command",
    [
        ["publish", NS, "app.note", "--body", '"kept"'],
        ["wo", "create", "--title", "kept", "--ns", NS],
        ["doc", "append", NS, "notes", "kept"],
    ],
)
async def test_a_shell_command_says_its_write_is_queued(
    nursery: trio.Nursery, tmp_path: Path, command: list[str]
) -> None:
    """With the home down, a write waited for its receipt in silence, and an agent
    that gave up and retried created a second order once the home was back."""
    import os
    import sys

    from tests.agent_sdk.shell import read_until, running

    relays = plan(tmp_path, "a", "b")  # b is never started
    a = await start(nursery, relays["a"], (relays["b"].peer(),))
    env = {**os.environ, "FORMICARY_RELAY": a.url, "FORMICARY_KEY": str(tmp_path / "k.key")}
    async with running([sys.executable, "-m", "agent_sdk.cli", *command], env) as process:
        with trio.fail_after(TIMEOUT):
            said = await read_until(process.stderr, b"Waiting for the home's receipt")
    assert f"queued at {a.url}: the home relay of {NS} cannot be reached now" in said.decode()


class _Disk(MemoryOutboxStore):
    blocking = True  # written in a worker thread, as SQLiteOutboxStore is


async def test_a_publish_cancelled_as_it_reaches_the_outbox_is_still_stored() -> None:
    """With the link down, a connection closing as its publish reached the outbox
    (the cancel delivered at the store call) left the entry registered but neither
    stored nor decided: the agent publishing it again joined that entry, was never told
    ``queued``, and every answer after it on the new connection waited for the link to
    come back or the deadline. The entry is written all the same now."""
    me = identity(1)
    store = _Disk()
    outbox = Outbox("b", store, deadline_ms=600_000, wall_ms=lambda: 0)
    event = sign_event(Event(NS, "app.note", me.public_key, "x", (), 1), me.sign)
    with trio.CancelScope() as closing:
        closing.cancel()
        await outbox.submit(event)
    again = await outbox.submit(event)  # the agent reconnects and publishes it again
    assert again.stored and again.decided.is_set() and again.queued_now.is_set()
    assert [row[1] for row in store.load()] == [again.n]


class _Link:
    """A link connection whose home the test answers by hand: publishes are recorded
    in the order sent; :meth:`drop` ends the connection as the real client does (every
    unanswered publish fails, and ``stopped`` is set in the same step)."""

    relay_max_frame = 1 << 20

    def __init__(self) -> None:
        self.stopped = trio.Event()
        self.sent: list[PendingPublish] = []
        self.ws = self  # (the outbox closes the connection with ``client.ws.aclose``)
        self._changed = trio.Event()

    def publish_later(
        self, event: SignedEvent, *, on_queued: Callable[[], None] | None = None
    ) -> PendingPublish:
        pending = PendingPublish(event, on_queued)
        self.sent.append(pending)
        self._changed.set()
        self._changed = trio.Event()
        return pending

    async def wait_sent(self, count: int) -> list[PendingPublish]:
        while len(self.sent) < count:
            await self._changed.wait()
        return self.sent

    def answer(self, pending: PendingPublish, seq: int) -> None:
        receipt = make_receipt(
            id=pending.event.id, ns=NS, seq=seq, hlc=seq, prev=ZERO_HASH, relay=bytes(32)
        )
        pending.result = Published(receipt, None, False)
        pending.done.set()

    def drop(self) -> None:
        for pending in self.sent:
            if not pending.done.is_set():
                pending.error = ProtocolError(ErrorCode.INTERNAL, "the connection closed")
                pending.done.set()
        self.stopped.set()

    async def aclose(self, code: int, reason: str) -> None:
        self.drop()


def notes(count: int) -> list[SignedEvent]:
    me = identity(1)
    return [
        sign_event(Event(NS, "app.note", me.public_key, n, (), 1), me.sign) for n in range(count)
    ]


async def test_an_entry_in_flight_when_the_link_drops_is_stored_and_sent_again_first() -> None:
    """14.5: an entry the home has not answered when the connection ends is not
    answered by the drop: it is stored (the promise of ``queued``) and sent again on
    the next connection, before any entry that arrived after it."""
    store = MemoryOutboxStore()
    outbox = Outbox("b", store, deadline_ms=600_000, wall_ms=lambda: 0)
    first, second, third = notes(3)
    link = _Link()
    async with trio.open_nursery() as running:
        running.start_soon(outbox.send, link)  # type: ignore[arg-type]
        await trio.testing.wait_all_tasks_blocked()  # (the outbox is up)
        answered = await outbox.submit(first)
        in_flight = await outbox.submit(second)
        sent = await link.wait_sent(2)
        assert store.load() == []  # sent at once: in memory only
        link.answer(sent[0], 1)
        await answered.done.wait()
        link.drop()
    assert not in_flight.done.is_set()  # the drop is not the home's answer
    assert in_flight.stored and in_flight.queued_now.is_set()
    assert [row[1] for row in store.load()] == [in_flight.n]
    later = await outbox.submit(third)  # the link is down: stored behind it

    again = _Link()
    async with trio.open_nursery() as running:
        running.start_soon(outbox.send, again)  # type: ignore[arg-type]
        sent = await again.wait_sent(2)
        assert [pending.event.id for pending in sent] == [second.id, third.id]
        for seq, pending in enumerate(sent, 2):
            again.answer(pending, seq)
        await later.done.wait()
        again.drop()
    assert in_flight.result is not None and in_flight.result.receipt.seq == 2
    assert store.load() == [] and outbox.delivered == 3


async def test_an_entry_taken_after_a_restart_does_not_overwrite_a_restored_one() -> None:
    """Entries restored at start keep their numbers: a new entry is numbered after
    them. Numbered from 1 again, it would replace the restored entry's row (the store
    keys rows by link and number), and its answer would delete that row: the restored
    promise would be gone from disk before it was kept."""
    store = MemoryOutboxStore()
    before = Outbox("b", store, deadline_ms=600_000, wall_ms=lambda: 0)
    kept, new = notes(2)
    await before.submit(kept)  # the link is down: stored
    after = Outbox("b", store, deadline_ms=600_000, wall_ms=lambda: 0)  # a restart
    for _, n, raw, sig, since in store.load():
        after.restore(n, raw, sig, since)
    await after.submit(new)
    assert [decode_event(raw, sig).id for _, _, raw, sig, _ in store.load()] == [kept.id, new.id]
    link = _Link()
    async with trio.open_nursery() as running:
        running.start_soon(after.send, link)  # type: ignore[arg-type]
        sent = await link.wait_sent(2)
        assert [pending.event.id for pending in sent] == [kept.id, new.id]  # oldest first
        link.drop()


async def test_an_answer_after_the_deadline_is_dropped() -> None:
    """14.5: an entry in flight past its deadline is answered ``home_unreachable``;
    the home's answer that comes after it is dropped, not passed on a second time."""
    now = [0]
    remembered: list[Entry] = []
    outbox = Outbox(
        "b",
        MemoryOutboxStore(),
        deadline_ms=1000,
        wall_ms=lambda: now[0],
        on_answer=remembered.append,
    )
    [event] = notes(1)
    link = _Link()
    async with trio.open_nursery() as running:
        running.start_soon(outbox.send, link)  # type: ignore[arg-type]
        await trio.testing.wait_all_tasks_blocked()
        entry = await outbox.submit(event)
        [pending] = await link.wait_sent(1)
        assert outbox.next_deadline_ms() == 1000  # counted from its arrival
        now[0] = 1000
        assert await outbox.expire(now[0]) == 1
        link.answer(pending, 1)  # the home's answer, late
        await trio.testing.wait_all_tasks_blocked()
        link.drop()
    assert isinstance(entry.error, ProtocolError)
    assert entry.error.code is ErrorCode.HOME_UNREACHABLE and entry.result is None
    assert outbox.delivered == 0 and remembered == []


class _SlowDisk(MemoryOutboxStore):
    """A store whose writes, in a worker thread, wait until the test lets them finish."""

    blocking = True

    def __init__(self) -> None:
        super().__init__()
        self.writing = trio.Event()
        self.finish = threading.Event()

    def put(self, link: str, entries: Sequence[tuple[int, bytes, bytes, int]]) -> None:
        trio.from_thread.run_sync(self.writing.set)
        self.finish.wait()
        super().put(link, entries)


async def test_an_entry_expired_while_its_row_is_written_leaves_no_row() -> None:
    """An entry that expires while its row is being written (the disk is slow) was
    answered ``home_unreachable`` already: its row is deleted once written, or a
    restart would send a write its agent was told had failed."""
    now = [0]
    store = _SlowDisk()
    outbox = Outbox("b", store, deadline_ms=1000, wall_ms=lambda: now[0])
    [event] = notes(1)
    async with trio.open_nursery() as running:
        running.start_soon(outbox.submit, event)  # the link is down: written
        await store.writing.wait()
        now[0] = 1000
        assert await outbox.expire(now[0]) == 1
        store.finish.set()
    assert store.load() == [] and outbox.entries == {}


async def test_a_forwarded_write_not_answered_yet_holds_up_no_later_answer(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """14.4: a forwarded publish is answered when its home answers, without holding up
    the answers to later publishes on the connection: they wait only until it has
    been sent on toward the home. Here the home's ack is lost on the way, so it never
    comes; the agent's next publish, to its own relay, is answered all the same."""
    import time

    relays = plan(tmp_path, "a", "b")
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    lost = trio.Event()

    def lose(ack: f.Ack) -> None:
        lost.set()

    silent = LyingRelay(b.url, lambda frame: frame, tamper_ack=lose)
    await nursery.start(silent.run)
    a = await start(nursery, relays["a"], (relays["b"].peer(url=silent.url),))
    me = identity(1)
    far = sign_event(
        Event(NS, "app.note", me.public_key, "far", (), time.time_ns() // 10**6), me.sign
    )
    with trio.fail_after(TIMEOUT):
        await federation_of(a).links["b"].wait_up()
        async with RelayClient.connect(a.url, me) as agent:
            forwarded = agent.publish_later(far)  # sent first
            near = await agent.publish("y@a", "app.note", "near")
            assert near.receipt.seq == 1
            await lost.wait()  # the home answered it; the answer never reached a
            assert not forwarded.done.is_set() and b.node.head(NS) == 1


def test_the_disk_store_keeps_each_links_rows_apart(tmp_path: Path) -> None:
    """Rows are keyed by link and number: each link numbers its entries from 1, so a
    delete of one link's answered entry must not take another link's promise."""
    store = SQLiteOutboxStore(tmp_path / "outbox.sqlite")
    try:
        store.put("b", [(1, b"to b", b"s", 5), (2, b"to b, 2", b"s", 6)])
        store.put("c", [(1, b"to c", b"s", 7)])
        store.drop("b", [1])
        assert store.load() == [("c", 1, b"to c", b"s", 7), ("b", 2, b"to b, 2", b"s", 6)]
        store.put_receipts([("b", 1, b"receipt for b"), ("c", 2, b"receipt for c")])
        store.drop_receipts("c", [1, 2])
        assert store.load_receipts() == [("b", 1, b"receipt for b")]
    finally:
        store.close()
