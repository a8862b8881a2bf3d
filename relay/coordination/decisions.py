"""Decision routing and the conflict ladder (pure: a fold of the log).

Theory of operation
-------------------
A decision (``decision.add``, records.py) may name the **entity** it touches: an
account, a price list, a shipment. The namespace owner's ``decision.policy`` says
two things about decisions and other chosen event kinds:

* **Routes**: events of the listed kinds go to the members of a directory role, so
  the agents who must know hear about it. The relay writes a ``route.notice`` per
  event (latency class ``now``) or one ``route.digest`` per role at most
  ``digest_ms`` after the oldest event it holds (class ``digest``). Each names the
  keys it is for (``to``), fixed when the routed event was sequenced: a member who
  joins later was not told. A notice with an empty ``to`` is the log saying that
  nobody held the role: a decision nobody heard about is visible, not silent.
* **The conflict ladder**: two accepted decisions on the same entity, by different
  authors, saying different things, the later within ``window_ms`` of the earlier
  and not superseding it, are a conflict. The relay writes one ``conflict.raised``
  and walks the ladder, each step an event of the log:

  1. ``rule``: an automatic rule (``first`` or ``last`` decision stands) resolves
     it at once; ``none`` passes it on;
  2. ``agents``: for ``step_ms`` the authors may settle it: it is resolved when
     every one of them names the same decision to keep (an author names its own
     unless it says otherwise, so one conceding is enough between two);
  3. ``arbiter``: for ``step_ms`` a member of the arbiter role decides;
  4. ``human``: it waits for an approver (the oversight board's approval queue).

  A step nobody can take (no arbiter role, or nobody holds it) is passed with a
  note. Approvers may resolve at any step, an arbiter from its step on, the agents
  at any step. A resolution keeps one decision; the others are ``overruled``. A
  further decision on the entity while its conflict is open joins that conflict:
  one conflict per entity at a time.

The timer's events (notices, digests, raised, escalated, a rule's resolution) are
applied where they are written and again, as written, on replay, like an auction's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from agent_sdk.wire import KIND_RE
from relay.coordination.directory import Directory
from relay.coordination.fields import (
    MAX_LIST,
    MAX_TEXT,
    BadRequest,
    Conflict,
    only,
    opt_integer,
    text,
    texts,
)
from relay.coordination.records import Decision, DecisionStatus, Records

MAX_ROUTES = 32
MAX_TO = 256
"""Keys named in one notice: a role of more members is told by its subscription."""
MAX_DIGEST = 256
"""Events in one digest; more wait for the next."""
DAY_MS = 24 * 3600 * 1000

NOTICE, DIGEST = "route.notice", "route.digest"
RAISED, ESCALATED, RESOLVED, PROPOSED = (
    "conflict.raised",
    "conflict.escalated",
    "conflict.resolved",
    "conflict.proposed",
)
TIMER_KINDS = frozenset({NOTICE, DIGEST, RAISED, ESCALATED, RESOLVED})
"""Written by the relay's timer (without ``req``) and re-applied on replay."""


class Latency(enum.StrEnum):
    NOW = "now"
    DIGEST = "digest"


class Rule(enum.StrEnum):
    NONE = "none"
    FIRST = "first"
    LAST = "last"


class Step(enum.StrEnum):
    RULE = "rule"
    AGENTS = "agents"
    ARBITER = "arbiter"
    HUMAN = "human"


@dataclass(frozen=True, slots=True)
class Route:
    kinds: frozenset[str]
    role: str
    latency: Latency


@dataclass(frozen=True, slots=True)
class Ladder:
    window_ms: int = 10 * 60 * 1000
    rule: Rule = Rule.NONE
    step_ms: int = 5 * 60 * 1000
    arbiter: str = ""
    approvers: tuple[bytes, ...] = ()
    approver_role: str = ""


@dataclass(frozen=True, slots=True)
class Policy:
    routes: tuple[Route, ...] = ()
    digest_ms: int = 60_000
    ladder: Ladder | None = None


@dataclass(frozen=True, slots=True)
class Routed:
    """An event waiting for its notice or digest."""

    event: bytes
    kind: str
    entity: str | None
    role: str
    to: tuple[bytes, ...]
    at_ms: int


@dataclass
class ConflictCase:
    id: str
    entity: str
    decisions: list[str]
    agents: list[bytes]
    """The author of each decision, in the same order."""
    raised_ms: int
    step: Step = Step.RULE
    until_ms: int | None = None
    """When the current step passes to the next; ``None`` at the human step."""
    proposals: dict[bytes, str] = field(default_factory=dict)
    kept: str | None = None
    by: str = ""

    @property
    def open(self) -> bool:
        return self.kept is None


