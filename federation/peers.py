"""Who a relay federates with: peer names, their pinned keys, and how to reach them.

A peer is written ``NAME=URL#KEY`` on the command line (``--peer``, repeatable):

* ``b=ws://10.0.0.2:7700#<64 hex>`` — relay ``b`` at that URL; this relay dials it
  and accepts a link from it. ``KEY`` is its Ed25519 public key: a relay that
  presents any other key is refused (both ways: dialled or dialling in).
* ``b#<64 hex>`` — accept links from ``b`` but never dial it (it dials us).
* ``c=via:b#<64 hex>`` — relay ``c`` is reached through peer ``b``, which has a
  direct link to ``c``. Its key is still pinned here: mirrors of ``c``'s
  namespaces are checked against it, so ``b`` cannot forge them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from websockets.exceptions import InvalidURI
from websockets.uri import parse_uri

from agent_sdk.wire import NS_RE

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
KEY_RE = re.compile(r"[0-9a-f]{64}")


class PeerSpecError(ValueError):
    """A ``--peer`` value that does not parse; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Peer:
    name: str
    key: bytes
    url: str | None = None
    """Where to dial it; ``None`` for a peer that only dials us, or one reached via another."""
    via: str | None = None
    """The direct peer that relays to this one (multi-hop), or ``None`` when direct."""

    @property
    def spec(self) -> str:
        target = f"={self.url}" if self.url else f"=via:{self.via}" if self.via else ""
        return f"{self.name}{target}#{self.key.hex()}"


def parse_peer(spec: str) -> Peer:
    """Parse ``NAME[=URL|=via:NAME]#KEYHEX``."""
    head, hash_sign, key_hex = spec.rpartition("#")
    if not hash_sign or not KEY_RE.fullmatch(key_hex):
        raise PeerSpecError(f"{spec!r}: end with #KEY, the peer's key as 64 hex digits")
    name, equals, target = head.partition("=")
    if not NAME_RE.fullmatch(name):
        raise PeerSpecError(f"{spec!r}: {name!r} is not a relay name (a-z 0-9 . _ -)")
    key = bytes.fromhex(key_hex)
    if not equals:
        return Peer(name, key)
    if target.startswith("via:"):
        via = target[4:]
        if not NAME_RE.fullmatch(via) or via == name:
            raise PeerSpecError(f"{spec!r}: via names another relay")
        return Peer(name, key, via=via)
    if not target.startswith(("ws://", "wss://")):
        raise PeerSpecError(f"{spec!r}: the URL must start with ws:// or wss://")
    try:  # as the link will dial it: a URL it cannot dial is refused now, not then
        # (and its host as the resolver will encode it: websockets takes `a..b`, and
        # a label over 63 characters, that getaddrinfo's IDNA step refuses)
        parse_uri(target).host.encode("idna")
    except (InvalidURI, ValueError) as exc:  # (a port out of range, a UnicodeError)
        raise PeerSpecError(f"{spec!r}: not a URL to dial: {exc}") from None
    return Peer(name, key, url=target)


def check_peers(peers: list[Peer], own_name: str) -> dict[str, Peer]:
    """Index peers by name, refusing duplicates, ourselves, and a ``via`` that is not
    a direct peer (routes are one hop through a direct peer, never chains)."""
    by_name: dict[str, Peer] = {}
    for peer in peers:
        if peer.name == own_name:
            raise PeerSpecError(f"peer {peer.name!r} is this relay's own name")
        if peer.name in by_name:
            raise PeerSpecError(f"peer {peer.name!r} is listed twice")
        by_name[peer.name] = peer
    for peer in peers:
        if peer.via is not None:
            hop = by_name.get(peer.via)
            if hop is None or hop.via is not None or hop.url is None:
                raise PeerSpecError(f"peer {peer.name!r}: via {peer.via!r} must be a dialled peer")
    return by_name


def home_of(ns: str) -> str:
    """The relay that homes a namespace: the part after ``@`` (docs/protocol.md §3.1)."""
    assert NS_RE.fullmatch(ns), ns
    return ns.rpartition("@")[2]
