"""Yjs v1 updates read as bytes: lib0 varuints, and cutting an update to size.

The relay takes updates of at most 256 KiB (``docs.MAX_UPDATE``). One transaction
can make a bigger one (a bulk import, a long paste), and so can what a replica holds
that a relay restored from an older backup lacks; pycrdt has no way to cut an update.
This module does it on the encoding (y-protocols' update format v1, as Yjs's
``readStructs`` and ``readItemContent`` read it)::

    update  = varuint clients, per client { varuint structs, varuint client,
              varuint clock, struct * structs }, delete set
    struct  = info byte; GC and Skip: varuint length; an item: its origin, its right
              origin, its parent when it has neither, and its content by info & 0x1f

A part holds a run of structs of one client, starting at a clock; only the last part
carries the delete set. An item too big for a part is cut the way Yjs splits one (as
``Item.write`` with an offset writes it): the first piece keeps its origins and
parent, each later one has the end of the piece before as its origin and the same
right origin. Only contents that are runs can be cut (values, JSON, text, text at a
character's first byte); an item of another content, or one value, over the limit
stays whole. Applied in order, one client's parts make the same document: an item's
origins were made before it, so they are in an earlier part or already known (another
client's items may wait at the receiver until that client's parts come).

This is bytes only. The SDK (``docs._within_limit``) checks the parts' state against
the update's with pycrdt before it sends any, and sends a change that cannot all be
cut whole, for the relay to refuse whole.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

GC, SKIP = 0, 10
DELETED, JSON, BINARY, STRING, EMBED, FORMAT, TYPE, ANY, DOC = range(1, 10)
NAMED_TYPES = {3, 5}
"""Type refs whose content carries a name: YXmlElement, YXmlHook."""
MAX_ANY_DEPTH = 256
"""Containers (arrays, objects) a value may nest: pycrdt decodes values recursively,
and one nested some 30,000 deep (60 KB of update) overflows its stack (see
:func:`check_shape`)."""
MAX_RUN = 256
"""Structs in a row that their client could have merged into one (see
:func:`check_shape`)."""
PART_SLACK = 32
"""Bytes a part adds to its structs: its header, and the empty delete set."""


def varuint(data: bytes, at: int) -> tuple[int, int]:
    """A lib0 varuint at ``at``: (value, where the next field starts)."""
    value = shift = 0
    while True:
        byte = data[at]  # IndexError past the end
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise ValueError("varuint longer than 64 bits")


def encode_varuint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def delete_set(data: bytes, at: int) -> list[tuple[int, int, int]]:
    """A delete set (13.1) from ``at``: (client, clock, length) per deleted range."""
    found = []
    count, at = varuint(data, at)
    for _ in range(count):
        client, at = varuint(data, at)
        ranges, at = varuint(data, at)
        for _ in range(ranges):
            clock, at = varuint(data, at)
            length, at = varuint(data, at)
            found.append((client, clock, length))
    return found


def check_shape(update: bytes) -> None:
    """Raise ValueError for an update pycrdt must not be given, from elsewhere:

    - a value nested more than :data:`MAX_ANY_DEPTH` deep. pycrdt (yrs) decodes a
      value recursively: one nested deep enough overflows the stack and kills the
      process (SIGSEGV, no exception to catch). Each level of nesting takes one
      byte 117 (array) or 118 (object): an update with no more of them than the
      bound is not read for it;
    - a run of more than :data:`MAX_RUN` structs that their client could have
      merged into one (:func:`_mergeable_runs`). pycrdt merges them as it integrates them,
      at a cost that grows with the square of the run: 4,000 values of one byte
      in a row (32 KB of update) took 390 MB, and an update of 256 KiB more than
      the machine had. Yjs and pycrdt merge such items before they encode them,
      so an update they write has runs of one;
    - bytes that do not read as v1 structs (when they had to be read).
    """
    deep = update.count(117) + update.count(118) > MAX_ANY_DEPTH
    if not deep and len(update) <= MAX_RUN * 4:  # (a struct takes 4 bytes at least)
        return
    try:
        clients = _read(update, json_extra=1)[0]  # (read as pycrdt reads it: _content)
    except (IndexError, RecursionError):
        raise ValueError("the update ends early") from None
    for client, structs in clients:
        longest = max(_mergeable_runs(client, structs), default=0)
        if longest > MAX_RUN:
            raise ValueError(
                f"{longest} structs of client {client} in a row that it could have merged"
                f" into one (at most {MAX_RUN})"
            )


def _mergeable_runs(client: int, structs: list[_Struct]) -> Iterator[int]:
    """The lengths of the runs of mergeable structs: each of the same kind as the one
    before it, that one's right neighbour when made (its origin is that one's last
    clock), and with the same right origin; as Yjs merges items. Ids are compared as
    numbers: a varuint may be written in more bytes than it needs, and reads the same."""
    run = 1
    for before, struct in itertools.pairwise(structs):
        if (
            struct.kind == before.kind
            and struct.kind not in (GC, SKIP)
            and _id(struct.origin) == (client, struct.clock - 1)
            and _id(struct.right) == _id(before.right)
        ):
            run += 1
        else:
            yield run
            run = 1
    yield run


def _id(data: bytes) -> tuple[int, int] | None:
    """An id's (client, clock), from its bytes (``b""``: none)."""
    if not data:
        return None
    client, at = varuint(data, 0)
    return client, varuint(data, at)[0]


