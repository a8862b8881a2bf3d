"""The test vectors of docs/protocol.md, section 11, recomputed with the real code.

Every hex literal below is copied from the document. Each test checks that the code
still produces it, and ``test_document_shows_every_vector`` checks that the document
still shows it, so neither can change without the other.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_sdk import frames
from agent_sdk.identity import Identity
from agent_sdk.wire import (
    EVENT_DOMAIN,
    PRUNED_DOMAIN,
    SEAL_DOMAIN,
    ZERO_HASH,
    Event,
    canonical,
    check_chain,
    decode_canonical,
    decode_event,
    decode_receipt,
    make_receipt,
    pruned_mark,
    seal,
    sign_event,
    verify_pruned_mark,
    verify_seal,
)

PROTOCOL_MD = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

AUTHOR = Identity.from_seed(bytes([1]) * 32)
RELAY = Identity.from_seed(bytes([2]) * 32)

# -- section 2: canonical encoding
KEY_ORDER_HEX = "83a15a03a17a01a2c3a902"
WORKED_EXAMPLE_HEX = "86a161c3a162c40200ffa166cb3ff8000000000000a16c9301cd012cc0a16ed0dfa173a2c3a9"

# -- section 3 and 5: signature domains
EVENT_DOMAIN_HEX = "666f726d69636172792f76312f6576656e7400"
SEAL_DOMAIN_HEX = "666f726d69636172792f76312f7365616c00"
AGENT_AUTH_DOMAIN_HEX = "666f726d69636172792f76312f6167656e742d6175746800"
RELAY_AUTH_DOMAIN_HEX = "666f726d69636172792f76312f72656c61792d6175746800"

# -- 10.1 keys
AUTHOR_KEY_HEX = "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"
RELAY_KEY_HEX = "8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394"

# -- 10.2 an event
EVENT_HEX = (
    "87a6617574686f72c4208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"
    "a4626f647982a16e01a474657874a568656c6c6fa46465707390a46b696e64a86170702e6e6f7465"
    "a26e73aa64656d6f406c6f63616ca27473cf0000018bcfe56800a17601"
)
EVENT_ID_HEX = "e8b88c2f3654d9d163d0aaf32771b4e51e781d05a33bd8f1fd1bc8c540af8bb0"
EVENT_SIGNED_HEX = (
    "666f726d69636172792f76312f6576656e7400"
    "e8b88c2f3654d9d163d0aaf32771b4e51e781d05a33bd8f1fd1bc8c540af8bb0"
)
EVENT_SIG_HEX = (
    "5cb970d4aedc3a6ee430ce8eada626f008c926c7c76dfb1dd76ec038f6a965b2"
    "083920438598b292ec9efdf44ddfac8f967eca95d98b9c5a8d3a43c698a4ab0c"
)
PUBLISH_FRAME_HEX = (
    "84a174a77075626c697368a372696401a56576656e74c46f"
    "87a6617574686f72c4208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"
    "a4626f647982a16e01a474657874a568656c6c6fa46465707390a46b696e64a86170702e6e6f7465"
    "a26e73aa64656d6f406c6f63616ca27473cf0000018bcfe56800a17601"
    "a3736967c440"
    "5cb970d4aedc3a6ee430ce8eada626f008c926c7c76dfb1dd76ec038f6a965b2"
    "083920438598b292ec9efdf44ddfac8f967eca95d98b9c5a8d3a43c698a4ab0c"
)

# -- 10.3 its receipt and seal
RECEIPT_HEX = (
    "86a3686c63cf018bcfe568000000"
    "a26964c420e8b88c2f3654d9d163d0aaf32771b4e51e781d05a33bd8f1fd1bc8c540af8bb0"
    "a26e73aa64656d6f406c6f63616c"
    "a470726576c4200000000000000000000000000000000000000000000000000000000000000000"
    "a572656c6179c4208139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394"
    "a373657101"
)
RECEIPT_HASH_HEX = "8bf1867e68e2bf3d02c8585cd33c88588d92f8f546e8ef6b473eeb0a71f212b7"
SEAL_SIGNED_HEX = (
    "666f726d69636172792f76312f7365616c00"
    "8bf1867e68e2bf3d02c8585cd33c88588d92f8f546e8ef6b473eeb0a71f212b7"
)
SEAL_HEX = (
    "c16e7621f79d8ab84c194cd41b36e114c0e5364e9497137e3f16d6e55e55d775"
    "2cba4aab83692b705b0a0fdffe7e6ac3928cac7c408b86d69678eb36e427cf0e"
)

PRUNED_MESSAGE_HEX = (
    "666f726d69636172792f76312f7072756e656400"
    "e8b88c2f3654d9d163d0aaf32771b4e51e781d05a33bd8f1fd1bc8c540af8bb0"
)
PRUNED_MARK_HEX = (
    "83c2c43db9bba6d10225922078f80bd255f0970d9b64804c39ac3ef352591f8a"
    "dea25709976be5e3aac3d3185f47a9703c9c06917f719cf8a51afbad6f11300d"
)

# -- 10.4 a second event, chained
EVENT2_HEX = (
    "88a6617574686f72c4208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"
    "a4626f6479c0"
    "a46465707391c420e8b88c2f3654d9d163d0aaf32771b4e51e781d05a33bd8f1fd1bc8c540af8bb0"
    "a46b696e64a96170702e7265706c79a56e6f6e6365c40101"
    "a26e73aa64656d6f406c6f63616ca27473cf0000018bcfe56801a17601"
)
EVENT2_ID_HEX = "062981274a87994bfd9c3ed3afe23e98bd590959fe9e50bd92fada720775cc77"
EVENT2_SIG_HEX = (
    "fec2ff56075227d158827cce191b01717ae995ab82a8f85f57bb2679d177c24d"
    "01b0e0c2bb44c97ffe75e4e1857625825592f241247a948439f2542520111a02"
)
RECEIPT2_HEX = (
    "86a3686c63cf018bcfe568010000"
    "a26964c420062981274a87994bfd9c3ed3afe23e98bd590959fe9e50bd92fada720775cc77"
    "a26e73aa64656d6f406c6f63616c"
    "a470726576c4208bf1867e68e2bf3d02c8585cd33c88588d92f8f546e8ef6b473eeb0a71f212b7"
    "a572656c6179c4208139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394"
    "a373657102"
)
RECEIPT2_HASH_HEX = "5006290f1fd7febbba643113e250187c162eef6307eb247c6d4eca550444fd10"
SEAL2_HEX = (
    "fa205d060aed6e3f7dd7f2f25269ad76f33cfd4b9782f3ee1041f9623a33e432"
    "8a56e858611787c7459b811e73bc4ba2fbb562e6d7bcc9ee39272e83e8c16e03"
)

# -- 10.5 handshake signatures
RELAY_CHALLENGE = bytes(range(32))
AGENT_CHALLENGE = bytes([0xAA]) * 32
AGENT_AUTH_MESSAGE_HEX = (
    "666f726d69636172792f76312f6167656e742d6175746800"
    "8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394"
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
)
AUTH_SIG_HEX = (
    "5fd9960950153ebe06fb7aa64e01efbed522e2c0daa5b58731e5eaa065720260"
    "47ef785e576d9d8cdea9d750eda4f0b71b8b9567b78cbf05ddf3371c716f1603"
)
RELAY_AUTH_MESSAGE_HEX = (
    "666f726d69636172792f76312f72656c61792d6175746800"
    "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
)
WELCOME_SIG_HEX = (
    "4565dd6c947827c679bba05cb382df6d817b188cc82629fb30a1540a4db11e8c"
    "1f4368d7b810d39bd35c80872a8ff394a2416ed6de96bfec84d18b45a4b52304"
)

TS = 1_700_000_000_000


def first_event() -> Event:
    return Event(
        ns="demo@local",
        kind="app.note",
        author=AUTHOR.public_key,
        body={"text": "hello", "n": 1},
        deps=(),
        ts=TS,
    )


def second_event() -> Event:
    return Event(
        ns="demo@local",
        kind="app.reply",
        author=AUTHOR.public_key,
        body=None,
        deps=(bytes.fromhex(EVENT_ID_HEX),),
        ts=TS + 1,
        nonce=b"\x01",
    )


# --------------------------------------------------------------------------- section 2


def test_key_order_example() -> None:
    assert canonical({"z": 1, "é": 2, "Z": 3}).hex() == KEY_ORDER_HEX


def test_worked_example() -> None:
    value = {"s": "é", "n": -33, "f": 1.5, "b": b"\x00\xff", "a": True, "l": [1, 300, None]}
    data = canonical(value)
    assert data.hex() == WORKED_EXAMPLE_HEX
    assert len(data) == 38
    assert decode_canonical(data) == value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (127, "7f"),
        (128, "cc80"),
        (255, "ccff"),
        (256, "cd0100"),
        (65536, "ce00010000"),
        (2**32, "cf0000000100000000"),
        (-1, "ff"),
        (-32, "e0"),
        (-33, "d0df"),
        (-128, "d080"),
        (-129, "d1ff7f"),
        (-32769, "d2ffff7fff"),
        (-(2**31) - 1, "d3ffffffff7fffffff"),
        (1.0, "cb3ff0000000000000"),
    ],
)
def test_shortest_forms(value: int | float, expected: str) -> None:
    assert canonical(value).hex() == expected


def test_signature_domains() -> None:
    assert EVENT_DOMAIN.hex() == EVENT_DOMAIN_HEX
    assert SEAL_DOMAIN.hex() == SEAL_DOMAIN_HEX
    assert frames.AGENT_AUTH_DOMAIN.hex() == AGENT_AUTH_DOMAIN_HEX
    assert frames.RELAY_AUTH_DOMAIN.hex() == RELAY_AUTH_DOMAIN_HEX


# --------------------------------------------------------------------------- 10.1 - 10.3


def test_keys() -> None:
    assert AUTHOR.public_key.hex() == AUTHOR_KEY_HEX
    assert RELAY.public_key.hex() == RELAY_KEY_HEX


def test_event_bytes_id_and_signature() -> None:
    signed = sign_event(first_event(), AUTHOR.sign)
    assert signed.raw.hex() == EVENT_HEX
    assert len(signed.raw) == 111
    assert signed.id.hex() == EVENT_ID_HEX
    assert (EVENT_DOMAIN + signed.id).hex() == EVENT_SIGNED_HEX
    assert signed.sig.hex() == EVENT_SIG_HEX


def test_event_vector_decodes_and_verifies() -> None:
    received = decode_event(bytes.fromhex(EVENT_HEX), bytes.fromhex(EVENT_SIG_HEX))
    assert received.id.hex() == EVENT_ID_HEX
    assert received.event == first_event()
    assert received.verify()


def test_publish_frame() -> None:
    frame = frames.decode_frame(bytes.fromhex(PUBLISH_FRAME_HEX))
    assert frame == frames.Publish(
        rid=1, event=bytes.fromhex(EVENT_HEX), sig=bytes.fromhex(EVENT_SIG_HEX)
    )
    assert len(bytes.fromhex(PUBLISH_FRAME_HEX)) == 205
    assert frames.encode_frame(frame).hex() == PUBLISH_FRAME_HEX


def test_receipt_bytes_hash_and_seal() -> None:
    receipt = make_receipt(
        id=bytes.fromhex(EVENT_ID_HEX),
        ns="demo@local",
        seq=1,
        hlc=TS << 16,
        prev=ZERO_HASH,
        relay=RELAY.public_key,
    )
    assert TS << 16 == 111_411_200_000_000_000
    assert receipt.raw.hex() == RECEIPT_HEX
    assert len(receipt.raw) == 149
    assert receipt.hash.hex() == RECEIPT_HASH_HEX
    assert (SEAL_DOMAIN + receipt.hash).hex() == SEAL_SIGNED_HEX
    assert seal(receipt, RELAY.sign).hex() == SEAL_HEX


def test_pruned_mark_vector() -> None:
    receipt = decode_receipt(bytes.fromhex(RECEIPT_HEX))
    assert (PRUNED_DOMAIN + receipt.id).hex() == PRUNED_MESSAGE_HEX
    assert pruned_mark(receipt.id, RELAY.sign).hex() == PRUNED_MARK_HEX
    assert verify_pruned_mark(receipt, bytes.fromhex(PRUNED_MARK_HEX))
    assert not verify_pruned_mark(receipt, bytes.fromhex(SEAL_HEX))  # another domain


def test_receipt_vector_decodes_and_verifies() -> None:
    receipt = decode_receipt(bytes.fromhex(RECEIPT_HEX))
    assert receipt.hash.hex() == RECEIPT_HASH_HEX
    assert (receipt.seq, receipt.hlc, receipt.prev) == (1, TS << 16, ZERO_HASH)
    assert verify_seal(receipt, bytes.fromhex(SEAL_HEX))
    assert not verify_seal(receipt, bytes.fromhex(SEAL2_HEX))


# --------------------------------------------------------------------------- 10.4


def test_second_event_and_chain() -> None:
    signed = sign_event(second_event(), AUTHOR.sign)
    assert signed.raw.hex() == EVENT2_HEX
    assert signed.id.hex() == EVENT2_ID_HEX
    assert signed.sig.hex() == EVENT2_SIG_HEX

    first = decode_receipt(bytes.fromhex(RECEIPT_HEX))
    second = make_receipt(
        id=signed.id,
        ns="demo@local",
        seq=2,
        hlc=(TS + 1) << 16,
        prev=first.hash,
        relay=RELAY.public_key,
    )
    assert second.raw.hex() == RECEIPT2_HEX
    assert second.hash.hex() == RECEIPT2_HASH_HEX
    assert seal(second, RELAY.sign).hex() == SEAL2_HEX
    assert verify_seal(decode_receipt(bytes.fromhex(RECEIPT2_HEX)), bytes.fromhex(SEAL2_HEX))
    assert check_chain([first, second]) is None


# --------------------------------------------------------------------------- 10.5


def test_handshake_signatures() -> None:
    agent_message = frames.agent_auth_message(RELAY.public_key, RELAY_CHALLENGE)
    assert agent_message.hex() == AGENT_AUTH_MESSAGE_HEX
    assert len(agent_message) == 88
    assert AUTHOR.sign(agent_message).hex() == AUTH_SIG_HEX

    relay_message = frames.relay_auth_message(AUTHOR.public_key, AGENT_CHALLENGE)
    assert relay_message.hex() == RELAY_AUTH_MESSAGE_HEX
    assert RELAY.sign(relay_message).hex() == WELCOME_SIG_HEX


# --------------------------------------------------------------------------- the document


# --------------------------------------------------------------------------- 13.8

DOC_TOKEN_CLAIMS_HEX = (
    "84a56167656e74c4208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5ca3"
    "646f63a56e6f746573a3657870cf0000018bd01c5680a26e73aa64656d6f406c6f63616c"
)
DOC_TOKEN = (
    "haVhZ2VudMQgiojj3XQJ8ZX9UtstPLpdcspnCb8dlBIb83SIAbQPb1yjZG9jpW5vdGVzo2V4cM8AAAGL0BxW"
    "gKJuc6pkZW1vQGxvY2Fso3NpZ8RADYkfi0jUaiS00WdenZGW3CFlzT0GBVI-yzJMZINaZ7CBe1xgRzB1yjWN"
    "nDrFDczJcZDFI3pTdEKdqCmGzIziBg"
)
TOKEN_SECRET = "AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM"
SECRET_HASH_HEX = "648aa5c579fb30f38af744d97d6ec840c7a91277a499a0d780f3e7314eca090b"
BOUND_CLAIMS_HEX = (
    "85a56167656e74c4208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5ca3"
    "646f63a56e6f746573a3657870cf0000018bd01c5680a26e73aa64656d6f406c6f63616cab7365637265"
    "745f68617368c420648aa5c579fb30f38af744d97d6ec840c7a91277a499a0d780f3e7314eca090b"
)
BOUND_SIG_HEX = (
    "393a4857fd36f77140a8685a8b1ce32b5e96f91da32fef94f485f58ca9ee229c929f432910d646ed9763"
    "c4e87112d035d303b14138cff88bfb341780a9e05509"
)
BOUND_TOKEN = (
    "hqVhZ2VudMQgiojj3XQJ8ZX9UtstPLpdcspnCb8dlBIb83SIAbQPb1yjZG9jpW5vdGVzo2V4cM8AAAGL0BxW"
    "gKJuc6pkZW1vQGxvY2Fsq3NlY3JldF9oYXNoxCBkiqXFefsw84r3RNl9bshAx6kSd6SZoNeA8-cxTsoJC6Nz"
    "aWfEQDk6SFf9NvdxQKhoWosc4ytelvkdoy_vlPSF9Yyp7iKckp9DKRDWRu2XY8TocRLQNdMDsUE4z_iL-zQX"
    "gKngVQk"
)


def test_document_tokens() -> None:
    import hashlib

    from agent_sdk import doctoken

    exp, secret = 1700003600000, bytes([3]) * 32
    assert doctoken.mint(AUTHOR, "demo@local", "notes", exp) == DOC_TOKEN
    assert doctoken.mint(AUTHOR, "demo@local", "notes", exp, secret) == BOUND_TOKEN
    assert hashlib.sha256(secret).hexdigest() == SECRET_HASH_HEX
    claims = {"agent": AUTHOR.public_key, "doc": "notes", "exp": exp, "ns": "demo@local"}
    assert canonical(claims).hex() == DOC_TOKEN_CLAIMS_HEX
    bound = canonical({**claims, "secret_hash": bytes.fromhex(SECRET_HASH_HEX)})
    assert bound.hex() == BOUND_CLAIMS_HEX
    assert AUTHOR.sign(doctoken.DOC_TOKEN_DOMAIN + bound).hex() == BOUND_SIG_HEX
    checked = doctoken.check(BOUND_TOKEN, "demo@local", "notes", exp - 1, TOKEN_SECRET)
    assert checked.agent == AUTHOR.public_key


DOCUMENTED = [
    DOC_TOKEN_CLAIMS_HEX,
    DOC_TOKEN,
    TOKEN_SECRET,
    SECRET_HASH_HEX,
    BOUND_CLAIMS_HEX,
    BOUND_SIG_HEX,
    BOUND_TOKEN,
    KEY_ORDER_HEX,
    WORKED_EXAMPLE_HEX,
    EVENT_DOMAIN_HEX,
    SEAL_DOMAIN_HEX,
    AGENT_AUTH_DOMAIN_HEX,
    RELAY_AUTH_DOMAIN_HEX,
    AUTHOR_KEY_HEX,
    RELAY_KEY_HEX,
    EVENT_HEX,
    EVENT_ID_HEX,
    EVENT_SIGNED_HEX,
    EVENT_SIG_HEX,
    PUBLISH_FRAME_HEX,
    RECEIPT_HEX,
    RECEIPT_HASH_HEX,
    SEAL_SIGNED_HEX,
    SEAL_HEX,
    PRUNED_MESSAGE_HEX,
    PRUNED_MARK_HEX,
    EVENT2_HEX,
    EVENT2_ID_HEX,
    EVENT2_SIG_HEX,
    RECEIPT2_HEX,
    RECEIPT2_HASH_HEX,
    SEAL2_HEX,
    AGENT_AUTH_MESSAGE_HEX,
    AUTH_SIG_HEX,
    RELAY_AUTH_MESSAGE_HEX,
    WELCOME_SIG_HEX,
]


def test_document_shows_every_vector() -> None:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    missing = [value for value in DOCUMENTED if value not in text]
    assert missing == []
