"""The relay's log: JSON lines, a correlation id per connection, the event id on lines
about an event (a relay process, its real stderr)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trio
from websockets.exceptions import ConnectionClosed

from agent_sdk.client import RelayClient
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.wire import Event, sign_event
from tests.conftest import identity
from tests.processes import PHASE_TIMEOUT, relay_process


async def test_log_lines_are_json_with_connection_and_event_ids(tmp_path: Path) -> None:
    agent = identity(1)
    async with relay_process(tmp_path / "relay", "--log-level", "debug") as relay:
        async with RelayClient.connect(relay.url, agent) as client:
            event = Event(
                ns="x@local", kind="wo.claimed", author=agent.public_key, ts=client.clock_ms(),
                nonce=b"n" * 16, deps=(), body={"wo": "wo-1"},
            )  # fmt: skip
            with pytest.raises(ProtocolError) as refused:
                await client.publish_signed(sign_event(event, agent.sign))
            assert refused.value.code is ErrorCode.RESERVED_KIND
        assert await relay.stop() == 0
    lines = [json.loads(line) for line in relay.output().splitlines()]  # every line is JSON
    assert all({"ts", "level", "logger", "msg"} <= line.keys() for line in lines)
    assert any(" listening on ws://" in line["msg"] for line in lines)
    [refusal] = [line for line in lines if line["msg"].startswith("publish refused")]
    assert refusal["event"] == sign_event(event, agent.sign).id.hex()
    ours = [line for line in lines if line.get("conn") == refusal["conn"]]
    assert ours[0]["msg"] == "connection opened"  # one session's story, from its start
    assert "connection closed" in [line["msg"] for line in ours]
    assert any(line["msg"].startswith("signal") for line in lines)


async def test_the_log_level_is_checked(tmp_path: Path) -> None:
    done = await trio.run_process(
        [sys.executable, "-m", "agent_sdk.cli", "relay", "serve", "--log-level", "loud",
         "--data", str(tmp_path)],
        check=False, capture_stderr=True,
    )  # fmt: skip
    assert done.returncode == 2 and b"--log-level" in done.stderr


@pytest.mark.sqlite_only
async def test_a_store_failure_stops_the_relay_with_a_json_line(tmp_path: Path) -> None:
    """Store failures are fatal (operations.md, "Crashes and durability"), and the
    relay's stderr is one JSON object per line, a line logged with an exception
    carrying it as ``exc``. A commit that failed (here: the store's write lock held
    past SQLite's busy timeout) ended the process with Python's own traceback, some
    sixty lines that are not JSON, exactly when a log pipeline needs the reason."""
    from tests.relay.test_shutdown import writes_held

    data = tmp_path / "relay"
    async with relay_process(data) as relay:
        assert relay.process is not None
        async with RelayClient.connect(relay.url, identity(1), reconnect=False) as client:
            await client.publish("t@local", "app.note", "kept")
        with writes_held(data):  # until the relay's commit gives up waiting for it
            try:
                async with RelayClient.connect(relay.url, identity(1), reconnect=False) as client:
                    with pytest.raises(ProtocolError):
                        await client.publish("t@local", "app.note", "never acknowledged")
            except* (ConnectionClosed, OSError):
                pass  # the relay went away under the client
            with trio.fail_after(PHASE_TIMEOUT):
                status = await relay.process.wait()
    assert status == 1, relay.output()[-2000:]
    lines = [json.loads(line) for line in relay.output().splitlines()]  # every line is JSON
    [failure] = [line for line in lines if line["level"] == "error"]
    assert "database is locked" in failure["msg"] and "exc" in failure, failure
