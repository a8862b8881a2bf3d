"""Assembling a relay from its data directory, and refusing an inconsistent one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio
import trio.testing

from agent_sdk.client import RelayClient
from agent_sdk.identity import Identity
from relay.app import (
    INBOX_FILE,
    KEY_FILE,
    LOGS_FILE,
    MIRROR_FILE,
    OUTBOX_FILE,
    STORE_FILE,
    DataDirError,
    load_identity,
    open_store,
)
from tests.backends import store_dsn
from tests.conftest import RunningRelay, identity, start_relay


async def test_a_relay_keeps_its_identity_across_restarts(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    data = tmp_path / "relay"
    first = await start_relay(nursery, data)
    async with RelayClient.connect(first.url, identity(1)) as client:
        await client.publish("t@local", "app.x")
    key = first.node.identity.id
    first.scope.cancel()
    second = await start_relay(nursery, data)
    assert second.node.identity.id == key
    assert second.node.head("t@local") == 1
    second.scope.cancel()


async def a_stopped_relay_with_one_event(nursery: trio.Nursery, data: Path) -> RunningRelay:
    running = await start_relay(nursery, data)
    async with RelayClient.connect(running.url, identity(1)) as client:
        await client.publish("t@local", "app.x")
    running.scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    return running


async def test_logs_without_their_key_are_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    data = tmp_path / "relay"
    running = await a_stopped_relay_with_one_event(nursery, data)

    shutil.move(data / KEY_FILE, tmp_path / "saved.key")
    store = open_store(data, store_dsn(data))
    try:
        with pytest.raises(DataDirError, match=r"no relay\.key"):
            load_identity(data, store)
        Identity.generate().save(data / KEY_FILE)  # a stranger's key
        with pytest.raises(DataDirError, match="not the key"):
            load_identity(data, store)
        (data / KEY_FILE).unlink()
        shutil.move(tmp_path / "saved.key", data / KEY_FILE)
        assert load_identity(data, store).id == running.node.identity.id
    finally:
        store.close()


async def test_a_key_is_refused_on_a_store_without_the_logs_it_signed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Started on another store (the embedded one after a run on PostgreSQL, or with
    events.sqlite3 lost), the relay would sign a second seq 1 under the same key."""
    data = tmp_path / "relay"
    running = await a_stopped_relay_with_one_event(nursery, data)
    assert (data / LOGS_FILE).exists()  # written at the first commit

    elsewhere = tmp_path / "elsewhere"  # an empty store
    elsewhere.mkdir()
    empty = open_store(elsewhere, store_dsn(elsewhere))
    try:
        with pytest.raises(DataDirError, match=r"t@local seq 1 is missing"):
            load_identity(data, empty)
    finally:
        empty.close()
    store = open_store(data, store_dsn(data))
    try:
        assert load_identity(data, store).id == running.node.identity.id
        (data / LOGS_FILE).write_text("{")
        with pytest.raises(DataDirError, match=r"logs\.json is unreadable"):
            load_identity(data, store)
        (data / LOGS_FILE).unlink()  # a directory from before logs.json: written now
        assert load_identity(data, store).id == running.node.identity.id
        assert (data / LOGS_FILE).exists()
    finally:
        store.close()


