"""The physical floor of ingest: Ed25519 verifications (and signatures) per second,
``cryptography`` (OpenSSL) against libsodium (PyNaCl), on one core and on several
threads.

Theory of operation
-------------------
A relay checks one Ed25519 signature per event, so the rate one core verifies at
bounds what one relay process can ingest (bench/ingest.py reports the ratio to it).
This script measures that floor both ways on the same signed events, the way the
relay's message is built (``EVENT_DOMAIN + id``), with key objects built beforehand
so only the verification is timed:

* ``cryptography``: ``Ed25519PublicKey.verify`` (OpenSSL);
* ``pynacl``: ``nacl.signing.VerifyKey.verify(message, signature)`` (libsodium's
  ``crypto_sign_open``: PyNaCl exposes no detached verify, so the signature and the
  message are joined first, a copy of a few hundred bytes), what the relay uses
  (agent_sdk/wire.py).

Signing is measured the same way (``*_sign_per_s``), one signature per message:
a relay signs each coordination outcome and each batch's chain heads, with
libsodium (agent_sdk/identity.py).

The machine is shared and noisy, so the two alternate, ``--rounds`` times each for
``--seconds``, and each figure is the median of its rounds; the ratio is taken
within one run. ``threads_speedup`` runs the same checks split over ``--threads``
threads: above 1 means the library releases the GIL while it verifies (a relay can
then verify off its event loop on another core).

Usage::

    .venv/bin/pip install -e '.[bench]'     # PyNaCl
    .venv/bin/python bench/floor.py [--events 2000] [--seconds 1] [--rounds 5]

Progress goes to stderr; exactly one JSON object goes to stdout. Exit 0 on success, 1
when a check failed or PyNaCl is missing, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent_sdk.identity import Identity
from agent_sdk.wire import EVENT_DOMAIN, Event, sign_event

Check = Callable[[Sequence[Any]], None]


def log(message: str) -> None:
    print(f"[floor] {message}", file=sys.stderr, flush=True)


def signed_samples(count: int) -> list[tuple[bytes, bytes, bytes]]:
    """(author key, signature, signed message) of ``count`` events by 64 authors."""
    authors = [Identity.from_seed(n.to_bytes(32, "big")) for n in range(1, 65)]
    samples = []
    for n in range(count):
        author = authors[n % len(authors)]
        event = Event("bench@local", "app.note", author.public_key, {"n": n, "pad": "x" * 100})
        signed = sign_event(event, author.sign)
        samples.append((author.public_key, signed.sig, EVENT_DOMAIN + signed.id))
    return samples


def with_openssl(samples: Sequence[tuple[bytes, bytes, bytes]]) -> list[tuple[Any, bytes, bytes]]:
    return [(Ed25519PublicKey.from_public_bytes(k), sig, msg) for k, sig, msg in samples]


def check_openssl(prepared: Sequence[tuple[Any, bytes, bytes]]) -> None:
    for key, sig, message in prepared:
        key.verify(sig, message)  # raises InvalidSignature


def with_sodium(samples: Sequence[tuple[bytes, bytes, bytes]]) -> list[tuple[Any, bytes, bytes]]:
    from nacl.signing import VerifyKey

    return [(VerifyKey(k), sig, msg) for k, sig, msg in samples]


def check_sodium(prepared: Sequence[tuple[Any, bytes, bytes]]) -> None:
    for key, sig, message in prepared:
        key.verify(message, sig)  # raises BadSignatureError


def signers(samples: Sequence[tuple[bytes, bytes, bytes]]) -> list[tuple[Any, Any, bytes]]:
    """(OpenSSL key, libsodium key, message): 64 keys, as signed_samples' authors."""
    from nacl.signing import SigningKey

    keys = [n.to_bytes(32, "big") for n in range(1, 65)]
    return [
        (Identity.from_seed(keys[n % 64]).private_key, SigningKey(keys[n % 64]), message)
        for n, (_, _, message) in enumerate(samples)
    ]


