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

The timer asks when it next has work after every coordination outcome of the
namespace, and every routed event changes the answer, so neither that nor a routed
event reads all the namespace holds: what waits to be told is kept per role in
arrival order (waiting.py), the conflicts at a timed step in a heap of when their
step runs out, and a role's holders come from the directory's index of roles.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Sequence
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
from relay.coordination.waiting import Latency, Routed, Waiting

MAX_ROUTES = 32
MAX_TO = 256
"""Keys named in one notice: a role of more members is told by its subscription."""
MAX_JOINED = 64
"""Decisions in one conflict: a further one on its entity is refused (``crowded``)."""
DAY_MS = 24 * 3600 * 1000

NOTICE, DIGEST = "route.notice", "route.digest"
RAISED, ESCALATED, RESOLVED, PROPOSED = (
    "conflict.raised",
    "conflict.escalated",
    "conflict.resolved",
    "conflict.proposed",
)
UNROUTED = frozenset({"route", "doc"})
"""Families no route may list: the notices themselves, and CRDT document traffic."""
TIMER_KINDS = frozenset({NOTICE, DIGEST, RAISED, ESCALATED, RESOLVED})
"""Written by the relay's timer (without ``req``) and re-applied on replay."""


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


@dataclass
class ConflictCase:
    id: str
    entity: str
    decisions: list[str]
    agents: list[bytes]
    """The author of each decision, in the same order."""
    raised_ms: int
    ladder: Ladder
    """The ladder it was raised under: a later policy does not change its rungs."""
    step: Step = Step.RULE
    until_ms: int | None = None
    """When the current step passes to the next; ``None`` at the rule and human steps."""
    proposals: dict[bytes, str] = field(default_factory=dict)
    kept: str | None = None
    by: str = ""

    @property
    def open(self) -> bool:
        return self.kept is None

    def wanted(self, agent: bytes) -> str:
        """What ``agent`` wants kept: what it said, or its own latest decision."""
        if agent in self.proposals:
            return self.proposals[agent]
        return next(
            d
            for d, a in zip(reversed(self.decisions), reversed(self.agents), strict=True)
            if a == agent
        )


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
        bad = [k for k in kinds if not KIND_RE.fullmatch(k) or k.split(".")[0] in UNROUTED]
        if not kinds or bad:
            raise BadRequest(f"routes[{n}].kinds: event kinds, not route.* or doc.* ({bad[:1]})")
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
    waiting: Waiting = field(default_factory=Waiting)
    conflicts: dict[str, ConflictCase] = field(default_factory=dict)
    open_on: dict[str, str] = field(default_factory=dict)
    """entity -> the id of its open conflict."""
    fresh: list[str] = field(default_factory=list)
    """Conflicts not yet announced by a ``conflict.raised``."""
    ruling: list[str] = field(default_factory=list)
    """Conflicts announced whose rule step is not written yet (a restart between the
    two events: the rule runs again on the next tick)."""
    timed: dict[str, int] = field(default_factory=dict)
    """Open conflicts at the agents' or the arbiter's step -> when it runs out. Changed
    by :meth:`_stepped` and :meth:`_settle` only, which keep the two fields below right."""
    _timers: list[tuple[int, str]] = field(default_factory=list, compare=False, repr=False)
    """A heap of (until_ms, conflict) with the current entry of each conflict in
    :attr:`timed`; may hold stale entries (stepped or settled since)."""
    _timed_at: dict[str, int] = field(default_factory=dict, compare=False, repr=False)
    """Each conflict in :attr:`timed` -> its place in it: the timer steps the conflicts
    due in that order (a dict keeps a key's place when its value changes)."""
    _timed_next: int = field(default=0, compare=False, repr=False)
    _next_due: int | None = field(default=None, compare=False, repr=False)
    _dirty: bool = field(default=True, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._timed_at = {cid: n for n, cid in enumerate(self.timed)}
        self._timed_next = len(self.timed)
        self._rebuild_timers()

    def set_policy(self, policy: Policy) -> None:
        self.policy = policy
        self._dirty = True

    # -- routing ----------------------------------------------------------------------

    def routes_of(self, kind: str) -> list[Route]:
        return [route for route in self.policy.routes if kind in route.kinds]

    def route(self, event: bytes, kind: str, body: Any, directory: Directory, now_ms: int) -> bool:
        """Queue ``event`` once for each role its kind is routed to; True when queued."""
        latencies: dict[str, Latency] = {}
        for route in self.routes_of(kind):
            if latencies.get(route.role) is not Latency.NOW:
                latencies[route.role] = route.latency
        entity = body.get("entity") if isinstance(body, dict) else None
        entity = entity if isinstance(entity, str) and len(entity) <= 256 else None
        for role, latency in latencies.items():
            to = tuple(directory.holding(role, MAX_TO))
            self.waiting.add(Routed(event, kind, entity, role, to, now_ms, latency))
        self._dirty |= bool(latencies)
        return bool(latencies)

    def _routing_due(self, now_ms: int) -> list[tuple[str, dict[str, Any]]]:
        """Notices for every ``now`` item; a digest per role whose oldest item waited
        ``digest_ms``, or that gathered ``MAX_DIGEST`` (a full digest goes at once)."""
        out: list[tuple[str, dict[str, Any]]] = []
        for _, item in self.waiting.now:
            out.append((NOTICE, {**_routed(item), "role": item.role, "to": list(item.to)}))
        for role, told in self.waiting.due(now_ms, self.policy.digest_ms):
            to = sorted({key for item in told for key in item.to})[:MAX_TO]
            out.append((DIGEST, {"role": role, "to": to, "events": [_routed(i) for i in told]}))
        self._told(out)
        return out

    def _told(self, told: list[tuple[str, dict[str, Any]]]) -> None:
        """Drop what notices and digests told from what waits (from the fronts of its
        queues: a pass over what was told, not over all that waits)."""
        gone = {
            (event, body["role"])
            for kind, body in told
            for event in (
                [body["event"]] if kind == NOTICE else [e["event"] for e in body["events"]]
            )
        }
        if gone:
            self.waiting.drop(gone)
            self._dirty = True

    # -- conflicts --------------------------------------------------------------------

    def check_room(self, entity: str | None) -> None:
        """Refuse a decision that would join a conflict already at its size limit."""
        case = self.conflicts.get(self.open_on.get(entity or "", ""))
        if case is not None and len(case.decisions) >= MAX_JOINED:
            reason = f"{case.id} on {entity} has {MAX_JOINED} decisions: settle it first"
            raise Conflict("crowded", reason)

    def on_decision(self, decision: Decision, records: Records, now_ms: int) -> str | None:
        """Raise or join a conflict for a new decision; the conflict's id, if any."""
        ladder, entity = self.policy.ladder, decision.entity
        if entity is None:
            return None
        case = self.conflicts.get(self.open_on.get(entity, ""))
        if case is not None:  # one conflict per entity: it joins, under that ladder
            case.decisions.append(decision.id)
            case.agents.append(decision.author)
            return case.id
        if ladder is None:
            return None
        rival = self._rival(decision, records.on_entity.get(entity, ()), records, ladder, now_ms)
        if rival is None:
            return None
        case = ConflictCase(
            id=f"cf-{len(self.conflicts) + 1}",
            entity=entity,
            decisions=[rival.id, decision.id],
            agents=[rival.author, decision.author],
            raised_ms=now_ms,
            ladder=ladder,
        )
        self.conflicts[case.id] = case
        self.open_on[entity] = case.id
        self.fresh.append(case.id)
        self._dirty = True
        return case.id

    @staticmethod
    def _rival(
        decision: Decision,
        on_entity: Sequence[str],
        records: Records,
        ladder: Ladder,
        now_ms: int,
    ) -> Decision | None:
        """The latest accepted decision on the entity, by another author, saying
        otherwise, within the ladder's window: what ``decision`` conflicts with.

        An entity's decisions are listed in log order, so their times never go back
        (the log's clock): read from the newest, the first one before the window ends
        the search. An entity decided on for months is not read whole at every
        decision on it, only its window."""
        since = now_ms - ladder.window_ms
        for other in (records.decisions[d] for d in reversed(on_entity)):
            if other.at_ms < since:
                return None  # and every earlier one: older still
            if (
                other.id != decision.id
                and other.status is DecisionStatus.ACCEPTED
                and other.author != decision.author
                and other.decision != decision.decision
            ):
                return other
        return None

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
            raise Conflict("not_found", f"{keep} is not one of {', '.join(case.decisions[:8])}")
        kept = records.decisions[keep]
        if kept.status is not DecisionStatus.ACCEPTED:
            reason = f"{keep} is {kept.status.value} by {kept.superseded_by}: keep an accepted one"
            raise Conflict(kept.status.value, reason)
        ladder = case.ladder
        member = directory.members.get(author)
        role = member.role if member is not None else ""
        if author in ladder.approvers or (ladder.approver_role and role == ladder.approver_role):
            by = Step.HUMAN
        elif ladder.arbiter and role == ladder.arbiter and case.step in (Step.ARBITER, Step.HUMAN):
            by = Step.ARBITER
        elif author in case.agents:
            case.proposals[author] = keep
            if len({case.wanted(agent) for agent in set(case.agents)}) > 1:
                return {"kind": PROPOSED, "conflict": case.id, "keep": keep, "agent": author}
            by = Step.AGENTS
        else:
            raise Conflict("not_resolver", f"{case.id} is at the {case.step} step")
        self._settle(case, keep, by, records)
        return {"kind": RESOLVED, "conflict": case.id, "keep": keep, "by": by.value,
                "note": note, "at_ms": now_ms}  # fmt: skip

    def _settle(self, case: ConflictCase, keep: str, by: Step | str, records: Records) -> None:
        case.kept, case.by = keep, str(by)
        case.until_ms = None
        self.open_on.pop(case.entity, None)
        self._untimed(case.id)
        self._dirty = True
        for other in case.decisions:
            record = records.decisions[other]
            if other != keep and record.status is DecisionStatus.ACCEPTED:
                record.status, record.superseded_by = DecisionStatus.OVERRULED, keep

    def _conflicts_due(
        self, directory: Directory, records: Records, now_ms: int
    ) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        fresh, self.fresh = self.fresh, []
        for case in (self.conflicts[c] for c in fresh):
            raised = {"conflict": case.id, "entity": case.entity,
                      "decisions": list(case.decisions), "agents": list(case.agents),
                      "at_ms": now_ms}  # fmt: skip
            out.append((RAISED, raised))
            out += self._rule(case, records, now_ms)
        ruling, self.ruling = self.ruling, []
        for case in (self.conflicts[c] for c in ruling):
            out += self._rule(case, records, now_ms)
        for cid in self._timed_due(now_ms):
            case, until = self.conflicts[cid], self.timed[cid]
            while case.open and until <= now_ms:
                out.append(self._next_step(case, directory, now_ms))
                until = self.timed.get(cid, now_ms + 1)
        return out

    def _timed_due(self, now_ms: int) -> list[str]:
        """The conflicts whose step ran out by ``now_ms``, in :attr:`timed`'s order.
        Their entries leave the heap: stepping them puts their next one on it."""
        timers, due = self._timers, set()
        while timers and timers[0][0] <= now_ms:
            until, cid = heapq.heappop(timers)
            if self.timed.get(cid) == until:
                due.add(cid)
            # else: stale (stepped or settled since)
        return sorted(due, key=self._timed_at.__getitem__)

    def _rule(
        self, case: ConflictCase, records: Records, now_ms: int
    ) -> list[tuple[str, dict[str, Any]]]:
        """The rule step: resolved by it, or passed on to the agents."""
        ladder = case.ladder
        if not case.open:  # (the agents settled it before the timer ran)
            return []
        if ladder.rule is Rule.NONE:
            agents = list(dict.fromkeys(case.agents))
            return [self._escalate(case, Step.AGENTS, agents, "rule none", now_ms)]
        # Of those still accepted: one superseded since the conflict was raised (in
        # the same batch, before this step) would overrule every live one.
        live = [d for d in case.decisions if records.decisions[d].status is DecisionStatus.ACCEPTED]
        if not live:
            agents = list(dict.fromkeys(case.agents))
            note = f"rule {ladder.rule}: no decision of it is still accepted"
            return [self._escalate(case, Step.AGENTS, agents, note, now_ms)]
        keep = live[0 if ladder.rule is Rule.FIRST else -1]
        self._settle(case, keep, Step.RULE, records)
        note = f"rule {ladder.rule}"
        resolved = {"conflict": case.id, "keep": keep, "by": "rule", "note": note, "at_ms": now_ms}
        return [(RESOLVED, resolved)]

    def _next_step(
        self, case: ConflictCase, directory: Directory, now_ms: int
    ) -> tuple[str, dict[str, Any]]:
        """The agents' or the arbiter's time ran out: up one rung (past a rung nobody
        can take, saying why)."""
        ladder, why = case.ladder, ""
        if case.step is Step.AGENTS:
            arbiters = directory.holding(ladder.arbiter, MAX_TO)
            if arbiters:
                return self._escalate(case, Step.ARBITER, arbiters, "", now_ms)
            why = f"no member holds {ladder.arbiter}" if ladder.arbiter else "no arbiter role"
        # Only the first MAX_TO of them are named (_escalate), and those are among the
        # approvers and the first MAX_TO holders: a holder past these has MAX_TO before it.
        holders = directory.holding(ladder.approver_role, MAX_TO)
        humans = sorted({*ladder.approvers, *holders})
        return self._escalate(case, Step.HUMAN, humans, why, now_ms)

    def _escalate(
        self, case: ConflictCase, step: Step, to: list[bytes], note: str, now_ms: int
    ) -> tuple[str, dict[str, Any]]:
        until = None if step is Step.HUMAN else now_ms + case.ladder.step_ms
        body = {"conflict": case.id, "step": step.value, "to": to[:MAX_TO],
                "until_ms": until, "note": note, "at_ms": now_ms}  # fmt: skip
        self._stepped(case, step, until)
        return ESCALATED, body

    def _stepped(self, case: ConflictCase, step: Step, until: int | None) -> None:
        case.step, case.until_ms = step, until
        if until is None:
            self._untimed(case.id)
        else:
            self._timed(case.id, until)
        self._dirty = True

    def _timed(self, cid: str, until: int) -> None:
        """Put a conflict's step on the timer (or move it)."""
        if cid not in self.timed:
            self._timed_at[cid], self._timed_next = self._timed_next, self._timed_next + 1
        self.timed[cid] = until
        heapq.heappush(self._timers, (until, cid))
        # A conflict stepped or settled leaves a stale entry that surfaces only when its
        # time comes: rebuild before they pile up (amortised, the heap stays O(timed)).
        if len(self._timers) > 2 * len(self.timed) + 64:
            self._rebuild_timers()

    def _untimed(self, cid: str) -> None:
        """Take a conflict off the timer (its heap entry goes stale)."""
        self.timed.pop(cid, None)
        self._timed_at.pop(cid, None)

    def _rebuild_timers(self) -> None:
        self._timers = [(until, cid) for cid, until in self.timed.items()]
        heapq.heapify(self._timers)

    # -- the timer --------------------------------------------------------------------

    def due(
        self, directory: Directory, records: Records, now_ms: int
    ) -> list[tuple[str, dict[str, Any]]]:
        """The events due at ``now_ms``, applied here as replay will apply them."""
        if self.next_due_ms() is None or now_ms < (self.next_due_ms() or 0):
            return []
        self._dirty = True
        return self._conflicts_due(directory, records, now_ms) + self._routing_due(now_ms)

    def replay(self, kind: str, body: dict[str, Any], records: Records) -> None:
        """Re-apply an event the timer wrote, as written."""
        self._dirty = True
        if kind in (NOTICE, DIGEST):
            self._told([(kind, body)])
            return
        case = self.conflicts.get(body.get("conflict", ""))
        if case is None:  # pragma: no cover - the timer writes only cases it knows
            return
        if kind == RAISED:
            self.fresh.remove(case.id)
            if case.open:
                self.ruling.append(case.id)
        elif kind == ESCALATED:
            if case.id in self.ruling:
                self.ruling.remove(case.id)
            self._stepped(case, Step(body["step"]), body["until_ms"])
        elif kind == RESOLVED:
            if case.id in self.ruling:
                self.ruling.remove(case.id)
            self._settle(case, body["keep"], body["by"], records)

    def next_due_ms(self) -> int | None:
        if self._dirty:
            self._next_due, self._dirty = self._compute_next_due(), False
        return self._next_due

    def _compute_next_due(self) -> int | None:
        """The earliest of: a conflict to announce or rule (``fresh``, ``ruling``: a
        batch's worth, the timer takes them all at its next wake), a timed step, and
        what waits to be told. Fronts of queues and heaps, not everything they hold."""
        times = [self.conflicts[c].raised_ms for c in (*self.fresh, *self.ruling)]
        timers = self._timers
        while timers and self.timed.get(timers[0][1]) != timers[0][0]:
            heapq.heappop(timers)  # stepped or settled since: stale
        if timers:
            times.append(timers[0][0])
        if (routing := self.waiting.next_due_ms(self.policy.digest_ms)) is not None:
            times.append(routing)
        return min(times, default=None)


def _routed(item: Routed) -> dict[str, Any]:
    told: dict[str, Any] = {"event": item.event, "kind": item.kind}
    if item.entity is not None:
        told["entity"] = item.entity
    return told