def parse_policy(body: dict[str, Any]) -> Policy:
    """A ``decision.policy`` body, checked (``BadRequest`` naming the field)."""
    only(body, "routes", "digest_ms", "conflicts")
    raw = body.get("routes", [])
    if not isinstance(raw, list) or len(raw) > MAX_ROUTES:
        raise BadRequest(f"routes must be a list of at most {MAX_ROUTES}")
    routes = []
    for n, route in enumerate(raw):
        if not isinstance(route, dict):
            raise BadRequest(f"routes[{n}] is a map {{kinds, role, latency}}")
        only(route, "kinds", "role", "latency")
        kinds = texts(route, "kinds")
        bad = [k for k in kinds if not KIND_RE.fullmatch(k) or k.startswith("route.")]
        if not kinds or bad:
            raise BadRequest(f"routes[{n}].kinds: event kinds, not route.* ({bad[:1]})")
        role = text(route, "role", 64)
        if not role:
            raise BadRequest(f"routes[{n}].role names a directory role")
        try:
            latency = Latency(text(route, "latency", 16, default="now"))
        except ValueError:
            raise BadRequest(f"routes[{n}].latency is now or digest") from None
        routes.append(Route(frozenset(kinds), role, latency))
    digest = _bounded(body, "digest_ms", 60_000, 1_000, DAY_MS)
    ladder = _ladder(body["conflicts"]) if body.get("conflicts") is not None else None
    return Policy(tuple(routes), digest, ladder)


