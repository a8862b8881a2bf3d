"""The participant directory of a namespace: who is in, what they can do, who is online.

Theory of operation
-------------------
An agent joins with a signed profile (``dir.join``: a display name, capabilities as
tags with optional versions — ``"python@3.11"`` — a role, an endpoint for direct
messages, free-form metadata). Joining again replaces the profile. Presence is
ephemeral and comes in two kinds, chosen at join:

* **connection**: online while a connection of the agent that joined is open. When
  the last one closes — or the relay restarts — the relay appends ``dir.left``.
* **heartbeat** (``heartbeat_ms`` given): online until ``heartbeat_ms`` after the
  join or the latest ``dir.heartbeat``; past that the relay's timer appends
  ``dir.left`` (reason ``timeout``), stamped with the expiry itself.

Every change is an event in the log, so subscribers see joins and leaves live and
the directory is a fold (pure: time comes from the log).

The relay's timer asks for the next heartbeat expiry after every outcome it appends,
so that lookup must not cost a pass over the members: heartbeat expiries are kept in a
heap (entries go stale as members heartbeat, leave or join again, and are dropped as
they surface), rebuilt from the members when stale entries outnumber them.

A routed event names the members of a role (decisions.py), so the directory keeps
each role's keys sorted too, changed as a join changes a member's role: no pass over
the members for each event. Members are never removed; one who left still holds its
role (a role is what a member said at its latest ``dir.join``).
"""

from __future__ import annotations

import bisect
import heapq
import re
from dataclasses import dataclass, field
from typing import Any


def joins_by_connection(kind: str, body: Any) -> bool:
    """Whether an event is a ``dir.join`` whose presence a connection holds: one
    without ``heartbeat_ms`` (nil is absent, protocol 8.3)."""
    return kind == "dir.join" and isinstance(body, dict) and body.get("heartbeat_ms") is None


CAPABILITY_RE = re.compile(r"[a-z0-9][a-z0-9._:/-]{0,63}(@[A-Za-z0-9._+-]{1,32})?")
MAX_CAPABILITIES = 64


@dataclass(frozen=True, slots=True)
class Capability:
    tag: str
    version: str = ""

    @classmethod
    def parse(cls, text: str) -> Capability:
        tag, _, version = text.partition("@")
        return cls(tag, version)

    def __str__(self) -> str:
        return f"{self.tag}@{self.version}" if self.version else self.tag

    def matches(self, wanted: Capability) -> bool:
        """``python`` matches any version of python; ``python@3.11`` only that one."""
        return self.tag == wanted.tag and (not wanted.version or self.version == wanted.version)


@dataclass
class Member:
    agent: bytes
    name: str
    capabilities: tuple[Capability, ...]
    role: str
    endpoint: str
    meta: Any
    joined_ms: int
    heartbeat_ms: int | None = None
    """Heartbeat presence: online until ``expires_ms``; ``None``: connection presence."""
    expires_ms: int | None = None
    online: bool = True
    left_ms: int | None = None
    reason: str = ""
    first_ms: int = 0
    """When it first joined: the directory lists members in this order."""

    @property
    def presence(self) -> str:
        return "connection" if self.heartbeat_ms is None else "heartbeat"

    def can(self, wanted: Capability) -> bool:
        return any(mine.matches(wanted) for mine in self.capabilities)


@dataclass
class Directory:
    members: dict[bytes, Member] = field(default_factory=dict)
    _expiries: list[tuple[int, bytes]] = field(default_factory=list, repr=False, compare=False)
    """A heap of (expires_ms, agent) of heartbeat members; may hold stale entries."""
    _holders: dict[str, list[bytes]] = field(default_factory=dict, repr=False, compare=False)
    """role -> the keys of the members that hold it, sorted; no entry for no role."""

    def __post_init__(self) -> None:
        for member in self.members.values():  # (given members: index their roles)
            self._hold(member.agent, member.role)

    def join(self, member: Member) -> bool:
        """Add or replace a profile, online from now. True the first time ever."""
        previous = self.members.get(member.agent)
        first = previous is None
        member.first_ms = member.joined_ms if previous is None else previous.first_ms
        if member.heartbeat_ms is not None:
            member.expires_ms = member.joined_ms + member.heartbeat_ms
        self.members[member.agent] = member
        if previous is None or previous.role != member.role:
            if previous is not None:
                self._unhold(member.agent, previous.role)
            self._hold(member.agent, member.role)
        self._timed(member)
        return first

    def holding(self, role: str, limit: int | None = None) -> list[bytes]:
        """The keys of the members that hold ``role``, sorted, the first ``limit`` of
        them: those that left too. Nobody holds the empty role (a member that named none)."""
        return self._holders.get(role, [])[:limit] if role else []

    def heartbeat(self, agent: bytes, now_ms: int) -> Member | None:
        """Extend a heartbeat member's presence; ``None`` if that is not what it is."""
        member = self.members.get(agent)
        if member is None or member.heartbeat_ms is None or not self.is_online(member, now_ms):
            return None
        member.expires_ms = now_ms + member.heartbeat_ms
        self._timed(member)
        return member

    def leave(self, agent: bytes, now_ms: int, reason: str) -> bool:
        """Mark an agent offline; False if it was not online."""
        member = self.members.get(agent)
        if member is None or not member.online:
            return False
        member.online, member.left_ms, member.reason = False, now_ms, reason
        return True

    def is_online(self, member: Member, now_ms: int) -> bool:
        if not member.online:
            return False
        return member.expires_ms is None or now_ms < member.expires_ms

    def timed_out(self, now_ms: int) -> list[Member]:
        """Heartbeat members whose presence ran out by ``now_ms`` (oldest first). They
        are off the timer from now: the caller makes each leave."""
        late: dict[bytes, Member] = {}  # (a member joined twice at one ms is one entry)
        while (expires_ms := self.next_expiry_ms()) is not None and expires_ms <= now_ms:
            agent = heapq.heappop(self._expiries)[1]
            late[agent] = self.members[agent]
        return list(late.values())

    def next_expiry_ms(self) -> int | None:
        """When the earliest heartbeat presence runs out, if any member has one."""
        expiries = self._expiries
        while expiries:
            expires_ms, agent = expiries[0]
            member = self.members.get(agent)
            if member is not None and member.online and member.expires_ms == expires_ms:
                return expires_ms
            heapq.heappop(expiries)  # heartbeated, left or joined again since: stale
        return None

    def _hold(self, agent: bytes, role: str) -> None:
        if role:
            bisect.insort(self._holders.setdefault(role, []), agent)

    def _unhold(self, agent: bytes, role: str) -> None:
        if not role:
            return
        keys = self._holders[role]
        i = bisect.bisect_left(keys, agent)
        assert keys[i : i + 1] == [agent], "the role index is out of step: our bug"
        del keys[i]
        if not keys:
            del self._holders[role]

    def _timed(self, member: Member) -> None:
        """Put a heartbeat member's expiry on the timer."""
        if member.expires_ms is None:
            return
        heapq.heappush(self._expiries, (member.expires_ms, member.agent))
        # Each heartbeat leaves a stale entry behind that surfaces only when its time
        # comes: rebuild before they pile up (amortised, the heap stays O(members)).
        if len(self._expiries) > 2 * len(self.members) + 64:
            self._expiries = [
                (m.expires_ms, m.agent)
                for m in self.members.values()
                if m.online and m.expires_ms is not None
            ]
            heapq.heapify(self._expiries)

    def on_connection(self) -> list[Member]:
        """Members online by connection (a restarted relay has no connections)."""
        return [m for m in self.members.values() if m.online and m.heartbeat_ms is None]
