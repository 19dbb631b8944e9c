"""PKCS#11 signers for the log server: artifact keys and the checkpoint key.

Both sign through a `signer.pkcs11_pool.WorkerPool`: worker processes that
each hold one logged-in session, so the event loop never waits on the HSM and
the PKCS#11 module is never used from two threads of one process.

    config = Pkcs11Config(module=..., token_label="log", key_label="release")
    signer = await Pkcs11ArtifactSigner.open("release", config)
    signatures = await signer.sign_digests(digests)
    await signer.aclose()

Failures come out as `SignerUnavailable` (the HSM or a session is gone, or a
call timed out: answer 503 and retry later) or `SignerError` (configuration,
PIN, or a signature that did not verify). The key administration functions
used by `signer key` are re-exported from `signer.pkcs11_keys`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from signer.keys import (
    ARTIFACT_ALGORITHMS,
    ECDSA_P256_SHA256,
    ArtifactKey,
    SignerError,
    public_key_id,
)
from signer.pkcs11_config import Pkcs11Config
from signer.pkcs11_keys import (
    KeyInfo,
    export_public_pem,
    export_verifier_key,
    generate_key,
    list_keys,
)
from signer.pkcs11_pool import WorkerPool
from signer.pkcs11_session import DEFAULT_PIN_ENV, ED25519
from signer.pkcs11_worker import DIGEST_SIZE
from verifier.note import verifier_key

__all__ = [
    "DEFAULT_PIN_ENV",
    "ED25519",
    "KeyInfo",
    "Pkcs11ArtifactSigner",
    "Pkcs11CheckpointSigner",
    "Pkcs11Config",
    "export_public_pem",
    "export_verifier_key",
    "generate_key",
    "list_keys",
]

logger = logging.getLogger(__name__)


async def _open_pool(
    config: Pkcs11Config, algorithm: str
) -> tuple[WorkerPool, PublicKeyTypes]:
    pool = WorkerPool(config.worker_spec(algorithm), config)
    spki = await pool.start()
    public_key = serialization.load_der_public_key(spki)
    logger.info(
        "PKCS#11 signer started",
        extra={
            "token": config.token_label,
            "key": config.key_label,
            "algorithm": algorithm,
            "workers": config.workers,
            "key_id": public_key_id(public_key),
        },
    )
    return pool, public_key


class _PoolOwner:
    """Closes the signing processes with the signer, also as `async with`."""

    _pool: WorkerPool

    @property
    def worker_pids(self) -> list[int]:
        """Process IDs of the live workers, for monitoring and fault tests."""
        return self._pool.pids

    @property
    def workers_lost(self) -> int:
        """Worker processes lost so far (each one is restarted)."""
        return self._pool.workers_lost

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class Pkcs11ArtifactSigner(ArtifactKey, _PoolOwner):
    """An `ArtifactSigner` whose key stays in a PKCS#11 token."""

    def __init__(
        self,
        name: str,
        algorithm: str,
        pool: WorkerPool,
        public_key: PublicKeyTypes,
    ) -> None:
        """Use `open()`; this takes a pool that is already running."""
        super().__init__(name, algorithm, public_key)
        self._pool = pool

    @classmethod
    async def open(
        cls, name: str, config: Pkcs11Config, algorithm: str = ECDSA_P256_SHA256
    ) -> Pkcs11ArtifactSigner:
        """Start the workers and log them in; `SignerError` if that fails."""
        if algorithm not in ARTIFACT_ALGORITHMS:
            raise ValueError(f"unknown artifact signing algorithm {algorithm!r}")
        pool, public_key = await _open_pool(config, algorithm)
        return cls(name, algorithm, pool, public_key)

    async def sign_digests(self, digests: Sequence[bytes]) -> list[bytes]:
        for digest in digests:
            if len(digest) != DIGEST_SIZE:
                raise ValueError(f"a SHA-256 digest is 32 bytes, not {len(digest)}")
        return await self._pool.run(digests)


class Pkcs11CheckpointSigner(_PoolOwner):
    """A `CheckpointSigner` whose Ed25519 note key stays in a PKCS#11 token."""

    def __init__(
        self, name: str, pool: WorkerPool, public_key: ed25519.Ed25519PublicKey
    ) -> None:
        """Use `open()`; this takes a pool that is already running."""
        self._name = name
        self._pool = pool
        self._public = public_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._verifier_key = verifier_key(name, self._public)

    @classmethod
    async def open(cls, name: str, config: Pkcs11Config) -> Pkcs11CheckpointSigner:
        """Start the workers for the note key `name` (the log's origin)."""
        pool, public_key = await _open_pool(config, ED25519)
        if not isinstance(public_key, ed25519.Ed25519PublicKey):  # pragma: no cover
            await pool.aclose()
            raise SignerError("the worker reported a key that is not Ed25519")
        try:
            return cls(name, pool, public_key)
        except ValueError:
            await pool.aclose()
            raise

    @property
    def name(self) -> str:
        return self._name

    @property
    def public_key(self) -> bytes:
        return self._public

    @property
    def verifier_key(self) -> str:
        """The note verifier key text, as `log.vkey` holds it."""
        return self._verifier_key

    async def sign(self, message: bytes) -> bytes:
        (signature,) = await self._pool.run([message])
        return signature
