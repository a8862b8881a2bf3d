"""Work-ledger requests as events: validate a request body, decide it, word the outcome.

This is the layer between the log and the namespace's state: the work ledger
(:mod:`~relay.coordination.ledger`), the advisory locks and the shared records
(:mod:`~relay.coordination.records`). An agent's request is an event of one of
:data:`REQUEST_KINDS`; :meth:`Coordinator.decide` checks its body, applies it at the
request's log time, and returns the outcome the relay appends to the same log as its
own signed event, with the request in its ``deps`` (docs/protocol.md §8 has the bodies).

Outcome kinds are the relay's alone: an agent may not publish them. Replaying every
request and every ``lease.expired`` of a log through a fresh coordinator rebuilds the
same ledger and the same outcomes, which is how a restart, a mirror or an auditor gets
the state back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relay.coordination.auctions import RULES, Auction, Auctions, Bid, Phase, vouch_key
from relay.coordination.constraints import Constraints
from relay.coordination.decisions import TIMER_KINDS as DECISION_EVENTS
from relay.coordination.decisions import Decisions, parse_policy
from relay.coordination.directory import (
    CAPABILITY_RE,
    MAX_CAPABILITIES,
    Capability,
    Directory,
    Member,
)
from relay.coordination.fields import (
    MAX_LIST,
    MAX_TEXT,
    BadRequest,
    Conflict,
    as_map,
    document,
    integer,
    only,
    opt_integer,
    opt_text,
    text,
    texts,
)
from relay.coordination.leases import Granted, Lease, LeaseEngine, Refused, TtlBounds
from relay.coordination.ledger import Contract, Done, Gate, Ledger, Rejection, Status
from relay.coordination.records import NAMESPACE, Records
from relay.coordination.stakes import PPM, Reputation, Stakes

CLAIM_TTL = TtlBounds()
"""Claims: 30 minutes unless asked otherwise, from 1 second to 24 hours."""
LOCK_TTL = TtlBounds(default_ms=5 * 60 * 1000)
"""Locks: 5 minutes unless asked otherwise, same bounds as claims."""

MAX_CONTEXT = 64 * 1024
"""Bytes of a context document (its canonical msgpack encoding)."""
MAX_POST = 4000
"""Characters of a bulletin post."""

WO_KINDS = frozenset(
    {
        "wo.create", "wo.claim", "wo.next", "wo.renew", "wo.release", "wo.update",
        "wo.note", "wo.approve", "wo.reject", "wo.progress",
    }
)  # fmt: skip
LOCK_KINDS = frozenset({"lock.acquire", "lock.renew", "lock.release"})
RECORD_KINDS = frozenset({"context.put", "bulletin.post", "decision.add", "ckpt.set"})
DIR_KINDS = frozenset({"dir.join", "dir.leave", "dir.heartbeat"})
AUCTION_KINDS = frozenset(
    {
        "auction.open",
        "auction.bid",
        "auction.commit",
        "auction.reveal",
        "auction.withdraw",
        "auction.confirm",
        "auction.reject",
    }
)
REP_KINDS = frozenset({"rep.vouch", "rep.revoke"})
CONSTRAINT_KINDS = frozenset(
    {"constraint.define", "constraint.reserve", "constraint.renew", "constraint.commit",
     "constraint.release"}
)  # fmt: skip
ROUTING_KINDS = frozenset({"decision.policy", "conflict.resolve"})
REQUEST_KINDS = (
    WO_KINDS
    | LOCK_KINDS
    | RECORD_KINDS
    | DIR_KINDS
    | AUCTION_KINDS
    | REP_KINDS
    | CONSTRAINT_KINDS
    | ROUTING_KINDS
)
OUTCOME_OF = {
    "wo.create": "wo.created",
    "wo.claim": "wo.claimed",
    "wo.next": "wo.claimed",
    "wo.renew": "wo.renewed",
    "wo.release": "wo.released",
    "wo.update": "wo.updated",
    "wo.note": "wo.noted",
    "wo.approve": "wo.approved",
    "wo.reject": "wo.declined",  # (wo.rejected is the relay refusing a wo.* request)
    "wo.progress": "wo.progressed",
    "lock.acquire": "lock.acquired",
    "lock.renew": "lock.renewed",
    "lock.release": "lock.released",
    "context.put": "context.stored",
    "bulletin.post": "bulletin.posted",
    "decision.add": "decision.added",
    "ckpt.set": "ckpt.saved",
    "dir.join": "dir.joined",
    "dir.leave": "dir.left",
    "dir.heartbeat": "dir.alive",
    "auction.open": "auction.opened",
    "auction.bid": "auction.bid_placed",
    "auction.commit": "auction.committed",
    "auction.reveal": "auction.revealed",
    "auction.withdraw": "auction.withdrawn",
    "auction.confirm": "auction.confirmed",
    "auction.reject": "auction.failed",
    "rep.vouch": "rep.vouched",
    "rep.revoke": "rep.revoked",
    "constraint.define": "constraint.defined",
    "constraint.reserve": "constraint.reserved",
    "constraint.renew": "constraint.renewed",
    "constraint.commit": "constraint.committed",
    "constraint.release": "constraint.released",
    "decision.policy": "decision.policy_set",
    "conflict.resolve": "conflict.resolved",  # or conflict.proposed, awaiting agreement
}
AUCTION_EVENTS = frozenset({"auction.closed", "auction.completed", "auction.failed"})
"""Written by the relay's timer (without ``req``) and re-applied on replay."""
REJECTED_OF = {kind: kind.partition(".")[0] + ".rejected" for kind in REQUEST_KINDS}
"""One refusal kind per family: ``wo.rejected``, ``lock.rejected``, ``context.rejected``..."""
REJECTED = REJECTED_OF["wo.claim"]
LOCK_REJECTED = REJECTED_OF["lock.acquire"]
EXPIRED = "lease.expired"
EXPIRED_PER_EVENT = 1024
"""Claims one ``lease.expired`` lists at most (about 80 bytes each): a mass expiry is
several events, never one over ``max_frame``."""
LEFT = "dir.left"
"""Also written by the relay itself, without ``req``: a disconnect, a timeout, a restart."""
RELAY_KINDS = frozenset(
    {*OUTCOME_OF.values(), *REJECTED_OF.values(), EXPIRED, *AUCTION_EVENTS, *DECISION_EVENTS,
     "conflict.proposed"}
)  # fmt: skip
"""Kinds only the relay may author."""


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str
    body: dict[str, Any]


