"""The ``formicary`` command: the composition root for agents and relay operators.

Shell-driven agents need no flags: ``FORMICARY_RELAY`` names the relay (default
``ws://127.0.0.1:7700``) and ``FORMICARY_KEY`` the key file (default: created under the
user's config directory on first use). Output is JSON so other tools can read it;
diagnostics go to stderr. Exit codes: 0 success, 1 the operation failed (rejected
event, bad log), 2 usage error.
"""

from __future__ import annotations

import argparse
import errno
import gc
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import trio
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from agent_sdk import (
    cli_auction,
    cli_dir,
    cli_doc,
    cli_msg,
    cli_ns,
    cli_records,
    cli_timeout,
    cli_wo,
)
from agent_sdk.client import (
    DEFAULT_RELAY,
    Delivery,
    Live,
    Published,
    RelayClient,
    RelayMismatch,
)
from agent_sdk.errors import ProtocolError
from agent_sdk.identity import (
    KEY_ENV,
    Identity,
    KeyFileError,
    default_key_path,
    open_key_file,
)
from agent_sdk.wire import to_json_safe

RELAY_ENV = "FORMICARY_RELAY"


def receipt_json(published: Published) -> dict[str, Any]:
    receipt = published.receipt
    return {
        "ns": receipt.ns,
        "seq": receipt.seq,
        "id": receipt.id.hex(),
        "hlc": receipt.hlc,
        "prev": receipt.prev.hex(),
        "relay": receipt.relay.hex(),
        "sealed": published.seal is not None,
        "duplicate": published.duplicate,
    }


def delivery_json(delivery: Delivery) -> dict[str, Any]:
    event = delivery.event.event
    return {
        "ns": event.ns,
        "seq": delivery.receipt.seq,
        "id": delivery.event.id.hex(),
        "kind": event.kind,
        "author": event.author.hex(),
        "ts": event.ts,
        "hlc": delivery.receipt.hlc,
        "deps": [dep.hex() for dep in event.deps],
        "body": to_json_safe(event.body),
    }


def _print(value: Any) -> None:
    print(json.dumps(value, separators=(",", ":")), flush=True)


def _relay_url(args: argparse.Namespace) -> str:
    return str(args.relay or os.environ.get(RELAY_ENV) or DEFAULT_RELAY)


def _identity(args: argparse.Namespace) -> Identity:
    path = Path(args.key) if args.key else default_key_path()
    made = not path.exists()
    try:
        identity = open_key_file(path)
    except KeyFileError as exc:
        raise KeyFileError(f"{exc} (--key or ${KEY_ENV})") from None
    if made:  # a mistyped --key must not pass silently for another agent
        print(f"formicary: no key at {path}: made one, agent {identity.id}", file=sys.stderr)
    return identity


# --------------------------------------------------------------------------- commands


def cmd_keygen(args: argparse.Namespace) -> int:
    path = Path(args.out) if args.out else default_key_path()
    identity = Identity.generate()
    try:
        identity.save(path)
    except FileExistsError:
        if not path.exists():  # (a file where its folder would be)
            raise
        print(f"formicary: {path} exists; not replacing a key", file=sys.stderr)
        return 1
    _print({"key": str(path), "id": identity.id})
    return 0


def _dest(flag: str) -> str:
    """argparse's attribute for ``--a-flag``."""
    return flag.lstrip("-").replace("-", "_")


