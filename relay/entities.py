"""Single-writer entities (pure: a fold of the log): one key writes an entity at a time.

``entity.declare {entity, writer?}`` names an entity of a namespace (an account, a
price list, a customer record) and its one writer (the author, unless ``writer``
says another key). From then on an event whose body is a map with ``"entity": E``
is a write to E, and the relay takes it only from E's writer: anyone else's is
refused with ``forbidden``, the reason naming the writer. ``entity.handover {entity,
to}``, signed by the current writer, is the only way to move the pen. Checked where
the relay decides events in log order (relay/node.py), like the namespace policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.wire import KEY_SIZE, Event, decode
from relay.store import Record

DECLARE, HANDOVER = "entity.declare", "entity.handover"
KINDS = frozenset({DECLARE, HANDOVER})
MAX_NAME = 256


def _bad(reason: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_EVENT, reason)


def _name(body: dict[str, Any]) -> str:
    name = body.get("entity")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise _bad(f"entity is a name of 1 to {MAX_NAME} characters")
    return name


def _key(body: dict[str, Any], field_name: str) -> bytes | None:
    key = body.get(field_name)
    if key is None:
        return None
    if not isinstance(key, bytes) or len(key) != KEY_SIZE:
        raise _bad(f"{field_name} is a 32-byte key")
    return key


def check(event: Event) -> tuple[str, bytes] | None:
    """The entity and writer an ``entity.*`` event sets, or ``bad_event``; ``None``
    for other kinds."""
    if event.kind not in KINDS:
        return None
    body = event.body
    if not isinstance(body, dict):
        raise _bad(f"{event.kind}: the body is a map")
    allowed = {"entity", "writer"} if event.kind == DECLARE else {"entity", "to"}
    if set(body) - allowed:
        raise _bad(f"{event.kind}: only {', '.join(sorted(allowed))}")
    name = _name(body)
    if event.kind == DECLARE:
        return name, _key(body, "writer") or event.author
    to = _key(body, "to")
    if to is None:
        raise _bad("entity.handover names the key it hands to: to")
    return name, to


@dataclass
class Entities:
    writers: dict[tuple[str, str], bytes] = field(default_factory=dict)
    """(namespace, entity) -> its one writer."""

    def on_sequenced(self, record: Record) -> None:
        if record.kind not in KINDS or not record.event:
            return
        try:
            fields = decode(record.event)
            event = Event(record.ns, record.kind, record.author, fields["body"])
            name, writer = check(event)  # type: ignore[misc]
        except (ProtocolError, KeyError, TypeError, ValueError):
            return  # the relay refused such an event; a mirror takes its home's word
        key = (record.ns, name)
        current = self.writers.get(key)
        if (record.kind == DECLARE and current is None) or (
            record.kind == HANDOVER and current == record.author
        ):
            self.writers[key] = writer

    def refuse(self, event: Event, writer: bytes) -> ProtocolError | None:
        """Why ``event`` (written by ``writer``) may not be taken, or ``None``."""
        try:
            declared = check(event)
        except ProtocolError as exc:
            return exc
        if declared is not None:
            key = (event.ns, declared[0])
            current = self.writers.get(key)
            if event.kind == DECLARE and current is not None:
                return _forbidden(declared[0], current, "is declared already")
            if event.kind == HANDOVER and current != writer:
                if current is None:
                    return _bad(f"entity {declared[0]} is not declared")
                return _forbidden(declared[0], current, "hands over only by its writer")
            return None
        body = event.body
        if not isinstance(body, dict) or not isinstance(body.get("entity"), str):
            return None  # not a write to an entity
        current = self.writers.get((event.ns, body["entity"]))
        if current is not None and current != writer:
            return _forbidden(body["entity"], current, "has one writer")
        return None


def _forbidden(name: str, writer: bytes, why: str) -> ProtocolError:
    return ProtocolError(ErrorCode.FORBIDDEN, f"entity {name} {why}: {writer.hex()}")
