"""A decision on an entity looks for its rival in the ladder's window only, newest
first, not through every decision ever made on the entity: it must find the one the
scan of all of them found (the latest that qualifies).

Whether a decision raises a conflict, and with which rival, is logged and decided
again on replay. The property drives decisions by three authors saying one of two
things on two entities, supersessions, and timer ticks (so conflicts settle by rule
or wait on people), with times that advance by less or more than the window, on a
namespace beside one that keeps the scan (kept here as the reference): the conflict
each decision raises or joins, and the state, must be the same after every step.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.coordination.decisions import Decisions, Ladder, parse_policy
from relay.coordination.directory import Directory
from relay.coordination.records import Decision, DecisionStatus, Records

AGENTS = [bytes([n]) * 32 for n in range(1, 4)]
WINDOW_MS = 1_000


class ScanDecisions(Decisions):
    """The reference: every decision on the entity, the latest that qualifies."""

    @staticmethod
    def _rival(
        decision: Decision,
        on_entity: Sequence[str],
        records: Records,
        ladder: Ladder,
        now_ms: int,
    ) -> Decision | None:
        rivals = [
            other
            for other in (records.decisions[d] for d in on_entity)
            if other.id != decision.id
            and other.status is DecisionStatus.ACCEPTED
            and other.author != decision.author
            and other.decision != decision.decision
            and other.at_ms >= now_ms - ladder.window_ms
        ]
        return rivals[-1] if rivals else None


step = st.one_of(
    st.tuples(st.just("decide"), st.integers(0, 2), st.integers(0, 1), st.integers(0, 1)),
    st.tuples(st.just("supersede"), st.integers(0, 2), st.integers(0, 1), st.integers(0, 9)),
    st.tuples(st.just("tick"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("wait"), st.sampled_from([0, 1, 400, 999, 1_000, 1_001, 5_000]),
              st.just(0), st.just(0)),
)  # fmt: skip


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.sampled_from(["none", "first", "last"]), st.lists(step, max_size=50))
@example("none", [("decide", 0, 0, 0), ("wait", WINDOW_MS, 0, 0), ("decide", 1, 0, 1)])  # the edge
def test_a_conflict_is_raised_against_the_rival_a_scan_would_find(
    rule: str, steps: list[tuple[str, int, int, int]]
) -> None:
    policy = parse_policy(
        {"conflicts": {"window_ms": WINDOW_MS, "rule": rule, "approvers": [AGENTS[0]]}}
    )
    sides = [(Decisions(), Records()), (ScanDecisions(), Records())]
    for decisions, _ in sides:
        decisions.set_policy(policy)
    directory = Directory()
    now = 0
    for op, a, b, c in steps:
        if op == "wait":
            now += a
            continue
        answers = []
        for decisions, records in sides:
            if op == "tick":
                answers.append(decisions.due(directory, records, now))
                continue
            supersedes = None
            if op == "supersede":
                mine = [
                    d.id
                    for d in records.decisions.values()
                    if d.status is DecisionStatus.ACCEPTED and d.entity == f"e{b}"
                ]
                if not mine:
                    continue
                supersedes = mine[c % len(mine)]
            made = records.decide("t", f"say {c % 2}", AGENTS[a], now, entity=f"e{b}",
                                  supersedes=supersedes)  # fmt: skip
            answers.append(decisions.on_decision(made, records, now))
        assert answers[0] == answers[1] if len(answers) == 2 else not answers
        (mine, my_records), (theirs, their_records) = sides
        assert my_records == their_records
        assert (mine.conflicts, mine.open_on, mine.fresh, mine.ruling, mine.timed) == (
            theirs.conflicts, theirs.open_on, theirs.fresh, theirs.ruling, theirs.timed
        )  # fmt: skip


def test_an_entity_decided_on_for_long_is_read_within_the_window_only() -> None:
    """10,000 decisions on one entity, a second apart: a new one reads the last ten
    minutes of them (the scan read all: 1.7 ms a decision; now 0.1 ms), and still
    finds a rival at the window's edge."""
    records, decisions = Records(), Decisions()
    decisions.set_policy(parse_policy({"conflicts": {"approvers": [AGENTS[0]]}}))
    window = decisions.policy.ladder.window_ms  # type: ignore[union-attr]
    for n in range(10_000):
        records.decide("t", "yes", AGENTS[n % 2], n * 1_000, entity="e")
    read: list[str] = []
    on_entity = records.on_entity["e"]
    records.on_entity["e"] = _Watched(on_entity, read)
    later = records.decide("t", "yes", AGENTS[0], 10_000 * 1_000, entity="e")
    assert decisions.on_decision(later, records, later.at_ms) is None
    assert len(read) <= window // 1_000 + 2, len(read)
    # A rival exactly at the window's edge still counts.
    records.on_entity["e"] = on_entity
    records, decisions = Records(), Decisions()
    decisions.set_policy(parse_policy({"conflicts": {"approvers": [AGENTS[0]]}}))
    edge = records.decide("t", "no", AGENTS[2], 0, entity="e")
    last = records.decide("t", "yes", AGENTS[1], window, entity="e")
    case = decisions.on_decision(last, records, window)
    assert case is not None and decisions.conflicts[case].decisions == [edge.id, last.id]


class _Watched(list[str]):
    """An entity's decision list that notes every id read from it."""

    def __init__(self, ids: list[str], read: list[str]) -> None:
        super().__init__(ids)
        self.read = read

    def __reversed__(self):  # type: ignore[no-untyped-def]
        for item in super().__reversed__():
            self.read.append(item)
            yield item

    def __iter__(self):  # type: ignore[no-untyped-def]
        for item in super().__iter__():
            self.read.append(item)
            yield item
