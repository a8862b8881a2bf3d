"""Task auctions (contract-net with stakes and confirmation), decided from the log (pure).

Theory of operation
-------------------
A requester opens an auction for a task: a new work order (or one of its open ones)
that only the auction may give out (the ledger holds it *reserved*). Members bid
before the deadline with a stake, locked from their balance, and a price. At the
deadline the relay closes the auction itself: it ranks the eligible bids by the
award rule, unlocks every stake but the winner's, and awards the order to the
winner as a ledger lease. The winner confirms within ``confirm_ms`` or the award
passes on (unslashed). An award that fails — the winner releases the order, lets the
lease expire, or the requester rejects the work — slashes ``slash_ppm`` of the
winner's stake and passes the order to the next bidder in the ranking, who stakes
again. The order marked done by the awardee completes the auction and unlocks its
stake. Each of these is a relay event in the log, re-applied on replay.

Award rules, ties broken the same way everywhere (so a replay picks the same winner):

* ``stake_x_reputation``: highest ``stake * (1 + max(0, reputation))``, then lower
  price, then earlier bid (log order);
* ``lowest_price``: lowest price, then higher stake, then earlier bid;
* ``first_eligible``: earliest bid.

The relay's timer asks for the next deadline and for what is due after every outcome
it appends in the namespace, so neither may cost a pass over the open auctions or the
awards in flight: closing times are kept in a heap, and so are the confirmation windows
of awards (entries go stale as auctions close, awards are confirmed or pass on, and are
dropped as they surface; a heap is rebuilt when stale entries outnumber the active
auctions). What ends an award is mostly a move of its order (done, released, blocked,
expired), which any request may bring: the ledger notes the orders under auction that
moved or were renewed, and a wake settles only those awards, the ones whose window came,
and the ones whose lease ran out before the ledger's timer reopened the order (a third
heap, of the leases of awards found held).
"""

from __future__ import annotations

import enum
import heapq
from dataclasses import dataclass, field
from typing import Any

from agent_sdk.auctions import commitment
from relay.coordination.directory import Capability, Directory
from relay.coordination.fields import Conflict
from relay.coordination.leases import Lease
from relay.coordination.ledger import Contract, Done, Ledger, Status, WorkOrder
from relay.coordination.stakes import Reputation, Stakes

RULES = ("stake_x_reputation", "lowest_price", "first_eligible")


def vouch_key(vouchee: bytes) -> str:
    """The name of the stake a vouch for ``vouchee`` locks."""
    return f"vouch:{vouchee.hex()}"


class Phase(enum.Enum):
    OPEN = "open"
    AWARDED = "awarded"
    """Given to ``ranking[award]``, who has not confirmed yet."""
    CONFIRMED = "confirmed"
    COMPLETED = "completed"
    UNAWARDED = "unawarded"
    """Nobody (left) to give the task to."""


class Op(enum.Enum):
    AWARD = "award"
    CONFIRM = "confirm"
    PASS = "pass"
    COMPLETE = "complete"
    EXHAUST = "exhaust"


TRANSITIONS: dict[tuple[Phase, Op], Phase] = {
    (Phase.OPEN, Op.AWARD): Phase.AWARDED,
    (Phase.OPEN, Op.EXHAUST): Phase.UNAWARDED,
    (Phase.AWARDED, Op.CONFIRM): Phase.CONFIRMED,
    (Phase.AWARDED, Op.AWARD): Phase.AWARDED,
    (Phase.CONFIRMED, Op.AWARD): Phase.AWARDED,
    (Phase.AWARDED, Op.EXHAUST): Phase.UNAWARDED,
    (Phase.CONFIRMED, Op.EXHAUST): Phase.UNAWARDED,
    (Phase.AWARDED, Op.COMPLETE): Phase.COMPLETED,
    (Phase.CONFIRMED, Op.COMPLETE): Phase.COMPLETED,
}
"""Every legal move of an auction; anything else is a refusal or our bug."""


