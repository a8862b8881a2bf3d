"""Federation: many relays acting as one network, each namespace sequenced at its home.

Theory of operation
-------------------
A namespace ``name@home`` has exactly one sequencer, the relay called ``home``. Every
other relay only *routes*: a write (a publish, a coordination request, a query, a
document update) is forwarded over a :class:`~federation.link.Link` to the home and
the home's answer — its receipt, its outcome — comes back to the agent unchanged; a
read of the log (a subscription) is served from a local :class:`Mirror` that follows
the home's log by cursor and stores it verbatim after checking it
(:mod:`federation.chain`). Nothing foreign is ever re-sequenced, so a receipt means
the same thing wherever it is read, and a lying relay is caught by anyone holding
the home's key.

Routes are at most two links long and cannot loop, by construction: an agent's own
relay forwards to the home directly, or to a direct peer configured as the way
there (``c=via:b``); a relay that receives a write *from a peer* forwards it only
over its own direct link to the home, never to a third relay and never back to the
sender. No relay forwards what it got from a peer to a relay that is not the home,
so a write crosses at most one intermediate relay.

Cross-relay causality: an event may depend on events of any namespace. Its home
sequences it only once every dependency is in its store — its own log or a mirror
— so a dependency on a foreign event parks the event (§6.3) until the mirror of
that event's namespace has stored it. The frontier is per foreign namespace the
mirrored head seq; a dependency ``d`` of namespace ``n`` is satisfied once
``head(n) >= seq(d)``. To know ``n`` and ``seq(d)`` the relay uses what it saw:
the receipts of writes it forwarded (and the outcomes they carried) are kept as
hints, and a parked event with a hinted dependency starts (or extends) the mirror
of its namespace up to that seq. A dependency the relay never saw — neither
forwarded nor mirrored — is not looked for: it parks until ``park_timeout``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any

import trio

from agent_sdk import frames as f
from agent_sdk.client import Asked, RelayClient
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.wire import NS_RE, SignedEvent, verify_seal
from federation.chain import Forged, MirrorChain
from federation.link import Link
from federation.outbox import RETRY_CODES, Entry, Outbox, OutboxStore, store_call
from federation.peers import Peer, check_peers, home_of
from relay.coordination.directory import joins_by_connection
from relay.node import RelayNode
from relay.store import MAX_UNSEALED, MAX_UNSEALED_BYTES, Record, unsealed_bytes

log = logging.getLogger("formicary.federation")

MIRROR_LINGER = 30.0
"""Seconds a mirror nobody holds keeps following, in case a subscriber comes back."""
FORBIDDEN_RETRY = 10.0
"""Seconds a mirror waits before asking again a home that refused it (forbidden)."""
TAP_BUFFER = 2 * MAX_UNSEALED
"""Frames a mirror or a proxied document takes before it must catch up from a cursor.
Twice :data:`MAX_UNSEALED`, as :data:`TAP_BYTES` is twice the bytes: what a full tap
of a mirror holds always reaches a seal of an honest home (4.4), so each time it
starts again from its stored head, a mirror that falls behind stores something, and
it catches up. (At 8192, a home whose ``commit_batch`` was set above that could make
runs longer than a tap, which a mirror behind it dropped and fetched for ever.)"""
DOC_TAP_BUFFER = 8192
"""Frames a proxied document takes before it must reopen (``doc_resync``): the seal
argument above is a mirror's, and one is open per agent's proxied document, so its
count of small frames, whose Python objects TAP_BYTES does not count, stays lower."""
TAP_BYTES = 2 * MAX_UNSEALED_BYTES
"""Bytes of frames (see :func:`_frame_bytes`) a mirror or a proxied document takes
before it must catch up from a cursor, as for :data:`TAP_BUFFER`. A frame is up to a
link message (4 ``max_frame``), so the count alone let a peer make us hold thousands
of them: gigabytes. Twice :data:`MAX_UNSEALED_BYTES`, for the reason above."""
LOCATE = "fed.locate"
"""The query one relay asks a peer: where are these event ids? (``args``: ``ids``, a
list of ids; answer: a list of ``[id, ns, seq]`` for those it knows.) Only a peer
connection may ask it; ``ns`` names any namespace homed on the asked relay."""
CATCH_UP_WAIT = 5.0
"""Seconds a new subscriber waits for a mirror to catch up before it is served what
the mirror holds (its ``live`` then marks the mirror's head, not the home's)."""
LOCATE_WAIT = 10.0
"""Seconds to wait for a peer's answer to :data:`LOCATE`."""
MAX_HINTS = 100_000
"""Forwarded events whose namespace and seq are remembered for causal look-ups."""
MAX_RECEIPTS_QUEUED = 100_000
"""Message receipts waiting for a link to one relay; more are dropped (and logged)."""
MAX_SEQ = (1 << 63) - 1
"""The largest seq any relay can give: every store keeps it as a signed 64-bit integer
(SQLite ``INTEGER``, PostgreSQL ``bigint``). A peer that places an event beyond it, or
below 1, is not mistaken but lying (14.11)."""
RECEIPT_RUN = 64
"""Message receipts for one relay sent at once, and dropped from the store together."""
RECEIPT_RETRY = RETRY_CODES | {ErrorCode.INTERNAL}
"""Answers to a receipt that say "not now": the relay is stopping, wants the link
slower, or could not store it (a full disk). The receipt is sent again later."""
RECEIPT_TRIES = 30
"""Times one receipt is sent and answered "not now" before it is given up (logged):
with the back-off between runs capped at 5 s, about two minutes."""


