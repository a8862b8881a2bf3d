"""Offline log verification, and the SQLite store that holds the log."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent_sdk.wire import (
    Event,
    Receipt,
    SignedEvent,
    decode_receipt,
    make_receipt,
    pruned_mark,
    seal,
    sign_event,
)
from relay.sequencer import Sequenced, Sequencer
from relay.store import Located, Record, Store
from relay.store.memory import MemoryStore
from relay.verify import verify_log
from tests.backends import open_test_store
from tests.conftest import identity
from tests.relay.test_sequencer import NOW, event, sequenced

RELAY = identity(2)


def build_log(count: int = 6, seal_every: int = 2) -> list[Record]:
    """A log of ``count`` events, each depending on the one before, sealed in batches."""
    sequencer = Sequencer(RELAY.public_key)
    records: list[Record] = []
    previous: bytes | None = None
    for i in range(count):
        signed = event(i, deps=(previous,) if previous else ())
        outcome = sequencer.offer(signed, NOW)
        assert isinstance(outcome, Sequenced)
        records.extend(outcome.records)
        previous = signed.id
    for i in range(seal_every - 1, count, seal_every):
        records[i] = with_seal(records[i])
    records[-1] = with_seal(records[-1])
    return records


def with_seal(record: Record) -> Record:
    return replace(record, seal=seal(decode_receipt(record.receipt), RELAY.sign))


def locator(records: list[Record]):  # type: ignore[no-untyped-def]
    index = {r.id: Located(r.ns, r.seq, r.hlc) for r in records}
    return index.get


def check(records: list[Record]) -> tuple[int | None, str | None]:
    verdict = verify_log("t@local", records, locator(records))
    return verdict.bad_seq, verdict.reason


def test_a_good_log_verifies() -> None:
    records = build_log()
    verdict = verify_log("t@local", records, locator(records))
    assert verdict.ok and verdict.records == 6 and verdict.sealed == 3


def test_tampered_event_bytes_are_found() -> None:
    records = build_log()
    raw = bytearray(records[2].event)
    raw[-1] ^= 1  # the body's last byte
    records[2] = replace(records[2], event=bytes(raw))
    assert check(records)[0] == 3


def test_a_forged_signature_is_found() -> None:
    records = build_log()
    records[3] = replace(records[3], sig=bytes(64))
    assert check(records) == (4, "author signature does not verify")


def test_a_gap_is_found() -> None:
    records = build_log()
    del records[2]
    bad_seq, _ = check(records)
    assert bad_seq == 4


def unchained(receipt: bytes) -> Receipt:
    """``receipt`` with its ``prev`` zeroed: off the hash chain, all else as it was."""
    original = decode_receipt(receipt)
    return make_receipt(
        id=original.id,
        ns=original.ns,
        seq=original.seq,
        hlc=original.hlc,
        prev=bytes(32),
        relay=original.relay,
    )


def test_a_rewritten_receipt_breaks_the_chain() -> None:
    records = build_log()
    forged = unchained(records[1].receipt)
    records[1] = replace(records[1], receipt=forged.raw)
    assert check(records)[0] == 2


def test_a_bad_seal_and_an_unsealed_tail_are_found() -> None:
    records = build_log()
    records[1] = replace(records[1], seal=bytes(64))
    assert check(records) == (2, "seal does not verify")
    records = build_log()
    records[-1] = replace(records[-1], seal=None)
    assert check(records) == (6, "the log does not end on a sealed receipt")


def test_a_dependency_that_is_missing_is_found() -> None:
    """The chain is whole; only the locator does not know the first event, on which
    the second depends: the second is reported for its missing dependency."""
    records = build_log()
    known = locator(records)
    first = records[0].id

    def without_first(dep: bytes) -> Located | None:
        return None if dep == first else known(dep)

    verdict = verify_log("t@local", records, without_first)
    assert (verdict.bad_seq, verdict.reason) == (2, f"dependency {first.hex()} is not in the log")


def test_a_dependency_sequenced_after_its_event_is_found() -> None:
    """A dependency located at a later hlc (anywhere), or at a later seq of the same
    namespace, breaks causal order: the event that depends on it is reported."""
    records = build_log()
    known = locator(records)
    first, second = records[0], records[1]
    later_hlc = Located("other@local", 1, second.hlc + 1)
    same_hlc = Located("other@local", 1, second.hlc)  # not smaller: not before it
    later_seq = Located("t@local", second.seq, first.hlc)
    for where in (later_hlc, same_hlc, later_seq):

        def moved(dep: bytes, where: Located = where) -> Located | None:
            return where if dep == first.id else known(dep)

        verdict = verify_log("t@local", records, moved)
        expected = (2, f"dependency {first.id.hex()} is sequenced after the event")
        assert (verdict.bad_seq, verdict.reason) == expected
    assert verify_log("t@local", records, known).ok  # the same log, located truly


# --------------------------------------------------------------------------- store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_test_store(tmp_path / "events.sqlite3")
    yield opened
    opened.close()


@pytest.fixture(params=["backend", "memory"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The test run's backend (SQLite or PostgreSQL), then the memory store: the
    contract of relay.store.Store is the same for each."""
    opened = open_test_store(tmp_path / "events.sqlite3") if request.param == "backend" else None
    yield opened or MemoryStore()
    if opened is not None:
        opened.close()


