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
from relay.coordination.requests import (
    EXPIRED,
    RELAY_KINDS,
    REQUEST_KINDS,
    Coordinator,
    Outcome,
)
from relay.sequencer import HLC_SHIFT
from relay.store import Record

ANSWER_KINDS = RELAY_KINDS - {EXPIRED}
"""The relay's answers to requests: each names its request in ``req``."""


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

    def rebuild(self, records: Iterable[Record]) -> list[tuple[str, bytes, Outcome]]:
        """Fold stored records (one namespace, in seq order).

        Returns ``(ns, request id, outcome)`` for each request the log holds without
        its outcome: a crash can fall between the commit of a request and the commit
        of its outcome, and the relay appends those outcomes before serving again.
        """
        decided: dict[bytes, tuple[str, Outcome]] = {}
        answered: set[bytes] = set()
        for record in records:
            outcome = self.on_sequenced(record)
            if outcome is not None:
                decided[record.id] = (record.ns, outcome)
            elif record.kind in ANSWER_KINDS and record.author == self.relay_key:
                body = _body(record)
                if isinstance(body, dict) and isinstance(body.get("req"), bytes):
                    answered.add(body["req"])
        return [(ns, req, out) for req, (ns, out) in decided.items() if req not in answered]

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
