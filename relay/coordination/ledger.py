"""Work orders: shared task contracts with exclusive, leased, fenced claims (pure).

Theory of operation
-------------------
A namespace's ledger is a table of work orders. Each order carries its contract (the
workledger model: title, description, acceptance criteria, scope, files, verification
command, priority, labels, handover) and a status that moves only along
:data:`TRANSITIONS`; anything else is refused with the current status named. Claims
are leases from :class:`~relay.coordination.leases.LeaseEngine` on the order's id, so
ownership is exclusive, expires, and is fenced by a token that only rises.

Like the lease engine, every call takes ``now_ms`` from the log (the request's receipt
HLC), so the ledger is a fold: the same requests in the same order give the same state
anywhere. A claimed order whose lease has run out is open again at any ``now_ms`` past
its expiry, before the relay's timer has said so, and keeps its notes and history.

Ids are ``wo-<n>``, numbered per namespace in creation order: short enough for a shell.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

from relay.coordination.leases import Granted, Lease, LeaseEngine, Refused


class Status(enum.Enum):
    OPEN = "open"
    CLAIMED = "claimed"
    BLOCKED = "blocked"
    DONE = "done"
    AWAITING_APPROVAL = "awaiting_approval"
    DROPPED = "dropped"
    """Given up on (a sub-order its parent no longer needs); final, like done."""


class Op(enum.Enum):
    CLAIM = "claim"
    RELEASE = "release"
    EXPIRE = "expire"
    DONE = "done"
    BLOCK = "block"
    REOPEN = "reopen"
    ASK_APPROVAL = "ask_approval"
    DROP = "drop"
    APPROVE = "approve"
    REJECT = "reject"


TRANSITIONS: dict[tuple[Status, Op], Status] = {
    (Status.OPEN, Op.CLAIM): Status.CLAIMED,
    # The workledger way: release, then set the status. Anyone may close or block an
    # open order; a claimed one only its holder can (with its token, see _end).
    (Status.OPEN, Op.DONE): Status.DONE,
    (Status.OPEN, Op.BLOCK): Status.BLOCKED,
    (Status.CLAIMED, Op.RELEASE): Status.OPEN,
    (Status.CLAIMED, Op.EXPIRE): Status.OPEN,
    (Status.CLAIMED, Op.DONE): Status.DONE,
    (Status.CLAIMED, Op.BLOCK): Status.BLOCKED,
    (Status.CLAIMED, Op.REOPEN): Status.OPEN,
    (Status.BLOCKED, Op.REOPEN): Status.OPEN,
    # Approval gates: the holder hands the decision to a person and lets go of the
    # claim (a person may take hours; no lease should run meanwhile). Approved, the
    # order is open again, and may now be done; rejected, it is blocked with why.
    (Status.OPEN, Op.DROP): Status.DROPPED,
    (Status.BLOCKED, Op.DROP): Status.DROPPED,
    (Status.CLAIMED, Op.DROP): Status.DROPPED,
    (Status.CLAIMED, Op.ASK_APPROVAL): Status.AWAITING_APPROVAL,
    (Status.AWAITING_APPROVAL, Op.APPROVE): Status.OPEN,
    (Status.AWAITING_APPROVAL, Op.REJECT): Status.BLOCKED,
}
"""Every legal move of a work order; a move not listed is refused (``bad_transition``)."""


class Problem(enum.Enum):
    NOT_FOUND = "not_found"
    HELD = "held"
    NOT_HOLDER = "not_holder"
    STALE_TOKEN = "stale_token"
    BAD_TTL = "bad_ttl"
    BAD_TRANSITION = "bad_transition"
    NOTHING_OPEN = "nothing_open"
    RESERVED = "reserved"
    NEEDS_APPROVAL = "needs_approval"
    NOT_APPROVER = "not_approver"
    OPEN_CHILDREN = "open_children"


@dataclass(frozen=True, slots=True)
class Contract:
    title: str
    description: str = ""
    acceptance: tuple[str, ...] = ()
    scope: str = ""
    files: tuple[str, ...] = ()
    verify: str = ""
    priority: int = 0
    """Higher first."""
    labels: tuple[str, ...] = ()
    handover: str = ""
    approval: Gate | None = None
    """Set when the order may only be done after a person approved it."""


@dataclass(frozen=True, slots=True)
class Gate:
    """Who must approve an order, and why: listed keys, or members of a role in the
    namespace's directory (``human``, say), or both."""

    reason: str
    approvers: tuple[bytes, ...] = ()
    role: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """An approver's verdict on an order awaiting approval."""

    approved: bool
    by: bytes
    comment: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class Note:
    author: bytes
    text: str
    at_ms: int