def sign_openssl(prepared: Sequence[tuple[Any, Any, bytes]]) -> None:
    for key, _, message in prepared:
        key.sign(message)


def sign_sodium(prepared: Sequence[tuple[Any, Any, bytes]]) -> None:
    for _, key, message in prepared:
        key.sign(message)


def rate(check: Check, prepared: Sequence[Any], seconds: float) -> float:
    """Checks (or signatures) per second on this thread for about ``seconds``."""
    count, start = 0, time.perf_counter()
    while True:
        check(prepared)
        count += len(prepared)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count / elapsed


def threaded_rate(check: Check, prepared: Sequence[Any], seconds: float, threads: int) -> float:
    """Verifications per second over ``threads`` threads working at once."""
    counts = [0] * threads
    start = time.perf_counter()
    deadline = start + seconds

    def work(n: int) -> None:
        # In slices, not whole passes: one thread must not run on alone at the end.
        while time.perf_counter() < deadline:
            for at in range(0, len(prepared), 64):
                check(prepared[at : at + 64])
            counts[n] += len(prepared)

    running = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    return sum(counts) / (time.perf_counter() - start)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    samples = signed_samples(args.events)
    openssl = with_openssl(samples)
    sodium = with_sodium(samples)
    check_openssl(openssl)
    check_sodium(sodium)  # both accept every signature before anything is timed
    signing = signers(samples)
    same = [(k.sign(m), s.sign(m).signature) for k, s, m in signing[:64]]
    if any(a != b for a, b in same):
        raise RuntimeError("OpenSSL and libsodium made different signatures")
    figures: dict[str, list[float]] = {
        k: [] for k in ("openssl", "sodium", "openssl_t", "sodium_t", "openssl_s", "sodium_s")
    }
    for n in range(args.rounds):
        log(f"round {n + 1} of {args.rounds}")
        figures["openssl"].append(rate(check_openssl, openssl, args.seconds))
        figures["sodium"].append(rate(check_sodium, sodium, args.seconds))
        figures["openssl_t"].append(
            threaded_rate(check_openssl, openssl, args.seconds, args.threads)
        )
        figures["sodium_t"].append(threaded_rate(check_sodium, sodium, args.seconds, args.threads))
        figures["openssl_s"].append(rate(sign_openssl, signing, args.seconds))
        figures["sodium_s"].append(rate(sign_sodium, signing, args.seconds))
    med = {k: statistics.median(v) for k, v in figures.items()}
    import nacl

    return {
        "bench": "floor",
        "events": args.events,
        "rounds": args.rounds,
        "threads": args.threads,
        "cpus": len(os.sched_getaffinity(0)),
        "cryptography_verify_per_s": round(med["openssl"]),
        "pynacl_verify_per_s": round(med["sodium"]),
        "pynacl_over_cryptography": round(med["sodium"] / med["openssl"], 3),
        "cryptography_threads_speedup": round(med["openssl_t"] / med["openssl"], 3),
        "pynacl_threads_speedup": round(med["sodium_t"] / med["sodium"], 3),
        "cryptography_sign_per_s": round(med["openssl_s"]),
        "pynacl_sign_per_s": round(med["sodium_s"]),
        "cryptography_rounds": [round(x) for x in figures["openssl"]],
        "pynacl_rounds": [round(x) for x in figures["sodium"]],
        "versions": {
            "cryptography": _version("cryptography"),
            "pynacl": getattr(nacl, "__version__", None),
            "python": platform.python_version(),
        },
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=positive, default=2000)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rounds", type=positive, default=5)
    parser.add_argument("--threads", type=positive, default=2)
    args = parser.parse_args(argv)
    try:
        import nacl.signing  # noqa: F401
    except ImportError:
        error = "PyNaCl is missing: pip install -e '.[bench]'"
        print(json.dumps({"bench": "floor", "error": error}))
        return 1
    try:
        result = measure(args)
    except Exception as exc:  # one JSON object either way, with what went wrong
        print(json.dumps({"bench": "floor", "error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
