"""``formicary wo ...``: the work ledger for shell-driven agents (the workledger workflow).

Writes go through :class:`agent_sdk.ledger.Ledger`; reads (``list``, ``show``) are
queries the relay answers from the state it decides on. The fencing token of each order this agent
holds is kept in ``tokens.json`` next to its key file, under the agent's id (keys may
share a folder), so ``renew``, ``release``, ``note`` and ``update`` need no
``--token`` (all accept one). A kept token the relay says is over (its lease lapsed
or moved on: a refused ``renew``, ``release`` or ``update``) is forgotten.

Writes wait for the relay's outcome up to ``--timeout`` (30 s by default;
agent_sdk/cli_timeout.py): a write queued for an unreachable home, or never answered,
exits 1 saying it is not confirmed and may still land, and which command shows
whether it did. The commands that take a lease (``wo claim``, ``wo next``, ``lock
acquire``) record their request first, in ``pending.json`` beside ``tokens.json``:
a rerun of one that gave up asks for the same request's answer, not a new lease
(agent_sdk/cli_pending.py).

Exit codes: 0 ok, 3 conflict (held by another, not the holder, stale token, a status
move that makes no sense), 4 not found (or nothing open), 2 usage, 1 anything else (a
write not confirmed in time included).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Formatter
from typing import Any

import trio

from agent_sdk import cli_timeout
from agent_sdk.cli_timeout import Unconfirmed
from agent_sdk.client import RelayClient
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.identity import Identity, default_key_path
from agent_sdk.ledger import Claim, Ledger, LedgerRefusal, with_ttl
from agent_sdk.wire import SignedEvent, to_json_safe

NS_ENV = "FORMICARY_NS"
DEFAULT_NS = "work@local"
RELAY_TTL = "lease length: 90s, 30m, 2h (default: the relay's, its --{what}-ttl)"

EXIT_OF_PROBLEM = {
    "held": 3,
    "not_holder": 3,
    "stale_token": 3,
    "bad_transition": 3,
    "changed": 3,
    "superseded": 3,
    "not_found": 4,
    "nothing_open": 4,
    "needs_approval": 3,
    "open_children": 3,
    "not_approver": 3,
    "bad_request": 2,
    "bad_ttl": 2,
    "not_joined": 4,
    "closed": 3,
    "ineligible": 3,
    "insufficient_stake": 3,
    "own_auction": 3,
    "over_reserve": 3,
    "reserved": 3,
    "self_vouch": 3,
    "not_resolver": 3,
    "overruled": 3,
}

EXIT_OF_CODE = {
    ErrorCode.NOT_FOUND: 4,
    ErrorCode.BAD_QUERY: 2,
    # What the caller wrote is what is wrong (a malformed namespace or kind): usage.
    ErrorCode.MALFORMED: 2,
    ErrorCode.BAD_EVENT: 2,
    ErrorCode.RESERVED_KIND: 2,
    ErrorCode.TOO_MANY_DEPS: 2,
}

Connect = Callable[[argparse.Namespace], tuple[str, Identity]]


def subcommand(
    commands: Any, name: str, help: str, agent_options: Callable[[argparse.ArgumentParser], None]
) -> argparse.ArgumentParser:
    """A command with the options every ledger command takes."""
    p: argparse.ArgumentParser = commands.add_parser(name, help=help)
    p.add_argument("--ns", help=f"namespace (${NS_ENV}, default {DEFAULT_NS})")
    p.add_argument("--json", action="store_true", help="print JSON")
    agent_options(p)
    return p


def writes(p: argparse.ArgumentParser, *check: str) -> None:
    """Make ``p`` a write command: it waits up to ``--timeout`` for the outcome, and
    past it names ``check`` as the command that shows whether the write landed: words
    formatted with the arguments (``{ns}`` resolved), a word naming an option not
    given left out."""
    cli_timeout.add_option(p, "the relay's outcome")
    p.set_defaults(check=check)


def _check(words: Sequence[str], fields: dict[str, Any]) -> str:
    def given(word: str) -> bool:
        return all(
            fields.get(name) is not None for _, name, _, _ in Formatter().parse(word) if name
        )

    return " ".join(word.format(**fields) for word in words if given(word))


SHOW = ("formicary wo show {id}", "--ns {ns}")
LIST = ("formicary wo list", "--ns {ns}")
LOCKS = ("formicary lock list", "--ns {ns}")


def add_parser(sub: Any, agent_options: Callable[[argparse.ArgumentParser], None]) -> None:
    wo = sub.add_parser("wo", help="work orders: create, claim, renew, release, ...")
    commands = wo.add_subparsers(dest="wo", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return subcommand(commands, name, help, agent_options)

    p = command("create", "create a work order; prints its id")
    writes(p, *LIST)
    p.add_argument("--title", required=True)
    p.add_argument("--description", default="")
    p.add_argument("--acceptance", action="append", default=[])
    p.add_argument("--verify", default="", help="verification command")
    p.add_argument("--priority", type=int, default=0, help="higher first")
    p.add_argument("--file", action="append", default=[], dest="files")
    p.add_argument("--requires-approval", metavar="REASON",
                   help="a person must approve it before it is done: why")  # fmt: skip
    p.add_argument("--approver", action="append", default=[], metavar="KEY",
                   help="a key (hex) that may approve (repeat)")  # fmt: skip
    p.add_argument("--approver-role", default="", help="members of this directory role approve")
    p.add_argument("--parent", help="make it a sub-order of this order")
    p = command("list", "list work orders")
    p.add_argument("--status", choices=[s for s in STATUSES])
    p = command("show", "show one work order")
    p.add_argument("id")
    for name in ("claim", "next"):
        p = command(name, "claim an order" if name == "claim" else "claim the best open order")
        if name == "claim":
            p.add_argument("id")
        writes(p, *(SHOW if name == "claim" else LIST))
        p.add_argument("--ttl", help=RELAY_TTL.format(what="claim"))
    p = command("renew", "renew your lease")
    writes(p, *SHOW)
    p.add_argument("id")
    p.add_argument("--ttl", help=RELAY_TTL.format(what="claim"))
    p.add_argument("--token", type=int)
    p = command("release", "give the order back (open again)")
    writes(p, *SHOW)
    p.add_argument("id")
    p.add_argument("--token", type=int)
    p = command("note", "add a note everyone sees")
    writes(p, *SHOW)
    p.add_argument("id")
    p.add_argument("text")
    p.add_argument("--token", type=int)
    p = command("update", "set the status: done, blocked, open, dropped or awaiting_approval")
    writes(p, *SHOW)
    p.add_argument("id")
    p.add_argument(
        "--status",
        required=True,
        choices=["done", "blocked", "open", "dropped", "awaiting_approval"],
    )
    p.add_argument("--reason", default="")
    p.add_argument("--token", type=int)
    for name in ("approve", "reject"):
        p = command(name, f"as an approver: {name} an order awaiting approval")
        writes(p, *SHOW)
        p.add_argument("id")
        p.add_argument("--comment", default="", required=name == "reject")
    p = command("wait", "wait until an order awaiting approval is decided; prints it")
    p.add_argument("id")
    p = command("progress", "report progress on an order you hold")
    writes(p, *SHOW)
    p.add_argument("id")
    p.add_argument("percent", type=int)
    p.add_argument("message", nargs="?", default="")
    p.add_argument("--token", type=int)
    wo.set_defaults(func=run, group="wo", actions=ACTIONS)

    lock = sub.add_parser("lock", help="advisory locks on named resources")
    commands = lock.add_subparsers(dest="lock", required=True)
    p = command("acquire", "take a lock (a path, a branch, anything)")
    writes(p, *LOCKS)
    p.add_argument("name")
    p.add_argument("--ttl", help=RELAY_TTL.format(what="lock"))
    p = command("renew", "renew your lock")
    writes(p, *LOCKS)
    p.add_argument("name")
    p.add_argument("--ttl", help=RELAY_TTL.format(what="lock"))
    p.add_argument("--token", type=int)
    p = command("release", "release your lock")
    writes(p, *LOCKS)
    p.add_argument("name")
    p.add_argument("--token", type=int)
    command("list", "list the locks held now")
    lock.set_defaults(func=run, group="lock", actions=LOCK_ACTIONS)
    from agent_sdk import cli_run

    cli_run.add_parsers(sub, commands, agent_options)
    LOCK_ACTIONS["run"] = cli_run.lock_run


def run(args: argparse.Namespace) -> int:
    from agent_sdk.cli import _identity, _relay_url

    ns = args.ns or os.environ.get(NS_ENV) or DEFAULT_NS
    identity = _identity(args)
    folder = Path(args.key).parent if args.key else default_key_path().parent
    tokens = Tokens(folder, identity.id)

    async def main() -> Any:
        async with RelayClient.connect(_relay_url(args), identity, reconnect=False) as client:
            assert client.relay_key is not None  # (pinned by the handshake)
            tokens.relay = client.relay_key.hex()
            with trio.move_on_after(timeout):
                return await action(Ledger(tell_queued(client), ns))
            raise Unconfirmed(args.timeout)

    name = getattr(args, args.group)
    # The group's dest is the command's name, "_command" added where the bare name
    # would clash with an option (ns, once); `once` is a command of its own.
    command = args.group.removesuffix("_command")
    where = f"formicary {command}" if name == command else f"formicary {command} {name}"
    from agent_sdk import cli_pending

    takes = (args.group, name) in cli_pending.KINDS  # a lease: its request is recorded
    try:
        # A bad file must not cost a claim whose token cannot be kept.
        tokens.check(writing=(args.group, name) in KEEPS)
        if takes:  # ...nor one whose request cannot be asked again
            cli_pending.PendingRequests(folder, identity.id).check()
        # Only write commands have one; the others wait as long as they wait (`wo wait`).
        timeout = cli_timeout.seconds(args.timeout) if hasattr(args, "timeout") else math.inf
        action: Callable[[Ledger], Awaitable[Any]] = args.actions[name](args, tokens, ns)
        try:
            result = trio.run(main)
        except Exception as exc:
            if not getattr(args, "command_running", False):
                raise
            from agent_sdk.cli_run import LEASE_LOST

            # The connection ended under a command run under a lease: it was stopped.
            reason = f"the connection to the relay was lost ({exc}); the command was stopped"
            print(f"{where}: {reason}", file=sys.stderr)
            return LEASE_LOST
    except Unconfirmed as exc:
        check = _check(args.check, {**vars(args), "ns": ns})
        cli_timeout.say_unconfirmed(where, str(exc), check, asks_again=takes)
        return 1
    except LedgerRefusal as exc:
        print(f"{where}: {exc.problem}: {exc.reason}", file=sys.stderr)
        if exc.problem == "held" and exc.holder and exc.holder.get("holder") == identity.public_key:
            # The agent's own lease, so a bare "held" would send it looking for
            # another holder: taken by another process with this key, or granted to
            # a request that is no longer asked again (a pending `wo next`'s while
            # this is `wo claim`, or one forgotten: cli_pending), so that its token
            # is not in tokens.json.
            token = exc.holder.get("token")
            print(
                f"{where}: it is this key's own lease (token {token}): one an earlier"
                " command was granted after it gave up, or another process's with this"
                f" key; --token {token} renews, releases or updates it",
                file=sys.stderr,
            )
        return EXIT_OF_PROBLEM.get(exc.problem, 1)
    except ProtocolError as exc:
        print(f"{where}: {exc.code.slug}: {exc.reason}", file=sys.stderr)
        return EXIT_OF_CODE.get(exc.code, 1)
    except UsageError as exc:
        print(f"{where}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"{where}: {exc}", file=sys.stderr)
        return 1
    from agent_sdk.cli_run import Exit

    if isinstance(result, Exit):
        return result.code
    if isinstance(result, Text):
        if result.header:
            print(result.header, file=sys.stderr)
        print(result.text)
    elif result is not None:
        print(json.dumps(result, separators=(",", ":")) if args.json else _plain(result))
    return 0


@dataclass(frozen=True, slots=True)
class Text:
    """A result printed as is (a context document), with a header line on stderr."""

    text: str
    header: str = ""


class UsageError(Exception):
    pass


def tell_reconnects(client: RelayClient) -> RelayClient:
    """Say on stderr when a following command's connection is lost and when it is
    back (`tail --follow`, `msg inbox --follow`), once each: it reconnected in
    silence, which from a shell looks the same as a relay with nothing new to say."""

    def lost(why: BaseException | None) -> None:
        reason = "closed by the relay" if why is None else str(why) or type(why).__name__
        print(
            f"formicary: the connection to {client.url} was lost ({reason}); reconnecting",
            file=sys.stderr,
            flush=True,
        )

    async def back() -> None:
        print(f"formicary: reconnected to {client.url}; resuming", file=sys.stderr, flush=True)

    client.on_lost.append(lost)
    client.on_reconnect.append(back)
    return client


def tell_queued(client: RelayClient) -> RelayClient:
    """Say on stderr, once per namespace, that the relay answered a write `queued`:
    the namespace's home is out of reach, and the command waits for its receipt
    (the relay keeps the write and delivers it later, waited for or not)."""
    told: set[str] = set()

    def say(signed: SignedEvent) -> None:
        ns = signed.event.ns
        if ns not in told:
            told.add(ns)
            print(
                f"formicary: queued at {client.url}: the home relay of {ns} cannot be"
                " reached now; the relay keeps the write and delivers it when it can."
                " Waiting for the home's receipt (stopping now does not undo it)",
                file=sys.stderr,
                flush=True,
            )

    client.on_queued.append(say)
    return client


def json_value(text: str, what: str) -> Any:
    """``text`` parsed as JSON, strictly: Python's parser takes ``NaN`` and
    ``Infinity``, which no JSON reader of the log could read back."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    def finite(number: str) -> float:
        value = float(number)
        if math.isinf(value):
            raise ValueError(f"{number} is too large for a double")
        return value

    try:
        return json.loads(text, parse_constant=refuse, parse_float=finite)
    except ValueError as exc:  # json.JSONDecodeError is one
        raise UsageError(f"{what} is not JSON: {exc}") from None


