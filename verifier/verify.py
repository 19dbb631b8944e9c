"""Verify an artifact against its `.sigbundle`, offline or against the live log.

`verify_bundle` is the offline check a consumer runs: it needs the artifact,
the bundle, the log's verifier key and the trusted artifact keys, and nothing
from the network. `verify_online` adds what only the log can tell: that the
bundle's checkpoint is still part of the log's history and the entry is still
in it. `check_bundle` runs the same steps and returns a result object that
says which step failed, for `verifier verify --json`.

How a log is read (over HTTP or from a directory) is `verifier.logsource`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from verifier.bundle import Bundle
from verifier.checkpoint import (
    SignedCheckpoint,
    open_checkpoint,
    verify_checkpoint_consistency,
)
from verifier.errors import ConsistencyError, FormatError, VerificationError
from verifier.leaf import (
    Leaf,
    parse_leaf,
    public_key_id,
    verify_artifact_signature,
)
from verifier.logsource import LogSource
from verifier.merkle import leaf_hash, verify_inclusion
from verifier.note import NoteVerifier
from verifier.tiles import TileReader

logger = logging.getLogger(__name__)

MAX_KEY_FILE_SIZE = 1 << 16

# The artifact key types a leaf's signature algorithms use.
ArtifactPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

STEP_NAMES = {
    1: "digest",
    2: "signature",
    3: "checkpoint",
    4: "inclusion",
    5: "expectations",
}


class StepFailed(VerificationError):
    """A bundle verification step failed; `step` is its number (1 to 5)."""

    def __init__(self, step: int, message: str) -> None:
        super().__init__(message)
        self.step = step

    @property
    def step_name(self) -> str:
        return STEP_NAMES[self.step]


# --- Trusted inputs ----------------------------------------------------------


def load_log_key(text: str) -> NoteVerifier:
    """The log's verifier key, given as key text or as a file that holds it."""
    text = text.strip()
    try:
        return NoteVerifier.from_key(text)
    except FormatError as e:
        path = Path(text)
        if not path.is_file():
            raise FormatError(f"not a verifier key: {e}") from e
    data = path.read_bytes()[:MAX_KEY_FILE_SIZE]
    try:
        return NoteVerifier.from_key(data.decode("ascii").strip())
    except (FormatError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} does not hold a verifier key: {e}") from e


def load_artifact_key(pem: bytes) -> tuple[str, ArtifactPublicKey]:
    """An artifact public key from PEM, and its key ID."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as e:
        raise FormatError("not a PEM public key") from e
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise FormatError("not an ECDSA or RSA public key")
    return public_key_id(key), key


def load_artifact_keys(paths: Sequence[Path]) -> dict[str, ArtifactPublicKey]:
    """Trusted artifact keys from PEM files, by key ID."""
    keys: dict[str, ArtifactPublicKey] = {}
    for path in paths:
        try:
            key_id, key = load_artifact_key(path.read_bytes()[:MAX_KEY_FILE_SIZE])
        except FormatError as e:
            raise FormatError(f"{path}: {e}") from e
        keys[key_id] = key
    return keys


def sha256_file(path: Path) -> bytes:
    """The SHA-256 of a file, streamed in chunks."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


# --- Offline verification ----------------------------------------------------


@dataclass(frozen=True)
class Expectations:
    """What the leaf must say besides the digest; None accepts anything."""

    identity: str | None = None
    issuer: str | None = None
    repository: str | None = None
    ref: str | None = None
    builder: str | None = None
    rule: str | None = None

    def mismatches(self, leaf: Leaf) -> list[str]:
        """One line per expectation the leaf does not meet."""
        source, build = leaf.source, leaf.build
        found = {
            "identity": leaf.identity.subject,
            "issuer": leaf.identity.issuer,
            "repository": None if source is None else source.repository,
            "ref": None if source is None else source.ref,
            "builder": None if build is None else build.builder,
            "rule": leaf.policy.rule,
        }
        wanted = {
            "identity": self.identity,
            "issuer": self.issuer,
            "repository": self.repository,
            "ref": self.ref,
            "builder": self.builder,
            "rule": self.rule,
        }
        return [
            f"expected {name} {want!r}, the leaf says {found[name]!r}"
            for name, want in wanted.items()
            if want is not None and found[name] != want
        ]


