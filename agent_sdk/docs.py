"""Shared CRDT documents from an agent's side: a live ``pycrdt.Doc`` kept in sync.

``async with client.doc(ns, name) as shared:`` creates the document if needed, opens
it (y-sync: our state vector out, what we lack back, then every later update in log
order) and yields a :class:`SharedDoc`. Edit ``shared.doc`` — or the helpers
``shared.map()``, ``shared.text()``, ``shared.array()`` — as any pycrdt document:
local changes are merged while one is in flight and published as signed
``doc.update`` events. Disconnected, edits pile up locally; on reconnect the document
is opened again with our state vector, the relay sends what we missed, and we send
what it lacks. Leaving the block waits until our edits are acknowledged (durable).

The conventional roots, used by ``formicary doc``: ``fields`` (a Map), ``text`` (a
Text) and ``log`` (an Array).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import pycrdt
import trio

from agent_sdk import frames as f
from agent_sdk.errors import ErrorCode, ProtocolError, as_told, client_stopped, unwrap_single
from agent_sdk.wire import decode, decode_receipt
from agent_sdk.yupdate import split, varuint

log = logging.getLogger("formicary.sdk")

if TYPE_CHECKING:
    from agent_sdk.client import RelayClient

EMPTY_UPDATE = b"\x00\x00"
"""The update that holds nothing."""
MAX_UPDATE = 256 * 1024
"""Bytes of one update (one transaction): the relay refuses bigger (``bad_update``)."""
FLUSH_TIMEOUT = 30.0
RATE_LIMITED_TRIES = 100
"""Publishes of one update a document tries while its key is over its rate limit
(each after the wait the relay names) before the refusal fails the document."""


T = TypeVar("T")


def yjs(call: Callable[..., T], *args: Any) -> T:
    """Run a pycrdt call on bytes from elsewhere. A crafted update can make its Rust
    core panic, which reaches Python as pyo3's PanicException: a BaseException, which
    ``except Exception`` lets through to stop the program. Here it is a ValueError.
    A count that claims more entries than the bytes could hold is refused first: yrs
    reserves room for it up front (a 5-byte count asked for a gigabyte)."""
    for data in args:
        if isinstance(data, bytes) and (count := _first_count(data)) > len(data):
            raise ValueError(f"a count of {count} in {len(data)} bytes")
    try:
        return call(*args)
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        raise ValueError(f"pycrdt could not take it ({exc})") from None


def _first_count(data: bytes) -> int:
    """The varuint a Yjs update or state vector starts with (its number of entries);
    0 when it is cut short (pycrdt refuses such bytes itself)."""
    try:
        return varuint(data, 0)[0]
    except (IndexError, ValueError):
        return 0


class DocReset(Exception):
    """The document was created again under this name: this replica is of an older one."""


class SharedDoc:
    """One open document: ``doc`` (a ``pycrdt.Doc``) and ``awareness``."""

    def __init__(self, client: RelayClient, ns: str, name: str, sub: int) -> None:
        self.client = client
        self.ns = ns
        self.name = name
        self.sub = sub
        # A seeded client draws its Yjs client id too, so a simulated run repeats.
        client_id = None if client.rng is None else client.rng.getrandbits(32)
        self.doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=client_id)
        self.awareness = pycrdt.Awareness(self.doc)
        self.awareness.set_local_state(None)  # present once set_presence says so
        self.epoch: int | None = None
        self.seq = 0
        """The log position this replica has applied up to."""
        self._advanced = trio.Event()
        self._aware = trio.Event()
        self.synced = trio.Event()
        self.error: Exception | None = None
        self._applying = False
        self._outgoing: list[bytes] = []
        self._changed = trio.Event()
        self._in_flight = 0
        self._confirmed = 0
        """Our own clock (13.1) at the end of the latest part of our edits the relay
        took: a relay whose state vector is below it has lost some of them."""
        self._progress = trio.Event()  # set (and replaced) after each publish
        self._subscription = self.doc.observe(self._on_change)

    # -- the conventional shapes ---------------------------------------------------------

    def map(self, name: str = "fields") -> pycrdt.Map[Any]:
        root: pycrdt.Map[Any] = self.doc.get(name, type=pycrdt.Map)
        return root

    def text(self, name: str = "text") -> pycrdt.Text:
        root: pycrdt.Text = self.doc.get(name, type=pycrdt.Text)
        return root

    def array(self, name: str = "log") -> pycrdt.Array[Any]:
        root: pycrdt.Array[Any] = self.doc.get(name, type=pycrdt.Array)
        return root

    def to_json(self) -> dict[str, Any]:
        """The conventional roots as plain data."""
        return {
            "fields": self.map().to_py() or {},
            "text": str(self.text()),
            "log": self.array().to_py() or [],
        }

    # -- awareness -----------------------------------------------------------------------

    def set_presence(self, state: dict[str, Any]) -> None:
        """Tell the document's other replicas who we are and what we do (not stored)."""
        self.awareness.set_local_state(state)
        update = self.awareness.encode_awareness_update([self.doc.client_id])
        self.client._queue(f.encode_frame(f.DocAwareness(sub=self.sub, update=update)))

    def presence(self) -> dict[int, dict[str, Any]]:
        """Every replica's announced state, by Yjs client id (ours included)."""
        return dict(self.awareness.states)

    async def presence_changed(self) -> None:
        """Return at the next awareness update from another replica."""
        await self._aware.wait()

    # -- sending -------------------------------------------------------------------------

    def _on_change(self, event: Any) -> None:
        if self._applying:
            return  # a remote update: it came from the relay
        self._outgoing.append(event.update)
        self._changed.set()

    async def _send_forever(self) -> None:
        """Publish local changes in order, merged while one publish is in flight."""
        while True:
            await self._changed.wait()
            self._changed = trio.Event()
            if self.error is not None:
                # Failed (a reset above all: the document was created again, and
                # edits made against the old one must not land in the new, 13.4).
                return
            if not self._outgoing:
                continue
            pending, self._outgoing = self._outgoing, []
            update = pycrdt.merge_updates(*pending) if len(pending) > 1 else pending[0]
            self._in_flight += 1
            try:
                for part in _parts(update, pending):
                    if self.error is not None:
                        return  # failed (reset) between two parts: not the rest either
                    try:
                        await self._publish(self._update_body(part))
                    except ProtocolError as exc:
                        if exc.code is not ErrorCode.STALE_DOC:
                            raise
                        # Made against an incarnation the relay no longer has (it
                        # was re-sent after a reconnect, before the doc.sync saying
                        # so): a reset, whichever of the two came first.
                        self._fail(self._reset())
                        return
                    # The relay has taken our edits up to this part's end (what
                    # _lacking_parts compares with the relay's state vector).
                    reached = state_vector(pycrdt.get_state(part)).get(self.doc.client_id, 0)
                    self._confirmed = max(self._confirmed, reached)
            finally:
                self._in_flight -= 1
                self._progress.set()
                self._progress = trio.Event()

    def _update_body(self, update: bytes) -> dict[str, Any]:
        """A ``doc.update`` body naming the epoch the update was made against: the
        relay refuses it (``stale_doc``) in a document created again under this name,
        even when it is re-sent after a reconnect, before we have learnt of it."""
        body: dict[str, Any] = {"doc": self.name, "update": update}
        if self.epoch is not None:  # (always, once synced: nothing is sent before)
            body["epoch"] = self.epoch
        return body

    async def _publish(self, body: dict[str, Any]) -> None:
        """Publish one update, waiting as told while the key is over its rate: a large
        change (cut in parts, each charged by its size) may take longer than a burst."""
        await as_told(lambda: self.client.publish(self.ns, "doc.update", body), RATE_LIMITED_TRIES)

    async def flush(self) -> None:
        """Return once every local change so far is durably in the relay's log."""
        while (self._outgoing or self._in_flight) and self.error is None:
            await self._progress.wait()

    # -- receiving (called by the client) ------------------------------------------------

    def open_request(self) -> f.DocOpen:
        """What opens (or reopens) this replica: our state vector, our epoch."""
        return f.DocOpen(
            sub=self.sub, ns=self.ns, doc=self.name, sv=self.doc.get_state(), epoch=self.epoch
        )

    def _apply(self, update: bytes) -> None:
        if update == EMPTY_UPDATE:
            return
        self._applying = True
        try:
            yjs(self.doc.apply_update, update)
        except Exception as exc:
            # An update that conflicts with the document (a crafted one: the relay
            # checks only that it decodes). pycrdt keeps what it had integrated, as
            # the relay does (protocol 13.2), so the replicas still agree.
            log.warning("%s in %s: an update does not apply: %s", self.name, self.ns, exc)
        finally:
            self._applying = False

    def _on_sync(self, frame: f.DocSync) -> None:
        if frame.reset:
            self._fail(self._reset())
            return
        self.epoch = frame.epoch
        self._apply(frame.update)
        self._moved_to(frame.seq)
        state = self.awareness.get_local_state()
        if state is not None:  # (re)announce ourselves on this subscription
            # The relay told the others we left when our last subscription closed,
            # at our clock + 1; an announce at that clock would be ignored as stale.
            self.awareness.meta[self.doc.client_id]["clock"] += 1
            self.set_presence(state)  # (one more)
        try:
            lacking = yjs(self.doc.get_update, frame.sv)  # what we have, the relay lacks
        except Exception as exc:  # (a relay's bad state vector: send nothing of it)
            log.warning("%s in %s: the relay's state vector: %s", self.name, self.ns, exc)
            lacking = EMPTY_UPDATE
        if lacking != EMPTY_UPDATE:
            self._outgoing.extend(self._lacking_parts(lacking, frame.sv))
            self._changed.set()
        self.synced.set()

    def _reset(self) -> DocReset:
        return DocReset(f"{self.name} in {self.ns} was created again; reopen it")

    def _lacking_parts(self, lacking: bytes, relay_sv: bytes) -> list[bytes]:
        """What the relay lacks, as updates it takes: one if it fits (MAX_UPDATE), else
        one per client. Our own edits it lacks need nothing here when every one it ever
        confirmed is in its state: the rest are in flight (the client sends them again)
        or queued, and go as they were made, each within the limit."""
        if len(lacking) <= MAX_UPDATE:
            return [lacking]
        relay, ours = state_vector(relay_sv), state_vector(self.doc.get_state())
        parts = []
        for client, clock in ours.items():
            theirs = relay.get(client, 0)
            if clock <= theirs or (client == self.doc.client_id and theirs >= self._confirmed):
                continue
            # Everything of this client past the relay's clock, of no other client
            # (an update from a state vector; each carries the whole delete set).
            part = yjs(self.doc.get_update, _encode_state_vector({**ours, client: theirs}))
            parts.extend(_within_limit(part))
        return parts

    def _on_event(self, frame: f.EventFrame) -> None:
        body = decode(frame.event)["body"]
        self._apply(body["update"])
        self._moved_to(decode_receipt(frame.receipt).seq)

    def _moved_to(self, seq: int) -> None:
        self.seq = max(self.seq, seq)
        self._advanced.set()
        self._advanced = trio.Event()

    async def wait_seq(self, seq: int) -> None:
        """Return once this replica has applied the log up to ``seq`` (a receipt's)."""
        while self.seq < seq and self.error is None:
            await self._advanced.wait()

    def _on_awareness(self, frame: f.DocAwareness) -> None:
        try:
            self.awareness.apply_awareness_update(frame.update, "relay")
        except Exception:  # a peer's bad awareness must not stop our document
            return
        self._aware.set()
        self._aware = trio.Event()

    def _on_error(self, error: ProtocolError) -> bool:
        """The relay refused something of this subscription. True: reopen it."""
        if error.code is ErrorCode.DOC_RESYNC:
            return True  # we fell behind: reopen with our state vector, lose nothing
        if error.code in (ErrorCode.AWARENESS_REFUSED, ErrorCode.UNKNOWN_SUBSCRIPTION):
            # One presence update dropped (too fast, or sent before the relay had the
            # document open again after a reconnect); the document goes on.
            return False
        self._fail(error)
        return False

    def _fail(self, error: Exception) -> None:
        self.error = error
        self.synced.set()
        self._progress.set()
        self._advanced.set()
        self._changed.set()


