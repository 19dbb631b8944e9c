"""Every way a log or a bundle can lie is caught, with a clear message.

The logs here are static tiles directories written with the verifier's own
code (entry bundles, every tile, a checkpoint signed with a throwaway key),
then damaged one way per test. `verifier verify`, `monitor` and `audit` run
through `verifier.cli.main`; one test serves a damaged log over HTTP.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import shutil
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.hashes import SHA256

from verifier.bundle import make_bundle
from verifier.checkpoint import Checkpoint
from verifier.cli import main
from verifier.leaf import (
    Artifact,
    ArtifactSignature,
    Identity,
    Leaf,
    Policy,
    encode_leaf,
    public_key_id,
)
from verifier.logsource import DirectoryLog
from verifier.merkle import inclusion_proof, leaf_hash, root_from_leaf_hashes
from verifier.monitor import Alert, Monitor
from verifier.note import (
    NoteSignature,
    NoteVerifier,
    ed25519_key_id,
    format_note,
    verifier_key,
)
from verifier.tiles import (
    TILE_HEIGHT,
    TILE_WIDTH,
    encode_entry_bundle,
    entries_path,
    tile_path,
)

ORIGIN = "tamper.example/log"
SIZE = 600
BAD_SIGNATURE_INDEX = 7
POLICY = hashlib.sha256(b"policy").hexdigest()


@dataclass(frozen=True)
class Keys:
    log: Ed25519PrivateKey
    artifact: ec.EllipticCurvePrivateKey

    @property
    def vkey(self) -> str:
        return verifier_key(ORIGIN, self.log.public_key().public_bytes_raw())

    @property
    def key_id(self) -> str:
        return public_key_id(self.artifact.public_key())

    def pem(self) -> bytes:
        return self.artifact.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def artifact_bytes(index: int, fork: str = "") -> bytes:
    return f"artifact {fork}{index}\n".encode()


def make_leaf(keys: Keys, index: int, fork: str = "") -> bytes:
    """Leaf `index`, signed over its artifact's digest (all but one)."""
    digest = hashlib.sha256(artifact_bytes(index, fork)).digest()
    signed = digest
    if index == BAD_SIGNATURE_INDEX:
        signed = hashlib.sha256(b"something else").digest()
    signature = keys.artifact.sign(signed, ec.ECDSA(Prehashed(SHA256())))
    return encode_leaf(
        Leaf(
            artifact=Artifact(name=f"app-{index}.bin", sha256=digest.hex()),
            identity=Identity(issuer="test", subject="ci"),
            policy=Policy(mode="automated", policy_sha256=POLICY, rule="ci"),
            signature=ArtifactSignature(
                algorithm="ecdsa-p256-sha256",
                key_id=keys.key_id,
                value=base64.b64encode(signature).decode(),
            ),
            timestamp=1_800_000_000 + index,
        )
    )


def sign_checkpoint(keys: Keys, size: int, root: bytes) -> bytes:
    text = Checkpoint(ORIGIN, size, root).to_text()
    public = keys.log.public_key().public_bytes_raw()
    signature = NoteSignature(
        ORIGIN, ed25519_key_id(ORIGIN, public), keys.log.sign(text.encode())
    )
    return format_note(text, [signature])


