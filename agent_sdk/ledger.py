"""The work ledger from an agent's side: create, claim, renew, release, update, note, next.

Each call publishes a ``wo.*`` request and returns the relay's outcome, which arrives
with the ack (the relay decides requests as it sequences them; for an old duplicate
it finds the outcome in its log), or, when the ack comes without it all the same, is
read from the log. A refusal raises :class:`LedgerRefusal` carrying the relay's
``problem`` (``held``, ``not_holder``, ``stale_token``, ``not_found``,
``bad_transition``, ...) and, for ``held``, who holds the order until when. An
outcome that cannot be had (not with the ack, and not read from the log in time)
raises :class:`OutcomeUnknown`, which is no refusal.

``async with ledger.hold(order) as claim:`` claims, renews in the background at a
third of the TTL, exposes ``claim.token`` for fencing the agent's own external writes,
and releases on exit — also on cancellation. If a renewal is refused (the lease was
lost), the body is cancelled and :class:`LeaseLost` is raised: work done past that
point could collide with the next holder's.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from agent_sdk.client import Delivery, PendingPublish, Published, RelayClient
from agent_sdk.errors import ErrorCode, ProtocolError, as_told, unwrap_single
from agent_sdk.wire import Event, sign_event

Items = list[dict[str, Any]]
"""A list query's items (``list`` is also a method name in :class:`Ledger`)."""

CLAIM_TIMEOUT = 30.0
"""Seconds to wait for the relay's answer to a claim or a release (hold), and for an
outcome the ack did not carry to be read from the log (every request)."""


log = logging.getLogger("formicary.sdk")


class LedgerRefusal(Exception):
    """The relay refused a ledger request."""

    def __init__(self, problem: str, reason: str, holder: dict[str, Any] | None) -> None:
        super().__init__(f"{problem}: {reason}")
        self.problem = problem
        self.reason = reason
        self.holder = holder


class OutcomeUnknown(Exception):
    """The relay sequenced a request, but its outcome could not be had: the ack did not
    carry it (rare: an old duplicate whose outcome the relay did not find right behind
    it, protocol 6.4) and it could not be read from the log within
    :data:`CLAIM_TIMEOUT` (the relay that sequenced it is out of reach, say), or this
    key may not read the namespace.

    Not a refusal: the request may have been granted (a claim so granted is held until
    its lease runs out). Asked again with the same ``nonce`` and ``ts``
    (:meth:`Ledger.request`), it is the same request and gets that outcome, unless
    ``final``: this key may not read the log, so asking again gives no more."""

    def __init__(self, reason: str, nonce: bytes | None, ts: int, *, final: bool = False) -> None:
        super().__init__(reason)
        self.nonce = nonce
        self.ts = ts
        self.final = final


class LeaseLost(Exception):
    """A held order's lease could not be renewed; its body was stopped."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A granted lease on a work order."""

    order: str
    token: int
    expires_ms: int


