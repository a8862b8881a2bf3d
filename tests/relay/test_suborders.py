"""Sub-orders over real sockets: a parent closes only when its children are done or
dropped, a blocked child escalates to the parent, progress reports, bad trees."""

from __future__ import annotations

from agent_sdk.client import RelayClient
from agent_sdk.ledger import Ledger
from tests.conftest import RunningRelay, identity
from tests.refusals import declined

NS = "build@local"


async def test_a_parent_is_done_only_when_its_children_are(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, identity(1)) as lead_client,
        RelayClient.connect(relay.url, identity(2)) as worker_client,
    ):
        lead, worker = Ledger(lead_client, NS), Ledger(worker_client, NS)
        parent = await lead.create("ship release 4.2")
        first = await lead.create("write the changelog", parent=parent)
        second = await lead.create("tag the build", parent=parent)
        held = await lead.claim(parent)
        error = await declined("open_children", lead.update(held, "done"))
        assert first in error.reason and second in error.reason

        child = await worker.claim(first)
        await worker.progress(child, 60, "half the entries")
        shown = await lead.show(first)
        assert shown["progress"]["percent"] == 60 and shown["parent"] == parent
        await worker.update(child, "done")

        await worker.update(await worker.claim(second), "blocked", "the CI is down")
        shown = await lead.show(parent)
        assert [(c["id"], c["status"], c["percent"]) for c in shown["children"]] == [
            (first, "done", 60), (second, "blocked", None),
        ]  # fmt: skip
        [escalation] = [n for n in shown["notes"] if f"sub-order {second} is blocked" in n["text"]]
        assert escalation["author"] == identity(2).public_key  # the worker that blocked it
        await lead.progress(held, 90, "one child left")
        await declined("open_children", lead.update(held, "done"))
        await lead.update(second, "dropped", "not needed after all")  # explicitly dropped
        await lead.update(held, "done")
        assert (await lead.show(parent))["status"] == "done"


async def test_bad_sub_orders_and_progress_reports_are_refused(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, identity(1)) as client,
        RelayClient.connect(relay.url, identity(2)) as other_client,
    ):
        ledger, other = Ledger(client, NS), Ledger(other_client, NS)
        await declined("not_found", ledger.create("orphan", parent="wo-99"))
        finished = await ledger.create("finished")
        await ledger.update(finished, "done")
        await declined("bad_transition", ledger.create("late child", parent=finished))
        await declined("bad_request", ledger.create("odd", parent=7))
        order = await ledger.create("work")
        held = await ledger.claim(order)
        await declined("bad_request", ledger.progress(held, 101))
        await declined("not_holder", other.progress(held, 10))
        await declined("bad_transition", ledger.update(finished, "dropped"))  # final already
        assert [o["id"] for o in await ledger.list()] == [finished, order]  # nothing else


async def test_only_the_parents_owner_splits_it_and_drops_its_children(
    relay: RunningRelay,
) -> None:
    async with (
        RelayClient.connect(relay.url, identity(1)) as lead_client,
        RelayClient.connect(relay.url, identity(2)) as holder_client,
        RelayClient.connect(relay.url, identity(3)) as stranger_client,
    ):
        lead = Ledger(lead_client, NS)
        holder, stranger = Ledger(holder_client, NS), Ledger(stranger_client, NS)
        parent = await lead.create("migrate the database")
        await declined("not_holder", stranger.create("my extra work", parent=parent))
        first = await lead.create("dump the tables", parent=parent)  # its creator
        await holder.claim(parent)
        second = await holder.create("check the dump", parent=parent)  # its holder
        await declined("not_holder", stranger.update(first, "dropped"))
        await holder.update(first, "dropped", "the dump is not needed")  # the parent's holder
        await stranger.update(await stranger.claim(second), "dropped")  # a holder, fenced
        statuses = [c["status"] for c in (await lead.show(parent))["children"]]
        assert statuses == ["dropped", "dropped"]
        assert len(await lead.list()) == 3  # the stranger's order was never made
