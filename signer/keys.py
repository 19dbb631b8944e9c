"""The interface every key backend implements, software or PKCS#11.

The log server holds one `CheckpointSigner` (an Ed25519 note key whose name is
the log's origin) and one or more `ArtifactSigner`s. Backends own their own
concurrency: the async methods never block the event loop, whether the work
runs on a thread, in a pool of processes, or in an HSM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from verifier.leaf import public_key_id as public_key_id  # re-exported for backends

# The algorithms an artifact signature may use. Every one signs the SHA-256
# digest the client sent, so `openssl dgst -sha256 -verify` checks it over the
# artifact file itself.
ECDSA_P256_SHA256 = "ecdsa-p256-sha256"
ECDSA_P384_SHA256 = "ecdsa-p384-sha256"
RSA_PKCS1V15_SHA256 = "rsa-pkcs1v15-sha256"
RSA_PSS_SHA256 = "rsa-pss-sha256"
ARTIFACT_ALGORITHMS = (
    ECDSA_P256_SHA256,
    ECDSA_P384_SHA256,
    RSA_PKCS1V15_SHA256,
    RSA_PSS_SHA256,
)


class SignerError(Exception):
    """A key backend failed in a way that retrying will not fix."""


class SignerUnavailable(SignerError):
    """The backend cannot sign right now (HSM gone, session lost); retry later."""


def public_key_pem(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class ArtifactKey:
    """What every artifact signer publishes: its name, algorithm, key and ID."""

    def __init__(self, name: str, algorithm: str, public_key: PublicKeyTypes) -> None:
        self._name = name
        self._algorithm = algorithm
        self._public_key = public_key
        self._key_id = public_key_id(public_key)

    @property
    def name(self) -> str:
        return self._name

    @property
    def algorithm(self) -> str:
        return self._algorithm

    @property
    def public_key(self) -> PublicKeyTypes:
        return self._public_key

    @property
    def key_id(self) -> str:
        return self._key_id


@runtime_checkable
class ArtifactSigner(Protocol):
    """Signs SHA-256 digests of artifacts; the result is a DER or PKCS#1 signature."""

    @property
    def name(self) -> str:
        """The key's name in the configuration, used for `<name>.pem`."""

    @property
    def algorithm(self) -> str:
        """One of `ARTIFACT_ALGORITHMS`."""

    @property
    def public_key(self) -> PublicKeyTypes: ...

    @property
    def key_id(self) -> str:
        """`public_key_id(self.public_key)`: hex SHA-256 of the SPKI DER."""

    async def sign_digests(self, digests: Sequence[bytes]) -> list[bytes]:
        """Sign each 32-byte digest; raise `SignerUnavailable` to ask for a retry."""

    async def aclose(self) -> None: ...


@runtime_checkable
class CheckpointSigner(Protocol):
    """Signs checkpoint notes with Ed25519 under the log's origin."""

    @property
    def name(self) -> str:
        """The note key name; equal to the checkpoint origin."""

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""

    async def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `message`."""

    async def aclose(self) -> None: ...