@dataclass(frozen=True)
class VerifiedBundle:
    """What a verified bundle establishes."""

    leaf: Leaf
    leaf_hash: bytes
    index: int
    checkpoint: SignedCheckpoint


def verify_bundle(
    bundle: Bundle,
    digest: bytes,
    log_key: NoteVerifier,
    artifact_keys: Mapping[str, ArtifactPublicKey],
    expect: Expectations | None = None,
    *,
    size: int | None = None,
) -> VerifiedBundle:
    """Check a bundle for an artifact with this SHA-256 digest; raise StepFailed.

    1. The leaf parses and records exactly this digest (and, if it records
       a size and `size` is given, this size).
    2. The signature over the digest verifies with the trusted key whose ID
       the leaf names.
    3. The checkpoint is signed by the trusted log key.
    4. The leaf hash is included, at the bundle's index, in the tree of that
       checkpoint.
    5. The leaf meets the expectations (identity, source, builder, rule).
    The checkpoint is authenticated (3) before its root is used (4), as
    SPEC.md section 6.2 orders it.
    """
    if len(digest) != hashlib.sha256().digest_size:
        raise ValueError("digest must be 32 bytes of SHA-256")
    # 1.
    try:
        leaf = parse_leaf(bundle.leaf)
    except FormatError as e:
        raise StepFailed(1, f"the bundle's leaf does not parse: {e}") from e
    if leaf.artifact.sha256 != digest.hex():
        raise StepFailed(
            1,
            f"the file's SHA-256 {digest.hex()} is not the digest the leaf "
            f"records for {leaf.artifact.name!r} ({leaf.artifact.sha256})",
        )
    recorded = leaf.artifact.size
    if size is not None and recorded is not None and recorded != size:
        raise StepFailed(
            1, f"the file is {size} bytes; the leaf records {recorded} bytes"
        )
    # 2.
    key_id = leaf.signature.key_id
    key = artifact_keys.get(key_id)
    if key is None:
        raise StepFailed(2, f"the leaf is signed by key {key_id}, not a trusted key")
    signature = base64.b64decode(leaf.signature.value)
    try:
        verify_artifact_signature(key, leaf.signature.algorithm, digest, signature)
    except VerificationError as e:
        raise StepFailed(2, f"{e} with key {key_id}") from e
    # 3.
    proof = bundle.proof
    try:
        checkpoint = open_checkpoint(proof.checkpoint, log_key)
    except (FormatError, VerificationError) as e:
        raise StepFailed(
            3,
            f"the checkpoint is not signed by the trusted log key {log_key.name}: {e}",
        ) from e
    # 4.
    body, hashed = checkpoint.checkpoint, leaf_hash(bundle.leaf)
    try:
        verify_inclusion(hashed, proof.index, body.size, proof.hashes, body.root_hash)
    except VerificationError as e:
        raise StepFailed(
            4,
            f"leaf {proof.index} is not included in the checkpoint of "
            f"{body.origin!r} at size {body.size}: {e}",
        ) from e
    # 5.
    problems = (expect or Expectations()).mismatches(leaf)
    if problems:
        raise StepFailed(5, "; ".join(problems))
    logger.info(
        "bundle verified",
        extra={"index": proof.index, "tree_size": body.size, "key_id": key_id},
    )
    return VerifiedBundle(leaf, hashed, proof.index, checkpoint)


# --- Online verification -----------------------------------------------------


@dataclass(frozen=True)
class OnlineCheck:
    """What the live log said about a verified bundle."""

    latest: SignedCheckpoint
    proof: tuple[bytes, ...]


