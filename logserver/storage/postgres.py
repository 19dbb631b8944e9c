"""PostgreSQL storage through asyncpg.

Each batch is one transaction that locks the tree row, so two writers can
never both extend the log from the same size. Connection failures surface as
`StorageUnavailable`, which the HTTP layer answers with 503 and Retry-After;
the pool reconnects by itself once the server is back.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg

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

SCHEMA_VERSION = "2"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    idx BIGINT PRIMARY KEY,
    leaf BYTEA NOT NULL,
    leaf_hash BYTEA NOT NULL,
    dedup_key BYTEA NOT NULL UNIQUE,
    artifact_sha256 BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_leaf_hash ON entries (leaf_hash);
CREATE INDEX IF NOT EXISTS entries_artifact ON entries (artifact_sha256, idx);
CREATE TABLE IF NOT EXISTS tiles (
    level INTEGER NOT NULL,
    idx BIGINT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (level, idx)
);
CREATE TABLE IF NOT EXISTS tree (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    size BIGINT NOT NULL,
    root BYTEA NOT NULL,
    checkpoint_size BIGINT NOT NULL,
    checkpoint BYTEA
);
CREATE TABLE IF NOT EXISTS audit (
    id BIGSERIAL PRIMARY KEY,
    time BIGINT NOT NULL,
    decision TEXT NOT NULL,
    issuer TEXT NOT NULL,
    subject TEXT NOT NULL,
    rule TEXT,
    request_id TEXT,
    record BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_decision ON audit (decision, id);
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    lookup TEXT UNIQUE,
    state TEXT NOT NULL,
    expires BIGINT NOT NULL,
    record BYTEA NOT NULL
);
"""

# Serializes updates of one request lookup across servers (with hashtext).
_LOOKUP_LOCK = 7468297


def _request_row(row: Any) -> RequestRow | None:
    if row is None:
        return None
    return RequestRow(
        row["id"],
        row["lookup"],
        row["state"],
        int(row["expires"]),
        bytes(row["record"]),
    )


