"""``formicary wo`` as a shell agent runs it: one bash script, real processes, exit codes."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from agent_sdk.auctions import Auctions
from agent_sdk.cli_wo import Tokens
from agent_sdk.client import RelayClient
from agent_sdk.decisions import Decisions
from agent_sdk.identity import Identity
from agent_sdk.ledger import Ledger
from relay.coordination.leases import TtlBounds
from relay.node import RelayConfig
from tests.agent_sdk.shell import exit_codes, run_shell
from tests.conftest import RunningRelay, identity, start_relay
from tests.federation.fixtures import plan, start

MINUTE = 60_000

SCRIPT = r"""
set -u
f() { "$PYTHON" -m agent_sdk.cli "$@"; }
other() { FORMICARY_KEY=$OTHER_KEY "$PYTHON" -m agent_sdk.cli "$@"; }
id=$(f wo create --title "fix the parser" --acceptance "tests pass" --priority 3 --json \
     | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["wo"])') || exit 10
f wo list --status open --json > open.json || exit 11
f wo claim "$id" --ttl 10m --json > claim.json || exit 12
f wo renew "$id" --ttl 20m > /dev/null || exit 13
f wo note "$id" "found it in lexer.py" || exit 14
other wo claim "$id" 2> other-claim.err; echo "other-claim=$?" > codes.txt
f wo claim "$id" 2> own-claim.err; echo "own-claim=$?" >> codes.txt
echo "the bug is in lexer.py: tokens over 64 KiB" | other context put --wo "$id"
echo "other-put=$?" >> codes.txt
echo "the bug is in lexer.py: tokens over 64 KiB" | f context put --wo "$id" || exit 15
f wo release "$id" || exit 16
f wo update "$id" --status done || exit 17
other context pull --wo "$id" > pulled.txt 2> header.txt || exit 18
other wo show "$id" --json > show.json || exit 19
f bulletin post "fixed the parser ($id)" || exit 20
other bulletin list --json > bulletin.json || exit 21
f decision add --title "lexer limits" --decision "cap tokens at 64 KiB" --json > adr.json || exit 22
other decision list --json > decisions.json || exit 23
f wo update "$id" --status done; echo "done-twice=$?" >> codes.txt
f context put --wo "$id" < /dev/null; echo "empty-context=$?" >> codes.txt
f context put --wo "$id" --file nowhere.txt; echo "no-file=$?" >> codes.txt
f wo show wo-99; echo "missing=$?" >> codes.txt
f context pull --wo wo-99; echo "missing-context=$?" >> codes.txt
f wo claim "$id" --ttl forever; echo "bad-ttl=$?" >> codes.txt
parent=$(f wo create --title "release 2" --json \
     | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["wo"])') || exit 25
