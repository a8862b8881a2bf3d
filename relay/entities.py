"""Single-writer entities (pure: a fold of the log): one writer per entity at a time.

``entity.declare {entity, writer? | role?}`` names an entity of a namespace (an
account, a price list, a customer record) and its one writer: a key (``writer``, or
the author when neither is given) or a directory role (``role``: whichever member
holds it when the write is decided). A name ending in ``*`` declares every entity of
a kind: ``customer:*`` covers ``customer:42``. From then on an event whose body is a
map with ``"entity": E`` is a write to E, and the relay takes it only from E's
writer: anyone else's is refused with ``forbidden``, the reason naming the writer.
``entity.handover {entity, to? | to_role?}``, signed by the current writer, is the
only way to move the pen; ``entity.release {entity}``, signed by the writer too,
ends the declaration (anyone may write the entity again, or declare it). A
declaration that overlaps one of another writer (the same name, a kind that covers
it, or one it covers) is refused: declaring cannot take an entity from its writer.
Checked where the relay decides events in log order (relay/node.py), like the
namespace policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.wire import KEY_SIZE, Event, decode
from relay.store import Record

DECLARE, HANDOVER, RELEASE = "entity.declare", "entity.handover", "entity.release"
KINDS = frozenset({DECLARE, HANDOVER, RELEASE})
MAX_NAME = 256
MAX_ROLE = 64
KIND_WIDE = "*"
"""A declared name ending in this covers every entity whose name starts with the rest."""

RoleOf = Callable[[str, bytes], str]
"""The directory role a key holds in a namespace ("" for none)."""


@dataclass(frozen=True, slots=True)
class Writer:
    """A key, or every member of a directory role."""

    key: bytes | None = None
    role: str = ""

    def may(self, ns: str, author: bytes, role_of: RoleOf) -> bool:
        if self.key is not None:
            return author == self.key
        return role_of(ns, author) == self.role

    def __str__(self) -> str:
        return self.key.hex() if self.key is not None else f"role {self.role}"


def _bad(reason: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_EVENT, reason)


def _name(body: dict[str, Any]) -> str:
    name = body.get("entity")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or name == KIND_WIDE:
        raise _bad(f"entity is a name of 1 to {MAX_NAME} characters (a kind: prefix*)")
    return name


def _writer(body: dict[str, Any], key_field: str, role_field: str) -> Writer | None:
    key, role = body.get(key_field), body.get(role_field)
    if key is not None and role is not None:
        raise _bad(f"a writer is a key ({key_field}) or a role ({role_field}), not both")
    if key is not None:
        if not isinstance(key, bytes) or len(key) != KEY_SIZE:
            raise _bad(f"{key_field} is a 32-byte key")
        return Writer(key=key)
    if role is not None:
        if not isinstance(role, str) or not 0 < len(role) <= MAX_ROLE:
            raise _bad(f"{role_field} is a directory role of 1 to {MAX_ROLE} characters")
        return Writer(role=role)
    return None


def check(event: Event) -> tuple[str, Writer | None] | None:
    """The entity and writer an ``entity.*`` event sets (no writer: a release), or
    ``bad_event``; ``None`` for other kinds."""
    if event.kind not in KINDS:
        return None
    body = event.body
    if not isinstance(body, dict):
        raise _bad(f"{event.kind}: the body is a map")
    fields = {DECLARE: ("writer", "role"), HANDOVER: ("to", "to_role"), RELEASE: ()}[event.kind]
    allowed = {"entity", *fields}
    if set(body) - allowed:
        raise _bad(f"{event.kind}: only {', '.join(sorted(allowed))}")
    name = _name(body)
    if event.kind == RELEASE:
        return name, None
    writer = _writer(body, *fields)
    if event.kind == DECLARE:
        return name, writer or Writer(key=event.author)
    if writer is None:
        raise _bad("entity.handover names whom it hands to: to (a key) or to_role")
    return name, writer


def _covers(declared: str, name: str) -> bool:
    if declared.endswith(KIND_WIDE):
        return name.startswith(declared[:-1])
    return declared == name


def _overlap(a: str, b: str) -> bool:
    """Whether two declared names can govern one entity (for two kinds: one's prefix
    starts the other's)."""
    return _covers(a, b) or _covers(b, a)


@dataclass
class Entities:
    writers: dict[tuple[str, str], Writer] = field(default_factory=dict)
    """(namespace, declared name) -> its one writer."""
    kinds: dict[str, list[str]] = field(default_factory=dict)
    """namespace -> its kind-wide declarations (names ending in ``*``)."""

    def writer_of(self, ns: str, entity: str) -> tuple[str, Writer] | None:
        """The declaration that governs ``entity``: its own, else the longest kind."""
        exact = self.writers.get((ns, entity))
        if exact is not None:
            return entity, exact
        covering = [k for k in self.kinds.get(ns, ()) if _covers(k, entity)]
        if not covering:
            return None
        longest = max(covering, key=len)
        return longest, self.writers[(ns, longest)]

    def _overlapping(self, ns: str, name: str) -> tuple[str, Writer] | None:
        if (ns, name) in self.writers:
            return name, self.writers[(ns, name)]
        for kind in self.kinds.get(ns, ()):
            if _overlap(kind, name):
                return kind, self.writers[(ns, kind)]
        if name.endswith(KIND_WIDE):
            for (n, declared), writer in self.writers.items():
                if n == ns and _covers(name, declared):
                    return declared, writer
        return None

    def on_sequenced(self, record: Record) -> None:
        """Fold a sequenced ``entity.*`` event. The relay checked its author before
        sequencing it (:meth:`refuse`), so only the state is checked here: a mirror,
        which has no directory to ask about roles, folds its home's events the same."""
        if record.kind not in KINDS or not record.event:
            return
        try:
            fields = decode(record.event)
            event = Event(record.ns, record.kind, record.author, fields["body"])
            name, writer = check(event)  # type: ignore[misc]
        except (ProtocolError, KeyError, TypeError, ValueError):
            return  # the relay refused such an event; a mirror takes its home's word
        if record.kind == DECLARE:
            applies = self._overlapping(record.ns, name) is None
        else:
            applies = (record.ns, name) in self.writers
        if applies and writer is None:
            self._drop(record.ns, name)
        elif applies and writer is not None:
            self._set(record.ns, name, writer)

    def _set(self, ns: str, name: str, writer: Writer) -> None:
        if (ns, name) not in self.writers and name.endswith(KIND_WIDE):
            self.kinds.setdefault(ns, []).append(name)
        self.writers[(ns, name)] = writer

    def _drop(self, ns: str, name: str) -> None:
        del self.writers[(ns, name)]
        if name.endswith(KIND_WIDE):
            self.kinds[ns].remove(name)

    def refuse(self, event: Event, writer: bytes, role_of: RoleOf) -> ProtocolError | None:
        """Why ``event`` (written by ``writer``) may not be taken, or ``None``."""
        try:
            declared = check(event)
        except ProtocolError as exc:
            return exc
        if declared is not None:
            return self._refuse_declared(event, declared[0], role_of)
        body = event.body
        if not isinstance(body, dict) or not isinstance(body.get("entity"), str):
            return None  # not a write to an entity
        governing = self.writer_of(event.ns, body["entity"])
        if governing is not None and not governing[1].may(event.ns, writer, role_of):
            return _forbidden(body["entity"], governing[1], "has one writer")
        return None

    def _refuse_declared(self, event: Event, name: str, role_of: RoleOf) -> ProtocolError | None:
        if event.kind == DECLARE:
            taken = self._overlapping(event.ns, name)
            if taken is not None:
                why = "is declared already" if taken[0] == name else f"overlaps {taken[0]}"
                return _forbidden(name, taken[1], why)
            return None
        current = self.writers.get((event.ns, name))
        if current is None:
            return _bad(f"entity {name} is not declared")
        if not current.may(event.ns, event.author, role_of):
            done = "handed over" if event.kind == HANDOVER else "released"
            return _forbidden(name, current, f"is {done} only by its writer")
        return None


def _forbidden(name: str, writer: Writer, why: str) -> ProtocolError:
    return ProtocolError(ErrorCode.FORBIDDEN, f"entity {name} {why}: {writer}")
