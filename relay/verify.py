"""Offline verification of a namespace log (pure: records in, a verdict out).

Anyone holding a log can check it without trusting the relay that wrote it: every
event's canonical bytes, id and author signature; every receipt's place in the hash
chain (gapless seq from 1, ``prev`` = hash of the previous receipt, increasing hlc,
one relay key); every seal; that the log ends on a seal; and causal order — each
dependency is sequenced before the event (earlier seq in the same namespace, smaller
hlc anywhere).

A compacted ``doc.update`` (or a snapshot a later one superseded) has no bytes left
(its receipt stays in the chain). In a mirror it carries its home's pruned mark, a
signature over its id that must verify; in the home's own store it carries nothing,
and is accepted when a later ``doc.compacted`` of the relay covers its seq
(``upto``). Its author's signature cannot be checked any more; the relay's stands
for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from agent_sdk.errors import ProtocolError
from agent_sdk.wire import (
    Receipt,
    check_chain,
    decode_event,
    decode_receipt,
    verify_pruned_mark,
    verify_seal,
)
from relay.store import PRUNABLE, Located, Record


@dataclass(frozen=True, slots=True)
class Verdict:
    ns: str
    records: int
    sealed: int
    bad_seq: int | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.bad_seq is None


def verify_log(
    ns: str,
    records: Iterable[Record],
    locate: Callable[[bytes], Located | None],
    relay_key: bytes | None = None,
) -> Verdict:
    """Check the records of ``ns`` in seq order; stop at the first bad one.

    ``locate`` answers where a dependency id was sequenced (any namespace), or ``None``.
    With ``relay_key``, every receipt must be that relay's. An empty log is not ok:
    there is nothing to vouch for.
    """
    previous: Receipt | None = None
    last_seal: bytes | None = None
    count = sealed = 0

    def bad(seq: int, reason: str) -> Verdict:
        return Verdict(ns, count, sealed, seq, reason)

    compacted: list[int] = []  # seqs of pruned records not yet covered
    for record in records:
        seq = record.seq
        if not record.event:
            if record.kind not in PRUNABLE:
                return bad(seq, "only a doc.update or doc.compacted may have its bytes pruned")
            try:
                receipt = decode_receipt(record.receipt)
            except ProtocolError as exc:
                return bad(seq, exc.reason)
            if receipt.id != record.id or receipt.ns != ns or receipt.seq != seq:
                return bad(seq, "record is filed under the wrong id, namespace or seq")
            if relay_key is not None and receipt.relay != relay_key:
                return bad(seq, "receipt is signed by another relay key")
            if check_chain([receipt], previous) is not None:
                return bad(seq, "receipt breaks the hash chain (seq, prev, hlc or relay)")
            if record.seal is not None:
                if not verify_seal(receipt, record.seal):
                    return bad(seq, "seal does not verify")
                sealed += 1
            if record.sig:  # a mirror's: the home's mark that it pruned the record
                if not verify_pruned_mark(receipt, record.sig):
                    return bad(seq, "the pruned mark does not verify")
            else:  # the home's own store keeps no mark: a later snapshot must cover it
                compacted.append(seq)
            previous, last_seal = receipt, record.seal
            count += 1
            continue
        try:
            signed = decode_event(record.event, record.sig)
            receipt = decode_receipt(record.receipt)
        except ProtocolError as exc:
            return bad(seq, exc.reason)
        if signed.id != record.id or receipt.id != signed.id:
            return bad(seq, "event id does not match its bytes or its receipt")
        if signed.event.ns != ns or receipt.ns != ns or receipt.seq != seq:
            return bad(seq, "record is filed under the wrong namespace or seq")
        event = signed.event
        if (record.kind, record.author, record.hlc) != (event.kind, event.author, receipt.hlc):
            return bad(seq, "stored kind, author or hlc differ from the signed bytes")
        if relay_key is not None and receipt.relay != relay_key:
            return bad(seq, "receipt is signed by another relay key")
        if not signed.verify():
            return bad(seq, "author signature does not verify")
        broken = check_chain([receipt], previous)
        if broken is not None:
            return bad(seq, "receipt breaks the hash chain (seq, prev, hlc or relay)")
        if record.seal is not None:
            if not verify_seal(receipt, record.seal):
                return bad(seq, "seal does not verify")
            sealed += 1
        for dep in signed.event.deps:
            located = locate(dep)
            if located is None:
                return bad(seq, f"dependency {dep.hex()} is not in the log")
            if located.hlc >= receipt.hlc or (located.ns == ns and located.seq >= seq):
                return bad(seq, f"dependency {dep.hex()} is sequenced after the event")
        if event.kind == "doc.compacted" and event.author == receipt.relay:
            upto = _upto(event.body)
            compacted = [pruned for pruned in compacted if pruned > upto]
        previous, last_seal = receipt, record.seal
        count += 1
    if compacted:
        return bad(compacted[0], "a pruned record is covered by no doc.compacted")
    if previous is None:
        return Verdict(ns, 0, 0, 0, "no records: the namespace is empty or unknown")
    if last_seal is None:
        # Every commit seals its last receipt per namespace, so an unsealed tail
        # means records were added outside a commit, or the seal was stripped.
        return bad(previous.seq, "the log does not end on a sealed receipt")
    return Verdict(ns, count, sealed)


def _upto(body: object) -> int:
    """The last seq a relay's ``doc.compacted`` covers; 0 (nothing) for a body of
    another shape: a log is input, and checking it must report, never crash."""
    upto = body.get("upto", 0) if isinstance(body, dict) else 0
    return upto if type(upto) is int else 0  # (a bool is no seq)
