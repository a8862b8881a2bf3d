"""Three relay processes on loopback act as one network for a namespace homed on one.

Agents connect to all three relays; the namespace ``work@b`` is homed on ``b``. Writes
from agents on ``a`` and ``c`` are forwarded to ``b`` over authenticated links and
come back with ``b``'s receipts and outcomes; reads are served from checked mirrors
(subscriptions) or answered by ``b`` (queries). The coordination guarantees are the
home's: one claim wins, one award is made, one document state results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from agent_sdk.auctions import Auctions
from agent_sdk.client import Delivery, Live, RelayClient
from agent_sdk.directory import Directory
from agent_sdk.docs import SharedDoc, state_vector
from agent_sdk.ledger import Ledger, LedgerRefusal
from agent_sdk.wire import decode_receipt
from tests.conftest import identity
from tests.federation.cluster import clients, cluster

NS = "work@b"
RELAYS = ("a", "b", "c")
PER_RELAY = 10
TIMEOUT = 60


async def test_agents_on_three_relays_claim_bid_and_edit_one_namespace(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(tmp_path, RELAYS) as net:
            pairs = [
                (net[relay].url, identity(10 * i + n + 1))
                for i, relay in enumerate(RELAYS)
                for n in range(PER_RELAY)
            ]
            async with clients(pairs) as agents:
                await claims_exactly_once(agents)
                await auction_awarded_once(agents)
                await document_converges(agents)
                await receipts_are_the_homes(agents, net["b"].key)


async def claims_exactly_once(agents: list[RelayClient]) -> None:
    order = await Ledger(agents[0], NS).create("the one order")  # an agent on a
    winners: list[int] = []
    refused: list[str] = []

    async def claim(n: int) -> None:
        try:
            await Ledger(agents[n], NS).claim(order, ttl_ms=60_000)
            winners.append(n)
        except LedgerRefusal as exc:
            refused.append(exc.problem)

    async with trio.open_nursery() as nursery:
        for n in range(len(agents)):
            nursery.start_soon(claim, n)
    assert len(winners) == 1 and len(refused) == len(agents) - 1
    assert set(refused) == {"held"}
    winner = agents[winners[0]].identity.public_key
    for reader in (agents[0], agents[PER_RELAY], agents[2 * PER_RELAY]):  # one per relay
        shown = await Ledger(reader, NS).show(order)
        assert shown["holder"] == winner and shown["status"] == "claimed"


async def auction_awarded_once(agents: list[RelayClient]) -> None:
    requester = agents[-1]  # on c
    bidders = [agents[n] for n in (1, 2, PER_RELAY + 1, PER_RELAY + 2, 2 * PER_RELAY + 1)]
    for n, agent in enumerate([requester, *bidders]):
        await Directory(agent, NS).join(f"agent-{n}", capabilities=["python"], heartbeat_ms=600_000)
    opened = await Auctions(requester, NS).open(
        title="port it", duration_ms=1_500, rule="lowest_price"
    )
    prices = [40, 25, 60, 30, 50]

    async def bid(agent: RelayClient, price: int) -> None:
        await Auctions(agent, NS).bid(opened["auction"], stake=10, price=price)

    async with trio.open_nursery() as nursery:
        for agent, price in zip(bidders, prices, strict=True):
            nursery.start_soon(bid, agent, price)
    awards: list[dict[str, Any] | None] = []

    async def watch(agent: RelayClient) -> None:
        awards.append(await Auctions(agent, NS).wait_award(opened["auction"]))

    async with trio.open_nursery() as nursery:
        for agent in (bidders[0], bidders[2], bidders[4]):  # one on each relay
            nursery.start_soon(watch, agent)
    assert len(awards) == 3 and all(award is not None for award in awards)
    assert all(award == awards[0] for award in awards)
    assert awards[0] is not None and awards[0]["agent"] == bidders[1].identity.public_key
    closed = []
    async with bidders[4].subscribe(NS, start=1, kinds=["auction.closed"]) as feed:
        async for item in feed:
            if isinstance(item, Live):
                break
            assert isinstance(item, Delivery)
            closed.append(item.event.event.body)
    assert [body["auction"] for body in closed] == [opened["auction"]]  # awarded once


async def document_converges(agents: list[RelayClient]) -> None:
    writers = [agents[0], agents[PER_RELAY], agents[2 * PER_RELAY]]  # a, b, c
    rounds = 5
    async with (
        writers[0].doc(NS, "notes") as on_a,
        writers[1].doc(NS, "notes") as on_b,
        writers[2].doc(NS, "notes") as on_c,
    ):
        replicas: list[SharedDoc] = [on_a, on_b, on_c]
        for shared in replicas:
            await shared.synced.wait()
        for n in range(rounds):
            for i, shared in enumerate(replicas):
                shared.array().append(f"{RELAYS[i]}{n}")
                shared.map()[f"k{n % 2}"] = f"{RELAYS[i]}{n}"
                shared.text().insert(0, RELAYS[i])
            await trio.lowlevel.checkpoint()
        for shared in replicas:
            await shared.flush()
        total = rounds * len(replicas)
        for shared in replicas:
            while len(shared.array()) < total and shared.error is None:
                await shared.wait_seq(shared.seq + 1)
        assert all(shared.error is None for shared in replicas)
        vectors = [state_vector(shared.doc.get_state()) for shared in replicas]
        assert vectors[0] == vectors[1] == vectors[2]
        views = [shared.to_json() for shared in replicas]
        assert views[0] == views[1] == views[2]
        assert sorted(views[0]["log"]) == sorted(f"{r}{n}" for r in RELAYS for n in range(rounds))


async def receipts_are_the_homes(agents: list[RelayClient], home_key: bytes) -> None:
    """Every event of the namespace, read through each relay, carries b's receipt, in
    one gapless chain: the same log everywhere, never re-sequenced."""
    home = await read_until(agents[PER_RELAY], None)
    assert len(home) > 60
    assert all(decode_receipt(raw).relay == home_key for raw in home)
    for reader in (agents[0], agents[2 * PER_RELAY]):  # mirrors on a and c
        assert await read_until(reader, len(home)) == home


async def read_until(reader: RelayClient, seq: int | None) -> list[bytes]:
    """Receipts from seq 1: up to ``seq``, or (``None``) up to the ``live`` mark."""
    seen = []
    async with reader.subscribe(NS, start=1) as feed:
        async for item in feed:
            if isinstance(item, Live):
                if seq is None:
                    return seen
                continue
            assert isinstance(item, Delivery)
            seen.append(item.receipt.raw)
            if len(seen) == seq:
                return seen
    raise AssertionError("the subscription ended")
