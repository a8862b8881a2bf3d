"""A relay process stopped with SIGTERM under publishing load: it refuses new
publishes, commits and answers what it admitted, closes every connection with
``5002 shutting_down``, exits 0, and after a restart every acknowledged event is
in the log with the receipt it was acked with."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from websockets.exceptions import ConnectionClosed

from agent_sdk.client import Published, RelayClient
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.wire import Event, SignedEvent, sign_event
from tests import backends
from tests.backends import relay_store
from tests.conftest import identity
from tests.processes import PHASE_TIMEOUT, relay_process

NS = "stop@local"
PUBLISHERS = 4
LANES = 8
STOP_AFTER = 200  # acks before the SIGTERM
PROBE = PUBLISHERS + 1  # the key of the connection that publishes once the relay stops


@contextmanager
def writes_held(data: Path) -> Iterator[None]:
    """Hold the write lock of the relay's log store, so that what it sequences stays
    uncommitted (its commit waits for the lock) until the block ends."""
    if backends.backend == "postgresql":
        import psycopg

        with psycopg.connect(backends.store_dsn(data)) as conn:
            conn.execute("LOCK TABLE events IN EXCLUSIVE MODE")  # reads go on, writes wait
            try:
                yield
            finally:
                conn.rollback()
        return
    from relay.app import STORE_FILE

    conn = sqlite3.connect(data / STORE_FILE, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("BEGIN IMMEDIATE")  # the relay's commit (BEGIN IMMEDIATE) waits
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()


async def metrics(url: str) -> dict[str, float]:
    """The relay's /metrics, each series summed over its labels."""
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    figures: dict[str, float] = {}
    for line in data.decode().partition("\r\n\r\n")[2].splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            name = series.partition("{")[0]
            figures[name] = figures.get(name, 0.0) + float(value)
    return figures


async def until_the_relay_closes(client: RelayClient) -> None:
    """Keep the connection until the relay closes it: leaving the client would close
    it from our side, and the relay's close frame would not be seen."""
    assert client.ws is not None
    await client.ws.wait_closed()


