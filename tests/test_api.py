"""The HTTP API against a real aiohttp server, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from logserver.app import create_app
from logserver.config import Config, load_config
from logserver.storage import (
    AuditRow,
    EntryRow,
    Storage,
    StorageError,
    open_storage,
)
from logserver.storage import sqlite as sqlite_storage
from logserver.storage.sqlite import SqliteStorage
from tests.conftest import log_state, token_header
from verifier.checkpoint import open_checkpoint
from verifier.leaf import parse_leaf, verify_artifact_signature
from verifier.merkle import (
    HASH_SIZE,
    leaf_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)
from verifier.note import NoteVerifier
from verifier.tiles import parse_entry_bundle, parse_hash_tile


def digest_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def body_for(name: str, **extra: Any) -> dict[str, Any]:
    return {"artifact": {"name": name, "sha256": digest_of(name)}, **extra}


async def submit(client: TestClient, body: dict[str, Any], status: int = 201) -> Any:
    response = await client.post(
        "/api/v1/entries", json=body, headers=token_header(client)
    )
    assert response.status == status, await response.text()
    return await response.json()


def log_verifier(config: Config) -> NoteVerifier:
    return NoteVerifier.from_key(
        (config.data / "public" / "log.vkey").read_text().strip()
    )


def check_entry(config: Config, answer: dict[str, Any], artifact_name: str) -> None:
    """Everything a client checks: leaf, signature, inclusion, checkpoint."""
    leaf_bytes = base64.b64decode(answer["leaf"])
    leaf = parse_leaf(leaf_bytes)
    assert leaf.artifact.name == artifact_name
    assert leaf.artifact.sha256 == digest_of(artifact_name)

    pem = (config.data / "public" / "default.pem").read_bytes()
    public_key = load_pem_public_key(pem)
    verify_artifact_signature(
        public_key,  # type: ignore[arg-type]
        leaf.signature.algorithm,
        bytes.fromhex(leaf.artifact.sha256),
        base64.b64decode(leaf.signature.value),
    )

    signed = open_checkpoint(answer["checkpoint"].encode(), log_verifier(config))
    proof = answer["inclusion_proof"]
    assert proof["tree_size"] == signed.checkpoint.size
    verify_inclusion(
        leaf_hash(leaf_bytes),
        answer["index"],
        signed.checkpoint.size,
        [base64.b64decode(h) for h in proof["hashes"]],
        signed.checkpoint.root_hash,
    )


async def test_submit_returns_a_verifiable_entry(
    log_client: TestClient, log_config: Config
) -> None:
    answer = await submit(
        log_client,
        body_for(
            "app.tar.gz",
            source={
                "repository": "github.com/org/app",
                "commit": "a" * 40,
                "ref": "main",
            },
            build={"builder": "ci-runner-1", "invocation": "run/17"},
        ),
    )
    assert answer["index"] == 0
    check_entry(log_config, answer, "app.tar.gz")
    leaf = parse_leaf(base64.b64decode(answer["leaf"]))
    assert leaf.source is not None and leaf.source.repository == "github.com/org/app"
    assert leaf.identity.subject == "bootstrap"
    assert leaf.policy.rule == "builtin-bootstrap-token"


async def test_a_repeated_request_returns_the_same_entry(
    log_client: TestClient, log_config: Config
) -> None:
    first = await submit(log_client, body_for("one"))
    await submit(log_client, body_for("two"))
    again = await submit(log_client, body_for("one"), status=200)
    assert again["index"] == first["index"]
    assert again["leaf"] == first["leaf"]
    check_entry(log_config, again, "one")
    assert log_state(log_client).sequencer.tree.size == 2


async def test_a_batch_may_repeat_an_entry_and_overlap_another(
    log_client: TestClient, log_config: Config
) -> None:
    """Identical entries in flight together share one entry, in any request."""

    async def batch(names: list[str]) -> list[Any]:
        response = await log_client.post(
            "/api/v1/entries/batch",
            json={"entries": [body_for(n) for n in names]},
            headers=token_header(log_client),
        )
        assert response.status == 201, await response.text()
        entries: list[Any] = (await response.json())["entries"]
        for name, entry in zip(names, entries, strict=True):
            check_entry(log_config, entry, name)
        return entries

    first, second = await asyncio.gather(
        batch(["twice", "other", "twice"]), batch(["shared", "twice", "own"])
    )
    assert first[0]["index"] == first[2]["index"] == second[1]["index"]
    assert first[0]["leaf"] == first[2]["leaf"] == second[1]["leaf"]
    assert len({e["index"] for e in first + second}) == 4
    assert log_state(log_client).sequencer.tree.size == 4


async def test_a_checkpoint_is_stored_with_the_next_batch(
    log_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One commit per batch: a checkpoint rides along with the next append."""
    storage = log_state(log_client).sequencer.storage
    writes: list[tuple[str, int | None]] = []
    append, store = storage.append, storage.store_checkpoint

    async def slow_append(*args: Any) -> None:
        carried = args[5] if len(args) > 5 else None
        writes.append(("append", None if carried is None else carried[0]))
        # Long enough for the second submission to be signed and waiting.
        await asyncio.sleep(0.3)
        await append(*args)

    async def counted_store(size: int, note: bytes) -> None:
        writes.append(("store", size))
        await store(size, note)

    monkeypatch.setattr(storage, "append", slow_append)
    monkeypatch.setattr(storage, "store_checkpoint", counted_store)
    first = asyncio.create_task(submit(log_client, body_for("first")))
    await asyncio.sleep(0.1)
    second = await submit(log_client, body_for("second"))
    await first

    # The first checkpoint (size 1) went with the second append; the last,
    # with nothing after it, was stored on its own.
    assert writes == [("append", None), ("append", 1), ("store", 2)]
    published = log_state(log_client).sequencer.published
    assert published is not None and published.size == 2
    assert second["checkpoint"] == published.note.decode()
    assert (await storage.load_state()).checkpoint == published.note


