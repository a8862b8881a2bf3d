"""``formicary lock run`` and ``formicary once`` as shell agents use them: real
processes, 20 at a time, against a real relay; and leader election's failover."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from agent_sdk.cli_run import LEASE_LOST
from agent_sdk.client import RelayClient
from agent_sdk.election import hold_lock
from agent_sdk.ledger import Claim, Ledger, LedgerRefusal
from tests.agent_sdk.shell import read_until, running
from tests.conftest import RunningRelay, identity, start_relay

NS = "shell@local"
AGENTS = 20
TIMEOUT = 120


def env_for(relay: RunningRelay, tmp_path: Path, n: int) -> dict[str, str]:
    return {
        **os.environ,
        "FORMICARY_RELAY": relay.url,
        "FORMICARY_KEY": str(tmp_path / f"agent{n}.key"),
        "FORMICARY_NS": NS,
    }


def formicary(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent_sdk.cli", *args]


async def test_lock_run_serialises_twenty_shell_commands_on_one_file(
    relay: RunningRelay, tmp_path: Path
) -> None:
    """Each command writes a start line, waits, writes an end line: under the lock no
    two overlap, so the file is start/end pairs of one writer each, and every holder
    saw a larger fencing token than the one before it."""
    shared = tmp_path / "shared.log"
    step = (
        f'echo "start $$ $FORMICARY_FENCE" >> {shared}; sleep 0.05; '
        f'echo "end $$ $FORMICARY_FENCE" >> {shared}'
    )
    codes: list[int] = []

    async def agent(n: int) -> None:
        done = await trio.run_process(
            formicary("lock", "run", "the-file", "--ttl", "30s", "--", "sh", "-c", step),
            env=env_for(relay, tmp_path, n), check=False, capture_stderr=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        codes.append(done.returncode)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for n in range(AGENTS):
                nursery.start_soon(agent, n)
    lines = [line.split() for line in shared.read_text().splitlines()]
    assert len(lines) == 2 * AGENTS
    fences = []
    for start, end in zip(lines[::2], lines[1::2], strict=True):
        assert start[0] == "start" and end[0] == "end" and start[1:] == end[1:]  # no interleaving
        fences.append(int(start[2]))
    assert fences == sorted(fences) and len(set(fences)) == AGENTS  # each holder: a new token
    assert codes == [0] * AGENTS


async def test_lock_run_passes_the_exit_status_through_and_no_wait_refuses(
    relay: RunningRelay, tmp_path: Path
) -> None:
    env = env_for(relay, tmp_path, 1)
    seven = await trio.run_process(
        formicary("lock", "run", "x", "--", "sh", "-c", "exit 7"), env=env, check=False
    )
    assert seven.returncode == 7
    missing = await trio.run_process(
        formicary("lock", "run", "x", "--", "no-such-program-here"), env=env, check=False,
        capture_stderr=True,
    )  # fmt: skip
    assert missing.returncode == 127 and b"cannot run" in missing.stderr
    no_command = await trio.run_process(
        formicary("lock", "run", "x"), env=env, check=False, capture_stderr=True
    )
    assert no_command.returncode == 2 and b"after --" in no_command.stderr
    async with RelayClient.connect(relay.url, identity(9)) as client:
        held = await Ledger(client, NS).lock("x", 60_000)
        busy = await trio.run_process(
            formicary("lock", "run", "x", "--no-wait", "--", "true"), env=env, check=False,
            capture_stderr=True,
        )  # fmt: skip
        assert busy.returncode == 3 and b"held" in busy.stderr
        told = await trio.run_process(
            formicary("lock", "run", "x", "--no-wait", "--conflict-exit", "99", "--", "true"),
            env=env, check=False, capture_stderr=True,
        )  # fmt: skip
        assert told.returncode == 99 and b"held" in told.stderr
        await Ledger(client, NS).unlock(held)


async def test_once_runs_a_command_once_across_twenty_agents(
    relay: RunningRelay, tmp_path: Path
) -> None:
    ran = tmp_path / "ran.log"
    codes: list[int] = []

    async def agent(n: int) -> None:
        done = await trio.run_process(
            formicary("once", "deploy-42", "--", "sh", "-c", f"echo {n} >> {ran}"),
            env=env_for(relay, tmp_path, n), check=False, capture_stderr=True, cwd=tmp_path,
        )  # fmt: skip
        codes.append(done.returncode)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for n in range(AGENTS):
                nursery.start_soon(agent, n)
    assert len(ran.read_text().splitlines()) == 1  # exactly one of 20 agents (20 keys) ran it
    assert not (tmp_path / "deploy-42").exists()  # the once key is not read as a key file
    assert codes == [0] * AGENTS
    async with RelayClient.connect(relay.url, identity(9)) as client:
        posts = await Ledger(client, NS).bulletin()
        assert [p["text"].split(" (")[0] for p in posts] == ["once deploy-42: done"]
    env = env_for(relay, tmp_path, 0)
    failing = await trio.run_process(
        formicary("once", "flaky", "--", "sh", "-c", "exit 4"), env=env, check=False
    )
    again = await trio.run_process(
        formicary("once", "flaky", "--", "sh", "-c", f"echo retried >> {ran}"), env=env,
        check=False,
    )  # fmt: skip
    assert (failing.returncode, again.returncode) == (4, 0)  # a failure leaves it open
    assert ran.read_text().splitlines()[-1] == "retried"
    too_long = await trio.run_process(
        formicary("once", "k" * 201, "--", "true"), env=env, check=False, capture_stderr=True
    )
    assert too_long.returncode == 2 and b"1 to 200 characters" in too_long.stderr


async def test_a_killed_leader_is_followed_by_one_with_a_larger_token(
    relay: RunningRelay, tmp_path: Path
) -> None:
    """The leader runs as its own process and is killed with SIGKILL: it releases
    nothing. A follower takes over once the lease has lapsed, with a larger token."""
    ttl = 2_000
    leader = await trio.lowlevel.open_process(
        formicary("lock", "run", "leader:sched", "--ttl", "2s", "--", "sh", "-c",
                  f"echo $FORMICARY_FENCE > {tmp_path / 'first'}; echo leading; exec sleep 60"),
        env=env_for(relay, tmp_path, 1), stdout=subprocess.PIPE,
    )  # fmt: skip
    assert leader.stdout is not None
    try:
        async with RelayClient.connect(relay.url, identity(2)) as client:
            ledger = Ledger(client, NS)
            with trio.fail_after(TIMEOUT):
                said = b""
                while not said.endswith(b"\n"):  # the command runs: the leader holds it
                    said += await leader.stdout.receive_some()
                with pytest.raises(LedgerRefusal) as info:
                    await ledger.lock("leader:sched", ttl)
                refusal = info.value
                assert refusal.problem == "held" and refusal.holder is not None
                expires = refusal.holder["expires_ms"]
                first = refusal.holder["token"]
                leader.send_signal(signal.SIGKILL)
                await leader.wait()
                async with ledger.elect("sched", ttl) as lead:
                    took_over = client.clock_ms()
                    assert lead.token > first
        assert took_over >= expires  # it waited for the lapse: never two leaders
        assert int((tmp_path / "first").read_text()) == first
    finally:
        if leader.poll() is None:
            leader.kill()
            await leader.wait()


async def test_a_leader_that_stops_hands_over_at_once(relay: RunningRelay) -> None:
    """A leader whose body ends releases its lease: the follower, refused while it
    led, takes over at once, long before that lease would have lapsed."""
    ttl = 30_000
    async with (
        RelayClient.connect(relay.url, identity(1)) as a,
        RelayClient.connect(relay.url, identity(2)) as b,
    ):
        leases: list[Claim] = []
        waiting = trio.Event()

        async def follower() -> None:
            # (elect, with word of the refusal that makes it a follower)
            async with hold_lock(
                Ledger(b, NS), "leader:loop", ttl, on_wait=lambda _: waiting.set()
            ) as lead:
                leases.append(lead)

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery, Ledger(a, NS).elect("loop", ttl) as lead:
                leases.append(lead)
                nursery.start_soon(follower)
                await waiting.wait()  # refused: the follower waits meanwhile
                assert len(leases) == 1
    first, second = leases
    assert second.token > first.token
    # By the relay's clock (a lease is granted for the TTL asked): the follower's was
    # granted before the first could lapse, so the leader released it on its way out.
    assert second.expires_ms - ttl < first.expires_ms


@pytest.mark.parametrize("ttl", ["0s", "forever"])
async def test_bad_lock_run_ttls_are_usage_errors(
    relay: RunningRelay, tmp_path: Path, ttl: str
) -> None:
    done = await trio.run_process(
        formicary("lock", "run", "x", "--ttl", ttl, "--", "true"),
        env=env_for(relay, tmp_path, 1), check=False, capture_stderr=True,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr


async def test_sigterm_stops_the_command_then_releases_the_lock(
    relay: RunningRelay, tmp_path: Path
) -> None:
    """A supervisor stopping `lock run` must not leave the command running under a
    lock that is gone: the command is stopped first, then the lock is released
    (the next holder need not wait out the TTL), and the status is 128 + 15."""
    async with sleeping_under_lock(relay, tmp_path) as (runner, child):
        runner.send_signal(signal.SIGTERM)
        assert await runner.wait() == 128 + signal.SIGTERM
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)  # the command is gone too
        async with RelayClient.connect(relay.url, identity(2)) as client:
            ledger = Ledger(client, NS)
            await ledger.unlock(await ledger.lock("the-db", 60_000))  # free at once


@asynccontextmanager
async def sleeping_under_lock(
    relay: RunningRelay, tmp_path: Path
) -> AsyncIterator[tuple[trio.Process, int]]:
    """``lock run`` of a long sleep, once the sleep runs: the runner and the sleep's
    pid (killed on the way out if still running; within TIMEOUT)."""
    runner = await trio.lowlevel.open_process(
        formicary("lock", "run", "the-db", "--ttl", "60s", "--", "sh", "-c",
                  "echo $$; exec sleep 60"),
        env=env_for(relay, tmp_path, 1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert runner.stdout is not None
    try:
        with trio.fail_after(TIMEOUT):
            said = b""
            while not said.endswith(b"\n"):  # the command runs: it told us its pid
                said += await runner.stdout.receive_some()
            yield runner, int(said)
    finally:
        if runner.poll() is None:
            runner.kill()
            await runner.wait()


async def test_a_relay_that_goes_away_stops_the_command_with_status_75(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The lease can no longer be renewed: the command is stopped, and the status is
    LEASE_LOST, not 1 (which a shell cannot tell from the command's own failure)."""
    relay = await start_relay(nursery, tmp_path / "relay")
    async with sleeping_under_lock(relay, tmp_path) as (runner, child):
        relay.scope.cancel()  # the relay goes away under it
        assert await runner.wait() == LEASE_LOST
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)  # the command is gone too
        assert runner.stderr is not None
        err = await runner.stderr.receive_some()
        assert b"the connection to the relay was lost" in err, err


