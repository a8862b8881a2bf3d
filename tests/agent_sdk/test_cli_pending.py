"""A lease command that gave up waiting (``--timeout``) is asked again by its rerun:
the same request, answered with its first outcome (agent_sdk/cli_pending.py)."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from agent_sdk.cli_pending import PendingRequests
from agent_sdk.cli_wo import Tokens
from agent_sdk.client import Delivery, RelayClient
from agent_sdk.identity import Identity
from agent_sdk.ledger import Claim, Ledger
from relay.coordination.leases import TtlBounds
from relay.node import RelayConfig
from tests.agent_sdk.shell import run_cli as formicary
from tests.conftest import RunningRelay, identity, start_relay
from tests.federation.fixtures import plan, start

NS = "x@b"  # homed on relay b
DAY_MS = 24 * 3600 * 1000


def agent_env(tmp_path: Path, relay: str, ns: str) -> dict[str, str]:
    return {
        **os.environ,
        "FORMICARY_RELAY": relay,
        "FORMICARY_KEY": str(tmp_path / "me" / "agent.key"),
        "FORMICARY_NS": ns,
    }


def me(tmp_path: Path) -> Identity:
    """The agent's key (made by its first command, or here)."""
    path = tmp_path / "me" / "agent.key"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        Identity.generate().save(path)
    return Identity.load(path)


def pending_entries(tmp_path: Path) -> list[dict[str, Any]]:
    return list(json.loads((tmp_path / "me" / "pending.json").read_text()).values())


def pending_of(relay: RunningRelay, tmp_path: Path) -> PendingRequests:
    """The CLI agent's pending requests at ``relay`` (its key made here if not yet)."""
    return PendingRequests(tmp_path / "me", me(tmp_path).id, relay.node.identity.public_key.hex())


def kept(pending: PendingRequests, entry: str) -> int | None:
    """The token the agent keeps for ``entry`` of work@local at that relay."""
    return Tokens(pending.path.parent, pending.agent, pending.relay).kept("work@local", entry, None)


def in_use(tmp_path: Path) -> list[Path]:
    """The files that mark a pending request's command running: none once answered."""
    return list((tmp_path / "me").glob("pending.*.lock"))


LATE = {
    # command, its ledger entry in tokens.json, the records up to its outcome at the
    # home, what then ends the lease without --token (finding the kept token)
    "claim": (["wo", "claim", "wo-1"], "wo-1", 4, ["wo", "update", "wo-1", "--status", "done"]),
    "next": (["wo", "next"], "wo-1", 4, ["wo", "update", "wo-1", "--status", "done"]),
    "acquire": (
        ["lock", "acquire", "branch:main"],
        "lock:branch:main",
        2,
        ["lock", "release", "branch:main"],
    ),
}


