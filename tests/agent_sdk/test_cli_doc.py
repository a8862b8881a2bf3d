"""``formicary doc`` from a shell script: real processes against a real relay."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trio

from agent_sdk.client import Live, RelayClient
from agent_sdk.errors import ProtocolError
from agent_sdk.identity import Identity
from relay.node import Ticket
from relay.store import Record
from tests.agent_sdk.shell import exit_codes, run_cli, run_shell, running
from tests.conftest import RunningRelay, identity
from tests.federation.fixtures import plan, start

TIMEOUT = 30

SCRIPT = r"""
set -u
doc() { "$PYTHON" -m agent_sdk.cli doc "$@"; }
doc get docs@local plan; echo "missing=$?" > codes.txt
doc set docs@local plan owner agent-1 || exit 10
doc set docs@local plan budget '{"hours": 3}' --parse-json || exit 11
FORMICARY_KEY=$OTHER_KEY doc append docs@local plan "found the bug" || exit 12
doc append docs@local plan "fixed it" || exit 13
FORMICARY_KEY=$OTHER_KEY doc get docs@local plan --json > plan.json || exit 14
doc get docs@local plan > plan.txt || exit 15
doc set docs@local plan k '{not json' --parse-json; echo "bad-json=$?" >> codes.txt
doc token docs@local plan --ttl 10m > token.txt || exit 16
doc token docs@local plan --ttl 0s; echo "expired-token=$?" >> codes.txt
exit 0
"""


async def test_documents_from_a_shell_script(relay: RunningRelay, tmp_path: Path) -> None:
    done = await run_shell(relay, tmp_path, SCRIPT)
    assert done.returncode == 0, done.stderr.decode()
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan == {
        "fields": {"owner": "agent-1", "budget": {"hours": 3}},
        "text": "",
        "log": ["found the bug", "fixed it"],
    }
    text = (tmp_path / "plan.txt").read_text()
    assert "owner=agent-1" in text and "- fixed it" in text
    # Every edit is signed by the script's keys: a field name is not a key file.
    assert not (tmp_path / "owner").exists() and not (tmp_path / "budget").exists()
    authors = set()
    async with (
        RelayClient.connect(relay.url, identity(6)) as reader,
        reader.subscribe("docs@local", start=1) as feed,
    ):
        async for item in feed:
            if isinstance(item, Live):
                break
            if item.event.event.kind == "doc.update":
                authors.add(item.event.event.author)
    keys = {Identity.load(tmp_path / who / "agent.key").public_key for who in ("me", "other")}
    assert authors == keys
    codes = exit_codes(tmp_path)
    assert codes == {"missing": "4", "bad-json": "2", "expired-token": "2"}
    from urllib.parse import parse_qs

    from agent_sdk import doctoken

    printed = parse_qs((tmp_path / "token.txt").read_text().strip())  # token=...&secret=...
    (token,), (secret,) = printed["token"], printed["secret"]
    checked = doctoken.check(token, "docs@local", "plan", 0, secret)
    assert checked.agent == Identity.load(tmp_path / "me" / "agent.key").public_key
    with pytest.raises(ProtocolError):  # bound: the token alone (as the log shows it) fails
        doctoken.check(token, "docs@local", "plan", 0)
    # What the shell wrote, an SDK agent reads.
    async with (
        RelayClient.connect(relay.url, identity(5)) as client,
        client.doc("docs@local", "plan", create=False) as shared,
    ):
        assert shared.to_json() == plan


async def test_get_prints_a_document_holding_binary_values(
    relay: RunningRelay, tmp_path: Path
) -> None:
    """A Yjs client may store a Uint8Array (pycrdt: bytes) in a map or an array:
    `doc get` failed on it with a traceback (bytearray is not JSON serializable)."""
    async with (
        RelayClient.connect(relay.url, identity(1)) as client,
        client.doc("docs@local", "blobs") as shared,
    ):
        shared.map()["blob"] = b"\x00\x01"
        shared.array().append(b"\xff")
    env = _cli_env(relay.url, tmp_path)
    done = await run_cli(env, "doc", "get", "docs@local", "blobs", "--json")
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout) == {"fields": {"blob": "0001"}, "text": "", "log": ["ff"]}
    done = await run_cli(env, "doc", "get", "docs@local", "blobs")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().splitlines() == ["blob=0001", "- ff"]


def _cli_env(url: str, tmp_path: Path) -> dict[str, str]:
    import os

    return {**os.environ, "FORMICARY_RELAY": url, "FORMICARY_KEY": str(tmp_path / "k.key")}


async def test_a_write_the_home_never_confirms_exits_non_zero(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A write the relay queued (its namespace's home is down) was left after 30 s with
    status 0, and the agent believed it had landed. Here the document never opens
    (only its creation is queued), so the change itself was never sent: the command
    says so, rather than that it may land later. And `doc get`, which waited for ever
    for a document whose home is down, gives up after its --timeout too."""
    relays = plan(tmp_path, "a", "b")  # b, the home of x@b, is never started
    a = await start(nursery, relays["a"], (relays["b"].peer(),))

    async def formicary(*command: str) -> tuple[int, str]:
        with trio.fail_after(TIMEOUT):  # (not a timing check: only that it ends)
            done = await trio.run_process(
                [sys.executable, "-m", "agent_sdk.cli", *command],
                env=_cli_env(a.url, tmp_path),
                check=False,
                capture_stdout=True,
                capture_stderr=True,
            )
        return done.returncode, done.stderr.decode()

    status, said = await formicary("doc", "append", "x@b", "notes", "kept", "--timeout", "1s")
    assert status == 1, said
    assert "the home relay of x@b cannot be reached now" in said  # the relay holds it
    assert (
        "formicary doc append: the document could not be opened in 1s (its home may be out"
        " of reach; its creation may still be queued): the change was not sent, write it"
        " again later"
    ) in said
    status, said = await formicary("doc", "get", "x@b", "notes", "--timeout", "1s")
    assert status == 1, said
    assert "formicary doc get: the document did not come in 1s (its home may be out" in said


