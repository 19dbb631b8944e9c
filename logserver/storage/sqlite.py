"""The embedded default: one SQLite file in WAL mode.

All writes go through one thread that owns the writing connection, so every
batch is one transaction with one fsync (synchronous=FULL: an acknowledged
batch survives power loss). Reads use their own connections on a small pool of
threads. Nothing here runs sqlite3 on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from logserver.storage.base import (
    AuditRow,
    EntryRow,
    RequestRow,
    RequestUpdate,
    StorageError,
    StorageUnavailable,
    StoredState,
    TreeConflict,
)
from verifier.merkle import EMPTY_ROOT, HASH_SIZE

logger = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = "4"

# Every appended entry lands on a random leaf page of each index on
# `entries`, and each page it dirties is written twice (WAL, then checkpoint):
# that, not the size of the keys, is what an append costs on a grown log. So
# there are two such indexes. `entries_leaf_hash_prefix` finds a leaf by its
# hash through the hash's first 8 bytes (a SHA-256 of our own making: no
# caller can pile entries onto one prefix). `entries_artifact_dedup` serves
# both the lookup by artifact digest and deduplication: a retried request
# names the same artifact, so its dedup key is looked for among the entries
# of that digest, by the key's first 8 bytes. Queries repeat the index
# expressions to use them and compare the full keys as well.
#
# Version 3 had a third index, on the dedup key's prefix alone, and kept the
# artifact index as (artifact_sha256, idx); version 2 indexed the full keys
# and made dedup_key UNIQUE.
_ENTRIES_COLUMNS = """(
    idx INTEGER PRIMARY KEY,
    leaf BLOB NOT NULL,
    leaf_hash BLOB NOT NULL,
    dedup_key BLOB NOT NULL,
    artifact_sha256 BLOB NOT NULL
)"""

_PREFIX = 8

# One statement each: they run inside the transaction of `open`, which
# `executescript` would commit first.
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
)""",
    f"CREATE TABLE IF NOT EXISTS entries {_ENTRIES_COLUMNS}",
    "CREATE INDEX IF NOT EXISTS entries_leaf_hash_prefix "
    "ON entries (substr(leaf_hash, 1, 8))",
    "CREATE INDEX IF NOT EXISTS entries_artifact_dedup "
    "ON entries (artifact_sha256, substr(dedup_key, 1, 8))",
    """CREATE TABLE IF NOT EXISTS tiles (
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS tree (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    size INTEGER NOT NULL,
    root BLOB NOT NULL,
    checkpoint_size INTEGER NOT NULL,
    checkpoint BLOB
)""",
    """CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time INTEGER NOT NULL,
    decision TEXT NOT NULL,
    issuer TEXT NOT NULL,
    subject TEXT NOT NULL,
    rule TEXT,
    request_id TEXT,
    record BLOB NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS audit_decision ON audit (decision, id)",
    """CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    lookup TEXT UNIQUE,
    state TEXT NOT NULL,
    expires INTEGER NOT NULL,
    record BLOB NOT NULL
)""",
)

# Parameters: the key's first 8 bytes, then the whole key.
FIND_LEAF_HASH = (
    "SELECT min(idx) FROM entries WHERE substr(leaf_hash, 1, 8) = ? AND leaf_hash = ?"
)
FIND_ARTIFACT = "SELECT idx FROM entries WHERE artifact_sha256 = ? ORDER BY idx LIMIT ?"

# Pairs per dedup query, at most (fewer where SQLite allows fewer parameters).
_CHUNK = 500


def find_dedup_query(count: int) -> str:
    """The entries of `count` (artifact digest, dedup key prefix) pairs.

    CROSS JOIN keeps the wanted pairs as the outer loop: one index search
    each, never a scan of the entries.
    """
    pairs = ",".join(["(?, ?)"] * count)
    return (
        f"WITH wanted (artifact, prefix) AS (VALUES {pairs}) "  # noqa: S608
        "SELECT dedup_key, idx FROM wanted CROSS JOIN entries "
        "ON artifact_sha256 = wanted.artifact "
        "AND substr(dedup_key, 1, 8) = wanted.prefix"
    )


_REQUEST_COLUMNS = "id, lookup, state, expires, record"


def _request_row(row: tuple[object, ...] | None) -> RequestRow | None:
    if row is None:
        return None
    rid, lookup, state, expires, record = row
    return RequestRow(
        str(rid),
        None if lookup is None else str(lookup),
        str(state),
        int(expires),  # type: ignore[call-overload]
        bytes(record),  # type: ignore[call-overload]
    )


_READ_THREADS = 2


class SqliteStorage:
    """Storage in one SQLite database file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-write")
        self._readers = ThreadPoolExecutor(
            _READ_THREADS, thread_name_prefix="sqlite-read"
        )
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, isolation_level=None, timeout=30, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            # 64 MiB of page cache (the default is 2 MiB): the inner pages of
            # the entry indexes stay in memory as the table grows.
            conn.execute("PRAGMA cache_size=-65536")
            # The WAL keeps SQLite's default checkpoint of 1,000 pages: a
            # larger one saves a little CPU but needs that much free disk to
            # recover from a full disk.
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    async def _run(self, pool: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
        def call() -> T:
            try:
                return fn()
            except sqlite3.IntegrityError as exc:
                raise StorageError(f"SQLite refused the write: {exc}") from exc
            except sqlite3.OperationalError as exc:
                # Locked, disk full, I/O error: conditions that can clear.
                raise StorageUnavailable(f"SQLite is unavailable: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(pool, call)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._run(self._writer, lambda: fn(self._connect()))

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._run(self._readers, lambda: fn(self._connect()))

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

        migrated: list[tuple[str, int]] = []

        def create(conn: sqlite3.Connection) -> None:
            # One transaction: a crash leaves the old schema or the new one.
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = _stored_version(conn)
                if version == "2":
                    migrated.append((version, _migrate_from_2(conn)))
                elif version == "3":
                    migrated.append((version, _migrate_from_3(conn)))
                elif version is not None and version != SCHEMA_VERSION:
                    advice = (
                        "upgrade the server"
                        if version.isdigit() and int(version) > int(SCHEMA_VERSION)
                        else "it cannot be migrated"
                    )
                    raise StorageError(
                        f"{self.path} has schema version {version}; this server "
                        f"knows version {SCHEMA_VERSION}: {advice}"
                    )
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(
                    "INSERT OR IGNORE INTO tree VALUES (1, 0, ?, 0, NULL)",
                    (EMPTY_ROOT,),
                )
                conn.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (SCHEMA_VERSION,),
                )
            except BaseException:
                # A full disk can end the transaction already.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            if migrated:
                # The WAL holds the rebuilt table or index: copy it into the
                # database now and give its space back.
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

        began = time.perf_counter()
        await self._write(create)
        if migrated:
            from_version, entries = migrated[0]
            logger.info(
                "migrated SQLite storage",
                extra={
                    "path": str(self.path),
                    "from_version": from_version,
                    "to_version": SCHEMA_VERSION,
                    "entries": entries,
                    "seconds": round(time.perf_counter() - began, 3),
                },
            )
        logger.info("opened SQLite storage", extra={"path": str(self.path)})

    async def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    async def get_meta(self, key: str) -> str | None:
        def get(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,))
            found = row.fetchone()
            return None if found is None else str(found[0])

        return await self._read(get)

    async def set_meta_once(self, key: str, value: str) -> str:
        def put(conn: sqlite3.Connection) -> str:
            conn.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, value))
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,))
            return str(row.fetchone()[0])

        return await self._write(put)

    async def list_meta(self, prefix: str) -> dict[str, str]:
        def get(conn: sqlite3.Connection) -> dict[str, str]:
            rows = conn.execute(
                "SELECT key, value FROM meta WHERE substr(key, 1, ?) = ?",
                (len(prefix), prefix),
            )
            return {str(k): str(v) for k, v in rows}

        return await self._read(get)

    async def load_state(self) -> StoredState:
        def load(conn: sqlite3.Connection) -> StoredState:
            conn.execute("BEGIN")
            try:
                size, root, checkpoint = conn.execute(
                    "SELECT size, root, checkpoint FROM tree WHERE id = 1"
                ).fetchone()
                rows = conn.execute(
                    "SELECT data FROM tiles WHERE level = 0 ORDER BY idx"
                )
                hashes = b"".join(data for (data,) in rows)
            finally:
                conn.execute("COMMIT")
            if len(hashes) != size * HASH_SIZE:
                raise StorageError(
                    f"{self.path}: level-0 tiles hold {len(hashes) // HASH_SIZE} "
                    f"hashes but the tree has {size} leaves: the database is damaged"
                )
            return StoredState(size, bytes(root), hashes, checkpoint)

        return await self._write(load)

    async def find_dedup(
        self, wanted: Sequence[tuple[bytes, bytes]]
    ) -> dict[bytes, int]:
        if not wanted:
            return {}
        keys = {key for _, key in wanted}
        pairs = sorted({(artifact, key[:_PREFIX]) for artifact, key in wanted})

        def find(conn: sqlite3.Connection) -> dict[bytes, int]:
            found: dict[bytes, int] = {}
            step = _rows_per_statement(conn, 2, _CHUNK)
            for at in range(0, len(pairs), step):
                chunk = pairs[at : at + step]
                values = [value for pair in chunk for value in pair]
                query = find_dedup_query(len(chunk))
                for stored, idx in conn.execute(query, values):
                    key = bytes(stored)
                    if key in keys and (key not in found or idx < found[key]):
                        found[key] = int(idx)
            return found

        return await self._read(find)

    async def append(
        self,
        start: int,
        entries: Sequence[EntryRow],
        tiles: Sequence[tuple[int, int, bytes]],
        root: bytes,
        audit: Sequence[AuditRow] = (),
        checkpoint: tuple[int, bytes] | None = None,
    ) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                (size,) = conn.execute("SELECT size FROM tree WHERE id = 1").fetchone()
                if size != start:
                    raise TreeConflict(f"tree is {size} long, expected {start}")
                values: list[object] = []
                for i, e in enumerate(entries, start):
                    values += (i, e.leaf, e.leaf_hash, e.dedup_key, e.artifact_sha256)
                _insert_rows(conn, "INSERT INTO entries VALUES", 5, values)
                _insert_rows(
                    conn,
                    "INSERT OR REPLACE INTO tiles VALUES",
                    3,
                    [value for tile in tiles for value in tile],
                )
                _insert_audit(conn, audit)
                conn.execute(
                    "UPDATE tree SET size = ?, root = ? WHERE id = 1",
                    (start + len(entries), root),
                )
                if checkpoint is not None:
                    _store_checkpoint(conn, *checkpoint)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        await self._write(write)

    async def store_checkpoint(self, size: int, checkpoint: bytes) -> None:
        await self._write(lambda conn: _store_checkpoint(conn, size, checkpoint))

    async def get_leaves(self, start: int, end: int) -> list[bytes]:
        def get(conn: sqlite3.Connection) -> list[bytes]:
            rows = conn.execute(
                "SELECT leaf FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx",
                (start, end),
            )
            return [bytes(leaf) for (leaf,) in rows]

        return await self._read(get)

    async def find_leaf_hash(self, leaf_hash: bytes) -> int | None:
        def find(conn: sqlite3.Connection) -> int | None:
            row = conn.execute(
                FIND_LEAF_HASH, (leaf_hash[:_PREFIX], leaf_hash)
            ).fetchone()
            return None if row is None or row[0] is None else int(row[0])

        return await self._read(find)

    async def find_artifact(self, sha256: bytes, limit: int) -> list[int]:
        def find(conn: sqlite3.Connection) -> list[int]:
            rows = conn.execute(FIND_ARTIFACT, (sha256, limit))
            return [int(idx) for (idx,) in rows]

        return await self._read(find)

    async def append_audit(self, rows: Sequence[AuditRow]) -> None:
        if not rows:
            return

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                _insert_audit(conn, rows)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        await self._write(write)

    async def list_audit(
        self, after: int, limit: int, decision: str | None = None
    ) -> list[tuple[int, AuditRow]]:
        def get(conn: sqlite3.Connection) -> list[tuple[int, AuditRow]]:
            rows = conn.execute(
                "SELECT id, time, decision, issuer, subject, rule, request_id, record "
                "FROM audit WHERE id > ? AND (? IS NULL OR decision = ?) "
                "ORDER BY id LIMIT ?",
                (after, decision, decision, limit),
            )
            return [
                (int(r[0]), AuditRow(r[1], r[2], r[3], r[4], r[5], r[6], bytes(r[7])))
                for r in rows
            ]

        return await self._read(get)

    async def get_request(self, request_id: str) -> RequestRow | None:
        def get(conn: sqlite3.Connection) -> RequestRow | None:
            row = conn.execute(
                f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE id = ?",  # noqa: S608 (constant columns)
                (request_id,),
            ).fetchone()
            return _request_row(row)

        return await self._read(get)

    async def update_request(
        self,
        update: RequestUpdate,
        *,
        request_id: str | None = None,
        lookup: str | None = None,
    ) -> list[RequestRow]:
        if (request_id is None) == (lookup is None):
            raise ValueError("give exactly one of request_id and lookup")

        # The single writer thread serializes every update.
        def write(conn: sqlite3.Connection) -> list[RequestRow]:
            conn.execute("BEGIN IMMEDIATE")
            try:
                column, value = (
                    ("id", request_id) if lookup is None else ("lookup", lookup)
                )
                found = _request_row(
                    conn.execute(
                        f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE {column} = ?",  # noqa: S608 (constant names)
                        (value,),
                    ).fetchone()
                )
                rows = list(update(found))
                for row in rows:
                    conn.execute(
                        "INSERT INTO requests VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT (id) DO UPDATE SET lookup = excluded.lookup, "
                        "state = excluded.state, expires = excluded.expires, "
                        "record = excluded.record",
                        (row.id, row.lookup, row.state, row.expires, row.record),
                    )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return rows

        return await self._write(write)


