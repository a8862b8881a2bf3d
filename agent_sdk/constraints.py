"""Shared constraints from an agent's side: budgets that agents draw on together.

``define`` a constraint with a limit; ``reserve`` an amount before acting (refused
with ``exceeded`` when the rest of the limit is not enough), then ``commit`` what
was used (the rest goes back) or ``release`` it. A reservation lapses at its
expiry, like a lease, unless its holder ``renew``s it first. protocol.md 8.13.
"""

from __future__ import annotations

from typing import Any

from agent_sdk.client import RelayClient
from agent_sdk.ledger import Ledger


class Constraints:
    """The shared constraints of one namespace, through one client."""

    def __init__(self, client: RelayClient, ns: str) -> None:
        self.client = client
        self.ns = ns
        self._requests = Ledger(client, ns)

    async def define(self, name: str, limit: int) -> dict[str, Any]:
        return await self._requests.request("constraint.define", {"name": name, "limit": limit})

    async def reserve(self, name: str, amount: int, ttl_ms: int | None = None) -> dict[str, Any]:
        """``{reservation, amount, expires_ms, limit, used, reserved}``."""
        body: dict[str, Any] = {"name": name, "amount": amount}
        if ttl_ms is not None:
            body["ttl_ms"] = ttl_ms
        return await self._requests.request("constraint.reserve", body)

    async def renew(self, name: str, reservation: str, ttl_ms: int | None = None) -> dict[str, Any]:
        """Extend an open reservation of yours to now + ``ttl_ms``: ``{reservation,
        amount, expires_ms, ...}``; refused ``expired`` once it lapsed."""
        body: dict[str, Any] = {"name": name, "reservation": reservation}
        if ttl_ms is not None:
            body["ttl_ms"] = ttl_ms
        return await self._requests.request("constraint.renew", body)

    async def commit(self, name: str, reservation: str, amount: int | None = None) -> None:
        body: dict[str, Any] = {"name": name, "reservation": reservation}
        if amount is not None:
            body["amount"] = amount
        await self._requests.request("constraint.commit", body)

    async def release(self, name: str, reservation: str) -> None:
        await self._requests.request(
            "constraint.release", {"name": name, "reservation": reservation}
        )

    async def show(self, name: str) -> dict[str, Any]:
        answer: dict[str, Any] = await self.client.query(self.ns, "constraint.show", {"name": name})
        return answer
