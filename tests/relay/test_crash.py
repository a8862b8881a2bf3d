"""A real relay process, killed with SIGKILL under publishing load, loses nothing it acked.

The relay runs as ``python -m agent_sdk.cli relay serve`` in a child process. Several
agents publish concurrently and book every receipt they get; once a few hundred acks
are in, the process is killed with SIGKILL (no chance to flush or clean up) and
restarted on the same data directory. Then:

* every acknowledged event is in the log with the seq and receipt bytes it was acked
  with — before the restart (reading the store file) and after (over the wire);
* each namespace log is a gapless hash chain, and ``formicary log verify all`` says so;
* every event that was in flight at the kill, re-published, gets exactly one receipt:
  its original one (``duplicate``) if it had committed unacknowledged, a new one at the
  end of the log otherwise; re-publishing any acked event returns its original receipt.

Nothing here asserts on timing: the kill waits for a count of acks, readiness is
polled against a deadline, and every wait has a generous bound.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from agent_sdk.client import Delivery, Live, Published, RelayClient
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.identity import Identity
from agent_sdk.wire import Event, Receipt, SignedEvent, check_chain, decode_receipt, sign_event
from relay.store import Record
from tests.backends import relay_store, store_args
from tests.conftest import identity
from tests.processes import PHASE_TIMEOUT, RelayProcess, cli, relay_process

NAMESPACES = ("crash-a@local", "crash-b@local")
PUBLISHERS = 4
WORKERS = 8  # concurrent publishes per publisher, so many are in flight at the kill
KILL_AFTER = 300  # acks booked before the SIGKILL


async def verify_offline(data: Path) -> list[dict[str, object]]:
    """Run ``formicary log verify all``; require exit 0 and return its verdicts."""
    with trio.fail_after(PHASE_TIMEOUT):
        done = await trio.run_process(
            cli("log", "verify", "all", "--data", str(data), *store_args(data)),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, (done.stdout, done.stderr)
    verdicts: list[dict[str, object]] = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted(v["ns"] for v in verdicts) == sorted(NAMESPACES)
    assert all(v["ok"] for v in verdicts), verdicts
    return verdicts


def read_store(data: Path) -> dict[str, list[Record]]:
    """Every record of the store file, per namespace (the relay must not be running)."""
    store = relay_store(data, synchronous="NORMAL")
    try:
        assert sorted(store.namespaces()) == sorted(NAMESPACES)
        return {ns: list(store.scan(ns)) for ns in NAMESPACES}
    finally:
        store.close()


def assert_gapless_chain(records: Sequence[Record]) -> None:
    receipts = [decode_receipt(record.receipt) for record in records]
    assert [receipt.seq for receipt in receipts] == list(range(1, len(records) + 1))
    assert [record.seq for record in records] == [receipt.seq for receipt in receipts]
    assert check_chain(receipts) is None
    assert records[-1].seal is not None  # a committed log always ends on a seal


@dataclass
class Book:
    """What the publishers know: every event they created, acked or not."""

    acked: dict[bytes, tuple[SignedEvent, Published]] = field(default_factory=dict)
    inflight: dict[bytes, SignedEvent] = field(default_factory=dict)
    enough: trio.Event = field(default_factory=trio.Event)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def publish_until_lost(client: RelayClient, who: Identity, worker: int, book: Book) -> None:
    """Publish one event after another; return when the connection is lost."""
    ns = NAMESPACES[worker % len(NAMESPACES)]
    for n in itertools.count():
        body = {"worker": worker, "n": n}
        event = Event(ns=ns, kind="load.tick", author=who.public_key, body=body, ts=now_ms())
        signed = sign_event(event, who.sign)
        book.inflight[signed.id] = signed  # booked before it can reach the wire
        try:
            published = await client.publish_signed(signed)
        except ProtocolError as exc:
            assert exc.code == ErrorCode.INTERNAL, exc  # "connection lost", nothing else
            return
        del book.inflight[signed.id]
        assert published.receipt.id == signed.id and not published.duplicate
        book.acked[signed.id] = (signed, published)
        if len(book.acked) >= KILL_AFTER:
            book.enough.set()


async def publisher(url: str, who: Identity, book: Book) -> None:
    try:
        async with (
            RelayClient.connect(url, who, reconnect=False) as client,
            trio.open_nursery() as workers,
        ):
            for worker in range(WORKERS):
                workers.start_soon(publish_until_lost, client, who, worker, book)
    except* (ConnectionClosed, OSError, InvalidHandshake):
        pass  # the relay was killed under it (or, if this agent was slow, before it)


async def republish(url: str, who: Identity, events: Sequence[SignedEvent]) -> list[Published]:
    """Publish ``events`` concurrently as ``who``; results in the same order."""
    results: list[Published | None] = [None] * len(events)

    async def one(i: int, client: RelayClient) -> None:
        results[i] = await client.publish_signed(events[i])

    async with (
        RelayClient.connect(url, who, reconnect=False) as client,
        trio.open_nursery() as nursery,
    ):
        for i in range(len(events)):
            nursery.start_soon(one, i, client)
    assert all(result is not None for result in results)
    return [result for result in results if result is not None]


async def read_over_the_wire(url: str) -> dict[str, list[tuple[SignedEvent, Receipt]]]:
    """The whole log of every namespace, by a subscription from seq 1."""
    logs: dict[str, list[tuple[SignedEvent, Receipt]]] = {ns: [] for ns in NAMESPACES}
    live: set[str] = set()
    async with (
        RelayClient.connect(url, identity(99), reconnect=False) as client,
        client.subscribe(NAMESPACES, start=1, buffer=8192) as subscription,
    ):
        async for item in subscription:
            if isinstance(item, Delivery):
                assert item.receipt.ns not in live
                logs[item.receipt.ns].append((item.event, item.receipt))
            else:
                assert isinstance(item, Live)
                assert item.seq == len(logs[item.ns])
                live.add(item.ns)
                if live == set(NAMESPACES):
                    break
    return logs


async def test_acked_events_survive_sigkill_and_inflight_ones_commit_once(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    book = Book()
    authors = {identity(n + 1).public_key: identity(n + 1) for n in range(PUBLISHERS)}

    # -- load, then SIGKILL once enough acks are in --------------------------------------
    async with relay_process(data) as first:
        with trio.fail_after(PHASE_TIMEOUT):
            async with trio.open_nursery() as load:
                for who in authors.values():
                    load.start_soon(publisher, first.url, who, book)
                await book.enough.wait()
                first.kill()
            assert first.process is not None
            assert await first.process.wait() == -signal.SIGKILL
    assert len(book.acked) >= KILL_AFTER
    assert book.inflight, "some publishes must have been in flight at the kill"

    # -- the store as the crash left it ---------------------------------------------------
    await verify_offline(data)
    crashed = read_store(data)
    stored = {r.id: r for records in crashed.values() for r in records}
    for records in crashed.values():
        assert_gapless_chain(records)
    for event_id, (_, published) in book.acked.items():
        record = stored[event_id]
        assert (record.ns, record.seq) == (published.receipt.ns, published.receipt.seq)
        assert record.receipt == published.receipt.raw
    # Whatever committed without an ack was in flight; nothing else is there.
    assert set(stored) <= set(book.acked) | set(book.inflight)

    # -- restart on the same data: re-publish what was in flight, then everything acked -
    async with relay_process(data) as second:
        with trio.fail_after(PHASE_TIMEOUT):
            for key, who in authors.items():
                mine = [e for e in book.inflight.values() if e.event.author == key]
                first_try = await republish(second.url, who, mine)
                second_try = await republish(second.url, who, mine)
                for event, again, once_more in zip(mine, first_try, second_try, strict=True):
                    assert again.receipt.id == event.id
                    committed = stored.get(event.id)
                    if committed is None:
                        assert not again.duplicate  # lost with the crash: sequenced now
                    else:
                        assert again.duplicate  # committed, only its ack was lost
                        assert again.receipt.raw == committed.receipt
                    assert once_more.duplicate
                    assert once_more.receipt.raw == again.receipt.raw
                acked = [event for event, _ in book.acked.values() if event.event.author == key]
                for event, again in zip(
                    acked, await republish(second.url, who, acked), strict=True
                ):
                    assert again.duplicate
                    assert again.receipt.raw == book.acked[event.id][1].receipt.raw

            logs = await read_over_the_wire(second.url)
        assert await second.stop() == 0, second.output()

    # -- every event exactly once, acked ones unchanged, chains whole ---------------------
    everything = set(book.acked) | set(book.inflight)
    delivered = [event.id for log in logs.values() for event, _ in log]
    assert len(delivered) == len(set(delivered)) == len(everything)
    assert set(delivered) == everything
    final = read_store(data)
    for ns, log in logs.items():
        records = final[ns]
        assert [(r.id, r.receipt) for r in records] == [(e.id, rc.raw) for e, rc in log]
        assert [r.event for r in records] == [e.raw for e, _ in log]
        assert_gapless_chain(records)
        # The log before the crash is an untouched prefix of the log after it.
        assert records[: len(crashed[ns])] == crashed[ns]
    for _, published in book.acked.values():
        ns, seq = published.receipt.ns, published.receipt.seq
        assert final[ns][seq - 1].receipt == published.receipt.raw
    verdicts = await verify_offline(data)
    assert sum(int(str(v["records"])) for v in verdicts) == len(everything)


async def test_leases_survive_sigkill_with_their_expiry(tmp_path: Path) -> None:
    from agent_sdk.ledger import Ledger, LedgerRefusal

    data = tmp_path / "relay-data"
    ns = "work@local"
    async with relay_process(data) as first:
        async with RelayClient.connect(first.url, identity(1), reconnect=False) as client:
            ledger = Ledger(client, ns)
            order = await ledger.create("survive the crash")
            claim = await ledger.claim(order, ttl_ms=600_000)
        first.kill()  # SIGKILL with the lease held
        assert await first.process.wait() == -signal.SIGKILL  # type: ignore[union-attr]

    async with relay_process(data) as second:
        async with RelayClient.connect(second.url, identity(2), reconnect=False) as client:
            with pytest.raises(LedgerRefusal) as info:
                await Ledger(client, ns).claim(order)
        assert info.value.problem == "held"
        holder = info.value.holder
        assert holder is not None
        # The same lease, with the same absolute expiry: downtime counts against it.
        assert (holder["holder"], holder["token"], holder["expires_ms"]) == (
            identity(1).public_key,
            claim.token,
            claim.expires_ms,
        )
        async with RelayClient.connect(second.url, identity(1), reconnect=False) as client:
            renewed = await Ledger(client, ns).renew(claim, ttl_ms=600_000)
        assert renewed.token == claim.token
    verified = await trio.run_process(
        cli("log", "verify", "all", "--data", str(data), *store_args(data)),
        capture_stdout=True,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout


async def test_documents_survive_sigkill_and_reconnecting_replicas_do_not_duplicate(
    tmp_path: Path,
) -> None:
    data = tmp_path / "relay-data"
    ns = "docs@local"
    async with relay_process(data) as first:
        async with (
            RelayClient.connect(first.url, identity(1), reconnect=False) as client,
            client.doc(ns, "notes") as shared,
        ):
            for n in range(30):
                shared.array().append(n)
                shared.text().insert(len(shared.text()), f"<{n}>")
            await shared.flush()  # acknowledged: committed
            replica_state = shared.doc.get_update()
            content = shared.to_json()
        first.kill()
        assert await first.process.wait() == -signal.SIGKILL  # type: ignore[union-attr]

    from agent_sdk.docs import SharedDoc
    from agent_sdk.frames import encode_frame

    async with (
        relay_process(data) as second,
        RelayClient.connect(second.url, identity(2), reconnect=False) as client,
    ):
        async with client.doc(ns, "notes", create=False) as reloaded:
            assert reloaded.to_json() == content
        # The killed relay's old replica comes back with its whole history.
        old = SharedDoc(client, ns, "notes", sub=900)
        old._apply(replica_state)
        client._docs[old.sub] = old
        client._queue(encode_frame(old.open_request()))
        await old.synced.wait()
        assert old.error is None and old.to_json() == content
        assert old.array().to_py() == list(range(30))


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(child) for child in (task / "children").read_text().split()}
    return found


async def bundle_until_checker(relay: RelayProcess, client: RelayClient, who: Identity) -> int:
    """Publish bundles until the relay's checking process is up, past its start-up
    (it ignores the relay's stop signals from then on); its pid."""
    assert relay.process is not None
    n = 0
    with trio.fail_after(PHASE_TIMEOUT):
        # It starts as the first is checked; a bundle published as it starts may be
        # checked on the loop, so its answer does not say the process got that far.
        while not (children := children_of(relay.process.pid)) or not ignores_stops(children):
            await publish_bundle(client, who, n)
            n += 8
    (checker,) = children
    return checker


def ignores_stops(pids: set[int]) -> bool:
    """Whether every one of ``pids`` ignores SIGTERM (Linux: /proc/PID/status)."""
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        ignored = next(line for line in status.splitlines() if line.startswith("SigIgn:"))
        if not int(ignored.split()[1], 16) & (1 << (signal.SIGTERM - 1)):
            return False
    return True


async def publish_bundle(client: RelayClient, who: Identity, first: int) -> None:
    bundle = []
    for n in range(first, first + 8):  # queued together: sent as one message
        event = Event(ns="v@local", kind="app.x", author=who.public_key,
                      body={"n": n}, ts=now_ms())  # fmt: skip
        bundle.append(client.publish_later(sign_event(event, who.sign)))
    for pending in bundle:
        await pending.wait()


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGKILL], ids=["stop", "kill"])
async def test_the_signature_checking_process_ends_with_its_relay(
    tmp_path: Path, signal_number: int
) -> None:
    """The relay starts a checking process at its first bundle of publishes
    (relay/signatures.py); stopped or killed -9, the relay leaves none behind (the
    process exits when its pipe closes)."""
    who = identity(1)
    async with relay_process(tmp_path / "data") as relay:
        assert relay.process is not None
        async with RelayClient.connect(relay.url, who) as client:
            checker = await bundle_until_checker(relay, client, who)
        pidfd = os.pidfd_open(checker)
        try:
            relay.process.send_signal(signal_number)
            with trio.fail_after(PHASE_TIMEOUT):
                await trio.lowlevel.wait_readable(pidfd)  # readable once it has exited
        finally:
            os.close(pidfd)


async def test_a_stop_sent_to_the_relays_whole_group_is_the_relays_to_act_on(
    tmp_path: Path,
) -> None:
    """systemd stops a service by signalling every process in it. The checking process
    leaves a stop to its relay: a SIGTERM of its own does not end it (the relay would
    start another while it stops), and the relay's clean stop ends it."""
    who = identity(1)
    async with relay_process(tmp_path / "data", own_group=True) as relay:
        assert relay.process is not None
        async with RelayClient.connect(relay.url, who) as client:
            checker = await bundle_until_checker(relay, client, who)
            os.kill(checker, signal.SIGTERM)
            await publish_bundle(client, who, 10_000)  # checked there, after the signal
            assert children_of(relay.process.pid) == {checker}
        pidfd = os.pidfd_open(checker)
        try:
            os.killpg(relay.process.pid, signal.SIGTERM)
            with trio.fail_after(PHASE_TIMEOUT):
                assert await relay.process.wait() == 0
                await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        assert "signature-checking process ended" not in relay.output()