async def test_lock_run_says_whom_it_waits_for(relay: RunningRelay, tmp_path: Path) -> None:
    """It waited in silence, even on a lock its own agent held (an earlier `lock
    acquire`): to a shell, a hang."""
    env = env_for(relay, tmp_path, 1)
    await trio.run_process(formicary("lock", "acquire", "L", "--ttl", "1m"), env=env)
    async with running(formicary("lock", "run", "L", "--", "true"), env) as process:
        with trio.fail_after(TIMEOUT):
            said = await read_until(process.stderr, b"\n")
    assert said.decode().startswith("formicary lock run: waiting for L, held by you"), said


async def test_lock_run_and_once_give_up_on_a_held_lock_after_timeout(
    relay: RunningRelay, tmp_path: Path
) -> None:
    """``--timeout`` (as ``flock -w``): a lock held past it is ``--conflict-exit``
    (3), CMD never runs, and the holder's lease is untouched; a lock freed within it
    is taken. `--no-wait` with `--timeout`, or a bad duration, is a usage error."""
    env = env_for(relay, tmp_path, 1)
    ran = tmp_path / "ran"
    async with RelayClient.connect(relay.url, identity(9)) as client:
        ledger = Ledger(client, NS)
        held = await ledger.lock("x", 600_000)
        once_held = await ledger.lock("once:job", 600_000)
        with trio.fail_after(TIMEOUT):
            gave_up = await trio.run_process(
                formicary("lock", "run", "x", "--timeout", "1s", "--", "touch", str(ran)),
                env=env, check=False, capture_stderr=True,
            )  # fmt: skip
            told = await trio.run_process(
                formicary("once", "job", "--timeout", "1s", "--conflict-exit", "99", "--",
                          "touch", str(ran)),
                env=env, check=False, capture_stderr=True,
            )  # fmt: skip
        assert gave_up.returncode == 3, gave_up.stderr
        assert b"x is held after 1s" in gave_up.stderr
        assert told.returncode == 99, told.stderr
        assert b"job (the lock once:job) is held after 1s" in told.stderr
        assert not ran.exists()
        await ledger.renew_lock(held, 600_000)  # still the holder's: not taken, not released
        await ledger.unlock(once_held)

        command = formicary("lock", "run", "x", "--timeout", "2m", "--", "touch", str(ran))
        async with running(command, env) as taking:
            with trio.fail_after(TIMEOUT):
                await read_until(taking.stderr, b"waiting for x")  # then freed, within it
                await ledger.unlock(held)
                assert await taking.wait() == 0
        assert ran.exists()
    for bad in (["--no-wait", "--timeout", "1s"], ["--timeout", "0s"], ["--timeout", "soon"]):
        usage = await trio.run_process(
            formicary("lock", "run", "x", *bad, "--", "true"), env=env, check=False,
            capture_stderr=True,
        )  # fmt: skip
        assert usage.returncode == 2, (bad, usage.stderr)
