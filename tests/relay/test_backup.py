"""``formicary relay backup|restore|compact`` against a relay process: a backup taken
while agents publish restores into a relay that verifies and serves on; a tampered
backup is refused; compact will not touch a running relay's files."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio

from agent_sdk.client import RelayClient
from agent_sdk.identity import Identity
from relay.app import STORE_FILE
from tests.backends import sqlite_only
from tests.conftest import identity
from tests.processes import PHASE_TIMEOUT, cli, relay_process

pytestmark = sqlite_only  # PostgreSQL is backed up with its own tools (operations.md)

NAMESPACES = ("keep-a@local", "keep-b@local")


async def formicary(*args: str) -> tuple[int, dict[str, object] | None, str]:
    with trio.fail_after(PHASE_TIMEOUT):
        done = await trio.run_process(
            cli(*args), capture_stdout=True, capture_stderr=True, check=False
        )
    out = done.stdout.decode().strip()
    last = out.splitlines()[-1] if out else ""  # (log verify prints a line per namespace)
    return done.returncode, json.loads(last) if last else None, done.stderr.decode()


async def test_a_backup_taken_under_load_restores_into_a_relay_that_serves_on(
    tmp_path: Path,
) -> None:
    data, copy, restored = tmp_path / "data", tmp_path / "backup", tmp_path / "restored"
    async with relay_process(data) as relay:
        async with RelayClient.connect(relay.url, identity(1)) as agent:
            for n in range(50):
                await agent.publish(NAMESPACES[n % 2], "app.note", n)
            async with trio.open_nursery() as nursery:  # and go on publishing meanwhile

                async def more() -> None:
                    for n in range(200):
                        await agent.publish(NAMESPACES[0], "app.note", f"during {n}")

                nursery.start_soon(more)
                code, manifest, err = await formicary("relay", "backup", "--data", str(data),
                                                      "--out", str(copy))  # fmt: skip
                assert code == 0, err
        # A running relay's files are not compacted under it.
        code, _, err = await formicary("relay", "compact", "--data", str(data))
        assert code == 1 and "in use by a running relay" in err
    assert manifest is not None and set(manifest["heads"]) == set(NAMESPACES)  # type: ignore[arg-type]
    code, result, err = await formicary("relay", "restore", "--from", str(copy),
                                        "--data", str(restored))  # fmt: skip
    assert code == 0, err
    assert result is not None and result["namespaces"] == 2
    assert (restored / "logs.json").read_text() == (data / "logs.json").read_text()
    code, _, err = await formicary("log", "verify", "all", "--data", str(restored))
    assert code == 0, err
    heads: dict[str, int] = manifest["heads"]  # type: ignore[assignment]
    async with relay_process(restored) as again:
        async with RelayClient.connect(again.url, identity(2)) as agent:
            after = await agent.publish(NAMESPACES[1], "app.note", "after the restore")
        assert after.receipt.seq == heads[NAMESPACES[1]] + 1
        assert after.receipt.relay == relay_key(data)  # the same relay, restored
    code, _, err = await formicary("relay", "restore", "--from", str(copy),
                                   "--data", str(restored))  # fmt: skip
    assert code == 1 and "holds a relay already" in err
    code, sizes, err = await formicary("relay", "compact", "--data", str(restored))
    assert code == 0, err
    assert sizes is not None and sizes[STORE_FILE]["after"] <= sizes[STORE_FILE]["before"]  # type: ignore[index]


async def test_a_tampered_backup_is_refused(tmp_path: Path) -> None:
    data, copy = tmp_path / "data", tmp_path / "backup"
    async with relay_process(data) as relay, RelayClient.connect(relay.url, identity(1)) as agent:
        for n in range(5):
            await agent.publish(NAMESPACES[0], "app.note", n)
    code, _, err = await formicary("relay", "backup", "--data", str(data), "--out", str(copy))
    assert code == 0, err
    db = sqlite3.connect(copy / STORE_FILE)
    db.execute("UPDATE events SET event = CAST(? AS BLOB) WHERE seq = 3", (b"forged",))
    db.commit()
    db.close()
    code, _, err = await formicary("relay", "restore", "--from", str(copy),
                                   "--data", str(tmp_path / "new"))  # fmt: skip
    assert code == 1 and "does not verify" in err and not (tmp_path / "new" / STORE_FILE).exists()
    code, _, err = await formicary("relay", "backup", "--data", str(data), "--out", str(copy))
    assert code == 1 and "new directory" in err


def relay_key(data: Path) -> bytes:
    return Identity.load(data / "relay.key").public_key


async def test_restore_refuses_a_directory_with_databases_and_backup_takes_odd_paths(
    tmp_path: Path,
) -> None:
    data = tmp_path / "odd #1 ?%"  # characters a file: URI must escape
    async with relay_process(data) as relay, RelayClient.connect(relay.url, identity(1)) as agent:
        await agent.publish(NAMESPACES[0], "app.note", "odd")
    copy = tmp_path / "backup"
    code, _, err = await formicary("relay", "backup", "--data", str(data), "--out", str(copy))
    assert code == 0, err
    target = tmp_path / "target"
    target.mkdir()
    (target / "inbox.sqlite3-wal").write_bytes(b"stale")  # a leftover SQLite would replay
    code, _, err = await formicary("relay", "restore", "--from", str(copy), "--data", str(target))
    assert code == 1 and "inbox.sqlite3-wal" in err and not (target / "relay.key").exists()


async def test_a_directory_whose_logs_are_elsewhere_is_not_backed_up(tmp_path: Path) -> None:
    """A relay on PostgreSQL keeps only its key here: a "backup" of it alone would
    restore into a relay that signs a new history under the same key."""
    data = tmp_path / "on-postgresql"
    data.mkdir()
    Identity.generate().save(data / "relay.key")
    out = tmp_path / "backup"
    code, _, err = await formicary("relay", "backup", "--data", str(data), "--out", str(out))
    assert code == 1 and "pg_dump" in err and not out.exists()


async def test_a_backup_restores_from_a_read_only_place_and_an_incomplete_one_is_refused(
    tmp_path: Path,
) -> None:
    """Backups were WAL-mode files, which SQLite cannot open read-only without writing
    a -shm beside them (a read-only mount failed with a traceback); a backup missing a
    listed file failed midway, leaving its staging copy behind; a manifest naming a
    path copied it there."""
    data, copy = tmp_path / "data", tmp_path / "backup"
    async with relay_process(data) as relay, RelayClient.connect(relay.url, identity(1)) as agent:
        await agent.publish(NAMESPACES[0], "app.note", "kept")
    code, manifest, err = await formicary(
        "relay", "backup", "--data", str(data), "--out", str(copy)
    )
    assert code == 0 and manifest is not None, err
    for name in manifest["files"]:  # type: ignore[union-attr]
        if name.endswith(".sqlite3"):
            header = (copy / name).read_bytes()[:20]
            assert header[18:20] == b"\x01\x01", name  # rollback journal, not WAL

    broken = tmp_path / "broken"
    shutil.copytree(copy, broken)
    (broken / STORE_FILE).unlink()
    target = tmp_path / "target"
    code, _, err = await formicary("relay", "restore", "--from", str(broken), "--data", str(target))
    assert code == 1 and f"incomplete, without {STORE_FILE}" in err, err
    assert not target.exists() or not any(target.iterdir())

    strange = json.loads((copy / "manifest.json").read_text())
    strange["files"].append("../elsewhere")
    (broken / STORE_FILE).write_bytes((copy / STORE_FILE).read_bytes())
    (broken / "manifest.json").write_text(json.dumps(strange))
    code, _, err = await formicary("relay", "restore", "--from", str(broken), "--data", str(target))
    assert code == 1 and "not a backup" in err, err

    code, result, err = await formicary(
        "relay", "restore", "--from", str(copy), "--data", str(target)
    )
    assert code == 0 and result is not None and result["namespaces"] == 1, err
    assert not (target / ".restoring").exists()
    assert (target / "logs.json").read_text() == (data / "logs.json").read_text()

    # A relay's first commit between the copy of its (then empty) logs and of its
    # logs.json: the restore leaves out the logs.json its logs do not hold (the relay
    # would not start), and the first start writes it again.
    empty, early = tmp_path / "empty", tmp_path / "early"
    async with relay_process(empty):
        pass
    code, _, err = await formicary("relay", "backup", "--data", str(empty), "--out", str(early))
    assert code == 0, err
    (early / "logs.json").write_text('{"ns": "keep-a@local", "first_receipt": "00"}')
    manifest = json.loads((early / "manifest.json").read_text())
    manifest["files"].append("logs.json")
    (early / "manifest.json").write_text(json.dumps(manifest))
    fresh = tmp_path / "fresh"
    code, _, err = await formicary("relay", "restore", "--from", str(early), "--data", str(fresh))
    assert code == 0 and not (fresh / "logs.json").exists(), err


async def test_a_backup_that_fails_leaves_nothing_that_blocks_a_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk half way left a directory with a key and part of the logs and no
    manifest: the retry was refused ("exists"), and the error named the source."""
    import errno

    from relay import backup as module
    from relay.backup import BackupError, backup

    data = tmp_path / "relay"
    async with relay_process(data) as relay, RelayClient.connect(relay.url, identity(1)) as agent:
        await agent.publish(NAMESPACES[0], "app.note", "kept")
    copy_database = module._copy_database

    def disk_full_after_the_logs(source: Path, target: Path) -> None:
        copy_database(source, target)
        if source.name != STORE_FILE:
            raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(module, "_copy_database", disk_full_after_the_logs)
    out = tmp_path / "backup"
    with pytest.raises(BackupError, match=r"writing the backup .*backup: .* No space left"):
        backup(data, out)
    assert not [name for name in os.listdir(tmp_path) if "backup" in name]  # none half made
    monkeypatch.undo()
    assert backup(data, out)["heads"] == {NAMESPACES[0]: 1}