def _store_checkpoint(conn: sqlite3.Connection, size: int, note: bytes) -> None:
    # Never replace a checkpoint with an older one.
    conn.execute(
        "UPDATE tree SET checkpoint_size = ?, checkpoint = ? "
        "WHERE id = 1 AND checkpoint_size <= ?",
        (size, note, size),
    )


# Rows per INSERT statement, at most: 256 rows of 7 columns stay below the
# limit on bound parameters of SQLite 3.32 and later (32,766).
_ROWS_PER_INSERT = 256


def _rows_per_statement(conn: sqlite3.Connection, width: int, most: int) -> int:
    """How many rows of `width` parameters one statement may bind: `most`,
    or fewer where this SQLite allows fewer parameters (999 before 3.32)."""
    limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    return max(1, min(most, limit // width))


def _insert_rows(
    conn: sqlite3.Connection, insert: str, width: int, values: Sequence[object]
) -> None:
    """Insert rows given flat, `width` values each, many rows per statement.

    Not executemany: it steps once per row, giving up the GIL each time, and
    with the event loop busy every step then waits to get it back.
    """
    step = _rows_per_statement(conn, width, _ROWS_PER_INSERT) * width
    row = "(" + ",".join("?" * width) + ")"
    for at in range(0, len(values), step):
        chunk = values[at : at + step]
        marks = ",".join([row] * (len(chunk) // width))
        conn.execute(f"{insert} {marks}", chunk)


def _insert_audit(conn: sqlite3.Connection, rows: Sequence[AuditRow]) -> None:
    values: list[object] = []
    for r in rows:
        values += (r.time, r.decision, r.issuer, r.subject, r.rule, r.request_id)
        values.append(r.record)
    _insert_rows(
        conn,
        "INSERT INTO audit (time, decision, issuer, subject, rule, "
        "request_id, record) VALUES",
        7,
        values,
    )


def _stored_version(conn: sqlite3.Connection) -> str | None:
    """The schema version recorded in the file, or None for a new file."""

    def exists(table: str) -> bool:
        row = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).fetchone()
        return row is not None

    if exists("meta"):
        row = conn.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'"
        ).fetchone()
        if row is not None:
            return str(row[0])
    # Version 2 created its tables one statement at a time and recorded its
    # version last: tables without a version were left by a version 2 server
    # that stopped while creating them, before it stored any entry.
    return "2" if exists("entries") else None


def _migrate_from_2(conn: sqlite3.Connection) -> int:
    """Rebuild `entries` without the UNIQUE dedup_key and the full-key
    indexes (dropped with the old table); `open` then creates the current
    indexes and records the new version. Returns the entries copied.
    """
    conn.execute(f"CREATE TABLE entries_v3 {_ENTRIES_COLUMNS}")
    copied = conn.execute(
        "INSERT INTO entries_v3 (idx, leaf, leaf_hash, dedup_key, artifact_sha256) "
        "SELECT idx, leaf, leaf_hash, dedup_key, artifact_sha256 FROM entries "
        "ORDER BY idx"
    ).rowcount
    conn.execute("DROP TABLE entries")
    conn.execute("ALTER TABLE entries_v3 RENAME TO entries")
    return int(copied)


def _migrate_from_3(conn: sqlite3.Connection) -> int:
    """Drop the version 3 dedup and artifact indexes; `open` then creates
    `entries_artifact_dedup` over the entries and records the new version.
    Returns the number of entries indexed.
    """
    conn.execute("DROP INDEX IF EXISTS entries_dedup_prefix")
    conn.execute("DROP INDEX IF EXISTS entries_artifact")
    (count,) = conn.execute("SELECT count(*) FROM entries").fetchone()
    return int(count)
