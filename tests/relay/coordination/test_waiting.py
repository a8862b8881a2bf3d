"""The decision router's timer reads the fronts of per-role queues, a heap of timed
conflict steps and the directory's index of roles, not everything the namespace
holds: it must write what the scans wrote, byte for byte.

Notices and digests, their ``to`` and their order, and every conflict step go into the
log, and a replica or a replay applies them as written, so the old code is kept here
as the reference (``ScanDecisions``: one list of all that waits, read whole at every
routed event and every wake; ``timed`` read whole; a role's holders by a pass over
the members). The property drives routing policies, members joining (and changing
role) and leaving, routed events one by one and in bursts, decisions that conflict,
resolutions, timer ticks and a clock that moves by more or less than ``digest_ms`` and
``step_ms`` (and now and then back), and after every step compares the timer's
events (their repr: keys in order), when it is next due, what waits, the conflicts,
the holders of each role, and a replica that replays what the timer wrote. Digests
and ``to`` lists are cut to a few there (``MAX_DIGEST``, ``MAX_TO``) so that full ones
happen; a seeded run compares them at their real sizes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.coordination import decisions as decisions_module
from relay.coordination import waiting as waiting_module
from relay.coordination.decisions import (
    DIGEST,
    NOTICE,
    Decisions,
    Latency,
    Routed,
    Step,
    _routed,
    parse_policy,
)
from relay.coordination.directory import Directory, Member
from relay.coordination.fields import BadRequest, Conflict
from relay.coordination.records import Records
from relay.coordination.waiting import Waiting

AGENTS = [bytes([n]) * 32 for n in range(1, 7)]
HUMAN = bytes([9]) * 32
ROLES = ["r0", "r1", "r2"]
KINDS = ["app.a", "app.b"]


def holding_by_scan(directory: Directory, role: str) -> list[bytes]:
    """The definition: the keys of the members that hold ``role`` (sorted; kept after
    they leave)."""
    if not role:
        return []
    return sorted(m.agent for m in directory.members.values() if m.role == role)


class ScanDecisions(Decisions):
    """The reference: the router and the timer as they were, over one list."""

    def __init__(self) -> None:
        super().__init__()
        self.items: list[Routed] = []

    def route(self, event: bytes, kind: str, body: Any, directory: Directory, now_ms: int) -> bool:
        max_to = decisions_module.MAX_TO
        latencies: dict[str, Latency] = {}
        for route in self.routes_of(kind):
            if latencies.get(route.role) is not Latency.NOW:
                latencies[route.role] = route.latency
        entity = body.get("entity") if isinstance(body, dict) else None
        entity = entity if isinstance(entity, str) and len(entity) <= 256 else None
        for role, latency in latencies.items():
            to = tuple(holding_by_scan(directory, role)[:max_to])
            self.items.append(Routed(event, kind, entity, role, to, now_ms, latency))
        self._dirty |= bool(latencies)
        return bool(latencies)

    def _routing_due(self, now_ms: int) -> list[tuple[str, dict[str, Any]]]:
        max_digest, max_to = waiting_module.MAX_DIGEST, decisions_module.MAX_TO
        out: list[tuple[str, dict[str, Any]]] = []
        digests: dict[str, list[Routed]] = {}
        for item in self.items:
            if item.latency is Latency.NOW:
                out.append((NOTICE, {**_routed(item), "role": item.role, "to": list(item.to)}))
            else:
                digests.setdefault(item.role, []).append(item)
        for role, items in digests.items():
            while len(items) >= max_digest or (
                items and items[0].at_ms + self.policy.digest_ms <= now_ms
            ):
                told, items = items[:max_digest], items[max_digest:]
                to = sorted({key for item in told for key in item.to})[:max_to]
                out.append((DIGEST, {"role": role, "to": to, "events": [_routed(i) for i in told]}))
        self._told(out)
        return out

    def _told(self, told: list[tuple[str, dict[str, Any]]]) -> None:
        gone = {
            (event, body["role"])
            for kind, body in told
            for event in (
                [body["event"]] if kind == NOTICE else [e["event"] for e in body["events"]]
            )
        }
        if gone:
            self.items = [w for w in self.items if (w.event, w.role) not in gone]
            self._dirty = True

    def _conflicts_due(
        self, directory: Directory, records: Records, now_ms: int
    ) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        fresh, self.fresh = self.fresh, []
        for case in (self.conflicts[c] for c in fresh):
            raised = {"conflict": case.id, "entity": case.entity,
                      "decisions": list(case.decisions), "agents": list(case.agents),
                      "at_ms": now_ms}  # fmt: skip
            out.append(("conflict.raised", raised))
            out += self._rule(case, records, now_ms)
        ruling, self.ruling = self.ruling, []
        for case in (self.conflicts[c] for c in ruling):
            out += self._rule(case, records, now_ms)
        for cid, until in list(self.timed.items()):
            case = self.conflicts[cid]
            while case.open and until <= now_ms:
                out.append(self._next_step(case, directory, now_ms))
                until = self.timed.get(cid, now_ms + 1)
        return out

    def _next_step(
        self, case: Any, directory: Directory, now_ms: int
    ) -> tuple[str, dict[str, Any]]:
        ladder, why = case.ladder, ""
        if case.step is Step.AGENTS:
            arbiters = holding_by_scan(directory, ladder.arbiter)
            if arbiters:
                return self._escalate(case, Step.ARBITER, arbiters, "", now_ms)
            why = f"no member holds {ladder.arbiter}" if ladder.arbiter else "no arbiter role"
        humans = sorted({*ladder.approvers, *holding_by_scan(directory, ladder.approver_role)})
        return self._escalate(case, Step.HUMAN, humans, why, now_ms)

    def _compute_next_due(self) -> int | None:
        max_digest = waiting_module.MAX_DIGEST
        times = [self.conflicts[c].raised_ms for c in (*self.fresh, *self.ruling)]
        times += self.timed.values()
        gathered: dict[str, list[int]] = {}
        for item in self.items:
            if item.latency is Latency.NOW:
                times.append(item.at_ms)
            else:
                gathered.setdefault(item.role, []).append(item.at_ms)
        for at in gathered.values():
            times.append(
                at[max_digest - 1] if len(at) >= max_digest else at[0] + self.policy.digest_ms
            )
        return min(times, default=None)


def joined(agent: bytes, role: str, now_ms: int) -> Member:
    return Member(agent, "a", (), role, "", None, joined_ms=now_ms)


def outcome(call: Any, *args: Any) -> Any:
    """What a request answered (its repr: keys in order), or its refusal."""
    try:
        return repr(call(*args))
    except (Conflict, BadRequest) as refusal:
        return type(refusal).__name__, str(refusal)


class Sides:
    """The indexed router, the reference, and a replica that replays the timer's events
    (routing and requests it decides alike, as a relay replaying its log does)."""

    def __init__(self) -> None:
        self.mine, self.scan, self.replica = Decisions(), ScanDecisions(), Decisions()
        self.records = {id(side): Records() for side in self.sides}
        self.directory = Directory()
        self.now = 0
        self.events = 0

    @property
    def sides(self) -> tuple[Decisions, Decisions, Decisions]:
        return self.mine, self.scan, self.replica

    def policy(
        self, routes: list[tuple[list[str], str, str]], digest_ms: int, ladder: bool
    ) -> None:
        body: dict[str, Any] = {
            "routes": [{"kinds": k, "role": r, "latency": lat} for k, r, lat in routes],
            "digest_ms": digest_ms,
        }
        if ladder:
            body["conflicts"] = {"rule": "none", "step_ms": 1_000, "arbiter": "r1",
                                 "approvers": [HUMAN], "approver_role": "r2"}  # fmt: skip
        for side in self.sides:
            side.set_policy(parse_policy(body))

    def route(self, kind: str, entity: str | None) -> None:
        self.events += 1
        event = self.events.to_bytes(4, "big")
        body = {"entity": entity} if entity is not None else {}
        routed = {side.route(event, kind, body, self.directory, self.now) for side in self.sides}
        assert len(routed) == 1

    def decide(self, author: bytes, entity: str, say: int) -> None:
        answers = set()
        for side in self.sides:
            records = self.records[id(side)]
            made = records.decide("t", f"say {say}", author, self.now, entity=entity)
            answers.add(side.on_decision(made, records, self.now))
        assert len(answers) == 1

    def resolve(self, who: bytes, case: int, keep: int) -> None:
        cases = list(self.mine.conflicts.values())
        if not cases:
            return
        chosen = cases[case % len(cases)]
        body = {"conflict": chosen.id, "keep": chosen.decisions[keep % len(chosen.decisions)]}
        answers = []
        for side in self.sides:
            records = self.records[id(side)]
            answers.append(
                outcome(side.resolve, dict(body), who, records, self.directory, self.now)
            )
        assert answers[0] == answers[1] == answers[2]

    def tick(self) -> list[tuple[str, dict[str, Any]]]:
        mine = self.mine.due(self.directory, self.records[id(self.mine)], self.now)
        scan = self.scan.due(self.directory, self.records[id(self.scan)], self.now)
        assert repr(mine) == repr(scan)  # the same events, bodies with keys in order
        for kind, body in mine:  # as written: the replica applies them, not decides
            self.replica.replay(kind, body, self.records[id(self.replica)])
        return mine

    def tell(self, event: bytes, role: str) -> None:
        notice = {"event": event, "kind": "app.a", "role": role, "to": []}
        for side in self.sides:
            side.replay(NOTICE, notice, self.records[id(side)])

    def check(self) -> None:
        mine, scan, replica = self.sides
        assert mine.next_due_ms() == scan.next_due_ms() == replica.next_due_ms()
        assert list(mine.waiting) == scan.items and len(mine.waiting) == len(scan.items)
        assert mine.waiting == replica.waiting == Waiting(scan.items)
        for field in ("conflicts", "open_on", "fresh", "ruling"):
            assert getattr(mine, field) == getattr(scan, field) == getattr(replica, field)
        # (timed's order is the order its steps are taken in)
        assert list(mine.timed.items()) == list(scan.timed.items())
        assert list(mine.timed.items()) == list(replica.timed.items())
        assert mine == replica
        for role in ["", *ROLES]:
            assert self.directory.holding(role) == holding_by_scan(self.directory, role)


@contextmanager
def small_limits(max_digest: int, max_to: int) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(waiting_module, "MAX_DIGEST", max_digest)
        patch.setattr(decisions_module, "MAX_TO", max_to)
        yield


route_rule = st.tuples(
    st.lists(st.sampled_from(KINDS), min_size=1, max_size=2, unique=True),
    st.sampled_from(ROLES),
    st.sampled_from(["now", "digest"]),
)
ops = {
    "policy": st.tuples(
        st.just("policy"),
        st.lists(route_rule, max_size=4),
        st.sampled_from([1_000, 2_000, 5_000]),
        st.booleans(),
    ),
    "join": st.tuples(st.just("join"), st.integers(0, 5), st.sampled_from(["", *ROLES])),
    "leave": st.tuples(st.just("leave"), st.integers(0, 5)),
    "route": st.tuples(st.just("route"), st.sampled_from(KINDS), st.sampled_from([None, "e0"])),
    "burst": st.tuples(st.just("burst"), st.sampled_from(KINDS), st.integers(1, 8)),
    "decide": st.tuples(
        st.just("decide"), st.integers(0, 3), st.sampled_from(["e0", "e1"]), st.integers(0, 1)
    ),
    "resolve": st.tuples(
        st.just("resolve"), st.integers(0, 6), st.integers(0, 3), st.integers(0, 3)
    ),
    "tick": st.tuples(st.just("tick")),
    "wait": st.tuples(st.just("wait"), st.sampled_from([0, 1, 999, 1_000, 1_001, 2_500, 6_000])),
    "back": st.tuples(st.just("back"), st.sampled_from([1, 700])),
    # A notice replayed for any (event, role): not one the timer would write, so what it
    # tells is not always at the front of a queue.
    "tell": st.tuples(st.just("tell"), st.integers(1, 40), st.sampled_from(ROLES)),
}
WEIGHTS = {"join": 2, "route": 2, "burst": 2, "decide": 3, "tick": 3, "wait": 3}
step = st.sampled_from([n for n in ops for _ in range(WEIGHTS.get(n, 1))]).flatmap(ops.get)


def play(sides: Sides, op: tuple[Any, ...]) -> None:
    what = op[0]
    if what == "policy":
        sides.policy(op[1], op[2], op[3])
    elif what == "join":
        sides.directory.join(joined(AGENTS[op[1]], op[2], sides.now))
    elif what == "leave":
        sides.directory.leave(AGENTS[op[1]], sides.now, "bye")
    elif what == "route":
        sides.route(op[1], op[2])
    elif what == "burst":
        for _ in range(op[2]):
            sides.route(op[1], None)
    elif what == "decide":
        sides.decide(AGENTS[op[1]], op[2], op[3])
    elif what == "resolve":
        sides.resolve(HUMAN if op[1] == 6 else AGENTS[op[1]], op[2], op[3])
    elif what == "tick":
        sides.tick()
    elif what == "tell":
        sides.tell(op[1].to_bytes(4, "big"), op[2])
    elif what == "wait":
        sides.now += op[1]
    else:  # the log's clock never goes back; the answers must not depend on it
        sides.now = max(0, sides.now - op[1])


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.lists(step, min_size=20, max_size=80))
def test_the_timer_writes_what_the_scans_wrote(steps: list[tuple[Any, ...]]) -> None:
    with small_limits(max_digest=3, max_to=2):
        sides = Sides()
        sides.policy([(["app.a"], "r0", "digest"), (["app.b"], "r1", "now")], 1_000, True)
        for op in steps:
            play(sides, op)
            sides.check()


@pytest.mark.parametrize("seed", range(3))
def test_at_full_size_a_seeded_run_agrees(seed: int) -> None:
    """Real limits: full digests of 256, ``to`` cut at 256 of 300 holders."""
    rng = random.Random(seed)
    sides = Sides()
    for n in range(600):
        sides.directory.join(joined(n.to_bytes(32, "big"), ROLES[n % 2], 0))
    routes = [(["app.a"], "r0", "digest"), (["app.a", "app.b"], "r1", "digest"),
              (["app.b"], "r2", "now")]  # fmt: skip
    sides.policy(routes, 60_000, True)
    for _ in range(400):
        op = rng.choice(["burst", "burst", "tick", "wait", "join", "decide", "resolve"])
        if op == "burst":
            play(sides, ("burst", rng.choice(KINDS), rng.randrange(1, 120)))
        elif op == "wait":
            play(sides, ("wait", rng.choice([1, 1_000, 30_000, 60_000])))
        elif op == "join":
            play(sides, ("join", rng.randrange(6), rng.choice(["", *ROLES])))
        elif op == "decide":
            play(sides, ("decide", rng.randrange(4), "e0", rng.randrange(2)))
        elif op == "resolve":
            play(sides, ("resolve", rng.randrange(7), rng.randrange(4), rng.randrange(4)))
        else:
            play(sides, ("tick",))
        sides.check()
    assert sides.events > 5_000


def test_conflicts_due_together_step_in_the_order_they_were_timed() -> None:
    """Twelve conflicts whose steps run out at once: stepped in the order they went on
    the timer, as the pass over ``timed`` did (not in the order of their ids, where
    cf-10 comes before cf-2), at every rung."""
    sides = Sides()
    sides.policy([], 1_000, True)
    sides.directory.join(joined(AGENTS[5], "r1", 0))  # an arbiter
    for n in range(12):
        sides.decide(AGENTS[0], f"e{n}", 0)
        sides.decide(AGENTS[1], f"e{n}", 1)
    order = [f"cf-{n}" for n in range(1, 13)]
    for wait, step in ((0, "agents"), (1_000, "arbiter"), (1_000, "human")):
        sides.now += wait
        stepped = [b for k, b in sides.tick() if k == "conflict.escalated"]
        assert [(b["conflict"], b["step"]) for b in stepped] == [(c, step) for c in order]
        sides.check()


class _NoPass(dict[Any, Any]):
    """A dict that refuses to be read whole: a pass over it fails the test."""

    def _refuse(self, *args: Any) -> Any:
        raise AssertionError("read whole")

    values = items = keys = __iter__ = _refuse  # type: ignore[assignment]


def test_a_routed_event_and_a_wake_read_neither_all_that_waits_nor_every_member(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """31 roles of 254 events waiting for their digest, 10,000 members, 2,000
    conflicts at a timed step: a routed event, when the timer is next due, and the wake
    that tells it read none of these whole (the scans: ~1 ms, 0.14 ms, and the timed
    conflicts at every wake)."""
    routes = [{"kinds": ["app.a"], "role": f"r{n}", "latency": "digest"} for n in range(31)]
    routes.append({"kinds": ["app.b"], "role": "ops", "latency": "now"})
    ladder = {"rule": "none", "step_ms": 3_600_000, "approvers": [HUMAN]}
    decisions, records, directory = Decisions(), Records(), Directory()
    decisions.set_policy(parse_policy({"routes": routes, "digest_ms": 3_600_000,
                                       "conflicts": ladder}))  # fmt: skip
    for n in range(10_000):
        directory.join(joined(n.to_bytes(32, "big"), "ops" if n % 100 == 0 else "", 0))
    for n in range(254):
        decisions.route(b"a%d" % n, "app.a", {}, directory, 1)
    for n in range(2_000):
        for author, say in ((AGENTS[0], "x"), (AGENTS[1], "y")):
            made = records.decide("t", say, author, 1, entity=f"e{n}")
            decisions.on_decision(made, records, 1)
    decisions.due(directory, records, 1)
    assert len(decisions.waiting) == 31 * 254 and len(decisions.timed) == 2_000
    directory.members = _NoPass(directory.members)
    decisions.timed = _NoPass(decisions.timed)
    monkeypatch.setattr(Waiting, "__iter__", _NoPass._refuse)

    assert decisions.route(b"b", "app.b", {}, directory, 2)
    assert decisions.route(b"a", "app.a", {}, directory, 2)
    assert decisions.next_due_ms() == 2
    [(kind, notice)] = decisions.due(directory, records, 2)
    assert kind == NOTICE and len(notice["to"]) == 100
    assert decisions.next_due_ms() == 1 + 3_600_000


def test_a_role_changed_or_left_is_held_as_the_members_say() -> None:
    directory = Directory()
    a, b, c = AGENTS[:3]
    for agent in (c, a, b):
        directory.join(joined(agent, "ops", 0))
    assert directory.holding("ops") == [a, b, c] and directory.holding("ops", 2) == [a, b]
    directory.join(joined(b, "dev", 1))  # a new role: out of the old one
    directory.leave(c, 2, "bye")  # left: still holds it
    assert directory.holding("ops") == [a, c] and directory.holding("dev") == [b]
    directory.join(joined(a, "", 3))  # no role any more
    assert directory.holding("ops") == [c] and directory.holding("") == []
    again = Directory(members=dict(directory.members))  # given members are indexed too
    assert [again.holding(r) for r in ("ops", "dev")] == [[c], [b]]
