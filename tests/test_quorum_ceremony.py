"""Reproducibility quorums and m-of-n approvals, on SQLite and PostgreSQL."""

from __future__ import annotations

import argparse
import asyncio
import base64
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives.asymmetric import ed25519

from logserver.app import create_app
from logserver.auth import TOKEN_ISSUER
from signer import approve_cmd
from tests.conftest import ORIGIN, log_state
from tests.govern import (
    Tokens,
    admin_header,
    approvers_toml,
    body_for,
    digest_of,
    governed_config,
    make_approvers,
    post,
    private_pem,
)
from verifier.approvals import (
    approval_message,
    check_approvals,
    sign_approval,
    verify_approvals,
)
from verifier.errors import VerificationError
from verifier.leaf import Leaf, parse_leaf, public_key_id

QUORUM_POLICY = f"""
version = 1
[[rules]]
name = "reproducible"
artifacts = "lib-*"
keys = "default"
match = {{ issuer = "{TOKEN_ISSUER}", subject = "builder-*" }}
quorum = {{ builders = 3, window_seconds = 600 }}
"""

COMMIT = {"source": {"repository": "acme/lib", "commit": "c" * 40}}


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    names = ("builder-1", "builder-2", "builder-3", "builder-4", "releaser")
    return Tokens.create(tmp_path / "tokens", *names)


@pytest.fixture
async def quorum_client(
    aiohttp_client: Any, tmp_path: Path, database_url: str, tokens: Tokens
) -> TestClient:
    config = governed_config(tmp_path, database_url, QUORUM_POLICY, tokens)
    client: TestClient = await aiohttp_client(create_app(config))
    return client


def leaf_of(answer: dict[str, Any]) -> Leaf:
    return parse_leaf(base64.b64decode(answer["leaf"]))


async def test_three_builders_complete_a_quorum(
    quorum_client: TestClient, tokens: Tokens
) -> None:
    body = body_for("lib-a.so", **COMMIT)
    _, first = await post(quorum_client, body, tokens.header("builder-1"), 202)
    request_id = first["request_id"]
    assert first["state"] == "collecting" and first["quorum"]["builders"] == 3
    # The same builder twice counts once.
    _, again = await post(quorum_client, body, tokens.header("builder-1"), 202)
    assert again["request_id"] == request_id
    assert len(again["quorum"]["reports"]) == 1
    _, second = await post(quorum_client, body, tokens.header("builder-2"), 202)
    assert len(second["quorum"]["reports"]) == 2
    assert log_state(quorum_client).sequencer.tree.size == 0  # nothing signed yet

    _, entry = await post(quorum_client, body, tokens.header("builder-3"), 201)
    leaf = leaf_of(entry)
    assert leaf.policy.rule == "reproducible"
    assert leaf.policy.request_id == request_id
    assert leaf.policy.builders is not None
    assert [b.subject for b in leaf.policy.builders] == [
        "builder-1",
        "builder-2",
        "builder-3",
    ]
    assert leaf.identity.subject == "builder-1"

    # The earlier builders fetch the entry.
    response = await quorum_client.get(f"/api/v1/requests/{request_id}")
    document = await response.json()
    assert document["state"] == "logged"
    assert document["entry"]["index"] == entry["index"]
    assert document["entry"]["leaf"] == entry["leaf"]
    _, late = await post(quorum_client, body, tokens.header("builder-1"), 200)
    assert late["index"] == entry["index"]
    assert log_state(quorum_client).sequencer.tree.size == 1


async def test_a_disagreeing_builder_denies_the_quorum(
    quorum_client: TestClient, tokens: Tokens
) -> None:
    good = body_for("lib-b.so", **COMMIT)
    bad = body_for("lib-b.so", digest=digest_of("tampered"), **COMMIT)
    _, first = await post(quorum_client, good, tokens.header("builder-1"), 202)
    await post(quorum_client, good, tokens.header("builder-2"), 202)
    _, denial = await post(quorum_client, bad, tokens.header("builder-3"), 403)
    assert denial["error"]["code"] == "denied"
    assert denial["error"]["details"][0]["code"] == "quorum_conflict"
    # Even a third agreeing builder cannot complete a denied quorum.
    _, still = await post(quorum_client, good, tokens.header("builder-4"), 403)
    assert still["error"]["details"][0]["code"] == "quorum_conflict"
    assert log_state(quorum_client).sequencer.tree.size == 0

    document = await (
        await quorum_client.get(f"/api/v1/requests/{first['request_id']}")
    ).json()
    assert document["state"] == "denied"
    assert document["reasons"][0]["code"] == "quorum_conflict"

    metrics = await (await quorum_client.get("/metrics")).text()
    assert 'logserver_quorum_conflicts_total{rule="reproducible"} 1.0' in metrics
    audit = await (
        await quorum_client.get(
            "/api/v1/audit",
            params={"decision": "denied"},
            headers=admin_header(quorum_client),
        )
    ).json()
    subjects = [r["identity"]["subject"] for r in audit["records"]]
    assert subjects == ["builder-3", "builder-4"]
    assert audit["records"][0]["reasons"][0]["code"] == "quorum_conflict"
    assert audit["records"][0]["request_id"] == first["request_id"]


