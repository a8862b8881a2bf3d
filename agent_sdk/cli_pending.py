"""Lease requests a command sent and gave up waiting for, kept to be asked again.

Theory of operation
-------------------
``formicary wo claim ID``, ``wo next`` and ``lock acquire NAME`` take a lease and
wait for the relay's answer up to ``--timeout``. A request they gave up on may still
be granted (queued for a home that is out of reach, or a slow relay): the agent then
holds a lease whose token it does not have, and after ``wo next`` does not even know
which order it holds. Sending the request again as a new one would not help: a new
claim is refused ``held`` by that very lease, and a new ``wo next`` takes another
order.

So before such a command sends its request, it records it here: kind, namespace,
body, nonce and ts, in ``pending.json`` next to ``tokens.json``, under its agent and
its relay (by key) as tokens are. The relay's answer removes the entry (a grant once
its token is kept in ``tokens.json``, a refusal at once). A command that ends without
one (``--timeout``, a lost connection, killed) leaves it, and a rerun of the same
command sends that request again, not a new one: the same event, which the relay
answers with the outcome it decided the first time (a duplicate, protocol 6.4). The
rerun prints the grant and keeps its token as the first run would have.

What "the same command" is: the same kind of request in the same namespace, to the
same relay, by the same agent, for the same order (``wo claim``) or lock (``lock
acquire``); every ``wo next`` of a namespace is the same command. The request is
sent again as it was, its ``--ttl`` included: a rerun that gives another is told so
(``renew`` sets a lease's length). Other commands are independent: a pending ``wo
next`` does not stand in for ``wo claim ID`` nor the other way round, so a claim of
the order a pending ``wo next`` was granted is refused ``held``, as this key's own
lease (the rerun of ``wo next`` still gets it, with its token).

Commands running now: each holds an advisory lock (``flock``) on a file of its
entry's own while it waits, which the kernel drops when the process ends however it
ends. A rerun takes over only an entry nobody holds, so commands run in parallel
with one key still make requests of their own (two ``wo next`` take two orders).

Old requests: the relay recognises a request it sequenced however old it is (a
duplicate is found by its id in the log, before its ts is looked at) and answers
with its outcome. One it never sequenced is refused ``bad_timestamp`` once its ts is
further from the relay's clock than the relay's ``max_clock_skew`` (24 h by
default): nothing was granted by it, and the rerun says so and drops the entry.

A grant asked again is the grant decided then, whatever became of its lease since:
the rerun asks the relay for the lease as it stands (``wo show``, ``lock list``) and
keeps and prints it only if this key still holds it with that token (its expiry as
renewed since). A lease that is over (released or finished with ``--token``, run
out, taken by another) is said, and dropped, its token not kept; so is a request
whose outcome this key cannot have (:class:`~agent_sdk.ledger.OutcomeUnknown` with
``final``: it may not read the log). An answer not seen for another reason (an
error that says "not now", a lost connection, no outcome read in time) keeps the
entry, and the command says a rerun asks again.
"""

from __future__ import annotations

import fcntl
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

from agent_sdk.cli_wo import Tokens, UsageError, read_json, write_json
from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.ledger import Claim, Ledger, LedgerRefusal, OutcomeUnknown, granted

KINDS = {
    ("wo", "claim"): "wo.claim",
    ("wo", "next"): "wo.next",
    ("lock", "acquire"): "lock.acquire",
}
"""The commands that take a lease, and the kind of request each sends."""

TARGETS = {"wo.claim": "wo", "wo.next": None, "lock.acquire": "name"}
"""The body field naming what a request takes: its order, its lock, or none."""


@dataclass(frozen=True, slots=True)
class PendingRequest:
    """One lease request as it was sent, by ``agent`` to ``relay`` (its key, hex)."""

    agent: str
    relay: str
    kind: str
    ns: str
    body: dict[str, Any]
    nonce: bytes
    ts: int

    @property
    def target(self) -> str:
        """The order or lock it asks for ("" for ``wo.next``)."""
        field = TARGETS[self.kind]
        return "" if field is None else str(self.body[field])

    @property
    def command(self) -> tuple[str, str, str, str, str]:
        """What makes two runs the same command (see the module's docstring): a rerun
        sends the request a run of the same command left."""
        return (self.agent, self.relay, self.ns, self.kind, self.target)

    @property
    def key(self) -> str:
        """Its entry's key in the file."""
        return f"{self.agent}/{self.relay}/{self.nonce.hex()}"

    def saved(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "relay": self.relay,
            "kind": self.kind,
            "ns": self.ns,
            "body": self.body,
            "nonce": self.nonce.hex(),
            "ts": self.ts,
        }


