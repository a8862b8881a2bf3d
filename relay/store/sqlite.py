"""The embedded store: one SQLite file in WAL mode under the relay's data directory.

Writes go through one connection and reads through another, each used by one worker
thread at a time (the relay serialises them with locks), so a long replay read never
blocks a commit: WAL lets readers see the last committed state while a writer appends.
``synchronous=FULL`` makes each commit durable against power loss, not only against a
crashed process; group commit (one transaction per batch) is what makes that affordable.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from agent_sdk.wire import decode_receipt
from relay.store import COLUMNS, Head, Located, Record, row, scan_by_reading

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    ns      TEXT    NOT NULL,
    seq     INTEGER NOT NULL,
    id      BLOB    NOT NULL UNIQUE,
    kind    TEXT    NOT NULL,
    author  BLOB    NOT NULL,
    hlc     INTEGER NOT NULL,
    event   BLOB    NOT NULL,
    sig     BLOB    NOT NULL,
    receipt BLOB    NOT NULL,
    seal    BLOB,
    PRIMARY KEY (ns, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS heads (
    ns      TEXT    PRIMARY KEY,
    receipt BLOB    NOT NULL
) WITHOUT ROWID;
"""

_FIND_CHUNK = 500  # stay under SQLite's bound-parameter limit
_INSERT_ROWS = 64  # rows per INSERT: 640 parameters, under the oldest limit (999)


