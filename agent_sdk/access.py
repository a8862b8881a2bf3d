"""Namespace access from an agent's side: read and set a namespace's policy.

A namespace's owner (the author of its first event) publishes ``ns.policy`` to
make it ``public``, ``listed`` (anyone reads, listed keys write) or ``private``
(listed keys read and write), or to hand it to another owner. protocol.md §16.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agent_sdk.client import Published, RelayClient

POLICY = "ns.policy"
MODES = ("public", "listed", "private")


@dataclass(frozen=True, slots=True)
class NamespacePolicy:
    owner: bytes
    mode: str
    writers: tuple[bytes, ...]
    readers: tuple[bytes, ...]


async def set_policy(
    client: RelayClient,
    ns: str,
    mode: str,
    *,
    writers: Iterable[bytes] = (),
    readers: Iterable[bytes] = (),
    owner: bytes | None = None,
    invite: bytes | None = None,
) -> Published:
    """Publish ``ns``'s new policy (the lists replace the old ones). ``owner`` hands
    the namespace over; ``invite`` (from the relay's operator) creates it on a relay
    that creates namespaces by invitation. Raises ``forbidden`` for a non-owner."""
    if mode not in MODES:
        raise ValueError(f"mode is one of {', '.join(MODES)}")
    body: dict[str, Any] = {
        "mode": mode,
        "writers": sorted(set(writers)),
        "readers": sorted(set(readers)),
    }
    if owner is not None:
        body["owner"] = owner
    if invite is not None:
        body["invite"] = invite
    return await client.publish(ns, POLICY, body, nonce=client.nonce())


async def get_policy(client: RelayClient, ns: str) -> NamespacePolicy:
    """``ns``'s owner and policy now (``not_found`` before its first event)."""
    body = await client.query(ns, POLICY)
    return NamespacePolicy(
        owner=body["owner"],
        mode=body["mode"],
        writers=tuple(body["writers"]),
        readers=tuple(body["readers"]),
    )
