"""The directory's heartbeat timer against the plain definition: a pass over the members.

The relay asks for the next expiry after every outcome it appends, so the directory
keeps expiries in a heap instead of scanning its members (relay/coordination/directory.py);
these tests check that the heap always gives what the scan would.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.coordination.directory import Directory, Member

AGENTS = [bytes([n]) * 32 for n in range(5)]


def joined(agent: bytes, now_ms: int, heartbeat_ms: int | None) -> Member:
    return Member(agent, "a", (), "", "", None, joined_ms=now_ms, heartbeat_ms=heartbeat_ms)


def next_by_scan(directory: Directory) -> int | None:
    times = [
        m.expires_ms for m in directory.members.values() if m.online and m.expires_ms is not None
    ]
    return min(times, default=None)


def late_by_scan(directory: Directory, now_ms: int) -> list[bytes]:
    late = [
        m
        for m in directory.members.values()
        if m.online and m.expires_ms is not None and m.expires_ms <= now_ms
    ]
    return [m.agent for m in sorted(late, key=lambda m: (m.expires_ms or 0, m.agent))]


agent = st.sampled_from(AGENTS)
step = st.one_of(
    st.tuples(st.just("join"), agent, st.one_of(st.none(), st.integers(1, 40))),
    st.tuples(st.just("heartbeat"), agent, st.none()),
    st.tuples(st.just("leave"), agent, st.none()),
    st.tuples(st.just("wait"), st.none(), st.integers(0, 30)),
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(step, max_size=300))
def test_the_timer_agrees_with_a_scan_of_the_members(
    steps: list[tuple[str, bytes | None, int | None]],
) -> None:
    directory, now = Directory(), 0
    for what, who, n in steps:
        if what == "wait":
            assert n is not None
            now += n
            # What the relay's timer does when it wakes: every late member leaves.
            expected = late_by_scan(directory, now)
            late = directory.timed_out(now)
            assert [m.agent for m in late] == expected
            for member in late:
                directory.leave(member.agent, member.expires_ms or now, "timeout")
        elif what == "join":
            assert who is not None
            directory.join(joined(who, now, n))
        elif what == "heartbeat":
            assert who is not None
            directory.heartbeat(who, now)
        else:
            assert who is not None
            directory.leave(who, now, "bye")
        assert directory.next_expiry_ms() == next_by_scan(directory)


def test_a_member_that_heartbeats_often_does_not_grow_the_timer() -> None:
    directory = Directory()
    for n, who in enumerate(AGENTS):
        directory.join(joined(who, n, 60_000))
    for now in range(10_000):
        directory.heartbeat(AGENTS[now % 2], now)
    # Stale entries are dropped in rebuilds: the heap stays within a bound of the members.
    assert len(directory._expiries) <= 2 * len(AGENTS) + 64 + 1
    assert directory.next_expiry_ms() == next_by_scan(directory) == 2 + 60_000
    assert [m.agent for m in directory.timed_out(70_000)] == late_by_scan(directory, 70_000)
