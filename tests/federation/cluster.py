"""Several relay processes on loopback that federate with each other.

Each relay gets a data directory with its key made up front, and a port picked up
front, so that every relay can be started with ``--peer`` entries naming the others
(name, URL and pinned key) before any of them runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from agent_sdk.client import RelayClient
from agent_sdk.identity import Identity, load_or_create
from relay.app import KEY_FILE
from simulations.ports import free_port
from tests.processes import RelayProcess


@dataclass
class Member:
    name: str
    data: Path
    port: int
    key: bytes
    peers: tuple[str, ...]
    process: RelayProcess | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def spec(self, url: str | None = None) -> str:
        return f"{self.name}={url or self.url}#{self.key.hex()}"


class Cluster:
    """Relays named ``names``, each peering with ``links[name]`` (default: all)."""

    def __init__(
        self,
        root: Path,
        names: Iterable[str],
        links: dict[str, tuple[str, ...]] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        names = list(names)
        self.args = args
        self.urls: dict[tuple[str, str], str] = {}  # (from, to) -> URL override (a proxy)
        self.proxies: dict[tuple[str, str], Cuttable] = {}
        self.members = {
            name: Member(
                name,
                root / name,
                free_port(),
                load_or_create(root / name / KEY_FILE).public_key,
                (links or {}).get(name, tuple(n for n in names if n != name)),
            )
            for name in names
        }

    def __getitem__(self, name: str) -> Member:
        return self.members[name]

    def peer_args(self, name: str) -> list[str]:
        args = []
        for peer in self.members[name].peers:
            url = self.urls.get((name, peer))
            args += ["--peer", self.members[peer].spec(url)]
        return args

    async def start(self, name: str, *extra: str) -> RelayProcess:
        member = self.members[name]
        process = RelayProcess(
            member.data, *self.peer_args(name), *self.args, *extra, name=name, port=member.port
        )
        await process.start()
        member.process = process
        return process

    def partition(self, x: str, y: str) -> None:
        """Cut the links between ``x`` and ``y`` both ways (both relays stay up)."""
        self.proxies[(x, y)].cut()
        self.proxies[(y, x)].cut()

    def heal(self, x: str, y: str) -> None:
        self.proxies[(x, y)].heal()
        self.proxies[(y, x)].heal()

    async def kill(self, name: str) -> None:
        process = self.members[name].process
        assert process is not None
        await process.kill_and_wait()


@asynccontextmanager
async def cluster(
    root: Path,
    names: Iterable[str],
    links: dict[str, tuple[str, ...]] | None = None,
    args: tuple[str, ...] = (),
    *,
    cuttable: Iterable[tuple[str, str]] = (),
) -> AsyncIterator[Cluster]:
    """Start every relay; kill them all on the way out. Links ``(from, to)`` listed in
    ``cuttable`` go through a :class:`Cuttable` forwarder: ``net.partition(x, y)``."""
    running = Cluster(root, names, links, args)
    try:
        async with trio.open_nursery() as nursery:
            for source, target in cuttable:
                proxy = Cuttable(running[target].port)
                await nursery.start(proxy.run)
                running.proxies[(source, target)] = proxy
                running.urls[(source, target)] = proxy.url
            async with trio.open_nursery() as starting:
                for name in running.members:
                    starting.start_soon(running.start, name)
            yield running
            nursery.cancel_scope.cancel()
    finally:
        for member in running.members.values():
            if member.process is not None:
                member.process.kill()
                with trio.CancelScope(shield=True):
                    assert member.process.process is not None
                    await member.process.process.wait()


@asynccontextmanager
async def clients(pairs: Iterable[tuple[str, Identity]]) -> AsyncIterator[list[RelayClient]]:
    """Connect one client per ``(url, identity)``."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(RelayClient.connect(u, i)) for u, i in pairs]


class Cuttable:
    """A TCP forwarder to ``port`` on loopback whose connections can be cut (a network
    partition: both relays stay up, the link between them does not) and healed."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cut_off = False
        self._scopes: set[trio.CancelScope] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, inbound: trio.SocketStream) -> None:
        async with inbound:
            if self.cut_off:
                return
            try:
                outbound = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            except OSError:
                return
            async with outbound:
                with trio.CancelScope() as scope:
                    self._scopes.add(scope)
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(_pump, inbound, outbound, nursery.cancel_scope)
                            nursery.start_soon(_pump, outbound, inbound, nursery.cancel_scope)
                    finally:
                        self._scopes.discard(scope)

    def cut(self) -> None:
        self.cut_off = True
        for scope in self._scopes:
            scope.cancel()

    def heal(self) -> None:
        self.cut_off = False


async def _pump(source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except trio.BrokenResourceError:
        pass
    done.cancel()
