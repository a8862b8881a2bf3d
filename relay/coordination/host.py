"""The relay's coordination host: one coordinator per namespace, fed in log order (pure).

The node calls :meth:`Host.on_sequenced` for every record the moment the sequencer
places it — before commit, so a request's outcome joins the same commit batch, right
behind it — and appends the outcome the host returns as a relay-signed event with the
request in its ``deps``. Time is the record's own HLC, so deciding is a fold: at
start-up :meth:`Host.rebuild` feeds the stored logs through the same path and reaches
the same state, and the outcomes it computes equal the ones in the log.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agent_sdk.wire import decode
from relay.coordination.requests import EXPIRED, REQUEST_KINDS, Coordinator, Outcome
from relay.sequencer import HLC_SHIFT
from relay.store import Record


@dataclass
class Host:
    relay_key: bytes
    coordinators: dict[str, Coordinator] = field(default_factory=dict)

    def on_sequenced(self, record: Record) -> Outcome | None:
        """The outcome to append after ``record``, if it is a coordination request.

        A ``lease.expired`` written by this relay is replayed, not decided again.
        """
        if record.kind in REQUEST_KINDS:
            body = _body(record)
            coordinator = self.coordinators.setdefault(record.ns, Coordinator())
            now_ms = record.hlc >> HLC_SHIFT
            return coordinator.decide(record.kind, body, record.author, record.id, now_ms)
        if record.kind == EXPIRED and record.author == self.relay_key:
            coordinator = self.coordinators.setdefault(record.ns, Coordinator())
            coordinator.replay_expired(_body(record))
        return None

    def rebuild(self, records: Iterable[Record]) -> int:
        """Fold stored records (each namespace in seq order); returns how many."""
        count = 0
        for record in records:
            self.on_sequenced(record)
            count += 1
        return count

    def due(self, now_ms: int) -> list[tuple[str, Outcome]]:
        """The timer's outcomes: ``lease.expired`` per namespace with lapsed claims."""
        out = []
        for ns, coordinator in self.coordinators.items():
            expired = coordinator.expire(now_ms)
            if expired is not None:
                out.append((ns, expired))
        return out

    def next_expiry_ms(self) -> int | None:
        times = [c.next_expiry_ms() for c in self.coordinators.values()]
        return min((t for t in times if t is not None), default=None)


def _body(record: Record) -> Any:
    fields = decode(record.event)
    return fields.get("body") if isinstance(fields, dict) else None
