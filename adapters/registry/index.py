"""The registry's index: records, aliases and per-concept version counters, in SQLite.

The registry only talks to :class:`Index` / :class:`WriteTxn`, so a server database can take
SQLite's place later. Every per-user query takes ``user`` first and filters on it: there is
no query that reads across users except the maintenance ones (``all_records``,
``referenced_shas``), which never leave the registry object.

Concurrency: WAL mode (readers never block writers or each other), a busy timeout so writers
queue instead of failing, ``synchronous=FULL`` so a committed version survives power loss, and
every write in a ``BEGIN IMMEDIATE`` transaction, which takes the write lock up front: version
numbers are assigned under it (a counter row per concept, never reused after deletion), and
``(user, concept, version)`` is the primary key besides.

SQLite's operational failures become registry errors naming the cause: a lock held past the busy
timeout is :class:`RegistryBusy`; a read-only or unwritable index, a full disk or an unopenable
file is :class:`StorageError`. A failed write transaction is rolled back, so nothing half-written
stays behind.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

from adapters.registry.errors import RegistryBusy, StorageError
from adapters.registry.records import AdapterRecord

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS concepts (
    user TEXT NOT NULL,
    concept TEXT NOT NULL,
    last_version INTEGER NOT NULL,
    PRIMARY KEY (user, concept)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS versions (
    user TEXT NOT NULL,
    concept TEXT NOT NULL,
    version INTEGER NOT NULL CHECK (version > 0),
    sha256 TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    format TEXT NOT NULL,
    rank INTEGER NOT NULL,
    alpha REAL NOT NULL,
    target_modules TEXT NOT NULL,
    dtype TEXT NOT NULL,
    base_fingerprint TEXT NOT NULL,
    trigger_word TEXT,
    class_word TEXT,
    new_tokens TEXT NOT NULL,
    training_config TEXT NOT NULL,
    data_fingerprints TEXT NOT NULL,
    metrics TEXT NOT NULL,
    tags TEXT NOT NULL,
    created_at TEXT NOT NULL,
    parent_version INTEGER,
    damaged TEXT,
    PRIMARY KEY (user, concept, version)
);
CREATE INDEX IF NOT EXISTS versions_by_blob ON versions (sha256);
CREATE TABLE IF NOT EXISTS aliases (
    user TEXT NOT NULL,
    concept TEXT NOT NULL,
    alias TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (user, concept, alias),
    FOREIGN KEY (user, concept, version) REFERENCES versions (user, concept, version) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS aliases_by_version ON aliases (user, concept, version);
"""
# Record field -> column, in table order; JSON columns hold tuples/dicts.
_COLUMNS = {
    "user": "user", "concept": "concept", "version": "version", "sha256": "sha256", "size_bytes": "size_bytes",
    "format": "format", "rank": "rank", "alpha": "alpha", "target_modules": "target_modules", "dtype": "dtype",
    "base_fingerprint": "base_fingerprint", "trigger": "trigger_word", "class_word": "class_word",
    "new_tokens": "new_tokens", "training_config": "training_config", "data_fingerprints": "data_fingerprints",
    "metrics": "metrics", "tags": "tags", "created_at": "created_at", "parent_version": "parent_version",
    "damaged": "damaged",
}
_JSON_TUPLES = ("target_modules", "new_tokens", "data_fingerprints", "tags")
_JSON_DICTS = ("training_config", "metrics")
_SELECT = f"""
SELECT {", ".join(f"v.{c}" for c in _COLUMNS.values())},
    (SELECT json_group_array(a.alias) FROM aliases a
        WHERE a.user = v.user AND a.concept = v.concept AND a.version = v.version) AS alias_list,
    v.version = (SELECT MAX(m.version) FROM versions m WHERE m.user = v.user AND m.concept = v.concept) AS is_latest
FROM versions v
"""


class Reads(Protocol):
    """Queries available both outside and inside a write transaction."""

    def record(self, user: str, concept: str, ref: int | str) -> AdapterRecord | None:
        """The version ``ref`` names: a number, ``"latest"`` or a user alias."""

    def records(self, user: str, concept: str | None = None, tag: str | None = None) -> list[AdapterRecord]: ...

    def concepts(self, user: str) -> list[str]: ...


