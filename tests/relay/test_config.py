"""``formicary relay serve --config relay.toml``: the file, the flags over it, the
errors, and the docs that must list every option."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest
import trio

from relay.config import OPTIONS, ConfigError, load
from tests.processes import relay_process

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


def test_the_file_sets_options_and_flags_win(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[relay]
name = "north"
[limits]
max_frame = 4096
park_timeout = "2s"
[leases]
claim_ttl = "10m"
[messages]
inbox_size = 5
[documents]
bearer_tokens = true
[federation]
peers = ["south=ws://127.0.0.1:7800#" ]
""".replace('#" ]', "#" + "ab" * 32 + '"]'),
    )
    settings = load(path, {"relay.name": None, "limits.max_frame": 8192})
    config = settings.relay_config()
    assert config.name == "north" and config.max_frame == 8192  # the flag over the file
    assert config.sequencer.park_timeout_ms == 2000 and config.claim_ttl.default_ms == 600_000
    assert config.inbox_max_items == 5 and config.max_deps == 32  # the default
    assert config.doc_bearer_tokens and not load(None, {}).relay_config().doc_bearer_tokens
    federation = settings.federation_config()
    assert federation is not None and [p.name for p in federation.peers] == ["south"]
    assert load(None, {}).federation_config() is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[limits]\nmax_framez = 1\n", "unknown option limits.max_framez ([limits] has max_frame"),
        ("[nowhere]\nx = 1\n", "unknown option nowhere.x"),
        ('[limits]\nmax_frame = "big"\n', "is not a whole number"),
        ("[limits]\npark_timeout = 10\n", "a duration is a string"),
        ('[leases]\nclaim_ttl = "30 minutes"\n', "use a number with ms, s, m or h"),
        ('[relay]\nlog_level = "loud"\n', "one of debug, info"),
        ("[relay]\nlog_level = { a = 1 }\n", "one of debug, info"),
        ('[access]\ncreate = ["x"]\n', "one of "),
        ('[documents]\nbearer_tokens = "yes"\n', "true or false"),
        ("[documents]\nbearer_tokens = 1\n", "true or false"),
        ('name = "x"\n', "is not a [section]"),
        ("[relay\n", "not TOML"),
        ('[leases]\nmin = "1h"\nmax = "1m"\n', "leases.claim_ttl (--claim-ttl) must lie within"),
        ('[leases]\nmin = "10m"\n', "leases.lock_ttl (--lock-ttl) must lie within"),
        # a stake goes into signed events, where msgpack stops at 64 bits
        ("[auctions]\ninitial_stake = 99999999999999999999\n", "the most that works"),
        ('[leases]\nmax = "9999999999999999h"\n', "too long"),
        ('[messages]\ninbox_ttl = "2562047788015h"\n', "too long"),  # (now + it: past int64)
        ("[messages]\ninbox_size = 0\n", "below 1"),
        ('[auctions]\nhalf_life = "0s"\n', "too short"),
        ("[documents]\nmax_live = 0\n", "below 1"),
        ('[limits]\nmax_clock_skew = "0s"\n', "too short"),
        ('[federation]\npeers = ["nokey=ws://x"]\n', "federation.peers (--peer): 'nokey="),
        ("[limits]\nmax_frame = 0\n", "below 1, the least that works"),
        ('[limits]\nauth_timeout = "0s"\n', "too short"),
        ("[limits]\npublish_burst = 0\n", "publish_burst must be at least 1"),
    ],
)
def test_a_bad_file_is_a_clear_error(tmp_path: Path, text: str, says: str) -> None:
    with pytest.raises(ConfigError) as error:
        settings = load(write(tmp_path, text), {})
        settings.relay_config()
        settings.federation_config()
    assert says in str(error.value)


def test_a_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_bytes(b"\x00\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(path, {})


def test_a_missing_file_is_named() -> None:
    with pytest.raises(ConfigError) as error:
        load(Path("/nowhere/relay.toml"), {})
    assert "--config /nowhere/relay.toml" in str(error.value)


def test_operations_md_documents_every_option() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    missing = [o.name for o in OPTIONS if f"`{o.name}`" not in text]
    assert missing == []


async def test_a_relay_process_serves_with_its_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nmax_frame = 65536\n[messages]\ninbox_size = 7\n")
    async with relay_process(tmp_path / "data", "--config", str(path)) as relay:
        url = relay.url.replace("ws://", "http://") + "/info"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        body = await trio.to_thread.run_sync(lambda: opener.open(url, timeout=10).read())
        limits = json.loads(body)["limits"]
        assert limits["max_frame"] == 65536 and limits["inbox_max_items"] == 7
    bad = write(tmp_path, "[limits]\nmax_frame = -1\n")
    done = await trio.run_process(
        [sys.executable, "-m", "agent_sdk.cli", "relay", "serve", "--config", str(bad)],
        check=False, capture_stderr=True,
    )  # fmt: skip
    assert done.returncode == 2 and b"limits.max_frame" in done.stderr


async def test_a_peer_url_that_cannot_be_dialled_is_a_usage_error(tmp_path: Path) -> None:
    """operations.md: a ``--peer`` that does not parse is a usage error, exit status 2,
    before anything starts. A URL with a port out of range (or not a number, or an
    unclosed IPv6 bracket) passed the check: the relay made its data directory,
    started, and died as its link first dialled, exit status 1 with a traceback."""
    data = tmp_path / "data"
    done = await trio.run_process(
        [sys.executable, "-m", "agent_sdk.cli", "relay", "serve", "--port", "0",
         "--data", str(data), "--peer", f"b=ws://127.0.0.1:99999#{'ab' * 32}"],
        check=False, capture_stderr=True,
    )  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 2 and "federation.peers (--peer)" in err, err
    assert "Traceback" not in err and not data.exists()
