"""The ``formicary`` CLI as a shell agent uses it: real processes, env vars, JSON out."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from websockets.trio.server import serve as serve_ws

from agent_sdk import frames as f
from agent_sdk.identity import Identity
from tests.agent_sdk.shell import read_until, running
from tests.conftest import RunningRelay


async def formicary(*args: str, env: dict[str, str] | None = None) -> trio.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "agent_sdk.cli", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, **(env or {})},
    )


def lines(result: trio.CompletedProcess[bytes]) -> list[dict[str, object]]:
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


async def test_keygen_writes_a_private_key_once(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "agent.key"
    result = await formicary("keygen", "--out", str(path))
    assert result.returncode == 0, result.stderr
    [out] = lines(result)
    assert out["id"] == Identity.load(path).id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = await formicary("keygen", "--key", str(path))  # as agent commands name it
    assert again.returncode == 1 and b"not replacing" in again.stderr
    assert Identity.load(path).id == out["id"]


@pytest.mark.parametrize(
    "command",
    [
        ["keygen", "--out", "FILE/agent.key"],
        ["demo", "--data", "FILE/data"],
    ],
)
async def test_a_path_that_cannot_be_made_is_one_line_not_a_traceback(
    tmp_path: Path, command: list[str]
) -> None:
    (tmp_path / "FILE").write_text("")
    paths = [word.replace("FILE", str(tmp_path / "FILE")) for word in command]
    result = await formicary(*paths)
    said = result.stderr.decode()
    assert result.returncode in (1, 2) and "Traceback" not in said, said
    assert str(tmp_path / "FILE") in said and len(said.strip().splitlines()) == 1, said
    assert "not replacing" not in said  # no key is there to replace


async def test_shell_agent_publishes_and_tails_with_env_only(
    relay: RunningRelay, tmp_path: Path
) -> None:
    env = {"FORMICARY_RELAY": relay.url, "FORMICARY_KEY": str(tmp_path / "agent.key")}
    first = await formicary("publish", "jobs@local", "app.note", "--body", '{"n": 1}', env=env)
    assert first.returncode == 0, first.stderr
    [receipt] = lines(first)
    assert receipt["seq"] == 1 and receipt["ns"] == "jobs@local" and receipt["sealed"] is True
    assert (tmp_path / "agent.key").exists()  # created on first use

    second = await formicary(
        "publish", "jobs@local", "app.done", "--dep", str(receipt["id"]), env=env
    )
    assert second.returncode == 0, second.stderr

    tail = await formicary("tail", "jobs@local", env=env)
    assert tail.returncode == 0, tail.stderr
    events = lines(tail)
    assert [e["seq"] for e in events] == [1, 2]
    assert events[0]["body"] == {"n": 1}
    assert events[1]["deps"] == [receipt["id"]]
    assert events[0]["author"] == Identity.load(tmp_path / "agent.key").id

    only_done = lines(await formicary("tail", "jobs@local", "--kind", "app.done", env=env))
    assert [e["kind"] for e in only_done] == ["app.done"]


async def test_cli_errors_are_clear(relay: RunningRelay, tmp_path: Path) -> None:
    env = {"FORMICARY_RELAY": relay.url, "FORMICARY_KEY": str(tmp_path / "agent.key")}
    foreign = await formicary("publish", "jobs@elsewhere", "app.note", env=env)
    assert foreign.returncode == 1 and b"not_home" in foreign.stderr
    bad_json = await formicary("publish", "jobs@local", "app.note", "--body", "{", env=env)
    assert bad_json.returncode == 2 and b"not JSON" in bad_json.stderr
    cursor = await formicary("tail", "jobs@local", "--from", "9", env=env)
    assert cursor.returncode == 1 and b"bad_cursor" in cursor.stderr
    # The caller's own words are wrong: a usage error (2), as `wo list --ns bad` is.
    for command in (["publish", "no-relay-part", "app.note"], ["tail", "no-relay-part"],
                    ["publish", "jobs@local", "wo.created"]):  # fmt: skip
        malformed = await formicary(*command, env=env)
        assert malformed.returncode == 2, (command, malformed.stderr)


async def one_line_errors(url: str, tmp_path: Path) -> list[str]:
    """What agent commands that talk to ``url`` say on stderr, each exiting 1 without a
    traceback."""
    env = {"FORMICARY_RELAY": url, "FORMICARY_KEY": str(tmp_path / "agent.key")}
    said = []
    for command in (["publish", "jobs@local", "app.note"], ["tail", "jobs@local"],
                    ["msg", "inbox"]):  # fmt: skip
        result = await formicary(*command, env=env)
        err = result.stderr.decode()
        assert result.returncode == 1 and "Traceback" not in err, err
        said.append(err)
    return said


async def test_without_a_relay_or_a_place_to_serve_the_cli_says_what_to_do(
    tmp_path: Path,
) -> None:
    closed = socket.socket()  # bound, not listening: connecting to it is refused
    taken = socket.socket()  # listening: serving on it finds the port in use
    with closed, taken:
        closed.bind(("127.0.0.1", 0))
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        url = f"ws://127.0.0.1:{closed.getsockname()[1]}"
        for err in await one_line_errors(url, tmp_path):
            assert f"cannot reach the relay at {url}" in err and "FORMICARY_RELAY" in err
        port = str(taken.getsockname()[1])
        serve = ["relay", "serve", "--host", "127.0.0.1", "--port", port]
        busy = await formicary(*serve, "--data", str(tmp_path / "data"))
        assert (
            busy.returncode == 1 and f"port {port} on 127.0.0.1 is in use" in busy.stderr.decode()
        )
        assert not (tmp_path / "data").exists()  # found before anything was made

    # A WebSocket server that is not a relay (its first frame is not hello): one line.
    async def not_a_relay(ws: Any) -> None:
        await ws.send(f.encode_frame(f.Live(sub=1, ns="x@local", seq=1)))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        serving = partial(serve_ws, not_a_relay, 0, host="127.0.0.1")
        server = await nursery.start(serving)
        url = f"ws://127.0.0.1:{server.listeners[0].socket.getsockname()[1]}"
        for err in await one_line_errors(url, tmp_path):
            assert f"the server at {url} broke the relay" in err and "expected hello" in err
        nursery.cancel_scope.cancel()
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    on_a_file = await formicary("relay", "serve", "--port", "0", "--data", str(a_file))
    assert on_a_file.returncode == 1 and b"is a file, not a data directory" in on_a_file.stderr


async def test_ctrl_c_stops_a_long_command_with_one_line_and_the_sigint_status(
    tmp_path: Path,
) -> None:
    """A simulation stopped with Ctrl-C (`tail --follow` takes it as its normal stop)."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "agent_sdk.cli", "sim", "run", "work_queue", "--virtual-time",
         "--agents", "200", "--orders", "100000", "--out", str(tmp_path / "sim")],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    err = b""
    with trio.fail_after(60):
        while b"work_queue: 200 agents" not in err:  # it says what it runs, then runs it
            err += await process.stderr.receive_some()
        process.send_signal(signal.SIGINT)
        async for chunk in process.stderr:
            err += chunk
        await process.wait()
    text = err.decode()
    assert process.returncode == 128 + signal.SIGINT, text
    assert "interrupted" in text and "Traceback" not in text


