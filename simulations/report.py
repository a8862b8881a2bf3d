"""What a run's log says over time: throughput, latencies, recoveries — as
``results.json`` fields, ``timeseries.csv``, PNG plots and ``report.md``.

Everything here is read off the homed logs after the run (the same bytes anyone can
verify), not from the agents' own bookkeeping: a result counts when its
``app.result`` event is in the log; a claim when the relay's ``wo.claimed`` is; a
recovery is the time from a ``lease.expired`` to the next ``wo.claimed`` of the same
order.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from agent_sdk.wire import decode
from relay.store import Store
from simulations.model import AGENT_STATES, Summary

WORK_KINDS = {"app.result", "wo.claimed", "lease.expired"}
FIRST = "first_result"  # a per-second count: orders whose first result came then
COLUMNS = [
    "second",
    "results",
    "orders_done",
    "claims",
    "expiries",
    *[f"agents_{state}" for state in AGENT_STATES],
]


def measure(logs: Iterable[tuple[Store, str]], summary: Summary) -> list[dict[str, int]]:
    """Add latency and recovery figures to ``summary``; return the per-second series."""
    claimed: dict[tuple[str, str], int] = {}  # the latest claim per order
    expired_at: dict[tuple[str, str], int] = {}
    latencies: list[int] = []
    recoveries: list[int] = []
    per_second: dict[int, dict[str, int]] = defaultdict(
        lambda: dict.fromkeys([*WORK_KINDS, FIRST], 0)
    )
    finished: set[tuple[str, str]] = set()
    start: int | None = None
    for store, ns in logs:
        for record in store.scan(ns):
            if record.kind not in WORK_KINDS or not record.event:
                continue
            event = decode(record.event)
            ts, body = event["ts"], event["body"]
            start = ts if start is None else min(start, ts)
            if record.kind == "wo.claimed":
                key = (ns, body["wo"])
                claimed[key] = ts
                if key in expired_at:
                    recoveries.append(ts - expired_at.pop(key))
            elif record.kind == "lease.expired":
                for order, _token in body["leases"]:
                    expired_at[(ns, order)] = ts
            else:
                key = (ns, body["wo"])
                if key not in finished:
                    finished.add(key)
                    per_second[ts // 1000][FIRST] += 1
                    if key in claimed:
                        latencies.append(ts - claimed[key])
            # Expiries per lease: one lease.expired may end many.
            per_second[ts // 1000][record.kind] += (
                len(body["leases"]) if record.kind == "lease.expired" else 1
            )
    summary.extra["latency_ms"] = distribution(latencies)
    summary.extra["recovery_ms"] = distribution(recoveries)
    summary.latencies = sorted(latencies)
    seconds = [*per_second, *summary.states]
    if not seconds:
        return []
    first, last = min(seconds), max(seconds)
    rows, done = [], 0
    states = dict.fromkeys(AGENT_STATES, 0)  # carried over seconds nobody changed state
    for second in range(first, last + 1):
        counts = per_second.get(second, dict.fromkeys([*WORK_KINDS, FIRST], 0))
        done += counts[FIRST]
        states = summary.states.get(second, states)
        rows.append(
            {
                "second": second - first,
                "results": counts["app.result"],
                "orders_done": done,
                "claims": counts["wo.claimed"],
                "expiries": counts["lease.expired"],
                **{f"agents_{state}": states[state] for state in AGENT_STATES},
            }
        )
    return rows


def distribution(values: Sequence[int]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def at(q: float) -> float:
        return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])

    return {"n": len(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": at(1.0)}


def results(summary: Summary) -> dict[str, Any]:
    """``results.json``: the fields every run has, then the scenario's own."""
    document = summary.to_json()
    extra = document.pop("extra")
    return {
        "scenario": summary.scenario,
        "agents": summary.agents,
        "seed": summary.seed,
        "mode": extra.pop("mode", "virtual"),
        "orders_done": summary.done,
        "duplicate_work": summary.duplicate_work,
        "zombie_orders": summary.zombies,
        "log_hash": summary.log_hash,
        "wall_seconds": summary.wall_seconds,
        **{k: v for k, v in document.items() if k not in ("done", "zombies")},
        **extra,
    }