@dataclass
class WorkOrder:
    id: str
    contract: Contract
    created_ms: int
    creator: bytes
    status: Status = Status.OPEN
    updated_ms: int = 0
    reason: str = ""
    notes: list[Note] = field(default_factory=list)
    history: list[tuple[int, Status, str]] = field(default_factory=list)
    """(at_ms, new status, why) for every move."""
    last_op: str = ""
    """The latest move (``claim``, ``release``, ``expire``, ``done``...): why it is open."""
    decisions: list[Decision] = field(default_factory=list)
    """Every approval or rejection, in order; the last one counts."""
    parent: str | None = None
    """The order this one is a part of (a sub-order), if any."""
    children: list[str] = field(default_factory=list)
    progress: tuple[int, str, int] | None = None
    """The holder's latest ``(percent, message, at_ms)``."""

    @property
    def approved(self) -> bool:
        return bool(self.decisions) and self.decisions[-1].approved


@dataclass(frozen=True, slots=True)
class Done:
    """The request succeeded; ``lease`` is set for claims and renewals."""

    order: str
    status: Status
    lease: Lease | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    problem: Problem
    reason: str
    holder: Lease | None = None


Outcome = Done | Rejection


@dataclass
class Ledger:
    leases: LeaseEngine = field(default_factory=LeaseEngine)
    orders: dict[str, WorkOrder] = field(default_factory=dict)
    reserved: dict[str, str] = field(default_factory=dict)
    """Order -> the auction that alone may give it out (see auctions.py)."""
    _open: list[tuple[int, int, str]] = field(default_factory=list, compare=False, repr=False)
    """A heap of (-priority, number, id) of orders that were open when pushed: the
    index :meth:`next` reads instead of scanning every order. Entries of orders that
    moved on are dropped when met (an order reopened is pushed again), and so are
    those of reserved orders: :meth:`unreserve` pushes an order that is open again."""
    _claimed: list[tuple[int, str]] = field(default_factory=list, compare=False, repr=False)
    """A heap of (lease expiry, id) per claim and renewal: where :meth:`next` finds
    claims that lapsed before the timer reopened them."""
    _moved: set[str] = field(default_factory=set, compare=False, repr=False)
    """Reserved orders that moved or whose lease was renewed since the auctions' timer
    last took them (:meth:`take_moved`): what may end an award in flight, so the timer
    looks at those awards only, not at every one."""

    def create(
        self, contract: Contract, creator: bytes, now_ms: int, parent: str | None = None
    ) -> Outcome:
        """A new open order; with ``parent``, a sub-order of that (unfinished) one, split
        off by the parent's creator or its holder: nobody else adds work that the
        parent's owner must finish. A sub-order's parent exists before it, so the tree
        can have no cycle."""
        if parent is not None:
            above = self._current(parent, now_ms)
            if isinstance(above, Rejection):
                return above
            if above.status in FINAL:
                return Rejection(Problem.BAD_TRANSITION, f"{parent} is {above.status.value}")
            if not self._owns(above, creator, now_ms):
                reason = f"only the creator or the holder of {parent} splits it"
                return Rejection(Problem.NOT_HOLDER, reason)
        order_id = f"wo-{len(self.orders) + 1}"
        order = WorkOrder(order_id, contract, now_ms, creator, updated_ms=now_ms, parent=parent)
        order.history.append((now_ms, Status.OPEN, "created"))
        self.orders[order_id] = order
        if parent is not None:
            self.orders[parent].children.append(order_id)
        heapq.heappush(self._open, _rank(order))
        return Done(order_id, Status.OPEN)

    def report(
        self, order_id: str, agent: bytes, token: int, percent: int, message: str, now_ms: int
    ) -> Outcome:
        """The holder's progress on a held order (fenced like a renewal)."""
        order = self._current(order_id, now_ms)
        if isinstance(order, Rejection):
            return order
        fenced = self.leases.check(order_id, agent, token, now_ms)
        if fenced is not None:
            return _from_lease(fenced)
        order.progress = (percent, message, now_ms)
        order.updated_ms = now_ms
        return Done(order_id, order.status)

    def claim(
        self,
        order_id: str,
        agent: bytes,
        now_ms: int,
        ttl_ms: int | None = None,
        *,
        auction: str | None = None,
    ) -> Outcome:
        order = self._current(order_id, now_ms)
        if isinstance(order, Rejection):
            return order
        reserved = self.reserved.get(order_id)
        if reserved is not None and reserved != auction:
            return Rejection(Problem.RESERVED, f"{order_id} is given out by auction {reserved}")
        if order.status is Status.CLAIMED:
            lease = self.leases.holder(order_id, now_ms)
            who = lease.holder.hex() if lease else "?"
            until = lease.expires_ms if lease else "?"
            return Rejection(Problem.HELD, f"{order_id} is held by {who} until {until}", lease)
        refused = self._refuse_move(order, Op.CLAIM)
        if refused is not None:
            return refused
        outcome = self.leases.acquire(order_id, agent, now_ms, ttl_ms)
        if isinstance(outcome, Refused):
            return _from_lease(outcome)
        assert isinstance(outcome, Granted)
        self._move(order, Op.CLAIM, now_ms, f"claimed by {agent.hex()}")
        heapq.heappush(self._claimed, (outcome.lease.expires_ms, order_id))
        return Done(order_id, order.status, outcome.lease)

    def next(self, agent: bytes, now_ms: int, ttl_ms: int | None = None) -> Outcome:
        """Claim the open order of highest priority (oldest first among equals).

        Open means what :meth:`_status` says, so a claim whose lease lapsed counts
        even before the timer reopened it; reserved orders do not count. The indexes
        make this cost the orders that moved since, not the whole ledger.
        """
        candidates = [order for order in (self._best_open(), *self._lapsed(now_ms)) if order]
        if not candidates:
            return Rejection(Problem.NOTHING_OPEN, "no open work order")
        best = min(candidates, key=_rank)
        return self.claim(best.id, agent, now_ms, ttl_ms)

    def _best_open(self) -> WorkOrder | None:
        """The first order of the open index that is open and not reserved."""
        heap = self._open
        while heap:
            order = self.orders[heap[0][2]]
            if order.status is Status.OPEN and order.id not in self.reserved:
                return order
            # Moved on (pushed again if reopened), or open but not ours to give while
            # its auction runs (pushed again by unreserve): an auction's order must not
            # be popped and pushed back by every wo.next while it lasts.
            heapq.heappop(heap)
        return None

    def take_moved(self) -> set[str]:
        """The reserved orders that moved (any status change) or had their lease renewed
        since the last call, and forget them: every change to an order that can end its
        award, apart from its lease running out (a time the auctions keep)."""
        moved, self._moved = self._moved, set()
        return moved

    def reserve(self, order_id: str, auction_id: str) -> None:
        """Only the auction ``auction_id`` gives ``order_id`` out from now on."""
        self.reserved[order_id] = auction_id

    def unreserve(self, order_id: str) -> None:
        """The order's auction ended: :meth:`next` may give it out again."""
        if self.reserved.pop(order_id, None) is None:
            return
        order = self.orders.get(order_id)
        if order is not None and order.status is Status.OPEN:
            heapq.heappush(self._open, _rank(order))  # its entry may have been dropped

    def _lapsed(self, now_ms: int, *, reserved_too: bool = False) -> list[WorkOrder]:
        """Claimed orders whose current lease ran out by ``now_ms`` (oldest expiry
        first), reserved ones only with ``reserved_too``."""
        # A set: a renewal to the same ms is one entry twice, and a relay back from
        # downtime may find tens of thousands lapsed (a list's `in` was quadratic).
        heap, lapsed = self._claimed, set()
        while heap and heap[0][0] <= now_ms:
            entry = heapq.heappop(heap)
            expires_ms, order_id = entry
            order = self.orders[order_id]
            lease = self.leases.leases.get(order_id)
            current = lease is None or lease.expires_ms == expires_ms
            if order.status is Status.CLAIMED and current:
                lapsed.add(entry)
        for entry in lapsed:  # still lapsed until something moves them: keep them
            heapq.heappush(heap, entry)
        return [
            self.orders[order_id]
            for _, order_id in sorted(lapsed)
            if reserved_too or order_id not in self.reserved
        ]

    def renew(
        self, order_id: str, agent: bytes, token: int, now_ms: int, ttl_ms: int | None = None
    ) -> Outcome:
        order = self._current(order_id, now_ms)
        if isinstance(order, Rejection):
            return order
        outcome = self.leases.renew(order_id, agent, token, now_ms, ttl_ms)
        if isinstance(outcome, Refused):
            return _from_lease(outcome)
        assert isinstance(outcome, Granted)
        heapq.heappush(self._claimed, (outcome.lease.expires_ms, order_id))
        if order_id in self.reserved:  # an award's lease may now lapse sooner, or later
            self._moved.add(order_id)
        return Done(order_id, order.status, outcome.lease)

    def release(self, order_id: str, agent: bytes, token: int, now_ms: int) -> Outcome:
        """The holder gives the order back: open again, notes and history kept."""
        return self._end(order_id, agent, token, Op.RELEASE, now_ms, "released")

    def update(
        self,
        order_id: str,
        agent: bytes,
        token: int | None,
        status: Status,
        now_ms: int,
        reason: str = "",
    ) -> Outcome:
        """Move an order: the holder (with its token) ends a claim as done, blocked or
        open; anyone may reopen a blocked order."""
        ops = {
            Status.DONE: Op.DONE, Status.BLOCKED: Op.BLOCK, Status.OPEN: Op.REOPEN,
            Status.DROPPED: Op.DROP,
        }  # fmt: skip
        op = ops.get(status)
        if op is None:
            return Rejection(Problem.BAD_TRANSITION, f"cannot set status {status.value}")
        return self._end(order_id, agent, token, op, now_ms, reason or status.value)

    def ask_approval(
        self, order_id: str, agent: bytes, token: int | None, now_ms: int, reason: str
    ) -> Outcome:
        """The holder hands the order to its approvers: the claim ends (fenced, like a
        release) and the order waits for a decision."""
        order = self.orders.get(order_id)
        if order is not None and order.contract.approval is None:
            return Rejection(Problem.BAD_TRANSITION, f"{order_id} needs no approval")
        reason = reason or Status.AWAITING_APPROVAL.value  # as any update: the status
        return self._end(order_id, agent, token, Op.ASK_APPROVAL, now_ms, reason)

    def decide(
        self,
        order_id: str,
        agent: bytes,
        approved: bool,
        comment: str,
        now_ms: int,
        is_approver: Callable[[Gate, bytes], bool],
    ) -> Outcome:
        """An approver's ``wo.approve`` or ``wo.reject``; ``is_approver`` says whether
        a key may decide for a gate (the role's members live in the directory)."""
        order = self._current(order_id, now_ms)
        if isinstance(order, Rejection):
            return order
        gate = order.contract.approval
        if gate is None:
            return Rejection(Problem.BAD_TRANSITION, f"{order_id} needs no approval")
        if not is_approver(gate, agent):
            who = f"role {gate.role!r}" if gate.role else "its listed approvers"
            return Rejection(Problem.NOT_APPROVER, f"only {who} decide {order_id}")
        op = Op.APPROVE if approved else Op.REJECT
        refused = self._refuse_move(order, op)
        if refused is not None:
            return refused
        order.decisions.append(Decision(approved, agent, comment, now_ms))
        verdict = "approved" if approved else "rejected"
        why = f"{verdict} by {agent.hex()}" + (f": {comment}" if comment else "")
        self._move(order, op, now_ms, why, by=agent)
        order.reason = comment if not approved else order.reason
        return Done(order_id, order.status)

    def note(
        self, order_id: str, agent: bytes, text: str, now_ms: int, token: int | None = None
    ) -> Outcome:
        """Add a note anyone can read; with a token, only a valid holder may add it."""
        order = self._current(order_id, now_ms)
        if isinstance(order, Rejection):
            return order
        if token is not None:
            fenced = self.leases.check(order_id, agent, token, now_ms)
            if fenced is not None:
                return _from_lease(fenced)
        order.notes.append(Note(agent, text, now_ms))
        order.updated_ms = now_ms
        return Done(order_id, order.status)

    def reopen_blocked(self, order_id: str, now_ms: int, why: str) -> None:
        """The relay reopens a blocked order it gives out again (an auction's next bidder)."""
        order = self.orders.get(order_id)
        if order is not None and order.status is Status.BLOCKED:
            self._move(order, Op.REOPEN, now_ms, why)

    def fence(
        self, order_id: str, agent: bytes, token: int | None, now_ms: int
    ) -> Rejection | None:
        """May ``agent`` write to the order's shared records (its context) now?

        While the order is claimed only its holder may, with the current token; once
        it is not, anyone may — except with a token, which says the writer believes
        it holds the order: a paused holder whose lease ran out is refused, not let
        through, even before anyone else claims the order.
        """
        order = self._current(order_id, now_ms)
        if isinstance(order, Rejection):
            return order
        if token is None:
            if order.status is not Status.CLAIMED:
                return None
            lease = self.leases.holder(order_id, now_ms)
            return Rejection(Problem.NOT_HOLDER, f"{order_id} is claimed: give its token", lease)
        refused = self.leases.check(order_id, agent, token, now_ms)
        return None if refused is None else _from_lease(refused)

    def expire(self, now_ms: int) -> list[tuple[str, int]]:
        """The relay's timer: claimed orders whose lease ran out by ``now_ms`` are open
        again. Returns ``(order, token)`` for each, oldest expiry first, as
        :meth:`expire_leases` takes them."""
        lapsed = [
            (order.id, lease.token)
            for order in self._lapsed(now_ms, reserved_too=True)
            if (lease := self.leases.leases.get(order.id)) is not None
        ]
        self.expire_leases(lapsed)
        return lapsed

    def next_expiry_ms(self) -> int | None:
        """When the earliest current claim lapses (the timer's next work), if any."""
        heap = self._claimed
        while heap:
            expires_ms, order_id = heap[0]
            order = self.orders[order_id]
            lease = self.leases.leases.get(order_id)
            if (
                order.status is Status.CLAIMED
                and lease is not None
                and lease.expires_ms == expires_ms
            ):
                return expires_ms
            heapq.heappop(heap)  # renewed, ended or moved: a stale entry
        return None

    def expire_leases(self, lapsed: list[tuple[str, int]]) -> None:
        """Reopen exactly these ``(order, token)`` claims (a logged expiry, replayed).

        Each move is stamped with the lease's own expiry, so the result does not depend
        on when the timer ran.
        """
        for order_id, token in lapsed:
            lease = self.leases.leases.get(order_id)
            order = self.orders.get(order_id)
            if lease is None or lease.token != token or order is None:
                continue
            del self.leases.leases[order_id]
            if order.status is Status.CLAIMED:
                self._move(order, Op.EXPIRE, lease.expires_ms, f"lease {token} expired")

    def status(self, order_id: str, now_ms: int) -> Status | None:
        order = self.orders.get(order_id)
        return None if order is None else self._status(order, now_ms)

    # -- internals --------------------------------------------------------------------

    def _status(self, order: WorkOrder, now_ms: int) -> Status:
        if order.status is Status.CLAIMED and self.leases.holder(order.id, now_ms) is None:
            return Status.OPEN  # its lease ran out; the timer has not said so yet
        return order.status

    def _current(self, order_id: str, now_ms: int) -> WorkOrder | Rejection:
        """The order, with a lapsed claim turned back to open first (deterministically)."""
        order = self.orders.get(order_id)
        if order is None:
            return Rejection(Problem.NOT_FOUND, f"no work order {order_id}")
        if order.status is Status.CLAIMED and self._status(order, now_ms) is Status.OPEN:
            lease = self.leases.leases.pop(order_id, None)  # the timer has nothing left to do
            expired_at = lease.expires_ms if lease else now_ms
            self._move(order, Op.EXPIRE, expired_at, "lease expired")
        return order

    def _end(
        self, order_id: str, agent: bytes, token: int | None, op: Op, now_ms: int, why: str
    ) -> Outcome:
        order = self._current(order_id, now_ms)
        if isinstance(order, Rejection):
            return order
        if order_id in self.reserved and (order.status is not Status.CLAIMED or op is Op.DROP):
            # Its awardee may finish, block or release it, but not drop it: a dropped
            # order is final, and the auction's next bidder would never get it.
            reason = f"{order_id} belongs to auction {self.reserved[order_id]} until it ends"
            return Rejection(Problem.RESERVED, reason)
        refused = self._refuse_move(order, op)
        if refused is not None:
            return refused
        if op is Op.DONE and order.contract.approval is not None and not order.approved:
            reason = f"{order_id} needs approval first: {order.contract.approval.reason}"
            return Rejection(Problem.NEEDS_APPROVAL, reason)
        if (
            op is Op.DROP
            and order.status is not Status.CLAIMED
            and not self._may_drop(order, agent, now_ms)
        ):
            reason = f"only the creator of {order_id} or the owner of its parent drops it"
            return Rejection(Problem.NOT_HOLDER, reason)
        if op is Op.DONE:
            unfinished = [c for c in order.children if self.orders[c].status not in FINAL]
            if unfinished:
                shown = ", ".join(unfinished[:10]) + (" ..." if len(unfinished) > 10 else "")
                reason = f"{order_id} has sub-orders not done or dropped: {shown}"
                return Rejection(Problem.OPEN_CHILDREN, reason)
        if order.status is Status.CLAIMED:  # only the holder ends a claim, fenced
            if token is None:
                return Rejection(Problem.NOT_HOLDER, f"{order_id} is claimed: give its token")
            released = self.leases.release(order_id, agent, token, now_ms)
            if isinstance(released, Refused):
                return _from_lease(released)
        elif token is not None:
            # A token says its sender believes it holds the order: a holder paused past
            # its lease is refused, as by fence(), even before anyone claims it again.
            fenced = self.leases.check(order_id, agent, token, now_ms)
            if fenced is not None:
                return _from_lease(fenced)
        self._move(order, op, now_ms, why, by=agent)
        order.reason = why
        return Done(order_id, order.status)

    def _owns(self, order: WorkOrder, agent: bytes, now_ms: int) -> bool:
        """``agent`` created ``order`` or validly holds it now."""
        lease = self.leases.holder(order.id, now_ms)
        return agent == order.creator or (lease is not None and lease.holder == agent)

    def _may_drop(self, order: WorkOrder, agent: bytes, now_ms: int) -> bool:
        """An unclaimed order is given up on by its creator, or by whoever owns its
        parent (the one the parent's completion waits for)."""
        if agent == order.creator:
            return True
        parent = self.orders.get(order.parent) if order.parent is not None else None
        return parent is not None and self._owns(parent, agent, now_ms)

    def _refuse_move(self, order: WorkOrder, op: Op) -> Rejection | None:
        if (order.status, op) in TRANSITIONS:
            return None
        reason = f"{order.id} is {order.status.value}: cannot {op.value}"
        return Rejection(Problem.BAD_TRANSITION, reason)

    def _move(
        self, order: WorkOrder, op: Op, now_ms: int, why: str, by: bytes | None = None
    ) -> None:
        """Apply a transition; ``by`` is the agent that made it, when one did."""
        order.status = TRANSITIONS[(order.status, op)]  # a KeyError here is our bug
        order.last_op = op.value
        order.updated_ms = now_ms
        order.history.append((now_ms, order.status, why))
        if order.id in self.reserved:  # its auction's award may have ended: say so
            self._moved.add(order.id)
        if order.status is Status.BLOCKED and order.parent is not None:
            # Escalated: the parent's holder sees it in the parent's notes.
            parent = self.orders[order.parent]
            text = f"sub-order {order.id} is blocked: {why}"
            parent.notes.append(Note(by or order.creator, text, now_ms))
            parent.updated_ms = now_ms
        if order.status is Status.OPEN:
            heapq.heappush(self._open, _rank(order))


FINAL = frozenset({Status.DONE, Status.DROPPED})


def _rank(order: WorkOrder) -> tuple[int, int, str]:
    """Order of :meth:`Ledger.next`: highest priority first, then the oldest."""
    return (-order.contract.priority, int(order.id[3:]), order.id)


def _from_lease(refused: Refused) -> Rejection:
    return Rejection(Problem(refused.refusal.value), refused.reason, refused.holder)
