"""End-to-end sealed messages between agents (pure: no I/O).

A message is encrypted to its recipient and signed by its sender, so a relay on the
way sees only what it needs to route it: who from, who to, the message id and its
place in the sender's stream. Nothing else needs a key exchange or a lookup:

- **Keys.** An agent's X25519 key is derived from its Ed25519 identity, the way
  libsodium's ``crypto_sign_ed25519_*_to_curve25519`` does: the private scalar is the
  first half of SHA-512 of the Ed25519 seed (Ed25519's own secret scalar), and the
  public key is the Montgomery form ``u = (1 + y) / (1 - y) mod p`` of the Ed25519
  point. A sender computes the recipient's encryption key from its agent id alone,
  and a relay cannot substitute another.
- **Sealing.** Each message has a fresh ephemeral X25519 key; HKDF-SHA256 of the
  shared secret (salted with both public keys) gives a one-time ChaCha20-Poly1305
  key. The routing header is the AEAD's associated data, so it cannot be moved onto
  another ciphertext.
- **Signing.** The sender signs the header, the ephemeral key and the ciphertext
  with its Ed25519 key: a recipient knows who sent it before it decrypts anything.
- **Receipts.** The recipient signs the message id with the sender and recipient
  ids: a delivery receipt no relay can forge.

docs/protocol.md section 15 gives the byte layout.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent_sdk.identity import Identity
from agent_sdk.wire import verify_signature

MESSAGE_DOMAIN = b"formicary/v1/msg\x00"
KEY_DOMAIN = b"formicary/v1/msg-key\x00"
RECEIPT_DOMAIN = b"formicary/v1/receipt\x00"
ID_SIZE = 16
STREAM_SIZE = 8
_P = 2**255 - 19


class Unsealable(ValueError):
    """A message that is not for us, not from whom it says, or not intact."""


@lru_cache(maxsize=4096)
def x25519_public_of(agent: bytes) -> bytes:
    """The X25519 public key of the agent whose Ed25519 public key is ``agent`` (kept
    for the agents written to most: the modular inverse costs about 0.1 ms)."""
    if len(agent) != 32:
        raise Unsealable("an agent id is 32 bytes")
    y = int.from_bytes(agent, "little") & ((1 << 255) - 1)  # the top bit is x's sign
    if y >= _P or y == 1:
        raise Unsealable("not an Ed25519 public key")
    u = (1 + y) * pow(1 - y, _P - 2, _P) % _P
    return u.to_bytes(32, "little")


@lru_cache(maxsize=64)
def x25519_private_of(identity: Identity) -> X25519PrivateKey:
    """The X25519 private key of ``identity`` (the scalar Ed25519 signs with)."""
    seed = identity.private_key.private_bytes_raw()
    return X25519PrivateKey.from_private_bytes(hashlib.sha512(seed).digest()[:32])


@dataclass(frozen=True, slots=True)
class Header:
    """What a relay sees of a message: enough to route, order and deduplicate it."""

    id: bytes
    sender: bytes
    recipient: bytes
    stream: bytes
    """The sender's stream (one per client instance): ``seq`` counts within it."""
    seq: int
    ts: int

    def packed(self) -> bytes:
        return _pack([self.id, self.sender, self.recipient, self.stream, self.seq, self.ts])


@dataclass(frozen=True, slots=True)
class Sealed:
    """A sealed message as it travels: header, ephemeral key, ciphertext, signature."""

    header: Header
    ephemeral: bytes
    ciphertext: bytes
    sig: bytes

    def signed_part(self) -> bytes:
        return MESSAGE_DOMAIN + _pack([self.header.packed(), self.ephemeral, self.ciphertext])

    def encode(self) -> bytes:
        h = self.header
        return _pack(
            [h.id, h.sender, h.recipient, h.stream, h.seq, h.ts, self.ephemeral,
             self.ciphertext, self.sig]
        )  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> Sealed:
        """Parse (nothing is checked here but the shape); raises :class:`Unsealable`."""
        try:
            fields = msgpack.unpackb(data)
            mid, sender, recipient, stream, seq, ts, ephemeral, ciphertext, sig = fields
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
            raise Unsealable(f"not a sealed message: {exc}") from None
        shapes = (
            (mid, ID_SIZE), (sender, 32), (recipient, 32), (stream, STREAM_SIZE),
            (ephemeral, 32), (sig, 64),
        )  # fmt: skip
        if any(not isinstance(b, bytes) or len(b) != size for b, size in shapes):
            raise Unsealable("a sealed message's id, keys, stream or signature has a bad size")
        if not (type(seq) is int and seq >= 1 and type(ts) is int):  # (a bool is no int)
            raise Unsealable("a sealed message's seq and ts are integers, seq from 1")
        if not isinstance(ciphertext, bytes):
            raise Unsealable("a sealed message's ciphertext is bytes")
        sealed = cls(Header(mid, sender, recipient, stream, seq, ts), ephemeral, ciphertext, sig)
        _check_canonical(sealed.encode(), data, "a sealed message")
        return sealed

    def verify(self) -> None:
        """Check the sender's signature; raises :class:`Unsealable`."""
        if not verify_signature(self.header.sender, self.sig, self.signed_part()):
            raise Unsealable("the sender's signature does not check")


