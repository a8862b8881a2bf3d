"""Document tokens: an agent's signed permission for a plain Yjs client to edit.

A y-websocket client cannot sign events. An agent mints a token with its key for one
document (or every document of a namespace, ``doc="*"``) until an expiry; the client
passes it as ``?token=`` to the relay's ``/yjs/<ns>/<doc>`` endpoint. The relay then
writes the client's updates as its own ``doc.update`` events with the token in the
body, so the log still says which agent allowed each change, and anyone can check
the token's signature offline.

A token is the base64url (no padding) of the canonical msgpack map
``{"agent", "doc", "exp", "ns", "sig"}``; ``sig`` is Ed25519 by ``agent`` over
``DOC_TOKEN_DOMAIN`` + the canonical map without ``sig``.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.identity import Identity
from agent_sdk.wire import KEY_SIZE, SIG_SIZE, canonical, decode_canonical, verify_signature

DOC_TOKEN_DOMAIN = b"formicary/v1/doc-token\x00"
MAX_TOKEN = 512


@dataclass(frozen=True, slots=True)
class DocToken:
    agent: bytes
    ns: str
    doc: str
    exp: int
    raw: bytes
    """The token's canonical bytes, as the log keeps them."""


def mint(identity: Identity, ns: str, doc: str, exp_ms: int) -> str:
    claims = {"agent": identity.public_key, "doc": doc, "exp": exp_ms, "ns": ns}
    sig = identity.sign(DOC_TOKEN_DOMAIN + canonical(claims))
    raw = canonical({**claims, "sig": sig})
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def check(token: str, ns: str, doc: str, now_ms: int) -> DocToken:
    """The token's claims, if it is valid for ``doc`` of ``ns`` now."""
    refused = ProtocolError(ErrorCode.AUTH_FAILED, "not a document token")
    if len(token) > MAX_TOKEN:
        raise refused
    try:
        padded = (token + "=" * (-len(token) % 4)).encode()
        raw = base64.b64decode(padded, altchars=b"-_", validate=True)
        fields = decode_canonical(raw)
    except (binascii.Error, ValueError, ProtocolError):
        raise refused from None
    if not isinstance(fields, dict) or set(fields) != {"agent", "doc", "exp", "ns", "sig"}:
        raise refused
    agent, sig = fields["agent"], fields["sig"]
    if not (isinstance(agent, bytes) and len(agent) == KEY_SIZE):
        raise refused
    if not (isinstance(sig, bytes) and len(sig) == SIG_SIZE) or type(fields["exp"]) is not int:
        raise refused
    claims = {k: v for k, v in fields.items() if k != "sig"}
    if not verify_signature(agent, sig, DOC_TOKEN_DOMAIN + canonical(claims)):
        raise ProtocolError(ErrorCode.AUTH_FAILED, "the token's signature does not verify")
    if fields["ns"] != ns or fields["doc"] not in (doc, "*"):
        reason = f"the token is for {fields['doc']!r} of {fields['ns']!r}"
        raise ProtocolError(ErrorCode.AUTH_FAILED, reason)
    if fields["exp"] <= now_ms:
        raise ProtocolError(ErrorCode.AUTH_FAILED, "the token has expired")
    return DocToken(agent, fields["ns"], fields["doc"], fields["exp"], canonical(fields))
