"""Leader election on the relay's leases: one hot loop per line of work.

``async with Ledger(client, ns).elect("scheduler") as lead:`` waits until this agent
holds the lock ``leader:scheduler`` (a follower: it tries again when the leader's
lease can have run out), then renews it at a third of its TTL while the body runs,
and releases it after. ``lead.token`` is the fencing token: it rises with every new
leader, so whatever the leader writes elsewhere can carry it, and a store that keeps
the largest token seen refuses a deposed leader's late write. If a renewal is
refused or not confirmed in time, the body is cancelled and :class:`LeaseLost`
raised: past that point another agent may lead. An acquire not answered in time, or
whose outcome is unknown (:class:`OutcomeUnknown`), raises :class:`LeaseLost` without
running the body, once the lock it may have been granted is asked for again and
released (a grant still unknown then is held by nobody until its lease runs out).

A leader that dies (kill -9, a lost host) stops renewing; its lease lapses after at
most its TTL and the next follower's retry takes over with a larger token. The TTL
is the bound on failover: a shorter one fails over sooner and renews more often.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import trio

from agent_sdk.client import Delivery
from agent_sdk.errors import as_told, unwrap_single
from agent_sdk.ledger import (
    Claim,
    LeaseLost,
    Ledger,
    LedgerRefusal,
    OutcomeUnknown,
    keep_renewed,
)

log = logging.getLogger("formicary.sdk")

CONFIRM_TIMEOUT = 30.0
"""Seconds to wait for the relay's answer to an acquire or a release."""


@asynccontextmanager
async def hold_lock(
    ledger: Ledger,
    name: str,
    ttl_ms: int = 15_000,
    *,
    wait: bool = True,
    on_wait: Callable[[dict[str, Any]], None] | None = None,
    wait_at_most: float | None = None,
) -> AsyncIterator[Claim]:
    """Hold lock ``name`` for the body's duration (see the module docstring).

    With ``wait`` false, a lock held by another agent raises the ledger's refusal
    (``held``) at once instead of waiting for it; ``wait_at_most`` (seconds) waits that
    long at most, then raises the refusal of the last ask. ``on_wait`` is called with
    the holder (``{holder, token, expires_ms}`` as the refusal names it) when waiting
    starts, once.
    """
    ttl = ttl_ms / 1000
    following = AsyncExitStack()  # a follower's subscription to releases
    give_up = None if wait_at_most is None else trio.current_time() + wait_at_most
    try:
        lock, sent = await _acquire(ledger, name, ttl_ms, wait, following, on_wait, give_up)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CONFIRM_TIMEOUT):
            await following.aclose()  # (shielded: a granted lock must reach the try below)
    lost = False
    try:
        with unwrap_single():
            async with trio.open_nursery() as nursery:

                async def renew() -> None:
                    nonlocal lock
                    lock = await ledger.renew_lock(lock, ttl_ms)

                async def renew_forever() -> None:
                    nonlocal lost
                    # Any failure is a lost lease: refused, or the connection is gone.
                    if await keep_renewed(renew, ttl, sent, (Exception,)):
                        lost = True
                        nursery.cancel_scope.cancel()

                nursery.start_soon(renew_forever)
                yield lock
                nursery.cancel_scope.cancel()
    finally:
        if lost:
            # As in Ledger.hold: a renewal given up on may still land, and without this
            # the lock would stay with a leader that stopped leading for a whole TTL.
            ledger.request_later("lock.release", {"name": lock.order, "token": lock.token})
        elif not ledger.client.stopped.is_set():
            with trio.CancelScope(shield=True), trio.move_on_after(CONFIRM_TIMEOUT):
                try:
                    await as_told(lambda: ledger.unlock(lock))
                except Exception:
                    pass  # lapsed already, or no connection: it lapses at its expiry
    if lost:
        raise LeaseLost(f"{name}: the lease was lost; stopped")


async def _acquire(
    ledger: Ledger,
    name: str,
    ttl_ms: int,
    wait: bool,
    following: AsyncExitStack,
    on_wait: Callable[[dict[str, Any]], None] | None = None,
    give_up: float | None = None,
) -> tuple[Claim, float]:
    """Take lock ``name``, waiting as a follower while another agent holds it: until
    its lease can have lapsed, or at once when the relay says it was released. Past
    ``give_up`` (trio's clock) a ``held`` refusal is raised. The wait is bounded
    between asks, never by cancelling one: an ask cut short could be granted a lock
    nobody then holds or releases."""
    ttl = ttl_ms / 1000
    feed = None
    while True:
        # One request, however often asked (the same nonce and ts): see Ledger.hold.
        nonce, ts = ledger.client.nonce(), ledger.client.clock_ms()
        unknown: OutcomeUnknown | None = None
        with trio.CancelScope(shield=True) as asking:
            # Shielded: a lock the relay granted must reach us, so that it is released.
            asking.deadline = trio.current_time() + CONFIRM_TIMEOUT
            sent = trio.current_time()
            try:
                return await ledger.lock(name, ttl_ms, nonce=nonce, ts=ts), sent
            except LedgerRefusal as refusal:
                if refusal.problem != "held" or not wait:
                    raise
                if give_up is not None and trio.current_time() >= give_up:
                    raise
                holder = refusal.holder or {}
            except OutcomeUnknown as exc:  # (the log may not be read: at once)
                unknown = exc  # perhaps granted, as a lock answered too late
        if asking.cancelled_caught or unknown is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(CONFIRM_TIMEOUT):
                # Granted late (the client sends the request again after a reconnect),
                # it would be held by nobody for a TTL: ask for the answer once more,
                # and give back what was granted.
                try:
                    await ledger.unlock(await ledger.lock(name, ttl_ms, nonce=nonce, ts=ts))
                except LedgerRefusal:
                    pass  # refused, or lapsed already: nothing held
                except OutcomeUnknown as exc:  # nothing to unlock it with (no token)
                    log.warning("%s may stay locked until its lease runs out: %s", name, exc)
            why = f"in {CONFIRM_TIMEOUT} s" if unknown is None else f"({unknown})"
            raise LeaseLost(f"{name}: no answer to the acquire {why}") from unknown
        if feed is None:  # follow releases from now on, then ask again (none is missed)
            if on_wait is not None:
                on_wait(holder)
            feed = await following.enter_async_context(
                ledger.client.subscribe(ledger.ns, kinds=["lock.released"])
            )
            continue
        # The lease ends at a time: wait for it (the holder may renew meanwhile; then
        # wait again), or for its release. Never longer than a third of our TTL.
        expires = holder.get("expires_ms")
        left = (expires - ledger.client.clock_ms()) / 1000 if isinstance(expires, int) else ttl
        # (at least a twentieth of the TTL: a clock ahead of the relay's must not
        # turn the wait into a busy loop of refused acquires; then one last ask at
        # give_up)
        wake = trio.current_time() + min(max(left + 0.01, ttl / 20), ttl / 3)
        if give_up is not None:
            # (a deadline, not a duration: the clock moves on between the check above
            # and here, and a duration computed past give_up is negative, which
            # move_on_after refuses with ValueError)
            wake = min(wake, give_up)
        with trio.move_on_at(wake):
            async for item in feed:
                if isinstance(item, Delivery) and item.event.event.body.get("lock") == name:
                    break


def elect(ledger: Ledger, name: str, ttl_ms: int = 15_000) -> AbstractAsyncContextManager[Claim]:
    """Lead ``name`` (the lock ``leader:<name>``) while the body runs, following
    until then. See the module docstring."""
    return hold_lock(ledger, f"leader:{name}", ttl_ms)
