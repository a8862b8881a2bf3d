"""What waits to be routed: a namespace's routed events not told yet (pure).

Theory of operation
-------------------
decisions.py queues one :class:`Routed` item for each role a routed event goes to,
and the relay's timer tells them: every ``now`` item in a ``route.notice`` at its
next wake, a role's ``digest`` items in a ``route.digest`` once the oldest of them
waited ``digest_ms`` or the role gathered ``MAX_DIGEST``. The timer asks when that is
after every coordination outcome of the namespace, and each routed event moves it, so
the answer must not be a pass over all that waits: a single list of every item cost
about 1 ms a routed event at 8,000 waiting (roles told in digests, a long
``digest_ms``).

The items are kept the way they are told: the ``now`` items in one queue and each
role's ``digest`` items in a queue of its own, each in arrival order. What is due
next is then a look at the front of each queue: the first ``now`` item's time, and
per role its first item's time plus ``digest_ms`` or, when it holds ``MAX_DIGEST``,
the time of the ``MAX_DIGEST``-th. A wake reads what it tells and no more: notices
take the whole ``now`` queue and a digest the front of its role's queue, so telling
pops fronts. A removal elsewhere (not in a log the timer wrote, but a replay applies
what it reads) filters the one queue it touches.

Each item carries its arrival number: the timer tells due roles in the order their
oldest item arrived, as the single list did, and two :class:`Waiting` compare as that
list. Times come from the log's clock and never go back; if they did, the ``now``
queue's earliest time would be found by a pass over it, so the answers stay the same.
"""

from __future__ import annotations

import enum
import heapq
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

MAX_DIGEST = 256
"""Events in one digest: a role that gathered this many gets its digest at once."""


class Latency(enum.StrEnum):
    NOW = "now"
    DIGEST = "digest"


@dataclass(frozen=True, slots=True)
class Routed:
    """An event waiting for its notice or digest (one per role it is routed to)."""

    event: bytes
    kind: str
    entity: str | None
    role: str
    to: tuple[bytes, ...]
    at_ms: int
    latency: Latency
    """Fixed when queued: ``now`` if any route of the kind to the role says so."""


Queue = deque[tuple[int, Routed]]
"""Items with their arrival numbers, oldest first."""


class Waiting:
    """The routed items not told yet: in arrival order, as :meth:`__iter__` lists them."""

    def __init__(self, items: Iterable[Routed] = ()) -> None:
        self.now: Queue = deque()
        self.gathered: dict[str, Queue] = {}
        """role -> its ``digest`` items; a role with none has no entry."""
        self._held: Counter[tuple[bytes, str, Latency]] = Counter()
        """How many items of each (event, role, latency) the queues hold: what a
        removal takes from a queue, known before it reads the queue."""
        self._arrived = 0
        self._now_in_order = True
        """The ``now`` queue's times never go back: its first is its earliest."""
        for item in items:
            self.add(item)

    def add(self, item: Routed) -> None:
        self._arrived += 1
        if item.latency is Latency.NOW:
            if self.now and item.at_ms < self.now[-1][1].at_ms:
                self._now_in_order = False
            self.now.append((self._arrived, item))
        else:
            self.gathered.setdefault(item.role, deque()).append((self._arrived, item))
        self._held[item.event, item.role, item.latency] += 1

    def next_due_ms(self, digest_ms: int) -> int | None:
        """When the timer next has something to tell, if anything waits."""
        times = [_first_due(queue, digest_ms) for queue in self.gathered.values()]
        if self.now:
            now = self.now
            times.append(now[0][1].at_ms if self._now_in_order else min(i.at_ms for _, i in now))
        return min(times, default=None)

    def due(self, now_ms: int, digest_ms: int) -> list[tuple[str, list[Routed]]]:
        """The digests due at ``now_ms``, as (role, items): a role's oldest
        ``MAX_DIGEST`` at a time while it holds that many or its oldest waited
        ``digest_ms``; roles in the order their oldest item arrived. Nothing is removed:
        :meth:`drop` does, as replay will."""
        roles = sorted(
            (queue[0][0], role)
            for role, queue in self.gathered.items()
            if _digest_due(queue, 0, now_ms, digest_ms)
        )
        out = []
        for _, role in roles:
            queue, start = self.gathered[role], 0
            while _digest_due(queue, start, now_ms, digest_ms):
                told = islice(queue, start, start + MAX_DIGEST)
                out.append((role, [item for _, item in told]))
                start += MAX_DIGEST
        return out

    def drop(self, gone: set[tuple[bytes, str]]) -> None:
        """Remove every item of each (event, role) in ``gone``."""
        counts: dict[str | None, int] = {}  # queue (None: the now queue) -> items to remove
        for event, role in gone:
            for latency, name in ((Latency.NOW, None), (Latency.DIGEST, role)):
                if held := self._held.pop((event, role, latency), 0):
                    counts[name] = counts.get(name, 0) + held
        for name, count in counts.items():
            queue = self.now if name is None else self.gathered[name]
            told = 0
            while queue and (queue[0][1].event, queue[0][1].role) in gone:
                queue.popleft()
                told += 1
            if told < count:  # not all at the front: the rest are further in
                kept = [entry for entry in queue if (entry[1].event, entry[1].role) not in gone]
                queue.clear()
                queue.extend(kept)
            if not queue:
                if name is None:
                    self._now_in_order = True
                else:
                    del self.gathered[name]

    def __iter__(self) -> Iterator[Routed]:
        """Every item, in arrival order."""
        for _, item in heapq.merge(self.now, *self.gathered.values()):
            yield item

    def __len__(self) -> int:
        return len(self.now) + sum(len(queue) for queue in self.gathered.values())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Waiting):
            return NotImplemented
        return list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # (mutable, like the list it stands for)

    def __repr__(self) -> str:
        return f"Waiting({list(self)!r})"


def _first_due(queue: Queue, digest_ms: int) -> int:
    """When a role's digest is due: at once once it gathered ``MAX_DIGEST`` (when the
    ``MAX_DIGEST``-th came), else ``digest_ms`` after its oldest item."""
    if len(queue) >= MAX_DIGEST:
        return queue[MAX_DIGEST - 1][1].at_ms
    return queue[0][1].at_ms + digest_ms


def _digest_due(queue: Queue, start: int, now_ms: int, digest_ms: int) -> bool:
    """Whether the items from ``start`` on make a digest at ``now_ms``: a full one, or
    their oldest waited ``digest_ms`` (a full one goes whatever the times say)."""
    left = len(queue) - start
    return left >= MAX_DIGEST or (left > 0 and queue[start][1].at_ms + digest_ms <= now_ms)
