"""Sealed messages and their receipts (agent_sdk/sealing.py): what a recipient refuses."""

from __future__ import annotations

from dataclasses import replace

import msgpack
import pytest

from agent_sdk.sealing import Header, Receipt, Sealed, Unsealable, seal, unseal
from tests.conftest import identity

ALICE, BOB, CAROL = identity(1), identity(2), identity(3)


def header(seq: int = 1, mid: bytes = b"\x01" * 16) -> Header:
    return Header(mid, ALICE.public_key, BOB.public_key, b"s" * 8, seq, 1_700_000_000_000)


def test_a_sealed_message_travels_and_opens_for_its_recipient_only() -> None:
    sealed = seal(ALICE, header(), {"text": "hi"})
    received = Sealed.decode(sealed.encode())
    assert received == sealed
    assert unseal(BOB, received) == {"text": "hi"}
    with pytest.raises(Unsealable, match="another agent"):
        unseal(CAROL, received)


def test_a_message_whose_signature_does_not_check_is_refused_before_it_is_opened() -> None:
    """The ciphertext is intact and decrypts: only the sender's signature is wrong."""
    sealed = seal(ALICE, header(), "secret")
    forged = replace(sealed, sig=CAROL.sign(sealed.signed_part()))
    with pytest.raises(Unsealable, match="signature"):
        unseal(BOB, forged)


def test_a_header_cannot_be_moved_onto_another_ciphertext() -> None:
    """The header is the AEAD's associated data: a sender re-signing another header
    over the same ciphertext (another seq, to pass it off as another message) fails."""
    sealed = seal(ALICE, header(seq=1), "once")
    moved = Sealed(header(seq=2), sealed.ephemeral, sealed.ciphertext, b"")
    moved = replace(moved, sig=ALICE.sign(moved.signed_part()))
    moved.verify()  # the signature is the sender's own
    with pytest.raises(Unsealable, match="decrypt"):
        unseal(BOB, moved)


def test_a_message_or_receipt_that_is_not_canonical_is_refused() -> None:
    """The signature covers the re-encoded header: other bytes for the same message
    would let it travel as several byte strings."""
    sealed = seal(ALICE, header(seq=1), "x")
    h = sealed.header
    head = b"\x99" + b"".join(msgpack.packb(v) for v in (h.id, h.sender, h.recipient, h.stream))
    tail = b"".join(
        msgpack.packb(v) for v in (h.ts, sealed.ephemeral, sealed.ciphertext, sealed.sig)
    )
    assert Sealed.decode(head + msgpack.packb(1) + tail) == sealed
    with pytest.raises(Unsealable, match="canonical"):
        Sealed.decode(head + b"\xce\x00\x00\x00\x01" + tail)  # seq 1 as a uint 32

    receipt = Receipt.make(BOB, h)
    assert Receipt.decode(receipt.encode()) == receipt
    loose = msgpack.packb([receipt.id, receipt.sender, receipt.recipient])
    loose = b"\x94" + loose[1:] + b"\xc5\x00\x40" + receipt.sig  # sig as a bin 16
    with pytest.raises(Unsealable, match="canonical"):
        Receipt.decode(loose)


def test_a_receipt_checks_only_under_its_recipients_key() -> None:
    receipt = Receipt.make(BOB, header())
    receipt.verify()
    with pytest.raises(Unsealable, match="signature"):
        replace(receipt, recipient=CAROL.public_key).verify()
    with pytest.raises(Unsealable, match="signature"):
        replace(receipt, id=b"\x02" * 16).verify()
