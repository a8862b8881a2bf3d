"""Decision routing and the conflict ladder: over real sockets a conflicting pair
walks to the human step and a person settles it; in virtual time each rung of the
ladder, the routing latency classes, replay, and every bad request."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from agent_sdk.client import Delivery, RelayClient
from agent_sdk.decisions import Decisions, route
from agent_sdk.errors import ErrorCode
from agent_sdk.identity import Identity
from agent_sdk.wire import decode
from relay.coordination.host import Host
from relay.node import RelayConfig, RelayNode
from relay.store.memory import MemoryStore
from tests.conftest import RunningRelay, identity
from tests.refusals import declined, refused
from tests.relay import scene
from tests.relay.test_node import virtual_wall

NS = "shop@local"
OWNER, ALICE, BOB, CAROL, OPS, HUMAN, ARBITER = (identity(n) for n in range(1, 8))
RELAY = identity(20)
LADDER = {"rule": "none", "step_ms": 1_000, "window_ms": 60_000, "approvers": []}


def ladder(**changes: Any) -> dict[str, Any]:
    return {**LADDER, "approvers": [HUMAN.public_key], **changes}


async def walk(log: Any, steps: list[tuple[str, dict[str, Any]]]) -> None:
    """Collect the conflict events of a subscription until one reaches the human step."""
    async for item in log:
        if isinstance(item, Delivery) and item.event.event.kind.startswith("conflict."):
            steps.append((item.event.event.kind, item.event.event.body))
            if steps[-1][1].get("step") == "human":
                return


async def test_a_conflicting_pair_walks_the_ladder_to_a_human(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, OWNER) as owner,
        RelayClient.connect(relay.url, ALICE) as alice,
        RelayClient.connect(relay.url, BOB) as bob,
        RelayClient.connect(relay.url, OPS) as ops,
        RelayClient.connect(relay.url, HUMAN) as human,
        ops.subscribe(NS, start=1) as log,
    ):
        routes = [route(["decision.added", "conflict.raised"], "ops")]
        set_ = await Decisions(owner, NS).set_policy(routes, conflicts=ladder(arbiter="arbiter"))
        assert set_ == {"req": set_["req"], "routes": 1, "conflicts": True}
        await ops.publish(NS, "dir.join", {"name": "ops", "role": "ops"})
        first = await Decisions(alice, NS).decide("sku-1", "price", "10 EUR")
        second = await Decisions(bob, NS).decide("sku-1", "price", "12 EUR")
        assert "conflict" not in first and second["conflict"] == "cf-1"

        # Nobody answers: the relay walks the ladder on its own, one event per rung.
        steps: list[tuple[str, dict[str, Any]]] = []
        with trio.fail_after(60):  # a missing rung fails here instead of hanging
            await walk(log, steps)
        assert [(kind, body.get("step")) for kind, body in steps] == [
            ("conflict.raised", None),
            ("conflict.escalated", "agents"),
            ("conflict.escalated", "human"),  # the arbiter rung is passed: nobody holds it
        ]
        raised, agents, to_human = (body for _, body in steps)
        assert raised["decisions"] == [first["id"], second["id"]] and raised["entity"] == "sku-1"
        assert raised["agents"] == [ALICE.public_key, BOB.public_key]
        assert agents["to"] == [ALICE.public_key, BOB.public_key] and agents["note"] == "rule none"
        assert to_human["to"] == [HUMAN.public_key] and to_human["until_ms"] is None
        assert to_human["note"] == "no member holds arbiter"

        # A third decision joins the open conflict: still one conflict on the entity.
        third = await Decisions(ops, NS).decide("sku-1", "price", "11 EUR")
        assert third["conflict"] == "cf-1"
        queue = await Decisions(human, NS).conflicts(status="open", step="human")
        assert [c["conflict"] for c in queue] == ["cf-1"]
        assert queue[0]["decisions"] == [first["id"], second["id"], third["id"]]

        await declined("not_resolver", Decisions(owner, NS).resolve("cf-1", third["id"]))
        resolved = await Decisions(human, NS).resolve("cf-1", second["id"], "list price")
        assert resolved["by"] == "human" and resolved["keep"] == second["id"]
        on = {d["id"]: d["status"] for d in await Decisions(human, NS).on("sku-1")}
        assert on == {first["id"]: "overruled", second["id"]: "accepted", third["id"]: "overruled"}
        await declined("closed", Decisions(alice, NS).resolve("cf-1", first["id"]))

        # The ops role heard of every decision and of the conflict, named in ``to``.
        told = []
        async with Decisions(ops, NS).notices() as notices:
            async for notice in notices:
                told.append((notice["notice"], notice["event"]))
                if len(told) == 4:
                    break
        kinds = [kind for kind, _ in told]
        assert kinds == ["route.notice"] * 4
        scanned = {r.id: r.kind for r in relay.node.store.scan(NS)}
        assert sorted(scanned[event] for _, event in told) == [
            "conflict.raised", "decision.added", "decision.added", "decision.added"
        ]  # fmt: skip

    raised_count = sum(1 for kind in scanned.values() if kind == "conflict.raised")
    assert raised_count == 1


# -- in virtual time -------------------------------------------------------------------


class Scene(scene.Scene):
    def __init__(self, node: RelayNode) -> None:
        super().__init__(node, NS)

    async def decide(self, who: Identity, entity: str, text: str, **more: Any) -> dict[str, Any]:
        kind, body = await self.ask(
            who, "decision.add", {"title": "t", "decision": text, "entity": entity, **more}
        )
        assert kind == "decision.added", body
        return body

    def relay_events(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        return [
            (r.kind, decode(r.event)["body"])
            for r in self.node.store.scan(NS)
            if r.kind.startswith(prefix) and r.author == RELAY.public_key
        ]

    def replayed_matches(self) -> bool:
        replayed = Host(RELAY.public_key)
        unanswered = replayed.rebuild(self.node.store.scan(NS))
        live = self.node.coordination.coordinators[NS]
        again = replayed.coordinators[NS]
        return (
            not unanswered and again.decisions == live.decisions and again.records == live.records
        )


@pytest.fixture
async def scene(nursery: trio.Nursery) -> Scene:
    node = RelayNode(RELAY, MemoryStore(), RelayConfig(), wall_ms=virtual_wall())
    await nursery.start(node.run)
    return Scene(node)


async def policy(scene: Scene, **body: Any) -> None:
    kind, answer = await scene.ask(OWNER, "decision.policy", body)
    assert kind == "decision.policy_set", answer


async def test_the_agents_settle_by_agreement_or_by_a_concession(
    scene: Scene, autojump_clock: trio.testing.MockClock
) -> None:
    await policy(scene, conflicts=ladder(step_ms=60_000))
    a = await scene.decide(ALICE, "route-9", "by sea")
    b = await scene.decide(BOB, "route-9", "by air")
    await trio.testing.wait_all_tasks_blocked()
    kind, proposed = await scene.ask(
        ALICE, "conflict.resolve", {"conflict": "cf-1", "keep": a["id"]}
    )
    assert kind == "conflict.proposed" and "by" not in proposed  # one's own: a proposal
    kind, agreed = await scene.ask(BOB, "conflict.resolve", {"conflict": "cf-1", "keep": a["id"]})
    assert (kind, agreed["by"], agreed["keep"]) == ("conflict.resolved", "agents", a["id"])

    c = await scene.decide(CAROL, "route-9", "by rail")  # a new conflict with the kept one
    assert c["conflict"] == "cf-2"
    await trio.testing.wait_all_tasks_blocked()
    kind, conceded = await scene.ask(
        CAROL, "conflict.resolve", {"conflict": "cf-2", "keep": a["id"]}
    )
    assert (kind, conceded["by"]) == ("conflict.resolved", "agents")
    statuses = [d["status"] for d in (await scene.node.query(NS, "decision.list", {}))["decisions"]]
    assert statuses == ["accepted", "overruled", "overruled"]
    await trio.sleep(120)  # settled conflicts never escalate
    assert [body["step"] for _, body in scene.relay_events("conflict.escalated")] == ["agents"] * 2
    assert b["conflict"] == "cf-1" and scene.replayed_matches()


async def test_the_arbiter_rung_and_who_may_resolve_when(
    scene: Scene, autojump_clock: trio.testing.MockClock
) -> None:
    await policy(scene, conflicts=ladder(arbiter="arbiter", step_ms=10_000))
    await scene.ask(ARBITER, "dir.join", {"name": "judge", "role": "arbiter"})
    a = await scene.decide(ALICE, "acct-1", "credit 500")
    await scene.decide(BOB, "acct-1", "credit 0")
    await trio.sleep(1)
    early = {"conflict": "cf-1", "keep": a["id"]}
    kind, refusal = await scene.ask(ARBITER, "conflict.resolve", early)
    assert (kind, refusal["problem"]) == ("conflict.rejected", "not_resolver")
    await trio.sleep(10)  # the agents' time is up
    escalated = scene.relay_events("conflict.escalated")
    assert [(b["step"], b["to"]) for _, b in escalated] == [
        ("agents", [ALICE.public_key, BOB.public_key]),
        ("arbiter", [ARBITER.public_key]),
    ]
    assert escalated[1][1]["at_ms"] == escalated[0][1]["until_ms"]
    kind, resolved = await scene.ask(ARBITER, "conflict.resolve", early)
    assert (kind, resolved["by"]) == ("conflict.resolved", "arbiter")
    await trio.sleep(60)
    assert len(scene.relay_events("conflict.escalated")) == 2  # never reached a human
    assert scene.replayed_matches()


@pytest.mark.parametrize("rule", ["first", "last"])
async def test_an_automatic_rule_settles_at_once(
    scene: Scene, autojump_clock: trio.testing.MockClock, rule: str
) -> None:
    await policy(scene, conflicts=ladder(rule=rule))
    a = await scene.decide(ALICE, "sku-2", "stock 5")
    b = await scene.decide(BOB, "sku-2", "stock 7")
    await trio.testing.wait_all_tasks_blocked()
    [(_, resolved)] = scene.relay_events("conflict.resolved")
    assert resolved["by"] == "rule" and resolved["keep"] == (a if rule == "first" else b)["id"]
    assert scene.relay_events("conflict.escalated") == []
    assert scene.replayed_matches()


@pytest.mark.parametrize("rule", ["first", "last"])
async def test_the_rule_keeps_a_decision_still_accepted(
    scene: Scene, autojump_clock: trio.testing.MockClock, rule: str
) -> None:
    """Between the conflict and its rule step (one batch), the decision the rule would
    keep was superseded: keeping it would overrule every live one."""
    await policy(scene, conflicts=ladder(rule=rule))
    a = await scene.decide(ALICE, "sku-2", "stock 5")
    body = {"title": "t", "entity": "sku-2"}
    rival = scene.signed(BOB, "decision.add", {**body, "decision": "stock 7"})
    change = {**body, "decision": "stock 6", "supersedes": a["id"]}
    if rule == "last":  # the last one superseded, by one about another entity
        change = {"title": "t", "decision": "stock 6", "supersedes": "adr-2"}
        tickets = [await scene.node.admit(rival)]
        tickets.append(await scene.node.admit(scene.signed(BOB, "decision.add", change)))
    else:
        tickets = [await scene.node.admit(rival)]
        tickets.append(await scene.node.admit(scene.signed(ALICE, "decision.add", change)))
    for ticket in tickets:
        await scene.node.answer(ticket)
    await trio.testing.wait_all_tasks_blocked()
    listed = (await scene.node.query(NS, "decision.list", {"entity": "sku-2"}))["decisions"]
    statuses = {d["id"]: d["status"] for d in listed}
    assert "accepted" in statuses.values(), statuses
    for _, resolved in scene.relay_events("conflict.resolved"):
        assert statuses[resolved["keep"]] == "accepted", (resolved, statuses)
    assert scene.replayed_matches()


async def test_a_rule_with_no_decision_still_accepted_passes_to_the_agents(
    scene: Scene, autojump_clock: trio.testing.MockClock
) -> None:
    await policy(scene, conflicts=ladder(rule="first"))
    await scene.decide(ALICE, "sku-2", "stock 5")
    admit = scene.node.admit
    rival = {"title": "t", "entity": "sku-2", "decision": "stock 7"}
    tickets = [await admit(scene.signed(BOB, "decision.add", rival))]
    for who, old in ((ALICE, "adr-1"), (BOB, "adr-2")):  # both withdrawn, elsewhere
        change = {"title": "t", "decision": "none", "supersedes": old}
        tickets.append(await admit(scene.signed(who, "decision.add", change)))
    for ticket in tickets:
        await scene.node.answer(ticket)
    await trio.testing.wait_all_tasks_blocked()
    assert scene.relay_events("conflict.resolved") == []
    [(_, escalated)] = scene.relay_events("conflict.escalated")
    assert escalated["step"] == "agents" and "still accepted" in escalated["note"]
    assert scene.replayed_matches()


async def test_what_is_not_a_conflict(scene: Scene, autojump_clock: trio.testing.MockClock) -> None:
    await policy(scene, conflicts=ladder(window_ms=5_000))
    await scene.decide(ALICE, "e1", "x")
    assert "conflict" not in await scene.decide(ALICE, "e1", "y")  # the same author
    await scene.decide(ALICE, "e2", "x")
    assert "conflict" not in await scene.decide(BOB, "e2", "x")  # the same decision
    a = await scene.decide(ALICE, "e3", "x")
    assert "conflict" not in await scene.decide(ALICE, "e3", "z", supersedes=a["id"])
    await scene.decide(ALICE, "e4", "x")
    await trio.sleep(6)  # outside the window
    assert "conflict" not in await scene.decide(CAROL, "e4", "w")
    assert "conflict" not in await scene.decide(BOB, "e5", "w")  # another entity
    assert "conflict" in await scene.decide(ALICE, "e4", "v")  # within Carol's window
    await trio.testing.wait_all_tasks_blocked()
    assert len(scene.relay_events("conflict.raised")) == 1


async def test_routes_now_and_in_a_digest(
    scene: Scene, autojump_clock: trio.testing.MockClock
) -> None:
    routes = [
        route(["decision.added"], "ops"),
        route(["app.price"], "finance", "digest"),
        route(["app.recall"], "nobody"),
    ]
    await policy(scene, routes=routes, digest_ms=5_000)
    await scene.ask(OPS, "dir.join", {"name": "ops", "role": "ops"})
    await scene.ask(CAROL, "dir.join", {"name": "cfo", "role": "finance"})
    await scene.decide(ALICE, "e", "x")
    for price in (10, 11, 12):
        await scene.ask(ALICE, "app.price", {"entity": "sku-1", "price": price})
        await trio.sleep(1)
    await scene.ask(ALICE, "app.recall", {"lot": 7})
    await trio.testing.wait_all_tasks_blocked()
    notices = scene.relay_events("route.notice")
    assert [(b["kind"], b["role"], b["to"]) for _, b in notices] == [
        ("decision.added", "ops", [OPS.public_key]),
        ("app.recall", "nobody", []),  # nobody held the role: on the record, not lost
    ]
    assert scene.relay_events("route.digest") == []  # not yet: a digest waits
    await trio.sleep(5)
    [(_, digest)] = scene.relay_events("route.digest")
    assert digest["role"] == "finance" and digest["to"] == [CAROL.public_key]
    assert [e["entity"] for e in digest["events"]] == ["sku-1"] * 3
    assert (await scene.node.query(NS, "decision.policy", {}))["waiting"] == 0
    assert scene.replayed_matches()


async def test_a_restart_finishes_what_the_timer_had_not_written(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store, wall = MemoryStore(), virtual_wall()
    async with trio.open_nursery() as first_life:
        node = RelayNode(RELAY, store, RelayConfig(), wall_ms=wall)
        await first_life.start(node.run)
        scene = Scene(node)
        await policy(scene, routes=[route(["app.price"], "finance", "digest")], digest_ms=60_000,
                     conflicts=ladder())  # fmt: skip
        await scene.decide(ALICE, "e", "x")
        await scene.decide(BOB, "e", "y")
        await scene.ask(ALICE, "app.price", {"price": 1})
        await trio.testing.wait_all_tasks_blocked()
        await node.settle()
        first_life.cancel_scope.cancel()
    again = RelayNode(RELAY, store, RelayConfig(), wall_ms=wall)
    await nursery.start(again.run)
    await trio.sleep(61)
    scene = Scene(again)
    steps = [b.get("step") for _, b in scene.relay_events("conflict.")]
    assert steps == [None, "agents", "human"]  # raised once, not again after the restart
    assert len(scene.relay_events("route.digest")) == 1
    assert scene.replayed_matches()


async def test_bad_policies_and_resolutions_are_refused(
    scene: Scene, autojump_clock: trio.testing.MockClock
) -> None:
    await policy(scene, routes=[route(["decision.added"], "ops")], conflicts=ladder())
    before = await scene.node.query(NS, "decision.policy", {})
    for body in (
        {"routes": "ops"},
        {"routes": [{"kinds": [], "role": "ops"}]},
        {"routes": [{"kinds": ["route.notice"], "role": "ops"}]},
        {"routes": [{"kinds": ["doc.update"], "role": "ops"}]},
        {"routes": [{"kinds": ["Not A Kind"], "role": "ops"}]},
        {"routes": [{"kinds": ["a.b"], "role": ""}]},
        {"routes": [{"kinds": ["a.b"], "role": "x", "latency": "soon"}]},
        {"routes": [route(["a.b"], "x")] * 33},
        {"digest_ms": 10},
        {"conflicts": {"rule": "none"}},  # nobody at the top of the ladder
        {"conflicts": ladder(rule="loudest")},
        {"conflicts": ladder(step_ms=0)},
        {"conflicts": ladder(approvers=[b"short"])},
        {"conflicts": []},
        {"extra": 1},
    ):
        kind, refusal = await scene.ask(OWNER, "decision.policy", body)
        assert (kind, refusal["problem"]) == ("decision.rejected", "bad_request"), body
    assert await scene.node.query(NS, "decision.policy", {}) == before  # untouched

    a = await scene.decide(ALICE, "e", "x")
    b = await scene.decide(BOB, "e", "y")
    for body, problem in (
        ({"conflict": "cf-9", "keep": a["id"]}, "not_found"),
        ({"conflict": "cf-1", "keep": "adr-99"}, "not_found"),
        ({"conflict": "cf-1"}, "bad_request"),
        ({"conflict": "cf-1", "keep": a["id"], "why": 1}, "bad_request"),
    ):
        kind, refusal = await scene.ask(ALICE, "conflict.resolve", body)
        assert (kind, refusal["problem"]) == ("conflict.rejected", problem), body
    kind, refusal = await scene.ask(
        CAROL, "conflict.resolve", {"conflict": "cf-1", "keep": a["id"]}
    )
    assert refusal["problem"] == "not_resolver"
    overturn = {"title": "t", "decision": "z", "entity": "e", "supersedes": a["id"]}
    kind, refusal = await scene.ask(BOB, "decision.add", overturn)  # only through the ladder
    assert refusal["problem"] == "not_author"
    kind, refusal = await scene.ask(
        ALICE, "decision.add", {"title": "t", "decision": "d", "entity": ""}
    )
    assert refusal["problem"] == "bad_request"
    shown = await scene.node.query(NS, "conflict.show", {"conflict": "cf-1"})
    assert shown["status"] == "open" and shown["proposals"] == []
    assert [r["id"] for r in shown["records"]] == [a["id"], b["id"]]


async def test_only_the_owner_sets_the_policy(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, OWNER) as owner,
        RelayClient.connect(relay.url, ALICE) as alice,
    ):
        await Decisions(owner, NS).set_policy([route(["decision.added"], "ops")])
        head = relay.node.head(NS)
        error = await refused(ErrorCode.FORBIDDEN, Decisions(alice, NS).set_policy([]))
        assert "owner" in error.reason and relay.node.head(NS) == head
        assert len((await Decisions(alice, NS).policy())["routes"]) == 1
        handover = {"mode": "public", "owner": ALICE.public_key}
        await owner.publish(NS, "ns.policy", handover)  # hands the namespace over
        await Decisions(alice, NS).set_policy([])
        await refused(ErrorCode.FORBIDDEN, Decisions(owner, NS).set_policy([]))
        await Decisions(alice, "fresh@local").set_policy([])  # a first event: its creator owns
        await refused(ErrorCode.FORBIDDEN, Decisions(owner, "fresh@local").set_policy([]))


async def test_routes_to_one_role_merge_and_the_fastest_latency_wins(
    scene: Scene, autojump_clock: trio.testing.MockClock
) -> None:
    routes = [
        route(["app.x", "app.y"], "fin"),
        route(["app.x"], "fin", "digest"),  # app.x twice to fin: one notice, at once
        route(["app.z"], "fin", "digest"),
    ]
    await policy(scene, routes=routes, digest_ms=3_600_000)
    await scene.ask(CAROL, "dir.join", {"name": "cfo", "role": "fin"})
    await scene.ask(ALICE, "app.x", {})
    await scene.ask(ALICE, "app.y", {})
    await trio.testing.wait_all_tasks_blocked()
    assert [b["kind"] for _, b in scene.relay_events("route.notice")] == ["app.x", "app.y"]
    for n in range(256):  # a full digest goes at once, long before digest_ms
        await scene.ask(ALICE, "app.z", {"n": n})
    await trio.testing.wait_all_tasks_blocked()
    [(_, digest)] = scene.relay_events("route.digest")
    assert len(digest["events"]) == 256 and digest["to"] == [CAROL.public_key]
    assert scene.replayed_matches()


async def test_an_open_conflict_keeps_the_ladder_it_was_raised_under(
    scene: Scene, autojump_clock: trio.testing.MockClock
) -> None:
    await policy(scene, conflicts=ladder(step_ms=5_000))
    a = await scene.decide(ALICE, "e", "x")
    await scene.decide(BOB, "e", "y")
    await policy(scene)  # no ladder any more: new decisions raise nothing...
    assert "conflict" not in await scene.decide(ALICE, "f", "x")
    assert "conflict" not in await scene.decide(BOB, "f", "y")
    c = await scene.decide(CAROL, "e", "z")  # ...but the open one still gathers its entity
    assert c["conflict"] == "cf-1"
    await trio.sleep(11)
    steps = [b["step"] for _, b in scene.relay_events("conflict.escalated")]
    assert steps == ["agents", "human"]  # the old rungs, the old approver
    keep = {"conflict": "cf-1", "keep": a["id"]}
    kind, resolved = await scene.ask(HUMAN, "conflict.resolve", keep)
    assert (kind, resolved["by"]) == ("conflict.resolved", "human")
    assert scene.replayed_matches()


async def test_three_agents_settle_only_when_all_agree_and_superseded_is_not_kept(
    scene: Scene, autojump_clock: trio.testing.MockClock
) -> None:
    await policy(scene, conflicts=ladder(step_ms=60_000))
    a = await scene.decide(ALICE, "e", "x")
    b = await scene.decide(BOB, "e", "y")
    c = await scene.decide(CAROL, "e", "z")  # joins cf-1
    b2 = await scene.decide(BOB, "e", "y2", supersedes=b["id"])  # Bob changes his mind
    assert c["conflict"] == b2["conflict"] == "cf-1"

    async def resolve(who: Identity, keep: str) -> tuple[str, dict[str, Any]]:
        return await scene.ask(who, "conflict.resolve", {"conflict": "cf-1", "keep": keep})

    kind, refusal = await resolve(ALICE, b["id"])
    assert (kind, refusal["problem"]) == ("conflict.rejected", "superseded")
    assert (await resolve(ALICE, c["id"]))[0] == "conflict.proposed"  # Bob still wants b2
    assert (await resolve(BOB, c["id"]))[0] == "conflict.resolved"  # all three want c
    listed = (await scene.node.query(NS, "decision.list", {}))["decisions"]
    assert {d["id"]: d["status"] for d in listed} == {
        a["id"]: "overruled", b["id"]: "superseded", c["id"]: "accepted", b2["id"]: "overruled",
    }  # fmt: skip


async def test_an_approver_role_and_an_arbiter_at_the_human_step(
    scene: Scene, autojump_clock: trio.testing.MockClock
) -> None:
    await policy(scene, conflicts=ladder(approvers=[], approver_role="manager", arbiter="judge"))
    await scene.ask(HUMAN, "dir.join", {"name": "boss", "role": "manager"})
    for entity, resolver, by in (("e", HUMAN, "human"), ("f", ARBITER, "arbiter")):
        a = await scene.decide(ALICE, entity, "x")
        b = await scene.decide(BOB, entity, "y")
        await trio.sleep(3)  # past the agents' step: no arbiter yet, so straight to a human
        if entity == "f":
            await scene.ask(ARBITER, "dir.join", {"name": "judge", "role": "judge"})
        keep = {"conflict": b["conflict"], "keep": a["id"]}
        kind, resolved = await scene.ask(resolver, "conflict.resolve", keep)
        assert (kind, resolved["by"]) == ("conflict.resolved", by)
    humans = [b["to"] for _, b in scene.relay_events("conflict.escalated") if b["step"] == "human"]
    assert humans == [[HUMAN.public_key]] * 2


async def test_a_restart_between_raised_and_its_rule_step_runs_the_rule_again(
    scene: Scene, autojump_clock: trio.testing.MockClock
) -> None:
    await policy(scene, conflicts=ladder())
    await scene.decide(ALICE, "e", "x")
    await scene.decide(BOB, "e", "y")
    await trio.testing.wait_all_tasks_blocked()
    records = list(scene.node.store.scan(NS))
    cut = next(n for n, r in enumerate(records) if r.kind == "conflict.raised") + 1
    replayed = Host(RELAY.public_key)  # the log as a crash between two commits left it
    assert replayed.rebuild(records[:cut]) == []
    later = records[cut - 1].hlc >> 16
    due = replayed.due(later + 1)
    assert [(o.kind, o.body["step"]) for _, o in due] == [("conflict.escalated", "agents")]
    assert replayed.due(later + 500) == []  # once


async def test_a_conflict_holds_at_most_64_decisions(
    scene: Scene, autojump_clock: trio.testing.MockClock
) -> None:
    await policy(scene, conflicts=ladder())
    for n in range(64):
        await scene.decide(identity(100 + n % 2), "e", f"plan {n}")
    body = {"title": "t", "decision": "d", "entity": "e"}
    kind, refusal = await scene.ask(ALICE, "decision.add", body)
    assert (kind, refusal["problem"]) == ("decision.rejected", "crowded")
    shown = await scene.node.query(NS, "conflict.show", {"conflict": "cf-1"})
    assert len(shown["decisions"]) == 64 and not shown["more"]


async def test_the_decisions_on_an_entity_come_in_every_page(relay: RunningRelay) -> None:
    """``Decisions.on`` asked once and ignored ``more``: past the first page of 100,
    the entity's latest (accepted) decision was missing."""
    async with RelayClient.connect(relay.url, ALICE) as alice:
        decisions = Decisions(alice, NS)
        ids = [(await decisions.decide("sku-9", "price", f"{n} EUR"))["id"] for n in range(150)]
        on = await decisions.on("sku-9")
    assert [d["id"] for d in on] == ids
