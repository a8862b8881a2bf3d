"""Answers to queries about a namespace's coordination state (pure).

Writes go through the log; reads need not. A ``query`` frame names a question from
:data:`QUERIES` and its ``args``; the answer is built here from the namespace's
:class:`~relay.coordination.requests.Coordinator` at the relay's clock, as plain
msgpack values (keys are text, agent keys are bytes). The relay sends it only once
everything the answer reflects is committed (see ``RelayNode.query``), so no agent
can read a state a crash would take back.

Lists are pages: at most ``limit`` items and at most ``budget`` encoded bytes, with
``more`` set when the page stopped early; ``after`` continues from an item's number.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import msgpack

from agent_sdk.errors import ErrorCode, ProtocolError
from relay.coordination.auctions import Auction, vouch_key
from relay.coordination.decisions import ConflictCase
from relay.coordination.directory import CAPABILITY_RE, Capability, Member
from relay.coordination.fields import BadRequest, only, opt_integer, opt_text, text
from relay.coordination.leases import Lease
from relay.coordination.ledger import Status, WorkOrder
from relay.coordination.records import NAMESPACE, Decision
from relay.coordination.requests import Coordinator

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
SHOWN = 100
"""Notes and history entries ``wo.show`` includes (the latest ones)."""


def answer(coordinator: Coordinator, q: str, args: dict[str, Any], now_ms: int, budget: int) -> Any:
    """The answer to query ``q``; raises :class:`ProtocolError` for a bad one."""
    handler = QUERIES.get(q)
    if handler is None:
        known = ", ".join(sorted(QUERIES))
        raise ProtocolError(ErrorCode.UNKNOWN_QUERY, f"no query {q!r}; known: {known}")
    try:
        return handler(coordinator, args, now_ms, budget)
    except BadRequest as exc:
        raise ProtocolError(ErrorCode.BAD_QUERY, f"{q}: {exc}") from None


def _not_found(reason: str) -> ProtocolError:
    return ProtocolError(ErrorCode.NOT_FOUND, reason)


def _page(items: Iterable[Any], limit: int, budget: int) -> tuple[list[Any], bool]:
    page: list[Any] = []
    size = 0
    for item in items:
        size += _size(item)
        if len(page) >= limit or (page and size > budget):
            return page, True
        page.append(item)
    return page, False


def _limit(args: dict[str, Any]) -> int:
    limit = opt_integer(args, "limit")
    if limit is None:
        return DEFAULT_LIMIT
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be 1 to {MAX_LIMIT}")
    return limit


def _lease(lease: Lease | None) -> dict[str, Any]:
    if lease is None:
        return {"holder": None, "token": None, "expires_ms": None}
    return {"holder": lease.holder, "token": lease.token, "expires_ms": lease.expires_ms}


def _summary(coordinator: Coordinator, order: WorkOrder, now_ms: int) -> dict[str, Any]:
    ledger = coordinator.ledger
    status = ledger.status(order.id, now_ms)
    assert status is not None
    lease = ledger.leases.holder(order.id, now_ms) if status is Status.CLAIMED else None
    return {
        "id": order.id,
        "title": order.contract.title,
        "status": status.value,
        "priority": order.contract.priority,
        "labels": list(order.contract.labels),
        "updated_ms": order.updated_ms,
        **_lease(lease),
        **_approval(order),
        **_family(ledger, order, now_ms),
    }


def _family(ledger: Any, order: WorkOrder, now_ms: int) -> dict[str, Any]:
    """A sub-order's parent, a parent's children (id, status and the percent its holder
    last reported: their progress at a glance), and the holder's latest progress
    report; only what an order has."""
    shown: dict[str, Any] = {}
    if order.parent is not None:
        shown["parent"] = order.parent
    if order.children:
        children = (ledger.orders[c] for c in order.children[:100])
        shown["children"] = [
            {"id": child.id, "status": ledger.status(child.id, now_ms).value,
             "percent": child.progress[0] if child.progress is not None else None}
            for child in children
        ]  # fmt: skip
        shown["children_total"] = len(order.children)
    if order.progress is not None:
        percent, message, at_ms = order.progress
        shown["progress"] = {"percent": percent, "message": message, "at_ms": at_ms}
    return shown


def _approval(order: WorkOrder) -> dict[str, Any]:
    """An order's approval gate and decisions, for gated orders only."""
    gate = order.contract.approval
    if gate is None:
        return {}
    decisions = [
        {"approved": d.approved, "by": d.by, "comment": d.comment, "at_ms": d.at_ms}
        for d in order.decisions[-8:]  # the latest few: an answer has a size budget
    ]
    return {
        "approval": {
            "reason": gate.reason,
            "approvers": list(gate.approvers),
            "role": gate.role,
            "approved": order.approved,
            "decisions": decisions,
        }
    }