def write(out: Path, summary: Summary, series: list[dict[str, int]]) -> dict[str, Any]:
    """Write results.json, timeseries.csv, the plots and report.md into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    document = results(summary)
    (out / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    with (out / "timeseries.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(series)
    plots = _plots(out, summary, series)
    lines = [
        f"# {summary.scenario}: {summary.agents} agents, seed {summary.seed}",
        "",
        f"- orders done: {summary.done}; duplicate work: {summary.duplicate_work}; "
        f"zombie orders: {summary.zombies}",
        f"- crashes: {summary.crashes}; lease expiries: {summary.expiries}; "
        f"wasted work: {summary.wasted_work}; claims refused as held: {summary.refused_held}",
        f"- run time: {summary.virtual_seconds} s ({document['mode']}); "
        f"wall: {summary.wall_seconds} s; events: {summary.events}",
        f"- claim to result, ms: {_spread(summary.extra.get('latency_ms'))}",
        f"- lease expiry to the next claim, ms: {_spread(summary.extra.get('recovery_ms'))}",
        f"- log hash: `{summary.log_hash}`",
        "",
        *[f"![{title}]({name})" for name, title in plots],
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    return document


def _spread(figures: dict[str, float] | None) -> str:
    """A :func:`distribution` for people: ``p50 12 · p90 30 · p99 41 · max 52 (n 500)``."""
    if not figures or not figures.get("n"):
        return "none measured"
    parts = " · ".join(f"{q} {figures[q]:g}" for q in ("p50", "p90", "p99", "max"))
    return f"{parts} (n {figures['n']:g})"


def _plots(out: Path, summary: Summary, series: list[dict[str, int]]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    made = []
    if any(r["results"] or r["claims"] for r in series):  # (not the auctions' or edits')
        figure, axis = plt.subplots(figsize=(7, 3.5))
        axis.plot([r["second"] for r in series], [r["results"] for r in series], label="results/s")
        axis.plot([r["second"] for r in series], [r["claims"] for r in series], label="claims/s")
        axis.set_xlabel("seconds since the run began")
        axis.set_ylabel("per second")
        axis.legend()
        axis.set_title(f"{summary.scenario}: throughput over time")
        figure.tight_layout()
        figure.savefig(out / "throughput.png", dpi=100)
        plt.close(figure)
        made.append(("throughput.png", "throughput over time"))
    if summary.states:
        figure, axis = plt.subplots(figsize=(7, 3.5))
        axis.stackplot(
            [r["second"] for r in series],
            *[[r[f"agents_{state}"] for r in series] for state in AGENT_STATES],
            labels=AGENT_STATES,
            colors=("#c8d6e5", "#10ac84", "#ee5253"),
        )
        axis.set_xlabel("seconds since the run began")
        axis.set_ylabel("agents")
        axis.legend(loc="upper right")
        axis.set_title(f"{summary.scenario}: agent states")
        figure.tight_layout()
        figure.savefig(out / "agent_states.png", dpi=100)
        plt.close(figure)
        made.append(("agent_states.png", "agents idle, working and down over time"))
    latencies = summary.latencies
    if latencies:
        figure, axis = plt.subplots(figsize=(7, 3.5))
        axis.plot(latencies, [(i + 1) / len(latencies) for i in range(len(latencies))])
        axis.set_xlabel("claim to result, ms")
        axis.set_ylabel("share of orders")
        axis.set_title(f"{summary.scenario}: latency CDF")
        figure.tight_layout()
        figure.savefig(out / "latency_cdf.png", dpi=100)
        plt.close(figure)
        made.append(("latency_cdf.png", "claim-to-result latency CDF"))
    return made


def scaling_plot(out: Path, title: str, points: list[tuple[float, float]]) -> None:
    """The sweep's scaling plot, as ``scaling.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.plot([x for x, _ in points], [y for _, y in points], marker="o")
    axis.set_xlabel("agents")
    axis.set_ylabel("orders done per second (simulated)")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(out / "scaling.png", dpi=100)
    plt.close(figure)
