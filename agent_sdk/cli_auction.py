"""``formicary auction``: task auctions for shell-driven agents.

``auction open`` prints the auction's id and its work order; ``auction bid`` locks a
stake (bidders must be members: ``formicary dir join``); ``auction show`` prints the
bids, the ranking once closed, and the current award. Exit codes as for
``formicary wo`` (3: closed, ineligible, short of stake; 4: no such auction).

The write commands (``open``, ``bid``, ``commit``, ``reveal``, ``withdraw``,
``confirm``, ``rep vouch``, ``rep revoke``) wait for the relay's outcome up to
``--timeout``, as the ledger's do (agent_sdk/cli_timeout.py): past it they exit 1
saying the write may still land, and name ``auction show ID`` (``auction list`` for
``open``, ``rep show AGENT`` for a vouch) as the command that shows whether it did.
``auction confirm`` run again after its confirm landed keeps the award's token and
answers as the first would have (a second confirm would be refused).

``auction commit`` draws its salt before it sends the commitment (``--salt`` reuses
one), and says it on stderr, with the auction and the reveal to run, on every way
out but an answer: past ``--timeout``, a lost connection, an interrupt. A
commitment that lands after its command gave up can be revealed only with that
salt, and is kept nowhere else. Committing again replaces the bidder's commitment
(protocol 8.12), and the earlier one may still land after the new one: a second
``auction commit`` with the same ``--salt`` and ``--price`` makes the same
commitment, so the one salt reveals whichever counts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from agent_sdk.auctions import Auctions, Reputation, new_salt
from agent_sdk.cli_wo import Tokens, UsageError, run, subcommand, ttl_ms, writes
from agent_sdk.errors import ProtocolError
from agent_sdk.ledger import Ledger, LedgerRefusal
from agent_sdk.wire import to_json_safe

AgentOptions = Callable[[argparse.ArgumentParser], None]
Make = Callable[[argparse.Namespace, Tokens, str], Any]

SHOW = ("formicary auction show {id}", "--ns {ns}")
REP_SHOW = ("formicary rep show {agent}", "--ns {ns}")


def add_parser(sub: Any, agent_options: AgentOptions) -> None:
    group = sub.add_parser("auction", help="task auctions: open, bid, withdraw, show, list")
    commands = group.add_subparsers(dest="auction", required=True)
    p = subcommand(commands, "open", "open an auction for a task; prints its id", agent_options)
    writes(p, "formicary auction list", "--ns {ns}")
    p.add_argument("--title", help="the task (a new work order)")
    p.add_argument("--wo", help="or one of your open work orders")
    p.add_argument("--duration", default="5m", help="bidding time: 90s, 5m, 1h")
    p.add_argument("--rule", default="stake_x_reputation",
                   choices=["stake_x_reputation", "lowest_price", "first_eligible"])  # fmt: skip
    p.add_argument("--capability", action="append", default=[], dest="capabilities")
    p.add_argument("--min-reputation", type=float, help="no bar unless given")
    p.add_argument("--reserve", type=int, help="the highest price accepted")
    p.add_argument("--sealed", action="store_true", help="commit, then reveal, prices")
    p = subcommand(commands, "bid", "bid on an auction (locks the stake)", agent_options)
    writes(p, *SHOW)
    p.add_argument("id")
    p.add_argument("--stake", type=int, required=True)
    p.add_argument("--price", type=price, required=True)
    p.add_argument("--note", default="")
    p = subcommand(commands, "commit", "bid on a sealed auction; prints the salt", agent_options)
    writes(p, *SHOW)
    p.add_argument("id")
    p.add_argument("--stake", type=int, required=True)
    p.add_argument("--price", type=price, required=True)
    p.add_argument("--salt", help="the salt to commit with (hex, 16 to 64 bytes; default: a"
                   " new one): an earlier commit's, to send that bid again")  # fmt: skip
    p = subcommand(commands, "reveal", "open your sealed bid after the deadline", agent_options)
    writes(p, *SHOW)
    p.add_argument("id")
    p.add_argument("--price", type=price, required=True)
    p.add_argument("--salt", required=True, help="the salt `auction commit` printed (hex)")
    p = subcommand(commands, "withdraw", "withdraw your bid before the deadline", agent_options)
    writes(p, *SHOW)
    p.add_argument("id")
    p = subcommand(commands, "confirm", "confirm the award you won", agent_options)
    writes(p, *SHOW)
    p.add_argument("id")
    p = subcommand(commands, "show", "an auction: bids, ranking, award", agent_options)
    p.add_argument("id")
    p = subcommand(commands, "list", "auctions", agent_options)
    p.add_argument("--phase", choices=["open", "awarded", "confirmed", "completed", "unawarded"])
    group.set_defaults(func=run, group="auction", actions=ACTIONS)

    group = sub.add_parser("rep", help="reputation: show, vouch, revoke")
    commands = group.add_subparsers(dest="rep", required=True)
    p = subcommand(commands, "show", "an agent's score, outcomes and vouches", agent_options)
    p.add_argument("agent", nargs="?", help="agent key in hex (default: yours)")
    p = subcommand(commands, "vouch", "vouch for an agent, staking --weight", agent_options)
    writes(p, *REP_SHOW)
    p.add_argument("agent", help="agent key in hex")
    p.add_argument("--weight", type=int, required=True)
    p.add_argument("--reason", default="")
    p = subcommand(commands, "revoke", "withdraw your vouch", agent_options)
    writes(p, *REP_SHOW)
    p.add_argument("agent", help="agent key in hex")
    group.set_defaults(func=run, group="rep", actions=REP_ACTIONS)


def _open(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    duration = ttl_ms(args.duration, "--duration")

    async def act(ledger: Ledger) -> Any:
        opened = await Auctions(ledger.client, ns).open(
            title=args.title,
            wo=args.wo,
            duration_ms=duration,
            rule=args.rule,
            capabilities=args.capabilities,
            min_reputation=args.min_reputation,
            reserve=args.reserve,
            sealed=args.sealed,
        )
        return {k: v for k, v in opened.items() if k != "req"}

    return act


def price(text: str) -> int:
    """A price is a whole number, 0 or more: a sealed bid's commitment to another
    could never be revealed, and its stake would be forfeited at the close."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a price is a whole number, 0 or more")
    return value


