"""The oversight board in real headless Chromium (Debian's), against a real relay on
loopback, with SDK agents doing the work: it loads, shows their orders, follows
their claims live, and an approval clicked in the page unblocks a waiting agent."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing
from websockets.trio.client import connect

from agent_sdk.access import set_policy
from agent_sdk.client import Delivery, RelayClient
from agent_sdk.decisions import Decisions
from agent_sdk.identity import Identity
from agent_sdk.ledger import Ledger
from agent_sdk.wire import Event, sign_event
from relay.board import BOARD_AUTH_DOMAIN, board_auth_message
from relay.limits import RateLimits
from relay.node import RelayConfig
from tests.board.browser import board_page, screenshot
from tests.conftest import RunningRelay, identity, start_relay

NS = "ops@local"
AGENT, HUMAN, OTHER = identity(1), identity(2), identity(3)
TIMEOUT = 60
T = TypeVar("T")


FORGE = """async () => {
    // An approval whose signature is not its author's, sent as a page would send it.
    const {wire} = window.formicaryBoard;
    const key = await wire.keyFromPassphrase("someone else");
    const body = {wo: "wo-1"};
    const {raw} = await wire.signedEvent(key, "ops@local", "wo.approve", body);
    const socket = new WebSocket(`ws://${location.host}/board/ws`);
    const hello = await new Promise((ok) => (socket.onmessage = (m) => ok(JSON.parse(m.data))));
    const [relayKey, challenge] = [wire.fromHex(hello.key), wire.fromHex(hello.challenge)];
    const proof = wire.concat(wire.BOARD_AUTH_DOMAIN, relayKey, challenge);
    const sig = wire.hex(await wire.sign(key.key, proof));
    const authed = new Promise((ok) => (socket.onmessage = ok));
    socket.send(JSON.stringify({t: "auth", key: wire.hex(key.publicKey), sig}));
    await authed;
    const answer = new Promise((ok) => (socket.onmessage = (m) => {
        const msg = JSON.parse(m.data);
        if (msg.t === "error") ok(msg);
    }));
    const forged = wire.b64(new Uint8Array(64));
    socket.send(JSON.stringify({t: "publish", rid: 1, event: wire.b64(raw), sig: forged}));
    window.forged = await answer;
}"""


def in_trio(call: Callable[[], Awaitable[T]]) -> T:
    """From the browser's thread: run ``call`` in the test's trio loop, wait for it."""
    return trio.from_thread.run(call)


def publish_of(signed: Any, rid: int) -> dict[str, Any]:
    event, sig = base64.b64encode(signed.raw).decode(), base64.b64encode(signed.sig).decode()
    return {"t": "publish", "rid": rid, "event": event, "sig": sig}


def passphrase_identity(passphrase: str) -> Identity:
    """The key the board derives from a passphrase (board_static/wire.js)."""
    seed = hashlib.pbkdf2_hmac("sha256", passphrase.encode(), b"formicary/v1/board-key", 200_000)
    return Identity.from_seed(seed)


async def test_the_board_shows_sdk_orders_and_follows_a_claim_live(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, AGENT) as client:
        ledger = Ledger(client, NS)
        for n in range(1, 4):
            await ledger.create(f"task {n}", priority=n)

        def browse() -> None:
            with board_page(relay.url) as page:
                page.wait_for_selector('.column[data-status="open"] .card[data-wo="wo-3"]')
                assert page.locator(".card.order").count() == 3
                assert "read-only" in page.inner_text("#who")
                assert page.locator('.card[data-wo="wo-1"] button').first.is_disabled()
                screenshot(page, "board-orders")
                in_trio(lambda: ledger.claim("wo-2"))  # an agent acts; the page is not reloaded
                claimed = page.wait_for_selector(
                    '.column[data-status="claimed"] .card[data-wo="wo-2"]'
                )
                assert claimed is not None
                holder = claimed.inner_text()
                assert "token 1" in holder and AGENT.public_key.hex()[:8] in holder
                page.wait_for_selector(".countdown:has-text('left')")
                assert page.locator("#events tbody tr").first.inner_text().startswith("8")
                page.wait_for_selector("#events td:has-text('verified')")
                assert page.locator("#events td:has-text('bad signature')").count() == 0
                screenshot(page, "board-claimed-live")

        with trio.fail_after(TIMEOUT):
            await trio.to_thread.run_sync(browse)


async def test_an_approval_clicked_in_the_page_unblocks_the_waiting_agent(
    relay: RunningRelay, tmp_path: Path
) -> None:
    key_file = tmp_path / "human.key"
    HUMAN.save(key_file)
    async with RelayClient.connect(relay.url, AGENT) as client:
        ledger = Ledger(client, NS)
        order = await ledger.create(
            "deploy to production", requires_approval=True,
            approval_reason="touches production", approvers=[HUMAN.public_key],
        )  # fmt: skip
        await ledger.ask_approval(await ledger.claim(order), "canary is green")
        decided: list[dict[str, Any]] = []

        async def agent_waits() -> None:
            decided.append(await ledger.wait_decision(order))

        def browse() -> None:
            with board_page(relay.url) as page:
                card = page.wait_for_selector(f'#approvals .card[data-wo="{order}"]')
                assert card is not None and "touches production" in card.inner_text()
                page.set_input_files("#keyfile", str(key_file))
                page.wait_for_selector("#who:has-text('signed in as')")
                page.wait_for_selector(f'#approvals .card[data-wo="{order}"] .approve:enabled')
                screenshot(page, "board-approval-queue")
                page.fill(f'#approvals .card[data-wo="{order}"] .comment', "ship it")
                page.click(f'#approvals .card[data-wo="{order}"] .approve')
                page.wait_for_selector("#message.ok:has-text('approve')")
                page.wait_for_selector(f'.column[data-status="open"] .card[data-wo="{order}"]')
                screenshot(page, "board-approved")

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(agent_waits)
                await trio.to_thread.run_sync(browse)
        [decision] = decided
        assert decision == {
            "approved": True, "by": HUMAN.public_key, "comment": "ship it",
            "at_ms": decision["at_ms"],
        }  # fmt: skip
        await ledger.update(await ledger.claim(order), "done")  # unblocked: it finishes


async def test_a_conflict_that_reached_a_human_is_settled_in_the_page(
    relay: RunningRelay, tmp_path: Path
) -> None:
    key_file = tmp_path / "human.key"
    HUMAN.save(key_file)
    rival = identity(3)
    ladder = {"step_ms": 1_000, "approvers": [HUMAN.public_key]}
    async with (
        RelayClient.connect(relay.url, AGENT) as client,
        RelayClient.connect(relay.url, rival) as other,
        client.subscribe(NS, start=1, kinds=["conflict.escalated"]) as steps,
    ):
        await Decisions(client, NS).set_policy(conflicts=ladder)
        await Decisions(client, NS).decide("warehouse-2", "restock", "order 500 units")
        second = await Decisions(other, NS).decide("warehouse-2", "restock", "order none")
        async for item in steps:  # nobody settles it: wait for the human rung
            if isinstance(item, Delivery) and item.event.event.body["step"] == "human":
                break

        def browse() -> None:
            with board_page(relay.url) as page:
                card = page.wait_for_selector('#approvals .card[data-conflict="cf-1"]')
                assert card is not None and "warehouse-2" in card.inner_text()
                assert "order none" in card.inner_text()
                page.set_input_files("#keyfile", str(key_file))
                keep = f'#approvals .card[data-conflict="cf-1"] .keep[data-keep="{second["id"]}"]'
                page.wait_for_selector(f"{keep}:enabled")
                screenshot(page, "board-conflict")
                page.fill('#approvals .card[data-conflict="cf-1"] .comment', "stock is fine")
                page.click(keep)
                page.wait_for_selector("#message.ok:has-text('keep')")
                page.wait_for_selector('#approvals .card[data-conflict="cf-1"]', state="detached")

        with trio.fail_after(TIMEOUT):
            await trio.to_thread.run_sync(browse)
        shown = await Decisions(client, NS).conflict("cf-1")
        assert (shown["kept"], shown["by"]) == (second["id"], "human")


async def test_a_non_approver_or_a_forged_action_is_refused_with_a_visible_message(
    relay: RunningRelay,
) -> None:
    stranger = passphrase_identity("not an approver")
    async with RelayClient.connect(relay.url, AGENT) as client:
        ledger = Ledger(client, NS)
        order = await ledger.create(
            "pay the invoice", requires_approval=True, approvers=[HUMAN.public_key]
        )
        await ledger.ask_approval(await ledger.claim(order))

        def browse() -> None:
            with board_page(relay.url) as page:
                page.wait_for_selector(f'#approvals .card[data-wo="{order}"]')
                page.fill("#passphrase", "not an approver")
                page.click("#use-passphrase")
                page.wait_for_selector(f"#who[title='{stranger.public_key.hex()}']")
                page.click(f'#approvals .card[data-wo="{order}"] .approve')
                page.wait_for_selector("#message.error:has-text('not_approver')")
                screenshot(page, "board-refused")
                # A forged action: a signature that is not the author's.
                page.evaluate(FORGE)
                forged = page.evaluate("window.forged")
                assert forged["name"] == "bad_signature" and forged["rid"] == 1

        with trio.fail_after(TIMEOUT):
            await trio.to_thread.run_sync(browse)
        assert (await ledger.show(order))["status"] == "awaiting_approval"  # untouched


async def test_board_socket_bad_input_is_answered_and_refused(relay: RunningRelay) -> None:
    """Raw messages no page would send: each gets an error with a code; the socket
    lives on; a private namespace stays closed to an anonymous board."""
    async with RelayClient.connect(relay.url, AGENT) as client:
        await client.publish("secret@local", "app.note", "hidden")
        await set_policy(client, "secret@local", "private")
        await client.publish(NS, "app.note", "open")
    now = relay.node.wall_ms()
    good = sign_event(Event(NS, "app.note", AGENT.public_key, "board", ts=now), AGENT.sign)
    async with connect(relay.url + "/board/ws") as ws:
        hello = json.loads(await ws.recv())
        assert hello["t"] == "hello" and len(bytes.fromhex(hello["challenge"])) == 32
        await ws.send(json.dumps({"t": "namespaces"}))
        anonymous = json.loads(await ws.recv())
        assert [item["ns"] for item in anonymous["items"]] == [NS]  # not the private one
        await ws.send(json.dumps(publish_of(good, 9)))  # not signed in: read-only
        assert json.loads(await ws.recv())["name"] == "not_authenticated"
        challenge = bytes.fromhex(hello["challenge"])
        assert bytes.fromhex(hello["key"]) == relay.node.identity.public_key
        proof = AGENT.sign(board_auth_message(relay.node.identity.public_key, challenge))
        signed_in = {"t": "auth", "key": AGENT.public_key.hex(), "sig": proof.hex()}
        # A sign-in a page of another relay asked for (its key, this challenge) is no use.
        elsewhere = AGENT.sign(BOARD_AUTH_DOMAIN + bytes(32) + challenge).hex()
        unbound = AGENT.sign(BOARD_AUTH_DOMAIN + challenge).hex()
        other = sign_event(Event(NS, "app.note", HUMAN.public_key, "x", ts=now), HUMAN.sign)
        # Presence by connection needs an agent connection to hold (and end) it.
        join = {"name": "ghost"}
        ghost = sign_event(Event(NS, "dir.join", AGENT.public_key, join, ts=now), AGENT.sign)
        cases: list[tuple[Any, str]] = [
            (b"\x00binary", "malformed"),
            ("not json", "malformed"),
            ("[]", "malformed"),
            (json.dumps({"t": "launch"}), "unknown_frame"),
            (json.dumps({"t": "auth", "key": "00", "sig": "00"}), "malformed"),
            (json.dumps({"t": "auth", "key": "00" * 32, "sig": "00" * 64}), "auth_failed"),
            (json.dumps({**signed_in, "sig": elsewhere}), "auth_failed"),
            (json.dumps({**signed_in, "sig": unbound}), "auth_failed"),
            (json.dumps({"t": "watch", "ns": "secret@local"}), "forbidden"),
            (json.dumps({"t": "watch"}), "malformed"),
        ]
        for message, name in cases:
            await ws.send(message)
            answer = json.loads(await ws.recv())
            assert answer["t"] == "error" and answer["name"] == name, (message, answer)
        await ws.send(json.dumps(signed_in))
        assert json.loads(await ws.recv()) == {"t": "authed", "key": AGENT.public_key.hex()}
        for message, name in [
            (json.dumps({"t": "publish", "rid": 1, "event": "!!", "sig": ""}), "malformed"),
            (json.dumps(publish_of(other, 4)), "wrong_author"),  # someone else's event
            (json.dumps(publish_of(ghost, 5)), "bad_event"),
            (json.dumps({**publish_of(good, 2), "sig": base64.b64encode(bytes(64)).decode()}),
             "bad_signature"),
        ]:  # fmt: skip
            await ws.send(message)
            answer = json.loads(await ws.recv())
            assert answer["t"] == "error" and answer["name"] == name, (message, answer)
        deep = "[" * 100_000 + "]" * 100_000  # under the size cap, too deep to parse
        await ws.send(deep[: 60 << 10])
        assert json.loads(await ws.recv())["name"] == "malformed"
        await ws.send(json.dumps({"t": "namespaces"}))
        listed = json.loads(await ws.recv())
        assert [item["ns"] for item in listed["items"]] == [NS, "secret@local"]  # its owner
        await ws.send(json.dumps(publish_of(good, 3)))
        ack = json.loads(await ws.recv())
        assert ack == {"t": "ack", "rid": 3, "seq": 2}  # a signed event like any other
    await trio.testing.wait_all_tasks_blocked()
    assert relay.node.limiter.per_address == {}  # the board's slot is given back


@pytest.mark.parametrize("page", ["/", "/board/board.js", "/board/wire.js", "/board/board.css"])
async def test_the_board_files_are_served_and_nothing_else(relay: RunningRelay, page: str) -> None:
    import urllib.request

    base = relay.url.replace("ws://", "http://")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(path: str) -> tuple[int, str, bytes]:
        try:
            with opener.open(base + path, timeout=10) as response:
                return response.status, response.headers["Content-Type"], response.read()
        except urllib.error.HTTPError as error:
            return error.code, "", b""

    status, content_type, body = await trio.to_thread.run_sync(get, page)
    assert status == 200 and body and ("html" in content_type or "javascript" in content_type
                                       or "css" in content_type)  # fmt: skip
    assert (await trio.to_thread.run_sync(get, "/board/../relay.key"))[0] == 404
    assert (await trio.to_thread.run_sync(get, "/board/secret.js"))[0] == 404


async def test_thousands_of_orders_are_paged(relay: RunningRelay) -> None:
    async with RelayClient.connect(relay.url, AGENT) as client:
        ledger = Ledger(client, NS)
        async with trio.open_nursery() as nursery:
            for n in range(1, 1201):
                nursery.start_soon(ledger.create, f"task {n}")

        def browse() -> None:
            with board_page(relay.url) as page:
                open_column = '.column[data-status="open"]'
                page.wait_for_selector(f"{open_column} h3:has-text('(1200)')")
                assert page.locator(f"{open_column} .card").count() == 100
                page.click(f"{open_column} button:has-text('next page')")
                page.wait_for_selector(f'{open_column} .card[data-wo="wo-101"]')
                assert page.locator(f"{open_column} .card").count() == 100
                assert page.locator(f'{open_column} .card[data-wo="wo-1"]').count() == 0
                page.click(f"{open_column} button:has-text('first')")
                page.wait_for_selector(f'{open_column} .card[data-wo="wo-1"]')

        with trio.fail_after(TIMEOUT):
            await trio.to_thread.run_sync(browse)


async def test_a_large_event_is_shown_without_its_bytes(relay: RunningRelay) -> None:
    """Thirty events near max_frame would make every snapshot tens of megabytes."""
    async with RelayClient.connect(relay.url, AGENT) as client:
        await client.publish(NS, "app.note", "x" * 20_000)
        await client.publish(NS, "app.note", "small")
    async with connect(relay.url + "/board/ws", max_size=None) as ws:
        assert json.loads(await ws.recv())["t"] == "hello"
        await ws.send(json.dumps({"t": "watch", "ns": NS, "after": {"x": 1, "open": 0}}))
        state = json.loads(await ws.recv())
    small, large = state["events"]
    assert small["event"] and small["sig"] and small["size"] < 1_000
    assert (large["event"], large["sig"]) == ("", "") and large["size"] > 20_000


async def answer(ws: Any) -> dict[str, Any]:
    """The board's next message."""
    message: dict[str, Any] = json.loads(await ws.recv())
    return message


