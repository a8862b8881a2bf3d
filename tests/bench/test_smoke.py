"""Every benchmark script, run once with tiny sizes: it starts, drives what it
measures (a relay process, the peers on loopback) and prints one JSON object without
an error. No figure is checked here: timings belong to the benchmarks themselves, on
a quiet machine, never to a test."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
TINY = {
    "auctions.py": ["--auctions", "3", "--bidders", "3", "--window", "1000", "--in-flight", "4"],
    "claims.py": ["--agents", "4", "--seconds", "0.5", "--members", "3", "--namespaces", "3",
                  "--routes", "2"],
    "compare_claims.py": ["--agents", "4", "--items", "40", "--rounds", "1",
                          "--pause-agents", "4", "--pause-items", "20", "--pausers", "1"],
    "compare_nostr.py": ["--publishers", "2", "--events", "40", "--subscribers", "2",
                         "--fanout-events", "10", "--idle", "3", "--rounds", "1"],
    "cross_relay.py": ["--agents", "2", "--seconds", "0.3", "--rounds", "1"],
    "docs.py": ["--clients", "2", "--edits", "3"],
    "flood.py": ["--seconds", "0.3", "--rounds", "1", "--calm-rate", "20",
                 "--flood-connections", "2"],
    "scale.py": ["--steps", "2,4", "--seconds", "0.5", "--rate", "4"],
    "floor.py": ["--events", "50", "--seconds", "0.05", "--rounds", "1"],
    "idle.py": ["--connections", "20", "--concurrency", "10"],
    "ingest.py": ["--agents", "2", "--events", "400", "--warmup", "50",
                  "--verify-seconds", "0.2"],
    "messaging.py": ["--pairs", "2", "--seconds", "0.3", "--rounds", "1"],
    "stores.py": ["--events", "200", "--agents", "2", "--rounds", "1"],
}  # fmt: skip


def test_every_benchmark_has_a_smoke_run() -> None:
    scripts = {p.name for p in BENCH.glob("*.py")} - {"profile_relay.py"}  # (a wrapper)
    assert scripts == set(TINY)


def run_bench(script: str, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    """Run one script in a process group of its own. One that hangs fails the test
    with what it said so far (its progress lines name the phase it hung in), and its
    whole group is killed: relays it started must not outlive it."""
    process = subprocess.Popen(
        [sys.executable, str(BENCH / script), *TINY[script], *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=BENCH.parent,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"{script} did not finish in {timeout} s; it said:\n{err.decode()[-2000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # (what it started, when it failed)
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.parametrize("script", sorted(TINY))
def test_a_benchmark_prints_one_json_object(script: str) -> None:
    done = run_bench(script)
    lines = done.stdout.decode().strip().splitlines()
    assert done.returncode == 0 and len(lines) == 1, done.stderr.decode()[-2000:]
    result = json.loads(lines[0])
    assert isinstance(result, dict) and "error" not in result, result
    if script == "compare_claims.py":  # fencing is a property, not a figure
        fenced = ("formicary", "postgresql_fenced", "redis_fenced")
        assert [result["pauses"][name]["double_processed"] for name in fenced] == [0, 0, 0]
    if script == "compare_nostr.py":  # each relay took and delivered every event
        relays = ("formicary", "nostr_sdk", "nostr_relay")
        assert [result["ingest"][name]["accepted"] for name in relays] == [40, 40, 40]
        assert [result["fanout"][name]["missed"] for name in relays] == [0, 0, 0]


def test_a_relay_profile_per_task_counts_the_event_loop_by_task(tmp_path: Path) -> None:
    profile = tmp_path / "relay.json"
    done = run_bench("ingest.py", "--relay-profile", str(profile))
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    figures = json.loads(profile.read_text())
    tasks = figures["tasks"]
    sequencing = tasks["relay.node.RelayNode._sequencing_loop"]
    assert sequencing["steps"] > 0 and sequencing["cpu_s"] > 0
    assert sum(task["cpu_s"] for task in tasks.values()) <= figures["thread_cpu_s"]
    shown = subprocess.run(
        [sys.executable, str(BENCH / "profile_relay.py"), "--show", str(profile), "--per", "450"],
        capture_output=True, check=True, cwd=BENCH.parent,
    )  # fmt: skip
    assert b"relay.node.RelayNode._sequencing_loop" in shown.stdout