async def test_sigterm_under_load_keeps_every_acknowledged_event(tmp_path: Path) -> None:
    """The relay is stopped while publishes it has sequenced wait for their commit
    (the test holds the store's write lock meanwhile). It must refuse what comes after
    the signal with ``shutting_down``, commit and answer what it admitted (no publish
    whose connection was lost is in the log, and everything sequenced before the
    signal is), close every connection with 1001 ``5002 shutting_down`` and exit 0."""
    data = tmp_path / "relay"
    acked: list[Published] = []
    refused: dict[bytes, ErrorCode] = {}  # event id -> why its publish failed
    clients: list[RelayClient] = []
    enough = trio.Event()

    def signed(client: RelayClient, body: object) -> SignedEvent:
        author = client.identity.public_key
        made = Event(ns=NS, kind="app.note", author=author, body=body, ts=client.clock_ms())
        return sign_event(made, client.identity.sign)

    async with relay_process(data) as relay:
        assert relay.process is not None

        async def lane(client: RelayClient, k: int, n: int) -> None:
            for i in range(10_000):
                event = signed(client, {"publisher": k, "lane": n, "i": i})
                try:
                    acked.append(await client.publish_signed(event))
                except ProtocolError as exc:
                    refused[event.id] = exc.code
                    return
                if len(acked) >= STOP_AFTER:
                    enough.set()

        async def publisher(k: int) -> None:
            try:
                async with (
                    RelayClient.connect(relay.url, identity(k), reconnect=False) as client,
                    trio.open_nursery() as lanes,
                ):
                    clients.append(client)
                    for n in range(LANES):
                        lanes.start_soon(lane, client, k, n)
                    await until_the_relay_closes(client)
            except* (ConnectionClosed, ProtocolError, OSError):
                pass  # the relay closed the connection: that is the point

        probed: list[ErrorCode | None] = []
        with trio.fail_after(PHASE_TIMEOUT):
            try:
                async with (
                    RelayClient.connect(relay.url, identity(PROBE), reconnect=False) as probe,
                    trio.open_nursery() as nursery,
                ):
                    clients.append(probe)
                    for k in range(1, PUBLISHERS + 1):
                        nursery.start_soon(publisher, k)
                    await enough.wait()
                    with writes_held(data):
                        # Until some publishes are sequenced and wait for their commit.
                        while True:
                            figures = await metrics(relay.url)
                            sequenced = figures["formicary_published_total"]
                            if sequenced > figures.get("formicary_events_in_total", 0):
                                break
                        relay.process.send_signal(signal.SIGTERM)
                        # Logged in the step that stops admitting: whatever the relay
                        # reads from now on comes after the stop.
                        await relay.wait_output("signal 15: stopping")
                        try:
                            await probe.publish(NS, "app.note", "after the signal")
                            probed.append(None)
                        except ProtocolError as exc:
                            probed.append(exc.code)
                    # The commit goes on now: the stop answers what it admitted, closes.
                    await until_the_relay_closes(probe)
            except* (ConnectionClosed, OSError):
                pass  # the relay closed the probe's connection: its frame is checked below
            status = await relay.process.wait()
        assert status == 0, relay.output()[-2000:]  # a clean stop
        stopping = [line for line in relay.output().splitlines() if '"stopped"' in line]
        assert stopping, relay.output()[-2000:]
    store = relay_store(data)
    try:
        stored = {record.id: record for record in store.scan(NS)}
    finally:
        store.close()
    assert len(acked) >= STOP_AFTER
    assert len(stored) >= sequenced  # everything sequenced before the signal committed
    for published in acked:  # as it was acked
        assert stored[published.receipt.id].receipt == published.receipt.raw
    assert set(refused.values()) <= {ErrorCode.SHUTTING_DOWN, ErrorCode.INTERNAL}
    # A publish that failed (refused, or its connection lost) was not committed: the
    # relay answered everything it committed before it closed the connection.
    committed_unanswered = [
        (code.name, event_id.hex()[:12]) for event_id, code in refused.items() if event_id in stored
    ]
    assert not committed_unanswered
    assert probed == [ErrorCode.SHUTTING_DOWN]
    assert len(clients) == PUBLISHERS + 1
    for client in clients:
        assert client.ws is not None and client.ws.protocol.close_rcvd is not None
        close = client.ws.protocol.close_rcvd
        assert (close.code, close.reason) == (1001, "5002 shutting_down")
    async with relay_process(data) as again:  # and a restart serves on from there
        async with RelayClient.connect(again.url, identity(9)) as client:
            after = await client.publish(NS, "app.note", "after the restart")
        assert after.receipt.seq == max(record.seq for record in stored.values()) + 1


def test_publishing_to_a_stopping_node_is_refused_with_shutting_down() -> None:
    from relay.node import RelayNode
    from relay.store.memory import MemoryStore

    node = RelayNode(identity(2), MemoryStore())
    node.stop_admitting()

    async def main() -> None:
        from agent_sdk.wire import Event, sign_event

        event = Event(ns=NS, kind="app.note", author=identity(1).public_key, ts=1, nonce=b"n" * 16)
        ticket = await node.admit(sign_event(event, identity(1).sign))
        assert ticket.error is not None and ticket.error.code is ErrorCode.SHUTTING_DOWN

    trio.run(main)


