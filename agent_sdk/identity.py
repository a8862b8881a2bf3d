"""Ed25519 identities for agents and relays, and the key files that hold them.

An identity *is* its public key: an agent id or relay key is the 32 raw bytes of an
Ed25519 public key, written as 64 lowercase hex digits wherever a human sees it.

Key files are unencrypted PKCS#8 PEM (what ``openssl genpkey -algorithm ed25519``
writes), created with mode 0600 and never overwritten: losing a key loses an identity,
so ``save`` refuses to replace a file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.bindings import crypto_sign, crypto_sign_seed_keypair

KEY_ENV = "FORMICARY_KEY"


@dataclass(frozen=True)
class Identity:
    """A private Ed25519 key and the id derived from it."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Deterministic identity from 32 seed bytes (tests and simulations)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @cached_property
    def public_key(self) -> bytes:
        # Derived once: every event an identity signs names its author (a profile of
        # the relay showed the derivation on each of them).
        return self.private_key.public_key().public_bytes_raw()

    @property
    def id(self) -> str:
        """The printable agent or relay id: the public key in hex."""
        return self.public_key.hex()

    @cached_property
    def _sodium_key(self) -> bytes:
        # libsodium's secret key (seed, then public key), derived once.
        return crypto_sign_seed_keypair(self.private_key.private_bytes_raw())[1]

    def sign(self, message: bytes) -> bytes:
        """The Ed25519 signature of ``message``: 64 bytes.

        Made by libsodium, not OpenSSL, as the checks are: 1.4x as fast here
        (bench/floor.py), and the relay signs every chain-head seal and coordination
        outcome. Ed25519 signing is deterministic, so the bytes are the same either
        would make (tested).
        """
        # (libsodium takes bytes only; bytes(b"...") is the same object, not a copy)
        return crypto_sign(bytes(message), self._sodium_key)[:64]

    def to_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def save(self, path: Path) -> None:
        """Write the key to a new file readable by its owner only (mode 0600).

        Raises :class:`FileExistsError` rather than replace an existing key.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write a private temporary file, then hard-link it into place: the link is
        # atomic and fails if the name exists, so no reader ever sees half a key.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(self.to_pem())
                file.flush()
                os.fsync(file.fileno())
            os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> Identity:
        """Read a key file written by :meth:`save` (or by openssl).

        Raises :class:`ValueError` when the file does not hold an Ed25519 private key.
        """
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 private key")
        return cls(key)


def default_key_path() -> Path:
    """Where the CLI keeps the user's key: ``$FORMICARY_KEY`` or the config dir."""
    configured = os.environ.get(KEY_ENV)
    if configured:
        return Path(configured).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home) / "formicary" / "agent.key"


class KeyFileError(Exception):
    """An agent's key file cannot be read or made (the CLI says so in one line). Kept
    here, not in the CLI's module: run as ``python -m agent_sdk.cli`` that module is
    ``__main__``, and its classes are not the ones other modules import."""


def load_or_create(path: Path) -> Identity:
    """Load the key at ``path``, creating it first if there is none.

    Two processes racing to create the same file both end up with the winner's key:
    the loser's exclusive create fails and it loads what the winner wrote.
    """
    try:
        return Identity.load(path)
    except FileNotFoundError:
        pass
    identity = Identity.generate()
    try:
        identity.save(path)
    except FileExistsError:
        return Identity.load(path)
    return identity


def open_key_file(path: Path) -> Identity:
    """:func:`load_or_create`, with a :class:`KeyFileError` that names the file and
    says what is wrong when it cannot be read or is not a key."""
    try:
        return load_or_create(path)
    except (OSError, ValueError, TypeError) as exc:  # a directory, not PEM, not Ed25519
        reason: object = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        if not isinstance(exc, OSError):
            reason = "it does not hold an unencrypted Ed25519 private key in PEM"
        raise KeyFileError(f"the key file {path}: {reason}") from None
