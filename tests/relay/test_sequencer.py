"""The pure sequencer: dedupe, causal parking and timeout, hash chain, HLC."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent_sdk.errors import ErrorCode
from agent_sdk.wire import Event, SignedEvent, check_chain, decode_receipt, sign_event
from relay.sequencer import (
    HLC_SHIFT,
    Duplicate,
    Limits,
    Parked,
    Rejected,
    Sequenced,
    Sequencer,
)
from relay.store import Head, Located, Record
from tests.conftest import identity

AUTHOR = identity(1)
RELAY_KEY = identity(2).public_key
NOW = 1_700_000_000_000


def event(n: int, ns: str = "t@local", deps: tuple[bytes, ...] = (), **changes: Any) -> SignedEvent:
    fields: dict[str, Any] = {"ts": NOW, "body": n}
    fields.update(changes)
    return sign_event(
        Event(ns=ns, kind="app.x", author=AUTHOR.public_key, deps=deps, **fields), AUTHOR.sign
    )


def sequenced(outcome: object) -> tuple[Record, ...]:
    assert isinstance(outcome, Sequenced), outcome
    return outcome.records


def test_sequences_gapless_and_chained() -> None:
    sequencer = Sequencer(RELAY_KEY)
    records = [sequenced(sequencer.offer(event(i), NOW))[0] for i in range(5)]
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert check_chain([decode_receipt(r.receipt) for r in records]) is None
    other = sequenced(sequencer.offer(event(9, ns="u@local"), NOW))[0]
    assert other.seq == 1  # seq is per namespace
    assert other.hlc > records[-1].hlc  # hlc is per relay


def test_duplicate_returns_the_first_placement() -> None:
    sequencer = Sequencer(RELAY_KEY)
    first = sequenced(sequencer.offer(event(1), NOW))[0]
    again = sequencer.offer(event(1), NOW + 5)
    assert again == Duplicate(Located("t@local", first.seq, first.hlc))
    assert sequencer.heads["t@local"].seq == 1


def test_event_waits_for_its_dependency_then_follows_it() -> None:
    sequencer = Sequencer(RELAY_KEY)
    cause = event(1)
    effect = event(2, deps=(cause.id,))
    assert sequencer.offer(effect, NOW) == Parked(frozenset({cause.id}))
    assert sequencer.offer(effect, NOW) == Parked(frozenset({cause.id}))  # retry while parked
    records = sequenced(sequencer.offer(cause, NOW))
    assert [r.id for r in records] == [cause.id, effect.id]
    assert records[1].hlc > records[0].hlc
    assert sequencer.parked_count == 0


def test_parked_event_times_out_with_missing_deps() -> None:
    sequencer = Sequencer(RELAY_KEY, limits=Limits(park_timeout_ms=1000))
    effect = event(2, deps=(event(1).id,))
    assert isinstance(sequencer.offer(effect, NOW), Parked)
    assert sequencer.next_deadline_ms() == NOW + 1000
    assert sequencer.expire(NOW + 999) == []
    [(expired, rejected)] = sequencer.expire(NOW + 1000)
    assert expired == effect
    assert rejected.code is ErrorCode.MISSING_DEPS
    assert sequencer.parked_count == 0
    assert sequencer.next_deadline_ms() is None
    # The cause arriving later sequences alone: nothing is left waiting on it.
    assert len(sequenced(sequencer.offer(event(1), NOW + 2000))) == 1


def test_parking_is_bounded() -> None:
    sequencer = Sequencer(RELAY_KEY, limits=Limits(max_parked=1))
    missing = event(0).id
    assert isinstance(sequencer.offer(event(1, deps=(missing,)), NOW), Parked)
    outcome = sequencer.offer(event(2, deps=(missing,)), NOW)
    assert isinstance(outcome, Rejected) and outcome.code is ErrorCode.MISSING_DEPS


def test_far_off_timestamps_are_refused() -> None:
    sequencer = Sequencer(RELAY_KEY, limits=Limits(max_clock_skew_ms=60_000))
    outcome = sequencer.offer(event(1, ts=NOW + 60_001), NOW)
    assert isinstance(outcome, Rejected) and outcome.code is ErrorCode.BAD_TIMESTAMP
    assert isinstance(sequencer.offer(event(1, ts=NOW - 60_000), NOW), Sequenced)


def test_unknown_ids_are_resolved_through_learn() -> None:
    sequencer = Sequencer(RELAY_KEY)
    old = event(1)
    effect = event(2, deps=(old.id,))
    assert sequencer.unknown([effect]) == {effect.id, old.id}
    future_hlc = (NOW + 10_000) << HLC_SHIFT
    sequencer.learn({old.id: Located("t@local", 1, future_hlc)})
    assert sequencer.unknown([effect]) == {effect.id}
    assert isinstance(sequencer.offer(old, NOW), Duplicate)
    [record] = sequenced(sequencer.offer(effect, NOW))
    assert record.hlc > future_hlc  # hlc extends causal order even past the wall clock


def test_a_dependency_far_ahead_of_the_clock_is_refused_not_followed() -> None:
    """Another relay's event with an hlc well past this relay's clock would drag every
    later hlc ahead of the wall clock, and with it the clock leases and auctions are
    decided by. Refused, whether offered now or released by its dependency's arrival."""
    sequencer = Sequencer(RELAY_KEY, limits=Limits(max_dep_ahead_ms=60_000))
    near, far = event(1, ns="x@b"), event(2, ns="x@b")
    sequencer.learn({near.id: Located("x@b", 1, (NOW + 60_000) << HLC_SHIFT)})
    sequenced(sequencer.offer(event(3, deps=(near.id,)), NOW))  # within the bound
    # ...which does not move the bound: a peer cannot drag the clock a step at a time.
    step = event(9, ns="x@b")
    sequencer.learn({step.id: Located("x@b", 9, (NOW + 120_000) << HLC_SHIFT)})
    stepped = sequencer.offer(event(10, deps=(step.id,)), NOW)
    assert isinstance(stepped, Rejected) and stepped.code is ErrorCode.BAD_TIMESTAMP
    sequencer.learn({far.id: Located("x@b", 2, (NOW + 3_600_000) << HLC_SHIFT)})
    refused = sequencer.offer(event(4, deps=(far.id,)), NOW)
    assert isinstance(refused, Rejected) and refused.code is ErrorCode.BAD_TIMESTAMP
    assert "ahead of this relay's clock" in refused.reason
    later = event(5, ns="x@b")
    waiting = event(6, deps=(later.id,))
    assert isinstance(sequencer.offer(waiting, NOW), Parked)
    assert (
        sequencer.arrived({later.id: Located("x@b", 3, (NOW + 3_600_000) << HLC_SHIFT)}, NOW) == ()
    )
    [(signed, rejected)] = sequencer.refused
    assert signed.id == waiting.id and rejected.code is ErrorCode.BAD_TIMESTAMP
    # Its own hlc ahead of a clock that went back is not "ahead": nothing new is dragged.
    behind = Sequencer(RELAY_KEY, hlc=(NOW + 3_600_000) << HLC_SHIFT)
    mine = sequenced(behind.offer(event(7), NOW))[0]
    sequenced(behind.offer(event(8, deps=(mine.id,)), NOW))


