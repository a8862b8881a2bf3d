"""In-process federated relays on loopback sockets, and a relay that lies.

The relays are real (:func:`relay.app.run_relay` on ports picked up front, with their
keys made first so that each can pin the others'); only the process boundary is
left out, which the process tests in this folder cover.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio
from websockets.exceptions import ConnectionClosed
from websockets.trio.client import connect
from websockets.trio.server import Server, ServerConnection, serve

from agent_sdk import frames as f
from agent_sdk.identity import Identity, load_or_create
from federation.network import Federation, FederationConfig
from federation.peers import Peer
from relay.app import KEY_FILE
from relay.node import RelayConfig
from tests.conftest import RunningRelay, start_relay
from tests.federation.cluster import free_port


@dataclass
class Planned:
    """A relay to start: its name, data directory, port and key, known in advance."""

    name: str
    data: Path
    port: int = field(default_factory=free_port)
    identity: Identity | None = None

    def __post_init__(self) -> None:
        self.identity = load_or_create(self.data / KEY_FILE)

    @property
    def key(self) -> bytes:
        assert self.identity is not None
        return self.identity.public_key

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def peer(self, *, url: str | None = None, key: bytes | None = None) -> Peer:
        return Peer(self.name, key or self.key, url=url or self.url)


def plan(tmp_path: Path, *names: str) -> dict[str, Planned]:
    return {name: Planned(name, tmp_path / name) for name in names}


async def start(
    nursery: trio.Nursery,
    planned: Planned,
    peers: tuple[Peer, ...] | None,
    config: RelayConfig | None = None,
    deadline_ms: int = 600_000,
) -> RunningRelay:
    """Start ``planned`` with these peers (``None``: no federation at all)."""
    federation = None if peers is None else FederationConfig(peers, deadline_ms)
    return await start_relay(
        nursery,
        planned.data,
        config or RelayConfig(name=planned.name),
        port=planned.port,
        federation=federation,
    )


def federation_of(relay: RunningRelay) -> Federation:
    assert relay.node.federation is not None
    return relay.node.federation


Tamper = Callable[[f.EventFrame], f.EventFrame | None]
"""What a lying relay does to each event frame it passes on (``None``: drop it)."""
TamperAck = Callable[[f.Ack], f.Ack | None]
"""What it does to each ack (``None``: drop it, as if the answer were lost)."""


class LyingRelay:
    """A WebSocket man in the middle that speaks for ``target``: the handshake passes
    through untouched (so the target's key proves itself), then event frames from
    the target are rewritten by ``tamper`` on their way to whoever dialled."""

    def __init__(self, target: str, tamper: Tamper, tamper_ack: TamperAck | None = None) -> None:
        self.target = target
        self.tamper = tamper
        self.tamper_ack = tamper_ack
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(
            self._handle, self.port, host="127.0.0.1", compression=None, task_status=task_status
        )

    async def _handle(self, inbound: ServerConnection) -> None:
        try:
            async with (
                connect(self.target, compression=None, max_size=None) as outbound,
                trio.open_nursery() as nursery,
            ):

                async def upstream() -> None:
                    while True:  # recv(), not `async for`: no generator left to collect
                        await outbound.send(await inbound.recv())

                nursery.start_soon(upstream)
                while True:
                    message = await outbound.recv()
                    assert isinstance(message, bytes)
                    rewritten = self._rewrite(message)
                    if rewritten is not None:
                        await inbound.send(rewritten)
        except* ConnectionClosed:
            pass  # either side hung up: so does the man in the middle

    def _rewrite(self, message: bytes) -> bytes | None:
        out = []
        for frame in f.decode_message(message):
            assert not isinstance(frame, Exception)
            if isinstance(frame, f.Ack) and self.tamper_ack is not None:
                acked = self.tamper_ack(frame)
                if acked is None:
                    continue
                frame = acked
            if isinstance(frame, f.EventFrame):
                tampered = self.tamper(frame)
                if tampered is None:
                    continue
                frame = tampered
            out.append(f.encode_frame(frame))
        return f.bundle(out) if out else None