def state_vector(encoded: bytes) -> dict[int, int]:
    """A Yjs state vector as ``{client id: clock}``. Its encoding lists clients in no
    fixed order, so two equal states may encode differently: compare these instead."""
    decoder = pycrdt.Decoder(encoded)
    count = decoder.read_var_uint()
    return dict((decoder.read_var_uint(), decoder.read_var_uint()) for _ in range(count))


def _encode_state_vector(clocks: dict[int, int]) -> bytes:
    encoder = pycrdt.Encoder()
    encoder.write_var_uint(len(clocks))
    for client, clock in clocks.items():
        encoder.write_var_uint(client)
        encoder.write_var_uint(clock)
    return encoder.to_bytes()


def _parts(update: bytes, pending: list[bytes]) -> list[bytes]:
    """Keep each published update within the relay's limit: a merged update that is
    too big goes as the changes it was merged from, and one of those that is still
    too big (a transaction that made many items) as runs of its items."""
    if len(update) <= MAX_UPDATE:
        return [update]
    return [part for change in pending for part in _within_limit(change)]


def _within_limit(update: bytes) -> list[bytes]:
    """``update`` cut into parts the relay takes (agent_sdk/yupdate.py), or as it is
    when it cannot all be: then the relay refuses it whole, and the document says
    why. (Some parts taken and one refused would leave half a transaction, without
    its deletions, in the log for good.)"""
    try:
        parts = split(update, MAX_UPDATE)
        if len(parts) == 1 or any(len(part) > MAX_UPDATE for part in parts):
            return [update]
        # A wrong cut that changed a struct's length is caught here, not sent.
        merged = yjs(pycrdt.merge_updates, *parts)
        if state_vector(yjs(pycrdt.get_state, merged)) != state_vector(
            yjs(pycrdt.get_state, update)
        ):
            raise ValueError("the parts do not reach the update's state")
    except ValueError as exc:
        log.warning("an update of %d bytes could not be cut to size: %s", len(update), exc)
        return [update]
    return parts


