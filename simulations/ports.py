"""Loopback ports picked before a relay listens on them.

A relay whose peers must name it (``--peer name=url#key``), or which a run restarts
on the same address, needs its port fixed before it starts. A port the kernel hands
out for port 0 is a poor pick: that range is also where outgoing connections get
their ports, so a relay's own link to a peer can take the planned port before the
relay listens on it (EADDRINUSE, seen in CI). Below that range the kernel hands out
nothing by itself.
"""

from __future__ import annotations

import os
import socket

PORTS_BELOW = 32768
"""Where the kernel's ephemeral ports start (Linux's default ``ip_local_port_range``)."""
SPAN = 12_000
"""How many ports below the ephemeral range are picked from."""

_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now and below the ephemeral range, for listening on later.

    Each port is handed out once per process, and processes start at different
    places (their pid), so concurrent runs rarely probe the same ports."""
    floor = _ephemeral_start() - SPAN
    for step in range(SPAN):
        port = floor + (os.getpid() * 97 + len(_handed_out) + step) % SPAN
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise OSError("no free loopback port below the ephemeral range")


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return max(int(ports.read().split()[0]), SPAN + 1_000)
    except (OSError, ValueError, IndexError):
        return PORTS_BELOW
