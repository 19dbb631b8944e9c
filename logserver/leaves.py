"""Leaves and deduplication keys built from an accepted submission.

The leaf is canonical JSON (keys sorted, no whitespace, no floats) and must
parse with `verifier.leaf.parse_leaf`; tests hold the two in step.
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import orjson

from logserver.auth import Identity
from logserver.models import SubmitRequest
from signer.keys import ArtifactSigner
from verifier.leaf import MAX_LEAF_SIZE

LEAF_VERSION = 1


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """The leaf's `policy` member: the rule that allowed the signature and how.

    `approvals` are (approver key ID, base64 signature) pairs; `builders` are
    the (issuer, subject) pairs of a reproducibility quorum.
    """

    rule: str
    policy_sha256: str
    mode: str = "automated"
    approvals: tuple[tuple[str, str], ...] = ()
    request_id: str | None = None
    builders: tuple[tuple[str, str], ...] | None = None

    def as_json(self) -> dict[str, Any]:
        policy: dict[str, Any] = {
            "approvals": [
                {"key_id": key_id, "signature": signature}
                for key_id, signature in self.approvals
            ],
            "mode": self.mode,
            "policy_sha256": self.policy_sha256,
            "rule": self.rule,
        }
        if self.request_id is not None:
            policy["request_id"] = self.request_id
        if self.builders is not None:
            policy["builders"] = [
                {"issuer": issuer, "subject": subject}
                for issuer, subject in self.builders
            ]
        return policy


def _claims(request: SubmitRequest) -> dict[str, Any]:
    """artifact, and source and build when given, without absent members."""
    claims: dict[str, Any] = request.model_dump(exclude_none=True, exclude=_NOT_CLAIMS)
    return claims


_NOT_CLAIMS = {"key"}


def dedup_key(
    request: SubmitRequest, identity: Identity, signer: ArtifactSigner
) -> bytes:
    """Equal for a retried request: same claims, same caller, same key."""
    material = _claims(request)
    material["identity"] = [identity.issuer, identity.subject]
    material["key"] = signer.key_id
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).digest()


def build_leaf(
    request: SubmitRequest,
    identity: Identity,
    decision: PolicyDecision,
    signer: ArtifactSigner,
    signature: bytes,
) -> bytes:
    leaf = _claims(request)
    leaf["identity"] = {
        "claims": identity.claims,
        "issuer": identity.issuer,
        "subject": identity.subject,
    }
    leaf["policy"] = decision.as_json()
    leaf["signature"] = {
        "algorithm": signer.algorithm,
        "key_id": signer.key_id,
        "value": base64.b64encode(signature).decode(),
    }
    leaf["timestamp"] = int(time.time())
    leaf["version"] = LEAF_VERSION
    encoded = orjson.dumps(leaf, option=orjson.OPT_SORT_KEYS)
    # The request limits keep a leaf under about 30 KB; this guards the
    # format's 65,535-byte bound (the entry bundle's uint16 length) if
    # fields are ever added.
    if len(encoded) > MAX_LEAF_SIZE:
        raise ValueError(f"leaf of {len(encoded)} bytes exceeds {MAX_LEAF_SIZE}")
    return encoded
