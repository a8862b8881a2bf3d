"""Single-writer entities over real sockets: one key writes an entity; others are
refused with the writer named; only the writer hands it over; restarts keep it."""

from __future__ import annotations

from pathlib import Path

import trio

from agent_sdk.client import RelayClient
from agent_sdk.errors import ErrorCode
from tests.conftest import RunningRelay, identity, start_relay
from tests.refusals import refused

NS = "crm@local"
ALICE, BOB = identity(1), identity(2)


async def test_only_the_writer_writes_and_hands_over(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, BOB) as bob,
    ):
        await alice.publish(NS, "entity.declare", {"entity": "customer-42"})
        await alice.publish(NS, "crm.update", {"entity": "customer-42", "tier": "gold"})
        head = relay.node.head(NS)
        error = await refused(
            ErrorCode.FORBIDDEN,
            bob.publish(NS, "crm.update", {"entity": "customer-42", "tier": "basic"}),
        )
        assert ALICE.public_key.hex() in error.reason  # the writer is named
        await refused(
            ErrorCode.FORBIDDEN,
            bob.publish(NS, "entity.handover", {"entity": "customer-42", "to": BOB.public_key}),
        )
        await refused(
            ErrorCode.FORBIDDEN, bob.publish(NS, "entity.declare", {"entity": "customer-42"})
        )
        assert relay.node.head(NS) == head  # nothing refused was sequenced
        await bob.publish(NS, "crm.update", {"entity": "customer-7"})  # undeclared: anyone
        await bob.publish(NS, "crm.note", {"about": "customer-42"})  # not a write to it

        await alice.publish(NS, "entity.handover", {"entity": "customer-42", "to": BOB.public_key})
        await bob.publish(NS, "crm.update", {"entity": "customer-42", "tier": "silver"})
        await refused(
            ErrorCode.FORBIDDEN, alice.publish(NS, "crm.update", {"entity": "customer-42"})
        )


async def test_bad_entity_events_are_refused(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, ALICE) as alice:
        for kind, body in (
            ("entity.declare", {"entity": ""}),
            ("entity.declare", {"entity": "x" * 257}),
            ("entity.declare", {"entity": "e", "writer": b"short"}),
            ("entity.declare", {"entity": "e", "extra": 1}),
            ("entity.declare", ["e"]),
            ("entity.handover", {"entity": "e"}),
            ("entity.handover", {"entity": "nobody-declared", "to": BOB.public_key}),
            ("entity.declare", {"entity": "*"}),
            ("entity.declare", {"entity": "e", "writer": BOB.public_key, "role": "r"}),
            ("entity.declare", {"entity": "e", "role": ""}),
            ("entity.declare", {"entity": "e", "role": "r" * 65}),
            ("entity.handover", {"entity": "e", "to_role": 7}),
            ("entity.release", {"entity": "e", "to": BOB.public_key}),
            ("entity.release", {"entity": "never-declared"}),
        ):
            await refused(ErrorCode.BAD_EVENT, alice.publish(NS, kind, body))
        assert relay.node.head(NS) == 0


async def test_writers_survive_a_restart(nursery: trio.Nursery, tmp_path: Path) -> None:
    data = tmp_path / "relay"
    running = await start_relay(nursery, data)
    async with RelayClient.connect(running.url, ALICE) as alice:
        await alice.publish(NS, "entity.declare", {"entity": "ledger", "writer": BOB.public_key})
    running.scope.cancel()
    running = await start_relay(nursery, data)
    async with (
        RelayClient.connect(running.url, ALICE) as alice,
        RelayClient.connect(running.url, BOB) as bob,
    ):
        await refused(ErrorCode.FORBIDDEN, alice.publish(NS, "app.write", {"entity": "ledger"}))
        await bob.publish(NS, "app.write", {"entity": "ledger"})
    running.scope.cancel()