def test_restart_continues_the_chain() -> None:
    sequencer = Sequencer(RELAY_KEY)
    last = sequenced(sequencer.offer(event(1), NOW))[0]
    receipt = decode_receipt(last.receipt)
    restarted = Sequencer(RELAY_KEY, {"t@local": Head("t@local", 1, receipt.hash, last.hlc)})
    nxt = sequenced(restarted.offer(event(2), NOW - 50_000))[0]  # the wall clock went back
    assert nxt.seq == 2
    assert check_chain([decode_receipt(nxt.receipt)], receipt) is None


def test_only_committed_ids_leave_the_bounded_cache() -> None:
    sequencer = Sequencer(RELAY_KEY, limits=Limits(known_capacity=3))
    events = [event(i) for i in range(5)]
    for e in events:
        sequencer.offer(e, NOW)
    # Not committed yet: the store could not answer for them, so all stay known.
    assert all(sequencer.locate(e.id) is not None for e in events)
    assert isinstance(sequencer.offer(events[0], NOW), Duplicate)
    sequencer.committed(e.id for e in events)
    assert sequencer.locate(events[0].id) is None  # evicted: the store answers for it
    assert sequencer.locate(events[4].id) is not None


def test_a_parked_event_keeps_its_deps_hlc_when_they_are_evicted() -> None:
    sequencer = Sequencer(RELAY_KEY, limits=Limits(known_capacity=2))
    early = sequenced(sequencer.offer(event(1), NOW + 10_000))[0]  # a high hlc
    sequencer.committed([early.id])
    missing = event(2)
    effect = event(3, deps=(early.id, missing.id))
    assert isinstance(sequencer.offer(effect, NOW), Parked)
    others = [event(10 + i) for i in range(3)]
    for other in others:  # push `early` out of the cache
        sequencer.offer(other, NOW)
    sequencer.committed(o.id for o in others)
    assert sequencer.locate(early.id) is None
    records = sequenced(sequencer.offer(missing, NOW))
    assert [r.id for r in records] == [missing.id, effect.id]
    assert records[1].hlc > early.hlc