FIELDS = {field.name for field in fields(PendingRequest)}


def _read(saved: Any) -> PendingRequest | None:
    """The request an entry holds, or ``None`` when it is not one."""
    if not isinstance(saved, dict) or set(saved) != FIELDS:
        return None
    strings = ("agent", "relay", "kind", "ns", "nonce")
    if not all(isinstance(saved[name], str) for name in strings):
        return None
    body, ts, kind = saved["body"], saved["ts"], saved["kind"]
    if kind not in TARGETS or not isinstance(body, dict) or type(ts) is not int:
        return None
    field = TARGETS[kind]
    if field is not None and not isinstance(body.get(field), str):
        return None
    try:
        nonce = bytes.fromhex(saved["nonce"])
    except ValueError:
        return None
    return PendingRequest(saved["agent"], saved["relay"], kind, saved["ns"], body, nonce, ts)


class PendingRequests:
    """The lease requests not answered yet, in a small file next to the agent's key
    (``pending.json``, beside ``tokens.json``; several keys may share the folder).
    Changed as :class:`~agent_sdk.cli_wo.Tokens` is: under a lock, by a private
    temporary file that replaces the old one atomically."""

    def __init__(self, folder: Path, agent: str, relay: str | None = None) -> None:
        self.path = folder / "pending.json"
        self.agent = agent
        self.relay = relay
        """The relay's key (hex): set when connected, before a request is recorded."""

    def _load(self) -> dict[str, Any]:
        data = read_json(self.path)
        # Strict: an entry misread is a request never asked again, and its grant a
        # lease held without its token; the file is left as it is for a person.
        if not isinstance(data, dict) or any(_read(saved) is None for saved in data.values()):
            raise UsageError(
                f"{self.path} is not a file of pending lease requests (a JSON object of"
                " them): move it away (a request in it not answered yet is then no"
                " longer asked again: `wo show`, `wo list` or `lock list` shows its lease)"
            )
        return data

    def check(self) -> None:
        """Raise :class:`UsageError` now if the file cannot be read or changed: a
        request sent and then not recorded could not be asked again."""
        self._load()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            open(self.path.with_suffix(".lock"), "a").close()
        except OSError as exc:
            where = exc.filename or self.path.parent
            raise UsageError(f"cannot keep pending requests in {where}: {exc.strerror}") from None

    @contextmanager
    def _changing(self) -> Iterator[dict[str, Any]]:
        """The entries, to change under the file's lock; written back on the way out."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._load()
            before = dict(data)
            yield data
            if data != before:
                write_json(self.path, data)

    def _in_use(self, nonce: bytes) -> Path:
        """The file whose lock says that a running command waits on that request."""
        return self.path.with_name(f"pending.{nonce.hex()}.lock")

    def _hold(self, nonce: bytes) -> IO[str] | None:
        """The request's lock file, locked; ``None`` when a running command has it."""
        # Left open: its lock is this command's hold on the request (``asking`` closes it).
        file = open(self._in_use(nonce), "a")  # noqa: SIM115
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            return None
        return file

    @contextmanager
    def asking(
        self, kind: str, ns: str, body: dict[str, Any], fresh: Callable[[], tuple[bytes, int]]
    ) -> Iterator[tuple[PendingRequest, bool]]:
        """The request to send for a lease command, recorded, and whether it is one an
        earlier run sent and left (True) or a new one made with ``fresh()``'s nonce
        and ts. Held by this process until the block ends; the entry stays unless
        :meth:`settle` removed it."""
        assert self.relay is not None, "requests are recorded once connected"
        wanted = PendingRequest(self.agent, self.relay, kind, ns, body, b"", 0)
        with self._changing() as data:
            left = sorted(
                (
                    request
                    for request in map(_read, data.values())
                    if request is not None and request.command == wanted.command
                ),
                key=lambda request: request.ts,
            )
            for request in left:
                held = self._hold(request.nonce)
                if held is not None:
                    again = True
                    break
            else:
                nonce, ts = fresh()
                request = PendingRequest(self.agent, self.relay, kind, ns, body, nonce, ts)
                data[request.key] = request.saved()
                held, again = self._hold(nonce), False
                assert held is not None  # (a new nonce: nobody else knows it)
        with held:
            yield request, again

    def settle(self, request: PendingRequest) -> None:
        """The relay answered ``request``: remove its entry."""
        with self._changing() as data:
            data.pop(request.key, None)
            self._in_use(request.nonce).unlink(missing_ok=True)  # (nobody waits on it now)


