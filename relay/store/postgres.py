"""The PostgreSQL store: namespace logs (and mirrors, and inboxes) in a database server.

Selected by ``[store] dsn`` in the relay's config (operations.md, "Storage"). The
tables live in the schema the DSN's ``search_path`` names (``public`` by default),
so several relays can share one server, each in its own schema.

The contract is :class:`relay.store.Store`'s, met the same way as the SQLite store:
one writer connection whose transaction per batch is the group commit (PostgreSQL's
default ``synchronous_commit = on`` makes a commit durable before it returns), and
separate reader and finder connections in autocommit, each statement seeing the last
committed state, so a long replay never blocks a commit. The relay serialises each
connection's use with its own locks.

One relay per schema: the writer connection holds a session advisory lock on the
schema for as long as it is open; a second relay on the same schema is refused, as a
second relay on one data directory is (relay/app.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from agent_sdk.wire import decode_receipt
from relay.inbox import Item
from relay.store import COLUMNS, Head, Located, Record, row, scan_by_reading


class StoreInUse(Exception):
    """Another relay holds this schema (its writer connection's advisory lock)."""


class StoreUnavailable(Exception):
    """The server cannot be reached or refused the DSN; the message says which."""


KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
              "keepalives_count": 3}  # fmt: skip
"""TCP keepalives on every connection, from the relay's side: a dead server is noticed
in about a minute, not the OS's two hours. (A DSN that sets them wins.)"""

SERVER_KEEPALIVES = {"tcp_keepalives_idle": 30, "tcp_keepalives_interval": 10,
                     "tcp_keepalives_count": 3}  # fmt: skip
"""The same from the server's side, on the sessions that hold a schema lock: the
server frees a lock only when it ends the session, and it notices a relay host that
died (or was cut off) only by its own keepalives, whose default is the OS's (about
two hours on Linux). Set per session where neither the server's configuration nor
the DSN's ``options`` set them; over a Unix socket they do not apply."""


def connect(dsn: str, *, autocommit: bool) -> psycopg.Connection[Any]:
    try:
        settings = {"connect_timeout": 10, **KEEPALIVES, **conninfo_to_dict(dsn)}
        return psycopg.connect(make_conninfo("", **settings), autocommit=autocommit)
    except psycopg.Error as exc:
        raise StoreUnavailable(f"PostgreSQL store: {exc}".strip()) from None


