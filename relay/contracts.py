"""Semantic contracts: a per-namespace registry of event kinds and their versioned
schemas (pure: a fold of the log), enforced on publish.

``schema.register {kind, version, schema, compatible?}`` registers version 1 of a
kind (its author owns the kind) or the next version (the owner only, declaring
whether it is ``compatible`` with the one before). From then on a body of that kind
must fit the version it names in ``"$schema"`` (an integer), or the latest one when
it names none; one that does not is refused with 2014 ``schema_mismatch``, the
reason listing the paths that failed. The schema language is agent_sdk/schemas.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.schemas import SchemaError, check_schema, errors
from agent_sdk.wire import KIND_RE, Event, decode
from relay.store import Record

REGISTER = "schema.register"
VERSION_FIELD = "$schema"
RESERVED = frozenset(
    {"wo", "lease", "lock", "context", "bulletin", "decision", "ckpt", "ctx", "auction", "dir",
     "rep", "doc", "dm", "ns", "constraint", "entity", "schema", "conflict", "route"}
)  # fmt: skip
"""Families whose kinds the relay defines itself: not registrable."""


@dataclass
class Contract:
    owner: bytes
    versions: list[tuple[dict[str, Any], bool]] = field(default_factory=list)
    """Version n is ``versions[n - 1]``: (schema, declared compatible with n - 1)."""


def _bad(reason: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_EVENT, f"schema.register: {reason}")


def parse(body: Any) -> tuple[str, int, dict[str, Any], bool | None]:
    """A ``schema.register`` body, checked; ``bad_event`` naming what is wrong."""
    if not isinstance(body, dict) or set(body) - {"kind", "version", "schema", "compatible"}:
        raise _bad("the body is {kind, version, schema, compatible?}")
    kind, version, schema = body.get("kind"), body.get("version"), body.get("schema")
    if not isinstance(kind, str) or not KIND_RE.fullmatch(kind):
        raise _bad("kind is an event kind, like app.order")
    if kind.partition(".")[0] in RESERVED:
        raise _bad(f"the {kind.partition('.')[0]} family is the relay's own")
    if type(version) is not int or version < 1:
        raise _bad("version is a whole number from 1")
    try:
        check_schema(schema)
    except SchemaError as exc:
        raise _bad(f"the schema does not parse: {exc}") from None
    compatible = body.get("compatible")
    if compatible is not None and not isinstance(compatible, bool):
        raise _bad("compatible is true or false")
    assert isinstance(schema, dict)
    return kind, version, schema, compatible


@dataclass
class Contracts:
    kinds: dict[tuple[str, str], Contract] = field(default_factory=dict)
    """(namespace, kind) -> its contract."""

    def on_sequenced(self, record: Record) -> None:
        if record.kind != REGISTER or not record.event:
            return
        try:
            kind, version, schema, compatible = parse(decode(record.event)["body"])
        except (ProtocolError, KeyError, TypeError):
            return  # refused when published; a mirror takes its home's word
        key = (record.ns, kind)
        contract = self.kinds.get(key)
        if contract is None and version == 1:
            self.kinds[key] = Contract(record.author, [(schema, False)])
        elif (
            contract is not None
            and contract.owner == record.author
            and version == len(contract.versions) + 1
        ):
            contract.versions.append((schema, bool(compatible)))

    def refuse(self, event: Event) -> ProtocolError | None:
        if event.kind == REGISTER:
            try:
                kind, version, _, compatible = parse(event.body)
            except ProtocolError as exc:
                return exc
            contract = self.kinds.get((event.ns, kind))
            latest = len(contract.versions) if contract else 0
            if version != latest + 1:
                return _bad(f"{kind} is at version {latest}: register {latest + 1}")
            if contract is not None and contract.owner != event.author:
                reason = f"{kind} is registered by {contract.owner.hex()}: only it adds versions"
                return ProtocolError(ErrorCode.FORBIDDEN, reason)
            if version > 1 and compatible is None:
                return _bad("a new version says whether it is compatible: compatible")
            return None
        contract = self.kinds.get((event.ns, event.kind))
        if contract is None:
            return None
        return check_body(contract, event.kind, event.body)


def check_body(contract: Contract, kind: str, body: Any) -> ProtocolError | None:
    """Why ``body`` does not fit its version of ``contract``, or ``None``."""
    version = len(contract.versions)
    if isinstance(body, dict) and VERSION_FIELD in body:
        named = body[VERSION_FIELD]
        if type(named) is not int or not 1 <= named <= len(contract.versions):
            reason = f"{kind} has versions 1 to {len(contract.versions)}, not {named!r}"
            return ProtocolError(ErrorCode.SCHEMA_MISMATCH, reason)
        version = named
        body = {k: v for k, v in body.items() if k != VERSION_FIELD}
    found = errors(contract.versions[version - 1][0], body)
    if not found:
        return None
    return ProtocolError(ErrorCode.SCHEMA_MISMATCH, f"{kind} v{version}: {'; '.join(found)}")
