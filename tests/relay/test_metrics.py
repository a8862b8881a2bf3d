"""``GET /metrics``, ``/info`` and ``/health`` on a real relay, scraped and parsed."""

from __future__ import annotations

import json
import urllib.request

import trio
from prometheus_client.parser import text_string_to_metric_families

from agent_sdk.client import RelayClient
from agent_sdk.ledger import Ledger
from tests.conftest import RunningRelay, identity


async def http_get(relay: RunningRelay, path: str) -> tuple[str, bytes]:
    """``(content type, body)`` of ``GET path`` on the relay's own port."""
    url = relay.url.replace("ws://", "http://") + path
    # No proxy: an http_proxy in the environment must not see loopback traffic.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get() -> tuple[str, bytes]:
        with opener.open(url, timeout=10) as response:
            return response.headers["Content-Type"], response.read()

    return await trio.to_thread.run_sync(get)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by name and labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_what_the_relay_did(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as agent:
        for n in range(5):
            await agent.publish("work@local", "app.note", {"n": n})
        ledger = Ledger(agent, "work@local")
        order = await ledger.create("fix the parser")
        await ledger.claim(order)
        async with agent.subscribe("work@local", start=1, kinds=["app.note"]) as feed:
            got = 0
            async for item in feed:
                got += hasattr(item, "event")
                if got == 5:
                    break
        content_type, body = await http_get(relay, "/metrics")
    assert content_type.startswith("text/plain; version=0.0.4")
    seen = samples(body.decode())
    assert seen[("formicary_events_in_total", (("kind", "app.note"),))] == 5
    assert seen[("formicary_events_out_total", (("kind", "app.note"),))] >= 5
    assert seen[("formicary_connections_open", ())] == 1  # the agent, while it scraped
    assert seen[("formicary_leases_held", ())] == 1  # the claim
    assert seen[("formicary_publish_seconds_count", ())] >= 7  # notes, create, claim
    assert seen[("formicary_commit_seconds_count", ())] >= 1
    assert seen[("formicary_parked_events", ())] == 0
    assert ("formicary_documents_loaded", ()) in seen
    for limit in ("publish", "request", "connections"):  # there before the first refusal
        assert seen[("formicary_rate_limited_total", (("limit", limit),))] == 0


async def test_the_items_waiting_are_counted_in_both_answers(relay: RunningRelay) -> None:
    """GET /metrics and the status answer read the inboxes' running total."""
    async with RelayClient.connect(relay.url, identity(2)):
        pass  # known here from now on: it can be sent messages
    async with RelayClient.connect(relay.url, identity(1)) as alice:
        for n in range(3):
            await alice.send(identity(2).id, f"note {n}")
    seen = samples((await http_get(relay, "/metrics"))[1].decode())
    info = json.loads((await http_get(relay, "/info"))[1])
    assert seen[("formicary_messages_waiting", ())] == 3
    assert info["messages"]["waiting"] == 3 and info["messages"]["inboxes"] == 1


async def test_health_and_info_answer(relay: RunningRelay) -> None:
    assert (await http_get(relay, "/health"))[1] == b"ok\n"
    content_type, body = await http_get(relay, "/info")
    info = json.loads(body)
    assert content_type == "application/json" and info["name"] == "local"
    assert info["key"] == relay.node.identity.id and "messages" in info
    assert info["limits"]["max_frame"] == relay.node.config.max_frame
