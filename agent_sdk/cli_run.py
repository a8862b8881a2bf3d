"""``formicary lock run`` and ``formicary once``: shell commands under the relay's
leases, for agents that work through commands.

``lock run NAME -- CMD...`` runs CMD while holding lock NAME: it waits for the lock
(``--no-wait``: exit 3 at once if held; ``--timeout 90s``: exit 3 if still held after
that long; or ``--conflict-exit N``, as ``flock -E``: so a caller can tell "held" from
CMD's own status 3), renews it at a third of ``--ttl`` while CMD
runs, releases it after, and exits with CMD's status. CMD finds the fencing token in
``FORMICARY_FENCE``. If the lease is lost (a renewal refused, or not confirmed in
time, or the connection to the relay lost), CMD is stopped (SIGTERM, then SIGKILL)
and the exit status is 75. A SIGTERM or SIGINT to us stops CMD the same way first,
then releases the lock; the status is 128 + the signal.

``once KEY -- CMD...`` runs CMD only if no agent completed KEY before: under the lock
``once:KEY`` it reads the checkpoint ``once:KEY``; if set, it exits 0 without running
CMD; else it runs CMD and, on status 0, sets the checkpoint (compare-and-set, so a
second completion is refused) and posts the outcome to the bulletin. A failed CMD
leaves KEY open for the next try. While another agent runs KEY, ``once`` waits for
it (then exits 0 if that run succeeded); ``--timeout`` bounds that wait as for ``lock
run``, exiting ``--conflict-exit`` (3). Exactly once holds for agents that run CMD through
``once``; a CMD whose side effect must also survive a paused holder should check
``FORMICARY_FENCE`` where it writes.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from agent_sdk.cli_timeout import seconds
from agent_sdk.cli_wo import Tokens, UsageError, run, subcommand, ttl_ms
from agent_sdk.election import hold_lock
from agent_sdk.ledger import LeaseLost, Ledger, LedgerRefusal

AgentOptions = Callable[[argparse.ArgumentParser], None]
LEASE_LOST = 75  # EX_TEMPFAIL: the command was stopped; running it again is the fix
MAX_ONCE_KEY = 200


@dataclass(frozen=True, slots=True)
class Exit:
    """An action's result that is the command's own exit status (cli_wo.run)."""

    code: int


def add_parsers(sub: Any, lock_commands: Any, agent_options: AgentOptions) -> None:
    """``lock run`` and ``once``; the command after ``--`` is split off by cli.main
    (every word past it is the command's, options that look like ours included)."""
    p = subcommand(lock_commands, "run", "run a command while holding a lock", agent_options)
    p.add_argument("name")
    p.add_argument("--ttl", default="5m", help="lease length, renewed at a third of it")
    p.add_argument("--no-wait", action="store_true", help="exit 3 at once if the lock is held")
    _add_wait_bound(p)
    p.usage = "%(prog)s NAME [options] -- CMD [ARGS...]"
    p.set_defaults(cmd=[])
    p = subcommand(sub, "once", "run a command unless an agent completed KEY before",
                   agent_options)  # fmt: skip
    # (not "key": --key is the agent's key file, which every command takes)
    p.add_argument("once_key", metavar="KEY", help="what, once done, is never run again")
    p.add_argument("--ttl", default="5m", help="lease of the once:KEY lock while it runs")
    _add_wait_bound(p)
    p.usage = "%(prog)s KEY [options] -- CMD [ARGS...]"
    p.set_defaults(
        cmd=[], func=run, group="once_command", once_command="once", actions={"once": _once}
    )


def _add_wait_bound(p: argparse.ArgumentParser) -> None:
    """``--timeout`` and ``--conflict-exit``: how long to wait for a held lock (as
    ``flock -w``; the default is for as long as it takes), and the status then."""
    # (its own dest: cli_wo.run bounds a whole command by a `timeout`, and this bounds
    # only the wait for the lock, never CMD)
    p.add_argument("--timeout", metavar="DURATION", dest="lock_timeout",
                   help="give up when the lock is still held after this long: 90s, 5m")  # fmt: skip
    p.add_argument("--conflict-exit", type=int, default=3, metavar="N",
                   help="the status when it gives up on a held lock (default 3)")  # fmt: skip


def _wait_bound(args: argparse.Namespace) -> float | None:
    """``--timeout`` in seconds, or None: wait for as long as it takes."""
    if args.lock_timeout is None:
        return None
    if getattr(args, "no_wait", False):
        raise UsageError("--no-wait does not wait: give --no-wait or --timeout, not both")
    return seconds(args.lock_timeout)


def _held(where: str, what: str, args: argparse.Namespace, refusal: LedgerRefusal) -> Exit:
    waited = f" after {args.lock_timeout}" if args.lock_timeout is not None else ""
    print(f"formicary {where}: {what} is held{waited}: {refusal.reason}", file=sys.stderr)
    return Exit(args.conflict_exit)


def _command(args: argparse.Namespace) -> list[str]:
    cmd = list(args.cmd)
    if not cmd:
        raise UsageError("give the command after --, as in: -- CMD ARGS...")
    return cmd


STOPPED_BY = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}


