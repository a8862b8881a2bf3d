"""A client's TCP connection the test can hold and cut: what the relay sends is
held back (never read, as on a stalled network) until the connection is cut."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from tests.conftest import RunningRelay


class Wire(trio.abc.Stream):
    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.held = False
        self.gone = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.gone.is_set():
            raise trio.BrokenResourceError("cut")
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self.gone.is_set():
            data = await self.inner.receive_some(max_bytes)
            if not self.held:
                return data
            await self.gone.wait()  # what came is lost with the connection
        raise trio.BrokenResourceError("cut")

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def cut(self) -> None:
        self.gone.set()
        await self.inner.aclose()


def dialer(
    relay: RunningRelay, wires: list[Wire], later: RunningRelay | None = None
) -> Callable[[], Awaitable[trio.abc.Stream]]:
    """A ``dial`` for RelayClient.connect that appends each connection's wire.
    ``later``: where every connection after the first goes instead (another relay
    answering at the address, as after a relay was replaced)."""

    async def dial() -> trio.abc.Stream:
        to = relay if later is None or not wires else later
        port = int(to.url.rsplit(":", 1)[1])
        wires.append(Wire(await trio.open_tcp_stream("127.0.0.1", port)))
        return wires[-1]

    return dial
