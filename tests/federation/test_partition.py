"""Partitions between relays heal without losing or duplicating anything.

Two relay processes, ``a`` and ``b``, link through forwarders the test can cut, so a
partition leaves both relays up and their agents writing: to their own relay's
namespace (sequenced at once) and to the other's (stored in the outbox, answered
``queued``). After the heal every acknowledged event is in its home's log exactly
once, the outbox delivered each agent's writes in the order they were sent, the
mirrors hold the homes' logs byte for byte, and ``formicary log verify`` passes on
both data directories with the peers' keys pinned.

A second test kills the relay that holds the outbox with SIGKILL while the home is
down, after the agent that wrote has gone: the promise of ``queued`` survives the
restart, and the writes reach their home with nobody sending them again.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio

from agent_sdk.client import Delivery, Live, PendingPublish, Published, RelayClient
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.identity import Identity
from agent_sdk.wire import Event, sign_event
from federation.outbox import SQLiteOutboxStore
from relay.app import OUTBOX_FILE
from tests.conftest import identity
from tests.federation.cluster import Cluster, cluster
from tests.processes import PHASE_TIMEOUT, cli

ROUND = 20  # events per writer per namespace per phase
TIMEOUT = 90


def note(who: Identity, ns: str, n: int) -> Event:
    return Event(ns=ns, kind="app.note", author=who.public_key, body={"n": n}, deps=(), ts=now())


def now() -> int:
    import time

    return time.time_ns() // 1_000_000


class Writer:
    """An agent that pipelines publishes (so that many wait in an outbox at once) and
    books what came back."""

    def __init__(self, client: RelayClient) -> None:
        self.client = client
        self.sent: dict[str, list[PendingPublish]] = {}
        self.queued = 0
        self._queued_changed = trio.Event()

    def send(self, ns: str, count: int) -> None:
        for _ in range(count):
            n = len(self.sent.setdefault(ns, []))
            signed = sign_event(note(self.client.identity, ns, n), self.client.identity.sign)
            self.sent[ns].append(self.client.publish_later(signed, on_queued=self._on_queued))

    def _on_queued(self) -> None:
        self.queued += 1
        self._queued_changed.set()
        self._queued_changed = trio.Event()

    async def wait_queued(self, count: int) -> None:
        while self.queued < count:
            await self._queued_changed.wait()

    async def results(self, ns: str) -> list[Published]:
        return [await pending.wait() for pending in self.sent[ns]]


async def read_log(client: RelayClient, ns: str) -> list[Delivery]:
    items = []
    async with client.subscribe(ns, start=1) as feed:
        async for item in feed:
            if isinstance(item, Live):
                return items
            assert isinstance(item, Delivery)
            items.append(item)
    raise AssertionError("subscription ended")


async def verify(net: Cluster, name: str) -> list[dict[str, object]]:
    pins = [
        arg
        for peer in net.members.values()
        for arg in ("--home-key", f"{peer.name}={peer.key.hex()}")
    ]
    command = cli("log", "verify", "all", "--data", str(net[name].data), *pins)
    with trio.fail_after(PHASE_TIMEOUT):
        done = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False
        )
    verdicts = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 0, (verdicts, done.stderr)
    return verdicts


async def test_writes_on_both_sides_of_a_partition_arrive_once_and_in_order(
    tmp_path: Path,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(tmp_path, ("a", "b"), cuttable=[("a", "b"), ("b", "a")]) as net:
            async with (
                RelayClient.connect(net["a"].url, identity(1)) as on_a,
                RelayClient.connect(net["b"].url, identity(2)) as on_b,
            ):
                writers = {"a": Writer(on_a), "b": Writer(on_b)}
                # Mirrors follow the foreign namespaces from the start.
                async with on_a.subscribe("x@b", start=1), on_b.subscribe("y@a", start=1):
                    for writer in writers.values():
                        writer.send("x@b", ROUND)
                        writer.send("y@a", ROUND)
                    for writer in writers.values():  # linked: everything is answered
                        await writer.results("x@b")
                        await writer.results("y@a")

                    net.partition("a", "b")
                    writers["a"].send("x@b", ROUND)  # foreign for a: queued
                    writers["a"].send("y@a", ROUND)  # local for a: sequenced
                    writers["b"].send("y@a", ROUND)  # foreign for b: queued
                    writers["b"].send("x@b", ROUND)  # local for b: sequenced
                    await writers["a"].wait_queued(ROUND)
                    await writers["b"].wait_queued(ROUND)
                    local_a = await writers["a"].results("y@a")
                    local_b = await writers["b"].results("x@b")
                    assert len(local_a) == len(local_b) == 2 * ROUND
                    net.heal("a", "b")
                    for writer in writers.values():
                        for ns in ("x@b", "y@a"):
                            results = await writer.results(ns)
                            seqs = [published.receipt.seq for published in results]
                            assert seqs == sorted(seqs)  # delivered in the order sent
                            assert len(set(seqs)) == len(seqs) == 2 * ROUND

                # Each home holds every acknowledged event once; the mirror on the
                # other relay holds the same log byte for byte.
                for ns, home, away in (("x@b", on_b, on_a), ("y@a", on_a, on_b)):
                    at_home = await read_log(home, ns)
                    acked = {
                        published.receipt.id
                        for writer in writers.values()
                        for published in await writer.results(ns)
                    }
                    ids = [item.receipt.id for item in at_home]
                    assert len(ids) == len(set(ids)) == len(acked) == 4 * ROUND
                    assert set(ids) == acked
                    mirrored = await read_log(away, ns)
                    assert [i.receipt.raw for i in mirrored] == [i.receipt.raw for i in at_home]
                    assert [i.seal for i in mirrored] == [i.seal for i in at_home]
            for name in ("a", "b"):
                verdicts = await verify(net, name)
                assert {(v["ns"], v["mirror"]) for v in verdicts} == {
                    ("x@b", name == "a"),
                    ("y@a", name == "b"),
                }


async def test_a_queued_write_survives_sigkill_of_the_relay_holding_it(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(tmp_path, ("a", "b")) as net:
            await net.kill("b")
            async with RelayClient.connect(net["a"].url, identity(3)) as agent:
                writer = Writer(agent)
                writer.send("x@b", ROUND)
                await writer.wait_queued(ROUND)  # promised: in a's outbox on disk
            # The agent is gone, its publishes unanswered: it sends nothing again, and
            # the promise is a's alone to keep.
            assert agent.stopped.is_set()
            sent = [pending.event.id for pending in writer.sent["x@b"]]
            await net.kill("a")  # SIGKILL, b still down
            outbox = SQLiteOutboxStore(net["a"].data / OUTBOX_FILE)
            try:
                rows = outbox.load()
            finally:
                outbox.close()
            assert len(rows) == ROUND  # on disk, as promised
            await net.start("a")
            await net.start("b")
            async with RelayClient.connect(net["b"].url, identity(4)) as reader:
                at_home = await read_events(reader, "x@b", ROUND)
            # Each once, in the order sent.
            assert [item.receipt.id for item in at_home] == sent
            assert [item.receipt.seq for item in at_home] == list(range(1, ROUND + 1))


async def read_events(client: RelayClient, ns: str, count: int) -> list[Delivery]:
    """The first ``count`` events of ``ns``, waiting for those not there yet."""
    items = []
    async with client.subscribe(ns, start=1) as feed:
        async for item in feed:
            if isinstance(item, Delivery):
                items.append(item)
                if len(items) == count:
                    return items
    raise AssertionError("subscription ended")


async def test_a_write_stuck_past_the_outbox_deadline_fails_clearly(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(tmp_path, ("a", "b"), args=("--outbox-deadline", "1s")) as net:
            await net.kill("b")
            async with RelayClient.connect(net["a"].url, identity(5)) as agent:
                queued = trio.Event()
                try:
                    await agent.publish("x@b", "app.note", {"n": 1}, on_queued=queued.set)
                except ProtocolError as exc:
                    assert exc.code is ErrorCode.HOME_UNREACHABLE
                else:
                    raise AssertionError("a write to an unreachable home was acknowledged")
                assert queued.is_set()