def _bounded(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = opt_integer(body, name)
    value = default if value is None else value
    if not low <= value <= high:
        raise BadRequest(f"{name} is {low} to {high}")
    return value


def _ladder(body: Any) -> Ladder:
    if not isinstance(body, dict):
        raise BadRequest("conflicts is a map")
    only(body, "window_ms", "rule", "step_ms", "arbiter", "approvers", "approver_role")
    try:
        rule = Rule(text(body, "rule", 16, default="none"))
    except ValueError:
        raise BadRequest("conflicts.rule is none, first or last") from None
    approvers = body.get("approvers", [])
    if not isinstance(approvers, list) or len(approvers) > MAX_LIST:
        raise BadRequest(f"conflicts.approvers is a list of at most {MAX_LIST} keys")
    if not all(isinstance(key, bytes) and len(key) == 32 for key in approvers):
        raise BadRequest("conflicts.approvers are 32-byte keys")
    role = text(body, "approver_role", 64, default="")
    if not approvers and not role:
        raise BadRequest("conflicts names approvers or an approver_role: the last step is a human")
    return Ladder(
        window_ms=_bounded(body, "window_ms", 10 * 60 * 1000, 1, 30 * DAY_MS),
        rule=rule,
        step_ms=_bounded(body, "step_ms", 5 * 60 * 1000, 1_000, 7 * DAY_MS),
        arbiter=text(body, "arbiter", 64, default=""),
        approvers=tuple(approvers),
        approver_role=role,
    )


@dataclass
class Decisions:
    """A namespace's routing policy, what waits to be routed, and its conflicts."""

    policy: Policy = field(default_factory=Policy)
    waiting: list[Routed] = field(default_factory=list)
    conflicts: dict[str, ConflictCase] = field(default_factory=dict)
    open_on: dict[str, str] = field(default_factory=dict)
    """entity -> the id of its open conflict."""
    fresh: list[str] = field(default_factory=list)
    """Conflicts not yet announced by a ``conflict.raised``."""

    # -- routing ----------------------------------------------------------------------

    def routes_of(self, kind: str) -> list[Route]:
        return [route for route in self.policy.routes if kind in route.kinds]

    def route(self, event: bytes, kind: str, body: Any, directory: Directory, now_ms: int) -> bool:
        """Queue ``event`` for the roles its kind is routed to; True when queued."""
        routes = self.routes_of(kind)
        entity = body.get("entity") if isinstance(body, dict) else None
        entity = entity if isinstance(entity, str) and len(entity) <= 256 else None
        for route in routes:
            to = tuple(sorted(m.agent for m in directory.members.values() if m.role == route.role))
            self.waiting.append(Routed(event, kind, entity, route.role, to[:MAX_TO], now_ms))
        return bool(routes)

    def _latency(self, role: str) -> Latency:
        for route in self.policy.routes:
            if route.role == role:
                return route.latency
        return Latency.NOW  # a route since removed: tell at once, nothing waits forever

    def _routing_due(self, now_ms: int) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        digests: dict[str, list[Routed]] = {}
        for item in self.waiting:
            if self._latency(item.role) is Latency.NOW:
                out.append((NOTICE, {**_routed(item), "role": item.role, "to": list(item.to)}))
            else:
                digests.setdefault(item.role, []).append(item)
        for role, items in digests.items():
            if items[0].at_ms + self.policy.digest_ms > now_ms:
                continue
            items = items[:MAX_DIGEST]
            to = sorted({key for item in items for key in item.to})[:MAX_TO]
            events = [_routed(item) for item in items]
            out.append((DIGEST, {"role": role, "to": to, "events": events}))
        for kind, body in out:
            self._told(kind, body)
        return out

    def _told(self, kind: str, body: dict[str, Any]) -> None:
        """Drop what a notice or digest told from the waiting list."""
        events = [body["event"]] if kind == NOTICE else [e["event"] for e in body["events"]]
        told = {(event, body["role"]) for event in events}
        self.waiting = [w for w in self.waiting if (w.event, w.role) not in told]

    # -- conflicts --------------------------------------------------------------------

    def on_decision(self, decision: Decision, records: Records, now_ms: int) -> str | None:
        """Raise or join a conflict for a new decision; the conflict's id, if any."""
        ladder, entity = self.policy.ladder, decision.entity
        if ladder is None or entity is None:
            return None
        case = self.conflicts.get(self.open_on.get(entity, ""))
        if case is not None:
            case.decisions.append(decision.id)
            case.agents.append(decision.author)
            return case.id
        rivals = [
            other
            for other in (records.decisions[d] for d in records.on_entity.get(entity, ()))
            if other.id != decision.id
            and other.status is DecisionStatus.ACCEPTED
            and other.author != decision.author
            and other.decision != decision.decision
            and other.at_ms >= now_ms - ladder.window_ms
        ]
        if not rivals:
            return None
        rival = rivals[-1]
        case = ConflictCase(
            id=f"cf-{len(self.conflicts) + 1}",
            entity=entity,
            decisions=[rival.id, decision.id],
            agents=[rival.author, decision.author],
            raised_ms=now_ms,
        )
        self.conflicts[case.id] = case
        self.open_on[entity] = case.id
        self.fresh.append(case.id)
        return case.id

    def resolve(
        self,
        body: dict[str, Any],
        author: bytes,
        records: Records,
        directory: Directory,
        now_ms: int,
    ) -> dict[str, Any]:
        """A ``conflict.resolve {conflict, keep, note?}``: who may decide depends on the
        step; an agent keeping its own decision is a proposal until the others agree."""
        only(body, "conflict", "keep", "note")
        case = self.conflicts.get(text(body, "conflict", 64))
        if case is None:
            raise Conflict("not_found", f"no conflict {body['conflict']}")
        keep = text(body, "keep", 64)
        note = text(body, "note", MAX_TEXT, default="")
        if not case.open:
            raise Conflict("closed", f"{case.id} is resolved: {case.kept} was kept")
        if keep not in case.decisions:
            raise Conflict("not_found", f"{keep} is not one of {', '.join(case.decisions)}")
        ladder = self.policy.ladder or Ladder()
        member = directory.members.get(author)
        role = member.role if member is not None else ""
        if author in ladder.approvers or (ladder.approver_role and role == ladder.approver_role):
            by = Step.HUMAN
        elif ladder.arbiter and role == ladder.arbiter and case.step in (Step.ARBITER, Step.HUMAN):
            by = Step.ARBITER
        elif author in case.agents:
            case.proposals[author] = keep
            wanted = {self._proposal(case, agent) for agent in case.agents}
            if len(wanted) > 1:
                return {"kind": PROPOSED, "conflict": case.id, "keep": keep, "agent": author}
            by = Step.AGENTS
        else:
            raise Conflict("not_resolver", f"{case.id} is at the {case.step} step")
        self._settle(case, keep, by, records)
        return {"kind": RESOLVED, "conflict": case.id, "keep": keep, "by": by.value,
                "note": note, "at_ms": now_ms}  # fmt: skip

    @staticmethod
    def _proposal(case: ConflictCase, agent: bytes) -> str:
        """What ``agent`` wants kept: what it said, or its own latest decision."""
        if agent in case.proposals:
            return case.proposals[agent]
        return [d for d, a in zip(case.decisions, case.agents, strict=True) if a == agent][-1]

    def _settle(self, case: ConflictCase, keep: str, by: Step | str, records: Records) -> None:
        case.kept, case.by = keep, str(by)
        case.until_ms = None
        self.open_on.pop(case.entity, None)
        for other in case.decisions:
            record = records.decisions[other]
            if other != keep and record.status is DecisionStatus.ACCEPTED:
                record.status, record.superseded_by = DecisionStatus.OVERRULED, keep

    def _conflicts_due(
        self, directory: Directory, records: Records, now_ms: int
    ) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        ladder = self.policy.ladder or Ladder()
        fresh, self.fresh = self.fresh, []
        for case in (self.conflicts[c] for c in fresh):
            out += self._raise(case, ladder, records, now_ms)
        for case in [self.conflicts[c] for c in self.open_on.values()]:
            while case.open and case.until_ms is not None and case.until_ms <= now_ms:
                out.append(self._next_step(case, ladder, directory, now_ms))
        return out

    def _raise(
        self, case: ConflictCase, ladder: Ladder, records: Records, now_ms: int
    ) -> list[tuple[str, dict[str, Any]]]:
        """``conflict.raised``, then the rule step: resolved by it, or passed on."""
        raised = {"conflict": case.id, "entity": case.entity, "decisions": list(case.decisions),
                  "agents": list(case.agents), "at_ms": now_ms}  # fmt: skip
        if not case.open:  # (the agents settled it before the timer ran)
            return [(RAISED, raised)]
        if ladder.rule is Rule.NONE:
            step = self._escalate(case, Step.AGENTS, list(case.agents), "rule none", ladder, now_ms)
            return [(RAISED, raised), step]
        keep = case.decisions[0 if ladder.rule is Rule.FIRST else -1]
        self._settle(case, keep, Step.RULE, records)
        note = f"rule {ladder.rule}"
        resolved = {"conflict": case.id, "keep": keep, "by": "rule", "note": note, "at_ms": now_ms}
        return [(RAISED, raised), (RESOLVED, resolved)]

    def _next_step(
        self, case: ConflictCase, ladder: Ladder, directory: Directory, now_ms: int
    ) -> tuple[str, dict[str, Any]]:
        """The agents' or the arbiter's time ran out: up one rung (past a rung nobody
        can take, saying why)."""
        why = ""
        if case.step is Step.AGENTS:
            arbiters = _holding(directory, ladder.arbiter)
            if arbiters:
                return self._escalate(case, Step.ARBITER, arbiters, "", ladder, now_ms)
            why = f"no member holds {ladder.arbiter}" if ladder.arbiter else "no arbiter role"
        humans = sorted({*ladder.approvers, *_holding(directory, ladder.approver_role)})
        return self._escalate(case, Step.HUMAN, humans, why, ladder, now_ms)

    def _escalate(
        self,
        case: ConflictCase,
        step: Step,
        to: list[bytes],
        note: str,
        ladder: Ladder,
        now_ms: int,
    ) -> tuple[str, dict[str, Any]]:
        case.step = step
        case.until_ms = None if step is Step.HUMAN else now_ms + ladder.step_ms
        body = {"conflict": case.id, "step": step.value, "to": to[:MAX_TO],
                "until_ms": case.until_ms, "note": note, "at_ms": now_ms}  # fmt: skip
        return ESCALATED, body

    # -- the timer --------------------------------------------------------------------

    def due(
        self, directory: Directory, records: Records, now_ms: int
    ) -> list[tuple[str, dict[str, Any]]]:
        """The events due at ``now_ms``, applied here as replay will apply them."""
        return self._conflicts_due(directory, records, now_ms) + self._routing_due(now_ms)

    def replay(self, kind: str, body: dict[str, Any], records: Records) -> None:
        """Re-apply an event the timer wrote, as written."""
        if kind in (NOTICE, DIGEST):
            self._told(kind, body)
            return
        case = self.conflicts.get(body.get("conflict", ""))
        if case is None:  # pragma: no cover - the timer writes only cases it knows
            return
        if kind == RAISED:
            self.fresh.remove(case.id)
        elif kind == ESCALATED:
            case.step, case.until_ms = Step(body["step"]), body["until_ms"]
        elif kind == RESOLVED:
            self._settle(case, body["keep"], body["by"], records)

    def next_due_ms(self) -> int | None:
        times = [self.conflicts[c].raised_ms for c in self.fresh]
        for c in self.open_on.values():
            until = self.conflicts[c].until_ms
            if until is not None:
                times.append(until)
        for item in self.waiting:
            latency = self._latency(item.role)
            times.append(item.at_ms + (self.policy.digest_ms if latency is Latency.DIGEST else 0))
        return min(times, default=None)


def _holding(directory: Directory, role: str) -> list[bytes]:
    if not role:
        return []
    return sorted(m.agent for m in directory.members.values() if m.role == role)


def _routed(item: Routed) -> dict[str, Any]:
    told: dict[str, Any] = {"event": item.event, "kind": item.kind}
    if item.entity is not None:
        told["entity"] = item.entity
    return told
