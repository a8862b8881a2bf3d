"""Shared fixtures: real relays on loopback sockets, with embedded storage in tmp_path."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import trio
from websockets.trio.server import Server

from agent_sdk.identity import Identity
from federation.network import FederationConfig
from relay.app import run_relay
from relay.limits import UNLIMITED, RateLimits
from relay.node import RelayConfig, RelayNode
from tests import backends


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--store",
        choices=backends.BACKENDS,
        default="sqlite",
        help="the relays' store backend (postgresql: start tests/postgres.sh first)",
    )


def pytest_configure(config: pytest.Config) -> None:
    backends.backend = config.getoption("--store")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if backends.backend == "sqlite":
        skip = pytest.mark.skip(reason="a PostgreSQL store test: run with --store postgresql")
        marker = "postgresql_only"
    else:
        skip = pytest.mark.skip(reason="tests the embedded SQLite store's own tools")
        marker = "sqlite_only"
    for item in items:
        if item.get_closest_marker(marker):
            item.add_marker(skip)


def pytest_report_header(config: pytest.Config) -> str:
    return f"formicary store backend: {backends.backend}"


def unlimited(config: RelayConfig) -> RelayConfig:
    """``config`` without rate limits, unless it sets limits of its own: tests of other
    things publish as fast as they can from one key (tests/relay/test_limits.py sets
    its own)."""
    if config.rate_limits != RateLimits():
        return config
    return replace(config, rate_limits=UNLIMITED)


@dataclass
class RunningRelay:
    node: RelayNode
    server: Server
    url: str
    data: Path
    scope: trio.CancelScope


async def start_relay(
    nursery: trio.Nursery,
    data: Path,
    config: RelayConfig | None = None,
    *,
    port: int = 0,
    federation: FederationConfig | None = None,
) -> RunningRelay:
    """Start a relay on a loopback port (free by default) inside ``nursery``; cancel
    ``scope`` to stop it."""
    scope = trio.CancelScope()
    config = unlimited(config or RelayConfig(name="local"))
    if not config.store:
        config = replace(config, store=backends.store_dsn(data))

    async def run(task_status: trio.TaskStatus[tuple[RelayNode, Server]]) -> None:
        with scope:
            await run_relay(
                data, config, "127.0.0.1", port, federation=federation, task_status=task_status
            )

    node, server = await nursery.start(run)
    port = server.listeners[0].socket.getsockname()[1]
    return RunningRelay(node, server, f"ws://127.0.0.1:{port}", data, scope)


@pytest.fixture
async def relay(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[RunningRelay]:
    running = await start_relay(nursery, tmp_path / "relay")
    yield running
    running.scope.cancel()


def identity(n: int) -> Identity:
    """A deterministic identity: tests name agents by number."""
    return Identity.from_seed(bytes([n]) * 32)