@dataclass
class Coordinator:
    """The coordination state of one namespace (work ledger, locks, records, directory,
    stakes, auctions, reputation), driven by its log."""

    ledger: Ledger = field(default_factory=Ledger)
    locks: LeaseEngine = field(default_factory=lambda: LeaseEngine(bounds=LOCK_TTL))
    records: Records = field(default_factory=Records)
    directory: Directory = field(default_factory=Directory)
    stakes: Stakes = field(default_factory=Stakes)
    reputation: Reputation = field(default_factory=Reputation)
    auctions: Auctions = field(default_factory=Auctions)
    constraints: Constraints = field(default_factory=Constraints)
    decisions: Decisions = field(default_factory=Decisions)

    @classmethod
    def with_bounds(cls, claims: TtlBounds, locks: TtlBounds) -> Coordinator:
        return cls(ledger=Ledger(LeaseEngine(bounds=claims)), locks=LeaseEngine(bounds=locks))

    def decide(
        self, kind: str, body: Any, author: bytes, request_id: bytes, now_ms: int
    ) -> Outcome | None:
        """The outcome of one request event, or ``None`` for kinds that are not requests."""
        if kind in LOCK_KINDS:
            return self._decide_lock(kind, body, author, request_id, now_ms)
        if kind in RECORD_KINDS:
            return self._decide_by(self._record, kind, body, author, request_id, now_ms)
        if kind in DIR_KINDS:
            return self._decide_dir(kind, body, author, request_id, now_ms)
        if kind in AUCTION_KINDS:
            return self._decide_by(self._auction, kind, body, author, request_id, now_ms)
        if kind in REP_KINDS:
            return self._decide_by(self._vouching, kind, body, author, request_id, now_ms)
        if kind in CONSTRAINT_KINDS:
            return self._decide_by(self._constraint, kind, body, author, request_id, now_ms)
        if kind in ROUTING_KINDS:
            return self._decide_by(self._routing, kind, body, author, request_id, now_ms)
        if kind not in REQUEST_KINDS:
            return None
        try:
            result = self._apply(kind, as_map(body), author, now_ms)
        except BadRequest as exc:
            return _rejected(REJECTED, request_id, "bad_request", str(exc))
        if isinstance(result, Rejection):
            problem = result.problem.value
            return _rejected(REJECTED, request_id, problem, result.reason, result.holder)
        outcome: dict[str, Any] = {
            "req": request_id,
            "wo": result.order,
            "status": result.status.value,
        }
        if result.lease is not None:
            outcome.update(_lease(result.lease))
        return Outcome(OUTCOME_OF[kind], outcome)

    def _decide_lock(
        self, kind: str, body: Any, author: bytes, request_id: bytes, now_ms: int
    ) -> Outcome:
        """Advisory locks on named resources (paths, branches, anything): leases with
        the same exclusivity and fencing as claims. They lapse silently at expiry."""
        locks = self.locks
        locks.prune(now_ms)
        try:
            fields = as_map(body)
            name = text(fields, "name", 256)
            if not name:
                raise BadRequest("a lock needs a name")
            if kind == "lock.acquire":
                only(fields, "name", "ttl_ms")
                result = locks.acquire(name, author, now_ms, opt_integer(fields, "ttl_ms"))
            elif kind == "lock.renew":
                only(fields, "name", "token", "ttl_ms")
                token, ttl = integer(fields, "token"), opt_integer(fields, "ttl_ms")
                result = locks.renew(name, author, token, now_ms, ttl)
            else:
                only(fields, "name", "token")
                result = locks.release(name, author, integer(fields, "token"), now_ms)
        except BadRequest as exc:
            return _rejected(LOCK_REJECTED, request_id, "bad_request", str(exc))
        if isinstance(result, Refused):
            problem = result.refusal.value
            return _rejected(LOCK_REJECTED, request_id, problem, result.reason, result.holder)
        answer: dict[str, Any] = {"req": request_id, "lock": name}
        if isinstance(result, Granted):
            answer.update(_lease(result.lease))
        return Outcome(OUTCOME_OF[kind], answer)

    def _decide_by(
        self,
        handler: Callable[[str, dict[str, Any], bytes, int], dict[str, Any] | Rejection],
        kind: str,
        body: Any,
        author: bytes,
        request_id: bytes,
        now_ms: int,
    ) -> Outcome:
        """Run ``handler`` on a request's body and word what it answers: its map, or a
        refusal from a bad body, a :class:`Conflict` or the ledger. An answer may name
        another outcome kind (``kind``): a rejected award is an ``auction.failed``."""
        try:
            answer = handler(kind, as_map(body), author, now_ms)
        except BadRequest as exc:
            return _rejected(REJECTED_OF[kind], request_id, "bad_request", str(exc))
        except Conflict as exc:
            return _rejected(REJECTED_OF[kind], request_id, exc.problem, exc.reason)
        if isinstance(answer, Rejection):
            problem, holder = answer.problem.value, answer.holder
            return _rejected(REJECTED_OF[kind], request_id, problem, answer.reason, holder)
        kind_out = answer.pop("kind", OUTCOME_OF[kind])
        return Outcome(kind_out, {"req": request_id, **answer})

    def _constraint(
        self, kind: str, body: dict[str, Any], author: bytes, now: int
    ) -> dict[str, Any]:
        """Shared constraints (constraints.py): the answer states the budget after."""
        constraints = self.constraints
        name = text(body, "name", 256)
        if not name:
            raise BadRequest("a constraint needs a name")
        if kind == "constraint.define":
            only(body, "name", "limit")
            constraint = constraints.define(name, body.get("limit"), author, now)
            answer: dict[str, Any] = {}
        elif kind in ("constraint.reserve", "constraint.renew"):
            renewing = kind == "constraint.renew"
            only(body, "name", "reservation" if renewing else "amount", "ttl_ms")
            ttl = self._constraint_ttl(opt_integer(body, "ttl_ms"))
            if renewing:
                rid = text(body, "reservation", 64)
                reservation = constraints.renew(name, rid, author, now, ttl)
            else:
                reservation = constraints.reserve(name, body.get("amount"), author, now, ttl)
            constraint = constraints.by_name[name]
            answer = {"reservation": reservation.id, "amount": reservation.amount,
                      "expires_ms": reservation.expires_ms}  # fmt: skip
        elif kind == "constraint.commit":
            only(body, "name", "reservation", "amount")
            rid = text(body, "reservation", 64)
            constraint = constraints.commit(name, rid, author, now, opt_integer(body, "amount"))
            answer = {"reservation": rid}
        else:
            only(body, "name", "reservation")
            rid = text(body, "reservation", 64)
            constraint = constraints.release(name, rid, author, now)
            answer = {"reservation": rid}
        reserved = constraint.reserved(now)
        return {**answer, "name": name, "limit": constraint.limit, "used": constraint.used,
                "reserved": reserved}  # fmt: skip

    def _routing(self, kind: str, body: dict[str, Any], author: bytes, now: int) -> dict[str, Any]:
        """Decision routing and conflicts (decisions.py). Only the namespace's owner
        may publish a ``decision.policy``: the relay checks that before sequencing."""
        if kind == "decision.policy":
            policy = parse_policy(body)
            self.decisions.set_policy(policy)
            return {"routes": len(policy.routes), "conflicts": policy.ladder is not None}
        return self.decisions.resolve(body, author, self.records, self.directory, now)

    def _check_decision(self, entity: str | None, supersedes: str | None, author: bytes) -> None:
        """Refused before a decision is recorded: one joining a conflict that is full,
        or one replacing another author's decision on an entity under a conflict
        ladder (to overturn it, decide otherwise: the ladder settles it)."""
        self.decisions.check_room(entity)
        old = self.records.decisions.get(supersedes or "")
        if (
            old is not None
            and old.author != author
            and old.entity is not None
            and self.decisions.policy.ladder is not None
        ):
            reason = f"{old.id} is another agent's decision on {old.entity}: decide otherwise"
            raise Conflict("not_author", reason)

    def route(self, event: bytes, kind: str, body: Any, now_ms: int) -> bool:
        """Queue a sequenced event for the roles its kind is routed to (decisions.py)."""
        if kind == "decision.added" and isinstance(body, dict):  # the entity is the record's
            decision = self.records.decisions.get(body.get("id", ""))
            if decision is not None and decision.entity is not None:
                body = {**body, "entity": decision.entity}
        return self.decisions.route(event, kind, body, self.directory, now_ms)

    def _constraint_ttl(self, asked: int | None) -> int:
        """A reservation's lease: the lock bounds apply (default: the lock lease)."""
        bounds = self.locks.bounds
        ttl = bounds.default_ms if asked is None else asked
        if not bounds.min_ms <= ttl <= bounds.max_ms:
            raise Conflict("bad_ttl", f"ttl_ms {ttl} is outside {bounds.min_ms} to {bounds.max_ms}")
        return ttl

    def _record(
        self, kind: str, body: dict[str, Any], author: bytes, now: int
    ) -> dict[str, Any] | Rejection:
        records = self.records
        if kind == "context.put":
            only(body, "wo", "token", "body")
            document_ = document(body, "body", MAX_CONTEXT)
            order = opt_text(body, "wo", 64)
            if order is None and body.get("token") is not None:  # nil is absent (8.3)
                raise BadRequest("a token fences a work order's context: give wo too")
            if order is not None:
                refused = self.ledger.fence(order, author, opt_integer(body, "token"), now)
                if refused is not None:
                    return refused
            version = records.put_context(order or NAMESPACE, document_, author, now)
            answer: dict[str, Any] = {"version": version.version}
            if order is not None:
                answer["wo"] = order
            return answer
        if kind == "bulletin.post":
            only(body, "text")
            return {"n": records.post(text(body, "text", MAX_POST), author, now).n}
        if kind == "decision.add":
            only(body, "title", "context", "decision", "rationale", "supersedes", "entity")
            title = text(body, "title", 200)
            if not title.strip():
                raise BadRequest("a decision needs a title")
            entity = opt_text(body, "entity", 256)
            if entity is not None and not entity:
                raise BadRequest("entity names what the decision touches")
            made = text(body, "decision", MAX_TEXT)  # the whole body first: bad_request
            context = text(body, "context", MAX_TEXT, default="")  # comes before state
            rationale = text(body, "rationale", MAX_TEXT, default="")
            supersedes = opt_text(body, "supersedes", 64)
            self._check_decision(entity, supersedes, author)
            decision = records.decide(
                title,
                made,
                author,
                now,
                context=context,
                rationale=rationale,
                supersedes=supersedes,
                entity=entity,
            )
            answer = {"id": decision.id}
            conflict = self.decisions.on_decision(decision, records, now)
            if conflict is not None:
                decision.conflict = answer["conflict"] = conflict
            return answer
        assert kind == "ckpt.set"
        only(body, "name", "seq", "expect")
        name = text(body, "name", 256)
        seq = integer(body, "seq")
        if not name or seq < 0:
            raise BadRequest("a checkpoint needs a name and a seq of 0 or more")
        checkpoint = records.set_checkpoint(name, seq, author, now, opt_integer(body, "expect"))
        return {"name": checkpoint.name, "seq": checkpoint.seq}

    def _decide_dir(
        self, kind: str, body: Any, author: bytes, request_id: bytes, now_ms: int
    ) -> Outcome:
        """Joining, leaving and heartbeats of the directory (see directory.py)."""
        directory = self.directory
        try:
            fields = as_map(body)
            if kind == "dir.join":
                member = _member(fields, author, now_ms)
                first = directory.join(member)
                granted = self.stakes.grant_once(author)  # a first join's stake
                answer = {"req": request_id, "first": first, "granted": granted}
                return Outcome(OUTCOME_OF[kind], {**answer, **_profile(member)})
            only(fields)
        except BadRequest as exc:
            return _rejected(REJECTED_OF[kind], request_id, "bad_request", str(exc))
        if kind == "dir.leave":
            # Past its expires_ms but not yet timed out, a member may still leave (8.11).
            if not directory.leave(author, now_ms, "left"):
                return _rejected(REJECTED_OF[kind], request_id, "not_joined", "not online here")
            return Outcome(LEFT, {"req": request_id, "agent": author, "reason": "left"})
        alive = directory.heartbeat(author, now_ms)
        if alive is None:
            reason = "no heartbeat presence here: join with heartbeat_ms first"
            return _rejected(REJECTED_OF[kind], request_id, "not_joined", reason)
        answer = {"req": request_id, "agent": author, "expires_ms": alive.expires_ms}
        return Outcome(OUTCOME_OF[kind], answer)

    def _auction(self, kind: str, body: dict[str, Any], author: bytes, now: int) -> dict[str, Any]:
        auctions, stakes = self.auctions, self.stakes
        if kind == "auction.open":
            only(body, *AUCTION_FIELDS)
            auction = _auction_of(body, author, now, f"auc-{len(auctions.auctions) + 1}")
            title = opt_text(body, "title", 200)
            if (title is None) == ("wo" not in body) or (title is not None and not title.strip()):
                raise BadRequest("an auction needs a title (a new order) or a wo, not both")
            auctions.open(auction, self.ledger, title, now)
            return {"auction": auction.id, "wo": auction.wo, "deadline_ms": auction.deadline_ms,
                    "closes_ms": auction.closes_ms, "rule": auction.rule,
                    "sealed": auction.sealed}  # fmt: skip
        auction_id = text(body, "auction", 64)
        if kind == "auction.bid":
            only(body, "auction", "stake", "price", "note")
            stake, price = integer(body, "stake"), integer(body, "price")
            if stake < 1 or price < 0:
                raise BadRequest("stake must be at least 1 and price at least 0")
            note = text(body, "note", MAX_POST, default="")
            bid = Bid(author, stake, price, note, now, 0)
            auctions.bid(auction_id, bid, stakes, self.directory, self.reputation)
            return {"auction": auction_id, "bidder": author, "stake": stake, "price": price}
        if kind == "auction.commit":
            only(body, "auction", "stake", "commitment", "note")
            stake = integer(body, "stake")
            sealed = body.get("commitment")
            if stake < 1 or not isinstance(sealed, bytes) or len(sealed) != 32:
                raise BadRequest("stake must be at least 1, commitment a 32-byte hash")
            note = text(body, "note", MAX_POST, default="")
            bid = Bid(author, stake, 0, note, now, 0, commitment=sealed, revealed=False)
            auctions.bid(auction_id, bid, stakes, self.directory, self.reputation)
            return {"auction": auction_id, "bidder": author, "stake": stake}
        if kind == "auction.reveal":
            only(body, "auction", "price", "salt")
            price, salt = integer(body, "price"), body.get("salt")
            if price < 0 or not isinstance(salt, bytes) or not 16 <= len(salt) <= 64:
                raise BadRequest("price must be at least 0, salt 16 to 64 bytes")
            auctions.reveal(auction_id, author, price, salt, now)
            return {"auction": auction_id, "bidder": author, "price": price}
        if kind == "auction.withdraw":
            only(body, "auction")
            unlocked = auctions.withdraw(auction_id, author, now, stakes)
            return {"auction": auction_id, "bidder": author, "unlocked": unlocked}
        if kind == "auction.confirm":
            only(body, "auction")
            auctions.confirm(auction_id, author, now)
            return {"auction": auction_id, "agent": author}
        assert kind == "auction.reject"
        only(body, "auction", "reason", "agent")
        reason = text(body, "reason", MAX_POST, default="")
        judged = body.get("agent")  # nil: absent (8.12), as logs before 8.3 said so hold it
        if judged is not None and (not isinstance(judged, bytes) or len(judged) != 32):
            raise BadRequest("agent must be an agent key (32 bytes)")
        mine = auctions.auctions.get(auction_id)
        if mine is None or mine.requester != author:
            raise Conflict("not_found", f"no auction {auction_id} of yours")
        if mine.phase not in (Phase.AWARDED, Phase.CONFIRMED):
            raise Conflict("bad_transition", f"{auction_id} is {mine.phase.value}")
        if judged is not None and judged != mine.awardee:
            # The award passed on since the requester judged the work: the next
            # awardee did nothing yet, and must not be slashed for the last one's.
            now_to = mine.awardee.hex()[:16] if mine.awardee else "nobody"
            raise Conflict("changed", f"{auction_id} is awarded to {now_to} now")
        if mine.phase is Phase.AWARDED and now >= mine.confirm_by:
            # Unconfirmed in time, the award lapses and passes on without a slash; a
            # rejection decided before the timer writes that must not slash it instead.
            reason = f"the confirmation window closed at {mine.confirm_by}: the award lapses"
            raise Conflict("closed", reason)
        if self.ledger.status(mine.wo, now) is Status.DONE:
            raise Conflict("bad_transition", f"{mine.wo} is done: the auction completes")
        failed = auctions.fail(auction_id, "rejected", now, self.ledger, stakes, self.reputation)
        failed["note"] = reason
        return failed

    def _vouching(self, kind: str, body: dict[str, Any], author: bytes, now: int) -> dict[str, Any]:
        """Staked vouches: a vouch locks ``weight`` stake until revoked, and loses the
        vouchee's slash fraction of it whenever the vouchee is slashed."""
        stakes, reputation = self.stakes, self.reputation
        vouchee = body.get("for")
        if not isinstance(vouchee, bytes) or len(vouchee) != 32:
            raise BadRequest("for must be an agent key (32 bytes)")
        key = vouch_key(vouchee)
        if kind == "rep.revoke":
            only(body, "for")
            if reputation.revoke(author, vouchee) is None:
                raise Conflict("not_found", "you do not vouch for that agent")
            return {"for": vouchee, "unlocked": stakes.unlock(author, key)}
        only(body, "for", "weight", "reason")
        weight = integer(body, "weight")
        reason = text(body, "reason", MAX_POST, default="")
        if weight < 1:
            raise BadRequest("weight (the stake locked) must be at least 1")
        if vouchee == author:
            raise Conflict("self_vouch", "an agent does not vouch for itself")
        if vouchee not in self.directory.members:
            raise Conflict("not_found", "vouch for members of this namespace")
        held = stakes.locked.get((author, key), 0)
        if weight > stakes.available(author) + held:
            balance = stakes.available(author) + held
            raise Conflict("insufficient_stake", f"weight {weight} over the balance {balance}")
        stakes.unlock(author, key)  # a new vouch replaces the old one
        stakes.lock(author, key, weight)
        made = reputation.vouch(author, vouchee, weight, reason, now)
        return {"for": vouchee, "weight": weight, "value": made.value}

    def due(self, now_ms: int) -> list[Outcome]:
        """The timer: ``lease.expired`` for claims that ran out, ``dir.left`` for
        heartbeats that stopped, auctions closed and awards settled. Each is applied
        here, as it will be on replay."""
        out = []
        lapsed = [[order, token] for order, token in self.ledger.expire(now_ms)]
        for i in range(0, len(lapsed), EXPIRED_PER_EVENT):  # each event well within a frame
            out.append(Outcome(EXPIRED, {"leases": lapsed[i : i + EXPIRED_PER_EVENT]}))
        for member in self.directory.timed_out(now_ms):
            at = member.expires_ms or now_ms
            self.directory.leave(member.agent, at, "timeout")
            out.append(Outcome(LEFT, {"agent": member.agent, "reason": "timeout", "at_ms": at}))
        for event in self.auctions.due(now_ms, self.ledger, self.stakes, self.reputation):
            kind = event.pop("kind")
            out.append(Outcome(kind, event))
        for kind, body in self.decisions.due(self.directory, self.records, now_ms):
            out.append(Outcome(kind, body))
        return out

    def replay_decisions(self, kind: str, body: dict[str, Any]) -> None:
        """Re-apply a notice, digest or conflict step the relay's timer wrote."""
        self.decisions.replay(kind, body, self.records)

    def replay_auction(self, kind: str, body: dict[str, Any]) -> None:
        """Re-apply an auction event the relay's timer wrote: the same step, at its time."""
        auctions, at = self.auctions, body["at_ms"]
        if kind == "auction.closed":
            auctions.close(body["auction"], at, self.ledger, self.stakes, self.reputation)
        elif body.get("reason") == "rejected":  # pragma: no cover - rejections have a req
            return
        else:
            logged = body.get("reason") if kind == "auction.failed" else None
            auctions.settle(body["auction"], at, self.ledger, self.stakes, self.reputation, logged)

    def disconnected(self, agent: bytes, now_ms: int, reason: str) -> Outcome | None:
        """The last connection of a member by connection closed (or the relay restarted)."""
        member = self.directory.members.get(agent)
        if member is None or member.heartbeat_ms is not None:
            return None
        if not self.directory.leave(agent, now_ms, reason):
            return None
        return Outcome(LEFT, {"agent": agent, "reason": reason, "at_ms": now_ms})

    def replay_expired(self, body: dict[str, Any]) -> None:
        """Apply a logged ``lease.expired`` again (restart, mirror, audit): exactly the
        claims it names, whatever the clock says now."""
        self.ledger.expire_leases([(order, token) for order, token in body["leases"]])

    def replay_left(self, body: dict[str, Any]) -> None:
        """Apply a ``dir.left`` the relay wrote on its own (disconnect, timeout)."""
        self.directory.leave(body["agent"], body["at_ms"], body["reason"])

    def next_expiry_ms(self) -> int | None:
        times = [
            self.ledger.next_expiry_ms(),
            self.directory.next_expiry_ms(),
            self.auctions.next_deadline_ms(),
            self.decisions.next_due_ms(),
        ]
        return min((t for t in times if t is not None), default=None)

    def _is_approver(self, gate: Gate, key: bytes) -> bool:
        """A listed approver, or a member of the gate's role in this namespace's
        directory (a role is what a member says at dir.join: see operations.md)."""
        if key in gate.approvers:
            return True
        member = self.directory.members.get(key)
        return bool(gate.role) and member is not None and member.role == gate.role

    def _apply(self, kind: str, body: dict[str, Any], author: bytes, now: int) -> Done | Rejection:
        ledger = self.ledger
        if kind == "wo.create":
            parent = opt_text(body, "parent", 64)
            return ledger.create(_contract(body), author, now, parent)
        if kind == "wo.progress":
            only(body, "wo", "token", "percent", "message")
            percent = integer(body, "percent")
            if not 0 <= percent <= 100:
                raise BadRequest("percent is 0 to 100")
            message = text(body, "message", MAX_TEXT, default="")
            order = text(body, "wo", 64)
            return ledger.report(order, author, integer(body, "token"), percent, message, now)
        if kind == "wo.next":
            only(body, "ttl_ms")
            return ledger.next(author, now, opt_integer(body, "ttl_ms"))
        order = text(body, "wo", 64)
        if kind == "wo.claim":
            only(body, "wo", "ttl_ms")
            return ledger.claim(order, author, now, opt_integer(body, "ttl_ms"))
        if kind == "wo.renew":
            only(body, "wo", "token", "ttl_ms")
            return ledger.renew(
                order, author, integer(body, "token"), now, opt_integer(body, "ttl_ms")
            )
        if kind == "wo.release":
            only(body, "wo", "token")
            return ledger.release(order, author, integer(body, "token"), now)
        if kind == "wo.update":
            only(body, "wo", "token", "status", "reason")
            try:
                status = Status(text(body, "status", 24))
            except ValueError:
                statuses = "open, blocked, done, dropped or awaiting_approval"
                raise BadRequest(f"status must be {statuses}") from None
            reason = text(body, "reason", MAX_TEXT, default="")
            token = opt_integer(body, "token")
            if status is Status.AWAITING_APPROVAL:
                return ledger.ask_approval(order, author, token, now, reason)
            return ledger.update(order, author, token, status, now, reason)
        if kind in ("wo.approve", "wo.reject"):
            only(body, "wo", "comment")
            comment = text(body, "comment", MAX_TEXT, default="")
            approved = kind == "wo.approve"
            return ledger.decide(order, author, approved, comment, now, self._is_approver)
        assert kind == "wo.note"
        only(body, "wo", "token", "text")
        note = text(body, "text", MAX_TEXT)
        return ledger.note(order, author, note, now, opt_integer(body, "token"))


