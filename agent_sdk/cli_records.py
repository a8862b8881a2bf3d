"""``formicary context|bulletin|decision|conflict|ckpt``: the ledger's shared records
from a shell.

``context put`` reads the document from stdin (or ``--file``); with ``--wo`` it is the
order's context, fenced with the token this agent keeps for the order if it holds one
(a holder whose lease ran out is refused rather than overwrite the next holder's
context). ``context pull`` prints the document on stdout and a header line (version,
author, age) on stderr, so ``formicary context pull > context.md`` just works.

Exit codes as for ``formicary wo``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent_sdk.cli_wo import Text, Tokens, UsageError, json_value, run, subcommand, writes
from agent_sdk.decisions import Decisions
from agent_sdk.ledger import Claim, Ledger, LedgerRefusal
from agent_sdk.wire import to_json_safe

AgentOptions = Callable[[argparse.ArgumentParser], None]


def add_parser(sub: Any, agent_options: AgentOptions) -> None:
    group = sub.add_parser("context", help="context handoff: put and pull documents")
    commands = group.add_subparsers(dest="context", required=True)
    p = subcommand(commands, "put", "store a new context version (stdin or --file)", agent_options)
    writes(p, "formicary context pull", "--wo {wo}", "--ns {ns}")
    p.add_argument("--wo", help="the work order's context (default: the namespace's)")
    p.add_argument("--file", help="read the document from this file")
    p.add_argument("--parse-json", action="store_true", help="store it as JSON, not text")
    p.add_argument("--allow-empty", action="store_true", help="store an empty document")
    p.add_argument("--token", type=int, help="fencing token (default: the one kept)")
    p = subcommand(commands, "pull", "print the latest context (or --version N)", agent_options)
    p.add_argument("--wo", help="the work order's context (default: the namespace's)")
    p.add_argument("--version", type=int)
    group.set_defaults(func=run, group="context", actions=CONTEXT)

    group = sub.add_parser("bulletin", help="the bulletin: what agents did")
    commands = group.add_subparsers(dest="bulletin", required=True)
    p = subcommand(commands, "post", "post what you did", agent_options)
    writes(p, "formicary bulletin list", "--ns {ns}")
    p.add_argument("text")
    p = subcommand(commands, "list", "the latest posts", agent_options)
    p.add_argument("--after", type=int, help="posts after number N, oldest first")
    p.add_argument("--limit", type=int, default=100)
    group.set_defaults(func=run, group="bulletin", actions=BULLETIN)

    group = sub.add_parser("decision", help="decisions (ADR records)")
    commands = group.add_subparsers(dest="decision", required=True)
    p = subcommand(commands, "add", "record a decision; prints its id", agent_options)
    writes(p, "formicary decision list", "--ns {ns}")
    p.add_argument("--title", required=True)
    p.add_argument("--decision", required=True, dest="decided")  # "decision" names the command
    p.add_argument("--context", default="", help="what forced the decision")
    p.add_argument("--rationale", default="")
    p.add_argument("--supersedes", help="the id of the decision this one replaces")
    p.add_argument("--entity", help="what it touches: routed, and checked for conflicts")
    p = subcommand(commands, "list", "list decisions", agent_options)
    p.add_argument("--status", choices=["accepted", "superseded", "overruled"])
    p.add_argument("--entity", help="only the decisions on this entity")
    group.set_defaults(func=run, group="decision", actions=DECISION)

    group = sub.add_parser("conflict", help="conflicting decisions and their ladder")
    commands = group.add_subparsers(dest="conflict", required=True)
    p = subcommand(commands, "list", "list conflicts", agent_options)
    p.add_argument("--status", choices=["open", "resolved"])
    p.add_argument("--step", choices=["rule", "agents", "arbiter", "human"])
    p = subcommand(commands, "show", "one conflict with its decisions", agent_options)
    p.add_argument("id")
    p = subcommand(commands, "resolve", "keep one decision (or propose it)", agent_options)
    writes(p, "formicary conflict show {id}", "--ns {ns}")
    p.add_argument("id")
    p.add_argument("keep", help="the id of the decision to keep")
    p.add_argument("--note", default="")
    group.set_defaults(func=run, group="conflict", actions=CONFLICT)

    group = sub.add_parser("ckpt", help="named consumer cursors kept at the relay")
    commands = group.add_subparsers(dest="ckpt", required=True)
    p = subcommand(commands, "set", "store a cursor", agent_options)
    writes(p, "formicary ckpt get {name}", "--ns {ns}")
    p.add_argument("name")
    p.add_argument("seq", type=int)
    p.add_argument("--expect", type=int, help="only if the cursor is still at this seq")
    p = subcommand(commands, "get", "print a cursor (0 when never set)", agent_options)
    p.add_argument("name")
    group.set_defaults(func=run, group="ckpt", actions=CKPT)


Make = Callable[[argparse.Namespace, Tokens, str], Any]


def _put(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    try:
        raw = Path(args.file).read_text() if args.file else sys.stdin.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--file {args.file}: {exc}") from None
    if not raw and not args.allow_empty:
        # Harnesses often run commands with stdin at /dev/null: an empty version
        # would replace the handoff the next agent needs.
        where = f"--file {args.file}" if args.file else "stdin"
        raise UsageError(f"the document is empty ({where} gave nothing); --allow-empty stores it")
    if args.parse_json:
        document: Any = json_value(raw, "the document")
    else:
        document = raw

    async def act(ledger: Ledger) -> Any:
        token = tokens.kept(ns, args.wo, args.token) if args.wo else None
        target = Claim(args.wo, token, 0) if args.wo and token is not None else args.wo
        version = await ledger.put_context(document, target)
        return {"wo": args.wo, "version": version}

    return act


def _pull(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        found = await ledger.pull_context(args.wo, args.version)
        if found is None:
            raise LedgerRefusal("not_found", f"no context for {args.wo or ns} yet", None)
        if args.json:
            return to_json_safe(found)
        body = found["body"]
        text = body if isinstance(body, str) else json.dumps(body, indent=2)
        header = (
            f"context {found['wo'] or ns} v{found['version']} of {found['versions']}"
            f" by {found['author'].hex()[:16]}, {_age(found['age_ms'])} old"
        )
        return Text(text, header)

    return act


def _age(ms: int) -> str:
    seconds = ms // 1000
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


CONTEXT: dict[str, Make] = {"put": _put, "pull": _pull}


def _post(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        return {"n": await ledger.post(args.text)}

    return act


def _posts(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        return to_json_safe(await ledger.bulletin(args.after, args.limit))

    return act


BULLETIN: dict[str, Make] = {"post": _post, "list": _posts}


def _decide(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    body = {"title": args.title, "decision": args.decided, "context": args.context,
            "rationale": args.rationale}  # fmt: skip
    for name in ("supersedes", "entity"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)

    async def act(ledger: Ledger) -> Any:
        answer = await ledger.request("decision.add", body)
        return {"id": answer["id"], "conflict": answer.get("conflict")}

    return act


def _decisions(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        if args.entity is not None:
            found = await Decisions(ledger.client, ns).on(args.entity)
            return to_json_safe([d for d in found if args.status in (None, d["status"])])
        return to_json_safe(await ledger.decisions(args.status))

    return act


DECISION: dict[str, Make] = {"add": _decide, "list": _decisions}


def _conflicts(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        return to_json_safe(await Decisions(ledger.client, ns).conflicts(args.status, args.step))

    return act


def _conflict(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        return to_json_safe(await Decisions(ledger.client, ns).conflict(args.id))

    return act


def _resolve(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        answer = await Decisions(ledger.client, ns).resolve(args.id, args.keep, args.note)
        return {"conflict": args.id, "keep": args.keep, "resolved": "by" in answer,
                "by": answer.get("by")}  # fmt: skip

    return act


CONFLICT: dict[str, Make] = {"list": _conflicts, "show": _conflict, "resolve": _resolve}


def _ckpt_set(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        await ledger.checkpoint(args.name, args.seq, args.expect)
        return {"name": args.name, "seq": args.seq}

    return act


def _ckpt_get(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        return {"name": args.name, "seq": await ledger.get_checkpoint(args.name)}

    return act


CKPT: dict[str, Make] = {"set": _ckpt_set, "get": _ckpt_get}
