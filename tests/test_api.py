"""The HTTP API against a real aiohttp server, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from logserver.app import create_app
from logserver.config import Config, load_config
from tests.conftest import log_state, token_header
from verifier.checkpoint import open_checkpoint
from verifier.leaf import parse_leaf, verify_artifact_signature
from verifier.merkle import leaf_hash, verify_consistency, verify_inclusion
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