@dataclass(frozen=True)
class FederationConfig:
    peers: tuple[Peer, ...] = ()
    outbox_deadline_ms: int = 10 * 60 * 1000
    """How long a write waits in the outbox for its home before the agent gets 5003."""


class Federation:
    """The federation side of one relay: its links, outboxes and mirrors."""

    def __init__(
        self,
        node: RelayNode,
        config: FederationConfig,
        store: OutboxStore,
        *,
        dialer: Callable[[Peer], Callable[[], Awaitable[trio.abc.Stream]]] | None = None,
    ) -> None:
        self.node = node
        self.config = config
        self.peers = check_peers(list(config.peers), node.config.name)
        self.peer_keys = {peer.key: peer for peer in config.peers}
        max_message = 4 * node.config.max_frame + 4096  # a peer's bundles: twice a frame, and some
        self.links = {
            peer.name: Link(
                peer,
                node.identity,
                max_message=max_message,
                dial=None if dialer is None else dialer(peer),
            )
            for peer in config.peers
            if peer.url is not None
        }
        self.outboxes = {
            name: Outbox(
                name,
                store,
                deadline_ms=config.outbox_deadline_ms,
                wall_ms=node.wall_ms,
                on_answer=self.remember,
                check=self.check_answer,
            )
            for name in self.links
        }
        for link, n, raw, sig, since in store.load():
            if link in self.outboxes:
                self.outboxes[link].restore(n, raw, sig, since)
            else:
                log.warning("outbox entry %d for %r: no such peer now; kept", n, link)
        self.mirrors: dict[str, Mirror] = {}
        self.store = store
        # Per relay, the message receipts on their way (in order), as (n, receipt):
        # stored until passed on, so that a restart does not lose them.
        self._receipts: dict[str, list[tuple[int, bytes]]] = {}
        self.receipts_dropped: Counter[str] = Counter()
        """Per relay, the receipts dropped since start-up: no way to it (keep_receipts)."""
        # Per relay, the receipts of keep_receipts calls being written: they count
        # against MAX_RECEIPTS_QUEUED as queued ones do, or calls overlapping one
        # write each found room (as inbox notices did: relay/inbox.py).
        self._writing_receipts: Counter[str] = Counter()
        self._last_receipt = 0
        for relay, n, receipt in store.load_receipts():
            self._receipts.setdefault(relay, []).append((n, receipt))
            self._last_receipt = max(self._last_receipt, n)
        self.hints: OrderedDict[bytes, tuple[str, int]] = OrderedDict()
        self.acked: dict[str, int] = {}
        """Per foreign namespace, the highest seq of a receipt this relay passed on."""
        self.forgeries = 0
        self._nursery: trio.Nursery | None = None
        node.on_parked = self._on_parked
        node.federation = self

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for name, link in self.links.items():
                nursery.start_soon(link.run)
                nursery.start_soon(self._deliver, link, self.outboxes[name])
            nursery.start_soon(self._expire_loop)
            for relay in self._receipts:  # stored before a restart
                nursery.start_soon(self._send_receipts, relay)
            task_status.started()

    # -- routing ----------------------------------------------------------------------

    def peer_of(self, key: bytes | None) -> Peer | None:
        """The peer relay authenticated as ``key``, if it is one."""
        return None if key is None else self.peer_keys.get(key)

    def route(self, ns: str, from_peer: Peer | None) -> Link:
        """The link toward the home of ``ns``; raises ``not_home`` when there is none."""
        try:
            return self.link_to(home_of(ns), from_peer)
        except ProtocolError as exc:
            raise ProtocolError(exc.code, f"{ns}: {exc.reason}") from None

    def link_to(self, relay: str, from_peer: Peer | None) -> Link:
        """The link toward relay ``relay``: its own, or the one of the peer configured
        as the way there. This is the one routing rule — namespaces (``name@relay``)
        and, for messaging, agents (``agent@relay``) are routed by it."""
        peer = self.peers.get(relay)
        if peer is None:
            raise ProtocolError(ErrorCode.NOT_HOME, f"no route to relay {relay!r}")
        if peer.url is not None:
            hop = peer.name
        elif peer.via is not None and from_peer is None:
            hop = peer.via
        else:
            why = "it dials us" if peer.via is None else "a peer's write is not forwarded twice"
            raise ProtocolError(ErrorCode.NOT_HOME, f"no link to relay {relay!r} ({why})")
        if from_peer is not None and hop == from_peer.name:
            raise ProtocolError(ErrorCode.NOT_HOME, f"would route back to {hop!r}")
        return self.links[hop]

    # -- writes -----------------------------------------------------------------------

    async def forward(self, event: SignedEvent, from_peer: Peer | None) -> Entry:
        """Hand a verified event to the outbox of the link toward its home."""
        link = self.route(event.event.ns, from_peer)
        if joins_by_connection(event.event.kind, event.event.body):
            # The home sees the link, not the agent's connection: it could never tell
            # when this agent leaves. Across relays, presence is by heartbeat.
            reason = "join a namespace of another relay with heartbeat_ms (presence by heartbeat)"
            raise ProtocolError(ErrorCode.BAD_EVENT, reason)
        return await self.outboxes[link.peer.name].submit(event)

    async def _deliver(self, link: Link, outbox: Outbox) -> None:
        while True:
            client = await link.wait_up()
            await outbox.send(client)

    def check_answer(self, entry: Entry) -> str | None:
        """Why the answer to a forwarded event is not its home's, or ``None`` when it
        is: its receipt (and its outcome's) of the event's namespace by the home's
        pinned key, sealed by it (a home seals every ack to a relay, and the outcome's
        receipt in it), and the outcome signed by it. A relay in the middle (``via``)
        must not be able to make one up."""
        result = entry.result
        if result is None:
            return None
        ns = entry.event.event.ns
        key = self.peers[home_of(ns)].key
        receipts = [result.receipt] + ([result.outcome.receipt] if result.outcome else [])
        for receipt in receipts:
            if receipt.ns != ns or receipt.relay != key:
                return f"a receipt of {receipt.ns} by another relay than {ns}'s home"
        if result.receipt.id != entry.event.id:
            return "the receipt of another event"
        if result.seal is None:  # a home seals every answer to a relay
            return "the receipt is not sealed"
        if not verify_seal(result.receipt, result.seal):
            return "the receipt's seal does not verify"
        if result.outcome is not None:
            outcome = result.outcome.event
            if outcome.event.author != key or not outcome.verify():
                return "the outcome is not signed by the home"
            if result.outcome.receipt.id != outcome.id:
                return "the outcome's receipt is of another event"
            if outcome.event.deps != (entry.event.id,):  # (8.1: its deps are [request id])
                return "the outcome of another request"
            if result.outcome.seal is None:
                return "the outcome's receipt is not sealed"
            if not verify_seal(result.outcome.receipt, result.outcome.seal):
                return "the outcome's seal does not verify"
        return None

    def remember(self, entry: Entry) -> None:
        """Keep where a forwarded event (and its outcome) landed, for causal look-ups."""
        if entry.result is None:
            return
        receipts = [entry.result.receipt]
        if entry.result.outcome is not None:
            receipts.append(entry.result.outcome.receipt)
        for receipt in receipts:
            self.hints[receipt.id] = (receipt.ns, receipt.seq)
            if receipt.seq > self.acked.get(receipt.ns, 0):
                self.acked[receipt.ns] = receipt.seq
            if len(self.hints) > MAX_HINTS:
                self.hints.popitem(last=False)

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(1.0)
            now = self.node.wall_ms()
            for outbox in self.outboxes.values():
                deadline = outbox.next_deadline_ms()
                if deadline is not None and deadline <= now:
                    await outbox.expire(now)

    async def ask(self, query: f.Query, from_peer: Peer | None) -> Any:
        """Forward a query to the home of its namespace and return the home's answer."""
        link = self.route(query.ns, from_peer)
        client = link.client
        if client is None:
            raise ProtocolError(ErrorCode.HOME_UNREACHABLE, f"no link to {link.peer.name} now")
        try:
            return await client.ask(lambda rid: replace(query, rid=rid))
        except ProtocolError:
            if client.stopped.is_set():
                reason = f"the link to {link.peer.name} dropped; ask again"
                raise ProtocolError(ErrorCode.HOME_UNREACHABLE, reason) from None
            raise

    # -- messages ---------------------------------------------------------------------

    def send_message(self, relay: str, msg: bytes, origin: str, from_peer: Peer | None) -> Asked:
        """Pass a sealed message on towards relay ``relay``, now, in call order; the
        handle gets that relay's answer (``stored`` or ``delivered``). A link that is
        down is ``home_unreachable`` at once: the sender keeps the message and sends
        it again (it is deduplicated by id)."""
        client = self._link_client(relay, from_peer)
        return client.ask_later(lambda rid: f.MsgSend(rid=rid, msg=msg, relay=relay, origin=origin))

    def check_route(self, relay: str, from_peer: Peer | None) -> Link:
        """The link toward relay ``relay`` for a message or receipt; ``unknown_recipient``
        when there is no way there."""
        try:
            return self.link_to(relay, from_peer)
        except ProtocolError as exc:
            raise ProtocolError(ErrorCode.UNKNOWN_RECIPIENT, exc.reason) from None

    async def keep_receipts(self, receipts: Sequence[tuple[str, bytes]]) -> None:
        """Send each ``(relay, receipt)`` to its relay in the background, in order,
        trying again while the link is down. They are stored first (in the outbox
        store), so that a restart of this relay sends them still; when they cannot be
        (the disk, or :data:`MAX_RECEIPTS_QUEUED` waiting for one relay), nothing is
        kept and ``internal`` is raised: the caller keeps what they answer.

        A receipt for a relay this one has no way to (a peer that only dials us, or
        one not listed) is dropped and counted: kept, it could never leave, and once
        :data:`MAX_RECEIPTS_QUEUED` of them waited every acknowledgement of a message
        from that relay would be refused."""
        rows: list[tuple[str, int, bytes]] = []
        for relay, receipt in receipts:
            try:
                self.link_to(relay, None)
            except ProtocolError as exc:
                if not self.receipts_dropped[relay]:
                    log.warning("message receipts for relay %s are dropped: %s", relay, exc.reason)
                self.receipts_dropped[relay] += 1
                continue
            waiting = (
                len(self._receipts.get(relay, ()))
                + self._writing_receipts[relay]
                + sum(r[0] == relay for r in rows)
            )
            if waiting >= MAX_RECEIPTS_QUEUED:
                reason = f"{waiting} message receipts already wait for relay {relay}"
                raise ProtocolError(ErrorCode.INTERNAL, reason)
            self._last_receipt += 1
            rows.append((relay, self._last_receipt, receipt))
        if not rows:
            return
        writing = Counter(relay for relay, _, _ in rows)
        self._writing_receipts.update(writing)
        try:
            await store_call(self.store, self.store.put_receipts, rows)
        except Exception as exc:
            log.exception("could not store %d message receipts", len(rows))
            reason = "message receipts could not be stored"
            raise ProtocolError(ErrorCode.INTERNAL, reason) from exc
        finally:  # queued below, or not kept at all
            self._writing_receipts -= writing  # (drops the relays down to none)
        for relay, n, receipt in rows:
            queue = self._receipts.setdefault(relay, [])
            queue.append((n, receipt))
            if len(queue) == 1:  # nobody is sending this relay's receipts: start
                assert self._nursery is not None
                self._nursery.start_soon(self._send_receipts, relay)

    async def _send_receipts(self, relay: str) -> None:
        """Send the receipts waiting for ``relay``, oldest first, until none is left: a
        run of up to :data:`RECEIPT_RUN` at a time (one message each way, one commit).
        One runs per relay with receipts waiting: receipts are taken off the queue only
        after their rows are dropped, with nothing awaited after while the queue could
        be empty, so a receipt added meanwhile finds it not empty and starts no second
        sender."""
        queue = self._receipts[relay]
        delay = 0.1
        tries: dict[int, int] = {}  # "not now" answers so far, by receipt
        while queue:
            run = queue[:RECEIPT_RUN]
            try:
                client = self.link_to(relay, None).client
            except ProtocolError:  # not a peer now (a slip in --peer?): kept for later
                log.warning("%d message receipts for relay %s kept: no route", len(queue), relay)
                return
            done = [] if client is None else await self._pass_receipts(client, relay, run, tries)
            if done:
                try:
                    await store_call(self.store, self.store.drop_receipts, relay, done)
                except Exception:  # sent again after a restart: the sender takes them once
                    log.exception("could not drop %d sent message receipts", len(done))
            finished = set(done)
            kept = [item for item in run if item[0] not in finished]
            queue[: len(run)] = kept
            if kept:  # the link is down, or dropped under the run, or "not now"
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
            else:
                delay = 0.1

    async def _pass_receipts(
        self, client: RelayClient, relay: str, run: list[tuple[int, bytes]], tries: dict[int, int]
    ) -> list[int]:
        """Send a run of receipts at once, in order; the ``n`` of those done with: taken
        by the relay, or refused for good. The others are sent again: the link went
        down under them, or the relay said "not now" (:data:`RECEIPT_RETRY`), up to
        :data:`RECEIPT_TRIES` times (5001 is also how the client files a code it does
        not know: a newer relay's refusal must not be asked again for ever)."""
        asks = [(n, client.ask_later(partial(_receipt_frame, r, relay))) for n, r in run]
        done = []
        for n, asked in asks:
            await asked.done.wait()
            error = asked.error
            if error is not None and client.stopped.is_set():
                continue
            if error is not None and error.code in RECEIPT_RETRY:
                tries[n] = tries.get(n, 0) + 1
                if tries[n] < RECEIPT_TRIES:
                    continue
            tries.pop(n, None)
            if error is not None:
                log.warning("receipt for relay %s refused: %s", relay, error)
            done.append(n)
        return done

    def _link_client(self, relay: str, from_peer: Peer | None) -> RelayClient:
        link = self.check_route(relay, from_peer)
        if link.client is None or link.client.stopped.is_set():
            raise ProtocolError(ErrorCode.HOME_UNREACHABLE, f"no link to {link.peer.name} now")
        return link.client

    # -- mirrors ----------------------------------------------------------------------

    @asynccontextmanager
    async def hold(self, ns: str, from_peer: Peer | None) -> AsyncIterator[Mirror]:
        """Keep the mirror of foreign ``ns`` following while the caller needs it."""
        mirror = self._mirror(ns, from_peer)
        mirror.holders += 1
        mirror.changed()  # one lingering after its last holder follows again at once
        try:
            yield mirror
        finally:
            mirror.holders -= 1
            mirror.changed()

    def _mirror(self, ns: str, from_peer: Peer | None) -> Mirror:
        mirror = self.mirrors.get(ns)
        if mirror is None:
            link = self.route(ns, from_peer)
            key = self.peers[home_of(ns)].key
            mirror = self.mirrors[ns] = Mirror(self, ns, link, key)
            assert self._nursery is not None
            self._nursery.start_soon(mirror.run)
        return mirror

    def _on_parked(self, missing: frozenset[bytes]) -> None:
        unknown = []
        for event_id in missing:
            hint = self.hints.get(event_id)
            if hint is None:
                unknown.append(event_id)
            else:
                self._fetch(*hint)
        if unknown and self._nursery is not None:
            for link in self.links.values():
                if link.client is not None:
                    self._nursery.start_soon(self._ask_where, link, link.client, unknown)

    def _fetch(self, ns: str, seq: int) -> None:
        """Mirror ``ns`` at least up to ``seq`` (a parked event depends on it)."""
        if self.node.is_home(ns):
            return  # ours: it parks only until our own sequencer gets there
        try:
            self._mirror(ns, None).want(seq)
        except ProtocolError:
            pass  # no route now: the event parks until its timeout

    async def _ask_where(self, link: Link, client: RelayClient, ids: list[bytes]) -> None:
        """Ask a peer where events we never saw are; mirror what it names. A peer's
        answer is only a pointer: the mirror checks whatever it then fetches."""
        try:
            with trio.fail_after(LOCATE_WAIT):
                found = await client.query(f"fed@{link.peer.name}", LOCATE, {"ids": ids})
        except (ProtocolError, trio.TooSlowError):
            return
        items = found if isinstance(found, list) else []
        for item in items:
            seq = item[2] if isinstance(item, list) and len(item) == 3 else None
            if type(seq) is int and not 1 <= seq <= MAX_SEQ:
                # No relay holds such a seq: the whole answer is a lie, so nothing of
                # it is taken (a hint kept it for ever, a mirror followed towards it for
                # ever, and ``locate`` passed it on to other peers as ours to vouch for).
                lie = f"{LOCATE} placed an event at seq {seq}, not from 1 to {MAX_SEQ}"
                log.error("link %s: refused an answer: %s", link.peer.name, lie)
                if link.client is client:  # (not a newer connection than the liar's)
                    await link.drop(f"forged answer: {lie}")
                return
        wanted = set(ids)
        for item in items:
            if not isinstance(item, list) or len(item) != 3:
                continue  # a peer's answer is checked before use, like any input
            id_, ns, seq = item
            if not isinstance(id_, bytes) or id_ not in wanted:
                continue  # (a list would not even hash: that took the relay down)
            if isinstance(ns, str) and NS_RE.fullmatch(ns) and type(seq) is int:
                if self.node.is_home(ns):
                    # Ours: had we sequenced it, we would not have asked. Our log is the
                    # truth, so a peer's word on it is worthless; kept, it hid the id's
                    # real place from every later look-up (a hint is never asked again)
                    # and was passed on to other peers. It does not use up the id's place.
                    continue
                wanted.discard(id_)  # one place per id: a lying peer cannot open mirrors
                self.hints[id_] = (ns, seq)  # without end by naming many for one id
                self._fetch(ns, seq)

    async def locate(self, args: dict[str, Any], asker: bytes) -> list[list[Any]]:
        """Answer a peer's :data:`LOCATE`: where this relay knows the ids to be, of the
        namespaces the peer (``asker``) may read; of others, nothing, not even that
        they exist. Only what it sequenced or stored in a mirror is answered, never a
        hint (14.11): a hint is a peer's word, unchecked, and one passed on made the
        asker follow a mirror towards a seq that may never come."""
        ids = args.get("ids")
        if not isinstance(ids, list) or len(ids) > 256:
            raise ProtocolError(ErrorCode.BAD_QUERY, "ids: a list of at most 256 event ids")
        ids = [i for i in ids if isinstance(i, bytes) and len(i) == 32]
        found, missing = [], []  # missing: not in the sequencer's memory, maybe stored
        for event_id in ids:
            located = self.node.sequencer.locate(event_id)
            if located is None:
                missing.append(event_id)
            else:
                found.append([event_id, located.ns, located.seq])
        if missing:
            for event_id, located in (await self.node.find(missing)).items():
                found.append([event_id, located.ns, located.seq])
        return [item for item in found if self._may_locate(item[1], item[2], asker)]

    def _may_locate(self, ns: str, seq: int, asker: bytes) -> bool:
        """May a peer be told where an event of ``ns`` sits? Only where this relay
        knows the namespace's policy: it homes it, or holds it in a mirror (the policy
        is in its records) up to ``seq``."""
        if not self.node.is_home(ns) and self.node.head(ns) < seq:
            return False
        access = self.node.access
        return access.may_read(ns, asker) and access.readable(ns, asker, seq)

    # -- documents --------------------------------------------------------------------

    async def proxy_doc(
        self,
        request: f.DocOpen,
        from_peer: Peer | None,
        send: Callable[[f.RelayFrame], Awaitable[None]],
        opened: Callable[[ProxiedDoc | None], None],
    ) -> None:
        """Serve a document subscription of a foreign namespace from its home: the
        home's frames are passed through under the agent's sub id. When the link
        drops the agent is told ``doc_resync`` and reopens with its state vector."""
        link = self.route(request.ns, from_peer)
        client = await link.wait_up()
        tap = _Tap(DOC_TAP_BUFFER)
        sub = client.tap(lambda sub: replace(request, sub=sub), tap.put)
        proxied = ProxiedDoc(client, sub)
        opened(proxied)
        ended = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_when_stopped, client, nursery.cancel_scope)
                while True:
                    frame = await tap.get()
                    if tap.full:
                        break
                    passed = _resubbed(frame, request.sub)
                    if passed is None:
                        continue  # not a document frame: nothing for the agent
                    await send(passed)
                    if isinstance(frame, f.Error) and frame.code not in GOES_ON:
                        ended = True  # the home ended the subscription
                        break
                nursery.cancel_scope.cancel()
        finally:
            opened(None)
            client.untap(sub)
        if not ended:
            reason = "the document's home link dropped or fell behind; open it again"
            error = ProtocolError(ErrorCode.DOC_RESYNC, reason)
            await send(f.Error.of(error, sub=request.sub))

    # -- reporting --------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """The federation part of ``GET /info`` (and of the board, for any viewer):
        mirrors of namespaces an anonymous reader may not read are left out, as
        ``/info`` leaves out such namespaces of this relay."""
        peers = []
        for name, peer in sorted(self.peers.items()):
            link = self.links.get(name)
            outbox = self.outboxes.get(name)
            peers.append(
                {
                    "name": name,
                    "key": peer.key.hex(),
                    "url": peer.url,
                    "via": peer.via,
                    "up": bool(link and link.up),
                    "connections": link.connections if link else 0,
                    "last_error": link.last_error if link else None,
                    "outbox": len(outbox.entries) if outbox else 0,
                    "outbox_stored": outbox.stored if outbox else 0,
                    "delivered": outbox.delivered if outbox else 0,
                    "expired": outbox.expired if outbox else 0,
                    "receipts": len(self._receipts.get(name, ())),
                    "receipts_dropped": self.receipts_dropped[name],
                }
            )
        mirrors = {
            ns: {
                "head": self.node.head(ns),
                "home_head": mirror.home_head,
                "lag": max(0, mirror.home_head - self.node.head(ns)),
                "holders": mirror.holders,
                "following": mirror.following,
            }
            for ns, mirror in sorted(self.mirrors.items())
            # Named only once its log says anyone may read it: a mirror the home
            # refused, or has sent nothing yet, may be of a private namespace.
            if ns in self.node.access.policies and self.node.access.may_read(ns, None)
        }
        return {"peers": peers, "mirrors": mirrors, "forgeries": self.forgeries}


@dataclass(slots=True)
class ProxiedDoc:
    """A document subscription held open at the home on an agent's behalf."""

    client: RelayClient
    sub: int

    def awareness(self, update: bytes) -> None:
        self.client.send_frame(f.DocAwareness(sub=self.sub, update=update))


