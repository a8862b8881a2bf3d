"""Relays as child processes (``formicary relay serve``), for tests that kill them."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from relay.limits import UNLIMITED, as_toml
from tests import backends

STARTUP_TIMEOUT = 20  # seconds; a cold interpreter on a slow machine
PHASE_TIMEOUT = 30


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent_sdk.cli", *args]


class RelayProcess:
    """``formicary relay serve`` in a child process. Its stderr is read all along (a
    pipe nobody drains would stall the relay once its logs fill it); ``output()``."""

    def __init__(
        self, data: Path, *args: str, name: str = "local", port: int = 0, own_group: bool = False
    ) -> None:
        self.data = data
        self.own_group = own_group  # a process group of its own, to signal as a whole
        self.args = args
        self.name = name
        self.port = port
        self.url = ""
        self.process: trio.Process | None = None
        self._stderr = b""
        self._grew = trio.Event()
        self._ended = False

    async def start(self) -> None:
        command = cli(
            "relay", "serve", "--host", "127.0.0.1", "--port", str(self.port),
            "--data", str(self.data), "--name", self.name, *self.args,
        )  # fmt: skip
        if "--config" not in self.args:  # tests of other things publish at full speed
            settings = self.data.parent / f"{self.data.name}.unlimited.toml"
            settings.parent.mkdir(parents=True, exist_ok=True)
            settings.write_text(as_toml(UNLIMITED))
            command += ["--config", str(settings)]
        dsn = backends.store_dsn(self.data)
        if dsn and "--store" not in self.args:
            command += ["--store", dsn]
        self._stderr = b""
        self._ended = False
        self.process = await trio.lowlevel.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=self.own_group,
        )
        trio.lowlevel.spawn_system_task(self._drain, self.process)
        await self._wait_ready()

    async def _drain(self, process: trio.Process) -> None:
        assert process.stderr is not None
        try:
            while chunk := await process.stderr.receive_some():
                self._stderr += chunk
                self._grew.set()
                self._grew = trio.Event()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        self._ended = True
        self._grew.set()  # end of output: the process is gone

    async def _wait_ready(self) -> None:
        """Wait until the relay says where it listens (it may pick a free port)."""
        assert self.process is not None
        with trio.fail_after(STARTUP_TIMEOUT):
            while b" listening on " not in self._stderr:
                if self.process.poll() is not None:
                    raise AssertionError(f"relay exited {self.process.returncode}: {self.output()}")
                with trio.move_on_after(1):  # also look at poll() now and then
                    await self._grew.wait()
        line = next(x for x in self.output().splitlines() if " listening on " in x)
        self.url = line.split(" listening on ", 1)[1].split(",", 1)[0]

    def output(self) -> str:
        return self._stderr.decode(errors="replace")

    async def wait_output(self, text: str) -> None:
        """Wait until the relay's stderr holds ``text``; fail if it ends without."""
        while text.encode() not in self._stderr:
            if self._ended:
                raise AssertionError(f"the relay's output ended without {text!r}")
            await self._grew.wait()

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to flush, close or clean up."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)

    async def kill_and_wait(self) -> None:
        self.kill()
        assert self.process is not None
        with trio.fail_after(PHASE_TIMEOUT):
            await self.process.wait()

    async def stop(self) -> int:
        """SIGTERM, the operator's way to stop a relay; returns the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(PHASE_TIMEOUT):
            return await self.process.wait()


@asynccontextmanager
async def relay_process(data: Path, *args: str, **options: Any) -> AsyncIterator[RelayProcess]:
    relay = RelayProcess(data, *args, **options)
    try:
        await relay.start()
        yield relay
    finally:
        relay.kill()
        if relay.process is not None:
            with trio.CancelScope(shield=True):
                await relay.process.wait()
