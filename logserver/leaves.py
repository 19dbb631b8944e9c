"""Leaves and deduplication keys built from an accepted submission.

The leaf is canonical JSON (keys sorted, no whitespace, no floats) and must
parse with `verifier.leaf.parse_leaf`; tests hold the two in step.
"""

from __future__ import annotations

import binascii
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


def request_claims(request: SubmitRequest) -> dict[str, Any]:
    """artifact, and source and build when given, without absent members."""
    claims: dict[str, Any] = request.model_dump(exclude_none=True, exclude=_NOT_CLAIMS)
    return claims


_NOT_CLAIMS = {"key"}


def identity_json(identity: Identity) -> dict[str, Any]:
    """The identity as leaves and audit records hold it."""
    return {
        "claims": identity.claims,
        "issuer": identity.issuer,
        "subject": identity.subject,
    }


def canonical(value: Any) -> bytes:
    """Canonical JSON: keys sorted at every depth, no whitespace."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True, slots=True)
class LeafContext:
    """What every leaf of one request has in common, serialized once.

    A batch request shares its caller, its key and usually its rule across
    all its entries; encoding them once keeps the per-entry work down to the
    claims, the signature and the time.
    """

    issuer: str
    subject: str
    key_id: str
    algorithm: str
    identity: orjson.Fragment
    policy: orjson.Fragment

    @classmethod
    def of(
        cls, identity: Identity, decision: PolicyDecision, signer: ArtifactSigner
    ) -> LeafContext:
        return cls(
            identity.issuer,
            identity.subject,
            signer.key_id,
            signer.algorithm,
            orjson.Fragment(canonical(identity_json(identity))),
            orjson.Fragment(canonical(decision.as_json())),
        )

    def dedup_key(self, claims: dict[str, Any]) -> bytes:
        """Equal for a retried request: same claims, same caller, same key."""
        material = {
            **claims,
            "identity": [self.issuer, self.subject],
            "key": self.key_id,
        }
        return hashlib.sha256(canonical(material)).digest()

    def leaf(
        self, claims: dict[str, Any], signature: bytes, now: int | None = None
    ) -> bytes:
        leaf = {
            **claims,
            "identity": self.identity,
            "policy": self.policy,
            "signature": {
                "algorithm": self.algorithm,
                "key_id": self.key_id,
                "value": binascii.b2a_base64(signature, newline=False).decode(),
            },
            "timestamp": int(time.time()) if now is None else now,
            "version": LEAF_VERSION,
        }
        encoded = canonical(leaf)
        # The request limits keep a leaf under about 30 KB; this guards the
        # format's 65,535-byte bound (the entry bundle's uint16 length) if
        # fields are ever added.
        if len(encoded) > MAX_LEAF_SIZE:
            raise ValueError(f"leaf of {len(encoded)} bytes exceeds {MAX_LEAF_SIZE}")
        return encoded


def dedup_key(
    request: SubmitRequest, identity: Identity, signer: ArtifactSigner
) -> bytes:
    """Equal for a retried request: same claims, same caller, same key."""
    context = LeafContext.of(identity, PolicyDecision("", ""), signer)
    return context.dedup_key(request_claims(request))


def build_leaf(
    request: SubmitRequest,
    identity: Identity,
    decision: PolicyDecision,
    signer: ArtifactSigner,
    signature: bytes,
) -> bytes:
    return LeafContext.of(identity, decision, signer).leaf(
        request_claims(request), signature
    )