async def _run(cmd: list[str], token: int) -> int:
    """Run ``cmd`` with the fence in its environment; its exit status. A SIGTERM or
    SIGINT to us stops it too (SIGTERM, then SIGKILL), so the lock is released only
    once nothing runs under it; we then exit 128 + the signal, as a shell would."""
    env = {**os.environ, "FORMICARY_FENCE": str(token)}
    stopped: list[int] = []
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            with trio.open_signal_receiver(*STOPPED_BY) as signals:
                async for signum in signals:
                    stopped.append(STOPPED_BY[signal.Signals(signum)])
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(on_signal)
        try:
            done = await trio.run_process(cmd, check=False, env=env)
        except OSError as exc:  # no such program, not executable
            print(f"formicary: cannot run {cmd[0]}: {exc.strerror or exc}", file=sys.stderr)
            nursery.cancel_scope.cancel()
            return 127
        nursery.cancel_scope.cancel()
    if stopped:
        return stopped[0]
    code = done.returncode
    return 128 - code if code < 0 else code  # killed by a signal: as a shell says it


async def _running(args: argparse.Namespace, cmd: list[str], token: int) -> int:
    """:func:`_run`, noting on ``args`` while CMD runs: a connection to the relay lost
    meanwhile stops CMD (the lease can no longer be kept), and ``cli_wo.run`` then
    exits with :data:`LEASE_LOST`, as for a lease lost any other way."""
    args.command_running = True
    code = await _run(cmd, token)
    args.command_running = False  # (not reached when the connection's end cancels it)
    return code


def lock_run(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    cmd, ttl, bound = _command(args), ttl_ms(args.ttl, "--ttl"), _wait_bound(args)

    async def act(ledger: Ledger) -> Exit:
        def waiting(holder: dict[str, Any]) -> None:
            # Once, on stderr: a lock run that waits in silence looks hung, above all
            # on a lock this agent holds itself (an earlier `lock acquire`).
            who = holder.get("holder")
            mine = who == ledger.client.identity.public_key
            by = "you (`formicary lock release` frees it)" if mine else _short(who)
            until = holder.get("expires_ms")
            when = f" until {_utc(until)}" if isinstance(until, int) else ""
            print(
                f"formicary lock run: waiting for {args.name}, held by {by}{when}",
                file=sys.stderr,
                flush=True,
            )

        try:
            async with hold_lock(
                ledger, args.name, ttl, wait=not args.no_wait, on_wait=waiting, wait_at_most=bound
            ) as lock:
                return Exit(await _running(args, cmd, lock.token))
        except LeaseLost as exc:
            print(f"formicary lock run: {exc}", file=sys.stderr)
            return Exit(LEASE_LOST)
        except LedgerRefusal as refusal:
            if refusal.problem != "held":
                raise
            return _held("lock run", args.name, args, refusal)

    return act


def _once(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    cmd, ttl, bound = _command(args), ttl_ms(args.ttl, "--ttl"), _wait_bound(args)
    key = args.once_key
    if not key or len(key) > MAX_ONCE_KEY:
        raise UsageError(f"a once key is 1 to {MAX_ONCE_KEY} characters")
    name = f"once:{key}"

    async def act(ledger: Ledger) -> Exit:
        try:
            async with hold_lock(ledger, name, ttl, wait_at_most=bound) as lock:
                if await ledger.get_checkpoint(name):
                    print(f"formicary once: {key} was done before; not run", file=sys.stderr)
                    return Exit(0)
                code = await _running(args, cmd, lock.token)
                if code == 0:
                    await ledger.checkpoint(name, 1, expect=0)
                    await ledger.post(f"once {key}: done (fence {lock.token})")
                return Exit(code)
        except LeaseLost as exc:
            print(f"formicary once: {exc}", file=sys.stderr)
            return Exit(LEASE_LOST)
        except LedgerRefusal as refusal:
            if refusal.problem != "held":
                raise
            return _held("once", f"{key} (the lock {name})", args, refusal)

    return act


def _short(key: Any) -> str:
    return f"{key.hex()[:16]}..." if isinstance(key, bytes) else "another agent"


def _utc(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))
