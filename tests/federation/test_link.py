"""A link's dialling, and how long a mirror follows over it, in virtual time: relays
on the in-memory network of the simulations (:mod:`simulations.memnet`) under trio's
autojump ``MockClock``, so that waits are measured on the clock they were asked of."""

from __future__ import annotations

import random
from itertools import pairwise
from pathlib import Path

import pytest
import trio
import trio.testing

import federation.link
from federation.link import BACKOFF_FIRST, BACKOFF_MAX, Link
from federation.network import MIRROR_LINGER, Federation, Mirror
from federation.peers import Peer
from relay.node import RelayConfig
from relay.sequencer import Limits
from simulations.world import VirtualWorld
from tests.federation.fixtures import federation_of, plan, start

FAILED_DIALS = 12
"""Enough failed dials in a row for the wait to reach its cap and stay there."""
TIMEOUT = 30


def links(world: VirtualWorld, name: str) -> dict[str, Link]:
    network = world.relays[name].node.federation
    assert isinstance(network, Federation)
    return network.links


async def test_a_link_backs_off_doubling_to_a_cap_and_starts_over_once_up(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """14.2: after a failed dial the relay waits 0.1 s, doubling up to 5 s, each wait
    times a random factor from 0.5 to 1.5, and back to 0.1 s once a link succeeds.
    Without the cap, a peer down for a few minutes would be dialled again only hours
    after it came back; without the reset, every drop after one outage would wait 5 s."""
    monkeypatch.setattr(federation.link, "random", random.Random(7))
    world = VirtualWorld(seed=7)
    await world.start_relay(nursery, RelayConfig(name="a"), peers=("b",))
    await world.start_relay(nursery, RelayConfig(name="b"), peers=("a",))
    await world.federation_up(["a", "b"])
    link = links(world, "a")["b"]
    assert link.dial is not None
    dial, dials, enough = link.dial, list[float](), trio.Event()

    async def timed() -> trio.abc.Stream:
        dials.append(trio.current_time())
        if len(dials) == FAILED_DIALS:
            enough.set()
        return await dial()

    link.dial = timed
    for outage in ("first", "after the link was up again"):
        dials.clear()
        enough = trio.Event()
        await world.partition("a", "b")  # the link drops; every dial fails
        await enough.wait()
        gaps = [later - earlier for earlier, later in pairwise(dials)]
        for k, gap in enumerate(gaps):  # (the first dial came 0.1 s after the drop)
            wait = min(BACKOFF_FIRST * 2 ** (k + 1), BACKOFF_MAX)
            assert wait * 0.5 <= gap <= wait * 1.5, (outage, k, gap)
        world.heal("a", "b")
        await link.wait_for(lambda: link.up)


async def test_a_peer_under_another_name_is_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    """14.2: a link counts only when the dialled relay's ``hello.name`` is the name its
    key is listed under. b's address and key listed as relay c (a slip in --peer) is
    refused: b would otherwise be taken for the home of every ``*@c`` namespace."""
    relays = plan(tmp_path, "a", "b")
    await start(nursery, relays["b"], (relays["a"].peer(),))
    as_c = Peer("c", relays["b"].key, url=relays["b"].url)
    a = await start(nursery, relays["a"], (as_c,))
    link = federation_of(a).links["c"]
    with trio.fail_after(TIMEOUT):
        await link.wait_for(lambda: link.refusals > 0 or link.up)
    assert link.refusals > 0 and link.connections == 0
    assert link.last_error is not None and "named 'b', not 'c'" in link.last_error


PARK_TIMEOUT_S = 10.0


async def mirror_of_nothing(nursery: trio.Nursery) -> tuple[Federation, Mirror]:
    """Relays a and b in virtual time (a's events park PARK_TIMEOUT_S at most), and a's
    mirror of x@b, a namespace of b that holds nothing: (a's federation, the mirror)."""
    world = VirtualWorld(seed=7)
    limits = Limits(park_timeout_ms=int(PARK_TIMEOUT_S * 1000))
    await world.start_relay(nursery, RelayConfig(name="a", sequencer=limits), peers=("b",))
    await world.start_relay(nursery, RelayConfig(name="b"), peers=("a",))
    await world.federation_up(["a", "b"])
    network = world.relays["a"].node.federation
    assert isinstance(network, Federation)
    mirror = Mirror(network, "x@b", network.links["b"], world.relay_identity("b").public_key)
    network.mirrors["x@b"] = mirror
    return network, mirror


async def test_a_mirror_stops_following_once_no_parked_event_waits_for_it(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """14.8: a mirror follows its home while a subscription holds it, or while a
    parked event waits for a seq it lacks; then it lingers MIRROR_LINGER and stops.
    A want outlived the parked event: a peer's ``fed.locate`` answer placing an event
    past the home's head (any seq from 1 to 2^63 - 1 is taken as a pointer) kept the
    mirror following its home for ever, one subscription per namespace named."""
    network, mirror = await mirror_of_nothing(nursery)
    mirror.want(10**12)  # as a parked event's dependency does (Federation._fetch)
    with trio.fail_after(PARK_TIMEOUT_S + 2 * MIRROR_LINGER + 10):
        await mirror.run()  # returns once it has stopped
    assert "x@b" not in network.mirrors and not mirror.needed


async def test_a_mirror_needed_again_while_it_lingers_still_stops_after(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A want that lapses, then another while the mirror lingers, following still:
    once the second lapses too, the mirror stops (its watch returned after the first
    linger, and it followed for ever)."""
    network, mirror = await mirror_of_nothing(nursery)
    mirror.want(10**12)
    stopped = trio.Event()

    async def run() -> None:
        await mirror.run()
        stopped.set()

    nursery.start_soon(run)
    await trio.sleep(PARK_TIMEOUT_S + MIRROR_LINGER / 2)  # lapsed; lingering, following
    assert mirror.following and not mirror.needed and not stopped.is_set()
    mirror.want(10**12)  # needed again before the linger ends
    with trio.fail_after(PARK_TIMEOUT_S + 2 * MIRROR_LINGER + 10):
        await stopped.wait()
    assert "x@b" not in network.mirrors and not mirror.following