def test_store_appends_reads_and_survives_reopening(store: Store, tmp_path: Path) -> None:
    records = build_log(10)
    store.append(records[:4])
    store.append(records[4:])
    assert store.read("t@local", 3, 2) == records[2:4]
    assert list(store.scan("t@local")) == records
    assert store.record(records[5].id) == records[5]
    assert store.find([records[0].id, bytes(32)]) == {
        records[0].id: Located("t@local", 1, records[0].hlc)
    }
    store.close()
    reopened = open_test_store(tmp_path / "events.sqlite3")
    head = reopened.heads()["t@local"]
    assert (head.seq, head.hash) == (10, decode_receipt(records[-1].receipt).hash)
    assert head.hlc == records[-1].hlc  # a restarted relay's hlc goes on from it (4.3)
    assert reopened.namespaces() == ["t@local"]
    reopened.close()


def test_store_batches_are_atomic(any_store: Store) -> None:
    store = any_store
    records = build_log(4)
    store.append(records[:2])
    with pytest.raises(Exception, match=r"(?i)unique"):  # every store alike
        store.append([records[2], records[1]])  # the second row collides
    # ... and within the batch: the next seq, but an id the batch holds already
    with pytest.raises(Exception, match=r"(?i)unique"):
        store.append([records[2], replace(records[3], id=records[2].id)])
    assert list(store.scan("t@local")) == records[:2]
    assert store.heads()["t@local"].seq == 2
    store.append(records[2:])  # a failed batch leaves the store able to commit
    assert list(store.scan("t@local")) == records
    head = store.heads()["t@local"]
    assert (head.seq, head.hlc) == (4, records[-1].hlc)


def test_the_memory_store_refuses_a_gap() -> None:
    store = MemoryStore()
    records = build_log(3)
    store.append(records[:1])
    with pytest.raises(ValueError, match="does not follow"):
        store.append(records[2:])
    assert list(store.scan("t@local")) == records[:1]


def test_store_finds_more_ids_than_one_query_takes(any_store: Store) -> None:
    """A batch of publishes can ask about thousands of ids at once (each event and its
    deps; the SQLite store asks in chunks of 500): every committed one is found."""
    count = 1_200
    batch = [
        Record(
            ns="t@local",
            seq=seq,
            id=seq.to_bytes(32, "big"),
            kind="note",
            author=bytes(32),
            hlc=seq,
            event=b"event",
            sig=bytes(64),
            receipt=b"receipt %d" % seq,
        )
        for seq in range(1, count + 1)
    ]
    any_store.append(batch)
    unknown = [bytes([0xFF]) * 32]
    found = any_store.find([*(r.id for r in reversed(batch)), *unknown])
    assert found == {r.id: Located("t@local", r.seq, r.hlc) for r in batch}


def test_receipts_of_another_relay_are_found() -> None:
    records = build_log()
    verdict = verify_log("t@local", records, locator(records), relay_key=identity(7).public_key)
    assert (verdict.bad_seq, verdict.reason) == (1, "receipt is signed by another relay key")
    assert verify_log("t@local", records, locator(records), relay_key=RELAY.public_key).ok


def test_stored_columns_must_match_the_signed_bytes() -> None:
    records = build_log()
    records[2] = replace(records[2], kind="app.forged")
    assert check(records) == (3, "stored kind, author or hlc differ from the signed bytes")


def test_an_empty_log_does_not_verify() -> None:
    verdict = verify_log("t@local", [], lambda _: None)
    assert not verdict.ok and verdict.records == 0


def pruned(record: Record, sig: bytes = b"") -> Record:
    """``record`` as compaction leaves it: kind ``doc.update``, no bytes, its receipt."""
    return replace(record, kind="doc.update", event=b"", sig=sig)


