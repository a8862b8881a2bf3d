"""Task auctions from an agent's side: open, bid, withdraw, confirm, reject, wait.

A requester opens an auction for a task (a new work order, or one of its open ones)
with a deadline and an award rule; members bid a stake and a price. The relay closes
the auction at the deadline and awards the order as a lease:
``award = await auctions.wait_award(auction)`` says to whom, with the fencing token.
The winner confirms (``confirm``) within the window, works, and marks the order done
through the ledger with ``Claim(award["wo"], award["token"], award["expires_ms"])``.
Refusals raise :class:`~agent_sdk.ledger.LedgerRefusal` (``closed``,
``insufficient_stake``, ``ineligible``, ``own_auction``, ``over_reserve``, ...).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from agent_sdk.client import Delivery, Live, RelayClient
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.ledger import Claim, Ledger, LedgerRefusal, number_of
from agent_sdk.wire import canonical, digest

SALT_BYTES = 32
"""The size of a salt :func:`new_salt` draws (the relay takes 16 to 64 bytes)."""


def new_salt() -> bytes:
    """A fresh random salt for a sealed bid (:meth:`Auctions.commit`)."""
    return secrets.token_bytes(SALT_BYTES)


def commitment(auction: str, bidder: bytes, price: int, salt: bytes) -> bytes:
    """What a sealed bid commits to (docs/protocol.md): BLAKE2b-256 of the canonical
    map ``{auction, bidder, price, salt}``."""
    return digest(canonical({"auction": auction, "bidder": bidder, "price": price, "salt": salt}))


class Auctions:
    """The auctions of one namespace, through one client."""

    def __init__(self, client: RelayClient, ns: str) -> None:
        self.client = client
        self.ns = ns
        self._requests = Ledger(client, ns)

    async def open(
        self,
        *,
        title: str | None = None,
        wo: str | None = None,
        duration_ms: int | None = None,
        deadline_ms: int | None = None,
        rule: str = "stake_x_reputation",
        capabilities: Sequence[str] = (),
        min_reputation: float | None = None,
        reserve: int | None = None,
        sealed: bool = False,
        **terms: int,
    ) -> dict[str, Any]:
        """Open an auction; returns ``{auction, wo, deadline_ms, closes_ms, rule, sealed}``.
        ``terms``: ``confirm_ms``, ``lease_ms``, ``slash_ppm``, ``reveal_ms``,
        ``forfeit_ppm``."""
        body: dict[str, Any] = {
            "rule": rule,
            "sealed": sealed,
            "capabilities": list(capabilities),
            **terms,
        }
        for key, value in (
            ("title", title),
            ("wo", wo),
            ("duration_ms", duration_ms),
            ("deadline_ms", deadline_ms),
            ("reserve", reserve),
            ("min_reputation", min_reputation),
        ):
            if value is not None:
                body[key] = value
        return await self._requests.request("auction.open", body)

    async def bid(self, auction: str, stake: int, price: int, note: str = "") -> dict[str, Any]:
        body = {"auction": auction, "stake": stake, "price": price, "note": note}
        return await self._requests.request("auction.bid", body)

    async def commit(
        self, auction: str, stake: int, price: int, note: str = "", *, salt: bytes | None = None
    ) -> bytes:
        """Bid on a sealed auction: lock ``stake`` and commit to ``price`` without
        showing it. Returns the salt; :meth:`reveal` it after the deadline.

        ``salt`` (16 to 64 bytes; :func:`new_salt` draws one, as this does without
        it) lets the caller hold the salt before the commitment is sent: a commit
        whose answer never comes (cancelled, a lost connection, a home relay out of
        reach) may still land, and only its salt reveals it. Committing again with
        the same salt and price makes the same commitment, so whichever of the two
        lands last (a new commitment replaces the bidder's old one) that salt
        reveals it.

        A negative price, or a salt the relay would not take at the reveal, is
        refused here (``bad_request``): a bid never revealed loses part of its stake
        at the close."""
        if not isinstance(price, int) or price < 0:
            reason = f"price {price!r}: a price is a whole number, 0 or more"
            raise LedgerRefusal("bad_request", reason, None)
        if salt is None:
            salt = new_salt()
        elif not isinstance(salt, bytes) or not 16 <= len(salt) <= 64:
            raise LedgerRefusal("bad_request", "a salt is 16 to 64 bytes", None)
        sealed = commitment(auction, self.client.identity.public_key, price, salt)
        body = {"auction": auction, "stake": stake, "commitment": sealed, "note": note}
        await self._requests.request("auction.commit", body)
        return salt

    async def reveal(self, auction: str, price: int, salt: bytes) -> None:
        """Open a sealed bid, between the deadline and the end of the reveal window."""
        await self._requests.request(
            "auction.reveal", {"auction": auction, "price": price, "salt": salt}
        )

    async def withdraw(self, auction: str) -> int:
        """Withdraw our bid; returns the stake unlocked."""
        answer = await self._requests.request("auction.withdraw", {"auction": auction})
        return int(answer["unlocked"])

    async def confirm(self, auction: str) -> None:
        await self._requests.request("auction.confirm", {"auction": auction})

    async def reject(
        self, auction: str, reason: str = "", agent: bytes | None = None
    ) -> dict[str, Any]:
        """As the requester: the awardee's work is not acceptable (it is slashed).

        ``agent``, the awardee whose work was judged, makes the rejection refused
        (``changed``) if the award passed to another meanwhile; without it the
        current awardee is rejected, whoever it is by then."""
        body: dict[str, Any] = {"auction": auction, "reason": reason}
        if agent is not None:
            body["agent"] = agent
        return await self._requests.request("auction.reject", body)

    async def show(self, auction: str) -> dict[str, Any]:
        return dict(await self.client.query(self.ns, "auction.show", {"auction": auction}))

    async def list(self, phase: str | None = None) -> list[dict[str, Any]]:
        """Every auction (in ``phase``), in opening order, page after page."""
        args: dict[str, Any] = {"limit": 1000} if phase is None else {"phase": phase, "limit": 1000}
        return await self.client.query_all(self.ns, "auction.list", "auctions", args, number_of)

    async def stake(self, agent: bytes | None = None) -> dict[str, Any]:
        """Balance, locked stake and reputation of ``agent`` (default: this one)."""
        key = agent or self.client.identity.public_key
        return dict(await self.client.query(self.ns, "stake.show", {"agent": key}))

    async def wait_award(
        self, auction: str, *, after: bytes | None = None
    ) -> dict[str, Any] | None:
        """Wait until ``auction`` is awarded (to someone other than ``after``, to wait
        past a failed award); returns the award, or ``None`` when nobody is left."""
        async with self.client.subscribe(self.ns, kinds=["auction.*"]) as feed:
            # The feed only wakes us; the answer is read from the auction's state. An
            # event sequenced between the subscribe and a show comes after it on the
            # feed, and may name an award that has failed since.
            seen: dict[str, Any] | None = None
            while True:
                shown = await self.show(auction)  # after subscribing: nothing is missed
                award = _current(shown)
                if award is not None and award["agent"] != after:
                    now_held = (award["agent"], award["token"])
                    if seen is not None and (seen.get("agent"), seen.get("token")) == now_held:
                        return seen  # the event's award: with its lease's expires_ms
                    return award
                if award is None and shown["phase"] in ("unawarded", "completed"):
                    return None
                seen = await _next_award_event(feed, auction)


async def _next_award_event(feed: Any, auction: str) -> dict[str, Any] | None:
    """Wait for the relay's next award event of ``auction``; its award, if any."""
    async for item in feed:
        if isinstance(item, Live):
            continue
        assert isinstance(item, Delivery)
        event = item.event.event
        body = event.body
        if event.author != item.receipt.relay or body.get("auction") != auction:
            continue
        if event.kind in ("auction.closed", "auction.failed", "auction.completed"):
            award = body.get("award")
            return dict(award) if isinstance(award, dict) else None
    raise ProtocolError(ErrorCode.UNKNOWN_SUBSCRIPTION, "the auction feed ended")


def as_claim(award: dict[str, Any]) -> Claim:
    """The award as a ledger claim: renew, note and finish the order with it."""
    return Claim(order=award["wo"], token=award["token"], expires_ms=award["expires_ms"])


def _current(shown: dict[str, Any]) -> dict[str, Any] | None:
    """The current award as the award events carry it (the awardee's bid from the
    bids shown; absent if cut to fit the answer)."""
    if shown["phase"] not in ("awarded", "confirmed") or shown["awardee"] is None:
        return None
    award = {"agent": shown["awardee"], "wo": shown["wo"], "token": shown["token"],
             "confirm_by": shown["confirm_by"], "expires_ms": shown.get("expires_ms")}  # fmt: skip
    for bid in shown["bids"]:
        if bid["bidder"] == shown["awardee"]:
            award |= {"stake": bid["stake"], "price": bid["price"]}
    return award


class Reputation:
    """Reputation in one namespace: scores, and staked vouches."""

    def __init__(self, client: RelayClient, ns: str) -> None:
        self.client = client
        self.ns = ns
        self._requests = Ledger(client, ns)

    async def show(self, agent: bytes | None = None) -> dict[str, Any]:
        key = agent or self.client.identity.public_key
        return dict(await self.client.query(self.ns, "rep.show", {"agent": key}))

    async def vouch(self, agent: bytes, weight: int, reason: str = "") -> float:
        """Vouch for ``agent`` with ``weight`` stake (locked until revoked); returns
        what the vouch adds to its score (bounded by ours)."""
        body = {"for": agent, "weight": weight, "reason": reason}
        return float((await self._requests.request("rep.vouch", body))["value"])

    async def revoke(self, agent: bytes) -> int:
        """Withdraw our vouch for ``agent``; returns the stake unlocked."""
        return int((await self._requests.request("rep.revoke", {"for": agent}))["unlocked"])
