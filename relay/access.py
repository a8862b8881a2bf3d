"""Who may read and write a namespace (pure: a fold of the log plus the relay's rule).

Every namespace has an **owner**: the author of its first event (seq 1). Its
**policy** starts ``public`` and changes only by an ``ns.policy`` event that the
owner signs; the owner can also hand the namespace to another key that way. Because
both come from the log, a relay rebuilds them on restart, and a relay that mirrors a
namespace folds the same events and so enforces the same policy for its own agents.

=========  ==================================  ==================================
mode       who may read                        who may write
=========  ==================================  ==================================
public     anyone                              anyone
listed     anyone                              the owner and ``writers``
private    the owner, ``readers``, ``writers``  the owner and ``writers``
=========  ==================================  ==================================

Which namespaces may be created at all is the relay's own rule (its config, not the
log): ``open`` (any key's first event creates one), ``allow`` (only ``creators``),
or ``invite`` (``creators``, or anyone whose creating ``ns.policy`` carries an
invite token the relay signed for that namespace). Under ``allow`` and ``invite`` a
namespace's first event must be its ``ns.policy``: the namespace starts with the
policy its creator chose, never public for a moment.

Checks happen where the relay decides events in log order (relay/node.py), so a
write and a policy change that race are judged in the order the log gives them.
"""

from __future__ import annotations

import enum
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.identity import Identity
from agent_sdk.wire import (
    KEY_SIZE,
    SIG_SIZE,
    Event,
    canonical,
    decode,
    decode_canonical,
    verify_signature,
)
from relay.store import Record

POLICY = "ns.policy"
"""The one kind that changes a namespace's policy or owner."""
OWNER_KINDS = frozenset({POLICY, "decision.policy"})
"""Kinds only a namespace's owner may publish (decision routing: decisions.py)."""
MAX_KEYS = 1024
"""Keys in a policy's ``readers`` or ``writers``."""
INVITE_DOMAIN = b"formicary/v1/ns-invite\x00"
MAX_INVITE = 256


class Mode(enum.StrEnum):
    PUBLIC = "public"
    LISTED = "listed"
    PRIVATE = "private"


class Creation(enum.StrEnum):
    """The relay's rule for creating namespaces (config ``[access] create``)."""

    OPEN = "open"
    ALLOW = "allow"
    INVITE = "invite"


@dataclass(frozen=True, slots=True)
class Policy:
    owner: bytes
    mode: Mode = Mode.PUBLIC
    writers: frozenset[bytes] = frozenset()
    readers: frozenset[bytes] = frozenset()

    def may_write(self, key: bytes) -> bool:
        return self.mode is Mode.PUBLIC or key == self.owner or key in self.writers

    def may_read(self, key: bytes | None) -> bool:
        """``key`` None: an anonymous reader (a plain Yjs client without a token)."""
        if self.mode is not Mode.PRIVATE:
            return True
        return key is not None and (key == self.owner or key in self.readers or key in self.writers)

    def as_body(self) -> dict[str, Any]:
        """The answer to the ``ns.policy`` query (protocol.md §16)."""
        return {
            "owner": self.owner,
            "mode": str(self.mode),
            "writers": sorted(self.writers),
            "readers": sorted(self.readers),
        }


@dataclass(frozen=True, slots=True)
class Change:
    """The body of an ``ns.policy`` event, checked."""

    mode: Mode
    writers: frozenset[bytes]
    readers: frozenset[bytes]
    owner: bytes | None
    invite: bytes | None

    def applied(self, policy: Policy) -> Policy:
        return Policy(
            owner=self.owner or policy.owner,
            mode=self.mode,
            writers=self.writers,
            readers=self.readers,
        )


FIELDS = frozenset({"mode", "writers", "readers", "owner", "invite"})


