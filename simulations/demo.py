"""``formicary demo``: a relay and a few agents on loopback, on embedded storage.

It shows the relay core's guarantees in one run: agents publish causally linked
events concurrently, a re-published event gets its original receipt back, an event
sent before its dependency waits (parks) until the dependency is sequenced, a
subscriber sees every event in one order, and the stored log verifies offline.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import trio

from agent_sdk.client import Delivery, RelayClient
from agent_sdk.identity import Identity
from agent_sdk.wire import Event, sign_event
from relay.app import open_store, run_relay
from relay.node import RelayConfig
from relay.verify import verify_log

NS = "demo@local"


def _say(text: str) -> None:
    print(text, flush=True)


async def run_demo(agents: int = 3, events: int = 5, data: Path | None = None) -> int:
    with tempfile.TemporaryDirectory(prefix="formicary-demo-") as tmp:
        data = data or Path(tmp)
        async with trio.open_nursery() as nursery:
            node, server = await nursery.start(
                run_relay, data, RelayConfig(name="local"), "127.0.0.1", 0
            )
            port = server.listeners[0].socket.getsockname()[1]
            url = f"ws://127.0.0.1:{port}"
            _say(f"relay 'local' ({node.identity.id[:16]}...) on {url}, data in {data}")
            code = await _agents(url, agents, events)
            nursery.cancel_scope.cancel()

        store = open_store(data)
        try:
            verdict = verify_log(NS, store.scan(NS), lambda dep: store.find([dep]).get(dep))
        finally:
            store.close()
        _say(
            f"offline verification of {NS}: {'ok' if verdict.ok else 'FAILED'} "
            f"({verdict.records} events, {verdict.sealed} seals"
            + (f"; seq {verdict.bad_seq}: {verdict.reason})" if not verdict.ok else ")")
        )
        return code if verdict.ok else 1


async def _agents(url: str, agents: int, events: int) -> int:
    identities = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(agents)]
    names = {identity.public_key: f"agent-{i}" for i, identity in enumerate(identities)}
    seen: list[Delivery] = []
    total = agents * events + 2  # + the parked pair below

    async with (
        RelayClient.connect(url, Identity.generate()) as watcher,
        watcher.subscribe(NS, start=1) as feed,
        trio.open_nursery() as nursery,
    ):

        async def agent(identity: Identity) -> None:
            async with RelayClient.connect(url, identity) as client:
                mine: bytes | None = None
                for step in range(events):
                    deps = [mine] if mine else []
                    if seen and seen[-1].event.id not in deps:
                        deps.append(seen[-1].event.id)  # react to the latest we saw
                    published = await client.publish(NS, "demo.step", {"step": step}, deps=deps)
                    mine = published.receipt.id
                    await trio.sleep(0.01 * (1 + identities.index(identity)))

        for identity in identities:
            nursery.start_soon(agent, identity)

        async for item in feed:
            if isinstance(item, Delivery):
                seen.append(item)
                who = names.get(item.event.event.author, "watcher")
                _say(
                    f"  seq {item.receipt.seq:3}  {who:8}  {item.event.event.kind:12} "
                    f"deps={len(item.event.event.deps)}  id={item.event.id.hex()[:12]}"
                )
                if len(seen) == agents * events:
                    nursery.start_soon(_parked_and_duplicate, watcher)
                if len(seen) == total:
                    break
    _say(f"{len(seen)} events delivered once each, in seq order")
    return 0 if [d.receipt.seq for d in seen] == list(range(1, total + 1)) else 1


async def _parked_and_duplicate(client: RelayClient) -> None:
    first = sign_event(
        Event(ns=NS, kind="demo.cause", author=client.identity.public_key, ts=_now()),
        client.identity.sign,
    )
    second = sign_event(
        Event(
            ns=NS,
            kind="demo.effect",
            author=client.identity.public_key,
            deps=(first.id,),
            ts=_now(),
        ),
        client.identity.sign,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.publish_signed, second)  # parks: its dep is unknown
        await trio.sleep(0.05)
        await client.publish_signed(first)
    again = await client.publish_signed(first)
    _say(
        "effect sent before its cause was parked, then sequenced after it; re-publishing "
        f"the cause returned seq {again.receipt.seq} again (duplicate={again.duplicate})"
    )


def _now() -> int:
    import time

    return time.time_ns() // 1_000_000


if __name__ == "__main__":
    sys.exit(trio.run(run_demo))
