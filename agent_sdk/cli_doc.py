"""``formicary doc``: shared documents for shell-driven agents.

Documents have three conventional roots (agent_sdk/docs.py): ``fields`` (a Map that
``doc set`` writes), ``text`` (a Text) and ``log`` (an Array that ``doc append``
extends). ``doc get`` prints them; ``doc token`` mints the token a plain Yjs client
needs to edit through the relay's ``/yjs/<ns>/<doc>`` endpoint.

``set`` and ``append`` wait for the relay to commit the change (``--timeout``, 30 s by
default) and exit 1 saying so when it does not: the change may still land later (a
write the relay queued for an unreachable home does), so the agent must not take it
as done, nor blindly write it again. When the document could not even be opened in
that time, the change was not sent, and the message says so. ``get`` waits as long
(``--timeout``) for the document (a proxied one waits for its home) and exits 1 when
it does not come.

Exit codes: 0 ok, 4 no such document, 2 usage, 1 anything else (an unconfirmed change
included).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import trio

from agent_sdk import cli_timeout
from agent_sdk.cli_timeout import Unconfirmed
from agent_sdk.client import RelayClient
from agent_sdk.docs import SharedDoc
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.wire import to_json_safe

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
    cli_timeout.add_option(p, "the document (its home, when it is another relay's)")

    p = command("set", "set a field (creates the document if needed)")
    # Not "key": that is the key file of every agent command (--key).
    p.add_argument("field", help="the field of `fields` to set")
    p.add_argument("value")
    p.add_argument("--parse-json", action="store_true", help="store VALUE as JSON, not text")
    cli_timeout.add_option(p, "the change's commit")
    p = command("append", "append an entry to the log (creates the document if needed)")
    p.add_argument("text")
    cli_timeout.add_option(p, "the change's commit")
    p = command(
        "token",
        "mint a token for a plain Yjs client to edit this document; prints the query "
        "string that presents it with its secret (token=...&secret=...)",
    )
    p.add_argument("--ttl", default="1h", help="how long it is valid: 30m, 8h")
    group.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent_sdk.cli import _identity, _relay_url
    from agent_sdk.cli_wo import json_value, lifetime_ms, tell_queued

    where = f"formicary doc {args.doc_command}"
    identity = _identity(args)
    edited = False  # the change made and sent: from then on, an error leaves it unknown
    try:
        if args.doc_command == "token":
            from agent_sdk import doctoken

            expires = time.time_ns() // 1_000_000 + lifetime_ms(args.ttl)
            print(doctoken.query(*doctoken.mint_bound(identity, args.ns, args.name, expires)))
            return 0
        value: Any = args.value if args.doc_command == "set" else None
        if args.doc_command == "set" and args.parse_json:
            value = json_value(args.value, "VALUE")
        writing = args.doc_command != "get"
        # A write's deadline covers the whole of it: the document's creation waits for
        # its commit too, as long as the home is out of reach (the relay queues it). A
        # read waits as long for a document whose home is out of reach.
        timeout = cli_timeout.seconds(args.timeout)

        async def main() -> dict[str, Any]:
            nonlocal edited
            async with RelayClient.connect(_relay_url(args), identity, reconnect=False) as client:
                tell_queued(client)
                with trio.move_on_after(timeout):
                    docs = client.doc(args.ns, args.name, create=writing, flush_timeout=math.inf)
                    async with docs as shared:
                        _edit(shared, args, value)
                        edited = True
                        # (binary values, which Yjs clients may store, as hex: as JSON)
                        content: dict[str, Any] = to_json_safe(shared.to_json())
                        return content  # leaving the block waits for the edit's commit
                raise Unconfirmed(args.timeout)

        content = trio.run(main)
    except Unconfirmed as exc:
        if args.doc_command == "get":
            print(
                f"{where}: the document did not come in {exc} (its home may be out of reach;"
                " a larger --timeout waits longer)",
                file=sys.stderr,
            )
        elif not edited:  # the document never opened: nothing of the change went out
            print(
                f"{where}: the document could not be opened in {exc} (its home may be out"
                " of reach; its creation may still be queued): the change was not sent,"
                " write it again later",
                file=sys.stderr,
            )
        else:
            check = f"formicary doc get {args.ns} {args.name}"
            cli_timeout.say_unconfirmed(where, str(exc), check, "the change")
        return 1
    except Exception as exc:
        refused = isinstance(exc, ProtocolError) and exc.code is not ErrorCode.INTERNAL
        if not edited or refused:  # never sent, or the relay said no: nothing landed
            return _failed(where, exc)
        # The connection ended (the relay stopped) with the change sent and not
        # answered: the relay may have committed it, or not.
        print(
            f"{where}: the change is not confirmed ({exc}); it may have landed or not:"
            f" check with `formicary doc get {args.ns} {args.name}` before writing it again",
            file=sys.stderr,
        )
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


def _failed(where: str, exc: Exception) -> int:
    from agent_sdk.cli_wo import UsageError

    if isinstance(exc, UsageError):
        print(f"{where}: {exc}", file=sys.stderr)
        return 2
    if isinstance(exc, ProtocolError):
        print(f"{where}: {exc.code.slug}: {exc.reason}", file=sys.stderr)
        return 4 if exc.code is ErrorCode.UNKNOWN_DOC else 1
    print(f"{where}: {exc}", file=sys.stderr)
    return 1


def _edit(shared: SharedDoc, args: argparse.Namespace, value: Any) -> None:
    if args.doc_command == "set":
        shared.map()[args.field] = value
    elif args.doc_command == "append":
        shared.array().append(args.text)
