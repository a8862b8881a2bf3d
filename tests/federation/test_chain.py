"""The mirror's check of a foreign log, and peer specs (pure: no sockets)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from agent_sdk.identity import Identity
from agent_sdk.wire import (
    ZERO_HASH,
    Event,
    Receipt,
    decode_receipt,
    make_receipt,
    pruned_mark,
    seal,
    sign_event,
)
from federation.chain import Forged, MirrorChain
from federation.peers import Peer, PeerSpecError, check_peers, parse_peer
from relay.node import RelayConfig, RelayNode
from relay.store import MAX_UNSEALED_BYTES, Record, unsealed_bytes
from relay.store.memory import MemoryStore

HOME = Identity.from_seed(b"H" * 32)
AUTHOR = Identity.from_seed(b"A" * 32)
NS = "x@b"


def log(count: int, sealed: set[int], ns: str = NS, depth: int = 0, pad: int = 0) -> list[Record]:
    """A home's log of ``count`` events, with seals on the seqs in ``sealed`` (their
    bodies nested ``depth`` lists deep, or padded with ``pad`` bytes of text)."""
    records, prev, hlc = [], ZERO_HASH, 1000
    for seq in range(1, count + 1):
        body: Any = [seq, "y" * pad] if pad else seq
        for _ in range(depth):
            body = [body]
        event = Event(ns=ns, kind="app.note", author=AUTHOR.public_key, body=body, deps=(), ts=1)
        signed = sign_event(event, AUTHOR.sign)
        hlc += 7
        receipt = make_receipt(
            id=signed.id, ns=ns, seq=seq, hlc=hlc, prev=prev, relay=HOME.public_key
        )
        prev = receipt.hash
        records.append(
            Record(
                ns=ns,
                seq=seq,
                id=signed.id,
                kind="app.note",
                author=AUTHOR.public_key,
                hlc=hlc,
                event=signed.raw,
                sig=signed.sig,
                receipt=receipt.raw,
                seal=seal(receipt, HOME.sign) if seq in sealed else None,
            )
        )
    return records


def offer_all(chain: MirrorChain, records: list[Record]) -> list[list[Record]]:
    runs = []
    for r in records:
        run = chain.offer(r.event, r.sig, r.receipt, r.seal)
        if run:
            runs.append(run)
    return runs


def test_records_are_released_in_sealed_runs_exactly_as_the_home_wrote_them() -> None:
    records = log(6, sealed={2, 5})
    chain = MirrorChain(NS, HOME.public_key)
    runs = offer_all(chain, records)
    assert runs == [records[:2], records[2:5]]  # seq 6 waits for its seal
    assert chain.tail is not None and chain.tail.seq == 5 and chain.head == 6
    chain.reset()  # the link dropped: the unsealed run is forgotten...
    assert chain.head == 5
    resent = log(6, sealed={6})[5]  # sent again, now sealed: the home committed it
    assert offer_all(chain, [resent]) == [[resent]]


def test_a_mirror_resumes_on_its_stored_tail() -> None:
    records = log(4, sealed={2, 4})
    first = MirrorChain(NS, HOME.public_key)
    offer_all(first, records[:2])
    resumed = MirrorChain(NS, HOME.public_key, first.tail)
    assert offer_all(resumed, records[2:]) == [records[2:]]


OTHER = Identity.from_seed(b"O" * 32)


def forged_seal(records: list[Record]) -> list[Record]:
    return [replace(records[0], seal=seal(decode_receipt(records[0].receipt), OTHER.sign))]


def mark(record: Record, relay: Identity = HOME) -> bytes:
    return pruned_mark(record.id, relay.sign)


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        (lambda rs: rs[1:], "does not follow"),  # skips seq 1
        (lambda rs: [replace(rs[0], receipt=rs[0].receipt + b"\x00")], "does not decode"),
        (lambda rs: [replace(rs[0], sig=bytes(64))], "signature"),
        (lambda rs: [replace(rs[0], event=rs[1].event, sig=rs[1].sig)], "not the one"),
        (lambda rs: [replace(rs[0], sig=b"")], "does not decode"),
        (lambda rs: [replace(rs[0], event=b"")], "signature without its event"),
        (forged_seal, "seal does not verify"),
        (lambda rs: log(1, {1}, ns="y@b"), "a receipt of y@b"),
    ],
)
def test_every_kind_of_forgery_is_refused_and_nothing_released(
    forge: Callable[[list[Record]], list[Record]], reason: str
) -> None:
    chain = MirrorChain(NS, HOME.public_key)
    with pytest.raises(Forged) as forged:
        offer_all(chain, forge(log(2, sealed={1, 2})))
    assert reason in forged.value.reason
    assert chain.tail is None  # nothing was released


def rechained(record: Record, **changes: Any) -> Record:
    """``record`` with its receipt made again with ``changes`` (and sealed by the home,
    when it was): a home's key vouching for a chain that does not hold together."""
    receipt = decode_receipt(record.receipt)
    fields = {k: getattr(receipt, k) for k in ("id", "ns", "seq", "hlc", "prev", "relay")}
    remade = make_receipt(**(fields | changes))
    sealed = None if record.seal is None else seal(remade, HOME.sign)
    return replace(record, receipt=remade.raw, hlc=remade.hlc, seal=sealed)


