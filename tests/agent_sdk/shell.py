"""Running a shell agent's script against a real relay, as the CLI tests do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import trio

from tests.conftest import RunningRelay


async def run_shell(
    relay: RunningRelay, tmp_path: Path, script: str, ns: str | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run ``script`` with bash in ``tmp_path``: ``$PYTHON`` runs the CLI, the agent's
    key is ``FORMICARY_KEY`` and a second agent's ``$OTHER_KEY``."""
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "FORMICARY_RELAY": relay.url,
        "FORMICARY_KEY": str(tmp_path / "me" / "agent.key"),
        "OTHER_KEY": str(tmp_path / "other" / "agent.key"),
    }
    if ns is not None:
        env["FORMICARY_NS"] = ns
    return await trio.run_process(
        ["bash", "-c", script], cwd=tmp_path, env=env, check=False, capture_stderr=True
    )


def exit_codes(tmp_path: Path) -> dict[str, str]:
    """The ``name=code`` lines a script wrote to ``codes.txt``."""
    return dict(line.split("=") for line in (tmp_path / "codes.txt").read_text().split())
