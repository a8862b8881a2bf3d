"""Semantic contracts from an agent's side: register a kind's schema, fetch the
registry, and check a body locally before sending it (protocol.md 8.15)."""

from __future__ import annotations

from typing import Any

from agent_sdk.client import Published, RelayClient
from agent_sdk.schemas import errors

REGISTER = "schema.register"
VERSION_FIELD = "$schema"
"""The body field naming the version a body fits (protocol.md 8.15)."""


class Contracts:
    """The registered event kinds of one namespace, through one client."""

    def __init__(self, client: RelayClient, ns: str) -> None:
        self.client = client
        self.ns = ns
        self._known: dict[str, list[dict[str, Any]]] = {}

    async def register(
        self, kind: str, version: int, schema: dict[str, Any], *, compatible: bool | None = None
    ) -> Published:
        body: dict[str, Any] = {"kind": kind, "version": version, "schema": schema}
        if compatible is not None:
            body["compatible"] = compatible
        return await self.client.publish(self.ns, REGISTER, body, nonce=self.client.nonce())

    async def fetch(self, kind: str) -> list[dict[str, Any]]:
        """Every version of ``kind``: ``[{version, schema, compatible}]``; kept for
        :meth:`check`."""
        answer = await self.client.query(self.ns, "schema.get", {"kind": kind})
        self._known[kind] = list(answer["versions"])
        return self._known[kind]

    async def kinds(self) -> list[dict[str, Any]]:
        return list((await self.client.query(self.ns, "schema.list"))["kinds"])

    def check(self, kind: str, body: Any, version: int | None = None) -> list[str]:
        """Where ``body`` breaks the fetched schema of ``kind`` (``version``, else the
        one the body names in ``"$schema"``, else the latest): the same paths the
        relay would refuse it with. The ``"$schema"`` field is not checked itself; a
        version that is not registered is refused as the relay refuses it."""
        versions = self._known.get(kind)
        if not versions:
            return []
        if isinstance(body, dict) and VERSION_FIELD in body:
            if version is None:
                version = body[VERSION_FIELD]
            body = {k: v for k, v in body.items() if k != VERSION_FIELD}
        if version is None:
            version = len(versions)
        if type(version) is not int or not 1 <= version <= len(versions):
            return [f"{kind} has versions 1 to {len(versions)}, not {version!r}"]
        return errors(versions[version - 1]["schema"], body)