def test_a_pruned_record_in_a_mirror_verifies_by_its_homes_mark() -> None:
    records = build_log()
    records[1] = pruned(records[1], pruned_mark(records[1].id, RELAY.sign))
    # No snapshot covers it: a mirror takes the home's word, signed over its id.
    verdict = verify_log("t@local", records, locator(records), relay_key=RELAY.public_key)
    assert verdict.ok, verdict.reason


@pytest.mark.parametrize(
    "sig",
    [
        pruned_mark(b"\x07" * 32, RELAY.sign),  # the home's mark, for another event
        bytes(64),
    ],
)
def test_a_pruned_mark_that_does_not_verify_is_found(sig: bytes) -> None:
    records = build_log()
    records[1] = pruned(records[1], sig)
    assert check(records) == (2, "the pruned mark does not verify")
    records[1] = pruned(records[1], pruned_mark(records[1].id, identity(7).sign))
    assert check(records) == (2, "the pruned mark does not verify")  # another key's


def test_a_pruned_record_is_checked_like_any_other() -> None:
    """A pruned record keeps its receipt, and with it everything a receipt is checked
    for: filed under its own id, its place in the chain, and its seal."""
    records = build_log()  # records[1] is sealed
    mark = pruned_mark(records[1].id, RELAY.sign)
    records[1] = replace(pruned(records[1], mark), seal=bytes(64))
    assert check(records) == (2, "seal does not verify")
    records = build_log()
    records[1] = replace(pruned(records[1], mark), id=records[0].id)
    assert check(records) == (2, "record is filed under the wrong id, namespace or seq")
    records = build_log()
    forged = unchained(records[1].receipt)
    records[1] = replace(pruned(records[1], mark), receipt=forged.raw, seal=None)
    bad = (2, "receipt breaks the hash chain (seq, prev, hlc or relay)")
    assert check(records) == bad


def test_a_receipt_for_another_event_is_found() -> None:
    """The last record's receipt, made and sealed for another id in the same place of
    the chain: the chain and the seal hold, the receipt is not the event's."""
    records = build_log()
    original = decode_receipt(records[-1].receipt)
    other = make_receipt(
        id=bytes(32),
        ns=original.ns,
        seq=original.seq,
        hlc=original.hlc,
        prev=original.prev,
        relay=original.relay,
    )
    records[-1] = with_seal(replace(records[-1], receipt=other.raw))
    assert check(records) == (6, "event id does not match its bytes or its receipt")


def test_a_pruned_record_without_a_mark_needs_a_snapshot() -> None:
    records = build_log()
    records[1] = pruned(records[1])  # any record emptied and relabelled, in a store
    assert check(records) == (2, "a pruned record is covered by no doc.compacted")


def test_a_pruned_record_of_another_relay_is_found() -> None:
    records = build_log()
    records[0] = pruned(records[0])
    verdict = verify_log("t@local", records, locator(records), relay_key=identity(7).public_key)
    assert (verdict.bad_seq, verdict.reason) == (1, "receipt is signed by another relay key")


def compacted_by_relay(body: object, deps: tuple[bytes, ...]) -> SignedEvent:
    kind = "doc.compacted"
    made = Event(ns="t@local", kind=kind, author=RELAY.public_key, body=body, ts=NOW, deps=deps)
    return sign_event(made, RELAY.sign)


@pytest.mark.parametrize(
    ("body", "covers"),
    [
        ({"doc": "d", "upto": 2}, True),
        ("not a map", False),
        ({"doc": "d", "upto": "2"}, False),
        ({"doc": "d", "upto": True}, False),
        ({"doc": "d"}, False),
    ],
)
def test_a_relays_doc_compacted_of_any_shape_is_checked_without_crashing(
    body: object, covers: bool
) -> None:
    """A log is input: a relay-signed ``doc.compacted`` whose body is not the map 13
    describes covers nothing, and the pruned record it would have covered is reported."""
    sequencer = Sequencer(RELAY.public_key)
    first = sequenced(sequencer.offer(event(0), NOW))[0]
    second = sequenced(sequencer.offer(event(1, deps=(first.id,)), NOW))[0]
    snapshot = compacted_by_relay(body, (second.id,))
    third = sequenced(sequencer.offer(snapshot, NOW))[0]
    records = [first, pruned(second), with_seal(third)]
    expected = (None, None) if covers else (2, "a pruned record is covered by no doc.compacted")
    assert check(records) == expected
