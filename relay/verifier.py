"""A signature-checking process: the relay's checks on another core.

Run as ``python -m relay.verifier`` with pipes for stdin and stdout (relay/signatures.py
starts it). It reads requests and answers each, in order, with one byte per check:

* request: a 4-byte big-endian count ``n``, then ``n`` items of 128 bytes each: the
  author's key (32), the signature (64) and the event id (32);
* answer: ``n`` bytes, 1 where the author signed that id (``EVENT_DOMAIN + id``, the
  message every event signature covers) and 0 where not.

It checks with :func:`agent_sdk.wire.verify_signature`, as the relay does on its loop,
so a verdict is the same wherever it is made. It exits when stdin closes: when the
relay stops, or dies.
"""

from __future__ import annotations

import signal
import sys
from typing import BinaryIO

ITEM = 128
HEADER = 4


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    return data if data is not None and len(data) == size else None


def serve(requests: BinaryIO, answers: BinaryIO) -> None:
    """Answer requests until ``requests`` ends."""
    # Imported here, not above: `python -m relay.verifier` ignores the relay's stop
    # signals (below) before it spends time importing libsodium and msgpack.
    from agent_sdk.wire import EVENT_DOMAIN, verify_signature

    while True:
        header = _read_exactly(requests, HEADER)
        if header is None:
            return
        count = int.from_bytes(header, "big")
        body = _read_exactly(requests, count * ITEM)
        if body is None:
            return
        verdicts = bytearray(count)
        for i in range(count):
            item = body[i * ITEM : (i + 1) * ITEM]
            key, sig, event_id = item[:32], item[32:96], item[96:]
            verdicts[i] = verify_signature(key, sig, EVENT_DOMAIN + event_id)
        answers.write(verdicts)
        answers.flush()


if __name__ == "__main__":
    # The relay decides when this ends (it closes the pipe, or kills it). A Ctrl-C at
    # the relay's terminal reaches this process too, and so does a stop sent to the
    # relay's whole process group or cgroup (systemd's default): ended by it, this
    # process would only be replaced while the relay stops (and a Ctrl-C would print
    # a traceback here).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(sys.stdin.buffer, sys.stdout.buffer)