def _bid(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    async def act(ledger: Ledger) -> Any:
        placed = await Auctions(ledger.client, ns).bid(args.id, args.stake, args.price, args.note)
        return to_json_safe({k: v for k, v in placed.items() if k != "req"})

    return act


def _commit(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    salt = _salt(args.salt) if args.salt is not None else new_salt()

    async def act(ledger: Ledger) -> Any:
        # The salt is drawn before the commitment goes out, and told on every way out
        # without an answer (cancelled by --timeout, a lost connection, ^C): the
        # commitment may land all the same, and without its salt it can never be
        # revealed (its stake is then partly forfeited at the close). A refusal is
        # the relay's answer: this commitment does not stand; so is an error that
        # refuses the frame or the event itself (1xxx, 2xxx: not home, forbidden...).
        try:
            await Auctions(ledger.client, ns).commit(args.id, args.stake, args.price, salt=salt)
        except LedgerRefusal:
            raise
        except ProtocolError as exc:
            if not exc.code.refuses_the_event:  # "not now", a lost connection: it may land
                _tell_salt(args, ns, salt)
            raise
        except BaseException:
            _tell_salt(args, ns, salt)
            raise
        return {"auction": args.id, "stake": args.stake, "salt": salt.hex()}

    return act


def _salt(text: str) -> bytes:
    try:
        salt = bytes.fromhex(text)
    except ValueError:
        salt = b""
    if not 16 <= len(salt) <= 64:
        raise UsageError(f"--salt {text!r}: a salt is 16 to 64 bytes in hex")
    return salt


def _tell_salt(args: argparse.Namespace, ns: str, salt: bytes) -> None:
    """Say on stderr the salt of a commitment sent without an answer, how to reveal
    it, and how to commit the same bid again."""
    reveal = (
        f"formicary auction reveal {args.id} --price {args.price} --salt {salt.hex()} --ns {ns}"
    )
    print(
        f"formicary auction commit: the sealed bid on {args.id} may still land: its salt is"
        f" {salt.hex()}; keep it. After the deadline `{reveal}` reveals it; to commit"
        f" again, pass --salt {salt.hex()} with the same --price, so that this salt reveals"
        " whichever commitment lands last",
        file=sys.stderr,
        flush=True,
    )


def _reveal(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
    try:
        salt = bytes.fromhex(args.salt)
    except ValueError:
        raise UsageError("--salt is the hex `auction commit` printed") from None

    async def act(ledger: Ledger) -> Any:
        await Auctions(ledger.client, ns).reveal(args.id, args.price, salt)
        return {"auction": args.id, "price": args.price}

    return act


def _simple(name: str) -> Make:
    def make(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
        async def act(ledger: Ledger) -> Any:
            auctions = Auctions(ledger.client, ns)
            if name == "withdraw":
                return {"auction": args.id, "unlocked": await auctions.withdraw(args.id)}
            if name == "confirm":
                # The award read first: once confirmed, its token must be kept (as a
                # claim's is, for the ledger commands that follow), and a read after
                # could fail. A confirm succeeds only for the award read (not_holder
                # else: the next award goes to another bidder).
                award = await auctions.show(args.id)
                mine = award["awardee"] == ledger.client.identity.public_key
                # Run again after a confirm that landed once its command gave up: the
                # relay would refuse a second one (not_holder), so the token is kept
                # from the award as it stands, and the answer is the first one's.
                if not (mine and award["phase"] == "confirmed"):
                    await auctions.confirm(args.id)
                if mine:
                    tokens.put(ns, award["wo"], award["token"])
                return {"auction": args.id, "confirmed": True, "wo": award["wo"],
                        "token": award["token"]}  # fmt: skip
            if name == "show":
                return to_json_safe(await auctions.show(args.id))
            return to_json_safe(await auctions.list(args.phase))

        return act

    return make


ACTIONS: dict[str, Make] = {
    "open": _open,
    "bid": _bid,
    "commit": _commit,
    "reveal": _reveal,
    "withdraw": _simple("withdraw"),
    "confirm": _simple("confirm"),
    "show": _simple("show"),
    "list": _simple("list"),
}


def _key(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise UsageError(f"{text!r} is not an agent key (64 hex digits)")
    return key


def _rep(name: str) -> Make:
    def make(args: argparse.Namespace, tokens: Tokens, ns: str) -> Any:
        agent = _key(args.agent)

        async def act(ledger: Ledger) -> Any:
            reputation = Reputation(ledger.client, ns)
            if name == "show":
                return to_json_safe(await reputation.show(agent))
            assert agent is not None
            if name == "vouch":
                value = await reputation.vouch(agent, args.weight, args.reason)
                return {"for": args.agent, "weight": args.weight, "value": value}
            return {"for": args.agent, "unlocked": await reputation.revoke(agent)}

        return act

    return make


REP_ACTIONS: dict[str, Make] = {
    "show": _rep("show"),
    "vouch": _rep("vouch"),
    "revoke": _rep("revoke"),
}
