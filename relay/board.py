"""The oversight board: a web page on the relay's own port, for people.

``GET /`` serves the page (plain HTML, CSS and JavaScript shipped in
``relay/board_static``: no build step, no CDN). The page talks to the relay over one
WebSocket, ``/board/ws``, in JSON text messages:

* relay -> page, first: ``{"t": "hello", "relay", "key", "challenge"}``.
* ``{"t": "auth", "key", "sig"}``: sign in; ``sig`` is Ed25519 by ``key`` over
  ``BOARD_AUTH_DOMAIN + relay key + challenge`` (hex fields; the relay's key, as in
  an agent's ``auth``, so that a page of another relay cannot pass on a sign-in it
  asked for as one here). Without it the board is
  read-only and anonymous: it shows only namespaces that are not private.
* ``{"t": "namespaces"}`` -> ``{"t": "namespaces", "items": [{ns, head, mode}]}``.
* ``{"t": "watch", "ns", "status"?, "after"?}`` -> a ``state`` message now and again
  after every change of the namespace (at most every ``WATCH_INTERVAL``); one watch
  per connection, a new one replaces it.
* ``{"t": "publish", "rid", "event", "sig"}`` (base64): a signed event like any
  other, checked like any other (signature, canonical form, rate limits, the
  namespace's policy) -> ``{"t": "ack", "rid", "seq", "outcome"?, "problem"?,
  "reason"?}`` or ``{"t": "error", "rid", "code", "name", "reason"}``.

A board is a reader like any other: what it shows follows the namespace's read
policy for the key it signed in with. Its memory is bounded: one watch, snapshots
built from the bounded query answers, and the per-address connection cap.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import trio
from websockets.exceptions import ConnectionClosed
from websockets.trio.server import ServerConnection

from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.wire import MAX_DEPTH, decode_event, to_json_safe, verify_signature
from relay.coordination import queries
from relay.coordination.directory import joins_by_connection
from relay.coordination.requests import Coordinator
from relay.limits import publish_cost
from relay.node import RelayNode
from relay.store import Record

log = logging.getLogger("formicary.board")

STATIC = Path(__file__).with_name("board_static")
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/board/board.js": ("board.js", "text/javascript; charset=utf-8"),
    "/board/board.css": ("board.css", "text/css; charset=utf-8"),
    "/board/wire.js": ("wire.js", "text/javascript; charset=utf-8"),
}
"""Every file the board serves: nothing else under its paths is readable."""
SOCKET = "/board/ws"
BOARD_AUTH_DOMAIN = b"formicary/v1/board-auth\x00"
WATCH_INTERVAL = 0.2
"""Seconds between two snapshots of a busy namespace: a board need not see each event."""
RECENT = 30
"""Events shown in the recent list."""
EVENT_SHOWN = 16 * 1024
"""Bytes of an event the board sends with it, at most: 30 events near max_frame would
make every snapshot tens of megabytes."""
MAX_MESSAGE = 64 << 10
PUBLISHING = 8
"""Publishes of one board waiting for their answers; the next waits for room."""
PAGE = 100
"""Orders per status column and page."""
COLUMNS = ("open", "claimed", "awaiting_approval", "blocked", "done")


def static_file(path: str) -> tuple[bytes, str] | None:
    """The bytes and content type of a board file, or ``None``."""
    found = FILES.get(path)
    if found is None:
        return None
    name, content_type = found
    return (STATIC / name).read_bytes(), content_type


def board_auth_message(relay_key: bytes, challenge: bytes) -> bytes:
    """What a person's key signs to sign in to the board of the relay ``relay_key``."""
    return BOARD_AUTH_DOMAIN + relay_key + challenge


