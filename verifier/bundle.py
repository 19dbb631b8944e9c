"""The signature bundle: everything needed to verify an artifact offline.

A bundle is a JSON object with three members:

- `mediaType`: `application/vnd.logsign.bundle.v1+json`;
- `leaf`: the log entry, base64 of the exact leaf bytes;
- `proof`: a c2sp.org/tlog-proof@v1 text: the leaf's index, its inclusion
  proof, and the signed checkpoint the proof leads to.

The leaf carries the artifact digest and the signature over it, so the bundle
holds no copy of either that could disagree with what was logged.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from verifier.errors import FormatError
from verifier.merkle import HASH_SIZE

MEDIA_TYPE = "application/vnd.logsign.bundle.v1+json"
PROOF_HEADER = "c2sp.org/tlog-proof@v1"
MAX_BUNDLE_SIZE = 1 << 20
MAX_PROOF_HASHES = 64
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")


@dataclass(frozen=True)
class TlogProof:
    """A c2sp.org/tlog-proof: index, inclusion proof and checkpoint."""

    index: int
    hashes: tuple[bytes, ...]
    checkpoint: bytes
    extra: bytes | None = None

    def to_text(self) -> str:
        lines = [PROOF_HEADER]
        if self.extra is not None:
            lines.append("extra " + base64.b64encode(self.extra).decode())
        lines.append(f"index {self.index}")
        lines += [base64.b64encode(h).decode() for h in self.hashes]
        return "\n".join(lines) + "\n\n" + self.checkpoint.decode()


@dataclass(frozen=True)
class Bundle:
    leaf: bytes
    proof: TlogProof

    def to_json(self) -> bytes:
        body = {
            "leaf": base64.b64encode(self.leaf).decode(),
            "mediaType": MEDIA_TYPE,
            "proof": self.proof.to_text(),
        }
        return orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)


def _b64(text: str, what: str) -> bytes:
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FormatError(f"{what} is not base64") from exc
    if base64.b64encode(decoded).decode() != text:
        raise FormatError(f"{what} is not canonical base64")
    return decoded


def parse_tlog_proof(text: str) -> TlogProof:
    """Parse a tlog-proof strictly; the checkpoint is kept as bytes, unchecked."""
    head, sep, checkpoint = text.partition("\n\n")
    if not sep or not checkpoint:
        raise FormatError("tlog-proof has no checkpoint after a blank line")
    lines = head.split("\n")
    if lines[0] != PROOF_HEADER:
        raise FormatError(f"tlog-proof must start with {PROOF_HEADER!r}")
    at = 1
    extra = None
    if at < len(lines) and lines[at].startswith("extra "):
        extra = _b64(lines[at].removeprefix("extra "), "tlog-proof extra data")
        at += 1
    if at >= len(lines) or not lines[at].startswith("index "):
        raise FormatError("tlog-proof has no 'index N' line")
    raw_index = lines[at].removeprefix("index ")
    if not _DECIMAL.fullmatch(raw_index):
        raise FormatError("tlog-proof index is not a canonical decimal")
    hashes = tuple(_b64(line, "tlog-proof hash") for line in lines[at + 1 :])
    if len(hashes) > MAX_PROOF_HASHES:
        raise FormatError("tlog-proof has too many hashes")
    if any(len(h) != HASH_SIZE for h in hashes):
        raise FormatError("tlog-proof hash is not 32 bytes")
    return TlogProof(int(raw_index), hashes, checkpoint.encode(), extra)


def parse_bundle(data: bytes) -> Bundle:
    """Parse a bundle file strictly; nothing in it is verified yet."""
    if len(data) > MAX_BUNDLE_SIZE:
        raise FormatError("bundle is larger than 1 MiB")
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise FormatError("bundle is not JSON") from exc
    if not isinstance(body, dict) or set(body) != {"leaf", "mediaType", "proof"}:
        raise FormatError("bundle must have exactly leaf, mediaType and proof")
    if body["mediaType"] != MEDIA_TYPE:
        raise FormatError(f"bundle media type is not {MEDIA_TYPE}")
    if not isinstance(body["leaf"], str) or not isinstance(body["proof"], str):
        raise FormatError("bundle leaf and proof must be strings")
    return Bundle(_b64(body["leaf"], "bundle leaf"), parse_tlog_proof(body["proof"]))


def make_bundle(
    leaf: bytes, index: int, hashes: Sequence[bytes], checkpoint: bytes
) -> Bundle:
    return Bundle(leaf, TlogProof(index, tuple(hashes), checkpoint))