@pytest.mark.parametrize("relay_stops", [False, True])
async def test_an_edit_whose_commit_never_comes_exits_non_zero(
    relay: RunningRelay, tmp_path: Path, relay_stops: bool
) -> None:
    """The relay takes the edit and never answers it: the command waits out its
    --timeout, or sees the relay stop, and says the change is not confirmed."""
    node = relay.node
    answer, answer_nowait = node.answer, node.answer_nowait
    received = trio.Event()

    async def stalled(ticket: Ticket) -> Record:
        if ticket.event.event.kind == "doc.update":
            received.set()
            await trio.sleep_forever()
        return await answer(ticket)

    def nowait(ticket: Ticket) -> Record | None:
        return None if ticket.event.event.kind == "doc.update" else answer_nowait(ticket)

    node.answer, node.answer_nowait = stalled, nowait  # type: ignore[method-assign]
    command = ["doc", "set", "docs@local", "plan", "owner", "agent-1"]
    command += ["--timeout", "1h" if relay_stops else "1s"]
    env = _cli_env(relay.url, tmp_path)
    async with running([sys.executable, "-m", "agent_sdk.cli", *command], env) as process:
        with trio.fail_after(TIMEOUT):  # (not a timing check: only that it ends)
            if relay_stops:
                await received.wait()
                relay.scope.cancel()
            await process.wait()
            assert process.stderr is not None
            told = b""
            while chunk := await process.stderr.receive_some():
                told += chunk
    said = told.decode()
    assert process.returncode == 1, said
    told_last = said.splitlines()[-1]  # (after the line about the key the CLI made)
    assert told_last.startswith("formicary doc set: the change is not confirmed"), said
    assert "check with `formicary doc get docs@local plan` before writing it again" in told_last
