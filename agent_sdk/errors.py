"""Error codes of the Formicary protocol and the exception that carries them.

Two kinds of failure never mix (the h11 habit): :class:`ProtocolError` is *their*
bad input — a peer sent something the protocol does not allow — and always carries a
numeric :class:`ErrorCode` that goes back on the wire in an ``error`` frame. Anything
else raised from our code is *our* bug.

The numbers are part of the wire contract (docs/protocol.md, "Error codes"); never
renumber one, only add.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import trio


class ErrorCode(enum.IntEnum):
    # 1xxx: the connection and its frames
    MALFORMED = 1001
    """The frame is not a msgpack map with a string ``t``, or a field has the wrong type."""
    UNKNOWN_FRAME = 1002
    """The frame type ``t`` is not one this relay speaks."""
    FRAME_TOO_LARGE = 1003
    """The frame is over the relay's ``max_frame`` limit; it was discarded unread."""
    NOT_AUTHENTICATED = 1004
    """The frame needs an authenticated connection and the ``auth`` frame has not come yet."""
    AUTH_FAILED = 1005
    """The ``auth`` signature does not verify against the challenge."""
    ALREADY_AUTHENTICATED = 1006
    """A second ``auth`` on a connection that already has one."""

    # 2xxx: events
    BAD_EVENT = 2001
    """The event map has a missing, extra or ill-typed field."""
    NON_CANONICAL = 2002
    """The event bytes are not the canonical encoding of their own content."""
    BAD_SIGNATURE = 2003
    """The event signature does not verify against its author key."""
    WRONG_AUTHOR = 2004
    """The event's author is not the key this connection authenticated as."""
    TOO_MANY_DEPS = 2005
    """The event lists more ``deps`` than the relay's ``max_deps``."""
    MISSING_DEPS = 2006
    """A dependency was not sequenced within the parking timeout, or parking is full."""
    NOT_HOME = 2007
    """The namespace is homed on another relay, and this one does not route there."""
    BAD_TIMESTAMP = 2008
    """The event's ``ts`` is further from the relay's clock than ``max_clock_skew``, or
    a dependency's hlc (another relay's clock) is over ``max_dep_ahead`` ahead of it."""
    RESERVED_KIND = 2009
    """The kind is one only relays write (a coordination outcome such as ``wo.claimed``)."""
    UNKNOWN_DOC = 2010
    """A ``doc.update`` or ``doc.open`` names a document that was never created."""
    BAD_UPDATE = 2011
    """A document update or state vector is not one (garbage), or is over the size limit."""
    DOC_EXISTS = 2012
    """``doc.create`` names a document that exists already."""
    FORBIDDEN = 2013
    """The namespace's policy (or the relay's creation rule) does not let this key
    do that: write, read, change the policy, or create the namespace."""
    SCHEMA_MISMATCH = 2014
    """The body breaks the registered schema of its kind (the reason gives the paths),
    or names a schema version that is not registered."""
    STALE_DOC = 2015
    """A ``doc.update`` names an epoch that is not its document's: it was made against
    an earlier incarnation of a document created again under that name."""

    # 3xxx: subscriptions
    BAD_CURSOR = 3001
    """A subscription's ``from`` is past the namespace head (head + 1 is the most)."""
    SLOW_CONSUMER = 3002
    """The connection did not take frames fast enough; it is closed, not buffered."""
    TOO_MANY_SUBSCRIPTIONS = 3003
    """The connection has ``max_subscriptions`` open, or would follow over ``max_follows``."""
    UNKNOWN_SUBSCRIPTION = 3004
    """``unsubscribe`` names a subscription id this connection does not have."""
    DUPLICATE_SUBSCRIPTION = 3005
    """``subscribe`` reuses a subscription id that is still open on this connection."""
    DOC_RESYNC = 3006
    """A document subscription fell behind and was ended: open it again with your state
    vector (nothing is lost; the relay sends what you miss)."""
    AWARENESS_REFUSED = 3007
    """An awareness update came too fast, too big, or is not one; it was dropped (the
    document subscription goes on)."""

    # 4xxx: queries
    UNKNOWN_QUERY = 4001
    """``query`` names a question this relay does not answer."""
    BAD_QUERY = 4002
    """A query's ``args`` are missing a field, or have an unknown or ill-typed one."""
    NOT_FOUND = 4003
    """The query names something that does not exist (a work order, a context version)."""

    # 5xxx: the relay itself
    INTERNAL = 5001
    """The relay failed; the request may be retried (publishing is idempotent)."""
    SHUTTING_DOWN = 5002
    """The relay is stopping; reconnect later."""
    HOME_UNREACHABLE = 5003
    """The namespace's home relay could not be reached: no link to it, or the write
    waited in the outbox past its deadline. Publishing the same bytes again is safe."""
    RATE_LIMITED = 5004
    """This key sent publishes (or requests) faster than the relay's rate limit; the
    reason says when to try again. Nothing was done: sending the same again is safe."""
    TOO_MANY_CONNECTIONS = 5005
    """This key, or this address, has the most connections the relay allows; a close
    reason only (the connection is closed as soon as it authenticates)."""

    # 6xxx: messages between agents
    UNKNOWN_RECIPIENT = 6001
    """No agent with that id has ever connected to the recipient's relay."""
    INBOX_FULL = 6002
    """The recipient's inbox is at its limit; sending the same message later is safe."""
    MESSAGE_TOO_LARGE = 6003
    """A sealed message is over the relay's limit (``max_message``)."""
    BAD_MESSAGE = 6004
    """A sealed message that does not parse, or whose sender is not the connection's
    agent, or whose signature does not check."""

    @property
    def slug(self) -> str:
        """The lowercase name used in docs, logs and the ``name`` field of error frames."""
        return self.name.lower()

    @property
    def refuses_the_event(self) -> bool:
        """The frame's or the event's own fault (1xxx, 2xxx): the same bytes sent again
        are refused again, so a write answered so did not land and never will. The
        other codes say "not now" or concern something else: such a write may be
        asked again."""
        return self < 3000