def _rejected(
    kind: str, request_id: bytes, problem: str, reason: str, holder: Lease | None = None
) -> Outcome:
    """A refusal outcome; ``holder`` names the valid lease that stood in the way."""
    body: dict[str, Any] = {"req": request_id, "problem": problem, "reason": reason}
    if holder is not None:
        body["holder"] = _lease(holder)
    return Outcome(kind, body)


def _lease(lease: Lease) -> dict[str, Any]:
    return {"holder": lease.holder, "token": lease.token, "expires_ms": lease.expires_ms}


MAX_HEARTBEAT_MS = 24 * 3600 * 1000
MAX_AUCTION_MS = 30 * 24 * 3600 * 1000
AUCTION_FIELDS = (
    "title", "wo", "deadline_ms", "duration_ms", "capabilities", "min_reputation",
    "reserve", "rule", "confirm_ms", "lease_ms", "slash_ppm", "sealed", "reveal_ms",
    "forfeit_ppm",
)  # fmt: skip


def _auction_of(body: dict[str, Any], requester: bytes, now: int, auction_id: str) -> Auction:
    deadline, duration = opt_integer(body, "deadline_ms"), opt_integer(body, "duration_ms")
    if (deadline is None) == (duration is None):
        raise BadRequest("give deadline_ms or duration_ms, one of them")
    deadline = deadline if deadline is not None else now + (duration or 0)
    if not now < deadline <= now + MAX_AUCTION_MS:
        raise BadRequest("the deadline must be in the future, within 30 days")
    rule = text(body, "rule", 32, default="stake_x_reputation")
    if rule not in RULES:
        raise BadRequest(f"rule must be one of {', '.join(RULES)}")
    minimum = body.get("min_reputation")
    if minimum is not None and (type(minimum) not in (int, float) or not math.isfinite(minimum)):
        raise BadRequest("min_reputation must be a finite number")
    capabilities = texts(body, "capabilities")
    if not all(CAPABILITY_RE.fullmatch(c) for c in capabilities):
        raise BadRequest("capabilities are tags, optionally @version")
    reserve = opt_integer(body, "reserve")
    confirm = opt_integer(body, "confirm_ms")
    confirm = 60_000 if confirm is None else confirm
    lease = opt_integer(body, "lease_ms")
    lease = 30 * 60 * 1000 if lease is None else lease
    slash = opt_integer(body, "slash_ppm")
    slash = 200_000 if slash is None else slash
    if not 1_000 <= confirm <= MAX_HEARTBEAT_MS:
        raise BadRequest("confirm_ms must be 1000 to 86400000")
    if not 0 <= slash <= PPM or (reserve is not None and reserve < 0):
        raise BadRequest("slash_ppm is 0 to 1000000; reserve is 0 or more")
    sealed = body.get("sealed", False)
    if not isinstance(sealed, bool):
        raise BadRequest("sealed must be true or false")
    reveal = opt_integer(body, "reveal_ms")
    reveal = 60_000 if reveal is None else reveal
    forfeit = opt_integer(body, "forfeit_ppm")
    forfeit = 100_000 if forfeit is None else forfeit
    if (sealed and not 1_000 <= reveal <= MAX_HEARTBEAT_MS) or not 0 <= forfeit <= PPM:
        raise BadRequest("reveal_ms is 1000 to 86400000, forfeit_ppm 0 to 1000000")
    return Auction(
        sealed=sealed,
        reveal_ms=reveal if sealed else 0,
        forfeit_ppm=forfeit,
        id=auction_id,
        requester=requester,
        wo=text(body, "wo", 64, default=""),
        deadline_ms=deadline,
        rule=rule,
        capabilities=tuple(Capability.parse(c) for c in capabilities),
        min_reputation=None if minimum is None else float(minimum),
        reserve=reserve,
        confirm_ms=confirm,
        lease_ms=lease,
        slash_ppm=slash,
    )