class Forgotten(Exception):
    """A pending request asked again whose answer ends it without a lease to keep:
    too old for the relay, a grant whose lease is over, or an outcome not to be had. Its
    entry is dropped; the text says why and what to do."""


async def take(
    ledger: Ledger,
    tokens: Tokens,
    where: str,
    kind: str,
    body: dict[str, Any],
    keep: Callable[[Claim], object],
) -> Claim:
    """Send lease request ``kind`` (``body``), or the one an earlier run of the same
    command left unanswered, recorded first; return the lease granted once ``keep``
    has kept its token. Raises the refusal (:class:`LedgerRefusal`, or
    :class:`ProtocolError`), or :class:`Forgotten`; ``where`` names the command in
    what it says on stderr."""
    pending = PendingRequests(tokens.path.parent, tokens.agent, tokens.relay)
    client = ledger.client

    def fresh() -> tuple[bytes, int]:
        return client.nonce(), client.clock_ms()

    with pending.asking(kind, ledger.ns, body, fresh) as (request, again):
        sent = _utc(request.ts)
        if again:
            as_sent = "" if request.body == body else " (as it was sent: its --ttl, not this run's)"
            print(
                f"{where}: asking the relay again for the request an earlier run sent at"
                f" {sent} and did not see answered{as_sent}",
                file=sys.stderr,
            )
        try:
            answer = await ledger.request(kind, request.body, nonce=request.nonce, ts=request.ts)
        except LedgerRefusal:
            pending.settle(request)
            raise
        except OutcomeUnknown as exc:
            if not exc.final:  # (no outcome read in time: asked again, it may come)
                _tell_kept(where)
                raise
            pending.settle(request)
            raise Forgotten(
                f"{exc}; asked again it would give no more, so it is no longer asked: the"
                " lease, if granted, shows in `wo show`, `wo list` or `lock list`"
            ) from None
        except ProtocolError as exc:
            # A refusal of the frame or the event itself (1xxx, 2xxx) ends the request:
            # sent again, the same bytes are refused again. One that says "not now"
            # (5xxx) leaves it to be asked again.
            if not exc.code.refuses_the_event:
                _tell_kept(where)
                raise
            pending.settle(request)
            if again and exc.code is ErrorCode.BAD_TIMESTAMP:
                # Duplicates are found before a ts is checked: this one was never
                # sequenced, and now never will be.
                raise Forgotten(
                    f"the request sent at {sent} was never decided, and is now too old"
                    f" for the relay to take ({exc.reason}): nothing was granted by it."
                    " It is forgotten: running the command again asks anew"
                ) from None
            raise
        except Exception:  # a lost connection: the request may have gone through
            _tell_kept(where)
            raise
        lease = granted(kind, answer)
        if again:
            # The relay answers a request asked again with the grant it decided then,
            # whatever became of that lease since: released, finished or lapsed (and
            # maybe taken by another), or renewed. Only the lease as it stands now is
            # kept and told.
            current = await _current(ledger, kind, lease)
            if current is None:
                pending.settle(request)
                raise Forgotten(
                    f"the request sent at {sent} was granted (token {lease.token}), but"
                    f" that lease is over: {lease.order} is not held with it now. It is"
                    " forgotten: running the command again asks anew"
                )
            lease = current
        keep(lease)  # before the entry goes: killed in between, a rerun keeps it again
        pending.settle(request)
        return lease


async def _current(ledger: Ledger, kind: str, lease: Claim) -> Claim | None:
    """``lease`` as it stands now (its expiry as renewed), if this key still holds it
    with that token; ``None`` when it is over."""
    me = ledger.client.identity.public_key
    if kind == "lock.acquire":
        held = [lock for lock in await ledger.locks() if lock["lock"] == lease.order]
    else:
        held = [await ledger.show(lease.order)]
        held = [order for order in held if order["status"] == "claimed"]
    for now in held:
        if now["holder"] == me and now["token"] == lease.token:
            return Claim(lease.order, lease.token, now["expires_ms"])
    return None


def _tell_kept(where: str) -> None:
    """Say that a request the command could not see answered is kept to be asked
    again (an error that says "not now", a lost connection)."""
    print(
        f"{where}: the request is kept: running the same command again asks for its"
        " answer (not a new lease: a grant's token is then kept)",
        file=sys.stderr,
    )


def _utc(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))