def verify_online(
    verified: VerifiedBundle, log: LogSource, log_key: NoteVerifier
) -> OnlineCheck:
    """Check a verified bundle against the log's latest checkpoint.

    1. The latest checkpoint is signed by the trusted log key.
    2. It is not older than the bundle's checkpoint (no rollback) and the
       bundle's checkpoint is a prefix of it: a consistency proof computed
       from tiles that are themselves checked against the latest root.
    3. The entry is still in the log: the leaf hash at the bundle's index.
    Raises ConsistencyError with both checkpoints and the proof on a fork.
    """
    # 1.
    latest = open_checkpoint(log.read("checkpoint"), log_key)
    old, new = verified.checkpoint.checkpoint, latest.checkpoint
    # 2.
    if new.size < old.size:
        raise ConsistencyError(
            f"the log rolled back: its latest checkpoint has size {new.size}, "
            f"below the bundle's {old.size}",
            verified.checkpoint,
            latest,
            (),
        )
    reader = TileReader(log.read, new.size, new.root_hash)
    proof = reader.consistency_proof(old.size)
    verify_checkpoint_consistency(verified.checkpoint, latest, proof)
    # 3.
    if reader.hash_at(0, verified.index) != verified.leaf_hash:
        raise VerificationError(
            f"entry {verified.index} is no longer the bundle's leaf in the log"
        )
    logger.info(
        "bundle checked online",
        extra={"index": verified.index, "old_size": old.size, "new_size": new.size},
    )
    return OnlineCheck(latest, tuple(proof))


# --- Result objects ----------------------------------------------------------


@dataclass
class VerificationResult:
    """Each step's outcome, for `--json`; `verified` only when all passed."""

    verified: bool = False
    steps: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    failed_step: int | None = None
    bundle: VerifiedBundle | None = None
    online: OnlineCheck | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "verified": self.verified,
            "steps": self.steps,
            "error": self.error,
            "failed_step": self.failed_step,
        }
        if self.bundle is not None:
            leaf, cp = self.bundle.leaf, self.bundle.checkpoint.checkpoint
            body["entry"] = {
                "index": self.bundle.index,
                "origin": cp.origin,
                "tree_size": cp.size,
                "root_hash": base64.b64encode(cp.root_hash).decode(),
                "leaf": leaf.model_dump(mode="json", exclude_none=True),
            }
        if self.online is not None:
            latest = self.online.latest.checkpoint
            body["online"] = {
                "tree_size": latest.size,
                "root_hash": base64.b64encode(latest.root_hash).decode(),
                "consistency_proof": [
                    base64.b64encode(h).decode() for h in self.online.proof
                ],
            }
        return body


def check_bundle(
    bundle: Bundle,
    digest: bytes,
    log_key: NoteVerifier,
    artifact_keys: Mapping[str, ArtifactPublicKey],
    expect: Expectations | None = None,
    log: LogSource | None = None,
    *,
    size: int | None = None,
) -> VerificationResult:
    """Run `verify_bundle` (and `verify_online` given a log) into a result.

    Verification failures become the result's error; a FetchError (the log
    could not be read) is raised, since it says nothing about the bundle.
    """
    result = VerificationResult(steps=dict.fromkeys(STEP_NAMES.values(), "not run"))
    try:
        result.bundle = verify_bundle(
            bundle, digest, log_key, artifact_keys, expect, size=size
        )
    except StepFailed as e:
        result.failed_step, result.error = e.step, str(e)
        for number, name in STEP_NAMES.items():
            if number < e.step:
                result.steps[name] = "passed"
        result.steps[e.step_name] = "failed"
        return result
    result.steps = dict.fromkeys(STEP_NAMES.values(), "passed")
    if log is not None:
        result.steps["online"] = "failed"
        try:
            result.online = verify_online(result.bundle, log, log_key)
        except (FormatError, VerificationError) as e:
            result.error = f"online check: {e}"
            return result
        result.steps["online"] = "passed"
    result.verified = True
    return result


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode_strict(text: str, what: str) -> bytes:
    """Decode canonical padded base64; FormatError names what it was."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise FormatError(f"{what} is not base64") from e
    if b64(data) != text:
        raise FormatError(f"{what} is not canonical base64")
    return data