class Mirror:
    """The checked local copy of one foreign namespace's log (see the module docstring).

    It follows while someone holds it (a subscription) or wants a seq it does not
    have yet (a parked event's dependency), lingers a while after that, then stops;
    what it stored stays, and the next follower resumes from the stored head.
    """

    def __init__(self, federation: Federation, ns: str, link: Link, home_key: bytes) -> None:
        self.federation = federation
        self.node = federation.node
        self.ns = ns
        self.link = link
        self.chain = MirrorChain(ns, home_key, self.node.mirror_heads.get(ns), MAX_UNSEALED)
        self.holders = 0
        self.wanted = 0
        self.wanted_until = -math.inf
        """When the last :meth:`want` lapses (trio time): a parked event waits at most
        ``park_timeout_ms``, and a want does not outlive what it was for."""
        self.home_head = self.node.head(ns)
        self.following = False
        self.settled = trio.Event()
        """Set once the mirror has caught up with its home, or found it unreachable:
        what it holds then is the best there is to serve."""
        self.refused: ProtocolError | None = None
        """Set while the home refuses this relay its namespace (``forbidden``: the
        namespace is private and its owner does not list this relay's key)."""
        self._changed = trio.Event()

    @property
    def needed(self) -> bool:
        wants = self.node.head(self.ns) < self.wanted and trio.current_time() < self.wanted_until
        return self.holders > 0 or wants

    async def caught_up(self) -> None:
        """Wait until the mirror holds everything this relay has told anyone about —
        every receipt it passed on for a forwarded write, and the home's head as last
        heard — so a reader here sees its own writes. Without a link, what is stored
        is all there is: return at once."""
        with trio.move_on_after(CATCH_UP_WAIT):
            await self.settled.wait()
            target = max(self.home_head, self.federation.acked.get(self.ns, 0))
            connection = self.link.connections
            # Only while this link connection lasts, and at most CATCH_UP_WAIT: the
            # head a peer claims is not checked until its records arrive.
            while self.node.head(self.ns) < target and self.link.connections == connection:
                if not self.link.up:
                    return
                self.want(target)
                await self._changed.wait()

    def want(self, seq: int) -> None:
        """Follow until ``seq`` is stored (a parked event depends on it), for at most
        as long as an event parks (``park_timeout_ms``). A want that lasted until its
        seq came kept the mirror following for ever when it never came: a seq that a
        peer's ``fed.locate`` answer placed past the home's head (14.8: a mirror
        follows while a parked event waits). A lapsed want is forgotten."""
        now = trio.current_time()
        self.wanted = seq if now >= self.wanted_until else max(self.wanted, seq)
        self.wanted_until = now + self.node.config.sequencer.park_timeout_ms / 1000
        self.changed()

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def run(self) -> None:
        try:
            while True:
                with trio.move_on_after(MIRROR_LINGER) as idle:
                    while not self.needed:
                        await self._changed.wait()
                if idle.cancelled_caught and not self.needed:
                    return
                client = self.link.client
                if client is None:
                    self.settled.set()  # serve what is stored; follow once the link is up
                    self.changed()  # and wake readers waiting for a catch-up: none comes
                    with trio.move_on_after(1.0):
                        client = await self.link.wait_up()
                    continue
                await self._follow(client)
        finally:
            self.following = False
            if self.federation.mirrors.get(self.ns) is self:
                del self.federation.mirrors[self.ns]

    async def _follow(self, client: RelayClient) -> None:
        """Follow the home's log over one link connection, until it ends or the
        mirror is no longer needed."""
        tap = _Tap()  # once full: drain it, then resume from the stored head
        # Start from what is stored: a batch whose append was cancelled is fetched again.
        stored = self.node.mirror_heads.get(self.ns)
        self.chain = MirrorChain(self.ns, self.chain.home_key, stored, MAX_UNSEALED)
        start = self.chain.head + 1
        sub = client.tap(
            lambda sub: f.Subscribe(sub=sub, ns=(self.ns,), start={self.ns: start}), tap.put
        )
        self.following = True
        forged: Forged | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_when_stopped, client, nursery.cancel_scope)
                nursery.start_soon(self._stop_when_unneeded, nursery.cancel_scope)
                await self._consume(tap)
                nursery.cancel_scope.cancel()
        except* Forged as group:
            forged = group.exceptions[0]  # type: ignore[assignment]
        finally:
            self.following = False
            client.untap(sub)
            self.chain.reset()  # an unsealed run is sent again from the stored head
            self.changed()  # whoever waits for it to catch up: the link is gone
        if forged is not None:
            self.federation.forgeries += 1
            peer = self.link.peer.name
            log.error("mirror %s: refused what %s sent: %s", self.ns, peer, forged)
            await self.link.drop(f"forged log: {forged}")

    async def _stop_when_unneeded(self, scope: trio.CancelScope) -> None:
        # Round after round: needed again while it lingers, the mirror must still stop
        # once that need ends too (a watch that returned then left it following).
        while True:
            while self.needed:
                lapses = self.wanted_until if self.wanted_until > trio.current_time() else math.inf
                with trio.move_on_at(lapses):  # (needed no more once the want lapses)
                    await self._changed.wait()
            with trio.move_on_after(MIRROR_LINGER) as lingered:
                while not self.needed:
                    await self._changed.wait()
            if lingered.cancelled_caught:
                scope.cancel()
                return

    async def _consume(self, tap: _Tap) -> None:
        while True:
            frame = await tap.get()
            checked: list[Record] = []
            held = 0  # their bytes: sealed runs wait here for one write, within a bound
            offered = 0
            while True:
                if isinstance(frame, f.EventFrame):
                    self.refused = None
                    try:
                        run = self.chain.offer(
                            frame.event, frame.sig, frame.receipt, frame.seal, frame.mark
                        )
                        checked += run
                        held += sum(unsealed_bytes(r.event, r.sig, r.receipt) for r in run)
                    except Forged:
                        if checked:  # what checked out before the lie is the home's log
                            await self.node.append_mirrored(checked)
                        raise
                    self.home_head = max(self.home_head, self.chain.head)
                elif isinstance(frame, f.Live):
                    self.home_head = max(self.home_head, frame.seq)
                elif isinstance(frame, f.Error):
                    if checked:  # what came before the refusal (the change that made it)
                        await self.node.append_mirrored(checked)
                        self.changed()
                    peer = self.link.peer.name
                    log.warning("mirror %s: %s refused: %s", self.ns, peer, frame.reason)
                    forbidden = frame.code == ErrorCode.FORBIDDEN
                    if forbidden:
                        reason = f"{peer} does not let this relay read {self.ns}"
                        self.refused = ProtocolError(ErrorCode.FORBIDDEN, reason)
                    self.settled.set()  # serve what is stored rather than nothing
                    self.changed()
                    await trio.sleep(FORBIDDEN_RETRY if forbidden else 1.0)
                    return
                if len(checked) >= 4096 or held >= MAX_UNSEALED_BYTES:
                    break
                offered += 1
                if offered % CHECKS_PER_TURN == 0:
                    # Each is a signature check and a seal: a whole run at once held
                    # the event loop for about 200 ms.
                    await trio.lowlevel.checkpoint()
                next_frame = tap.get_nowait()
                if next_frame is None:
                    break
                frame = next_frame
            if checked:
                await self.node.append_mirrored(checked)
                self.changed()
            if self.node.head(self.ns) >= self.home_head:
                self.settled.set()  # caught up with what the home said its head was
            if tap.full and tap.empty:
                return  # resume from the stored head on a fresh subscription


