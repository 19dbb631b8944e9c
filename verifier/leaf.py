"""The log's leaf: one record per signature, in canonical JSON.

Canonical means UTF-8, keys sorted, no insignificant whitespace, no floats,
optional values omitted rather than null, and at most 65,535 bytes. What is
hashed is exactly what is stored and served, so `parse_leaf` accepts only
bytes that `encode_leaf` would produce.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import unicodedata
from typing import Annotated, Literal

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.hashes import SHA256
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from verifier.errors import FormatError, VerificationError

MAX_LEAF_SIZE = 0xFFFF
MAX_NAME_LENGTH = 1024
MAX_INT = (1 << 63) - 1

_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ecdsa-p256-sha256": ec.SECP256R1,
    "ecdsa-p384-sha256": ec.SECP384R1,
}
_RSA_ALGORITHMS = ("rsa-pkcs1v15-sha256", "rsa-pss-sha256")

Algorithm = Literal[
    "ecdsa-p256-sha256",
    "ecdsa-p384-sha256",
    "rsa-pkcs1v15-sha256",
    "rsa-pss-sha256",
]


def _no_control_characters(value: str) -> str:
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ValueError("control characters are not allowed")
    return value


def _canonical_base64(value: str) -> str:
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError("not base64") from e
    if not decoded or base64.b64encode(decoded).decode("ascii") != value:
        raise ValueError("not canonical non-empty base64")
    return value


Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
RequestId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
Base64 = Annotated[str, AfterValidator(_canonical_base64)]
ArtifactName = Annotated[
    str,
    Field(min_length=1, max_length=MAX_NAME_LENGTH),
    AfterValidator(_no_control_characters),
]
Count = Annotated[int, Field(ge=0, le=MAX_INT)]


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Artifact(_Model):
    """What was signed: its name, SHA-256 digest and, if given, its size."""

    name: ArtifactName
    sha256: Hex64
    size: Count | None = None


class Build(_Model):
    """Build claims: the builder and how it was invoked."""

    builder: str | None = None
    invocation: str | None = None


class Identity(_Model):
    """The authenticated caller and the claims the policy used."""

    issuer: str
    subject: str
    claims: dict[str, str] = Field(default_factory=dict)


class Approval(_Model):
    """One approver's signature on a ceremonial request."""

    key_id: Hex64
    signature: Base64


class Builder(_Model):
    """One builder that reported the artifact's digest for a quorum."""

    issuer: str
    subject: str


class Policy(_Model):
    """The policy decision that allowed the signature.

    `request_id` names the parked request a ceremonial or quorum signature
    completed; `builders` lists the distinct builders of a quorum.
    """

    approvals: tuple[Approval, ...] = ()
    builders: tuple[Builder, ...] | None = None
    mode: Literal["automated", "ceremonial"]
    policy_sha256: Hex64
    request_id: RequestId | None = None
    rule: str


class ArtifactSignature(_Model):
    """The artifact signature, its algorithm and the signing key's ID."""

    algorithm: Algorithm
    key_id: Hex64
    value: Base64


class Source(_Model):
    """Source claims: repository, commit and ref."""

    commit: str | None = None
    ref: str | None = None
    repository: str | None = None


class Leaf(_Model):
    """Version 1 of the leaf."""

    artifact: Artifact
    build: Build | None = None
    identity: Identity
    policy: Policy
    signature: ArtifactSignature
    source: Source | None = None
    timestamp: Count
    version: Literal[1] = 1


def encode_leaf(leaf: Leaf) -> bytes:
    """The canonical JSON encoding of a leaf."""
    try:
        data = orjson.dumps(
            leaf.model_dump(mode="json", exclude_none=True),
            option=orjson.OPT_SORT_KEYS,
        )
    except orjson.JSONEncodeError as e:
        # A str that is not valid UTF-8, such as a lone surrogate.
        raise ValueError("leaf cannot be encoded as UTF-8 JSON") from e
    if len(data) > MAX_LEAF_SIZE:
        raise ValueError(f"leaf is larger than {MAX_LEAF_SIZE} bytes")
    return data


def parse_leaf(data: bytes) -> Leaf:
    """Parse a leaf; it must be valid and exactly in canonical form."""
    if len(data) > MAX_LEAF_SIZE:
        raise FormatError("leaf is too large")
    try:
        leaf = Leaf.model_validate_json(data)
    except ValidationError as e:
        raise FormatError("invalid leaf") from e
    try:
        canonical = encode_leaf(leaf)
    except ValueError as e:
        raise FormatError("leaf cannot be encoded") from e
    if canonical != data:
        raise FormatError("leaf is not in canonical form")
    return leaf


def public_key_id(public_key: PublicKeyTypes) -> str:
    """The key ID: hex SHA-256 of the key's DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def verify_artifact_signature(
    public_key: PublicKeyTypes, algorithm: str, digest: bytes, signature: bytes
) -> None:
    """Check a signature over a SHA-256 digest with the named algorithm.

    1. The key must be of the algorithm's type and, for ECDSA, curve.
    2. The signature must verify over the prehashed digest: ECDSA with a DER
       signature, RSA PKCS#1 v1.5, or RSA-PSS with MGF1-SHA-256 and a salt
       as long as the digest.
    """
    if len(digest) != hashlib.sha256().digest_size:
        raise ValueError("digest must be 32 bytes of SHA-256")
    prehashed = Prehashed(SHA256())
    try:
        if algorithm in _CURVES:
            # 1.
            if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
                public_key.curve, _CURVES[algorithm]
            ):
                raise VerificationError("key does not match the signature algorithm")
            # 2.
            public_key.verify(signature, digest, ec.ECDSA(prehashed))
        elif algorithm in _RSA_ALGORITHMS:
            # 1.
            if not isinstance(public_key, rsa.RSAPublicKey):
                raise VerificationError("key does not match the signature algorithm")
            # 2.
            pad: padding.AsymmetricPadding = padding.PKCS1v15()
            if algorithm == "rsa-pss-sha256":
                pad = padding.PSS(mgf=padding.MGF1(SHA256()), salt_length=len(digest))
            public_key.verify(signature, digest, pad, prehashed)
        else:
            raise VerificationError("unknown signature algorithm")
    except InvalidSignature as e:
        raise VerificationError("artifact signature does not verify") from e
