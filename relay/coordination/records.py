"""Context, bulletin, decisions and checkpoints: a namespace's shared records (pure).

Theory of operation
-------------------
Work orders say who does what; these records carry what agents learned on the way,
for the agents that come after them (the workledger workflow: pull the context before
starting, put it back before leaving).

* **Context** is a document (text or JSON) per namespace and per work order. Every
  ``put`` makes a new version; all versions are kept, so a reader can pull the latest
  or any earlier one, and sees the author and when it was written (its age).
* The **bulletin** is an append-only list of posts: what agents *did*, not what they
  intend (intentions are claims and locks).
* **Decisions** are ADR records. A new decision may supersede an accepted one; the
  old one stays, marked ``superseded`` and pointing at its successor. A decision may
  name the ``entity`` it touches; decisions.py routes them and settles conflicts
  between them (a decision a resolution did not keep is ``overruled``).
* **Checkpoints** are named cursors (a seq) that a consumer stores at the relay, so a
  consumer group resumes where it stopped. ``expect`` makes a set conditional on the
  current value (compare-and-set): of two members racing to advance, one wins and the
  other learns that it would have gone back.

Like the ledger, every change takes its time from the log, so the records are a fold.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from relay.coordination.fields import Conflict

NAMESPACE = ""
"""The context key of the namespace itself (work orders use their id)."""


@dataclass(frozen=True, slots=True)
class ContextVersion:
    version: int
    author: bytes
    at_ms: int
    body: Any


@dataclass(frozen=True, slots=True)
class Post:
    n: int
    author: bytes
    at_ms: int
    text: str


class DecisionStatus(enum.Enum):
    ACCEPTED = "accepted"
    SUPERSEDED = "superseded"
    OVERRULED = "overruled"


@dataclass
class Decision:
    id: str
    title: str
    decision: str
    author: bytes
    at_ms: int
    context: str = ""
    rationale: str = ""
    status: DecisionStatus = DecisionStatus.ACCEPTED
    supersedes: str | None = None
    superseded_by: str | None = None
    entity: str | None = None
    conflict: str | None = None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    name: str
    seq: int
    author: bytes
    at_ms: int


@dataclass
class Records:
    contexts: dict[str, list[ContextVersion]] = field(default_factory=dict)
    bulletin: list[Post] = field(default_factory=list)
    decisions: dict[str, Decision] = field(default_factory=dict)
    checkpoints: dict[str, Checkpoint] = field(default_factory=dict)
    on_entity: dict[str, list[str]] = field(default_factory=dict)
    """entity -> the ids of the decisions that name it, oldest first."""

    def put_context(self, key: str, body: Any, author: bytes, now_ms: int) -> ContextVersion:
        versions = self.contexts.setdefault(key, [])
        version = ContextVersion(len(versions) + 1, author, now_ms, body)
        versions.append(version)
        return version

    def context(self, key: str, version: int | None = None) -> ContextVersion | None:
        versions = self.contexts.get(key, [])
        if version is None:
            return versions[-1] if versions else None
        return versions[version - 1] if 1 <= version <= len(versions) else None

    def post(self, text: str, author: bytes, now_ms: int) -> Post:
        post = Post(len(self.bulletin) + 1, author, now_ms, text)
        self.bulletin.append(post)
        return post

    def decide(
        self,
        title: str,
        decision: str,
        author: bytes,
        now_ms: int,
        *,
        context: str = "",
        rationale: str = "",
        supersedes: str | None = None,
        entity: str | None = None,
    ) -> Decision:
        if supersedes is not None:
            old = self.decisions.get(supersedes)
            if old is None:
                raise Conflict("not_found", f"no decision {supersedes}")
            if old.status is not DecisionStatus.ACCEPTED:
                reason = f"{supersedes} is {old.status.value} by {old.superseded_by}"
                raise Conflict(old.status.value, reason)
        record = Decision(
            id=f"adr-{len(self.decisions) + 1}",
            title=title,
            decision=decision,
            author=author,
            at_ms=now_ms,
            context=context,
            rationale=rationale,
            supersedes=supersedes,
            entity=entity,
        )
        if supersedes is not None:
            old = self.decisions[supersedes]
            old.status, old.superseded_by = DecisionStatus.SUPERSEDED, record.id
        self.decisions[record.id] = record
        if entity is not None:
            self.on_entity.setdefault(entity, []).append(record.id)
        return record

    def set_checkpoint(
        self, name: str, seq: int, author: bytes, now_ms: int, expect: int | None = None
    ) -> Checkpoint:
        current = self.checkpoints.get(name)
        if expect is not None and (current.seq if current else 0) != expect:
            now = current.seq if current else 0
            raise Conflict("changed", f"checkpoint {name} is at {now}, not {expect}")
        checkpoint = Checkpoint(name, seq, author, now_ms)
        self.checkpoints[name] = checkpoint
        return checkpoint
