"""What only the PostgreSQL store does: one relay per schema, and clear start-up errors.
(Everything else about it is the whole relay suite, run again with ``--store
postgresql``.)"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest
import trio

from agent_sdk.client import RelayClient
from relay.app import DataDirError, run_relay
from relay.node import RelayConfig
from tests import backends
from tests.conftest import identity, start_relay

pytestmark = pytest.mark.postgresql_only


async def test_a_second_relay_on_a_schema_in_use_is_refused(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    first = await start_relay(nursery, tmp_path / "first")
    async with RelayClient.connect(first.url, identity(1)) as client:
        await client.publish("t@local", "app.note", "kept")
    dsn = backends.store_dsn(tmp_path / "first")  # the same schema, another data directory
    with pytest.raises(DataDirError, match="is in use by a running relay"):
        await run_relay(tmp_path / "second", RelayConfig(store=dsn), port=0)
    assert first.node.head("t@local") == 1  # the first one serves on, untouched
    async with RelayClient.connect(first.url, identity(1)) as client:
        assert (await client.publish("t@local", "app.note", "still")).receipt.seq == 2
    first.scope.cancel()


async def test_an_unreachable_server_stops_the_start_with_its_reason(tmp_path: Path) -> None:
    dsn = "postgresql://formicary@127.0.0.1:1/postgres?connect_timeout=2"
    with pytest.raises(DataDirError, match=r"PostgreSQL store: .*127\.0\.0\.1"):
        await run_relay(tmp_path / "relay", RelayConfig(store=dsn), port=0)


def test_the_sessions_holding_a_schema_lock_ask_the_server_for_keepalives(
    tmp_path: Path,
) -> None:
    """The server frees a relay's schema lock only when it ends that session, and it
    notices a dead relay host only by its own keepalives (the OS's two hours unless
    set): the lock holders set them, over TCP, as the test server is reached."""
    from relay.store.postgres import PostgresInboxStore, PostgresStore

    dsn = backends.store_dsn(tmp_path)
    store = PostgresStore(dsn)
    inbox = PostgresInboxStore(dsn)
    try:
        for conn in (store._writer, inbox._db):
            assert conn is not None
            shown = [
                conn.execute(f"SHOW tcp_keepalives_{name}").fetchone()
                for name in ("idle", "interval", "count")
            ]
            assert shown == [("30",), ("10",), ("3",)]
    finally:
        store.close()
        inbox.close()


def test_every_session_that_writes_commits_synchronously(tmp_path: Path) -> None:
    """operations.md: the relay's writer sets ``synchronous_commit = on`` whatever the
    server's default, and a message is on stable storage before its sender hears
    ``stored``. The inbox's connection wrote with the server's (or the DSN's) setting:
    with ``off``, a server crash could lose messages their senders were told were
    stored."""
    from relay.store.postgres import PostgresInboxStore, PostgresStore

    dsn = backends.store_dsn(tmp_path) + quote(" -csynchronous_commit=off")
    store = PostgresStore(dsn)
    mirrors = PostgresStore(dsn, prefix="mirror_")
    inbox = PostgresInboxStore(dsn)
    try:
        for conn in (store._writer, mirrors._writer, inbox._db):
            assert conn is not None
            assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
    finally:
        store.close()
        mirrors.close()
        inbox.close()
