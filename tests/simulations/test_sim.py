"""Simulations in virtual time: reproducible, and telling coordination from none.

Small sizes (seconds): CI runs every scenario that exists this way.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from agent_sdk.cli import main
from agent_sdk.identity import Identity
from agent_sdk.wire import Event, decode, sign_event
from relay.store import Record
from relay.store.sqlite import SQLiteStore
from simulations.memnet import MemoryListener, Wire
from simulations.model import Faults, Meter, Settings, Summary, UsageError, merge_states
from simulations.replay import lease_anomalies, replay
from simulations.run import run_virtual
from tests.conftest import identity

SMALL = {"agents": 12, "orders": 60, "crash_rate": 0.1}


def measured(summary: Summary) -> dict[str, object]:
    """What a run measured of its world (not of this machine: wall time, CPU, memory)."""
    document = summary.to_json()
    document["extra"] = {k: v for k, v in document["extra"].items() if not k.startswith("process_")}
    return document | {"wall_seconds": 0}


COUNTED = ("done", "duplicate_work", "conflicting_results", "expiries", "refused_held", "events")


def saved_log(run: Path) -> list[Record]:
    """Every record of a run saved with ``save=run`` (its ``log/events.sqlite3``), in
    namespace then seq order."""
    store = SQLiteStore(run / "log" / "events.sqlite3", readonly=True)
    try:
        return [record for ns in store.namespaces() for record in store.scan(ns)]
    finally:
        store.close()


def counted_in(run: Path) -> dict[str, int]:
    """The summary's log counts (:data:`COUNTED`), counted again here off the saved
    log, straight from what docs/simulations.md says each one is."""
    results: dict[tuple[str, str], list[str]] = defaultdict(list)
    expired = held = events = 0
    for record in saved_log(run):
        events += 1
        if record.kind in ("app.result", "lease.expired", "wo.rejected"):
            body = decode(record.event)["body"]
            if record.kind == "app.result":
                results[(record.ns, body["wo"])].append(body["value"])
            elif record.kind == "lease.expired":
                expired += len(body["leases"])  # per lease, not per event
            else:
                held += body["problem"] == "held"
    return {
        "done": len(results),
        "duplicate_work": sum(len(values) > 1 for values in results.values()),
        "conflicting_results": sum(len(set(values)) > 1 for values in results.values()),
        "expiries": expired,
        "refused_held": held,
        "events": events,
    }


def counts(summary: Summary) -> dict[str, int]:
    return {name: getattr(summary, name) for name in COUNTED}


def test_the_same_seed_makes_the_same_log_and_another_seed_another(tmp_path: Path) -> None:
    first = run_virtual(Settings(scenario="work_queue", seed=7, **SMALL), save=tmp_path / "7")  # type: ignore[arg-type]
    again = run_virtual(Settings(scenario="work_queue", seed=7, **SMALL))  # type: ignore[arg-type]
    other = run_virtual(Settings(scenario="work_queue", seed=8, **SMALL), save=tmp_path / "8")  # type: ignore[arg-type]
    assert first.log_hash == again.log_hash and measured(first) == measured(again)
    assert other.log_hash != first.log_hash
    assert first.crashes > 0 and first.events > SMALL["orders"]

    # Another seed is another world, not only other keys: its random streams (here the
    # planner's priorities) are drawn from the seed too. Streams seeded by their
    # purpose alone still made other logs (the keys and the scheduler differ).
    def backlog(run: Path) -> dict[str, int]:
        bodies = [decode(r.event)["body"] for r in saved_log(run) if r.kind == "wo.create"]
        return {body["title"]: body["priority"] for body in bodies}

    assert len(backlog(tmp_path / "7")) == SMALL["orders"]
    assert backlog(tmp_path / "7") != backlog(tmp_path / "8")


REPEAT = """
import sys
from simulations.model import Faults, Settings
from simulations.run import run_virtual
scenario, orders, delay = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
faults = Faults(delay_ms=delay)
settings = Settings(scenario, agents=20, orders=orders, seed=1, crash_rate=0.1, faults=faults)
for _ in range(3):
    print(run_virtual(settings).log_hash)