def split(update: bytes, limit: int) -> list[bytes]:
    """``update`` as updates of at most ``limit`` bytes each where it can be cut
    (see the module; a part over ``limit`` is a struct that cannot be); ``[update]``
    when it fits. ValueError if it does not read as a v1 update."""
    if len(update) <= limit:
        return [update]
    budget = limit - PART_SLACK
    try:
        clients, delete_set = _read(update)
        parts = []
        for client, items in clients:
            pieces = [piece for item in items for piece in item.pieces(update, budget)]
            for clock, run in _runs(pieces, budget):
                header = encode_varuint(1) + encode_varuint(len(run))
                header += encode_varuint(client) + encode_varuint(clock)
                parts.append(header + b"".join(run) + b"\x00")  # (no delete set)
    except IndexError:
        raise ValueError("the update ends early") from None
    if parts and len(parts[-1]) - 1 + len(delete_set) <= limit:
        parts[-1] = parts[-1][:-1] + delete_set
    else:
        parts.append(b"\x00" + delete_set)
    return parts


def _runs(pieces: list[tuple[int, bytes]], budget: int) -> Iterator[tuple[int, list[bytes]]]:
    """Consecutive structs, ``(clock, bytes)`` each, in runs within ``budget`` bytes:
    ``(first clock, their bytes)``. A struct over it alone is a run of its own."""
    run: list[bytes] = []
    start = size = 0
    for clock, data in pieces:
        if run and size + len(data) > budget:
            yield start, run
            run, size = [], 0
        if not run:
            start = clock
        run.append(data)
        size += len(data)
    if run:
        yield start, run


@dataclass
class _Struct:
    """Where one struct is in the update: enough to copy it, or cut it."""

    client: int
    clock: int
    start: int  # its info byte
    info: int
    right: bytes  # its right origin's bytes, when it has one
    origin: bytes  # its (left) origin's bytes, when it has one
    content: int  # where its content starts
    length: int  # in clock units
    end: int

    @property
    def kind(self) -> int:
        return self.info & 0x1F

    def pieces(self, data: bytes, budget: int) -> list[tuple[int, bytes]]:
        """This struct as ``(clock, bytes)``: whole when it fits ``budget`` or cannot
        be cut, else as items of at most about ``budget`` bytes each."""
        whole = [(self.clock, data[self.start : self.end])]
        if self.end - self.start <= budget or self.kind not in (ANY, JSON, STRING):
            return whole
        first = data[self.start : self.content]  # its info, origins and parent, as they were
        # Later pieces: the piece before as origin, the same right origin, no parent.
        later = 1 + 2 * 10 + len(self.right)  # (an info byte, an id of two varuints)
        room = budget - max(len(first), later) - 10  # (and the content's count)
        pieces, offset = [], 0
        for count, body in _chunks(data, self.content, self.kind, room):
            if offset == 0:
                head = first
            else:
                origin = encode_varuint(self.client) + encode_varuint(self.clock + offset - 1)
                head = bytes([self.kind | 0x80 | (self.info & 0x60)]) + origin + self.right
            pieces.append((self.clock + offset, head + body))
            offset += count
        return pieces


def _read(update: bytes, json_extra: int = 0) -> tuple[list[tuple[int, list[_Struct]]], bytes]:
    """Each client's structs, and the delete set's bytes (``json_extra``: see
    :func:`_content`)."""
    count, at = varuint(update, 0)
    clients = []
    for _ in range(count):
        structs_count, at = varuint(update, at)
        client, at = varuint(update, at)
        clock, at = varuint(update, at)
        structs = []
        for _ in range(structs_count):
            struct = _struct(update, at, client, clock, json_extra)
            structs.append(struct)
            clock += struct.length
            at = struct.end
        clients.append((client, structs))
    return clients, update[at:]