@dataclass
class Bid:
    bidder: bytes
    stake: int
    price: int
    note: str
    at_ms: int
    order: int
    """Log order among this auction's bids: the last tie-break."""
    commitment: bytes | None = None
    """Sealed auctions: the hash of the price, revealed after the deadline."""
    revealed: bool = True


@dataclass
class Auction:
    id: str
    requester: bytes
    wo: str
    deadline_ms: int
    rule: str
    capabilities: tuple[Capability, ...] = ()
    min_reputation: float | None = None
    """No bar when ``None`` (a failure's score decays towards 0 but stays below it)."""
    reserve: int | None = None
    confirm_ms: int = 60_000
    lease_ms: int = 30 * 60 * 1000
    slash_ppm: int = 200_000
    sealed: bool = False
    reveal_ms: int = 0
    """Sealed auctions: how long after the deadline bidders may reveal."""
    forfeit_ppm: int = 100_000
    """Sealed auctions: the part of an unrevealed commitment's stake that is lost."""
    phase: Phase = Phase.OPEN
    bids: dict[bytes, Bid] = field(default_factory=dict)
    ranking: list[bytes] = field(default_factory=list)
    award: int = -1
    """Index into ``ranking`` of the current awardee."""
    token: int = 0
    confirm_by: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    bid_count: int = 0

    @property
    def closes_ms(self) -> int:
        """When the relay closes it: the deadline, or the end of the reveal window."""
        return self.deadline_ms + (self.reveal_ms if self.sealed else 0)

    @property
    def awardee(self) -> bytes | None:
        return self.ranking[self.award] if 0 <= self.award < len(self.ranking) else None


