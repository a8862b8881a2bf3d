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
import weakref
from collections.abc import Sequence
from functools import partial
from typing import Any

from agent_sdk.client import RelayClient
from agent_sdk.errors import ProtocolError
from agent_sdk.ledger import Ledger, LedgerRefusal

log = logging.getLogger("formicary.sdk")

Participants = list[dict[str, Any]]


_PRESENCE: weakref.WeakKeyDictionary[RelayClient, dict[str, dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)
"""Per client: the profile of each namespace it joined by connection."""


def _presence(client: RelayClient) -> dict[str, dict[str, Any]]:
    profiles = _PRESENCE.get(client)
    if profiles is None:
        profiles = _PRESENCE[client] = {}
        client.on_reconnect.append(partial(_join_again, client, profiles))
    return profiles


async def _join_again(client: RelayClient, profiles: dict[str, dict[str, Any]]) -> None:
    for ns in list(profiles):
        profile = profiles.get(ns)  # as it is now: a leave meanwhile takes it out
        if profile is None:
            continue
        try:
            await Ledger(client, ns).request("dir.join", profile)
        except (LedgerRefusal, ProtocolError) as exc:  # rules changed, rate limited...
            log.warning("could not join %s again after a reconnect: %s", ns, exc)


class Directory:
    """The directory of one namespace, through one client."""

    def __init__(self, client: RelayClient, ns: str) -> None:
        self.client = client
        self.ns = ns
        self._requests = Ledger(client, ns)

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
        # Presence by connection ends with the connection: join again on the next.
        # Kept per client and namespace, not per Directory object: a leave through
        # another object must stop it, and joining again must not add a second one.
        presence = _presence(self.client)
        if heartbeat_ms is None:
            presence[self.ns] = body
        else:
            presence.pop(self.ns, None)
        return profile

    async def leave(self) -> None:
        _presence(self.client).pop(self.ns, None)  # and do not join again on a reconnect
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