async def test_a_log_decided_with_other_lease_bounds_is_refused(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    from relay.coordination.leases import TtlBounds
    from relay.node import RelayConfig

    data = tmp_path / "relay"
    first = await start_relay(nursery, data)
    async with RelayClient.connect(first.url, identity(1)) as client:
        await client.publish("work@local", "wo.create", {"title": "t"})
        granted = await client.publish(
            "work@local", "wo.claim", {"wo": "wo-1", "ttl_ms": 7_200_000}
        )
        assert granted.outcome is not None and granted.outcome.event.event.kind == "wo.claimed"
    first.scope.cancel()
    await trio.testing.wait_all_tasks_blocked()

    # An hour at most now: the logged two-hour grant would be refused on replay.
    narrower = RelayConfig(claim_ttl=TtlBounds(max_ms=3_600_000, default_ms=1_800_000))
    with pytest.raises(DataDirError, match=r"work@local seq 4: the log says wo\.claimed"):
        await start_relay(nursery, data, narrower)
    wider = RelayConfig(claim_ttl=TtlBounds(max_ms=48 * 3_600_000))  # decides the same
    again = await start_relay(nursery, data, wider)
    async with RelayClient.connect(again.url, identity(1)) as client:
        await client.publish("work@local", "wo.create", {"title": "u"})
        await client.publish("work@local", "wo.claim", {"wo": "wo-2"})  # the default TTL
    again.scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    shorter = RelayConfig(claim_ttl=TtlBounds(default_ms=600_000))
    with pytest.raises(DataDirError, match=r"seq 8: the log says wo\.claimed with expires_ms"):
        await start_relay(nursery, data, shorter)


async def test_a_refusal_decided_alike_but_worded_otherwise_does_not_stop_a_restart(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A replay compares decisions, not a refusal's prose: a `bad_ttl` that names the
    bounds of its day is still `bad_ttl` under other bounds that refuse it too."""
    from relay.coordination.leases import TtlBounds
    from relay.node import RelayConfig

    data = tmp_path / "relay"
    first = await start_relay(nursery, data)
    async with RelayClient.connect(first.url, identity(1)) as client:
        await client.publish("work@local", "wo.create", {"title": "t"})
        refused = await client.publish("work@local", "wo.claim", {"wo": "wo-1", "ttl_ms": 10})
        assert refused.outcome is not None
        assert refused.outcome.event.event.body["problem"] == "bad_ttl"
    first.scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    # Other bounds: the reason would now name them, and 10 ms is refused all the same.
    other = RelayConfig(claim_ttl=TtlBounds(min_ms=2_000, max_ms=7_200_000, default_ms=60_000))
    again = await start_relay(nursery, data, other)
    async with RelayClient.connect(again.url, identity(1)) as client:
        claimed = await client.publish("work@local", "wo.claim", {"wo": "wo-1"})
        assert claimed.outcome is not None
        assert claimed.outcome.event.event.kind == "wo.claimed"


async def test_a_nan_an_agent_wrote_into_an_outcome_does_not_stop_a_restart(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """NaN is a canonical value (protocol 2), and `dir.joined` echoes the member's
    `meta`; NaN is not equal to itself, so a replay compares outcomes as bytes."""
    data = tmp_path / "relay"
    first = await start_relay(nursery, data)
    async with RelayClient.connect(first.url, identity(1)) as client:
        body = {"name": "odd", "meta": {"score": float("nan")}, "heartbeat_ms": 60_000}
        joined = await client.publish("team@local", "dir.join", body)
        assert joined.outcome is not None and joined.outcome.event.event.kind == "dir.joined"
    first.scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    again = await start_relay(nursery, data)
    assert again.node.head("team@local") == 2
    again.scope.cancel()


async def test_a_key_file_that_is_not_a_key_is_one_line(tmp_path: Path) -> None:
    """Not a traceback: the relay and its commands name the file and what is wrong."""
    from tests.processes import cli

    data = tmp_path / "relay"
    data.mkdir()
    (data / KEY_FILE).write_text("not a key\n")
    store = open_store(data, store_dsn(data))
    try:
        with pytest.raises(DataDirError, match=r"relay\.key: it does not hold .* Ed25519"):
            load_identity(data, store)
    finally:
        store.close()
    for command in (["relay", "key"], ["relay", "invite", "a@local"]):
        done = await trio.run_process(
            cli(*command, "--data", str(data)), capture_stderr=True, check=False
        )
        err = done.stderr.decode()
        assert done.returncode == 1 and "Traceback" not in err and "Ed25519" in err, err


@pytest.mark.parametrize("damaged", [STORE_FILE, INBOX_FILE])
async def test_a_file_that_is_not_a_database_is_one_line(tmp_path: Path, damaged: str) -> None:
    """SQLite's refusal at start-up was a page of traceback."""
    from tests.processes import cli

    data = tmp_path / "relay"
    data.mkdir()
    (data / damaged).write_text("not a database\n")
    serve = cli("relay", "serve", "--data", str(data), "--port", "0")
    done = await trio.run_process(serve, capture_stderr=True, check=False)
    err = done.stderr.decode()
    assert done.returncode == 1 and "Traceback" not in err, err
    assert f"{damaged}: file is not a database" in err
    if damaged == STORE_FILE:
        verify = cli("log", "verify", "all", "--data", str(data))
        done = await trio.run_process(verify, capture_stderr=True, check=False)
        err = done.stderr.decode()
        assert done.returncode == 2 and "Traceback" not in err and "not a database" in err, err


def with_every_database(data: Path) -> None:
    """A stopped relay's data directory (a key, no logs) with a row in its inbox and
    one in its outbox, and mirrors."""
    from federation.outbox import SQLiteOutboxStore
    from relay.inbox import Item, SQLiteInboxStore
    from relay.store.sqlite import SQLiteStore

    data.mkdir(parents=True)
    Identity.generate().save(data / KEY_FILE)
    SQLiteStore(data / STORE_FILE).close()
    SQLiteStore(data / MIRROR_FILE).close()
    inbox = SQLiteInboxStore(data / INBOX_FILE)
    inbox.apply([Item(b"bob", 1, "message", b"mid", b"alice", b"sealed", 2**62)], [])
    inbox.close()
    outbox = SQLiteOutboxStore(data / OUTBOX_FILE)
    outbox.put_receipts([("other", 1, b"receipt")])
    outbox.close()


PAGE = 4096  # (SQLite's default page size)
PEER = "other#" + "00" * 32  # (federated: the mirrors and the outbox are read)


def damage(path: Path) -> None:
    """Overwrite the header of every page but the first (the schema): the file
    opens, and the first read of one of its tables fails."""
    db = bytearray(path.read_bytes())
    for page in range(PAGE, len(db), PAGE):
        db[page : page + 12] = b"\xff" * 12
    path.write_bytes(db)


@pytest.mark.parametrize("damaged", [INBOX_FILE, MIRROR_FILE, OUTBOX_FILE])
async def test_a_database_damaged_past_its_header_is_one_line(tmp_path: Path, damaged: str) -> None:
    """Opening it read no more than the header; the first read of a table (loading
    the inboxes, the mirrors' heads, the outbox) was a 44-line traceback."""
    from tests.processes import PHASE_TIMEOUT, cli

    data = tmp_path / "relay"
    with_every_database(data)
    damage(data / damaged)
    serve = cli("relay", "serve", "--data", str(data), "--port", "0", "--peer", PEER)
    with trio.fail_after(PHASE_TIMEOUT):
        done = await trio.run_process(serve, capture_stderr=True, check=False)
    err = done.stderr.decode()
    assert done.returncode == 1 and "Traceback" not in err, err
    assert f"{damaged}: database disk image is malformed" in err, err


async def test_the_url_a_relay_on_an_ipv6_address_logs_is_one_to_connect_to(
    tmp_path: Path,
) -> None:
    """operations.md: once listening, the relay logs its real URL. For an IPv6
    address (``--host ::1``) it logged ``ws://::1:PORT``, which is no URL: a client
    given it could not connect (``hostname isn't provided``)."""
    import socket

    from tests.processes import relay_process

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    async with relay_process(tmp_path / "relay", "--host", "::1") as relay:
        assert relay.url.startswith("ws://[::1]:"), relay.url
        async with RelayClient.connect(relay.url, identity(1), reconnect=False) as client:
            assert (await client.publish("t@local", "app.note", "over IPv6")).receipt.seq == 1