@pytest.mark.parametrize(
    "changes",
    [
        lambda first: {"prev": ZERO_HASH},  # seq 2 chained on nothing: a fork of the log
        lambda first: {"prev": b"\x01" * 32},  # on a receipt that is not seq 1
        lambda first: {"hlc": first.hlc},  # not strictly larger than seq 1's
        lambda first: {"hlc": first.hlc - 1},  # before seq 1's
    ],
    ids=["prev-zero", "prev-other", "hlc-same", "hlc-earlier"],
)
def test_a_receipt_that_breaks_the_hash_chain_is_refused(
    changes: Callable[[Receipt], dict[str, Any]],
) -> None:
    """4.2 and 14.8: each receipt names the hash of the one before it and has a larger
    hlc. A home's own key on a receipt that does not chain (a forked log, or an hlc
    that goes back) is refused, with the unsealed run before it."""
    records = log(3, sealed={3})
    bad = rechained(records[1], **changes(decode_receipt(records[0].receipt)))
    chain = MirrorChain(NS, HOME.public_key)
    with pytest.raises(Forged, match="breaks the hash chain") as forged:
        offer_all(chain, [records[0], bad, records[2]])
    assert forged.value.seq == 2 and chain.tail is None  # seq 1 held, not released


def test_an_event_nested_far_deeper_than_any_home_takes_is_a_forgery() -> None:
    """A home takes events nested at most 64 deep from its agents, and wraps them a
    few levels more at most; 300 deep would walk Python's stack near its limit."""
    deep = MirrorChain(NS, HOME.public_key)
    assert offer_all(deep, log(1, {1}, depth=100)) != []  # deeper than 64: taken
    with pytest.raises(Forged, match="nest"):
        offer_all(MirrorChain(NS, HOME.public_key), log(1, {1}, depth=300))


def test_a_consistent_log_signed_by_another_relay_is_refused() -> None:
    pinned = MirrorChain(NS, Identity.from_seed(b"P" * 32).public_key)
    with pytest.raises(Forged, match="another relay"):
        offer_all(pinned, log(2, {1, 2}))  # a valid chain, valid seals: of the wrong key


def test_an_endless_unsealed_run_is_refused() -> None:
    """At most ``max_unsealed`` receipts are held without a seal (14.8): the next one
    is refused, not one after it."""
    records = log(5, sealed=set())
    chain = MirrorChain(NS, HOME.public_key, max_unsealed=3)
    assert offer_all(chain, records[:3]) == []  # at the bound: held
    with pytest.raises(Forged, match="over 3 receipts without a seal") as refused:
        offer_all(chain, records[3:4])
    assert refused.value.seq == 4


def size(record: Record) -> int:
    return unsealed_bytes(record.event, record.sig, record.receipt)


def test_an_unsealed_run_is_refused_once_it_reaches_the_bytes_bound() -> None:
    """A run is bounded in bytes too: records are up to a link message each, so 16384
    of them were gigabytes held in memory. A home seals the record that reaches the
    bound (4.4); without that seal the run is refused, and taken when sent again."""
    records = log(6, sealed={2, 6})
    chain = MirrorChain(NS, HOME.public_key, max_unsealed_bytes=sum(map(size, records[2:5])))
    assert offer_all(chain, records[:4]) == [records[:2]]  # 3 and 4 held: under the bound
    with pytest.raises(Forged, match="bytes or more without a seal") as refused:
        offer_all(chain, records[4:5])
    assert refused.value.seq == 5
    chain.reset()  # the link dropped: fetched again from the stored head (seq 2)
    resent = log(6, sealed={2, 5, 6})  # as a home seals it: at the bound
    assert offer_all(chain, resent[2:]) == [resent[2:5], resent[5:]]


def test_a_home_seals_a_large_batch_in_runs_a_mirror_takes() -> None:
    """4.4: one commit of large events is not one run a mirror must hold whole: the
    home seals each record that brings its namespace's run to MAX_UNSEALED_BYTES."""
    node = RelayNode(HOME, MemoryStore(), RelayConfig(name="b"))
    other = log(2, sealed=set(), ns="z@b")
    batch = node._seal_heads([other[0], *log(20, sealed=set(), pad=1_000_000), other[1]])
    records = [r for r in batch if r.ns == NS]
    run = 0
    for record in records:  # each run, its sealed record included, just reaches the bound
        run += size(record)
        assert record.seal is not None or run < MAX_UNSEALED_BYTES
        run = 0 if record.seal is not None else run
    assert sum(r.seal is not None for r in records) == 2 and records[-1].seal is not None
    assert [r.seal is not None for r in batch if r.ns == "z@b"] == [False, True]
    runs = offer_all(MirrorChain(NS, HOME.public_key), records)
    assert [r for run in runs for r in run] == records