class SQLiteStore:
    """:class:`relay.store.Store` on a SQLite file (created if absent)."""

    blocking = True
    quick_finds = True  # a primary-key lookup in a local file, usually in the page cache

    def __init__(self, path: Path, *, synchronous: str = "FULL", readonly: bool = False) -> None:
        """Open (and create, unless ``readonly``) the store at ``path``.

        ``readonly`` opens an existing file for reading only — offline verification of
        a live relay's data must not write to it.
        """
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        self.path = path
        self.readonly = readonly
        if not readonly:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = self._connect(path)
            self._writer.execute(f"PRAGMA synchronous={synchronous}")
            self._writer.executescript(SCHEMA)
        self._reader = self._connect(path)
        # Duplicate and dependency look-ups get their own connection, so publishing
        # never waits behind a subscriber's replay.
        self._finder = self._connect(path)

    def _connect(self, path: Path) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one per batch.
        if self.readonly:
            conn = connect_readonly(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=10000")
            return conn
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # Compaction frees pages; incremental vacuum gives them back to the disk. The
        # mode sticks only on a new file, and only if set before WAL is.
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    def append(self, records: Sequence[Record]) -> None:
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Many rows per INSERT, not executemany: that takes the GIL back for every
            # row, and with the event loop busy each of those waits. With 20 agents
            # claiming (bench/compare_claims.py) a commit took 2.2 ms in the relay's
            # thread that way, 1.6 ms this way.
            for i in range(0, len(records), _INSERT_ROWS):
                rows = records[i : i + _INSERT_ROWS]
                conn.execute(_insert(len(rows)), [value for r in rows for value in row(r)])
            # One row per namespace keeps start-up O(namespaces), not O(events).
            last = {r.ns: r.receipt for r in records}
            conn.executemany(
                "INSERT INTO heads (ns, receipt) VALUES (?, ?) "
                "ON CONFLICT (ns) DO UPDATE SET receipt = excluded.receipt",
                list(last.items()),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def prune(self, ns: str, seqs: Sequence[int]) -> int:
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            freed = 0
            for i in range(0, len(seqs), _FIND_CHUNK):
                chunk = list(seqs[i : i + _FIND_CHUNK])
                marks = ",".join("?" * len(chunk))
                where = f"ns = ? AND seq IN ({marks}) AND kind IN ('doc.update', 'doc.compacted')"
                (size,) = conn.execute(
                    f"SELECT coalesce(sum(length(event) + length(sig)), 0) FROM events "
                    f"WHERE {where}",
                    [ns, *chunk],
                ).fetchone()
                conn.execute(
                    f"UPDATE events SET event = x'', sig = x'' WHERE {where}", [ns, *chunk]
                )
                freed += size
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        # Each step of this pragma frees one page, and execute() steps it once (it
        # returns no rows, so fetchall() does not step it on): a 10 MB prune left
        # 2,499 pages free that way. executescript() steps it to the end.
        conn.executescript("PRAGMA incremental_vacuum;")
        return int(freed)

    def stored_bytes(self, ns: str) -> int:
        (size,) = self._reader.execute(
            "SELECT coalesce(sum(length(event) + length(sig) + length(receipt)), 0) "
            "FROM events WHERE ns = ?",
            (ns,),
        ).fetchone()
        return int(size)

    def read(self, ns: str, start: int, limit: int) -> list[Record]:
        rows = self._reader.execute(
            f"SELECT {COLUMNS} FROM events WHERE ns = ? AND seq >= ? ORDER BY seq LIMIT ?",
            (ns, start, limit),
        ).fetchall()
        return [Record(*row) for row in rows]

    def find(self, ids: Iterable[bytes]) -> dict[bytes, Located]:
        wanted = list(ids)
        found: dict[bytes, Located] = {}
        for i in range(0, len(wanted), _FIND_CHUNK):
            chunk = wanted[i : i + _FIND_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._finder.execute(
                f"SELECT id, ns, seq, hlc FROM events WHERE id IN ({marks})", chunk
            )
            for event_id, ns, seq, hlc in rows:
                found[event_id] = Located(ns, seq, hlc)
        return found

    def record(self, event_id: bytes) -> Record | None:
        row = self._reader.execute(
            f"SELECT {COLUMNS} FROM events WHERE id = ?", (event_id,)
        ).fetchone()
        return None if row is None else Record(*row)

    def heads(self) -> dict[str, Head]:
        rows = self._reader.execute("SELECT ns, receipt FROM heads").fetchall()
        heads = {}
        for ns, raw in rows:
            receipt = decode_receipt(raw)
            heads[ns] = Head(ns, receipt.seq, receipt.hash, receipt.hlc)
        return heads

    def namespaces(self) -> list[str]:
        return [ns for (ns,) in self._reader.execute("SELECT ns FROM heads ORDER BY ns")]

    def scan(self, ns: str) -> Iterator[Record]:
        return scan_by_reading(self, ns)

    def close(self) -> None:
        if not self.readonly:
            self._writer.close()
        self._reader.close()
        self._finder.close()


def connect_readonly(path: Path, **options: Any) -> sqlite3.Connection:
    """A read-only connection to the SQLite file ``path`` (``options`` as for
    ``sqlite3.connect``).

    A file in WAL mode is read through the -shm index beside it, which SQLite makes
    when there is none (a stopped relay leaves none): on a read-only mount it cannot,
    and the first read fails. There, and only when no -wal holds commits the file
    lacks, the file is opened immutable instead: read with no index and no locks,
    which is right for a file nothing can change.
    """
    uri = path.absolute().as_uri()
    conn: sqlite3.Connection = sqlite3.connect(f"{uri}?mode=ro", uri=True, **options)
    wal = path.with_name(path.name + "-wal")
    if os.access(path.parent, os.W_OK) or (wal.exists() and wal.stat().st_size):
        return conn
    try:
        conn.execute("PRAGMA schema_version")  # (the first read opens the -shm)
        return conn
    except sqlite3.Error:
        conn.close()
    conn = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, **options)
    return conn


@functools.cache
def _insert(rows: int) -> str:
    """An INSERT of ``rows`` events (at most _INSERT_ROWS: a few statements to cache)."""
    return f"INSERT INTO events ({COLUMNS}) VALUES " + ",".join(["(?,?,?,?,?,?,?,?,?,?)"] * rows)
