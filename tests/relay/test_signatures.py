"""The signature checker: verdicts in order, on the loop or on a worker thread."""

from __future__ import annotations

import dataclasses

import pytest
import trio
import trio.testing

from agent_sdk.wire import Event, SignedEvent, sign_event
from relay.signatures import SignatureChecker
from tests.conftest import identity

AUTHOR = identity(3)


def events(count: int, bad: set[int]) -> list[SignedEvent]:
    out = []
    for n in range(count):
        event = Event(ns="s@local", kind="app.x", author=AUTHOR.public_key, body={"n": n}, ts=1)
        signed = sign_event(event, AUTHOR.sign)
        if n in bad:  # another event's signature: well formed, wrong
            signed = dataclasses.replace(signed, sig=sign_event(event, identity(4).sign).sig)
        out.append(signed)
    return out


@pytest.mark.parametrize("workers", [0, 1, 2])
async def test_verdicts_come_back_in_order(workers: int) -> None:
    checker = SignatureChecker(workers)
    batch = events(40, bad={0, 17, 39})
    verdicts = await checker.check(batch)
    assert verdicts == [n not in {0, 17, 39} for n in range(40)]
    assert checker.offloaded == (40 if workers else 0)


async def test_a_lone_event_is_checked_on_the_loop() -> None:
    checker = SignatureChecker(1)
    assert await checker.check(events(1, bad=set())) == [True]
    assert await checker.check(events(1, bad={0})) == [False]
    assert checker.offloaded == 0
    assert await checker.check(events(2, bad={1})) == [True, False]
    assert checker.offloaded == 2


def test_a_negative_worker_count_is_refused() -> None:
    with pytest.raises(ValueError, match="verify_workers"):
        SignatureChecker(-1)


async def test_a_virtual_clock_keeps_every_check_on_the_loop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An autojumping clock would move on while a worker checks (leases could expire
    mid-check): virtual-time runs check on the loop, and stay reproducible."""
    checker = SignatureChecker(1)
    assert await checker.check(events(10, bad={4})) == [n != 4 for n in range(10)]
    assert checker.offloaded == 0