@pytest.mark.parametrize("case", LATE)
async def test_a_lease_granted_after_its_command_gave_up_is_had_by_a_rerun(
    nursery: trio.Nursery, tmp_path: Path, case: str
) -> None:
    """The namespace's home is down: the request is queued and the command gives up.
    The home comes back and grants it. The rerun was a new request, refused `held` by
    the agent's own lease (a claim, a lock) or taking another order (`wo next`, here
    `nothing_open`): the token of the granted lease was in no file. It sends the same
    request, and the relay answers it with the grant."""
    command, entry, outcome_seq, end = LATE[case]
    relays = plan(tmp_path, "a", "b")
    a = await start(nursery, relays["a"], (relays["b"].peer(),))
    env = agent_env(tmp_path, a.url, NS)
    if command[0] == "wo":  # the order, queued before the claim (the link keeps the order)
        async with RelayClient.connect(a.url, identity(7)) as creator:
            queued = trio.Event()
            async with trio.open_nursery() as waiting:
                body = {"title": "fix the parser"}
                waiting.start_soon(
                    partial(creator.publish, NS, "wo.create", body, on_queued=queued.set)
                )
                await queued.wait()  # kept by a: from now on it is a's to deliver
                waiting.cancel_scope.cancel()

    first = await formicary(env, *command, "--timeout", "1s", "--json")
    said = first.stderr.decode().replace("\n", " ")
    assert first.returncode == 1, said
    assert "running the same command again asks for this same request's answer" in said
    [left] = pending_entries(tmp_path)
    assert left["kind"] == {"wo": f"wo.{command[1]}", "lock": "lock.acquire"}[command[0]]

    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    with trio.fail_after(60):
        await b.node.wait_beyond(NS, outcome_seq - 1)  # granted, the agent away
    rerun = await formicary(env, *command, "--json")
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert "asking the relay again for the request an earlier run sent" in rerun.stderr.decode()
    lease = json.loads(rerun.stdout)
    assert lease["token"] == 1 and lease.get("wo", lease.get("lock")) == entry.removeprefix("lock:")
    tokens = Tokens(tmp_path / "me", me(tmp_path).id, a.node.identity.public_key.hex())
    assert tokens.kept(NS, entry, None) == 1
    assert pending_entries(tmp_path) == [] and in_use(tmp_path) == []
    requests = [r.kind for r in b.node.store.scan(NS) if r.author == me(tmp_path).public_key]
    assert requests == [left["kind"]]  # one request, asked twice
    ended = await formicary(env, *end)
    assert ended.returncode == 0, ended.stderr.decode()