async def test_a_restore_interrupted_while_moving_in_is_finished_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between its moves, a restore left the logs in and the rest (the key,
    the inboxes) in its staging directory: run again, it refused ("holds a relay
    already"), and the relay asked for the key, without which inboxes were lost."""
    from relay import backup as module
    from relay.backup import restore

    data, copy = tmp_path / "data", tmp_path / "backup"
    async with relay_process(data) as relay, RelayClient.connect(relay.url, identity(1)) as agent:
        await agent.publish(NAMESPACES[0], "app.note", "kept")
    code, _, err = await formicary("relay", "backup", "--data", str(data), "--out", str(copy))
    assert code == 0, err
    moves: list[str] = []
    replace = os.replace

    def killed_after_one_move(source: Path, target: Path) -> None:
        if Path(source).name.startswith("moving.json"):
            return replace(source, target)  # (the list of moves, written first)
        if moves:
            raise KeyboardInterrupt  # (as a kill would, between two moves)
        moves.append(Path(source).name)
        replace(source, target)

    target = tmp_path / "target"
    monkeypatch.setattr(module.os, "replace", killed_after_one_move)
    with pytest.raises(KeyboardInterrupt):
        restore(copy, target)
    monkeypatch.undo()
    assert moves == [STORE_FILE] and (target / STORE_FILE).exists()
    assert not (target / "relay.key").exists()
    serve = cli("relay", "serve", "--data", str(target), "--port", "0")
    done = await trio.run_process(serve, capture_stderr=True, check=False)
    assert done.returncode == 1 and "restore was interrupted" in done.stderr.decode()
    code, result, err = await formicary(
        "relay", "restore", "--from", str(copy), "--data", str(target)
    )
    assert code == 0 and result is not None and result["finished"], err
    assert sorted(os.listdir(target)) == sorted([*result["restored"], "relay.lock"])  # type: ignore[arg-type]
    async with relay_process(target) as relay, RelayClient.connect(relay.url, identity(1)) as a:
        assert (await a.publish(NAMESPACES[0], "app.note", "on")).receipt.seq == 2


def test_a_backup_taken_while_a_receipt_leaves_keeps_the_message_or_its_receipt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message from another relay is acknowledged: its receipt goes into the outbox,
    then its inbox item is deleted. With the outbox copied before the inbox, both
    steps between the two copies left a backup with neither."""
    from federation.outbox import SQLiteOutboxStore
    from relay import backup as module
    from relay.app import INBOX_FILE, OUTBOX_FILE
    from relay.inbox import Item, SQLiteInboxStore
    from relay.store.sqlite import SQLiteStore

    data = tmp_path / "data"
    data.mkdir()
    Identity.generate().save(data / "relay.key")
    SQLiteStore(data / STORE_FILE).close()
    inbox, outbox = SQLiteInboxStore(data / INBOX_FILE), SQLiteOutboxStore(data / OUTBOX_FILE)
    message = Item(b"bob", 1, "message", b"mid", b"alice", b"sealed", 2**62, origin="other")
    inbox.apply([message], [])
    copy_database = module._copy_database
    acknowledged: list[str] = []

    def acknowledged_after_the_first_copy(source: Path, target: Path) -> None:
        copy_database(source, target)
        if source.name in (INBOX_FILE, OUTBOX_FILE) and not acknowledged:
            acknowledged.append(source.name)
            outbox.put_receipts([("other", 1, b"receipt")])  # (keep_receipts)
            inbox.apply([], [message])  # (acknowledge)

    monkeypatch.setattr(module, "_copy_database", acknowledged_after_the_first_copy)
    try:
        module.backup(data, tmp_path / "backup")
    finally:
        inbox.close()
        outbox.close()
    assert acknowledged
    restored_inbox = SQLiteInboxStore(tmp_path / "backup" / INBOX_FILE)
    restored_outbox = SQLiteOutboxStore(tmp_path / "backup" / OUTBOX_FILE)
    try:
        items, _ = restored_inbox.load()
        receipts = restored_outbox.load_receipts()
    finally:
        restored_inbox.close()
        restored_outbox.close()
    assert items or receipts, "the message is neither waiting nor receipted: lost"
    assert items == [message] and receipts == [("other", 1, b"receipt")]  # (a crash's state)


@pytest.mark.parametrize("damaged", ["inbox.sqlite3", "mirrors.sqlite3", "outbox.sqlite3"])
async def test_a_backup_with_a_damaged_database_is_not_restored(
    tmp_path: Path, damaged: str
) -> None:
    """Only the logs were read (verified): a damaged inbox, outbox or mirrors file was
    restored, and the relay then failed on it at start."""
    from relay.backup import backup
    from tests.relay.test_app import damage, with_every_database

    data, copy, target = tmp_path / "data", tmp_path / "backup", tmp_path / "target"
    with_every_database(data)
    backup(data, copy)
    damage(copy / damaged)
    code, _, err = await formicary("relay", "restore", "--from", str(copy), "--data", str(target))
    assert code == 1 and f"{copy / damaged} is damaged (" in err and "another backup" in err, err
    assert sorted(os.listdir(target)) == ["relay.lock"]  # nothing moved in, no staging left


@pytest.mark.parametrize("damaged", ["inbox.sqlite3", "mirrors.sqlite3", "outbox.sqlite3"])
def test_a_damaged_copy_fails_the_backup(tmp_path: Path, damaged: str) -> None:
    """A copy was not checked: a damaged source (or one a relay started on tore, read
    without locks on a read-only mount) made a backup that only a restore refused."""
    from relay.backup import BackupError, backup
    from tests.relay.test_app import damage, with_every_database

    data, copy = tmp_path / "data", tmp_path / "backup"
    with_every_database(data)
    damage(data / damaged)
    with pytest.raises(BackupError, match=rf"the copy of .*{damaged} is damaged \("):
        backup(data, copy)
    assert not copy.exists() and os.listdir(tmp_path) == ["data"]  # nothing left


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.pop("heads"),
        lambda m: m.pop("key"),
        lambda m: m.update(heads={NAMESPACES[0]: "1"}),
        lambda m: m.update(files="relay.key"),
        lambda m: m.clear(),
    ],
    ids=["no heads", "no key", "a seq as text", "files as text", "empty"],
)
async def test_a_manifest_without_what_a_backup_writes_is_refused(
    tmp_path: Path, change: Any
) -> None:
    """Without its heads the restore failed with a KeyError, leaving its staging
    copy behind, the relay's key in it; without its key, with a KeyError too."""
    from relay.backup import backup
    from tests.relay.test_app import with_every_database

    data, copy, target = tmp_path / "data", tmp_path / "backup", tmp_path / "target"
    with_every_database(data)
    backup(data, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = await formicary("relay", "restore", "--from", str(copy), "--data", str(target))
    assert code == 1 and "not a backup's manifest" in err and "Traceback" not in err, err
    assert not target.exists() or os.listdir(target) == ["relay.lock"]  # no staging, no key


async def test_a_restore_into_a_directory_in_use_is_refused(tmp_path: Path) -> None:
    """Its lock held (a relay starting, another restore, a compact): the restore
    failed with a DataDirInUse traceback, and so did the finishing of one that was
    interrupted."""
    from relay.app import hold_data
    from relay.backup import backup
    from tests.relay.test_app import with_every_database

    data, copy, target = tmp_path / "data", tmp_path / "backup", tmp_path / "target"
    with_every_database(data)
    backup(data, copy)
    restore = ("relay", "restore", "--from", str(copy), "--data", str(target))
    with hold_data(target):
        code, _, err = await formicary(*restore)
    assert code == 1 and "in use by a running relay" in err and "Traceback" not in err, err
    assert os.listdir(target) == ["relay.lock"]

    (target / ".restoring").mkdir()  # one interrupted while it moved the files in
    (target / ".restoring" / "moving.json").write_text('{"restored": []}')
    with hold_data(target):
        code, _, err = await formicary(*restore)
    assert code == 1 and "in use by a running relay" in err and "Traceback" not in err, err
    assert (target / ".restoring" / "moving.json").exists()
    code, result, err = await formicary(*restore)
    assert code == 0 and result is not None and result["finished"], err


def test_a_restore_interrupted_while_it_checks_leaves_no_copy_of_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its staging copy was removed on a refusal only: Ctrl-C (or a bug) left it, the
    relay's key in it."""
    from relay import backup as module
    from tests.relay.test_app import with_every_database

    data, copy, target = tmp_path / "data", tmp_path / "backup", tmp_path / "target"
    with_every_database(data)
    module.backup(data, copy)

    def interrupted(path: Path) -> dict[str, int]:
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "_heads", interrupted)
    with pytest.raises(KeyboardInterrupt):
        module.restore(copy, target)
    assert os.listdir(target) == ["relay.lock"]
    # ... and while it writes down what it is about to move in (nothing moved yet).
    monkeypatch.undo()

    def interrupted_write(path: Path, text: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "write_durably", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        module.restore(copy, target)
    assert os.listdir(target) == ["relay.lock"]


MOUNT_READ_ONLY = 'mount --bind "$1" "$2" && mount -o remount,bind,ro "$2" && shift 2 && exec "$@"'
"""``sh -c`` arguments: DIR MOUNTPOINT COMMAND... runs COMMAND with DIR read-only at
MOUNTPOINT (in a mount namespace of its own: ``unshare --mount``)."""


async def test_a_stopped_relays_data_directory_is_backed_up_from_a_read_only_mount(
    tmp_path: Path,
) -> None:
    """SQLite reads a WAL-mode file through the -shm index it makes beside it, and a
    stopped relay leaves none: where it could not make one (a read-only mount),
    backup and log verify failed with "unable to open database file"."""
    from tests.relay.test_app import with_every_database

    data = tmp_path / "data"
    with_every_database(data)
    assert not [name for name in os.listdir(data) if name.endswith(("-wal", "-shm"))]
    data.chmod(0o555)
    try:
        where, prefix = data, []
        if os.access(data, os.W_OK):  # root: only a read-only mount is read-only
            where = tmp_path / "mounted"
            where.mkdir()
            prefix = [
                "unshare",
                "--mount",
                "sh",
                "-c",
                MOUNT_READ_ONLY,
                "sh",
                str(data),
                str(where),
            ]
            probe = await trio.run_process([*prefix, "true"], check=False, capture_stderr=True)
            if probe.returncode:
                pytest.skip(f"no read-only directory to test with: {probe.stderr.decode()}")
        for command in (
            ["relay", "backup", "--data", str(where), "--out", str(tmp_path / "backup")],
            ["log", "verify", "all", "--data", str(where)],
        ):
            with trio.fail_after(PHASE_TIMEOUT):
                done = await trio.run_process(
                    [*prefix, *cli(*command)], check=False, capture_stderr=True
                )
            assert done.returncode == 0, done.stderr.decode()
        assert json.loads((tmp_path / "backup" / "manifest.json").read_text())["heads"] == {}
    finally:
        data.chmod(0o755)
