"""``formicary wo`` as a shell agent runs it: one bash script, real processes, exit codes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio

from tests.conftest import RunningRelay

SCRIPT = r"""
set -u
wo() { "$PYTHON" -m agent_sdk.cli wo "$@"; }
id=$(wo create --title "fix the parser" --acceptance "tests pass" --priority 3 --json \
     | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["id"])') || exit 10
wo list --status open --json > open.json || exit 11
wo claim "$id" --ttl 10m --json > claim.json || exit 12
wo renew "$id" --ttl 20m > /dev/null || exit 13
wo note "$id" "found it in lexer.py" || exit 14
FORMICARY_KEY=$OTHER_KEY wo claim "$id"; echo "other-claim=$?" > codes.txt
wo release "$id" || exit 15
wo claim "$id" --json > again.json || exit 16
wo update "$id" --status done || exit 17
FORMICARY_KEY=$OTHER_KEY wo show "$id" --json > show.json || exit 18
wo update "$id" --status done; echo "done-twice=$?" >> codes.txt
wo show wo-99; echo "missing=$?" >> codes.txt
wo claim "$id" --ttl forever; echo "bad-ttl=$?" >> codes.txt
exit 0
"""


async def test_the_workledger_workflow_in_a_shell_script(
    relay: RunningRelay, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "FORMICARY_RELAY": relay.url,
        "FORMICARY_KEY": str(tmp_path / "me" / "agent.key"),
        "OTHER_KEY": str(tmp_path / "other" / "agent.key"),
        "FORMICARY_NS": "work@local",
    }
    done = await trio.run_process(
        ["bash", "-c", SCRIPT], cwd=tmp_path, env=env, check=False, capture_stderr=True
    )
    assert done.returncode == 0, done.stderr.decode()

    [listed] = json.loads((tmp_path / "open.json").read_text())
    assert listed["status"] == "open" and listed["title"] == "fix the parser"
    claim = json.loads((tmp_path / "claim.json").read_text())
    assert claim["id"] == listed["id"] and claim["fencing_token"] == 1 and claim["expires_at"]
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["fencing_token"] == 2  # fencing tokens only rise
    shown = json.loads((tmp_path / "show.json").read_text())
    assert shown["status"] == "done"
    assert [note["text"] for note in shown["notes"]] == ["found it in lexer.py"]
    codes = dict(line.split("=") for line in (tmp_path / "codes.txt").read_text().split())
    assert codes == {"other-claim": "3", "done-twice": "3", "missing": "4", "bad-ttl": "2"}
    assert "held by" in done.stderr.decode()


def test_kept_tokens_survive_parallel_commands(tmp_path: Path) -> None:
    import threading

    from agent_sdk.cli_wo import Tokens

    def agent(n: int) -> None:
        tokens = Tokens(tmp_path)  # each command opens its own, like separate processes
        for i in range(25):
            tokens.put("work@local", f"wo-{n}-{i}", i + 1)

    threads = [threading.Thread(target=agent, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    kept = json.loads((tmp_path / "tokens.json").read_text())
    assert len(kept) == 200


LOCK_SCRIPT = r"""
set -u
lock() { "$PYTHON" -m agent_sdk.cli lock "$@"; }
lock acquire branch:main --ttl 10m --json > mine.json || exit 10
FORMICARY_KEY=$OTHER_KEY lock acquire branch:main; echo "other=$?" > codes.txt
lock list --json > list.json || exit 11
lock renew branch:main || exit 12
lock release branch:main || exit 13
FORMICARY_KEY=$OTHER_KEY lock acquire branch:main --json > theirs.json || exit 14
lock release branch:main; echo "not-mine=$?" >> codes.txt
exit 0
"""


async def test_locks_from_a_shell_script(relay: RunningRelay, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "FORMICARY_RELAY": relay.url,
        "FORMICARY_KEY": str(tmp_path / "me" / "agent.key"),
        "OTHER_KEY": str(tmp_path / "other" / "agent.key"),
    }
    done = await trio.run_process(
        ["bash", "-c", LOCK_SCRIPT], cwd=tmp_path, env=env, check=False, capture_stderr=True
    )
    assert done.returncode == 0, done.stderr.decode()
    mine = json.loads((tmp_path / "mine.json").read_text())
    [listed] = json.loads((tmp_path / "list.json").read_text())
    assert listed["lock"] == "branch:main" and listed["fencing_token"] == mine["fencing_token"]
    assert json.loads((tmp_path / "theirs.json").read_text())["fencing_token"] == 2
    codes = dict(line.split("=") for line in (tmp_path / "codes.txt").read_text().split())
    assert codes == {"other": "3", "not-mine": "2"}  # no token kept for it: a usage error
