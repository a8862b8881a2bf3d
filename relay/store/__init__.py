"""The append-only store of namespace logs: the interface every backend implements.

A backend is synchronous and single-purpose; the relay calls it from worker threads
(``trio.to_thread``) so that disk waits never stall the event loop. The contract:

* :meth:`Store.append` writes a batch atomically and durably, in seq order, and
  returns only after commit — the relay sends a receipt only after it returns.
* Records are never deleted: a namespace log is append-only, gapless from seq 1, and
  a committed prefix always ends in a sealed receipt. The one update is
  :meth:`Store.prune`: document compaction drops the bytes (event and signature) of
  ``doc.update`` records that a later ``doc.compacted`` covers, and of the earlier
  ``doc.compacted`` records it supersedes; their receipts stay.
* Reads may run concurrently with an append on another thread and see either the old
  or the new committed state, never part of a batch.

The embedded default is :mod:`relay.store.sqlite`; :mod:`relay.store.memory` serves
virtual-time simulations, and :mod:`relay.store.postgres` keeps the logs on a
PostgreSQL server (docs/operations.md, "PostgreSQL").
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

PRUNABLE = ("doc.update", "doc.compacted")
"""The kinds whose bytes compaction may drop (protocol 13.7)."""
MAX_UNSEALED = 16_384
"""A run of unsealed records is at most this many records (protocol 4.4): a home
seals the record that brings its namespace's run to it, so that a mirror need hold
no more records than this while it waits for a seal (14.8), whatever a relay's
``commit_batch`` (four of the default's)."""
MAX_UNSEALED_BYTES = 16 << 20
"""A run of unsealed records is under this many bytes (protocol 4.4): a home seals a
record once the records of its namespace since the last seal, it included, reach it,
so that a mirror need hold no more than this while it waits for a seal (14.8)."""


@dataclass(frozen=True, slots=True)
class Record:
    """One row of a namespace log: an event, its receipt and, on chain heads, a seal.

    ``kind``, ``author`` and ``hlc`` repeat what the event and receipt bytes say, so a
    subscription filter and the causal check need not decode them again.
    """

    ns: str
    seq: int
    id: bytes
    kind: str
    author: bytes
    hlc: int
    event: bytes
    sig: bytes
    receipt: bytes
    seal: bytes | None = None


COLUMNS = "ns, seq, id, kind, author, hlc, event, sig, receipt, seal"
"""A record's fields in their order: the stores' columns (``Record(*row)`` reads one)."""


def row(r: Record) -> tuple[object, ...]:
    """A record's values in the order of :data:`COLUMNS`, as a store writes them."""
    return (r.ns, r.seq, r.id, r.kind, r.author, r.hlc, r.event, r.sig, r.receipt, r.seal)


def unsealed_bytes(event: bytes, sig: bytes, receipt: bytes) -> int:
    """What one record counts towards :data:`MAX_UNSEALED_BYTES`: its event, signature
    (or pruned mark) and receipt bytes. A record compaction pruned later counts less
    than it did when sealed, so a run served again never grows past the bound."""
    return len(event) + len(sig) + len(receipt)


@dataclass(frozen=True, slots=True)
class Head:
    """The last committed receipt of a namespace: where the next one chains on."""

    ns: str
    seq: int
    hash: bytes
    hlc: int


@dataclass(frozen=True, slots=True)
class Located:
    """Where a committed event sits: enough to answer a duplicate or a causal check."""

    ns: str
    seq: int
    hlc: int


class Store(Protocol):
    blocking: bool
    """True when calls may wait on disk or network: the relay then runs them in threads."""
    quick_finds: bool
    """True when :meth:`find` of a few ids is a local index lookup of microseconds:
    the relay then runs it on the event loop, where a thread hop would cost more."""

    def append(self, records: Sequence[Record]) -> None:
        """Commit ``records`` (in seq order per namespace) atomically and durably."""

    def read(self, ns: str, start: int, limit: int) -> list[Record]:
        """Up to ``limit`` records of ``ns`` with ``seq >= start``, in seq order."""

    def find(self, ids: Iterable[bytes]) -> dict[bytes, Located]:
        """Where each of ``ids`` that is committed sits; absent ids are left out."""

    def record(self, event_id: bytes) -> Record | None:
        """The committed record of one event id, or ``None``."""

    def heads(self) -> dict[str, Head]:
        """The head of every namespace in the store."""

    def namespaces(self) -> list[str]:
        """Every namespace that has at least one record, sorted."""

    def prune(self, ns: str, seqs: Sequence[int]) -> int:
        """Drop the event and signature bytes of these records, when they are of a kind
        in ``PRUNABLE`` (updates compacted into a snapshot, snapshots a later one
        supersedes); returns the bytes freed."""
        ...

    def stored_bytes(self, ns: str) -> int:
        """Bytes of event, signature and receipt data stored for ``ns``."""
        ...

    def scan(self, ns: str) -> Iterator[Record]:
        """Every record of ``ns`` in seq order (offline verification, export)."""

    def close(self) -> None: ...


SCAN_BATCH = 1000


def scan_by_reading(store: Store, ns: str) -> Iterator[Record]:
    """:meth:`Store.scan` for a backend that reads in pages: ``read`` until short."""
    start = 1
    while True:
        batch = store.read(ns, start, SCAN_BATCH)
        yield from batch
        if len(batch) < SCAN_BATCH:
            return
        start = batch[-1].seq + 1
