"""``formicary dir``: the participant directory for shell-driven agents.

A shell command's connection lasts one command, so ``dir join`` uses heartbeat
presence: the agent is online for ``--heartbeat`` (default 5m) after each join, and
joining again (same profile or a new one) keeps it online. Exit codes as for
``formicary wo``. ``join`` and ``leave`` wait for the relay's outcome up to
``--timeout``, as the ledger's writes do (agent_sdk/cli_timeout.py), and past it name
``dir list --all`` as the command that shows whether the write landed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from agent_sdk.cli_wo import Tokens, run, subcommand, ttl_ms, writes
from agent_sdk.directory import Directory
from agent_sdk.ledger import Ledger
from agent_sdk.wire import to_json_safe

AgentOptions = Callable[[argparse.ArgumentParser], None]
Make = Callable[[argparse.Namespace, Tokens, str], Any]

LIST = ("formicary dir list --all", "--ns {ns}")  # shows a join, and a leave, landed


def add_parser(sub: Any, agent_options: AgentOptions) -> None:
    group = sub.add_parser("dir", help="the participant directory: join, leave, list, find")
    commands = group.add_subparsers(dest="dir", required=True)
    p = subcommand(
        commands, "join", "join (again) with a profile; online for --heartbeat", agent_options
    )
    writes(p, *LIST)
    p.add_argument("--name", required=True)
    p.add_argument("--capability", action="append", default=[], dest="capabilities",
                   help="a tag, optionally @version: python@3.11 (repeat)")  # fmt: skip
    p.add_argument("--role", default="")
    p.add_argument("--endpoint", default="", help="where to reach this agent directly")
    p.add_argument("--heartbeat", default="5m", help="online this long after each join")
    p = subcommand(commands, "leave", "leave the namespace's directory", agent_options)
    writes(p, *LIST)
    p = subcommand(commands, "list", "participants online (or --all)", agent_options)
    p.add_argument("--all", action="store_true", help="include those who left")
    p = subcommand(commands, "find", "participants with a capability", agent_options)
    p.add_argument("capability", help="a tag, or tag@version")
    p.add_argument("--role")
    group.set_defaults(func=run, group="dir", actions=ACTIONS)


def _shown(participant: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in to_json_safe(participant).items() if v not in (None, "", [])}


def _join(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    heartbeat = ttl_ms(args.heartbeat, "--heartbeat")

    async def act(ledger: Ledger) -> Any:
        directory = Directory(ledger.client, ns)
        profile = await directory.join(
            args.name,
            capabilities=args.capabilities,
            role=args.role,
            endpoint=args.endpoint,
            heartbeat_ms=heartbeat,
        )
        return _shown({k: v for k, v in profile.items() if k != "req"})

    return act


def _leave(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        await Directory(ledger.client, ns).leave()
        return None

    return act


def _list(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        people = await Directory(ledger.client, ns).list(online=not args.all)
        return [_shown(p) for p in people]

    return act


def _find(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        people = await Directory(ledger.client, ns).find(args.capability, role=args.role)
        return [_shown(p) for p in people]

    return act


ACTIONS: dict[str, Make] = {"join": _join, "leave": _leave, "list": _list, "find": _find}
