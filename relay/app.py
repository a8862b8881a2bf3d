"""Assemble a relay from a data directory: key, store, node and server.

The data directory holds ``relay.key`` (the relay's Ed25519 identity, created on first
start, mode 0600) and ``events.sqlite3`` (the embedded store, WAL mode); a federated
relay adds ``mirrors.sqlite3`` (other relays' logs it follows) and ``outbox.sqlite3``.
With ``[store] dsn`` set, the logs, mirrors and inboxes are on PostgreSQL instead
(relay/store/postgres.py); the key, the lock and the outbox stay here.

``logs.json`` names the first receipt this key signed into its store. A key is one
history: started on a store that lacks that receipt (the embedded one after a run on
PostgreSQL, say, or a lost ``events.sqlite3``), the relay would sign a second seq 1
under the same key, and both chains would verify. So it refuses to start instead.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import trio
from websockets.trio.server import Server

from agent_sdk.identity import Identity, KeyFileError, open_key_file
from agent_sdk.wire import decode_receipt, digest
from federation.network import Federation, FederationConfig
from federation.outbox import SQLiteOutboxStore
from federation.peers import PeerSpecError
from relay.coordination.host import Diverged
from relay.inbox import InboxStore, SQLiteInboxStore
from relay.node import RelayConfig, RelayNode
from relay.server import serve_relay
from relay.store import Record, Store
from relay.store.postgres import PostgresInboxStore, PostgresStore, StoreInUse, StoreUnavailable
from relay.store.sqlite import SQLiteStore, connect_readonly

KEY_FILE = "relay.key"
STORE_FILE = "events.sqlite3"
MIRROR_FILE = "mirrors.sqlite3"
OUTBOX_FILE = "outbox.sqlite3"
INBOX_FILE = "inbox.sqlite3"
LOCK_FILE = "relay.lock"
LOGS_FILE = "logs.json"
RESTORING = ".restoring"  # a restore's checked copies (relay/backup.py)
MOVING = "moving.json"
"""In ``RESTORING`` while the checked files are moved in: the moves to finish."""

T = TypeVar("T")


log = logging.getLogger("formicary.relay")


class DataDirError(Exception):
    """The data directory is inconsistent; starting would fork the relay's history."""


class DataDirInUse(DataDirError):
    """Another relay (or a ``compact``) holds the data directory's lock."""


def open_store(data: Path, dsn: str = "") -> Store:
    """The relay's logs: in ``data`` (embedded SQLite), or on PostgreSQL at ``dsn``."""
    if dsn:
        return PostgresStore(dsn)
    return SQLiteStore(data / STORE_FILE)


def open_mirrors(data: Path, dsn: str = "") -> Store:
    """The logs of other relays' namespaces this relay follows."""
    if dsn:
        return PostgresStore(dsn, prefix="mirror_")
    return SQLiteStore(data / MIRROR_FILE)


def open_inbox(data: Path, dsn: str = "") -> InboxStore:
    if dsn:
        return PostgresInboxStore(dsn)
    return SQLiteInboxStore(data / INBOX_FILE)


def load_identity(data: Path, store: Store) -> Identity:
    """The relay's key: created with a new store, required to match an existing one.

    A relay that lost its key must not quietly make a new one: its next receipts would
    be signed by a stranger and break every chain (and every client's pinned key).
    """
    path = data / KEY_FILE
    namespaces = store.namespaces()
    if namespaces and not path.exists():
        raise DataDirError(f"{data} holds logs but no {KEY_FILE}: restore the key file")
    try:
        identity = open_key_file(path)
    except KeyFileError as exc:
        raise DataDirError(f"{exc}: restore it from a backup") from None
    for ns in namespaces[:1]:
        receipt = decode_receipt(store.read(ns, 1, 1)[0].receipt)
        if receipt.relay != identity.public_key:
            raise DataDirError(f"{path} is not the key that signed the logs in {data}")
    missing = first_receipt_missing(data, store)
    if missing:
        raise DataDirError(
            f"{path} signed logs that are not in this store ({missing}): start it on the "
            f"store that holds them (the [store] dsn it ran with, or its {STORE_FILE}); "
            "a new store needs a new data directory"
        )
    if not (data / LOGS_FILE).exists() and namespaces:  # a directory from before it
        note_first_receipt(data, store.read(namespaces[0], 1, 1)[0])
    return identity