def wo_list(coordinator: Coordinator, args: dict[str, Any], now_ms: int, budget: int) -> Any:
    only(args, "status", "after", "limit")
    wanted = opt_text(args, "status", 24)
    if wanted is not None and wanted not in {s.value for s in Status}:
        raise BadRequest(
            "status must be open, claimed, blocked, done, dropped or awaiting_approval"
        )
    after = opt_integer(args, "after") or 0
    orders = (
        _summary(coordinator, order, now_ms)
        for order in coordinator.ledger.orders.values()
        if int(order.id[3:]) > after
    )
    shown = (o for o in orders if wanted is None or o["status"] == wanted)
    page, more = _page(shown, _limit(args), budget)
    return {"orders": page, "more": more}


def wo_show(coordinator: Coordinator, args: dict[str, Any], now_ms: int, budget: int) -> Any:
    only(args, "wo")
    order_id = text(args, "wo", 64)
    order = coordinator.ledger.orders.get(order_id)
    if order is None:
        raise _not_found(f"no work order {order_id}")
    contract = order.contract
    notes = [{"author": n.author, "text": n.text, "at_ms": n.at_ms} for n in order.notes]
    history = [{"at_ms": at, "status": s.value, "why": why} for at, s, why in order.history]
    shown: dict[str, Any] = {
        **_summary(coordinator, order, now_ms),
        "description": contract.description,
        "acceptance": list(contract.acceptance),
        "scope": contract.scope,
        "files": list(contract.files),
        "verify": contract.verify,
        "handover": contract.handover,
        "reason": order.reason,
        "creator": order.creator,
        "created_ms": order.created_ms,
        "notes_total": len(notes),
        "history_total": len(history),
    }
    # The latest notes and moves, as many as fit: two thirds of the room left for notes.
    room = budget - _size(shown)
    shown["notes"] = _latest(notes, room * 2 // 3)
    shown["history"] = _latest(history, room - _size(shown["notes"]))
    return shown


def _size(value: Any) -> int:
    return len(msgpack.packb(value, use_bin_type=True))


def _latest(items: list[dict[str, Any]], room: int) -> list[dict[str, Any]]:
    """The last :data:`SHOWN` items, or fewer to stay within ``room`` bytes (oldest go)."""
    kept: list[dict[str, Any]] = []
    for item in reversed(items[-SHOWN:]):
        room -= _size(item)
        if room < 0:
            break
        kept.append(item)
    return kept[::-1]


def lock_list(coordinator: Coordinator, args: dict[str, Any], now_ms: int, budget: int) -> Any:
    only(args, "limit", "after")
    after = opt_text(args, "after", 256)
    locks = coordinator.locks
    names = sorted(locks.leases)
    if after is not None:  # the names past it, for the next page
        names = names[bisect.bisect_right(names, after) :]
    held = (locks.holder(name, now_ms) for name in names)
    items = ({"lock": lease.resource, **_lease(lease)} for lease in held if lease is not None)
    page, more = _page(items, _limit(args), budget)
    return {"locks": page, "more": more}


def context_pull(coordinator: Coordinator, args: dict[str, Any], now_ms: int, budget: int) -> Any:
    only(args, "wo", "version")
    order = opt_text(args, "wo", 64)
    if order is not None and order not in coordinator.ledger.orders:
        raise _not_found(f"no work order {order}")
    key = order or NAMESPACE
    version = opt_integer(args, "version")
    found = coordinator.records.context(key, version)
    if found is None and version is None:  # nothing put yet: an answer, not an error
        return {
            "wo": order,
            "version": 0,
            "versions": 0,
            "author": None,
            "at_ms": None,
            "age_ms": None,
            "body": None,
        }
    if found is None:
        where = f"for {order}" if order else "for the namespace"
        raise _not_found(f"no context version {version} {where}")
    return {
        "wo": order,
        "version": found.version,
        "versions": len(coordinator.records.contexts[key]),
        "author": found.author,
        "at_ms": found.at_ms,
        "age_ms": max(0, now_ms - found.at_ms),
        "body": found.body,
    }


def bulletin_list(coordinator: Coordinator, args: dict[str, Any], now_ms: int, budget: int) -> Any:
    """Posts after ``after`` in order; without it, the latest ``limit`` posts."""
    only(args, "after", "limit")
    limit, after = _limit(args), opt_integer(args, "after")
    posts = coordinator.records.bulletin
    start = max(0, len(posts) - limit) if after is None else max(0, after)
    items = (
        {"n": p.n, "author": p.author, "at_ms": p.at_ms, "text": p.text} for p in posts[start:]
    )
    page, more = _page(items, limit, budget)
    return {"posts": page, "more": more}


def _decision(d: Decision) -> dict[str, Any]:
    return {
        "id": d.id,
        "title": d.title,
        "status": d.status.value,
        "context": d.context,
        "decision": d.decision,
        "rationale": d.rationale,
        "author": d.author,
        "at_ms": d.at_ms,
        "supersedes": d.supersedes,
        "superseded_by": d.superseded_by,
        "entity": d.entity,
        "conflict": d.conflict,
    }


def decision_list(coordinator: Coordinator, args: dict[str, Any], now_ms: int, budget: int) -> Any:
    only(args, "status", "after", "limit", "entity")
    wanted = opt_text(args, "status", 16)
    entity = opt_text(args, "entity", 256)
    after = opt_integer(args, "after") or 0
    records = coordinator.records
    decisions = (
        records.decisions.values()
        if entity is None
        else [records.decisions[d] for d in records.on_entity.get(entity, ())]
    )
    items = (
        _decision(d)
        for d in decisions
        if int(d.id[4:]) > after and wanted in (None, d.status.value)
    )
    page, more = _page(items, _limit(args), budget)
    return {"decisions": page, "more": more}


def ckpt_get(coordinator: Coordinator, args: dict[str, Any], now_ms: int, budget: int) -> Any:
    """A checkpoint never set is at seq 0: a new consumer starts from the beginning."""
    only(args, "name")
    name = text(args, "name", 256)
    checkpoint = coordinator.records.checkpoints.get(name)
    if checkpoint is None:
        return {"name": name, "seq": 0, "author": None, "at_ms": None}
    author, at_ms = checkpoint.author, checkpoint.at_ms
    return {"name": name, "seq": checkpoint.seq, "author": author, "at_ms": at_ms}


def _participant(member: Member, online: bool) -> dict[str, Any]:
    return {
        "agent": member.agent,
        "name": member.name,
        "capabilities": [str(c) for c in member.capabilities],
        "role": member.role,
        "endpoint": member.endpoint,
        "meta": member.meta,
        "presence": member.presence,
        "online": online,
        "joined_ms": member.joined_ms,
        "expires_ms": member.expires_ms if online else None,
        "left_ms": member.left_ms,
        "reason": member.reason,
    }


def _members(coordinator: Coordinator, args: dict[str, Any], now_ms: int) -> list[Member]:
    """Members in first-join order, online ones only unless ``online`` is false."""
    return [m for m in _ordered(coordinator) if _wanted(coordinator, args, m, now_ms)]


def _ordered(coordinator: Coordinator) -> list[Member]:
    return sorted(coordinator.directory.members.values(), key=lambda m: (m.first_ms, m.agent))


def _wanted(coordinator: Coordinator, args: dict[str, Any], member: Member, now_ms: int) -> bool:
    online = args.get("online")
    if online is not None and not isinstance(online, bool):
        raise BadRequest("online must be true or false")
    return online is False or coordinator.directory.is_online(member, now_ms)


def _after(coordinator: Coordinator, args: dict[str, Any]) -> list[Member]:
    """Members in first-join order past ``after`` (an agent key): a place in the whole
    order, so a page goes on even when that member has gone offline since."""
    after = args.get("after")
    if after is not None and not isinstance(after, bytes):
        raise BadRequest("after must be an agent key")
    members = _ordered(coordinator)
    if after is not None:
        keys = [m.agent for m in members]
        members = members[keys.index(after) + 1 :] if after in keys else []
    return members


def dir_list(coordinator: Coordinator, args: dict[str, Any], now_ms: int, budget: int) -> Any:
    """Participants (online ones unless ``online`` is false), paged by ``after`` (a key)."""
    only(args, "online", "after", "limit")
    members = [m for m in _after(coordinator, args) if _wanted(coordinator, args, m, now_ms)]
    directory = coordinator.directory
    items = (_participant(m, directory.is_online(m, now_ms)) for m in members)
    page, more = _page(items, _limit(args), budget)
    return {"participants": page, "more": more}


def dir_get(coordinator: Coordinator, args: dict[str, Any], now_ms: int, budget: int) -> Any:
    only(args, "agent")
    agent = args.get("agent")
    if not isinstance(agent, bytes):
        raise BadRequest("agent must be a key (bytes)")
    member = coordinator.directory.members.get(agent)
    if member is None:
        raise _not_found(f"agent {agent.hex()[:16]} never joined")
    return _participant(member, coordinator.directory.is_online(member, now_ms))


def dir_find(coordinator: Coordinator, args: dict[str, Any], now_ms: int, budget: int) -> Any:
    """Participants with a capability (``tag`` or ``tag@version``), and a role if given."""
    only(args, "capability", "role", "online", "after", "limit")
    capability = text(args, "capability", 100)
    if not CAPABILITY_RE.fullmatch(capability):
        raise BadRequest("capability is a tag, optionally @version")
    wanted = Capability.parse(capability)
    role = opt_text(args, "role", 64)
    members = [
        m
        for m in _after(coordinator, args)
        if _wanted(coordinator, args, m, now_ms) and m.can(wanted) and role in (None, m.role)
    ]
    directory = coordinator.directory
    items = (_participant(m, directory.is_online(m, now_ms)) for m in members)
    page, more = _page(items, _limit(args), budget)
    return {"participants": page, "more": more}


def dir_count(coordinator: Coordinator, args: dict[str, Any], now_ms: int, budget: int) -> Any:
    only(args, "online")
    return {"count": len(_members(coordinator, args, now_ms))}


def _auction_view(auction: Auction, coordinator: Coordinator, now_ms: int) -> dict[str, Any]:
    bids = sorted(auction.bids.values(), key=lambda b: b.order)
    lease = coordinator.ledger.leases.holder(auction.wo, now_ms)
    held = lease if lease is not None and lease.token == auction.token else None  # its award's
    return {
        "auction": auction.id,
        "requester": auction.requester,
        "wo": auction.wo,
        "phase": auction.phase.value,
        "rule": auction.rule,
        "deadline_ms": auction.deadline_ms,
        "capabilities": [str(c) for c in auction.capabilities],
        "min_reputation": auction.min_reputation,
        "reserve": auction.reserve,
        "slash_ppm": auction.slash_ppm,
        "sealed": auction.sealed,
        "closes_ms": auction.closes_ms,
        "bids": [
            {
                "bidder": b.bidder,
                "stake": b.stake,
                "price": b.price if b.revealed else None,  # sealed: nobody sees it yet
                "note": b.note,
                "revealed": b.revealed,
            }
            for b in bids
        ],
        "ranking": list(auction.ranking),
        "awardee": auction.awardee,
        "token": auction.token or None,
        "confirm_by": auction.confirm_by or None,
        "expires_ms": held.expires_ms if held is not None else None,
        "history": auction.history[-SHOWN:],
    }


def auction_show(coordinator: Coordinator, args: dict[str, Any], now_ms: int, budget: int) -> Any:
    """An auction in full; its bids (the first ones, as many as fit) and ranking (idem)."""
    only(args, "auction")
    auction_id = text(args, "auction", 64)
    auction = coordinator.auctions.auctions.get(auction_id)
    if auction is None:
        raise _not_found(f"no auction {auction_id}")
    shown = _auction_view(auction, coordinator, now_ms)
    bids, ranking = shown.pop("bids"), shown.pop("ranking")
    shown["bids_total"], shown["ranking_total"] = len(bids), len(ranking)
    room = budget - _size(shown)
    shown["bids"], _ = _page(bids, MAX_LIMIT * 100, room * 3 // 4)
    shown["ranking"], _ = _page(ranking, MAX_LIMIT * 100, room - _size(shown["bids"]))
    return shown


def auction_list(coordinator: Coordinator, args: dict[str, Any], now_ms: int, budget: int) -> Any:
    """Auctions in opening order, without their bids (``auction.show`` has those),
    paged by ``after`` (the number of ``auc-<n>``)."""
    only(args, "phase", "after", "limit")
    wanted = opt_text(args, "phase", 16)
    after = opt_integer(args, "after") or 0
    items = (
        {k: v for k, v in _auction_view(a, coordinator, now_ms).items() if k != "bids"}
        for a in coordinator.auctions.auctions.values()
        if wanted in (None, a.phase.value) and int(a.id[4:]) > after
    )
    page, more = _page(items, _limit(args), budget)
    return {"auctions": page, "more": more}


def stake_show(coordinator: Coordinator, args: dict[str, Any], now_ms: int, budget: int) -> Any:
    """An agent's balance, locked stake and reputation, with the namespace's totals."""
    only(args, "agent")
    agent = args.get("agent")
    if not isinstance(agent, bytes):
        raise BadRequest("agent must be a key (bytes)")
    stakes = coordinator.stakes
    return {
        "agent": agent,
        "balance": stakes.available(agent),
        "locked": stakes.locked_by(agent),
        "reputation": coordinator.reputation.score(agent, now_ms),
        "granted_total": stakes.granted,
        "slashed_total": stakes.slashed,
    }


def rep_show(coordinator: Coordinator, args: dict[str, Any], now_ms: int, budget: int) -> Any:
    """An agent's reputation: its score now, its award outcomes, vouches both ways."""
    only(args, "agent")
    agent = args.get("agent")
    if not isinstance(agent, bytes):
        raise BadRequest("agent must be a key (bytes)")
    reputation = coordinator.reputation

    def vouch(v: Any) -> dict[str, Any]:
        staked = coordinator.stakes.locked.get((v.voucher, vouch_key(v.vouchee)), 0)
        return {"voucher": v.voucher, "for": v.vouchee, "weight": v.weight, "staked": staked,
                "value": v.value, "reason": v.reason, "at_ms": v.at_ms}  # fmt: skip

    return {
        "agent": agent,
        "score": reputation.score(agent, now_ms),
        "half_life_ms": reputation.half_life_ms,
        "outcomes": [  # the latest ones; the score counts them all
            {"at_ms": at, "value": value}
            for at, value in reputation.outcomes.get(agent, [])[-MAX_LIMIT:]
        ],
        "vouched_by": [vouch(v) for v in reputation.vouchers_of(agent)][:MAX_LIMIT],
        "vouches_for": [
            vouch(v) for (who, _), v in sorted(reputation.vouches.items()) if who == agent
        ][:MAX_LIMIT],
    }


Handler = Callable[[Coordinator, dict[str, Any], int, int], Any]


def constraint_show(
    coordinator: Coordinator, args: dict[str, Any], now_ms: int, budget: int
) -> Any:
    """A shared constraint's limit, use and open reservations (the first 100)."""
    only(args, "name")
    name = text(args, "name", 256)
    constraint = coordinator.constraints.by_name.get(name)
    if constraint is None:
        raise _not_found(f"no constraint {name}")
    open_ = list(
        itertools.islice(
            (r for r in constraint.reservations.values() if r.expires_ms > now_ms), 100
        )
    )
    reserved = constraint.reserved(now_ms)
    return {
        "name": name,
        "owner": constraint.owner,
        "limit": constraint.limit,
        "used": constraint.used,
        "reserved": reserved,
        "available": constraint.limit - constraint.used - reserved,
        "reservations": [
            {
                "reservation": r.id,
                "holder": r.holder,
                "amount": r.amount,
                "expires_ms": r.expires_ms,
            }
            for r in open_
        ],
    }


def _conflict(case: ConflictCase) -> dict[str, Any]:
    return {
        "conflict": case.id,
        "entity": case.entity,
        "decisions": case.decisions,
        "agents": case.agents,
        "raised_ms": case.raised_ms,
        "step": case.step.value,
        "until_ms": case.until_ms,
        "status": "open" if case.open else "resolved",
        "kept": case.kept,
        "by": case.by or None,
        "proposals": [{"agent": a, "keep": k} for a, k in case.proposals.items()],
    }


def conflict_list(coordinator: Coordinator, args: dict[str, Any], now_ms: int, budget: int) -> Any:
    """Conflicts oldest first; ``status`` open or resolved, ``step`` (the human step's
    are the approval queue's), ``after`` a conflict number."""
    only(args, "status", "step", "after", "limit")
    status, step = opt_text(args, "status", 16), opt_text(args, "step", 16)
    after = opt_integer(args, "after") or 0
    conflicts = coordinator.decisions.conflicts
    cases = itertools.islice(conflicts.values(), min(max(0, after), len(conflicts)), None)
    items = (
        _conflict(case)
        for case in cases  # (numbered cf-1, cf-2... in order: skip to ``after``)
        if status in (None, "open" if case.open else "resolved") and step in (None, case.step.value)
    )
    page, more = _page(items, _limit(args), budget)
    return {"conflicts": page, "more": more}


def conflict_show(coordinator: Coordinator, args: dict[str, Any], now_ms: int, budget: int) -> Any:
    only(args, "conflict")
    case = coordinator.decisions.conflicts.get(text(args, "conflict", 64))
    if case is None:
        raise _not_found(f"no conflict {args['conflict']}")
    shown = _conflict(case)
    records = (_decision(coordinator.records.decisions[d]) for d in case.decisions)
    shown["records"], shown["more"] = _page(records, 64, budget - _size(shown))
    return shown


def decision_policy(
    coordinator: Coordinator, args: dict[str, Any], now_ms: int, budget: int
) -> Any:
    """The routing policy and conflict ladder in force, and what waits to be routed."""
    only(args)
    policy = coordinator.decisions.policy
    ladder = policy.ladder
    return {
        "routes": [
            {"kinds": sorted(r.kinds), "role": r.role, "latency": r.latency.value}
            for r in policy.routes
        ],
        "digest_ms": policy.digest_ms,
        "conflicts": None
        if ladder is None
        else {
            "window_ms": ladder.window_ms,
            "rule": ladder.rule.value,
            "step_ms": ladder.step_ms,
            "arbiter": ladder.arbiter,
            "approvers": list(ladder.approvers),
            "approver_role": ladder.approver_role,
        },
        "waiting": len(coordinator.decisions.waiting),
    }


QUERIES: dict[str, Handler] = {
    "wo.list": wo_list,
    "wo.show": wo_show,
    "lock.list": lock_list,
    "context.pull": context_pull,
    "bulletin.list": bulletin_list,
    "decision.list": decision_list,
    "ckpt.get": ckpt_get,
    "dir.list": dir_list,
    "dir.get": dir_get,
    "dir.find": dir_find,
    "dir.count": dir_count,
    "auction.show": auction_show,
    "auction.list": auction_list,
    "stake.show": stake_show,
    "rep.show": rep_show,
    "constraint.show": constraint_show,
    "conflict.list": conflict_list,
    "conflict.show": conflict_show,
    "decision.policy": decision_policy,
}
