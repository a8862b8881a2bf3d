"""``formicary sim replay LOGDIR``: re-fold a run's log offline and report anomalies.

The debugging story for N-agent coordination bugs: a run's ``--out`` directory keeps
its log (``log/events.sqlite3``, every homed namespace with receipts and seals). The
replay checks each namespace as ``formicary log verify`` does — signatures, the hash
chain (gaps included), seals, causal order — and then folds the relay's own
decisions about work orders and checks what must never happen:

* **double holders**: a ``wo.claimed`` while another lease on the order is still
  valid (not released, finished, expired or past its ``expires_ms``);
* **tokens going back**: a claim whose fencing token is not above every earlier one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agent_sdk.wire import decode
from relay.store import Record
from relay.store.sqlite import SQLiteStore
from relay.verify import verify_log

LOG_DIR = "log"
LOG_FILE = "events.sqlite3"


@dataclass
class _Lease:
    holder: bytes
    token: int
    expires_ms: int


def lease_anomalies(ns: str, records: Iterable[Record]) -> list[str]:
    """Double holders and tokens that go back, in one namespace's log (pure)."""
    found: list[str] = []
    leases: dict[str, _Lease] = {}
    tokens: dict[str, int] = {}
    for record in records:
        if not record.event or not (
            record.kind.startswith("wo.") or record.kind == "lease.expired"
        ):
            continue
        event = decode(record.event)
        body, at = event["body"], event["ts"]
        if not isinstance(body, dict):
            continue
        if record.kind == "lease.expired":
            for order, token in body.get("leases", []):
                lease = leases.get(order)
                if lease is not None and lease.token == token:
                    del leases[order]
        elif record.kind in ("wo.claimed", "wo.renewed"):
            order, token = body["wo"], body["token"]
            current = leases.get(order)
            if record.kind == "wo.claimed":
                if current is not None and current.expires_ms > at:
                    found.append(
                        f"{ns} seq {record.seq}: {order} claimed by {body['holder'].hex()[:16]} "
                        f"while {current.holder.hex()[:16]} held it (token {current.token}) "
                        f"until {current.expires_ms}"
                    )
                if token <= tokens.get(order, 0):
                    found.append(f"{ns} seq {record.seq}: {order} token {token} does not rise")
                tokens[order] = max(tokens.get(order, 0), token)
            leases[order] = _Lease(body["holder"], token, body["expires_ms"])
        elif record.kind in ("wo.released", "wo.updated") and body.get("status") != "claimed":
            leases.pop(body["wo"], None)
    return found


def replay(logdir: Path) -> dict[str, object]:
    """Check a run's log; the report lists every anomaly (none: ``ok``)."""
    path = logdir / LOG_DIR / LOG_FILE if (logdir / LOG_DIR).is_dir() else logdir / LOG_FILE
    store = SQLiteStore(path, readonly=True)
    try:
        namespaces = store.namespaces()
        anomalies: list[str] = []
        records = 0

        def locate(dep: bytes) -> object:
            return store.find([dep]).get(dep)

        for ns in namespaces:
            verdict = verify_log(ns, store.scan(ns), locate)  # type: ignore[arg-type]
            records += verdict.records
            if not verdict.ok:
                anomalies.append(f"{ns} seq {verdict.bad_seq}: {verdict.reason}")
            anomalies += lease_anomalies(ns, store.scan(ns))
    finally:
        store.close()
    if not records:  # (nothing to find a gap in: say so, rather than "ok")
        anomalies.append(f"{path} holds no records: not the log of a finished run")
    return {
        "namespaces": namespaces,
        "records": records,
        "anomalies": anomalies,
        "ok": not anomalies,
    }


def save_log(stores: Iterable[tuple[object, str]], out: Path) -> None:
    """Copy a run's homed logs into ``out/log/events.sqlite3`` for :func:`replay`."""
    target = SQLiteStore(out / LOG_DIR / LOG_FILE)
    try:
        for store, ns in stores:
            batch: list[Record] = []
            for record in store.scan(ns):  # type: ignore[attr-defined]
                batch.append(record)
                if len(batch) >= 4096:
                    target.append(batch)
                    batch = []
            if batch:
                target.append(batch)
    finally:
        target.close()
