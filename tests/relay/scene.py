"""A relay node in virtual time, and agents that ask it things (the coordination
tests' common helper)."""

from __future__ import annotations

from typing import Any

from agent_sdk.identity import Identity
from agent_sdk.wire import Event, SignedEvent, decode, sign_event
from relay.coordination.requests import REQUEST_KINDS
from relay.node import RelayNode


class Scene:
    def __init__(self, node: RelayNode, ns: str) -> None:
        self.node = node
        self.ns = ns
        self.nonce = 0

    def signed(self, who: Identity, kind: str, body: Any) -> SignedEvent:
        """``who``'s event of ``kind``, now (each with a nonce of its own)."""
        self.nonce += 1
        event = Event(
            self.ns, kind, who.public_key, body, ts=self.node.wall_ms(),
            nonce=self.nonce.to_bytes(4),
        )  # fmt: skip
        return sign_event(event, who.sign)

    async def ask(self, who: Identity, kind: str, body: Any) -> tuple[str, dict[str, Any]]:
        """Publish ``who``'s event; the relay's outcome (kind, body) for a request,
        ``("", {})`` for any other kind."""
        request = await self.node.publish(self.signed(who, kind, body))
        located = self.node.outcome_of(request.id)
        if kind not in REQUEST_KINDS:
            return "", {}
        assert located is not None
        fields = decode((await self.node.committed_record(located.ns, located.seq)).event)
        return fields["kind"], dict(fields["body"])
