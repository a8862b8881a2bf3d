"""Checking another relay's log as it arrives (pure: frames in, verified records out).

A mirror stores a foreign namespace's events exactly as their home relay sequenced
them, receipts and seals included, so that anyone it serves can check them against
the home's key as if they came from the home itself. It never re-sequences them. So
before anything is stored it must be true of every record that:

* the event bytes are canonical, their id is the receipt's id, and the author's
  signature verifies (or the record's bytes were pruned by compaction, section 13.7:
  it arrives as its receipt and the home's mark that the home pruned it, so that a
  via peer cannot withhold an event's bytes; the mark is kept as its ``sig``);
* the receipt is of this namespace, signed by the home's pinned key, and chains on
  the last stored one: seq one more, ``prev`` its hash, hlc strictly larger;
* a seal by the home's key covers it: records are held back until a sealed receipt
  arrives, checked, and then released together. A home commits batches that end on
  a sealed receipt (§4.4), so an honest home never leaves a run unsealed for long;
  ``max_unsealed`` bounds the run a peer may make us hold in records, and
  ``max_unsealed_bytes`` in bytes (a home seals a run before it reaches that, §4.4:
  records are up to a link message each, so a bound in records alone let a peer make
  a mirror hold thousands of megabytes).

The first failure raises :class:`Forged` and nothing of the run is released: the
caller drops the link, logs the reason, and resumes later from its stored head.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent_sdk.errors import ProtocolError
from agent_sdk.wire import (
    MAX_DEPTH,
    ZERO_HASH,
    decode_event,
    decode_receipt,
    verify_pruned_mark,
    verify_seal,
)
from relay.store import MAX_UNSEALED, MAX_UNSEALED_BYTES, Head, Record, unsealed_bytes

MAX_MIRRORED_DEPTH = 4 * MAX_DEPTH
"""How deep an event a mirror takes may nest. A home takes none over MAX_DEPTH from
its agents, and its own outcomes wrap theirs a few levels deeper at most; far deeper
(msgpack decodes about 1,000) would reach Python's recursion limit in code that walks
values, so it is a forgery."""


class Forged(Exception):
    """A peer sent something that is not its home's log: a broken chain, a wrong key,
    a bad signature, another namespace. ``reason`` says which."""

    def __init__(self, ns: str, seq: int | None, reason: str) -> None:
        super().__init__(f"{ns} seq {seq}: {reason}")
        self.ns, self.seq, self.reason = ns, seq, reason


@dataclass
class MirrorChain:
    """The verified tail of one mirrored namespace and the unsealed run after it."""

    ns: str
    home_key: bytes
    tail: Head | None = None
    max_unsealed: int = MAX_UNSEALED
    max_unsealed_bytes: int = MAX_UNSEALED_BYTES

    def __post_init__(self) -> None:
        self._run: list[Record] = []
        self._held = 0  # the bytes of the run, as the home counts them (unsealed_bytes)
        self._at = self.tail  # the last receipt checked, sealed or not

    @property
    def head(self) -> int:
        """The seq the next record must follow (verified, or held in the run)."""
        return self._at.seq if self._at else 0

    def reset(self) -> None:
        """Forget the unsealed run (the link dropped: it will be sent again)."""
        self._run.clear()
        self._held = 0
        self._at = self.tail

    def offer(
        self,
        event: bytes,
        sig: bytes,
        receipt_bytes: bytes,
        seal: bytes | None,
        mark: bytes | None = None,
    ) -> list[Record]:
        """Check one record; return the run it completes once sealed, else ``[]``."""
        try:
            receipt = decode_receipt(receipt_bytes)
        except ProtocolError as exc:
            raise Forged(self.ns, None, f"receipt does not decode: {exc.reason}") from None
        seq = receipt.seq
        if receipt.ns != self.ns:
            raise Forged(self.ns, seq, f"a receipt of {receipt.ns} in the mirror of {self.ns}")
        if receipt.relay != self.home_key:
            raise Forged(self.ns, seq, "receipt is signed by another relay than the home")
        at = self._at
        prev_seq, prev_hash, prev_hlc = (at.seq, at.hash, at.hlc) if at else (0, ZERO_HASH, -1)
        if seq != prev_seq + 1:
            raise Forged(self.ns, seq, f"seq {seq} does not follow {prev_seq}")
        if receipt.prev != prev_hash or receipt.hlc <= prev_hlc:
            raise Forged(self.ns, seq, "receipt breaks the hash chain (prev or hlc)")
        if event:
            try:
                signed = decode_event(event, sig, max_depth=MAX_MIRRORED_DEPTH)
            except ProtocolError as exc:
                raise Forged(self.ns, seq, f"event does not decode: {exc.reason}") from None
            if signed.id != receipt.id or signed.event.ns != self.ns:
                raise Forged(self.ns, seq, "event is not the one its receipt names")
            if not signed.verify():
                raise Forged(self.ns, seq, "author signature does not verify")
            kind, author = signed.event.kind, signed.event.author
        elif sig:
            raise Forged(self.ns, seq, "a signature without its event")
        elif not mark:
            raise Forged(self.ns, seq, "a record without its bytes carries no pruned mark")
        elif not verify_pruned_mark(receipt, mark):
            raise Forged(self.ns, seq, "the pruned mark does not verify with the home's key")
        else:  # pruned by compaction, its receipt stays in the chain (13.7): an update
            # or a superseded snapshot, stored as an update (the kind is gone), and
            # the mark in place of the signature (log verify checks it there, 10.2)
            kind, author, sig = "doc.update", b"", mark
        record = Record(
            ns=self.ns,
            seq=seq,
            id=receipt.id,
            kind=kind,
            author=author,
            hlc=receipt.hlc,
            event=event,
            sig=sig,
            receipt=receipt_bytes,
            seal=seal,
        )
        self._run.append(record)
        self._held += unsealed_bytes(event, sig, receipt_bytes)
        self._at = Head(self.ns, seq, receipt.hash, receipt.hlc)
        if seal is None:
            if len(self._run) > self.max_unsealed:
                raise Forged(self.ns, seq, f"over {self.max_unsealed} receipts without a seal")
            if self._held >= self.max_unsealed_bytes:
                # A home seals the record that brings a run to the bound (4.4): this
                # is a peer making us hold what no seal may ever cover. The link is
                # dropped and the run fetched again from the stored head, if it was
                # the home's: nothing of it is lost, and the memory is let go now.
                limit = self.max_unsealed_bytes
                raise Forged(self.ns, seq, f"{limit} bytes or more without a seal")
            return []
        if not verify_seal(receipt, seal):
            raise Forged(self.ns, seq, "seal does not verify with the home's key")
        run, self._run, self._held = self._run, [], 0
        self.tail = self._at
        return run
