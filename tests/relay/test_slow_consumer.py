"""A subscriber that stops reading is disconnected with a reason, not buffered."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from websockets.exceptions import ConnectionClosed
from websockets.trio.client import connect

from agent_sdk import frames as f
from agent_sdk.client import RelayClient
from relay.node import RelayConfig
from tests.conftest import identity, start_relay

NS = "t@local"
BODY = "x" * 60_000
EVENTS = 300  # 18 MB: far more than the loopback socket buffers hold


async def test_a_reader_that_stops_reading_is_closed_with_slow_consumer(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    config = RelayConfig(name="local", send_queue=4, slow_consumer_timeout=0.5)
    relay = await start_relay(nursery, tmp_path / "relay", config)
    agent = identity(1)
    async with connect(relay.url, compression=None, max_size=None) as lazy:
        hello = f.decode_frame(await lazy.recv())
        assert isinstance(hello, f.Hello)
        sig = agent.sign(f.agent_auth_message(hello.relay, hello.challenge))
        await lazy.send(f.encode_frame(f.Auth(key=agent.public_key, sig=sig, challenge=bytes(32))))
        assert isinstance(f.decode_frame(await lazy.recv()), f.Welcome)
        await lazy.send(f.encode_frame(f.Subscribe(sub=1, ns=(NS,))))
        # ...and from here on this client reads nothing while the log grows.

        async with RelayClient.connect(relay.url, identity(2)) as publisher:
            for n in range(EVENTS):
                if relay.node.stats["slow_consumers"]:
                    break
                await publisher.publish(NS, "app.big", {"n": n, "pad": BODY})
            with trio.fail_after(60):  # a bound, not a timing: the condition must come
                await relay.node.wait_stat("slow_consumers", 1)
            # The relay kept serving the publisher, and still does.
            assert (await publisher.publish(NS, "app.small", 1)).receipt.seq > 1

        # Draining now reaches the close frame and its reason.
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await lazy.recv()
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == 1008
        assert info.value.rcvd.reason == "3002 slow_consumer"