def schema_of(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT current_schema()").fetchone()
    if row is None or row[0] is None:
        raise StoreUnavailable("PostgreSQL store: the DSN's search_path names no schema")
    return str(row[0])


LOCK_WAIT = 5.0
"""Seconds to wait for the schema's lock: the server ends a killed relay's session
(and so releases its lock) only once it notices the connection is gone."""


def hold_schema(conn: psycopg.Connection[Any], what: str) -> None:
    """Take the session advisory lock for ``what`` in this schema, or raise."""
    for name, seconds in SERVER_KEEPALIVES.items():
        found = conn.execute("SELECT source FROM pg_settings WHERE name = %s", (name,))
        source = found.fetchone()
        if source is not None and source[0] == "default":  # (else the server's or DSN's)
            conn.execute(f"SET {name} = {seconds}")
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        row = conn.execute(
            "SELECT pg_try_advisory_lock(hashtext(current_schema() || '/' || %s))", (what,)
        ).fetchone()
        if row and row[0]:
            return
        if time.monotonic() >= deadline:
            schema = schema_of(conn)
            raise StoreInUse(f"PostgreSQL schema {schema!r} is in use by a running relay")
        time.sleep(0.1)  # (a worker thread) polling is how one waits for a try-lock


class PostgresStore:
    """:class:`relay.store.Store` on PostgreSQL; ``prefix`` names a second set of
    tables in the same schema (``mirror_`` for the logs a federated relay follows)."""

    blocking = True
    quick_finds = False  # a round trip to the server

    def __init__(self, dsn: str, *, prefix: str = "", readonly: bool = False) -> None:
        if not prefix.replace("_", "").isalnum() and prefix:
            raise ValueError(f"table prefix {prefix!r}: letters, digits and _ only")
        self.events = f"{prefix}events"
        self.heads_table = f"{prefix}heads"
        self.readonly = readonly
        self._writer: psycopg.Connection[Any] | None = None
        opened: list[psycopg.Connection[Any]] = []
        try:
            if not readonly:
                self._writer = connect(dsn, autocommit=True)
                opened.append(self._writer)
                # A receipt goes out once COMMIT returns: it must mean flushed to disk,
                # whatever the server's default says.
                self._writer.execute("SET synchronous_commit = on")
                hold_schema(self._writer, self.events)
                self._create()
            self._reader = connect(dsn, autocommit=True)
            opened.append(self._reader)
            self._finder = connect(dsn, autocommit=True)
            opened.append(self._finder)
            if readonly:
                for conn in (self._reader, self._finder):
                    conn.execute("SET default_transaction_read_only = on")
                if not self._exists():
                    raise StoreUnavailable(f"PostgreSQL store: no table {self.events} there")
        except BaseException:
            for conn in opened:
                conn.close()
            raise

    def _exists(self) -> bool:
        row = self._reader.execute("SELECT to_regclass(%s)", (self.events,)).fetchone()
        return row is not None and row[0] is not None

    def _create(self) -> None:
        assert self._writer is not None
        with self._writer.transaction():
            self._writer.execute(
                f"CREATE TABLE IF NOT EXISTS {self.events} ("
                " ns text NOT NULL, seq bigint NOT NULL, id bytea NOT NULL UNIQUE,"
                " kind text NOT NULL, author bytea NOT NULL, hlc bigint NOT NULL,"
                " event bytea NOT NULL, sig bytea NOT NULL, receipt bytea NOT NULL,"
                " seal bytea, PRIMARY KEY (ns, seq))"
            )
            self._writer.execute(
                f"CREATE TABLE IF NOT EXISTS {self.heads_table} ("
                " ns text PRIMARY KEY, receipt bytea NOT NULL)"
            )

    def append(self, records: Sequence[Record]) -> None:
        assert self._writer is not None, "a read-only store"
        conn = self._writer
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {self.events} ({COLUMNS}) VALUES "
                "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [row(r) for r in records],
            )
            # One row per namespace keeps start-up O(namespaces), not O(events).
            last = {r.ns: r.receipt for r in records}
            cur.executemany(
                f"INSERT INTO {self.heads_table} (ns, receipt) VALUES (%s, %s) "
                "ON CONFLICT (ns) DO UPDATE SET receipt = excluded.receipt",
                list(last.items()),
            )

    def prune(self, ns: str, seqs: Sequence[int]) -> int:
        assert self._writer is not None, "a read-only store"
        conn = self._writer
        where = "ns = %s AND seq = ANY(%s) AND kind IN ('doc.update', 'doc.compacted')"
        with conn.transaction():
            row = conn.execute(
                "SELECT coalesce(sum(length(event) + length(sig)), 0) "
                f"FROM {self.events} WHERE {where}",
                (ns, list(seqs)),
            ).fetchone()
            conn.execute(
                f"UPDATE {self.events} SET event = '', sig = '' WHERE {where}", (ns, list(seqs))
            )
        return int(row[0]) if row else 0

    def stored_bytes(self, ns: str) -> int:
        row = self._reader.execute(
            "SELECT coalesce(sum(length(event) + length(sig) + length(receipt)), 0) "
            f"FROM {self.events} WHERE ns = %s",
            (ns,),
        ).fetchone()
        return int(row[0]) if row else 0

    def read(self, ns: str, start: int, limit: int) -> list[Record]:
        rows = self._reader.execute(
            f"SELECT {COLUMNS} FROM {self.events} WHERE ns = %s AND seq >= %s "
            "ORDER BY seq LIMIT %s",
            (ns, start, limit),
        ).fetchall()
        return [_record(row) for row in rows]

    def find(self, ids: Iterable[bytes]) -> dict[bytes, Located]:
        wanted = list(ids)
        if not wanted:
            return {}
        rows = self._finder.execute(
            f"SELECT id, ns, seq, hlc FROM {self.events} WHERE id = ANY(%s)", (wanted,)
        ).fetchall()
        return {bytes(event_id): Located(ns, seq, hlc) for event_id, ns, seq, hlc in rows}

    def record(self, event_id: bytes) -> Record | None:
        row = self._reader.execute(
            f"SELECT {COLUMNS} FROM {self.events} WHERE id = %s", (event_id,)
        ).fetchone()
        return None if row is None else _record(row)

    def heads(self) -> dict[str, Head]:
        heads = {}
        for ns, raw in self._reader.execute(f"SELECT ns, receipt FROM {self.heads_table}"):
            receipt = decode_receipt(bytes(raw))
            heads[ns] = Head(ns, receipt.seq, receipt.hash, receipt.hlc)
        return heads

    def namespaces(self) -> list[str]:
        rows = self._reader.execute(f'SELECT ns FROM {self.heads_table} ORDER BY ns COLLATE "C"')
        return [ns for (ns,) in rows]

    def scan(self, ns: str) -> Iterator[Record]:
        return scan_by_reading(self, ns)

    def close(self) -> None:
        for conn in (self._writer, self._reader, self._finder):
            if conn is not None:
                conn.close()


