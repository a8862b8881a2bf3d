"""Decision routing and conflicts from an agent's side (protocol.md 8.16).

The namespace owner ``set_policy``: which event kinds go to which directory roles
(``now`` or in a ``digest``), and the conflict ladder. Agents ``decide`` with the
entity a decision touches; two that conflict raise a conflict the relay walks up
the ladder. ``notices()`` yields what was routed to this agent; ``resolve`` settles
a conflict (a proposal, until the other agents agree, when it keeps your own).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from agent_sdk.client import Delivery, RelayClient, Subscription
from agent_sdk.ledger import Items, Ledger, number_of

TOLD = ("route.notice", "route.digest")
STEPS = ("conflict.raised", "conflict.escalated", "conflict.resolved")


def route(kinds: Sequence[str], role: str, latency: str = "now") -> dict[str, Any]:
    """One route of a policy: events of ``kinds`` to members of ``role``."""
    return {"kinds": list(kinds), "role": role, "latency": latency}


class Decisions:
    """Decisions, their routing and their conflicts in one namespace."""

    def __init__(self, client: RelayClient, ns: str) -> None:
        self.client = client
        self.ns = ns
        self._requests = Ledger(client, ns)

    async def set_policy(
        self,
        routes: Sequence[dict[str, Any]] = (),
        *,
        digest_ms: int | None = None,
        conflicts: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """As the namespace's owner. ``conflicts``: ``window_ms``, ``rule`` (none,
        first, last), ``step_ms``, ``arbiter`` (a role), ``approvers`` (keys) and/or
        ``approver_role``."""
        body: dict[str, Any] = {"routes": list(routes)}
        if digest_ms is not None:
            body["digest_ms"] = digest_ms
        if conflicts is not None:
            body["conflicts"] = conflicts
        return await self._requests.request("decision.policy", body)

    async def decide(
        self, entity: str, title: str, decision: str, *, rationale: str = "", **more: Any
    ) -> dict[str, Any]:
        """Record a decision on ``entity``: ``{id}``, with ``conflict`` when it raised
        or joined one."""
        body = {"title": title, "decision": decision, "rationale": rationale, "entity": entity}
        return await self._requests.request("decision.add", {**body, **more})

    async def resolve(self, conflict: str, keep: str, note: str = "") -> dict[str, Any]:
        """Keep decision ``keep``. The answer has ``by`` (the step that settled it) when
        it is resolved, none when it is only this agent's proposal."""
        body = {"conflict": conflict, "keep": keep, "note": note}
        return await self._requests.request("conflict.resolve", body)

    async def conflict(self, conflict: str) -> dict[str, Any]:
        answer = await self.client.query(self.ns, "conflict.show", {"conflict": conflict})
        return dict(answer)

    async def wait_resolved(self, conflict: str) -> dict[str, Any]:
        """Wait until ``conflict`` is resolved; returns it (``kept``, ``by``). Follows
        the namespace live, so a rule, an arbiter or a person's click wakes it at once."""
        async with self.client.subscribe(self.ns, kinds=("conflict.resolved",)) as feed:
            while True:
                shown = await self.conflict(conflict)  # (after subscribing: none is missed)
                if shown["status"] == "resolved":
                    return shown
                async for item in feed:
                    if (
                        isinstance(item, Delivery)
                        and item.event.event.body.get("conflict") == conflict
                    ):
                        break

    async def conflicts(self, status: str | None = None, step: str | None = None) -> Items:
        args: dict[str, Any] = {"limit": 1000}
        if status is not None:
            args["status"] = status
        if step is not None:
            args["step"] = step
        found: Items = []
        while True:
            answer = await self.client.query(self.ns, "conflict.list", args)
            found += answer["conflicts"]
            if not answer["more"] or not answer["conflicts"]:
                return found
            args["after"] = int(found[-1]["conflict"][3:])

    async def on(self, entity: str) -> Items:
        """The decisions that name ``entity``, oldest first."""
        args = {"entity": entity}
        return await self.client.query_all(self.ns, "decision.list", "decisions", args, number_of)

    async def policy(self) -> dict[str, Any]:
        return dict(await self.client.query(self.ns, "decision.policy", {}))

    @asynccontextmanager
    async def notices(self, start: int = 1, roles: Sequence[str] = ()) -> AsyncIterator[Notices]:
        """``async with decisions.notices() as told:`` then ``async for notice in told``:
        what was routed to this agent (a ``route.notice`` or ``route.digest`` body, with
        ``notice`` its kind and ``seq``), from log position ``start``, so an agent that
        was away catches up, then live. With ``roles``, also what was routed to those
        roles: a notice names at most 256 keys, so a member of a bigger role says which
        roles it holds."""
        async with self.client.subscribe(self.ns, kinds=TOLD, start=start) as feed:
            yield Notices(feed, self.client.identity.public_key, frozenset(roles))


class Notices:
    """The notices and digests of a subscription that name one agent in ``to``."""

    def __init__(self, feed: Subscription, me: bytes, roles: frozenset[str]) -> None:
        self.feed = feed
        self.me = me
        self.roles = roles

    def __aiter__(self) -> Notices:
        return self

    async def __anext__(self) -> dict[str, Any]:
        async for item in self.feed:
            if not isinstance(item, Delivery):
                continue
            event = item.event.event
            if self.me in event.body.get("to", ()) or event.body.get("role") in self.roles:
                return {"notice": event.kind, "seq": item.receipt.seq, **event.body}
        raise StopAsyncIteration
