"""The relay node: the sequencer, the store and the namespace heads, driven by trio.

Theory of operation
-------------------
Three loops run for the life of a node:

* **sequencing** takes admitted events in batches, asks the store (one thread hop per
  batch) about ids the sequencer does not know, then offers each event to the pure
  :class:`~relay.sequencer.Sequencer`. Sequenced records join the pending batch.
* **commit** takes everything pending, seals each namespace's new chain head (one
  Ed25519 signature per namespace per batch, not per event), appends the batch to the
  store in one transaction (group commit), and only then advances the *committed*
  heads and wakes whoever waits on them: publishers awaiting acks and subscriptions.
  Nothing uncommitted is ever visible to anyone, so after a crash the next seq can be
  reused without anyone having seen the lost one.
* **expiry** rejects parked events whose dependencies did not arrive in time.

A publish is a :class:`Ticket`; :meth:`RelayNode.answer` waits for its outcome and the
commit that makes it durable. Store failures are fatal: a relay that cannot commit
stops rather than acknowledge what it may lose.

Seams for later capabilities: :attr:`RelayNode.folds` receive every committed record
in order (coordination state machines fold the log there), and :class:`Router`
decides what happens to namespaces homed elsewhere (federation plugs in there).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import trio

from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.identity import Identity
from agent_sdk.wire import (
    NS_RE,
    Event,
    SignedEvent,
    digest,
    pruned_mark,
    seal_digest,
    sign_event,
)
from relay.access import POLICY, Access, Creation
from relay.contracts import Contracts
from relay.coordination import queries
from relay.coordination.host import Host, answers
from relay.coordination.leases import TtlBounds
from relay.coordination.requests import (
    CLAIM_TTL,
    LOCK_TTL,
    RELAY_KINDS,
    REQUEST_KINDS,
    Coordinator,
    Outcome,
)
from relay.documents import COMPACTED, DOC_KINDS, DocHost, LiveDoc, check_event
from relay.entities import Entities
from relay.inbox import Inboxes, InboxStore, MemoryInboxStore
from relay.limits import Limiter, RateLimits
from relay.logs import about
from relay.metrics import Metrics, count_kind
from relay.sequencer import Duplicate, Limits, Parked, Rejected, Sequenced, Sequencer
from relay.signatures import SignatureChecker
from relay.store import (
    MAX_UNSEALED,
    MAX_UNSEALED_BYTES,
    PRUNABLE,
    Head,
    Located,
    Record,
    Store,
    unsealed_bytes,
)

if TYPE_CHECKING:
    from federation.network import Federation


@dataclass(frozen=True)
class RelayConfig:
    """Everything an operator can tune; defaults are documented in docs/operations.md."""

    name: str = "local"
    max_frame: int = 1 << 20
    max_deps: int = 32
    max_subscriptions: int = 64
    max_follows: int = 256
    max_inflight: int = 1024
    send_queue: int = 256
    slow_consumer_timeout: float = 30.0
    auth_timeout: float = 10.0
    commit_batch: int = 4096
    replay_batch: int = 512
    recent_bytes: int = 64 << 20
    sequencer: Limits = field(default_factory=Limits)
    claim_ttl: TtlBounds = CLAIM_TTL
    lock_ttl: TtlBounds = LOCK_TTL
    doc_compact_every: int = 1000
    max_live_docs: int = 1024
    doc_bearer_tokens: bool = False
    """Whether the y-websocket endpoint takes document tokens without a secret
    (minted before bound tokens). The log shows every token, so a bearer token lets
    any reader of the namespace write with it: off unless old tokens must work."""
    initial_stake: int = 100
    """Stake every member of a namespace gets at its first join (auctions)."""
    reputation_half_life_ms: int = 7 * 24 * 3600 * 1000
    max_message: int = 256 << 10
    """Largest sealed message an agent may send (bytes)."""
    inbox_max_items: int = 1000
    """Items an agent's inbox holds before senders get ``inbox_full``."""
    inbox_ttl_ms: int = 7 * 24 * 3600 * 1000
    """How long an undelivered message waits before it expires."""
    inbox_max_bytes: int = 256 << 20
    """Bytes all inboxes together hold (they are kept in memory too)."""
    inbox_per_sender: int = 250
    """Messages one sender may have waiting in one inbox (0: no cap of its own)."""
    rate_limits: RateLimits = field(default_factory=RateLimits)
    """Per-key publish and request rates, connections per key and per address."""
    create: Creation = Creation.OPEN
    """Who may create namespaces (relay/access.py): open, allow or invite."""
    creators: frozenset[bytes] = frozenset()
    """Keys that may create namespaces under ``allow`` and ``invite``."""
    verify_workers: int = 1
    """Processes that check event signatures of bundled publishes off the event loop
    (relay/signatures.py), started at the first bundle; 0 checks them on the loop."""
    store: str = ""
    """A PostgreSQL DSN for the logs, mirrors and inboxes; "" for the embedded
    SQLite files in the data directory (relay/app.py)."""

    def __post_init__(self) -> None:
        if not NS_RE.fullmatch(f"x@{self.name}"):
            raise ValueError(f"relay name {self.name!r}: lowercase letters, digits, . _ -")
        names = ("commit_batch", "replay_batch", "recent_bytes", "send_queue")
        for name in (
            *names, "doc_compact_every", "max_live_docs", "reputation_half_life_ms",
            "max_message", "inbox_max_items", "inbox_ttl_ms", "inbox_max_bytes",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.initial_stake < 0:
            raise ValueError("initial_stake must be 0 or more")
        for name in ("claim_ttl", "lock_ttl"):
            bounds: TtlBounds = getattr(self, name)
            if not 0 < bounds.min_ms <= bounds.default_ms <= bounds.max_ms:
                raise ValueError(f"{name}: need 0 < min <= default <= max")


class Router(Protocol):
    """What to do with a namespace homed on another relay (federation's seam)."""

    def refuse(self, ns: str) -> ProtocolError | None:
        """An error for namespaces this relay cannot serve, or ``None`` to serve it."""


class HomeOnly:
    """The router of a relay without federation: it serves its own namespaces only."""

    def __init__(self, name: str) -> None:
        self.name = name

    def refuse(self, ns: str) -> ProtocolError | None:
        home = ns.rpartition("@")[2]  # the same rule as Event.home
        if home == self.name:
            return None
        return ProtocolError(
            ErrorCode.NOT_HOME, f"{ns} is homed on relay {home!r}; this relay is {self.name!r}"
        )


Fold = Callable[[Record], None]

RECORD_OVERHEAD = 400
MARKS_KEPT = 4096  # pruned marks made for peers, the latest (a dict in insertion order)
"""Bytes a cached record costs beyond its event and receipt bytes (objects, dicts)."""

STOPPING_REASON = "the relay is stopping; publish again once it is back"
MAX_WAITING_PER_PARKED = 8
"""Publishes of one parked event answered when it is: re-publishes beyond are refused."""

QUICK_FIND = 16
"""Ids a quick store looks up on the event loop rather than on a thread."""

OUTCOME_LOOKAHEAD = 16
"""How many records past a request :meth:`RelayNode.outcome_behind` looks at for its
outcome: it is the very next record unless events left parking with the request."""

log = logging.getLogger("formicary.relay")

RESERVED = RELAY_KINDS | {COMPACTED}
"""Kinds only relays write: coordination outcomes and document snapshots."""

STATS = (
    "published",
    "duplicates",
    "rejected",
    "batches",
    "queries",
    "resyncs",
    "compactions",
    "connections",
    "slow_consumers",
)
"""The node's counters, served in ``GET /info``."""
T = TypeVar("T")


class Ticket:
    """One publish on its way through the node.

    ``done`` is set once the answer is final: the event's record is committed, or it
    is a duplicate (of a record that may still be on its way to the disk: answering
    waits for that commit too), or it was refused. ``decided`` is set with ``done``, or
    earlier when the event parks to wait for its dependencies, so that an
    acknowledger answers later publishes without waiting for it. A sequenced event is
    decided at its commit, not before: its acknowledger then wakes once, not twice.
    """

    __slots__ = ("abandoned", "began", "decided", "done", "duplicate", "error", "event", "located")

    def __init__(self, event: SignedEvent) -> None:
        self.event = event
        self.began = time.perf_counter()  # for the publish latency metric
        self.decided = trio.Event()
        self.done = trio.Event()
        self.duplicate = False
        self.located: Located | None = None
        self.error: ProtocolError | None = None
        self.abandoned = False  # its waiter was cancelled (see RelayNode.answer)

    @property
    def parked(self) -> bool:
        return self.decided.is_set() and not self.done.is_set()

    def _resolve(self, located: Located | None = None, error: ProtocolError | None = None) -> None:
        self.located, self.error = located, error
        self.decided.set()
        self.done.set()


class _AccessGate:
    """The sequencer's second look at a parked event as it is released: its author
    must still be allowed to write (a policy may have changed while it waited).
    It also folds every record the sequencer makes into the rules as it makes it
    (the one place they are folded while serving), so a released run is judged in
    order."""

    def __init__(self, node: RelayNode) -> None:
        self.node = node

    def refuse(self, signed: SignedEvent, now_ms: int) -> Rejected | None:
        refusal = self.node.refuse_write(signed.event, now_ms)
        return None if refusal is None else Rejected(refusal.code, refusal.reason)

    def sequenced(self, record: Record) -> None:
        self.node.fold_rules(record)


class RelayNode:
    def __init__(
        self,
        identity: Identity,
        store: Store,
        config: RelayConfig | None = None,
        *,
        router: Router | None = None,
        wall_ms: Callable[[], int] | None = None,
        mirror_store: Store | None = None,
        inbox_store: InboxStore | None = None,
    ) -> None:
        self.identity = identity
        self.store = store
        self.mirror_store = mirror_store
        """Logs of other relays' namespaces, followed and checked by federation."""
        self.federation: Federation | None = None
        """Set by a :class:`~federation.network.Federation` built on this node."""
        self.on_parked: Callable[[frozenset[bytes]], None] | None = None
        """Told the ids an event waits for when it parks (federation fetches them)."""
        self.config = config or RelayConfig()
        self.router = router or HomeOnly(self.config.name)
        self.wall_ms = wall_ms or (lambda: time.time_ns() // 1_000_000)
        self.inboxes = Inboxes(
            inbox_store or MemoryInboxStore(),
            max_items=self.config.inbox_max_items,
            ttl_ms=self.config.inbox_ttl_ms,
            wall_ms=self.wall_ms,
            max_bytes=self.config.inbox_max_bytes,
            per_sender=self.config.inbox_per_sender,
        )
        """Sealed messages waiting for their recipients (relay/inbox.py)."""
        self.folds: list[Fold] = []  # the documents' fold is added below
        self.access = Access(
            identity.public_key, self.config.name, self.config.create, self.config.creators
        )
        """Owners and policies of namespaces (relay/access.py), folded from the logs."""
        self.entities = Entities()
        """Single-writer entities (relay/entities.py), folded from the logs."""
        self.contracts = Contracts()
        """Registered event kinds and their schemas (relay/contracts.py)."""
        heads = store.heads()
        self.sequencer = Sequencer(
            identity.public_key, heads, limits=self.config.sequencer, gate=_AccessGate(self)
        )
        # Coordination state is a fold of the logs: rebuild it before serving anyone.
        self.coordination = Host(
            identity.public_key,
            self.config.claim_ttl,
            self.config.lock_ttl,
            initial_stake=self.config.initial_stake,
            half_life_ms=self.config.reputation_half_life_ms,
        )
        self._outcomes: dict[bytes, Located] = {}  # request id -> its outcome, recent ones
        self._attached: dict[tuple[str, bytes], int] = {}  # open connections per member
        self._unanswered: list[tuple[str, bytes, Outcome]] = []

        def answered(request_id: bytes, outcome: Record) -> None:
            self._outcomes[request_id] = Located(outcome.ns, outcome.seq, outcome.hlc)
            if len(self._outcomes) > self.config.sequencer.known_capacity:
                del self._outcomes[next(iter(self._outcomes))]

        self.docs = DocHost(
            max_live=self.config.max_live_docs, compact_every=self.config.doc_compact_every
        )
        for ns in store.namespaces():
            records = self.docs.rebuild(self._folding(store.scan(ns)))
            self._unanswered += self.coordination.rebuild(records, answered)
        self._committed: dict[str, int] = {ns: head.seq for ns, head in heads.items()}
        self.mirror_heads: dict[str, Head] = mirror_store.heads() if mirror_store else {}
        for ns, head in self.mirror_heads.items():
            self._committed[ns] = head.seq
            assert mirror_store is not None
            for _ in self._folding(mirror_store.scan(ns)):  # a mirror enforces its home's rules
                pass
        self._changed: dict[str, trio.Event] = {}
        self._recent: dict[str, dict[int, Record]] = {}
        # Every cached record in commit order, for the relay-wide byte budget. Evicting
        # oldest first keeps each namespace's cached seqs a contiguous tail of its log.
        self._recent_order: deque[tuple[str, int, int]] = deque()
        self._recent_size = 0
        self._marks: dict[bytes, bytes] = {}
        self._pending: list[Record] = []
        self._queued = 0  # records ever put in _pending
        self._flushed = 0  # ... and ever committed from it
        # Tickets of sequenced events, each with the _queued count its record makes:
        # answered once _flushed reaches it (FIFO, as _pending is).
        self._answer_at: deque[tuple[int, Ticket]] = deque()
        self._pending_ready = trio.Event()
        self._drained = trio.Event()
        self._waiting_tickets: dict[bytes, list[Ticket]] = {}
        self._timers_changed = trio.Event()
        self._admit_tx, self._admit_rx = trio.open_memory_channel[Ticket](self.config.max_inflight)
        self._read_lock = trio.Lock()
        self._write_lock = trio.Lock()  # one writer connection: appends and prunes take turns
        self._find_lock = trio.Lock()
        self._mirror_lock = trio.Lock()
        self.folds.append(self.docs.on_committed)
        self.stats = dict.fromkeys(STATS, 0)
        self.stopping = False
        """Set by :meth:`stop_admitting`: a clean stop is under way."""
        self.connections: set[Any] = set()
        """The connections open now (relay/server.py): a clean stop lets each finish
        sending its answers."""
        self._deciding = False
        self._committing = False
        self._progress = trio.Event()  # set (and replaced) as batches are decided, committed
        self.metrics = Metrics(self)
        """What ``GET /metrics`` serves (relay/metrics.py)."""
        self.limiter = Limiter(self.config.rate_limits)
        """Rate limits and connection caps (relay/limits.py)."""
        self.signatures = SignatureChecker(self.config.verify_workers)
        """Checks publishes' signatures, on the loop or in processes (relay/signatures.py)."""
        self._stats_changed = trio.Event()
        self._stat_waiters = 0

    def count(self, stat: str) -> None:
        """Add one to a counter of :attr:`stats` and wake :meth:`wait_stat` callers."""
        self.stats[stat] += 1
        if self._stat_waiters:  # keep the hot path cheap
            self._stats_changed.set()
            self._stats_changed = trio.Event()
            self._stat_waiters = 0
        self._stat_waiters = 0

    async def wait_stat(self, stat: str, at_least: int) -> None:
        """Return once counter ``stat`` has reached ``at_least``."""
        while self.stats[stat] < at_least:
            self._stat_waiters += 1  # reset by count() when it wakes us
            await self._stats_changed.wait()

    # -- running -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the node's loops until cancelled."""
        self._answer_unanswered()
        # One timer pass at start: what the crash kept the timer from writing (an
        # auction's award whose order was done meanwhile) has no deadline left to wake it.
        self._timers_changed.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sequencing_loop)
            nursery.start_soon(self._commit_loop)
            nursery.start_soon(self._expiry_loop)
            nursery.start_soon(self._compaction_loop)
            nursery.start_soon(self._inbox_expiry_loop)
            nursery.start_soon(self.signatures.run)
            task_status.started()

    async def _inbox_expiry_loop(self) -> None:
        """Expire undelivered messages; a minute late at most (or a tenth of the TTL)."""
        every = min(60.0, self.config.inbox_ttl_ms / 10_000)
        while True:
            await trio.sleep(every)
            await self.inboxes.expire()

    # -- publishing -------------------------------------------------------------------

    async def admit(self, event: SignedEvent) -> Ticket:
        """Queue a verified event for sequencing; waits only while the queue is full."""
        ticket = Ticket(event)
        refusal = self.router.refuse(event.event.ns)
        if self.stopping:
            refusal = ProtocolError(ErrorCode.SHUTTING_DOWN, STOPPING_REASON)
        if refusal is None and event.event.kind in RESERVED:
            reason = f"{event.event.kind} is written by relays only"
            refusal = ProtocolError(ErrorCode.RESERVED_KIND, reason)
        if refusal is None and event.event.kind in DOC_KINDS:
            try:
                check_event(event.event, self.identity.public_key)
            except ProtocolError as exc:
                refusal = exc
        if refusal is not None:
            ticket._resolve(error=refusal)
            return ticket
        try:
            self._admit_tx.send_nowait(ticket)
        except trio.WouldBlock:
            await self._admit_tx.send(ticket)
        return ticket

    def answer_nowait(self, ticket: Ticket) -> Record | None:
        """:meth:`answer` when the outcome is already committed and in memory, else None.

        Raises :class:`ProtocolError` when the event was rejected.
        """
        if not ticket.done.is_set():
            return None
        if ticket.error is not None:
            raise ticket.error
        located = ticket.located
        assert located is not None
        if self.head(located.ns) < located.seq:
            return None
        return self._recent.get(located.ns, {}).get(located.seq)

    async def answer(self, ticket: Ticket) -> Record:
        """Wait until the ticket's event is committed and return its record.

        Raises :class:`ProtocolError` when the event was rejected.
        """
        ticket.abandoned = False
        try:
            await ticket.done.wait()
        except trio.Cancelled:
            # Its connection closed, say. It is still answered (a join's teardown may
            # wait for it), but no longer holds one of its event's MAX_WAITING_PER_PARKED
            # places: a peer link that drops and sends its writes again must not use
            # them up and be refused for it.
            ticket.abandoned = True
            raise
        if ticket.error is not None:
            raise ticket.error
        assert ticket.located is not None
        return await self.committed_record(ticket.located.ns, ticket.located.seq)

    async def publish(self, event: SignedEvent) -> Record:
        """Admit and answer in one call (in-process publishers and tests)."""
        return await self.answer(await self.admit(event))

    def stop_admitting(self) -> None:
        """From now on publishes are answered 5002 ``shutting_down`` (a clean stop)."""
        self.stopping = True

    async def settle(self) -> None:
        """Return once every publish admitted so far is sequenced and committed (or
        parked, waiting for dependencies): what a clean stop waits for."""
        while (
            self._admit_rx.statistics().current_buffer_used
            or self._deciding
            or self._committing
            or self._pending
        ):
            await self._progress.wait()

    def _note_progress(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def _sequencing_loop(self) -> None:
        async for first in self._admit_rx:
            self._deciding = True  # (settle waits for it)
            # Backpressure: sequence no further ahead of the disk than a few batches.
            while len(self._pending) >= 4 * self.config.commit_batch:
                self._drained = trio.Event()
                await self._drained.wait()
            batch = [first]
            while len(batch) < self.config.commit_batch:
                try:
                    batch.append(self._admit_rx.receive_nowait())
                except trio.WouldBlock:
                    break
            events = [t.event for t in batch]
            unknown = self.sequencer.unknown(events)
            if unknown:
                found: dict[bytes, Located] = {}
                asked: set[bytes] = set()
                async with self._find_lock:  # not behind replays: publishing must not wait
                    # A commit while this waits (for the lock, for the store) can push
                    # ids the sequencer knew, so did not name, out of its bounded
                    # cache: ask about those too, until none is left unasked.
                    while unknown:
                        asked |= unknown
                        if self.store.quick_finds and len(unknown) <= QUICK_FIND:
                            # At low load every batch is an event or two: the thread hop
                            # would cost several times the lookup (bench/scale.py).
                            found.update(self.store.find(unknown))
                        else:
                            found.update(await self._call(self.store.find, unknown))
                        rest = unknown - found.keys()
                        if self.mirror_store is not None and rest:
                            mirror = self.mirror_store
                            found.update(await self._call(mirror.find, rest, store=mirror))
                        unknown = self.sequencer.unknown(events) - asked
                self.sequencer.learn(found)  # and no await from here to the offers
            now = self.wall_ms()
            for ticket in batch:
                self._decide(ticket, now)
            if self._pending:
                self._pending_ready.set()
            self._deciding = False
            self._note_progress()

    def _decide(self, ticket: Ticket, now: int) -> None:
        event = ticket.event
        if self.sequencer.locate(event.id) is None:  # (a duplicate gets its receipt)
            # Here, in log order: may its author write? does its document exist?
            try:
                refusal = self.refuse_write(event.event, now)
                if refusal is None and event.event.kind in DOC_KINDS:
                    refusal = self.docs.refuse(event.event)
            except Exception:  # our bug on a crafted event: refuse it, not stop the relay
                log.exception("checking an event failed", extra=about(event.id))
                refusal = ProtocolError(ErrorCode.BAD_EVENT, "the relay could not check it")
            if refusal is not None:
                self.count("rejected")
                ticket._resolve(error=refusal)
                return
        outcome = self.sequencer.offer(ticket.event, now)
        if isinstance(outcome, Sequenced):
            self._waiting_tickets.setdefault(ticket.event.id, []).append(ticket)
            self._sequenced(outcome.records, now)
        elif isinstance(outcome, Duplicate):
            ticket.duplicate = True
            self.count("duplicates")
            ticket._resolve(outcome.located)
        elif isinstance(outcome, Parked):
            waiting = self._waiting_tickets.setdefault(ticket.event.id, [])
            # Abandoned ones are few: each needs a connection closed, and all are
            # answered (or refused) within park_timeout_ms.
            if sum(not t.abandoned for t in waiting) >= MAX_WAITING_PER_PARKED:
                # Re-publishing a parked event must not buy memory: one answer suffices.
                reason = "this event is parked already; retry once it is answered"
                self.count("rejected")
                ticket._resolve(error=ProtocolError(ErrorCode.MISSING_DEPS, reason))
                return
            ticket.duplicate = bool(waiting)  # a re-publish of what is parked already
            if not waiting and self.on_parked is not None:
                self.on_parked(outcome.missing)
            waiting.append(ticket)
            ticket.decided.set()
            self._timers_changed.set()
        else:
            assert isinstance(outcome, Rejected)
            self.count("rejected")
            ticket._resolve(error=ProtocolError(outcome.code, outcome.reason))

    def _sequenced(self, records: Sequence[Record], now: int) -> None:
        """Queue newly sequenced records for commit, answer their tickets, and append
        the coordination outcome of each request right behind it (same batch).

        Requests are decided strictly in seq order, as a replay of the log would: a
        step's records are all decided before any outcome is sequenced, and what an
        outcome releases from parking (it gets later seqs) waits for a later step.
        """
        steps: deque[Sequence[Record]] = deque([records])
        while steps:
            self._answer_refused()
            step = steps.popleft()
            self._pending.extend(step)  # in seq order: outcomes come later still
            first = self._queued + 1  # the _queued count its first record makes
            self._queued += len(step)
            decided = []
            for position, record in enumerate(step, start=first):
                self.count("published")
                # (access, entities, contracts: folded by the gate as it was sequenced)
                self.docs.on_sequenced(record)
                outcome = self.coordination.on_sequenced(record)
                if self.coordination.routed:  # a notice is due: wake the timer
                    self.coordination.routed = False
                    self._timers_changed.set()
                if outcome is not None:
                    decided.append((record, outcome))
                located = Located(record.ns, record.seq, record.hlc)
                for answered in self._waiting_tickets.pop(record.id, ()):
                    answered.located = located  # answered at its commit
                    self._answer_at.append((position, answered))
            for record, outcome in decided:
                released = self._offer_own(record.ns, outcome, (record.id,), now)
                head = released[0]
                self._remember_outcome(record.id, Located(head.ns, head.seq, head.hlc))
                steps.append(released)

    def refuse_write(self, event: Event, now_ms: int) -> ProtocolError | None:
        """Why an event may not be sequenced now by the rules folded from the logs
        (access control, single-writer entities), or ``None``."""
        refusal = self.access.refuse(event, now_ms)
        if refusal is None and event.author != self.identity.public_key:
            refusal = self.entities.refuse(event, event.author, self.role_of)
        if refusal is None and event.author != self.identity.public_key:
            refusal = self.contracts.refuse(event)
        return refusal

    def role_of(self, ns: str, key: bytes) -> str:
        """The directory role ``key`` holds in ``ns`` (kept after it leaves), or ""."""
        coordinator = self.coordination.coordinators.get(ns)
        member = coordinator.directory.members.get(key) if coordinator else None
        return member.role if member is not None else ""

    def fold_rules(self, record: Record) -> None:
        """Fold a record into the rules kept from the logs: access, entities, contracts."""
        self.access.on_sequenced(record)
        self.entities.on_sequenced(record)
        self.contracts.on_sequenced(record)

    def _folding(self, records: Iterable[Record]) -> Iterator[Record]:
        """Pass stored records through the rule folds (a restart's rebuild)."""
        for record in records:
            self.fold_rules(record)
            yield record

    def _answer_refused(self) -> None:
        """Answer the released events the access gate refused (see _AccessGate)."""
        refused, self.sequencer.refused = self.sequencer.refused, []
        for signed, rejected in refused:
            self.count("rejected")
            for ticket in self._waiting_tickets.pop(signed.id, ()):
                ticket._resolve(error=ProtocolError(rejected.code, rejected.reason))

    def _remember_outcome(self, request_id: bytes, located: Located) -> None:
        self._outcomes[request_id] = located
        self._timers_changed.set()  # a lease may have begun or moved
        if len(self._outcomes) > self.config.sequencer.known_capacity:
            del self._outcomes[next(iter(self._outcomes))]

    def _offer_own(
        self, ns: str, outcome: Outcome, deps: tuple[bytes, ...], now: int
    ) -> tuple[Record, ...]:
        """Sequence an event the relay itself authors; returns it and what it released."""
        event = Event(
            ns=ns,
            kind=outcome.kind,
            author=self.identity.public_key,
            body=outcome.body,
            deps=deps,
            ts=now,
        )
        result = self.sequencer.offer(sign_event(event, self.identity.sign), now)
        # Its deps were just sequenced and its id is new: anything else is our bug.
        assert isinstance(result, Sequenced), result
        return result.records

    def _append_own(self, ns: str, outcome: Outcome, deps: tuple[bytes, ...], now: int) -> Located:
        """Sequence a relay-authored event and process it like any other record."""
        records = self._offer_own(ns, outcome, deps, now)
        self._sequenced(records, now)
        return Located(records[0].ns, records[0].seq, records[0].hlc)

    def _answer_unanswered(self) -> None:
        """Append the outcomes a crash kept out of the log (see Host.rebuild), and the
        leaves of members present by a connection: a starting relay has none."""
        now = self.wall_ms()
        self._answer_requests(now)
        # After the answers: a join answered now must read as joined, then left.
        for ns, outcome in self.coordination.restarted(now):
            self._append_own(ns, outcome, (), now)
        self._pending_ready.set()

    def _answer_requests(self, now: int) -> None:
        if not self._unanswered:
            return
        self.sequencer.learn(self.store.find(req for _, req, _ in self._unanswered))
        for ns, req, outcome in self._unanswered:
            self._remember_outcome(req, self._append_own(ns, outcome, (req,), now))
        self._unanswered = []
        self._pending_ready.set()

    def outcome_of(self, request_id: bytes) -> Located | None:
        """Where the relay's outcome of a coordination request sits, if remembered."""
        return self._outcomes.get(request_id)

    async def outcome_behind(self, request: Record) -> Record | None:
        """The outcome of ``request`` found in the log right behind it: for a request
        whose outcome is no longer remembered (an old duplicate, protocol 6.4), so
        that its ack carries it to an agent that may not read the log. ``None`` for
        a record that is not a request, and past :data:`OUTCOME_LOOKAHEAD` records:
        an outcome a restart wrote (8.7), or one behind many events that left
        parking with the request (8.2). The usual outcome, the very next record, costs
        one read of one record; the others, one more read."""
        if request.kind not in REQUEST_KINDS:
            return None
        key = self.identity.public_key
        found = list(await self.read(request.ns, request.seq + 1, 1))
        if found and not answers(found[0], request.id, key):  # (rare: the rest in one read)
            found += await self.read(request.ns, request.seq + 2, OUTCOME_LOOKAHEAD - 1)
        return next((record for record in found if answers(record, request.id, key)), None)

    async def _expiry_loop(self) -> None:
        while True:
            times = [self.sequencer.next_deadline_ms(), self.coordination.next_expiry_ms()]
            deadline = min((t for t in times if t is not None), default=None)
            if deadline is None:
                await self._timers_changed.wait()
            else:
                with trio.move_on_after(max(0, deadline - self.wall_ms()) / 1000):
                    await self._timers_changed.wait()
            self._timers_changed = trio.Event()
            now = self.wall_ms()
            for event, rejected in self.sequencer.expire(now):
                error = ProtocolError(rejected.code, rejected.reason)
                self.count("rejected")
                for ticket in self._waiting_tickets.pop(event.id, ()):
                    ticket._resolve(error=error)
            for ns, outcome in self.coordination.due(now):
                self._append_own(ns, outcome, (), now)
            if self._pending:
                self._pending_ready.set()

    # -- querying ---------------------------------------------------------------------

    async def query(self, ns: str, q: str, args: dict[str, Any]) -> Any:
        """Answer a query about the coordination state of ``ns`` (see queries.py).

        The state is read at once — it includes what is sequenced, so an agent reads
        its own writes — and the answer is returned only once everything it reflects
        is committed: a crash must not take back what an agent was told.
        """
        if not NS_RE.fullmatch(ns):
            raise ProtocolError(ErrorCode.BAD_QUERY, f"{ns!r} is not a namespace")
        refusal = self.router.refuse(ns)
        if refusal is not None:
            raise refusal
        self.count("queries")
        if q == POLICY:
            return self._policy_answer(ns, args)
        if q in ("schema.get", "schema.list"):
            return self._schema_answer(ns, q, args)
        coordinator = self.coordination.coordinators.get(ns) or Coordinator()  # nothing yet
        budget = self.config.max_frame - 1024  # room for the frame around the answer
        answer = queries.answer(coordinator, q, args, self.wall_ms(), budget)
        head = self.sequencer.heads.get(ns)
        if head is not None:
            await self.wait_beyond(ns, head.seq - 1)
        return answer

    def _schema_answer(self, ns: str, q: str, args: dict[str, Any]) -> dict[str, Any]:
        """The registry of event kinds (relay/contracts.py): ``schema.list`` names
        the kinds; ``schema.get {kind}`` gives every version of one."""
        mine = {kind: c for (n, kind), c in self.contracts.kinds.items() if n == ns}
        if q == "schema.list":
            if args:
                raise ProtocolError(ErrorCode.BAD_QUERY, "schema.list takes no arguments")
            return {
                "kinds": [{"kind": k, "versions": len(c.versions)} for k, c in sorted(mine.items())]
            }
        kind = args.get("kind")
        if set(args) != {"kind"} or not isinstance(kind, str):
            raise ProtocolError(ErrorCode.BAD_QUERY, "schema.get takes {kind}")
        contract = mine.get(kind)
        if contract is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no schema registered for {kind}")
        versions = [
            {"version": n, "schema": schema, "compatible": compatible}
            for n, (schema, compatible) in enumerate(contract.versions, start=1)
        ]
        return {"kind": kind, "owner": contract.owner, "versions": versions}

    def _policy_answer(self, ns: str, args: dict[str, Any]) -> dict[str, Any]:
        if args:
            raise ProtocolError(ErrorCode.BAD_QUERY, f"{POLICY} takes no arguments")
        policy = self.access.policies.get(ns)
        if policy is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"{ns} has no events yet")
        return policy.as_body()

    # -- presence ---------------------------------------------------------------------

    def attach(self, ns: str, agent: bytes) -> None:
        """A connection of ``agent`` joined the directory of ``ns`` (connection presence)."""
        self._attached[(ns, agent)] = self._attached.get((ns, agent), 0) + 1

    def detach(self, ns: str, agent: bytes) -> None:
        """That connection closed: with the agent's last one gone, it has left."""
        left = self._attached.get((ns, agent), 0) - 1
        if left > 0:
            self._attached[(ns, agent)] = left
            return
        self._attached.pop((ns, agent), None)
        coordinator = self.coordination.coordinators.get(ns)
        now = self.wall_ms()
        outcome = coordinator.disconnected(agent, now, "disconnected") if coordinator else None
        if outcome is not None:
            self._append_own(ns, outcome, (), now)
            self._pending_ready.set()

    # -- documents --------------------------------------------------------------------

    async def open_doc(self, ns: str, name: str) -> LiveDoc:
        """The live document ``name`` of ``ns`` (see relay/documents.py)."""
        refusal = self.router.refuse(ns)
        if refusal is not None:
            raise refusal
        return await self.docs.open(ns, name, self)

    async def _compaction_loop(self) -> None:
        """Snapshot documents with many updates, then drop the bytes the snapshot covers
        (the updates folded into it, and the earlier snapshots it supersedes).

        The snapshot is a relay event in the same log (``doc.compacted``: the merged
        update of everything up to ``upto``), so a restart, a mirror or an auditor
        sees it; only once it is committed are the covered updates' bytes pruned.
        """
        docs = self.docs
        while True:
            await docs.due_changed.wait()
            docs.due_changed = trio.Event()
            while docs.due:
                live = docs.live.get(docs.due.pop())
                if live is not None:
                    await self._compact(live)

    async def _compact(self, live: LiveDoc) -> None:
        # Taken at once: updates committed while this snapshot commits must not make
        # the document due again, or a busy one gets a second snapshot right after.
        upto, covered, live.uncompacted = live.seq, live.uncompacted, []
        state = live.state()
        if len(state) > self.config.max_frame - 4096:
            # A snapshot must fit in a frame to be replayed; this document stays long.
            log.warning(
                "%s/%s: snapshot of %d bytes is over max_frame", live.ns, live.name, len(state)
            )
            return
        body = {"doc": live.name, "upto": upto, "epoch": live.epoch, "state": state}
        placed = self._append_own(live.ns, Outcome(COMPACTED, body), (), self.wall_ms())
        self._pending_ready.set()
        await self.wait_beyond(placed.ns, placed.seq - 1)
        self.docs.folded(live.ns, live.name, upto)
        pruned = covered + self.docs.superseded(live.ns, live.name, upto)
        async with self._write_lock:
            await self._call(self.store.prune, live.ns, pruned)
        cached = self._recent.get(live.ns, {})
        for seq in pruned:  # the cache must say what the store says
            if seq in cached:
                cached[seq] = replace(cached[seq], event=b"", sig=b"")
        self.count("compactions")

    # -- committing -------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            await self._pending_ready.wait()
            self._pending_ready = trio.Event()
            while self._pending:
                batch = self._pending[: self.config.commit_batch]
                del self._pending[: len(batch)]
                self._drained.set()
                batch = self._seal_heads(batch)
                self._committing = True
                async with self._write_lock:
                    began = time.perf_counter()
                    await self._call(self.store.append, batch)
                    self.metrics.commit_seconds.observe(time.perf_counter() - began)
                self._committed_batch(batch)
                self._flushed += len(batch)
                answer_at = self._answer_at
                while answer_at and answer_at[0][0] <= self._flushed:
                    ticket = answer_at.popleft()[1]
                    ticket._resolve(ticket.located)
                self._committing = False
                self._note_progress()
                self.count("batches")

    def _seal_heads(self, batch: Sequence[Record]) -> list[Record]:
        """Seal the last record of each namespace in the batch: one signature each.

        An ``ns.policy`` is sealed too: a reader it shuts out is sent the log up to it
        and no further, and a mirroring relay stores nothing that no seal covers, so
        without one there it would fetch that run again and again and never get it.
        So is the record that brings a namespace's unsealed run to
        :data:`MAX_UNSEALED_BYTES` or to :data:`MAX_UNSEALED` records: a mirror holds
        a run in memory until its seal, and refuses a longer one (a batch of large
        events, or a ``commit_batch`` set higher than the default, would otherwise
        make runs no mirror could take)."""
        last: dict[str, int] = {record.ns: i for i, record in enumerate(batch)}
        cuts = set(last.values())
        run: dict[str, tuple[int, int]] = {}  # per namespace, since its last seal here:
        for i, record in enumerate(batch):  # records and bytes
            count, held = run.get(record.ns, (0, 0))
            count, held = count + 1, held + unsealed_bytes(record.event, record.sig, record.receipt)
            if record.kind == POLICY or held >= MAX_UNSEALED_BYTES or count >= MAX_UNSEALED:
                cuts.add(i)
            run[record.ns] = (0, 0) if i in cuts else (count, held)
        sealed = list(batch)
        for i in cuts:
            signature = seal_digest(digest(sealed[i].receipt), self.identity.sign)
            sealed[i] = replace(sealed[i], seal=signature)
        return sealed

    def _committed_batch(self, batch: Sequence[Record], *, sequenced: bool = True) -> None:
        if sequenced:
            self.sequencer.committed(record.id for record in batch)
        events_in = self.metrics.events_in
        for record in batch:
            self._cache(record)
            self._committed[record.ns] = record.seq
            if sequenced:  # the folds are of this relay's own logs
                count_kind(events_in, record.kind)
                for fold in self.folds:
                    fold(record)
        for ns in {record.ns for record in batch}:
            changed = self._changed.pop(ns, None)
            if changed is not None:
                changed.set()

    def _cache(self, record: Record) -> None:
        """Keep a committed record in memory, within the relay-wide ``recent_bytes``."""
        self._recent.setdefault(record.ns, {})[record.seq] = record
        size = len(record.event) + len(record.receipt) + RECORD_OVERHEAD
        self._recent_order.append((record.ns, record.seq, size))
        self._recent_size += size
        while self._recent_size > self.config.recent_bytes:
            ns, seq, old_size = self._recent_order.popleft()
            self._recent_size -= old_size
            cached = self._recent[ns]
            del cached[seq]
            if not cached:
                del self._recent[ns]

    # -- mirrors ----------------------------------------------------------------------

    def is_home(self, ns: str) -> bool:
        """True when this relay sequences ``ns`` (it is ``name@<this relay>``)."""
        return ns.rpartition("@")[2] == self.config.name

    def pruned_mark_of(self, record: Record) -> bytes | None:
        """The pruned mark a record without bytes is sent to a peer with (4.5, 14.8),
        or ``None`` when this relay has none to give.

        The home makes it as it sends (the latest few kept: a peer catching up reads
        many): its own store needs none (a later snapshot covers each pruned record,
        10.2), and pruning stays one UPDATE. A mirror's record holds its home's mark
        as its ``sig``; one taken before marks existed holds none."""
        if not self.is_home(record.ns):
            return record.sig or None
        if record.kind not in PRUNABLE:  # not emptied by compaction: vouch for nothing
            return None
        mark = self._marks.get(record.id)
        if mark is None:
            mark = self._marks[record.id] = pruned_mark(record.id, self.identity.sign)
            if len(self._marks) > MARKS_KEPT:
                del self._marks[next(iter(self._marks))]
        return mark

    async def append_mirrored(self, records: Sequence[Record]) -> None:
        """Store records of a foreign namespace, checked by the caller against their
        home's key, exactly as the home sequenced them; then serve them like local
        records and release events parked on them (cross-relay causality)."""
        mirror = self.mirror_store
        assert mirror is not None and records and not self.is_home(records[0].ns)
        async with self._mirror_lock:
            await self._call(mirror.append, records, store=mirror)
        for record in records:
            self.fold_rules(record)
        last = records[-1]
        self.mirror_heads[last.ns] = Head(last.ns, last.seq, digest(last.receipt), last.hlc)
        now = self.wall_ms()
        found = {record.id: Located(record.ns, record.seq, record.hlc) for record in records}
        released = self.sequencer.arrived(found, now)
        self._committed_batch(records, sequenced=False)
        self._answer_refused()
        if released:
            self._sequenced(released, now)
            self._pending_ready.set()

    async def find(self, ids: list[bytes]) -> dict[bytes, Located]:
        """Where committed events are, in this relay's logs or its mirrors."""
        async with self._find_lock:
            found = await self._call(self.store.find, ids)
            if self.mirror_store is not None and len(found) < len(ids):
                rest = [i for i in ids if i not in found]
                found.update(
                    await self._call(self.mirror_store.find, rest, store=self.mirror_store)
                )
        return found

    # -- reading ----------------------------------------------------------------------

    def head(self, ns: str) -> int:
        """The last committed seq of ``ns`` (0 for an empty namespace)."""
        return self._committed.get(ns, 0)

    def namespaces(self) -> list[str]:
        """The namespaces this relay homes and has records of."""
        return sorted(ns for ns in self._committed if self.is_home(ns))

    async def wait_beyond(self, ns: str, seq: int) -> None:
        """Return once the committed head of ``ns`` is past ``seq``."""
        while self.head(ns) <= seq:
            changed = self._changed.get(ns)
            if changed is None:
                changed = self._changed[ns] = trio.Event()
            try:
                await changed.wait()
            finally:
                # The last waiter of a namespace that never changed takes its event
                # along, so subscriptions to idle namespaces leave nothing behind.
                idle = not changed.is_set() and not changed.statistics().tasks_waiting
                if idle and self._changed.get(ns) is changed:
                    del self._changed[ns]

    async def committed_record(self, ns: str, seq: int) -> Record:
        await self.wait_beyond(ns, seq - 1)
        records = await self.read(ns, seq, 1)
        return records[0]

    async def read(self, ns: str, start: int, limit: int) -> list[Record]:
        """Committed records of ``ns`` from ``start``: from memory when recent."""
        end = min(self.head(ns), start + limit - 1)
        if end < start:
            return []
        recent = self._recent.get(ns, {})
        if start in recent:
            return [recent[seq] for seq in range(start, end + 1)]
        store = self.store if self.is_home(ns) or self.mirror_store is None else self.mirror_store
        async with self._read_lock:
            return await self._call(store.read, ns, start, end - start + 1, store=store)

    async def _call(self, method: Callable[..., T], *args: Any, store: Store | None = None) -> T:
        """Run a store method: in a worker thread when it may block, inline if not."""
        if (store or self.store).blocking:
            return await trio.to_thread.run_sync(method, *args)
        await trio.lowlevel.checkpoint()
        return method(*args)
