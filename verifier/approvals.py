"""Approvals of ceremonial requests: the signed message and its checks.

An approver signs the canonical approval message of a request: canonical JSON
(keys sorted, no whitespace) of

    {"artifact": ..., "build": ... (if the request had one),
     "context": "logsign/approval/v1", "decision": "approve" or "reject",
     "key_id": the artifact key ID that will sign, "origin": the log's origin,
     "request_id": ..., "requester": {"issuer": ..., "subject": ...},
     "rule": the policy rule, "source": ... (if the request had one)}

Every member except `origin` and `decision` is in the leaf, and the origin is
the name of the log's checkpoint key, so anyone holding the approvers' public
keys can re-check a ceremonial leaf's quorum from the log alone.

Approver keys are Ed25519 (signing the message itself), ECDSA P-256 with
SHA-256 or ECDSA P-384 with SHA-384 (DER signatures). A key's ID is the hex
SHA-256 of its DER SubjectPublicKeyInfo, as for artifact keys.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import (
    PrivateKeyTypes,
    PublicKeyTypes,
)

from verifier.errors import VerificationError
from verifier.leaf import Leaf, public_key_id

APPROVAL_CONTEXT = "logsign/approval/v1"

Decision = Literal["approve", "reject"]

_ECDSA_HASHES: dict[type[ec.EllipticCurve], type[hashes.HashAlgorithm]] = {
    ec.SECP256R1: hashes.SHA256,
    ec.SECP384R1: hashes.SHA384,
}


def approval_message(
    *,
    origin: str,
    request_id: str,
    rule: str,
    requester: tuple[str, str],
    artifact: Mapping[str, Any],
    source: Mapping[str, Any] | None,
    build: Mapping[str, Any] | None,
    key_id: str,
    decision: Decision = "approve",
) -> bytes:
    """The canonical bytes an approver signs for one request."""
    body: dict[str, Any] = {
        "artifact": dict(artifact),
        "context": APPROVAL_CONTEXT,
        "decision": decision,
        "key_id": key_id,
        "origin": origin,
        "request_id": request_id,
        "requester": {"issuer": requester[0], "subject": requester[1]},
        "rule": rule,
    }
    if source is not None:
        body["source"] = dict(source)
    if build is not None:
        body["build"] = dict(build)
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def leaf_approval_message(leaf: Leaf, origin: str) -> bytes:
    """The approval message of a ceremonial leaf, rebuilt from the leaf alone."""
    if leaf.policy.request_id is None:
        raise VerificationError("the leaf records no request ID to approve")
    return approval_message(
        origin=origin,
        request_id=leaf.policy.request_id,
        rule=leaf.policy.rule,
        requester=(leaf.identity.issuer, leaf.identity.subject),
        artifact=leaf.artifact.model_dump(exclude_none=True),
        source=None
        if leaf.source is None
        else leaf.source.model_dump(exclude_none=True),
        build=None if leaf.build is None else leaf.build.model_dump(exclude_none=True),
        key_id=leaf.signature.key_id,
    )


def approver_key_supported(public_key: PublicKeyTypes) -> bool:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return True
    return isinstance(public_key, ec.EllipticCurvePublicKey) and any(
        isinstance(public_key.curve, curve) for curve in _ECDSA_HASHES
    )


def sign_approval(private_key: PrivateKeyTypes, message: bytes) -> bytes:
    """Sign an approval message with an Ed25519 or ECDSA P-256/P-384 key."""
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return private_key.sign(message)
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        for curve, hash_type in _ECDSA_HASHES.items():
            if isinstance(private_key.curve, curve):
                return private_key.sign(message, ec.ECDSA(hash_type()))
    raise ValueError("approver keys must be Ed25519 or ECDSA on P-256 or P-384")


def verify_approval_signature(
    public_key: PublicKeyTypes, message: bytes, signature: bytes
) -> None:
    """Raise `VerificationError` unless `signature` is the key's over `message`."""
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, message)
            return
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            for curve, hash_type in _ECDSA_HASHES.items():
                if isinstance(public_key.curve, curve):
                    public_key.verify(signature, message, ec.ECDSA(hash_type()))
                    return
    except InvalidSignature as exc:
        raise VerificationError("the approval signature does not verify") from exc
    raise VerificationError("approver keys must be Ed25519 or ECDSA P-256/P-384")


@dataclass(frozen=True, slots=True)
class ApprovalCheck:
    """What a leaf's approvals show, given the approver keys one trusts."""

    valid: tuple[str, ...]
    """Key IDs of trusted approvers whose signatures verify, each once."""
    untrusted: tuple[str, ...]
    """Key IDs that are not among the given approver keys."""
    invalid: tuple[str, ...]
    """Key IDs of trusted approvers whose signatures do not verify."""
    repeated: tuple[str, ...]
    """Key IDs that appear more than once."""


def check_approvals(
    leaf: Leaf, origin: str, approver_keys: Iterable[PublicKeyTypes]
) -> ApprovalCheck:
    """Sort a leaf's approvals into valid, untrusted, invalid and repeated."""
    keys = {public_key_id(key): key for key in approver_keys}
    message = leaf_approval_message(leaf, origin)
    valid: list[str] = []
    untrusted: list[str] = []
    invalid: list[str] = []
    repeated: list[str] = []
    seen: set[str] = set()
    for approval in leaf.policy.approvals:
        if approval.key_id in seen:
            repeated.append(approval.key_id)
            continue
        seen.add(approval.key_id)
        key = keys.get(approval.key_id)
        if key is None:
            untrusted.append(approval.key_id)
            continue
        try:
            signature = base64.b64decode(approval.signature, validate=True)
            verify_approval_signature(key, message, signature)
        except (binascii.Error, VerificationError):
            invalid.append(approval.key_id)
        else:
            valid.append(approval.key_id)
    return ApprovalCheck(
        tuple(valid), tuple(untrusted), tuple(invalid), tuple(repeated)
    )


def verify_approvals(
    leaf: Leaf,
    origin: str,
    approver_keys: Iterable[PublicKeyTypes],
    threshold: int,
) -> tuple[str, ...]:
    """Check that at least `threshold` trusted approvers approved this leaf.

    1. The leaf must be ceremonial and name its request.
    2. Rebuild the approval message from the leaf and the log's origin.
    3. No key ID may appear twice, and every approval by a trusted key must
       verify: a log that records a bad approval misbehaved.
    4. At least `threshold` distinct trusted keys must have approved.

    Returns the key IDs of the valid approvals.
    """
    if threshold < 1:
        raise ValueError("the threshold must be at least 1")
    # 1.
    if leaf.policy.mode != "ceremonial" or leaf.policy.request_id is None:
        raise VerificationError("the leaf is not a ceremonial signature")
    # 2. and 3.
    result = check_approvals(leaf, origin, approver_keys)
    if result.repeated:
        raise VerificationError(f"approver {result.repeated[0]} appears twice")
    if result.invalid:
        raise VerificationError(f"the approval by {result.invalid[0]} does not verify")
    # 4.
    if len(result.valid) < threshold:
        raise VerificationError(
            f"{len(result.valid)} trusted approvals; {threshold} are required"
        )
    return result.valid