child=$(f wo create --title "changelog" --parent "$parent") || exit 26
f wo show "$child" > /dev/null || exit 27  # printed bare: the id, as README says
f wo show "$parent" --json > parent.json || exit 28
f wo update "$parent" --status done; echo "open-children=$?" >> codes.txt
exit 0
"""


async def test_the_workledger_workflow_in_a_shell_script(
    relay: RunningRelay, tmp_path: Path
) -> None:
    done = await run_shell(relay, tmp_path, SCRIPT, ns="work@local")
    assert done.returncode == 0, done.stderr.decode()

    [listed] = json.loads((tmp_path / "open.json").read_text())
    assert listed["status"] == "open" and listed["title"] == "fix the parser"
    claim = json.loads((tmp_path / "claim.json").read_text())
    assert claim["wo"] == listed["wo"] and claim["token"] == 1 and claim["expires_ms"]
    shown = json.loads((tmp_path / "show.json").read_text())
    # A work order's id has one name in every command's JSON: `wo`, as in `--wo`.
    assert shown["wo"] == listed["wo"] and "id" not in shown and "id" not in listed
    parent = json.loads((tmp_path / "parent.json").read_text())
    [child] = parent["children"]
    assert child["wo"] != parent["wo"] and "id" not in child
    assert shown["status"] == "done" and shown["holder"] is None
    assert [note["text"] for note in shown["notes"]] == ["found it in lexer.py"]
    assert [h["status"] for h in shown["history"]] == ["open", "claimed", "open", "done"]
    # The other agent reads the holder's context; its own put was refused while held.
    assert (tmp_path / "pulled.txt").read_text() == "the bug is in lexer.py: tokens over 64 KiB\n\n"
    assert f"context {listed['wo']} v1 of 1" in (tmp_path / "header.txt").read_text()
    [post] = json.loads((tmp_path / "bulletin.json").read_text())
    assert post["text"] == f"fixed the parser ({listed['wo']})" and post["n"] == 1
    adr = json.loads((tmp_path / "adr.json").read_text())
    [decision] = json.loads((tmp_path / "decisions.json").read_text())
    assert decision["id"] == adr["id"] and decision["status"] == "accepted"
    # Its own claim asked again is held too, and said to be its own, with the token.
    claim_token = json.loads((tmp_path / "claim.json").read_text())["token"]
    own = (tmp_path / "own-claim.err").read_text()
    assert f"it is this key's own lease (token {claim_token})" in own, own
    assert "own lease" not in (tmp_path / "other-claim.err").read_text()
    codes = exit_codes(tmp_path)
    assert codes == {
        "other-claim": "3",
        "own-claim": "3",
        "other-put": "3",
        "done-twice": "3",
        "missing": "4",
        "missing-context": "4",
        "bad-ttl": "2",
        "open-children": "3",
        "empty-context": "2",  # (stdin at /dev/null stored an empty handoff)
        "no-file": "2",
    }
    assert "held by" in (tmp_path / "other-claim.err").read_text()
    assert "the document is empty (stdin gave nothing)" in done.stderr.decode()


def test_kept_tokens_survive_parallel_commands(tmp_path: Path) -> None:
    import threading

    from agent_sdk.cli_wo import Tokens

    def agent(n: int) -> None:
        tokens = Tokens(tmp_path, f"agent-{n % 2}", "ws://r")  # its own, as a separate process
        for i in range(25):
            tokens.put("work@local", f"wo-{n}-{i}", i + 1)

    threads = [threading.Thread(target=agent, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    kept = json.loads((tmp_path / "tokens.json").read_text())
    assert len(kept) == 200


def test_a_token_is_forgotten_or_renewed_only_while_it_is_the_one_kept(
    tmp_path: Path,
) -> None:
    """`wo update` or `wo release` refused for a kept token forgets it, and `wo renew`
    keeps the renewed token; a `wo claim` run in parallel may have kept a newer one
    meanwhile, which must stay."""
    from agent_sdk.cli_wo import Tokens

    tokens = Tokens(tmp_path, "agent", "ws://r")
    tokens.put("work@local", "wo-1", 2)
    tokens.put("work@local", "wo-1", 3)  # the parallel claim's
    assert not tokens.forget("work@local", "wo-1", 2)  # the refused command's
    assert tokens.kept("work@local", "wo-1", None) == 3
    tokens.forget("work@local", "wo-1", None)  # (a command that used no kept token)
    assert tokens.kept("work@local", "wo-1", None) == 3
    # A renewal of token 2 answered after the parallel claim kept 3: 3 stays.
    assert not tokens.put("work@local", "wo-1", 2, was=2)
    assert tokens.put("work@local", "wo-1", 3, was=3)  # its own renewal: kept
    assert tokens.kept("work@local", "wo-1", None) == 3
    assert tokens.forget("work@local", "wo-1", 3)
    assert tokens.kept("work@local", "wo-1", None) is None


LOCK_SCRIPT = r"""
set -u
lock() { "$PYTHON" -m agent_sdk.cli lock "$@"; }
lock acquire branch:main --ttl 10m --json > mine.json || exit 10
FORMICARY_KEY=$OTHER_KEY lock acquire branch:main; echo "other=$?" > codes.txt
lock list --json > list.json || exit 11
FORMICARY_RELAY=ws://127.0.0.1:9 lock release branch:main; echo "unreachable=$?" >> codes.txt
lock renew branch:main || exit 12
lock release branch:main || exit 13
FORMICARY_KEY=$OTHER_KEY lock acquire branch:main --json > theirs.json || exit 14
lock release branch:main; echo "not-mine=$?" >> codes.txt
exit 0
"""


async def test_locks_from_a_shell_script(relay: RunningRelay, tmp_path: Path) -> None:
    done = await run_shell(relay, tmp_path, LOCK_SCRIPT)
    assert done.returncode == 0, done.stderr.decode()
    mine = json.loads((tmp_path / "mine.json").read_text())
    [listed] = json.loads((tmp_path / "list.json").read_text())
    assert listed["lock"] == "branch:main" and listed["token"] == mine["token"]
    assert json.loads((tmp_path / "theirs.json").read_text())["token"] == 2
    codes = exit_codes(tmp_path)
    # Not reached, the lock is still held: its token is kept for the renew after it.
    assert codes == {"other": "3", "unreachable": "1", "not-mine": "2"}


LEASE_NAMES_SCRIPT = r"""
set -u
f() { "$PYTHON" -m agent_sdk.cli "$@"; }
f wo create --title "t" > /dev/null || exit 10
f wo claim wo-1 --json > claim.json || exit 11
f wo show wo-1 --json > show.json || exit 12
f lock acquire branch:main --json > lock.json || exit 13
f lock list --json > locks.json || exit 14
exit 0
"""


async def test_a_lease_is_named_alike_by_every_command(relay: RunningRelay, tmp_path: Path) -> None:
    """Grants printed ``fencing_token`` and ``expires_at`` and reads (and the protocol)
    ``token`` and ``expires_ms``: a script that read a claim's expiry from ``wo show``
    with the name ``wo claim`` printed got nothing."""
    done = await run_shell(relay, tmp_path, LEASE_NAMES_SCRIPT, ns="work@local")
    assert done.returncode == 0, done.stderr.decode()
    claim = json.loads((tmp_path / "claim.json").read_text())
    shown = json.loads((tmp_path / "show.json").read_text())
    lock = json.loads((tmp_path / "lock.json").read_text())
    [listed] = json.loads((tmp_path / "locks.json").read_text())
    assert (claim["token"], claim["expires_ms"]) == (shown["token"], shown["expires_ms"])
    assert (lock["token"], lock["expires_ms"]) == (listed["token"], listed["expires_ms"])
    printed = json.dumps([claim, shown, lock, listed])
    assert "fencing_token" not in printed and "expires_at" not in printed


SHARED_FOLDER_SCRIPT = r"""
set -u
lock() { "$PYTHON" -m agent_sdk.cli lock "$@"; }
neighbour() { FORMICARY_KEY=me/neighbour.key "$PYTHON" -m agent_sdk.cli lock "$@"; }
lock acquire branch:dev --ttl 10m > /dev/null || exit 10
neighbour release branch:dev; echo "neighbour=$?" > codes.txt
lock release branch:dev; echo "mine=$?" >> codes.txt
echo '[]' > me/tokens.json
lock acquire branch:other; echo "bad-file=$?" >> codes.txt
FORMICARY_KEY=$OTHER_KEY lock acquire branch:other > /dev/null || exit 11
exit 0
"""


async def test_keys_sharing_a_folder_keep_their_own_tokens(
    relay: RunningRelay, tmp_path: Path
) -> None:
    """Tokens are kept next to the key; two keys in one folder must not lose each
    other's (a refused release forgets the token it used: it was its own)."""
    done = await run_shell(relay, tmp_path, SHARED_FOLDER_SCRIPT)
    assert done.returncode == 0, done.stderr.decode()
    # A token file that is not one is refused before anything is taken: the lock
    # stayed free for the other agent.
    assert exit_codes(tmp_path) == {"neighbour": "2", "mine": "0", "bad-file": "2"}