async def test_batch_submission(log_client: TestClient, log_config: Config) -> None:
    names = [f"file-{i}" for i in range(300)]
    response = await log_client.post(
        "/api/v1/entries/batch",
        json={"entries": [body_for(n) for n in names]},
        headers=token_header(log_client),
    )
    assert response.status == 201, await response.text()
    entries = (await response.json())["entries"]
    assert sorted(e["index"] for e in entries) == list(range(300))
    for name, entry in zip(names, entries, strict=True):
        check_entry(log_config, entry, name)

    # A full tile and a full entry bundle now exist; both immutable.
    tile = await log_client.get("/tile/0/000")
    assert tile.status == 200
    assert "immutable" in tile.headers["Cache-Control"]
    hashes = parse_hash_tile(await tile.read(), 256)
    bundle = await log_client.get("/tile/entries/000")
    leaves = parse_entry_bundle(await bundle.read(), 256)
    assert [leaf_hash(leaf) for leaf in leaves] == hashes


async def test_tiles_and_bundles_follow_the_checkpoint(log_client: TestClient) -> None:
    for i in range(5):
        await submit(log_client, body_for(f"f{i}"))
    checkpoint = await log_client.get("/checkpoint")
    assert checkpoint.status == 200
    assert checkpoint.content_type == "text/plain"
    assert (await checkpoint.text()).splitlines()[1] == "5"

    tile = await log_client.get("/tile/0/000.p/5")
    assert tile.status == 200
    assert tile.content_type == "application/octet-stream"
    hashes = parse_hash_tile(await tile.read(), 5)
    bundle = await log_client.get("/tile/entries/000.p/5")
    leaves = parse_entry_bundle(await bundle.read(), 5)
    assert [leaf_hash(leaf) for leaf in leaves] == hashes

    # A narrower partial tile is a prefix; a wider one does not exist yet.
    narrow = await log_client.get("/tile/0/000.p/3")
    assert parse_hash_tile(await narrow.read(), 3) == hashes[:3]
    for path in ("/tile/0/000.p/6", "/tile/0/000", "/tile/1/000", "/tile/entries/001"):
        assert (await log_client.get(path)).status == 404, path


