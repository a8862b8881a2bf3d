"""Subscription filters and cursors (pure: no I/O).

A subscription is a cursor per namespace, not a queue: the relay reads the committed
log from the cursor and sends what matches, so a slow reader costs log reads, never
memory, and resuming is just a cursor (the AT Protocol firehose model).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.frames import Subscribe
from agent_sdk.wire import KEY_SIZE, KIND_RE, NS_RE
from relay.store import Record

MAX_FILTER_ITEMS = 256


@dataclass(frozen=True, slots=True)
class Filter:
    kinds: frozenset[str]
    families: tuple[str, ...]
    authors: frozenset[bytes]

    @classmethod
    def of(cls, request: Subscribe) -> Filter:
        """Build the filter of a subscribe frame; raises ``ProtocolError(MALFORMED)``."""
        if not request.ns:
            raise ProtocolError(ErrorCode.MALFORMED, "subscribe names no namespace")
        for items in (request.ns, request.kinds, request.authors):
            if len(items) > MAX_FILTER_ITEMS:
                raise ProtocolError(ErrorCode.MALFORMED, f"over {MAX_FILTER_ITEMS} filter items")
        for ns in request.ns:
            if not NS_RE.fullmatch(ns):
                raise ProtocolError(ErrorCode.MALFORMED, f"bad namespace {ns!r}")
        for ns in request.start:
            if ns not in request.ns:
                raise ProtocolError(ErrorCode.MALFORMED, f"from names {ns!r}, not subscribed")
        kinds, families = set(), []
        for kind in request.kinds:
            if kind.endswith(".*") and KIND_RE.fullmatch(kind[:-2]):
                families.append(kind[:-1])  # keep the dot: "wo." matches "wo.claim"
            elif KIND_RE.fullmatch(kind):
                kinds.add(kind)
            else:
                reason = f"bad kind filter {kind!r}: a kind (app.note) or a family (app.*)"
                raise ProtocolError(ErrorCode.MALFORMED, reason)
        if any(len(author) != KEY_SIZE for author in request.authors):
            raise ProtocolError(ErrorCode.MALFORMED, "author filters are 32-byte keys")
        return cls(frozenset(kinds), tuple(families), frozenset(request.authors))

    def matches(self, record: Record) -> bool:
        if self.authors and record.author not in self.authors:
            return False
        if not self.kinds and not self.families:
            return True
        return record.kind in self.kinds or record.kind.startswith(self.families)


def check_cursor(ns: str, start: int, head: int) -> None:
    """A cursor may point anywhere in the log or just past it, never beyond."""
    if start < 1 or start > head + 1:
        raise ProtocolError(
            ErrorCode.BAD_CURSOR,
            f"from {start} is outside {ns}: head is {head}, allowed 1..{head + 1}",
        )
