"""Rotating artifact keys: old signatures stay verifiable, retired keys sign nothing."""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Any, NoReturn

import orjson
import pytest
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from logserver.app import create_app
from logserver.config import ConfigError, load_config
from logserver.keys import LogKeys, PublishedKey, publish_keys
from signer.keys import ECDSA_P256_SHA256, public_key_pem
from signer.software import (
    SoftwareArtifactSigner,
    SoftwareCheckpointSigner,
    _write_private,
)
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


def _fail(code: int) -> NoReturn:
    raise OSError(code, os.strerror(code))


def _disk_full(*args: object) -> NoReturn:
    _fail(errno.ENOSPC)


def _software_key(kind: str, path: Path) -> bytes:
    """Load or create a software key of this kind; its public key, as PEM."""
    if kind == "artifact":
        signer = SoftwareArtifactSigner.load_or_create("k", path, ECDSA_P256_SHA256)
        return public_key_pem(signer.public_key)
    return SoftwareCheckpointSigner.load_or_create(ORIGIN, path).public_key


@pytest.mark.parametrize("kind", ["artifact", "checkpoint"])
def test_software_key_files_are_written_whole_and_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    path = tmp_path / "secrets" / f"{kind}.pem"
    modes: list[int] = []
    write = os.write

    def write_and_record_mode(fd: int, data: bytes) -> int:
        modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return write(fd, data)

    monkeypatch.setattr(os, "write", write_and_record_mode)
    public = _software_key(kind, path)
    monkeypatch.undo()
    assert modes and set(modes) == {0o600}  # owner-only while being written, too
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert os.listdir(path.parent) == [path.name]  # no temporary file left
    assert _software_key(kind, path) == public


@pytest.mark.parametrize("failing", ["write", "fsync"])
@pytest.mark.parametrize("kind", ["artifact", "checkpoint"])
def test_a_failed_key_write_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, failing: str
) -> None:
    """A full disk mid-write leaves nothing the next start would misread."""
    path = tmp_path / "secrets" / f"{kind}.pem"
    monkeypatch.setattr(os, failing, _disk_full)
    with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
        _software_key(kind, path)
    monkeypatch.undo()
    assert os.listdir(path.parent) == []
    _software_key(kind, path)
    assert os.listdir(path.parent) == [path.name]


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_key_file_is_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hard_links: bool
) -> None:
    """Created only if absent, as with O_EXCL, with or without hard links."""
    if not hard_links:
        monkeypatch.setattr(os, "link", lambda *a: _fail(errno.EPERM))
    path = tmp_path / "k.pem"
    _write_private(path, b"first")
    with pytest.raises(FileExistsError):
        _write_private(path, b"second")
    assert path.read_bytes() == b"first"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["k.pem"]


def _log_keys() -> LogKeys:
    checkpoint = SoftwareCheckpointSigner(ORIGIN, ed25519.Ed25519PrivateKey.generate())
    key = ec.generate_private_key(ec.SECP256R1())
    artifact = SoftwareArtifactSigner("2026", ECDSA_P256_SHA256, key)
    pem = public_key_pem(artifact.public_key).decode()
    published = [
        PublishedKey("2026", ECDSA_P256_SHA256, artifact.key_id, pem, "default")
    ]
    return LogKeys(checkpoint, {"2026": artifact}, "2026", published)


PUBLIC_FILES = ["2026.pem", "keys.json", "log.vkey"]


def test_published_keys_are_replaced_whole(tmp_path: Path) -> None:
    public = tmp_path / "public"
    umask = os.umask(0)
    os.umask(umask)
    for keys in (_log_keys(), _log_keys()):  # created, then replaced
        publish_keys(keys, public)
        assert sorted(os.listdir(public)) == PUBLIC_FILES  # no temporary files
        assert (public / "log.vkey").read_text() == keys.verifier_key + "\n"
        assert (public / "2026.pem").read_text() == keys.published[0].pem
        listed = orjson.loads((public / "keys.json").read_bytes())
        assert [k["key_id"] for k in listed] == [keys.published[0].key_id]
        for name in PUBLIC_FILES:  # as readable as before: 0666 less the umask
            assert stat.S_IMODE((public / name).stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_a_failed_publish_leaves_the_old_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    public = tmp_path / "public"
    publish_keys(_log_keys(), public)
    before = {name: (public / name).read_bytes() for name in PUBLIC_FILES}
    monkeypatch.setattr(os, failing, _disk_full)
    with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
        publish_keys(_log_keys(), public)
    monkeypatch.undo()
    assert sorted(os.listdir(public)) == PUBLIC_FILES
    assert {name: (public / name).read_bytes() for name in PUBLIC_FILES} == before
