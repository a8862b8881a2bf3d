"""``formicary relay backup|restore|compact``: the embedded store, kept safe.

A data directory is a key file and a few SQLite files (operations.md, "Data
directory"). **Backup** copies each database with SQLite's online backup API, a
consistent snapshot even while the relay runs and commits, and the key file, into a
new directory with a ``manifest.json`` (what was copied, the relay's key, each
namespace's head). **Restore** copies a backup into an empty data directory and
checks it first: every namespace log must verify against the backed-up key, and its
head must be the manifest's. **Compact** rewrites each database without the pages
that deletions left (VACUUM) and folds the write-ahead log back in; the relay must
be stopped: a running relay holds the data directory's lock file, and compact
takes it too.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent_sdk.identity import Identity
from relay.app import (
    INBOX_FILE,
    KEY_FILE,
    LOGS_FILE,
    MIRROR_FILE,
    MOVING,
    OUTBOX_FILE,
    RESTORING,
    STORE_FILE,
    DataDirError,
    DataDirInUse,
    check_database,
    first_receipt_missing,
    fsync_path,
    hold_data,
    write_durably,
)
from relay.store import Located
from relay.store.sqlite import SQLiteStore, connect_readonly
from relay.verify import verify_log

DATABASES = (STORE_FILE, MIRROR_FILE, INBOX_FILE, OUTBOX_FILE)
"""The databases, in the order a backup copies them. Each copy is a snapshot of its
own moment, later than the one before; where the relay writes one file and then
another, the file of the later write is copied first, so that a backup holding that
write holds the earlier one too. An event that depends on a mirrored one is
committed after it: the logs before the mirrors. A message receipt for another
relay is stored in the outbox before its inbox item is deleted (relay/messaging.py):
the inbox before the outbox. Copied the other way, both steps could fall between
the two copies and the backup hold neither, the receipt lost; this way the worst is
both, as after a crash between the steps (the item is delivered again, and its
receipt passed on again)."""
MANIFEST = "manifest.json"


class BackupError(Exception):
    """What makes a backup, restore or compaction impossible; the message says why."""


def backup(data: Path, out: Path) -> dict[str, Any]:
    """Copy ``data`` into the new directory ``out``; returns the manifest."""
    if not (data / KEY_FILE).exists():
        raise BackupError(f"{data} has no {KEY_FILE}: not a relay's data directory")
    key = _key(data / KEY_FILE)
    if out.exists():
        raise BackupError(f"{out} exists: a backup goes into a new directory")
    if not (data / STORE_FILE).exists():
        # A key without its logs is no backup: restored, it would sign a new history.
        raise BackupError(
            f"{data} has no {STORE_FILE}: its logs are on PostgreSQL ([store] dsn); back"
            " up that database with its own tools (pg_dump), and this directory's key"
        )
    # Made beside (a directory of its own: two backups at once do not mix), durable,
    # then renamed: a backup that fails (a full disk) leaves no directory that looks
    # like one, and nothing that blocks a retry.
    partial = out.with_name(f".{out.name}.{secrets.token_hex(4)}.partial")
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            partial.mkdir()  # (with the umask's mode, as the backup directory had)
            shutil.copy2(data / KEY_FILE, partial / KEY_FILE)
            copied = []
            for name in DATABASES:
                if (data / name).exists():
                    _copy_database(data / name, partial / name)
                    copied.append(name)
            if (data / LOGS_FILE).exists():  # (after the logs: it names their first receipt)
                shutil.copy2(data / LOGS_FILE, partial / LOGS_FILE)
                copied.append(LOGS_FILE)
            files = [KEY_FILE, *copied]
            manifest = {
                "key": key.id,
                "taken_ms": time.time_ns() // 1_000_000,
                "files": files,
                "heads": _heads(partial / STORE_FILE) if STORE_FILE in copied else {},
            }
            (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            for name in (*files, MANIFEST):
                fsync_path(partial / name)
            fsync_path(partial)
            os.rename(partial, out)
            fsync_path(out.parent)
        except (OSError, sqlite3.Error) as exc:
            where = f"{exc.filename}: " if isinstance(exc, OSError) and exc.filename else ""
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise BackupError(f"writing the backup {out}: {where}{reason}") from None
    finally:  # (Ctrl-C too: only a kill leaves it; once renamed there is none)
        shutil.rmtree(partial, ignore_errors=True)
    return manifest


def restore(backup_dir: Path, data: Path) -> dict[str, Any]:
    """Check the backup in ``backup_dir``, then copy it into ``data`` (which must not
    hold a relay yet); returns what was checked. A restore interrupted while it moved
    the checked files in is finished instead (whatever ``backup_dir``)."""
    if (data / RESTORING / MOVING).exists():
        with _holding(data):
            return {**_move_in(data), "finished": "an interrupted restore"}
    manifest = _manifest(backup_dir)
    files: list[str] = manifest["files"]
    strange = [name for name in files if name not in (KEY_FILE, LOGS_FILE, *DATABASES)]
    if strange or KEY_FILE not in files:  # (names only: "../x" would land elsewhere)
        raise BackupError(f"{backup_dir}: {MANIFEST} lists {strange or 'no key'}: not a backup")
    missing = [name for name in files if not (backup_dir / name).is_file()]
    if missing:  # checked before anything is copied
        raise BackupError(f"{backup_dir}: incomplete, without {', '.join(missing)}")
    if (data / KEY_FILE).exists() or (data / STORE_FILE).exists():
        raise BackupError(f"{data} holds a relay already: restore into an empty directory")
    key = _key(backup_dir / KEY_FILE)
    if key.id != manifest["key"]:
        raise BackupError(f"{backup_dir}/{KEY_FILE} is not the key the manifest names")
    with _holding(data):
        leftovers = [
            p.name for p in data.iterdir() if p.name.endswith(("-wal", "-shm", ".sqlite3"))
        ]
        if leftovers:
            raise BackupError(
                f"{data} holds {', '.join(sorted(leftovers))}: restore into an empty directory"
            )
        # Copied beside, checked there (a backup on a read-only mount cannot be opened
        # in place if SQLite wants to write beside it), made durable, then moved in,
        # the key last: an interrupted restore leaves no key over a partial store (a
        # relay would sign a new history).
        staging = data / RESTORING
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            for name in files:
                shutil.copy2(backup_dir / name, staging / name)
                fsync_path(staging / name)
            for name in DATABASES:  # (verifying reads only the logs; the relay reads all)
                damage = check_database(staging / name) if name in files else ""
                if damage:
                    raise BackupError(f"{staging / name} is damaged ({damage}): use another backup")
            heads = _heads(staging / STORE_FILE) if STORE_FILE in files else {}
            if heads != manifest["heads"]:
                raise BackupError(f"{backup_dir}: the logs' heads are not the manifest's")
            if heads:
                _verify(staging, files, list(heads), key.public_key)
            if LOGS_FILE in files and not heads and _names_another_first_receipt(staging):
                # Copied after the logs: the relay's first commit came in between
                # (commits are whole, so that leaves no logs at all). The first start
                # writes it again. With logs, a mismatch is what logs.json is for: a
                # relay started on them refuses to start, as it should.
                (staging / LOGS_FILE).unlink()
                files.remove(LOGS_FILE)
        except (OSError, sqlite3.Error) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise BackupError(f"{backup_dir}: {exc}") from None
        except BackupError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise BackupError(str(exc).replace(str(staging), str(backup_dir))) from None
        except BaseException:  # (Ctrl-C, a bug: the copies, the key among them, go too)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        result = {"restored": files, "namespaces": len(heads), "key": key.id}
        try:  # whole or absent (nothing moves before it is there)
            write_durably(staging / MOVING, json.dumps(result))
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise BackupError(f"{data}: {exc.strerror or exc}") from None
        except BaseException:  # (Ctrl-C: nothing moved yet, the copies go)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return _move_in(data)


def _manifest(backup_dir: Path) -> dict[str, Any]:
    """The backup's manifest, refused unless it has what :func:`backup` writes: the
    files (names), the key (its id) and the heads (namespace: seq)."""
    path = backup_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"{backup_dir}: no readable {MANIFEST}: {exc}") from None
    if not isinstance(manifest, dict):
        manifest = {}
    files, key, heads = manifest.get("files"), manifest.get("key"), manifest.get("heads")
    wrong = [name for name, right in (
        ("files", isinstance(files, list) and all(isinstance(n, str) for n in files)),
        ("key", isinstance(key, str)),
        ("heads", isinstance(heads, dict) and all(type(s) is int for s in heads.values())),
    ) if not right]  # fmt: skip
    if wrong:
        what = ", ".join(f'"{name}"' for name in wrong)
        raise BackupError(f"{path}: {what} missing or malformed: not a backup's manifest")
    return manifest


@contextmanager
def _holding(data: Path) -> Iterator[None]:
    """:func:`hold_data`, refused as a BackupError: a running relay's files, or those
    another restore or a compact is writing, are not touched under it."""
    try:
        with hold_data(data):
            yield
    except DataDirInUse as exc:
        raise BackupError(
            f"{exc} (or a restore or compact): stop it, or let it finish, first"
        ) from None
    except DataDirError as exc:
        raise BackupError(str(exc)) from None


def _move_in(data: Path) -> dict[str, Any]:
    """Move the checked files of ``.restoring/`` in, the key last, as its
    ``moving.json`` lists them (again after an interruption: those moved already are
    not there any more)."""
    staging = data / RESTORING
    try:
        result: dict[str, Any] = json.loads((staging / MOVING).read_text())
        for name in sorted(result["restored"], key=lambda n: n == KEY_FILE):
            if (staging / name).exists():
                os.replace(staging / name, data / name)
        fsync_path(data)
        (staging / MOVING).unlink()
        staging.rmdir()
    except OSError as exc:
        reason = f"moving the restored files in: {exc.strerror or exc}"
        raise BackupError(f"{data}: {reason}; run the restore again to finish") from None
    return result


def _names_another_first_receipt(staging: Path) -> bool:
    store = SQLiteStore(staging / STORE_FILE, readonly=True)
    try:
        return bool(first_receipt_missing(staging, store))
    except DataDirError:  # unreadable: not restored either
        return True
    finally:
        store.close()


def _key(path: Path) -> Identity:
    try:
        return Identity.load(path)
    except (OSError, ValueError, TypeError) as exc:
        raise BackupError(f"{path} is not a readable Ed25519 key file: {exc}") from None


def compact(data: Path) -> dict[str, Any]:
    """VACUUM every database of ``data``; returns the bytes before and after."""
    if not data.is_dir():
        raise BackupError(f"{data} is not a data directory")
    with _holding(data):
        return _compact(data)


def _compact(data: Path) -> dict[str, Any]:
    sizes: dict[str, Any] = {}
    for name in DATABASES:
        path = data / name
        if not path.exists():
            continue
        before = _size(path)
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute("VACUUM")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise BackupError(f"{path}: {exc}") from None
        finally:
            db.close()
        sizes[name] = {"before": before, "after": _size(path)}
    return sizes


def _verify(where: Path, files: list[str], namespaces: list[str], key: bytes) -> None:
    """Every namespace log of the backup verifies against the relay's key (its
    dependencies looked up in the backup's logs and mirrors)."""
    stores = [SQLiteStore(where / name, readonly=True)
              for name in (STORE_FILE, MIRROR_FILE) if name in files]  # fmt: skip

    def locate(dep: bytes) -> Located | None:
        for store in stores:
            found = store.find([dep]).get(dep)
            if found is not None:
                return found
        return None

    try:
        for ns in namespaces:
            verdict = verify_log(ns, stores[0].scan(ns), locate, key)
            if not verdict.ok:
                problem = f"seq {verdict.bad_seq}: {verdict.reason}"
                raise BackupError(f"{where}: {ns} does not verify: {problem}")
    finally:
        for store in stores:
            store.close()


def _copy_database(source: Path, target: Path) -> None:
    try:
        src = connect_readonly(source, timeout=10)
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)  # page by page, a consistent snapshot while others write
            # The copy has the source's WAL mode, in which even a read-only open must
            # make a -shm file: a backup on a read-only mount could not be read.
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
            src.close()
    except sqlite3.Error as exc:  # (either side's: a full disk is the target's)
        raise BackupError(f"copying {source} to the backup: {exc}") from None
    # A copy read without locks (immutable, on a read-only mount) is torn if a relay
    # started on the directory meanwhile, and a damaged source gives a damaged copy:
    # either shows here, not at a restore.
    damage = check_database(target)
    if damage:
        raise BackupError(
            f"the copy of {source} is damaged ({damage}): check the source "
            "(PRAGMA quick_check), or back up again with no relay starting on it meanwhile"
        )


def _heads(path: Path) -> dict[str, int]:
    store = SQLiteStore(path, readonly=True)
    try:
        return {ns: head.seq for ns, head in store.heads().items()}
    finally:
        store.close()


def _size(path: Path) -> int:
    """A database's bytes with its write-ahead log."""
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