class WriteTxn(Reads, Protocol):
    """Writes, all inside one transaction holding the write lock."""

    def next_version(self, user: str, concept: str) -> int: ...

    def insert(self, record: AdapterRecord) -> None: ...

    def set_alias(self, user: str, concept: str, alias: str, version: int) -> None: ...

    def remove_alias(self, user: str, concept: str, alias: str) -> bool: ...

    def delete(self, user: str, concept: str, version: int | None = None) -> set[str]:
        """Delete one version or the whole concept (aliases go with them); returns the blobs they used."""

    def mark_damaged(self, user: str, concept: str, version: int, reason: str) -> None: ...

    def is_referenced(self, sha256: str) -> bool: ...

    def referenced_shas(self) -> set[str]: ...

    def all_records(self) -> list[AdapterRecord]: ...


class Index(Reads, Protocol):
    def write(self) -> AbstractContextManager[WriteTxn]:
        """A transaction holding the write lock: committed on normal exit, rolled back on any exception."""

    def close(self) -> None: ...


def _record(row: sqlite3.Row) -> AdapterRecord:
    values = {field: row[column] for field, column in _COLUMNS.items()}
    for field in _JSON_TUPLES:
        values[field] = tuple(json.loads(values[field]))
    for field in _JSON_DICTS:
        values[field] = json.loads(values[field])
    aliases = sorted(json.loads(row["alias_list"]))
    values["aliases"] = tuple((["latest"] if row["is_latest"] else []) + aliases)
    return AdapterRecord(**values)


class _Queries:
    """Read queries over a connection; shared by the index and its write transactions."""

    _conn: sqlite3.Connection

    def record(self, user: str, concept: str, ref: int | str) -> AdapterRecord | None:
        if isinstance(ref, str) and ref.isascii() and ref.isdigit():
            ref = int(ref)
        if isinstance(ref, int):
            sql, args = "WHERE v.user = ? AND v.concept = ? AND v.version = ?", (user, concept, ref)
        elif ref == "latest":
            sql, args = "WHERE v.user = ? AND v.concept = ? ORDER BY v.version DESC LIMIT 1", (user, concept)
        else:
            sql = "JOIN aliases a ON a.user = v.user AND a.concept = v.concept AND a.version = v.version WHERE v.user = ? AND v.concept = ? AND a.alias = ?"
            args = (user, concept, ref)
        row = self._conn.execute(_SELECT + sql, args).fetchone()
        return _record(row) if row else None

    def records(self, user: str, concept: str | None = None, tag: str | None = None) -> list[AdapterRecord]:
        sql, args = "WHERE v.user = ?", [user]
        if concept is not None:
            sql += " AND v.concept = ?"
            args.append(concept)
        if tag is not None:
            sql += " AND EXISTS (SELECT 1 FROM json_each(v.tags) t WHERE t.value = ?)"
            args.append(tag)
        rows = self._conn.execute(_SELECT + sql + " ORDER BY v.concept, v.version", args).fetchall()
        return [_record(r) for r in rows]

    def concepts(self, user: str) -> list[str]:
        rows = self._conn.execute("SELECT DISTINCT concept FROM versions WHERE user = ? ORDER BY concept", (user,))
        return [r[0] for r in rows]


