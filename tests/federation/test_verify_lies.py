"""``formicary log verify`` catches a relay that lies, offline.

* A relay that sequences a namespace it does not home — an impostor calling itself
  ``b`` with its own key — writes a log that is consistent in itself; pinned to the
  real ``b``'s key, verification names the first receipt of the wrong relay.
* A mirror file with a record cut out (a skipped seq) fails at that seq.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import trio

from agent_sdk.client import Delivery, Live, RelayClient
from relay.app import MIRROR_FILE
from relay.node import RelayConfig
from tests.conftest import identity, start_relay
from tests.federation.fixtures import federation_of, plan, start
from tests.processes import PHASE_TIMEOUT, cli

TIMEOUT = 30


async def verify(data: Path, *pins: str) -> tuple[int, list[dict[str, object]]]:
    args = [arg for pin in pins for arg in ("--home-key", pin)]
    with trio.fail_after(PHASE_TIMEOUT):
        done = await trio.run_process(
            cli("log", "verify", "all", "--data", str(data), *args),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]


async def test_a_relay_sequencing_someone_elses_namespace_fails_verification(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    real_b = plan(tmp_path, "b")["b"]
    impostor = await start_relay(nursery, tmp_path / "impostor", RelayConfig(name="b"))
    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(impostor.url, identity(1)) as agent:
            for n in range(3):
                await agent.publish("x@b", "app.note", n)
    impostor.scope.cancel()
    code, [alone] = await verify(impostor.data)  # consistent in itself...
    assert code == 0 and alone["ok"]
    code, [pinned] = await verify(impostor.data, f"b={real_b.key.hex()}")  # ...not b's
    assert code == 1 and pinned["bad_seq"] == 1
    assert pinned["reason"] == "receipt is signed by another relay key"


async def test_a_mirror_with_a_skipped_seq_fails_verification(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relays = plan(tmp_path, "a", "b")
    a = await start(nursery, relays["a"], (relays["b"].peer(),))
    b = await start(nursery, relays["b"], (relays["a"].peer(),))
    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(b.url, identity(2)) as writer:
            for n in range(4):
                await writer.publish("x@b", "app.note", n)
        await federation_of(a).links["b"].wait_up()
        async with (
            RelayClient.connect(a.url, identity(3)) as reader,
            reader.subscribe("x@b", start=1) as feed,
        ):
            async for item in feed:
                if isinstance(item, Live):
                    break
    a.scope.cancel()
    b.scope.cancel()
    pin = f"b={relays['b'].key.hex()}"
    code, verdicts = await verify(a.data, pin)
    assert code == 0 and [(v["ns"], v["mirror"], v["records"]) for v in verdicts] == [
        ("x@b", True, 4)
    ]
    with sqlite3.connect(a.data / MIRROR_FILE) as db:
        db.execute("DELETE FROM events WHERE ns = 'x@b' AND seq = 2")
    code, [verdict] = await verify(a.data, pin)
    assert code == 1 and verdict["bad_seq"] == 3 and "chain" in str(verdict["reason"])


async def test_a_mirror_of_a_compacted_document_holds_the_homes_marks(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The home sends a pruned record with its mark; the mirror keeps it, and log
    verify checks it there (a via peer could otherwise empty any record, 14.8)."""
    relays = plan(tmp_path, "a", "b")
    a = await start(nursery, relays["a"], (relays["b"].peer(),))
    home = RelayConfig(name="b", doc_compact_every=5)
    b = await start(nursery, relays["b"], (relays["a"].peer(),), home)
    with trio.fail_after(TIMEOUT):
        async with (
            RelayClient.connect(b.url, identity(2)) as writer,
            writer.doc("x@b", "notes") as shared,
        ):
            for n in range(12):
                shared.text().insert(len(shared.text()), f"[{n}]")
                await shared.flush()
        await b.node.wait_stat("compactions", 2)
        head = b.node.head("x@b")
        await federation_of(a).links["b"].wait_up()
        async with (
            RelayClient.connect(a.url, identity(3)) as reader,
            reader.subscribe("x@b", start=1) as feed,
        ):
            async for item in feed:  # (`live` may come before the mirror has it all)
                if isinstance(item, Delivery) and item.receipt.seq == head:
                    break
    a.scope.cancel()
    b.scope.cancel()
    with sqlite3.connect(a.data / MIRROR_FILE) as db:
        marks = db.execute(
            "SELECT count(*) FROM events WHERE ns = 'x@b' AND event = x'' AND length(sig) = 64"
        ).fetchone()[0]
    assert marks >= 8  # the updates two snapshots covered, and the first snapshot
    pin = f"b={relays['b'].key.hex()}"
    code, [verdict] = await verify(a.data, pin)
    assert code == 0 and verdict["ok"] and verdict["mirror"], verdict