@asynccontextmanager
async def open_doc(
    client: RelayClient,
    ns: str,
    name: str,
    *,
    create: bool = True,
    flush_timeout: float = FLUSH_TIMEOUT,
) -> AsyncIterator[SharedDoc]:
    if create:  # (on a stopped client the publish raises the stop)
        try:
            # Rate limited, it waits as told, as its updates do: refused, an open
            # of a document that exists failed for nothing.
            await as_told(
                lambda: client.publish(ns, "doc.create", {"doc": name}), RATE_LIMITED_TRIES
            )
        except ProtocolError as exc:
            if exc.code is not ErrorCode.DOC_EXISTS:
                raise
    if client.stopped.is_set():  # (maybe while creating it): nothing would answer
        raise client_stopped()
    client._next_sub += 1
    shared = SharedDoc(client, ns, name, client._next_sub)
    client._docs[shared.sub] = shared
    client._queue(f.encode_frame(shared.open_request()))
    try:
        await shared.synced.wait()
        if shared.error is not None:
            raise shared.error
        with unwrap_single():  # the block's own error, or the relay's, comes out as is
            async with trio.open_nursery() as nursery:
                nursery.start_soon(shared._send_forever)
                try:
                    yield shared
                    with trio.move_on_after(flush_timeout) as waiting:
                        await shared.flush()
                    if waiting.cancelled_caught:
                        raise TimeoutError(f"{name}: edits not confirmed in {flush_timeout} s")
                finally:
                    nursery.cancel_scope.cancel()
        if shared.error is not None:
            raise shared.error
    finally:
        shared.doc.unobserve(shared._subscription)
        if client._docs.pop(shared.sub, None) is not None:
            client._queue(f.encode_frame(f.Unsubscribe(sub=shared.sub)))
