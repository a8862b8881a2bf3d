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

PRELUDE = r"""
set -u
f() { "$PYTHON" -m agent_sdk.cli "$@"; }
other() { FORMICARY_KEY=$OTHER_KEY "$PYTHON" -m agent_sdk.cli "$@"; }
id_of() { "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["id"])'; }
them=$(f keygen --out "$OTHER_KEY" | id_of)
"""
"""What each script starts with: this agent (f), the other (other) and its id (them)."""

SCRIPT = r"""
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
    done = await run_shell(relay, tmp_path, PRELUDE + SCRIPT)
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


RESENT = r"""
other msg inbox > /dev/null || exit 10
f msg send "$them" "the report" --id report-7 > first.json || exit 11
f msg send "$them" "the report" --id report-7 > again.json || exit 12
other msg inbox > inbox.jsonl || exit 13
f msg send "$them" "the report" --id report-7 --wait > late.json || exit 14
f msg send "$them" "the report" --id report-7 --wait > later.json || exit 18
other msg inbox > after.jsonl || exit 15
f msg send "$them" "another" --id report-8 > other.json || exit 16
other msg inbox > other.jsonl || exit 17
f msg send "$them" "x" --id ""; echo "empty-id=$?" > codes.txt
exit 0
"""


async def test_a_send_run_again_with_the_same_id_is_delivered_once(
    relay: RunningRelay, tmp_path: Path
) -> None:
    """Each run of ``msg send`` made a new message: a shell agent that ran it again
    after a lost connection (not knowing whether the first run's message was stored)
    could deliver it twice. Runs with the same ``--id`` send the same message: the
    relay stores it once and answers a later run ``delivered``. ``--wait`` then returns
    at once: the receipt is sent once, and a run before may have taken it (as the one
    before the last does here), so the SDK settles a send the relay answers
    ``delivered`` instead of waiting for a receipt for ever."""
    with trio.fail_after(TIMEOUT):  # (not a timing check: only that it ends)
        done = await run_shell(relay, tmp_path, PRELUDE + RESENT)
    assert done.returncode == 0, done.stderr.decode()

    def lines(name: str) -> list[dict[str, str]]:
        return [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]

    [first], [again], [late] = lines("first.json"), lines("again.json"), lines("late.json")
    [later] = lines("later.json")
    assert first["id"] == again["id"] == late["id"] == later["id"]
    statuses = [run["status"] for run in (first, again, late, later)]
    assert statuses == ["stored", "stored", "delivered", "delivered"]
    [inbox] = lines("inbox.jsonl")
    assert inbox["id"] == first["id"] and inbox["body"] == "the report"
    assert lines("after.jsonl") == []  # the third run's copy was not stored again
    [other] = lines("other.jsonl")
    assert other["body"] == "another" and other["id"] != first["id"]
    assert exit_codes(tmp_path) == {"empty-id": "2"}


async def test_a_direct_send_run_again_with_the_same_id_is_handed_out_once(
    relay: RunningRelay, tmp_path: Path
) -> None:
    """Directly, no relay sees the message: the recipient's process takes the second
    run's copy for the first's (it has the same id and stream), and sends its receipt
    again, so the second run's ``--wait`` ends too."""
    env = {**os.environ, "FORMICARY_RELAY": relay.url, "FORMICARY_KEY": str(tmp_path / "a.key")}
    took: list[tuple[object, str]] = []

    async def take(bob: RelayClient) -> None:
        async for message in bob.messages():
            took.append((message.body, message.path))

    async def send(endpoint: str) -> dict[str, str]:
        command = ["msg", "send", BOB.id, "psst", "--id", "psst-1", "--wait"]
        command += ["--via", "direct", "--endpoint", endpoint]
        with trio.fail_after(TIMEOUT):  # (not a timing check: only that it ends)
            done = await trio.run_process(
                [sys.executable, "-m", "agent_sdk.cli", *command],
                env=env,
                check=False,
                capture_stdout=True,
                capture_stderr=True,
            )
        assert done.returncode == 0, done.stderr.decode()
        printed: dict[str, str] = json.loads(done.stdout)
        return printed

    async with (
        RelayClient.connect(relay.url, BOB) as bob,
        bob.listen() as endpoint,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(take, bob)
        first, again = await send(endpoint), await send(endpoint)
        nursery.cancel_scope.cancel()
    assert first == again == {**first, "path": "direct", "status": "delivered"}
    assert took == [("psst", "direct")]  # once
    assert relay.node.inboxes.counts["stored"] == 0  # the relay never had it


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


UNTAKEN = r"""
other msg inbox > /dev/null || exit 10
f msg send "$them" "the plan" --id plan-1 --wait --timeout 1s > late.json
echo "late=$?" > codes.txt
other msg inbox > taken.jsonl || exit 11
f msg send "$them" "the plan" --id plan-1 --wait --timeout 30s > taken.json || exit 12
f msg send "$them" "x" --timeout 1s; echo "no-wait=$?" >> codes.txt
f msg send "$them" "x" --wait --timeout soon; echo "bad=$?" >> codes.txt
exit 0
"""


async def test_a_wait_for_a_receipt_ends_at_its_timeout_and_a_rerun_waits_on(
    relay: RunningRelay, tmp_path: Path
) -> None:
    """``--wait`` waited for the receipt for as long as the recipient did not read:
    a shell agent could not bound it. Past ``--timeout`` the command prints where the
    message is (stored: sent, not yet taken) and exits 1; with ``--id``, running it
    again once the recipient took it is the same message, and ends ``delivered``."""
    with trio.fail_after(TIMEOUT):  # (not a timing check: only that it ends)
        done = await run_shell(relay, tmp_path, PRELUDE + UNTAKEN)
    said = done.stderr.decode()
    assert done.returncode == 0, said
    assert exit_codes(tmp_path) == {"late": "1", "no-wait": "2", "bad": "2"}
    late = json.loads((tmp_path / "late.json").read_text())
    assert (late["path"], late["status"]) == ("relay", "stored")
    assert "no receipt after 1s: the message is stored, not yet taken by its recipient" in said
    assert "running the same command again waits on for this same message" in said
    [taken] = [json.loads(line) for line in (tmp_path / "taken.jsonl").read_text().splitlines()]
    assert taken["id"] == late["id"] and taken["body"] == "the plan"
    again = json.loads((tmp_path / "taken.json").read_text())
    assert (again["id"], again["status"]) == (late["id"], "delivered")
    assert "--timeout is how long --wait waits" in said
