"""``formicary ns``: a namespace's owner and policy, for shell-driven agents.

``ns policy`` waits for the relay's receipt up to ``--timeout``, as the ledger's
writes do (agent_sdk/cli_timeout.py), and past it names ``ns show`` as the command
that shows whether the policy landed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from agent_sdk.access import MODES, get_policy, set_policy
from agent_sdk.cli_wo import Tokens, UsageError, run, subcommand, writes
from agent_sdk.ledger import Ledger

AgentOptions = Callable[[argparse.ArgumentParser], None]


def add_parser(sub: Any, agent_options: AgentOptions) -> None:
    group = sub.add_parser("ns", help="a namespace's owner and access policy")
    commands = group.add_subparsers(dest="ns_command", required=True)
    p = subcommand(commands, "policy", "set the policy (owner only); lists replace", agent_options)
    writes(p, "formicary ns show", "--ns {ns}")
    p.add_argument("mode", choices=MODES)
    p.add_argument("--writer", action="append", default=[], help="a key (hex) that may write")
    p.add_argument("--reader", action="append", default=[], help="a key (hex) that may read")
    p.add_argument("--owner", help="hand the namespace to this key (hex)")
    p.add_argument("--invite", help="an invite token (hex) from the relay's operator")
    subcommand(commands, "show", "print the namespace's owner and policy", agent_options)
    group.set_defaults(func=run, group="ns_command", actions=ACTIONS)


def _key(text: str, what: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise UsageError(f"{what} {text!r}: a key is 64 hex digits")
    return key


def _policy(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    writers = [_key(k, "--writer") for k in args.writer]
    readers = [_key(k, "--reader") for k in args.reader]
    owner = _key(args.owner, "--owner") if args.owner else None
    try:
        invite = bytes.fromhex(args.invite) if args.invite else None
    except ValueError:
        raise UsageError("--invite: an invite token is hex") from None

    async def act(ledger: Ledger) -> Any:
        published = await set_policy(
            ledger.client, ns, args.mode, writers=writers, readers=readers, owner=owner,
            invite=invite,
        )  # fmt: skip
        return {"ns": ns, "mode": args.mode, "seq": published.receipt.seq}

    return act


def _show(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        policy = await get_policy(ledger.client, ns)
        return {
            "ns": ns,
            "owner": policy.owner.hex(),
            "mode": policy.mode,
            "writers": [k.hex() for k in policy.writers],
            "readers": [k.hex() for k in policy.readers],
        }

    return act


ACTIONS = {"policy": _policy, "show": _show}
