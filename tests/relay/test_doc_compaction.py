"""Document snapshots, pruning, eviction and epochs: old replicas never duplicate content.

The known failure of Yjs servers: one that rebuilt a document (after a restart, an
eviction or a compaction) under new item ids, and an old client that reconnects with
its history, end up with everything twice. Here the rebuilt document keeps its ids
(a snapshot is the merged update, not new inserts), and a replica of another
incarnation is told to start over (its epoch differs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from agent_sdk.client import Delivery, Live, RelayClient
from agent_sdk.docs import DocReset, SharedDoc
from agent_sdk.frames import encode_frame
from agent_sdk.wire import decode
from relay.node import RelayConfig
from relay.store import Record
from relay.store.sqlite import SQLiteStore
from relay.verify import verify_log
from tests.backends import forget, relay_store, sqlite_only
from tests.conftest import RunningRelay, identity, start_relay

NS = "docs@local"


async def write_history(shared: SharedDoc, edits: int, start: int = 0) -> None:
    """Edits committed one by one (each its own update in the log)."""
    for n in range(start, start + edits):
        shared.text().insert(len(shared.text()), f"[{n}]")
        shared.array().append(n)
        shared.map()[f"k{n % 5}"] = n
        await shared.flush()


async def reopen_stale(client: RelayClient, state: bytes, name: str) -> SharedDoc:
    """A replica that went offline holding ``state`` comes back."""
    stale = SharedDoc(client, NS, name, sub=1000)
    stale._apply(state)
    client._docs[stale.sub] = stale
    client._queue(encode_frame(stale.open_request()))
    await stale.synced.wait()
    if stale.error is not None:
        raise stale.error
    return stale


def assert_no_duplicates(content: dict[str, Any], edits: int) -> None:
    assert content["text"] == "".join(f"[{n}]" for n in range(edits))
    assert content["log"] == list(range(edits))


async def run_history(relay: RunningRelay, edits: int) -> tuple[bytes, dict[str, Any]]:
    """Write ``edits`` edits; return an early replica's state and the final content."""
    async with (
        RelayClient.connect(relay.url, identity(1)) as client,
        client.doc(NS, "history") as shared,
    ):
        await write_history(shared, 3)
        early = shared.doc.get_update()
        await write_history(shared, edits - 3, start=3)
        return early, shared.to_json()