def cmd_serve(args: argparse.Namespace) -> int:
    from relay.app import SHUTDOWN_GRACE, DataDirError, run_relay, stop_gracefully
    from relay.config import OPTIONS, ConfigError, load
    from relay.logs import configure as configure_logs

    # Until trio listens for it, a SIGTERM stops like a Ctrl-C (no traceback, exit 0).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    flags = {o.name: getattr(args, _dest(o.flag)) for o in OPTIONS if o.flag is not None}
    try:
        settings = load(Path(args.config) if args.config else None, flags)
        config = settings.relay_config()
        federation = settings.federation_config()
    except ConfigError as exc:
        print(f"formicary relay: {exc}", file=sys.stderr)
        return 2
    host, port = settings["relay.host"], settings["relay.port"]
    data = Path(settings["relay.data"])
    configure_logs(settings["relay.log_level"])
    log = logging.getLogger("formicary.relay")

    running: list[Any] = []  # (node, server), once listening

    async def start(nursery: trio.Nursery) -> None:
        node, server = await nursery.start(
            partial(run_relay, federation=federation), data, config, host, port
        )
        bound = server.listeners[0].socket.getsockname()[1]  # the real one, for --port 0
        log.info(
            "formicary relay %s (%s) listening on ws://%s:%d, data in %s",
            config.name,
            node.identity.id,
            f"[{host}]" if ":" in host else host,  # (an IPv6 address, bracketed in a URL)
            bound,
            data,
        )
        # Everything built so far lives as long as the relay: keep the collector off
        # it, and collect the young generation less often (each event allocates a
        # few dozen containers; the default threshold of 700 runs it constantly).
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        running.append((node, server))

    async def main() -> None:
        # Listening for signals before the start (a big log takes a while to fold): a
        # stop asked for meanwhile is a clean one too, with nothing admitted yet.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            log.info("starting: data in %s", data)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(start, nursery)
                async for signum in signals:
                    log.info("signal %d: stopping", signum)
                    if running:
                        with trio.move_on_after(SHUTDOWN_GRACE) as grace:
                            await stop_gracefully(*running[0])
                        if grace.cancelled_caught:
                            log.warning("stopping took over %.0f s: exiting now", SHUTDOWN_GRACE)
                    log.info("stopped")
                    # What is left (a store call in a worker thread, during the start or
                    # after the grace) must not keep the process from ending.
                    _exit_unless_done(STUCK_EXIT)
                    nursery.cancel_scope.cancel()
                    break

    failure: str | None = None
    crashed = False
    try:
        trio.run(main)
    except* KeyboardInterrupt:  # a signal before trio listened for it (see the top)
        log.info("stopped")
    except* DataDirError as group:
        failure = str(_leaves(group)[0])
    except* OSError as group:  # e.g. the port is taken
        error = _leaves(group)[0]
        if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
            failure = f"port {port} on {host} is in use: stop what holds it, or pick another"
            failure += " --port (0 picks a free one)"
        else:
            failure = f"cannot serve: {error}"
    except* Exception as group:  # a store call that failed (fail-stop), or a bug
        error = _leaves(group)[0]
        # One JSON line with the traceback as ``exc``, as every line of its log.
        log.error("stopped by a failure: %s: %s", type(error).__name__, error, exc_info=error)
        crashed = True
    if failure is not None:
        print(f"formicary relay: {failure}", file=sys.stderr)
    return 1 if crashed or failure is not None else 0


STUCK_EXIT = 2.0
"""Seconds a stop, once it has logged ``stopped``, waits for the relay's tasks to end
before the process exits without them."""


def _exit_unless_done(seconds: float) -> None:
    """Exit the process (status 0) in ``seconds`` unless it has ended by then. A store
    call runs in a worker thread that no cancellation reaches (a commit waiting for a
    lock held on the PostgreSQL server waits without end), and trio waits for it: the
    stop would never end. Exiting under it is a SIGKILL's end: what was committed
    stays committed, and what was not was not acknowledged."""

    def leave() -> None:
        sys.stderr.flush()
        os._exit(0)

    timer = threading.Timer(seconds, leave)
    timer.daemon = True  # (a process that ends by itself does not wait for it)
    timer.start()


class _Parser(argparse.ArgumentParser):
    """A command's parser that refuses what it does not know itself, with its own
    usage line (argparse leaves unknown options to the top level, whose usage is the
    list of every command). Subcommands' parsers are of this class too."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extra = super().parse_known_args(args, namespace)
        if extra and self.prog != "formicary":
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed, extra


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("formicary")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def _leaves(error: BaseException) -> list[BaseException]:
    """Every exception inside nested exception groups (trio nurseries nest them), or
    ``error`` itself."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _encodable(value: Any, flag: str) -> None:
    """Refuse what an event cannot carry (an int over 64 bits, a lone surrogate) before
    connecting, as a usage error."""
    from agent_sdk.cli_wo import UsageError
    from agent_sdk.wire import canonical

    try:
        canonical(value)
    except (OverflowError, UnicodeEncodeError, TypeError, ValueError) as exc:
        raise UsageError(f"{flag} cannot go in an event: {exc}") from None


def _hex(text: str, flag: str) -> bytes:
    from agent_sdk.cli_wo import UsageError

    try:
        return bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not hex") from None


