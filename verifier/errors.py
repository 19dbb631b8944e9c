"""The errors the verifier raises, kept apart by who is at fault.

`FormatError` and `VerificationError` are about untrusted input or a remote
that misbehaves; a caller's misuse raises the built-in `ValueError` or
`TypeError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from verifier.checkpoint import SignedCheckpoint


class VerifierError(Exception):
    """Base of every error about data the verifier was handed."""


class FormatError(VerifierError):
    """Bytes that do not parse as the format they claim to be."""


class VerificationError(VerifierError):
    """Well-formed data that fails a cryptographic or consistency check."""


class ConsistencyError(VerificationError):
    """Two checkpoints of one log that do not prove consistent.

    Carries the evidence, both signed checkpoints and the proof that failed,
    so that a monitor can print or publish it.
    """

    def __init__(
        self,
        message: str,
        old: SignedCheckpoint,
        new: SignedCheckpoint,
        proof: Sequence[bytes],
    ) -> None:
        super().__init__(message)
        self.old = old
        self.new = new
        self.proof = tuple(proof)
