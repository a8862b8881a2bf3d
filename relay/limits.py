"""Rate limits and connection caps (pure: the caller passes the clock).

Each agent key has two token buckets, one for publishes and one for requests
(queries and messages): a bucket holds up to ``burst`` tokens and refills at
``rate`` per second; each frame takes one, and a frame that finds none is refused
with 5004 ``rate_limited`` saying when one will be there. A rate or a cap of 0 is
no limit. The buckets are per key,
not per connection, so opening more connections buys nothing; connections per key
and per address are capped too. Peer relays' links are not limited here: they carry
many agents, each limited at its own relay.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import TypeVar

from agent_sdk.errors import ErrorCode, ProtocolError

T = TypeVar("T")
MAX_TRACKED_KEYS = 100_000
"""Buckets kept at most; the least recently used beyond are forgotten (a key forgotten
starts again with a full bucket, which costs at most one burst). Buckets that have
filled up again are forgotten anyway, as the limiter goes (:meth:`Limiter.take`): a
full bucket is what a key without one gets, so only keys active within the last
``(2 * burst - 1) / rate`` seconds have one. This cap is for a burst of fresh keys
faster than that."""


@dataclass(frozen=True)
class RateLimits:
    publish_rate: float = 100.0
    publish_burst: int = 200
    request_rate: float = 200.0
    request_burst: int = 400
    connections_per_key: int = 64
    connections_per_address: int = 4096
    trusted_proxies: frozenset[str] = frozenset()
    """Addresses of reverse proxies whose ``X-Forwarded-For`` names the client."""


UNLIMITED = RateLimits(
    publish_rate=0, request_rate=0, connections_per_key=0, connections_per_address=0
)
"""No rate limits and no connection caps (simulations, capacity benchmarks)."""


def as_toml(limits: RateLimits) -> str:
    """The ``[limits]`` table of a ``relay.toml`` that sets ``limits``."""
    return (
        "[limits]\n"
        f"publish_rate = {int(limits.publish_rate)}\npublish_burst = {limits.publish_burst}\n"
        f"request_rate = {int(limits.request_rate)}\nrequest_burst = {limits.request_burst}\n"
        f"connections_per_key = {limits.connections_per_key}\n"
        f"connections_per_address = {limits.connections_per_address}\n"
    )


PUBLISH_UNIT = 16 * 1024
"""Event bytes one publish token pays for: a publish costs one token per started
unit, so a large event (a document update that pycrdt must decode, at up to several
milliseconds for 256 KiB) costs its sender in proportion, not like a small one."""


def publish_cost(size: int) -> int:
    """Publish tokens an event of ``size`` bytes costs (capped at a burst when taken)."""
    return 1 + max(0, size - 1) // PUBLISH_UNIT


@dataclass
class TokenBucket:
    rate: float
    burst: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float = 0.0) -> TokenBucket:
        """A bucket holding its whole burst (at ``now``; 0.0: full whenever first used)."""
        return cls(rate=rate, burst=burst, tokens=burst, stamp=now)

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens when there is at least one, going into debt for the
        rest (so a costly frame is not starved by cheap ones that keep the bucket
        from filling; the debt delays what follows, keeping the average rate): 0.0
        when taken, else the seconds until there is one (nothing is taken then)."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= cost
            return 0.0
        return (1.0 - self.tokens) / self.rate if self.rate > 0 else float("inf")


@dataclass
class ErrorBudget:
    """Bytes of ``error`` frames one connection may still be sent (protocol 1, error
    allowance). Every byte the connection sends earns one; time earns ``refill`` a
    second, up to ``allowance`` (time alone never raises it past that). Time pays
    for the errors a client does not cause with bad input, which may be larger than
    what prompted them or come unprompted: a document's ``doc_resync``, a presence
    update dropped over its rate (``awareness_refused``), a subscription ended by a
    policy change. A connection that sends nothing but bad input still gets no more
    than its own bytes back, plus ``allowance``, plus ``refill`` a second."""

    allowance: float
    refill: float
    credit: float
    stamp: float

    @classmethod
    def full(cls, allowance: float, refill: float, now: float) -> ErrorBudget:
        return cls(allowance=allowance, refill=refill, credit=allowance, stamp=now)

    def earn(self, size: int, now: float) -> None:
        """The connection sent ``size`` bytes (at ``now``)."""
        self._refill(now)
        self.credit += size

    def spend(self, size: int, now: float) -> bool:
        """Charge an error frame of ``size`` bytes: False once the budget is overdrawn
        (the connection is then closed, and the frame not sent)."""
        self._refill(now)
        self.credit -= size
        return self.credit >= 0

    def _refill(self, now: float) -> None:
        # What time earned since the last change, before bytes change the credit:
        # time fills it up to the allowance, whatever bytes add on top later.
        if self.credit < self.allowance:
            earned = self.credit + (now - self.stamp) * self.refill
            self.credit = min(self.allowance, earned)
        self.stamp = now

    @property
    def overdrawn(self) -> bool:
        return self.credit < 0


class Limiter:
    """One relay's buckets and connection counts."""

    def __init__(self, limits: RateLimits) -> None:
        self.limits = limits
        self._buckets: OrderedDict[tuple[bytes, str], TokenBucket] = OrderedDict()
        self.per_key: dict[bytes, int] = {}
        self.per_address: dict[str, int] = {}

    def check(self, key: bytes, what: str, now: float, cost: int = 1) -> None:
        """Charge ``cost`` ``publish`` or ``request`` tokens to ``key``; raises
        ``rate_limited``."""
        wait = self.take(key, what, now, cost)
        if wait:
            rate, burst = self._rate(what)
            what_per = "publish tokens (one per started 16 KiB of an event)"
            if what != "publish":
                what_per = "requests"
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"over {rate:g} {what_per} per second (burst {burst}); "
                f"try again in {int(wait * 1000) + 1} ms",
            )

    def take(self, key: bytes, what: str, now: float, cost: int = 1) -> float:
        """Charge ``cost`` ``publish`` or ``request`` tokens to ``key`` (at most a
        burst): 0.0 when charged, else the seconds until it can be (nothing is charged
        then)."""
        rate, burst = self._rate(what)
        if rate <= 0:
            return 0.0  # 0: no limit
        self._forget_full(now)
        bucket = self._buckets.get((key, what))
        if bucket is None:
            bucket = self._buckets[(key, what)] = TokenBucket.full(rate, burst, now)
            if len(self._buckets) > MAX_TRACKED_KEYS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end((key, what))
        return bucket.take(now, min(cost, burst))

    def _forget_full(self, now: float) -> None:
        """Drop the least recently used buckets while they are full again. A key
        that authenticated once (a throwaway one, say) must not be remembered for
        ever; one in debt keeps its bucket until it has paid, whether or not it is
        connected, so that reconnecting buys nothing. Kept in order of use, the
        buckets are looked at from the oldest: the first that is not full was used
        less than a refill ago, and so was every one after it."""
        buckets = self._buckets
        while buckets:
            bucket = next(iter(buckets.values()))
            if bucket.tokens + (now - bucket.stamp) * bucket.rate < bucket.burst:
                return
            buckets.popitem(last=False)

    def _rate(self, what: str) -> tuple[float, int]:
        limits = self.limits
        if what == "publish":
            return limits.publish_rate, limits.publish_burst
        return limits.request_rate, limits.request_burst

    def open(self, address: str) -> ProtocolError | None:
        """Count a new WebSocket connection from ``address`` as it is accepted (before
        it authenticates, and plain Yjs clients too), or say why not."""
        cap = self.limits.connections_per_address
        if cap and address and self.per_address.get(address, 0) >= cap:
            reason = f"this address has {cap} connections, the limit"
            return ProtocolError(ErrorCode.TOO_MANY_CONNECTIONS, reason)
        if address:
            self.per_address[address] = self.per_address.get(address, 0) + 1
        return None

    def close(self, address: str) -> None:
        if address:
            _decrement(self.per_address, address)

    def connect(self, key: bytes) -> ProtocolError | None:
        """Count a connection of ``key`` as it authenticates, or say why not."""
        cap = self.limits.connections_per_key
        if cap and self.per_key.get(key, 0) >= cap:
            reason = f"this key has {cap} connections, the limit"
            return ProtocolError(ErrorCode.TOO_MANY_CONNECTIONS, reason)
        self.per_key[key] = self.per_key.get(key, 0) + 1
        return None

    def disconnect(self, key: bytes) -> None:
        _decrement(self.per_key, key)

    def client_address(self, peer: str, forwarded_for: list[str]) -> str:
        """Who a connection is from: its peer address, unless that is a trusted proxy;
        then the right-most address of ``X-Forwarded-For`` that is not one (what
        the client wrote further left is its own claim, not to be believed)."""
        trusted = {_normal(proxy) for proxy in self.limits.trusted_proxies}
        if not trusted or _normal(peer) not in trusted:
            return peer
        hops = [_normal(hop) for header in forwarded_for for hop in header.split(",")]
        for hop in reversed(hops):
            if hop and hop not in trusted:
                return hop
        return peer


def _normal(address: str) -> str:
    """One spelling per address: ``::ffff:10.0.0.2`` is ``10.0.0.2``; IPv6 compressed.
    Text that is not an address stays as written (it is still one client's name)."""
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return address.strip()
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _decrement(table: dict[T, int], name: T) -> None:
    if name in table:
        table[name] -= 1
        if not table[name]:
            del table[name]