class Ledger:
    """The work ledger of one namespace, through one client."""

    def __init__(self, client: RelayClient, ns: str) -> None:
        self.client = client
        self.ns = ns
        # The claims a hold runs on now, and those of them the agent ended itself (a
        # hold asks about its own claim; nobody asks about the others, and a
        # long-lived agent must not keep every claim it ended).
        self._held: set[tuple[str, int]] = set()
        self._ended: set[tuple[str, int]] = set()
        self._ending: dict[tuple[str, int], trio.Event] = {}  # asked to end, not answered
        # Ends sent whose caller left before their answer (cancelled, say): the relay
        # still decides them, and a hold learns from the handle whether they ended it.
        self._unread: dict[tuple[str, int], PendingPublish] = {}

    async def request(
        self,
        kind: str,
        body: dict[str, Any],
        *,
        nonce: bytes | None = None,
        ts: int | None = None,
        on_sent: Callable[[PendingPublish], None] | None = None,
    ) -> dict[str, Any]:
        """Publish one request; return the outcome body or raise :class:`LedgerRefusal`.

        A caller that must survive losing the answer (the relay or the connection went
        away mid-request) passes the same ``nonce`` and ``ts`` when it asks again: the
        request is then the same event, and the relay answers it with the outcome it
        decided the first time, if it got that far, instead of deciding it twice. (When
        the ack comes without that outcome, it is read from the namespace log, for up
        to :data:`CLAIM_TIMEOUT`; if that fails, or this key may not read the namespace,
        :class:`OutcomeUnknown` is raised, never a refusal.) ``on_sent`` is told the
        publish's handle once it is on its way (:meth:`RelayClient.publish_signed`)."""
        # A fresh nonce by default: the same request twice in one millisecond would
        # otherwise be the same event, and the relay would answer the second with the
        # first's outcome (idempotence).
        nonce = self.client.nonce() if nonce is None else nonce
        ts = self.client.clock_ms() if ts is None else ts  # (named by OutcomeUnknown)
        published = await self.client.publish(
            self.ns, kind, body, nonce=nonce, ts=ts, on_sent=on_sent
        )
        return await self._answer(published, nonce, ts)

    async def _answer(self, published: Published, nonce: bytes | None, ts: int) -> dict[str, Any]:
        """The outcome body of the acked request (``nonce``, ``ts``), or
        :class:`LedgerRefusal`, or :class:`OutcomeUnknown`."""
        outcome = published.outcome
        if outcome is None:
            reason, final = f"no outcome read from the log in {CLAIM_TIMEOUT:g} s", False
            try:
                with trio.move_on_after(CLAIM_TIMEOUT):
                    outcome = await self._outcome_in_log(published)
            except ProtocolError as exc:
                if exc.code is not ErrorCode.FORBIDDEN:
                    raise
                reason = f"no outcome with the ack, and the log may not be read: {exc.reason}"
                final = True
            if outcome is None:
                where = f"{published.receipt.ns} seq {published.receipt.seq}"
                raise OutcomeUnknown(f"{where}: {reason}", nonce, ts, final=final)
        event = outcome.event.event
        answer = event.body
        if event.kind.endswith(".rejected"):
            raise LedgerRefusal(answer["problem"], answer["reason"], answer.get("holder"))
        return dict(answer)

    async def _outcome_in_log(self, published: Published) -> Delivery:
        """The outcome of a request acked without one: a duplicate older than the
        outcomes the relay remembers (``sequencer.known_capacity``) whose outcome the
        relay did not find right behind it either (protocol 6.4), such as a request
        sent again after a lost connection or asked again with the same nonce and ts.
        It was decided the first time, and that decision is in the
        log: the event that the relay which sequenced the request wrote, after it, with
        the request's id as its only dep (protocol 8.2). Read there rather than taken for
        a refusal: a claim granted but believed refused is held by nobody until its
        lease runs out."""
        request = published.receipt
        behind = self.client.subscribe(request.ns, start=request.seq + 1, authors=[request.relay])
        async with behind as feed:
            async for item in feed:
                if isinstance(item, Delivery) and item.event.event.deps == (request.id,):
                    return item
        raise AssertionError("a subscription ends only with an error")  # (it raised that)

    def request_later(self, kind: str, body: dict[str, Any]) -> None:
        """Publish one request without waiting for its answer: it leaves after every
        request already sent on this client, so it is decided after them."""
        client = self.client
        if client.stopped.is_set():
            log.warning("not sent, the client is stopped: %s %s", kind, body)
            return
        event = Event(
            ns=self.ns,
            kind=kind,
            author=client.identity.public_key,
            body=body,
            ts=client.clock_ms(),
            nonce=client.nonce(),
        )
        client.publish_later(sign_event(event, client.identity.sign))

    async def create(
        self,
        title: str,
        *,
        description: str = "",
        acceptance: Sequence[str] = (),
        files: Sequence[str] = (),
        verify: str = "",
        priority: int = 0,
        **contract: Any,
    ) -> str:
        body = {
            "title": title,
            "description": description,
            "acceptance": list(acceptance),
            "files": list(files),
            "verify": verify,
            "priority": priority,
            **contract,
        }
        return str((await self.request("wo.create", body))["wo"])

    async def claim(self, order: str, ttl_ms: int | None = None) -> Claim:
        return _claim(await self.request("wo.claim", with_ttl({"wo": order}, ttl_ms)))

    async def next(self, ttl_ms: int | None = None) -> Claim:
        """Find the open order of highest priority and claim it, in one step.

        Raises :class:`LedgerRefusal` ``nothing_open`` when no order is open: a worker
        waits (or subscribes to the namespace) and asks again."""
        return _claim(await self.request("wo.next", with_ttl({}, ttl_ms)))

    async def renew(self, claim: Claim, ttl_ms: int | None = None) -> Claim:
        body = with_ttl({"wo": claim.order, "token": claim.token}, ttl_ms)
        return _claim(await self.request("wo.renew", body))

    async def release(self, claim: Claim) -> None:
        async with self._ending_claim(claim) as on_sent:
            body = {"wo": claim.order, "token": claim.token}
            await self.request("wo.release", body, on_sent=on_sent)

    async def update(self, claim: Claim | str, status: str, reason: str = "") -> None:
        """Set ``done``, ``blocked``, ``open`` or ``dropped`` (or ``awaiting_approval``,
        protocol §8); a claim's token fences the move, and a claimed order refuses a
        move without one (``not_holder``)."""
        body: dict[str, Any] = {"status": status, "reason": reason}
        if not isinstance(claim, Claim):
            body["wo"] = claim
            await self.request("wo.update", body)
            return
        body.update(wo=claim.order, token=claim.token)
        async with self._ending_claim(claim) as on_sent:
            await self.request("wo.update", body, on_sent=on_sent)

    @asynccontextmanager
    async def _ending_claim(self, claim: Claim) -> AsyncIterator[Callable[[PendingPublish], None]]:
        """Mark ``claim`` ended once the block's request is answered. Meanwhile a
        renewal of :meth:`hold` refused (the end came first) waits for that answer
        before it calls the lease lost; a refused end leaves the claim as it was.

        The block passes what it yields as its request's ``on_sent``. When the block
        is left without the answer (cancelled while it was on its way, say), the
        relay may still apply the end: a renewal of the hold refused then reads the
        answer from the publish's handle (:meth:`_read_unread_end`). One never sent
        ended nothing."""
        key = (claim.order, claim.token)
        self._ending[key] = answered = trio.Event()
        sent: list[PendingPublish] = []
        try:
            yield sent.append
            if key in self._held:
                self._ended.add(key)
        except LedgerRefusal:
            raise  # answered: not ended
        except BaseException:
            if sent and key in self._held:
                self._unread[key] = sent[-1]
            raise
        finally:
            if self._ending.get(key) is answered:  # (two ends at once: the last one's)
                del self._ending[key]
            answered.set()

    async def _has_ended(self, claim: Claim) -> bool:
        """Whether this agent ended ``claim``, once an end it asked for is answered."""
        key = (claim.order, claim.token)
        answered = self._ending.get(key)
        if answered is not None:
            await answered.wait()
        return key in self._ended

    async def _read_unread_end(self, claim: Claim) -> None:
        """Learn the answer to an end of ``claim`` whose caller left before it came:
        mark the claim ended if the relay applied it. This waits as long as the relay
        takes to answer: the caller bounds it."""
        key = (claim.order, claim.token)
        unread = self._unread.pop(key, None)
        if unread is not None and await self._applied(unread):
            self._ended.add(key)

    async def _applied(self, sent: PendingPublish) -> bool:
        """Whether the relay applied a request sent earlier; False when it refused it,
        or when its answer cannot be had (the client stopped: it may be applied, but
        then calling the lease lost errs on the safe side)."""
        asked = sent.event.event
        try:
            await self._answer(await sent.wait(), asked.nonce, asked.ts)
        except (LedgerRefusal, OutcomeUnknown, ProtocolError):
            return False
        return True

    async def progress(self, claim: Claim, percent: int, message: str = "") -> None:
        """Report progress on a held order (0 to 100); its parent's holder sees it."""
        body = {"wo": claim.order, "token": claim.token, "percent": percent, "message": message}
        await self.request("wo.progress", body)

    # -- approval gates ------------------------------------------------------------

    async def ask_approval(self, claim: Claim, reason: str = "") -> None:
        """Hand a gated order to its approvers (``awaiting_approval``). The claim ends
        here: once approved, the order is open again, to be claimed and done."""
        await self.update(claim, "awaiting_approval", reason)

    async def approve(self, order: str, comment: str = "") -> None:
        """As an approver (a listed key, or a member of the gate's role)."""
        await self.request("wo.approve", {"wo": order, "comment": comment})

    async def reject(self, order: str, comment: str) -> None:
        """As an approver: the order is blocked, with ``comment`` as its reason."""
        await self.request("wo.reject", {"wo": order, "comment": comment})

    async def wait_decision(self, order: str) -> dict[str, Any]:
        """Wait until ``order`` is no longer awaiting approval; returns the decision
        (``approved``, ``by``, ``comment``, ``at_ms``). Follows the namespace live, so
        a person's click reaches the agent at once. Call it after asking: an order
        that is not awaiting approval answers at once with its latest decision, which
        is an earlier round's if this round was not asked for yet (one never decided
        waits for its first decision)."""
        decided = ("wo.approved", "wo.declined")
        async with self.client.subscribe(self.ns, kinds=decided) as feed:
            while True:
                shown = await self.show(order)  # (after subscribing: no decision is missed)
                approval = shown.get("approval")
                if approval is None:
                    raise ValueError(f"{order} needs no approval")
                if shown["status"] != "awaiting_approval" and approval["decisions"]:
                    decision: dict[str, Any] = approval["decisions"][-1]
                    return decision
                async for item in feed:
                    if isinstance(item, Delivery) and item.event.event.body.get("wo") == order:
                        break

    async def note(self, order: str | Claim, text: str) -> None:
        body: dict[str, Any] = {"text": text}
        if isinstance(order, Claim):
            body.update(wo=order.order, token=order.token)
        else:
            body["wo"] = order
        await self.request("wo.note", body)

    async def list(self, status: str | None = None, **page: int) -> Items:
        """Work orders (summaries), oldest first; every page when ``limit`` is not given."""
        args: dict[str, Any] = {} if status is None else {"status": status}
        return await self._pages("wo.list", "orders", args, page)

    async def show(self, order: str) -> dict[str, Any]:
        """One work order in full: contract, status, holder, notes and history."""
        return dict(await self.client.query(self.ns, "wo.show", {"wo": order}))

    async def locks(self) -> Items:
        """The advisory locks held now, every page."""
        args = {"limit": 1000}
        return await self.client.query_all(self.ns, "lock.list", "locks", args, _lock_name)

    # -- context, bulletin, decisions, checkpoints -------------------------------------

    async def put_context(self, body: Any, order: str | Claim | None = None) -> int:
        """Store a new version of the namespace's context, or of an order's (a holder
        passes its :class:`Claim` so the write is fenced); returns the version."""
        request: dict[str, Any] = {"body": body}
        if isinstance(order, Claim):
            request.update(wo=order.order, token=order.token)
        elif order is not None:
            request["wo"] = order
        return int((await self.request("context.put", request))["version"])

    async def pull_context(
        self, order: str | None = None, version: int | None = None
    ) -> dict[str, Any] | None:
        """The latest context (or ``version``), with ``author``, ``at_ms`` and
        ``age_ms``; ``None`` when none was ever put."""
        args: dict[str, Any] = {}
        if order is not None:
            args["wo"] = order
        if version is not None:
            args["version"] = version
        answer = await self.client.query(self.ns, "context.pull", args)
        return dict(answer) if answer["version"] else None

    async def post(self, text: str) -> int:
        """Add to the bulletin what you did (not what you intend); returns its number."""
        return int((await self.request("bulletin.post", {"text": text}))["n"])

    async def bulletin(self, after: int | None = None, limit: int = 100) -> Items:
        """Posts after number ``after``, or the latest ``limit`` ones."""
        args: dict[str, Any] = {"limit": limit}
        if after is not None:
            args["after"] = after
        return list((await self.client.query(self.ns, "bulletin.list", args))["posts"])

    async def decide(
        self,
        title: str,
        decision: str,
        *,
        context: str = "",
        rationale: str = "",
        supersedes: str | None = None,
        entity: str | None = None,
    ) -> str:
        """Record a decision (an ADR); returns its id (``adr-<n>``). ``entity`` names
        what it touches, for routing and conflicts (agent_sdk/decisions.py)."""
        body: dict[str, Any] = {
            "title": title,
            "decision": decision,
            "context": context,
            "rationale": rationale,
        }
        if supersedes is not None:
            body["supersedes"] = supersedes
        if entity is not None:
            body["entity"] = entity
        return str((await self.request("decision.add", body))["id"])

    async def decisions(self, status: str | None = None) -> Items:
        args: dict[str, Any] = {} if status is None else {"status": status}
        return await self._pages("decision.list", "decisions", args, {})

    async def checkpoint(self, name: str, seq: int, expect: int | None = None) -> None:
        """Store cursor ``seq`` under ``name``; with ``expect``, only if it is still
        at ``expect`` (else :class:`LedgerRefusal` ``changed``)."""
        body: dict[str, Any] = {"name": name, "seq": seq}
        if expect is not None:
            body["expect"] = expect
        await self.request("ckpt.set", body)

    async def get_checkpoint(self, name: str) -> int:
        """The stored cursor ``name`` (0 when never set)."""
        return int((await self.client.query(self.ns, "ckpt.get", {"name": name}))["seq"])

    async def _pages(self, q: str, key: str, args: dict[str, Any], page: dict[str, int]) -> Items:
        """Every item of a paged list query (or the one page asked for)."""
        if page:
            return list((await self.client.query(self.ns, q, {**args, **page}))[key])
        return await self.client.query_all(self.ns, q, key, args, number_of)

    # -- locks ---------------------------------------------------------------------------

    async def lock(
        self,
        name: str,
        ttl_ms: int | None = None,
        *,
        nonce: bytes | None = None,
        ts: int | None = None,
    ) -> Claim:
        """Take the advisory lock ``name`` (a path, a branch, ...); ``Claim.order`` is it.
        ``nonce`` and ``ts`` ask again for the answer to an earlier request (see
        :meth:`request`)."""
        body = with_ttl({"name": name}, ttl_ms)
        return _lock(await self.request("lock.acquire", body, nonce=nonce, ts=ts))

    async def renew_lock(self, lock: Claim, ttl_ms: int | None = None) -> Claim:
        body = with_ttl({"name": lock.order, "token": lock.token}, ttl_ms)
        return _lock(await self.request("lock.renew", body))

    async def unlock(self, lock: Claim) -> None:
        await self.request("lock.release", {"name": lock.order, "token": lock.token})

    def elect(self, name: str, ttl_ms: int = 15_000) -> AbstractAsyncContextManager[Claim]:
        """Lead ``name`` while the body runs: ``async with ledger.elect("scheduler") as
        lead:`` waits as a follower, then holds ``leader:<name>`` with a fencing token
        (``lead.token``), renewed until the body ends (agent_sdk/election.py)."""
        from agent_sdk.election import elect

        return elect(self, name, ttl_ms)

    @asynccontextmanager
    async def hold(self, order: str, ttl_ms: int = 60_000) -> AsyncIterator[Claim]:
        """Claim ``order`` for the body's duration, renewing in the background.

        The body is cancelled and :class:`LeaseLost` raised when a renewal is refused
        or is not confirmed in time to keep the lease (a partition, a stalled relay, an
        :class:`OutcomeUnknown`): past that point another agent may hold the order.
        Ending the claim from the body (``update(claim, "done")``, ``release``) simply
        ends the renewals, also when the call is cancelled after its request went out
        and the relay applies it.

        When the claim's own outcome cannot be had (no answer within
        :data:`CLAIM_TIMEOUT`, or :class:`OutcomeUnknown`), the body does not run:
        the claim is asked for once more, what that answer shows granted is released,
        and :class:`LeaseLost` is raised. A grant still unknown then (logged) is held
        by nobody until its lease runs out. A release on exit that fails is logged,
        not raised: the body's own result or error stands.
        """
        ttl = ttl_ms / 1000
        # One request, however often asked: the same nonce and ts make the same event,
        # which the relay answers with the outcome it decided the first time.
        body, nonce, ts = (
            with_ttl({"wo": order}, ttl_ms),
            self.client.nonce(),
            self.client.clock_ms(),
        )
        unknown: OutcomeUnknown | None = None
        with trio.CancelScope(shield=True) as asking:
            # Shielded: a claim the relay granted must reach us, so that it is released.
            asking.deadline = trio.current_time() + CLAIM_TIMEOUT
            sent = trio.current_time()
            # (This deadline comes first: a log read for the outcome begins after the ack.)
            try:
                claim = _claim(await self.request("wo.claim", body, nonce=nonce, ts=ts))
            except OutcomeUnknown as exc:  # (the log may not be read: at once)
                unknown = exc  # perhaps granted, as a claim answered too late
        if asking.cancelled_caught or unknown is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(CLAIM_TIMEOUT):
                # Granted late, it would be held by nobody until its TTL: ask once more
                # for the answer, and give back what was granted.
                try:
                    late = _claim(await self.request("wo.claim", body, nonce=nonce, ts=ts))
                    await self.release(late)
                except LedgerRefusal:
                    pass  # refused, or already lapsed: nothing held
                except OutcomeUnknown as exc:  # nothing to release it with (no token)
                    log.warning("%s may stay claimed until its lease runs out: %s", order, exc)
            why = f"in {CLAIM_TIMEOUT} s" if unknown is None else f"({unknown})"
            raise LeaseLost(f"{order}: no answer to the claim {why}") from unknown
        key = (claim.order, claim.token)  # (a renewal keeps the token)
        self._held.add(key)
        lost = False
        try:
            with unwrap_single():
                async with trio.open_nursery() as nursery:

                    async def renew() -> None:
                        nonlocal claim
                        try:
                            claim = await self.renew(claim, ttl_ms)
                        except (LedgerRefusal, OutcomeUnknown):
                            # Perhaps for an end whose caller left before its answer
                            # (cancelled): sent before this renewal, it was decided
                            # first. Granted, the renewal says that end ended nothing.
                            # (Unknown: not confirmed, so lost unless that end ended it.)
                            await self._read_unread_end(claim)
                            raise

                    async def ended() -> bool:  # the body ended the claim: nothing to keep
                        return await self._has_ended(claim)

                    async def renew_forever() -> None:
                        nonlocal lost
                        if await keep_renewed(
                            renew, ttl, sent, (LedgerRefusal, OutcomeUnknown), ended
                        ):
                            lost = True  # refused, or not confirmed while still ours
                            nursery.cancel_scope.cancel()

                    nursery.start_soon(renew_forever)
                    yield claim
                    nursery.cancel_scope.cancel()
        finally:
            self._held.discard(key)  # (asked about no more)
            self._unread.pop(key, None)
            ended_here = key in self._ended
            self._ended.discard(key)
            if lost:
                # The renewal given up on may still land (the client sends it again
                # after a reconnect) and keep the order for a TTL, held by an agent no
                # longer on it: this goes after it. A lapsed or passed-on lease refuses
                # it. Here, not after: the body may end with its own error.
                self.request_later("wo.release", {"wo": claim.order, "token": claim.token})
            elif not ended_here:
                with trio.CancelScope(shield=True), trio.move_on_after(CLAIM_TIMEOUT):
                    try:
                        await as_told(lambda: self.release(claim))
                    except LedgerRefusal:
                        pass  # already lapsed or ended: nothing held
                    except (ProtocolError, OutcomeUnknown) as exc:  # held until its TTL
                        # (stopped, say; or released, but its answer cannot be had).
                        # Not raised: it would replace the body's own result or error.
                        log.warning("could not release %s: %s", claim.order, exc)
        if lost:
            raise LeaseLost(f"{order}: the lease was lost; stopped")