def _struct(data: bytes, at: int, client: int, clock: int, json_extra: int = 0) -> _Struct:
    start, info = at, data[at]
    at += 1
    kind, right = info & 0x1F, b""
    if kind in (GC, SKIP):
        length, end = varuint(data, at)
        return _Struct(client, clock, start, info, right, b"", at, length, end)
    origin = b""
    if info & 0x80:  # origin: an id
        begin, at = at, _skip_id(data, at)
        origin = data[begin:at]
    if info & 0x40:  # right origin: an id
        begin, at = at, _skip_id(data, at)
        right = data[begin:at]
    if not info & 0xC0:  # neither: its parent is named
        named, at = varuint(data, at)
        at = _skip_string(data, at) if named == 1 else _skip_id(data, at)
        if info & 0x20:  # and its key within the parent
            at = _skip_string(data, at)
    length, end = _content(data, at, kind, json_extra)
    return _Struct(client, clock, start, info, right, origin, at, length, end)


def _content(data: bytes, at: int, kind: int, json_extra: int = 0) -> tuple[int, int]:
    """Skip an item's content: (its length in clock units, where it ends).

    ``json_extra`` 1 reads a JSON content as pycrdt (yrs) does: one string more than
    its count says (Yjs writes and reads ``count`` strings; yrs writes ``count - 1``
    and reads ``count + 1``). A guard that reads bytes before pycrdt does must read
    them as pycrdt will: parsed apart, the two take different bytes for structs, and
    a value hidden where the guard sees a delete set reaches pycrdt unread."""
    if kind == DELETED:
        return varuint(data, at)
    if kind == STRING:  # its length is JavaScript's: UTF-16 code units
        end = _skip_string(data, at)
        text = data[varuint(data, at)[1] : end].decode("utf-8")
        return len(text.encode("utf-16-le")) // 2, end
    if kind in (JSON, ANY):
        count, at = varuint(data, at)
        for _ in range(count + json_extra if kind == JSON else count):
            at = _skip_string(data, at) if kind == JSON else _skip_any(data, at, 0)
        return count, at
    if kind in (BINARY, EMBED):
        return 1, _skip_string(data, at)
    if kind == FORMAT:
        return 1, _skip_string(data, _skip_string(data, at))
    if kind == TYPE:
        ref, at = varuint(data, at)
        return 1, _skip_string(data, at) if ref in NAMED_TYPES else at
    if kind == DOC:
        return 1, _skip_any(data, _skip_string(data, at), 0)
    raise ValueError(f"unknown content {kind}")


def _chunks(data: bytes, at: int, kind: int, room: int) -> Iterator[tuple[int, bytes]]:
    """A run content's values in contents of at most about ``room`` bytes (one value
    over it alone): (clock units, the content's bytes) each. Values lie end to end."""
    count, at = varuint(data, at)
    if kind == STRING:  # cut by bytes, back to the start of a character
        end = at + count
        while at < end:
            cut = min(end, at + max(room, 4))
            while cut < end and data[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte
                cut -= 1
            raw = data[at:cut]
            yield len(raw.decode("utf-8").encode("utf-16-le")) // 2, encode_varuint(len(raw)) + raw
            at = cut
        return
    first, values = at, 0
    for _ in range(count):
        end = _skip_string(data, at) if kind == JSON else _skip_any(data, at, 0)
        if values and end - first > room:
            yield values, encode_varuint(values) + data[first:at]
            first, values = at, 0
        values += 1
        at = end
    if values:
        yield values, encode_varuint(values) + data[first:at]


def _skip_id(data: bytes, at: int) -> int:
    return varuint(data, varuint(data, at)[1])[1]


def _skip_string(data: bytes, at: int) -> int:
    """A varuint byte count and that many bytes (a lib0 string or buffer)."""
    size, at = varuint(data, at)
    if at + size > len(data):
        raise IndexError("past the end")
    return at + size


def _skip_any(data: bytes, at: int, depth: int) -> int:
    """A lib0 ``any`` value."""
    if depth > MAX_ANY_DEPTH:
        raise ValueError("an any value nested too deep")
    kind = data[at]
    at += 1
    if kind in (127, 126, 121, 120):  # undefined, null, false, true
        return at
    if kind == 125:  # a signed varint: bytes until one without the continuation bit
        while data[at] & 0x80:
            at += 1
        return at + 1
    if kind in (124, 123, 122):  # float32, float64, bigint64
        end = at + (4 if kind == 124 else 8)
        if end > len(data):
            raise IndexError("past the end")
        return end
    if kind in (119, 116):  # string, bytes
        return _skip_string(data, at)
    if kind == 118:  # object: key, value pairs
        count, at = varuint(data, at)
        for _ in range(count):
            at = _skip_any(data, _skip_string(data, at), depth + 1)
        return at
    if kind == 117:  # array
        count, at = varuint(data, at)
        for _ in range(count):
            at = _skip_any(data, at, depth + 1)
        return at
    raise ValueError(f"unknown any type {kind}")
