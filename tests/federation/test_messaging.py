"""Messages to an agent of another relay: two relay processes on loopback, the
message passed across their link, the receipt back the same way."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

import federation.network
from agent_sdk import frames as f
from agent_sdk.client import Asked, RelayClient
from agent_sdk.errors import ErrorCode, ProtocolError, client_stopped
from federation.network import RECEIPT_TRIES, Federation, FederationConfig
from federation.outbox import MemoryOutboxStore
from federation.peers import Peer
from relay.node import RelayConfig, RelayNode
from relay.store.memory import MemoryStore
from tests.conftest import RunningRelay, identity
from tests.federation.cluster import cluster
from tests.federation.fixtures import Planned, federation_of, plan, start

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


async def linked(
    nursery: trio.Nursery, tmp_path: Path
) -> tuple[dict[str, Planned], RunningRelay, RunningRelay]:
    """Relays a and b in this process, linked both ways, with Bob known at b (he can
    be sent messages)."""
    relays = plan(tmp_path, "a", "b")
    a = await start(nursery, relays["a"], (relays["b"].peer(),))
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(b.url, BOB):
            pass
        await federation_of(a).links["b"].wait_up()
        await federation_of(b).links["a"].wait_up()
    return relays, a, b


async def test_a_receipt_kept_while_the_last_one_is_dropped_starts_no_second_sender(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """b passes Bob's receipts on to a, and drops their rows once a has them. A
    receipt kept while that drop is on the disk joins the running sender: two senders
    would both send the next one and both take it off (an IndexError that stopped the
    relay, in a review)."""
    import threading

    _, a, b = await linked(nursery, tmp_path)
    fed = federation_of(b)
    store, send_receipts, senders = fed.store, fed._send_receipts, []

    async def counted(relay: str) -> None:
        senders.append(relay)
        await send_receipts(relay)

    fed._send_receipts = counted  # type: ignore[method-assign]
    dropping, release, both_dropped = trio.Event(), threading.Event(), trio.Event()
    token, drop = trio.lowlevel.current_trio_token(), store.drop_receipts
    dropped: list[int] = []

    def held_drop(relay: str, ns: list[int]) -> None:  # (in a worker thread)
        token.run_sync_soon(dropping.set)
        release.wait(TIMEOUT)
        drop(relay, ns)
        dropped.extend(ns)
        if len(dropped) == 2:
            token.run_sync_soon(both_dropped.set)

    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(a.url, ALICE) as alice:
            sent = [await alice.send(f"{BOB.id}@b", n) for n in range(2)]
            store.drop_receipts = held_drop  # type: ignore[method-assign]
            async with RelayClient.connect(b.url, BOB) as bob:
                assert (await bob.mailbox.next()).body == 0
                await bob.mailbox.confirm()
                await dropping.wait()  # the first receipt is at a; its row is going
                assert (await bob.mailbox.next()).body == 1
                await bob.mailbox.confirm()  # kept meanwhile
                release.set()
                for s in sent:
                    (await s.delivered()).verify()
        await both_dropped.wait()
    assert senders == ["a"]  # one sender took both
    assert store.load_receipts() == [] and len(dropped) == 2  # each sent and dropped once


async def test_a_backlog_of_receipts_goes_in_runs_once_the_link_is_back(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Bob takes 100 of Alice's messages while her relay is down: once it is back, b
    sends the receipts in runs (one message each way and one commit per run), not one
    round trip and one commit each."""
    from federation.network import RECEIPT_RUN

    relays, a, b = await linked(nursery, tmp_path)
    store = federation_of(b).store
    drop, drops, all_dropped = store.drop_receipts, [], trio.Event()
    token = trio.lowlevel.current_trio_token()

    def counted(relay: str, ns: list[int]) -> None:  # (in a worker thread)
        drop(relay, ns)
        drops.append(len(ns))
        if sum(drops) == 100:
            token.run_sync_soon(all_dropped.set)

    store.drop_receipts = counted  # type: ignore[method-assign]
    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(a.url, ALICE) as alice:
            sent = [await alice.send(f"{BOB.id}@b", n) for n in range(100)]
            a.scope.cancel()  # the receipts have no way back for now
            async with RelayClient.connect(b.url, BOB) as bob:
                assert [(await bob.mailbox.next()).body for _ in range(100)] == list(range(100))
                await bob.mailbox.confirm()  # all taken: 100 receipts wait at b
            assert len(store.load_receipts()) == 100
            await start(nursery, relays["a"], (relays["b"].peer(),))  # alice reconnects
            for s in sent:
                (await s.delivered()).verify()
        await all_dropped.wait()  # (the last run's rows go just after a has it)
    assert drops == [RECEIPT_RUN, 100 - RECEIPT_RUN]
    assert store.load_receipts() == []


