"""Cutting Yjs updates to size (agent_sdk/yupdate.py), checked against pycrdt itself:
the parts, applied in order to an empty document, make the same document."""

from __future__ import annotations

import random
from typing import Any

import pycrdt
import pytest

from agent_sdk.docs import state_vector
from agent_sdk.yupdate import encode_varuint, split, varuint


def random_doc(seed: int) -> pycrdt.Doc[Any]:
    """A document of one client with every kind of content the SDK's shapes make:
    text (formatted, deleted, non-ASCII), maps of any values, arrays, nested types."""
    rng = random.Random(seed)
    doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=rng.randrange(1, 2**31))
    text, fields = doc.get("text", type=pycrdt.Text), doc.get("fields", type=pycrdt.Map)
    items, notes = doc.get("log", type=pycrdt.Array), doc.get("notes", type=pycrdt.Text)
    values = [1, 2.5, None, True, "s", [1, {"a": [None, 3]}], {"x": b"bytes"}, 2**40, -7]
    for _ in range(rng.randrange(50, 300)):
        with doc.transaction():
            choice = rng.random()
            if choice < 0.3:
                text.insert(rng.randrange(len(text) + 1), "abc" * rng.randrange(1, 30))
                notes.insert(0, rng.choice(["héllo", "\u4e2d", "😀x", "plain"]))
            elif choice < 0.4 and len(text) > 3:
                start = rng.randrange(len(text) - 2)
                del text[start : start + 2]
            elif choice < 0.6:
                fields[f"k{rng.randrange(20)}"] = rng.choice(values)
            elif choice < 0.8:
                items.append(rng.choice(["v" * rng.randrange(1, 200), 7, {"n": 1}]))
            elif choice < 0.85:
                items.append(pycrdt.Map({"inner": "y"}))
            elif choice < 0.9 and len(text):
                text.format(0, min(3, len(text)), {"bold": True})
            elif len(items) > 2:
                del items[0]
    return doc


@pytest.mark.parametrize("seed", range(40))
def test_the_parts_make_the_same_document(seed: int) -> None:
    update = random_doc(seed).get_update()
    limit = max(200, len(update) // random.Random(seed).randrange(2, 9))
    parts = split(update, limit)
    assert len(parts) > 1
    assert all(len(part) <= limit for part in parts)
    rebuilt: pycrdt.Doc[Any] = pycrdt.Doc()
    for part in parts:
        rebuilt.apply_update(part)
    whole: pycrdt.Doc[Any] = pycrdt.Doc()
    whole.apply_update(update)
    assert same(rebuilt, whole)


def same(one: pycrdt.Doc[Any], other: pycrdt.Doc[Any]) -> bool:
    """The same state and content: every root of random_doc, text with its format,
    and the delete set. (Not the same encoding: Yjs does not join the pieces of a cut
    item again.)"""

    def seen(doc: pycrdt.Doc[Any]) -> tuple[Any, ...]:
        return (
            state_vector(doc.get_state()),
            doc.get_update(doc.get_state()),  # nothing but the delete set (one client)
            doc.get("text", type=pycrdt.Text).diff(),
            str(doc.get("notes", type=pycrdt.Text)),
            doc.get("fields", type=pycrdt.Map).to_py(),
            doc.get("log", type=pycrdt.Array).to_py(),
        )

    return seen(one) == seen(other)


def test_an_update_that_fits_is_left_as_it_is() -> None:
    update = random_doc(1).get_update()
    assert split(update, len(update)) == [update]


@pytest.mark.parametrize("text", ["x" * 5000, "é😀中x" * 900], ids=["ascii", "beyond the BMP"])
def test_one_long_text_or_many_values_are_cut_within_their_item(text: str) -> None:
    doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=9)
    items = doc.get("log", type=pycrdt.Array)
    items.append("small")
    doc.get("text", type=pycrdt.Text).insert(0, text)  # one insert: one item
    items.extend([{"n": n, "pad": "p" * 20} for n in range(300)])  # one item of 300
    update = doc.get_update()
    parts = split(update, 1000)
    assert len(parts) > 10 and all(len(part) <= 1000 for part in parts)
    rebuilt: pycrdt.Doc[Any] = pycrdt.Doc()
    for part in parts:
        rebuilt.apply_update(part)
    assert str(rebuilt.get("text", type=pycrdt.Text)) == text
    assert rebuilt.get("log", type=pycrdt.Array).to_py() == items.to_py()


def test_one_value_over_the_limit_stays_whole() -> None:
    doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=9)
    items = doc.get("log", type=pycrdt.Array)
    items.extend(["a", "b" * 5000, "c"])  # one item; its middle value cannot be cut
    parts = split(doc.get_update(), 1000)
    assert [len(part) > 1000 for part in parts].count(True) == 1
    rebuilt: pycrdt.Doc[Any] = pycrdt.Doc()
    for part in parts:
        rebuilt.apply_update(part)
    assert rebuilt.get("log", type=pycrdt.Array).to_py() == ["a", "b" * 5000, "c"]


def test_bytes_that_are_not_an_update_are_refused() -> None:
    good = random_doc(2).get_update()
    for bad in (good[: len(good) // 2], b"\x01\x05\x01\x00" + bytes([31]) * 40):
        with pytest.raises(ValueError):
            split(bad, 10)


def test_varuints_round_trip() -> None:
    for value in (0, 1, 127, 128, 300, 2**32, 2**63 - 1):
        encoded = encode_varuint(value)
        assert varuint(encoded, 0) == (value, len(encoded))


def test_a_long_root_name_still_leaves_every_part_within_the_limit() -> None:
    doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=9)
    named = doc.get("r" * 1000, type=pycrdt.Array)  # the first piece keeps this name
    named.extend([f"{n:05}" + "v" * 100 for n in range(3000)])
    doc.get("t" * 1000, type=pycrdt.Text).insert(0, "é" * 100_000)
    parts = split(doc.get_update(), 4096)
    assert all(len(part) <= 4096 for part in parts)
    rebuilt: pycrdt.Doc[Any] = pycrdt.Doc()
    for part in parts:
        rebuilt.apply_update(part)
    assert rebuilt.get("r" * 1000, type=pycrdt.Array).to_py() == named.to_py()
    assert str(rebuilt.get("t" * 1000, type=pycrdt.Text)) == "é" * 100_000


def test_a_change_that_cannot_all_be_cut_goes_whole() -> None:
    """One part over the limit and the others taken would leave half a transaction
    (without its deletions, which travel last) in the log for good: the SDK sends it
    whole, for the relay to refuse whole."""
    from agent_sdk.docs import MAX_UPDATE, _within_limit

    doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=9)
    text = doc.get("text", type=pycrdt.Text)
    text.insert(0, "old text")
    base = doc.get_state()
    with doc.transaction():
        del text[0:8]
        text.insert(0, "n" * 400_000)  # can be cut
        doc.get("fields", type=pycrdt.Map)["big"] = "B" * 300_000  # one value: cannot
    change = doc.get_update(base)
    assert any(len(part) > MAX_UPDATE for part in split(change, MAX_UPDATE))
    assert _within_limit(change) == [change]
    after = doc.get_state()
    text.insert(0, "m" * 400_000)  # this one can all be cut
    assert len(_within_limit(doc.get_update(after))) > 1