async def test_concurrent_builders_sign_exactly_once(
    quorum_client: TestClient, tokens: Tokens
) -> None:
    body = body_for("lib-c.so", **COMMIT)
    results = await asyncio.gather(
        *(
            post(quorum_client, body, tokens.header(f"builder-{i}"))
            for i in (1, 2, 3, 4)
        )
    )
    statuses = sorted(status for status, _ in results)
    assert statuses.count(201) == 1, results
    assert set(statuses) <= {200, 201, 202}
    assert log_state(quorum_client).sequencer.tree.size == 1


def ceremony_policy(approvers: dict[str, Any], expires: int = 3600) -> str:
    return f"""
version = 1
{approvers_toml(approvers)}
[[rules]]
name = "release"
mode = "ceremonial"
artifacts = "app-*.tar.gz"
keys = "default"
match = {{ issuer = "{TOKEN_ISSUER}", subject = "releaser" }}
[rules.ceremony]
approvers = ["alice", "bob", "carol"]
threshold = 2
expires_seconds = {expires}
"""


@pytest.fixture
def approvers() -> dict[str, Any]:
    return make_approvers()


@pytest.fixture
async def ceremony_client(
    aiohttp_client: Any,
    tmp_path: Path,
    database_url: str,
    tokens: Tokens,
    approvers: dict[str, Any],
) -> TestClient:
    config = governed_config(tmp_path, database_url, ceremony_policy(approvers), tokens)
    client: TestClient = await aiohttp_client(create_app(config))
    return client


def message_for(document: dict[str, Any], decision: str = "approve") -> bytes:
    request = document["request"]
    requester = request["requester"]
    return approval_message(
        origin=document["origin"],
        request_id=document["request_id"],
        rule=document["rule"],
        requester=(requester["issuer"], requester["subject"]),
        artifact=request["artifact"],
        source=request.get("source"),
        build=request.get("build"),
        key_id=request["key_id"],
        decision=decision,  # type: ignore[arg-type]
    )


async def vote(
    client: TestClient,
    document: dict[str, Any],
    key: Any,
    decision: str = "approve",
    message: bytes | None = None,
    status: int = 200,
) -> Any:
    signature = sign_approval(key, message or message_for(document, decision))
    response = await client.post(
        f"/api/v1/requests/{document['request_id']}/{decision}",
        json={
            "key_id": public_key_id(key.public_key()),
            "signature": base64.b64encode(signature).decode(),
        },
    )
    answer = await response.json()
    assert response.status == status, answer
    return answer


def run_approve(url: str, request_id: str, key_file: Path, *extra: str) -> int:
    """`signer approve` through a parser of our own, as signer.cli will wire it."""
    parser = argparse.ArgumentParser(prog="signer")
    commands = parser.add_subparsers(dest="command", required=True)
    approve_cmd.add_parser(commands)
    args = parser.parse_args(
        ["approve", request_id, "--log", url, "--key", str(key_file), *extra]
    )
    code: int = args.run(args)
    return code


