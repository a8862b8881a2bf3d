"""The host's timer looks only where there may be work (relay/coordination/host.py)."""

from __future__ import annotations

from typing import Any

from relay.coordination.host import Host
from relay.coordination.requests import Coordinator, Outcome


def test_the_timer_runs_only_in_namespaces_with_news_or_a_deadline_due() -> None:
    host = Host(bytes(32))
    namespaces = [f"crew{n}@local" for n in range(1_000)]
    for ns in namespaces:
        host.coordinator(ns)
    assert host.due(1_000) == []  # each new coordinator is looked at once
    asked: list[str] = []

    def counting(ns: str, coordinator: Coordinator) -> None:
        plain = coordinator.due

        def due(now_ms: int) -> list[Outcome]:
            asked.append(ns)
            return plain(now_ms)

        coordinator.due = due  # type: ignore[method-assign]

    for ns in namespaces:
        counting(ns, host.coordinators[ns])
    assert host.next_expiry_ms() is None
    assert host.due(2_000) == []
    assert asked == []  # nothing new anywhere: no namespace is asked
    host.coordinator(namespaces[7])  # about to decide a request there
    host.coordinator(namespaces[3])
    assert host.due(3_000) == []
    assert asked == [namespaces[3], namespaces[7]]  # in the order they began


def test_a_namespace_whose_deadline_comes_is_asked_then(monkeypatch: Any) -> None:
    host = Host(bytes(32))
    quiet, timed = host.coordinator("quiet@local"), host.coordinator("timed@local")
    monkeypatch.setattr(quiet, "next_expiry_ms", lambda: None)
    monkeypatch.setattr(timed, "next_expiry_ms", lambda: 5_000)
    asked: list[tuple[str, int]] = []
    monkeypatch.setattr(quiet, "due", lambda now_ms: asked.append(("quiet", now_ms)) or [])
    monkeypatch.setattr(timed, "due", lambda now_ms: asked.append(("timed", now_ms)) or [])
    assert host.next_expiry_ms() == 5_000
    assert host.due(1_000) == []
    assert asked == [("quiet", 1_000), ("timed", 1_000)]  # both new
    asked.clear()
    assert host.due(4_999) == [] and asked == []
    assert host.due(5_000) == [] and asked == [("timed", 5_000)]
    # Its deadline did not move (the stub says 5,000 still): it stays on the timer.
    assert host.next_expiry_ms() == 5_000


def test_a_host_given_coordinators_times_them_too() -> None:
    given = Coordinator()
    host = Host(bytes(32), coordinators={"given@local": given})
    assert host.next_expiry_ms() is None
    assert host.due(1_000) == []
    assert host.coordinator("given@local") is given
    assert host.due(2_000) == []
