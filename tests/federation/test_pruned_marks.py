"""Pruned records over a via peer (protocol 4.5, 14.8).

The home ``c`` compacts a document, so records of its log have no bytes left; ``a``
follows ``c``'s namespace through ``b``'s mirror of it. Each pruned record travels
with ``c``'s mark, checked by every mirror on the way. A via peer holding pruned
records without marks (taken before marks existed) cannot pass them on: it ends
that subscription with an error, and the link stays up for everything else.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import trio
import trio.testing

from agent_sdk.client import Delivery, Live, RelayClient
from federation.peers import Peer
from relay.app import MIRROR_FILE
from relay.node import RelayConfig
from tests.conftest import RunningRelay, identity
from tests.federation.fixtures import Planned, federation_of, plan, start

TIMEOUT = 30
NS = "z@c"


async def compacted_home(nursery: trio.Nursery, relays: dict[str, Planned]) -> RunningRelay:
    home = RelayConfig(name="c", doc_compact_every=5)
    c = await start(nursery, relays["c"], (relays["b"].peer(),), home)
    async with (
        RelayClient.connect(c.url, identity(2)) as writer,
        writer.doc(NS, "notes") as shared,
    ):
        for n in range(12):
            shared.text().insert(len(shared.text()), f"[{n}]")
            await shared.flush()
    await c.node.wait_stat("compactions", 2)
    return c


async def read_until(relay: RunningRelay, head: int) -> None:
    async with (
        RelayClient.connect(relay.url, identity(3)) as reader,
        reader.subscribe(NS, start=1) as feed,
    ):
        async for item in feed:
            if isinstance(item, Delivery) and item.receipt.seq == head:
                return


def pruned_rows(mirror: Path) -> tuple[int, int]:
    """Rows of the mirror without bytes, and of those the ones holding a mark."""
    with sqlite3.connect(mirror) as db:
        rows, marked = db.execute(
            "SELECT count(*), coalesce(sum(length(sig) = 64), 0) FROM events "
            "WHERE ns = ? AND event = x''",
            (NS,),
        ).fetchone()
    return rows, marked


async def test_marks_pass_through_a_via_peer(nursery: trio.Nursery, tmp_path: Path) -> None:
    relays = plan(tmp_path, "a", "b", "c")
    a = await start(nursery, relays["a"], (relays["b"].peer(), Peer("c", relays["c"].key, via="b")))
    b = await start(nursery, relays["b"], (relays["a"].peer(), relays["c"].peer()))
    with trio.fail_after(TIMEOUT):
        c = await compacted_home(nursery, relays)
        await federation_of(a).links["b"].wait_up()
        await read_until(a, c.node.head(NS))
    assert federation_of(a).forgeries == federation_of(b).forgeries == 0
    for relay in (a, b, c):
        relay.scope.cancel()
    for mirror in (relays["b"].data / MIRROR_FILE, relays["a"].data / MIRROR_FILE):
        rows, marked = pruned_rows(mirror)
        assert rows >= 8 and marked == rows


async def test_a_via_peer_without_marks_ends_the_subscription_not_the_link(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relays = plan(tmp_path, "a", "b", "c")
    b = await start(nursery, relays["b"], (relays["a"].peer(), relays["c"].peer()))
    with trio.fail_after(TIMEOUT):
        c = await compacted_home(nursery, relays)
        head = c.node.head(NS)
        await read_until(b, head)  # b's mirror holds the whole log
    b.scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    with sqlite3.connect(relays["b"].data / MIRROR_FILE) as db:  # as an older b kept it
        db.execute("UPDATE events SET sig = x'' WHERE event = x''")
    b = await start(nursery, relays["b"], (relays["a"].peer(), relays["c"].peer()))
    a = await start(nursery, relays["a"], (relays["b"].peer(), Peer("c", relays["c"].key, via="b")))
    with trio.fail_after(TIMEOUT):
        await federation_of(a).links["b"].wait_up()
        async with (
            RelayClient.connect(a.url, identity(3)) as reader,
            reader.subscribe(NS, start=1) as feed,
        ):
            async for item in feed:
                if isinstance(item, Live):  # what a's mirror could take, and no more
                    assert item.seq < head
                    break
    fed = federation_of(a)
    assert fed.forgeries == 0 and fed.links["b"].connections == 1 and fed.links["b"].up
    assert a.node.head(NS) < head
    for relay in (a, b, c):
        relay.scope.cancel()
