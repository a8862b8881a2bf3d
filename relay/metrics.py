"""``GET /metrics``: what the relay is doing, in Prometheus' text format.

Two kinds of figures. Latencies are ``prometheus_client`` histograms, observed as
they happen (once per publish, once per commit). Everything else is read off the
relay's own state when a scrape comes (a collector, not counters bumped on the hot
path): the connections open, events in and out by kind, parked events, leases held,
auctions open, documents loaded, messages waiting, federation lag per peer. Each
relay has its own registry, so that several relays in one process (tests,
simulations) keep their figures apart.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from relay.node import RelayNode

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LIMITS = ("publish", "request", "connections")  # the labels of formicary_rate_limited


class Metrics:
    """One relay's metrics; the node and the connections feed it."""

    def __init__(self, node: RelayNode) -> None:
        self.registry = CollectorRegistry()
        self.events_in: Counter[str] = Counter()
        """Events sequenced here, by kind (plain counts: read at scrape time)."""
        self.events_out: Counter[str] = Counter()
        """Event frames sent to subscribers, by kind."""
        self.open_connections = 0
        self.rate_limited: Counter[str] = Counter(dict.fromkeys(LIMITS, 0))
        """Requests refused by a rate limit, by limit (each from 0: an alert on its rate
        needs the series before the first refusal)."""
        self.publish_seconds = Histogram(
            "formicary_publish_seconds",
            "From a publish arriving to its ack going out (sequenced and committed)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "formicary_commit_seconds",
            "One store commit (a batch of records, fsynced)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_State(node, self))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _State(Collector):
    """The figures read off the relay's state at scrape time."""

    def __init__(self, node: RelayNode, metrics: Metrics) -> None:
        self.node = node
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        node, metrics = self.node, self.metrics
        yield _gauge("formicary_connections_open", "Connections open now", metrics.open_connections)
        yield _counter("formicary_connections", "Connections accepted", node.stats["connections"])
        for name in ("published", "duplicates", "rejected", "slow_consumers"):
            yield _counter(
                f"formicary_{name}", f"Publishes {name.replace('_', ' ')}", node.stats[name]
            )
        yield _by_kind("formicary_events_in", "Events sequenced, by kind", metrics.events_in)
        yield _by_kind(
            "formicary_events_out", "Event frames sent to subscribers", metrics.events_out
        )
        yield _gauge(
            "formicary_parked_events",
            "Events waiting for their dependencies",
            node.sequencer.parked_count,
        )
        coordinators = node.coordination.coordinators.values()
        yield _gauge(
            "formicary_leases_held",
            "Work-order claims and advisory locks held",
            sum(len(c.ledger.leases.leases) + len(c.locks.leases) for c in coordinators),
        )
        yield _gauge(
            "formicary_auctions_open",
            "Auctions not yet completed or unawarded",
            sum(len(c.auctions.active) for c in coordinators),
        )
        yield _gauge("formicary_documents_loaded", "Documents in memory", len(node.docs.live))
        inboxes = node.inboxes
        yield _gauge(
            "formicary_messages_waiting",
            "Inbox items (messages, receipts, notices) not yet acknowledged",
            inboxes.waiting,
        )
        messages = CounterMetricFamily(
            "formicary_messages", "Sealed messages, by what became of them", labels=["outcome"]
        )
        for outcome, count in sorted(inboxes.counts.items()):
            messages.add_metric([outcome], count)
        yield messages
        limited = CounterMetricFamily(
            "formicary_rate_limited", "Requests refused by a rate limit", labels=["limit"]
        )
        for limit, count in sorted(metrics.rate_limited.items()):
            limited.add_metric([limit], count)
        yield limited
        yield from _federation(node)


def _federation(node: RelayNode) -> Iterator[Metric]:
    federation = node.federation
    if federation is None:
        return
    up = GaugeMetricFamily("formicary_peer_up", "Whether the link to a peer is up", labels=["peer"])
    lag = GaugeMetricFamily(
        "formicary_federation_lag",
        "Records a peer's namespaces have that this relay's mirrors do not yet",
        labels=["peer"],
    )
    outbox = GaugeMetricFamily(
        "formicary_outbox_entries", "Writes waiting to be delivered to a peer", labels=["peer"]
    )
    lags: Counter[str] = Counter()
    for ns, mirror in federation.mirrors.items():
        lags[ns.rpartition("@")[2]] += max(0, mirror.home_head - node.head(ns))
    for name in sorted(federation.peers):
        link = federation.links.get(name)
        up.add_metric([name], 1.0 if link is not None and link.up else 0.0)
        lag.add_metric([name], lags[name])
        box = federation.outboxes.get(name)
        outbox.add_metric([name], len(box.entries) if box is not None else 0)
    yield up
    yield lag
    yield outbox


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


MAX_KINDS = 64
"""Event kinds given a label of their own; the rest are counted as ``other`` (agents
choose kinds: a label per kind would let one agent grow the scrape without bound)."""


def count_kind(counts: Counter[str], kind: str) -> None:
    counts[kind if kind in counts or len(counts) < MAX_KINDS else "other"] += 1


def _by_kind(name: str, documentation: str, counts: Counter[str]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["kind"])
    for kind, count in sorted(counts.items()):
        family.add_metric([kind], count)
    return family