async def test_a_request_answered_not_now_is_kept_and_the_command_says_so(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """`home_unreachable` (the home out of reach past the outbox's deadline) says "not
    now", not "no": the request stays to be asked again, and the command says so."""
    relays = plan(tmp_path, "a", "b")
    a = await start(nursery, relays["a"], (relays["b"].peer(),), deadline_ms=1)
    env = agent_env(tmp_path, a.url, NS)
    first = await formicary(env, "wo", "claim", "wo-1")
    said = first.stderr.decode()
    assert first.returncode != 0 and "home_unreachable" in said, said
    assert "the request is kept: running the same command again asks for its answer" in said
    [left] = pending_entries(tmp_path)
    assert (left["kind"], left["body"]) == ("wo.claim", {"wo": "wo-1"})


async def test_a_request_answered_is_not_asked_again(relay: RunningRelay, tmp_path: Path) -> None:
    """Its answer, a grant or a refusal, removes the pending request: the next run of
    the same command is a new request (refused `held` here, as the agent's own lease)."""
    env = agent_env(tmp_path, relay.url, "work@local")
    async with RelayClient.connect(relay.url, identity(7)) as other:
        ledger = Ledger(other, "work@local")
        mine, theirs = [await ledger.create(title) for title in ("mine", "theirs")]
        await ledger.lock("branch:main", 60_000)
        await ledger.claim(theirs)
    for command in (
        ["wo", "claim", mine],
        ["wo", "claim", theirs],
        ["lock", "acquire", "branch:main"],
    ):
        answered = await formicary(env, *command)
        assert answered.returncode == (0 if command[2] == mine else 3), answered.stderr.decode()
        assert pending_entries(tmp_path) == [] and in_use(tmp_path) == []
    again = await formicary(env, "wo", "claim", mine)
    assert again.returncode == 3, again.stderr.decode()
    assert "it is this key's own lease (token 1)" in again.stderr.decode()
    assert "asking the relay again" not in again.stderr.decode()
    claims = [r for r in relay.node.store.scan("work@local") if r.kind == "wo.claim"]
    assert len([r for r in claims if r.author == me(tmp_path).public_key]) == 3


@pytest.mark.parametrize("damage", ['{"x": 1,', '{"x": 1}', "[]"])
async def test_a_pending_file_that_is_not_one_refuses_before_taking_a_lease(
    relay: RunningRelay, tmp_path: Path, damage: str
) -> None:
    """Read as empty, its requests would never be asked again; a traceback says
    nothing to a shell agent. Nothing is sent, and neither file is touched; the
    commands that take no lease do not read it."""
    env = agent_env(tmp_path, relay.url, "work@local")
    async with RelayClient.connect(relay.url, identity(7)) as other:
        order = await Ledger(other, "work@local").create("t")
    folder = tmp_path / "me"
    tokens = Tokens(folder, me(tmp_path).id, relay.node.identity.public_key.hex())
    tokens.put("work@local", "wo-9", 4)
    kept = (folder / "tokens.json").read_text()
    (folder / "pending.json").write_text(damage)
    for command in (["wo", "claim", order], ["wo", "next"], ["lock", "acquire", "branch:main"]):
        refused = await formicary(env, *command)
        said = refused.stderr.decode()
        assert refused.returncode == 2, said
        assert "pending.json is not a file of pending lease requests" in said, said
        assert "Traceback" not in said and len(said.strip().splitlines()) == 1, said
    listed = await formicary(env, "wo", "list", "--json")
    assert listed.returncode == 0, listed.stderr.decode()
    [shown] = json.loads(listed.stdout)
    assert shown["status"] == "open"  # nothing was asked of the relay
    assert (folder / "pending.json").read_text() == damage
    assert (folder / "tokens.json").read_text() == kept


async def test_a_request_too_old_for_the_relay_is_said_and_forgotten(
    relay: RunningRelay, tmp_path: Path
) -> None:
    """A request the relay never sequenced, left two days ago: its ts is past the
    relay's clock skew limit (24 h), and resending it would be refused on every rerun.
    It is said once, and the next run asks anew."""
    env = agent_env(tmp_path, relay.url, "work@local")
    async with RelayClient.connect(relay.url, identity(7)) as other:
        order = await Ledger(other, "work@local").create("t")
        now = other.clock_ms()
    pending = pending_of(relay, tmp_path)
    with pending.asking(
        "wo.claim", "work@local", {"wo": order}, lambda: (b"\1" * 16, now - 2 * DAY_MS)
    ):
        pass  # recorded, and never sent: as by a run stopped before its request left
    old = await formicary(env, "wo", "claim", order)
    said = old.stderr.decode()
    assert old.returncode == 1, said
    assert "was never decided, and is now too old for the relay to take" in said, said
    assert "nothing was granted by it" in said and "Traceback" not in said
    assert pending_entries(tmp_path) == [] and in_use(tmp_path) == []
    anew = await formicary(env, "wo", "claim", order, "--json")
    assert anew.returncode == 0, anew.stderr.decode()
    assert json.loads(anew.stdout)["token"] == 1


async def test_a_grant_whose_lease_ran_out_is_said_and_not_kept(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The request was granted while the agent was away, and the lease ran out before
    the rerun asked: printed as a claim, the agent would work on an order it does not
    hold, its token stale."""
    bounds = TtlBounds(min_ms=1, max_ms=DAY_MS, default_ms=60_000)
    relay = await start_relay(nursery, tmp_path / "relay", RelayConfig(claim_ttl=bounds))
    env = agent_env(tmp_path, relay.url, "work@local")
    agent, pending = me(tmp_path), pending_of(relay, tmp_path)
    async with RelayClient.connect(relay.url, agent) as client:
        ledger = Ledger(client, "work@local")
        order = await ledger.create("t")
        body = {"wo": order, "ttl_ms": 1}
        fresh = (client.nonce(), client.clock_ms())
        with pending.asking("wo.claim", "work@local", body, lambda: fresh) as (request, _):
            async with client.subscribe("work@local", kinds=["lease.expired"]) as lapses:
                await ledger.request("wo.claim", body, nonce=request.nonce, ts=request.ts)
                async for item in lapses:  # (its answer lost, as by a command that gave up)
                    if isinstance(item, Delivery):
                        break
    rerun = await formicary(env, "wo", "claim", order)
    said = rerun.stderr.decode()
    assert rerun.returncode == 1, said
    assert "was granted (token 1), but that lease is over" in said, said
    assert f"{order} is not held with it now" in said
    assert kept(pending, order) is None
    assert pending_entries(tmp_path) == [] and in_use(tmp_path) == []


async def granted_while_away(
    client: RelayClient, pending: PendingRequests, kind: str, body: dict[str, Any]
) -> int:
    """Record a lease request and have it granted, its answer lost (as by a command
    that gave up): the entry stays for a rerun. The grant's token."""
    fresh = (client.nonce(), client.clock_ms())
    with pending.asking(kind, "work@local", body, lambda: fresh) as (request, _):
        answer = await Ledger(client, "work@local").request(
            kind, body, nonce=request.nonce, ts=request.ts
        )
    return int(answer["token"])


ENDED = {
    # command, the ledger entry in tokens.json, what the lease takes: kind and body
    "claim": (["wo", "claim", "wo-1"], "wo-1", "wo.claim", {"wo": "wo-1"}),
    "acquire": (["lock", "acquire", "main"], "lock:main", "lock.acquire", {"name": "main"}),
}


@pytest.mark.parametrize("case", ENDED)
async def test_a_grant_whose_lease_is_over_and_taken_by_another_is_not_kept(
    relay: RunningRelay, tmp_path: Path, case: str
) -> None:
    """Granted while the agent was away, the lease was then given back with its token
    (`--token`, as the held refusal says) and taken by another key. The relay answers
    the rerun with the first grant all the same: printed and kept, the agent would
    take itself for the holder of what another holds (a lock's exclusion broken)."""
    command, entry, kind, body = ENDED[case]
    env = agent_env(tmp_path, relay.url, "work@local")
    agent, pending = me(tmp_path), pending_of(relay, tmp_path)
    async with (
        RelayClient.connect(relay.url, agent) as client,
        RelayClient.connect(relay.url, identity(7)) as other,
    ):
        mine, theirs = Ledger(client, "work@local"), Ledger(other, "work@local")
        if kind == "wo.claim":
            assert await theirs.create("t") == "wo-1"
        token = await granted_while_away(client, pending, kind, body)
        if kind == "wo.claim":
            await mine.release(Claim("wo-1", token, 0))
            taken = await theirs.claim("wo-1")
        else:
            await mine.unlock(Claim("main", token, 0))
            taken = await theirs.lock("main")
        assert taken.token == token + 1
    rerun = await formicary(env, *command)
    said = rerun.stderr.decode()
    assert rerun.returncode == 1, said
    assert f"was granted (token {token}), but that lease is over" in said, said
    assert kept(pending, entry) is None
    assert pending_entries(tmp_path) == [] and in_use(tmp_path) == []


async def test_a_grant_finished_meanwhile_is_not_kept(relay: RunningRelay, tmp_path: Path) -> None:
    """A `wo next` granted while the agent was away, the order then finished with its
    token: the rerun would print it as the next order, a done one, with a token that
    every later command of it is refused with."""
    env = agent_env(tmp_path, relay.url, "work@local")
    agent, pending = me(tmp_path), pending_of(relay, tmp_path)
    async with RelayClient.connect(relay.url, agent) as client:
        ledger = Ledger(client, "work@local")
        first = await ledger.create("first")
        second = await ledger.create("second")
        token = await granted_while_away(client, pending, "wo.next", {})
        await ledger.update(Claim(first, token, 0), "done")
    rerun = await formicary(env, "wo", "next")
    said = rerun.stderr.decode()
    assert rerun.returncode == 1, said
    assert f"{first} is not held with it now" in said, said
    assert kept(pending, first) is None
    anew = await formicary(env, "wo", "next", "--json")  # and the next run asks anew
    assert anew.returncode == 0, anew.stderr.decode()
    assert json.loads(anew.stdout)["wo"] == second


async def test_a_grant_renewed_meanwhile_is_kept_with_its_renewed_expiry(
    relay: RunningRelay, tmp_path: Path
) -> None:
    """Renewed with its token while the rerun was not yet run: still this key's, so
    kept, and told with the expiry it has now, not the first grant's."""
    env = agent_env(tmp_path, relay.url, "work@local")
    agent, pending = me(tmp_path), pending_of(relay, tmp_path)
    async with RelayClient.connect(relay.url, agent) as client:
        ledger = Ledger(client, "work@local")
        order = await ledger.create("t")
        body = {"wo": order, "ttl_ms": 60_000}
        token = await granted_while_away(client, pending, "wo.claim", body)
        renewed = await ledger.renew(Claim(order, token, 0), 600_000)
    rerun = await formicary(env, "wo", "claim", order, "--ttl", "1m", "--json")
    assert rerun.returncode == 0, rerun.stderr.decode()
    lease = json.loads(rerun.stdout)
    assert (lease["token"], lease["expires_ms"]) == (token, renewed.expires_ms)
    assert kept(pending, order) == token
    assert pending_entries(tmp_path) == []


async def test_a_request_whose_command_still_runs_is_not_taken_over(
    relay: RunningRelay, tmp_path: Path
) -> None:
    """Commands run in parallel with one key: a `wo next` waiting for its answer holds
    its entry, and another `wo next` makes a request of its own (two orders, not the
    same one twice); the entry stays for its own command."""
    env = agent_env(tmp_path, relay.url, "work@local")
    async with RelayClient.connect(relay.url, identity(7)) as other:
        first = await Ledger(other, "work@local").create("t")
    pending = pending_of(relay, tmp_path)
    running = (b"\2" * 16, 0)  # (never sent: only held, as a command waiting holds it)
    with pending.asking("wo.next", "work@local", {}, lambda: running) as (waiting, again):
        assert not again
        other_run = await formicary(env, "wo", "next", "--json")
        assert other_run.returncode == 0, other_run.stderr.decode()
        assert json.loads(other_run.stdout)["wo"] == first
        assert "asking the relay again" not in other_run.stderr.decode()
        [entry] = pending_entries(tmp_path)
        assert entry["nonce"] == waiting.nonce.hex()


def test_a_rerun_is_the_same_kind_namespace_and_target_by_the_same_agent_and_relay(
    tmp_path: Path,
) -> None:
    """What "the same command" is: keys sharing a folder, and relays (two relays'
    `wo-1` of `work@local` are two orders), keep their requests apart; a pending `wo
    next` is not a `wo claim` nor the other way round; the --ttl is not part of it."""
    made = iter(range(1, 100))

    def fresh() -> tuple[bytes, int]:
        return bytes([next(made)]) * 16, 1_000

    def left(pending: PendingRequests, kind: str, body: dict[str, Any], ns: str = "w@l") -> bool:
        with pending.asking(kind, ns, body, fresh) as (_, again):
            return again

    mine = PendingRequests(tmp_path, "agent", "aa" * 32)
    with mine.asking("wo.claim", "w@l", {"wo": "wo-1"}, fresh) as (first, again):
        assert not again
    assert not left(PendingRequests(tmp_path, "agent", "bb" * 32), "wo.claim", {"wo": "wo-1"})
    assert not left(PendingRequests(tmp_path, "other", "aa" * 32), "wo.claim", {"wo": "wo-1"})
    assert not left(mine, "wo.claim", {"wo": "wo-1"}, ns="v@l")
    assert not left(mine, "wo.claim", {"wo": "wo-2"})
    assert not left(mine, "lock.acquire", {"name": "wo-1"})
    assert not left(mine, "wo.next", {})
    with mine.asking("wo.claim", "w@l", {"wo": "wo-1", "ttl_ms": 5}, fresh) as (again_sent, again):
        assert again and again_sent == first  # sent as it was: without a ttl
    assert left(mine, "wo.next", {"ttl_ms": 5})  # the one left above
    mine.settle(first)
    assert not left(mine, "wo.claim", {"wo": "wo-1"})  # answered: a new request