def test_a_home_seals_a_long_batch_in_runs_a_mirror_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    """4.4: a ``commit_batch`` set above MAX_UNSEALED made one commit of small events
    one run longer than any mirror holds (it refused it as forged, and fetched it for
    ever): the home seals each record that brings its run to MAX_UNSEALED records.
    (A bound of 8 here stands for 16,384: the rule is the same.)"""
    import relay.node

    monkeypatch.setattr(relay.node, "MAX_UNSEALED", 8)
    node = RelayNode(HOME, MemoryStore(), RelayConfig(name="b", commit_batch=100))
    batch = node._seal_heads(log(20, sealed=set()))
    assert [i for i, r in enumerate(batch, 1) if r.seal is not None] == [8, 16, 20]
    runs = offer_all(MirrorChain(NS, HOME.public_key, max_unsealed=8), batch)
    assert [r for run in runs for r in run] == batch


def test_a_compacted_update_arrives_as_its_receipt_and_the_homes_mark() -> None:
    records = log(2, sealed={2})
    chain = MirrorChain(NS, HOME.public_key)
    home_mark = mark(records[0])
    assert chain.offer(b"", b"", records[0].receipt, None, home_mark) == []
    [run] = offer_all(chain, [records[1]])
    assert run[0].event == b"" and run[0].kind == "doc.update" and run[1] == records[1]
    assert run[0].sig == home_mark  # kept: the mirror's own log verify checks it


@pytest.mark.parametrize(
    ("which", "signer", "reason"),
    [
        (None, None, "no pruned mark"),  # emptied on the way: a via peer withholding it
        (1, HOME, "pruned mark does not verify"),  # the home's mark of another record
        (0, OTHER, "pruned mark does not verify"),  # of this record, by another key
    ],
)
def test_a_record_without_bytes_needs_its_homes_mark(
    which: int | None, signer: Identity | None, reason: str
) -> None:
    records = log(2, sealed={1, 2})
    given = None if which is None or signer is None else mark(records[which], signer)
    chain = MirrorChain(NS, HOME.public_key)
    with pytest.raises(Forged, match=reason):
        chain.offer(b"", b"", records[0].receipt, records[0].seal, given)
    assert chain.tail is None


KEY = "ab" * 32


@pytest.mark.parametrize(
    ("spec", "peer"),
    [
        (f"b=ws://h:1#{KEY}", Peer("b", bytes.fromhex(KEY), url="ws://h:1")),
        (f"b#{KEY}", Peer("b", bytes.fromhex(KEY))),
        (f"c=via:b#{KEY}", Peer("c", bytes.fromhex(KEY), via="b")),
        (f"b=ws://[::1]:7700#{KEY}", Peer("b", bytes.fromhex(KEY), url="ws://[::1]:7700")),
        (f"b=wss://éx.com#{KEY}", Peer("b", bytes.fromhex(KEY), url="wss://éx.com")),
    ],
)
def test_peer_specs_parse(spec: str, peer: Peer) -> None:
    assert parse_peer(spec) == peer
    assert parse_peer(peer.spec) == peer


@pytest.mark.parametrize(
    "spec",
    [
        "b=ws://h:1",
        f"b=ws://h:1#{KEY[:-2]}",
        f"B#{KEY}",
        f"b=http://h#{KEY}",
        f"b=via:b#{KEY}",
        # URLs the link could never dial (it crashed the relay as it tried)
        f"b=ws://h:99999#{KEY}",
        f"b=ws://h:port#{KEY}",
        f"b=ws://[::1#{KEY}",
        f"b=ws://#{KEY}",
        f"b=wss://:7700#{KEY}",
        f"b=ws://a..b:7700#{KEY}",  # (names websockets takes and the resolver cannot)
        f"b=ws://{'x' * 64}.example:7700#{KEY}",
    ],
)
def test_bad_peer_specs_say_what_is_wrong(spec: str) -> None:
    with pytest.raises(PeerSpecError):
        parse_peer(spec)


def test_peer_lists_refuse_ourselves_twice_and_chained_vias() -> None:
    key = bytes.fromhex(KEY)
    with pytest.raises(PeerSpecError, match="own name"):
        check_peers([Peer("a", key, url="ws://x")], "a")
    with pytest.raises(PeerSpecError, match="twice"):
        check_peers([Peer("b", key, url="ws://x"), Peer("b", key)], "a")
    with pytest.raises(PeerSpecError, match="dialled peer"):
        check_peers([Peer("b", key, via="c"), Peer("c", key, via="d")], "a")
    # Routes are one hop through a dialled peer (14.3): not through a via peer (a
    # chain), nor through one that only dials us (no link to go over).
    direct = Peer("b", key, url="ws://x")
    check_peers([direct, Peer("c", key, via="b")], "a")
    with pytest.raises(PeerSpecError, match="dialled peer"):
        check_peers([direct, Peer("c", key, via="b"), Peer("d", key, via="c")], "a")
    with pytest.raises(PeerSpecError, match="dialled peer"):
        check_peers([Peer("b", key), Peer("c", key, via="b")], "a")