KEEPS = {("wo", "claim"), ("wo", "next"), ("wo", "renew"), ("lock", "acquire"),
         ("lock", "renew"), ("auction", "confirm")}  # fmt: skip
"""The commands that keep a token the relay just granted."""


class Tokens:
    """The fencing tokens an agent holds, by relay, namespace and order, in a small
    file next to its key. Several keys may share the folder: each entry names its
    agent. And its relay, by key (:attr:`relay`, known once connected): every relay
    is `local` unless named, so two relays' `wo-1` in `work@local` are two orders."""

    def __init__(self, folder: Path, agent: str, relay: str | None = None) -> None:
        self.path = folder / "tokens.json"
        self.agent = agent
        self.relay = relay
        """The relay's key (hex): set when connected, before any token is read."""

    def _load(self) -> dict[str, int]:
        data = read_json(self.path)  # (not JSON read as empty: the next write loses all)
        if not isinstance(data, dict):
            raise UsageError(f"{self.path} is not a token file (a JSON object): move it away")
        return {k: v for k, v in data.items() if isinstance(v, int)}

    def check(self, *, writing: bool) -> None:
        """Raise :class:`UsageError` now if the file cannot be read, or ``writing``
        written: a claim granted and then not kept is held by nobody who knows its
        token. (Only read, a read-only key folder serves the other commands.)"""
        self._load()
        if not writing:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            open(self.path.with_suffix(".lock"), "a").close()
            fd, probe = tempfile.mkstemp(dir=self.path.parent, prefix=".tokens.")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            where = exc.filename or self.path.parent
            raise UsageError(f"cannot keep tokens in {where}: {exc.strerror}") from None

    def _keys(self, ns: str, order: str) -> tuple[str, str]:
        """The entry's key, and the one versions before they named the relay wrote
        (read when the other is absent; replaced or removed on the next write)."""
        assert self.relay is not None, "tokens are read once connected"
        return f"{self.agent}/{self.relay}/{ns}/{order}", f"{self.agent}/{ns}/{order}"

    def _kept(self, data: dict[str, int], ns: str, order: str) -> int | None:
        key, older = self._keys(ns, order)
        return data.get(key, data.get(older))

    def kept(self, ns: str, order: str, given: int | None) -> int | None:
        """The token to use: the one given, else the one kept, else none. (Entries of
        versions before they named their agent are not read: whose they are is not
        known; pass such a token with --token.)"""
        if given is not None:
            return given
        return self._kept(self._load(), ns, order)

    def get(self, ns: str, order: str, given: int | None, lock: str | None = None) -> int:
        """The token to use, or :class:`UsageError`; ``lock``: ``order`` is that
        lock's entry (named, and "acquire" said, as the user knows them)."""
        token = self.kept(ns, order, given)
        if token is None:
            what, verb = (lock, "acquire") if lock is not None else (order, "claim")
            raise UsageError(f"no token kept for {what}: {verb} it first or pass --token")
        return token

    def put(self, ns: str, order: str, token: int, *, was: int | None = None) -> bool:
        """Keep a token: a new grant's, or, with ``was``, a renewal's in place of the
        token it renewed if that is still the one kept (a claim run in parallel may
        have kept a newer one). Shell agents run commands in parallel, so the
        read-modify-write holds a lock and writes a private temporary file that
        replaces the old one atomically. True when it was kept."""
        return self._change(ns, order, token, was, check=was is not None)

    def forget(self, ns: str, order: str, token: int | None) -> bool:
        """Forget the token kept for ``order`` if it is ``token``: a claim made in
        parallel meanwhile keeps the newer one it stored. True when it was."""
        return token is not None and self._change(ns, order, None, token, check=True)

    def _change(
        self, ns: str, order: str, token: int | None, was: int | None, *, check: bool
    ) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._load()
            key, older = self._keys(ns, order)
            if check and self._kept(data, ns, order) != was:
                return False
            data.pop(older, None)
            if token is not None:
                data[key] = token
            else:
                data.pop(key, None)
            write_json(self.path, data)
        return True


