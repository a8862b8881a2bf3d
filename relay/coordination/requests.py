"""Work-ledger requests as events: validate a request body, decide it, word the outcome.

This is the layer between the log and :class:`~relay.coordination.ledger.Ledger`. An
agent's request is an event of a ``wo.*`` request kind; :meth:`Coordinator.decide`
checks its body, applies it to the namespace's ledger at the request's log time, and
returns the outcome the relay appends to the same log as its own signed event, with
the request in its ``deps`` (docs/protocol.md will carry the exact bodies once the
relay appends them; the wiring is the rest of issue 3).

Outcome kinds are the relay's alone: an agent may not publish them. Replaying every
request and every ``lease.expired`` of a log through a fresh coordinator rebuilds the
same ledger and the same outcomes, which is how a restart, a mirror or an auditor gets
the state back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from relay.coordination.leases import Granted, Lease, LeaseEngine, Refused, TtlBounds
from relay.coordination.ledger import Contract, Done, Ledger, Rejection, Status

WO_KINDS = frozenset(
    {"wo.create", "wo.claim", "wo.next", "wo.renew", "wo.release", "wo.update", "wo.note"}
)
LOCK_KINDS = frozenset({"lock.acquire", "lock.renew", "lock.release"})
REQUEST_KINDS = WO_KINDS | LOCK_KINDS
OUTCOME_OF = {
    "wo.create": "wo.created",
    "wo.claim": "wo.claimed",
    "wo.next": "wo.claimed",
    "wo.renew": "wo.renewed",
    "wo.release": "wo.released",
    "wo.update": "wo.updated",
    "wo.note": "wo.noted",
    "lock.acquire": "lock.acquired",
    "lock.renew": "lock.renewed",
    "lock.release": "lock.released",
}
REJECTED = "wo.rejected"
LOCK_REJECTED = "lock.rejected"
EXPIRED = "lease.expired"
RELAY_KINDS = frozenset({*OUTCOME_OF.values(), REJECTED, LOCK_REJECTED, EXPIRED})
"""Kinds only the relay may author."""

MAX_TEXT = 16 * 1024
MAX_LIST = 256


class BadRequest(Exception):
    """A request body that does not say what its kind needs."""


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str
    body: dict[str, Any]


@dataclass
class Coordinator:
    """The work ledger and the advisory locks of one namespace, driven by its log."""

    ledger: Ledger = field(default_factory=Ledger)
    locks: LeaseEngine = field(
        default_factory=lambda: LeaseEngine(bounds=TtlBounds(default_ms=5 * 60 * 1000))
    )

    def decide(
        self, kind: str, body: Any, author: bytes, request_id: bytes, now_ms: int
    ) -> Outcome | None:
        """The outcome of one request event, or ``None`` for kinds that are not requests."""
        if kind in LOCK_KINDS:
            return self._decide_lock(kind, body, author, request_id, now_ms)
        if kind not in REQUEST_KINDS:
            return None
        try:
            result = self._apply(kind, _map(body), author, now_ms)
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
        try:
            fields = _map(body)
            name = _text(fields, "name", 256)
            if not name:
                raise BadRequest("a lock needs a name")
            if kind == "lock.acquire":
                _only(fields, "name", "ttl_ms")
                result = locks.acquire(name, author, now_ms, _opt_int(fields, "ttl_ms"))
            elif kind == "lock.renew":
                _only(fields, "name", "token", "ttl_ms")
                token, ttl = _int(fields, "token"), _opt_int(fields, "ttl_ms")
                result = locks.renew(name, author, token, now_ms, ttl)
            else:
                _only(fields, "name", "token")
                result = locks.release(name, author, _int(fields, "token"), now_ms)
        except BadRequest as exc:
            return _rejected(LOCK_REJECTED, request_id, "bad_request", str(exc))
        if isinstance(result, Refused):
            problem = result.refusal.value
            return _rejected(LOCK_REJECTED, request_id, problem, result.reason, result.holder)
        answer: dict[str, Any] = {"req": request_id, "lock": name}
        if isinstance(result, Granted):
            answer.update(_lease(result.lease))
        return Outcome(OUTCOME_OF[kind], answer)

    def expire(self, now_ms: int) -> Outcome | None:
        """The timer: the ``lease.expired`` outcome for claims that ran out, if any."""
        lapsed = self.ledger.expire(now_ms)
        if not lapsed:
            return None
        return Outcome(EXPIRED, {"leases": [[order, token] for order, token in lapsed]})

    def replay_expired(self, body: dict[str, Any]) -> None:
        """Apply a logged ``lease.expired`` again (restart, mirror, audit): exactly the
        claims it names, whatever the clock says now."""
        self.ledger.expire_leases([(order, token) for order, token in body["leases"]])

    def next_expiry_ms(self) -> int | None:
        return self.ledger.leases.next_expiry_ms()

    def _apply(self, kind: str, body: dict[str, Any], author: bytes, now: int) -> Done | Rejection:
        ledger = self.ledger
        if kind == "wo.create":
            return ledger.create(_contract(body), author, now)
        if kind == "wo.next":
            _only(body, "ttl_ms")
            return ledger.next(author, now, _opt_int(body, "ttl_ms"))
        order = _text(body, "wo", 64)
        if kind == "wo.claim":
            _only(body, "wo", "ttl_ms")
            return ledger.claim(order, author, now, _opt_int(body, "ttl_ms"))
        if kind == "wo.renew":
            _only(body, "wo", "token", "ttl_ms")
            return ledger.renew(order, author, _int(body, "token"), now, _opt_int(body, "ttl_ms"))
        if kind == "wo.release":
            _only(body, "wo", "token")
            return ledger.release(order, author, _int(body, "token"), now)
        if kind == "wo.update":
            _only(body, "wo", "token", "status", "reason")
            try:
                status = Status(_text(body, "status", 16))
            except ValueError:
                raise BadRequest("status must be open, blocked or done") from None
            reason = _text(body, "reason", MAX_TEXT, default="")
            return ledger.update(order, author, _opt_int(body, "token"), status, now, reason)
        assert kind == "wo.note"
        _only(body, "wo", "token", "text")
        text = _text(body, "text", MAX_TEXT)
        return ledger.note(order, author, text, now, _opt_int(body, "token"))


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


def _map(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("the body of a request is a map")
    return body


def _only(body: dict[str, Any], *allowed: str) -> None:
    extra = sorted(set(body) - set(allowed))
    if extra:
        # Name a few, shortened: an outcome must never be bigger than its request.
        shown = ", ".join(repr(name[:32]) for name in extra[:5])
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise BadRequest(f"unknown fields {shown}{more}")


def _text(body: dict[str, Any], name: str, limit: int, default: str | None = None) -> str:
    value = body.get(name, default)
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be text")
    if len(value) > limit:
        raise BadRequest(f"{name} is over {limit} characters")
    return value


def _texts(body: dict[str, Any], name: str) -> tuple[str, ...]:
    value = body.get(name, [])
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise BadRequest(f"{name} must be a list of at most {MAX_LIST} texts")
    if not all(isinstance(item, str) and len(item) <= MAX_TEXT for item in value):
        raise BadRequest(f"{name} must hold texts of at most {MAX_TEXT} characters")
    return tuple(value)


def _int(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if type(value) is not int:
        raise BadRequest(f"{name} must be an integer")
    return value


def _opt_int(body: dict[str, Any], name: str) -> int | None:
    return None if body.get(name) is None else _int(body, name)


def _contract(body: dict[str, Any]) -> Contract:
    fields = ("title", "description", "acceptance", "scope", "files", "verify")
    _only(body, *fields, "priority", "labels", "handover")
    title = _text(body, "title", 200)
    if not title.strip():
        raise BadRequest("a work order needs a title")
    return Contract(
        title=title,
        description=_text(body, "description", MAX_TEXT, default=""),
        acceptance=_texts(body, "acceptance"),
        scope=_text(body, "scope", MAX_TEXT, default=""),
        files=_texts(body, "files"),
        verify=_text(body, "verify", MAX_TEXT, default=""),
        priority=_opt_int(body, "priority") or 0,
        labels=_texts(body, "labels"),
        handover=_text(body, "handover", MAX_TEXT, default=""),
    )