async def test_two_of_three_approvals_sign_the_release(
    ceremony_client: TestClient,
    tokens: Tokens,
    approvers: dict[str, Any],
    tmp_path: Path,
) -> None:
    body = body_for("app-1.0.tar.gz", **COMMIT)
    _, parked = await post(ceremony_client, body, tokens.header("releaser"), 202)
    assert parked["state"] == "pending"
    assert base64.b64decode(parked["ceremony"]["approval_message"]) == message_for(
        parked
    )
    # Submitting again while it waits gives the same request.
    _, same = await post(ceremony_client, body, tokens.header("releaser"), 202)
    assert same["request_id"] == parked["request_id"]

    # A key the policy does not list, and a listed key signing the wrong bytes.
    stranger = ed25519.Ed25519PrivateKey.generate()
    denied = await vote(ceremony_client, parked, stranger, status=403)
    assert denied["error"]["details"][0]["code"] == "unknown_approver"
    wrong = await vote(
        ceremony_client,
        parked,
        approvers["bob"],
        message=message_for(parked, "reject"),
        status=403,
    )
    assert wrong["error"]["details"][0]["code"] == "bad_signature"

    first = await vote(ceremony_client, parked, approvers["alice"])
    assert first["state"] == "pending" and len(first["ceremony"]["approvals"]) == 1
    # Replaying alice's approval counts once.
    replay = await vote(ceremony_client, parked, approvers["alice"])
    assert replay["state"] == "pending" and len(replay["ceremony"]["approvals"]) == 1
    assert log_state(ceremony_client).sequencer.tree.size == 0

    # bob approves with the command-line client.
    key_file = tmp_path / "bob.pem"
    key_file.write_bytes(private_pem(approvers["bob"]))
    url = str(ceremony_client.make_url("/"))
    wrong_digest = await asyncio.to_thread(
        run_approve, url, parked["request_id"], key_file, "--sha256", "0" * 64
    )
    assert wrong_digest == 1
    code = await asyncio.to_thread(
        run_approve, url, parked["request_id"], key_file, "--origin", ORIGIN
    )
    assert code == 0

    document = await (
        await ceremony_client.get(f"/api/v1/requests/{parked['request_id']}")
    ).json()
    assert document["state"] == "logged"
    leaf = leaf_of(document["entry"])
    assert leaf.policy.mode == "ceremonial"
    assert leaf.policy.request_id == parked["request_id"]
    assert len(leaf.policy.approvals) == 2

    # Anyone can re-check the quorum from the leaf and the approvers' keys.
    keys = [k.public_key() for k in approvers.values()]
    valid = verify_approvals(leaf, ORIGIN, keys, 2)
    assert set(valid) == {
        public_key_id(approvers[n].public_key()) for n in ("alice", "bob")
    }
    with pytest.raises(VerificationError, match="1 trusted approvals"):
        verify_approvals(leaf, ORIGIN, [approvers["alice"].public_key()], 2)
    with pytest.raises(VerificationError):
        verify_approvals(leaf, "other.example/log", keys, 2)
    assert len(check_approvals(leaf, ORIGIN, [keys[0]]).untrusted) == 1

    # A late approval changes nothing; the same submission gets the entry.
    await vote(ceremony_client, parked, approvers["carol"], status=409)
    _, again = await post(ceremony_client, body, tokens.header("releaser"), 200)
    assert again["index"] == document["entry"]["index"]
    assert log_state(ceremony_client).sequencer.tree.size == 1

    audit = await (
        await ceremony_client.get(
            "/api/v1/audit", headers=admin_header(ceremony_client)
        )
    ).json()
    decisions = [r["decision"] for r in audit["records"]]
    assert decisions.count("approval") == 2
    assert decisions.count("pending") == 2
    assert decisions.count("denied") == 2


async def test_a_rejection_ends_the_request(
    ceremony_client: TestClient, tokens: Tokens, approvers: dict[str, Any]
) -> None:
    body = body_for("app-2.0.tar.gz", **COMMIT)
    _, parked = await post(ceremony_client, body, tokens.header("releaser"), 202)
    rejected = await vote(ceremony_client, parked, approvers["carol"], "reject")
    assert rejected["state"] == "rejected"
    assert rejected["reasons"][0]["code"] == "rejected"
    await vote(ceremony_client, parked, approvers["alice"], status=409)
    # Asking again opens a new request.
    _, fresh = await post(ceremony_client, body, tokens.header("releaser"), 202)
    assert fresh["request_id"] != parked["request_id"]


async def test_requests_expire(
    ceremony_client: TestClient,
    tokens: Tokens,
    approvers: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = body_for("app-3.0.tar.gz", **COMMIT)
    _, parked = await post(ceremony_client, body, tokens.header("releaser"), 202)
    later = time.time() + 7200

    class Later:
        @staticmethod
        def time() -> float:
            return later

    monkeypatch.setattr("logserver.governance.time", Later)
    expired = await vote(ceremony_client, parked, approvers["alice"], status=409)
    assert "expired" in expired["error"]["message"]
    document = await (
        await ceremony_client.get(f"/api/v1/requests/{parked['request_id']}")
    ).json()
    assert document["state"] == "expired"
    _, fresh = await post(ceremony_client, body, tokens.header("releaser"), 202)
    assert fresh["request_id"] != parked["request_id"]


def test_approval_signatures_of_each_key_type() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from verifier.approvals import approver_key_supported, verify_approval_signature

    message = b'{"context":"logsign/approval/v1"}'
    for key in (
        ed25519.Ed25519PrivateKey.generate(),
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP384R1()),
    ):
        signature = sign_approval(key, message)
        verify_approval_signature(key.public_key(), message, signature)
        with pytest.raises(VerificationError):
            verify_approval_signature(key.public_key(), message + b" ", signature)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert not approver_key_supported(rsa_key.public_key())
    with pytest.raises(ValueError, match="Ed25519 or ECDSA"):
        sign_approval(rsa_key, message)
    with pytest.raises(VerificationError):
        verify_approval_signature(rsa_key.public_key(), message, b"x")