class _SqliteTxn(_Queries):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def next_version(self, user: str, concept: str) -> int:
        row = self._conn.execute(
            "INSERT INTO concepts (user, concept, last_version) VALUES (?, ?, 1) "
            "ON CONFLICT (user, concept) DO UPDATE SET last_version = last_version + 1 RETURNING last_version",
            (user, concept),
        ).fetchone()
        return int(row[0])

    def insert(self, record: AdapterRecord) -> None:
        values = []
        for field in _COLUMNS:
            value = getattr(record, field)
            if field in _JSON_TUPLES:
                value = json.dumps(list(value))
            elif field in _JSON_DICTS:
                value = json.dumps(value, sort_keys=True)
            values.append(value)
        placeholders = ", ".join("?" * len(values))
        self._conn.execute(f"INSERT INTO versions ({', '.join(_COLUMNS.values())}) VALUES ({placeholders})", values)

    def set_alias(self, user: str, concept: str, alias: str, version: int) -> None:
        self._conn.execute(
            "INSERT INTO aliases (user, concept, alias, version) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (user, concept, alias) DO UPDATE SET version = excluded.version",
            (user, concept, alias, version),
        )

    def remove_alias(self, user: str, concept: str, alias: str) -> bool:
        cur = self._conn.execute("DELETE FROM aliases WHERE user = ? AND concept = ? AND alias = ?", (user, concept, alias))
        return cur.rowcount > 0

    def delete(self, user: str, concept: str, version: int | None = None) -> set[str]:
        sql, args = "WHERE user = ? AND concept = ?", [user, concept]
        if version is not None:
            sql += " AND version = ?"
            args.append(version)
        rows = self._conn.execute(f"DELETE FROM versions {sql} RETURNING sha256", args).fetchall()
        return {r[0] for r in rows}

    def mark_damaged(self, user: str, concept: str, version: int, reason: str) -> None:
        self._conn.execute("UPDATE versions SET damaged = ? WHERE user = ? AND concept = ? AND version = ?", (reason, user, concept, version))

    def is_referenced(self, sha256: str) -> bool:
        return self._conn.execute("SELECT 1 FROM versions WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone() is not None

    def referenced_shas(self) -> set[str]:
        return {r[0] for r in self._conn.execute("SELECT DISTINCT sha256 FROM versions")}

    def all_records(self) -> list[AdapterRecord]:
        return [_record(r) for r in self._conn.execute(_SELECT + " ORDER BY v.user, v.concept, v.version")]


def registry_error(e: sqlite3.OperationalError, path: Path, busy_timeout_s: float) -> RegistryBusy | StorageError | None:
    """The registry error an operational SQLite failure stands for, or None for anything else (a bug)."""
    code = getattr(e, "sqlite_errorcode", -1) & 0xFF  # the primary code; extended codes add high bits
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return RegistryBusy(f"the registry index {path} is locked by another process (waited {busy_timeout_s:g} s); nothing was changed, try again")
    if code == sqlite3.SQLITE_READONLY:
        return StorageError(f"the registry index {path} is read-only ({e}); writing needs a writable registry folder")
    if code == sqlite3.SQLITE_FULL:
        return StorageError(f"the disk holding the registry index {path} is full ({e}); nothing was stored")
    if code in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
        return StorageError(f"cannot use the registry index {path} ({e})")
    return None


class SqliteIndex(_Queries):
    """The index in one SQLite file; one connection per instance, safe to share between threads."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 60.0) -> None:
        self._lock = threading.RLock()
        self._path, self._busy_timeout_s = Path(path), busy_timeout_s
        with self._translated():
            self._conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = FULL")
            self._conn.execute("PRAGMA foreign_keys = ON")
            schema_version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if schema_version > SCHEMA_VERSION:  # written by a newer bespoke: its rows may mean what this one cannot read
            self._conn.close()
            raise StorageError(f"registry index {self._path} has schema v{schema_version}, newer than this version reads (v{SCHEMA_VERSION}); upgrade bespoke-diffusion")
        if schema_version < SCHEMA_VERSION:
            with self.write():  # IF NOT EXISTS: a second process creating it at the same time is harmless
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """Raise SQLite's operational failures as registry errors (see the module docstring)."""
        try:
            yield
        except sqlite3.OperationalError as e:
            error = registry_error(e, self._path, self._busy_timeout_s)
            if error is None:
                raise
            raise error from e

    # Reads take the lock only to keep one connection safe across threads; SQLite runs each
    # statement on a consistent snapshot, and WAL lets them proceed while another process writes.
    def record(self, user: str, concept: str, ref: int | str) -> AdapterRecord | None:
        with self._lock, self._translated():
            return super().record(user, concept, ref)

    def records(self, user: str, concept: str | None = None, tag: str | None = None) -> list[AdapterRecord]:
        with self._lock, self._translated():
            return super().records(user, concept, tag)

    def concepts(self, user: str) -> list[str]:
        with self._lock, self._translated():
            return super().concepts(user)

    @contextmanager
    def write(self) -> Iterator[_SqliteTxn]:
        with self._lock, self._translated():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteTxn(self._conn)
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()
