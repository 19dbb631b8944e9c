"""Rotating artifact keys: old signatures stay verifiable, retired keys sign nothing."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from logserver.app import create_app
from logserver.config import ConfigError, load_config
from tests.conftest import ORIGIN, token_header
from verifier.leaf import parse_leaf, verify_artifact_signature


def config_for(tmp_path: Path, keys: dict[str, Any], default: str) -> Any:
    return load_config(
        None,
        data=tmp_path / "data",
        origin=ORIGIN,
        artifact_keys=keys,
        default_artifact_key=default,
        sequencer={"linger_ms": 0},
    )


async def sign(client: TestClient, name: str, key: str | None = None) -> Any:
    body: dict[str, Any] = {
        "artifact": {"name": name, "sha256": hashlib.sha256(name.encode()).hexdigest()}
    }
    if key is not None:
        body["key"] = key
    response = await client.post(
        "/api/v1/entries", json=body, headers=token_header(client)
    )
    return response.status, await response.json()


def verify_with_published(public: Path, pem_name: str, answer: Any) -> str:
    leaf = parse_leaf(base64.b64decode(answer["leaf"]))
    key = load_pem_public_key((public / pem_name).read_bytes())
    verify_artifact_signature(
        key,  # type: ignore[arg-type]
        leaf.signature.algorithm,
        bytes.fromhex(leaf.artifact.sha256),
        base64.b64decode(leaf.signature.value),
    )
    return leaf.signature.key_id


async def test_rotation_keeps_old_signatures_verifiable(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    public = tmp_path / "data" / "public"

    # 1. One key, the default.
    client = await aiohttp_client(
        create_app(config_for(tmp_path, {"2026": {}}, "2026"))
    )
    status, old = await sign(client, "old-release")
    assert status == 201
    old_key_id = verify_with_published(public, "2026.pem", old)
    await client.close()

    # 2. A new key becomes the default; the old one can still be asked for.
    keys = {"2026": {}, "2027": {"algorithm": "ecdsa-p384-sha256"}}
    client = await aiohttp_client(create_app(config_for(tmp_path, keys, "2027")))
    status, new = await sign(client, "new-release")
    assert status == 201
    new_key_id = verify_with_published(public, "2027.pem", new)
    assert new_key_id != old_key_id
    status, explicit = await sign(client, "hotfix", key="2026")
    assert status == 201
    assert verify_with_published(public, "2026.pem", explicit) == old_key_id
    await client.close()

    # 3. The old key is retired: published, but never used to sign.
    keys = {"2026": {"retired": True}, "2027": {"algorithm": "ecdsa-p384-sha256"}}
    client = await aiohttp_client(create_app(config_for(tmp_path, keys, "2027")))
    status, refused = await sign(client, "late", key="2026")
    assert status == 422, refused
    listed = await (await client.get("/api/v1/keys")).json()
    statuses = {k["name"]: k["status"] for k in listed["artifact_keys"]}
    assert statuses == {"2026": "retired", "2027": "default"}
    assert verify_with_published(public, "2026.pem", old) == old_key_id
    published = orjson.loads((public / "keys.json").read_bytes())
    assert {k["key_id"] for k in published} == {old_key_id, new_key_id}
    await client.close()


def test_a_retired_default_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is retired"):
        config_for(tmp_path, {"a": {"retired": True}, "b": {}}, "a")


def test_a_key_file_cannot_change_algorithm(tmp_path: Path) -> None:
    from signer.keys import SignerError
    from signer.software import SoftwareArtifactSigner

    path = tmp_path / "k.pem"
    SoftwareArtifactSigner.load_or_create("k", path, "ecdsa-p256-sha256")
    with pytest.raises(SignerError, match="cannot sign ecdsa-p384-sha256"):
        SoftwareArtifactSigner.load_or_create("k", path, "ecdsa-p384-sha256")


def test_checkpoint_key_table_needs_no_algorithm(tmp_path: Path) -> None:
    config_file = tmp_path / "log.toml"
    config_file.write_text('[checkpoint_key]\nbackend = "software"\n')
    assert load_config(config_file).checkpoint_key.algorithm == "ed25519"