"""


@pytest.mark.parametrize(
    ("scenario", "orders", "delay"), [("auction_market", 60, 50), ("shared_doc", 20, 0)]
)
async def test_a_run_repeats_with_message_delays_and_shared_documents(
    scenario: str, orders: int, delay: int
) -> None:
    """Messages falling due together were delivered in an order set by memory
    addresses, and a document's replicas were served in one: the same seed made
    other logs. (In a process of its own: this one's allocations happened to hide it.)"""
    command = [sys.executable, "-c", REPEAT, scenario, str(orders), str(delay)]
    done = await trio.run_process(command, capture_stdout=True, capture_stderr=True)
    hashes = done.stdout.decode().split()
    assert len(hashes) == 3 and len(set(hashes)) == 1, hashes


def test_a_seed_makes_the_same_log_under_the_tests_as_in_a_plain_process() -> None:
    """pytest-trio switches trio to another scheduling order, so a seed gave one log
    here and another from `formicary sim run`: a researcher could not repeat a test."""
    scenario, orders = "work_queue", 30
    command = [sys.executable, "-c", REPEAT, scenario, str(orders), "0"]
    done = subprocess.run(command, capture_output=True, check=True)
    here = run_virtual(Settings(scenario, agents=20, orders=orders, seed=1, crash_rate=0.1))
    assert done.stdout.decode().split() == [here.log_hash] * 3


def test_coordination_prevents_the_duplicate_work_the_baseline_shows(tmp_path: Path) -> None:
    """Agents that take work with ``wo.next`` and finish it fenced by their token
    report one result per order, through crashes; the baseline's agents (no claims)
    report some twice. What this shows is the ledger handing out each open order (or
    one whose lease lapsed) once: the agents never ask for an order another agent
    holds, so the relay's refusal of such a claim (``held``) is not exercised here
    (test_agents_claiming_the_same_orders_are_kept_apart_by_the_relay does).

    Each count is checked against the saved log, counted again here: counting
    three results as the only duplicates, or two equal results as a conflict, passed
    the comparison alone. And the crashed holders sent no release: their leases
    expired (a "crash" that released its order first passed as well)."""
    coordinated_run, baseline_run = tmp_path / "coordinated", tmp_path / "baseline"
    coordinated = run_virtual(
        Settings(scenario="work_queue", seed=3, **SMALL), save=coordinated_run
    )  # type: ignore[arg-type]
    baseline = run_virtual(Settings(scenario="no_coordination", seed=3, **SMALL), save=baseline_run)  # type: ignore[arg-type]
    assert counts(coordinated) == counted_in(coordinated_run)
    assert counts(baseline) == counted_in(baseline_run)
    assert coordinated.done == baseline.done == SMALL["orders"]
    assert coordinated.duplicate_work == 0 and coordinated.zombies == 0
    assert coordinated.conflicting_results == 0
    assert coordinated.crashes > 0  # crashed holders' orders were recovered, not lost
    assert (
        0 < coordinated.expiries <= coordinated.crashes
    )  # by the relay, once their leases ran out
    assert coordinated.refused_held == baseline.refused_held == 0  # no claim aimed at a held order
    assert baseline.duplicate_work > 0 and baseline.conflicting_results > 0
    assert baseline.crashes > 0  # the baseline's agents crash alike (--crash-rate)


@pytest.mark.parametrize(
    "settings",
    [
        Settings(scenario="work_queue", seed=3, take="claim", **SMALL),  # type: ignore[arg-type]
        Settings(
            scenario="federated",
            relays=3,
            agents=15,
            orders=60,
            seed=5,
            crash_rate=0.1,
            take="claim",
        ),
    ],
    ids=["one_relay", "three_relays"],
)
def test_agents_claiming_the_same_orders_are_kept_apart_by_the_relay(
    tmp_path: Path, settings: Settings
) -> None:
    """With ``--take claim`` each agent claims (``wo.claim``) an order drawn from its
    own stale list, so many claims land on orders another agent holds: only the
    relay's refusal (``held``) keeps one holder per order. A relay that granted those
    claims (the ledger's claim taking a held order for an open one, ``Leases.acquire``
    not refusing a current holder) still had every order done once (the fencing token
    refused the overtaken holder's completion), but fails here: double holders in the
    replay, wasted work, no ``held`` refusal."""
    summary = run_virtual(settings, save=tmp_path / "run")
    assert counts(summary) == counted_in(tmp_path / "run")  # refused_held: held, not any refusal
    checked = replay(tmp_path / "run")
    assert checked["anomalies"] == [] and checked["ok"]  # one valid holder at a time
    assert summary.wasted_work == 0  # nobody worked on an order it did not hold
    assert summary.done == settings.orders and summary.zombies == 0
    assert summary.duplicate_work == summary.conflicting_results == 0
    assert summary.refused_held >= settings.orders // 4  # contention, and plenty of it
    assert summary.crashes > 0  # and crashed holders' orders were claimed again
    assert run_virtual(settings).log_hash == summary.log_hash  # seeded like every run


def test_replicas_editing_through_crashes_converge_and_repeat() -> None:
    settings = Settings(scenario="shared_doc", agents=12, orders=6, seed=4, crash_rate=0.1)
    first, again = run_virtual(settings), run_virtual(settings)
    assert first.extra["converged"] and first.done == 12 * 6 and first.zombies == 0
    assert first.crashes > 0  # replicas died and came back, synced by state vector
    assert first.log_hash == again.log_hash


def test_sim_run_writes_its_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["sim", "run", "no_coordination", "--agents", "5", "--orders", "20", "--virtual-time",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    written = json.loads((tmp_path / "results.json").read_text())
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert "20/20 orders" in captured.err  # the progress bar, in its final state
    assert written == printed and written["orders_done"] == 20 and written["mode"] == "virtual"
    for field in ("scenario", "agents", "seed", "duplicate_work", "zombie_orders", "log_hash"):
        assert field in written
    series = (tmp_path / "timeseries.csv").read_text().splitlines()
    assert series[0] == (
        "second,results,orders_done,claims,expiries,agents_idle,agents_working,agents_down"
    )
    assert series[-1].split(",")[2] == "20"  # every result is in the series
    rows = [[int(x) for x in line.split(",")] for line in series[1:]]
    assert all(sum(row[5:]) == 5 for row in rows)  # every agent is in one state each second
    assert any(row[6] > 0 for row in rows)  # and some were seen working
    report = (tmp_path / "report.md").read_text()
    for plot in ("throughput.png", "agent_states.png"):  # no claims: no latency CDF
        assert f"]({plot})" in report and (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"


def test_a_run_into_a_directory_holding_one_is_refused_before_it_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = ["sim", "run", "work_queue", "--agents", "3", "--orders", "6", "--virtual-time"]
    assert main([*run, "--out", str(tmp_path)]) == 0
    first = (tmp_path / "results.json").read_text()
    capsys.readouterr()
    assert main([*run, "--seed", "2", "--out", str(tmp_path)]) == 2
    assert "holds a run already" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == first  # untouched
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert main([*run, "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_lost_connections_are_not_crashes_and_expiries_count_leases() -> None:
    settings = Settings(
        scenario="work_queue", agents=8, orders=40, seed=2, faults=Faults(loss=0.002)
    )
    summary = run_virtual(settings)
    assert summary.extra["disconnected"] > 0 and summary.crashes == 0
    assert summary.done == 40 and summary.duplicate_work == 0
    leases = sum(row["expiries"] for row in summary.series)
    assert summary.expiries == leases  # the series counts leases too


@pytest.mark.parametrize("scenario", ["work_queue", "federated", "no_coordination"])
def test_a_run_cut_short_counts_the_orders_it_left_as_zombies(
    tmp_path: Path, scenario: str
) -> None:
    """Every other run ends with every order done, so a zombie count stuck at 0 passed
    them all, as did ``done`` counting results rather than orders (capped at the
    backlog): here ``--duration`` ends the run with part of the backlog done."""
    relays = 2 if scenario == "federated" else 1
    settings = Settings(scenario, agents=8, orders=30, seed=1, relays=relays, duration_s=5.0)
    summary = run_virtual(settings, save=tmp_path)
    assert counts(summary) == counted_in(tmp_path)
    assert 0 < summary.done < 30 and summary.zombies == 30 - summary.done
    if scenario == "no_coordination":
        assert summary.duplicate_work > 0  # (some orders have two results: not two done)
    else:
        assert summary.duplicate_work == 0


def test_the_log_hash_covers_every_records_receipt_event_and_signature(tmp_path: Path) -> None:
    """docs/simulations.md: BLAKE2b over every record's receipt, event and signature in
    log order. (A hash leaving out the receipts or the signatures still repeated with
    the seed and changed with it, so the reproducibility tests passed.)"""
    summary = run_virtual(Settings("work_queue", agents=4, orders=8, seed=1), save=tmp_path)
    digest = hashlib.blake2b(digest_size=32)
    for record in saved_log(tmp_path):
        assert record.receipt and record.event and record.sig
        digest.update(record.receipt + record.event + record.sig)
    assert summary.log_hash == digest.hexdigest()


def test_a_lease_shorter_than_the_relays_default_floor_runs(tmp_path: Path) -> None:
    """The relay's shortest lease is 1 s; a run with short tasks may lease for less."""
    code = main(
        ["sim", "run", "work_queue", "--virtual-time", "--agents", "4", "--orders", "10",
         "--work", "10ms-50ms", "--ttl", "500ms", "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["orders_done"] == 10 and results["duplicate_work"] == 0


def test_sim_sweep_writes_json_and_a_plot(tmp_path: Path) -> None:
    """The baseline's runs have duplicates, so a point that is not the mean of its
    own runs (or of all runs, or a count left at 0) shows."""
    code = main(
        ["sim", "sweep", "no_coordination", "--agents", "4,8", "--seeds", "1-2", "--orders", "24",
         "--crash-rate", "0.1", "--virtual-time", "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [p["agents"] for p in sweep["points"]] == [4, 8] and len(sweep["runs"]) == 4
    assert sweep["complete"] is True
    # Each run is its results.json, and the points use the same names.
    assert {"orders_done", "zombie_orders", "mode", "latency_ms"} <= sweep["runs"][0].keys()
    for point in sweep["points"]:
        mine = [run for run in sweep["runs"] if run["agents"] == point["agents"]]
        assert [run["seed"] for run in mine] == [1, 2]
        for field in ("orders_per_virtual_s", "duplicate_work", "zombie_orders"):
            assert point[field] == pytest.approx(sum(run[field] for run in mine) / 2), field
    assert sweep["points"][0]["duplicate_work"] > 0
    assert sweep["points"][0]["orders_per_virtual_s"] != sweep["points"][1]["orders_per_virtual_s"]
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["run", "bogus", "--virtual-time"],
            "choose from auction_market, federated, logistics, no_coord",
        ),
        (["run", "federated", "--virtual-time"], "--relays from 2 to 16"),
        (["run", "work_queue", "--virtual-time", "--relays", "3"], "one relay"),
        (["run", "federated", "--relays", "2", "--faults", "partition=1s-2s"], "add --virtual"),
        (["run", "work_queue", "--virtual-time", "--crash-rate", "1.5"], "probability"),
        (["run", "work_queue", "--virtual-time", "--policy", "lazy"], "choose from uniform"),
        (["run", "work_queue", "--virtual-time", "--work", "9"], "a range like"),
        (["run", "work_queue", "--virtual-time", "--ttl", "1s"], "must outlast"),
        (["run", "work_queue", "--virtual-time", "--ttl", "25h"], "at most 24h"),
        (["run", "work_queue", "--virtual-time", "--agents", "0"], "at least 1"),
        (["run", "work_queue", "--virtual-time", "--faults", "fire=1"], "unknown fault 'fire'"),
        (["run", "work_queue", "--virtual-time", "--faults", "slow=2"], "a share of agents"),
        (["run", "work_queue", "--virtual-time", "--faults", "delay=5"], "--faults delay"),
        (["run", "work_queue", "--virtual-time", "--faults", "loss=1"], "a chance per message"),
        (["run", "auction_market", "--virtual-time", "--faults", "loss=0.1"], "reconnect"),
        (["run", "work_queue", "--faults", "loss=0.01"], "add --virtual-time"),
        (["run", "work_queue", "--virtual-time", "--faults", "partition=1s-2s"], "federated"),
        (
            ["run", "federated", "--relays", "2", "--virtual-time", "--faults", "partition=9s-3s"],
            "FROM must come before TO",
        ),
        (["run", "work_queue", "--faults", "slow=0.5"], "add --virtual-time"),
        (["run", "work_queue", "--virtual-time", "--faults", "relay_kill=1s"], "drop --virtual"),
        (["run", "no_coordination", "--faults", "relay_kill=1s"], "work_queue with --variant"),
        (["run", "work_queue", "--virtual-time", "--variant", "tree"], "choose from flat"),
        (["run", "work_queue", "--virtual-time", "--workers", "2"], "real mode, work_queue"),
        (["run", "work_queue", "--workers", "0"], "at least 1"),
        (["run", "shared_doc", "--virtual-time", "--variant", "pipeline"], "for work_queue"),
        (["run", "work_queue", "--virtual-time", "--take", "grab"], "choose from next, claim"),
        (["run", "no_coordination", "--virtual-time", "--take", "claim"], "for work_queue"),
        (["sweep", "work_queue", "--virtual-time", "--seeds", "x"], "--seeds 'x': seeds as"),
        (["sweep", "work_queue", "--virtual-time", "--seeds=-1-2"], "FIRST-LAST"),
        (["sweep", "work_queue", "--virtual-time", "--agents", "2,x"], "whole numbers"),
        (
            ["run", "federated", "--virtual-time", "--relays", "3", "--agents", "2"],
            "at least one agent per relay",
        ),
        (
            [
                "run",
                "work_queue",
                "--virtual-time",
                "--work",
                "1s-2s",
                "--ttl",
                "6s",
                "--faults",
                "slow=0.5",
            ],
            "longest task (10000 ms)",
        ),
    ],
)
def test_bad_settings_are_usage_errors_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], says: str
) -> None:
    out = tmp_path / "out"
    assert main(["sim", *args, "--out", str(out)]) == 2
    assert says in capsys.readouterr().err
    assert not out.exists()


def test_an_auction_market_slashes_every_failure_and_conserves_stake() -> None:
    settings = Settings(scenario="auction_market", agents=10, orders=30, seed=3, crash_rate=0.05)
    first, again = run_virtual(settings), run_virtual(settings)
    assert first.log_hash == again.log_hash
    extra = first.extra
    assert first.done + extra["unawarded"] == 30 and first.zombies == 0
    failures = extra["failed"]["reliable"] + extra["failed"]["flaky"]
    assert failures > 0
    assert extra["slashed_total"] == 2 * failures  # 20% of a 10 stake, each time
    assert extra["stake_held"] + extra["slashed_total"] == extra["granted_total"]
    assert extra["reliable_mean_reputation"] > extra["flaky_mean_reputation"]


def test_work_sharded_over_three_relays_is_done_once_across_links() -> None:
    """Agents on every relay take work from a namespace homed on another (their
    requests forwarded) and each order gets one result, through crashes. As in the
    single-relay run, agents only take open or lapsed orders with ``wo.next``: no
    claim aimed at a held order is made, so exclusive leases are not tested here
    (test_agents_claiming_the_same_orders_are_kept_apart_by_the_relay does)."""
    settings = Settings(
        scenario="federated", relays=3, agents=15, orders=60, seed=5, crash_rate=0.1
    )
    first, again = run_virtual(settings), run_virtual(settings)
    assert first.log_hash == again.log_hash
    assert first.done == 60 and first.duplicate_work == 0 and first.zombies == 0
    assert first.crashes > 0
    assert all(n > 0 for n in first.extra["forwarded"].values())  # every relay forwarded


def test_real_mode_runs_the_same_scenario_against_a_relay_process() -> None:
    from simulations.run import run_real

    settings = Settings(
        scenario="work_queue",
        agents=20,
        orders=60,
        seed=1,
        crash_rate=0.1,
        work_ms=(10, 40),
        ttl_ms=1_000,
        restart_ms=100,
    )
    summary = run_real(settings)
    assert summary.extra["mode"] == "real"
    assert summary.done == 60 and summary.duplicate_work == 0 and summary.zombies == 0
    assert summary.crashes > 0 and summary.events > 60


def test_a_partition_between_relays_heals_without_losing_or_repeating_work(
    tmp_path: Path,
) -> None:
    """Agents of ``r0`` work ``work-1@r1``, over the link the partition cuts. A
    partition that cut nothing still passed the run-length comparison (the extra
    task changed the schedule: 42.9 virtual seconds against 41.9), so the log must
    show the cut too: no result in ``work-1@r1`` while it lasts."""
    cut = Faults(partition=(5_000, 40_000))
    settings = Settings(
        scenario="federated", relays=3, agents=15, orders=60, seed=1, crash_rate=0.05, faults=cut
    )
    whole = Settings(scenario="federated", relays=3, agents=15, orders=60, seed=1, crash_rate=0.05)
    partitioned = run_virtual(settings, save=tmp_path)
    again, linked = run_virtual(settings), run_virtual(whole)
    assert partitioned.log_hash == again.log_hash
    assert partitioned.done == 60 and partitioned.duplicate_work == 0 and partitioned.zombies == 0
    assert partitioned.virtual_seconds > linked.virtual_seconds  # what the cut cost
    log = [record for record in saved_log(tmp_path) if record.ns == "work-1@r1"]
    start = decode(log[0].event)["ts"]  # (the backlog is planned at the start)
    results = [decode(r.event)["ts"] - start for r in log if r.kind == "app.result"]
    assert len(results) == 20
    # From 5 s to 40 s; a completion answered just before the cut reports after it.
    assert [at for at in results if 6_000 < at < 40_000] == []


def test_message_delay_shows_in_convergence_time_and_slow_agents_in_duration() -> None:
    delayed = Settings(
        scenario="shared_doc", agents=20, orders=10, seed=1, faults=Faults(delay_ms=50)
    )
    summary = run_virtual(delayed)
    assert summary.extra["converged"] and summary.extra["convergence_ms"] >= 100  # a round trip
    quick = run_virtual(Settings(scenario="work_queue", agents=20, orders=100, seed=1))
    slow = run_virtual(
        Settings(scenario="work_queue", agents=20, orders=100, seed=1, faults=Faults(slow=0.5))
    )
    assert slow.done == quick.done == 100 and slow.virtual_seconds > quick.virtual_seconds


@pytest.mark.parametrize(
    ("variant", "per_root", "handoffs"), [("pipeline", 3, 2), ("fanout", 4, 3)]
)
def test_pipeline_and_fanout_finish_every_stage_once(
    variant: str, per_root: int, handoffs: int
) -> None:
    settings = Settings(
        scenario="work_queue", agents=12, orders=15, seed=2, crash_rate=0.1, variant=variant
    )
    summary = run_virtual(settings)
    assert summary.done == 15 * per_root and summary.extra["orders_total"] == 15 * per_root
    assert summary.duplicate_work == 0 and summary.zombies == 0
    assert summary.extra["handoffs"] == 15 * handoffs  # each follow-up got its context


def test_a_successor_resumes_a_crashed_task_from_its_checkpoint_unless_handoff_is_off() -> None:
    base = {"scenario": "work_queue", "agents": 12, "orders": 60, "seed": 6, "crash_rate": 0.2}
    with_context = run_virtual(Settings(**base))  # type: ignore[arg-type]
    without = run_virtual(Settings(**base, handoff=False))  # type: ignore[arg-type]
    assert with_context.extra["resumed"] > 0 and without.extra["resumed"] == 0
    assert with_context.zombies == without.zombies == 0


def test_a_relay_killed_mid_run_comes_back_and_no_work_is_lost_or_repeated() -> None:
    from simulations.run import run_real

    settings = Settings(
        scenario="work_queue",
        agents=20,
        orders=400,
        seed=1,
        work_ms=(20, 60),
        ttl_ms=1_000,
        restart_ms=100,
        faults=Faults(relay_kill=300),  # the backlog takes about a second: mid-run
    )
    summary = run_real(settings)
    assert summary.extra["relay_kills"] == 1
    # One kill: each agent lost at most its one connection (the dials that failed
    # while the relay was down lost none).
    assert 0 < summary.extra["disconnected"] <= settings.agents  # type: ignore[operator]
    assert summary.done == 400 and summary.duplicate_work == 0 and summary.zombies == 0


def test_real_mode_spreads_agents_over_worker_processes() -> None:
    from simulations.run import run_real

    settings = Settings(
        scenario="work_queue",
        agents=20,
        orders=100,
        seed=1,
        crash_rate=0.1,
        work_ms=(10, 40),
        ttl_ms=1_000,
        restart_ms=100,
    )
    summary = run_real(settings, workers=2)
    assert summary.extra["workers"] == 2
    assert summary.done == 100 and summary.duplicate_work == 0 and summary.zombies == 0
    assert summary.crashes > 0  # counted in the workers, reported to the parent
    totals = [sum(counts.values()) for counts in summary.states.values()]
    assert max(totals) == 20 and min(totals) >= 1  # both workers' agents, added up


def test_replay_refolds_a_runs_log_and_names_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["sim", "run", "work_queue", "--agents", "6", "--orders", "20", "--crash-rate", "0.2"]
    assert main([*args, "--virtual-time", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["sim", "replay", str(out)]) == 0
    clean = json.loads(capsys.readouterr().out)
    assert clean["ok"] and clean["anomalies"] == [] and clean["records"] > 20
    with sqlite3.connect(out / "log" / "events.sqlite3") as db:
        db.execute("DELETE FROM events WHERE seq = 5")
    assert main(["sim", "replay", str(out)]) == 1
    broken = json.loads(capsys.readouterr().out)
    assert any("seq 6" in anomaly for anomaly in broken["anomalies"])  # the gap


def test_an_interrupted_run_leaves_nothing_and_an_empty_log_is_no_clean_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the results were written left a half log (replayed as "ok": no
    gap in nothing) that refused the next run into the same directory."""
    from simulations import report

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    out = tmp_path / "run"
    args = ["sim", "run", "work_queue", "--agents", "4", "--orders", "8", "--virtual-time"]
    monkeypatch.setattr(report, "write", interrupted)
    assert main([*args, "--out", str(out)]) == 130
    assert os.listdir(out) == []  # (its hidden staging directory removed too)
    monkeypatch.undo()
    assert main([*args, "--out", str(out)]) == 0  # the same directory again
    capsys.readouterr()
    with sqlite3.connect(out / "log" / "events.sqlite3") as db:
        db.execute("DELETE FROM events")
        db.execute("DELETE FROM heads")
    assert main(["sim", "replay", str(out)]) == 1
    assert "holds no records" in json.loads(capsys.readouterr().out)["anomalies"][0]


def logged(
    seq: int, ts: int, kind: str, body: dict[str, object], author: Identity | None = None
) -> Record:
    """Record ``seq`` of a namespace ``w@x``: ``body`` signed by ``author`` (by default
    the relay's key, ``identity(1)``) at ``ts`` ms, received then (its hlc)."""
    author = author or identity(1)
    event = Event(ns="w@x", kind=kind, author=author.public_key, body=body, deps=(), ts=ts)
    signed = sign_event(event, author.sign)
    return Record("w@x", seq, signed.id, kind, author.public_key, ts << 16, signed.raw,
                  signed.sig, b"")  # fmt: skip


def test_replay_finds_a_double_holder_and_a_token_going_back() -> None:
    first, second = identity(2), identity(3)

    def outcome(
        seq: int, ts: int, holder: Identity, token: int, kind: str = "wo.claimed", ttl: int = 10_000
    ) -> Record:
        body = {"wo": "wo-1", "status": "claimed", "holder": holder.public_key,
                "token": token, "expires_ms": ts + ttl, "req": bytes(32)}  # fmt: skip
        return logged(seq, ts, kind, body)

    def expired(seq: int, ts: int, token: int) -> Record:
        return logged(seq, ts, "lease.expired", {"leases": [["wo-1", token]]})

    ok = [outcome(1, 0, first, 1), outcome(2, 20_000, second, 2)]  # the first lease lapsed
    assert lease_anomalies("w@x", ok) == []
    overlapping = [outcome(1, 0, first, 1), outcome(2, 5_000, second, 2)]
    [double] = lease_anomalies("w@x", overlapping)
    assert "while" in double and "held it" in double
    backwards = [outcome(1, 0, first, 3), outcome(2, 20_000, second, 2)]
    [token] = lease_anomalies("w@x", backwards)
    assert "does not rise" in token
    # A token that repeats does not rise either (a checker comparing with `<` let it by).
    repeated = [outcome(1, 0, first, 2), outcome(2, 20_000, second, 2)]
    [again] = lease_anomalies("w@x", repeated)
    assert "token 2 does not rise" in again
    # A lease is valid up to, not at, its expiry: a claim 1 ms before it is a double
    # holder (a checker off by one let it by), one at it is not.
    [edge] = lease_anomalies("w@x", [outcome(1, 0, first, 1), outcome(2, 9_999, second, 2)])
    assert "until 10000" in edge
    assert lease_anomalies("w@x", [outcome(1, 0, first, 1), outcome(2, 10_000, second, 2)]) == []
    # A renewal moves the expiry: a claim after the first expiry but within the
    # renewed one is a double holder (a checker ignoring wo.renewed let it by).
    renewed = [
        outcome(1, 0, first, 1),
        outcome(2, 8_000, first, 1, kind="wo.renewed"),  # valid until 18 000
        outcome(3, 12_000, second, 2),
    ]
    [late] = lease_anomalies("w@x", renewed)
    assert "seq 3" in late and "until 18000" in late
    # A lease.expired ends the lease it names, not a later one on the same order.
    stale_expiry = [
        outcome(1, 0, first, 1),
        outcome(2, 10_000, second, 2),
        expired(3, 10_000, 1),  # the first lease's expiry, logged after the new claim
        outcome(4, 12_000, first, 3),
    ]
    [overtaken] = lease_anomalies("w@x", stale_expiry)
    assert "seq 4" in overtaken and "held it (token 2)" in overtaken
    ended = [outcome(1, 0, first, 1), expired(2, 10_000, 1), outcome(3, 10_000, second, 2)]
    assert lease_anomalies("w@x", ended) == []


def test_lost_messages_break_connections_yet_no_work_is_lost_or_repeated() -> None:
    lossy = Settings(scenario="work_queue", seed=2, faults=Faults(loss=0.002), **SMALL)  # type: ignore[arg-type]
    first, again = run_virtual(lossy), run_virtual(lossy)
    assert first.log_hash == again.log_hash
    assert first.extra["disconnected"] > 0  # losses cut agents off mid-conversation
    assert first.done == SMALL["orders"] and first.duplicate_work == 0 and first.zombies == 0
    federated = replace(lossy, scenario="federated", relays=2)  # relay links lose too
    across = run_virtual(federated)
    assert across.extra["disconnected"] > 0
    assert across.done == SMALL["orders"] and across.duplicate_work == 0 and across.zombies == 0


async def test_a_lost_message_cuts_the_connection_for_both_ends() -> None:
    listener = MemoryListener()
    ours = await listener.dial(loss=0.5, rng=random.Random(1))
    theirs = await listener.accept()
    sent = 0
    while not isinstance(ours, Wire) or not ours.line.cut:
        await ours.send_all(b"x")  # the lost one returns as if it were sent
        sent += 1
    received = b""
    while chunk := await theirs.receive_some():
        received += chunk
    assert received == b"x" * (sent - 1)  # all but the lost one, then end of file
    assert await ours.receive_some() == b""
    for end in (ours, theirs):
        with pytest.raises(trio.BrokenResourceError):
            await end.send_all(b"y")


def test_agent_states_counted_apart_add_up_second_by_second() -> None:
    a = {10: {"idle": 2, "working": 0, "down": 0}, 12: {"idle": 0, "working": 2, "down": 0}}
    b = {11: {"idle": 0, "working": 1, "down": 1}}
    assert merge_states([a, b]) == {
        10: {"idle": 2, "working": 0, "down": 0},
        11: {"idle": 2, "working": 1, "down": 1},  # a's second 10 carried over
        12: {"idle": 0, "working": 3, "down": 1},
    }


def test_a_meter_follows_the_run_to_its_total() -> None:
    seen: list[tuple[int, int]] = []
    meter = Meter(lambda m: seen.append((m.done, m.total)))
    run_virtual(Settings(scenario="auction_market", agents=6, orders=4, seed=1), meter=meter)
    assert seen[0] == (0, 4) and seen[-1] == (4, 4)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_logistics_breaks_limits_and_plans_without_the_primitives_and_never_with_them() -> None:
    settings = Settings(scenario="logistics", agents=12, orders=60, seed=1)
    first, again = run_virtual(settings), run_virtual(settings)
    assert first.log_hash == again.log_hash
    without, with_ = first.extra["without"], first.extra["with"]
    assert without["violations"] > 0 and without["oversold_units"] > 0
    assert without["overdrawn"] > 0 and without["incoherent_decisions"] > 0
    assert with_["violations"] == with_["oversold_units"] == with_["overdrawn"] == 0
    assert with_["incoherent_decisions"] == with_["contradictions"] == 0
    # The ladder was needed (plans raced), and routing let planners follow each other.
    assert with_["conflicts"] > 0 and with_["overruled"] == with_["conflicts"]
    assert with_["aligned"] > 0
    assert with_["handled"] == without["handled"] == 60 and first.zombies == 0
    assert with_["backordered"] > 0 and with_["refused"] > 0  # the limits did bind
    for bad in (replace(settings, crash_rate=0.1), replace(settings, agents=2)):
        with pytest.raises(UsageError, match="logistics"):
            bad.check(["logistics"])


def test_logistics_counts_each_violation_and_incoherent_pair_at_its_limit() -> None:
    """The seeded logistics run only shows counts above 0 without the primitives and 0
    with them: a checker that let one unit over the stock by (`over > 1`), counted a
    whole grant as overdrawn, or halved the 60 s window passed it. Here the log of one
    arm is made up, each case at its limit."""
    from simulations.scenarios.logistics import WINDOW_MS, Tally, Workload, read

    inventory, pricing = identity(4), identity(5)
    work = Workload(stock={"sku-0": 5}, budget=10, orders=[], plans=[])
    log = [
        logged(1, 0, "app.shipped", {"sku": "sku-0", "qty": 5}),
        logged(2, 0, "app.shipped", {"sku": "sku-0", "qty": 1}),  # 1 unit over the stock
        logged(3, 0, "app.shipped", {"sku": "sku-0", "qty": 2}),  # 2 more
        logged(4, 0, "app.discount", {"amount": 8}),
        logged(5, 0, "app.discount", {"amount": 6}),  # 4 of it over the budget
        logged(6, 0, "app.act", {"entity": "sku-0", "plan": "promote"}, inventory),
        logged(7, WINDOW_MS - 1, "app.act", {"entity": "sku-0", "plan": "discontinue"}, pricing),
        # A window after the last: incoherent with neither.
        logged(8, 2 * WINDOW_MS - 1, "app.act", {"entity": "sku-0", "plan": "promote"}, inventory),
        # An agent changing its own plan contradicts nobody.
        logged(9, 2 * WINDOW_MS, "app.act", {"entity": "sku-0", "plan": "discontinue"}, inventory),
    ]
    relay = SimpleNamespace(store=SimpleNamespace(scan=lambda ns: iter(log)))
    found = read(relay, "w@x", work, Tally(), guarded=False)  # type: ignore[arg-type]
    assert (found["violations"], found["oversold_units"], found["overdrawn"]) == (3, 3, 4)
    assert found["incoherent_decisions"] == found["contradictions"] == 1
    assert (found["shipments"], found["discounts"]) == (3, 2)


def test_heavy_tail_stragglers_lapse_and_are_finished_through_handoff(tmp_path: Path) -> None:
    """``heavy_tail`` draws past ``--work``: with seed 35, 9 of the 60 orders take
    longer than the 6 s lease (the longest 11.8 s). Their leases lapse, and the
    checkpoint at each half lets the next holder finish them: every order is done.

    The stragglers' late completions are the run's stale tokens: each is refused and
    counted as wasted work, and every result comes from the order's latest holder. A
    relay that let a completion through without a valid lease (the ledger ending a
    claimed order whatever its token) still had one result per order, 9 of them
    wasted (the successors' this time) and no double holder, and fails here only."""
    heavy = {"policy": "heavy_tail", "ttl_ms": 6_000, "agents": 10, "orders": 60}
    summary = run_virtual(Settings(scenario="work_queue", seed=35, **heavy), save=tmp_path)  # type: ignore[arg-type]
    assert summary.done == 60 and summary.zombies == 0 and summary.duplicate_work == 0
    assert summary.expiries > 0 and summary.extra["resumed"] > 0
    assert summary.wasted_work == 9  # (a wasted-work counter stuck at 0 passed before)
    holder: dict[str, tuple[bytes, int]] = {}  # order -> its latest claim: by, at
    latencies: dict[str, int] = {}  # order -> its latest claim to its first result
    for record in saved_log(tmp_path):
        event = decode(record.event)
        if record.kind == "wo.claimed":
            holder[event["body"]["wo"]] = (event["body"]["holder"], event["ts"])
        elif record.kind == "app.result":
            by, at = holder[event["body"]["wo"]]
            assert record.author == by, record.seq
            latencies.setdefault(event["body"]["wo"], event["ts"] - at)
    assert len(latencies) == 60
    # The stragglers were claimed twice: latency runs from the latest claim (timed
    # from the first one instead, theirs came out longer, and that passed).
    assert summary.latencies == sorted(latencies.values())


def test_a_second_result_does_not_finish_another_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run ends when every order has a result, and the orders left without one are
    zombies. Both were counted from the results the agents published, one finished
    order per result: under a relay that took every completion, fenced or not (the
    heavy-tail stragglers' came late), each duplicate finished an order nobody had
    done, so the run stopped early and reported no zombie with 2 of 60 orders undone
    (done 58, zombies 0, duplicate work 2)."""
    from relay.coordination import ledger

    end = ledger.Ledger._end

    def unfenced(
        self: ledger.Ledger,
        order_id: str,
        agent: bytes,
        token: int | None,
        op: ledger.Op,
        now_ms: int,
        why: str,
    ) -> ledger.Outcome:
        order = self.orders.get(order_id)
        if op is ledger.Op.DONE and order is not None:
            if order.status is ledger.Status.DONE:
                return ledger.Done(order_id, order.status)  # done again
            lease = self.leases.holder(order_id, now_ms)
            if lease is not None:  # done by whoever asks, with the holder's token
                agent, token = lease.holder, lease.token
        return end(self, order_id, agent, token, op, now_ms, why)

    monkeypatch.setattr(ledger.Ledger, "_end", unfenced)
    heavy = {"policy": "heavy_tail", "ttl_ms": 6_000, "agents": 10, "orders": 60}
    summary = run_virtual(Settings(scenario="work_queue", seed=35, **heavy))  # type: ignore[arg-type]
    assert summary.duplicate_work > 0  # what the broken relay let through: seen
    assert summary.done + summary.zombies == 60
    assert summary.done == 60  # the run went on until every order had a result


def test_heavy_tail_orders_no_lease_can_cover_are_refused_before_the_run() -> None:
    """An order's time is the same whoever claims it and nobody renews: one longer than
    a lease covers would be claimed, lapse and be claimed again until --duration."""
    heavy = {"policy": "heavy_tail", "ttl_ms": 6_000, "agents": 10, "orders": 60}
    with pytest.raises(UsageError, match="wo-36 takes 15810 ms with seed 1, not less than twice"):
        Settings(scenario="work_queue", seed=1, **heavy).check(["work_queue"])  # type: ignore[arg-type]
    no_handoff = Settings(scenario="work_queue", seed=35, handoff=False, **heavy)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"not less than --ttl \(and there is no handoff\)"):
        no_handoff.check(["work_queue"])
    Settings(scenario="work_queue", seed=35, **heavy).check(["work_queue"])  # type: ignore[arg-type]
    # Federated, each namespace numbers its own share: 4 relays of 15 orders each have
    # no wo-36 (seed 1's one order over twice the lease), so the run is allowed.
    spread = {**heavy, "agents": 12, "relays": 4}
    Settings(scenario="federated", seed=1, **spread).check(["federated"])  # type: ignore[arg-type]