async def test_a_reader_that_stops_reading_is_not_a_relay_failure(
    relay: RunningRelay, tmp_path: Path
) -> None:
    env = {"FORMICARY_RELAY": relay.url, "FORMICARY_KEY": str(tmp_path / "agent.key")}
    for _ in range(3):
        assert (await formicary("publish", "pipe@local", "app.note", env=env)).returncode == 0
    read, write = os.pipe()
    os.close(read)  # as `| head -1` once it has its line
    try:
        done = await trio.run_process(
            [sys.executable, "-m", "agent_sdk.cli", "tail", "pipe@local", "--from", "1"],
            stdout=write,
            capture_stderr=True,
            check=False,
            env={**os.environ, **env},
        )
    finally:
        os.close(write)
    err = done.stderr.decode()
    assert done.returncode == 128 + signal.SIGPIPE, err
    assert "cannot reach" not in err and "Traceback" not in err and "Exception" not in err


async def test_log_verify_passes_then_names_the_first_bad_seq(
    relay: RunningRelay, tmp_path: Path
) -> None:
    env = {"FORMICARY_RELAY": relay.url, "FORMICARY_KEY": str(tmp_path / "agent.key")}
    for n in range(4):
        result = await formicary("publish", "jobs@local", "app.n", "--body", str(n), env=env)
        assert result.returncode == 0, result.stderr
    relay.scope.cancel()  # stop the relay: verification is offline
    await trio.testing.wait_all_tasks_blocked()

    ok = await formicary("log", "verify", "jobs@local", "--data", str(relay.data))
    assert ok.returncode == 0, ok.stdout
    [verdict] = lines(ok)
    assert verdict == {
        "ns": "jobs@local",
        "ok": True,
        "records": 4,
        "sealed": 4,
        "bad_seq": None,
        "reason": None,
        "mirror": False,
        "home_key": relay.node.identity.public_key.hex(),
    }

    with sqlite3.connect(relay.data / "events.sqlite3") as db:
        (raw,) = db.execute("SELECT event FROM events WHERE seq = 3").fetchone()
        tampered = raw[:-1] + bytes([raw[-1] ^ 1])
        db.execute("UPDATE events SET event = ? WHERE seq = 3", (tampered,))
    bad = await formicary("log", "verify", "all", "--data", str(relay.data))
    assert bad.returncode == 1
    [verdict] = lines(bad)
    assert verdict["ok"] is False and verdict["bad_seq"] == 3