def read_json(path: Path) -> Any:
    """A small state file's JSON value: ``{}`` when there is no file (or only
    whitespace), ``None`` when it is not JSON; :class:`UsageError` when it cannot be
    read. The caller checks the shape, and refuses rather than overwrite what it
    cannot read."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return None


def write_json(path: Path, data: Any) -> None:
    """Replace a small state file atomically (the caller holds its lock): a private
    temporary file beside it, renamed over it, so a reader sees the old file or the
    new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.")
    with os.fdopen(fd, "w") as file:
        file.write(json.dumps(data, indent=1))
    os.replace(tmp, path)


def ttl_ms(text: str, flag: str = "--ttl") -> int:
    units = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
    for unit in ("ms", "s", "m", "h"):
        number = text.removesuffix(unit)
        if number != text and number.isdigit():
            return int(number) * units[unit]
    raise UsageError(f"{flag} {text!r}: use a number with ms, s, m or h")


def lifetime_ms(text: str, flag: str = "--ttl") -> int:
    """A token's lifetime (``relay invite``, ``doc token``): 0 would print one that
    has already expired."""
    ms = ttl_ms(text, flag)
    if ms == 0:
        raise UsageError(f"{flag} {text!r}: a duration above 0")
    return ms


def _asked_ttl(args: argparse.Namespace) -> int | None:
    """``--ttl`` in ms; ``None`` when not given: the relay's default then applies."""
    return None if args.ttl is None else ttl_ms(args.ttl)