def first_receipt_missing(data: Path, store: Store) -> str:
    """Why ``store`` lacks the first receipt ``logs.json`` names ("" when it holds it,
    or when there is no ``logs.json`` yet)."""
    first = _first_receipt(data)
    if first is None:
        return ""
    ns, wanted = first
    found = store.read(ns, 1, 1)
    if not found:
        return f"{ns} seq 1 is missing"
    return "" if digest(found[0].receipt).hex() == wanted else f"{ns} seq 1 is another event"


def _first_receipt(data: Path) -> tuple[str, str] | None:
    """``(ns, receipt hash hex)`` from ``logs.json``, if this key signed anything yet."""
    try:
        noted = json.loads((data / LOGS_FILE).read_text())
        return str(noted["ns"]), str(noted["first_receipt"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise DataDirError(f"{data / LOGS_FILE} is unreadable ({exc}): restore it") from None


def note_first_receipt(data: Path, record: Record) -> None:
    """Write ``logs.json`` for the first record this key signed (atomically)."""
    noted = {"ns": record.ns, "first_receipt": digest(record.receipt).hex()}
    write_durably(data / LOGS_FILE, json.dumps(noted) + "\n")


def write_durably(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all, for good: staged beside, fsynced, renamed,
    and the rename fsynced (a power cut must not leave it empty)."""
    staged = path.with_name(path.name + ".new")
    staged.write_text(text)
    fsync_path(staged)
    os.replace(staged, path)
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') writes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _noting_first_receipt(data: Path) -> Callable[[Record], None]:
    """A fold that writes ``logs.json`` when a relay's first record is committed."""
    noted = (data / LOGS_FILE).exists()

    def fold(record: Record) -> None:
        nonlocal noted
        if not noted and record.seq == 1:
            noted = True
            try:
                note_first_receipt(data, record)
            except OSError as exc:  # (a full disk, say) the next start writes it
                log.warning("could not write %s: %s", LOGS_FILE, exc)

    return fold


async def run_relay(
    data: Path,
    config: RelayConfig,
    host: str = "127.0.0.1",
    port: int = 7700,
    *,
    federation: FederationConfig | None = None,
    task_status: trio.TaskStatus[tuple[RelayNode, Server]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a relay on ``data`` until cancelled; reports ``(node, server)`` once listening.

    With ``federation`` (peers), mirrors of other relays' namespaces are kept in
    ``mirrors.sqlite3`` and writes waiting for an unreachable home in ``outbox.sqlite3``.
    """
    if port:  # a port in use is found before the data directory is made or locked
        for listener in await trio.open_tcp_listeners(port, host=host):
            await listener.aclose()
    async with _held(data):
        await _run_relay(data, config, host, port, federation=federation, task_status=task_status)


LOCK_WAIT = 2.0
"""Seconds a starting relay waits for the data directory's lock (a relay that was
just stopped in this process may still be letting go of it)."""


@asynccontextmanager
async def _held(data: Path) -> AsyncIterator[None]:
    with trio.move_on_after(LOCK_WAIT):
        while True:
            try:
                with hold_data(data):
                    break
            except DataDirInUse:
                await trio.sleep(0.05)  # polling is how one waits for an flock
    with hold_data(data):
        yield


@contextmanager
def hold_data(data: Path) -> Iterator[None]:
    """Hold ``data``'s lock file for as long as the block runs: a second relay (or a
    ``compact``) on the same directory is refused instead of corrupting it."""
    if data.exists() and not data.is_dir():
        raise DataDirError(f"{data} is a file, not a data directory: give --data a directory")
    data.mkdir(parents=True, exist_ok=True)
    with (data / LOCK_FILE).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataDirInUse(f"{data} is in use by a running relay") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


async def _opening(path: Path, open_: Callable[..., T], *args: Any) -> T:
    """``open_(*args)`` in a thread; SQLite's refusal (a damaged file, a full disk)
    is a one-line error naming ``path``, not a traceback."""
    try:
        return await trio.to_thread.run_sync(open_, *args)
    except sqlite3.Error as exc:
        raise DataDirError(f"{path}: {exc}") from None


def check_database(path: Path) -> str:
    """What SQLite's own check of every page of ``path`` finds wrong ("" if nothing):
    an open reads little more than the header, so a damaged page shows only when
    something reads it."""
    try:
        db = connect_readonly(path)
        try:
            found = "\n".join(str(row[0]) for row in db.execute("PRAGMA quick_check"))
        finally:
            db.close()
    except sqlite3.Error as exc:
        return str(exc)
    if found == "ok":
        return ""
    problems = [line for line in found.splitlines() if not line.startswith("*** ")]
    more = f", and {len(problems) - 1} more problems" if len(problems) > 1 else ""
    return f"{problems[0]}{more}" if problems else found


def _unreadable(data: Path, names: list[str], exc: sqlite3.Error) -> DataDirError:
    """SQLite's refusal while the relay reads its databases ``names`` at start-up (the
    logs, the inboxes, the outbox: past what their opening read), naming the damaged
    one."""
    for name in names:
        if check_database(data / name):
            return DataDirError(f"{data / name}: {exc}")
    return DataDirError(f"{data}: {exc}")


async def _run_relay(
    data: Path,
    config: RelayConfig,
    host: str,
    port: int,
    *,
    federation: FederationConfig | None,
    task_status: trio.TaskStatus[tuple[RelayNode, Server]],
) -> None:
    if (data / RESTORING / MOVING).exists():
        raise DataDirError(
            f"{data}: a restore was interrupted while it moved files in: run formicary relay"
            " restore again to finish it"
        )
    try:
        store = await _opening(data / STORE_FILE, open_store, data, config.store)
    except (StoreInUse, StoreUnavailable) as exc:
        raise DataDirError(str(exc)) from None
    databases = [] if config.store else [STORE_FILE, INBOX_FILE]  # (SQLite's, read below)
    if federation is not None:
        databases += [OUTBOX_FILE] if config.store else [MIRROR_FILE, OUTBOX_FILE]
    mirrors: Store | None = None
    outbox: SQLiteOutboxStore | None = None
    inbox: InboxStore | None = None
    try:
        inbox = await _opening(data / INBOX_FILE, open_inbox, data, config.store)
        identity = await _opening(data / STORE_FILE, load_identity, data, store)
        if federation is not None:
            mirrors = await _opening(data / MIRROR_FILE, open_mirrors, data, config.store)
            outbox = await _opening(data / OUTBOX_FILE, SQLiteOutboxStore, data / OUTBOX_FILE)
        try:
            node = RelayNode(identity, store, config, mirror_store=mirrors, inbox_store=inbox)
        except Diverged as exc:
            raise DataDirError(str(exc)) from None
        except sqlite3.Error as exc:
            raise _unreadable(data, databases, exc) from None
        node.folds.append(_noting_first_receipt(data))
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            if federation is not None:
                assert outbox is not None
                try:
                    network = Federation(node, federation, outbox)
                except PeerSpecError as exc:
                    raise DataDirError(str(exc)) from None
                except sqlite3.Error as exc:
                    raise _unreadable(data, databases, exc) from None
                await nursery.start(network.run)
            server = await nursery.start(serve_relay, node, host, port)
            task_status.started((node, server))
    except (StoreInUse, StoreUnavailable) as exc:
        raise DataDirError(str(exc)) from None
    finally:
        store.close()
        if inbox is not None:
            inbox.close()
        if mirrors is not None:
            mirrors.close()
        if outbox is not None:
            outbox.close()


SHUTDOWN_GRACE = 10.0
"""Seconds a clean stop (SIGTERM, SIGINT) may take before the relay just exits."""


async def stop_gracefully(node: RelayNode, server: Server) -> None:
    """A clean stop: refuse new publishes (5002 ``shutting_down``), let every publish
    already admitted be sequenced, committed and answered, then close every
    connection with code 1001 and reason ``5002 shutting_down`` (clients reconnect and
    re-send anything still unanswered: publishing is idempotent)."""
    node.stop_admitting()
    await node.settle()
    async with trio.open_nursery() as answering:  # every decided answer goes out
        for connection in list(node.connections):
            answering.start_soon(connection.quiet)
    await server.aclose(code=1001, reason="5002 shutting_down")
