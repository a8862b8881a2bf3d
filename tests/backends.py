"""Which store backend the relays of this test run use: the embedded SQLite files
(the default) or PostgreSQL (``pytest --store postgresql``, with the server that
``tests/postgres.sh`` starts; ``FORMICARY_TEST_PG`` overrides its DSN).

Each data directory gets its own schema on the server, named after its path, so a
relay restarted on the same directory finds its logs again, and tests never share
tables. A schema is emptied the first time this run uses it (pytest reuses paths
across runs).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from relay.store import Store
from relay.store.sqlite import SQLiteStore

BACKENDS = ("sqlite", "postgresql")
backend = "sqlite"
"""Set from ``--store`` by tests/conftest.py."""
PG_DSN = os.environ.get("FORMICARY_TEST_PG", "postgresql://formicary@127.0.0.1:54329/postgres")

_fresh: set[str] = set()


def store_dsn(data: Path) -> str:
    """The ``[store] dsn`` of a relay on ``data``: "" (embedded) unless on PostgreSQL."""
    if backend != "postgresql":
        return ""
    import psycopg

    schema = _schema(data)
    if schema not in _fresh:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            conn.execute(f"CREATE SCHEMA {schema}")
        _fresh.add(schema)
    separator = "&" if "?" in PG_DSN else "?"
    return f"{PG_DSN}{separator}options={quote(f'-csearch_path={schema}')}"


def _schema(data: Path) -> str:
    return "t_" + hashlib.sha1(str(data.absolute()).encode()).hexdigest()[:24]


def open_test_store(path: Path, **sqlite_options: Any) -> Store:
    """The store a test opens by hand: the SQLite file at ``path``, or the schema of
    that path on PostgreSQL."""
    if backend == "postgresql":
        from relay.store.postgres import PostgresStore

        readonly = bool(sqlite_options.get("readonly"))
        return PostgresStore(store_dsn(path), readonly=readonly)
    return SQLiteStore(path, **sqlite_options)


sqlite_only = pytest.mark.sqlite_only
"""Marks a test of the embedded store's own tools (backup, restore, compact, its
files): tests/conftest.py skips it on PostgreSQL, saying so."""


def relay_store(data: Path, **sqlite_options: Any) -> Store:
    """The logs of the relay whose data directory is ``data`` (opened by the test,
    the relay stopped or reading alongside it)."""
    if backend == "postgresql":
        from relay.store.postgres import PostgresStore

        return PostgresStore(store_dsn(data), readonly=True)
    from relay.app import STORE_FILE

    return SQLiteStore(data / STORE_FILE, **sqlite_options)


def store_args(data: Path) -> list[str]:
    """What ``formicary log verify`` needs besides ``--data`` to find the logs."""
    dsn = store_dsn(data)
    return ["--store", dsn] if dsn else []


def forget(data: Path) -> None:
    """The relay on ``data`` lost everything: on PostgreSQL, its schema too."""
    if backend == "postgresql":
        _fresh.discard(_schema(data))
        store_dsn(data)  # dropped and made again, empty