def _claimed(claim: Claim) -> dict[str, Any]:
    """A grant as scripts read it: the lease's fields under the names the relay's
    answers, ``wo show`` and ``auction show`` give them (``expires_ms``: ms since the
    epoch), so that one script reads them the same way from every command."""
    return {"wo": claim.order, "token": claim.token, "expires_ms": claim.expires_ms}


def _order(shown: dict[str, Any]) -> dict[str, Any]:
    """An order as the relay shows it (``wo.show``, ``wo.list``), its id and its
    children's under ``wo``: the name every command's JSON gives a work order's id (as
    ``--wo`` does, and ``auction show``, ``context pull`` and the claim answers).
    The relay's views name it ``id``; a script reads one name from every command."""
    order = {"wo": shown["id"], **{k: v for k, v in shown.items() if k != "id"}}
    if "children" in order:
        order["children"] = [
            {"wo": c["id"], **{k: v for k, v in c.items() if k != "id"}} for c in order["children"]
        ]
    return order


def _plain(result: Any) -> str:
    if isinstance(result, list):
        return "\n".join(_plain(item) for item in result)
    if isinstance(result, dict):
        return "  ".join(f"{k}={_value(v)}" for k, v in result.items() if v not in ("", [], None))
    return str(result)


def _value(value: Any) -> str:
    """A field for people: nested lists and maps (an order's notes) as compact JSON,
    not Python's repr."""
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def _create(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    gate: dict[str, Any] = {}
    if args.requires_approval is not None:
        try:
            approvers = [bytes.fromhex(key) for key in args.approver]
        except ValueError:
            raise UsageError("--approver: a key is 64 hex digits") from None
        if any(len(key) != 32 for key in approvers):
            raise UsageError("--approver: a key is 64 hex digits")
        if not approvers and not args.approver_role:
            raise UsageError("--requires-approval needs --approver or --approver-role")
        gate = {"requires_approval": True, "approval_reason": args.requires_approval}
        if approvers:
            gate["approvers"] = approvers
        if args.approver_role:
            gate["approver_role"] = args.approver_role
    elif args.approver or args.approver_role:
        raise UsageError("--approver and --approver-role go with --requires-approval")

    async def act(ledger: Ledger) -> Any:
        order = await ledger.create(
            args.title,
            description=args.description,
            acceptance=args.acceptance,
            files=args.files,
            verify=args.verify,
            priority=args.priority,
            **gate,
            **({"parent": args.parent} if args.parent else {}),
        )
        # Bare, so that `id=$(formicary wo create ...)` is the id.
        return {"wo": order} if args.json else Text(order)

    return act


def _decide(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        if args.wo == "approve":
            await ledger.approve(args.id, args.comment)
        else:
            await ledger.reject(args.id, args.comment)
        return {"wo": args.id, "decision": args.wo}

    return act


def _progress(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        token = tokens.get(ns, args.id, args.token)
        await ledger.progress(Claim(args.id, token, 0), args.percent, args.message)
        return {"wo": args.id, "percent": args.percent}

    return act


def _wait(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        return to_json_safe({"wo": args.id, **await ledger.wait_decision(args.id)})

    return act


def _list(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        return [_order(to_json_safe(order)) for order in await ledger.list(args.status)]

    return act


def _show(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        return _order(to_json_safe(await ledger.show(args.id)))

    return act


def _claim_like(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    ttl = _asked_ttl(args)

    async def act(ledger: Ledger) -> Any:
        if args.wo != "renew":
            from agent_sdk.cli_pending import take

            body = {"wo": args.id} if args.wo == "claim" else {}
            claim = await take(
                ledger,
                tokens,
                f"formicary wo {args.wo}",
                f"wo.{args.wo}",
                with_ttl(body, ttl),
                lambda lease: tokens.put(ns, lease.order, lease.token),
            )
            return _claimed(claim)
        renewed = tokens.get(ns, args.id, args.token)
        try:
            claim = await ledger.renew(Claim(args.id, renewed, 0), ttl)
        except LedgerRefusal as exc:
            if exc.problem in STALE:
                tokens.forget(ns, args.id, renewed)  # the lease lapsed or moved on
            raise
        # A renewal's token replaces only itself (a claim in parallel may keep a newer).
        tokens.put(ns, claim.order, claim.token, was=renewed)
        return _claimed(claim)

    return act


STALE = ("not_holder", "stale_token")  # refusals that say a kept token's claim is over
ENDED = (*STALE, "bad_transition")  # a release's: the order is not claimed at all


def _release(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        token = tokens.get(ns, args.id, args.token)
        try:
            await ledger.release(Claim(args.id, token, 0))
        except LedgerRefusal as exc:
            if exc.problem in ENDED:
                tokens.forget(ns, args.id, token)  # that claim is over
            raise
        tokens.forget(ns, args.id, token)
        return {"wo": args.id, "status": "open"}

    return act


def _note(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        # Anyone may note; only an explicit --token asks for the holder's fence (a kept
        # token may be stale, and a stale one would refuse the note).
        target = Claim(args.id, args.token, 0) if args.token is not None else args.id
        await ledger.note(target, args.text)
        return None

    return act


def _update(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        kept = tokens.kept(ns, args.id, args.token)
        target = Claim(args.id, kept, 0) if kept is not None else args.id
        try:
            await ledger.update(target, args.status, args.reason)
        except LedgerRefusal as exc:
            # That claim is over: its token would refuse every later update too.
            if args.token is None and exc.problem in STALE and tokens.forget(ns, args.id, kept):
                print(
                    f"formicary wo update: the kept token of {args.id} is forgotten",
                    file=sys.stderr,
                )
            raise
        tokens.forget(ns, args.id, kept)
        return {"wo": args.id, "status": args.status}

    return act


ACTIONS: dict[str, Callable[[argparse.Namespace, Tokens, str], Any]] = {
    "create": _create,
    "list": _list,
    "show": _show,
    "claim": _claim_like,
    "next": _claim_like,
    "renew": _claim_like,
    "release": _release,
    "note": _note,
    "update": _update,
    "approve": _decide,
    "reject": _decide,
    "wait": _wait,
    "progress": _progress,
}
STATUSES = ("open", "claimed", "blocked", "done", "dropped", "awaiting_approval")


def _lock_key(name: str) -> str:
    return f"lock:{name}"


def _lock_take(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    ttl = _asked_ttl(args)

    async def act(ledger: Ledger) -> Any:
        if args.lock == "acquire":
            from agent_sdk.cli_pending import take

            lock = await take(
                ledger,
                tokens,
                "formicary lock acquire",
                "lock.acquire",
                with_ttl({"name": args.name}, ttl),
                lambda lease: tokens.put(ns, _lock_key(lease.order), lease.token),
            )
        else:
            renewed = tokens.get(ns, _lock_key(args.name), args.token, args.name)
            try:
                lock = await ledger.renew_lock(Claim(args.name, renewed, 0), ttl)
            except LedgerRefusal as exc:
                if exc.problem in STALE:  # as `wo renew`: that lock is over
                    tokens.forget(ns, _lock_key(args.name), renewed)
                raise
            tokens.put(ns, _lock_key(args.name), lock.token, was=renewed)  # (as for orders)
        # The lease's fields under the names of _claimed (and `lock list`).
        return {"lock": lock.order, "token": lock.token, "expires_ms": lock.expires_ms}

    return act


def _lock_release(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        token = tokens.get(ns, _lock_key(args.name), args.token, args.name)
        # As `wo release`: a token is forgotten once the relay says its lock is over,
        # not when the relay could not be reached (the lock is still held then).
        try:
            await ledger.unlock(Claim(args.name, token, 0))
        except LedgerRefusal as exc:
            if exc.problem in STALE:
                tokens.forget(ns, _lock_key(args.name), token)
            raise
        tokens.forget(ns, _lock_key(args.name), token)
        return {"lock": args.name, "released": True}

    return act


def _lock_list(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        return [to_json_safe(lock) for lock in await ledger.locks()]

    return act


LOCK_ACTIONS: dict[str, Callable[[argparse.Namespace, Tokens, str], Any]] = {
    "acquire": _lock_take,
    "renew": _lock_take,
    "release": _lock_release,
    "list": _lock_list,
}