def _member(body: dict[str, Any], agent: bytes, now_ms: int) -> Member:
    only(body, "name", "capabilities", "role", "endpoint", "meta", "heartbeat_ms")
    name = text(body, "name", 100)
    if not name.strip():
        raise BadRequest("a participant needs a name")
    capabilities = texts(body, "capabilities")
    if len(capabilities) > MAX_CAPABILITIES:
        raise BadRequest(f"at most {MAX_CAPABILITIES} capabilities")
    for capability in capabilities:
        if not CAPABILITY_RE.fullmatch(capability):
            raise BadRequest(f"capability {capability[:70]!r}: a tag, optionally @version")
    heartbeat = opt_integer(body, "heartbeat_ms")
    if heartbeat is not None and not 1_000 <= heartbeat <= MAX_HEARTBEAT_MS:
        raise BadRequest(f"heartbeat_ms must be 1000 to {MAX_HEARTBEAT_MS}")
    meta = document(body, "meta", 4096) if "meta" in body else None
    return Member(
        agent=agent,
        name=name,
        capabilities=tuple(Capability.parse(c) for c in capabilities),
        role=text(body, "role", 64, default=""),
        endpoint=text(body, "endpoint", 256, default=""),
        meta=meta,
        joined_ms=now_ms,
        heartbeat_ms=heartbeat,
    )


