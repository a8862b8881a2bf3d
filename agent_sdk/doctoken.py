"""Document tokens: an agent's signed permission for a plain Yjs client to edit.

A y-websocket client cannot sign events. An agent mints a token with its key for one
document (or every document of a namespace, ``doc="*"``) until an expiry; the client
passes it as ``?token=`` to the relay's ``/yjs/<ns>/<doc>`` endpoint. The relay then
writes the client's updates as its own ``doc.update`` events with the token in the
body, so the log still says which agent allowed each change, and anyone can check
the token's signature offline.

A token is the base64url (no padding) of the canonical msgpack map
``{"agent", "doc", "exp", "ns", "sig"}``, and ``secret_hash`` when it is bound; ``sig``
is Ed25519 by ``agent`` over ``DOC_TOKEN_DOMAIN`` + the canonical map without ``sig``.

The log shows the token to everyone who may read the namespace, so a token alone must
not let anyone write. A *bound* token (the default of :func:`mint_bound` and of
``formicary doc token``) names the SHA-256 of a secret that the client presents with
it (``?token=...&secret=...``) and the log never holds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.identity import Identity
from agent_sdk.wire import KEY_SIZE, SIG_SIZE, canonical, decode_canonical, verify_signature

DOC_TOKEN_DOMAIN = b"formicary/v1/doc-token\x00"
MAX_TOKEN = 512
SECRET_SIZE = 32
MAX_SECRET = 44
"""Characters of a secret as given: 32 bytes in base64url, with its padding."""
BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")
FIELDS = {"agent", "doc", "exp", "ns", "sig"}


@dataclass(frozen=True, slots=True)
class DocToken:
    agent: bytes
    ns: str
    doc: str
    exp: int
    raw: bytes
    """The token's canonical bytes, as the log keeps them."""
    bound: bool
    """Whether it names ``secret_hash`` (so it was presented with its secret)."""


def mint(identity: Identity, ns: str, doc: str, exp_ms: int, secret: bytes | None = None) -> str:
    """A token for ``doc`` of ``ns`` (``"*"``: every document) until ``exp_ms``; bound
    to ``secret`` when one is given. Without one it is a bearer token: whoever reads
    the log can use it until it expires (protocol 13.8)."""
    claims: dict[str, object] = {"agent": identity.public_key, "doc": doc, "exp": exp_ms, "ns": ns}
    if secret is not None:
        if len(secret) != SECRET_SIZE:
            raise ValueError(f"a token's secret is {SECRET_SIZE} bytes")
        claims["secret_hash"] = hashlib.sha256(secret).digest()
    sig = identity.sign(DOC_TOKEN_DOMAIN + canonical(claims))
    return _text(canonical({**claims, "sig": sig}))


def mint_bound(identity: Identity, ns: str, doc: str, exp_ms: int) -> tuple[str, str]:
    """A token bound to a fresh secret: ``(token, secret)``, both as the y-websocket
    endpoint takes them (``?token=...&secret=...``, :func:`query`)."""
    secret = secrets.token_bytes(SECRET_SIZE)
    return mint(identity, ns, doc, exp_ms, secret), _text(secret)


def query(token: str, secret: str | None = None) -> str:
    """The query string that presents them (without the ``?``)."""
    return f"token={token}" if secret is None else f"token={token}&secret={secret}"


def check(token: str, ns: str, doc: str, now_ms: int, secret: str | None = None) -> DocToken:
    """The token's claims, if it is valid for ``doc`` of ``ns`` now (with ``secret``,
    as the client gave it, when the token is bound)."""
    refused = ProtocolError(ErrorCode.AUTH_FAILED, "not a document token")
    if len(token) > MAX_TOKEN:
        raise refused
    try:
        fields = decode_canonical(_bytes(token))
    except (binascii.Error, ValueError, ProtocolError):
        raise refused from None
    if not isinstance(fields, dict) or set(fields) - {"secret_hash"} != FIELDS:
        raise refused
    agent, sig, bound = fields["agent"], fields["sig"], fields.get("secret_hash")
    if not (isinstance(agent, bytes) and len(agent) == KEY_SIZE):
        raise refused
    if not (isinstance(sig, bytes) and len(sig) == SIG_SIZE) or type(fields["exp"]) is not int:
        raise refused
    if "secret_hash" in fields and not (isinstance(bound, bytes) and len(bound) == 32):
        raise refused
    claims = {k: v for k, v in fields.items() if k != "sig"}
    if not verify_signature(agent, sig, DOC_TOKEN_DOMAIN + canonical(claims)):
        raise ProtocolError(ErrorCode.AUTH_FAILED, "the token's signature does not verify")
    if fields["ns"] != ns or fields["doc"] not in (doc, "*"):
        reason = f"the token is for {fields['doc']!r} of {fields['ns']!r}"
        raise ProtocolError(ErrorCode.AUTH_FAILED, reason)
    if fields["exp"] <= now_ms:
        raise ProtocolError(ErrorCode.AUTH_FAILED, "the token has expired")
    if isinstance(bound, bytes):
        if secret is None:
            raise ProtocolError(ErrorCode.AUTH_FAILED, "the token is bound: give its secret too")
        try:
            given = _bytes(secret) if len(secret) <= MAX_SECRET else b""
        except (binascii.Error, ValueError):
            given = b""
        if len(given) != SECRET_SIZE or not hmac.compare_digest(
            hashlib.sha256(given).digest(), bound
        ):
            raise ProtocolError(ErrorCode.AUTH_FAILED, "the secret is not the token's")
    raw = canonical(fields)
    return DocToken(agent, fields["ns"], fields["doc"], fields["exp"], raw, bound=bound is not None)


def _text(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _bytes(text: str) -> bytes:
    """base64url, padding optional, no other characters (not even ``+`` or ``/``)."""
    if not BASE64URL.fullmatch(text):
        raise ValueError("not base64url")
    padded = (text + "=" * (-len(text) % 4)).encode()
    return base64.b64decode(padded, altchars=b"-_", validate=True)
