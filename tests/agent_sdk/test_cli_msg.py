"""``formicary msg`` as a shell agent runs it: real processes against a real relay."""

from __future__ import annotations

import json
from pathlib import Path

from tests.agent_sdk.shell import exit_codes, run_shell
from tests.conftest import RunningRelay

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
