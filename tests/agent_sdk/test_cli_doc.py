"""``formicary doc`` from a shell script: real processes against a real relay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent_sdk.client import Live, RelayClient
from agent_sdk.errors import ProtocolError
from agent_sdk.identity import Identity
from tests.agent_sdk.shell import exit_codes, run_shell
from tests.conftest import RunningRelay, identity

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