def _record(row: tuple[Any, ...]) -> Record:
    ns, seq, event_id, kind, author, hlc, event, sig, receipt, seal = row
    return Record(
        ns,
        seq,
        bytes(event_id),
        kind,
        bytes(author),
        hlc,
        bytes(event),
        bytes(sig),
        bytes(receipt),
        None if seal is None else bytes(seal),
    )


class PostgresInboxStore:
    """:class:`relay.inbox.InboxStore` on PostgreSQL, next to the logs (tables
    ``inbox`` and ``inbox_agents``). One connection; the relay's inbox writer is the
    only caller that writes, and each call is one transaction."""

    blocking = True

    def __init__(self, dsn: str) -> None:
        self._db = connect(dsn, autocommit=True)
        self._lock = threading.Lock()
        try:
            # A sender hears "stored" once the transaction returns: it must be flushed,
            # whatever the server's default says (as for the logs' writer).
            self._db.execute("SET synchronous_commit = on")
            hold_schema(self._db, "inbox")
            with self._db.transaction():
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS inbox (recipient bytea NOT NULL,"
                    " seq bigint NOT NULL, kind text NOT NULL, mid bytea NOT NULL,"
                    " sender bytea NOT NULL, data bytea NOT NULL, expires_ms bigint NOT NULL,"
                    " origin text NOT NULL, PRIMARY KEY (recipient, seq))"
                )
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS inbox_agents (agent bytea PRIMARY KEY)"
                )
        except BaseException:
            self._db.close()
            raise

    def load(self) -> tuple[list[Item], list[bytes]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT recipient, seq, kind, mid, sender, data, expires_ms, origin FROM inbox"
                " ORDER BY recipient, seq"
            ).fetchall()
            agents = [bytes(a) for (a,) in self._db.execute("SELECT agent FROM inbox_agents")]
        items = [
            Item(bytes(r), seq, kind, bytes(mid), bytes(sender), bytes(data), exp, origin)
            for r, seq, kind, mid, sender, data, exp, origin in rows
        ]
        return items, agents

    def apply(self, put: Sequence[Item], drop: Sequence[Item]) -> None:
        rows = [(i.recipient, i.seq, i.kind, i.mid, i.sender, i.data, i.expires_ms, i.origin)
                for i in put]  # fmt: skip
        gone = [(i.recipient, i.seq) for i in drop]
        self._write(
            ("DELETE FROM inbox WHERE recipient = %s AND seq = %s", gone),
            ("INSERT INTO inbox VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", rows),
        )

    def know(self, agents: Sequence[bytes]) -> None:
        self._write(
            (
                "INSERT INTO inbox_agents VALUES (%s) ON CONFLICT DO NOTHING",
                [(a,) for a in agents],
            )
        )

    def _write(self, *statements: tuple[str, Sequence[tuple[object, ...]]]) -> None:
        with self._lock, self._db.transaction(), self._db.cursor() as cur:
            for statement, rows in statements:
                if rows:
                    cur.executemany(statement, rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()