@pytest.mark.parametrize(
    "path",
    [
        "/tile/0/../secrets",
        "/tile/0/%2e%2e/x",
        "/tile/0/0",
        "/tile/0/x000/000",
        "/tile/0/000.p/0",
        "/tile/0/000.p/256",
        "/tile/99999999999999999999/000",
        "/tile/0/x999/x999/x999/x999/x999/x999/x999/999",
        "/tile/entries/000.p/",
    ],
)
async def test_bad_tile_paths_are_404(log_client: TestClient, path: str) -> None:
    response = await log_client.get(path)
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"


async def test_json_reads(log_client: TestClient, log_config: Config) -> None:
    answers = [await submit(log_client, body_for(f"r{i}")) for i in range(7)]
    verifier = log_verifier(log_config)

    entry = await (await log_client.get("/api/v1/entries/3")).json()
    assert entry["leaf"] == answers[3]["leaf"]
    assert entry["entry"]["artifact"]["name"] == "r3"
    check_entry(log_config, entry, "r3")

    by_hash = await log_client.get(
        "/api/v1/proof/inclusion",
        params={"leaf_hash": answers[2]["leaf_hash"], "tree_size": "5"},
    )
    assert by_hash.status == 200
    proof = await by_hash.json()
    assert proof["index"] == 2 and proof["tree_size"] == 5

    consistency = await log_client.get(
        "/api/v1/proof/consistency", params={"old_size": "3", "new_size": "7"}
    )
    hashes = [base64.b64decode(h) for h in (await consistency.json())["hashes"]]
    old = open_checkpoint(answers[2]["checkpoint"].encode(), verifier).checkpoint
    new = open_checkpoint(answers[6]["checkpoint"].encode(), verifier).checkpoint
    assert (old.size, new.size) == (3, 7)
    verify_consistency(3, 7, old.root_hash, new.root_hash, hashes)

    found = await (await log_client.get(f"/api/v1/artifacts/{digest_of('r4')}")).json()
    assert [e["index"] for e in found["entries"]] == [4]

    keys = await (await log_client.get("/api/v1/keys")).json()
    assert keys["checkpoint_key"] == verifier_text(log_config)
    assert keys["artifact_keys"][0]["status"] == "default"


def verifier_text(config: Config) -> str:
    return (config.data / "public" / "log.vkey").read_text().strip()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/v1/entries/7", 404),
        ("/api/v1/entries/-1", 400),
        ("/api/v1/entries/+1", 400),
        ("/api/v1/entries/99999999999999999999999", 400),
        ("/api/v1/proof/inclusion?index=0&tree_size=2", 400),
        ("/api/v1/proof/inclusion?index=1&tree_size=1", 400),
        ("/api/v1/proof/inclusion?index=abc", 400),
        ("/api/v1/proof/inclusion?leaf_hash=AAAA", 400),
        ("/api/v1/proof/inclusion?index=0&leaf_hash=AAAA", 400),
        ("/api/v1/proof/inclusion", 400),
        ("/api/v1/proof/consistency?old_size=2&new_size=1", 400),
        ("/api/v1/proof/consistency?old_size=0&new_size=99999999999999", 400),
        ("/api/v1/artifacts/XYZ", 400),
        ("/no/such/route", 404),
    ],
)
async def test_bad_reads_get_clear_errors(
    log_client: TestClient, path: str, status: int
) -> None:
    await submit(log_client, body_for("only"))
    response = await log_client.get(path)
    assert response.status == status
    error = (await response.json())["error"]
    assert error["message"]