@dataclass
class Auctions:
    auctions: dict[str, Auction] = field(default_factory=dict)
    active: dict[str, None] = field(default_factory=dict)
    """Auctions not ended yet, in opening order: all the timer needs to look at."""
    # What follows is derived from the auctions (the timer's indexes), so it is left out
    # of equality: replay compares the auctions, not how they were found.
    _closing: list[tuple[int, str]] = field(default_factory=list, repr=False, compare=False)
    """A heap of (closes_ms, id) of opened auctions; stale once one is no longer open."""
    _confirming: list[tuple[int, str]] = field(default_factory=list, repr=False, compare=False)
    """A heap of (confirm_by, id) per award; stale once confirmed, passed on or ended."""
    _settling: dict[str, None] = field(default_factory=dict, repr=False, compare=False)
    """The awarded and confirmed auctions: the awards in flight."""
    _lapsing: list[tuple[int, str]] = field(default_factory=list, repr=False, compare=False)
    """A heap of (lease expiry, id) of awards :meth:`due` found held: a lease may run out
    before the ledger's timer reopens its order. Stale once renewed or ended."""
    _places: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    """Active auction -> its place in ``active`` (the order :meth:`due` answers in)."""
    _opened: int = field(default=0, repr=False, compare=False)
    """The next place to give."""

    # -- requests ---------------------------------------------------------------------

    def open(self, auction: Auction, ledger: Ledger, title: str | None, now_ms: int) -> Auction:
        if auction.rule not in RULES:
            raise Conflict("bad_request", f"rule must be one of {', '.join(RULES)}")
        bounds = ledger.leases.bounds
        if not bounds.min_ms <= auction.lease_ms <= bounds.max_ms:
            limits = f"{bounds.min_ms} to {bounds.max_ms}"
            raise Conflict("bad_ttl", f"lease_ms {auction.lease_ms} is outside {limits}")
        if title is not None:
            created = ledger.create(Contract(title=title), auction.requester, now_ms)
            assert isinstance(created, Done)  # (no parent: creating cannot be refused)
            auction.wo = created.order
        else:
            order = ledger.orders.get(auction.wo)
            if order is None:
                raise Conflict("not_found", f"no work order {auction.wo}")
            if order.creator != auction.requester:
                raise Conflict("not_holder", f"{auction.wo} is not yours to auction")
            if ledger.status(auction.wo, now_ms) is not Status.OPEN:
                raise Conflict("bad_transition", f"{auction.wo} is not open")
            if order.contract.approval is not None:
                # An award is a lease the winner must finish; a gate stops that for a
                # person's decision, which the auction's timer would take for a drop.
                raise Conflict("bad_request", f"{auction.wo} needs approval: not auctioned")
        if auction.wo in ledger.reserved:
            raise Conflict("held", f"{auction.wo} is under auction {ledger.reserved[auction.wo]}")
        ledger.reserve(auction.wo, auction.id)
        self.auctions[auction.id] = auction
        if auction.id not in self.active:
            self._places[auction.id] = self._opened
            self._opened += 1
        self.active[auction.id] = None
        self._timed(auction)
        return auction

    def bid(
        self,
        auction_id: str,
        bid: Bid,
        stakes: Stakes,
        directory: Directory,
        reputation: Reputation,
    ) -> Bid:
        auction = self._get(auction_id)
        if auction.phase is not Phase.OPEN or bid.at_ms >= auction.deadline_ms:
            raise Conflict("closed", f"{auction_id} closed at {auction.deadline_ms}")
        if auction.sealed != (bid.commitment is not None):
            how = "commit a hash of your price" if auction.sealed else "bid a price"
            raise Conflict(
                "bad_request", f"{auction_id} is {'' if auction.sealed else 'not '}sealed: {how}"
            )
        if bid.bidder == auction.requester:
            raise Conflict("own_auction", "a requester does not bid on its own auction")
        member = directory.members.get(bid.bidder)
        if member is None or not directory.is_online(member, bid.at_ms):
            raise Conflict("ineligible", "only members online in the directory bid")
        missing = [str(c) for c in auction.capabilities if not member.can(c)]
        if missing:
            raise Conflict("ineligible", f"missing capabilities: {', '.join(missing)}")
        score = reputation.score(bid.bidder, bid.at_ms)
        if auction.min_reputation is not None and score < auction.min_reputation:
            raise Conflict("ineligible", f"reputation {score:.3f} < {auction.min_reputation}")
        if auction.reserve is not None and bid.price > auction.reserve:
            raise Conflict("over_reserve", f"price {bid.price} over the reserve {auction.reserve}")
        previous = auction.bids.get(bid.bidder)
        held = previous.stake if previous else 0
        if bid.stake > stakes.available(bid.bidder) + held:
            balance = stakes.available(bid.bidder) + held
            raise Conflict("insufficient_stake", f"stake {bid.stake} over the balance {balance}")
        stakes.unlock(bid.bidder, auction_id)  # a new bid replaces the old one
        stakes.lock(bid.bidder, auction_id, bid.stake)
        auction.bid_count += 1
        bid.order = auction.bid_count
        auction.bids[bid.bidder] = bid
        return bid

    def reveal(self, auction_id: str, bidder: bytes, price: int, salt: bytes, now_ms: int) -> Bid:
        """Open a sealed bid: the price and salt must hash to its commitment."""
        auction = self._get(auction_id)
        bid = auction.bids.get(bidder)
        if not auction.sealed or bid is None:
            raise Conflict("not_found", f"no sealed bid of yours on {auction_id}")
        if not auction.deadline_ms <= now_ms < auction.closes_ms or auction.phase is not Phase.OPEN:
            window = f"{auction.deadline_ms} to {auction.closes_ms}"
            raise Conflict("closed", f"reveals are taken from {window}")
        if bid.revealed:
            raise Conflict("bad_request", "revealed already")
        if commitment(auction_id, bidder, price, salt) != bid.commitment:
            raise Conflict("bad_reveal", "price and salt do not hash to your commitment")
        if auction.reserve is not None and price > auction.reserve:
            raise Conflict("over_reserve", f"price {price} over the reserve {auction.reserve}")
        bid.price, bid.revealed = price, True
        return bid

    def withdraw(self, auction_id: str, bidder: bytes, now_ms: int, stakes: Stakes) -> int:
        auction = self._get(auction_id)
        if auction.phase is not Phase.OPEN or now_ms >= auction.deadline_ms:
            raise Conflict("closed", f"{auction_id} is closed")
        if bidder not in auction.bids:
            raise Conflict("not_found", f"no bid of yours on {auction_id}")
        del auction.bids[bidder]
        return stakes.unlock(bidder, auction_id)

    def confirm(self, auction_id: str, agent: bytes, now_ms: int) -> Auction:
        auction = self._get(auction_id)
        if auction.phase is not Phase.AWARDED or auction.awardee != agent:
            raise Conflict("not_holder", f"{auction_id} is not awarded to you, or confirmed")
        if now_ms >= auction.confirm_by:
            raise Conflict("closed", f"the confirmation window closed at {auction.confirm_by}")
        self._move(auction, Op.CONFIRM, now_ms, "confirmed")
        return auction

    # -- the timer (and replay) ---------------------------------------------------------

    def due(
        self,
        now_ms: int,
        ledger: Ledger,
        stakes: Stakes,
        reputation: Reputation,
    ) -> list[dict[str, Any]]:
        """Close what reached its deadline; settle awards that ended. Each result is
        the body of a relay event (``kind`` inside), applied already.

        It decides what the pass over every active auction in opening order did (close
        the open ones whose time came, settle every awarded or confirmed one), without
        looking at the auctions that pass left alone:

        * the open ones due are the current entries of the closing heap up to
          ``now_ms``: every open auction has its entry, and only a close moves an
          auction out of open, so each one popped is closed below;
        * an award in flight settles (:meth:`settle` returns an event and changes
          state) exactly when its order is done or not held by the award's lease, or
          when it is unconfirmed at ``confirm_by``; otherwise it reads and changes
          nothing. So the awards visited are those whose order moved or was renewed
          since the last wake (the ledger's :meth:`~Ledger.take_moved`), those whose
          confirmation window came (the confirming heap: each one visited settles),
          and those whose lease, found held at a wake before, ran out by ``now_ms``
          (the lapsing heap: the ledger's timer may not have reopened the order yet).
          Stakes and reputation decide only what a settlement does, not whether;
        * closing or settling one auction moves no other's phase or order, so what the
          pass acts on is known before it starts; it goes in the order of ``active``
          (their places), as one outcome may depend on an earlier one's (a stake
          freed, a reputation recorded).
        """
        moved = self._moved(ledger)
        closing = self._popped(self._closing, now_ms, Phase.OPEN)
        unconfirmed = self._popped(self._confirming, now_ms, Phase.AWARDED)
        visit = set(moved).union(closing, unconfirmed, self._lapsed(now_ms, ledger))
        out = []
        for auction in [self.auctions[a] for a in sorted(visit, key=self._places.__getitem__)]:
            if auction.phase is Phase.OPEN and now_ms >= auction.closes_ms:
                # Closed at the timer's time: after downtime the award's windows start
                # now, not in the past (bids after the deadline are refused anyway).
                out.append(self.close(auction.id, now_ms, ledger, stakes, reputation))
            elif auction.phase in (Phase.AWARDED, Phase.CONFIRMED):
                settled = self.settle(auction.id, now_ms, ledger, stakes, reputation)
                if settled is not None:
                    out.append(settled)
        # A lease changes only with a move the ledger reports, so the awards whose order
        # moved are the ones whose lease may not be on the heap yet. One awarded just now
        # (closed, passed on) claimed its order: it is among those at the next wake.
        self._watch(moved, now_ms, ledger)
        return out

    def close(
        self, auction_id: str, at_ms: int, ledger: Ledger, stakes: Stakes, reputation: Reputation
    ) -> dict[str, Any]:
        auction = self._get(auction_id)
        forfeited = []
        for bidder, bid in list(auction.bids.items()):
            if not bid.revealed:  # a sealed bid never opened: part of its stake is lost
                forfeited.append([bidder, stakes.slash(bidder, auction_id, auction.forfeit_ppm)])
                del auction.bids[bidder]
        auction.ranking = _rank(auction, reputation, at_ms)
        winner = auction.ranking[0] if auction.ranking else None
        for bidder in auction.bids:
            if bidder != winner:
                stakes.unlock(bidder, auction_id)
        body: dict[str, Any] = {
            "kind": "auction.closed",
            "auction": auction_id,
            "at_ms": at_ms,
            "ranking": list(auction.ranking),
            "forfeited": forfeited,
        }
        body["award"] = self._award_next(auction, at_ms, ledger, stakes, first=True)
        return body

    def settle(
        self,
        auction_id: str,
        now_ms: int,
        ledger: Ledger,
        stakes: Stakes,
        reputation: Reputation,
        logged: str | None = None,
    ) -> dict[str, Any] | None:
        """Completion, failure or a lapsed confirmation of the current award, if any.

        ``logged`` is the ``reason`` of the ``auction.failed`` being replayed: the log
        says whether the award lapsed unconfirmed, so a log written under an older rule
        folds to what it says."""
        auction = self._get(auction_id)
        agent = auction.awardee
        assert agent is not None
        order = ledger.orders[auction.wo]
        base = {"auction": auction_id, "agent": agent, "at_ms": now_ms}
        if order.status is Status.DONE:
            stakes.unlock(agent, auction_id)
            reputation.record(agent, now_ms, 1.0)
            self._move(auction, Op.COMPLETE, now_ms, "completed")
            ledger.unreserve(auction.wo)
            return {"kind": "auction.completed", **base}
        lease = ledger.leases.holder(auction.wo, now_ms)
        held = order.status is Status.CLAIMED and lease is not None and lease.token == auction.token
        if not held and order.status is Status.CLAIMED:  # lapsed, the ledger's timer not yet run
            ledger.expire_leases([(auction.wo, auction.token)])
        # Unconfirmed when the award's claim outlived the confirmation window, decided by
        # when the claim ended (an expiry is stamped with the lease's own end), not by
        # when this timer runs: a late timer must not turn it into a slashed expiry.
        ended_ms = None if held else _claim_ended_ms(order)
        outlived = held or (ended_ms or 0) > auction.confirm_by  # (blocked after it, too)
        lapsed = auction.phase is Phase.AWARDED and now_ms >= auction.confirm_by and outlived
        if logged is not None:
            lapsed = logged == "unconfirmed"
        if lapsed:
            if held:
                ledger.release(auction.wo, agent, auction.token, now_ms)
            stakes.unlock(agent, auction_id)  # not confirming costs the award, not stake
            award = self._award_next(auction, now_ms, ledger, stakes)
            return {
                "kind": "auction.failed",
                **base,
                "reason": "unconfirmed",
                "slashed": 0,
                "award": award,
            }
        if held:
            return None
        reason = "expired" if order.last_op == "expire" else "released"
        return self.fail(auction_id, reason, now_ms, ledger, stakes, reputation)

    def fail(
        self,
        auction_id: str,
        reason: str,
        now_ms: int,
        ledger: Ledger,
        stakes: Stakes,
        reputation: Reputation,
    ) -> dict[str, Any]:
        """The awardee failed: slash its stake, give the order to the next bidder."""
        auction = self._get(auction_id)
        agent = auction.awardee
        assert agent is not None
        slashed = stakes.slash(agent, auction_id, auction.slash_ppm)
        reputation.record(agent, now_ms, -1.0)
        cuts = []
        for vouch in reputation.vouchers_of(agent):  # vouching for it had a price
            cut = stakes.cut(vouch.voucher, vouch_key(agent), auction.slash_ppm)
            if cut:
                cuts.append([vouch.voucher, cut])
        lease = ledger.leases.holder(auction.wo, now_ms)
        if lease is not None and lease.token == auction.token:  # rejected while held
            ledger.release(auction.wo, agent, auction.token, now_ms)
        award = self._award_next(auction, now_ms, ledger, stakes)
        return {
            "kind": "auction.failed",
            "auction": auction_id,
            "agent": agent,
            "at_ms": now_ms,
            "reason": reason,
            "slashed": slashed,
            "vouches_cut": cuts,
            "award": award,
        }

    def next_deadline_ms(self) -> int | None:
        """The earliest time an open auction closes or an award's confirmation window
        ends, if any: the least current entry of either heap."""
        closes = self._earliest(self._closing, Phase.OPEN)
        confirms = self._earliest(self._confirming, Phase.AWARDED)
        return min((t for t in (closes, confirms) if t is not None), default=None)

    # -- internals ------------------------------------------------------------------

    def _award_next(
        self, auction: Auction, now_ms: int, ledger: Ledger, stakes: Stakes, first: bool = False
    ) -> dict[str, Any] | None:
        """Give the order to the next bidder in the ranking who can still stake."""
        while True:
            auction.award += 1
            agent = auction.awardee
            if agent is None:
                self._move(auction, Op.EXHAUST, now_ms, "nobody left")
                ledger.unreserve(auction.wo)
                return None
            bid = auction.bids[agent]
            if not first and not stakes.lock(agent, auction.id, bid.stake):
                continue  # it spent its stake elsewhere since: the next one
            first = False
            ledger.reopen_blocked(auction.wo, now_ms, "reopened for the next bidder")
            granted = ledger.claim(auction.wo, agent, now_ms, auction.lease_ms, auction=auction.id)
            lease = granted.lease if isinstance(granted, Done) else None
            if lease is None:  # the order cannot be given out (done meanwhile, say)
                stakes.unlock(agent, auction.id)
                self._move(auction, Op.EXHAUST, now_ms, f"cannot award: {granted}")
                ledger.unreserve(auction.wo)
                return None
            auction.token = lease.token
            auction.confirm_by = now_ms + auction.confirm_ms
            self._move(auction, Op.AWARD, now_ms, f"awarded to {agent.hex()[:16]}")
            self._timed(auction)
            return {
                "agent": agent,
                "wo": auction.wo,
                "token": lease.token,
                "expires_ms": lease.expires_ms,
                "confirm_by": auction.confirm_by,
                "stake": bid.stake,
                "price": bid.price,
            }

    def _get(self, auction_id: str) -> Auction:
        auction = self.auctions.get(auction_id)
        if auction is None:
            raise Conflict("not_found", f"no auction {auction_id}")
        return auction

    def _move(self, auction: Auction, op: Op, at_ms: int, why: str) -> None:
        auction.phase = TRANSITIONS[(auction.phase, op)]  # a KeyError here is our bug
        auction.history.append({"at_ms": at_ms, "phase": auction.phase.value, "why": why})
        if auction.phase in (Phase.COMPLETED, Phase.UNAWARDED):
            self.active.pop(auction.id, None)
            self._settling.pop(auction.id, None)
            self._places.pop(auction.id, None)
        else:  # awarded or confirmed (no move leads back to open): an award in flight
            self._settling[auction.id] = None

    def _timed(self, auction: Auction) -> None:
        """Put the deadline of an auction just opened or awarded on the timer."""
        open_ = auction.phase is Phase.OPEN
        heap = self._closing if open_ else self._confirming
        heapq.heappush(heap, (auction.closes_ms if open_ else auction.confirm_by, auction.id))
        # Closes replayed from the log and confirmed awards leave stale entries behind
        # that surface only when their time comes: rebuild before they pile up
        # (amortised, each heap stays O(active auctions)).
        if len(heap) > 2 * len(self.active) + 64:
            live = (self.auctions[a] for a in self.active)
            if open_:
                heap[:] = [(a.closes_ms, a.id) for a in live if a.phase is Phase.OPEN]
            else:
                heap[:] = [(a.confirm_by, a.id) for a in live if a.phase is Phase.AWARDED]
            heapq.heapify(heap)

    def _current(self, auction_id: str, phase: Phase, at_ms: int) -> bool:
        """Is a heap entry still the auction's deadline: it closes, or its current award
        must be confirmed, at ``at_ms``?"""
        auction = self.auctions[auction_id]
        if auction.phase is not phase:
            return False
        return at_ms == (auction.closes_ms if phase is Phase.OPEN else auction.confirm_by)

    def _moved(self, ledger: Ledger) -> list[str]:
        """The awards in flight whose order moved or was renewed since the last wake."""
        reserved = (ledger.reserved.get(order_id) for order_id in ledger.take_moved())
        return [a for a in reserved if a is not None and a in self._settling]

    def _popped(self, heap: list[tuple[int, str]], now_ms: int, phase: Phase) -> list[str]:
        """Take from ``heap`` every entry up to ``now_ms``: the auctions of the current
        ones, in the order they came due (stale ones are dropped)."""
        due = []
        while heap and heap[0][0] <= now_ms:
            at_ms, auction_id = heapq.heappop(heap)
            if self._current(auction_id, phase, at_ms):
                due.append(auction_id)
        return due

    def _lapsed(self, now_ms: int, ledger: Ledger) -> list[str]:
        """Awards whose lease, held when :meth:`due` last looked, ran out by ``now_ms``.

        An entry is current while the award's lease is the one it was taken from; one
        renewed, released or replaced meanwhile was a move that the ledger reported."""
        heap, lapsed = self._lapsing, []
        while heap and heap[0][0] <= now_ms:
            expires_ms, auction_id = heapq.heappop(heap)
            lease = self._lease(self.auctions[auction_id], ledger)
            if lease is not None and lease.expires_ms == expires_ms:
                lapsed.append(auction_id)
        return lapsed

    def _watch(self, auction_ids: list[str], now_ms: int, ledger: Ledger) -> None:
        """Put on the lapsing heap the lease of each award still held (the others have
        just settled): the time it ends unless a renewal or a move comes first."""
        heap = self._lapsing
        for auction_id in auction_ids:
            lease = self._lease(self.auctions[auction_id], ledger)
            if lease is not None and lease.valid_at(now_ms):
                heapq.heappush(heap, (lease.expires_ms, auction_id))
        # Renewals and awards that ended leave stale entries behind: rebuild before
        # they pile up (amortised, as for the other heaps).
        if len(heap) > 2 * len(self._settling) + 64:
            leases = ((self._lease(self.auctions[a], ledger), a) for a in self._settling)
            heap[:] = [(lease.expires_ms, a) for lease, a in leases if lease is not None]
            heapq.heapify(heap)

    def _lease(self, auction: Auction, ledger: Ledger) -> Lease | None:
        """The lease of the award in flight, if its order still has it (lapsed or not)."""
        if auction.phase not in (Phase.AWARDED, Phase.CONFIRMED):
            return None
        lease = ledger.leases.leases.get(auction.wo)
        return lease if lease is not None and lease.token == auction.token else None

    def _earliest(self, heap: list[tuple[int, str]], phase: Phase) -> int | None:
        """The least current entry of ``heap``, dropping the stale ones above it."""
        while heap:
            at_ms, auction_id = heap[0]
            if self._current(auction_id, phase, at_ms):
                return at_ms
            heapq.heappop(heap)
        return None


def _rank(auction: Auction, reputation: Reputation, at_ms: int) -> list[bytes]:
    bids = list(auction.bids.values())
    if auction.rule == "lowest_price":
        bids.sort(key=lambda b: (b.price, -b.stake, b.order))
    elif auction.rule == "first_eligible":
        bids.sort(key=lambda b: b.order)
    else:

        def weight(b: Bid) -> float:
            return b.stake * (1.0 + max(0.0, reputation.score(b.bidder, at_ms)))

        bids.sort(key=lambda b: (-weight(b), b.price, b.order))
    return [b.bidder for b in bids]


def _claim_ended_ms(order: WorkOrder) -> int | None:
    """When the latest claim of ``order`` ended (the move after it), if one did."""
    history = order.history
    for i in range(len(history) - 1, -1, -1):
        if history[i][1] is Status.CLAIMED:
            return history[i + 1][0] if i + 1 < len(history) else None
    return None
