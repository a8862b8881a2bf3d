"""Stake balances of a namespace, and the reputation that awards feed (pure).

Stakes are integers. Every member gets ``initial`` once, at its first join; after
that stake only moves: a bid locks it, closing or withdrawing unlocks it, a failure
slashes a fraction of it (gone for good, into ``slashed``). So at every point of the
log ``sum(balances) + sum(locked) + slashed == granted`` — :meth:`Stakes.conserved`.

Reputation is a score per agent from the outcomes of its awards and the vouches it
received, each decaying with a half-life:
``score(t) = sum(value_i * 2 ** (-(t - t_i) / half_life))``. An award completed is
worth +1, one failed (released, expired or rejected) -1. A vouch of ``weight`` stake
by an agent whose own score was ``s`` when it vouched is worth
``min(weight / 100, max(0, s))``: bounded by the voucher's score, so agents nobody
trusts add nothing. Times come from the log, so the score is reproducible from the
log alone (IEEE doubles, evaluated in a fixed order).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PPM = 1_000_000
"""Fractions are parts per million: integer arithmetic, the same everywhere."""


@dataclass
class Stakes:
    initial: int = 100
    balances: dict[bytes, int] = field(default_factory=dict)
    locked: dict[tuple[bytes, str], int] = field(default_factory=dict)
    slashed: int = 0
    granted: int = 0

    def grant_once(self, agent: bytes) -> int:
        """The first-join grant; 0 for an agent that has had it."""
        if agent in self.balances:
            return 0
        self.balances[agent] = self.initial
        self.granted += self.initial
        return self.initial

    def available(self, agent: bytes) -> int:
        return self.balances.get(agent, 0)

    def lock(self, agent: bytes, key: str, amount: int) -> bool:
        """Move ``amount`` from the balance into a lock named ``key``; False if short."""
        if amount <= 0 or self.available(agent) < amount or (agent, key) in self.locked:
            return False
        self.balances[agent] -= amount
        self.locked[(agent, key)] = amount
        return True

    def unlock(self, agent: bytes, key: str) -> int:
        amount = self.locked.pop((agent, key), 0)
        if amount:
            self.balances[agent] += amount
        return amount

    def slash(self, agent: bytes, key: str, ppm: int) -> int:
        """Take ``ppm`` of a lock for good, give the rest back; returns what was taken."""
        amount = self.locked.pop((agent, key), 0)
        cut = amount * ppm // PPM
        self.slashed += cut
        self.balances[agent] = self.balances.get(agent, 0) + amount - cut
        return cut

    def cut(self, agent: bytes, key: str, ppm: int) -> int:
        """Take ``ppm`` of a lock for good and keep the rest locked (a vouch goes on,
        smaller); returns what was taken."""
        amount = self.locked.get((agent, key), 0)
        taken = amount * ppm // PPM
        if taken:
            self.locked[(agent, key)] = amount - taken
            self.slashed += taken
        return taken

    def locked_by(self, agent: bytes) -> int:
        return sum(amount for (who, _), amount in self.locked.items() if who == agent)

    def conserved(self) -> bool:
        held = sum(self.balances.values()) + sum(self.locked.values()) + self.slashed
        return held == self.granted


VOUCH_UNIT = 100
"""Stake a vouch needs to be worth 1 (if its voucher's score allows)."""


@dataclass(frozen=True, slots=True)
class Vouch:
    voucher: bytes
    vouchee: bytes
    weight: int
    reason: str
    at_ms: int
    value: float
    """What it adds to the vouchee's score at ``at_ms`` (decaying from there)."""


@dataclass
class Reputation:
    half_life_ms: int = 7 * 24 * 3600 * 1000
    outcomes: dict[bytes, list[tuple[int, float]]] = field(default_factory=dict)
    vouches: dict[tuple[bytes, bytes], Vouch] = field(default_factory=dict)
    """(voucher, vouchee) -> the vouch in force. Changed by :meth:`vouch` and
    :meth:`revoke` only, which keep the index by vouchee."""
    _for: dict[bytes, dict[bytes, Vouch]] = field(default_factory=dict, compare=False, repr=False)
    """vouchee -> voucher -> the vouch in force: what :meth:`score` reads (on every bid,
    vouch and award ranking) instead of every vouch of the namespace."""

    def __post_init__(self) -> None:
        for (voucher, vouchee), made in self.vouches.items():
            self._for.setdefault(vouchee, {})[voucher] = made

    def record(self, agent: bytes, at_ms: int, value: float) -> None:
        self.outcomes.setdefault(agent, []).append((at_ms, value))

    def vouch(self, voucher: bytes, vouchee: bytes, weight: int, reason: str, at_ms: int) -> Vouch:
        bound = max(0.0, self.score(voucher, at_ms))
        made = Vouch(voucher, vouchee, weight, reason, at_ms, min(weight / VOUCH_UNIT, bound))
        self.vouches[(voucher, vouchee)] = made
        self._for.setdefault(vouchee, {})[voucher] = made
        return made

    def revoke(self, voucher: bytes, vouchee: bytes) -> Vouch | None:
        """End the vouch of ``voucher`` for ``vouchee``; the vouch, if there was one."""
        gone = self.vouches.pop((voucher, vouchee), None)
        if gone is not None:
            mine = self._for[vouchee]
            del mine[voucher]
            if not mine:
                del self._for[vouchee]
        return gone

    def vouchers_of(self, vouchee: bytes) -> list[Vouch]:
        """The vouches in force for ``vouchee``, by voucher (the order scores add them)."""
        return sorted(self._for.get(vouchee, {}).values(), key=lambda v: v.voucher)

    def score(self, agent: bytes, now_ms: int) -> float:
        total = 0.0
        for at, value in self.outcomes.get(agent, ()):
            total += value * 2.0 ** (-(now_ms - at) / self.half_life_ms)
        for vouch in self.vouchers_of(agent):
            total += vouch.value * 2.0 ** (-(now_ms - vouch.at_ms) / self.half_life_ms)
        return total