def parse_change(body: Any) -> Change:
    """An ``ns.policy`` body; raises ``bad_event`` naming the field that is wrong."""

    def bad(reason: str) -> ProtocolError:
        return ProtocolError(ErrorCode.BAD_EVENT, f"ns.policy: {reason}")

    if not isinstance(body, dict):
        raise bad("the body is a map")
    extra = set(body) - FIELDS
    if extra:
        raise bad(f"unknown fields {sorted(extra)[:5]}")
    mode_name = body.get("mode")
    if not isinstance(mode_name, str) or mode_name not in Mode.__members__.values():
        raise bad("mode is one of public, listed, private")
    mode = Mode(mode_name)
    lists = {}
    for name in ("writers", "readers"):
        keys = body.get(name, [])
        if not isinstance(keys, list) or len(keys) > MAX_KEYS:
            raise bad(f"{name} is a list of at most {MAX_KEYS} keys")
        if not all(isinstance(k, bytes) and len(k) == KEY_SIZE for k in keys):
            raise bad(f"{name} holds 32-byte keys")
        lists[name] = frozenset(keys)
    owner = body.get("owner")
    if owner is not None and not (isinstance(owner, bytes) and len(owner) == KEY_SIZE):
        raise bad("owner is a 32-byte key")
    invite = body.get("invite")
    if invite is not None and not (isinstance(invite, bytes) and len(invite) <= MAX_INVITE):
        raise bad(f"invite is an invite token of at most {MAX_INVITE} bytes")
    return Change(mode, lists["writers"], lists["readers"], owner, invite)


# -- invites -------------------------------------------------------------------------


def mint_invite(relay: Identity, ns: str, exp_ms: int) -> bytes:
    """An invite to create ``ns`` until ``exp_ms``, signed by the relay's key."""
    claims = {"exp": exp_ms, "ns": ns}
    return canonical({**claims, "sig": relay.sign(INVITE_DOMAIN + canonical(claims))})


def check_invite(raw: bytes, ns: str, relay_key: bytes, now_ms: int) -> str | None:
    """Why ``raw`` is not a valid invite for ``ns`` now, or ``None`` when it is."""
    try:
        fields = decode_canonical(raw)
    except (ValueError, ProtocolError):
        return "the invite is not an invite token"
    if not isinstance(fields, dict) or set(fields) != {"exp", "ns", "sig"}:
        return "the invite is not an invite token"
    sig, exp = fields["sig"], fields["exp"]
    if not (isinstance(sig, bytes) and len(sig) == SIG_SIZE and type(exp) is int):
        return "the invite is not an invite token"
    claims = canonical({"exp": exp, "ns": fields["ns"]})
    if not verify_signature(relay_key, sig, INVITE_DOMAIN + claims):
        return "the invite is not signed by this relay"
    if fields["ns"] != ns:
        return f"the invite is for {fields['ns']!r}, not {ns!r}"
    if exp <= now_ms:
        return "the invite has expired"
    return None


# -- the state -----------------------------------------------------------------------


