"""Assemble a relay from a data directory: key, store, node and server.

The data directory holds ``relay.key`` (the relay's Ed25519 identity, created on first
start, mode 0600) and ``events.sqlite3`` (the embedded store, WAL mode).
"""

from __future__ import annotations

from pathlib import Path

import trio
from websockets.trio.server import Server

from agent_sdk.identity import load_or_create
from relay.node import RelayConfig, RelayNode
from relay.server import serve_relay
from relay.store.sqlite import SQLiteStore

KEY_FILE = "relay.key"
STORE_FILE = "events.sqlite3"


def open_store(data: Path) -> SQLiteStore:
    return SQLiteStore(data / STORE_FILE)


async def run_relay(
    data: Path,
    config: RelayConfig,
    host: str = "127.0.0.1",
    port: int = 7700,
    *,
    task_status: trio.TaskStatus[tuple[RelayNode, Server]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a relay on ``data`` until cancelled; reports ``(node, server)`` once listening."""
    identity = await trio.to_thread.run_sync(load_or_create, data / KEY_FILE)
    store = await trio.to_thread.run_sync(open_store, data)
    try:
        node = RelayNode(identity, store, config)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            server = await nursery.start(serve_relay, node, host, port)
            task_status.started((node, server))
    finally:
        store.close()