@asynccontextmanager
async def signed_in_board(relay: RunningRelay, who: Identity) -> AsyncIterator[Any]:
    """A board socket signed in as ``who``, as a page signs in."""
    async with connect(relay.url + "/board/ws") as ws:
        hello = await answer(ws)
        message = board_auth_message(
            relay.node.identity.public_key, bytes.fromhex(hello["challenge"])
        )
        signed_in = {"t": "auth", "key": who.public_key.hex(), "sig": who.sign(message).hex()}
        await ws.send(json.dumps(signed_in))
        assert (await answer(ws))["t"] == "authed"
        yield ws


async def test_a_board_is_limited_like_an_agent_and_its_watch_follows_the_policy(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A board's publish is charged to its key's bucket and refused for a namespace
    homed elsewhere; a watch of a namespace that turns private ends with 2013."""
    limits = RateLimits(publish_rate=0.001, publish_burst=3)  # no refill within the test
    relay = await start_relay(nursery, tmp_path / "relay", RelayConfig(rate_limits=limits))
    now = relay.node.wall_ms()

    def signed(ns: str, n: int) -> dict[str, Any]:
        event = Event(ns, "app.note", HUMAN.public_key, n, ts=now)
        return publish_of(sign_event(event, HUMAN.sign), n)

    with trio.fail_after(TIMEOUT):
        async with RelayClient.connect(relay.url, AGENT) as client:
            await client.publish(NS, "app.note", "open for now")
            async with connect(relay.url + "/board/ws") as anonymous:
                assert (await answer(anonymous))["t"] == "hello"
                await anonymous.send(json.dumps({"t": "watch", "ns": NS}))
                assert (await answer(anonymous))["head"] == 1
                await set_policy(client, NS, "private")
                ended = await answer(anonymous)
                assert ended["t"] == "error" and ended["name"] == "forbidden", ended
        async with signed_in_board(relay, HUMAN) as ws:
            await ws.send(json.dumps(signed("elsewhere@other", 1)))
            assert (await answer(ws))["name"] == "not_home"  # a token spent
            for n in (2, 3):
                await ws.send(json.dumps(signed("open@local", n)))
                assert (await answer(ws))["t"] == "ack"
            await ws.send(json.dumps(signed("open@local", 4)))
            limited = await answer(ws)
            assert limited["name"] == "rate_limited" and limited["rid"] == 4, limited
            assert "try again in" in limited["reason"]
    assert relay.node.head("open@local") == 2
    relay.scope.cancel()


async def test_an_approval_from_the_board_is_answered_with_its_outcome(
    relay: RunningRelay,
) -> None:
    """The board's ack carries the coordination outcome, and a refusal's problem and
    reason: what the page shows a person who is not an approver."""
    async with RelayClient.connect(relay.url, AGENT) as client:
        ledger = Ledger(client, NS)
        order = await ledger.create("pay", requires_approval=True, approvers=[HUMAN.public_key])
        await ledger.ask_approval(await ledger.claim(order))
        now = relay.node.wall_ms()
        with trio.fail_after(TIMEOUT):
            for who, rid, outcome in ((OTHER, 1, "wo.rejected"), (HUMAN, 2, "wo.approved")):
                approve = Event(NS, "wo.approve", who.public_key, {"wo": order}, ts=now)
                async with signed_in_board(relay, who) as ws:
                    await ws.send(json.dumps(publish_of(sign_event(approve, who.sign), rid)))
                    ack = await answer(ws)
                assert ack["t"] == "ack" and ack["rid"] == rid, ack
                assert ack["outcome"] == outcome, ack
                if who is OTHER:
                    assert ack["problem"] == "not_approver" and "decide" in ack["reason"]
                else:
                    assert "problem" not in ack
        shown = await ledger.show(order)
    assert shown["status"] == "open" and shown["approval"]["approved"]