def cmd_publish(args: argparse.Namespace) -> int:
    from agent_sdk.cli_wo import EXIT_OF_CODE, UsageError, json_value, tell_queued

    try:
        body = json_value(args.body, "--body") if args.body is not None else None
        _encodable(body, "--body")
        deps = [_hex(dep, "--dep") for dep in args.dep]
        nonce = _hex(args.nonce, "--nonce") if args.nonce else None
        timeout = cli_timeout.seconds(args.timeout)
    except UsageError as exc:
        print(f"formicary: {exc}", file=sys.stderr)
        return 2

    async def main() -> Published:
        async with RelayClient.connect(
            _relay_url(args), _identity(args), reconnect=False
        ) as client:
            tell_queued(client)
            with trio.move_on_after(timeout):
                return await client.publish(args.ns, args.kind, body, deps=deps, nonce=nonce)
            raise cli_timeout.Unconfirmed(args.timeout)

    try:
        published = trio.run(main)
    except cli_timeout.Unconfirmed as exc:
        check = f"formicary tail {args.ns}"
        cli_timeout.say_unconfirmed("formicary publish", str(exc), check, "the event")
        return 1
    except ProtocolError as exc:
        print(f"formicary: rejected: {exc}", file=sys.stderr)
        return EXIT_OF_CODE.get(exc.code, 1)
    _print(receipt_json(published))
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from agent_sdk.cli_wo import EXIT_OF_CODE, tell_reconnects

    async def main() -> None:
        async with (
            RelayClient.connect(_relay_url(args), _identity(args)) as client,
            client.subscribe(args.ns, start=args.start, kinds=args.kind) as subscription,
        ):
            tell_reconnects(client)
            async for item in subscription:
                if isinstance(item, Live):
                    if not args.follow:
                        return
                else:
                    _print(delivery_json(item))

    try:
        trio.run(main)
    except ProtocolError as exc:
        print(f"formicary: {exc}", file=sys.stderr)
        return EXIT_OF_CODE.get(exc.code, 1)
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_relay_key(args: argparse.Namespace) -> int:
    from relay.app import KEY_FILE, STORE_FILE

    data = Path(args.data)
    if (data / STORE_FILE).exists() and not (data / KEY_FILE).exists():
        print(
            f"formicary: {data} holds logs but no {KEY_FILE}: restore the key file", file=sys.stderr
        )
        return 1
    identity = open_key_file(data / KEY_FILE)
    print(identity.id)
    return 0


