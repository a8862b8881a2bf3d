"""``shared_doc``: many agents co-edit shared documents; how fast do they converge?

Each agent opens one of ``docs`` documents (agent ``n`` edits ``doc-(n mod docs)``)
and makes ``orders`` edits — the backlog size doubles as the edit count — spaced by
the policy's task time: it appends an entry to the document's log array, sets a key
of its map and inserts into its text. With ``--crash-rate p`` an edit's agent dies
with chance ``p`` before the edit: its connection (and its replica) is gone, and it
comes back ``restart_ms`` later with a fresh replica that syncs from the relay by
state vector before it edits on. When every agent is through, the run measures how
long until every open replica has applied everything the relay holds and all of
them hold the same state. What the relay holds is read as an agent would read it,
in virtual time and in real mode alike: an observer then opens a fresh replica of
each document, and every replica must reach its log position and its state (the
time includes that fresh replica's round trip to sync).
"""

from __future__ import annotations

import trio

from agent_sdk.client import RelayClient
from agent_sdk.docs import SharedDoc, state_vector
from simulations.model import AgentStates, Policy, Settings, Summary
from simulations.scenarios.common import RELAY, relay_config
from simulations.world import World, identity_of

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
        self.states = AgentStates()  # working: edits left; idle: through; down: crashed

    def through(self) -> None:
        self.working -= 1
        if self.working == 0:
            self.all_edited.set()


async def run(world: World, settings: Settings) -> Summary:
    summary = Summary(settings.scenario, settings.agents, settings.orders, settings.seed)
    docs = max(1, settings.agents // 10)
    room = Room(settings.agents)
    async with trio.open_nursery() as nursery:
        relay = await world.start_relay(nursery, relay_config(settings))
        # Connected before the clock starts: convergence time holds no handshake of ours.
        observer = identity_of(settings.seed, "observer", 0)
        async with world.client(RELAY, observer, "observer") as watcher:
            began = trio.current_time()
            world.meter.start(settings.agents * settings.orders, "edits")
            converged_at = None
            with trio.move_on_after(settings.duration_s):
                async with trio.open_nursery() as agents:
                    for n in range(settings.agents):
                        policy = settings.policy_of(n)
                        agents.start_soon(agent, world, settings, policy, n, docs, room)
                    await room.all_edited.wait()
                    edited_at = trio.current_time()
                    await converge(watcher, room, docs)
                    converged_at = trio.current_time()
                    room.release.set()
            summary.virtual_seconds = round(trio.current_time() - began, 3)
        nursery.cancel_scope.cancel()
    summary.crashes = room.crashes
    summary.states = room.states.samples
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


async def converge(watcher: RelayClient, room: Room, docs: int) -> None:
    """Wait until every open replica has applied its document's log up to the relay's
    head and holds exactly the relay's state (all documents at once)."""
    async with trio.open_nursery() as nursery:
        for i in range(docs):
            replicas = [shared for shared in room.replicas.values() if shared.name == doc(i)]
            nursery.start_soon(converge_doc, watcher, doc(i), replicas)


async def converge_doc(watcher: RelayClient, name: str, replicas: list[SharedDoc]) -> None:
    """:func:`converge` for one document: a fresh replica synced from the relay after
    every edit is in the log holds the relay's head, and the state to agree on."""
    for shared in replicas:
        await shared.flush()
    async with watcher.doc(NS, name, create=False) as fresh:
        for shared in replicas:
            await shared.wait_seq(fresh.seq)
            mine = state_vector(shared.doc.get_state())
            theirs = state_vector(fresh.doc.get_state())
            assert mine == theirs, f"{name}: a replica differs from the relay"


def doc(i: int) -> str:
    return f"doc-{i}"


async def agent(
    world: World,
    settings: Settings,
    policy: Policy,
    n: int,
    docs: int,
    room: Room,
) -> None:
    rng = world.rng(f"agent/{n}")
    identity = identity_of(settings.seed, "agent", n)
    name = doc(n % docs)
    left = settings.orders
    life = 0
    while True:
        life += 1
        crashed = False
        room.states.set(n, "working" if left else "idle", world.now_ms())
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
                world.meter.advance()
            if not crashed:
                room.states.set(n, "idle", world.now_ms())
                room.through()
                await room.release.wait()  # stay open: convergence is measured on us
            del room.replicas[n]
            if crashed:
                room.states.set(n, "down", world.now_ms())
                room.crashes += 1
        if not crashed:
            return
        await trio.sleep(settings.restart_ms / 1000)