DIR_SCRIPT = r"""
set -u
d() { "$PYTHON" -m agent_sdk.cli dir "$@"; }
d join --name indexer --capability python@3.11 --capability search --role worker \
  --json > me.json || exit 10
FORMICARY_KEY=$OTHER_KEY d join --name planner --capability python@3.12 --heartbeat 1h || exit 11
d list --json > online.json || exit 12
d find python@3.11 --json > found.json || exit 13
FORMICARY_KEY=$OTHER_KEY d leave || exit 14
FORMICARY_KEY=$OTHER_KEY d leave; echo "leave-twice=$?" > codes.txt
d list --all --json > all.json || exit 15
d join --name x --capability "Not A Tag"; echo "bad-cap=$?" >> codes.txt
exit 0
"""


async def test_the_directory_from_a_shell_script(relay: RunningRelay, tmp_path: Path) -> None:
    done = await run_shell(relay, tmp_path, DIR_SCRIPT, ns="crew@local")
    assert done.returncode == 0, done.stderr.decode()
    me = json.loads((tmp_path / "me.json").read_text())
    assert me["presence"] == "heartbeat" and me["capabilities"] == ["python@3.11", "search"]
    assert [p["name"] for p in json.loads((tmp_path / "online.json").read_text())] == [
        "indexer",
        "planner",
    ]
    assert [p["name"] for p in json.loads((tmp_path / "found.json").read_text())] == ["indexer"]
    everyone = json.loads((tmp_path / "all.json").read_text())
    assert [(p["name"], p["online"]) for p in everyone] == [("indexer", True), ("planner", False)]
    codes = exit_codes(tmp_path)
    assert codes == {"leave-twice": "4", "bad-cap": "2"}