def cmd_relay_invite(args: argparse.Namespace) -> int:
    """An invite token for one namespace, signed with the relay's key (access.md)."""
    import time

    from agent_sdk.cli_wo import UsageError, lifetime_ms
    from agent_sdk.wire import NS_RE
    from relay.access import mint_invite
    from relay.app import KEY_FILE

    path = Path(args.data) / KEY_FILE
    try:
        ttl = lifetime_ms(args.ttl, "--ttl")
    except UsageError as exc:
        print(f"formicary relay invite: {exc}", file=sys.stderr)
        return 2
    if not NS_RE.fullmatch(args.ns):
        print(f"formicary relay invite: {args.ns!r} is not a namespace", file=sys.stderr)
        return 2
    if not path.exists():
        print(f"formicary relay invite: no {KEY_FILE} in {args.data}", file=sys.stderr)
        return 1
    token = mint_invite(open_key_file(path), args.ns, time.time_ns() // 1_000_000 + ttl)
    print(token.hex())
    return 0


def cmd_relay_store(args: argparse.Namespace) -> int:
    from relay.backup import BackupError, backup, compact, restore

    data = Path(args.data)
    try:
        if args.action == "backup":
            result = backup(data, Path(args.out))
        elif args.action == "restore":
            result = restore(Path(args.source), data)
        else:
            result = compact(data)
    except BackupError as exc:
        print(f"formicary relay {args.action}: {exc}", file=sys.stderr)
        return 1
    _print(result)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from relay.app import KEY_FILE, MIRROR_FILE, STORE_FILE
    from relay.store import Store
    from relay.store.sqlite import SQLiteStore
    from relay.verify import verify_log

    data = Path(args.data)
    path = data / STORE_FILE
    if not args.store and not path.exists():
        print(f"formicary: no store at {path}", file=sys.stderr)
        return 2
    try:
        pinned = dict(_home_key(spec) for spec in args.home_key)
    except ValueError as exc:
        print(f"formicary log verify: {exc}", file=sys.stderr)
        return 2
    key_path = data / KEY_FILE
    own_key = open_key_file(key_path).public_key if key_path.exists() else None
    stores: list[tuple[Store, bool]] = []
    if args.store:
        from relay.store.postgres import PostgresStore, StoreUnavailable

        try:
            stores.append((PostgresStore(args.store, readonly=True), False))
            stores.append((PostgresStore(args.store, prefix="mirror_", readonly=True), True))
        except StoreUnavailable as exc:
            if not stores:
                print(f"formicary log verify: {exc}", file=sys.stderr)
                return 2
    else:
        stores.append((SQLiteStore(path, readonly=True), False))
        if (data / MIRROR_FILE).exists():  # other relays' logs this one follows
            stores.append((SQLiteStore(data / MIRROR_FILE, readonly=True), True))

    def locate(dep: bytes) -> Any:
        for store, _ in stores:
            found = store.find([dep]).get(dep)
            if found is not None:
                return found
        return None

    try:
        failed = False
        chosen = [(store, mirrored, store.namespaces()) for store, mirrored in stores]
        if args.ns != "all":  # the store that holds it, or the relay's own (empty: a failure)
            holding = [(s, m, [args.ns]) for s, m, names in chosen if args.ns in names]
            chosen = holding or [(stores[0][0], False, [args.ns])]
        for store, mirrored, namespaces in chosen:
            for ns in namespaces:
                home = ns.rpartition("@")[2]
                relay_key = pinned.get(home, None if mirrored else own_key)
                verdict = verify_log(ns, store.scan(ns), locate, relay_key)
                _print(
                    {
                        "ns": ns,
                        "ok": verdict.ok,
                        "records": verdict.records,
                        "sealed": verdict.sealed,
                        "bad_seq": verdict.bad_seq,
                        "reason": verdict.reason,
                        "mirror": mirrored,
                        "home_key": relay_key.hex() if relay_key else None,
                    }
                )
                failed = failed or not verdict.ok
    except sqlite3.Error as exc:  # a file that is not a database, say
        print(f"formicary log verify: {data}: {exc}", file=sys.stderr)
        return 2
    finally:
        for store, _ in stores:
            store.close()
    return 1 if failed else 0


def _home_key(spec: str) -> tuple[str, bytes]:
    name, _, key = spec.partition("=")
    try:
        raw = bytes.fromhex(key)
    except ValueError:
        raw = b""
    if not name or len(raw) != 32:
        raise ValueError(f"--home-key {spec!r}: write NAME=KEY, the key as 64 hex digits")
    return name, raw


def cmd_demo(args: argparse.Namespace) -> int:
    from agent_sdk.cli_wo import UsageError, ttl_ms
    from relay.node import RelayConfig
    from simulations.demo import Settings, main

    try:
        settings = Settings(
            agents=args.agents,
            orders=args.orders,
            kills=args.kill,
            pauses=args.freeze,
            ttl_ms=ttl_ms(args.ttl),
            seed=args.seed,
        )
    except UsageError as exc:
        print(f"formicary demo: {exc}", file=sys.stderr)
        return 2
    data = Path(args.data) if args.data else None
    bounds = RelayConfig().claim_ttl  # the demo's relay's: it would refuse other claims
    wrong = [
        (settings.agents < 1, "--agents: at least 1"),
        (settings.orders < 1, "--orders: at least 1"),
        (settings.kills < 0 or settings.pauses < 0, "--kill and --freeze: 0 or more"),
        (
            settings.kills + settings.pauses > settings.agents,
            "more agents to kill or freeze than agents",
        ),
        (
            not bounds.min_ms <= settings.ttl_ms <= bounds.max_ms,
            "--ttl: 1s to 24h, the relay's lease bounds",
        ),
        (data is not None and data.exists() and not data.is_dir(), f"--data {data} is a file"),
    ]
    for is_wrong, reason in wrong:
        if is_wrong:
            print(f"formicary demo: {reason}", file=sys.stderr)
            return 2
    return main(settings, data)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="formicary",
        description="Formicary: coordination for software agents. Agent commands reach the"
        f" relay at ${RELAY_ENV} (default {DEFAULT_RELAY}) as the key in $FORMICARY_KEY;"
        " operators run `formicary relay serve`.",
    )
    parser.add_argument("--version", action="version", version=f"formicary {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def agent_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--relay", help=f"relay URL (${RELAY_ENV}, default {DEFAULT_RELAY})")
        p.add_argument("--key", help="key file ($FORMICARY_KEY, default in the config dir)")

    cli_wo.add_parser(sub, agent_options)
    cli_records.add_parser(sub, agent_options)
    cli_doc.add_parser(sub, agent_options)
    cli_dir.add_parser(sub, agent_options)
    cli_auction.add_parser(sub, agent_options)
    cli_ns.add_parser(sub, agent_options)
    cli_msg.add_parser(sub, agent_options, lambda args: (_relay_url(args), _identity(args)))

    p = sub.add_parser("keygen", help="create an agent key file")
    p.add_argument(  # --key, as every agent command names its key file; --out, as before
        "--key",
        "--out",
        dest="out",
        help="the key file to write (default: $FORMICARY_KEY or the config dir)",
    )
    p.set_defaults(func=cmd_keygen)

    relay = sub.add_parser("relay", help="run a relay").add_subparsers(dest="relay", required=True)
    p = relay.add_parser("serve", help="serve a relay (SQLite in --data, or PostgreSQL: --store)")
    p.add_argument("--config", help="a TOML file of settings (operations.md); flags win")
    from relay.config import OPTIONS
    from relay.logs import LEVELS

    for option in OPTIONS:
        if option.flag is None:
            continue
        shown = f"{option.help} (default {option.default!r}; [{option.section}] {option.key})"
        if option.kind == "peers":
            p.add_argument(
                option.flag,
                action="append",
                default=None,
                metavar="NAME=URL#KEY",
                help="a relay to federate with (repeatable; NAME#KEY: it dials us; "
                "NAME=via:OTHER#KEY: reached through peer OTHER)",
            )
        elif option.kind == "level":
            p.add_argument(option.flag, default=None, choices=LEVELS, help=shown)
        else:
            p.add_argument(option.flag, default=None, type=int if option.kind == "int" else str,
                           help=shown)  # fmt: skip
    p.set_defaults(func=cmd_serve)

    p = relay.add_parser("backup", help="copy a data directory, safely while the relay runs")
    p.add_argument("--data", default="./formicary-data", help="the relay's data directory")
    p.add_argument("--out", required=True, help="a new directory for the backup")
    p.set_defaults(func=cmd_relay_store, action="backup")
    p = relay.add_parser("restore", help="check a backup, then copy it into an empty directory")
    p.add_argument("--from", dest="source", required=True, help="the backup's directory")
    p.add_argument("--data", required=True, help="the data directory to create")
    p.set_defaults(func=cmd_relay_store, action="restore")
    p = relay.add_parser("compact", help="VACUUM the data directory's databases (relay stopped)")
    p.add_argument("--data", default="./formicary-data", help="the relay's data directory")
    p.set_defaults(func=cmd_relay_store, action="compact")
    p = relay.add_parser("invite", help="print a token that lets an agent create a namespace")
    p.add_argument("ns", help="the namespace it creates, name@this-relay")
    p.add_argument("--ttl", default="168h", help="how long the invite is good for")
    p.add_argument("--data", default="./formicary-data", help="the relay's data directory")
    p.set_defaults(func=cmd_relay_invite)
    p = relay.add_parser("key", help="print the relay's key (created if absent), for --peer")
    p.add_argument("--data", default="./formicary-data", help="data directory")
    p.set_defaults(func=cmd_relay_key)

    p = sub.add_parser("publish", help="publish one event; prints its receipt")
    p.add_argument("ns", help="namespace, name@relay")
    p.add_argument("kind", help="event kind, dotted lowercase")
    p.add_argument("--body", help="event body as JSON")
    p.add_argument("--dep", action="append", default=[], help="id (hex) this event depends on")
    p.add_argument("--nonce", help="hex nonce, to publish the same body again on purpose")
    cli_timeout.add_option(p, "the home relay's receipt")
    agent_options(p)
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("tail", help="print a namespace's events as JSON lines")
    p.add_argument("ns")
    p.add_argument("--from", dest="start", type=int, default=1, help="first seq (default 1)")
    p.add_argument("--follow", action="store_true", help="keep streaming live events")
    p.add_argument("--kind", action="append", default=[], help="only this kind (or family.*)")
    agent_options(p)
    p.set_defaults(func=cmd_tail)

    log = sub.add_parser("log", help="work on a relay's stored logs").add_subparsers(
        dest="log", required=True
    )
    p = log.add_parser("verify", help="verify a namespace log offline; exit 1 if bad")
    p.add_argument("ns", help="namespace, or 'all' (mirrored ones included)")
    p.add_argument("--data", default="./formicary-data", help="the relay's data directory")
    p.add_argument("--store", default="", help="the relay's PostgreSQL DSN, if its logs are there")
    p.add_argument(
        "--home-key",
        action="append",
        default=[],
        metavar="NAME=KEY",
        help="the key relay NAME must have signed its namespaces with (repeatable); "
        "default: this relay's own key for its logs, any one key for a mirror",
    )
    p.set_defaults(func=cmd_verify)

    from agent_sdk.cli_wo import ttl_ms
    from simulations import cli as sim_cli

    sim_cli.add_parser(sub, ttl_ms)

    p = sub.add_parser("demo", help="a relay and 20 agents sharing work orders on loopback")
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--orders", type=int, default=60, help="work orders to finish")
    p.add_argument("--kill", type=int, default=3, help="agents killed mid-task")
    p.add_argument("--freeze", type=int, default=1, help="agents frozen past their lease")
    p.add_argument("--ttl", default="3s", help="lease of each claim")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data", help="data directory (default: a temporary one)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    # `lock run` and `once` take a command after `--`: everything past it is the
    # command's, options that look like ours included.
    command: list[str] = []
    if "--" in words and (words[:1] == ["once"] or words[:2] == ["lock", "run"]):
        at = words.index("--")
        words, command = words[:at], words[at + 1 :]
    args = build_parser().parse_args(words)
    if hasattr(args, "cmd"):
        args.cmd = command
    try:
        result: int = args.func(args)
    except (
        OSError,
        BaseExceptionGroup,
        KeyboardInterrupt,
        InvalidURI,
        InvalidHandshake,
        ConnectionClosed,
        RelayMismatch,
        trio.TooSlowError,
        KeyFileError,
    ) as exc:
        errors = _leaves(exc)
        key_errors = [error for error in errors if isinstance(error, KeyFileError)]
        if key_errors:
            print(f"formicary: {key_errors[0]}", file=sys.stderr)
            return 1
        if any(isinstance(error, KeyboardInterrupt) for error in errors):
            # Ctrl-C: one line, and the status a shell gives a command killed by SIGINT
            # (what else ended with it, a client stopped under a task, followed from it).
            print("formicary: interrupted", file=sys.stderr)
            return 128 + signal.SIGINT
        if any(isinstance(error, BrokenPipeError) for error in errors):
            # Whoever read our output stopped (`formicary tail NS | head -1`): stop
            # quietly, with the status a shell gives a command killed by SIGPIPE.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + signal.SIGPIPE
        # An agent command that found no relay: one line, not a traceback. (An error
        # about a file, such as the key file, names it, and is not this.)
        # (Nor is a URL that is no WebSocket URL, or a server there that is no relay,
        # or one that does not finish the handshake in time.)
        # (Nor is a relay that went away while the command waited for its answer.)
        unreachable = (
            InvalidURI,
            InvalidHandshake,
            RelayMismatch,
            trio.TooSlowError,
            ConnectionClosed,
        )
        if not hasattr(args, "key") or not all(
            isinstance(error, unreachable) or (isinstance(error, OSError) and not error.filename)
            for error in errors
        ):
            named = [error for error in errors if isinstance(error, OSError) and error.filename]
            if len(named) == len(errors):  # a path that cannot be made or written
                print(f"formicary: {named[0].filename}: {named[0].strerror}", file=sys.stderr)
                return 1
            raise
        lost = [error for error in errors if isinstance(error, ConnectionClosed)]
        if lost:  # it was there, and went away before it answered
            print(
                f"formicary: lost the relay at {_relay_url(args)} before it answered: {lost[0]}"
                " (did it stop? what was asked may or may not have been done)",
                file=sys.stderr,
            )
            return 1
        broke = [error for error in errors if isinstance(error, RelayMismatch)]
        if broke:  # it answered, but not as a relay does (or not as the relay pinned)
            print(
                f"formicary: the server at {_relay_url(args)} broke the relay protocol: {broke[0]}",
                file=sys.stderr,
            )
            return 1
        print(
            f"formicary: cannot reach the relay at {_relay_url(args)}: {errors[0]}"
            f" (is it running? --relay or ${RELAY_ENV} says where)",
            file=sys.stderr,
        )
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