async def test_batch_path_is_not_an_entry_index(log_client: TestClient) -> None:
    """/api/v1/entries/batch is the POST route only, not a bad {index}."""
    await submit(log_client, body_for("only"))
    for method in ("GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"):
        response = await log_client.request(method, "/api/v1/entries/batch")
        assert response.status == 405, (method, await response.text())
        assert response.headers["Allow"] == "POST", method
        if method != "HEAD":
            error = (await response.json())["error"]
            assert error["code"] == "method_not_allowed" and error["message"]

    entry = await log_client.get("/api/v1/entries/0")
    assert entry.status == 200
    assert (await entry.json())["entry"]["artifact"]["name"] == "only"
    for path in ("/api/v1/entries/abc", "/api/v1/entries/-1", "/api/v1/entries/batchx"):
        response = await log_client.get(path)
        assert response.status == 400, path
        assert (await response.json())["error"] == {
            "code": "bad_request",
            "message": "the entry index must be a decimal number",
        }


async def test_bad_writes_change_nothing(log_client: TestClient) -> None:
    headers = token_header(log_client)
    url = "/api/v1/entries"
    good = body_for("x")
    cases: list[tuple[dict[str, Any], Any, int]] = [
        ({}, good, 401),
        ({"Authorization": "Bearer wrong"}, good, 401),
        ({"Authorization": "Basic abc"}, good, 401),
        (headers, {"artifact": {"name": "x", "sha256": "ABC"}}, 422),
        (
            headers,
            {"artifact": {"name": "x", "sha256": digest_of("x"), "size": 1.5}},
            422,
        ),
        (headers, {"artifact": {"name": "", "sha256": digest_of("x")}}, 422),
        (headers, {"artifact": {"name": "a\nb", "sha256": digest_of("x")}}, 422),
        (
            headers,
            {"artifact": {"name": "caf\u00e9\u0085", "sha256": digest_of("x")}},
            422,
        ),
        (headers, {**good, "extra": 1}, 422),
        (headers, {**good, "key": "no-such-key"}, 422),
    ]
    for case_headers, body, status in cases:
        response = await log_client.post(url, json=body, headers=case_headers)
        assert response.status == status, (body, await response.text())

    raw_cases: list[tuple[bytes, str, int]] = [
        (b"{not json", "application/json", 400),
        (b"\xff\xfe{}", "application/json", 400),
        (b"[" * 5000 + b"]" * 5000, "application/json", 400),
        (b"{}", "text/plain", 415),
        (b"x" * (2 << 20), "application/json", 413),
    ]
    for data, content_type, status in raw_cases:
        response = await log_client.post(
            url, data=data, headers={**headers, "Content-Type": content_type}
        )
        assert response.status == status, (data[:20], await response.text())
        assert (await response.json())["error"]["code"]
    assert (await response.json())["error"]["code"] == "payload_too_large"

    wrong_method = await log_client.put(url, json=good, headers=headers)
    assert wrong_method.status == 405
    assert wrong_method.headers["Allow"] == "POST"
    assert (await wrong_method.json())["error"]["code"] == "method_not_allowed"

    assert log_state(log_client).sequencer.tree.size == 0
    assert (await log_client.get("/checkpoint")).status == 200
    assert (await (await log_client.get("/healthz")).json())["tree_size"] == 0