# Errors after which the same call can succeed once the server is back.
_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.TooManyConnectionsError,
)

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PostgresStorage:
    """Storage in a PostgreSQL database; the URL is an asyncpg DSN.

    A `search_path` query parameter in the URL names a schema of its own for
    the log, created on open (tests give each run its own schema this way).
    """

    def __init__(self, url: str, *, pool_size: int = 8, timeout: float = 10.0) -> None:
        self.url = url
        self._pool_size = pool_size
        self._timeout = timeout
        self._pool: asyncpg.Pool | None = None

    @asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        try:
            yield
        except (TreeConflict, StorageError):
            raise
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise StorageError(f"PostgreSQL refused the write: {exc}") from exc
        except _TRANSIENT as exc:
            raise StorageUnavailable(f"PostgreSQL is unavailable: {exc!r}") from exc

    async def _with_conn(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        async with self._errors():
            if self._pool is None:
                self._pool = await self._create_pool()
            async with self._pool.acquire(timeout=self._timeout) as conn:
                return await fn(conn)

    async def _create_pool(self) -> asyncpg.Pool:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            self.url,
            min_size=1,
            max_size=self._pool_size,
            command_timeout=self._timeout,
            timeout=self._timeout,
        )
        return pool

    async def open(self) -> None:
        async def create(conn: Any) -> None:
            path = await conn.fetchval("SHOW search_path")
            if _IDENTIFIER.fullmatch(path) and path != "public":
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{path}"')
            async with conn.transaction():
                # Two servers starting together must not race on CREATE TABLE.
                await conn.execute("SELECT pg_advisory_xact_lock(7468296)")
                await conn.execute(_SCHEMA)
                await conn.execute(
                    "INSERT INTO tree VALUES (1, 0, $1, 0, NULL) "
                    "ON CONFLICT (id) DO NOTHING",
                    EMPTY_ROOT,
                )
                await conn.execute(
                    "INSERT INTO meta VALUES ('schema_version', $1) "
                    "ON CONFLICT (key) DO NOTHING",
                    SCHEMA_VERSION,
                )
                version = await conn.fetchval(
                    "SELECT value FROM meta WHERE key = 'schema_version'"
                )
            if version != SCHEMA_VERSION:
                raise StorageError(
                    f"the database has schema version {version}; this server "
                    f"knows version {SCHEMA_VERSION}: upgrade the server"
                )

        await self._with_conn(create)
        logger.info("opened PostgreSQL storage")

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                # A connection stuck on a dead server would hold close() forever.
                async with asyncio.timeout(self._timeout):
                    await pool.close()
            except TimeoutError:
                logger.warning("PostgreSQL pool did not close in time; terminating")
                pool.terminate()

    async def get_meta(self, key: str) -> str | None:
        async def get(conn: Any) -> str | None:
            value: str | None = await conn.fetchval(
                "SELECT value FROM meta WHERE key = $1", key
            )
            return value

        return await self._with_conn(get)

    async def set_meta_once(self, key: str, value: str) -> str:
        async def put(conn: Any) -> str:
            await conn.execute(
                "INSERT INTO meta VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                key,
                value,
            )
            stored: str = await conn.fetchval(
                "SELECT value FROM meta WHERE key = $1", key
            )
            return stored

        return await self._with_conn(put)

    async def list_meta(self, prefix: str) -> dict[str, str]:
        async def get(conn: Any) -> dict[str, str]:
            rows = await conn.fetch(
                "SELECT key, value FROM meta WHERE left(key, $1) = $2",
                len(prefix),
                prefix,
            )
            return {str(r["key"]): str(r["value"]) for r in rows}

        return await self._with_conn(get)

    async def load_state(self) -> StoredState:
        async def load(conn: Any) -> StoredState:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                row = await conn.fetchrow(
                    "SELECT size, root, checkpoint FROM tree WHERE id = 1"
                )
                tiles = await conn.fetch(
                    "SELECT data FROM tiles WHERE level = 0 ORDER BY idx"
                )
            hashes = b"".join(t["data"] for t in tiles)
            size = int(row["size"])
            if len(hashes) != size * HASH_SIZE:
                raise StorageError(
                    f"level-0 tiles hold {len(hashes) // HASH_SIZE} hashes but the "
                    f"tree has {size} leaves: the database is damaged"
                )
            return StoredState(size, bytes(row["root"]), hashes, row["checkpoint"])

        return await self._with_conn(load)

    async def find_dedup(
        self, wanted: Sequence[tuple[bytes, bytes]]
    ) -> dict[bytes, int]:
        if not wanted:
            return {}
        # dedup_key has a unique index of its own here.
        keys = sorted({key for _, key in wanted})

        async def find(conn: Any) -> dict[bytes, int]:
            rows = await conn.fetch(
                "SELECT dedup_key, idx FROM entries WHERE dedup_key = ANY($1::bytea[])",
                keys,
            )
            return {bytes(r["dedup_key"]): int(r["idx"]) for r in rows}

        return await self._with_conn(find)

    async def append(
        self,
        start: int,
        entries: Sequence[EntryRow],
        tiles: Sequence[tuple[int, int, bytes]],
        root: bytes,
        audit: Sequence[AuditRow] = (),
        checkpoint: tuple[int, bytes] | None = None,
    ) -> None:
        async def write(conn: Any) -> None:
            async with conn.transaction():
                size = await conn.fetchval(
                    "SELECT size FROM tree WHERE id = 1 FOR UPDATE"
                )
                if size != start:
                    raise TreeConflict(f"tree is {size} long, expected {start}")
                await conn.execute(
                    "INSERT INTO entries "
                    "SELECT * FROM unnest($1::bigint[], $2::bytea[], $3::bytea[], "
                    "$4::bytea[], $5::bytea[])",
                    list(range(start, start + len(entries))),
                    [e.leaf for e in entries],
                    [e.leaf_hash for e in entries],
                    [e.dedup_key for e in entries],
                    [e.artifact_sha256 for e in entries],
                )
                await conn.execute(
                    "INSERT INTO tiles "
                    "SELECT * FROM unnest($1::int[], $2::bigint[], $3::bytea[]) "
                    "ON CONFLICT (level, idx) DO UPDATE SET data = excluded.data",
                    [t[0] for t in tiles],
                    [t[1] for t in tiles],
                    [t[2] for t in tiles],
                )
                await _insert_audit(conn, audit)
                await conn.execute(
                    "UPDATE tree SET size = $1, root = $2 WHERE id = 1",
                    start + len(entries),
                    root,
                )
                if checkpoint is not None:
                    await _store_checkpoint(conn, *checkpoint)

        await self._with_conn(write)

    async def store_checkpoint(self, size: int, checkpoint: bytes) -> None:
        await self._with_conn(lambda conn: _store_checkpoint(conn, size, checkpoint))

    async def get_leaves(self, start: int, end: int) -> list[bytes]:
        async def get(conn: Any) -> list[bytes]:
            rows = await conn.fetch(
                "SELECT leaf FROM entries WHERE idx >= $1 AND idx < $2 ORDER BY idx",
                start,
                end,
            )
            return [bytes(r["leaf"]) for r in rows]

        return await self._with_conn(get)

    async def find_leaf_hash(self, leaf_hash: bytes) -> int | None:
        async def find(conn: Any) -> int | None:
            idx = await conn.fetchval(
                "SELECT min(idx) FROM entries WHERE leaf_hash = $1", leaf_hash
            )
            return None if idx is None else int(idx)

        return await self._with_conn(find)

    async def find_artifact(self, sha256: bytes, limit: int) -> list[int]:
        async def find(conn: Any) -> list[int]:
            rows = await conn.fetch(
                "SELECT idx FROM entries WHERE artifact_sha256 = $1 "
                "ORDER BY idx LIMIT $2",
                sha256,
                limit,
            )
            return [int(r["idx"]) for r in rows]

        return await self._with_conn(find)

    async def append_audit(self, rows: Sequence[AuditRow]) -> None:
        if not rows:
            return

        async def write(conn: Any) -> None:
            await _insert_audit(conn, rows)

        await self._with_conn(write)

    async def list_audit(
        self, after: int, limit: int, decision: str | None = None
    ) -> list[tuple[int, AuditRow]]:
        async def get(conn: Any) -> list[tuple[int, AuditRow]]:
            rows = await conn.fetch(
                "SELECT id, time, decision, issuer, subject, rule, request_id, record "
                "FROM audit WHERE id > $1 AND ($2::text IS NULL OR decision = $2) "
                "ORDER BY id LIMIT $3",
                after,
                decision,
                limit,
            )
            return [
                (
                    int(r["id"]),
                    AuditRow(
                        int(r["time"]),
                        r["decision"],
                        r["issuer"],
                        r["subject"],
                        r["rule"],
                        r["request_id"],
                        bytes(r["record"]),
                    ),
                )
                for r in rows
            ]

        return await self._with_conn(get)

    async def get_request(self, request_id: str) -> RequestRow | None:
        async def get(conn: Any) -> RequestRow | None:
            row = await conn.fetchrow(
                "SELECT id, lookup, state, expires, record FROM requests WHERE id = $1",
                request_id,
            )
            return _request_row(row)

        return await self._with_conn(get)

    async def update_request(
        self,
        update: RequestUpdate,
        *,
        request_id: str | None = None,
        lookup: str | None = None,
    ) -> list[RequestRow]:
        if (request_id is None) == (lookup is None):
            raise ValueError("give exactly one of request_id and lookup")

        async def write(conn: Any) -> list[RequestRow]:
            async with conn.transaction():
                if lookup is not None:
                    # A row lock cannot cover a lookup no row holds yet.
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                        _LOOKUP_LOCK,
                        lookup,
                    )
                    row = await conn.fetchrow(
                        "SELECT id, lookup, state, expires, record FROM requests "
                        "WHERE lookup = $1 FOR UPDATE",
                        lookup,
                    )
                else:
                    row = await conn.fetchrow(
                        "SELECT id, lookup, state, expires, record FROM requests "
                        "WHERE id = $1 FOR UPDATE",
                        request_id,
                    )
                rows = list(update(_request_row(row)))
                for r in rows:
                    await conn.execute(
                        "INSERT INTO requests VALUES ($1, $2, $3, $4, $5) "
                        "ON CONFLICT (id) DO UPDATE SET lookup = excluded.lookup, "
                        "state = excluded.state, expires = excluded.expires, "
                        "record = excluded.record",
                        r.id,
                        r.lookup,
                        r.state,
                        r.expires,
                        r.record,
                    )
            return rows

        return await self._with_conn(write)


async def _store_checkpoint(conn: Any, size: int, note: bytes) -> None:
    # Never replace a checkpoint with an older one.
    await conn.execute(
        "UPDATE tree SET checkpoint_size = $1, checkpoint = $2 "
        "WHERE id = 1 AND checkpoint_size <= $1",
        size,
        note,
    )


async def _insert_audit(conn: Any, rows: Sequence[AuditRow]) -> None:
    if not rows:
        return
    await conn.execute(
        "INSERT INTO audit (time, decision, issuer, subject, rule, "
        "request_id, record) SELECT * FROM unnest($1::bigint[], $2::text[], "
        "$3::text[], $4::text[], $5::text[], $6::text[], $7::bytea[])",
        [r.time for r in rows],
        [r.decision for r in rows],
        [r.issuer for r in rows],
        [r.subject for r in rows],
        [r.rule for r in rows],
        [r.request_id for r in rows],
        [r.record for r in rows],
    )