async def test_sigterm_while_the_relay_starts_is_a_clean_stop(tmp_path: Path) -> None:
    """The signal handler came only once the relay listened: a SIGTERM during a long
    start-up (a big log to fold; here, a data directory another holds) killed it
    (143, no "stopped") where operations.md promises a clean stop."""
    import signal

    from relay.app import hold_data
    from tests.processes import cli

    data = tmp_path / "relay"
    with hold_data(data):  # the start waits for the directory's lock meanwhile
        process = await trio.lowlevel.open_process(
            cli("relay", "serve", "--data", str(data), "--port", "0"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert process.stderr is not None
        said = b""
        with trio.fail_after(PHASE_TIMEOUT):
            while b"starting" not in said:
                said += await process.stderr.receive_some()
            process.send_signal(signal.SIGTERM)
            async for more in process.stderr:
                said += more
            assert await process.wait() == 0, said.decode()
    assert b'"stopped"' in said and b"Traceback" not in said, said.decode()


@pytest.mark.postgresql_only
async def test_a_stop_past_the_grace_exits_while_a_store_call_still_waits(
    tmp_path: Path,
) -> None:
    """operations.md: past 10 s a stop "logs a warning and exits all the same". A
    commit waiting on the server (a lock held there: PostgreSQL waits for it without
    end) runs in a worker thread that no cancellation reaches, and trio waited for it:
    the relay logged ``stopped`` and went on running until the lock was let go."""
    data = tmp_path / "relay"
    async with relay_process(data) as relay:
        assert relay.process is not None
        async with RelayClient.connect(relay.url, identity(1), reconnect=False) as client:
            await client.publish(NS, "app.note", "before")

        async def held(client: RelayClient) -> None:
            try:
                await client.publish(NS, "app.note", "held")
            except ProtocolError:
                pass  # the relay went away under it

        with writes_held(data):
            try:
                async with (
                    RelayClient.connect(relay.url, identity(1), reconnect=False) as client,
                    trio.open_nursery() as nursery,
                ):
                    nursery.start_soon(held, client)
                    while True:  # until it is sequenced and its commit waits
                        figures = await metrics(relay.url)
                        if figures["formicary_published_total"] > figures.get(
                            "formicary_events_in_total", 0
                        ):
                            break
                    relay.process.send_signal(signal.SIGTERM)
                    await until_the_relay_closes(client)  # (past the grace)
            except* (ConnectionClosed, OSError):
                pass  # the relay went away under the client
            with trio.fail_after(PHASE_TIMEOUT):  # the lock still held
                status = await relay.process.wait()
        assert status == 0, relay.output()[-2000:]
        assert "stopping took over" in relay.output(), relay.output()[-2000:]
        assert '"stopped"' in relay.output() and "Traceback" not in relay.output()


@pytest.mark.postgresql_only
async def test_a_stop_while_a_store_call_of_the_start_waits_exits(tmp_path: Path) -> None:
    """A stop asked for while the relay starts is a clean one, logging ``stopped`` and
    exiting 0 (operations.md). A start-up read of the store waiting for a lock held on
    the server (here, on the heads table) runs in a worker thread that the stop's
    cancellation does not reach: the relay logged ``stopped`` and ran on."""
    import psycopg

    from tests.processes import cli

    data = tmp_path / "relay"
    async with relay_process(data) as relay:  # the tables exist, with a log
        async with RelayClient.connect(relay.url, identity(1), reconnect=False) as client:
            await client.publish(NS, "app.note", "before")
        assert await relay.stop() == 0
    dsn = backends.store_dsn(data)
    with psycopg.connect(dsn) as holder, psycopg.connect(dsn, autocommit=True) as watcher:
        holder.execute("LOCK TABLE heads IN ACCESS EXCLUSIVE MODE")  # reads wait too
        process = await trio.lowlevel.open_process(
            cli("relay", "serve", "--data", str(data), "--port", "0", "--store", dsn),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            with trio.fail_after(PHASE_TIMEOUT):
                while True:  # until a read of the start waits for the lock
                    waiting = watcher.execute(
                        "SELECT count(*) FROM pg_locks WHERE NOT granted"
                        " AND relation = 'heads'::regclass"
                    ).fetchone()
                    if waiting and waiting[0]:
                        break
                    await trio.sleep(0.05)  # (polling is how one watches pg_locks)
                process.send_signal(signal.SIGTERM)
                assert process.stderr is not None
                said = b""
                async for more in process.stderr:
                    said += more
                status = await process.wait()  # the lock still held
        finally:
            process.kill()
            holder.rollback()
    assert status == 0 and b'"stopped"' in said and b"Traceback" not in said, said.decode()
