"""The lease engine: exclusive, expiring, fenced ownership of named resources (pure).

Theory of operation
-------------------
Work-order claims and advisory locks are both leases on a resource name. The engine
is a deterministic state machine: every call takes ``now_ms``, which the relay takes
from the log itself (the hybrid logical clock of the request's receipt), never from a
wall clock read at fold time. Folding the same requests in the same order therefore
gives the same state on the home relay, after a restart, on a mirror and offline.

Time in the log only moves forward (an HLC never goes back, whatever the wall clock
does), and one sequencer decides every request of a namespace in log order, so two
holders of one resource can never both be valid: a lease is valid exactly while
``now_ms < expires_ms``, and a new one is only granted at a ``now_ms`` past the
previous expiry, or after a release.

Fencing: each grant carries a token that strictly increases per resource (the last
one issued is kept even after release or expiry). A holder's later operations name
their token; the engine refuses a token that is not the current valid lease's, so a
holder that was paused past its expiry cannot act once another holder got the
resource — the flaw of ack-deadline leases in work-queue brokers, where a late ack
from an expired delivery is still accepted.

Outcomes are values (:class:`Granted`, :class:`Refused`, ...), never exceptions: the
relay turns each into a relay-signed outcome event in the same log.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Refusal(enum.Enum):
    HELD = "held"
    """Another holder has a valid lease."""
    NOT_HOLDER = "not_holder"
    """The caller holds no valid lease on the resource."""
    STALE_TOKEN = "stale_token"
    """The token is not the current lease's: it expired, or a newer lease was granted."""
    BAD_TTL = "bad_ttl"
    """The requested TTL is outside the engine's bounds."""


@dataclass(frozen=True, slots=True)
class Lease:
    resource: str
    holder: bytes
    token: int
    granted_ms: int
    expires_ms: int

    def valid_at(self, now_ms: int) -> bool:
        return now_ms < self.expires_ms


@dataclass(frozen=True, slots=True)
class Granted:
    lease: Lease
    expired: Lease | None = None
    """The previous holder's lease, when this grant is what retired it."""


@dataclass(frozen=True, slots=True)
class Released:
    lease: Lease


@dataclass(frozen=True, slots=True)
class Refused:
    refusal: Refusal
    reason: str
    holder: Lease | None = None
    """The current valid lease, when one exists (so a loser can say who holds it)."""


Outcome = Granted | Released | Refused


@dataclass(frozen=True, slots=True)
class TtlBounds:
    min_ms: int = 1_000
    max_ms: int = 24 * 3600 * 1000
    default_ms: int = 30 * 60 * 1000


PRUNE_FLOOR = 64


@dataclass
class LeaseEngine:
    bounds: TtlBounds = field(default_factory=TtlBounds)
    leases: dict[str, Lease] = field(default_factory=dict)
    """The latest lease per resource; it may have expired (see :meth:`holder`)."""
    tokens: dict[str, int] = field(default_factory=dict)
    """The last token issued per resource: fencing tokens never repeat or go back."""
    prune_at: int = PRUNE_FLOOR
    """:meth:`prune` scans once ``leases`` holds this many (twice what it left)."""

    def holder(self, resource: str, now_ms: int) -> Lease | None:
        """The valid lease on ``resource`` at ``now_ms``, if any."""
        lease = self.leases.get(resource)
        return lease if lease is not None and lease.valid_at(now_ms) else None

    def acquire(
        self, resource: str, holder: bytes, now_ms: int, ttl_ms: int | None = None
    ) -> Outcome:
        """Grant an exclusive lease unless someone else validly holds ``resource``.

        The current holder acquiring again is refused too (it should renew): a grant
        always means a new token.
        """
        ttl = self.bounds.default_ms if ttl_ms is None else ttl_ms
        refused = self._check_ttl(ttl)
        if refused is not None:
            return refused
        current = self.holder(resource, now_ms)
        if current is not None:
            who = "you" if current.holder == holder else current.holder.hex()
            reason = f"held by {who} until {current.expires_ms} (token {current.token})"
            return Refused(Refusal.HELD, reason, current)
        previous = self.leases.get(resource)
        token = self.tokens.get(resource, 0) + 1
        lease = Lease(resource, holder, token, now_ms, now_ms + ttl)
        self.leases[resource] = lease
        self.tokens[resource] = token
        expired = previous if previous is not None and previous.expires_ms <= now_ms else None
        return Granted(lease, expired)

    def renew(
        self, resource: str, holder: bytes, token: int, now_ms: int, ttl_ms: int | None = None
    ) -> Outcome:
        """Extend the holder's valid lease to ``now_ms + ttl``; the token stays."""
        ttl = self.bounds.default_ms if ttl_ms is None else ttl_ms
        refused = self._check_ttl(ttl) or self.check(resource, holder, token, now_ms)
        if refused is not None:
            return refused
        lease = self.leases[resource]
        renewed = Lease(resource, holder, token, lease.granted_ms, now_ms + ttl)
        self.leases[resource] = renewed
        return Granted(renewed)

    def release(self, resource: str, holder: bytes, token: int, now_ms: int) -> Outcome:
        """End the holder's valid lease now."""
        refused = self.check(resource, holder, token, now_ms)
        if refused is not None:
            return refused
        lease = self.leases.pop(resource)
        return Released(lease)

    def check(self, resource: str, holder: bytes, token: int, now_ms: int) -> Refused | None:
        """The fence: ``None`` when ``holder`` validly holds ``resource`` with ``token``."""
        current = self.holder(resource, now_ms)
        if current is None or current.holder != holder:
            return Refused(Refusal.NOT_HOLDER, f"no valid lease on {resource}", current)
        if current.token != token:
            # (reworded freely: a replay does not compare a refusal's reason)
            said = "is stale" if token < current.token else "was never granted"
            reason = f"token {token} {said}; the current lease has token {current.token}"
            return Refused(Refusal.STALE_TOKEN, reason, current)
        return None

    def expire(self, now_ms: int) -> list[Lease]:
        """Retire every lease that has expired by ``now_ms`` (the relay's timer)."""
        expired = [lease for lease in self.leases.values() if not lease.valid_at(now_ms)]
        for lease in expired:
            del self.leases[lease.resource]
        return expired

    def prune(self, now_ms: int) -> None:
        """Drop lapsed leases, now and then: for leases no timer retires (locks, which
        lapse silently), so that names used once (`once:KEY`, a crashed leader's) do
        not stay in memory. A full scan each time the count has doubled: amortised
        O(1) per call, and a function of the fold alone (a replay prunes alike). A
        lapsed lease answers nothing (:meth:`holder`), and ``tokens`` stays."""
        if len(self.leases) >= self.prune_at:
            self.expire(now_ms)
            self.prune_at = max(PRUNE_FLOOR, 2 * len(self.leases))

    def next_expiry_ms(self) -> int | None:
        return min((lease.expires_ms for lease in self.leases.values()), default=None)

    def _check_ttl(self, ttl_ms: int) -> Refused | None:
        if self.bounds.min_ms <= ttl_ms <= self.bounds.max_ms:
            return None
        bounds = f"{self.bounds.min_ms}..{self.bounds.max_ms} ms"
        return Refused(Refusal.BAD_TTL, f"ttl {ttl_ms} ms is outside {bounds}")
