"""Identities and key files."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from agent_sdk.identity import Identity, default_key_path, load_or_create
from agent_sdk.wire import verify_signature


def test_save_load_round_trip_with_private_permissions(tmp_path: Path) -> None:
    identity = Identity.generate()
    path = tmp_path / "dir" / "agent.key"
    identity.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = Identity.load(path)
    assert loaded.public_key == identity.public_key
    assert verify_signature(identity.public_key, loaded.sign(b"m"), b"m")
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_save_never_replaces_a_key(tmp_path: Path) -> None:
    path = tmp_path / "agent.key"
    first = Identity.generate()
    first.save(path)
    with pytest.raises(FileExistsError):
        Identity.generate().save(path)
    assert Identity.load(path).public_key == first.public_key


def test_load_or_create_creates_once(tmp_path: Path) -> None:
    path = tmp_path / "agent.key"
    created = load_or_create(path)
    assert load_or_create(path).public_key == created.public_key


def test_load_refuses_other_key_types(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = tmp_path / "ec.key"
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    with pytest.raises(ValueError, match="Ed25519"):
        Identity.load(path)


def test_default_key_path_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FORMICARY_KEY", str(tmp_path / "k"))
    assert default_key_path() == tmp_path / "k"
    monkeypatch.delenv("FORMICARY_KEY")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert default_key_path() == tmp_path / "formicary" / "agent.key"


def test_seeded_identities_are_deterministic() -> None:
    assert Identity.from_seed(b"\x01" * 32).id == Identity.from_seed(b"\x01" * 32).id
    assert Identity.from_seed(b"\x01" * 32).id != Identity.from_seed(b"\x02" * 32).id


@pytest.mark.parametrize("size", [0, 1, 200, 70_000])
def test_libsodium_signs_the_bytes_openssl_would(size: int) -> None:
    # Identity.sign uses libsodium; keys and key files are cryptography's (OpenSSL).
    # Ed25519 is deterministic: the two must agree byte for byte, or receipts signed
    # before and after the change would differ.
    identity = Identity.from_seed(bytes(range(32)))
    message = bytes(i % 251 for i in range(size))
    signature = identity.sign(message)
    assert signature == identity.private_key.sign(message)
    assert verify_signature(identity.public_key, signature, message)
    assert not verify_signature(identity.public_key, signature, message + b"x")