AUCTION_SCRIPT = r"""
set -u
f() { "$PYTHON" -m agent_sdk.cli "$@"; }
other() { FORMICARY_KEY=$OTHER_KEY "$PYTHON" -m agent_sdk.cli "$@"; }
f dir join --name requester || exit 10
other dir join --name bidder --capability rust || exit 11
f auction open --title "port the lexer" --duration 1h --capability rust --json > open.json \
  || exit 12
id=$("$PYTHON" -c 'import json; print(json.load(open("open.json"))["auction"])')
other auction bid "$id" --stake 30 --price 12 --json > bid.json || exit 13
f auction bid "$id" --stake 1 --price 1; echo "own=$?" > codes.txt
other auction bid "$id" --stake 500 --price 1; echo "short=$?" >> codes.txt
f auction show "$id" --json > show.json || exit 14
other auction withdraw "$id" --json > withdraw.json || exit 15
f auction show auc-99; echo "missing=$?" >> codes.txt
f auction list --json > list.json || exit 16
them=$(other rep show --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["agent"])')
f rep vouch "$them" --weight 10 --reason "reviewed its work" --json > vouch.json || exit 17
f rep show "$them" --json > rep.json || exit 18
f rep revoke "$them" --json > revoke.json || exit 19
f rep vouch nothex --weight 1; echo "bad-key=$?" >> codes.txt
# Real time, real processes: the bid's process must start and land before the close,
# which on a loaded machine took over 1 s (a flake seen with --duration 1s).
f auction open --title "quick" --duration 5s --capability rust --json > quick.json || exit 20
qid=$("$PYTHON" -c 'import json; print(json.load(open("quick.json"))["auction"])')
other auction bid "$qid" --stake 5 --price 2 > /dev/null || exit 21
exit 0
"""

CONFIRM_SCRIPT = r"""
set -u
other() { FORMICARY_KEY=$OTHER_KEY "$PYTHON" -m agent_sdk.cli "$@"; }
other auction confirm $QID --json > confirm.json || exit 22
wo=$("$PYTHON" -c 'import json; print(json.load(open("confirm.json"))["wo"])')
other auction show $QID --json > awarded.json || exit 23
other wo update "$wo" --status done || exit 24  # with the token confirm kept
"""


async def test_auctions_from_a_shell_script(relay: RunningRelay, tmp_path: Path) -> None:
    done = await run_shell(relay, tmp_path, AUCTION_SCRIPT, ns="market@local")
    assert done.returncode == 0, done.stderr.decode()
    quick = json.loads((tmp_path / "quick.json").read_text())["auction"]
    async with RelayClient.connect(relay.url, identity(9)) as client:
        await Auctions(client, "market@local").wait_award(quick)  # the relay's timer
    script = CONFIRM_SCRIPT.replace("$QID", quick)
    done = await run_shell(relay, tmp_path, script, ns="market@local")
    assert done.returncode == 0, done.stderr.decode()
    opened = json.loads((tmp_path / "open.json").read_text())
    assert opened["auction"] == "auc-1" and opened["wo"] == "wo-1"
    bid = json.loads((tmp_path / "bid.json").read_text())
    assert (bid["stake"], bid["price"]) == (30, 12)
    shown = json.loads((tmp_path / "show.json").read_text())
    assert shown["phase"] == "open" and [b["stake"] for b in shown["bids"]] == [30]
    assert json.loads((tmp_path / "withdraw.json").read_text())["unlocked"] == 30
    [listed] = json.loads((tmp_path / "list.json").read_text())
    assert listed["auction"] == "auc-1"
    codes = exit_codes(tmp_path)
    assert codes == {"own": "3", "short": "3", "missing": "4", "bad-key": "2"}
    assert json.loads((tmp_path / "vouch.json").read_text())["value"] == 0  # no score yet
    [vouch] = json.loads((tmp_path / "rep.json").read_text())["vouched_by"]
    assert vouch["weight"] == 10 and vouch["reason"] == "reviewed its work"
    assert json.loads((tmp_path / "revoke.json").read_text())["unlocked"] == 10
    # The award's order and token by one name each in confirm's answer and show's.
    confirmed = json.loads((tmp_path / "confirm.json").read_text())
    awarded = json.loads((tmp_path / "awarded.json").read_text())
    assert confirmed["token"] == awarded["token"] and awarded["wo"] == confirmed["wo"]
    assert "id" not in confirmed


