"""Running a shell agent's script against a real relay, as the CLI tests do."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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


async def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``formicary ARGS`` in a process of its own with ``env``, its output kept."""
    with trio.fail_after(60):  # (not a timing check: only that it ends)
        return await trio.run_process(
            [sys.executable, "-m", "agent_sdk.cli", *args],
            env=env,
            check=False,
            capture_stdout=True,
            capture_stderr=True,
        )


def exit_codes(tmp_path: Path) -> dict[str, str]:
    """The ``name=code`` lines a script wrote to ``codes.txt``."""
    return dict(line.split("=") for line in (tmp_path / "codes.txt").read_text().split())


@asynccontextmanager
async def running(command: list[str], env: dict[str, str]) -> AsyncIterator[trio.Process]:
    """``command`` running with its output piped, killed on the way out (a command
    that waits: the test reads what it says meanwhile)."""
    process = await trio.lowlevel.open_process(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        yield process
    finally:
        process.kill()
        await process.wait()


async def read_until(stream: trio.abc.ReceiveStream | None, marker: bytes) -> bytes:
    """What ``stream`` says up to and including ``marker`` (and what came with it)."""
    assert stream is not None
    said = b""
    while marker not in said:
        chunk = await stream.receive_some()
        assert chunk, said  # it ended without saying it
        said += chunk
    return said
