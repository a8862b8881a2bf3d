"""``formicary msg`` as a shell agent runs it: real processes against a real relay."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio

from agent_sdk.client import RelayClient
from tests.agent_sdk.shell import exit_codes, read_until, run_shell, running
from tests.conftest import RunningRelay, identity
from tests.federation.cluster import cluster

BOB = identity(2)
TIMEOUT = 60

SCRIPT = r"""
set -u
f() { "$PYTHON" -m agent_sdk.cli "$@"; }
other() { FORMICARY_KEY=$OTHER_KEY "$PYTHON" -m agent_sdk.cli "$@"; }
id_of() { "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["id"])'; }
them=$(f keygen --out "$OTHER_KEY" | id_of)
other msg inbox > empty.jsonl || exit 10
f msg send "$them" "hello there" > sent.json || exit 11
printf 'binary\000bytes' > note.bin
f msg send "$them" --file note.bin > sent-file.json || exit 12
f msg send "$(printf 'ab%.0s' $(seq 32))" "nobody"; echo "unknown=$?" > codes.txt
f msg send "$them"; echo "no-text=$?" >> codes.txt
f msg send "$them" "x" --via direct; echo "no-endpoint=$?" >> codes.txt
other msg inbox > inbox.jsonl || exit 13
other msg inbox > again.jsonl || exit 14
other dir join --name bob --ns people@local > /dev/null || exit 15
f msg send bob "by name"; echo "no-ns=$?" >> codes.txt
FORMICARY_NS=people@local f msg send bob "by name" > named.json || exit 16
other msg inbox > named.jsonl || exit 17
FORMICARY_NS=team@faraway f msg send "$them" "an id needs no directory" > /dev/null || exit 18
exit 0
"""


async def test_messages_from_a_shell_script(relay: RunningRelay, tmp_path: Path) -> None:
    done = await run_shell(relay, tmp_path, SCRIPT)
    assert done.returncode == 0, done.stderr.decode()
    assert (tmp_path / "empty.jsonl").read_text() == ""
    sent = json.loads((tmp_path / "sent.json").read_text())
    assert sent["path"] == "relay" and sent["status"] == "stored"
    inbox = [json.loads(line) for line in (tmp_path / "inbox.jsonl").read_text().splitlines()]
    assert len(inbox) == 2 and inbox[0]["id"] == sent["id"]
    assert inbox[0]["body"] == "hello there" and inbox[0]["path"] == "relay"
    assert inbox[1]["body"] == {"file": "note.bin", "data": b"binary\x00bytes".hex()}
    assert (tmp_path / "again.jsonl").read_text() == ""  # taken: not shown twice
    codes = {"unknown": "1", "no-text": "2", "no-endpoint": "1", "no-ns": "2"}
    assert exit_codes(tmp_path) == codes
    assert "give --ns (or $FORMICARY_NS)" in done.stderr.decode()
    # A name is looked up in $FORMICARY_NS's directory, as --ns's.
    [named] = [json.loads(line) for line in (tmp_path / "named.jsonl").read_text().splitlines()]
    assert named["body"] == "by name"


async def test_a_message_to_an_unreachable_relay_says_it_is_held(tmp_path: Path) -> None:
    """``msg send AGENT@b`` with ``b`` down waited in silence (for up to a minute of
    tries): the relay answers ``home_unreachable`` and keeps nothing, so unlike a
    queued publish a stopped command loses the message. It says so once on stderr,
    and sends the message once ``b`` is back."""
    env = {**os.environ, "FORMICARY_KEY": str(tmp_path / "alice.key")}
    with trio.fail_after(TIMEOUT):
        async with cluster(tmp_path, ["a", "b"]) as net:
            async with RelayClient.connect(net["b"].url, BOB):
                pass  # Bob is an agent of b: b knows him
            await net.kill("b")
            send = ["msg", "send", f"{BOB.id}@b", "held", "--relay", net["a"].url]
            async with running([sys.executable, "-m", "agent_sdk.cli", *send], env) as process:
                said = await read_until(process.stderr, b"may leave the message unsent")
                assert process.returncode is None  # still trying
                await net.start("b")  # the same data: Bob is still known
                assert await process.wait() == 0
                said += await read_all(process.stderr)
                printed = json.loads(await read_all(process.stdout))
    notice = f"not queued at {net['a'].url}: relay b cannot be reached now"
    assert said.decode().count(notice) == 1, said.decode()
    assert printed["status"] == "stored"


async def read_all(stream: trio.abc.ReceiveStream | None) -> bytes:
    """What ``stream`` says until it ends."""
    assert stream is not None
    said = b""
    while chunk := await stream.receive_some():
        said += chunk
    return said