APPROVAL = r"""
set -u
f() { "$PYTHON" -m agent_sdk.cli "$@"; }
human() { FORMICARY_KEY=$OTHER_KEY "$PYTHON" -m agent_sdk.cli "$@"; }
human keygen --out "$OTHER_KEY" > human.json || exit 10
key=$("$PYTHON" -c 'import json; print(json.load(open("human.json"))["id"])')
id=$(f wo create --title "rotate the prod key" --requires-approval "touches credentials" \
     --approver "$key" --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["wo"])') \
     || exit 11
f wo claim "$id" > /dev/null || exit 12
f wo update "$id" --status done; echo "done-early=$?" > codes.txt
f wo update "$id" --status awaiting_approval --reason "ready" || exit 13
f wo list --status awaiting_approval --json > waiting.json || exit 14
f wo approve "$id"; echo "self-approve=$?" >> codes.txt
f wo wait "$id" --json > decision.json &
waiter=$!
human wo approve "$id" --comment "rotated keys are backed up" || exit 15
wait $waiter || exit 16
f wo claim "$id" > /dev/null || exit 17
f wo update "$id" --status done || exit 18
f wo create --title x --requires-approval why; echo "no-approver=$?" >> codes.txt
exit 0
"""


async def test_approvals_from_a_shell(relay: RunningRelay, tmp_path: Path) -> None:
    done = await run_shell(relay, tmp_path, APPROVAL, ns="ops@local")
    assert done.returncode == 0, done.stderr.decode()
    assert exit_codes(tmp_path) == {"done-early": "3", "self-approve": "3", "no-approver": "2"}
    [waiting] = json.loads((tmp_path / "waiting.json").read_text())
    assert waiting["status"] == "awaiting_approval"
    assert waiting["approval"]["reason"] == "touches credentials"
    assert waiting["wo"] == "wo-1"
    decision = json.loads((tmp_path / "decision.json").read_text())
    assert decision["wo"] == "wo-1"
    assert decision["approved"] is True and decision["comment"] == "rotated keys are backed up"


CONFLICTS = r"""
set -u
f() { "$PYTHON" -m agent_sdk.cli "$@"; }
human() { FORMICARY_KEY=$OTHER_KEY "$PYTHON" -m agent_sdk.cli "$@"; }
rival() { FORMICARY_KEY=rival.key "$PYTHON" -m agent_sdk.cli "$@"; }
rival keygen --out rival.key > /dev/null || exit 10
f decision add --title price --decision "10 EUR" --entity sku-1 --json > a.json || exit 11
rival decision add --title price --decision "12 EUR" --entity sku-1 --json > b.json || exit 12
f conflict list --status open --json > open.json || exit 13
f conflict resolve cf-1 adr-1 --json > proposal.json || exit 14
human conflict resolve cf-1 adr-2 --note "list price" --json > resolved.json || exit 15
f decision list --entity sku-1 --json > on.json || exit 16
f conflict resolve cf-1 adr-1; echo "closed=$?" > codes.txt
f conflict resolve cf-9 adr-1; echo "missing=$?" >> codes.txt
f decision add --title t --decision d --entity ""; echo "empty-entity=$?" >> codes.txt
exit 0
"""


async def test_conflicting_decisions_from_a_shell(relay: RunningRelay, tmp_path: Path) -> None:
    me, human = Identity.generate(), Identity.generate()
    for who, path in ((me, "me"), (human, "other")):
        (tmp_path / path).mkdir()
        who.save(tmp_path / path / "agent.key")
    async with RelayClient.connect(relay.url, me) as owner:  # the namespace's owner
        ladder = {"approvers": [human.public_key]}
        await Decisions(owner, "shop@local").set_policy(conflicts=ladder)
    done = await run_shell(relay, tmp_path, CONFLICTS, ns="shop@local")
    assert done.returncode == 0, done.stderr.decode()
    assert exit_codes(tmp_path) == {"closed": "3", "missing": "4", "empty-entity": "2"}
    read = lambda name: json.loads((tmp_path / name).read_text())  # noqa: E731
    assert read("a.json")["conflict"] is None and read("b.json")["conflict"] == "cf-1"
    [listed] = read("open.json")
    assert listed["decisions"] == ["adr-1", "adr-2"]
    assert read("proposal.json")["resolved"] is False  # keeping one's own: a proposal
    assert read("resolved.json") == {"conflict": "cf-1", "keep": "adr-2", "resolved": True,
                                     "by": "human"}  # fmt: skip
    assert [d["status"] for d in read("on.json")] == ["overruled", "accepted"]