async def test_compaction_keeps_content_shrinks_bytes_and_old_replicas_merge_cleanly(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    edits = 60
    plain = await start_relay(nursery, tmp_path / "plain", RelayConfig(doc_compact_every=10**6))
    compacting = await start_relay(
        nursery, tmp_path / "compacting", RelayConfig(doc_compact_every=20)
    )
    _, expected = await run_history(plain, edits)
    early, content = await run_history(compacting, edits)
    await compacting.node.wait_stat("compactions", 2)
    assert content == expected
    assert_no_duplicates(content, edits)

    plain_bytes = plain.node.store.stored_bytes(NS)
    compacted_bytes = compacting.node.store.stored_bytes(NS)
    # Every update's bytes are gone; its receipt (the chain) and the snapshots stay.
    assert compacted_bytes < plain_bytes, (compacted_bytes, plain_bytes)

    async with RelayClient.connect(compacting.url, identity(3)) as client:
        stale = await reopen_stale(client, early, "history")  # offline since edit 3
        assert stale.to_json() == content
        # A plain subscriber replaying the log gets no bytes-less records.
        delivered = 0
        async with client.subscribe(NS, start=1) as feed:
            async for item in feed:
                if isinstance(item, Live):
                    break
                assert isinstance(item, Delivery)
                delivered += 1
        assert delivered < compacting.node.head(NS)

    # Restart: the document reloads from its snapshot, the same, and the log verifies.
    compacting.scope.cancel()
    plain.scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    again = await start_relay(nursery, tmp_path / "compacting")
    async with RelayClient.connect(again.url, identity(4)) as client:
        stale = await reopen_stale(client, early, "history")
        assert stale.to_json() == content
    again.scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    store = relay_store(tmp_path / "compacting", readonly=True)
    try:
        records = list(store.scan(NS))
        assert sum(not r.event for r in records) >= 40  # pruned, receipts kept
        verdict = verify_log(NS, records, lambda dep: store.find([dep]).get(dep))
        assert verdict.ok, verdict.reason
    finally:
        store.close()


def stored_snapshots(data: Path) -> tuple[dict[str, int], int]:
    """Per document, its ``doc.compacted`` records that hold bytes; and how many
    records of the log have none (pruned)."""
    store = relay_store(data, readonly=True)
    try:
        records = list(store.scan(NS))
        verdict = verify_log(NS, records, lambda dep: store.find([dep]).get(dep))
        assert verdict.ok, verdict.reason
    finally:
        store.close()
    held: dict[str, int] = {}
    for record in records:
        if record.kind == "doc.compacted" and record.event:
            name = decode(record.event)["body"]["doc"]
            held[name] = held.get(name, 0) + 1
    return held, sum(not record.event for record in records)


async def test_a_snapshot_supersedes_the_earlier_ones_and_they_are_pruned(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Each snapshot is the whole document: kept, the log would grow by a full copy
    per compact_every updates. Two documents interleave, so a pruning must take only
    the earlier snapshots of its own document; a restart reads the pruned ones."""
    data = tmp_path / "relay"
    relay = await start_relay(nursery, data, RelayConfig(doc_compact_every=10))
    async with (
        RelayClient.connect(relay.url, identity(1)) as client,
        client.doc(NS, "a") as a,
        client.doc(NS, "b") as b,
    ):
        for n in range(4):  # each snapshot waited for: it covers exactly 10 updates
            await write_history(a, 10, start=10 * n)
            await relay.node.wait_stat("compactions", 2 * n + 1)
            await write_history(b, 10, start=10 * n)
            await relay.node.wait_stat("compactions", 2 * n + 2)
        content = {"a": a.to_json(), "b": b.to_json()}
    relay.scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    held, pruned = stored_snapshots(data)
    assert held == {"a": 1, "b": 1}
    assert pruned == 80 + 6  # every update, and three snapshots of each document

    again = await start_relay(nursery, data, RelayConfig(doc_compact_every=10))
    async with RelayClient.connect(again.url, identity(2)) as client:
        for name in ("a", "b"):
            async with client.doc(NS, name, create=False) as shared:
                assert shared.to_json() == content[name]
        async with client.doc(NS, "a", create=False) as a:
            await write_history(a, 10, start=40)
        await again.node.wait_stat("compactions", 1)
    again.scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    held, pruned = stored_snapshots(data)
    assert held == {"a": 1, "b": 1}
    assert pruned == 90 + 7


async def test_an_evicted_document_reloads_without_duplicating_an_old_replica(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relay = await start_relay(nursery, tmp_path / "r", RelayConfig(max_live_docs=1))
    early, content = await run_history(relay, 12)
    async with RelayClient.connect(relay.url, identity(2)) as client:
        async with client.doc(NS, "other") as other:
            other.text().insert(0, "pushes history out")
        assert (NS, "history") not in relay.node.docs.live  # evicted
        stale = await reopen_stale(client, early, "history")
        assert stale.to_json() == content
        assert_no_duplicates(stale.to_json(), 12)
    relay.scope.cancel()


async def test_a_replica_of_another_incarnation_is_told_to_start_over(
    relay: RunningRelay,
) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        async with client.doc(NS, "fresh") as shared:
            shared.text().insert(0, "current")
            epoch = shared.epoch
        assert epoch is not None
        foreign = SharedDoc(client, NS, "fresh", sub=500)
        foreign.epoch = epoch + 1000  # built from a document of the same name, not this
        foreign._apply(b"\x00\x00")
        client._docs[foreign.sub] = foreign
        client._queue(encode_frame(foreign.open_request()))
        await foreign.synced.wait()
        assert isinstance(foreign.error, DocReset)
        assert str(foreign.text()) == ""  # nothing merged into the old replica


async def test_agents_cannot_forge_a_snapshot(relay: RunningRelay) -> None:
    from agent_sdk.errors import ErrorCode, ProtocolError

    async with RelayClient.connect(relay.url, identity(1)) as client:
        body = {"doc": "x", "upto": 99, "epoch": 1, "state": b"\x00\x00"}
        with pytest.raises(ProtocolError) as info:
            await client.publish(NS, "doc.compacted", body)
        assert info.value.code is ErrorCode.RESERVED_KIND


@sqlite_only
def test_a_new_store_gives_freed_pages_back(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "events.sqlite3")
    try:
        (mode,) = store._reader.execute("PRAGMA auto_vacuum").fetchone()
        assert mode == 2  # incremental: prune's pages go back to the file system
    finally:
        store.close()


@sqlite_only
def test_a_prune_gives_back_every_page_it_frees(tmp_path: Path) -> None:
    """All of them, not the one page a single step of ``incremental_vacuum`` frees."""
    path = tmp_path / "events.sqlite3"
    store = SQLiteStore(path)
    try:
        updates = [Record(NS, seq, seq.to_bytes(32, "big"), "doc.update", b"a", seq,
                          os.urandom(20_000), b"s" * 64, b"r", None)
                   for seq in range(1, 501)]  # fmt: skip
        store.append(updates)
        store._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        before = path.stat().st_size
        store.prune(NS, [r.seq for r in updates])
        (free,) = store._writer.execute("PRAGMA freelist_count").fetchone()
        store._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert free == 0
        assert path.stat().st_size < before // 10  # ~10 MB of updates, given back
    finally:
        store.close()


async def test_a_replica_of_a_lost_relays_document_is_not_merged_into_the_new_one(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The relay lost its data and started afresh; the document was made again under
    the same name (at the same seq, even). An old replica coming back must not pour
    the old content into the new document."""
    import shutil

    data = tmp_path / "relay"
    first = await start_relay(nursery, data)
    async with (
        RelayClient.connect(first.url, identity(1)) as client,
        client.doc(NS, "plan") as old,
    ):
        old.text().insert(0, "the old plan")
        old_state, old_epoch = old.doc.get_update(), old.epoch
    first.scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    shutil.rmtree(data)
    forget(data)  # and its logs, wherever they are

    second = await start_relay(nursery, data)
    async with RelayClient.connect(second.url, identity(2)) as client:
        async with client.doc(NS, "plan") as new:
            new.text().insert(0, "a new plan")
        assert new.epoch != old_epoch
        stale = SharedDoc(client, NS, "plan", sub=321)
        stale._apply(old_state)
        stale.epoch = old_epoch
        client._docs[stale.sub] = stale
        client._queue(encode_frame(stale.open_request()))
        await stale.synced.wait()
        assert isinstance(stale.error, DocReset)
        async with client.doc(NS, "plan", create=False) as check:
            assert str(check.text()) == "a new plan"  # nothing of the old one merged
    second.scope.cancel()


async def test_a_document_that_stays_loaded_forgets_the_updates_its_snapshots_hold(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The index of a document's updates (what loading reads) is trimmed at each
    compaction, not only when the document is loaded again: it stays bounded."""
    relay = await start_relay(nursery, tmp_path / "relay", RelayConfig(doc_compact_every=20))
    async with (
        RelayClient.connect(relay.url, identity(1)) as client,
        client.doc(NS, "busy") as doc,
    ):
        for _ in range(300):
            doc.text().insert(0, "x")
            await doc.flush()
        await relay.node.wait_stat("compactions", 10)
        assert len(relay.node.docs.updates[(NS, "busy")]) < 40  # not 300
