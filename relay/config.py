"""A relay's settings: defaults, a TOML file (``--config``), then command-line flags.

Every option is one row of :data:`OPTIONS`: where it lives in the TOML file
(``[section] key``), what it is, its default, and the flag that sets it, if any.
The parser's flags, the file's checks and the operator docs (operations.md,
"Configuration") all come from this table, so they cannot drift apart. Durations
are written as on the command line (``"30s"``, ``"5m"``, ``"168h"``).
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent_sdk.cli_wo import UsageError, ttl_ms
from federation.network import FederationConfig
from federation.peers import check_peers, parse_peer
from relay.access import Creation
from relay.coordination.leases import TtlBounds
from relay.limits import RateLimits
from relay.logs import LEVELS
from relay.node import RelayConfig
from relay.sequencer import Limits

MAX_VALUE = (1 << 63) - 1
"""Numbers go into signed events (a stake, a lease's end): msgpack's int64 at most."""
MAX_DURATION_MS = 100 * 365 * 24 * 3_600_000
"""A century: durations are added to the time of day, which must stay an int64."""


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the option and what would do."""


@dataclass(frozen=True)
class Option:
    section: str
    key: str
    kind: str
    """``int``, ``bool``, ``duration``, ``str``, ``level``, ``peers``, ``creation``,
    ``keys`` or ``addresses``."""
    default: Any
    help: str
    flag: str | None = None
    minimum: int = 0
    """The least value that makes sense (ints; durations in ms)."""
    maximum: int = MAX_VALUE
    """The most (ints; a duration's is MAX_DURATION_MS)."""

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


OPTIONS: tuple[Option, ...] = (
    Option("relay", "name", "str", "local", "relay name: namespaces NAME@this", "--name"),
    Option("relay", "host", "str", "127.0.0.1", "address to listen on", "--host"),
    Option(
        "relay",
        "port",
        "int",
        7700,
        "port for WebSocket and HTTP; 0 picks one",
        "--port",
        maximum=65535,
    ),
    Option("relay", "data", "str", "./formicary-data", "data directory", "--data"),
    Option("relay", "log_level", "level", "info", "JSON log lines from this level", "--log-level"),
    Option(
        "limits", "max_frame", "int", 1 << 20, "largest message, bytes", "--max-frame", minimum=1
    ),
    Option("limits", "max_deps", "int", 32, "most deps per event", minimum=1),
    Option(
        "limits", "max_subscriptions", "int", 64, "open subscriptions per connection", minimum=1
    ),
    Option("limits", "max_follows", "int", 256, "namespaces followed per connection", minimum=1),
    Option("limits", "max_inflight", "int", 1024, "unanswered requests per connection", minimum=1),
    Option("limits", "send_queue", "int", 256, "outgoing frames queued per connection", minimum=1),
    Option(
        "limits", "slow_consumer_timeout", "duration", "30s", "wait for send_queue room", minimum=1
    ),
    Option("limits", "auth_timeout", "duration", "10s", "time to authenticate", minimum=1),
    Option("limits", "max_parked", "int", 10_000, "events waiting for deps, relay-wide"),
    Option(
        "limits", "park_timeout", "duration", "10s", "how long an event waits for deps", minimum=1
    ),
    Option("limits", "max_clock_skew", "duration", "24h", "event ts vs relay clock", minimum=1000),
    Option(
        "limits",
        "max_dep_ahead",
        "duration",
        "1m",
        "a dependency's hlc vs relay clock",
    ),
    Option("limits", "verify_workers", "int", 1, "signature-checking processes (0: on the loop)"),
    Option("limits", "publish_rate", "int", 100, "publish tokens per second per key"),
    Option("limits", "publish_burst", "int", 200, "publish tokens a key may spend at once"),
    Option("limits", "request_rate", "int", 200, "queries and messages per second per key"),
    Option("limits", "request_burst", "int", 400, "requests a key may send at once"),
    Option("limits", "connections_per_key", "int", 64, "connections of one key"),
    Option("limits", "connections_per_address", "int", 4096, "connections from one address"),
    Option("limits", "trusted_proxies", "addresses", [], "proxies whose X-Forwarded-For counts"),
    Option("leases", "claim_ttl", "duration", "30m", "lease of a claim naming none", "--claim-ttl"),
    Option("leases", "lock_ttl", "duration", "5m", "lease of a lock naming none", "--lock-ttl"),
    Option("leases", "min", "duration", "1s", "shortest lease asked for", "--lease-min"),
    Option("leases", "max", "duration", "24h", "longest lease asked for", "--lease-max"),
    Option("auctions", "initial_stake", "int", 100, "stake of a new member", "--initial-stake"),
    Option(
        "auctions",
        "half_life",
        "duration",
        "168h",
        "reputation half-life",
        "--half-life",
        minimum=1,
    ),
    Option("documents", "compact_every", "int", 1000, "updates between snapshots", minimum=1),
    Option("documents", "max_live", "int", 1024, "documents kept loaded", minimum=1),
    Option(
        "documents",
        "bearer_tokens",
        "bool",
        False,
        "take document tokens without a secret (any reader of the log can use them)",
    ),
    Option(
        "messages",
        "max_message",
        "int",
        256 << 10,
        "largest sealed message",
        "--max-message",
        minimum=1,
    ),
    Option(
        "messages",
        "inbox_size",
        "int",
        1000,
        "messages an inbox holds",
        "--inbox-size",
        minimum=1,
    ),
    Option(
        "messages",
        "inbox_ttl",
        "duration",
        "168h",
        "undelivered lifetime",
        "--inbox-ttl",
        minimum=1,
    ),
    Option("messages", "inbox_max_bytes", "int", 256 << 20, "bytes of all inboxes", minimum=1),
    Option("messages", "inbox_per_sender", "int", 250, "one sender's messages in an inbox"),
    Option("store", "dsn", "str", "", "PostgreSQL DSN; empty: embedded SQLite", "--store"),
    Option("access", "create", "creation", "open", "who creates namespaces: open, allow, invite"),
    Option("access", "creators", "keys", [], "keys (hex) that may create namespaces"),
    Option("federation", "peers", "peers", [], "relays to federate with", "--peer"),
    Option(
        "federation",
        "outbox_deadline",
        "duration",
        "10m",
        "how long a write waits for its home",
        "--outbox-deadline",
    ),
)
BY_NAME = {option.name: option for option in OPTIONS}


def duration_ms(text: str, where: str) -> int:
    """``1500ms``, ``90s``, ``30m``, ``2h``: a whole number and a unit."""
    try:
        return ttl_ms(text, where)
    except UsageError as exc:
        raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class Settings:
    """Every option's value, by ``section.key``; durations in ms."""

    values: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def relay_config(self) -> RelayConfig:
        v = self.values
        for what in ("publish", "request"):
            if v[f"limits.{what}_rate"] > 0 and v[f"limits.{what}_burst"] < 1:
                raise ConfigError(
                    f"limits.{what}_burst must be at least 1 while limits.{what}_rate is "
                    "set (0 for both turns the limit off)"
                )
        for ttl in ("claim_ttl", "lock_ttl"):  # (named here by option, not by field)
            if not 0 < v["leases.min"] <= v[f"leases.{ttl}"] <= v["leases.max"]:
                raise ConfigError(
                    f"leases.{ttl} (--{ttl.replace('_', '-')}) must lie within leases.min "
                    "(--lease-min) and leases.max (--lease-max)"
                )
        claims = TtlBounds(
            min_ms=v["leases.min"], max_ms=v["leases.max"], default_ms=v["leases.claim_ttl"]
        )
        try:
            return RelayConfig(
                name=v["relay.name"],
                max_frame=v["limits.max_frame"],
                max_deps=v["limits.max_deps"],
                max_subscriptions=v["limits.max_subscriptions"],
                max_follows=v["limits.max_follows"],
                max_inflight=v["limits.max_inflight"],
                send_queue=v["limits.send_queue"],
                slow_consumer_timeout=v["limits.slow_consumer_timeout"] / 1000,
                auth_timeout=v["limits.auth_timeout"] / 1000,
                verify_workers=v["limits.verify_workers"],
                sequencer=Limits(
                    max_parked=v["limits.max_parked"],
                    park_timeout_ms=v["limits.park_timeout"],
                    max_clock_skew_ms=v["limits.max_clock_skew"],
                    max_dep_ahead_ms=v["limits.max_dep_ahead"],
                ),
                claim_ttl=claims,
                lock_ttl=replace(claims, default_ms=v["leases.lock_ttl"]),
                initial_stake=v["auctions.initial_stake"],
                reputation_half_life_ms=v["auctions.half_life"],
                doc_compact_every=v["documents.compact_every"],
                max_live_docs=v["documents.max_live"],
                doc_bearer_tokens=v["documents.bearer_tokens"],
                max_message=v["messages.max_message"],
                inbox_max_items=v["messages.inbox_size"],
                inbox_ttl_ms=v["messages.inbox_ttl"],
                inbox_max_bytes=v["messages.inbox_max_bytes"],
                inbox_per_sender=v["messages.inbox_per_sender"],
                rate_limits=RateLimits(
                    publish_rate=v["limits.publish_rate"],
                    publish_burst=v["limits.publish_burst"],
                    request_rate=v["limits.request_rate"],
                    request_burst=v["limits.request_burst"],
                    connections_per_key=v["limits.connections_per_key"],
                    connections_per_address=v["limits.connections_per_address"],
                    trusted_proxies=frozenset(v["limits.trusted_proxies"]),
                ),
                store=v["store.dsn"],
                create=Creation(v["access.create"]),
                creators=frozenset(v["access.creators"]),
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def federation_config(self) -> FederationConfig | None:
        try:
            peers = tuple(parse_peer(spec) for spec in self.values["federation.peers"])
            check_peers(list(peers), self.values["relay.name"])
        except ValueError as exc:  # (named as the other options are)
            raise ConfigError(f"federation.peers (--peer): {exc}") from None
        if not peers:
            return None
        return FederationConfig(peers, outbox_deadline_ms=self.values["federation.outbox_deadline"])


def load(path: Path | None, flags: dict[str, Any]) -> Settings:
    """Defaults, then the TOML file at ``path``, then ``flags`` (option name ->
    value as typed on the command line; ``None`` for a flag not given)."""
    raw: dict[str, Any] = {o.name: o.default for o in OPTIONS}
    where: dict[str, str] = {o.name: "default" for o in OPTIONS}
    if path is not None:
        for name, value in _read(path).items():
            raw[name], where[name] = value, f"{path}: {name}"
    for name, value in flags.items():
        if value is not None and value != []:
            option = BY_NAME[name]
            raw[name], where[name] = value, option.flag or name
    return Settings(
        {name: _typed(BY_NAME[name], value, where[name]) for name, value in raw.items()}
    )


def _read(path: Path) -> dict[str, Any]:
    try:
        document = tomllib.loads(path.read_bytes().decode())
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config {path}: not UTF-8 text: {exc.reason}") from None
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path}: not TOML: {exc}") from None
    found: dict[str, Any] = {}
    for section, table in document.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section!r} is not a [section]; see operations.md")
        for key, value in table.items():
            name = f"{section}.{key}"
            if name not in BY_NAME:
                known = ", ".join(o.key for o in OPTIONS if o.section == section)
                hint = f" ([{section}] has {known})" if known else ""
                raise ConfigError(f"{path}: unknown option {name}{hint}")
            found[name] = value
    return found


