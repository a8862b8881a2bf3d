"""``formicary msg``: messages between agents for shell-driven agents.

``msg send TO TEXT`` (or ``--file F``) seals the message for agent ``TO`` and sends
it; it prints ``{"id", "path", "status"}``, and with ``--wait`` waits for the
recipient's receipt (``status: delivered``), up to ``--timeout`` if given (past it
the command prints the message's status and exits 1). With ``--id TEXT`` the message's id is
derived from TEXT (and the sender and recipient), so running the command again with
the same ``--id`` (after a lost connection, say) sends the same message, which the
recipient gets once (protocol 15.4 says for how long); the same ``--id`` is for the
same message only. A message to ``AGENT_ID@relay`` whose
relay cannot be reached now is sent again for up to a minute, said once on stderr.
``msg inbox`` prints the messages waiting for this agent as JSON lines and exits;
``--follow`` keeps printing them as they come. Printing a message takes it: it is
acknowledged, and its sender gets a receipt. Exit codes: 1 when the relay refuses
(unknown recipient, inbox full, message too large, a relay still out of reach after
that minute), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from agent_sdk import cli_timeout
from agent_sdk.cli_wo import NS_ENV, UsageError, tell_reconnects
from agent_sdk.client import RelayClient
from agent_sdk.direct import DirectUnreachable
from agent_sdk.errors import ProtocolError
from agent_sdk.identity import Identity
from agent_sdk.messaging import Message, is_name
from agent_sdk.wire import to_json_safe

AgentOptions = Callable[[argparse.ArgumentParser], None]


def add_parser(
    sub: Any,
    agent_options: AgentOptions,
    connect: Callable[[argparse.Namespace], tuple[str, Identity]],
) -> None:
    group = sub.add_parser("msg", help="messages to other agents: send, inbox")
    commands = group.add_subparsers(dest="msg", required=True)
    p = commands.add_parser("send", help="send a sealed message to an agent")
    p.add_argument("to", help="agent id (hex), AGENT_ID@relay, or a name in --ns's directory")
    p.add_argument("text", nargs="?", help="the message (or --file)")
    p.add_argument("--file", help="send this file's bytes instead")
    p.add_argument("--via", default="auto", choices=["auto", "direct", "relay"])
    p.add_argument(
        "--ns", help=f"the directory to find the recipient (and its endpoint) in (${NS_ENV})"
    )
    p.add_argument("--endpoint", help="the recipient's direct endpoint, ws://HOST:PORT")
    p.add_argument("--wait", action="store_true", help="wait for the recipient's receipt")
    p.add_argument(
        "--timeout",
        help="with --wait: how long to wait for the receipt: 90s, 5m (default: until it comes)",
    )
    p.add_argument(
        "--id",
        metavar="TEXT",
        help="name the message: run again with the same --id (after a lost connection,"
        " a crash), this sends the same message, and the recipient gets it once while a"
        " copy is recognised: while the relay remembers the delivery (its last 65,536,"
        " over all its inboxes, not across its restart) or the recipient's process"
        " remembers the stream (its last 65,536 sender streams, each --id one of them);"
        " use the same --id only for the same message (with other text, which one is"
        " handed out depends on the path)",
    )
    agent_options(p)
    p.set_defaults(func=lambda args: cmd_send(args, *connect(args)))
    p = commands.add_parser("inbox", help="print (and take) the messages waiting for you")
    p.add_argument("--follow", action="store_true", help="keep printing messages as they come")
    agent_options(p)
    p.set_defaults(func=lambda args: cmd_inbox(args, *connect(args)))


def cmd_send(args: argparse.Namespace, url: str, identity: Identity) -> int:
    if (args.text is None) == (args.file is None):
        print("formicary msg: give the message as TEXT or --file, one of them", file=sys.stderr)
        return 2
    if args.file is not None:
        try:
            body: Any = {"file": Path(args.file).name, "data": Path(args.file).read_bytes()}
        except OSError as exc:
            print(f"formicary msg: {exc}", file=sys.stderr)
            return 2
    else:
        body = args.text
    if args.id == "":
        print("formicary msg: --id: give the message's id as text, not empty", file=sys.stderr)
        return 2
    limit = math.inf
    if args.timeout is not None:
        if not args.wait:
            print("formicary msg: --timeout is how long --wait waits: give both", file=sys.stderr)
            return 2
        try:
            limit = cli_timeout.seconds(args.timeout)
        except UsageError as exc:
            print(f"formicary msg: {exc}", file=sys.stderr)
            return 2
    named = is_name(args.to)
    # $FORMICARY_NS only to look a name up (--ns also finds an id's endpoint).
    ns = args.ns or (os.environ.get(NS_ENV) if named else None)
    if ns is None and named:
        print(
            f"formicary msg: {args.to!r} is not an agent id: give --ns (or ${NS_ENV}),"
            " the directory to find it in",
            file=sys.stderr,
        )
        return 2

    async def main() -> tuple[dict[str, Any], bool]:
        async with RelayClient.connect(url, identity, reconnect=False) as client:
            tell_resending(client)
            sent = await client.send(
                args.to, body, via=args.via, ns=ns, endpoint=args.endpoint, id=args.id
            )
            late = False
            if args.wait:  # (returns at once when a run before this one had it delivered)
                with trio.move_on_after(limit) as waiting:
                    await sent.delivered()
                late = waiting.cancelled_caught
            return {"id": sent.id.hex(), "path": sent.path, "status": sent.status}, late

    try:
        result, late = trio.run(main)
    except ValueError as exc:
        print(f"formicary msg: {exc}", file=sys.stderr)
        return 2
    except (ProtocolError, DirectUnreachable) as exc:
        print(f"formicary msg: not sent: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    if late:
        # Sent, and kept for the recipient: only its taking is not known yet.
        again = (
            "running the same command again waits on for this same message"
            if args.id is not None
            else "it is not lost, and running the command again would send it again"
            " (with --id, a rerun waits on for the same message)"
        )
        print(
            f"formicary msg send: no receipt after {args.timeout}: the message is"
            f" {result['status']}, not yet taken by its recipient; {again}",
            file=sys.stderr,
        )
        return 1
    return 0


def tell_resending(client: RelayClient) -> None:
    """Say on stderr, once per relay, that a message to an agent of another relay
    waits because the way there is down. The relay answers ``home_unreachable`` and
    keeps nothing (protocol 15.5): this process holds the message and sends it
    again, so unlike a queued write (``tell_queued``), stopping it may lose it."""
    told: set[str] = set()

    def say(relay: str, error: ProtocolError) -> None:
        if relay not in told:
            told.add(relay)
            print(
                f"formicary: not queued at {client.url}: relay {relay} cannot be reached"
                f" now ({error.reason}). This command holds the message and sends it again"
                f" for up to {client.mailbox.patience:g} s; stopping it now may leave the"
                " message unsent",
                file=sys.stderr,
                flush=True,
            )

    client.on_resending.append(say)


def message_json(message: Message) -> dict[str, Any]:
    return {
        "id": message.id.hex(),
        "from": message.sender.hex(),
        "ts": message.ts,
        "path": message.path,
        "body": to_json_safe(message.body),
    }


def cmd_inbox(args: argparse.Namespace, url: str, identity: Identity) -> int:
    async def main() -> None:
        async with RelayClient.connect(url, identity, reconnect=args.follow) as client:
            tell_reconnects(client)
            mailbox = client.mailbox
            mailbox.open()
            if not args.follow:
                await mailbox.live.wait()  # what waits is on its way to us: take it all
                for _ in range(mailbox.waiting):
                    print(json.dumps(message_json(await mailbox.next())), flush=True)
                return
            async for message in client.messages():
                print(json.dumps(message_json(message)), flush=True)

    try:
        trio.run(main)
    except ProtocolError as exc:
        print(f"formicary msg: {exc}", file=sys.stderr)
        return 1
    return 0