STALE_SCRIPT = r"""
set -u
f() { "$PYTHON" -m agent_sdk.cli wo "$@"; }
f update "$ID" --status done; echo "stale=$?" > codes.txt
f update "$ID" --status done; echo "again=$?" >> codes.txt
"""


async def test_a_kept_token_the_relay_refuses_is_forgotten(
    relay: RunningRelay, tmp_path: Path
) -> None:
    """A kept token whose lease ran out refuses every update of the order (the relay
    checks a token it is given): the first refusal forgets it, and says so."""
    key = Identity.generate()
    (tmp_path / "me").mkdir()
    key.save(tmp_path / "me" / "agent.key")
    async with RelayClient.connect(relay.url, key) as client:
        order = await Ledger(client, "work@local").create("t")
    Tokens(tmp_path / "me", key.id, relay.node.identity.public_key.hex()).put(
        "work@local", order, 7
    )  # a lease long gone
    done = await run_shell(relay, tmp_path, STALE_SCRIPT.replace("$ID", order), ns="work@local")
    assert done.returncode == 0, done.stderr.decode()
    assert exit_codes(tmp_path) == {"stale": "3", "again": "0"}
    assert f"the kept token of {order} is forgotten" in done.stderr.decode()
    # A renewal or a release refused for a lapsed lease forgets it too.
    async with RelayClient.connect(relay.url, key) as client:
        renewed, released = [await Ledger(client, "work@local").create(t) for t in "rs"]
    tokens = Tokens(tmp_path / "me", key.id, relay.node.identity.public_key.hex())
    for lapsed in (renewed, released):
        tokens.put("work@local", lapsed, 7)
    script = f"""
f() {{ "$PYTHON" -m agent_sdk.cli wo "$@"; }}
f renew {renewed} --ttl 1m; echo "renew=$?" > codes.txt
f release {released}; echo "release=$?" >> codes.txt
"""
    done = await run_shell(relay, tmp_path, script, ns="work@local")
    assert exit_codes(tmp_path) == {"renew": "3", "release": "3"}, done.stderr.decode()
    assert tokens.kept("work@local", renewed, None) is None
    assert tokens.kept("work@local", released, None) is None


RELAY_TTL_SCRIPT = r"""
set -u
f() { "$PYTHON" -m agent_sdk.cli "$@"; }
f wo create --title "t" > /dev/null || exit 10
f wo claim wo-1 --json > claim.json || exit 11
f lock acquire branch:main --json > lock.json || exit 12
exit 0
"""