class _Tap:
    """The frames of one tapped subscription on their way from the link's reader to
    whoever takes them: at most ``frames`` of them, and :data:`TAP_BYTES` of
    their bytes (one frame past it at most: a frame larger than the bound still gets
    through an empty tap). Past either bound the tap is *full* and takes nothing more:
    the frames after are dropped, so its taker must start again from a cursor once it
    has taken what is held."""

    def __init__(self, frames: int = TAP_BUFFER) -> None:
        self._in, self._out = trio.open_memory_channel[tuple[f.Frame, int]](frames)
        self.held = 0
        """The bytes of the frames held."""
        self.full = False

    def put(self, frame: f.Frame) -> None:
        """Take a frame from the link's reader (a tap's ``on_frame``: never blocks)."""
        if self.full:
            return  # the stream has a gap now: nothing after it is of use
        if self.held >= TAP_BYTES:
            self.full = True
            return
        size = _frame_bytes(frame)
        try:
            self._in.send_nowait((frame, size))
        except trio.WouldBlock:
            self.full = True
            return
        self.held += size

    async def get(self) -> f.Frame:
        frame, size = await self._out.receive()
        self.held -= size
        return frame

    def get_nowait(self) -> f.Frame | None:
        try:
            frame, size = self._out.receive_nowait()
        except trio.WouldBlock:
            return None
        self.held -= size
        return frame

    @property
    def empty(self) -> bool:
        return self._out.statistics().current_buffer_used == 0