def _typed(option: Option, value: Any, where: str) -> Any:
    kind = option.kind
    if kind == "int":
        if type(value) is not int or value < 0:
            raise ConfigError(f"{where}: {value!r} is not a whole number")
        if value < option.minimum:
            raise ConfigError(f"{where}: {value} is below {option.minimum}, the least that works")
        if value > option.maximum:
            raise ConfigError(f"{where}: {value} is over {option.maximum}, the most that works")
        return value
    if kind == "bool":
        if type(value) is not bool:
            raise ConfigError(f"{where}: {value!r}: true or false")
        return value
    if kind == "duration":
        if not isinstance(value, str):
            raise ConfigError(f'{where}: {value!r}: a duration is a string like "30s"')
        ms = duration_ms(value, where)
        if ms < option.minimum:
            raise ConfigError(f"{where}: {value!r} is too short: at least {option.minimum} ms")
        if ms > MAX_DURATION_MS:
            raise ConfigError(f"{where}: {value!r} is too long: at most {MAX_DURATION_MS} ms")
        return ms
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {value!r} is not a string")
        return value
    if kind == "level":
        if not isinstance(value, str) or value not in LEVELS:
            raise ConfigError(f"{where}: {value!r}: one of {', '.join(LEVELS)}")
        return value
    if kind == "creation":
        if not isinstance(value, str) or value not in set(Creation):
            raise ConfigError(f"{where}: {value!r}: one of {', '.join(Creation)}")
        return value
    if kind == "addresses":
        if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
            raise ConfigError(f'{where}: a list of IP addresses, such as ["10.0.0.2"]')
        for address in value:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ConfigError(f"{where}: {address!r} is not an IP address") from None
        return list(value)
    if kind == "keys":
        wrong = ConfigError(f"{where}: a list of keys, each 64 hex digits")
        if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
            raise wrong
        try:
            parsed = [bytes.fromhex(k) for k in value]
        except ValueError:
            raise wrong from None
        if any(len(k) != 32 for k in parsed):
            raise wrong
        return parsed
    assert kind == "peers"
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f'{where}: a list of "NAME=URL#KEY" strings')
    return list(value)
