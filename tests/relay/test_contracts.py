"""Semantic contracts over real sockets: registered kinds are checked on publish with
the failing paths named; versions are added by the kind's owner only; bad schemas are
refused; the SDK checks locally the same way."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from agent_sdk.client import RelayClient
from agent_sdk.contracts import Contracts
from agent_sdk.errors import ErrorCode
from agent_sdk.schemas import SchemaError, check_schema, errors
from tests.conftest import RunningRelay, identity, start_relay
from tests.refusals import refused

NS = "shop@local"
ORDER_V1 = {
    "type": "object",
    "required": ["sku", "qty"],
    "additionalProperties": False,
    "properties": {
        "sku": {"type": "string", "minLength": 1},
        "qty": {"type": "integer", "minimum": 1},
        "lines": {"type": "array", "items": {"type": "object", "required": ["price"],
                  "properties": {"price": {"type": "integer"}}}},
    },
}  # fmt: skip


async def test_bodies_of_a_registered_kind_are_checked_with_paths(relay: RunningRelay) -> None:
    async with (
        RelayClient.connect(relay.url, identity(1)) as owner,
        RelayClient.connect(relay.url, identity(2)) as other,
    ):
        await Contracts(owner, NS).register("app.order", 1, ORDER_V1)
        await other.publish(NS, "app.order", {"sku": "a-1", "qty": 2})
        head = relay.node.head(NS)
        error = await refused(
            ErrorCode.SCHEMA_MISMATCH,
            other.publish(
                NS, "app.order", {"sku": "a-1", "qty": "two", "lines": [{"price": 1}, {}]}
            ),
        )
        assert "$.qty: expected integer, got string" in error.reason
        assert "$.lines[1].price: required" in error.reason
        for body, path in (
            ({"sku": "a-1"}, "$.qty: required"),
            ({"sku": "", "qty": 1}, "$.sku: shorter than 1"),
            ({"sku": "a", "qty": 0}, "$.qty: below 1"),
            ({"sku": "a", "qty": 1, "note": "x"}, "$.note: not allowed here"),
            ("an order", "$: expected object, got string"),
        ):
            error = await refused(ErrorCode.SCHEMA_MISMATCH, other.publish(NS, "app.order", body))
            assert path in error.reason
        assert relay.node.head(NS) == head  # nothing refused was sequenced

        # Version 2: by the owner only, saying whether it is compatible.
        v2 = {**ORDER_V1, "properties": {**ORDER_V1["properties"], "note": {"type": "string"}}}
        theirs = Contracts(other, NS).register("app.order", 2, v2, compatible=True)
        error = await refused(ErrorCode.FORBIDDEN, theirs)
        assert identity(1).public_key.hex() in error.reason
        await refused(ErrorCode.BAD_EVENT, Contracts(owner, NS).register("app.order", 2, v2))
        await refused(
            ErrorCode.BAD_EVENT, Contracts(owner, NS).register("app.order", 3, v2, compatible=True)
        )
        await Contracts(owner, NS).register("app.order", 2, v2, compatible=True)
        await other.publish(NS, "app.order", {"sku": "a", "qty": 1, "note": "gift"})  # latest
        old = {"$schema": 1, "sku": "a", "qty": 1, "note": "gift"}
        error = await refused(ErrorCode.SCHEMA_MISMATCH, other.publish(NS, "app.order", old))
        assert "app.order v1: $.note: not allowed here" in error.reason
        missing = {"$schema": 9, "sku": "a", "qty": 1}
        await refused(ErrorCode.SCHEMA_MISMATCH, other.publish(NS, "app.order", missing))
        for named in (0, -1, True, 1.0, "2"):  # "$schema" is the integer of a version
            wrong = {"$schema": named, "sku": "a", "qty": 1}
            error = await refused(ErrorCode.SCHEMA_MISMATCH, other.publish(NS, "app.order", wrong))
            assert "has versions 1 to 2" in error.reason
        # The version named is checked without the "$schema" field itself (v2 takes
        # no other field).
        await other.publish(NS, "app.order", {"$schema": 2, "sku": "a", "qty": 1})
        # A version other than the next is bad_event, the owner's own again too.
        await refused(ErrorCode.BAD_EVENT, Contracts(owner, NS).register("app.order", 1, ORDER_V1))
        again = Contracts(owner, NS).register("app.order", 2, v2, compatible=True)
        await refused(ErrorCode.BAD_EVENT, again)

        # The registry, and the same check before sending.
        sdk = Contracts(other, NS)
        assert await sdk.kinds() == [{"kind": "app.order", "versions": 2}]
        versions = await sdk.fetch("app.order")
        assert [v["compatible"] for v in versions] == [False, True]
        assert sdk.check("app.order", {"sku": "a", "qty": "x"}) == [
            "$.qty: expected integer, got string"
        ]
        assert sdk.check("app.order", {"sku": "a", "qty": 1}) == []
        gift = {"sku": "a", "qty": 1, "note": "gift"}
        assert sdk.check("app.order", gift) == []  # the latest version, 2
        assert sdk.check("app.order", gift, version=1) == ["$.note: not allowed here"]
        # A body naming its version in "$schema" is checked as the relay checks it:
        # against that version, without the field itself, and refused when it names
        # a version that is not registered.
        assert sdk.check("app.order", {"$schema": 2, "sku": "a", "qty": 1}) == []
        assert sdk.check("app.order", old) == ["$.note: not allowed here"]
        assert sdk.check("app.order", missing) == ["app.order has versions 1 to 2, not 9"]
        for version in (0, 3):
            assert sdk.check("app.order", gift, version=version) == [
                f"app.order has versions 1 to 2, not {version}"
            ]


async def test_schemas_that_do_not_parse_are_refused(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        contracts = Contracts(client, NS)
        for kind, version, schema, why in (
            ("app.x", 1, {"type": "money"}, "$.type"),
            ("app.x", 1, {"properties": {"a": {"oneOf": []}}}, "unknown keyword 'oneOf'"),
            ("app.x", 1, {"required": "a"}, "$.required"),
            ("app.x", 1, [], "a schema is a map"),
            ("app.x", 2, {}, "register 1"),
            ("wo.create", 1, {}, "the relay's own"),
            ("Not A Kind", 1, {}, "an event kind"),
        ):
            error = await refused(ErrorCode.BAD_EVENT, contracts.register(kind, version, schema))
            assert why in error.reason, error.reason
        assert relay.node.head(NS) == 0
        await refused(ErrorCode.NOT_FOUND, contracts.fetch("app.x"))


RESERVED_FAMILIES = (
    "wo", "lease", "lock", "context", "bulletin", "decision", "ckpt", "ctx", "auction", "dir",
    "rep", "doc", "dm", "ns", "constraint", "entity", "schema", "conflict", "route",
)  # fmt: skip
"""The reserved families, as protocol.md section 3.1 lists them."""


async def test_no_kind_of_a_reserved_family_is_registered(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, identity(1)) as client:
        contracts = Contracts(client, NS)
        for family in RESERVED_FAMILIES:
            error = await refused(ErrorCode.BAD_EVENT, contracts.register(f"{family}.x", 1, {}))
            assert f"the {family} family is the relay's own" in error.reason
        assert relay.node.head(NS) == 0
        await contracts.register("wox.x", 1, {})  # a family that only starts like one


async def test_contracts_survive_a_restart(nursery: trio.Nursery, tmp_path: Path) -> None:
    data = tmp_path / "relay"
    running = await start_relay(nursery, data)
    async with RelayClient.connect(running.url, identity(1)) as client:
        await Contracts(client, NS).register("app.order", 1, ORDER_V1)
    running.scope.cancel()
    running = await start_relay(nursery, data)
    async with RelayClient.connect(running.url, identity(2)) as client:
        await refused(ErrorCode.SCHEMA_MISMATCH, client.publish(NS, "app.order", {"qty": 1}))
    running.scope.cancel()


def test_the_schema_language_on_its_own() -> None:
    check_schema({"type": ["integer", "null"], "enum": [1, 2, None]})
    with pytest.raises(SchemaError, match=r"\$\.items\.type"):
        check_schema({"items": {"type": "float"}})
    schema = {"type": "array", "maxItems": 2, "items": {"type": "bytes", "maxLength": 2}}
    assert errors(schema, [b"ab", b"abc", b"x"]) == [
        "$: more than 2 items", "$[1]: longer than 2",
    ]  # fmt: skip
    assert errors({"type": "number"}, 3) == []  # an integer is a number
    assert errors({"enum": ["a"]}, "b") == ["$: not one of the allowed values"]


@pytest.mark.parametrize(
    ("allowed", "value"),
    [([1], True), ([1], 1.0), ([False], 0), ([0.0], 0), ([[1, True]], [True, 1])],
)
def test_enum_values_are_compared_by_their_canonical_bytes(allowed: list, value: object) -> None:
    """Not by Python's ``==`` (``True == 1 == 1.0``): another implementation would
    refuse these, and a body must be sequenced by one relay only if by every one."""
    assert errors({"enum": allowed}, value) == ["$: not one of the allowed values"]
    assert errors({"enum": [*allowed, value]}, value) == []