def _frame_bytes(frame: f.Frame) -> int:
    """What a tapped frame counts towards :data:`TAP_BYTES`: its byte and text
    strings (an event, its signature, receipt, seal and mark; a document update and
    state vector; an error's reason), the parts a peer can make large."""
    return sum(
        len(value)
        for value in (getattr(frame, field.name) for field in fields(frame))
        if isinstance(value, (bytes, str))
    )


def _receipt_frame(receipt: bytes, relay: str, rid: int) -> f.MsgReceipt:
    return f.MsgReceipt(rid=rid, receipt=receipt, relay=relay)


CHECKS_PER_TURN = 128
"""Mirrored records checked between two turns of the event loop."""

GOES_ON = frozenset({ErrorCode.AWARENESS_REFUSED, ErrorCode.UNKNOWN_SUBSCRIPTION})
"""Errors about one frame of a document subscription, after which it goes on."""


def _resubbed(frame: f.Frame, sub: int) -> f.RelayFrame | None:
    """A home's frame of a tapped document under the agent's own sub id; ``None`` for
    frames that are not a document subscription's (a peer's mistake: dropped)."""
    if isinstance(frame, (f.DocSync, f.EventFrame, f.DocAwareness, f.Error)):
        return replace(frame, sub=sub)
    return None


async def _cancel_when_stopped(client: RelayClient, scope: trio.CancelScope) -> None:
    await client.stopped.wait()
    scope.cancel()


__all__ = ["Federation", "FederationConfig", "Mirror", "ProxiedDoc"]