@dataclass
class Access:
    """Owners and policies of every namespace this relay homes or mirrors."""

    relay_key: bytes
    home: str = "local"
    """This relay's name: it sequences ``*@home``; other namespaces are mirrored."""
    creation: Creation = Creation.OPEN
    creators: frozenset[bytes] = frozenset()
    policies: dict[str, Policy] = field(default_factory=dict)
    changes: dict[str, list[tuple[int, Policy]]] = field(default_factory=dict)
    """Each namespace's policy changes in log order, as (seq of its ``ns.policy``, the
    policy from then on): a record is read under the policy before it (16.3)."""

    # folding: the log says who owns what

    def on_sequenced(self, record: Record) -> None:
        policy = self.policies.get(record.ns)
        if policy is None:
            if not record.event:
                return  # a compacted record, as a mirror gets it: not a creator
            policy = self.policies[record.ns] = Policy(owner=record.author)
        if record.kind != POLICY or record.author != policy.owner or not record.event:
            return
        try:
            change = parse_change(decode(record.event)["body"])
        except (ProtocolError, ValueError, KeyError, TypeError):
            return  # the home checked it; a mirror never takes a bad one over its word
        self.policies[record.ns] = policy = change.applied(policy)
        self.changes.setdefault(record.ns, []).append((record.seq, policy))

    # checks

    def refuse(self, event: Event, now_ms: int) -> ProtocolError | None:
        """Why ``event`` may not be sequenced now, or ``None``; ``forbidden`` (2013)
        for a key the policy leaves out, ``bad_event`` for a bad ``ns.policy``."""
        try:
            return self._refuse(event, now_ms)
        except ProtocolError as exc:
            return exc
        except Exception as exc:  # remote input must never stop the sequencer
            return ProtocolError(ErrorCode.BAD_EVENT, f"{event.kind}: {exc.__class__.__name__}")

    def _refuse(self, event: Event, now_ms: int) -> ProtocolError | None:
        writer = self.writer_of(event)
        policy = self.policies.get(event.ns)
        change = parse_change(event.body) if event.kind == POLICY else None
        if policy is None:
            return self._refuse_creation(event, change, now_ms)
        if change is not None:
            if writer != policy.owner:
                return forbidden(f"only the owner of {event.ns} changes its policy")
            if change.invite is not None:
                return ProtocolError(ErrorCode.BAD_EVENT, "ns.policy: invite only creates")
            return None
        if event.kind in OWNER_KINDS and writer != policy.owner:
            return forbidden(f"only the owner of {event.ns} sets its {event.kind}")
        if not policy.may_write(writer):
            return forbidden(f"this key may not write to {event.ns} ({policy.mode})")
        return None

    def _refuse_creation(
        self, event: Event, change: Change | None, now_ms: int
    ) -> ProtocolError | None:
        if self.creation is Creation.OPEN:
            return None
        if change is None:
            return forbidden(
                f"{event.ns} does not exist; this relay creates namespaces by ns.policy only"
            )
        if event.author in self.creators:
            return None
        if self.creation is Creation.ALLOW or change.invite is None:
            return forbidden(f"this key may not create {event.ns}")
        why = check_invite(change.invite, event.ns, self.relay_key, now_ms)
        return None if why is None else forbidden(why)

    def writer_of(self, event: Event) -> bytes:
        """The key a write counts as: its author, or for an update the relay wrote
        for a plain Yjs client, the agent whose document token it carries."""
        body = event.body
        if event.author == self.relay_key and isinstance(body, dict) and "token" in body:
            try:
                token = decode_canonical(body["token"])
            except (ValueError, ProtocolError, TypeError):
                return event.author
            if isinstance(token, dict) and isinstance(token.get("agent"), bytes):
                agent: bytes = token["agent"]
                return agent
        return event.author

    def may_read(self, ns: str, key: bytes | None) -> bool:
        """May ``key`` read ``ns`` here? For a mirrored namespace, only while the
        policy this relay folded lets this relay's own key read it too."""
        policy = self.policies.get(ns)
        return policy is None or key == self.relay_key or self._lets_read(ns, policy, key)

    def readable(self, ns: str, key: bytes | None, seq: int) -> bool:
        """May ``key`` read the record at ``seq`` of ``ns``: did the policy in force
        just before it let it read? A reader shut out by a change sees that change,
        and nothing written while it was out, even once it is let back in (by a
        change it sees)."""
        changes = self.changes.get(ns)
        if not changes or key == self.relay_key:
            return True
        i = bisect_left(changes, seq, key=_seq_of)  # the changes before this record
        if i == 0 or self._lets_read(ns, changes[i - 1][1], key):
            return True
        at, policy = changes[i] if i < len(changes) else (0, None)
        return at == seq and policy is not None and self._lets_read(ns, policy, key)

    def readable_through(self, ns: str, key: bytes | None) -> int | None:
        """The last seq ``key`` may read of ``ns`` while the policy now in force shuts
        it out: the change that did it. ``None`` while it may read."""
        if self.may_read(ns, key):
            return None
        changes = self.changes.get(ns, [])
        last = 0
        for seq, policy in changes:  # (a few changes per namespace)
            if not self._lets_read(ns, policy, key) and self.readable(ns, key, seq):
                last = seq
        return last

    def _lets_read(self, ns: str, policy: Policy, key: bytes | None) -> bool:
        if ns.rpartition("@")[2] != self.home and not policy.may_read(self.relay_key):
            return False  # its owner took this relay off the list: its copy is stale
        return policy.may_read(key)

    def check_read(self, ns: str, key: bytes | None) -> None:
        if not self.may_read(ns, key):
            raise forbidden(f"this key may not read {ns}")

    def check_write(self, ns: str, key: bytes) -> None:
        policy = self.policies.get(ns)
        if policy is not None and not policy.may_write(key):
            raise forbidden(f"this key may not write to {ns} ({policy.mode})")


def _seq_of(change: tuple[int, Policy]) -> int:
    return change[0]


def forbidden(reason: str) -> ProtocolError:
    return ProtocolError(ErrorCode.FORBIDDEN, reason)
