"""Approval gates over real sockets: an order that needs a person, the agent that
waits for one, approvers by key and by directory role, and every bad request."""

from __future__ import annotations

from pathlib import Path

import trio

from agent_sdk.auctions import Auctions
from agent_sdk.client import RelayClient
from agent_sdk.directory import Directory
from agent_sdk.ledger import Ledger
from tests.conftest import RunningRelay, identity, start_relay
from tests.refusals import declined

NS = "ops@local"
AGENT, HUMAN, OTHER = identity(1), identity(2), identity(3)
TIMEOUT = 30


async def test_a_gated_order_is_done_only_after_a_person_approves(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, AGENT) as agent_client,
        RelayClient.connect(relay.url, HUMAN) as human_client,
    ):
        agent, human = Ledger(agent_client, NS), Ledger(human_client, NS)
        await Directory(human_client, NS).join("alice", role="human")
        order = await agent.create(
            "deploy to production", requires_approval=True,
            approval_reason="a production deploy", approver_role="human",
        )  # fmt: skip
        claim = await agent.claim(order)
        error = await declined("needs_approval", agent.update(claim, "done"))
        assert "a production deploy" in error.reason
        await agent.ask_approval(claim, "the canary is green")
        shown = await agent.show(order)
        assert shown["status"] == "awaiting_approval" and shown.get("holder") is None
        assert shown["approval"]["role"] == "human" and not shown["approval"]["approved"]
        await declined("bad_transition", agent.claim(order))  # nobody holds it meanwhile
        await declined("not_approver", agent.approve(order))  # not a member
        await Directory(agent_client, NS).join("bot", role="worker")
        await declined("not_approver", agent.approve(order))  # a member, not in the role

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                decided: list[dict[str, object]] = []

                async def wait() -> None:
                    decided.append(await agent.wait_decision(order))

                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                await human.approve(order, "go ahead")
        [decision] = decided
        assert decision["approved"] is True and decision["comment"] == "go ahead"
        assert decision["by"] == HUMAN.public_key
        claim = await agent.claim(order)  # open again: claimed, and now it may be done
        await agent.update(claim, "done")
        shown = await agent.show(order)
        assert shown["status"] == "done" and shown["approval"]["approved"]
        assert [h["status"] for h in shown["history"]] == [
            "open", "claimed", "awaiting_approval", "open", "claimed", "done",
        ]  # fmt: skip


async def test_a_rejection_blocks_the_order_with_its_comment(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, AGENT) as agent_client,
        RelayClient.connect(relay.url, HUMAN) as human_client,
    ):
        agent, human = Ledger(agent_client, NS), Ledger(human_client, NS)
        order = await agent.create(
            "pay the invoice", requires_approval=True, approval_reason="money",
            approvers=[HUMAN.public_key],
        )  # fmt: skip
        await agent.ask_approval(await agent.claim(order))
        await declined("not_approver", Ledger(agent_client, NS).reject(order, "no"))
        # A member that named no role is no approver of a gate that names none either.
        await Directory(agent_client, NS).join("bot")
        await declined("not_approver", Ledger(agent_client, NS).reject(order, "no"))
        await human.reject(order, "wrong amount")
        decision = await agent.wait_decision(order)  # decided already: at once
        assert decision["approved"] is False and decision["comment"] == "wrong amount"
        shown = await agent.show(order)
        assert shown["status"] == "blocked" and shown["reason"] == "wrong amount"
        await declined("bad_transition", human.approve(order))  # not awaiting any more
        # Reopened and asked again, it may be approved this time.
        await agent.update(order, "open")
        await agent.ask_approval(await agent.claim(order), "fixed the amount")
        await human.approve(order)
        await agent.update(await agent.claim(order), "done")


async def test_the_last_decision_counts(relay: RunningRelay) -> None:
    """Approved, asked again and rejected: reopened, the order is not approved (the
    last decision counts, 8.4.1), and is done only once approved again."""
    async with (
        RelayClient.connect(relay.url, AGENT) as agent_client,
        RelayClient.connect(relay.url, HUMAN) as human_client,
    ):
        agent, human = Ledger(agent_client, NS), Ledger(human_client, NS)
        order = await agent.create(
            "rotate the keys", requires_approval=True, approvers=[HUMAN.public_key]
        )
        await agent.ask_approval(await agent.claim(order))
        await human.approve(order, "yes")
        await agent.ask_approval(await agent.claim(order), "one more change")
        await human.reject(order, "not this one")
        await agent.update(order, "open")
        claim = await agent.claim(order)
        await declined("needs_approval", agent.update(claim, "done"))
        assert not (await agent.show(order))["approval"]["approved"]
        await agent.ask_approval(claim, "reverted")
        await human.approve(order)
        await agent.update(await agent.claim(order), "done")


async def test_bad_approval_requests_are_refused_and_change_nothing(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, AGENT) as client:
        ledger = Ledger(client, NS)
        for contract, why in (
            ({"requires_approval": True}, "names approvers or an approver_role"),
            ({"requires_approval": "yes", "approver_role": "h"}, "true or false"),
            ({"requires_approval": True, "approvers": [b"short"]}, "32-byte keys"),
            ({"requires_approval": True, "approvers": "k"}, "a list"),
            ({"approver_role": "human"}, "go with requires_approval"),
        ):
            error = await declined("bad_request", ledger.create("t", **contract))
            assert why in error.reason
        assert await ledger.list() == []
        plain = await ledger.create("no gate")
        await declined("bad_transition", ledger.ask_approval(await ledger.claim(plain)))
        await declined("bad_transition", ledger.approve(plain))
        await declined("not_found", ledger.approve("wo-99"))
        gated = await ledger.create("gated", requires_approval=True, approvers=[HUMAN.public_key])
        # Only its holder asks: an open order cannot be sent for approval.
        await declined("bad_transition", ledger.update(gated, "awaiting_approval"))
        await declined("bad_request", ledger.request("wo.approve", {"wo": gated, "extra": 1}))


async def test_decisions_survive_a_restart(nursery: trio.Nursery, tmp_path: Path) -> None:
    data = tmp_path / "relay"
    running = await start_relay(nursery, data)
    async with (
        RelayClient.connect(running.url, AGENT) as agent_client,
        RelayClient.connect(running.url, HUMAN) as human_client,
    ):
        agent = Ledger(agent_client, NS)
        order = await agent.create("gated", requires_approval=True, approvers=[HUMAN.public_key])
        await agent.ask_approval(await agent.claim(order))
        await Ledger(human_client, NS).approve(order, "ok")
    running.scope.cancel()
    running = await start_relay(nursery, data)
    async with RelayClient.connect(running.url, OTHER) as client:
        ledger = Ledger(client, NS)
        shown = await ledger.show(order)
        assert shown["status"] == "open" and shown["approval"]["approved"]
        await ledger.update(await ledger.claim(order), "done")  # approved before the restart
    running.scope.cancel()


async def test_a_gated_order_is_not_auctioned(relay: RunningRelay) -> None:
    """An award is a lease its winner must finish; a person's decision would stop it
    midway and the auction would take that for a drop (and slash the winner)."""
    async with RelayClient.connect(relay.url, AGENT) as client:
        order = await Ledger(client, NS).create(
            "gated", requires_approval=True, approver_role="human"
        )
        error = await declined(
            "bad_request", Auctions(client, NS).open(wo=order, duration_ms=60_000)
        )
        assert "needs approval" in error.reason
        assert (await Ledger(client, NS).show(order))["status"] == "open"  # untouched
