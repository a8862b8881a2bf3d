"""A relay process stopped with SIGTERM under publishing load: it refuses new
publishes, commits and answers what it admitted, closes every connection with
``5002 shutting_down``, exits 0, and after a restart every acknowledged event is
in the log with the receipt it was acked with."""

from __future__ import annotations

import subprocess
from pathlib import Path

import trio
from websockets.exceptions import ConnectionClosed

from agent_sdk.client import Published, RelayClient
from agent_sdk.errors import ErrorCode, ProtocolError
from tests.backends import relay_store
from tests.conftest import identity
from tests.processes import PHASE_TIMEOUT, relay_process

NS = "stop@local"
PUBLISHERS = 4
LANES = 8
STOP_AFTER = 200  # acks before the SIGTERM


async def test_sigterm_under_load_keeps_every_acknowledged_event(tmp_path: Path) -> None:
    data = tmp_path / "relay"
    acked: list[Published] = []
    refused: list[ErrorCode] = []
    enough = trio.Event()
    async with relay_process(data) as relay:

        async def lane(client: RelayClient, n: int) -> None:
            for i in range(10_000):
                try:
                    acked.append(await client.publish(NS, "app.note", {"lane": n, "i": i}))
                except ProtocolError as exc:
                    refused.append(exc.code)
                    return
                if len(acked) >= STOP_AFTER:
                    enough.set()

        async def publisher(k: int) -> None:
            try:
                async with (
                    RelayClient.connect(relay.url, identity(k), reconnect=False) as client,
                    trio.open_nursery() as lanes,
                ):
                    for n in range(LANES):
                        lanes.start_soon(lane, client, n)
            except* (ConnectionClosed, ProtocolError, OSError):
                pass  # the relay closed the connection: that is the point

        with trio.fail_after(PHASE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for k in range(1, PUBLISHERS + 1):
                    nursery.start_soon(publisher, k)
                await enough.wait()
                assert await relay.stop() == 0  # SIGTERM: a clean stop, exit status 0
        stopping = [line for line in relay.output().splitlines() if '"stopped"' in line]
        assert stopping, relay.output()[-2000:]
    assert len(acked) >= STOP_AFTER
    assert set(refused) <= {ErrorCode.SHUTTING_DOWN, ErrorCode.INTERNAL}  # never a bad answer
    store = relay_store(data)
    try:
        stored = {record.seq: record.receipt for record in store.scan(NS)}
    finally:
        store.close()
    for published in acked:
        assert stored[published.receipt.seq] == published.receipt.raw  # as it was acked
    async with relay_process(data) as again:  # and a restart serves on from there
        async with RelayClient.connect(again.url, identity(9)) as client:
            after = await client.publish(NS, "app.note", "after the restart")
        assert after.receipt.seq == max(stored) + 1


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