class Board:
    """One board connection: its key (once signed in) and its watch."""

    def __init__(self, node: RelayNode, ws: ServerConnection) -> None:
        self.node = node
        self.ws = ws
        self.key: bytes | None = None
        self.challenge = secrets.token_bytes(32)
        self._watch: trio.CancelScope | None = None
        self._send_lock = trio.Lock()
        self._publishing = trio.Semaphore(PUBLISHING)
        self._refused_in_a_row = 0

    async def run(self) -> None:
        hello = {
            "t": "hello",
            "relay": self.node.config.name,
            "key": self.node.identity.public_key.hex(),
            "challenge": self.challenge.hex(),
        }
        try:
            await self._send(hello)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                while True:
                    message = await self.ws.recv()
                    await self._handle(message)
        except* ConnectionClosed:
            pass  # the page went away: its watch and answers go with it

    async def _send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.ws.send(json.dumps(message, separators=(",", ":")))

    async def _handle(self, message: str | bytes) -> None:
        try:
            if isinstance(message, bytes) or len(message) > MAX_MESSAGE:
                raise ProtocolError(ErrorCode.MALFORMED, "board messages are JSON text")
            try:
                request = json.loads(message)
            except (ValueError, RecursionError):  # (deep nesting is not JSON we take)
                raise ProtocolError(ErrorCode.MALFORMED, "not JSON") from None
            if not isinstance(request, dict) or not isinstance(request.get("t"), str):
                raise ProtocolError(ErrorCode.MALFORMED, "a message is an object with a t")
            kind = request["t"]
            if kind == "auth":
                await self._auth(request)
            elif kind == "namespaces":
                await self._send({"t": "namespaces", "items": self._namespaces()})
            elif kind == "watch":
                self._start_watch(request)
            elif kind == "publish":
                await self._publishing.acquire()  # (reading waits: no pile of tasks)
                self._nursery.start_soon(self._publish, request)
            else:
                raise ProtocolError(ErrorCode.UNKNOWN_FRAME, f"no message {kind!r}")
        except ProtocolError as exc:
            await self._send(_error(exc))

    # -- signing in -------------------------------------------------------------------

    async def _auth(self, request: dict[str, Any]) -> None:
        key, sig = _hex(request, "key", 32), _hex(request, "sig", 64)
        proof = board_auth_message(self.node.identity.public_key, self.challenge)
        if not verify_signature(key, sig, proof):
            raise ProtocolError(ErrorCode.AUTH_FAILED, "the signature does not verify")
        self.key = key
        await self._send({"t": "authed", "key": key.hex()})

    # -- reading ----------------------------------------------------------------------

    def _namespaces(self) -> list[dict[str, Any]]:
        node, items = self.node, []
        for ns in node.namespaces() + sorted(node.mirror_heads):
            if not node.access.may_read(ns, self.key):
                continue
            policy = node.access.policies.get(ns)
            mode = str(policy.mode) if policy else "public"
            items.append({"ns": ns, "head": node.head(ns), "mode": mode})
        return items

    def _start_watch(self, request: dict[str, Any]) -> None:
        ns = request.get("ns")
        if not isinstance(ns, str):
            raise ProtocolError(ErrorCode.MALFORMED, "watch needs an ns")
        self.node.access.check_read(ns, self.key)
        pages = request.get("after", {})
        if not isinstance(pages, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in pages.values()
        ):
            raise ProtocolError(ErrorCode.MALFORMED, "after maps a status to an order number")
        # Only the columns' pages: other keys would only make snapshots no board shares.
        pages = {status: n for status, n in pages.items() if status in COLUMNS}
        if self._watch is not None:
            self._watch.cancel()
        self._watch = trio.CancelScope()
        self._nursery.start_soon(self._watching, self._watch, ns, pages)

    async def _watching(self, scope: trio.CancelScope, ns: str, pages: dict[str, int]) -> None:
        with scope:
            seen = -1
            while True:
                try:
                    self.node.access.check_read(ns, self.key)  # a policy may change
                    state = await self.snapshot(ns, pages)
                except ProtocolError as exc:
                    await self._send(_error(exc))
                    return
                except Exception:  # our bug: say so, and keep the connection
                    log.exception("board snapshot of %s failed", ns)
                    failed = ProtocolError(ErrorCode.INTERNAL, "the board could not read it")
                    await self._send(_error(failed))
                    return
                seen = state["head"]
                await self._send(state)
                await trio.sleep(WATCH_INTERVAL)
                await self.node.wait_beyond(ns, seen)

    async def snapshot(self, ns: str, pages: dict[str, int]) -> dict[str, Any]:
        """What the board shows of ``ns`` now (every part bounded). Boards watching
        the same page of a namespace share one snapshot per head and second: many
        boards on a big ledger cost the relay one build, not one each."""
        node = self.node
        now = node.wall_ms()
        shared = _SNAPSHOTS.setdefault(node, OrderedDict())
        key = (ns, node.head(ns), tuple(sorted(pages.items())), now // 1000)
        cached = shared.get(key)
        if cached is not None:
            return cached
        state = await self._build(ns, pages, now)
        shared[key] = state
        while len(shared) > SHARED_SNAPSHOTS:
            shared.popitem(last=False)
        return state

    async def _build(self, ns: str, pages: dict[str, int], now: int) -> dict[str, Any]:
        node = self.node
        coordinator = node.coordination.coordinators.get(ns) or Coordinator()
        budget = 256 << 10

        def ask(q: str, args: dict[str, Any]) -> Any:
            return queries.answer(coordinator, q, args, now, budget)

        columns = {}
        for status in COLUMNS:
            args = {"status": status, "limit": PAGE, "after": pages.get(status, 0)}
            answer = ask("wo.list", args)
            columns[status] = {"orders": answer["orders"], "more": answer["more"]}
        counts: dict[str, int] = dict.fromkeys(COLUMNS, 0)
        for order in coordinator.ledger.orders.values():
            current = coordinator.ledger.status(order.id, now)
            if current is not None:
                counts[current.value] = counts.get(current.value, 0) + 1
        auctions = []
        for item in ask("auction.list", {"phase": "open", "limit": 20})["auctions"]:
            auctions.append(ask("auction.show", {"auction": item["auction"]}))
        conflicts = [  # at the human step: the approval queue's, with their decisions
            ask("conflict.show", {"conflict": item["conflict"]})
            for item in ask("conflict.list", {"status": "open", "step": "human", "limit": 50})[
                "conflicts"
            ]
        ]
        head = node.head(ns)
        recent = await node.read(ns, max(1, head - RECENT + 1), RECENT) if head else []
        federation = node.federation.info() if node.federation else None
        state: dict[str, Any] = to_json_safe(
            {
                "t": "state",
                "ns": ns,
                "head": head,
                "now_ms": now,
                "columns": columns,
                "counts": counts,
                "approvals": ask("wo.list", {"status": "awaiting_approval", "limit": 200})[
                    "orders"
                ],
                "conflicts": conflicts,
                "agents": ask("dir.list", {"online": True, "limit": 200})["participants"],
                "auctions": auctions,
                "documents": sorted(name for (n, name) in node.docs.created if n == ns),
                "events": [_recent(r) for r in reversed(recent)],
                "federation": federation,
                "counters": {
                    "connections": node.metrics.open_connections,
                    "published": node.stats["published"],
                    "rejected": node.stats["rejected"],
                    "parked": node.sequencer.parked_count,
                },
            }
        )
        return state

    # -- acting -----------------------------------------------------------------------

    async def _publish(self, request: dict[str, Any]) -> None:
        try:
            await self._publish_one(request)
        finally:
            self._publishing.release()

    async def _publish_one(self, request: dict[str, Any]) -> None:
        rid = request.get("rid")
        try:
            if not isinstance(rid, int) or isinstance(rid, bool):
                raise ProtocolError(ErrorCode.MALFORMED, "publish needs an integer rid")
            if self.key is None:
                raise ProtocolError(ErrorCode.NOT_AUTHENTICATED, "sign in to act")
            # Charged first, as agent connections are: a refusal costs no decoding.
            try:
                size = len(str(request.get("event", ""))) * 3 // 4  # (base64)
                cost = publish_cost(size)
                self.node.limiter.check(self.key, "publish", trio.current_time(), cost)
            except ProtocolError:
                self.node.metrics.rate_limited["publish"] += 1
                raise
            raw, sig = _b64(request, "event"), _b64(request, "sig")
            signed = decode_event(raw, sig, max_deps=self.node.config.max_deps, max_depth=MAX_DEPTH)
            if signed.event.author != self.key:
                # Else anyone could replay others' events here, against their budget.
                raise ProtocolError(ErrorCode.WRONG_AUTHOR, "the author is not the signed-in key")
            if not signed.verify():
                raise ProtocolError(ErrorCode.BAD_SIGNATURE, "the signature does not verify")
            if not self.node.is_home(signed.event.ns):
                reason = "the board acts on namespaces this relay homes; use that relay's board"
                raise ProtocolError(ErrorCode.NOT_HOME, reason)
            if joins_by_connection(signed.event.kind, signed.event.body):
                # Presence by connection belongs to an agent connection, which ends it
                # when it closes; a board has none to hold it (protocol 8.11).
                reason = "from the board, join with heartbeat_ms (no agent connection holds it)"
                raise ProtocolError(ErrorCode.BAD_EVENT, reason)
            ticket = await self.node.admit(signed)
            record = await self.node.answer(ticket)
            ack: dict[str, Any] = {"t": "ack", "rid": rid, "seq": record.seq}
            located = self.node.outcome_of(signed.id)
            if located is not None:
                outcome = await self.node.committed_record(located.ns, located.seq)
                body = decode_event(outcome.event, outcome.sig).event.body
                ack["outcome"] = outcome.kind
                if isinstance(body, dict) and "problem" in body:
                    ack["problem"], ack["reason"] = body["problem"], body.get("reason", "")
            await self._send(ack)
        except ProtocolError as exc:
            await self._send(_error(exc, rid=rid if isinstance(rid, int) else None))


SHARED_SNAPSHOTS = 32
_SNAPSHOTS: weakref.WeakKeyDictionary[RelayNode, OrderedDict[tuple[Any, ...], dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)


def _error(exc: ProtocolError, *, rid: int | None = None) -> dict[str, Any]:
    error = {"t": "error", "code": int(exc.code), "name": exc.code.slug, "reason": exc.reason}
    if rid is not None:
        error["rid"] = rid
    return error


def _hex(request: dict[str, Any], name: str, size: int) -> bytes:
    value = request.get(name)
    try:
        data = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        data = b""
    if len(data) != size:
        raise ProtocolError(ErrorCode.MALFORMED, f"{name} is {size} bytes in hex")
    return data


def _b64(request: dict[str, Any], name: str) -> bytes:
    value = request.get(name)
    try:
        return base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except ValueError:
        raise ProtocolError(ErrorCode.MALFORMED, f"{name} is base64") from None


async def serve_board(node: RelayNode, ws: ServerConnection) -> None:
    await Board(node, ws).run()


def _recent(r: Record) -> dict[str, Any]:
    """A row of the recent events. The page checks each signature itself (WebCrypto);
    a large event's bytes are left out, as a compacted one's are gone."""
    shown = 0 < len(r.event) <= EVENT_SHOWN  # (a mirror keeps a mark as a pruned sig)
    return {
        "seq": r.seq,
        "kind": r.kind,
        "author": r.author,
        "hlc": r.hlc,
        "sealed": r.seal is not None,
        "size": len(r.event),
        "event": base64.b64encode(r.event).decode() if shown else "",
        "sig": base64.b64encode(r.sig).decode() if shown else "",
    }
