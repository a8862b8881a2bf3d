"""``shared_doc``: many agents co-edit shared documents; how fast do they converge?

Each agent opens one of ``docs`` documents (agent ``n`` edits ``doc-(n mod docs)``)
and makes ``orders`` edits — the backlog size doubles as the edit count — spaced by
the policy's task time: it appends an entry to the document's log array, sets a key
of its map and inserts into its text. With ``--crash-rate p`` an edit's agent dies
with chance ``p`` before the edit: its connection (and its replica) is gone, and it
comes back ``restart_ms`` later with a fresh replica that syncs from the relay by
state vector before it edits on. When every agent is through, the run measures how
long, in virtual time, until every open replica has applied everything the relay
holds and all of them hold the same state.
"""

from __future__ import annotations

from collections.abc import Mapping

import trio

from agent_sdk.docs import SharedDoc, state_vector
from relay.documents import LiveDoc
from simulations.model import Policy, Settings, Summary
from simulations.scenarios.common import RELAY, relay_config
from simulations.world import VirtualWorld, World, identity_of

NS = "docs@sim"


class Room:
    """The replicas open now, and how the edits went."""

    def __init__(self, agents: int) -> None:
        self.replicas: dict[int, SharedDoc] = {}
        self.working = agents
        self.all_edited = trio.Event()
        self.crashes = 0
        self.edits = 0
        self.release = trio.Event()  # set once convergence is measured: agents leave

    def through(self) -> None:
        self.working -= 1
        if self.working == 0:
            self.all_edited.set()


async def run(world: World, settings: Settings) -> Summary:
    assert isinstance(world, VirtualWorld), "virtual time only (settings are checked before)"
    summary = Summary(settings.scenario, settings.agents, settings.orders, settings.seed)
    docs = max(1, settings.agents // 10)
    room = Room(settings.agents)
    async with trio.open_nursery() as nursery:
        relay = await world.start_relay(nursery, relay_config(settings))
        began = trio.current_time()
        converged_at = None
        with trio.move_on_after(settings.duration_s):
            async with trio.open_nursery() as agents:
                for n in range(settings.agents):
                    agents.start_soon(agent, world, settings, settings.policy_of(n), n, docs, room)
                await room.all_edited.wait()
                edited_at = trio.current_time()
                await converge(relay.node.docs.live, room)
                converged_at = trio.current_time()
                room.release.set()
        summary.virtual_seconds = round(trio.current_time() - began, 3)
        nursery.cancel_scope.cancel()
    summary.crashes = room.crashes
    summary.done = room.edits
    summary.zombies = settings.agents * settings.orders - room.edits
    summary.events = sum(1 for _ in relay.store.scan(NS))
    summary.extra = {
        "docs": docs,
        "converged": converged_at is not None,
        "convergence_ms": None
        if converged_at is None
        else round((converged_at - edited_at) * 1000, 1),
    }
    return summary


async def converge(live: Mapping[tuple[str, str], LiveDoc], room: Room) -> None:
    """Wait until every open replica has applied its document's log up to the relay's
    head and holds exactly the relay's state."""
    for shared in list(room.replicas.values()):
        await shared.flush()
    for shared in list(room.replicas.values()):
        relay_doc = live[(NS, shared.name)]
        await shared.wait_seq(relay_doc.seq)
        mine = state_vector(shared.doc.get_state())
        theirs = state_vector(relay_doc.doc.get_state())
        assert mine == theirs, f"{shared.name}: a replica differs from the relay"


async def agent(
    world: VirtualWorld,
    settings: Settings,
    policy: Policy,
    n: int,
    docs: int,
    room: Room,
) -> None:
    rng = world.rng(f"agent/{n}")
    identity = identity_of(settings.seed, "agent", n)
    name = f"doc-{n % docs}"
    left = settings.orders
    life = 0
    while True:
        life += 1
        crashed = False
        async with (
            world.client(RELAY, identity, f"agent/{n}/{life}") as client,
            client.doc(NS, name) as shared,
        ):
            room.replicas[n] = shared
            while left:
                await trio.sleep(policy.task_ms(rng) / 1000)
                if policy.crashes(rng):
                    crashed = True
                    break
                left -= 1
                shared.array().append(f"{n}:{left}")
                shared.map()[f"k{rng.randrange(8)}"] = n
                text = shared.text()
                text.insert(rng.randint(0, len(text)), f"<{n}>")
                room.edits += 1
            if not crashed:
                room.through()
                await room.release.wait()  # stay open: convergence is measured on us
            del room.replicas[n]
            if crashed:
                room.crashes += 1
        if not crashed:
            return
        await trio.sleep(settings.restart_ms / 1000)