@st.composite
def dags(draw: st.DrawFn) -> tuple[list[SignedEvent], list[int]]:
    """Random events over 3 namespaces, each depending on earlier ones, and an arrival order."""
    count = draw(st.integers(1, 25))
    events: list[SignedEvent] = []
    for i in range(count):
        deps = draw(st.sets(st.integers(0, i - 1), max_size=3)) if i else set()
        ns = draw(st.sampled_from(["a@local", "b@local", "c@local"]))
        events.append(event(i, ns=ns, deps=tuple(events[d].id for d in sorted(deps))))
    order = draw(st.permutations(range(count)))
    return events, list(order)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(dags())
def test_namespace_order_extends_causal_order(case: tuple[list[SignedEvent], list[int]]) -> None:
    events, order = case
    sequencer = Sequencer(RELAY_KEY)
    records: list[Record] = []
    for index in order:
        outcome = sequencer.offer(events[index], NOW)
        assert isinstance(outcome, (Sequenced, Parked))
        if isinstance(outcome, Sequenced):
            records.extend(outcome.records)
    assert sequencer.parked_count == 0
    assert sorted(r.id for r in records) == sorted(e.id for e in events)  # each exactly once
    placed = {r.id: r for r in records}
    for signed in events:
        mine = placed[signed.id]
        for dep in signed.event.deps:
            theirs = placed[dep]
            assert theirs.hlc < mine.hlc
            if theirs.ns == mine.ns:
                assert theirs.seq < mine.seq
    for ns in {r.ns for r in records}:
        receipts = [decode_receipt(r.receipt) for r in records if r.ns == ns]
        assert check_chain(receipts) is None  # gapless from 1 and hash-chained


def test_released_events_leave_the_expiry_schedule() -> None:
    sequencer = Sequencer(RELAY_KEY, limits=Limits(park_timeout_ms=1000))
    first_cause, second_cause = event(1), event(2)
    first = event(3, deps=(first_cause.id,))
    second = event(4, deps=(second_cause.id,))
    assert isinstance(sequencer.offer(first, NOW), Parked)
    assert isinstance(sequencer.offer(second, NOW + 10), Parked)
    assert sequencer.next_deadline_ms() == NOW + 1000
    sequencer.offer(first_cause, NOW + 20)  # releases `first`
    assert sequencer.next_deadline_ms() == NOW + 1010
    [(expired, _)] = sequencer.expire(NOW + 5000)
    assert expired == second
    assert sequencer.next_deadline_ms() is None


def test_a_duplicate_is_answered_whatever_its_timestamp() -> None:
    """The duplicate check comes before the clock-skew check (protocol 6.2): an event
    re-published long after, its ts now far from the clock, still gets its receipt."""
    sequencer = Sequencer(RELAY_KEY, limits=Limits(max_clock_skew_ms=60_000))
    first = sequenced(sequencer.offer(event(1), NOW))[0]
    later = NOW + 3_600_000
    again = sequencer.offer(event(1), later)
    assert again == Duplicate(Located("t@local", first.seq, first.hlc))
    fresh = sequencer.offer(event(2), later)  # a new event of that ts is still refused
    assert isinstance(fresh, Rejected) and fresh.code is ErrorCode.BAD_TIMESTAMP


def test_released_events_are_sequenced_in_the_order_they_became_ready() -> None:
    """`first` and `second` wait for `cause`; `third` waits for `second`. `cause` makes
    the first two ready at once (in parking order), `third` only once `second` is
    sequenced: so it comes after both (protocol 6.3)."""
    sequencer = Sequencer(RELAY_KEY)
    cause = event(1)
    first, second = event(2, deps=(cause.id,)), event(3, deps=(cause.id,))
    third = event(4, deps=(second.id,))
    for parked in (first, second, third):
        assert isinstance(sequencer.offer(parked, NOW), Parked)
    records = sequenced(sequencer.offer(cause, NOW))
    assert [r.id for r in records] == [cause.id, first.id, second.id, third.id]
    assert [r.seq for r in records] == [1, 2, 3, 4]
