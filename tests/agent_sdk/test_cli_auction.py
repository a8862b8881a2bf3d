"""``formicary auction`` past its ``--timeout``: the writes that land after their
command gave up, which a shell agent finds with the command it was told (the rest,
as for every write command, in test_cli_wo.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import trio

from agent_sdk.auctions import Auctions
from agent_sdk.cli_wo import Tokens
from agent_sdk.client import Delivery, RelayClient
from agent_sdk.directory import Directory
from agent_sdk.identity import Identity
from tests.agent_sdk.shell import run_cli
from tests.conftest import RunningRelay, identity
from tests.federation.fixtures import LyingRelay, plan, start

NS = "work@local"
HOUR = 3_600_000
DURATION = 600_000
"""The auctions' bidding time: longer than a test runs, so every bid lands before the
deadline; the test moves the relay's clock past it (:func:`later`)."""


async def formicary(url: str, key: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return await run_cli({**os.environ, "FORMICARY_RELAY": url, "FORMICARY_KEY": str(key)}, *args)


def later(relay: RunningRelay, ms: int) -> None:
    """Move ``relay``'s clock ``ms`` on (forward, as a wall clock goes): a deadline that
    far away has passed for every decision from now on, with nobody sleeping."""
    clock = relay.node.wall_ms
    relay.node.wall_ms = lambda: clock() + ms


def bidder(tmp_path: Path) -> tuple[Identity, Path]:
    """The CLI's agent: its key, saved where ``FORMICARY_KEY`` points."""
    key = Identity.generate()
    key.save(tmp_path / "k.key")
    return key, tmp_path / "k.key"


async def test_a_sealed_bid_that_lands_after_its_commit_gave_up_is_revealed_with_the_salt_it_told(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The salt of a sealed bid was drawn by the SDK and printed only with the answer:
    a commit queued for an unreachable home, given up after --timeout, lost it, and
    the commitment that landed later could never be revealed (its stake forfeited in
    part at the close). The command tells the salt when it gives up, and that salt
    reveals the commitment once it has landed."""
    relays = plan(tmp_path, "a", "b")  # b is the home of x@b
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    me, key = bidder(tmp_path)
    async with RelayClient.connect(b.url, identity(1)) as requester:
        opened = await Auctions(requester, "x@b").open(
            title="port the lexer", duration_ms=DURATION, sealed=True, reveal_ms=HOUR
        )
    async with RelayClient.connect(b.url, me) as client:
        await Directory(client, "x@b").join("bidder", heartbeat_ms=HOUR)  # online to bid
    auction = opened["auction"]
    b.scope.cancel()  # b is down: a queues the commit for it
    a = await start(nursery, relays["a"], (relays["b"].peer(),))
    done = await formicary(
        a.url, key, "auction", "commit", auction, "--stake", "5", "--price", "7",
        "--ns", "x@b", "--timeout", "1s",
    )  # fmt: skip
    said = done.stderr.decode().replace("\n", " ")
    assert done.returncode == 1 and done.stdout == b"", said
    assert "the home relay of x@b cannot be reached now" in said
    assert f"check with `formicary auction show {auction} --ns x@b` before writing it" in said
    [salt] = re.findall(r"its salt is ([0-9a-f]{64})", said)
    reveal = f"formicary auction reveal {auction} --price 7 --salt {salt} --ns x@b"
    assert f"`{reveal}` reveals it" in said and f"pass --salt {salt} with the same --price" in said

    b = await start(nursery, relays["b"], (relays["a"].peer(),))  # a delivers the commit
    with trio.fail_after(60):
        async with (
            RelayClient.connect(b.url, me) as client,
            client.subscribe("x@b", start=1, kinds=["auction.committed"]) as feed,
        ):
            async for item in feed:
                if isinstance(item, Delivery):
                    break
    later(b, DURATION)  # past the deadline: the reveal window is open
    done = await formicary(b.url, key, *reveal.split()[1:])
    assert done.returncode == 0, done.stderr.decode()
    async with RelayClient.connect(b.url, me) as client:
        [bid] = (await Auctions(client, "x@b").show(auction))["bids"]
    assert (bid["bidder"], bid["stake"], bid["price"], bid["revealed"]) == (
        me.public_key,
        5,
        7,
        True,
    )


async def test_a_commit_sent_again_with_the_salt_told_is_revealed_with_it(
    relay: RunningRelay, tmp_path: Path
) -> None:
    """`--salt` commits with the salt an earlier commit told: sent again so, the bid is
    the same commitment, whichever of the two lands last, and that salt reveals it. A
    salt the relay would not take at the reveal is refused before anything is sent."""
    me, key = bidder(tmp_path)
    async with RelayClient.connect(relay.url, identity(1)) as requester:
        opened = await Auctions(requester, NS).open(title="t", duration_ms=DURATION, sealed=True)
    async with RelayClient.connect(relay.url, me) as client:
        await Directory(client, NS).join("bidder", heartbeat_ms=HOUR)
    auction, salt = opened["auction"], "5a" * 16
    commit = ["auction", "commit", auction, "--stake", "5", "--price", "7", "--ns", NS]
    for _ in range(2):
        done = await formicary(relay.url, key, *commit, "--salt", salt, "--json")
        assert done.returncode == 0, done.stderr.decode()
        assert json.loads(done.stdout)["salt"] == salt
    for bad in ("5a" * 15, "nothex"):
        done = await formicary(relay.url, key, *commit, "--salt", bad)
        assert done.returncode == 2, done.stderr.decode()
        assert f"--salt {bad!r}: a salt is 16 to 64 bytes in hex" in done.stderr.decode()
    later(relay, DURATION)
    reveal = ["auction", "reveal", auction, "--price", "7", "--salt", salt, "--ns", NS]
    done = await formicary(relay.url, key, *reveal)
    assert done.returncode == 0, done.stderr.decode()


async def test_an_award_confirmed_after_its_command_gave_up_shows_in_auction_show(
    nursery: trio.Nursery, relay: RunningRelay, tmp_path: Path
) -> None:
    """`auction confirm` reads the award before it confirms it, so a home out of reach
    fails it at once (a query is not queued); its confirm can still go unanswered (the
    answer lost on the way back, here). It gives up after --timeout, and the command it
    names shows the award confirmed, with the token it could not keep; the same
    command run again keeps it."""
    me, key = bidder(tmp_path)
    async with RelayClient.connect(relay.url, identity(1)) as requester:
        opened = await Auctions(requester, NS).open(title="t", duration_ms=DURATION)
    auction = opened["auction"]
    async with RelayClient.connect(relay.url, me) as client:
        await Directory(client, NS).join("bidder", heartbeat_ms=HOUR)
        await Auctions(client, NS).bid(auction, 5, price=3)
        later(relay, DURATION)
        await Directory(client, NS).join("bidder", heartbeat_ms=HOUR)  # (the timer runs)
        award = await Auctions(client, NS).wait_award(auction)
    assert award is not None and award["agent"] == me.public_key
    liar = LyingRelay(relay.url, lambda frame: frame, tamper_ack=lambda ack: None)
    await nursery.start(liar.run)
    confirm = ["auction", "confirm", auction, "--ns", NS, "--timeout", "1s"]
    done = await formicary(liar.url, key, *confirm)
    said = done.stderr.decode().replace("\n", " ")
    assert done.returncode == 1 and done.stdout == b"", said
    assert (
        "formicary auction confirm: the write is not confirmed after 1s; it may still be"
        f" queued and land later: check with `formicary auction show {auction} --ns {NS}`"
        " before writing it again"
    ) in said
    done = await formicary(relay.url, key, "auction", "show", auction, "--ns", NS, "--json")
    assert done.returncode == 0, done.stderr.decode()
    shown = json.loads(done.stdout)
    assert (shown["phase"], shown["token"]) == ("confirmed", award["token"])
    tokens = Tokens(tmp_path, me.id, relay.node.identity.public_key.hex())
    assert tokens.kept(NS, award["wo"], None) is None
    # Run again, it sends no second confirm (the relay would refuse it: not_holder),
    # and keeps the token of the one that landed.
    done = await formicary(relay.url, key, *confirm, "--json")
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["token"] == award["token"]
    assert tokens.kept(NS, award["wo"], None) == award["token"]


async def test_a_commit_the_relay_refused_outright_tells_no_salt(
    relay: RunningRelay, tmp_path: Path
) -> None:
    """An error that refuses the event itself (here `not_home`: no relay is home of
    the namespace) is the relay's answer: nothing of that commit can land, so the
    salt is not told as one to keep."""
    _, key = bidder(tmp_path)
    commit = ["auction", "commit", "auc-1", "--stake", "5", "--price", "7"]
    done = await formicary(relay.url, key, *commit, "--ns", "x@elsewhere")
    said = done.stderr.decode()
    assert done.returncode != 0 and "not_home" in said, said
    assert "may still land" not in said and "salt" not in said, said