def _profile(member: Member) -> dict[str, Any]:
    return {
        "agent": member.agent,
        "name": member.name,
        "capabilities": [str(c) for c in member.capabilities],
        "role": member.role,
        "endpoint": member.endpoint,
        "meta": member.meta,
        "presence": member.presence,
        "expires_ms": member.expires_ms,
    }


def _gate(body: dict[str, Any]) -> Gate | None:
    """The approval gate of a ``wo.create``: ``requires_approval`` true, with
    ``approval_reason`` and ``approvers`` (keys) or ``approver_role`` (or both)."""
    required = body.get("requires_approval", False)
    if type(required) is not bool:
        raise BadRequest("requires_approval must be true or false")
    rest = ("approval_reason", "approvers", "approver_role")
    if not required:
        if any(name in body for name in rest):
            raise BadRequest(f"{', '.join(rest)} go with requires_approval: true")
        return None
    approvers = body.get("approvers", [])
    if not isinstance(approvers, list) or len(approvers) > MAX_LIST:
        raise BadRequest(f"approvers must be a list of at most {MAX_LIST} keys")
    if not all(isinstance(key, bytes) and len(key) == 32 for key in approvers):
        raise BadRequest("approvers must be 32-byte keys")
    role = text(body, "approver_role", 64, default="")
    if not approvers and not role:
        raise BadRequest("an order that requires approval names approvers or an approver_role")
    reason = text(body, "approval_reason", MAX_TEXT, default="")
    return Gate(reason=reason, approvers=tuple(approvers), role=role)


def _contract(body: dict[str, Any]) -> Contract:
    fields = ("title", "description", "acceptance", "scope", "files", "verify")
    gate = ("requires_approval", "approval_reason", "approvers", "approver_role")
    only(body, *fields, "priority", "labels", "handover", *gate, "parent")
    title = text(body, "title", 200)
    if not title.strip():
        raise BadRequest("a work order needs a title")
    return Contract(
        title=title,
        description=text(body, "description", MAX_TEXT, default=""),
        acceptance=texts(body, "acceptance"),
        scope=text(body, "scope", MAX_TEXT, default=""),
        files=texts(body, "files"),
        verify=text(body, "verify", MAX_TEXT, default=""),
        priority=opt_integer(body, "priority") or 0,
        labels=texts(body, "labels"),
        handover=text(body, "handover", MAX_TEXT, default=""),
        approval=_gate(body),
    )