async def test_a_receipt_the_senders_relay_could_not_store_is_sent_again(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """a answers b's receipt with 5001 internal (its disk was full for a moment): that
    means "not now", and b sends the receipt again rather than drop it."""
    _, a, b = await linked(nursery, tmp_path)
    store = a.node.inboxes.store
    apply, failed = store.apply, []

    def full_once(put: object, drop: object) -> None:
        if not failed:
            failed.append(put)
            raise OSError("No space left on device")
        apply(put, drop)  # type: ignore[arg-type]

    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(a.url, ALICE) as alice:
            sent = await alice.send(f"{BOB.id}@b", "once")
            store.apply = full_once  # type: ignore[method-assign]
            async with RelayClient.connect(b.url, BOB) as bob:
                assert (await bob.mailbox.next()).body == "once"
                await bob.mailbox.confirm()
            (await sent.delivered()).verify()
    assert failed  # the first try did fail


async def test_a_receipt_that_cannot_be_stored_leaves_its_message_in_the_inbox(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """When b cannot store the receipt for a (a full disk), Bob's acknowledgement is
    not applied: the message stays in his inbox and comes again, so its receipt is
    not lost with the item."""
    _, a, b = await linked(nursery, tmp_path)
    store = federation_of(b).store
    put = store.put_receipts

    def full_disk(rows: object) -> None:
        raise OSError("No space left on device")

    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(a.url, ALICE) as alice:
            sent = await alice.send(f"{BOB.id}@b", "once more")
            store.put_receipts = full_disk  # type: ignore[assignment]
            async with RelayClient.connect(b.url, BOB) as bob:
                assert (await bob.mailbox.next()).body == "once more"
                await bob.mailbox.confirm()  # answered: the acknowledgement failed
            store.put_receipts = put  # type: ignore[method-assign]
            async with RelayClient.connect(b.url, BOB) as bob:
                again = await bob.mailbox.next()  # not taken: it came again
                assert again.body == "once more"
            (await sent.delivered()).verify()


async def test_a_receipt_for_a_relay_that_only_dials_us_is_dropped_not_kept(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """b has no way to a (a dials b; b lists a without an address): Bob's receipts for
    Alice can never leave. Kept, they piled up (and past MAX_RECEIPTS_QUEUED every
    acknowledgement of a message from a would be refused); they are dropped, counted."""
    relays = plan(tmp_path, "a", "b")
    a = await start(nursery, relays["a"], (relays["b"].peer(),))
    b = await start(nursery, relays["b"], (Peer("a", relays["a"].key),))  # it dials us
    fed = federation_of(b)
    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(b.url, BOB):
            pass
        await federation_of(a).links["b"].wait_up()
        async with RelayClient.connect(a.url, ALICE) as alice:
            for n in range(3):
                await alice.send(f"{BOB.id}@b", n)
        async with RelayClient.connect(b.url, BOB) as bob:
            for n in range(3):
                assert (await bob.mailbox.next()).body == n
            await bob.mailbox.confirm()  # applied: the acknowledgements are not refused
    assert fed.receipts_dropped["a"] == 3
    assert fed.store.load_receipts() == [] and not fed._receipts.get("a")
    [peer] = fed.info()["peers"]
    assert (peer["receipts"], peer["receipts_dropped"]) == (0, 3)
    assert b.node.inboxes.size(BOB.public_key) == 0


async def test_receipts_kept_by_calls_overlapping_one_write_keep_the_bound(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Receipts for a relay that is down wait in the outbox store, at most
    MAX_RECEIPTS_QUEUED of them. Calls that came while another's write ran each found
    room: the bound counted the receipts queued, not those being written, so the store
    ended over it (by up to a batch of acknowledgements per connection)."""
    monkeypatch.setattr(federation.network, "MAX_RECEIPTS_QUEUED", 2)
    relays = plan(tmp_path, "a", "b")
    b = await start(nursery, relays["b"], (relays["a"].peer(),))  # a is never up
    fed = federation_of(b)
    go, entered = threading.Event(), threading.Event()
    put = fed.store.put_receipts

    def gated(rows: Sequence[tuple[str, int, bytes]]) -> None:
        entered.set()
        go.wait()
        put(rows)

    monkeypatch.setattr(fed.store, "put_receipts", gated)
    answers: list[str] = []

    async def keep(receipt: bytes) -> None:
        try:
            await fed.keep_receipts([("a", receipt)])
            answers.append("kept")
        except ProtocolError as exc:
            answers.append(exc.code.slug)

    async with trio.open_nursery() as keeping:
        keeping.start_soon(keep, b"1")
        await trio.to_thread.run_sync(entered.wait)  # its write runs
        keeping.start_soon(keep, b"2")
        keeping.start_soon(keep, b"3")  # one too many
        await trio.testing.wait_all_tasks_blocked()
        go.set()
    assert sorted(answers) == ["internal", "kept", "kept"]
    assert len(fed.store.load_receipts()) == 2


class _Receiver:
    """A link client to the relay receipts are for, answered by the test: each
    receipt asked is answered with ``answer`` once it is asked."""

    def __init__(self, answer: Callable[[_Receiver, Asked], None]) -> None:
        self.answer = answer
        self.stopped = trio.Event()

    def ask_later(self, frame: Callable[[int], f.AgentFrame]) -> Asked:
        asked = Asked(f.encode_frame(frame(1)))
        self.answer(self, asked)
        return asked


def taken(client: _Receiver, asked: Asked) -> None:
    asked.done.set()


def not_now(client: _Receiver, asked: Asked) -> None:
    asked.error = ProtocolError(ErrorCode.RATE_LIMITED, "slower")
    asked.done.set()


def dropped(client: _Receiver, asked: Asked) -> None:
    """The link went down under it: as the client does, failed and stopped at once."""
    asked.error = client_stopped()
    asked.done.set()
    client.stopped.set()


async def test_a_receipt_is_given_up_after_its_tries_of_not_now_never_for_drops() -> None:
    """A receipt the relay answers "not now" is sent again, RECEIPT_TRIES times at most
    (a code the client files under 5001 must not be asked for ever); one whose link
    dropped under it was not answered at all, and goes again however often it drops."""
    node = RelayNode(identity(9), MemoryStore(), RelayConfig(name="b"))
    fed = Federation(
        node, FederationConfig((Peer("a", ALICE.public_key, url="ws://a"),)), MemoryOutboxStore()
    )
    tries: dict[int, int] = {}

    async def send(answer: Callable[[_Receiver, Asked], None]) -> list[int]:
        client = _Receiver(answer)
        return await fed._pass_receipts(client, "a", [(1, b"receipt")], tries)  # type: ignore[arg-type]

    for _ in range(2 * RECEIPT_TRIES):
        assert await send(dropped) == []
    for _ in range(RECEIPT_TRIES - 1):
        assert await send(not_now) == []
    assert await send(not_now) == [1] and tries == {}  # given up (logged)
    assert await send(taken) == [1]
