"""Checkpoints, c2sp.org/tlog-checkpoint: a log's signed tree head.

The body is the origin line, the tree size in decimal, the base64 root hash
and optional extension lines, each ending in a newline; it is the text of a
signed note whose key name equals the origin.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass

from verifier.errors import ConsistencyError, FormatError, VerificationError
from verifier.merkle import HASH_SIZE, verify_consistency
from verifier.note import MAX_NOTE_SIZE, Note, NoteVerifier, open_note

# Tree sizes fit a signed 64-bit integer, as databases store them.
MAX_TREE_SIZE = (1 << 63) - 1

_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint body: origin, tree size, root hash and extension lines."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.origin or _CONTROL.search(self.origin):
            raise ValueError(f"invalid origin {self.origin!r}")
        if not 0 <= self.size <= MAX_TREE_SIZE:
            raise ValueError(f"tree size {self.size} is out of range")
        if len(self.root_hash) != HASH_SIZE:
            raise ValueError(f"root hash is {len(self.root_hash)} bytes")
        for line in self.extensions:
            if not line or _CONTROL.search(line):
                raise ValueError(f"invalid extension line {line!r}")

    def to_text(self) -> str:
        """The body as note text, every line ending in a newline."""
        root = base64.b64encode(self.root_hash).decode("ascii")
        lines = [self.origin, str(self.size), root, *self.extensions]
        return "".join(line + "\n" for line in lines)


def parse_checkpoint_body(text: str) -> Checkpoint:
    """Parse a checkpoint body strictly."""
    if len(text) > MAX_NOTE_SIZE:
        raise FormatError("checkpoint is too large")
    if not text.endswith("\n"):
        raise FormatError("checkpoint does not end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise FormatError("checkpoint has fewer than three lines")
    origin, size_text, root_text, *extensions = lines
    if not origin:
        raise FormatError("checkpoint origin is empty")
    if not _DECIMAL.fullmatch(size_text) or int(size_text) > MAX_TREE_SIZE:
        raise FormatError("checkpoint tree size is not a canonical decimal")
    try:
        root = base64.b64decode(root_text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise FormatError("checkpoint root hash is not base64") from e
    if len(root) != HASH_SIZE or base64.b64encode(root).decode() != root_text:
        raise FormatError("checkpoint root hash is not 32 bytes in canonical base64")
    if any(not line for line in extensions):
        raise FormatError("checkpoint has an empty extension line")
    try:
        return Checkpoint(origin, int(size_text), root, tuple(extensions))
    except ValueError as e:
        raise FormatError("invalid checkpoint") from e


@dataclass(frozen=True)
class SignedCheckpoint:
    """A checkpoint with the note it came in and the note's exact bytes."""

    checkpoint: Checkpoint
    note: Note
    raw: bytes


def open_checkpoint(data: bytes, verifier: NoteVerifier) -> SignedCheckpoint:
    """Parse a signed checkpoint and check the log's signature on it.

    1. Parse the note and check its signature by `verifier`.
    2. Parse the body.
    3. Require the origin to equal the key name.
    """
    # 1.
    note = open_note(data, [verifier])
    # 2.
    checkpoint = parse_checkpoint_body(note.text)
    # 3.
    if checkpoint.origin != verifier.name:
        raise VerificationError("checkpoint origin does not match the log key")
    return SignedCheckpoint(checkpoint, note, data)


def verify_checkpoint_consistency(
    old: SignedCheckpoint, new: SignedCheckpoint, proof: Sequence[bytes]
) -> None:
    """Check that `new` extends `old`; ConsistencyError carries the evidence.

    1. Both checkpoints must come from the same origin.
    2. The proof must show the old tree is a prefix of the new one.
    """
    # 1.
    if old.checkpoint.origin != new.checkpoint.origin:
        raise VerificationError("checkpoints are from different logs")
    # 2.
    try:
        verify_consistency(
            old.checkpoint.size,
            new.checkpoint.size,
            old.checkpoint.root_hash,
            new.checkpoint.root_hash,
            proof,
        )
    except VerificationError as e:
        raise ConsistencyError("checkpoints are not consistent", old, new, proof) from e
