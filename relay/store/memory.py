"""A store held in memory: for virtual-time simulations and tests under ``MockClock``.

It keeps the same contract as every store except durability (it dies with the
process). It never blocks, so the relay calls it inline instead of from a worker
thread; that keeps runs under trio's virtual clock deterministic, because no thread
is ever in flight while the clock jumps.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace

from agent_sdk.wire import decode_receipt
from relay.store import PRUNABLE, Head, Located, Record


class MemoryStore:
    blocking = False
    quick_finds = True

    def __init__(self) -> None:
        self._logs: dict[str, list[Record]] = {}
        self._by_id: dict[bytes, Record] = {}

    def append(self, records: Sequence[Record]) -> None:
        # Check the whole batch first, so that a bad batch leaves nothing behind.
        heads = {ns: len(log) for ns, log in self._logs.items()}
        ids = set()
        for record in records:
            if record.id in self._by_id or record.id in ids:
                raise ValueError(f"UNIQUE constraint: event {record.id.hex()} is stored")
            head = heads.get(record.ns, 0)
            if record.seq != head + 1:
                raise ValueError(f"{record.ns}: seq {record.seq} does not follow {head}")
            heads[record.ns] = record.seq
            ids.add(record.id)
        for record in records:
            self._logs.setdefault(record.ns, []).append(record)
            self._by_id[record.id] = record

    def prune(self, ns: str, seqs: Sequence[int]) -> int:
        log, freed = self._logs.get(ns, []), 0
        for seq in seqs:
            record = log[seq - 1]
            if record.kind in PRUNABLE:
                freed += len(record.event) + len(record.sig)
                log[seq - 1] = self._by_id[record.id] = replace(record, event=b"", sig=b"")
        return freed

    def stored_bytes(self, ns: str) -> int:
        return sum(len(r.event) + len(r.sig) + len(r.receipt) for r in self._logs.get(ns, []))

    def read(self, ns: str, start: int, limit: int) -> list[Record]:
        return self._logs.get(ns, [])[max(start, 1) - 1 : max(start, 1) - 1 + limit]

    def find(self, ids: Iterable[bytes]) -> dict[bytes, Located]:
        found = {}
        for event_id in ids:
            record = self._by_id.get(event_id)
            if record is not None:
                found[event_id] = Located(record.ns, record.seq, record.hlc)
        return found

    def record(self, event_id: bytes) -> Record | None:
        return self._by_id.get(event_id)

    def heads(self) -> dict[str, Head]:
        heads = {}
        for ns, log in self._logs.items():
            receipt = decode_receipt(log[-1].receipt)
            heads[ns] = Head(ns, receipt.seq, receipt.hash, receipt.hlc)
        return heads

    def namespaces(self) -> list[str]:
        return sorted(self._logs)

    def scan(self, ns: str) -> Iterator[Record]:
        yield from list(self._logs.get(ns, []))

    def close(self) -> None:
        pass
