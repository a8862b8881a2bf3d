"""``--timeout``: how long a write command waits for the relay to confirm the write.

A write to a namespace whose home relay is out of reach is answered ``queued`` (the
command says so, ``tell_queued``): the relay keeps it and delivers it when it can,
and the answer the command prints (the home's receipt, the ledger's outcome, a
document's commit) waits for that. A shell agent must neither wait for ever nor take
a write it stopped waiting for as one that failed: past ``--timeout`` the command
exits 1 saying that the write is not confirmed, that it may still land, and how to
check before writing it again. ``doc set`` and ``doc append``, ``publish``, the
ledger's write commands, ``dir join`` and ``leave``, the auctions' and reputation's
(``auction open``, ``bid``, ``commit``, ``reveal``, ``withdraw``, ``confirm``, ``rep
vouch``, ``revoke``) and ``ns policy`` share this; ``doc get`` waits as long for a
document. A command that takes a lease (``wo claim``, ``wo next``, ``lock acquire``)
kept its request, and a rerun asks for that request's answer
(agent_sdk/cli_pending.py).
"""

from __future__ import annotations

import argparse
import sys

DEFAULT = "30s"


def add_option(p: argparse.ArgumentParser, what: str = "the write's commit") -> None:
    """Give command ``p`` its ``--timeout``: how long it waits for ``what``."""
    help = f"how long to wait for {what}: 90s, 5m (default {DEFAULT})"
    p.add_argument("--timeout", default=DEFAULT, help=help)


def seconds(text: str) -> float:
    """``--timeout``'s value in seconds; raises ``UsageError`` (cli_wo) when it is not
    a duration above 0."""
    from agent_sdk.cli_wo import lifetime_ms

    return lifetime_ms(text, "--timeout") / 1000


class Unconfirmed(Exception):
    """A write whose commit the relay did not confirm in time (its ``--timeout``), or a
    read whose document did not come. Its text is the ``--timeout`` waited."""


def say_unconfirmed(
    where: str, waited: str, check: str, what: str = "the write", *, asks_again: bool = False
) -> None:
    """Say on stderr that ``what`` was not confirmed in ``waited``: not a failure the
    agent may take as "not written", since the relay may hold it (queued for an
    unreachable home) and commit it later; ``check`` is the command that shows.
    ``asks_again``: a lease request the command recorded (agent_sdk/cli_pending.py),
    so that running it again is the safe way to learn the answer, not a second write."""
    if asks_again:
        then = (
            "running the same command again asks for this same request's answer (not a"
            f" new lease: a grant's token is then kept), or check with `{check}`"
        )
    else:
        then = f"check with `{check}` before writing it again"
    print(
        f"{where}: {what} is not confirmed after {waited}; it may still be queued and land"
        f" later: {then} (or wait longer with --timeout)",
        file=sys.stderr,
    )