async def test_without_ttl_the_relays_lease_applies(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The commands sent 30m and 5m whatever the relay said: refused by a relay whose
    longest lease is shorter, and longer than its own default elsewhere."""
    bounds = TtlBounds(min_ms=1000, max_ms=20 * MINUTE, default_ms=10 * MINUTE)
    config = RelayConfig(claim_ttl=bounds, lock_ttl=replace(bounds, default_ms=2 * MINUTE))
    relay = await start_relay(nursery, tmp_path / "relay", config)
    before = time.time() * 1000
    done = await run_shell(relay, tmp_path, RELAY_TTL_SCRIPT, ns="work@local")
    after = time.time() * 1000
    assert done.returncode == 0, done.stderr.decode()
    claim = json.loads((tmp_path / "claim.json").read_text())
    lock = json.loads((tmp_path / "lock.json").read_text())
    assert before + 10 * MINUTE <= claim["expires_ms"] <= after + 10 * MINUTE
    assert before + 2 * MINUTE <= lock["expires_ms"] <= after + 2 * MINUTE


def test_kept_tokens_are_kept_apart_per_relay(tmp_path: Path) -> None:
    """Every relay is `local` unless named: two relays' `wo-1` of `work@local` are two
    orders, and a token of one used on the other was refused, then forgotten. (By the
    relay's key: two addresses of one relay are one relay.) An entry of an earlier
    version, which named no relay, is read until the next write replaces it."""
    (tmp_path / "tokens.json").write_text(json.dumps({"agent/work@local/wo-9": 4}))
    first, second = Tokens(tmp_path, "agent", "aa" * 32), Tokens(tmp_path, "agent", "bb" * 32)
    first.put("work@local", "wo-1", 2)
    second.put("work@local", "wo-1", 1)
    assert first.kept("work@local", "wo-1", None) == 2
    assert second.kept("work@local", "wo-1", None) == 1
    assert first.kept("work@local", "wo-9", None) == 4  # kept before the relay was named
    assert first.put("work@local", "wo-9", 5, was=4)  # a renewal: in its place
    assert "agent/work@local/wo-9" not in json.loads((tmp_path / "tokens.json").read_text())
    assert first.forget("work@local", "wo-9", 5) and first.kept("work@local", "wo-9", None) is None


CLAIM_SCRIPT = """
"$PYTHON" -m agent_sdk.cli wo claim $ID --json; echo "claim=$?" > codes.txt
"$PYTHON" -m agent_sdk.cli wo list --json > /dev/null; echo "list=$?" >> codes.txt
"""


@pytest.mark.parametrize("damage", ["torn", "unwritable"])
async def test_a_token_file_that_cannot_be_kept_in_refuses_before_claiming(
    relay: RunningRelay, tmp_path: Path, damage: str
) -> None:
    """A claim granted and then not kept is held by nobody who knows its token, and
    each retry took another order; a torn file was read as empty and overwritten,
    losing every token kept."""
    key = Identity.generate()
    (tmp_path / "me").mkdir()
    key.save(tmp_path / "me" / "agent.key")
    async with RelayClient.connect(relay.url, key) as client:
        order = await Ledger(client, "work@local").create("t")
    if damage == "torn":
        (tmp_path / "me" / "tokens.json").write_text('{"x": 1,')
    else:
        (tmp_path / "me" / "tokens.lock").mkdir()  # (root may write anywhere: not chmod)
    done = await run_shell(relay, tmp_path, CLAIM_SCRIPT.replace("$ID", order), ns="work@local")
    # A read keeps nothing: it needs the file readable only (a read-only key folder).
    listed = "2" if damage == "torn" else "0"
    assert exit_codes(tmp_path) == {"claim": "2", "list": listed}, done.stderr.decode()
    assert "tokens" in done.stderr.decode()
    async with RelayClient.connect(relay.url, key) as client:
        (shown,) = [o for o in await Ledger(client, "work@local").list() if o["id"] == order]
    assert shown["status"] == "open"  # not claimed: nothing asked of the relay
    if damage == "torn":
        assert (tmp_path / "me" / "tokens.json").read_text() == '{"x": 1,'


async def test_lock_renew_forgets_a_token_whose_lock_is_over(
    relay: RunningRelay, tmp_path: Path
) -> None:
    """As `wo renew` does; it kept the stale token, refused again on every renew. And
    with nothing kept it names the lock and `acquire`, not an entry `lock:NAME`."""
    key = Identity.generate()
    (tmp_path / "me").mkdir()
    key.save(tmp_path / "me" / "agent.key")
    async with RelayClient.connect(relay.url, identity(5)) as client:
        await Ledger(client, "work@local").lock("branch:main", 60_000)  # someone else's
    tokens = Tokens(tmp_path / "me", key.id, relay.node.identity.public_key.hex())
    tokens.put("work@local", "lock:branch:main", 7)  # from a lease long gone
    script = """
f() { "$PYTHON" -m agent_sdk.cli lock "$@"; }
f renew branch:main; echo "stale=$?" > codes.txt
f renew nothing-held; echo "none=$?" >> codes.txt
"""
    done = await run_shell(relay, tmp_path, script)
    assert exit_codes(tmp_path) == {"stale": "3", "none": "2"}, done.stderr.decode()
    assert tokens.kept("work@local", "lock:branch:main", None) is None
    assert "no token kept for nothing-held: acquire it first" in done.stderr.decode()


NS = "x@b"


@pytest.mark.parametrize(
    ("command", "told"),
    [
        (
            ["publish", NS, "app.note", "--body", '"kept"'],
            "formicary publish: the event is not confirmed after 1s; it may still be queued"
            " and land later: check with `formicary tail x@b` before writing it again",
        ),
        (
            ["wo", "create", "--title", "kept", "--ns", NS],
            "formicary wo create: the write is not confirmed after 1s; it may still be queued"
            " and land later: check with `formicary wo list --ns x@b` before writing it again",
        ),
        (
            ["wo", "claim", "wo-1", "--ns", NS],
            # (A lease request is kept: its rerun asks again, tests/agent_sdk/test_cli_pending.py)
            "running the same command again asks for this same request's answer (not a new"
            " lease: a grant's token is then kept), or check with"
            " `formicary wo show wo-1 --ns x@b`",
        ),
        (
            ["lock", "acquire", "branch:main", "--ns", NS],
            "asks for this same request's answer (not a new lease: a grant's token is then"
            " kept), or check with `formicary lock list --ns x@b`",
        ),
        (
            ["context", "put", "--wo", "wo-1", "--ns", NS, "--file", "handoff.md"],
            "check with `formicary context pull --wo wo-1 --ns x@b` before writing it again",
        ),
        (
            ["ckpt", "set", "reader", "7", "--ns", NS],
            "check with `formicary ckpt get reader --ns x@b` before writing it again",
        ),
        *(
            (
                [*command.split(), "--ns", NS],
                f"formicary {' '.join(command.split()[:2])}: the write is not confirmed after"
                " 1s; it may still be queued and land later: check with"
                f" `formicary {check} --ns x@b` before writing it again",
            )
            for command, check in [
                ("auction open --title kept", "auction list"),
                ("auction bid auc-1 --stake 5 --price 7", "auction show auc-1"),
                ("auction commit auc-1 --stake 5 --price 7", "auction show auc-1"),
                (f"auction reveal auc-1 --price 7 --salt {'ab' * 32}", "auction show auc-1"),
                ("auction withdraw auc-1", "auction show auc-1"),
                (f"rep vouch {'cd' * 32} --weight 3", f"rep show {'cd' * 32}"),
                (f"rep revoke {'cd' * 32}", f"rep show {'cd' * 32}"),
                ("dir join --name kept", "dir list --all"),
                ("dir leave", "dir list --all"),
                ("ns policy listed", "ns show"),
            ]
        ),
    ],
)
async def test_a_write_the_home_never_confirms_gives_up_after_its_timeout(
    nursery: trio.Nursery, tmp_path: Path, command: list[str], told: str
) -> None:
    """A write the relay queued (its namespace's home is down) waited for the home's
    answer without a limit: a shell agent's command never ended. It gives up after
    --timeout (30 s by default, as `doc set`'s) with status 1, saying that the write
    may still land and which command shows whether it did. (`auction confirm` reads
    the award first, and a query for a home out of reach fails at once: its case is
    in test_cli_auction.py, with the salt `auction commit` tells as it gives up.)"""
    relays = plan(tmp_path, "a", "b")  # b, the home of x@b, is never started
    a = await start(nursery, relays["a"], (relays["b"].peer(),))
    env = {**os.environ, "FORMICARY_RELAY": a.url, "FORMICARY_KEY": str(tmp_path / "k.key")}
    (tmp_path / "handoff.md").write_text("the bug is in lexer.py")
    with trio.fail_after(60):  # (not a timing check: only that it ends)
        done = await trio.run_process(
            [sys.executable, "-m", "agent_sdk.cli", *command, "--timeout", "1s"],
            cwd=tmp_path,
            env=env,
            check=False,
            capture_stdout=True,
            capture_stderr=True,
        )
    said = done.stderr.decode()
    assert done.returncode == 1, said
    assert "the home relay of x@b cannot be reached now" in said  # the relay holds it
    assert told + " (or wait longer with --timeout)" in said.replace("\n", " "), said
    assert done.stdout == b""


@pytest.mark.parametrize(
    "command",
    [
        ["publish", NS, "app.note"],
        ["wo", "create", "--title", "t"],
        *(
            command.split()
            for command in [
                "auction open --title t",
                "auction bid auc-1 --stake 5 --price 7",
                "auction commit auc-1 --stake 5 --price 7",
                f"auction reveal auc-1 --price 7 --salt {'ab' * 32}",
                "auction withdraw auc-1",
                "auction confirm auc-1",
                f"rep vouch {'cd' * 32} --weight 3",
                f"rep revoke {'cd' * 32}",
                "dir join --name t",
                "dir leave",
                "ns policy listed",
            ]
        ),
    ],
)
async def test_a_timeout_that_is_no_duration_is_a_usage_error(
    tmp_path: Path, command: list[str]
) -> None:
    env = {
        **os.environ,
        "FORMICARY_RELAY": "ws://127.0.0.1:9",
        "FORMICARY_KEY": str(tmp_path / "k"),
    }
    for timeout in ("soon", "0s"):
        done = await trio.run_process(
            [sys.executable, "-m", "agent_sdk.cli", *command, "--timeout", timeout],
            env=env,
            check=False,
            capture_stderr=True,
        )
        assert done.returncode == 2, done.stderr.decode()
        assert f"--timeout {timeout!r}" in done.stderr.decode()
