"""A link: this relay's connection to one peer, as an authenticated agent of it.

A relay dials a peer with the agent handshake of the protocol (§5.1), signing with
its own relay key and pinning the key it expects the peer to present — so both ends
are authenticated: the peer knows which relay dialled (it lists our key), and we
refuse a peer that answers with another key. Over the link go the writes this relay
forwards (publishes and queries for namespaces the peer homes), and the
subscriptions its mirrors and proxied documents follow.

A link reconnects forever with jittered exponential backoff (0.1 s doubling to 5 s).
Each connection is a fresh :class:`RelayClient` without reconnect of its own: the
outbox and the mirrors that use the link redo their intent on each new connection,
from what they have stored, not from what the last connection had in flight.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable

import trio
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from agent_sdk.client import RelayClient, RelayMismatch
from agent_sdk.errors import ProtocolError
from agent_sdk.identity import Identity
from federation.peers import Peer

log = logging.getLogger("formicary.federation")

BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0


class Link:
    """The dialled connection to one peer; :meth:`wait_up` hands out its client."""

    def __init__(
        self,
        peer: Peer,
        identity: Identity,
        *,
        max_message: int,
        dial: Callable[[], Awaitable[trio.abc.Stream]] | None = None,
    ) -> None:
        assert peer.url is not None
        self.peer = peer
        self.dial = dial  # the in-memory network of virtual-time simulations
        self.identity = identity
        self.max_message = max_message
        self.client: RelayClient | None = None
        self.connections = 0
        self.refusals = 0
        self.last_error: str | None = None
        self._changed = trio.Event()

    @property
    def up(self) -> bool:
        return self.client is not None

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Return once ``condition()`` holds; it is looked at whenever the link changes
        (up, down, refused)."""
        while not condition():
            await self._changed.wait()

    async def wait_up(self) -> RelayClient:
        """The current connection's client, once there is one."""
        while self.client is None:
            await self._changed.wait()
        return self.client

    def _set(self, client: RelayClient | None) -> None:
        self.client = client
        self._changed.set()
        self._changed = trio.Event()

    async def drop(self, reason: str) -> None:
        """Close the current connection (a peer that broke the protocol); it is
        dialled again after the backoff."""
        client = self.client
        if client is not None and client.ws is not None:
            log.warning("link %s: dropping the connection: %s", self.peer.name, reason)
            self.last_error = reason
            await client.ws.aclose(1008, reason[:120])

    async def run(self) -> None:
        delay = BACKOFF_FIRST
        url = self.peer.url
        assert url is not None
        while True:
            try:
                async with RelayClient.connect(
                    url,
                    self.identity,
                    relay_key=self.peer.key,
                    reconnect=False,
                    max_message=self.max_message,
                    dial=self.dial,
                ) as client:
                    if client.relay_name != self.peer.name:
                        raise RelayMismatch(
                            f"peer at {url} is named {client.relay_name!r}, not {self.peer.name!r}"
                        )
                    self.connections += 1
                    self.last_error = None
                    delay = BACKOFF_FIRST
                    log.info("link %s: up (%s)", self.peer.name, url)
                    self._set(client)
                    await client.stopped.wait()
            except RelayMismatch as exc:
                self.refusals += 1
                self.last_error = str(exc)
                log.warning("link %s: refused: %s", self.peer.name, exc)
                self._set(None)
            except (
                OSError,
                ConnectionClosed,
                InvalidHandshake,
                InvalidURI,
                UnicodeError,  # (a host name the resolver cannot encode: down, not fatal)
                TimeoutError,
                trio.TooSlowError,
                ProtocolError,
            ) as exc:
                self.last_error = str(exc) or type(exc).__name__
                log.info("link %s: down: %s", self.peer.name, self.last_error)
            finally:
                if self.client is not None:
                    self._set(None)
            await trio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, BACKOFF_MAX)