class ProtocolError(Exception):
    """A peer's input broke the protocol. ``code`` goes back to the sender."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"{code.slug} ({int(code)}): {reason}")
        self.code = code
        self.reason = reason


T = TypeVar("T")
P = ParamSpec("P")
_TRY_AGAIN = re.compile(r"try again in (\d+) ms")


def retry_after(error: ProtocolError) -> float | None:
    """Seconds a ``rate_limited`` refusal says to wait (its reason ends ``try again in
    N ms``); ``None`` for any other error."""
    if error.code is not ErrorCode.RATE_LIMITED:
        return None
    found = _TRY_AGAIN.search(error.reason)
    return int(found.group(1)) / 1000 if found else 0.1


async def as_told(send: Callable[[], Awaitable[T]], tries: int | None = None) -> T:
    """``send()``, again after the wait a ``rate_limited`` refusal names, until it is
    not rate limited (the relay did nothing: the same again is safe), the wait would
    pass the caller's deadline, or ``tries`` sends were refused (then the refusal is
    raised). A release at the end of a hold must not give up on the first refusal and
    leave the order held, by nobody, until its lease runs out."""
    sent = 0
    while True:
        try:
            return await send()
        except ProtocolError as exc:
            sent += 1
            wait = retry_after(exc)
            # A wait past the caller's deadline is no use: say so now, not at it.
            if wait is None or trio.current_time() + wait > trio.current_effective_deadline():
                raise
            if tries is not None and sent >= tries:
                raise
            await trio.sleep(wait)


def notify(
    log: logging.Logger, name: str, hook: Callable[P, object], *args: P.args, **kwargs: P.kwargs
) -> None:
    """Call ``hook``, the notification hook ``name``: what it raises is logged on
    ``log``, not passed on. A hook only tells of an operation (a shell command
    prints to a stderr that may be closed), from inside the SDK's own tasks, where
    its error would end the publish, the resend or the connection it tells of (a
    BrokenPipeError in the reader would even pass for a lost connection)."""
    try:
        hook(*args, **kwargs)
    except Exception:
        failed(log, f"the {name} hook failed; carrying on as if it had returned")


def failed(log: logging.Logger, what: str) -> None:
    """Log the exception being handled, if logging can: its last-resort handler writes
    to the stderr that may be what failed (closed), and logging passes that on."""
    try:
        log.exception(what)
    except Exception:  # (nowhere left to say it)
        pass


def client_stopped() -> ProtocolError:
    """What a request, subscription or wait of a client that has stopped gets: nothing
    would ever answer it."""
    return ProtocolError(ErrorCode.INTERNAL, "the client stopped")


@contextmanager
def unwrap_single() -> Iterator[None]:
    """Our nurseries are private: hand a lone error out unwrapped, as websockets does."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
