"""Messages to an agent of another relay: two relay processes on loopback, the
message passed across their link, the receipt back the same way."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from agent_sdk.client import RelayClient
from agent_sdk.errors import ErrorCode, ProtocolError
from tests.conftest import identity
from tests.federation.cluster import cluster

ALICE, BOB = identity(1), identity(2)
TIMEOUT = 60


async def test_a_message_crosses_relays_to_an_offline_agent_once_in_order(
    tmp_path: Path,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(tmp_path, ["a", "b"]) as net:
            async with RelayClient.connect(net["b"].url, BOB):
                pass  # Bob is an agent of b: b knows him
            async with RelayClient.connect(net["a"].url, ALICE) as alice:
                sent = [await alice.send(f"{BOB.id}@b", {"n": n}) for n in range(10)]
                assert {s.status for s in sent} == {"stored"}  # in b's inbox for Bob
                async with RelayClient.connect(net["b"].url, BOB) as bob:
                    got = [await bob.mailbox.next() for _ in range(10)]
                    assert [m.body for m in got] == [{"n": n} for n in range(10)]
                    assert {m.sender for m in got} == {ALICE.public_key}
                    for s in sent:  # the receipts came back from b to a, to Alice
                        (await s.delivered()).verify()
                async with RelayClient.connect(net["b"].url, BOB) as bob:  # none twice
                    bob.mailbox.open()
                    await bob.mailbox.live.wait()
                    assert bob.mailbox._queue_rx.statistics().current_buffer_used == 0
                with pytest.raises(ProtocolError) as unknown:
                    await alice.send(f"{identity(9).id}@b", "nobody at b")
                assert unknown.value.code is ErrorCode.UNKNOWN_RECIPIENT
                with pytest.raises(ProtocolError) as nowhere:
                    await alice.send(f"{BOB.id}@zz", "no such relay")
                assert nowhere.value.code is ErrorCode.UNKNOWN_RECIPIENT


async def test_a_message_waits_while_the_recipients_relay_is_down_and_outlives_a_kill(
    tmp_path: Path,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(tmp_path, ["a", "b"]) as net:
            async with RelayClient.connect(net["b"].url, BOB):
                pass
            await net.kill("b")
            async with RelayClient.connect(net["a"].url, ALICE) as alice:
                async with trio.open_nursery() as nursery:
                    sending = nursery.start_soon
                    results: list[str] = []

                    async def send() -> None:
                        results.append((await alice.send(f"{BOB.id}@b", "later")).status)

                    sending(send)
                    await net.start("b")  # the same data: Bob is still known
                assert results == ["stored"]
            await net.kill("b")  # SIGKILL: "stored" was a promise on disk
            await net.start("b")
            async with RelayClient.connect(net["b"].url, BOB) as bob:
                assert (await bob.mailbox.next()).body == "later"


async def test_a_receipt_on_its_way_back_outlives_a_kill_of_the_recipients_relay(
    tmp_path: Path,
) -> None:
    """Bob takes Alice's message while her relay is down: his relay keeps the receipt
    for her relay, on disk, through a SIGKILL of its own, and sends it once the link
    is back."""
    with trio.fail_after(TIMEOUT):
        async with cluster(tmp_path, ["a", "b"]) as net:
            async with RelayClient.connect(net["b"].url, BOB):
                pass
            async with RelayClient.connect(net["a"].url, ALICE) as alice:
                sent = await alice.send(f"{BOB.id}@b", "read me")
                assert sent.status == "stored"
                await net.kill("a")  # the receipt has no way back for now
                async with RelayClient.connect(net["b"].url, BOB) as bob:
                    assert (await bob.mailbox.next()).body == "read me"
                    await bob.mailbox.confirm()  # taken: its receipt waits at b for a
                await net.kill("b")
                await net.start("b")
                await net.start("a")  # alice's client reconnects to it
                (await sent.delivered()).verify()
