"""The participant directory from an agent's side: join, leave, heartbeat, look up.

``await directory.join("indexer", capabilities=["python@3.11", "search"])`` makes
this agent a member of the namespace, online while this connection is open (the
relay appends ``dir.left`` when it closes; after a reconnect the client joins
again). With ``heartbeat_ms`` it is online until that long after its last
:meth:`Directory.heartbeat` instead — for agents that come
and go, like shell commands. Refusals raise :class:`~agent_sdk.ledger.LedgerRefusal`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from agent_sdk.client import RelayClient
from agent_sdk.ledger import Ledger, LedgerRefusal

log = logging.getLogger("formicary.sdk")

Participants = list[dict[str, Any]]


class Directory:
    """The directory of one namespace, through one client."""

    def __init__(self, client: RelayClient, ns: str) -> None:
        self.client = client
        self.ns = ns
        self._requests = Ledger(client, ns)
        self._profile: dict[str, Any] | None = None

    async def join(
        self,
        name: str,
        *,
        capabilities: Sequence[str] = (),
        role: str = "",
        endpoint: str = "",
        meta: Any = None,
        heartbeat_ms: int | None = None,
    ) -> dict[str, Any]:
        """Join (or update the profile); returns the profile as the relay recorded it."""
        body: dict[str, Any] = {
            "name": name,
            "capabilities": list(capabilities),
            "role": role,
            "endpoint": endpoint,
        }
        if meta is not None:
            body["meta"] = meta
        if heartbeat_ms is not None:
            body["heartbeat_ms"] = heartbeat_ms
        profile = await self._requests.request("dir.join", body)
        if heartbeat_ms is None and self._rejoin not in self.client.on_reconnect:
            # Presence by connection ends with the connection: join again on the next.
            self.client.on_reconnect.append(self._rejoin)
        self._profile = body
        return profile

    async def _rejoin(self) -> None:
        if self._profile is not None and "heartbeat_ms" not in self._profile:
            try:
                await self._requests.request("dir.join", self._profile)
            except LedgerRefusal as exc:  # the relay's rules changed under us: say so
                log.warning("could not join %s again after a reconnect: %s", self.ns, exc)

    async def leave(self) -> None:
        self._profile = None  # and do not join again on a reconnect
        await self._requests.request("dir.leave", {})

    async def heartbeat(self) -> int:
        """Stay online (heartbeat presence); returns the new expiry (ms)."""
        return int((await self._requests.request("dir.heartbeat", {}))["expires_ms"])

    async def list(self, *, online: bool = True) -> Participants:
        """Participants in join order: online ones, or everyone with ``online=False``."""
        args: dict[str, Any] = {"online": online, "limit": 1000}
        return await self.client.query_all(self.ns, "dir.list", "participants", args, _key)

    async def get(self, agent: bytes) -> dict[str, Any]:
        return dict(await self.client.query(self.ns, "dir.get", {"agent": agent}))

    async def find(
        self, capability: str, *, role: str | None = None, online: bool = True
    ) -> Participants:
        """Participants with ``capability`` (``tag`` or ``tag@version``), and ``role``."""
        args: dict[str, Any] = {"capability": capability, "online": online, "limit": 1000}
        if role is not None:
            args["role"] = role
        return await self.client.query_all(self.ns, "dir.find", "participants", args, _key)

    async def count(self, *, online: bool = True) -> int:
        return int((await self.client.query(self.ns, "dir.count", {"online": online}))["count"])


def _key(participant: dict[str, Any]) -> bytes:
    """Where a page of participants continues: after this agent."""
    key: bytes = participant["agent"]
    return key
