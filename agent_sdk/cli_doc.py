"""``formicary doc``: shared documents for shell-driven agents.

Documents have three conventional roots (agent_sdk/docs.py): ``fields`` (a Map that
``doc set`` writes), ``text`` (a Text) and ``log`` (an Array that ``doc append``
extends). ``doc get`` prints them; ``doc token`` mints the token a plain Yjs client
needs to edit through the relay's ``/yjs/<ns>/<doc>`` endpoint.

Exit codes: 0 ok, 4 no such document, 2 usage, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import trio

from agent_sdk.client import RelayClient
from agent_sdk.docs import SharedDoc
from agent_sdk.errors import ErrorCode, ProtocolError

AgentOptions = Callable[[argparse.ArgumentParser], None]


def add_parser(sub: Any, agent_options: AgentOptions) -> None:
    group = sub.add_parser("doc", help="shared CRDT documents: get, set, append, token")
    commands = group.add_subparsers(dest="doc_command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = commands.add_parser(name, help=help)
        p.add_argument("ns", help="namespace, name@relay")
        p.add_argument("name", help="document name")
        agent_options(p)
        return p

    p = command("get", "print the document's fields, text and log")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = command("set", "set a field (creates the document if needed)")
    # Not "key": that is the key file of every agent command (--key).
    p.add_argument("field", help="the field of `fields` to set")
    p.add_argument("value")
    p.add_argument("--parse-json", action="store_true", help="store VALUE as JSON, not text")
    p = command("append", "append an entry to the log (creates the document if needed)")
    p.add_argument("text")
    p = command(
        "token",
        "mint a token for a plain Yjs client to edit this document; prints the query "
        "string that presents it with its secret (token=...&secret=...)",
    )
    p.add_argument("--ttl", default="1h", help="how long it is valid: 30m, 8h")
    group.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent_sdk.cli import _identity, _relay_url
    from agent_sdk.cli_wo import UsageError, json_value, lifetime_ms, tell_queued

    where = f"formicary doc {args.doc_command}"
    identity = _identity(args)
    try:
        if args.doc_command == "token":
            from agent_sdk import doctoken

            expires = time.time_ns() // 1_000_000 + lifetime_ms(args.ttl)
            print(doctoken.query(*doctoken.mint_bound(identity, args.ns, args.name, expires)))
            return 0
        value: Any = args.value if args.doc_command == "set" else None
        if args.doc_command == "set" and args.parse_json:
            value = json_value(args.value, "VALUE")

        async def main() -> dict[str, Any]:
            async with RelayClient.connect(_relay_url(args), identity, reconnect=False) as client:
                tell_queued(client)
                creating = args.doc_command != "get"
                async with client.doc(args.ns, args.name, create=creating) as shared:
                    _edit(shared, args, value)
                    return shared.to_json()  # leaving the block waits for the edit's commit

        content = trio.run(main)
    except UsageError as exc:
        print(f"{where}: {exc}", file=sys.stderr)
        return 2
    except ProtocolError as exc:
        print(f"{where}: {exc.code.slug}: {exc.reason}", file=sys.stderr)
        return 4 if exc.code is ErrorCode.UNKNOWN_DOC else 1
    except Exception as exc:
        print(f"{where}: {exc}", file=sys.stderr)
        return 1
    if args.doc_command == "get":
        if args.json:
            print(json.dumps(content, separators=(",", ":")))
        else:
            for key, field in content["fields"].items():
                print(f"{key}={json.dumps(field) if not isinstance(field, str) else field}")
            if content["text"]:
                print(content["text"])
            for entry in content["log"]:
                print(f"- {entry}")
    return 0


def _edit(shared: SharedDoc, args: argparse.Namespace, value: Any) -> None:
    if args.doc_command == "set":
        shared.map()[args.field] = value
    elif args.doc_command == "append":
        shared.array().append(args.text)