async def test_log_verify_without_a_store_is_a_usage_error(tmp_path: Path) -> None:
    result = await formicary("log", "verify", "all", "--data", str(tmp_path))
    assert result.returncode == 2 and b"no store" in result.stderr


@pytest.mark.parametrize("args", [["publish"], ["relay"], ["bogus"]])
async def test_usage_errors_exit_2(args: list[str]) -> None:
    assert (await formicary(*args)).returncode == 2


async def test_an_unknown_option_is_refused_by_its_own_command() -> None:
    result = await formicary("relay", "serve", "--prot", "1")
    err = result.stderr.decode()
    assert result.returncode == 2
    assert "formicary relay serve: error: unrecognized arguments: --prot 1" in err
    assert "usage: formicary relay serve" in err  # its own options, not every command


async def test_ns_policy_show_and_relay_invite(nursery: trio.Nursery, tmp_path: Path) -> None:
    from relay.access import Creation
    from relay.node import RelayConfig
    from tests.conftest import start_relay

    relay = await start_relay(nursery, tmp_path / "relay", RelayConfig(create=Creation.INVITE))
    me = {"FORMICARY_RELAY": relay.url, "FORMICARY_KEY": str(tmp_path / "me.key")}
    other = {**me, "FORMICARY_KEY": str(tmp_path / "other.key")}
    other_id = json.loads((await formicary("keygen", "--out", other["FORMICARY_KEY"])).stdout)["id"]

    refused = await formicary("ns", "policy", "private", "--ns", "team@local", env=me)
    assert refused.returncode == 1 and b"forbidden" in refused.stderr
    invite = await formicary("relay", "invite", "team@local", "--data", str(relay.data))
    assert invite.returncode == 0, invite.stderr
    token = invite.stdout.decode().strip()
    created = await formicary(
        "ns", "policy", "listed", "--ns", "team@local", "--writer", other_id,
        "--invite", token, "--json", env=me,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["seq"] == 1
    shown = json.loads(
        (await formicary("ns", "show", "--ns", "team@local", "--json", env=me)).stdout
    )
    assert shown["mode"] == "listed" and shown["writers"] == [other_id]
    assert shown["owner"] == Identity.load(tmp_path / "me.key").id
    not_owner = await formicary("ns", "policy", "public", "--ns", "team@local", env=other)
    assert not_owner.returncode == 1 and b"forbidden: only the owner" in not_owner.stderr
    bad_key = await formicary(
        "ns", "policy", "listed", "--ns", "team@local", "--writer", "ab", env=me
    )
    assert bad_key.returncode == 2 and b"64 hex digits" in bad_key.stderr
    bad_ns = await formicary("relay", "invite", "Team", "--data", str(relay.data))
    assert bad_ns.returncode == 2 and b"not a namespace" in bad_ns.stderr
    # (it printed an invite that had already expired, and exited 0)
    expired = await formicary(
        "relay", "invite", "t@local", "--ttl", "0s", "--data", str(relay.data)
    )
    assert expired.returncode == 2 and b"a duration above 0" in expired.stderr
    relay.scope.cancel()


async def test_bad_input_from_a_shell_gets_one_line_and_a_status_never_a_traceback(
    tmp_path: Path,
) -> None:
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("not a key")
    env = {"FORMICARY_RELAY": "ws://127.0.0.1:9", "FORMICARY_KEY": str(tmp_path / "a.key")}
    made = await formicary("publish", "x@local", "app.x", env=env)  # a new key: says so
    assert f"no key at {tmp_path / 'a.key'}: made one, agent" in made.stderr.decode()
    cases: list[tuple[list[str], dict[str, str], int, str]] = [
        (["publish", "x@local", "app.x"], {"FORMICARY_KEY": str(bad_key)}, 1, "the key file"),
        (["wo", "list"], {"FORMICARY_KEY": str(tmp_path)}, 1, "Is a directory"),
        (["publish", "x@local", "app.x", "--body", "NaN"], {}, 2, "NaN is not JSON"),
        (["publish", "x@local", "app.x", "--body", "[1e400]"], {}, 2, "too large for a double"),
        (["publish", "x@local", "app.x", "--body", "1" * 30], {}, 2, "cannot go in an event"),
        (["publish", "x@local", "app.x", "--dep", "zz"], {}, 2, "--dep 'zz' is not hex"),
        (["publish", "x@local", "app.x"], {"FORMICARY_RELAY": "notaurl"}, 1, "cannot reach"),
        (["relay", "serve", "--port", "99999", "--data", str(tmp_path / "d")], {}, 2, "65535"),
        (["relay", "compact", "--data", str(tmp_path / "none")], {}, 1, "not a data directory"),
    ]
    for args, more, status, says in cases:
        result = await formicary(*args, env={**env, **more})
        err = result.stderr.decode()
        assert result.returncode == status and says in err, (args, result.returncode, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "d").exists() and not (tmp_path / "none").exists()


async def test_tail_follow_says_when_it_lost_the_relay_and_when_it_is_back(
    relay: RunningRelay, tmp_path: Path
) -> None:
    """It reconnected in silence: from a shell, the same as a relay with nothing new."""
    from tests.agent_sdk.test_client import drop_every_connection

    env = {**os.environ, "FORMICARY_RELAY": relay.url, "FORMICARY_KEY": str(tmp_path / "k")}
    await formicary("publish", "jobs@local", "app.note", "--body", "1", env=env)
    tail = [sys.executable, "-m", "agent_sdk.cli", "tail", "jobs@local", "--from", "1"]
    async with running([*tail, "--follow"], env) as process:
        with trio.fail_after(30):
            await read_until(process.stdout, b"\n")  # the event: it is following
            assert await drop_every_connection(relay) >= 1
            said = await read_until(process.stderr, b"resuming")
    lines = said.decode().splitlines()
    assert len(lines) == 2, lines  # once each, not once per attempt
    assert lines[0].startswith(f"formicary: the connection to {relay.url} was lost"), lines
    assert lines[1] == f"formicary: reconnected to {relay.url}; resuming", lines


async def test_a_relay_killed_under_a_command_is_one_line(tmp_path: Path) -> None:
    """An agent command whose relay dies while it waits for an answer (SIGKILL: no
    close frame) said so with Python's traceback of ``ConnectionClosedError``,
    where a relay it cannot reach is one line and exit status 1."""
    from tests.processes import PHASE_TIMEOUT, relay_process
    from tests.relay.test_shutdown import metrics, writes_held

    data = tmp_path / "relay"
    async with relay_process(data) as relay:
        env = {"FORMICARY_RELAY": relay.url, "FORMICARY_KEY": str(tmp_path / "agent.key")}
        assert (await formicary("publish", "t@local", "app.note", env=env)).returncode == 0
        with writes_held(data):  # the next publish is sequenced, its commit waits
            async with running(
                [sys.executable, "-m", "agent_sdk.cli", "publish", "t@local", "app.note"],
                {**os.environ, **env},
            ) as publish:
                while True:
                    figures = await metrics(relay.url)
                    if figures["formicary_published_total"] > figures["formicary_events_in_total"]:
                        break
                await relay.kill_and_wait()
                assert publish.stderr is not None
                said = b""
                with trio.fail_after(PHASE_TIMEOUT):
                    async for chunk in publish.stderr:
                        said += chunk
                    status = await publish.wait()
    err = said.decode()
    assert status == 1 and "Traceback" not in err, err
    assert f"lost the relay at {relay.url}" in err and len(err.strip().splitlines()) == 1, err