def _key(shared: bytes, ephemeral: bytes, recipient_x: bytes) -> bytes:
    hkdf = HKDF(hashes.SHA256(), 32, salt=ephemeral + recipient_x, info=KEY_DOMAIN)
    return hkdf.derive(shared)


def seal(sender: Identity, header: Header, body: Any) -> Sealed:
    """Encrypt ``body`` (any msgpack value) to ``header.recipient`` and sign it."""
    if header.sender != sender.public_key:
        raise ValueError("the header's sender is not this identity")
    recipient_x = x25519_public_of(header.recipient)
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_x))
    key = _key(shared, ephemeral_public, recipient_x)
    plaintext = _pack({"body": body})
    # The key is used once (a fresh ephemeral key per message): a fixed nonce is safe;
    # the message id is used so that no two messages share one even if that changed.
    ciphertext = ChaCha20Poly1305(key).encrypt(header.id[:12], plaintext, header.packed())
    unsigned = Sealed(header, ephemeral_public, ciphertext, b"")
    return Sealed(header, ephemeral_public, ciphertext, sender.sign(unsigned.signed_part()))


def unseal(recipient: Identity, sealed: Sealed) -> Any:
    """The body of ``sealed``, checked and decrypted; raises :class:`Unsealable`."""
    if sealed.header.recipient != recipient.public_key:
        raise Unsealable("this message is for another agent")
    sealed.verify()
    private = x25519_private_of(recipient)
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(sealed.ephemeral))
    except ValueError:
        raise Unsealable("a bad ephemeral key") from None  # a low-order point
    recipient_x = x25519_public_of(recipient.public_key)
    key = _key(shared, sealed.ephemeral, recipient_x)
    try:
        plaintext = ChaCha20Poly1305(key).decrypt(
            sealed.header.id[:12], sealed.ciphertext, sealed.header.packed()
        )
        return msgpack.unpackb(plaintext)["body"]
    except (InvalidTag, ValueError, KeyError, TypeError):
        raise Unsealable("the ciphertext does not decrypt") from None


def _pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value)
    return data


def _check_canonical(encoded: bytes, data: bytes, what: str) -> None:
    """Refuse bytes that are not the canonical encoding of what they decode to: the
    signature covers a re-encoded header, so without this the same message could travel
    as several byte strings, and a strict implementation would refuse what we pass on."""
    if encoded != data:
        raise Unsealable(f"{what} is not canonical msgpack (protocol section 2)")


def new_id() -> bytes:
    return os.urandom(ID_SIZE)


@dataclass(frozen=True, slots=True)
class Receipt:
    """The recipient's signed word that message ``id`` from ``sender`` reached it."""

    id: bytes
    sender: bytes
    recipient: bytes
    sig: bytes

    @staticmethod
    def signed_part(mid: bytes, sender: bytes, recipient: bytes) -> bytes:
        return RECEIPT_DOMAIN + _pack([mid, sender, recipient])

    @classmethod
    def make(cls, recipient: Identity, header: Header) -> Receipt:
        sig = recipient.sign(cls.signed_part(header.id, header.sender, recipient.public_key))
        return cls(header.id, header.sender, recipient.public_key, sig)

    def verify(self) -> None:
        signed = self.signed_part(self.id, self.sender, self.recipient)
        if not verify_signature(self.recipient, self.sig, signed):
            raise Unsealable("the receipt's signature does not check")

    def encode(self) -> bytes:
        return _pack([self.id, self.sender, self.recipient, self.sig])

    @classmethod
    def decode(cls, data: bytes) -> Receipt:
        try:
            mid, sender, recipient, sig = msgpack.unpackb(data)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
            raise Unsealable(f"not a receipt: {exc}") from None
        shapes = ((mid, ID_SIZE), (sender, 32), (recipient, 32), (sig, 64))
        if any(not isinstance(b, bytes) or len(b) != size for b, size in shapes):
            raise Unsealable("a receipt's id, keys or signature has a bad size")
        receipt = cls(mid, sender, recipient, sig)
        _check_canonical(receipt.encode(), data, "a receipt")
        return receipt