async def test_openapi_documents_every_route(log_client: TestClient) -> None:
    document = await (await log_client.get("/openapi.json")).json()
    documented = {
        (path, method.upper())
        for path, operations in document["paths"].items()
        for method in operations
    }
    routed = {
        (route.resource.canonical, route.method)
        for route in log_client.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    routed = {(path.replace("{tail:.+}", "{tail}"), method) for path, method in routed}
    assert documented == routed


async def test_metrics_and_health(log_client: TestClient) -> None:
    await submit(log_client, body_for("m"))
    health = await (await log_client.get("/healthz")).json()
    assert health["status"] == "ok" and health["tree_size"] == 1
    text = await (await log_client.get("/metrics")).text()
    assert "logserver_entries_total 1.0" in text
    assert 'route="/api/v1/entries",status="201"' in text
    assert "logserver_integration_seconds_count" in text


async def test_every_allowed_request_is_audited_even_when_deduplicated(
    log_client: TestClient,
) -> None:
    # Ten identical requests at once: one entry, ten allowed decisions.
    answers = await asyncio.gather(
        *(
            log_client.post(
                "/api/v1/entries",
                json=body_for("same"),
                headers=token_header(log_client),
            )
            for _ in range(10)
        )
    )
    assert sorted(a.status for a in answers) == [200] * 9 + [201]
    assert len({(await a.json())["index"] for a in answers}) == 1

    batch = await log_client.post(
        "/api/v1/entries/batch",
        json={"entries": [body_for(f"b{i}") for i in range(5)]},
        headers=token_header(log_client),
    )
    assert batch.status == 201

    admin = log_state(log_client).admin_token_path.read_text().strip()
    response = await log_client.get(
        "/api/v1/audit",
        params={"decision": "allowed"},
        headers={"Authorization": f"Bearer {admin}"},
    )
    records = (await response.json())["records"]
    assert len(records) == 15
    assert {r["identity"]["subject"] for r in records} == {"bootstrap"}


async def test_a_batch_larger_than_the_queue_is_refused_at_once(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    config = load_config(
        None,
        data=tmp_path / "data",
        origin="small.example/log",
        sequencer={"max_pending": 5, "linger_ms": 0},
    )
    client = await aiohttp_client(create_app(config))
    response = await client.post(
        "/api/v1/entries/batch",
        json={"entries": [body_for(f"q{i}") for i in range(6)]},
        headers=token_header(client),
    )
    assert response.status == 413
    assert "max_pending" in (await response.json())["error"]["message"]


# Storage: the SQLite schema (version 4) and its migrations from versions 2 and 3.

# The SQLite schema of version 2, as that server created it.
V2_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY,
    leaf BLOB NOT NULL,
    leaf_hash BLOB NOT NULL,
    dedup_key BLOB NOT NULL UNIQUE,
    artifact_sha256 BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_leaf_hash ON entries (leaf_hash);
CREATE INDEX IF NOT EXISTS entries_artifact ON entries (artifact_sha256, idx);
CREATE TABLE IF NOT EXISTS tiles (
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tree (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    size INTEGER NOT NULL,
    root BLOB NOT NULL,
    checkpoint_size INTEGER NOT NULL,
    checkpoint BLOB
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time INTEGER NOT NULL,
    decision TEXT NOT NULL,
    issuer TEXT NOT NULL,
    subject TEXT NOT NULL,
    rule TEXT,
    request_id TEXT,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_decision ON audit (decision, id);
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    lookup TEXT UNIQUE,
    state TEXT NOT NULL,
    expires INTEGER NOT NULL,
    record BLOB NOT NULL
);
"""


# The indexes a version 3 server added on `entries` (its table was version 2's
# without UNIQUE on dedup_key).
V3_INDEXES_SQL = """
CREATE INDEX entries_dedup_prefix ON entries (substr(dedup_key, 1, 8));
CREATE INDEX entries_leaf_hash_prefix ON entries (substr(leaf_hash, 1, 8));
CREATE INDEX entries_artifact ON entries (artifact_sha256, idx);
"""

V4_INDEXES = {"entries_leaf_hash_prefix", "entries_artifact_dedup"}


def entry_row(name: str, digest: bytes | None = None) -> EntryRow:
    """An entry for artifact `name` (or the given digest), keyed by `name`."""
    leaf = f'{{"artifact":"{name}"}}'.encode()
    return EntryRow(
        leaf,
        leaf_hash(leaf),
        hashlib.sha256(b"dedup " + name.encode()).digest(),
        hashlib.sha256(name.encode()).digest() if digest is None else digest,
    )


async def append_rows(storage: Storage, rows: list[EntryRow]) -> None:
    """Append `rows` after what is stored, with their level-0 tile and root."""
    state = await storage.load_state()
    hashes = state.leaf_hashes + b"".join(r.leaf_hash for r in rows)
    leaves = [hashes[i : i + HASH_SIZE] for i in range(0, len(hashes), HASH_SIZE)]
    assert len(leaves) <= 256, "one level-0 tile is enough here"
    await storage.append(
        state.size, rows, [(0, 0, hashes)], root_from_leaf_hashes(leaves)
    )


def entry_indexes(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' "
            "AND tbl_name = 'entries'"
        )
        return {name for (name,) in rows}


def write_old_log(
    path: Path, schema: str, version: str, rows: list[EntryRow]
) -> tuple[bytes, bytes]:
    """A log of `rows` in a new database of an older `schema` and `version`,
    with a stored checkpoint; returns its leaf hashes and root."""
    hashes = b"".join(r.leaf_hash for r in rows)
    root = root_from_leaf_hashes([r.leaf_hash for r in rows])
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(schema)
        db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (version,))
        db.executemany(
            "INSERT INTO entries VALUES (?, ?, ?, ?, ?)",
            [
                (i, r.leaf, r.leaf_hash, r.dedup_key, r.artifact_sha256)
                for i, r in enumerate(rows)
            ],
        )
        db.execute("INSERT INTO tiles VALUES (0, 0, ?)", (hashes,))
        db.execute(
            "INSERT INTO tree VALUES (1, ?, ?, ?, ?)",
            (len(rows), root, len(rows), b"checkpoint"),
        )
    return hashes, root


async def test_a_version_2_sqlite_database_is_migrated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "log.db"
    shared = hashlib.sha256(b"shared artifact").digest()
    rows = [entry_row(f"v2-{i}", shared if i in (1, 3) else None) for i in range(5)]
    hashes, root = write_old_log(path, V2_SCHEMA, "2", rows)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("INSERT INTO meta VALUES ('origin', 'old.example/log')")
        db.execute(
            "INSERT INTO audit (time, decision, issuer, subject, rule, request_id, "
            "record) VALUES (1, 'allowed', 'iss', 'sub', 'rule', NULL, X'7B7D')"
        )
        db.execute("INSERT INTO requests VALUES ('r1', 'look', 'open', 9, X'7B7D')")
    assert "entries_leaf_hash" in entry_indexes(path)

    storage = SqliteStorage(path)
    with caplog.at_level(logging.INFO, logger="logserver.storage.sqlite"):
        await storage.open()
    try:
        migrations = [r for r in caplog.records if r.getMessage().startswith("migr")]
        assert len(migrations) == 1
        assert migrations[0].__dict__["entries"] == 5
        assert await storage.get_meta("schema_version") == "4"
        assert await storage.get_meta("origin") == "old.example/log"
        state = await storage.load_state()
        assert (state.size, state.root, state.leaf_hashes) == (5, root, hashes)
        assert state.checkpoint == b"checkpoint"
        assert await storage.get_leaves(0, 5) == [r.leaf for r in rows]
        for i, r in enumerate(rows):
            assert await storage.find_leaf_hash(r.leaf_hash) == i
        assert await storage.find_leaf_hash(bytes(32)) is None
        assert await storage.find_artifact(shared, 10) == [1, 3]
        assert await storage.find_artifact(shared, 1) == [1]
        assert await storage.find_artifact(rows[2].artifact_sha256, 10) == [2]
        wanted = [(r.artifact_sha256, r.dedup_key) for r in rows]
        assert await storage.find_dedup(wanted) == {
            r.dedup_key: i for i, r in enumerate(rows)
        }
        [(_, audit)] = await storage.list_audit(0, 10)
        assert audit.rule == "rule"
        request = await storage.get_request("r1")
        assert request is not None and request.lookup == "look"

        # The log goes on from where it was.
        await append_rows(storage, [entry_row("v4-5", shared)])
        assert await storage.find_artifact(shared, 10) == [1, 3, 5]
        assert (await storage.load_state()).size == 6
    finally:
        await storage.close()

    assert entry_indexes(path) == V4_INDEXES
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        sql = db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'entries'"
        ).fetchone()[0]
        assert "UNIQUE" not in sql.upper()

    # Opening it again changes nothing.
    caplog.clear()
    again = SqliteStorage(path)
    with caplog.at_level(logging.INFO, logger="logserver.storage.sqlite"):
        await again.open()
    try:
        assert not [r for r in caplog.records if r.getMessage().startswith("migr")]
        assert (await again.load_state()).size == 6
    finally:
        await again.close()


def v3_schema() -> str:
    v2_indexes = (
        "CREATE INDEX IF NOT EXISTS entries_leaf_hash ON entries (leaf_hash);\n"
        "CREATE INDEX IF NOT EXISTS entries_artifact "
        "ON entries (artifact_sha256, idx);\n"
    )
    assert v2_indexes in V2_SCHEMA and "NOT NULL UNIQUE," in V2_SCHEMA
    return V2_SCHEMA.replace("NOT NULL UNIQUE,", "NOT NULL,").replace(
        v2_indexes, V3_INDEXES_SQL
    )


async def test_a_version_3_sqlite_database_is_migrated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "log.db"
    shared = hashlib.sha256(b"shared artifact").digest()
    rows = [entry_row(f"v3-{i}", shared if i in (0, 4) else None) for i in range(5)]
    hashes, root = write_old_log(path, v3_schema(), "3", rows)
    assert "entries_dedup_prefix" in entry_indexes(path)

    storage = SqliteStorage(path)
    with caplog.at_level(logging.INFO, logger="logserver.storage.sqlite"):
        await storage.open()
    try:
        (migration,) = [r for r in caplog.records if r.getMessage().startswith("migr")]
        assert migration.__dict__["from_version"] == "3"
        assert migration.__dict__["entries"] == 5
        assert await storage.get_meta("schema_version") == "4"
        state = await storage.load_state()
        assert (state.size, state.root, state.leaf_hashes) == (5, root, hashes)
        assert await storage.find_artifact(shared, 10) == [0, 4]
        assert await storage.find_dedup(
            [(r.artifact_sha256, r.dedup_key) for r in rows]
        ) == {r.dedup_key: i for i, r in enumerate(rows)}
        for i, r in enumerate(rows):
            assert await storage.find_leaf_hash(r.leaf_hash) == i
        await append_rows(storage, [entry_row("v4-5", shared)])
        assert await storage.find_artifact(shared, 10) == [0, 4, 5]
    finally:
        await storage.close()
    assert entry_indexes(path) == V4_INDEXES
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


async def test_a_newer_sqlite_schema_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('schema_version', '5')")
    storage = SqliteStorage(path)
    try:
        with pytest.raises(StorageError, match=r"version 5.*upgrade the server"):
            await storage.open()
    finally:
        await storage.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        tables = {n for (n,) in db.execute("SELECT name FROM sqlite_master")}
        assert tables == {"meta", "sqlite_autoindex_meta_1"}
        assert db.execute("SELECT value FROM meta").fetchall() == [("5",)]


async def test_sqlite_lookups_use_the_entry_indexes(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    storage = SqliteStorage(path)
    await storage.open()
    try:
        assert await storage.get_meta("schema_version") == "4"
        await append_rows(storage, [entry_row(f"plan-{i}") for i in range(20)])
    finally:
        await storage.close()
    assert entry_indexes(path) == V4_INDEXES

    key = bytes(range(32))
    # find_leaf_hash, find_artifact and find_dedup, as they query; the
    # artifact lookup sorts the digest's entries by index (few, as a rule).
    queries = [
        (
            sqlite_storage.FIND_LEAF_HASH,
            (key[:8], key),
            "entries_leaf_hash_prefix (<expr>=?)",
            False,
        ),
        (
            sqlite_storage.FIND_ARTIFACT,
            (key, 100),
            "entries_artifact_dedup (artifact_sha256=?)",
            True,
        ),
        (
            sqlite_storage.find_dedup_query(2),
            (key, key[:8], bytes(32), bytes(8)),
            "entries_artifact_dedup (artifact_sha256=? AND <expr>=?)",
            False,
        ),
    ]
    with contextlib.closing(sqlite3.connect(path)) as db:
        for query, parameters, index, sorts in queries:
            plan = " | ".join(
                str(row[-1])
                for row in db.execute(f"EXPLAIN QUERY PLAN {query}", parameters)
            )
            assert "SEARCH entries USING " in plan, (query, plan)
            assert f"INDEX {index}" in plan, (query, plan)
            assert "SCAN entries" not in plan, (query, plan)
            assert ("TEMP B-TREE" in plan) == sorts, (query, plan)


async def test_find_dedup_matches_exact_keys_only(database_url: str) -> None:
    digest = hashlib.sha256(b"one artifact").digest()
    rows = [
        entry_row("first", digest),
        entry_row("second", digest),
        entry_row("elsewhere"),
    ]
    first, second, elsewhere = rows
    # A key never logged, with the same first 8 bytes as a logged one.
    twin = first.dedup_key[:8] + hashlib.sha256(b"twin").digest()[8:]
    storage = open_storage(database_url)
    await storage.open()
    try:
        await append_rows(storage, rows)
        assert await storage.find_dedup([]) == {}
        assert await storage.find_dedup([(digest, first.dedup_key)]) == {
            first.dedup_key: 0
        }
        assert await storage.find_dedup([(digest, second.dedup_key)]) == {
            second.dedup_key: 1
        }
        assert await storage.find_dedup([(digest, twin)]) == {}
        # More pairs than one query takes, most of them never logged.
        wanted = [
            (hashlib.sha256(b"a%d" % i).digest(), hashlib.sha256(b"k%d" % i).digest())
            for i in range(1200)
        ]
        wanted[700:700] = [(r.artifact_sha256, r.dedup_key) for r in rows]
        wanted.append((digest, twin))
        assert await storage.find_dedup(wanted) == {
            first.dedup_key: 0,
            second.dedup_key: 1,
            elsewhere.dedup_key: 2,
        }
    finally:
        await storage.close()


class _OldSqlite(SqliteStorage):
    """Storage on connections that bind at most 999 parameters a statement,
    as SQLite did before 3.32 (RHEL 8 ships 3.26)."""

    def _connect(self) -> sqlite3.Connection:
        conn = super()._connect()
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        return conn


async def test_sqlite_with_a_999_parameter_limit(tmp_path: Path) -> None:
    storage = _OldSqlite(tmp_path / "log.db")
    await storage.open()
    try:
        rows = [entry_row(f"old-{i}") for i in range(800)]
        audit = [
            AuditRow(i, "allowed", "issuer", "subject", "rule", None, b"{}")
            for i in range(800)
        ]
        hashes = b"".join(r.leaf_hash for r in rows)
        tiles = [
            (0, n, hashes[n * 256 * HASH_SIZE : (n + 1) * 256 * HASH_SIZE])
            for n in range(4)
        ]
        leaves = [r.leaf_hash for r in rows]
        await storage.append(0, rows, tiles, root_from_leaf_hashes(leaves), audit)
        assert (await storage.load_state()).size == 800
        assert len(await storage.list_audit(0, 1000)) == 800
        wanted = [(r.artifact_sha256, r.dedup_key) for r in rows]
        wanted += [(bytes(32), hashlib.sha256(b"%d" % i).digest()) for i in range(400)]
        found = await storage.find_dedup(wanted)
        assert found == {r.dedup_key: i for i, r in enumerate(rows)}
    finally:
        await storage.close()
