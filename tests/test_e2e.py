"""End to end: a real `logserver serve`, openssl, and an independent client."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tlog_scales.backend import HttpBackend
from tlog_scales.reader import TilesReader
from tlog_scales.signing import Vkey
from tlog_scales.tiles import leaf_hash as scales_leaf_hash

from signer.software import PROCESS_BATCH
from tests.serverproc import ServerProcess, spawned_children
from verifier.checkpoint import open_checkpoint
from verifier.note import NoteVerifier

ORIGIN = "e2e.example/log"


@pytest.fixture
def server(tmp_path: Path) -> ServerProcess:
    return ServerProcess(tmp_path / "data", "--origin", ORIGIN)


def entry(name: str, digest: str) -> dict[str, object]:
    return {"artifact": {"name": name, "sha256": digest}}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_signature_verifies_with_openssl(server: ServerProcess, tmp_path: Path) -> None:
    artifact = tmp_path / "release.tar.gz"
    artifact.write_bytes(b"pretend this is a release\n" * 1000)
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()

    status, answer = server.post("api/v1/entries", entry(artifact.name, digest))
    assert status == 201, answer
    leaf = base64.b64decode(answer["leaf"])
    signature = base64.b64decode(json.loads(leaf)["signature"]["value"])
    sig_file = tmp_path / "release.sig"
    sig_file.write_bytes(signature)
    pem = server.data / "public" / "default.pem"

    verify = ["openssl", "dgst", "-sha256", "-verify", str(pem), "-signature"]
    result = subprocess.run(
        [*verify, str(sig_file), str(artifact)], capture_output=True, text=True
    )
    assert result.returncode == 0 and "Verified OK" in result.stdout, result

    # The same signature must not verify another file.
    other = tmp_path / "other"
    other.write_bytes(b"something else")
    result = subprocess.run(
        [*verify, str(sig_file), str(other)], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert server.stop() == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_a_large_batch_is_signed_in_worker_processes(
    server: ServerProcess, tmp_path: Path
) -> None:
    artifacts = []
    for i in range(PROCESS_BATCH + 72):
        path = tmp_path / f"lib-{i}.tar.gz"
        path.write_bytes(b"release %d\n" % i)
        artifacts.append(path)
    entries = [
        entry(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in artifacts
    ]
    status, answer = server.post("api/v1/entries/batch", {"entries": entries})
    assert status == 201, answer
    workers = spawned_children(server.proc.pid)
    assert workers, "the batch was not signed by worker processes"

    pem = server.data / "public" / "default.pem"
    public = serialization.load_pem_public_key(pem.read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    signatures = []
    for path, result in zip(artifacts, answer["entries"], strict=True):
        leaf = json.loads(base64.b64decode(result["leaf"]))
        assert leaf["artifact"]["name"] == path.name
        signature = base64.b64decode(leaf["signature"]["value"])
        public.verify(signature, path.read_bytes(), ec.ECDSA(hashes.SHA256()))
        signatures.append(signature)
    for i in (0, len(artifacts) // 2, len(artifacts) - 1):
        sig_file = tmp_path / f"{i}.sig"
        sig_file.write_bytes(signatures[i])
        result = subprocess.run(
            ["openssl", "dgst", "-sha256", "-verify", str(pem),
             "-signature", str(sig_file), str(artifacts[i])],
            capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0 and "Verified OK" in result.stdout, result

    assert server.stop() == 0
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{w}").exists() for w in workers):
        assert time.monotonic() < deadline, "signing workers outlived the server"
        time.sleep(0.05)


def test_independent_client_reads_and_verifies_the_log(server: ServerProcess) -> None:
    vkey_text = (server.data / "public" / "log.vkey").read_text().strip()
    status, first = server.post("api/v1/entries", entry("first", "00" * 32))
    assert status == 201
    old = open_checkpoint(
        first["checkpoint"].encode(), NoteVerifier.from_key(vkey_text)
    )

    # Enough entries for full level-0 tiles and a partial level-1 tile.
    for batch in range(3):
        entries = [
            entry(f"f{batch}-{i}", hashlib.sha256(b"%d/%d" % (batch, i)).hexdigest())
            for i in range(200)
        ]
        status, _ = server.post("api/v1/entries/batch", {"entries": entries})
        assert status == 201

    reader = TilesReader(HttpBackend(server.url.rstrip("/")))
    checkpoint = reader.get_checkpoint()
    checkpoint.verify(Vkey.from_string(vkey_text))
    assert checkpoint.size == 601
    assert reader.calculate_root_hash() == checkpoint.root_hash

    for index in (0, 255, 256, 511, 600):
        leaf = reader.get_entry(index)
        proof = reader.get_inclusion_proof(index, checkpoint.size)
        proof.check(scales_leaf_hash(leaf), checkpoint.root_hash)
    consistency = reader.get_consistency_proof(old.checkpoint.size, checkpoint.size)
    consistency.check(old.checkpoint.root_hash, checkpoint.root_hash)
    assert server.stop() == 0


def test_restart_keeps_every_entry(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServerProcess(data, "--origin", ORIGIN)
    answers = [
        server.post("api/v1/entries", entry(f"a{i}", f"{i:064x}"))[1] for i in range(20)
    ]
    before = server.get("checkpoint")
    assert server.stop() == 0

    server = ServerProcess(data, "--origin", ORIGIN)
    try:
        assert server.get("checkpoint") == before
        status, again = server.post("api/v1/entries", entry("a3", f"{3:064x}"))
        assert status == 200 and again["leaf"] == answers[3]["leaf"]
        status, new = server.post("api/v1/entries", entry("b", "ff" * 32))
        assert status == 201 and new["index"] == 20
    finally:
        assert server.stop() == 0

    # A different origin for the same data is refused, clearly.
    result = subprocess.run(
        ["logserver", "serve", "--data", str(data), "--origin", "other/log",
         "--listen", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert "origin is fixed" in result.stderr