async def test_a_role_or_a_kind_of_entities_has_one_writer(relay: RunningRelay) -> None:
    carol = identity(3)
    async with (
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, BOB) as bob,
        RelayClient.connect(relay.url, carol) as carol_,
    ):
        await bob.publish(NS, "dir.join", {"name": "bob", "role": "pricing"})
        await alice.publish(NS, "entity.declare", {"entity": "price:*", "role": "pricing"})
        await bob.publish(NS, "app.price", {"entity": "price:sku-1", "eur": 10})  # the role
        error = await refused(
            ErrorCode.FORBIDDEN, carol_.publish(NS, "app.price", {"entity": "price:sku-1"})
        )
        assert "role pricing" in error.reason
        await refused(ErrorCode.FORBIDDEN, alice.publish(NS, "app.price", {"entity": "price:x"}))
        await carol_.publish(NS, "dir.join", {"name": "carol", "role": "pricing"})
        await carol_.publish(NS, "app.price", {"entity": "price:sku-2"})  # joined the role

        # Declaring cannot take an entity from its writer: overlaps are refused.
        for name in ("price:sku-1", "price:*", "pri*", "price:eu:*"):
            await refused(
                ErrorCode.FORBIDDEN, carol_.publish(NS, "entity.declare", {"entity": name})
            )
        await carol_.publish(NS, "entity.declare", {"entity": "stock:*"})
        await alice.publish(NS, "app.note", {"entity": "unrelated"})

        # A member of the role hands the kind to one key; the rest of the role is out.
        await refused(
            ErrorCode.FORBIDDEN,
            alice.publish(NS, "entity.handover", {"entity": "price:*", "to": ALICE.public_key}),
        )
        await bob.publish(NS, "entity.handover", {"entity": "price:*", "to": BOB.public_key})
        await refused(ErrorCode.FORBIDDEN, carol_.publish(NS, "app.price", {"entity": "price:a"}))
        await bob.publish(NS, "app.price", {"entity": "price:a"})
        await bob.publish(NS, "entity.handover", {"entity": "price:*", "to_role": "pricing"})
        await carol_.publish(NS, "app.price", {"entity": "price:a"})
        await refused(
            ErrorCode.FORBIDDEN, alice.publish(NS, "entity.release", {"entity": "price:*"})
        )
        await carol_.publish(NS, "entity.release", {"entity": "price:*"})  # a role member
        await alice.publish(NS, "app.price", {"entity": "price:a"})  # anyone writes again
        await alice.publish(NS, "entity.declare", {"entity": "price:a"})  # or declares


async def test_a_kind_covers_its_prefix_only_and_never_takes_a_declared_entity(
    relay: RunningRelay,
) -> None:
    carol = identity(3)
    async with (
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, BOB) as bob,
        RelayClient.connect(relay.url, carol) as carol_,
    ):
        await alice.publish(NS, "entity.declare", {"entity": "customer-42"})
        # A kind that covers a declared name is refused, whoever declares it (8.14).
        error = await refused(
            ErrorCode.FORBIDDEN, bob.publish(NS, "entity.declare", {"entity": "customer*"})
        )
        assert "overlaps customer-42" in error.reason
        # customer:* governs the names that start with "customer:", and no others.
        await bob.publish(NS, "entity.declare", {"entity": "customer:*"})
        await refused(
            ErrorCode.FORBIDDEN, alice.publish(NS, "crm.update", {"entity": "customer:7"})
        )
        await alice.publish(NS, "crm.update", {"entity": "customer7"})
        await alice.publish(NS, "crm.update", {"entity": "customer"})
        await bob.publish(NS, "crm.update", {"entity": "customer:7"})

        # A role's writers are the members of that role, not of any role.
        await carol_.publish(NS, "dir.join", {"name": "carol", "role": "sales"})
        await alice.publish(NS, "entity.declare", {"entity": "price", "role": "pricing"})
        error = await refused(
            ErrorCode.FORBIDDEN, carol_.publish(NS, "app.price", {"entity": "price"})
        )
        assert "role pricing" in error.reason
