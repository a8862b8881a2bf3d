"""The signature checker: verdicts in order, on the loop or in checking processes
(real processes over pipes), and nothing lost when one is killed."""

from __future__ import annotations

import dataclasses
import io
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from agent_sdk.wire import Event, SignedEvent, sign_event
from relay.signatures import SignatureChecker
from relay.verifier import serve
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


@asynccontextmanager
async def running(workers: int) -> AsyncIterator[SignatureChecker]:
    checker = SignatureChecker(workers, restart_delay=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(checker.run)
        with trio.fail_after(30):
            await checker.started()
        yield checker
        nursery.cancel_scope.cancel()
    assert not checker.running  # every process is reaped on the way out


@pytest.mark.parametrize("workers", [1, 2])
async def test_verdicts_come_back_in_order(workers: int) -> None:
    async with running(workers) as checker:
        assert len(checker.running) == workers
        batch = events(40, bad={0, 17, 39})
        verdicts = await checker.check(batch)
        assert verdicts == [n not in {0, 17, 39} for n in range(40)]
        assert checker.offloaded == 40


async def test_concurrent_runs_each_get_their_own_verdicts() -> None:
    """Runs from many connections share a pipe: answers are matched to runs in order."""
    results: dict[int, list[bool]] = {}
    runs = {n: events(3 + n, bad={n % (3 + n)}) for n in range(12)}
    async with running(2) as checker:

        async def one(n: int) -> None:
            results[n] = await checker.check(runs[n])

        async with trio.open_nursery() as nursery:
            for n in runs:
                nursery.start_soon(one, n)
    for n, verdicts in results.items():
        assert verdicts == [i != n % (3 + n) for i in range(3 + n)]
    assert checker.offloaded == sum(len(run) for run in runs.values())


async def test_without_workers_every_check_is_on_the_loop() -> None:
    checker = SignatureChecker(0)
    assert await checker.check(events(10, bad={2})) == [n != 2 for n in range(10)]
    assert checker.offloaded == 0
    await checker.run()  # returns at once: nothing to keep running


async def test_a_lone_event_is_checked_on_the_loop() -> None:
    async with running(1) as checker:
        assert await checker.check(events(1, bad=set())) == [True]
        assert await checker.check(events(1, bad={0})) == [False]
        assert checker.offloaded == 0
        assert await checker.check(events(2, bad={1})) == [True, False]
        assert checker.offloaded == 2


async def test_the_processes_start_with_the_first_run_worth_sending() -> None:
    checker = SignatureChecker(1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(checker.run)
        assert await checker.check(events(1, bad=set())) == [True]
        await trio.testing.wait_all_tasks_blocked()
        assert not checker.running  # a relay of lone events never starts one
        # The first run is checked on the loop while the process starts.
        assert await checker.check(events(5, bad={3})) == [n != 3 for n in range(5)]
        assert checker.offloaded == 0
        with trio.fail_after(30):
            await checker.started()
        assert await checker.check(events(5, bad={1})) == [n != 1 for n in range(5)]
        assert checker.offloaded == 5
        nursery.cancel_scope.cancel()


async def test_a_killed_process_loses_no_verdict_and_is_replaced() -> None:
    """kill -9 with a run sent and unanswered: the run is checked on the loop instead,
    with the same verdicts, and a new process takes the dead one's place."""
    async with running(1) as checker:
        (worker,) = checker.running
        os.kill(worker.process.pid, signal.SIGSTOP)  # it reads nothing from here on
        batch = events(30, bad={7, 29})
        verdicts: list[bool] = []

        async def check() -> None:
            verdicts.extend(await checker.check(batch))

        # A run the dead process owed must be given back, not waited on for ever.
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(check)
                await trio.testing.wait_all_tasks_blocked()  # its run sent, waiting
                assert len(worker.owed) == 1
                os.kill(worker.process.pid, signal.SIGKILL)
        assert verdicts == [n not in {7, 29} for n in range(30)]
        assert checker.rechecked == 30
        assert checker.offloaded == 0
        with trio.fail_after(30):
            await checker.started()  # replaced
        (replacement,) = checker.running
        assert replacement is not worker
        assert await checker.check(events(4, bad={0})) == [False, True, True, True]
        assert checker.offloaded == 4


def test_the_checking_process_answers_each_request_in_order() -> None:
    """relay/verifier.py's wire format: a count, 128-byte items, one byte per verdict;
    a key that is not a point, or all zeros, never verifies, and neither does the
    author's signature over the bare id (without the event domain, protocol 3.3)."""
    good, bad = events(2, bad={1})
    items = [
        (good.event.author, good.sig, good.id),
        (bad.event.author, bad.sig, bad.id),
        (bytes(32), good.sig, good.id),
        (b"\xff" * 32, good.sig, good.id),
        (good.event.author, AUTHOR.sign(good.id), good.id),
    ]
    request = b"".join(
        len(chunk).to_bytes(4, "big") + b"".join(k + s + i for k, s, i in chunk)
        for chunk in (items[:1], items[1:], [])
    )
    answers = io.BytesIO()
    serve(io.BytesIO(request + b"\x00\x00"), answers)  # a cut-off header ends it
    assert answers.getvalue() == bytes([1, 0, 0, 0, 0])


def test_a_negative_worker_count_is_refused() -> None:
    with pytest.raises(ValueError, match="verify_workers"):
        SignatureChecker(-1)


async def test_a_virtual_clock_keeps_every_check_on_the_loop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An autojumping clock would move on while a process checks (leases could expire
    mid-check): virtual-time runs check on the loop, and stay reproducible."""
    checker = SignatureChecker(1)
    await checker.run()  # returns at once: no processes under virtual time
    assert await checker.check(events(10, bad={4})) == [n != 4 for n in range(10)]
    assert checker.offloaded == 0
    assert not checker.running
