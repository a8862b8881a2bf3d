"""Stake balances never go below zero: a lock asks for what is there (stakes.py)."""

from __future__ import annotations

from relay.coordination.stakes import Stakes

A = b"a" * 32


def test_a_lock_over_the_balance_is_refused_and_moves_nothing() -> None:
    """An award passed on to a bidder that spent its stake elsewhere since relies on
    this refusal (auctions.py skips that bidder): the stake it bid is not there."""
    stakes = Stakes()
    stakes.grant_once(A)
    assert stakes.lock(A, "auc-1", 60)
    assert not stakes.lock(A, "auc-2", 41)  # 40 left
    assert (stakes.available(A), stakes.locked_by(A)) == (40, 60)
    assert not stakes.lock(A, "auc-1", 10)  # one lock per key
    assert stakes.lock(A, "auc-2", 40) and stakes.available(A) == 0
    assert stakes.conserved()