async def keep_renewed(
    renew: Callable[[], Awaitable[None]],
    ttl: float,
    sent: float,
    failures: tuple[type[Exception], ...],
    ended: Callable[[], Awaitable[bool]] | None = None,
) -> bool:
    """Renew a lease of ``ttl`` seconds (last asked for at ``sent``) at a third of its
    TTL until ``ended()``; True when it is lost: a renewal failed with one of
    ``failures``, or neither it nor ``ended()`` was answered while the lease was
    still surely ours."""
    margin = ttl / 10  # give up this long before the relay would let the lease lapse
    while True:
        await trio.sleep_until(sent + ttl / 3)
        # The wait for an end's answer too: while the body waits for it (a partition,
        # a stalled relay), its other tasks may run on, and must not past the lease.
        with trio.move_on_at(sent + ttl - margin):
            if ended is not None and await ended():
                return False
            asked = trio.current_time()
            try:
                await renew()
                sent = asked
                continue
            except failures:
                if ended is not None and await ended():
                    return False  # refused because the body's end came first
        return True


def _lock_name(item: dict[str, Any]) -> str:
    return str(item["lock"])


def number_of(item: dict[str, Any]) -> int:
    """Where a page of ``wo-<n>``, ``adr-<n>``, ``auc-<n>`` items continues: after n."""
    return int(str(item.get("id") or item["auction"]).rpartition("-")[2])


def with_ttl(body: dict[str, Any], ttl_ms: int | None) -> dict[str, Any]:
    """A lease request's body: ``body`` with ``ttl_ms`` when one is asked for (the
    relay's default otherwise)."""
    if ttl_ms is not None:
        body["ttl_ms"] = ttl_ms
    return body


def granted(kind: str, answer: dict[str, Any]) -> Claim:
    """The lease a granted ``wo.claim`` or ``wo.next`` (an order) or ``lock.acquire``
    (a lock) answers with, as :meth:`Ledger.claim`, :meth:`Ledger.next` and
    :meth:`Ledger.lock` return it: for a caller that sends the request itself with
    :meth:`Ledger.request` (to ask again with its nonce and ts)."""
    return _lock(answer) if kind == "lock.acquire" else _claim(answer)


def _lock(answer: dict[str, Any]) -> Claim:
    return Claim(order=answer["lock"], token=answer["token"], expires_ms=answer["expires_ms"])


def _claim(answer: dict[str, Any]) -> Claim:
    return Claim(order=answer["wo"], token=answer["token"], expires_ms=answer["expires_ms"])
