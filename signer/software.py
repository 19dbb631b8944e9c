"""Software keys kept in files: for development and trials, not production.

Private keys live in PKCS#8 PEM files created with mode 0600. Signing runs on
a thread so that the event loop never waits on it, or for large batches in
worker processes when the signer is given some (signer/signing_processes.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from signer.atomicfile import write_atomic
from signer.keys import (
    ECDSA_P256_SHA256,
    ECDSA_P384_SHA256,
    RSA_PKCS1V15_SHA256,
    RSA_PSS_SHA256,
    ArtifactKey,
    SignerError,
)
from signer.signing_processes import ProcessesUnavailable, SigningProcesses

logger = logging.getLogger(__name__)

_PREHASHED_SHA256 = Prehashed(hashes.SHA256())
_ECDSA_PREHASHED = ec.ECDSA(_PREHASHED_SHA256)

# Signing in batches this large per thread hop keeps the hop cost negligible
# while letting other work interleave with a long batch.
_CHUNK = 256

# Batches at least this large go to the signing processes, when there are
# some: below it, the round trip to another process costs more than the
# signatures it would take off the server's GIL.
PROCESS_BATCH = 128

SoftwarePrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _write_private(path: Path, pem: bytes) -> None:
    """Create `path` (0600, all at once); FileExistsError if it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, pem, mode=0o600, exclusive=True)


def generate_artifact_key(algorithm: str) -> SoftwarePrivateKey:
    if algorithm == ECDSA_P256_SHA256:
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == ECDSA_P384_SHA256:
        return ec.generate_private_key(ec.SECP384R1())
    if algorithm in (RSA_PKCS1V15_SHA256, RSA_PSS_SHA256):
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise ValueError(f"unknown artifact signing algorithm {algorithm!r}")


def _key_fits(key: SoftwarePrivateKey, algorithm: str) -> bool:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        curve = {ECDSA_P256_SHA256: ec.SECP256R1, ECDSA_P384_SHA256: ec.SECP384R1}
        wanted = curve.get(algorithm)
        return wanted is not None and isinstance(key.curve, wanted)
    return algorithm in (RSA_PKCS1V15_SHA256, RSA_PSS_SHA256)


def sign_digest(key: SoftwarePrivateKey, algorithm: str, digest: bytes) -> bytes:
    """Sign a SHA-256 digest as `algorithm` says (DER for ECDSA)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(digest, _ECDSA_PREHASHED)
    if algorithm == RSA_PSS_SHA256:
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        return key.sign(digest, pss, _PREHASHED_SHA256)
    return key.sign(digest, padding.PKCS1v15(), _PREHASHED_SHA256)


class SoftwareArtifactSigner(ArtifactKey):
    """An artifact key held in memory, loaded from or created in a PEM file."""

    def __init__(
        self,
        name: str,
        algorithm: str,
        key: SoftwarePrivateKey,
        *,
        processes: int = 0,
    ) -> None:
        """`processes`: worker processes for large batches (0: threads only)."""
        super().__init__(name, algorithm, key.public_key())
        self._key = key
        self._processes: SigningProcesses | None = None
        if processes > 0:
            der = key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            self._processes = SigningProcesses(name, der, algorithm, processes)

    @classmethod
    def load_or_create(
        cls,
        name: str,
        path: Path,
        algorithm: str = ECDSA_P256_SHA256,
        *,
        processes: int = 0,
    ) -> SoftwareArtifactSigner:
        if path.exists():
            loaded = serialization.load_pem_private_key(path.read_bytes(), None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
                raise SignerError(f"{path}: not an ECDSA or RSA private key")
            if not _key_fits(loaded, algorithm):
                raise SignerError(
                    f"{path} holds a key that cannot sign {algorithm}: a key's "
                    "algorithm is fixed; add a new key under another name instead"
                )
            return cls(name, algorithm, loaded, processes=processes)
        key = generate_artifact_key(algorithm)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_private(path, pem)
        logger.warning(
            "generated software artifact key",
            extra={"key": name, "path": str(path), "algorithm": algorithm},
        )
        return cls(name, algorithm, key, processes=processes)

    @property
    def processes(self) -> SigningProcesses | None:
        return self._processes

    @property
    def workers_lost(self) -> int:
        """Times a signing process died (0 without processes)."""
        return 0 if self._processes is None else self._processes.workers_lost

    def sign_digests_sync(self, digests: Sequence[bytes]) -> list[bytes]:
        return [sign_digest(self._key, self._algorithm, d) for d in digests]

    async def sign_digests(self, digests: Sequence[bytes]) -> list[bytes]:
        if len(digests) <= 4:
            # A thread hop costs more than a few ECDSA signatures.
            return self.sign_digests_sync(digests)
        if self._processes is not None and len(digests) >= PROCESS_BATCH:
            try:
                return await self._processes.sign(digests)
            except ProcessesUnavailable:
                pass  # logged by SigningProcesses; the threads still sign
        signatures: list[bytes] = []
        for start in range(0, len(digests), _CHUNK):
            chunk = digests[start : start + _CHUNK]
            signatures += await asyncio.to_thread(self.sign_digests_sync, chunk)
        return signatures

    async def aclose(self) -> None:
        if self._processes is not None:
            await self._processes.aclose()


class SoftwareCheckpointSigner:
    """An Ed25519 note key held in memory, stored as a PKCS#8 PEM file."""

    def __init__(self, name: str, key: ed25519.Ed25519PrivateKey) -> None:
        self._name = name
        self._key = key
        self._public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def load_or_create(cls, name: str, path: Path) -> SoftwareCheckpointSigner:
        if path.exists():
            loaded = serialization.load_pem_private_key(path.read_bytes(), None)
            if not isinstance(loaded, ed25519.Ed25519PrivateKey):
                raise SignerError(f"{path}: not an Ed25519 private key")
            return cls(name, loaded)
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_private(path, pem)
        logger.warning(
            "generated software checkpoint key", extra={"key": name, "path": str(path)}
        )
        return cls(name, key)

    @property
    def name(self) -> str:
        return self._name

    @property
    def public_key(self) -> bytes:
        return self._public

    async def sign(self, message: bytes) -> bytes:
        # Ed25519 over a checkpoint takes tens of microseconds: cheaper than a hop.
        return self._key.sign(message)

    async def aclose(self) -> None:
        return None