def write_log(root: Path, keys: Keys, leaves: Sequence[bytes]) -> bytes:
    """A complete tlog-tiles directory for these leaves; returns the checkpoint."""
    hashes = [leaf_hash(leaf) for leaf in leaves]
    for first in range(0, len(leaves), TILE_WIDTH):
        chunk = leaves[first : first + TILE_WIDTH]
        path = root / entries_path(first // TILE_WIDTH, len(chunk))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_entry_bundle(chunk))
    level, height = hashes, 0
    while level:
        for first in range(0, len(level), TILE_WIDTH):
            chunk = level[first : first + TILE_WIDTH]
            path = root / tile_path(height, first // TILE_WIDTH, len(chunk))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"".join(chunk))
        level = [
            root_from_leaf_hashes(level[i : i + TILE_WIDTH])
            for i in range(0, len(level) - TILE_WIDTH + 1, TILE_WIDTH)
        ]
        height += 1
    assert height == 1 + (len(leaves).bit_length() - 1) // TILE_HEIGHT
    checkpoint = sign_checkpoint(keys, len(leaves), root_from_leaf_hashes(hashes))
    (root / "checkpoint").write_bytes(checkpoint)
    return checkpoint


@dataclass(frozen=True)
class World:
    """A log of SIZE entries, its keys, and what a verifier is given."""

    root: Path
    keys: Keys
    leaves: tuple[bytes, ...]
    pem: Path

    def bundle(self, index: int, size: int = SIZE) -> bytes:
        hashes = [leaf_hash(leaf) for leaf in self.leaves[:size]]
        checkpoint = sign_checkpoint(self.keys, size, root_from_leaf_hashes(hashes))
        proof = inclusion_proof(hashes, index, size)
        return make_bundle(self.leaves[index], index, proof, checkpoint).to_json()

    def copy(self, to: Path) -> Path:
        shutil.copytree(self.root, to)
        return to


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    base = tmp_path_factory.mktemp("tamper")
    keys = Keys(Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1()))
    leaves = tuple(make_leaf(keys, i) for i in range(SIZE))
    write_log(base / "log", keys, leaves)
    pem = base / "artifact.pem"
    pem.write_bytes(keys.pem())
    return World(base / "log", keys, leaves, pem)


def flip(path: Path, at: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def change_entry(path: Path) -> None:
    """Change the first entry's timestamp: still a valid leaf, another hash."""
    data = path.read_bytes()
    flip(path, at=data.index(b',"version":1}') - 1)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def alerts(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def artifact(tmp_path: Path, world: World, index: int) -> tuple[Path, Path]:
    """The artifact of entry `index` and its bundle, on disk."""
    path = tmp_path / f"app-{index}.bin"
    path.write_bytes(artifact_bytes(index))
    bundle = tmp_path / f"app-{index}.bin.sigbundle"
    bundle.write_bytes(world.bundle(index))
    return path, bundle


def verify(
    capsys: pytest.CaptureFixture[str], world: World, file: Path, *extra: str
) -> tuple[int, str, str]:
    return run(
        capsys, "verify", str(file), "--log-key", world.keys.vkey,
        "--key", str(world.pem), *extra,
    )  # fmt: skip


def monitor(
    capsys: pytest.CaptureFixture[str], world: World, log: Path | str, state: Path
) -> tuple[int, list[dict[str, Any]], str]:
    code, out, err = run(
        capsys, "monitor", "--log", str(log), "--log-key", world.keys.vkey,
        "--state", str(state), "--key", str(world.pem), "--once",
    )  # fmt: skip
    return code, alerts(out), err


def audit(
    capsys: pytest.CaptureFixture[str], world: World, log: str
) -> tuple[int, dict[str, Any], str]:
    code, out, err = run(
        capsys, "audit", "--log", log, "--log-key", world.keys.vkey, "--json"
    )
    return code, json.loads(out) if out else {}, err


# --- The baseline ------------------------------------------------------------


def test_the_undamaged_log_passes(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file, _ = artifact(tmp_path, world, 300)
    assert verify(capsys, world, file)[0] == 0
    code, out, err = verify(capsys, world, file, "--online", "--log", str(world.root))
    assert code == 0, err
    assert "consistent with the log at size 600" in out

    code, report, err = audit(capsys, world, str(world.root))
    assert code == 0, err
    assert report["entries"] == SIZE and report["tiles"] == {"0": 3, "1": 1}

    code, found, err = monitor(capsys, world, world.root, tmp_path / "state")
    # The one leaf whose signature was made over another digest.
    assert [(a["alert"], a["index"]) for a in found] == [
        ("bad_signature", BAD_SIGNATURE_INDEX)
    ]
    assert code == 1


# --- Bundles that lie --------------------------------------------------------


def test_a_bundle_for_another_artifact(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file, _ = artifact(tmp_path, world, 3)
    _, other = artifact(tmp_path, world, 4)
    code, _, err = verify(capsys, world, file, "--bundle", str(other))
    assert code == 1
    assert "step 1 (digest)" in err and "'app-4.bin'" in err


def test_a_leaf_whose_signature_does_not_verify(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file, _ = artifact(tmp_path, world, BAD_SIGNATURE_INDEX)
    code, out, err = verify(capsys, world, file, "--json")
    assert code == 1
    assert "step 2 (signature): artifact signature does not verify" in err
    result = json.loads(out)
    assert result["verified"] is False and result["failed_step"] == 2
    assert result["steps"] == {
        "digest": "passed",
        "signature": "failed",
        "checkpoint": "not run",
        "inclusion": "not run",
        "expectations": "not run",
    }


def test_a_bad_checkpoint_signature(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file, bundle = artifact(tmp_path, world, 9)
    body = json.loads(bundle.read_bytes())
    proof = body["proof"]
    # Change one character of the signature, keeping it valid base64.
    at = proof.rindex(" ") + 10
    body["proof"] = proof[:at] + ("A" if proof[at] != "A" else "B") + proof[at + 1 :]
    bundle.write_text(json.dumps(body))
    code, _, err = verify(capsys, world, file)
    assert code == 1
    assert "step 3 (checkpoint): the checkpoint is not signed by the trusted" in err

    log = world.copy(tmp_path / "log")
    checkpoint = (log / "checkpoint").read_text()
    at = checkpoint.rindex(" ") + 10
    swapped = "A" if checkpoint[at] != "A" else "B"
    (log / "checkpoint").write_text(checkpoint[:at] + swapped + checkpoint[at + 1 :])
    code, found, _ = monitor(capsys, world, log, tmp_path / "state")
    assert code == 1 and [a["alert"] for a in found] == ["bad_checkpoint"]
    assert "does not verify" in str(found[0]["message"])
    code, _, err = audit(capsys, world, str(log))
    assert code == 1 and "the checkpoint does not verify" in err


def test_a_checkpoint_signed_by_another_key(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file, _ = artifact(tmp_path, world, 9)
    other = verifier_key(
        ORIGIN, Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    )
    code, _, err = run(
        capsys, "verify", str(file), "--log-key", other, "--key", str(world.pem)
    )
    assert code == 1
    assert "no signature from a known key" in err


def test_a_wrong_inclusion_proof(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file, bundle = artifact(tmp_path, world, 300)
    body = json.loads(bundle.read_bytes())
    lines = body["proof"].split("\n")
    lines[2] = base64.b64encode(bytes(32)).decode()  # the first proof hash
    body["proof"] = "\n".join(lines)
    bundle.write_text(json.dumps(body))
    code, _, err = verify(capsys, world, file)
    assert code == 1
    assert "step 4 (inclusion): leaf 300 is not included" in err


# --- Logs that lie -----------------------------------------------------------


def test_a_forked_checkpoint(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The same key signs a tree that shares the first 300 leaves, then differs.
    forked = world.leaves[:300] + tuple(
        make_leaf(world.keys, i, fork="fork-") for i in range(300, SIZE + 50)
    )
    fork = tmp_path / "fork"
    write_log(fork, world.keys, forked)
    state = tmp_path / "state"
    code, _, _ = monitor(capsys, world, world.root, state)
    code, found, _ = monitor(capsys, world, fork, state)
    assert code == 1 and [a["alert"] for a in found] == ["inconsistent_checkpoints"]
    evidence = found[0]["evidence"]
    assert evidence["old_checkpoint"] == (world.root / "checkpoint").read_text()
    assert evidence["new_checkpoint"] == (fork / "checkpoint").read_text()
    assert evidence["consistency_proof"]
    # The state still holds the last good checkpoint.
    stored = json.loads((state / "state.json").read_text())
    assert stored["checkpoint"] == (world.root / "checkpoint").read_text()

    file, _ = artifact(tmp_path, world, 500)
    code, _, err = verify(capsys, world, file, "--online", "--log", str(fork))
    assert code == 1
    assert "online check: checkpoints are not consistent" in err


def test_a_rolled_back_checkpoint(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    older = tmp_path / "older"
    write_log(older, world.keys, world.leaves[:500])
    state = tmp_path / "state"
    monitor(capsys, world, world.root, state)
    code, found, _ = monitor(capsys, world, older, state)
    assert code == 1 and [a["alert"] for a in found] == ["rollback"]
    assert found[0]["message"] == "the log rolled back from size 600 to 500"

    file, _ = artifact(tmp_path, world, 10)
    code, _, err = verify(capsys, world, file, "--online", "--log", str(older))
    assert code == 1
    assert "the log rolled back: its latest checkpoint has size 500" in err

    # A monitor that keeps running reports the same rollback once.
    sent: list[Alert] = []
    log_key = NoteVerifier.from_key(world.keys.vkey)
    running = Monitor(DirectoryLog(older), log_key, state, sent.append)
    assert [running.poll().alerts for _ in range(3)] == [1, 1, 1]
    assert [a.kind for a in sent] == ["rollback"]


def test_a_modified_entry(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = world.copy(tmp_path / "log")
    change_entry(log / "tile/entries/001")
    code, report, _ = audit(capsys, world, str(log))
    assert code == 1
    problems = report["problems"]
    # The level 0 tile, the level 1 tile above it, and the root all disagree.
    assert problems[:2] == [
        "tile/0/001 does not match the leaf hashes of tile/entries/001",
        "tile/1/000.p/2 does not match the hashes recomputed below it",
    ]
    assert problems[2].startswith("the root recomputed from the entries is")
    assert len(problems) == 3

    code, found, _ = monitor(capsys, world, log, tmp_path / "state")
    kinds = [a["alert"] for a in found]
    assert kinds == ["bad_signature", "tiles_mismatch"]
    assert "entry bundle 1 does not match the checkpoint" in str(found[1]["message"])
    # Entries before the bad bundle were checked; the monitor stops at it.
    stored = json.loads((tmp_path / "state" / "state.json").read_text())
    assert stored["next_index"] == 256


@pytest.mark.parametrize(
    ("path", "monitor_message"),
    [
        ("tile/0/000", "tile does not match the tree"),
        ("tile/1/000.p/2", "tiles do not match the tree root"),
    ],
)
def test_a_modified_tile(
    world: World,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    path: str,
    monitor_message: str,
) -> None:
    log = world.copy(tmp_path / "log")
    flip(log / path)
    code, report, _ = audit(capsys, world, str(log))
    assert code == 1 and report["problem_count"] == 1
    assert str(report["problems"][0]).startswith(f"{path} does not match")

    code, found, _ = monitor(capsys, world, log, tmp_path / "state")
    assert code == 1 and found[-1]["alert"] == "tiles_mismatch"
    assert monitor_message in str(found[-1]["message"])

    file, _ = artifact(tmp_path, world, 5)
    code, _, err = verify(capsys, world, file, "--online", "--log", str(log))
    assert code == 1 and monitor_message in err


def test_a_missing_entry_bundle(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = world.copy(tmp_path / "log")
    (log / "tile/entries/001").unlink()
    code, report, _ = audit(capsys, world, str(log))
    assert code == 1
    assert report["problems"] == [
        "cannot read tile/entries/001: tile/entries/001 is missing from " + str(log),
        "the root cannot be recomputed: entries are missing",
    ]
    code, found, _ = monitor(capsys, world, log, tmp_path / "state")
    assert code == 1 and found[-1]["alert"] == "missing_data"
    assert "does not serve entry bundle 1" in str(found[-1]["message"])


# --- The same over HTTP ------------------------------------------------------


@pytest.fixture
def serve() -> Iterator[functools.partial[str]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(directory: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield functools.partial(start)
    for server in servers:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_damaged_log_over_http(
    world: World,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    serve: functools.partial[str],
) -> None:
    log = world.copy(tmp_path / "log")
    url = serve(log)
    code, report, err = audit(capsys, world, url)
    assert code == 0, err

    change_entry(log / "tile/entries/002.p/88")
    code, report, _ = audit(capsys, world, url)
    assert code == 1
    assert report["problems"][0] == (
        "tile/0/002.p/88 does not match the leaf hashes of tile/entries/002.p/88"
    )
    code, found, _ = monitor(capsys, world, url, tmp_path / "state")
    assert found[-1]["alert"] == "tiles_mismatch"
